"""LoRA as a model transform: instruction tuning trains low-rank adapters, never the base LLaMA.

Design (after Levanter's LoRA):
- `apply_lora` swaps the chosen `nnx.Linear` projections of every layer, in
  place, for `LoRALinear(base)`: y = base(x) + dropout(x) @ A @ B * alpha / rank.
  A [in, r] and B [r, out] are `nnx.LoRAParam`, so `nnx.Optimizer(model, tx,
  wrt=nnx.LoRAParam)` and `nnx.DiffState(0, nnx.LoRAParam)` select exactly the
  adapters; the base kernels stay plain `nnx.Param` and are never updated.
- Init follows Hugging Face PEFT: A ~ kaiming-uniform(a=sqrt(5)), i.e.
  U(-1/sqrt(in), 1/sqrt(in)); B = 0, so the adapted model equals the base
  bit for bit until the first update.
- Dropout acts on the adapter's input only (as PEFT does). It is an
  `nnx.Dropout`, active by default like every NNX dropout: switch it off for
  evaluation with `model.eval()` or `nnx.view(model, deterministic=True)`.
  Rate 0 holds no RNG state and is the identity.
- `merge_lora` folds A @ B * scale into the base kernels and puts back plain
  `nnx.Linear` modules (no adapter cost at serving time).
- `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained(base, folder)` loads onto the Hugging Face
  model: our module paths mirror Hugging Face names, so
  `layers.3.self_attn.q_proj` becomes
  `base_model.model.model.layers.3.self_attn.q_proj.lora_{A,B}.weight`,
  stored transposed ([r, in] and [out, r]) as torch does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recranker_jax.config_checks import ATTENTION_PROJECTIONS, check_lora, normalise_targets
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import is_primary, to_host


# PEFT's default LoRA A init, kaiming_uniform_(a=sqrt(5)) on torch's [r, in]
# weight: bound = sqrt(6 / ((1 + 5) * in)) = 1 / sqrt(in); the same as
# variance scaling 1/3, fan-in, uniform on our [in, r] layout.
lora_a_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRALinear(nnx.Module):
    """A frozen `nnx.Linear` plus a trainable low-rank update: base(x) + dropout(x) @ A @ B * alpha / rank.

    With `layers`, the base is the stacked projection of scanned layers (kernel [L, in, out]) and
    A, B and the dropout's random stream get the same leading layers axis (each layer its own)."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype = jnp.float32, layers: int | None = None, key: jax.Array | None = None):
        in_features, out_features = base.kernel.shape[-2:]
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        lead = () if layers is None else (layers,)
        key = rngs.params() if key is None else key  # with `layers`: one key per layer, [L]
        init = lambda key: lora_a_init(key, (in_features, rank), param_dtype)  # noqa: E731
        self.lora_a = nnx.LoRAParam(init(key) if layers is None else jax.vmap(init)(key))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, out_features), param_dtype))
        self.dropout = _dropout(dropout, rngs, layers)

    def delta(self) -> jax.Array:
        """The update folded into the kernel by merging: A @ B * scale, [(L,) in, out], float32."""
        return (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        # in the input's dtype, as the frozen projection runs (float32 adapters would promote a
        # bfloat16 x [B, T, in] to float32 first), accumulating in float32
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        update = jnp.dot(jnp.dot(self.dropout(x), a, preferred_element_type=jnp.float32).astype(x.dtype), b,
                         preferred_element_type=jnp.float32)
        return y + (update * self.scale).astype(y.dtype)


def _dropout(rate: float, rngs: nnx.Rngs, layers: int | None) -> nnx.Dropout:
    """The adapter's input dropout (rate 0: no random stream); one stream per layer with `layers`."""
    if rate == 0 or layers is None:
        return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Dropout:
        return nnx.Dropout(rate, rngs=rngs)

    return create(rngs)


def _parent(layer: nnx.Module, projection: str) -> nnx.Module:
    return layer.self_attn if projection in ATTENTION_PROJECTIONS else layer.mlp


def _blocks(model) -> list[tuple[str, nnx.Module]]:
    """(name, block) of every layer: the one stacked block of scanned layers, or each layer."""
    if model.scan_layers:
        return [("layers", model.layers)]
    return [(f"layers.{index}", layer) for index, layer in enumerate(model.layers)]


def apply_lora(model, targets: Sequence[str], rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
    """Wrap the target projections of every layer in `LoRALinear`, in place; returns the model.
    Layer i's A comes from the i-th of one split of keys per projection, so scanned and looped
    layers get the same adapters from the same seed."""
    projections = normalise_targets(targets)
    check_lora(rank, alpha, dropout)
    blocks = _blocks(model)
    for name, block in blocks:
        for projection in projections:
            base = getattr(_parent(block, projection), projection)
            if isinstance(base, LoRALinear):
                raise RecRankerError(
                    f"{name}.{projection} already has a LoRA adapter; call merge_lora first to stack another"
                )
            if not isinstance(base, nnx.Linear) or getattr(base, "bias", None) is not None:
                raise RecRankerError(f"{name}.{projection} is {type(base).__name__}; expected a bias-free nnx.Linear")
    layers = model.config.num_hidden_layers
    # all A keys first: the dropouts' random streams below draw from `rngs` too
    projection_keys = [jax.random.split(rngs.params(), layers) for _ in projections]
    for projection, keys in zip(projections, projection_keys):
        for index, (_, block) in enumerate(blocks):
            parent = _parent(block, projection)
            adapter = (LoRALinear(getattr(parent, projection), rank, alpha, dropout, rngs, layers=layers, key=keys)
                       if model.scan_layers else
                       LoRALinear(getattr(parent, projection), rank, alpha, dropout, rngs, key=keys[index]))
            setattr(parent, projection, adapter)
    return model


def lora_modules(model) -> dict[tuple, LoRALinear]:
    """Path in the model (e.g. ('layers', 0, 'self_attn', 'q_proj'); scanned layers:
    ('layers', 'self_attn', 'q_proj')) -> its LoRALinear."""
    return {tuple(path): module for path, module in nnx.iter_modules(model) if isinstance(module, LoRALinear)}


def merge_lora(model):
    """Fold every adapter into its base kernel and put back the plain nnx.Linear; in place, returns the model."""
    for path, module in lora_modules(model).items():
        kernel = module.base.kernel
        merged = kernel[...].astype(jnp.float32) + module.delta()
        kernel.set_value(merged.astype(kernel[...].dtype))
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        setattr(parent, path[-1], module.base)
    return model


def lora_parameter_count(model) -> int:
    """Number of trainable adapter weights (sum of r * (in + out) over the adapted projections)."""
    return sum(m.lora_a[...].size + m.lora_b[...].size for m in lora_modules(model).values())


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def export_peft(model, folder: str | Path, base_model_name_or_path: str, targets: Sequence[str], rank: int,
                alpha: float, dropout: float) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into `folder`; returns it.

    The arguments must describe the adapters the model holds (checked): the
    config is what `peft` uses to rebuild the modules the weights load into.
    With several processes every process must call it (adapters split across processes are
    gathered); only the primary process writes the folder.
    """
    from safetensors.numpy import save_file

    projections = normalise_targets(targets)
    check_lora(rank, alpha, dropout)
    modules = lora_modules(model)
    if not modules:
        raise RecRankerError("the model has no LoRA adapters to export; call apply_lora first")
    found = sorted({path[-1] for path in modules})
    if found != sorted(projections):
        raise RecRankerError(f"export targets {list(projections)} differ from the model's adapted projections {found}")
    tensors = {}
    for path, module in modules.items():
        if module.rank != rank or not math.isclose(module.alpha, alpha):
            raise RecRankerError(
                f"{'.'.join(map(str, path))} has rank {module.rank}, alpha {module.alpha}; export asked for rank {rank}, alpha {alpha}"
            )
        lora_a = to_host(module.lora_a[...]).astype(np.float32)
        lora_b = to_host(module.lora_b[...]).astype(np.float32)
        # per layer, as PEFT names them: a stacked (scanned) adapter is split into its layers
        per_layer = [(path, lora_a, lora_b)] if lora_a.ndim == 2 else [
            (("layers", index, *path[1:]), lora_a[index], lora_b[index]) for index in range(lora_a.shape[0])]
        for layer_path, layer_a, layer_b in per_layer:
            name = "base_model.model.model." + ".".join(map(str, layer_path))
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(layer_a.T)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(layer_b.T)  # [out, r]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": _json_number(alpha),
        "lora_dropout": float(dropout),
        "target_modules": list(projections),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = Path(folder).expanduser()
    if is_primary():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
