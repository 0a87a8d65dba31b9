"""Peak FLOP/s and memory lookup by device_kind, LLaMA training FLOPs per token, MFU, environment."""

import json
import re
import socket
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from recranker_jax.hardware import (
    CHIPS, device_memory_bytes, environment, llama_flops_per_token, matmul_parameters, mfu, peak_flops,
)
from recranker_jax.llm.llama import LlamaConfig

KNOWN_KINDS = [  # device_kind as jax spells it on each chip
    "TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v5p", "TPU v6 lite", "TPU v6e",
    "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB",
    "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
]


def device(kind):
    return SimpleNamespace(device_kind=kind, platform="fake")


@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_known_chips_have_a_peak_and_memory_whatever_the_spelling(kind):
    peak = peak_flops(kind, "bfloat16")
    assert peak and peak > 1e14 and device_memory_bytes(kind) >= 16 * 10**9
    for spelling in (kind.lower(), kind.upper(), device(kind)):  # case-insensitive; a device or its kind
        assert peak_flops(spelling, "bfloat16") == peak and device_memory_bytes(spelling) == device_memory_bytes(kind)
    # the dtype as a name, a jnp type or a dtype
    assert peak_flops(kind, jnp.bfloat16) == peak_flops(kind, "bf16") == peak_flops(kind, "float16") == peak
    assert peak_flops(kind, jnp.float32) == peak_flops(kind, jnp.dtype("float32")) == peak_flops(kind, "fp32")
    assert peak >= peak_flops(kind, "float32") > 0  # bfloat16 is never slower than float32
    with pytest.raises(ValueError):
        peak_flops(kind, "int8")


@pytest.mark.parametrize("same", [("TPU v5 lite", "TPU v5e"), ("TPU v6 lite", "TPU v6e"), ("TPU v5", "TPU v5p"),
                                  ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")])
def test_spellings_of_one_chip_agree(same):
    assert len({(peak_flops(k), peak_flops(k, "float32"), device_memory_bytes(k)) for k in same}) == 1


def test_more_specific_spellings_come_first():
    """Every table key finds its own row: no earlier, shorter key (e.g. "h100" before "h100 pcie") shadows it."""
    for position, (key, *_) in enumerate(CHIPS):
        first = next(i for i, (other, *_) in enumerate(CHIPS) if other in key)
        assert first == position, f"{CHIPS[first][0]!r} shadows {key!r}"
    # so the variants of a chip differ where the vendors' figures do
    assert peak_flops("NVIDIA H100 PCIe") < peak_flops("NVIDIA H100 80GB HBM3")
    assert peak_flops("TPU v5 lite") < peak_flops("TPU v5p")
    assert device_memory_bytes("NVIDIA A100-SXM4-40GB") < device_memory_bytes("NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("kind", [k for k in KNOWN_KINDS if k.startswith("NVIDIA") and "GB" in k])
def test_nvidia_memory_is_the_gigabytes_in_the_name(kind):
    assert device_memory_bytes(kind) == int(re.search(r"(\d+)GB", kind).group(1)) * 10**9


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "TPU7x", "NVIDIA GeForce RTX 4090", "Interpreter"])
def test_unknown_devices_have_no_peak(kind):
    assert peak_flops(device(kind), "bfloat16") is None
    assert peak_flops(kind, "float32") is None
    assert device_memory_bytes(device(kind)) is None


def test_flops_per_token_by_hand():
    # vocab 64, d 12, I 40, 2 layers, 3 heads of 4, 1 KV head
    cfg = LlamaConfig(vocab_size=64, hidden_size=12, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1)
    # per layer: q 12x12 + k 12x4 + v 12x4 + o 12x12 + gate, up, down 3 x 12x40 = 1824; head 12x64 = 768
    n = 2 * 1824 + 768
    assert matmul_parameters(cfg) == n == 4416
    attention = 12 * 2 * 3 * 4 * 8  # 12 L H Q T at T = 8
    assert llama_flops_per_token(cfg, 8) == 6 * 4416 + attention == 28800
    lora = 2 * (2 * (12 + 12) + 2 * (12 + 4))  # rank 2 on q and v
    assert llama_flops_per_token(cfg, 8, "lora", lora_parameters=lora) == 4 * 4416 + 6 * 160 + attention == 20928
    with pytest.raises(ValueError):
        llama_flops_per_token(cfg, 8, "adapters")


def test_llama2_7b_flops_per_token():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    n = 6_738_415_616 - 32000 * 4096 - 65 * 4096  # no embedding lookup, no norms
    assert llama_flops_per_token(cfg, 2048) == 6 * n + 12 * 32 * 4096 * 2048


def test_mfu_is_the_share_of_the_peak_the_model_flops_use():
    # 4 chips of 1e12 FLOP/s for 2 s could do 8e12 FLOPs; 2,000 tokens at 1e9 FLOPs each did 2e12 of them
    assert mfu(2000 / 2.0, 1e9, 4 * 1e12) == pytest.approx(2e12 / 8e12)
    # the train loop's and the train benchmark's form (tokens / seconds * flops / peak), to the bit
    tokens, seconds, flops, peak = 16384, 0.731, 4.2e10, 8 * 197e12
    assert mfu(tokens / seconds, flops, peak) == tokens / seconds * flops / peak


def test_environment_describes_the_machine_without_the_host():
    env = environment()
    for key in ("device_kind", "device_count", "process_count", "platform", "jax", "jaxlib", "flax", "python",
                "cpu_count"):
        assert key in env
    assert env["device_count"] >= 1 and env["process_count"] == 1
    text = json.dumps(env)
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in text
