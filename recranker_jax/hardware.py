"""Hardware figures and FLOP accounting, below train/, bench/ and plan: peak matmul FLOP/s and
memory per chip, LLaMA training FLOPs per token, MFU, and the machine a result came from.

Peak figures are the vendors' dense (no structured sparsity) numbers per chip, looked up by
jax's `device.device_kind`, case-insensitively, first matching substring wins (so the more
specific spellings come first). float32 peaks:

- NVIDIA GPUs: the TF32 tensor-core dense peak. JAX's default matmul precision lets XLA run
  float32 matmuls as TF32 on Ampere and later, so that is what a float32 run achieves unless
  `jax_default_matmul_precision=highest` is set (plain FP32 peaks are in `GPU_FP32_PEAKS`).
- TPUs: the bf16 peak. The MXU runs float32 matmuls as bfloat16 passes at default precision
  (one pass at DEFAULT; 3 or 6 at HIGH / HIGHEST, which divide the achievable rate).
"""

from __future__ import annotations

import os
import platform
from typing import Any

# (substring of device_kind, lower case; peak bf16 FLOP/s; peak float32 FLOP/s; HBM bytes)
# device_kind spellings: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p" (v5p),
# "TPU v6 lite" (v6e, Trillium), "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200".
GIB = 1024**3  # TPU HBM is specified in GiB
GB = 10**9  # NVIDIA's "80GB" is taken as 80e9 bytes (the usable amount is a little less)
CHIPS: tuple[tuple[str, float, float, int], ...] = (
    ("tpu v4 lite", 0.0, 0.0, 8 * GIB),  # v4i: inference chip, no published peak we use
    ("tpu v4", 275e12, 275e12, 32 * GIB),
    ("tpu v5 lite", 197e12, 197e12, 16 * GIB),
    ("tpu v5e", 197e12, 197e12, 16 * GIB),
    ("tpu v5", 459e12, 459e12, 95 * GIB),  # "TPU v5" and "TPU v5p" are v5p
    ("tpu v6 lite", 918e12, 918e12, 32 * GIB),
    ("tpu v6e", 918e12, 918e12, 32 * GIB),
    ("a100-sxm4-40gb", 312e12, 156e12, 40 * GB),
    ("a100-pcie-40gb", 312e12, 156e12, 40 * GB),
    ("a100 40gb", 312e12, 156e12, 40 * GB),
    ("a100", 312e12, 156e12, 80 * GB),  # SXM4 80GB, 80GB PCIe
    ("h100 pcie", 756e12, 378e12, 80 * GB),
    ("h100 nvl", 835e12, 418e12, 94 * GB),
    ("h100", 989e12, 494.5e12, 80 * GB),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 835e12, 418e12, 141 * GB),
    ("h200", 989e12, 494.5e12, 141 * GB),
)
# Plain (non tensor-core) FP32 peaks, for runs with jax_default_matmul_precision=highest.
GPU_FP32_PEAKS = {"a100": 19.5e12, "h100 pcie": 51e12, "h100 nvl": 60e12, "h100": 67e12, "h200 nvl": 60e12, "h200": 67e12}


def _kind(device: Any) -> str:
    return str(getattr(device, "device_kind", device)).lower()


def _chip(device: Any) -> tuple[str, float, float, int] | None:
    kind = _kind(device)
    for entry in CHIPS:
        if entry[0] in kind:
            return entry if entry[1] > 0 else None
    return None


def peak_flops(device: Any, dtype: Any = "bfloat16") -> float | None:
    """Peak dense matmul FLOP/s of one chip for `dtype` (bfloat16 or float32); None when unknown
    (CPUs, unlisted chips). `device` is a jax Device, anything with `device_kind`, or the string."""
    chip = _chip(device)
    if chip is None:
        return None
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    if name in ("bfloat16", "float16", "bf16", "fp16"):
        return chip[1]
    if name in ("float32", "fp32", "tf32"):
        return chip[2]
    raise ValueError(f"peak_flops: dtype {name!r} is not one of bfloat16, float16, float32")


def device_memory_bytes(device: Any) -> int | None:
    """HBM of one chip in bytes, by device_kind; None when unknown."""
    chip = _chip(device)
    return None if chip is None else chip[3]


def host_memory_available() -> int | None:
    """Bytes of memory this host can still give a process (MemAvailable of /proc/meminfo; else
    its physical memory), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_capacity(device: Any = None) -> tuple[int | None, str]:
    """(bytes one device can hold, what that is, for messages): an accelerator's allocator limit
    (`memory_stats()["bytes_limit"]`, else its chip's HBM); on the CPU the host's free memory."""
    import jax

    device = device if device is not None else jax.devices()[0]
    if device.platform == "cpu":
        return host_memory_available(), "this host's free memory"
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        limit = None
    return limit or device_memory_bytes(device), f"the memory of one {_kind(device) or device.platform}"


def memory_spread(mesh: Any) -> int:
    """Over how many memories the mesh's arrays can spread: its devices, or 1 on the CPU (the
    host's CPU devices share its memory)."""
    return 1 if mesh.devices.flat[0].platform == "cpu" else int(mesh.devices.size)


def matmul_parameters(llama_config: Any) -> int:
    """Weights that take part in a matmul per token: every projection of every layer and the
    output head (the tied embedding counts once, as the head; the embedding lookup is no matmul)."""
    c = llama_config
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def llama_flops_per_token(llama_config: Any, seq_len: int, trainable: str = "full", lora_parameters: int = 0) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B accounting.

    full: 6 N + 12 L H Q T, N = `matmul_parameters`, L layers, H heads, Q head size, T = seq_len.
      2N forward, 2N for activation gradients, 2N for weight gradients; attention scores and
      their weighted sum cost 4 H Q T per layer and token forward, twice that backward. T is
      not halved for the causal mask: the implementation computes the full T x T scores.
    lora: 4 N + 6 N_lora + 12 L H Q T. Frozen weights get no weight gradient, but the
      activation gradient still flows through every matmul to reach the lower adapters (2N);
      the adapters (`lora_parameters` weights) cost 6 N_lora like any trained weight.
    """
    if trainable not in ("full", "lora"):
        raise ValueError(f"trainable={trainable!r}: expected 'full' or 'lora'")
    c = llama_config
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
    n = matmul_parameters(c)
    if trainable == "full":
        return float(6 * n + attention)
    return float(4 * n + 6 * lora_parameters + attention)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (0..1): achieved model FLOP/s over `peak_flops`, the peak FLOP/s of
    all the devices the tokens ran on together."""
    return tokens_per_second * flops_per_token / peak_flops


def environment() -> dict[str, Any]:
    """The machine a benchmark ran on, without host names, users or paths."""
    import flax
    import jax
    import jaxlib

    devices = jax.devices()
    return {
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "platform": devices[0].platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "peak_bf16_flops_per_device": peak_flops(devices[0], "bfloat16"),
    }
