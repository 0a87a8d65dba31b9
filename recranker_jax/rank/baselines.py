"""Non-LLM re-rankers of the backbone's candidates, shown beside the LLM's methods as controls
(`rank.baselines`): item-to-item transitions among training likes, another retrieval
model's scores, and a random order. Each is a utility [users, k] aligned with the candidates (retrieval order)
that `hybrid.rank_orders` sorts like the LLM's utilities. Pure NumPy; training data only."""

from __future__ import annotations

import numpy as np

TRANSITION_WINDOW = 5  # (a, b) counts when b is among the next 5 training likes after a
TRANSITION_HISTORY = 10  # a candidate's score sums the counts from the user's last 10 training likes
# U = normalised transition score + weight * (k - r). Chosen on the quickstart's validation item
# (issue 16), NDCG@3 over weights 0 .. 0.5: best at 0 and 0.001 (retrieved candidates .0358,
# planted .1015), falling with the weight (0.05: .0298 / .0690; 0.2: the backbone order). So the
# transitions rank and the backbone order only breaks their ties.
TRANSITION_RETRIEVAL_WEIGHT = 0.001


def liked_sequences(users: np.ndarray, items: np.ndarray, is_like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training likes (users, items), grouped by user in the given (time) order."""
    users, items = np.asarray(users)[is_like], np.asarray(items)[is_like]
    order = np.argsort(users, kind="stable")
    return users[order], items[order]


def transition_counts(users: np.ndarray, items: np.ndarray, n_items: int,
                      window: int = TRANSITION_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Directed transition counts from time-ordered likes grouped by user: each pair (a, b)
    with b within the next `window` likes of a in the same user's sequence counts 1.
    Returns (sorted keys a * n_items + b, counts) for `transition_scores`."""
    users, items = np.asarray(users), np.asarray(items, np.int64)
    keys = [items[:-offset] * n_items + items[offset:] for offset in range(1, window + 1) if offset < len(items)]
    same = [users[:-offset] == users[offset:] for offset in range(1, window + 1) if offset < len(items)]
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.concatenate(keys)[np.concatenate(same)], return_counts=True)


def last_items(users: np.ndarray, items: np.ndarray, n_users: int, count: int = TRANSITION_HISTORY) -> np.ndarray:
    """Each user's last `count` items of a user-grouped, time-ordered sequence, [n_users,
    count], oldest first, padded with -1 on the left."""
    users, items = np.asarray(users), np.asarray(items)
    history = np.full((n_users, count), -1, np.int64)
    if not len(users):
        return history
    ends = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1]  # each user's last row
    starts = np.r_[0, ends[:-1] + 1]
    from_end = np.repeat(ends, ends - starts + 1) - np.arange(len(users))  # 0: the user's last item
    keep = from_end < count
    history[users[keep], count - 1 - from_end[keep]] = items[keep]
    return history


def transition_scores(keys: np.ndarray, counts: np.ndarray, n_items: int, history: np.ndarray,
                      candidates: np.ndarray) -> np.ndarray:
    """Sum over a user's history items a of count(a -> c), per candidate c: [users, k]
    (padding on either side counts 0)."""
    query = history[:, :, None].astype(np.int64) * n_items + candidates[:, None, :]
    if not len(keys):
        return np.zeros(candidates.shape)
    slot = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = (keys[slot] == query) & (history[:, :, None] >= 0) & (candidates[:, None, :] >= 0)
    return np.where(found, counts[slot], 0).sum(axis=1).astype(np.float64)


def transition_utility(scores: np.ndarray, weight: float = TRANSITION_RETRIEVAL_WEIGHT) -> np.ndarray:
    """U = scores / (the user's largest score, or 1 when all are 0) + weight * (k - r), the
    pointwise utility's tie-break form over 0-based retrieval rank r."""
    k = scores.shape[1]
    largest = scores.max(axis=1, keepdims=True)
    return scores / np.where(largest > 0, largest, 1.0) + weight * (k - np.arange(k))[None, :]


def transition_baseline(users: np.ndarray, items: np.ndarray, is_like: np.ndarray, n_users: int, n_items: int,
                        candidates: np.ndarray, weight: float = TRANSITION_RETRIEVAL_WEIGHT) -> np.ndarray:
    """The transition re-ranker's utility [users, k] from training interactions (time-ordered
    per user: `SplitData.train_*`) and the candidate matrix (-1 padded)."""
    liked_users, liked_items = liked_sequences(users, items, is_like)
    keys, counts = transition_counts(liked_users, liked_items, n_items)
    history = last_items(liked_users, liked_items, n_users)
    return transition_utility(transition_scores(keys, counts, n_items, history, candidates), weight)


def random_utility(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A uniformly random order of each user's candidates (seeded): the re-ranker that knows
    nothing. Under the planted evaluation it is the fair reference, as the backbone order puts
    the planted item last whenever it is not among the backbone's top k-1."""
    return np.random.default_rng([seed, 3]).random(shape)


def factor_utility(user_factors: np.ndarray, item_factors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Another retrieval model's score user . item of each candidate, [users, k] (NaN for padding)."""
    safe = np.maximum(candidates, 0)
    scores = np.einsum("ud,ukd->uk", user_factors.astype(np.float64), item_factors[safe].astype(np.float64))
    return np.where(candidates >= 0, scores, np.nan)
