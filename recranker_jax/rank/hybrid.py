"""RecRanker's utilities: each task's answers become a score per candidate, and the hybrid
sums them; `rank_orders` sorts the backbone's candidates by each utility (ties keep retrieval
order). Pure jitted functions over [users, k] arrays, candidates in retrieval order.
`tune_alphas` picks the hybrid's weights on held-out data (the paper's alphas are
hyper-parameters)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import protocol_metrics, reorder


@jax.jit
def pointwise_utility(expected_rating: jax.Array, retrieval_weight: float) -> jax.Array:
    """U_point = P(c) + retrieval_weight * (k - r) for the candidate at 0-based retrieval rank r.

    expected_rating: [U, k] predicted ratings; the retrieval term breaks ties in favour of
    the backbone's order (0.05 in the reference).
    """
    k = expected_rating.shape[1]
    ranks = jnp.arange(k, dtype=jnp.float32)
    return expected_rating.astype(jnp.float32) + retrieval_weight * (k - ranks)[None, :]


@functools.partial(jax.jit, static_argnames=("k",))
def pairwise_utility(pairs: jax.Array, prefers_first: jax.Array, credit: float, k: int) -> jax.Array:
    """U_pair from disjoint candidate pairs, each asked in both orders.

    pairs: [U, P, 2] int positions (0..k-1) (a, b) of each pair, as asked first; rows padded
      with -1 (a pair with any -1, or a position outside 0..k-1, is ignored).
    prefers_first: [U, P, 2] int answers to order 0 = "a over b?" and order 1 = "b over a?":
      1 = Yes (prefers the first-named item), 0 = No, anything else (-1) = unreadable.
    A consistent preference (a: Yes then No; b: No then Yes) gives the preferred item
    `credit`; an inconsistent or unreadable pair gives both `credit / 2`. Candidates in no
    pair get 0. Returns [U, k] float32.
    """
    first, second = pairs[..., 0], pairs[..., 1]
    answer_ab, answer_ba = prefers_first[..., 0], prefers_first[..., 1]
    readable = ((answer_ab == 0) | (answer_ab == 1)) & ((answer_ba == 0) | (answer_ba == 1))
    first_preferred = readable & (answer_ab == 1) & (answer_ba == 0)
    second_preferred = readable & (answer_ab == 0) & (answer_ba == 1)
    credit = jnp.asarray(credit, jnp.float32)
    half = credit / 2.0
    first_credit = jnp.where(first_preferred, credit, jnp.where(second_preferred, 0.0, half))
    second_credit = jnp.where(second_preferred, credit, jnp.where(first_preferred, 0.0, half))
    in_range = (first >= 0) & (first < k) & (second >= 0) & (second < k)
    first_credit = jnp.where(in_range, first_credit, 0.0)
    second_credit = jnp.where(in_range, second_credit, 0.0)
    # one_hot of an out-of-range position (padding) is all zeros, so padded pairs add nothing.
    return jnp.einsum("upk,up->uk", jax.nn.one_hot(first, k, dtype=jnp.float32), first_credit) + jnp.einsum(
        "upk,up->uk", jax.nn.one_hot(second, k, dtype=jnp.float32), second_credit
    )


@jax.jit
def listwise_utility(positions: jax.Array, credit: float, top: int) -> jax.Array:
    """U_list = credit * (top + 1 - m') for a candidate the model put at 1-based position m' <= top.

    positions: [U, k] int, 0 for a candidate the answer does not mention (utility 0). With
    credit 0.025 and top 5 this is the reference's 0.025 * (5 - j) for 0-based j.
    """
    mentioned = (positions >= 1) & (positions <= top)
    return jnp.where(mentioned, credit * (top + 1 - positions).astype(jnp.float32), 0.0).astype(jnp.float32)


@jax.jit
def _weighted_sum(terms: tuple[jax.Array, ...], weights: tuple[float, ...]) -> jax.Array:
    return sum(w * t.astype(jnp.float32) for w, t in zip(weights, terms))


def hybrid_utility(
    point: jax.Array | None, pair: jax.Array | None, list_: jax.Array | None, alphas: Sequence[float]
) -> jax.Array:
    """U = alphas[0] * U_point + alphas[1] * U_pair + alphas[2] * U_list ([U, k] each).

    A term that is None (its task was not scored) is left out of the sum.
    """
    if len(alphas) != 3:
        raise RecRankerError(f"rank.alphas={list(alphas)}: expected 3 weights (pointwise, pairwise, listwise)")
    chosen = [(float(w), t) for w, t in zip(alphas, (point, pair, list_)) if t is not None]
    if not chosen:
        raise RecRankerError("hybrid ranking needs at least one of the pointwise, pairwise, listwise utilities")
    return _weighted_sum(tuple(t for _, t in chosen), tuple(w for w, _ in chosen))


def rank_orders(candidates: jax.Array, utilities: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Each method's re-ranked candidates [U, k]: highest utility first, ties in retrieval order."""
    return {name: reorder(candidates, utility) for name, utility in utilities.items()}


# Each weight's values for `tune_alphas`: 5^3 - 1 = 124 weightings (all-zero left out).
ALPHA_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def tune_alphas(tasks: Mapping[str, jax.Array], candidates: jax.Array, target: jax.Array, k: int,
                prefer: Sequence[float]) -> list[float]:
    """The hybrid weights (pointwise, pairwise, listwise) from ALPHA_GRID^3 whose hybrid order
    of `candidates` has the highest mean NDCG@k against `target`; among equals, the one nearest
    `prefer` (L1), then the first in grid order. `tasks`: the utilities of the tasks scored; a
    task not scored keeps weight 0. Meant for the validation item: the test item never decides."""
    names = ("pointwise", "pairwise", "listwise")
    free = [i for i, name in enumerate(names) if name in tasks]
    if not free:
        raise RecRankerError("tuning the hybrid weights needs at least one of the pointwise, pairwise, listwise utilities")
    best, best_key = None, None
    for values in itertools.product(ALPHA_GRID, repeat=len(free)):
        if not any(values):
            continue
        alphas = [0.0, 0.0, 0.0]
        for i, value in zip(free, values):
            alphas[i] = value
        utility = hybrid_utility(*(tasks.get(name) for name in names), alphas)
        ndcg = float(jnp.mean(protocol_metrics(reorder(candidates, utility), target, (k,))[f"ndcg@{k}"]))
        key = (-ndcg, sum(abs(a - p) for a, p in zip(alphas, prefer)))
        if best_key is None or key < best_key:
            best, best_key = alphas, key
    return best
