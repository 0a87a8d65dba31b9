"""Each task's per-prompt answers placed into per-user, per-candidate arrays (candidates in
retrieval order), the inputs of the hybrid's utilities. Pure functions: records in, arrays out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def candidate_matrix(candidates: Sequence[Sequence[int]], n_users: int) -> np.ndarray:
    """Each user's candidate item indices in retrieval order, [n_users, k] padded with -1."""
    k = max(len(c) for c in candidates)
    cand = np.full((n_users, k), -1, np.int32)
    for u, c in enumerate(candidates):
        cand[u, : len(c)] = c
    return cand


def scored_users(cand: np.ndarray, target: np.ndarray, only_hits: bool) -> np.ndarray:
    """The users the LLM scores: those whose held-out item is a candidate (only_hits), or all
    users with candidates; never a user without a held-out item (target -1), whom no metric counts."""
    has_target = target >= 0
    hit = ((cand == target[:, None]) & has_target[:, None]).any(axis=1)
    return np.flatnonzero(hit if only_hits else (cand >= 0).any(axis=1) & has_target)


def candidate_columns(cand: np.ndarray, users: Sequence[int]) -> dict[tuple[int, int], int]:
    """(user, item) -> the item's column in `cand`, for these users."""
    return {(u, int(item)): j for u in users for j, item in enumerate(cand[u]) if item >= 0}


def rating_matrix(users: Sequence[int], groups: Sequence[list[dict]], values: Sequence[np.ndarray],
                  column: dict, shape: tuple[int, int]) -> np.ndarray:
    """Expected ratings [U, k] (0 where not scored) from each user's pointwise prompts' values."""
    rating = np.zeros(shape)
    for u, g, v in zip(users, groups, values):
        for record, value in zip(g, v):
            rating[u, column[(u, record["_items"][0])]] = value
    return rating


def pair_matrices(users: Sequence[int], groups: Sequence[list[dict]], values: Sequence[np.ndarray], column: dict,
                  n_users: int, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, prefers_first) [n_users, n_pairs, 2] from each user's pairwise prompts: the
    candidate columns (a, b) of pair p as first asked, and the answers to "a over b?" (order
    0, the first prompt of pair p) and "b over a?" (order 1); -1 where not asked."""
    pairs = np.full((n_users, n_pairs, 2), -1, np.int32)
    answers = np.full((n_users, n_pairs, 2), -1, np.int8)
    for u, g, v in zip(users, groups, values):
        for record, value in zip(g, v):
            p, order = record["pair_index"], int(pairs[u, record["pair_index"], 0] >= 0)
            if order == 0:
                pairs[u, p] = [column[(u, i)] for i in record["_items"]]
            answers[u, p, order] = value
    return pairs, answers


def inconsistent_rate(pairs: np.ndarray, answers: np.ndarray) -> float | None:
    """The share of asked pairs answered the same way in both orders (None: no pair asked)."""
    both = answers[pairs[..., 0] >= 0]
    inconsistent = ((both >= 0).all(axis=1) & (both[:, 0] == both[:, 1])).tolist()
    return float(np.mean(inconsistent)) if inconsistent else None


def place_matrix(users: Sequence[int], groups: Sequence[list[dict]], values: Sequence[np.ndarray], column: dict,
                 shape: tuple[int, int]) -> np.ndarray:
    """1-based listwise places [U, k] (0: not placed) from each user's listwise prompt's values."""
    places = np.zeros(shape, np.int32)
    for u, g, v in zip(users, groups, values):
        for item, place in zip(g[0]["_items"], v):
            places[u, column[(u, item)]] = place
    return places


def answer_arrays(scored: dict[str, tuple[list, list, list]], column: dict, n_users: int, k: int,
                  n_pairs: int) -> dict[str, np.ndarray]:
    """expected_rating, pairs, prefers_first and list_positions of every user from the scored
    tasks' (users, prompt groups, per-user values); a task not scored leaves its defaults."""
    none = ([], [], [])
    pairs, prefers = pair_matrices(*scored.get("pairwise", none), column, n_users, n_pairs)
    return {"expected_rating": rating_matrix(*scored.get("pointwise", none), column, (n_users, k)),
            "pairs": pairs, "prefers_first": prefers,
            "list_positions": place_matrix(*scored.get("listwise", none), column, (n_users, k))}
