"""Adaptive user sampling: frequencies, cluster quotas, repetition penalty, determinism, errors.

Statistical checks use a fixed seed and a chi-square goodness-of-fit test at
ALPHA = 1e-3: a correct sampler fails with probability 1e-3 per fresh seed, while
the wrong distributions these tests guard against give p-values far below it.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from recranker_jax.config import SamplingConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.sampling import SampledUsers, cluster_quotas, penalty_weights, sample_users

ALPHA = 1e-3


def config(**changes) -> SamplingConfig:
    return dataclasses.replace(SamplingConfig(), **changes)


def blob_embeddings(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs (centres 50 apart, noise 0.1): embeddings and true cluster ids."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    centres = 50.0 * np.eye(len(sizes))
    return centres[truth] + 0.1 * rng.standard_normal((truth.size, len(sizes))), truth


def half_up(numerator: int, denominator: int) -> int:
    """Reference rounding of numerator / denominator with exact rationals, halves upwards."""
    return math.floor(Fraction(numerator, denominator) + Fraction(1, 2))


# ----------------------------------------------------------------------------- importance


def test_importance_frequencies_follow_log_likes():
    like_counts = np.array([0, 1] + [2**k for k in range(1, 11)])  # ln(2^k) = k ln 2 -> p = k / 55
    n = 100_000
    drawn = sample_users(config(strategy="importance", size=n), like_counts, None, seed=3)
    counts = np.bincount(drawn.users, minlength=like_counts.size)
    assert drawn.users.shape == (n,) and set(drawn.source) == {"importance"}
    assert counts[0] == 0 and counts[1] == 0  # weight ln(max(0,1)) = ln 1 = 0: never drawn
    expected = n * np.arange(1, 11) / 55.0
    assert stats.chisquare(counts[2:], expected).pvalue > ALPHA
    # Power check: the same test clearly rejects uniform draws over these users.
    uniform = np.bincount(np.random.default_rng(3).integers(2, 12, size=n), minlength=12)[2:]
    assert stats.chisquare(uniform, expected).pvalue < ALPHA


def test_importance_needs_a_user_with_two_likes():
    with pytest.raises(RecRankerError, match="sampling.strategy"):
        sample_users(config(strategy="importance", size=10), np.array([0, 1, 1, 0]), None, seed=0)


# ----------------------------------------------------------------------------- cluster


CLUSTER_SIZES = [5, 13, 22, 40, 7, 13]  # |U| = 100


def test_cluster_quotas_are_rounded_shares_exactly():
    embeddings, truth = blob_embeddings(CLUSTER_SIZES)
    size = 1234
    drawn = sample_users(config(strategy="cluster", size=size, clusters=6), np.full(100, 5), embeddings, seed=1)
    expected = [half_up(s * size, 100) for s in CLUSTER_SIZES]  # 61.7, 160.42, 271.48, 493.6, 86.38, 160.42
    assert expected == [62, 160, 271, 494, 86, 160]
    assert np.bincount(truth[drawn.users], minlength=6).tolist() == expected
    # Documented: no fix-up, the total is the sum of the rounded quotas (1233 here, not 1234).
    assert len(drawn) == sum(expected) == 1233
    assert set(drawn.source) == {"cluster"}


def test_cluster_draws_are_uniform_inside_each_cluster():
    embeddings, truth = blob_embeddings(CLUSTER_SIZES, seed=4)
    size = 60_000
    drawn = sample_users(config(strategy="cluster", size=size, clusters=6), np.full(100, 5), embeddings, seed=2)
    counts = np.bincount(drawn.users, minlength=100)
    quotas = np.array([half_up(s * size, 100) for s in CLUSTER_SIZES])
    # Within cluster c the counts are multinomial(quota_c, uniform over |c|): summing the per-cluster
    # chi-square statistics gives a chi-square with sum(|c| - 1) degrees of freedom.
    expected = (quotas / np.array(CLUSTER_SIZES))[truth]
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(statistic, df=100 - len(CLUSTER_SIZES)) > ALPHA


def test_cluster_quota_rounding_is_half_up():
    assert cluster_quotas(np.array([1, 3]), 2).tolist() == [1, 2]  # 0.5 -> 1, 1.5 -> 2
    assert cluster_quotas(np.array([1, 1, 2]), 2).tolist() == [1, 1, 1]  # total 3 for a request of 2
    assert cluster_quotas(np.array([3, 7]), 10).tolist() == [3, 7]


# ----------------------------------------------------------------------------- repetition penalty


def test_penalty_weights_per_entry():
    weights = penalty_weights(np.array([3, 3, 3, 7, 9, 9]), 0.5)
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.25, 1.0, 0.5, 0.5])
    # A user repeated so often that 0.95^(c-1) underflows still gets a usable (proportional) weight.
    heavy = penalty_weights(np.full(20_000, 5), 0.95)
    assert np.all(heavy == 1.0)


def deterministic_pool_run(penalty: float, size: int) -> SampledUsers:
    """A population whose adaptive pool is known exactly.

    Only user 0 has more than one like, so all round(fraction * size) = 100 importance draws are
    user 0; 10 users on the corners of a simplex with 10 clusters make every cluster a singleton,
    so each user gets exactly 100 / 10 = 10 cluster draws. Pool: user 0 x 110, users 1..9 x 10.
    """
    like_counts = np.array([1_000_000] + [1] * 9)
    embeddings = 10.0 * np.eye(10)
    cfg = config(strategy="adaptive", size=size, fraction=100 / size, clusters=10, penalty=penalty)
    return sample_users(cfg, like_counts, embeddings, seed=7)


def expected_user_shares(occurrences: np.ndarray, penalty: float) -> np.ndarray:
    """Share of each user after the redraw: c entries of weight penalty^(c-1) each, normalised."""
    mass = occurrences * penalty ** (occurrences - 1.0)
    return mass / mass.sum()


@pytest.mark.parametrize("penalty", [0.95, 1.0])
def test_penalty_share_matches_exact_expectation(penalty):
    size = 200_000
    drawn = deterministic_pool_run(penalty, size)
    assert len(drawn) == size
    occurrences = np.array([110.0] + [10.0] * 9)
    shares = expected_user_shares(occurrences, penalty)  # user 0: ~0.0072 at 0.95, 0.55 at 1.0
    counts = np.bincount(drawn.users, minlength=10)
    assert stats.chisquare(counts, size * shares).pvalue > ALPHA
    # Source labels: importance entries are all user 0; 100 of user 0's 110 pool entries came from it.
    assert np.all(drawn.users[drawn.source == "importance"] == 0)
    from_importance = int(np.sum(drawn.source == "importance"))
    assert stats.binomtest(from_importance, int(counts[0]), 100 / 110).pvalue > ALPHA


def test_penalty_lowers_share_of_repeated_user():
    size = 20_000
    penalised = deterministic_pool_run(0.95, size)
    unpenalised = deterministic_pool_run(1.0, size)
    share_penalised = float(np.mean(penalised.users == 0))
    share_unpenalised = float(np.mean(unpenalised.users == 0))
    # Expected 0.0072 vs 0.55; binomial sd at n = 20000 is <= 0.0036, so the gap is > 100 sd.
    assert share_penalised < 0.02 < 0.5 < share_unpenalised


# ----------------------------------------------------------------------------- determinism, labels


def random_population(n_users: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    like_counts = rng.integers(0, 30, size=n_users)
    embeddings, _ = blob_embeddings([20, 25, 15], seed=12)
    return like_counts, np.hstack([embeddings, rng.standard_normal((n_users, 2))])


@pytest.mark.parametrize("strategy", ["uniform", "importance", "cluster", "adaptive"])
def test_same_seed_same_draws_and_different_seed_differs(strategy):
    like_counts, embeddings = random_population()
    cfg = config(strategy=strategy, size=500, clusters=3)
    first = sample_users(cfg, like_counts, embeddings, seed=5)
    again = sample_users(cfg, like_counts, embeddings, seed=5)
    other = sample_users(cfg, like_counts, embeddings, seed=6)
    np.testing.assert_array_equal(first.users, again.users)
    np.testing.assert_array_equal(first.source, again.source)
    assert not np.array_equal(first.users, other.users)
    assert first.users.dtype == np.int64 and first.users.shape == first.source.shape
    assert first.users.min() >= 0 and first.users.max() < like_counts.size


def test_source_labels_are_consistent():
    like_counts, embeddings = random_population()
    assert set(sample_users(config(strategy="uniform", size=300), like_counts, None, 0).source) == {"uniform"}
    adaptive = sample_users(config(strategy="adaptive", size=3000, clusters=3), like_counts, embeddings, seed=0)
    assert len(adaptive) == 3000
    assert set(adaptive.source) == {"importance", "cluster"}
    # An entry labelled importance must be a user with ln-weight > 0, i.e. at least 2 likes.
    assert np.all(like_counts[adaptive.users[adaptive.source == "importance"]] >= 2)
    # Cluster entries cover users with <= 1 like too (present in this population), importance never does.
    low = like_counts[adaptive.users] <= 1
    assert low.any() and np.all(adaptive.source[low] == "cluster")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"size": 0}, "sampling.size"),
        ({"size": -5}, "sampling.size"),
        ({"fraction": 0.0}, "sampling.fraction"),
        ({"fraction": 1.5}, "sampling.fraction"),
        ({"fraction": float("nan")}, "sampling.fraction"),
        ({"size": 10, "fraction": 0.01}, "sampling.fraction"),  # round(0.1) = 0 draws per half
        ({"clusters": 0}, "sampling.clusters"),
        ({"clusters": 61}, "sampling.clusters"),  # more clusters than the 60 users
        ({"penalty": 0.0}, "sampling.penalty"),
        ({"penalty": 1.01}, "sampling.penalty"),
        ({"strategy": "stratified"}, "sampling.strategy"),
    ],
)
def test_bad_config_values_raise_one_line_errors(changes, key):
    like_counts, embeddings = random_population()
    with pytest.raises(RecRankerError, match=key) as caught:
        sample_users(config(**changes), like_counts, embeddings, seed=0)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("strategy", ["cluster", "adaptive"])
def test_cluster_strategies_need_embeddings(strategy):
    like_counts, _ = random_population()
    with pytest.raises(RecRankerError, match="sampling.strategy.*embeddings"):
        sample_users(config(strategy=strategy, clusters=3), like_counts, None, seed=0)


def test_embedding_rows_must_match_users():
    like_counts, embeddings = random_population()
    with pytest.raises(RecRankerError, match="user_embeddings"):
        sample_users(config(clusters=3), like_counts, embeddings[:-1], seed=0)
