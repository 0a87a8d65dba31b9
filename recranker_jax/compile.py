"""`recranker compile`: a run config's finetune step (and, at scale, the rank stage's prefill
and branch programs) compiled ahead of time for a named TPU slice by the TPU compiler, on any
machine with the `tpu` extra (libtpu) installed, with no TPU and no weights: the chip's own
verdict on memory before the slice is rented (MaxText's train_compile, axlearn's AOT).

The slice is a Cloud TPU accelerator type as gcloud spells it (`v5litepod-8`, `v4-8`, `v5p-8`,
`v6e-8`; `v5e-N` is accepted for `v5litepod-N`), `--slices N` for a multi-slice (DCN) job;
`jax.experimental.topologies.get_topology_desc` describes its devices. The config's mesh,
rules, remat, attention, batch and sequence length are used as they are; the architecture
comes from `model.checkpoint`'s config.json, or `--arch`, or the `model` section (as `plan`).
The finetune step scores every position (`loss_mask`), the most memory its head can take.

The report: chips and hosts, per-chip memory from the compiler's analysis against the chip's
HBM (fits, or the shortfall and what to change), compile seconds, the analytic FLOPs of a step
(`hardware.llama_flops_per_token`; XLA's cost analysis counts a scanned layer once) and the MFU
a given step time would mean. libtpu is loaded by one process at a time (/tmp/libtpu_lockfile).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError

# gcloud's accelerator-type prefix -> (topology name prefix, TensorCores per chip in the type's
# number, the 2D / 3D chip grid of each chip count)
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
GENERATIONS = {
    "v4": ("v4", 2, _GRID_3D),
    "v5litepod": ("v5e", 1, _GRID_2D),
    "v5p": ("v5p", 2, _GRID_3D),
    "v6e": ("v6e", 1, _GRID_2D),
}
ALIASES = {"v5e": "v5litepod"}
REMAT_LEANER = {"none": "minimal", "dots": "minimal", "minimal": "full"}  # the next policy to try when short


def known_accelerators() -> list[str]:
    return [f"{prefix}-{chips * cores}" for prefix, (_, cores, grids) in GENERATIONS.items() for chips in grids]


@dataclasses.dataclass(frozen=True)
class Slice:
    """One TPU slice type: gcloud's name, the topology name JAX describes it by, its chips."""

    accelerator: str
    topology: str
    chips: int
    generation: str


def parse_accelerator(name: str) -> Slice:
    """A Cloud TPU accelerator type (`v5litepod-8`, `v4-8`, `v5p-8`, `v6e-8`; `v5e-8` too)."""
    found = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", name.strip().lower())
    if found:
        prefix = ALIASES.get(found.group(1), found.group(1))
        generation, cores, grids = GENERATIONS[prefix]
        count = int(found.group(2))
        if count % cores == 0 and count // cores in grids:
            chips = count // cores
            return Slice(f"{prefix}-{count}", f"{generation}:{grids[chips]}", chips, generation)
    raise RecRankerError(f"accelerator type {name!r} is unknown; expected one of {', '.join(known_accelerators())}")


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise RecRankerError('the TPU compiler (libtpu) is not installed: pip install "recranker-jax[tpu]" '
                             '(or pip install "jax[tpu]" at the installed jax version)')


def tpu_environment(accelerator: str, environ: dict | None = None) -> None:
    """What libtpu reads at start-up, so that it neither queries a TPU VM's metadata server nor
    prints warnings on a machine without a TPU (values already set are kept)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if environ.get("JAX_PLATFORMS") == "cpu":  # this process drives no TPU: it may load libtpu beside another
        environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def slice_devices(tpu: Slice, slices: int = 1) -> list:
    """The devices of `slices` slices of `tpu`, described by the TPU compiler (no TPU needed)."""
    require_libtpu()
    if slices < 1:
        raise RecRankerError(f"--slices {slices}: expected a positive integer")
    tpu_environment(tpu.accelerator)
    from jax.experimental import topologies

    options: dict[str, Any] = {"num_slices": slices} if slices > 1 else {}
    if tpu.generation in ("v5e", "v6e") and tpu.chips <= 8:
        # one host, as Cloud TPU's v5litepod-8 / v6e-8 VMs are (the default host is 2x2x1 chips)
        options["chips_per_host_bounds"] = [int(n) for n in tpu.topology.split(":")[1].split("x")] + [1]
    if tpu.generation == "v4":
        options["chip_config_name"] = "megacore"  # one device per chip, as JAX meshes need
    try:
        return list(topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu", **options).devices)
    except RuntimeError as error:
        if "lockfile" in str(error).lower() or "in use" in str(error).lower():
            raise RecRankerError("the TPU compiler is in use by another process (/tmp/libtpu_lockfile): "
                                 "run one compile at a time") from None
        raise


def slice_mesh(cfg: Config, devices: list, slices: int = 1):
    """The config's mesh over the slice's devices; several slices split the first mesh axis
    (data) across slices (over DCN) and the rest within each slice."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from recranker_jax.config_checks import check_mesh, resolve_mesh_shape

    check_mesh(cfg.mesh.shape, cfg.mesh.axes, cfg.mesh.rules)
    shape = resolve_mesh_shape(cfg.mesh.shape, len(devices))
    if slices == 1:
        import jax

        return jax.make_mesh(shape, tuple(cfg.mesh.axes), axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    if shape[0] % slices:
        raise RecRankerError(f"mesh.shape={list(shape)}: with --slices {slices} the first axis "
                             f"({cfg.mesh.axes[0]}) must be a multiple of {slices}")
    within = (shape[0] // slices, *shape[1:])
    across = (slices,) + (1,) * (len(shape) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices=devices)
    return Mesh(np.asarray(grid), tuple(cfg.mesh.axes), axis_types=(AxisType.Auto,) * len(shape))


def _step_flops(llama, shape) -> float:
    from recranker_jax.hardware import llama_flops_per_token
    from recranker_jax.plan import abstract_parameters

    adapters = 0
    if shape.lora:
        from recranker_jax.config import LoRAConfig

        targets, rank, alpha = shape.lora
        lora = LoRAConfig(enabled=True, targets=list(targets), rank=rank, alpha=alpha)
        adapters = sum(math.prod(s) for _, s, is_adapter in abstract_parameters(llama, lora) if is_adapter)
    per_token = llama_flops_per_token(llama, shape.seq_len, "lora" if shape.lora else "full", adapters)
    return per_token * shape.batch_size * shape.seq_len


def compile_finetune(cfg: Config, accelerator: str, slices: int = 1, arch: str | None = None,
                     remat: str | None = None, batch_size: int | None = None, attention: str | None = None,
                     step_seconds: float | None = None, rank_programs: bool = False) -> dict:
    """The finetune step of `cfg` compiled for `slices` x `accelerator` (a JSON-ready dict)."""
    from recranker_jax.config_checks import check_batch, resolve_mesh_shape
    from recranker_jax.hardware import device_memory_bytes, peak_flops
    from recranker_jax.llm.remat import POLICIES, resolve
    from recranker_jax.plan import resolve_architecture
    from recranker_jax.train.aot import StepShape, compile_step
    from recranker_jax.train.remat_choice import choose_remat

    tpu = parse_accelerator(accelerator)
    if remat is not None and remat not in POLICIES:
        raise RecRankerError(f"--remat {remat}: expected one of {', '.join(POLICIES)}")
    llama, source = resolve_architecture(cfg, arch)
    overrides: dict[str, Any] = {}
    if batch_size is not None:
        if batch_size < 1:
            raise RecRankerError(f"--batch-size {batch_size}: expected a positive integer")
        overrides["batch_size"] = batch_size
    if attention is not None:
        overrides["attention"] = attention
    shape = StepShape.of(cfg, llama, **overrides)
    chips = tpu.chips * slices
    try:
        sizes = dict(zip(cfg.mesh.axes, resolve_mesh_shape(cfg.mesh.shape, chips)))
    except RecRankerError as error:
        raise RecRankerError(f"{tpu.accelerator}{f' x {slices}' if slices > 1 else ''} has {chips} chips: {error}") from None
    check_batch("train.batch_size" if batch_size is None else "--batch-size", shape.batch_size, cfg.mesh.rules, sizes)
    # `auto` on a TPU asks the compiler (train/remat_choice.py): the fastest policy that fits
    policies = [resolve(remat or shape.remat, platform="tpu")] if (remat or shape.remat) != "auto" else None
    devices = slice_devices(tpu, slices)
    mesh = slice_mesh(cfg, devices, slices)
    capacity = device_memory_bytes(devices[0])
    started = time.perf_counter()
    tried = choose_remat(lambda policy: compile_step(dataclasses.replace(shape, remat=policy), mesh, cfg.mesh.rules,
                                                     capacity), policies)
    chosen = tried[-1]
    total_seconds = time.perf_counter() - started
    flops = _step_flops(llama, shape)
    peak = peak_flops(devices[0], shape.dtype)
    doc = {
        "accelerator": tpu.accelerator, "slices": slices, "topology": tpu.topology,
        "device_kind": devices[0].device_kind, "chips": chips,
        "hosts": len({d.process_index for d in devices}),
        "hbm_bytes_per_chip": capacity, "architecture": source,
        "mesh": sizes, "rules": cfg.mesh.rules,
        "step": {"batch_size": shape.batch_size, "seq_len": shape.seq_len, "dtype": shape.dtype,
                 "param_dtype": shape.param_dtype, "attention": shape.attention, "scan_layers": shape.scan_layers,
                 "lora": list(shape.lora) if shape.lora else None, "remat_requested": remat or shape.remat},
        "policies": [{"remat": policy, **result} for policy, result in tried],
        "remat": chosen[0], "fits": chosen[1]["fits"], "memory": chosen[1]["memory"],
        "needed_bytes": chosen[1].get("needed_bytes"), "compile_seconds": total_seconds,
        "step_flops": flops, "peak_flops_per_chip": peak,
        "mfu_at_step_seconds": (None if not (step_seconds and peak)
                                else {"step_seconds": step_seconds, "mfu": flops / step_seconds / (peak * chips)}),
    }
    if not doc["fits"]:
        doc["advice"] = advice(doc, cfg)
    if rank_programs:
        doc["rank"] = compile_rank(cfg, llama, mesh, capacity)
    return doc


def advice(doc: dict, cfg: Config) -> str:
    """What to change when the step does not fit: a leaner remat policy, a smaller per-chip
    batch, or more chips for the weights (fsdp)."""
    options = []
    leaner = REMAT_LEANER.get(doc["remat"])
    if leaner:
        options.append(f"train.remat={leaner}")
    batch = doc["step"]["batch_size"]
    from recranker_jax.config_checks import shards

    batch_shards = shards("batch", cfg.mesh.rules, doc["mesh"])
    if batch > batch_shards:
        options.append(f"train.batch_size={max(batch_shards, batch // 2 // batch_shards * batch_shards)} "
                       f"(with train.accumulation to keep the tokens per update)")
    options.append("a larger slice with more fsdp (mesh.shape)")
    return "; or ".join(options)


def compile_rank(cfg: Config, llama, mesh, capacity: int | None) -> dict:
    """The rank stage's two programs at scale, per chip: the prompt prefill (`rank.batch_size`
    rows of `prompts.max_tokens`) and the branch pass over its cache (the listwise / pairwise
    continuations, 256 packed tokens a row)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from recranker_jax.llm import decode
    from recranker_jax.llm.llama import KVCache, Llama
    from recranker_jax.parallel import BATCH_AXES, logical_spec, sharding_context
    from recranker_jax.train.aot import compile_lowered, shard_abstract

    rows = cfg.rank.batch_size
    width = decode.bucket_width(cfg.prompts.max_tokens)
    m = cfg.model
    model = nnx.eval_shape(lambda: Llama(llama, nnx.Rngs(0), m.dtype, m.param_dtype, "none", m.scan_layers,
                                         m.attention))
    shard_abstract(model, mesh, cfg.mesh.rules)
    batch = NamedSharding(mesh, logical_spec(BATCH_AXES, cfg.mesh.rules))

    def array(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch)

    cache = jax.eval_shape(lambda: KVCache.zeros(llama, rows, width, jnp.dtype(m.dtype)))
    cache_sharding = NamedSharding(mesh, logical_spec((None, "batch", None, "kv_heads", None), cfg.mesh.rules))
    cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cache_sharding), cache)
    branch_width = 256
    programs = {
        "prefill": (decode._prefill, (model, array((rows, width)), array((rows, width)), array((rows, width), bool))),
        "branches": (decode.branch_logprobs, (model, array((rows, branch_width)), cache, array((rows, branch_width)),
                                              array((rows, width), bool), array((rows, branch_width)),
                                              array((rows, 16)))),
    }
    out = {}
    for name, (function, args) in programs.items():
        with sharding_context(mesh, cfg.mesh.rules):
            lowered = function.lower(*args)
        out[name] = compile_lowered(lowered, capacity)
    out["shape"] = {"rows": rows, "prompt_width": width, "branch_width": branch_width}
    return out


def _gb(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GB"


def format_report(doc: dict) -> str:
    """The compile result as a few plain lines (GB: 2^30 bytes, as the compiler reports)."""
    slices = f"{doc['slices']} x " if doc["slices"] > 1 else ""
    step = doc["step"]
    lines = [f"{slices}{doc['accelerator']} ({doc['device_kind']}, {doc['topology']}): {doc['chips']} chips, "
             f"{doc['hosts']} hosts, {_gb(doc['hbm_bytes_per_chip'])} HBM a chip; mesh "
             + " x ".join(f"{axis}={size}" for axis, size in doc["mesh"].items()),
             f"finetune step: {step['batch_size']} x {step['seq_len']} tokens, {step['dtype']}, attention "
             f"{step['attention']}, {'LoRA' if step['lora'] else 'full fine-tuning'}; {doc['architecture']}"]
    for entry in doc["policies"]:
        memory = entry["memory"]
        if memory is None:
            verdict = f"does not fit: needs {_gb(entry.get('needed_bytes'))} of {_gb(entry.get('capacity_bytes'))}"
        else:
            parts = ", ".join(f"{name} {_gb(memory[name])}" for name in ("argument", "output", "alias", "temp",
                                                                       "generated_code"))
            verdict = (f"{'fits' if entry['fits'] else 'does not fit'}: {_gb(memory['total'])} per chip ({parts})")
        lines.append(f"  remat {entry['remat']}: {verdict}; compiled in {entry['compile_seconds']:.1f} s")
    if doc["remat"] != step["remat_requested"]:
        lines.append(f"train.remat={step['remat_requested']} chooses {doc['remat']} here")
    flops = f"step: {doc['step_flops'] / 1e12:,.1f} TFLOPs (analytic)"
    if doc.get("mfu_at_step_seconds"):
        m = doc["mfu_at_step_seconds"]
        flops += f"; a step of {m['step_seconds']:g} s would be {m['mfu']:.1%} MFU"
    lines.append(flops)
    for name in ("prefill", "branches"):
        entry = (doc.get("rank") or {}).get(name)
        if entry:
            shape = doc["rank"]["shape"]
            size = shape["prompt_width"] if name == "prefill" else shape["branch_width"]
            lines.append(f"rank {name} ({shape['rows']} rows x {size} tokens): "
                         f"{'fits' if entry['fits'] else 'does not fit'}, {_gb(entry['needed_bytes'])} per chip; "
                         f"compiled in {entry['compile_seconds']:.1f} s")
    lines.append("verdict: " + ("fits" if doc["fits"] else f"does not fit; change {doc['advice']}"))
    return "\n".join(lines)


def add_compile_arguments(parser) -> None:
    parser.add_argument("--accelerator", required=True, metavar="TYPE",
                        help="Cloud TPU accelerator type as gcloud spells it, e.g. v5litepod-8, v4-8, v5p-8, v6e-8")
    parser.add_argument("--slices", type=int, default=1, help="number of slices (multi-slice over DCN); default 1")
    parser.add_argument("--arch", help="bundled LLaMA architecture (llama2-7b, llama2-13b) when the checkpoint "
                                       "is not on this machine")
    parser.add_argument("--remat", help="remat policy instead of train.remat (auto: the fastest that fits)")
    parser.add_argument("--batch-size", type=int, help="global rows per step instead of train.batch_size")
    parser.add_argument("--attention", help="attention kernel instead of model.attention")
    parser.add_argument("--step-seconds", type=float, help="a step time, to report the MFU it would mean")
    parser.add_argument("--rank", action="store_true", help="also compile the rank stage's prefill and branch programs")
    parser.add_argument("--out", help="also write the result as JSON to this file")


def run_compile(args) -> int:
    """`recranker compile`: exit 0 when the step fits the slice, 3 when it does not."""
    import json
    from pathlib import Path

    from recranker_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    doc = compile_finetune(cfg, args.accelerator, slices=args.slices, arch=args.arch, remat=args.remat,
                           batch_size=args.batch_size, attention=args.attention, step_seconds=args.step_seconds,
                           rank_programs=args.rank)
    print(format_report(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"result written to {args.out}")
    return 0 if doc["fits"] else NOT_FITTING


NOT_FITTING = 3
