"""bench train: both sides run the same problem (same loss on the same weights, same optimizer),
and the results document is consistent. No timing assertions."""

import json

import numpy as np
import pytest

from recranker_jax.bench.train import (
    PRESETS,
    bench_train,
    format_results,
    jax_side,
    learning_rate,
    problem_from_config,
    torch_comparable,
    torch_side,
)
from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "prompts.tokenizer_vocab_size=96",
        "train.seq_len=40", "train.batch_size=2", "train.warmup_steps=2", "train.steps=10", "train.lr=0.01"]


def tiny_problem(*extra: str) -> dict:
    return problem_from_config(load_config("quickstart", [*TINY, *extra]), "config")


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


def test_problems():
    cfg = load_config("quickstart", [])
    assert problem_from_config(cfg)["hidden_size"] == PRESETS["quickstart"]["hidden_size"] == 128
    assert torch_comparable(problem_from_config(cfg)) and not torch_comparable(problem_from_config(cfg, "7b-lora"))
    lora = tiny_problem("train.lora.enabled=true")
    assert lora["lora"] == {"targets": ["q", "v"], "rank": 8, "alpha": 16.0} and not torch_comparable(lora)
    with pytest.raises(RecRankerError, match="preset 'huge'"):
        problem_from_config(cfg, "huge")
    with pytest.raises(RecRankerError, match="cpus="):
        bench_train(cfg, cpus="a,b")


def test_bench_train_document(tmp_path):
    pytest.importorskip("torch")
    doc = bench_train(load_config("quickstart", TINY), repeats=2, preset="config", warmup=1)
    train = doc["results"]["train"]
    for side in ("jax", "torch"):
        for key in ("tokens_per_second", "step_seconds", "step_cpu_seconds", "peak_rss_mb", "first_loss", "last_loss",
                    "first_step_seconds"):
            assert isinstance(train[f"{side}_{key}"], float) and train[f"{side}_{key}"] > 0, (side, key)
        assert train[f"{side}_tokens_per_second"] == pytest.approx(
            doc["settings"]["tokens_per_step"] / train[f"{side}_step_seconds"])
    assert doc["settings"]["tokens_per_step"] == 2 * 40
    assert train["ratio"] == pytest.approx(train["jax_tokens_per_second"] / train["torch_tokens_per_second"])
    assert train["jax_first_loss"] == pytest.approx(train["torch_first_loss"], rel=1e-5)
    assert train["jax_last_loss"] == pytest.approx(train["torch_last_loss"], rel=1e-4)  # same steps, same updates
    env = doc["environment"]
    assert env["platform"] == "cpu" and env["torch_attention"] == "sdpa" and env["torch_threads"] >= 1
    assert "xla_flags" in env and doc["settings"]["interleaved"]
    assert len(doc["settings"]["step_seconds"]["jax"]) == 2
    text = format_results(doc)
    assert "train/config: 2 x 40 tokens" in text and f"x{train['ratio']:.2f}" in text
    json.loads(json.dumps(doc))  # JSON-able as written by --out
