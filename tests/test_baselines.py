"""The non-LLM controls (rank/baselines.py) and the planted candidates (retrieval/stage.py):
counts checked against hand-counted and brute-force values, the leakage property through the
real split, orders against independently computed scores, and the config checks."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from recranker_jax.config import load_config
from recranker_jax.data.split import load_split, split_interactions, write_split
from recranker_jax.data.table import build_interactions
from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import protocol_metrics
from recranker_jax.rank import baselines, hybrid
from recranker_jax.rank.stage import baseline_utilities
from recranker_jax.retrieval.evaluate import Scorer, exclusions, top_k
from recranker_jax.retrieval.stage import planted_candidates, sampled_candidates
from recranker_jax.run import RetrievalFolder, write_embeddings
from tests.helpers import synthetic_split


def split_from_rows(rows: list[tuple], out_dir) -> object:
    """(user, item, rating, time) rows through the real split and its files."""
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    items = sorted(frame["item"].unique())
    meta = pd.DataFrame({"item_id": items, "title": [f"Movie {i}" for i in items], "year": 2000, "genres": "Drama"})
    interactions = build_interactions(user_raw=frame["user"], item_raw=frame["item"], rating=frame["rating"].to_numpy(),
                                      timestamp=frame["ts"].to_numpy(), item_meta=meta, name="tiny", scale=(1.0, 5.0))
    write_split(split_interactions(interactions, 4, 2, 3), out_dir)
    return load_split(out_dir)


# ----------------------------------------------------------------------------- transitions

def test_transition_counts_equal_counts_made_by_hand():
    # user 0 likes a..g in time order; user 1 likes b then g. Window 5: a -> f counts, a -> g does not.
    a, b, c, d, e, f, g = range(7)
    users = np.array([0] * 7 + [1] * 2)
    items = np.array([a, b, c, d, e, f, g, b, g])
    keys, counts = baselines.transition_counts(users, items, n_items=7)
    table = {(int(k) // 7, int(k) % 7): int(n) for k, n in zip(keys, counts)}
    assert table[(a, b)] == table[(a, f)] == 1 and (a, g) not in table
    assert table[(b, g)] == 2  # once in each user's sequence
    assert (g, b) not in table  # across users nothing counts (user 0's last like, user 1's first)
    assert (b, a) not in table  # directed
    assert sum(table.values()) == 6 + 5 + 4 + 3 + 2 + 1  # 1 to 5 steps apart in 7 items, plus user 1's b -> g


def test_transition_counts_equal_a_brute_force_count_on_random_sequences():
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 6, 80))
    items = rng.integers(0, 12, 80)
    keys, counts = baselines.transition_counts(users, items, n_items=12)
    expected: dict[tuple[int, int], int] = {}
    for user in np.unique(users):
        sequence = items[users == user].tolist()
        for i, j in itertools.combinations(range(len(sequence)), 2):
            if j - i <= 5:
                expected[(sequence[i], sequence[j])] = expected.get((sequence[i], sequence[j]), 0) + 1
    assert {(int(k) // 12, int(k) % 12): int(n) for k, n in zip(keys, counts)} == expected


def test_a_candidates_score_sums_counts_from_the_last_ten_likes_only():
    # user 0: likes 0..11 (12 likes); the candidate 20 follows like 0 and like 11 in user 1's sequence.
    users = np.array([0] * 12 + [1, 1, 1, 1])
    items = np.array([*range(12), 0, 20, 11, 21])
    is_like = np.ones(len(users), bool)
    history = baselines.last_items(users, items, n_users=2)
    assert history[0].tolist() == list(range(2, 12)) and history[1].tolist() == [-1] * 6 + [0, 20, 11, 21]
    keys, counts = baselines.transition_counts(users, items, n_items=22)
    scores = baselines.transition_scores(keys, counts, 22, history, np.array([[20, 21, 5], [20, 21, 0]]))
    # user 0: 0 -> 20 is outside its last ten; 11 -> 21 once, 11 -> 20 never; 2..4 -> 5 in its own sequence.
    assert scores[0].tolist() == [0.0, 1.0, 3.0]
    # user 1 (history 0, 20, 11, 21): 0 -> 20 once; 0 -> 21, 20 -> 21 and 11 -> 21 once each; nothing into 0.
    assert scores[1].tolist() == [1.0, 3.0, 0.0]
    utility = baselines.transition_baseline(users, items, is_like, 2, 22, np.array([[20, 21, 5], [20, 21, 0]]), 0.01)
    assert utility[0].tolist() == pytest.approx([0 + 0.03, 1 / 3 + 0.02, 1 + 0.01])


def test_dislikes_break_no_sequence_and_count_nothing():
    users = np.array([0, 0, 0])
    items = np.array([1, 2, 3])
    keys, counts = baselines.transition_counts(*baselines.liked_sequences(users, items, np.array([True, False, True])), 4)
    assert [(int(k) // 4, int(k) % 4) for k in keys] == [(1, 3)] and counts.tolist() == [1]


def test_transition_counts_use_no_validation_or_test_interaction(tmp_path):
    """Users 1 and 3 liked 11 (validation) and 12 (test) after 10. Counting held-out likes would
    give user 2, whose last training like is 10, transitions into 11 and 12; training alone gives
    none (its only transition into a candidate is user 3's training 10 -> 13)."""
    rows = [(1, 1, 5, 1), (1, 2, 5, 2), (1, 10, 5, 3), (1, 11, 5, 4), (1, 12, 5, 5),
            (2, 3, 5, 1), (2, 4, 5, 2), (2, 10, 5, 3), (2, 13, 5, 4), (2, 14, 5, 5),
            (3, 10, 5, 1), (3, 13, 5, 2), (3, 11, 4, 3), (3, 12, 4, 4)]
    data = split_from_rows(rows, tmp_path / "data")
    items = data.items["item_id"].astype(str).tolist()
    cand = np.array([[items.index(str(i)) for i in (11, 12, 13)]] * data.n_users)
    utility = baseline_utilities(["transition"], data, RetrievalFolder(tmp_path / "none"), cand)["transition"]
    user = data.user_ids.astype(str).tolist().index("2")
    weight = baselines.TRANSITION_RETRIEVAL_WEIGHT
    assert utility[user].tolist() == pytest.approx([3 * weight, 2 * weight, 1 + weight])
    # The same likes all in training do change the answer: the test is sensitive to a leak.
    leaked = baselines.transition_baseline(
        np.r_[data.train_user, np.arange(data.n_users), np.arange(data.n_users)],
        np.r_[data.train_item, data.valid_item, data.test_item], np.ones(len(data.train_user) + 2 * data.n_users, bool),
        data.n_users, data.n_items, cand)
    assert leaked[user, 0] > utility[user, 0]


# ----------------------------------------------------------------------------- another backbone's scores

def test_the_second_backbone_orders_candidates_by_its_own_scores(tmp_path):
    rng = np.random.default_rng(1)
    user_factors, item_factors = rng.normal(size=(5, 4)), rng.normal(size=(30, 4))
    folder = RetrievalFolder(tmp_path)
    folder.model("mf").mkdir()
    write_embeddings(folder.embeddings("mf"), user_factors, item_factors)
    cand = np.array([rng.permutation(30)[:8] for _ in range(5)])
    cand[4, 6:] = -1  # padding stays last
    utility = baseline_utilities(["mf"], None, folder, cand)["mf"]
    order = np.asarray(hybrid.rank_orders(cand, {"mf": utility})["mf"])
    for u in range(5):
        real = [c for c in cand[u] if c >= 0]
        by_score = sorted(real, key=lambda i: -float(user_factors[u] @ item_factors[i]))
        assert order[u].tolist() == by_score + [-1] * (8 - len(real))


def test_explicit_mf_as_a_baseline_orders_by_its_predicted_rating(tmp_path):
    from recranker_jax.run import write_explicit_mf

    rng = np.random.default_rng(2)
    arrays = {"user_factors": rng.normal(size=(3, 2)), "item_factors": rng.normal(size=(9, 2)),
              "user_bias": rng.normal(size=3), "item_bias": rng.normal(size=9), "mean_rating": np.float32(3.5)}
    write_explicit_mf(RetrievalFolder(tmp_path).explicit_mf, arrays)
    cand = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 4, 2]])
    utility = baseline_utilities(["explicit_mf"], None, RetrievalFolder(tmp_path), cand)["explicit_mf"]
    for u in range(3):
        rating = [3.5 + arrays["user_bias"][u] + arrays["item_bias"][i] + arrays["user_factors"][u] @ arrays["item_factors"][i]
                  for i in cand[u]]
        assert utility[u] == pytest.approx(rating, rel=1e-5)


def test_the_random_order_is_seeded_and_a_uniform_permutation_of_the_candidates():
    cand = np.tile(np.arange(10), (4000, 1))
    first = baseline_utilities(["random"], None, None, cand, seed=5)["random"]
    assert np.array_equal(first, baseline_utilities(["random"], None, None, cand, seed=5)["random"])
    assert not np.array_equal(first, baseline_utilities(["random"], None, None, cand, seed=6)["random"])
    order = np.asarray(hybrid.rank_orders(cand, {"random": first})["random"])
    assert (np.sort(order, axis=1) == cand).all()
    # each candidate comes first for about a tenth of the users (binomial sd 0.0047)
    assert np.allclose(np.bincount(order[:, 0], minlength=10) / 4000, 0.1, atol=0.025)


# ----------------------------------------------------------------------------- planted candidates

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("planted") / "data", n_users=40, n_items=60)


@pytest.mark.parametrize("split", ["test", "valid"])
def test_planted_candidates_hold_the_held_out_item_once_in_backbone_score_order(data, split):
    rng = np.random.default_rng(3)
    scorer = Scorer(rng.normal(size=(data.n_users, 6)).astype(np.float32),
                    rng.normal(size=(data.n_items, 6)).astype(np.float32))
    items, scores = planted_candidates(scorer, data, split, 10, batch_users=16)
    target = data.test_item if split == "test" else data.valid_item
    training = set(zip(data.train_user.tolist(), data.train_item.tolist()))
    retrieved, _ = top_k(scorer, exclusions(data, split), 10)
    for u in range(data.n_users):
        row = items[u].tolist()
        assert len(row) == len(set(row)) == 10 and row.count(int(target[u])) == 1
        assert not any((u, i) in training for i in row)
        if split == "test":
            assert data.valid_item[u] not in row  # masked as for the retrieved test candidates
        own = scorer.item_factors[row].astype(np.float64) @ scorer.user_factors[u]
        assert scores[u] == pytest.approx(own, rel=1e-4, abs=1e-5)
        assert (np.diff(own) <= 1e-5).all()  # by the backbone's own score
        # the other nine are the best items the retrieved candidates could hold besides the target
        assert set(row) - {int(target[u])} == set([i for i in retrieved[u].tolist() if i != target[u]][:9])
    # the backbone order keeps its protocol NDCG@3 and HR@3 (the target ranks the same in the top 9)
    planted = protocol_metrics(items, target, (3,))
    protocol = protocol_metrics(retrieved, target, (3,))
    assert np.asarray(planted["in_candidates"]).all()
    assert np.allclose(planted["ndcg@3"], protocol["ndcg@3"]) and np.allclose(planted["hr@3"], protocol["hr@3"])


@pytest.mark.parametrize("split", ["test", "valid"])
def test_sampled_candidates_hold_the_held_out_item_among_unrated_items_in_backbone_score_order(data, split):
    rng = np.random.default_rng(4)
    scorer = Scorer(rng.normal(size=(data.n_users, 6)).astype(np.float32),
                    rng.normal(size=(data.n_items, 6)).astype(np.float32))
    items, scores = sampled_candidates(scorer, data, split, 10, seed=5, batch_users=16)
    target = data.test_item if split == "test" else data.valid_item
    rated = {(u, i) for u, i in zip(data.train_user.tolist(), data.train_item.tolist())}
    rated |= {(u, int(data.valid_item[u])) for u in range(data.n_users)} | {(u, int(data.test_item[u])) for u in range(data.n_users)}
    for u in range(data.n_users):
        row = items[u].tolist()
        assert len(row) == len(set(row)) == 10 and row.count(int(target[u])) == 1
        assert not any((u, i) in rated for i in row if i != target[u])  # negatives: never rated, in any split
        own = scorer.item_factors[row].astype(np.float64) @ scorer.user_factors[u]
        assert scores[u] == pytest.approx(own, rel=1e-4, abs=1e-5) and (np.diff(own) <= 1e-5).all()
    # Unlike the planted set, the held-out item sits wherever the backbone scores it: here, with
    # random factors, at every rank about equally often (40 users: each rank 4 times on average).
    ranks = (items == target[:, None]).argmax(axis=1)
    assert len(set(ranks.tolist())) >= 6 and (ranks < 9).mean() > 0.5
    again, _ = sampled_candidates(scorer, data, split, 10, seed=5, batch_users=7)
    other, _ = sampled_candidates(scorer, data, split, 10, seed=6)
    assert np.array_equal(again, items)  # the seed alone decides, not the batching
    assert not np.array_equal(other, items)


def test_sampled_negatives_are_uniform_over_unrated_items(data):
    """Over many seeds each unrated item of a user is drawn about equally often."""
    scorer = Scorer(np.ones((data.n_users, 2), np.float32), np.ones((data.n_items, 2), np.float32))
    counts = np.zeros(data.n_items)
    for seed in range(300):
        items, _ = sampled_candidates(scorer, data, "test", 10, seed=seed)
        counts += np.bincount(items[0][items[0] != data.test_item[0]], minlength=data.n_items)
    rated = set(data.train_item[data.train_user == 0].tolist()) | {int(data.valid_item[0]), int(data.test_item[0])}
    unrated = [i for i in range(data.n_items) if i not in rated]
    assert counts[sorted(rated)].sum() == 0
    expected = 300 * 9 / len(unrated)
    assert np.abs(counts[unrated] - expected).max() < 5 * np.sqrt(expected)  # binomial, 5 sd


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, needle", [
    (["rank.baselines=[popular]"], "rank.baselines=['popular']: 'popular' unknown"),
    (["rank.baselines=[lightgcn]"], "'lightgcn' unknown; expected some of transition, random, mf, explicit_mf, popularity"),
    (["rank.baselines=[transition, transition]"], "'transition' listed twice"),
    (["retrieval.models=[lightgcn, explicit_mf]", "rank.baselines=[mf]"], "'mf' unknown"),
    (["rank.candidates=both"], "config key rank.candidates: expected 'retrieved' | 'planted' | 'sampled'"),
])
def test_bad_baselines_and_candidates_are_one_line_errors_naming_the_key(overrides, needle):
    with pytest.raises(RecRankerError) as err:
        load_config("quickstart", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_baseline_lists_load():
    assert load_config("quickstart", ["rank.baselines=[]"]).rank.baselines == []
    cfg = load_config("quickstart", ["rank.baselines=[transition, mf, popularity]", "rank.candidates=planted"])
    assert cfg.rank.baselines == ["transition", "mf", "popularity"] and cfg.rank.candidates == "planted"
