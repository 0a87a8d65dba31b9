"""A backbone added by registering one function (the example of docs/extending.md) runs the retrieval
stage as `retrieval.backbone`; its candidates are its own top k, computed here independently;
a model whose validation and test scorers differ ranks each split with its own."""

import numpy as np
import pandas as pd
import pytest

from recranker_jax.cli import main
from recranker_jax.config_checks import RETRIEVAL_MODELS
from recranker_jax.data.split import load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.retrieval.backbones import BACKBONES, Context, Fitted, register_backbone, same_for_both
from recranker_jax.retrieval.evaluate import Scorer, exclusions

FAST = ["retrieval.models=[recent_popularity, lightgcn]", "retrieval.epochs=1", "retrieval.eval_every=1",
        "retrieval.dim=8", "prompts.hints=false"]


# --- the example of docs/extending.md, as a user would write it -------------------------------------------
def recent_popularity(ctx: Context) -> Fitted:
    """Popularity by recency: each training like counts 0.5 ** (its age in years at the newest
    training interaction); the same scores for every user and both held-out items."""
    data = ctx.data
    age_years = (data.train_timestamp.max() - data.train_timestamp) / (365.25 * 86400)
    weight = np.where(data.train_is_like, 0.5 ** age_years, 0.0)
    counts = np.bincount(data.train_item, weights=weight, minlength=data.n_items).astype(np.float32)
    return Fitted(same_for_both(Scorer(np.ones((data.n_users, 1), np.float32), counts[:, None])))
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def registered():
    """register_backbone, with the registry put back as it was after the test."""
    backbones, names = dict(BACKBONES), dict(RETRIEVAL_MODELS)
    yield register_backbone
    BACKBONES.clear()
    BACKBONES.update(backbones)
    RETRIEVAL_MODELS.clear()
    RETRIEVAL_MODELS.update(names)


def top_items(scores: np.ndarray, masked: np.ndarray, k: int) -> np.ndarray:
    """Each user's k best items by `scores` [U, I] with `masked` ([U, E], -1 padded) excluded;
    ties by item index (numpy's stable sort, independent of the stage's top-k)."""
    scores = scores.astype(np.float64).copy()
    rows = np.repeat(np.arange(len(masked)), masked.shape[1])
    keep = masked.ravel() >= 0
    scores[rows[keep], masked.ravel()[keep]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def candidate_items(path, data) -> np.ndarray:
    frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    index = {str(v): i for i, v in enumerate(data.items["item_id"].astype(str))}
    users = {str(u): i for i, u in enumerate(data.user_ids.astype(str))}
    out = np.full((data.n_users, frame["rank"].max() + 1 - frame["rank"].min()), -1)
    for user, rank, item in zip(frame["user_id"], frame["rank"], frame["item_id"]):
        out[users[user], rank - frame["rank"].min()] = index[item]
    return out


def test_a_registered_backbone_is_the_retrieval_backbone_with_no_stage_edit(tmp_path, registered):
    registered("recent_popularity")(recent_popularity)
    assert main(["retrieval", f"run.root={tmp_path}", *FAST, "retrieval.backbone=recent_popularity"]) == 0
    run = tmp_path / "quickstart"
    data = load_split(run / "data")
    expected_scores = recent_popularity(Context(data, None, None, tmp_path, None)).scorers["test"]
    scores = np.broadcast_to(expected_scores.item_factors[:, 0], (data.n_users, data.n_items))
    for split, name in (("test", "candidates.csv"), ("valid", "candidates_valid.csv")):
        got = candidate_items(run / "retrieval" / name, data)
        want = top_items(scores, exclusions(data, split), 10)
        assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1)), split  # the same ten
        picked = np.take_along_axis(scores, got, axis=1)
        assert np.all(np.diff(picked, axis=1) <= 0)  # in score order
    metrics = (run / "retrieval" / "metrics.json").read_text()
    assert '"recent_popularity"' in metrics and '"backbone": "recent_popularity"' in metrics


def test_each_split_is_ranked_with_its_own_scorer(tmp_path, registered):
    """A stand-in for a sequential model: validation ranks by popularity, test by its reverse."""
    def two_scorers(ctx: Context) -> Fitted:
        counts = np.bincount(ctx.data.train_item, minlength=ctx.data.n_items).astype(np.float32)
        ones = np.ones((ctx.data.n_users, 1), np.float32)
        return Fitted({"valid": Scorer(ones, counts[:, None]), "test": Scorer(ones, -counts[:, None])})

    registered("two_scorers")(two_scorers)
    assert main(["retrieval", f"run.root={tmp_path}", *FAST, "retrieval.models=[two_scorers]",
                 "retrieval.backbone=two_scorers"]) == 0
    run = tmp_path / "quickstart"
    data = load_split(run / "data")
    counts = np.bincount(data.train_item, minlength=data.n_items).astype(np.float64)
    for split, name, sign in (("valid", "candidates_valid.csv", 1), ("test", "candidates.csv", -1)):
        got = candidate_items(run / "retrieval" / name, data)
        want = top_items(np.broadcast_to(sign * counts, (data.n_users, data.n_items)), exclusions(data, split), 10)
        assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1)), split


def test_a_model_that_only_rates_cannot_be_the_backbone_and_unknown_names_are_refused(registered):
    from recranker_jax.config import load_config

    registered("rater", ranks=False)(recent_popularity)
    with pytest.raises(RecRankerError, match=r"retrieval.backbone='rater': expected one of the ranking models"):
        load_config("quickstart", ["retrieval.models=[rater, lightgcn]", "retrieval.backbone=rater"])
    with pytest.raises(RecRankerError, match=r"retrieval.models: unknown \['nope'\]"):
        load_config("quickstart", ["retrieval.models=[nope, lightgcn]"])


def test_sasrec_is_a_backbone_ranking_each_split_from_its_own_sequence(tmp_path):
    from recranker_jax.run import read_embeddings

    assert main(["retrieval", f"run.root={tmp_path}", "retrieval.models=[sasrec, explicit_mf]",
                 "retrieval.backbone=sasrec", "retrieval.sequence.epochs=2", "retrieval.sequence.eval_every=1",
                 "retrieval.sequence.dim=16", "retrieval.sequence.batch_size=256", "retrieval.explicit_mf.epochs=1",
                 "retrieval.explicit_mf.eval_every=1"]) == 0
    run = tmp_path / "quickstart"
    data = load_split(run / "data")
    import json

    entry = json.loads((run / "retrieval" / "metrics.json").read_text())["models"]["sasrec"]
    likes = np.bincount(data.train_user[data.train_is_like], minlength=data.n_users)
    assert entry["stats"]["single_like_users"] == int(np.sum(likes == 1))
    assert entry["stats"]["users_trained"] == int(np.sum(likes >= 2)) and entry["epochs_run"] == 2
    users, items = read_embeddings(run / "retrieval" / "sasrec" / "embeddings.npz")  # training sequences only
    valid = candidate_items(run / "retrieval" / "candidates_valid.csv", data)
    want = top_items(users @ items.T, exclusions(data, "valid"), 10)
    assert np.mean(np.sort(valid, axis=1) == np.sort(want, axis=1)) > 0.99  # float ties aside
    test = candidate_items(run / "retrieval" / "candidates.csv", data)
    assert not (test == data.valid_item[:, None]).any()  # the validation item is input, never a candidate
    assert (np.sort(test, axis=1) != np.sort(valid, axis=1)).any(axis=1).mean() > 0.5  # a longer sequence
