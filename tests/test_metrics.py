"""Tests for recranker_jax.metrics: hand-worked cases, a plain-numpy reference on random inputs, properties."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import (
    bootstrap_interval,
    candidate_rank,
    mask_scores,
    mask_scores_dense,
    mean_metrics,
    paired_permutation_pvalue,
    protocol_metrics,
    ranking_metrics,
    reorder,
    top_k_items,
)

# Fixed shapes for the random tests so that each jitted function compiles once.
NUM_USERS, LIST_LENGTH, NUM_RELEVANT, NUM_ITEMS = 8, 6, 4, 10
RANDOM_KS = (1, 3, 6)
FEW_EXAMPLES = settings(max_examples=40, deadline=None)


def as_numpy(per_user: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(values) for name, values in per_user.items()}


# ----------------------------------------------------------------------------------------------
# Plain-numpy reference implementations (one user at a time, straight from the definitions)
# ----------------------------------------------------------------------------------------------


def reference_ranking_metrics(ranked_items: np.ndarray, relevant: np.ndarray, ks) -> dict[str, np.ndarray]:
    results: dict[str, list] = {f"{name}@{k}": [] for k in ks for name in ("hr", "recall", "precision", "ndcg", "mrr")}
    results["valid"] = []
    for ranking, relevant_row in zip(ranked_items.tolist(), relevant.tolist()):
        relevant_set = {item for item in relevant_row if item >= 0}
        seen: set[int] = set()
        hits = []
        for item in ranking:
            hits.append(item >= 0 and item in relevant_set and item not in seen)
            seen.add(item)
        results["valid"].append(bool(relevant_set))
        for k in ks:
            if not relevant_set:
                for name in ("hr", "recall", "precision", "ndcg", "mrr"):
                    results[f"{name}@{k}"].append(0.0)
                continue
            hit_positions = [j for j in range(k) if hits[j]]
            dcg = sum(1.0 / math.log2(j + 2) for j in hit_positions)
            idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(relevant_set), k)))
            results[f"hr@{k}"].append(float(bool(hit_positions)))
            results[f"recall@{k}"].append(len(hit_positions) / len(relevant_set))
            results[f"precision@{k}"].append(len(hit_positions) / k)
            results[f"ndcg@{k}"].append(dcg / idcg)
            results[f"mrr@{k}"].append(1.0 / (hit_positions[0] + 1) if hit_positions else 0.0)
    return {name: np.array(values) for name, values in results.items()}


def reference_reorder(candidates: np.ndarray, utilities: np.ndarray) -> np.ndarray:
    reordered = []
    for candidate_row, utility_row in zip(candidates.tolist(), utilities.tolist()):
        # Python's sort is stable: equal keys keep the retrieval order; padding last.
        order = sorted(range(len(candidate_row)), key=lambda j: (candidate_row[j] < 0, -utility_row[j]))
        reordered.append([candidate_row[j] for j in order])
    return np.array(reordered)


ranked_lists = arrays(np.int32, (NUM_USERS, LIST_LENGTH), elements=st.integers(-1, NUM_ITEMS - 1))
relevant_lists = arrays(np.int32, (NUM_USERS, NUM_RELEVANT), elements=st.integers(-1, NUM_ITEMS - 1))


# ----------------------------------------------------------------------------------------------
# ranking_metrics
# ----------------------------------------------------------------------------------------------


def test_ranking_metrics_hand_computed():
    ranked_items = jnp.array(
        [
            [5, 1, 2, 7, -1],  # user 0: relevant {2, 5}
            [0, 1, 2, 4, 3],  # user 1: relevant {3}
            [0, 1, 2, 3, 4],  # user 2: no relevant item
            [-1, -1, -1, -1, -1],  # user 3: padding only, relevant {4}
            [8, 8, 8, 1, 9],  # user 4: relevant {8, 9}, item 8 repeated
        ],
        dtype=jnp.int32,
    )
    relevant = jnp.array([[2, 5, -1], [3, -1, -1], [-1, -1, -1], [-1, 4, -1], [9, 8, -1]], dtype=jnp.int32)
    metrics = as_numpy(ranking_metrics(ranked_items, relevant, ks=(1, 3, 5)))

    # User 0: hits at 0-based positions 0 (item 5) and 2 (item 2); |rel| = 2.
    #   @1: hr 1, recall 1/2, precision 1, ndcg 1/1 = 1, mrr 1
    #   @3: hr 1, recall 2/2, precision 2/3, DCG = 1 + 1/log2(4) = 1.5,
    #       IDCG = 1 + 1/log2(3) = 1.63093, ndcg = 0.91972, mrr 1
    #   @5: same as @3 except precision 2/5
    # User 1: one hit at position 4 (item 3).
    #   @1, @3: all 0.  @5: hr 1, recall 1, precision 1/5, ndcg = (1/log2(6)) / 1 = 0.38685, mrr 1/5
    # User 2: no relevant item -> all 0 and not valid.
    # User 3: padding never matches padding -> all 0, but valid (it has a relevant item).
    # User 4: item 8 counts once (position 0), item 9 at position 4; |rel| = 2.
    #   @3: hr 1, recall 1/2, precision 1/3, ndcg = 1 / (1 + 1/log2(3)) = 0.61315, mrr 1
    #   @5: recall 1, precision 2/5, ndcg = (1 + 1/log2(6)) / 1.63093 = 0.85034
    expected = {
        "hr@1": [1, 0, 0, 0, 1],
        "recall@1": [0.5, 0, 0, 0, 0.5],
        "precision@1": [1, 0, 0, 0, 1],
        "ndcg@1": [1, 0, 0, 0, 1],
        "mrr@1": [1, 0, 0, 0, 1],
        "hr@3": [1, 0, 0, 0, 1],
        "recall@3": [1, 0, 0, 0, 0.5],
        "precision@3": [2 / 3, 0, 0, 0, 1 / 3],
        "ndcg@3": [0.919720, 0, 0, 0, 0.613147],
        "mrr@3": [1, 0, 0, 0, 1],
        "hr@5": [1, 1, 0, 0, 1],
        "recall@5": [1, 1, 0, 0, 1],
        "precision@5": [0.4, 0.2, 0, 0, 0.4],
        "ndcg@5": [0.919720, 0.386853, 0, 0, 0.850345],
        "mrr@5": [1, 0.2, 0, 0, 1],
    }
    assert set(metrics) == set(expected) | {"valid"}
    for name, values in expected.items():
        np.testing.assert_allclose(metrics[name], values, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(metrics["valid"], [True, True, False, True, True])


def test_ranking_metrics_rejects_k_longer_than_list():
    ranked_items = jnp.zeros((2, 5), dtype=jnp.int32)
    relevant = jnp.zeros((2, 1), dtype=jnp.int32)
    with pytest.raises(RecRankerError, match=r"k=10.*K=5"):
        ranking_metrics(ranked_items, relevant, ks=(5, 10))
    with pytest.raises(RecRankerError, match=r"k=0"):
        ranking_metrics(ranked_items, relevant, ks=(0,))


@FEW_EXAMPLES
@given(ranked_items=ranked_lists, relevant=relevant_lists)
def test_ranking_metrics_match_numpy_reference(ranked_items, relevant):
    metrics = as_numpy(ranking_metrics(jnp.asarray(ranked_items), jnp.asarray(relevant), ks=RANDOM_KS))
    reference = reference_ranking_metrics(ranked_items, relevant, RANDOM_KS)
    assert set(metrics) == set(reference)
    np.testing.assert_array_equal(metrics["valid"], reference["valid"])
    for name in reference:
        np.testing.assert_allclose(metrics[name], reference[name], atol=1e-5, err_msg=name)


@FEW_EXAMPLES
@given(ranked_items=ranked_lists, relevant=relevant_lists)
def test_ranking_metric_properties(ranked_items, relevant):
    metrics = as_numpy(ranking_metrics(jnp.asarray(ranked_items), jnp.asarray(relevant), ks=RANDOM_KS))
    for k in RANDOM_KS:
        for name in ("hr", "recall", "precision", "ndcg", "mrr"):
            assert np.all((metrics[f"{name}@{k}"] >= 0) & (metrics[f"{name}@{k}"] <= 1 + 1e-6)), name
        assert np.all(metrics[f"ndcg@{k}"] <= metrics[f"hr@{k}"] + 1e-6)
        assert np.all(metrics[f"mrr@{k}"] <= metrics[f"hr@{k}"])
        assert np.all(metrics[f"recall@{k}"] <= metrics[f"hr@{k}"])
        assert np.all(metrics[f"hr@{k}"][~metrics["valid"]] == 0)
    for smaller_k, larger_k in itertools.pairwise(RANDOM_KS):
        assert np.all(metrics[f"hr@{smaller_k}"] <= metrics[f"hr@{larger_k}"])
        assert np.all(metrics[f"recall@{smaller_k}"] <= metrics[f"recall@{larger_k}"] + 1e-6)


def test_perfect_ranking_scores_one():
    # Relevant items {3, 7} ranked first: every metric is at its maximum (precision@2 = 1 too).
    metrics = as_numpy(ranking_metrics(jnp.array([[7, 3, 0, 1]]), jnp.array([[3, 7]]), ks=(2, 4)))
    for name in ("hr@2", "recall@2", "precision@2", "ndcg@2", "mrr@2", "ndcg@4", "recall@4"):
        np.testing.assert_allclose(metrics[name], [1.0], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(metrics["precision@4"], [0.5])


def test_mean_metrics_excludes_invalid_users():
    per_user = {
        "hr@5": np.array([1.0, 0.0, 0.0, 1.0]),
        "valid": np.array([True, True, False, True]),
    }
    means = mean_metrics(per_user, per_user["valid"])
    assert means == pytest.approx({"hr@5": 2 / 3})  # mask keys are skipped
    assert mean_metrics(per_user) == pytest.approx({"hr@5": 0.5})
    assert math.isnan(mean_metrics(per_user, np.zeros(4, dtype=bool))["hr@5"])


# ----------------------------------------------------------------------------------------------
# Masking and top-k
# ----------------------------------------------------------------------------------------------


def test_mask_scores_padding_does_not_mask_last_item():
    # -1 must not wrap around to the last item (JAX negative indexing).
    scores = jnp.array([[0.5, 1.5, 2.5, 3.5], [1.0, 2.0, 3.0, 4.0]])
    masked = np.asarray(mask_scores(scores, jnp.array([[1, -1], [-1, -1]], dtype=jnp.int32)))
    np.testing.assert_array_equal(masked[0], [0.5, -np.inf, 2.5, 3.5])
    np.testing.assert_array_equal(masked[1], [1.0, 2.0, 3.0, 4.0])


def test_top_k_ties_go_to_lower_item_index():
    # Scores 3 at items 1, 2, 4; score 1 at items 0, 3: ties ordered by item id.
    items, scores = top_k_items(jnp.array([[1.0, 3.0, 3.0, 1.0, 3.0, 0.0]]), 5)
    np.testing.assert_array_equal(np.asarray(items), [[1, 2, 4, 0, 3]])
    np.testing.assert_array_equal(np.asarray(scores), [[3.0, 3.0, 3.0, 1.0, 1.0]])


def test_top_k_pads_when_fewer_rankable_items_than_k():
    # Items 0 and 2 excluded, 2 of 4 items left: the last two slots are padding (-1).
    items, scores = top_k_items(jnp.array([[4.0, 1.0, 3.0, 2.0]]), 4, jnp.array([[0, 2]], dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(items), [[3, 1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(scores)[:, :2], [[2.0, 1.0]])


def test_top_k_rejects_k_larger_than_catalogue():
    with pytest.raises(RecRankerError, match=r"k=5.*N=4"):
        top_k_items(jnp.zeros((1, 4)), 5)


@FEW_EXAMPLES
@given(
    scores=arrays(np.float32, (NUM_USERS, NUM_ITEMS), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, -3.0])),
    exclude=arrays(np.int32, (NUM_USERS, 5), elements=st.integers(-1, NUM_ITEMS - 1)),
)
def test_top_k_never_returns_excluded_items(scores, exclude):
    k = 6
    items, top_scores = top_k_items(jnp.asarray(scores), k, jnp.asarray(exclude))
    dense_mask = np.zeros((NUM_USERS, NUM_ITEMS), dtype=bool)
    for user, row in enumerate(exclude):
        dense_mask[user, row[row >= 0]] = True
    items_dense, _ = top_k_items(jnp.asarray(scores), k, jnp.asarray(dense_mask))
    np.testing.assert_array_equal(np.asarray(items), np.asarray(items_dense))
    np.testing.assert_array_equal(
        np.asarray(mask_scores(jnp.asarray(scores), jnp.asarray(exclude))),
        np.asarray(mask_scores_dense(jnp.asarray(scores), jnp.asarray(dense_mask))),
    )
    items = np.asarray(items)
    for user in range(NUM_USERS):
        allowed = np.flatnonzero(~dense_mask[user])
        # Reference: stable sort by descending score, lower item first on ties.
        expected = allowed[np.argsort(-scores[user, allowed], kind="stable")][:k]
        expected = np.concatenate([expected, -np.ones(k - expected.size, dtype=int)])
        np.testing.assert_array_equal(items[user], expected)
        real_items = items[user][items[user] >= 0]
        assert not dense_mask[user, real_items].any()
    assert np.all(np.diff(np.asarray(top_scores), axis=1) <= 0)


# ----------------------------------------------------------------------------------------------
# RecRanker protocol
# ----------------------------------------------------------------------------------------------


def test_protocol_metrics_hand_computed():
    candidates = jnp.array(
        [
            [10, 11, 12, 13, 14],  # target 11 at rank 2
            [10, 11, 12, 13, 14],  # target 13 at rank 4
            [10, 11, 12, 13, 14],  # target 99 not retrieved
            [10, 11, -1, -1, -1],  # target 10 at rank 1, short list
            [10, 11, -1, -1, -1],  # no target (-1) never matches padding
        ],
        dtype=jnp.int32,
    )
    target = jnp.array([11, 13, 99, 10, -1], dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(candidate_rank(candidates, target)), [2, 4, 0, 1, 0])
    metrics = as_numpy(protocol_metrics(candidates, target, ks=(3, 5)))
    # rank 2: ndcg = 1/log2(3) = 0.63093; rank 4: ndcg@5 = 1/log2(5) = 0.43068, ndcg@3 = 0; rank 1: 1.
    np.testing.assert_allclose(metrics["hr@3"], [1, 0, 0, 1, 0])
    np.testing.assert_allclose(metrics["hr@5"], [1, 1, 0, 1, 0])
    np.testing.assert_allclose(metrics["ndcg@3"], [0.630930, 0, 0, 1, 0], atol=1e-5)
    np.testing.assert_allclose(metrics["ndcg@5"], [0.630930, 0.430677, 0, 1, 0], atol=1e-5)
    np.testing.assert_array_equal(metrics["in_candidates"], [True, True, False, True, False])
    np.testing.assert_array_equal(metrics["valid"], [True, True, True, True, False])
    # Conditional on a retrieval hit: users 0, 1, 3 -> HR@3 = 2/3.
    assert mean_metrics(metrics, metrics["in_candidates"])["hr@3"] == pytest.approx(2 / 3)
    with pytest.raises(RecRankerError, match=r"k=10.*K=5"):
        protocol_metrics(candidates, target, ks=(3, 10))


@FEW_EXAMPLES
@given(candidates=ranked_lists, target=arrays(np.int32, (NUM_USERS,), elements=st.integers(0, NUM_ITEMS - 1)))
def test_protocol_metrics_agree_with_ranking_metrics_for_one_relevant_item(candidates, target):
    # With one relevant item IDCG = 1, so the general definitions reduce to the protocol's.
    protocol = as_numpy(protocol_metrics(jnp.asarray(candidates), jnp.asarray(target), ks=RANDOM_KS))
    general = as_numpy(ranking_metrics(jnp.asarray(candidates), jnp.asarray(target)[:, None], ks=RANDOM_KS))
    for k in RANDOM_KS:
        np.testing.assert_allclose(protocol[f"hr@{k}"], general[f"hr@{k}"])
        np.testing.assert_allclose(protocol[f"ndcg@{k}"], general[f"ndcg@{k}"], atol=1e-6)
    np.testing.assert_array_equal(protocol["in_candidates"], np.any(candidates == target[:, None], axis=1))


# ----------------------------------------------------------------------------------------------
# reorder
# ----------------------------------------------------------------------------------------------


def test_reorder_hand_computed():
    candidates = jnp.array([[10, 11, -1, 12, 13]], dtype=jnp.int32)
    utilities = jnp.array([[0.0, 1.0, 5.0, 1.0, -0.0]])
    # 11 and 12 tie at 1.0 (retrieval order kept), 10 and 13 tie at 0 == -0, padding last
    # despite its utility 5.
    np.testing.assert_array_equal(np.asarray(reorder(candidates, utilities)), [[11, 12, 10, 13, -1]])
    # NaN utility ranks below -inf but above padding.
    nan_case = reorder(jnp.array([[1, -1, 2, 3]]), jnp.array([[jnp.nan, 9.0, -jnp.inf, 0.0]]))
    np.testing.assert_array_equal(np.asarray(nan_case), [[3, 2, 1, -1]])


@FEW_EXAMPLES
@given(
    candidates=arrays(np.int32, (NUM_USERS, LIST_LENGTH), elements=st.integers(-1, 50), unique=True),
    utilities=arrays(np.float32, (NUM_USERS, LIST_LENGTH), elements=st.sampled_from([-1.0, 0.0, 0.25, 1.0])),
)
def test_reorder_is_stable_permutation(candidates, utilities):
    reordered = np.asarray(reorder(jnp.asarray(candidates), jnp.asarray(utilities)))
    np.testing.assert_array_equal(reordered, reference_reorder(candidates, utilities))
    for user in range(NUM_USERS):
        assert sorted(reordered[user].tolist()) == sorted(candidates[user].tolist())
        positions = [candidates[user].tolist().index(item) for item in reordered[user]]
        reordered_utilities = utilities[user, positions]
        real = reordered[user] >= 0
        assert np.all(np.diff(reordered_utilities[real]) <= 0)
        for earlier, later in itertools.pairwise(range(LIST_LENGTH)):
            if real[later] and reordered_utilities[earlier] == reordered_utilities[later]:
                assert positions[earlier] < positions[later]  # ties keep retrieval order


# ----------------------------------------------------------------------------------------------
# Bootstrap interval and paired test
# ----------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 60), elements=st.sampled_from([0.0, 0.3, 0.5, 1.0])))
def test_bootstrap_interval_contains_mean(values):
    low, high = bootstrap_interval(values, n_resamples=500, seed=1)
    assert low <= values.mean() + 1e-12 <= high + 2e-12


def test_bootstrap_interval_narrows_with_more_users_and_matches_normal_width():
    rng = np.random.default_rng(0)
    few_users = (rng.random(50) < 0.1).astype(float)
    many_users = (rng.random(5000) < 0.1).astype(float)
    few_low, few_high = bootstrap_interval(few_users, seed=0)
    many_low, many_high = bootstrap_interval(many_users, n_resamples=4000, seed=0)
    assert many_high - many_low < (few_high - few_low) / 5  # width ~ 1/sqrt(n): 10x fewer
    # Normal approximation: 2 * 1.96 * sqrt(p (1 - p) / n); a 99% interval would be 1.31x wider,
    # a 90% one 0.84x.
    mean = many_users.mean()
    normal_width = 2 * 1.96 * math.sqrt(mean * (1 - mean) / many_users.size)
    assert many_high - many_low == pytest.approx(normal_width, rel=0.06)


def test_bootstrap_interval_edge_cases():
    assert bootstrap_interval(np.full(7, 0.25)) == (0.25, 0.25)
    assert all(math.isnan(bound) for bound in bootstrap_interval(np.array([])))
    values = np.random.default_rng(3).random(40)
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    narrow = bootstrap_interval(values, confidence=0.5, seed=5)
    wide = bootstrap_interval(values, confidence=0.99, seed=5)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    with pytest.raises(RecRankerError, match="confidence"):
        bootstrap_interval(values, confidence=95)


def test_paired_permutation_hand_computed():
    # Differences (1, 1, 1): of the 8 sign patterns only +++ and --- give |sum| >= 3 -> p = 2/8.
    assert paired_permutation_pvalue(np.ones(3), np.zeros(3)) == pytest.approx(0.25)
    # Zero differences are dropped: same p with extra tied users.
    assert paired_permutation_pvalue(np.r_[np.ones(3), 0.5, 0.5], np.r_[np.zeros(3), 0.5, 0.5]) == pytest.approx(0.25)
    # Differences (1, -1): observed sum 0, every pattern is as extreme -> p = 1.
    assert paired_permutation_pvalue(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0
    assert paired_permutation_pvalue(np.zeros(4), np.zeros(4)) == 1.0
    with pytest.raises(RecRankerError, match="one value per user"):
        paired_permutation_pvalue(np.zeros(3), np.zeros(4))


def test_paired_permutation_exact_matches_brute_force_and_monte_carlo():
    rng = np.random.default_rng(7)
    a = rng.random(12)
    b = a - rng.normal(0.15, 0.3, size=12)
    differences = a - b
    brute_force = np.mean(
        [abs(np.dot(signs, differences)) >= abs(differences.sum()) - 1e-12 for signs in itertools.product((1, -1), repeat=12)]
    )
    exact = paired_permutation_pvalue(a, b)
    monte_carlo = paired_permutation_pvalue(a, b, n_resamples=20000, max_exact_users=0)
    assert exact == pytest.approx(brute_force)
    assert 0.0 < exact < 1.0
    assert monte_carlo == pytest.approx(exact, abs=0.015)


def test_paired_permutation_detects_a_clear_effect_and_not_a_null_one():
    rng = np.random.default_rng(11)
    backbone = rng.random(300)
    hybrid = backbone + 0.2 + rng.normal(0.0, 0.05, size=300)  # consistent improvement
    assert paired_permutation_pvalue(hybrid, backbone, n_resamples=2000) == pytest.approx(1 / 2001)
    symmetric = np.r_[backbone + 0.1, backbone - 0.1]  # differences +0.1 and -0.1 in equal number
    assert paired_permutation_pvalue(symmetric, np.r_[backbone, backbone], n_resamples=2000) == 1.0
