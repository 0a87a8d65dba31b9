"""Evaluation metrics: full-catalogue top-k ranking metrics and the RecRanker re-ranking protocol.

Scorers hand their [users, items] scores here; retrieval (`top_k_items`), re-ranking (`reorder`) and
metrics are pure, jitted, batched JAX functions, and the host-side helpers give means, bootstrap
intervals over users and a paired test (hybrid vs backbone) for the report.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recranker_jax.errors import RecRankerError

PADDING_ITEM = -1
"""Item id used to pad item lists (exclusions, relevant sets, rankings, candidates)."""

MASK_KEYS = frozenset({"valid", "in_candidates"})
"""Keys of a per-user metrics dict that hold boolean user masks, not metric values."""


# --------------------------------------------------------------------------------------------
# Masking and retrieval
# --------------------------------------------------------------------------------------------


@jax.jit
def mask_scores(scores: jax.Array, exclude: jax.Array) -> jax.Array:
    """Set `scores[u, exclude[u, e]]` to -inf; `exclude` is [B, E] int item ids padded with -1.

    Ids outside [0, N) (padding included) are ignored.
    """
    num_items = scores.shape[1]
    user_rows = jnp.arange(scores.shape[0])[:, None]
    # Negative indices would wrap around in JAX; send them out of bounds so mode="drop" skips them.
    item_columns = jnp.where(exclude >= 0, exclude, num_items)
    return scores.at[user_rows, item_columns].set(-jnp.inf, mode="drop")


@jax.jit
def mask_scores_dense(scores: jax.Array, exclude_mask: jax.Array) -> jax.Array:
    """Set scores to -inf where the [B, N] boolean `exclude_mask` is True."""
    return jnp.where(exclude_mask, -jnp.inf, scores)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_items(
    scores: jax.Array, k: int, exclude: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Top-k items per user after masking: (items [B, k] int32, scores [B, k]).

    `exclude` is either [B, E] int item ids padded with -1 or a dense [B, N] boolean mask.
    Ties go to the lower item index (lax.top_k's order). Slots whose score is -inf (excluded
    items, or fewer than k rankable items) get item -1 so they never count as recommendations.
    """
    if k > scores.shape[1]:
        raise RecRankerError(f"top_k_items: k={k} exceeds the number of items N={scores.shape[1]}")
    if exclude is not None:
        if exclude.dtype == jnp.bool_:
            scores = mask_scores_dense(scores, exclude)
        else:
            scores = mask_scores(scores, exclude)
    top_scores, top_items = lax.top_k(scores, k)
    top_items = jnp.where(top_scores == -jnp.inf, PADDING_ITEM, top_items).astype(jnp.int32)
    return top_items, top_scores


# --------------------------------------------------------------------------------------------
# Full ranking metrics (any number of relevant items per user)
# --------------------------------------------------------------------------------------------


def _position_discounts(length: int) -> jax.Array:
    """1 / log2(j + 2) for 0-based positions j < length."""
    return 1.0 / jnp.log2(jnp.arange(length, dtype=jnp.float32) + 2.0)


def _check_ks(ks: Sequence[int], list_length: int, function_name: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise RecRankerError(f"{function_name}: ks is empty; give at least one cutoff k, e.g. ks=(5, 10)")
    for k in ks:
        if not 1 <= k <= list_length:
            raise RecRankerError(
                f"{function_name}: cutoff k={k} must be between 1 and the ranked list length K={list_length}"
            )
    return ks


def _hit_matrix(ranked_items: jax.Array, relevant: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hits [B, K] bool, number of distinct relevant items [B] int32).

    hits[u, j] is True when ranked_items[u, j] is a relevant item of user u, is not padding and
    did not already appear earlier in u's ranking (so repeated items never count twice).
    """
    sorted_relevant = jnp.sort(relevant, axis=1)  # padding (-1) goes first
    is_real = sorted_relevant >= 0
    differs_from_previous = jnp.concatenate(
        [jnp.ones_like(sorted_relevant[:, :1], dtype=bool), sorted_relevant[:, 1:] != sorted_relevant[:, :-1]],
        axis=1,
    )
    num_relevant = jnp.sum(is_real & differs_from_previous, axis=1).astype(jnp.int32)

    insert_positions = jax.vmap(jnp.searchsorted)(sorted_relevant, ranked_items)
    found_items = jnp.take_along_axis(
        sorted_relevant, jnp.minimum(insert_positions, relevant.shape[1] - 1), axis=1
    )
    in_relevant = (insert_positions < relevant.shape[1]) & (found_items == ranked_items)

    list_length = ranked_items.shape[1]
    earlier = jnp.tril(jnp.ones((list_length, list_length), dtype=bool), k=-1)  # earlier[j, i]: i < j
    repeated = jnp.any((ranked_items[:, :, None] == ranked_items[:, None, :]) & earlier, axis=2)

    hits = in_relevant & (ranked_items >= 0) & ~repeated
    return hits, num_relevant


@functools.partial(jax.jit, static_argnames=("ks",))
def _ranking_metrics(ranked_items: jax.Array, relevant: jax.Array, ks: tuple[int, ...]) -> dict[str, jax.Array]:
    hits, num_relevant = _hit_matrix(ranked_items, relevant)
    valid = num_relevant > 0
    list_length = ranked_items.shape[1]
    discounts = _position_discounts(list_length)
    hits_float = hits.astype(jnp.float32)

    cumulative_hits = jnp.cumsum(hits_float, axis=1)  # [B, K]: hits within the first j + 1
    cumulative_dcg = jnp.cumsum(hits_float * discounts, axis=1)
    ideal_dcg_by_count = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(discounts)])  # [K + 1]
    any_hit = jnp.any(hits, axis=1)
    first_hit_position = jnp.argmax(hits, axis=1)  # 0-based; meaningless when no hit

    safe_num_relevant = jnp.maximum(num_relevant, 1).astype(jnp.float32)
    per_user: dict[str, jax.Array] = {}
    for k in ks:
        hits_at_k = cumulative_hits[:, k - 1]
        ideal_dcg = ideal_dcg_by_count[jnp.minimum(num_relevant, k)]
        first_hit_within_k = any_hit & (first_hit_position < k)
        zero = jnp.zeros_like(hits_at_k)
        per_user[f"hr@{k}"] = jnp.where(valid, (hits_at_k > 0).astype(jnp.float32), zero)
        per_user[f"recall@{k}"] = jnp.where(valid, hits_at_k / safe_num_relevant, zero)
        per_user[f"precision@{k}"] = jnp.where(valid, hits_at_k / k, zero)
        per_user[f"ndcg@{k}"] = jnp.where(valid, cumulative_dcg[:, k - 1] / jnp.maximum(ideal_dcg, 1.0e-12), zero)
        per_user[f"mrr@{k}"] = jnp.where(
            valid & first_hit_within_k, 1.0 / (first_hit_position.astype(jnp.float32) + 1.0), zero
        )
    per_user["valid"] = valid
    return per_user


def ranking_metrics(
    ranked_items: jax.Array, relevant: jax.Array, ks: Sequence[int] = (10,)
) -> dict[str, jax.Array]:
    """Per-user HR, Recall, Precision, NDCG and MRR at each cutoff in `ks`.

    ranked_items: [B, K] int item ids, best first, padded with -1 (padding is never a hit).
    relevant: [B, R] int relevant item ids (e.g. test items), padded with -1.
    Returns {"hr@k", "recall@k", "precision@k", "ndcg@k", "mrr@k"} as float32 [B] arrays and
    "valid" [B] bool (users with at least one relevant item; the others get 0 everywhere and
    should be left out of means, see `mean_metrics`). Raises RecRankerError if some k > K.
    """
    checked_ks = _check_ks(ks, ranked_items.shape[1], "ranking_metrics")
    return _ranking_metrics(jnp.asarray(ranked_items), jnp.asarray(relevant), checked_ks)


# --------------------------------------------------------------------------------------------
# RecRanker protocol: one held-out item per user, re-ranked retrieval candidates
# --------------------------------------------------------------------------------------------


@jax.jit
def candidate_rank(candidates: jax.Array, target: jax.Array) -> jax.Array:
    """1-based rank [B] int32 of `target[u]` in `candidates[u]` ([B, C], best first), 0 if absent.

    Padding (-1) never matches; a target of -1 (no held-out item) is always absent.
    """
    matches = (candidates == target[:, None]) & (target[:, None] >= 0)
    return jnp.where(jnp.any(matches, axis=1), jnp.argmax(matches, axis=1) + 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("ks",))
def _protocol_metrics(candidates: jax.Array, target: jax.Array, ks: tuple[int, ...]) -> dict[str, jax.Array]:
    rank = candidate_rank(candidates, target)
    in_candidates = rank > 0
    discount = 1.0 / jnp.log2(jnp.maximum(rank, 1).astype(jnp.float32) + 1.0)
    per_user: dict[str, jax.Array] = {}
    for k in ks:
        hit = in_candidates & (rank <= k)
        per_user[f"hr@{k}"] = hit.astype(jnp.float32)
        per_user[f"ndcg@{k}"] = jnp.where(hit, discount, 0.0)
    per_user["in_candidates"] = in_candidates
    per_user["valid"] = target >= 0
    return per_user


def protocol_metrics(
    candidates: jax.Array, target: jax.Array, ks: Sequence[int] = (3, 5)
) -> dict[str, jax.Array]:
    """RecRanker's HR@k and NDCG@k of a (re-ranked) candidate list against one held-out item.

    candidates: [B, C] int item ids, best first, padded with -1; target: [B] int (-1: no item).
    A user whose target is not among the candidates is a miss (0). NDCG@k = 1 / log2(rank + 1)
    for a hit at 1-based rank <= k. Also returns "in_candidates" [B] bool (for metrics
    conditional on a retrieval hit) and "valid" [B] bool (target >= 0).
    Raises RecRankerError if some k > C.
    """
    checked_ks = _check_ks(ks, candidates.shape[1], "protocol_metrics")
    return _protocol_metrics(jnp.asarray(candidates), jnp.asarray(target), checked_ks)


@jax.jit
def reorder(candidates: jax.Array, utilities: jax.Array) -> jax.Array:
    """Sort each user's candidates by utility, highest first; ties keep the retrieval order.

    candidates, utilities: [B, C]. Padding candidates (-1) always go last, whatever their
    utility; candidates with a NaN utility go just before the padding (below -inf).
    """
    # First key: 0 for a real candidate with a number as utility, 1 for NaN utility, 2 for padding.
    group = jnp.where(candidates < 0, 2, jnp.where(jnp.isnan(utilities), 1, 0)).astype(jnp.int32)
    # Second key: -utility ascending; "+ 0.0" turns -0.0 into 0.0 so that 0.0 and -0.0 tie.
    negated_utility = jnp.where(group == 0, -utilities, 0.0) + 0.0
    positions = lax.broadcasted_iota(jnp.int32, candidates.shape, 1)
    _, _, order = lax.sort((group, negated_utility, positions), dimension=1, is_stable=True, num_keys=2)
    return jnp.take_along_axis(candidates, order, axis=1)


# --------------------------------------------------------------------------------------------
# Host-side summaries: means, bootstrap intervals, paired test
# --------------------------------------------------------------------------------------------


def mean_metrics(per_user: Mapping[str, jax.Array | np.ndarray], valid: jax.Array | np.ndarray | None = None) -> dict[str, float]:
    """Mean of each metric over the users where `valid` is True (all users if None).

    Mask entries ("valid", "in_candidates") are skipped. With no selected user every mean is NaN.
    Pass `per_user["in_candidates"]` as `valid` for metrics conditional on a retrieval hit.
    """
    selected = None if valid is None else np.asarray(valid, dtype=bool)
    means: dict[str, float] = {}
    for name, values in per_user.items():
        if name in MASK_KEYS:
            continue
        values = np.asarray(values, dtype=np.float64)
        if selected is not None:
            values = values[selected]
        means[name] = float(values.mean()) if values.size else float("nan")
    return means


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise RecRankerError(f"confidence={confidence} must be strictly between 0 and 1, e.g. 0.95")


def bootstrap_interval(
    per_user: np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users: resample users with replacement.

    Returns (low, high); (nan, nan) for an empty array. Same seed, same interval.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise RecRankerError(f"n_resamples={n_resamples} must be at least 1, e.g. 1000")
    values = np.asarray(per_user, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resample_means = np.empty(n_resamples)
    # Chunks of resamples keep memory at about 8M indices whatever the number of users.
    chunk = max(1, 8_000_000 // values.size)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        indices = rng.integers(0, values.size, size=(stop - start, values.size))
        resample_means[start:stop] = values[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resample_means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_permutation_pvalue(
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    max_exact_users: int = 16,
) -> float:
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0 over users.

    Under the null, each user's difference a_u - b_u is equally likely to have either sign.
    Users with a zero difference do not change the statistic and are dropped; if at most
    `max_exact_users` remain, all 2^m sign patterns are enumerated (exact p-value), otherwise
    `n_resamples` random patterns give p = (1 + #{|stat*| >= |stat|}) / (1 + n_resamples).
    Returns 1.0 when all differences are zero.
    """
    a_values = np.asarray(a, dtype=np.float64).ravel()
    b_values = np.asarray(b, dtype=np.float64).ravel()
    if a_values.shape != b_values.shape:
        raise RecRankerError(
            f"paired test needs one value per user in both arrays; got {a_values.size} and {b_values.size}"
        )
    if n_resamples < 1:
        raise RecRankerError(f"n_resamples={n_resamples} must be at least 1, e.g. 10000")
    differences = a_values - b_values
    differences = differences[differences != 0.0]
    if differences.size == 0:
        return 1.0
    observed = abs(differences.sum())
    tolerance = 1e-9 * np.abs(differences).sum()  # sums of the same terms in another order
    if differences.size <= max_exact_users:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=differences.size)))
        flipped = np.abs(signs @ differences)
        return float(np.mean(flipped >= observed - tolerance))
    rng = np.random.default_rng(seed)
    at_least_as_extreme = 0
    chunk = max(1, 8_000_000 // differences.size)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        signs = rng.choice((-1.0, 1.0), size=(stop - start, differences.size))
        at_least_as_extreme += int(np.sum(np.abs(signs @ differences) >= observed - tolerance))
    return float((1 + at_least_as_extreme) / (1 + n_resamples))
