"""bench train: both sides run the same problem (same loss on the same weights and adapters,
same optimizer), the PyTorch side is placed where it can run (or JAX runs alone and says why),
and the results document is consistent. No timing assertions."""

import json
import sys
import warnings

import numpy as np
import pytest

from recranker_jax.bench.train import (
    PRESETS,
    bench_train,
    format_results,
    jax_side,
    learning_rate,
    problem_from_config,
    torch_plan,
    torch_remat,
    torch_side,
    torch_status,
)
from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "prompts.tokenizer_vocab_size=96",
        "train.seq_len=40", "train.batch_size=2", "train.warmup_steps=2", "train.steps=10", "train.lr=0.01"]
CUDA_TORCH = {"torch": "2.11.0+cu128", "cuda": True, "transformers": True, "peft": True}


def tiny_problem(*extra: str) -> dict:
    return problem_from_config(load_config("quickstart", [*TINY, *extra]), "config")


def tiny_lora(**changes) -> dict:
    return {**problem_from_config(load_config("quickstart", []), "tiny-lora"), **changes}


def test_learning_rate_is_the_finetune_schedule():
    from recranker_jax.train.step import learning_rate_schedule

    for warmup, total in ((2, 10), (0, 5), (15, 150)):
        problem = {"lr": 3e-3, "warmup_steps": warmup, "total_steps": total}
        schedule = learning_rate_schedule(3e-3, warmup, total)
        for step in range(total + 3):
            assert learning_rate(step, problem) == pytest.approx(float(schedule(step)), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("tied", [True, False])
def test_both_sides_compute_the_same_losses_from_the_same_weights(tmp_path, tied):
    pytest.importorskip("torch")
    problem = tiny_problem(f"model.tie_word_embeddings={str(tied).lower()}")
    jax_step, _, _ = jax_side(problem, tmp_path)  # writes its initial weights for the torch side
    torch_step, _ = torch_side(problem, tmp_path)
    # step 0 (learning rate 0 in the warmup), 1 and 2 (after real AdamW updates), 3
    jax_losses = [jax_step() for _ in range(4)]
    torch_losses = [torch_step() for _ in range(4)]
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=2e-5)
    assert jax_losses[0] == pytest.approx(np.log(problem["vocab_size"]), rel=0.05)  # random init: ~uniform
    assert jax_losses[3] < jax_losses[1]  # the updates train


def test_lora_sides_train_the_same_adapters_from_the_same_weights(tmp_path):
    pytest.importorskip("peft")
    from recranker_jax.llm.lora import lora_parameter_count

    problem = tiny_lora()
    jax_step, model, _ = jax_side(problem, tmp_path)  # writes the base weights and the initial adapters
    torch_step, torch_model = torch_side(problem, tmp_path)
    trained = [p for p in torch_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == lora_parameter_count(model)  # the adapters, nothing else
    # step 0 (learning rate 0), then updates of B (A's gradient is 0 while B is 0), then of both
    jax_losses = [jax_step() for _ in range(5)]
    torch_losses = [torch_step() for _ in range(5)]
    assert jax_losses[0] == torch_losses[0]
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert jax_losses[4] < jax_losses[1] - 0.01  # the adapters train


def test_bfloat16_lora_torch_side_loads_the_same_weights_with_checkpointing(tmp_path):
    """The 7b-lora path at a small size: bfloat16 weights written and read as bfloat16, float32
    adapters as PEFT keeps them, gradient checkpointing on, first losses close."""
    pytest.importorskip("peft")
    import torch
    from safetensors import safe_open

    problem = tiny_lora(dtype="bfloat16", param_dtype="bfloat16", remat="full")
    jax_step, model, _ = jax_side(problem, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    torch_step, torch_model = torch_side(problem, tmp_path, checkpointing=True)
    with warnings.catch_warnings():  # newer transformers: is_activation_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        assert torch_model.is_gradient_checkpointing
    state = {name: value for name, value in torch_model.named_parameters()}
    embed = state["base_model.model.model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16
    np.testing.assert_array_equal(embed.float().numpy(), np.asarray(model.embed_tokens.embedding[...], np.float32))
    lora_a = state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
    assert lora_a.dtype == torch.float32 and lora_a.requires_grad
    np.testing.assert_array_equal(lora_a.detach().numpy().T, np.asarray(model.layers.self_attn.q_proj.lora_a[...][1]))
    jax_losses = [jax_step() for _ in range(3)]
    torch_losses = [torch_step() for _ in range(3)]
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=2e-2)
    assert state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0  # trained


def test_torch_plan_places_pytorch_or_says_why_jax_runs_alone():
    f32, bf16 = tiny_lora(), tiny_lora(dtype="bfloat16", param_dtype="bfloat16")
    cpu_torch = {**CUDA_TORCH, "torch": "2.11.0+cpu", "cuda": False}
    assert torch_plan(f32, "cpu", cpu_torch) == ("cpu", None)
    assert torch_plan(f32, "cpu", CUDA_TORCH) == ("cpu", None)  # JAX on the CPU: PyTorch too
    assert torch_plan(bf16, "gpu", CUDA_TORCH) == ("cuda", None)
    assert torch_plan(f32, "gpu", CUDA_TORCH) == ("cuda", None)
    alone = {
        "gpu, torch without CUDA": (bf16, "gpu", cpu_torch, "torch 2.11.0+cpu has no CUDA"),
        "no torch": (bf16, "gpu", {"torch": None, "cuda": False, "transformers": True, "peft": True},
                     "torch is not installed"),
        "no peft": (bf16, "gpu", {**CUDA_TORCH, "peft": False}, "peft is not installed"),
        "no transformers": (bf16, "gpu", {**CUDA_TORCH, "transformers": False}, "transformers is not installed"),
        "tpu": (bf16, "tpu", CUDA_TORCH, "JAX runs on tpu"),
        "bfloat16 on the CPU": (bf16, "cpu", cpu_torch, "float32 only"),
        "mixed precision": (tiny_lora(dtype="bfloat16"), "gpu", CUDA_TORCH, "no PyTorch counterpart"),
        "--no-torch": (f32, "cpu", None, "--no-torch"),
    }
    for case, (problem, platform, status, reason) in alone.items():
        device, why = torch_plan(problem, platform, status)
        assert device is None and reason in why, case
    assert torch_plan({**bf16, "lora": None}, "gpu", {**CUDA_TORCH, "peft": False}) == ("cuda", None)  # full FT
    assert torch_remat("none") == "none" and {torch_remat(p) for p in ("minimal", "dots", "full")} == {"full"}


def test_torch_status_here():
    torch = pytest.importorskip("torch")
    status = torch_status()
    assert status["torch"] == torch.__version__ and status["cuda"] == torch.cuda.is_available()
    assert status["transformers"] is True


def test_problems():
    cfg = load_config("quickstart", [])
    assert problem_from_config(cfg)["hidden_size"] == PRESETS["quickstart"]["hidden_size"] == 128
    assert problem_from_config(cfg, "7b-lora")["remat"] == "auto"
    assert problem_from_config(cfg, "7b-lora", remat="none")["remat"] == "none"  # --remat overrides any preset
    assert problem_from_config(cfg, "quickstart", remat="full")["remat"] == "full"
    lora = tiny_problem("train.lora.enabled=true")
    assert lora["lora"] == {"targets": ["q", "v"], "rank": 8, "alpha": 16.0}
    assert tiny_lora()["lora"] == lora["lora"] and tiny_lora()["dtype"] == "float32"
    with pytest.raises(RecRankerError, match="preset 'huge'"):
        problem_from_config(cfg, "huge")
    with pytest.raises(RecRankerError, match="--remat 'sometimes'"):
        problem_from_config(cfg, "7b-lora", remat="sometimes")
    with pytest.raises(RecRankerError, match="cpus="):
        bench_train(cfg, cpus="a,b")


def test_cli_passes_remat(monkeypatch):
    import recranker_jax.bench.train as train
    from recranker_jax.cli import main

    seen = {}
    monkeypatch.setenv("RECRANKER_XLA_FLAGS", "off")  # leave this process's XLA_FLAGS alone
    monkeypatch.setattr(train, "bench_train", lambda cfg, **kwargs: seen.update(kwargs) or {})
    monkeypatch.setattr(train, "format_results", lambda doc: "")
    assert main(["bench", "train", "--preset", "tiny-lora", "--remat", "full"]) == 0
    assert seen["remat"] == "full" and seen["preset"] == "tiny-lora" and seen["profile"] is None
    assert main(["bench", "train", "--preset", "tiny-lora", "--profile", "2:4"]) == 0
    assert seen["profile"] == [2, 4]


def test_bench_train_document(tmp_path):
    pytest.importorskip("torch")
    doc = bench_train(load_config("quickstart", TINY), repeats=2, preset="config", warmup=1)
    train = doc["results"]["train"]
    for side in ("jax", "torch"):
        for key in ("tokens_per_second", "step_seconds", "step_cpu_seconds", "peak_rss_mb", "first_loss", "last_loss",
                    "first_step_seconds", "setup_seconds"):
            assert isinstance(train[f"{side}_{key}"], float) and train[f"{side}_{key}"] > 0, (side, key)
        assert train[f"{side}_tokens_per_second"] == pytest.approx(
            doc["settings"]["tokens_per_step"] / train[f"{side}_step_seconds"])
        assert train[f"{side}_peak_device_memory_mb"] is None and train[f"{side}_mfu"] is None  # the CPU
        assert train[f"{side}_remat"] == "none"  # auto: none on the CPU, so no checkpointing either
    assert doc["settings"]["tokens_per_step"] == 2 * 40
    assert train["ratio"] == pytest.approx(train["jax_tokens_per_second"] / train["torch_tokens_per_second"])
    assert train["jax_first_loss"] == pytest.approx(train["torch_first_loss"], rel=1e-5)
    assert train["jax_last_loss"] == pytest.approx(train["torch_last_loss"], rel=1e-4)  # same steps, same updates
    assert train["jax_alone_because"] is None
    env = doc["environment"]
    assert env["platform"] == "cpu" and env["torch_attention"] == "sdpa" and env["torch_threads"] >= 1
    assert env["torch_device"] == "cpu" and env["torch_memory_fraction"] is None
    assert "xla_flags" in env and doc["settings"]["interleaved"]
    assert len(doc["settings"]["step_seconds"]["jax"]) == 2
    text = format_results(doc)
    assert "train/config: 2 x 40 tokens" in text and f"x{train['ratio']:.2f}" in text and "JAX alone" not in text
    json.loads(json.dumps(doc))  # JSON-able as written by --out


def test_bench_train_lora_document_with_remat_override():
    pytest.importorskip("peft")
    doc = bench_train(load_config("quickstart", []), repeats=3, preset="tiny-lora", warmup=1, remat="full")
    train = doc["results"]["train"]
    assert train["jax_remat"] == "full" and train["torch_remat"] == "full"  # --remat, and checkpointing to match
    assert train["jax_first_loss"] == train["torch_first_loss"]
    assert train["jax_last_loss"] == pytest.approx(train["torch_last_loss"], rel=1e-5)
    assert doc["environment"]["peft"] and doc["settings"]["problem"]["remat"] == "full"
    text = format_results(doc)
    assert "LoRA r8 (q, v)" in text and "peft" in text
    assert [line.split()[-1] for line in text.splitlines() if line[:8].strip() in ("jax", "torch")] == ["full", "full"]


def test_a_torch_process_that_fails_leaves_jax_alone_with_the_reason(monkeypatch):
    """E.g. out of device memory on a shared GPU: JAX's figures stand, the reason is one line."""
    pytest.importorskip("peft")
    import recranker_jax.bench.train as train

    make_worker = train.worker

    def failing_torch(side, *args, **kwargs):
        made = make_worker(side, *args, **kwargs)
        if side == "torch":
            made.command = [sys.executable, "-c", "import sys; sys.exit('CUDA out of memory')"]
        return made

    monkeypatch.setattr(train, "worker", failing_torch)
    doc = bench_train(load_config("quickstart", []), repeats=1, preset="tiny-lora", warmup=1)
    train_results = doc["results"]["train"]
    assert train_results["jax_alone_because"] == "the torch process failed (exit 1): CUDA out of memory"
    assert not any(k.startswith("torch_") for k in train_results) and "ratio" not in train_results
    assert not doc["settings"]["interleaved"] and train_results["jax_tokens_per_second"] > 0
    lines = format_results(doc).splitlines()
    assert [line for line in lines if line.startswith("JAX alone: ")] == [
        "JAX alone: the torch process failed (exit 1): CUDA out of memory"]


def test_bench_train_jax_alone_says_why(tmp_path):
    # --profile 2:9 runs past the 2 steps: the trace ends when the JAX worker quits
    doc = bench_train(load_config("quickstart", [f"run.root={tmp_path}"]), repeats=1, preset="tiny-lora", warmup=1,
                      compare_torch=False, profile=[2, 9])
    traces = list((tmp_path / "quickstart" / "bench" / "train" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and b"jit__update" in traces[0].read_bytes()
    train = doc["results"]["train"]
    assert "--no-torch" in train["jax_alone_because"] and not any(k.startswith("torch_") for k in train)
    assert "ratio" not in train and not doc["settings"]["interleaved"]
    lines = format_results(doc).splitlines()
    assert [line for line in lines if line.startswith("JAX alone: ")] == [f"JAX alone: {train['jax_alone_because']}"]
