"""`recranker plan`: will a finetune config fit a mesh? Bytes per device of parameters, LoRA
adapters, optimizer state, gradients and activations, from abstract shapes only.

The LLaMA is built under `nnx.eval_shape` (no weights are allocated or read): from the
checkpoint's config.json when `model.checkpoint` exists, from a bundled architecture
(`--arch llama2-7b | llama2-13b`), or from the `model` section for a model trained from
scratch. Each weight is placed by the config's logical-axis rules as the finetune stage
places it (`weight_axes` + `parallel.logical_spec`, keeping only mesh axes that divide the
dimension, as `parallel.array_sharding` does); its bytes per device are the product over
dimensions of size / shards, shards = product of the mesh axes that dimension is split
over, times the item size. Activations use ceil(size / shards).

Per device, for T trainable weights (all `nnx.Param`s, or only the adapters with LoRA):
- parameters: base weights in `model.param_dtype`;
  adapters in float32 (their dtype in `llm.lora`), replicated.
- optimizer: AdamW's two moments, float32, sharded like their weight: 8 bytes per T.
- gradients: float32, sharded like their weight: 4 bytes per T; with train.accumulation > 1
  optax.MultiSteps keeps one more float32 accumulator: 4 more bytes per T.
- activations, for the global batch of b rows of s = seq_len tokens split over the batch
  shards, item size a of `model.dtype`, heads / kv_heads / mlp / vocab split over their shards:
  one block saves 4 b s d a (block input, two norm outputs, mid residual)
  + 3 b s H hd a (q before and after rotary, attention output) + 3 b s KV hd a (k before and
  after rotary, v) + the attention's own: with a flash kernel (`model.attention` auto on an
  accelerator, splash, pallas_gpu, cudnn, tiled) its float32 log-sum-exp, b H s 4; with
  "xla", b H s^2 (8 + a) (float32 masked scores and softmax, weights cast to a)
  + 5 b s I a (gate, up, sigmoid(gate), silu(gate), their product)
  + b s r a per adapted projection; the head saves b s d a + b s V (a + 12) (logits, float32
  logits, log-probabilities and their gradient); with "xla" the backward pass of one block
  adds b H s^2 8 (float32 gradients of the probabilities and the scores).
  train.remat (`llm.remat`) none: L blocks + head + backward; otherwise L times what the policy
  keeps of a block + one block recomputed + head + backward, where full keeps the block input
  (b s d a), minimal adds q and k after rotary, v and the attention output, dots adds the
  seven projections' outputs (q, k, v, o, gate, up, down). auto is planned as the finetune
  runs it on an accelerator: the first of none, dots, minimal, full that fits with 10% to spare
  (the finetune asks the compiler; `recranker compile`).
  Checked against the TPU compiler's per-chip total (`recranker compile`; 7B and 13B LoRA at
  2048 tokens a chip on v5e-8, v4-8 and v5p-8, every policy; docs/scale-out.md): from 7% under
  to 9% over. Treat a plan within 10% of the device memory as not fitting.

Device memory, in GB of 1e9 bytes: --device-memory, else the HBM of --device-kind, else of
the local accelerator when it is a known chip (recranker_jax.hardware), else 16 GB (a TPU v5e chip,
the smallest common accelerator).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recranker_jax.config import Config, load_config
from recranker_jax.errors import RecRankerError

GB = 1e9
DEFAULT_DEVICE_MEMORY_GB = 16.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# Bundled architectures, used when the checkpoint folder is not on this machine
# (the Hugging Face config.json values of meta-llama/Llama-2-{7b,13b}-hf).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama2-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                  "tie_word_embeddings": False},
    "llama2-13b": {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                   "tie_word_embeddings": False},
}


def _dtype_name(value: Any, key: str) -> str:
    name = str(value)
    if name not in DTYPE_BYTES:
        raise RecRankerError(f"{key}={name}: expected one of {', '.join(DTYPE_BYTES)}")
    return name


def resolve_architecture(cfg: Config, arch: str | None = None):
    """(LlamaConfig, where it came from): --arch, else the checkpoint's config.json, else the
    `model` section with the run tokenizer's vocabulary (prompts.tokenizer_vocab_size, an upper bound)."""
    from recranker_jax.llm.llama import LlamaConfig

    if arch is not None:
        if arch not in ARCHITECTURES:
            raise RecRankerError(f"--arch {arch}: expected one of {', '.join(ARCHITECTURES)}")
        return LlamaConfig(**ARCHITECTURES[arch]), f"{arch} (bundled architecture)"
    if cfg.model.checkpoint:
        folder = Path(cfg.model.checkpoint).expanduser()
        if not (folder / "config.json").is_file():
            raise RecRankerError(
                f"model.checkpoint={cfg.model.checkpoint}: no config.json there; pass --arch "
                f"{' or --arch '.join(ARCHITECTURES)} to plan with a bundled architecture"
            )
        from recranker_jax.llm.hf_import import read_config

        return read_config(folder), f"{folder / 'config.json'}"
    m = cfg.model
    llama = LlamaConfig(
        vocab_size=cfg.prompts.tokenizer_vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
        rope_theta=m.rope_theta, max_position_embeddings=cfg.train.seq_len, tie_word_embeddings=m.tie_word_embeddings,
    )
    return llama, "model section (from scratch; vocabulary = prompts.tokenizer_vocab_size)"


def abstract_parameters(llama_config, lora=None) -> list[tuple[tuple, tuple[int, ...], bool]]:
    """(path, shape, is_adapter) of every parameter, from `nnx.eval_shape` (nothing allocated)."""
    key = None if lora is None else (tuple(lora.targets), lora.rank, lora.alpha, lora.dropout)
    return list(_abstract_parameters(llama_config, key))


@functools.lru_cache(maxsize=8)
def _abstract_parameters(llama_config, lora_key) -> tuple:
    from flax import nnx

    from recranker_jax.llm.llama import Llama
    from recranker_jax.llm.lora import apply_lora

    def build():
        model = Llama(llama_config, nnx.Rngs(0))
        if lora_key is not None:
            targets, rank, alpha, dropout = lora_key
            apply_lora(model, targets, rank, alpha, dropout, nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    return tuple(
        (tuple(path), tuple(variable.get_value().shape), isinstance(variable, nnx.LoRAParam))
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )


def elements_per_device(shape: Sequence[int], logical_axes: Sequence[str | None], rules: dict[str, list[str]],
                        mesh_shape: dict[str, int], divisible_only: bool = True) -> int:
    """Elements one device holds of an array of `shape` whose dimensions carry these logical axes.

    divisible_only (weights, as `parallel.array_sharding` places them): a dimension keeps, in
    order, the mesh axes whose running product divides it, the others replicate it; the device
    holds size / shards. Otherwise (activations, which XLA may pad): ceil(size / shards).
    """
    from recranker_jax.parallel import logical_spec

    spec = tuple(logical_spec(logical_axes, rules))
    spec = spec + (None,) * (len(shape) - len(spec))
    elements = 1
    for size, entry in zip(shape, spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        shards = 1
        for axis in axes:
            if not divisible_only or size % (shards * mesh_shape[axis]) == 0:
                shards *= mesh_shape[axis]
        elements *= -(-size // shards)
    return elements


def _activation_bytes(llama_config, lora, batch_size: int, seq_len: int, act_bytes: int, rules, mesh_shape,
                      fused_attention: bool = True) -> dict[str, int]:
    """Saved activations per device, one block and the head (see the module docstring); the
    global batch is split over the batch shards by the rules, like every other dimension.
    `fused_attention` (a flash kernel: splash, pallas_gpu, cudnn, tiled): no [T, T] scores, the
    attention keeps its float32 log-sum-exp per query and head instead."""
    c = llama_config
    d, hd, heads, kv, inter, vocab = (c.hidden_size, c.head_size, c.num_attention_heads, c.num_key_value_heads,
                                      c.intermediate_size, c.vocab_size)
    b, s, a = batch_size, seq_len, act_bytes

    def per_device(shape, axes, item):
        return elements_per_device(shape, axes, rules, mesh_shape, divisible_only=False) * item

    residual = per_device((b, s, d), ("batch", None, None), a)
    scores = per_device((b, heads, s, s), ("batch", "heads", None, None), 1)
    block = 4 * residual  # block input, two norm outputs, mid residual
    block += per_device((b, s, heads * hd), ("batch", None, "heads"), a) * 3  # q before / after rotary, attention out
    block += per_device((b, s, kv * hd), ("batch", None, "kv_heads"), a) * 3  # k before / after rotary, v
    if fused_attention:
        block += per_device((b, heads, s), ("batch", "heads", None), 4)  # float32 log-sum-exp
    else:
        block += scores * (8 + a)  # float32 masked scores and softmax, the weights cast to the compute dtype
    block += per_device((b, s, inter), ("batch", None, "mlp"), a) * 5  # gate, up, sigmoid, silu, product
    if lora is not None:
        from recranker_jax.config_checks import normalise_targets

        block += per_device((b, s, lora.rank), ("batch", None, None), a) * len(normalise_targets(lora.targets))
    head = residual + per_device((b, s, vocab), ("batch", None, "vocab"), a + 12)
    # one block's backward: float32 gradients of the probabilities and the scores (a flash kernel's are per tile)
    transient = 0 if fused_attention else scores * 8
    queries = per_device((b, s, heads * hd), ("batch", None, "heads"), a)
    keys = per_device((b, s, kv * hd), ("batch", None, "kv_heads"), a)
    kept = {  # what each remat policy keeps of a block for the backward pass
        "none": block,
        "minimal": residual + 2 * queries + 2 * keys,  # input, q and k after rotary, v, attention output
        "dots": residual + queries + 2 * keys + 2 * residual + per_device((b, s, inter), ("batch", None, "mlp"), a) * 2,
        "full": residual,
    }
    return {"block": block, "kept": kept, "head": head, "transient": transient}


def plan_memory(
    cfg: Config, n_devices: int, mesh_shape: Sequence[int] | None = None, arch: str | None = None,
    device_memory_gb: float | None = None, device_kind: str | None = None, param_dtype: str | None = None,
    compute_dtype: str | None = None, remat: str | None = None, attention: str | None = None,
) -> dict[str, Any]:
    """The memory plan of `cfg`'s finetune stage on `n_devices` (a plain, JSON-ready dict).

    mesh_shape overrides mesh.shape; param_dtype / compute_dtype / remat override
    model.param_dtype / model.dtype / train.remat. Raises RecRankerError for a mesh that does not match
    n_devices, rules that name unknown mesh axes, or a batch the batch shards do not divide.
    """
    from recranker_jax.config_checks import check_batch, check_mesh, resolve_mesh_shape, shards
    from recranker_jax.llm.llama import weight_axes

    shape = list(mesh_shape) if mesh_shape is not None else list(cfg.mesh.shape)
    axes = list(cfg.mesh.axes)
    check_mesh(shape, axes, cfg.mesh.rules)
    if n_devices < 1:
        raise RecRankerError(f"--devices {n_devices}: expected a positive integer")
    sizes = dict(zip(axes, resolve_mesh_shape(shape, n_devices)))
    rules = cfg.mesh.rules

    param_dtype = _dtype_name(param_dtype or getattr(cfg.model, "param_dtype", "float32"), "model.param_dtype")
    compute_dtype = _dtype_name(compute_dtype or getattr(cfg.model, "dtype", "float32"), "model.dtype")
    from recranker_jax.llm.remat import resolve

    requested = cfg.train.remat if remat is None else remat
    resolve(requested)  # a known policy
    t = cfg.train
    lora = t.lora if t.lora.enabled else None
    llama, source = resolve_architecture(cfg, arch)

    check_batch("train.batch_size", t.batch_size, rules, sizes)
    rows = t.batch_size // shards("batch", rules, sizes)

    counts = {"base": 0, "adapter": 0}
    per_device = {"base": 0, "adapter": 0}
    for path, param_shape, is_adapter in abstract_parameters(llama, lora):
        kind = "adapter" if is_adapter else "base"
        counts[kind] += math.prod(param_shape)
        per_device[kind] += elements_per_device(param_shape, weight_axes(path, len(param_shape)), rules, sizes)
    trainable_per_device = per_device["adapter"] if lora else per_device["base"]
    trainable = counts["adapter"] if lora else counts["base"]

    attention = cfg.model.attention if attention is None else attention
    fused = attention not in ("xla",)  # auto: the platform's flash kernel (splash, pallas_gpu) on accelerators
    act = _activation_bytes(llama, lora, t.batch_size, t.seq_len, DTYPE_BYTES[compute_dtype], rules, sizes, fused)
    layers = llama.num_hidden_layers
    activations = {policy: layers * kept + (act["block"] if policy != "none" else 0) + act["head"] + act["transient"]
                   for policy, kept in act["kept"].items()}

    state = {
        "parameters": per_device["base"] * DTYPE_BYTES[param_dtype],
        "adapters": per_device["adapter"] * 4,
        "optimizer": trainable_per_device * 8,
        "gradients": trainable_per_device * 4,
        "accumulator": trainable_per_device * 4 if t.accumulation > 1 else 0,
    }
    fixed = sum(state.values())
    memory_source = "--device-memory"
    if device_memory_gb is None:
        device_memory_gb, memory_source = _default_device_memory(device_kind)
    if device_memory_gb <= 0:
        raise RecRankerError(f"--device-memory {device_memory_gb}: expected a positive number of GB")
    capacity = device_memory_gb * GB
    if requested == "auto":
        from recranker_jax.train.remat_choice import FASTEST_FIRST

        remat = next((p for p in FASTEST_FIRST if fixed + activations[p] <= 0.9 * capacity), "full")
    else:
        remat = requested
    total = fixed + activations[remat]
    total_off, total_on = fixed + activations["none"], fixed + activations["full"]
    return {
        "architecture": {"source": source, **{k: getattr(llama, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")}},
        "parameters": counts["base"], "lora_parameters": counts["adapter"], "trainable_parameters": trainable,
        "tuning": f"LoRA {','.join(lora.targets)} rank {lora.rank}" if lora else "full",
        "devices": n_devices, "mesh": sizes, "batch_size": t.batch_size, "rows_per_batch_shard": rows,
        "seq_len": t.seq_len, "param_dtype": param_dtype, "compute_dtype": compute_dtype, "remat": remat,
        "remat_requested": requested, "attention": attention,
        "bytes_per_device": {**state, "activations": activations[remat], "total": total,
                             "activations_remat_off": activations["none"], "activations_remat_on": activations["full"],
                             "total_remat_off": total_off, "total_remat_on": total_on},
        "device_memory_gb": device_memory_gb, "device_memory_source": memory_source,
        "fits": total <= capacity,
        "fits_remat_off": total_off <= capacity, "fits_remat_on": total_on <= capacity,
    }


def _default_device_memory(device_kind: str | None) -> tuple[float, str]:
    from recranker_jax.hardware import device_memory_bytes

    if device_kind is not None:
        known = device_memory_bytes(device_kind)
        if known is None:
            raise RecRankerError(f"--device-kind {device_kind!r}: unknown chip; pass --device-memory GB instead")
        return known / GB, f"HBM of {device_kind}"
    import jax

    local = jax.devices()[0].device_kind
    known = device_memory_bytes(local)
    if known is not None:
        return known / GB, f"HBM of the local {local}"
    return DEFAULT_DEVICE_MEMORY_GB, "default (a TPU v5e chip); set --device-memory"


def format_plan(plan: dict[str, Any]) -> str:
    b = plan["bytes_per_device"]
    arch = plan["architecture"]
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [
        (f"model: {arch['source']}: {plan['parameters']:,} parameters; tuning: {plan['tuning']} "
         f"({plan['trainable_parameters']:,} trainable)"),
        (f"mesh: {mesh} on {plan['devices']} devices; batch {plan['batch_size']} x {plan['seq_len']} tokens "
         f"({plan['rows_per_batch_shard']} per batch shard); params {plan['param_dtype']}, "
         f"activations {plan['compute_dtype']}"),
        "",
        f"{'per device':<34}{'GB':>9}",
    ]
    rows = [
        (f"parameters ({plan['param_dtype']})", b["parameters"]),
        ("LoRA adapters (float32)", b["adapters"]),
        ("optimizer state (AdamW, float32)", b["optimizer"]),
        ("gradients (float32)", b["gradients"]),
        ("gradient accumulator (float32)", b["accumulator"]),
        (f"activations, remat {plan['remat']}", b["activations"]),
        ("activations, remat none / full", None),
        (f"total, remat {plan['remat']}", b["total"]),
    ]
    lines += [f"{name:<34}{value / GB:>9.2f}" if value is not None else
              f"{name:<34}{b['activations_remat_off'] / GB:>9.2f} / {b['activations_remat_on'] / GB:.2f}"
              for name, value in rows]
    lines.append(f"{'device memory':<34}{plan['device_memory_gb']:>9.2f}  ({plan['device_memory_source']})")
    used = b["total"] / (plan["device_memory_gb"] * GB)
    verdict = "does NOT fit" if not plan["fits"] else "fits, with little headroom" if used > 0.9 else "fits"
    setting = plan["remat"] if plan["remat_requested"] != "auto" else f"auto ({plan['remat']} here)"
    lines.append(f"with train.remat={setting}: {verdict} ({used:.0%} of device memory)")
    compiler = plan.get("compiler")
    if compiler:
        figure = compiler["bytes_per_chip"] / GB
        lines.append(f"the TPU compiler ({compiler['accelerator']}, remat {compiler['remat']}): "
                     f"{'refused, its temporaries alone' if compiler['refused'] else 'a total of'} {figure:.2f} GB a chip "
                     f"({'fits' if compiler['fits'] else 'does NOT fit'}; the plan is {b['total'] / GB / figure:.2f}x it)")
    if plan["remat"] != "full" and (not plan["fits"] or used > 0.9) and plan["fits_remat_on"]:
        lines.append(f"with train.remat=full: fits ({b['total_remat_on'] / (plan['device_memory_gb'] * GB):.0%})")
    return "\n".join(lines)


def _parse_mesh(text: str, n_axes: int) -> list[int]:
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != n_axes:
        raise RecRankerError(f"--mesh {text}: expected {n_axes} comma-separated integers, one per mesh axis, e.g. 1,8,1")
    return shape


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", help="mesh shape D,F,T (data, fsdp, tensor) overriding mesh.shape; -1 takes the rest")
    parser.add_argument("--devices", type=int, help="number of devices to plan for; default: jax.device_count()")
    parser.add_argument("--device-memory", type=float, metavar="GB", help="memory of one device in GB (1e9 bytes)")
    parser.add_argument("--device-kind", help="a jax device_kind (e.g. 'TPU v5 lite') whose HBM is the device memory")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="bundled LLaMA architecture, for when the checkpoint is not here")
    parser.add_argument("--accelerator", metavar="TYPE", help="a Cloud TPU accelerator type (e.g. v5litepod-8): its "
                        "chips and HBM; with the tpu extra, the TPU compiler's per-chip figure beside the plan's")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.devices is None:
        import jax

        n_devices = jax.device_count()
    else:
        n_devices = args.devices
    mesh = _parse_mesh(args.mesh, len(cfg.mesh.axes)) if args.mesh else None
    memory_gb, device_kind = args.device_memory, args.device_kind
    if args.accelerator:
        from recranker_jax.compile import parse_accelerator

        tpu = parse_accelerator(args.accelerator)
        if args.devices is not None and args.devices != tpu.chips:
            raise RecRankerError(f"--devices {args.devices} but --accelerator {tpu.accelerator} has {tpu.chips} chips")
        n_devices = tpu.chips
        device_kind = device_kind or _TPU_DEVICE_KIND[tpu.generation]  # its HBM (recranker_jax.hardware)
    try:
        plan = plan_memory(cfg, n_devices, mesh, arch=args.arch, device_memory_gb=memory_gb,
                           device_kind=device_kind)
    except RecRankerError as err:
        if args.devices is None and "devices" in str(err):
            raise RecRankerError(f"{err} (plan for another machine with --devices N)") from None
        raise
    if args.accelerator and importlib.util.find_spec("libtpu") is not None:
        plan["compiler"] = compiler_figure(cfg, args.accelerator, mesh, args.arch, plan["remat"])
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


_TPU_DEVICE_KIND = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def compiler_figure(cfg: Config, accelerator: str, mesh_shape: Sequence[int] | None, arch: str | None,
                    remat: str) -> dict[str, Any]:
    """The TPU compiler's per-chip total for the planned setting (`recranker compile`)."""
    from dataclasses import replace

    from recranker_jax.compile import compile_finetune

    if mesh_shape is not None:
        cfg = replace(cfg, mesh=replace(cfg.mesh, shape=list(mesh_shape)))
    doc = compile_finetune(cfg, accelerator, arch=arch, remat=remat)
    return {"accelerator": doc["accelerator"], "remat": doc["remat"], "fits": doc["fits"],
            "bytes_per_chip": doc["memory"]["total"] if doc["memory"] else doc["needed_bytes"],
            "refused": doc["memory"] is None, "compile_seconds": doc["compile_seconds"]}

