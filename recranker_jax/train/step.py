"""The instruction-tuning step: masked next-token cross-entropy on answer tokens, AdamW with
warmup + cosine decay, gradient clipping and accumulation, and parameters, optimizer state
and batches placed with `NamedSharding`s from the config's logical-axis rules.

Full fine-tuning trains every `nnx.Param`; LoRA trains only `nnx.LoRAParam`s (the `wrt`
filter), so the base weights get neither gradients nor optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from recranker_jax.llm.llama import Llama
from recranker_jax.parallel import logical_spec

# Logical axes of each weight, by the name of the module holding it.
WEIGHT_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}
BATCH_AXES = ("batch", None)


def weight_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (replicated when unknown, e.g. norms, adapters)."""
    for part in reversed(path):
        if isinstance(part, str) and part in WEIGHT_AXES and ndim == 2 and path[-1] in ("kernel", "embedding"):
            return WEIGHT_AXES[part]
    return (None,) * ndim


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict[str, list[str]]) -> None:
    """Place every parameter of `model` by its logical axes (in place)."""
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    shardings = {
        path: NamedSharding(mesh, logical_spec(weight_axes(path, variable.get_value().ndim), rules))
        for path, variable in flat
    }
    for path, variable in flat:
        variable.set_value(jax.device_put(variable.get_value(), shardings[path]))
    nnx.update(model, nnx.from_flat_state(flat))


def answer_loss(model: Llama, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy over answer tokens, number of answer tokens) for a packed batch."""
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    targets = jnp.roll(batch["tokens"], -1, axis=1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count


def make_optimizer(
    lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.0, clip_norm: float = 1.0,
    accumulation: int = 1,
) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


@nnx.jit
def train_step(model: Llama, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    """One optimizer update on `batch`; returns the loss before the update."""
    diff = nnx.DiffState(0, optimizer.wrt)
    (loss, _), grads = nnx.value_and_grad(answer_loss, argnums=diff, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss


def place_batch(batch: dict[str, jax.Array], mesh: Mesh | None, rules: dict[str, list[str]]) -> dict[str, jax.Array]:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = NamedSharding(mesh, logical_spec(BATCH_AXES, rules))
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
