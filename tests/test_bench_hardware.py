"""Peak FLOP/s lookup by device_kind, LLaMA training FLOPs per token, MFU, environment."""

import json
import socket
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from recranker_jax.bench.hardware import (
    device_memory_bytes, environment, llama_flops_per_token, matmul_parameters, mfu, peak_flops,
)
from recranker_jax.llm.llama import LlamaConfig


def device(kind):
    return SimpleNamespace(device_kind=kind, platform="fake")


@pytest.mark.parametrize("kind, bf16, fp32", [
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v6 lite", 918e12, 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 156e12),
    ("nvidia h100 80gb hbm3", 989e12, 494.5e12),
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H200", 989e12, 494.5e12),
])
def test_peak_flops_by_device_kind(kind, bf16, fp32):
    assert peak_flops(device(kind), "bfloat16") == bf16
    assert peak_flops(device(kind), jnp.bfloat16) == bf16
    assert peak_flops(device(kind), jnp.float32) == fp32
    assert peak_flops(kind, "float32") == fp32  # the string itself works too


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "TPU7x", "NVIDIA GeForce RTX 4090", "Interpreter"])
def test_unknown_devices_have_no_peak(kind):
    assert peak_flops(device(kind), "bfloat16") is None
    assert device_memory_bytes(device(kind)) is None


def test_device_memory_by_kind():
    assert device_memory_bytes(device("TPU v5 lite")) == 16 * 2**30
    assert device_memory_bytes(device("TPU v4")) == 32 * 2**30
    assert device_memory_bytes(device("NVIDIA H100 80GB HBM3")) == 80 * 10**9
    assert device_memory_bytes(device("NVIDIA A100-SXM4-40GB")) == 40 * 10**9


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


def test_mfu():
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert mfu(5000.0, 4.2e10, 197e12, 8) == pytest.approx(5000 * 4.2e10 / (8 * 197e12))


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
