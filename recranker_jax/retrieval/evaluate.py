"""Full-catalogue ranking: masked top-k, ranking metrics and the candidate lists.

Every retrieval model is reduced to user and item factor tables whose dot
products order the catalogue (popularity and explicit MF included), so one
jitted, user-batched path serves all of them. Items the user rated in training
are masked; for the test split the validation item is masked too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from recranker_jax.data.split import SplitData
from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import mean_metrics, protocol_metrics, ranking_metrics, top_k_items

FULL_KS = (10, 20)
PROTOCOL_KS = (3, 5)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """score(u, i) = user_factors[u] . item_factors[i] over the real (unpadded) tables."""

    user_factors: np.ndarray
    item_factors: np.ndarray


def exclusions(data: SplitData, split: str) -> np.ndarray:
    """[U, E] item indices to mask per user (padded with -1): training items, plus the
    validation item when ranking for the test split."""
    if split not in ("valid", "test"):
        raise ValueError(split)
    users, items = data.train_user, data.train_item
    if split == "test":
        users = np.concatenate([users, np.arange(data.n_users, dtype=np.int32)])
        items = np.concatenate([items, data.valid_item])
    keys = np.unique(users.astype(np.int64) * data.n_items + items)
    users, items = keys // data.n_items, keys % data.n_items
    counts = np.bincount(users, minlength=data.n_users)
    full = np.flatnonzero(counts >= data.n_items)
    if len(full):
        raise RecRankerError(
            f"user {data.user_ids[full[0]]} has rated every one of the {data.n_items} items in training: "
            "nothing is left to rank for it"
        )
    width = max(int(counts.max()), 1)
    table = np.full((data.n_users, width), -1, np.int32)
    slot = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[users, slot] = items
    return table


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_batch(user_factors, item_factors, exclude, k):
    return top_k_items(user_factors @ item_factors.T, k, exclude)


def top_k(scorer: Scorer, exclude: np.ndarray, k: int, batch_users: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (items [U, k], scores [U, k]) for every user, computed `batch_users` at a time."""
    n_items = scorer.item_factors.shape[0]
    if k > n_items:
        raise RecRankerError(f"retrieval.candidates / k={k} is larger than the catalogue ({n_items} items)")
    n_users = scorer.user_factors.shape[0]
    items_out, scores_out = [], []
    item_factors = jnp.asarray(scorer.item_factors)
    for start in range(0, n_users, batch_users):
        stop = min(start + batch_users, n_users)
        # Pad the last batch to a fixed shape so it reuses the compiled function.
        rows = np.arange(start, start + batch_users).clip(max=n_users - 1) if n_users > batch_users else np.arange(start, stop)
        items, scores = _top_k_batch(jnp.asarray(scorer.user_factors[rows]), item_factors, jnp.asarray(exclude[rows]), k)
        items_out.append(np.asarray(items)[: stop - start])
        scores_out.append(np.asarray(scores)[: stop - start])
    return np.concatenate(items_out), np.concatenate(scores_out)


def evaluate(scorer: Scorer, data: SplitData, split: str, batch_users: int = 1024) -> dict[str, float]:
    """Recall / NDCG / HR / Precision / MRR at 10 and 20, and the RecRanker-protocol HR / NDCG
    at 3 and 5 of the model's own top-10, on the validation or test item of every user."""
    target = data.valid_item if split == "valid" else data.test_item
    ranked, _ = top_k(scorer, exclusions(data, split), max(FULL_KS), batch_users)
    full = ranking_metrics(jnp.asarray(ranked), jnp.asarray(target[:, None]), FULL_KS)
    protocol = protocol_metrics(jnp.asarray(ranked[:, :10]), jnp.asarray(target), PROTOCOL_KS)
    metrics = mean_metrics(full, full["valid"])
    metrics.update({f"protocol_{k}": v for k, v in mean_metrics(protocol, protocol["valid"]).items()})
    return metrics
