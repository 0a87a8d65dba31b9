"""Tests for recranker_jax.rank.hybrid: hand-worked utilities of each task, the hybrid, the
re-ranked orders, and properties (ties, permutations, conservation of pairwise credit)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recranker_jax.errors import RecRankerError
from recranker_jax.rank.hybrid import (
    ALPHA_GRID,
    hybrid_utility,
    listwise_utility,
    pairwise_utility,
    pointwise_utility,
    rank_orders,
    tune_alphas,
)

FEW_EXAMPLES = settings(max_examples=30, deadline=None)
K, PAIRS = 10, 5


def test_pointwise_adds_the_retrieval_term():
    ratings = np.array([[3.0, 4.0, 3.0], [2.5, 2.5, 2.5]], np.float32)
    utility = np.asarray(pointwise_utility(ratings, 0.05))
    # k = 3: retrieval terms 0.05 * (3, 2, 1)
    np.testing.assert_allclose(utility, [[3.15, 4.10, 3.05], [2.65, 2.60, 2.55]], rtol=1e-6)
    orders = rank_orders(np.array([[10, 20, 30], [7, 8, 9]]), {"pointwise": utility})
    np.testing.assert_array_equal(orders["pointwise"], [[20, 10, 30], [7, 8, 9]])


def test_pointwise_retrieval_term_breaks_ties_but_not_a_full_rating():
    ratings = np.array([[3.0, 3.0, 4.0, 3.0]], np.float32)
    utility = np.asarray(pointwise_utility(ratings, 0.05))
    np.testing.assert_allclose(utility, [[3.2, 3.15, 4.1, 3.05]], rtol=1e-6)
    order = rank_orders(np.array([[1, 2, 3, 4]]), {"p": utility})["p"]
    np.testing.assert_array_equal(order, [[3, 1, 2, 4]])


def test_pairwise_hand_worked():
    pairs = np.array(
        [
            [[0, 1], [2, 3], [4, 5]],
            [[1, 0], [2, 3], [-1, -1]],  # a padded pair
            [[5, 4], [0, -1], [2, 3]],  # a pair with one padded position is ignored too
        ]
    )
    answers = np.array(
        [
            [[1, 0], [0, 1], [1, 1]],  # a consistently; b consistently; inconsistent (Yes, Yes)
            [[-1, 0], [0, 0], [1, 0]],  # unreadable; inconsistent (No, No); padding (answers ignored)
            [[1, 0], [1, 0], [1, -1]],  # 5 consistently; ignored pair; unreadable second answer
        ],
        np.int8,
    )
    utility = np.asarray(pairwise_utility(pairs, answers, 0.5, 6))
    expected = np.array(
        [
            [0.5, 0.0, 0.0, 0.5, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],
            [0.0, 0.0, 0.25, 0.25, 0.0, 0.5],
        ]
    )
    np.testing.assert_allclose(utility, expected)


def test_pairwise_position_outside_the_list_is_ignored():
    pairs = np.array([[[0, 7], [1, 2]]])
    answers = np.array([[[1, 0], [0, 1]]], np.int8)
    np.testing.assert_allclose(pairwise_utility(pairs, answers, 0.5, 4), [[0.0, 0.0, 0.5, 0.0]])


def test_listwise_matches_the_reference_numbers():
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [5, 0, 0, 1, 0, 0, 0]])
    utility = np.asarray(listwise_utility(positions, 0.025, 5))
    # reference: 0.025 * (5 - j) for 0-based answer position j, unmentioned (and beyond top) 0
    reference = {m: 0.025 * (5 - (m - 1)) for m in range(1, 6)}
    expected = [[0.0] + [reference[m] for m in range(1, 6)] + [0.0], [reference[5], 0, 0, reference[1], 0, 0, 0]]
    np.testing.assert_allclose(utility, expected, rtol=1e-6)
    np.testing.assert_allclose(utility[0, 1:6], [0.125, 0.1, 0.075, 0.05, 0.025], rtol=1e-6)


def test_hybrid_weights_each_term():
    point = np.array([[4.0, 3.0]], np.float32)
    pair = np.array([[0.0, 0.5]], np.float32)
    list_ = np.array([[0.1, 0.125]], np.float32)
    np.testing.assert_allclose(hybrid_utility(point, pair, list_, [1.0, 2.0, 0.5]), [[4.05, 4.0625]], rtol=1e-6)
    np.testing.assert_allclose(hybrid_utility(point, None, list_, [1.0, 2.0, 0.5]), [[4.05, 3.0625]], rtol=1e-6)
    np.testing.assert_allclose(hybrid_utility(None, pair, None, [0.2, 0.3, 0.5]), [[0.0, 0.15]], rtol=1e-6)


def test_hybrid_rejects_bad_alphas_and_no_terms():
    term = np.zeros((1, 2), np.float32)
    with pytest.raises(RecRankerError, match="rank.alphas"):
        hybrid_utility(term, term, term, [1.0, 1.0])
    with pytest.raises(RecRankerError, match="at least one"):
        hybrid_utility(None, None, None, [1.0, 1.0, 1.0])


def test_worked_example_with_the_reference_constants():
    """Four candidates A, B, C, D in retrieval order; the reference's 1:1:1 on the scaled terms."""
    candidates = np.array([[100, 101, 102, 103]])
    point = pointwise_utility(np.array([[3.0, 4.0, 4.0, 2.0]], np.float32), 0.05)  # 3.2, 4.15, 4.1, 2.05
    # (A, B): A in both orders; (C, D): Yes then Yes -> inconsistent
    pair = pairwise_utility(np.array([[[0, 1], [2, 3]]]), np.array([[[1, 0], [1, 1]]], np.int8), 0.5, 4)
    # listwise answer (top 3 here): D, C, B
    list_ = listwise_utility(np.array([[0, 3, 2, 1]]), 0.025, 3)  # 0, 0.025, 0.05, 0.075
    hybrid = hybrid_utility(point, pair, list_, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(hybrid, [[3.7, 4.175, 4.4, 2.375]], rtol=1e-6)
    orders = rank_orders(candidates, {"pointwise": point, "pairwise": pair, "listwise": list_, "hybrid": hybrid})
    np.testing.assert_array_equal(orders["pointwise"], [[101, 102, 100, 103]])
    np.testing.assert_array_equal(orders["pairwise"], [[100, 102, 103, 101]])  # ties C = D keep retrieval order
    np.testing.assert_array_equal(orders["listwise"], [[103, 102, 101, 100]])
    np.testing.assert_array_equal(orders["hybrid"], [[102, 101, 100, 103]])


def test_ties_keep_retrieval_order_and_padding_goes_last():
    candidates = np.array([[5, 6, 7, 8, -1]])
    utility = np.array([[1.0, 2.0, 1.0, 2.0, 9.0]], np.float32)
    np.testing.assert_array_equal(rank_orders(candidates, {"u": utility})["u"], [[6, 8, 5, 7, -1]])


# ------------------------------------------------------------------------------- properties


def reference_pairwise(pairs: np.ndarray, answers: np.ndarray, credit: float, k: int) -> np.ndarray:
    out = np.zeros((pairs.shape[0], k))
    for u in range(pairs.shape[0]):
        for (a, b), (ab, ba) in zip(pairs[u].tolist(), answers[u].tolist()):
            if not (0 <= a < k and 0 <= b < k):
                continue
            if (ab, ba) == (1, 0):
                out[u, a] += credit
            elif (ab, ba) == (0, 1):
                out[u, b] += credit
            else:
                out[u, a] += credit / 2
                out[u, b] += credit / 2
    return out


@st.composite
def pair_questions(draw):
    """Two users: disjoint pairs from a random permutation of K positions, some padded, random answers."""
    users_pairs, users_answers = [], []
    for _ in range(2):
        permutation = np.array(draw(st.permutations(range(K))))
        pairs = permutation.reshape(PAIRS, 2).copy()
        padded = draw(st.integers(0, PAIRS))
        pairs[PAIRS - padded:] = -1
        answers = np.array(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=2 * PAIRS, max_size=2 * PAIRS)))
        users_pairs.append(pairs)
        users_answers.append(answers.reshape(PAIRS, 2))
    return np.stack(users_pairs), np.stack(users_answers).astype(np.int8)


@FEW_EXAMPLES
@given(pair_questions(), st.permutations(range(K)))
def test_pairwise_matches_reference_conserves_credit_and_follows_relabelling(questions, relabel):
    pairs, answers = questions
    credit = 0.5
    utility = np.asarray(pairwise_utility(pairs, answers, credit, K))
    np.testing.assert_allclose(utility, reference_pairwise(pairs, answers, credit, K), atol=1e-7)
    # every real pair hands out exactly `credit` in total
    real_pairs = (pairs[..., 0] >= 0).sum(axis=1)
    np.testing.assert_allclose(utility.sum(axis=1), credit * real_pairs, rtol=1e-6)
    # moving candidate j to position relabel[j] moves its utility with it
    relabel = np.array(relabel)
    moved_pairs = np.where(pairs >= 0, relabel[np.maximum(pairs, 0)], -1)
    moved = np.asarray(pairwise_utility(moved_pairs, answers, credit, K))
    np.testing.assert_allclose(moved[:, relabel], utility, atol=1e-7)


@FEW_EXAMPLES
@given(st.floats(-10, 10, allow_nan=False, width=32), st.permutations(range(K)))
def test_equal_utilities_keep_the_retrieval_order(value, items):
    candidates = np.array([items, items[::-1]])
    utility = np.full((2, K), value, np.float32)
    for order in rank_orders(candidates, {"a": utility, "b": pointwise_utility(utility, 0.0)}).values():
        np.testing.assert_array_equal(order, candidates)


@FEW_EXAMPLES
@given(st.lists(st.integers(1, 5), min_size=K, max_size=K), st.permutations(range(K)),
       st.permutations(range(1, K + 1)))
def test_orders_are_sorted_permutations(ratings, items, answer_positions):
    candidates = np.array([items])
    positions = np.where(np.array([answer_positions]) <= 5, np.array([answer_positions]), 0)
    point = pointwise_utility(np.array([ratings], np.float32), 0.05)
    list_ = listwise_utility(positions, 0.025, 5)
    hybrid = np.asarray(hybrid_utility(point, None, list_, [1.0, 1.0, 1.0]))
    order = np.asarray(rank_orders(candidates, {"hybrid": hybrid})["hybrid"])
    assert sorted(order[0].tolist()) == sorted(items)
    utility_by_item = dict(zip(items, hybrid[0].tolist()))
    sorted_utilities = [utility_by_item[i] for i in order[0].tolist()]
    assert sorted_utilities == sorted(sorted_utilities, reverse=True)
    # the retrieval term makes pointwise utilities distinct, so the pointwise order is fully determined
    point_order = np.asarray(rank_orders(candidates, {"p": point})["p"])[0]
    expected = sorted(range(K), key=lambda r: (-ratings[r], r))
    np.testing.assert_array_equal(point_order, candidates[0, expected])


# ----------------------------------------------------------------------------- tuned hybrid weights


def ndcg_at(order: np.ndarray, target: np.ndarray, k: int) -> float:
    """Mean NDCG@k of one held-out item per user, written out here."""
    total = 0.0
    for row, item in zip(order, target):
        where = np.flatnonzero(row[:k] == item)
        total += 1.0 / np.log2(where[0] + 2) if len(where) else 0.0
    return total / len(target)


def test_tuned_weights_are_the_best_of_the_grid_on_the_data_given():
    rng = np.random.default_rng(0)
    users = 60
    cand = np.tile(np.arange(K), (users, 1))
    target = rng.integers(0, K, users)
    informative = rng.normal(size=(users, K)).astype(np.float32)
    informative[np.arange(users), target] += 1.5  # points at the target
    misleading = rng.normal(size=(users, K)).astype(np.float32)
    misleading[np.arange(users), target] -= 1.5  # points away from it
    tasks = {"pointwise": rng.normal(size=(users, K)).astype(np.float32) * 0.1, "pairwise": informative,
             "listwise": misleading}
    chosen = tune_alphas(tasks, cand, target, 3, prefer=[1.0, 1.0, 1.0])
    score = {}
    for alphas in itertools.product(ALPHA_GRID, repeat=3):
        if any(alphas):
            utility = sum(a * tasks[n] for a, n in zip(alphas, ("pointwise", "pairwise", "listwise")))
            score[alphas] = ndcg_at(np.argsort(-utility, axis=1, kind="stable"), target, 3)
    assert score[tuple(chosen)] == pytest.approx(max(score.values()))
    assert chosen[1] > 0 and chosen[2] == 0.0  # the informative task counts, the misleading one not
    assert score[tuple(chosen)] > score[(1.0, 1.0, 1.0)]


def test_tuning_ties_go_to_the_preferred_weights_and_unscored_tasks_stay_zero():
    cand = np.tile(np.arange(K), (4, 1))
    target = np.array([0, 1, 2, 3])
    flat = np.zeros((4, K), np.float32)  # every weighting keeps the retrieval order
    assert tune_alphas({"pointwise": flat, "pairwise": flat, "listwise": flat}, cand, target, 3, [1.0, 1.0, 1.0]) == [
        1.0, 1.0, 1.0]
    assert tune_alphas({"pointwise": flat, "pairwise": flat, "listwise": flat}, cand, target, 3, [0.5, 0.0, 2.0]) == [
        0.5, 0.0, 2.0]
    assert tune_alphas({"listwise": flat}, cand, target, 3, [1.0, 1.0, 1.0]) == [0.0, 0.0, 1.0]
    with pytest.raises(RecRankerError, match="needs at least one of the pointwise, pairwise, listwise"):
        tune_alphas({}, cand, target, 3, [1.0, 1.0, 1.0])
