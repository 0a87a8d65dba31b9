"""`recranker plan`: parameter counts, per-device splits and activation bytes against hand computation."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from recranker_jax.cli import main
from recranker_jax.config import MeshConfig, load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.plan import ARCHITECTURES, plan_memory

# A tiny from-scratch LLaMA: vocab 64, d 16, I 40, 2 layers, 4 heads of 4, 2 KV heads, untied.
TINY = ["prompts.tokenizer_vocab_size=64", "model.hidden_size=16", "model.intermediate_size=40",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.tie_word_embeddings=false", "train.batch_size=8", "train.seq_len=8"]


def tiny_plan(mesh, extra=(), **kwargs):
    cfg = load_config(None, [*TINY, *extra])
    kwargs.setdefault("device_memory_gb", 1.0)
    return plan_memory(cfg, 8, mesh, **kwargs)


def analytic_llama_parameters(vocab, hidden, intermediate, layers, heads, kv_heads):
    head = hidden // heads
    attention = hidden * heads * head * 2 + hidden * kv_heads * head * 2
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden  # embedding + untied head + final norm


@pytest.fixture(scope="module")
def plan_7b_lora():
    cfg = load_config(None, ["train.lora.enabled=true", "train.lora.targets=[q,v]", "train.lora.rank=8",
                             "train.batch_size=8", "train.seq_len=2048"])
    return plan_memory(cfg, 8, [1, 8, 1], arch="llama2-7b", device_memory_gb=80.0)


def test_llama2_parameter_counts_match_the_architecture(plan_7b_lora):
    a7 = ARCHITECTURES["llama2-7b"]
    expected_7b = analytic_llama_parameters(32000, 4096, 11008, 32, 32, 32)
    assert expected_7b == 6_738_415_616
    assert plan_7b_lora["parameters"] == expected_7b
    assert (a7["vocab_size"], a7["hidden_size"], a7["intermediate_size"]) == (32000, 4096, 11008)
    # LoRA on q and v, rank 8: each of 32 layers adds r * (4096 + 4096) twice
    assert plan_7b_lora["lora_parameters"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert plan_7b_lora["trainable_parameters"] == 4_194_304

    cfg = load_config(None, ["train.batch_size=8", "train.seq_len=16"])
    plan_13b = plan_memory(cfg, 8, [1, 8, 1], arch="llama2-13b", device_memory_gb=80.0)
    expected_13b = analytic_llama_parameters(32000, 5120, 13824, 40, 40, 40)
    assert expected_13b == 13_015_864_320
    assert plan_13b["parameters"] == plan_13b["trainable_parameters"] == expected_13b
    assert plan_13b["lora_parameters"] == 0


def test_7b_lora_state_bytes_on_fsdp8(plan_7b_lora):
    b = plan_7b_lora["bytes_per_device"]
    # float32 weights; every matmul weight and the embedding have a 4096 (embed) dimension split 8 ways,
    # the 65 norms (32 * 2 + 1) of 4096 are replicated
    norms = 65 * 4096
    assert b["parameters"] == 4 * ((6_738_415_616 - norms) // 8 + norms)
    assert b["adapters"] == 4 * 4_194_304  # replicated, float32
    assert b["optimizer"] == 8 * 4_194_304 and b["gradients"] == 4 * 4_194_304 and b["accumulator"] == 0


# Hand computation of the tiny model's elements per device, weight by weight (shapes [in, out]):
# embed [64, 16] (vocab, embed); q [16, 16], k / v [16, 8], o [16, 16]; gate / up [16, 40],
# down [40, 16]; two norms [16] per layer, final norm [16]; lm_head [16, 64] (embed, vocab).
@pytest.mark.parametrize("mesh, expected", [
    # everything replicated
    ((8, 1, 1), 64 * 16 + 2 * (16 * 16 + 16 * 8 * 2 + 16 * 16 + 3 * 16 * 40 + 2 * 16) + 16 + 16 * 64),
    # fsdp: the embed dimension (16) in 8 -> 2
    ((1, 8, 1), 64 * 2 + 2 * (2 * 16 + 2 * 8 * 2 + 16 * 2 + 2 * 40 * 2 + 40 * 2 + 2 * 16) + 16 + 2 * 64),
    # tensor: vocab 64 -> 8, heads 16 -> 2, kv_heads 8 -> 1, mlp 40 -> 5
    ((1, 1, 8), 8 * 16 + 2 * (16 * 2 + 16 * 1 * 2 + 2 * 16 + 16 * 5 * 2 + 5 * 16 + 2 * 16) + 16 + 16 * 8),
    # 2 x 2 x 2: embed / 2 (fsdp), vocab, heads, kv_heads, mlp / 2 (tensor)
    ((2, 2, 2), 32 * 8 + 2 * (8 * 8 + 8 * 4 * 2 + 8 * 8 + 8 * 20 * 2 + 20 * 8 + 2 * 16) + 16 + 8 * 32),
])
def test_tiny_parameters_per_device(mesh, expected):
    plan = tiny_plan(list(mesh))
    assert plan["parameters"] == 64 * 16 * 2 + 2 * (16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 40 + 32) + 16
    assert plan["bytes_per_device"]["parameters"] == 4 * expected
    # full fine-tuning: AdamW moments and gradients follow the same split
    assert plan["bytes_per_device"]["optimizer"] == 8 * expected
    assert plan["bytes_per_device"]["gradients"] == 4 * expected


def test_bfloat16_parameters_and_accumulator():
    plan = tiny_plan([8, 1, 1], ["train.accumulation=4"], param_dtype="bfloat16")
    total = plan["parameters"]
    b = plan["bytes_per_device"]
    assert b["parameters"] == 2 * total and b["optimizer"] == 8 * total
    assert b["gradients"] == 4 * total and b["accumulator"] == 4 * total


def hand_activations(a, fused=False):
    """The tiny model on (2, 2, 2), item size a: batch 8 over data*fsdp = 4 -> 2 rows of s = 8;
    tensor 2 splits heads (16 -> 8 wide, 4 -> 2 heads), kv (8 -> 4), mlp (40 -> 20), vocab (64 -> 32).
    `fused`: a flash kernel keeps a float32 log-sum-exp per row, head and query, no scores."""
    rows, s = 2, 8
    residual = rows * s * 16 * a
    scores = rows * 2 * s * s
    block = (4 * residual
             + 3 * rows * s * 8 * a  # q before / after rotary, attention output
             + 3 * rows * s * 4 * a  # k before / after rotary, v
             + (rows * 2 * s * 4 if fused else scores * (8 + a))  # log-sum-exp, or the scores and softmax
             + 5 * rows * s * 20 * a)  # gate, up, sigmoid, silu, product
    head = residual + rows * s * 32 * (a + 12)
    backward = 0 if fused else scores * 8
    return residual, block, head, backward


def rows_s_a(width, a=4):
    """Bytes per device of 2 rows x 8 tokens x `width` features of item size a (hand_activations)."""
    return 2 * 8 * width * a


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_tiny_activations_on_2x2x2(attention):
    fused = attention != "xla"  # auto: the accelerator's flash kernel
    residual, block, head, backward = hand_activations(4, fused)
    kernel = [f"model.attention={attention}"]
    plan = tiny_plan([2, 2, 2], kernel + ["train.remat=dots"])
    b = plan["bytes_per_device"]
    assert plan["rows_per_batch_shard"] == 2
    assert b["activations_remat_off"] == 2 * block + head + backward
    assert b["activations_remat_on"] == 2 * residual + block + head + backward
    fixed = b["parameters"] + b["adapters"] + b["optimizer"] + b["gradients"] + b["accumulator"]
    assert b["total_remat_off"] == fixed + 2 * block + head + backward
    # dots keeps the input, the projections' outputs (q 8 wide, k and v 4, o and down 16 each,
    # gate and up 20 each) and recomputes one block
    dots = 3 * residual + rows_s_a(8 + 2 * 4 + 2 * 20)
    assert plan["remat"] == "dots" and b["total"] == fixed + 2 * dots + block + head + backward
    none = tiny_plan([2, 2, 2], kernel + ["train.remat=none"])
    assert none["remat"] == "none" and none["bytes_per_device"]["total"] == b["total_remat_off"]
    minimal = tiny_plan([2, 2, 2], kernel + ["train.remat=minimal"])  # input, q and k after rotary, v, attention output
    kept = residual + rows_s_a(2 * 8 + 2 * 4)
    assert minimal["bytes_per_device"]["total"] == fixed + 2 * kept + block + head + backward
    full = tiny_plan([2, 2, 2], kernel + ["train.remat=full"])
    assert full["remat"] == "full" and full["bytes_per_device"]["total"] == fixed + 2 * residual + block + head + backward
    residual, block, head, backward = hand_activations(2, fused)  # bfloat16 compute; float32 terms stay
    half = tiny_plan([2, 2, 2], kernel + ["model.dtype=bfloat16"])["bytes_per_device"]
    assert half["activations_remat_on"] == 2 * residual + block + head + backward


def test_auto_remat_is_planned_as_the_first_policy_from_the_fastest_that_fits_with_10_percent_to_spare():
    deep = ["model.num_hidden_layers=12"]  # (at 2 layers dots' one recomputed block outweighs what it saves)
    totals = {policy: tiny_plan([2, 2, 2], [*deep, f"train.remat={policy}"])["bytes_per_device"]["total"]
              for policy in ("none", "dots", "minimal", "full")}
    assert totals["none"] > totals["dots"] > totals["minimal"] > totals["full"]
    for memory, expected in ((totals["none"] / 0.9, "none"), (totals["none"] / 0.91, "dots"),
                             (totals["minimal"] / 0.9, "minimal"), (totals["full"] / 0.95, "full"),
                             (totals["full"] / 2, "full")):
        plan = tiny_plan([2, 2, 2], [*deep, "train.remat=auto"], device_memory_gb=memory / 1e9 * 1.000001)
        assert plan["remat"] == expected, memory


def test_fits_compares_the_total_with_device_memory():
    total = tiny_plan([8, 1, 1], ["train.remat=dots"])["bytes_per_device"]["total"]
    assert tiny_plan([8, 1, 1], device_memory_gb=None)["device_memory_gb"] > 0  # a default exists
    cfg = load_config(None, [*TINY, "train.remat=dots"])  # (auto would pick a leaner policy that fits)
    assert plan_memory(cfg, 8, [8, 1, 1], device_memory_gb=total / 1e9 * 1.01)["fits"] is True
    assert plan_memory(cfg, 8, [8, 1, 1], device_memory_gb=total / 1e9 * 0.99)["fits"] is False
    assert plan_memory(cfg, 8, [8, 1, 1], device_kind="TPU v5 lite")["device_memory_gb"] == 16 * 1024**3 / 1e9


def test_plan_matches_the_real_placement_of_shard_model():
    """The planned bytes per device equal what shard_model puts on device 0 (vocab 66 does not
    divide over 4 tensor shards, so that dimension stays replicated there)."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from recranker_jax.llm.llama import Llama, LlamaConfig
    from recranker_jax.llm.lora import apply_lora
    from recranker_jax.parallel import make_mesh
    from recranker_jax.train.step import shard_model

    overrides = [*TINY, "prompts.tokenizer_vocab_size=66", "train.lora.enabled=true", "train.lora.targets=[q,v,down]"]
    cfg = load_config(None, overrides)
    for shape in ([1, 2, 4], [2, 4, 1]):
        plan = plan_memory(cfg, 8, shape, device_memory_gb=1.0)
        llama = LlamaConfig(vocab_size=66, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        model = apply_lora(Llama(llama, nnx.Rngs(0)), ["q", "v", "down"], 8, 16.0, 0.0, nnx.Rngs(1))
        mesh = make_mesh(MeshConfig(shape=shape))
        shard_model(model, mesh, cfg.mesh.rules)
        device = mesh.devices.flat[0]
        held = {"base": 0, "adapter": 0}
        for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            value = variable.get_value()
            shard = next(s for s in value.addressable_shards if s.device == device)
            held["adapter" if isinstance(variable, nnx.LoRAParam) else "base"] += shard.data.size * value.dtype.itemsize
        assert plan["bytes_per_device"]["parameters"] == held["base"], shape
        assert plan["bytes_per_device"]["adapters"] == held["adapter"], shape
        assert plan["lora_parameters"] == 2 * (8 * (16 + 16) + 8 * (16 + 8) + 8 * (40 + 16))


def test_plan_errors_name_the_option():
    cfg = load_config(None, TINY)
    with pytest.raises(RecRankerError, match=r"mesh.shape=\[2, 2, 1\] uses 4 devices, but a mesh must use all 8 available devices"):
        plan_memory(cfg, 8, [2, 2, 1])
    with pytest.raises(RecRankerError, match="train.batch_size=8 must be a multiple of the 16 batch shards"):
        plan_memory(cfg, 16, [1, 16, 1])
    with pytest.raises(RecRankerError, match="model.checkpoint=.*no config.json.*--arch llama2-7b"):
        plan_memory(load_config(None, [*TINY, "model.checkpoint=/nonexistent/Llama-2-7b-hf",
                                       "prompts.tokenizer=/nonexistent/Llama-2-7b-hf"]), 8, [8, 1, 1])
    with pytest.raises(RecRankerError, match="--device-kind 'cpu': unknown chip"):
        plan_memory(cfg, 8, [8, 1, 1], device_kind="cpu")


def test_checkpoint_config_json_is_read_without_weights(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.checkpoint={tmp_path}", f"prompts.tokenizer={tmp_path}", "train.batch_size=8"])
    plan = plan_memory(cfg, 8, [8, 1, 1], device_memory_gb=1.0)
    assert plan["parameters"] == analytic_llama_parameters(50, 16, 24, 3, 4, 4)
    assert plan["architecture"]["source"].endswith("config.json")


def test_cli_plan_json_and_table(capsys):
    args = ["plan", *TINY, "--devices", "8", "--mesh", "1,8,1", "--device-memory", "2"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["fits"] is True
    assert np.isclose(plan["device_memory_gb"], 2.0)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "parameters (float32)" in table and "with train.remat=auto (none here): fits" in table
    assert main(["plan", *TINY, "--devices", "8", "--mesh", "1,8"]) == 2
    assert "--mesh 1,8: expected 3 comma-separated integers" in capsys.readouterr().err
    assert main(["plan", *TINY, "--devices", "8", "--mesh", "1,4,1"]) == 2
    assert "mesh.shape=[1, 4, 1] uses 4 devices, but a mesh must use all 8 available devices" in capsys.readouterr().err
