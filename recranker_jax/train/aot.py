"""The finetune step compiled ahead of time from abstract shapes: no weights read, nothing
allocated, on any mesh, including a TPU slice's devices described on a machine without a TPU
(`recranker compile`), or this machine's own accelerators (`train.remat: auto` asks the
compiler which policy fits).

`abstract_step_inputs` builds the step's model, optimizer and batch under `nnx.eval_shape`,
each array a `jax.ShapeDtypeStruct` with the sharding the finetune gives it (weights by their
logical axes and the config's rules, as `train.step.shard_model` places them; optimizer
moments like their weight; the batch's rows over the "batch" axes). `compile_step` lowers and
compiles the donating step (as accelerators run it) and returns the compiler's memory analysis
per device. A program that does not fit fails to compile on TPUs (RESOURCE_EXHAUSTED);
`compile_step` returns that as a result (`fits` False, the compiler's message), not an error.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recranker_jax.llm.llama import Llama, LlamaConfig, weight_axes
from recranker_jax.llm.lora import apply_lora
from recranker_jax.parallel import BATCH_AXES, array_sharding, logical_spec

# The model's top-level attributes: an optimizer-state path names a weight from one of these on.
MODEL_ROOTS = ("embed_tokens", "layers", "norm", "lm_head")
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")
# A compiled program fits a device when its peak is at most this share of the device's memory
# (the rest: the runtime's own buffers and fragmentation; a TPU compiler accepts programs up to
# its usable HBM, 15.75 of a v5e chip's 16 GiB).
HEADROOM = 0.95


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the compiled finetune step depends on. `answers`: answer positions per row (the
    finetune's `answer_positions` form, `train.packing.batch_arrays`); None scores every
    position (`loss_mask`: the output head over all tokens, the most memory)."""

    llama: LlamaConfig
    batch_size: int
    seq_len: int
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    remat: str = "full"
    attention: str = "auto"
    scan_layers: bool = True
    lora: tuple | None = None  # (targets, rank, alpha)
    answers: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulation: int = 1

    @classmethod
    def of(cls, cfg: Any, llama: LlamaConfig, **overrides) -> StepShape:
        """The finetune's step of run config `cfg` for the architecture `llama`."""
        m, t = cfg.model, cfg.train
        lora = (tuple(t.lora.targets), t.lora.rank, t.lora.alpha) if t.lora.enabled else None
        values = dict(llama=llama, batch_size=t.batch_size, seq_len=t.seq_len, dtype=m.dtype,
                      param_dtype=m.param_dtype, remat=t.remat, attention=m.attention, scan_layers=m.scan_layers,
                      lora=lora, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=max(t.steps, 1),
                      weight_decay=t.weight_decay, clip_norm=t.clip_norm, accumulation=t.accumulation)
        return cls(**{**values, **overrides})


def _model_path(path: tuple) -> tuple:
    """The part of a state path (a model's, or an optimizer moment's) that names a model weight."""
    for index, part in enumerate(path):
        if part in MODEL_ROOTS:
            return tuple(path[index:])
    return ()


def shard_abstract(node: Any, mesh: Mesh | None, rules: dict) -> None:
    """Give every abstract array of `node`'s state its sharding on `mesh` (in place)."""
    if mesh is None:
        return
    flat = nnx.to_flat_state(nnx.state(node))
    for path, variable in flat:
        value = variable.get_value()
        if not isinstance(value, jax.ShapeDtypeStruct):
            continue
        weight = _model_path(tuple(path))
        if weight and value.ndim:
            sharding = array_sharding(mesh, value.shape, weight_axes(weight, value.ndim), rules)
        else:
            sharding = NamedSharding(mesh, PartitionSpec())
        variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    nnx.update(node, nnx.from_flat_state(flat))


def abstract_step_inputs(shape: StepShape, mesh: Mesh | None = None, rules: dict | None = None):
    """(model, optimizer, batch) of the step as abstract arrays, sharded on `mesh` when given."""
    from recranker_jax.train.step import make_optimizer

    def build():
        model = Llama(shape.llama, nnx.Rngs(0), shape.dtype, shape.param_dtype, shape.remat, shape.scan_layers,
                      shape.attention)
        if shape.lora:
            targets, rank, alpha = shape.lora
            apply_lora(model, list(targets), rank, alpha, 0.0, nnx.Rngs(1))
        tx = make_optimizer(shape.lr, shape.warmup_steps, shape.total_steps, shape.weight_decay, shape.clip_norm,
                            shape.accumulation)
        return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam if shape.lora else nnx.Param)

    model, optimizer = nnx.eval_shape(build)
    rules = rules or {}
    shard_abstract(model, mesh, rules)
    shard_abstract(optimizer, mesh, rules)
    rows, length = shape.batch_size, shape.seq_len
    batch_sharding = None if mesh is None else NamedSharding(mesh, logical_spec(BATCH_AXES, rules))

    def array(width: int):
        return jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=batch_sharding)

    batch = {name: array(length) for name in ("tokens", "positions", "segment_ids")}
    if shape.answers is not None and shape.answers < length:
        batch.update(answer_positions=array(shape.answers), answer_mask=array(shape.answers))
    else:
        batch["loss_mask"] = array(length)
    return model, optimizer, batch


# libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
# temporaries (29.16G) exceeds available HBM (15.75G)."; other versions: "Used 29.16G of 15.75G hbm".
_OUT_OF_MEMORY = re.compile(r"(?:temporaries \(|Used )([\d.]+)([KMGT])\)?(?: exceeds available HBM \(| of )"
                            r"([\d.]+)([KMGT])")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_figures(message: str) -> dict | None:
    """The bytes the program needs (its temporaries, as the TPU compiler counts them) and the
    device's usable bytes, from the compiler's out-of-memory message; None if it is not one."""
    found = _OUT_OF_MEMORY.search(message)
    if not found:
        return None
    used, used_unit, capacity, capacity_unit = found.groups()
    return {"needed_bytes": int(float(used) * _UNITS[used_unit]),
            "capacity_bytes": int(float(capacity) * _UNITS[capacity_unit])}


def memory_figures(compiled: Any) -> dict[str, int]:
    """Bytes per device from the compiled program's memory analysis, with `total` (what the
    program holds at its peak: arguments + outputs not aliased to them + temporaries + code)."""
    analysis = compiled.memory_analysis()
    figures = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0) for name in MEMORY_FIELDS}
    figures["total"] = (figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
                        + figures["generated_code"])
    return figures


def compile_lowered(lowered: Any, capacity_bytes: int | None = None) -> dict:
    """Compile a lowered program and judge it. Returns {"fits", "memory" (bytes per device, or
    None when the compiler refused the program), "needed_bytes" (its total, or the compiler's
    figure when it refused), "compile_seconds", "error"}. `capacity_bytes` (a device's memory):
    a compiled program whose peak exceeds `HEADROOM` of it does not fit either (compilers that
    do not check, e.g. the CPU's, or a TPU program at the compiler's very limit)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # the compiler's verdict; anything else is re-raised
        figures = out_of_memory_figures(str(error))
        if figures is None and "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"fits": False, "memory": None, **(figures or {}), "compile_seconds": time.perf_counter() - started,
                "error": next((line for line in str(error).splitlines() if "memory" in line.lower()),
                              str(error).splitlines()[0])}
    compile_seconds = time.perf_counter() - started
    memory = memory_figures(compiled)
    fits = capacity_bytes is None or memory["total"] <= HEADROOM * capacity_bytes
    return {"fits": fits, "memory": memory, "needed_bytes": memory["total"], "compile_seconds": compile_seconds,
            "error": None}


def compile_step(shape: StepShape, mesh: Mesh, rules: dict, capacity_bytes: int | None = None) -> dict:
    """Lower and compile the donating finetune step of `shape` on `mesh`: `compile_lowered`'s
    result with "lower_seconds"."""
    from recranker_jax.parallel import sharding_context
    from recranker_jax.train.step import jitted_train_step

    model, optimizer, batch = abstract_step_inputs(shape, mesh, rules)
    started = time.perf_counter()
    with sharding_context(mesh, rules):
        lowered = jitted_train_step(mesh.devices.flat[0].platform).lower(model, optimizer, batch)
    lower_seconds = time.perf_counter() - started
    return {**compile_lowered(lowered, capacity_bytes), "lower_seconds": lower_seconds}
