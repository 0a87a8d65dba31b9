import dataclasses
import json

import jax
import numpy as np
import pandas as pd
import pytest

from recranker_jax.cli import main
from recranker_jax.config import MeshConfig, RetrievalConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import make_mesh
from recranker_jax.retrieval.evaluate import Scorer, evaluate, exclusions, top_k
from recranker_jax.retrieval.train import liked_pairs, sample_negatives, train_bpr, train_explicit_mf
from tests.helpers import synthetic_split

FAST = RetrievalConfig(dim=16, layers=2, lr=5e-3, batch_size=64, epochs=6, eval_every=2, patience=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("split"))


def test_negatives_are_never_positives_and_roughly_uniform():
    rng = np.random.default_rng(0)
    n_items = 10
    positives = np.array([0 * n_items + i for i in range(8)] + [1 * n_items + 3])  # user 0 likes items 0..7
    users = np.array([0] * 20000 + [1] * 20000)
    negatives = sample_negatives(rng, users, n_items, np.sort(positives))
    assert set(negatives[:20000]) == {8, 9}
    assert 3 not in set(negatives[20000:])
    counts = np.bincount(negatives[20000:], minlength=n_items)[[0, 1, 2, 4, 5, 6, 7, 8, 9]]
    expected = 20000 / 9
    # 5 standard deviations of a binomial count
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - 1 / 9)))


def test_exclusions_and_full_ranking_on_a_hand_made_scorer(data):
    table = exclusions(data, "test")
    for user in range(data.n_users):
        expected = set(data.train_item[data.train_user == user]) | {data.valid_item[user]}
        assert set(table[user][table[user] >= 0]) == expected
    # A scorer that puts each user's test item first gives HR@10 = NDCG@10 = MRR@10 = 1.
    user_factors = np.zeros((data.n_users, data.n_items), np.float32)
    user_factors[np.arange(data.n_users), data.test_item] = 1.0
    oracle = evaluate(Scorer(user_factors, np.eye(data.n_items, dtype=np.float32)), data, "test")
    assert oracle["hr@10"] == oracle["ndcg@10"] == oracle["mrr@10"] == oracle["protocol_hr@3"] == 1.0
    assert oracle["precision@10"] == pytest.approx(0.1)
    # Putting the test item at 1-based rank 3 for every user: NDCG@10 = 1/log2(4) = 0.5, MRR = 1/3.
    rigged = np.zeros((data.n_users, data.n_items), np.float32)
    for user in range(data.n_users):
        allowed = [i for i in range(data.n_items) if i not in set(table[user]) and i != data.test_item[user]]
        rigged[user, allowed[:2]] = [3.0, 2.0]
        rigged[user, data.test_item[user]] = 1.0
    third = evaluate(Scorer(rigged, np.eye(data.n_items, dtype=np.float32)), data, "test")
    assert third["ndcg@10"] == pytest.approx(0.5) and third["mrr@10"] == pytest.approx(1 / 3)
    assert third["protocol_hr@3"] == 1.0 and third["protocol_ndcg@3"] == pytest.approx(0.5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices (tests/conftest.py)")
@pytest.mark.parametrize("shape", [[8, 1, 1], [2, 4, 1]])
def test_sharded_training_matches_single_device(data, shape):
    single = train_bpr(data, FAST, 2, seed=0, progress=False)
    mesh_cfg = MeshConfig(shape=shape)
    sharded = train_bpr(data, FAST, 2, seed=0, mesh=make_mesh(mesh_cfg), rules=mesh_cfg.rules, progress=False)
    # Tolerance: float32 sums reduced in a different order across shards, 6 Adam epochs.
    for a, b in zip(single.history, sharded.history):
        assert a["epoch"] == b["epoch"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid_ndcg@10"] == pytest.approx(b["valid_ndcg@10"], abs=1e-6)
    np.testing.assert_allclose(single.scorer.user_factors, sharded.scorer.user_factors, rtol=1e-3, atol=1e-5)


def test_resumed_training_matches_uninterrupted(data, tmp_path):
    uninterrupted = train_bpr(data, FAST, 2, seed=0, progress=False)
    half = dataclasses.replace(FAST, epochs=4)
    train_bpr(data, half, 2, seed=0, checkpoint_dir=tmp_path / "ckpt", progress=False)  # "killed" after epoch 4
    resumed = train_bpr(data, FAST, 2, seed=0, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert [h["epoch"] for h in resumed.history] == [2, 4, 6]
    for a, b in zip(uninterrupted.history, resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    np.testing.assert_allclose(uninterrupted.scorer.item_factors, resumed.scorer.item_factors, rtol=1e-6, atol=1e-7)


def test_lightgcn_learns_the_taste_clusters_and_early_stopping_keeps_the_best(data):
    cfg = dataclasses.replace(FAST, epochs=30, eval_every=3, patience=3)
    result = train_bpr(data, cfg, 2, seed=0, progress=False)
    best = max(h["valid_ndcg@10"] for h in result.history)
    assert result.best_score == pytest.approx(best)
    assert result.history[-1]["epoch"] <= 30
    # Users like items of their cluster (item % 4 == user % 4 in 1-based raw ids): the learnt
    # top-10 should be mostly in-cluster, far above the 1/4 of a random ranking.
    ranked, _ = top_k(result.scorer, exclusions(data, "test"), 10)
    user_cluster = (data.user_ids.astype(int) - 1) % 4
    item_cluster = (data.items["item_id"].astype(int).to_numpy() - 1) % 4
    assert np.mean(item_cluster[ranked] == user_cluster[:, None]) > 0.6


def test_explicit_mf_beats_the_mean_rating_on_validation(data):
    model, result = train_explicit_mf(data, dataclasses.replace(RetrievalConfig().explicit_mf, epochs=60, batch_size=256, lr=0.05, l2=0.01), seed=0, progress=False)
    users = np.arange(data.n_users)
    rmse = np.sqrt(np.mean((np.asarray(model(users, data.valid_item)) - data.valid_rating) ** 2))
    baseline = np.sqrt(np.mean((data.train_rating.mean() - data.valid_rating) ** 2))
    assert rmse == pytest.approx(-result.best_score, rel=1e-5)
    # Validation items are all likes (rating >= 4) while the training mean is about 2.8.
    assert rmse < 0.9 * baseline
    # In-cluster items (liked by construction) are predicted well above out-of-cluster ones.
    user_cluster = (data.user_ids.astype(int) - 1) % 4
    item_cluster = (data.items["item_id"].astype(int).to_numpy() - 1) % 4
    all_users, all_items = np.meshgrid(np.arange(data.n_users), np.arange(data.n_items), indexing="ij")
    predicted = np.asarray(model(all_users.ravel(), all_items.ravel())).reshape(all_users.shape)
    same = user_cluster[:, None] == item_cluster[None, :]
    assert predicted[same].mean() - predicted[~same].mean() > 0.5  # true gap about 2.4, untrained 0


def test_bad_inputs_are_one_line_errors(data, tmp_path):
    with pytest.raises(RecRankerError, match="k=81 is larger than the catalogue \\(80 items\\)"):
        top_k(Scorer(np.ones((data.n_users, 1), np.float32), np.ones((80, 1), np.float32)), exclusions(data, "test"), 81)
    everything = dataclasses.replace(data, train_user=np.repeat(np.arange(data.n_users, dtype=np.int32), data.n_items),
                                     train_item=np.tile(np.arange(data.n_items, dtype=np.int32), data.n_users),
                                     train_rating=np.full(data.n_users * data.n_items, 5.0))
    with pytest.raises(RecRankerError, match="has rated every one of the 80 items"):
        exclusions(everything, "valid")
    no_likes = dataclasses.replace(data, train_rating=np.ones_like(data.train_rating))
    with pytest.raises(RecRankerError, match="the training split has no likes"):
        liked_pairs(no_likes)
    with pytest.raises(RecRankerError, match=r"mesh.shape=\[3, 1, 1\] uses 3 devices, but a mesh must use all"):
        make_mesh(MeshConfig(shape=[3, 1, 1]))


def test_retrieval_command_writes_metrics_and_candidates(tmp_path, capsys):
    args = [f"run.root={tmp_path}", "retrieval.epochs=4", "retrieval.eval_every=2", "retrieval.dim=16",
            "retrieval.explicit_mf.epochs=2", "retrieval.explicit_mf.eval_every=1"]
    assert main(["retrieval", *args]) == 0
    out = capsys.readouterr().out
    assert "lightgcn" in out and "popularity" in out
    folder = tmp_path / "quickstart" / "retrieval"
    result = json.loads((folder / "metrics.json").read_text())
    assert set(result["models"]) == {"lightgcn", "mf", "explicit_mf", "popularity"}
    assert set(result["models"]["lightgcn"]["test"]) >= {"recall@10", "ndcg@20", "hr@10", "mrr@20", "protocol_ndcg@5"}
    candidates = pd.read_csv(folder / "candidates.csv", dtype={"user_id": str, "item_id": str})
    assert list(candidates.columns) == ["user_id", "rank", "item_id", "score"]
    assert len(candidates) == 664 * 10
    train = pd.read_csv(tmp_path / "quickstart" / "data" / "train.csv", dtype=str)
    valid = pd.read_csv(tmp_path / "quickstart" / "data" / "valid.csv", dtype=str)
    seen = set(zip(train.user_id, train.item_id)) | set(zip(valid.user_id, valid.item_id))
    assert not any(pair in seen for pair in zip(candidates.user_id, candidates.item_id))
    assert (candidates.groupby("user_id")["score"].diff().dropna() <= 0).all()
    # The protocol HR@5 of the backbone is recomputable from the files alone.
    test = pd.read_csv(tmp_path / "quickstart" / "data" / "test.csv", dtype=str)
    hits = candidates.merge(test[["user_id", "item_id"]], on=["user_id", "item_id"])
    assert (hits["rank"] <= 5).sum() / 664 == pytest.approx(result["models"]["lightgcn"]["test"]["protocol_hr@5"])
    # The planted candidates: the held-out item once among 10, in score order, nothing seen before it.
    planted = pd.read_csv(folder / "candidates_planted.csv", dtype={"user_id": str, "item_id": str})
    assert list(planted.columns) == list(candidates.columns) and len(planted) == 664 * 10
    assert not any(pair in seen for pair in zip(planted.user_id, planted.item_id))
    assert (planted.groupby("user_id")["score"].diff().dropna() <= 0).all()
    assert (planted.groupby("user_id")["item_id"].nunique() == 10).all()
    assert len(planted.merge(test[["user_id", "item_id"]], on=["user_id", "item_id"])) == 664
    # the backbone order keeps its protocol HR@5: the held-out item ranks the same when in the top 9
    assert (planted.merge(test[["user_id", "item_id"]], on=["user_id", "item_id"])["rank"] <= 5).sum() == (hits["rank"] <= 5).sum()
    planted_valid = pd.read_csv(folder / "candidates_planted_valid.csv", dtype={"user_id": str, "item_id": str})
    assert len(planted_valid.merge(valid[["user_id", "item_id"]], on=["user_id", "item_id"])) == 664
    assert main(["retrieval", *args]) == 0
    assert "[retrieval] cached" in capsys.readouterr().out
    assert main(["retrieval", "--rebuild", *args, "retrieval.candidates=100000"]) == 2
    assert "retrieval.candidates=100000 is larger than the catalogue (9066 items)" in capsys.readouterr().err
