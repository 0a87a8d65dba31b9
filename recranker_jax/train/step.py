"""The instruction-tuning step: masked next-token cross-entropy on answer tokens, AdamW with
warmup + cosine decay, gradient clipping and accumulation, and parameters and optimizer state
placed with `NamedSharding`s from the config's logical-axis rules.

Full fine-tuning trains every `nnx.Param`; LoRA trains only `nnx.LoRAParam`s (the `wrt`
filter), so the base weights get neither gradients nor optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recranker_jax.llm.llama import WEIGHT_AXES, Llama, weight_axes  # noqa: F401 (re-exported)
from recranker_jax.parallel import array_sharding, mesh_platform, place_array
from recranker_jax.train.loss import linear_cross_entropy


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict[str, list[str]]) -> None:
    """Place every parameter of `model` by its logical axes (in place)."""
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    shardings = {
        path: array_sharding(mesh, variable.get_value().shape, weight_axes(path, variable.get_value().ndim), rules)
        for path, variable in flat
    }
    for path, variable in flat:
        variable.set_value(place_array(variable.get_value(), shardings[path]))
    nnx.update(model, nnx.from_flat_state(flat))


def shard_optimizer(optimizer: nnx.Optimizer, mesh: Mesh) -> None:
    """Commit optimizer state that is not yet on the mesh (step counters) as replicated, so the
    jitted step sees the same shardings at every call (one compilation)."""
    flat = nnx.to_flat_state(nnx.state(optimizer))
    replicated = NamedSharding(mesh, PartitionSpec())
    for _, variable in flat:
        value = variable.get_value()
        if isinstance(value, jax.Array) and not (isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh):
            variable.set_value(place_array(value, replicated))
    nnx.update(optimizer, nnx.from_flat_state(flat))


def answer_loss(model: Llama, batch: dict[str, jax.Array], fused: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy over answer tokens, number of answer tokens) for a packed batch.

    The loss positions come as `loss_mask` [B, T], or as `answer_positions` / `answer_mask`
    [B, A] (`packing.batch_arrays`): then the output head runs only at those A positions per
    row, not at all T. `fused` computes the head and the loss chunk by chunk
    (`train.loss.linear_cross_entropy`; the default on the CPU when every position is scored:
    measured -50 ms a step at the quickstart size, but +20 ms with answer positions, whose
    logits are small); otherwise nll = logsumexp(logits) - logits[target]."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    targets = jnp.roll(batch["tokens"], -1, axis=1)
    if "answer_positions" in batch:
        at = batch["answer_positions"]
        hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
        targets = jnp.take_along_axis(targets, at, axis=1)
        mask = batch["answer_mask"].astype(jnp.float32)
    else:
        mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    if fused is None:
        fused = mesh_platform() == "cpu" and "answer_positions" not in batch
    if fused:
        total = linear_cross_entropy(model.norm(hidden), model.head_weight(), targets, mask)
    else:
        logits = model.head(hidden).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total = jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * mask)
    return total / jnp.maximum(count, 1.0), count


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))


def make_optimizer(
    lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.0, clip_norm: float = 1.0,
    accumulation: int = 1,
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(lr, warmup_steps, total_steps)
    # float32 first moments whatever the parameters' dtype (bfloat16 would round small updates away)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, weight_decay=weight_decay, mu_dtype=jnp.float32))
    return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


def _update(model: Llama, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """One update; returns the loss and the gradients' global norm (before clipping)."""
    diff = nnx.DiffState(0, optimizer.wrt)
    (loss, _), grads = nnx.value_and_grad(answer_loss, argnums=diff, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss, optax.global_norm(grads)


_JITTED = {"donating": nnx.jit(_update, donate_argnums=(0, 1)), "plain": nnx.jit(_update)}


def jitted_train_step(platform: str | None = None):
    """The compiled step for `platform` (default: this backend). On accelerators the model's and the optimizer's arrays
    are donated: the step updates them in place, and LoRA's frozen weights are not copied every
    step (LLaMA-2 7B: 13.5 GB of device memory and a copy per step). Not on the CPU, where
    donating made the quickstart step ~4% slower (memory is plentiful there)."""
    return _JITTED["plain" if (platform or jax.default_backend()) == "cpu" else "donating"]


def train_step_stats(model: Llama, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """One optimizer update on `batch`; returns the loss before the update and the gradients'
    global norm (before clipping)."""
    return jitted_train_step()(model, optimizer, batch)


def train_step(model: Llama, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    """One optimizer update on `batch`; returns the loss before the update."""
    return train_step_stats(model, optimizer, batch)[0]
