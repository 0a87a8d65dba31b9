"""`recranker bench retrieval --model sasrec`: the PyTorch SASRec is the JAX one, and the bench runs both."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recranker_jax.bench.torch_sasrec import (
    TorchSASRec,
    batch_tensors,
    copy_jax_parameters,
    sasrec_loss,
)
from recranker_jax.retrieval.sasrec import SASRecSettings, sasrec_problem
from tests.helpers import synthetic_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("split"))


@pytest.mark.parametrize("loss, l2", [("ce", 0.0), ("bce", 0.0), ("ce", 1e-3)])
def test_torch_sasrec_loss_and_gradients_equal_the_jax_ones_from_the_same_weights(data, loss, l2):
    settings = SASRecSettings(max_len=8, dim=16, blocks=2, heads=2, dropout=0.0, batch_size=20, loss=loss, l2=l2)
    problem = sasrec_problem(data, settings, seed=3)
    batches = problem.epoch_batches(0)
    assert (batches["targets"][0] > 0).any() and (batches["inputs"][-1] == 0).all(axis=1).any()  # real and padding rows
    model = TorchSASRec(data.n_items, settings.max_len, settings.dim, settings.blocks, settings.heads, settings.dropout)
    copy_jax_parameters(model, problem.model)
    for step in (0, batches["inputs"].shape[0] - 1):  # a full batch and the padded last one
        jax_batch = {k: jnp.asarray(v[step]) for k, v in batches.items()}
        jax_value, jax_grads = jax.value_and_grad(problem.loss)(problem.model, jax_batch)
        model.zero_grad()
        torch_value = sasrec_loss(model, *batch_tensors(batches, step), loss, l2)
        torch_value.backward()
        np.testing.assert_allclose(torch_value.item(), float(jax_value), rtol=1e-5)
        np.testing.assert_allclose(model.item_embedding.weight.grad.numpy(), np.asarray(jax_grads.item_embedding[...]),
                                   rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(model.blocks[0].query.weight.grad.numpy(),
                                   np.asarray(jax_grads.blocks[0].query.kernel[...]).T, rtol=1e-3, atol=1e-6)


def test_bench_retrieval_sasrec_times_both_sides_on_the_same_steps(tmp_path, capsys):
    from recranker_jax.cli import main

    out = tmp_path / "bench.json"
    overrides = [f"run.root={tmp_path}", "retrieval.sequence.max_len=8", "retrieval.sequence.dim=16",
                 "retrieval.sequence.blocks=1", "retrieval.sequence.batch_size=256", "retrieval.sequence.loss=bce"]
    assert main(["bench", "retrieval", "--model", "sasrec", "--repeats", "1", "--out", str(out), *overrides]) == 0
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert list(results) == ["jax-sasrec", "torch-sasrec"]
    assert doc["problem"]["model"] == "sasrec" and doc["problem"]["max_len"] == 8 and doc["problem"]["loss"] == "bce"
    for result in results.values():
        assert result["epoch_seconds"] > 0 and result["rank_seconds"] > 0 and result["loss"] == "bce"
    assert results["jax-sasrec"]["steps_per_epoch"] == results["torch-sasrec"]["steps_per_epoch"] == 3  # 664 users / 256
    assert "jax-sasrec / torch-sasrec: epoch time x" in capsys.readouterr().out


def test_settings_come_from_the_sequence_section():
    from recranker_jax.bench.retrieval import sasrec_settings
    from recranker_jax.config import load_config

    cfg = load_config("quickstart", ["retrieval.sequence.heads=2", "retrieval.eval_batch_users=64"]).retrieval
    settings = sasrec_settings(cfg)
    assert settings.heads == 2 and settings.eval_batch_users == 64
    assert dataclasses.asdict(settings) == {**dataclasses.asdict(cfg.sequence), "eval_batch_users": 64}
