"""RecRanker's adaptive user sampling: picks which users the training instructions are generated for.

Runs after the retrieval backbone (its user embeddings drive the clustering) and
before prompt construction; each sampled entry becomes one training instruction.

Strategies (``SamplingConfig.strategy``), all drawing with replacement:

- ``uniform``: ``size`` users uniformly at random.
- ``importance``: ``size`` users with probability proportional to ln(training likes).
- ``cluster``: k-means on the user embeddings; cluster c contributes
  round(|c| / |U| * size) users drawn uniformly inside it. The total is the sum of
  the rounded quotas, which can differ from ``size`` by at most ``clusters / 2``;
  this is deliberate (no fix-up), so the ``cluster`` ablation is exactly the
  cluster half of the adaptive pool. Draws come grouped by cluster.
- ``adaptive``: importance and cluster each draw round(fraction * size) entries;
  the two multisets are pooled, an entry whose user occurs c times in the pool
  weighs penalty^(c-1), and exactly ``size`` entries are redrawn from the pool.

Rounding is half-up everywhere (x.5 -> x+1), computed exactly in integers for
the cluster quotas. Randomness: one ``SeedSequence(seed)`` spawns independent
streams for the importance draws, k-means, the cluster draws and the redraw, so
the adaptive pool depends only on (seed, data, size, fraction, clusters) and not
on ``penalty``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from sklearn.cluster import KMeans

from recranker_jax.config import SamplingConfig
from recranker_jax.config_checks import check_sampling
from recranker_jax.errors import RecRankerError
KMEANS_N_INIT = 10


@dataclasses.dataclass(frozen=True)
class SampledUsers:
    """The sampled entries: ``users[i]`` came from the draw named by ``source[i]``.

    users: [N] int64 user indices in draw order (repeats allowed).
    source: [N] str, "uniform" | "importance" | "cluster"; for ``adaptive`` it is the
      origin of the pool entry that was redrawn.
    """

    users: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])


# ----------------------------------------------------------------------------- building blocks


def importance_weights(like_counts: np.ndarray) -> np.ndarray:
    """w_u = ln(likes_u), with users of 0 or 1 likes at weight 0 (the log is guarded)."""
    counts = np.asarray(like_counts, dtype=np.float64)
    return np.log(np.maximum(counts, 1.0))


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves upwards (the module's one rounding rule)."""
    return int(math.floor(value + 0.5))


def cluster_quotas(cluster_sizes: np.ndarray, total: int) -> np.ndarray:
    """round(|c| / |U| * total) per cluster, rounded half-up exactly in integer arithmetic."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    n_users = int(sizes.sum())
    return (2 * sizes * total + n_users) // (2 * n_users)


def cluster_labels(user_embeddings: np.ndarray, clusters: int, seed_seq: np.random.SeedSequence) -> np.ndarray:
    """K-means labels [U] of the user embeddings (random_state derived from `seed_seq`)."""
    random_state = int(seed_seq.generate_state(1)[0])
    kmeans = KMeans(n_clusters=clusters, n_init=KMEANS_N_INIT, random_state=random_state)
    return kmeans.fit_predict(np.asarray(user_embeddings, dtype=np.float64)).astype(np.int64)


def penalty_weights(pool_users: np.ndarray, penalty: float) -> np.ndarray:
    """Per pool entry: penalty^(c-1), c = occurrences of the entry's user in the pool.

    Computed in log space and scaled so the largest weight is 1, so very repeated
    users cannot underflow every weight to 0 (the result is proportional).
    """
    _, inverse, counts = np.unique(pool_users, return_inverse=True, return_counts=True)
    log_weights = (counts[inverse.reshape(-1)] - 1).astype(np.float64) * math.log(penalty)
    return np.exp(log_weights - log_weights.max())


def draw_importance(like_counts: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` users with probability proportional to ln(likes), with replacement."""
    weights = importance_weights(like_counts)
    total = weights.sum()
    if total <= 0:
        raise RecRankerError(
            "sampling.strategy: importance sampling needs a user with at least 2 training likes "
            "(weight ln(likes)), but every user has at most 1"
        )
    return rng.choice(weights.shape[0], size=count, replace=True, p=weights / total).astype(np.int64)


def draw_clusters(labels: np.ndarray, clusters: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster c contributes round(|c| / |U| * count) users, uniform inside it; grouped by cluster."""
    sizes = np.bincount(labels, minlength=clusters)
    quotas = cluster_quotas(sizes, count)
    members = np.argsort(labels, kind="stable")  # users of cluster 0, then cluster 1, ...
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cluster_of_draw = np.repeat(np.arange(clusters), quotas)
    offsets = rng.integers(0, sizes[cluster_of_draw])  # quota > 0 implies size > 0
    return members[starts[cluster_of_draw] + offsets].astype(np.int64)


def redraw_with_penalty(
    pool_users: np.ndarray, pool_source: np.ndarray, count: int, penalty: float, rng: np.random.Generator
) -> SampledUsers:
    """Redraw `count` pool entries with replacement, weights penalty^(occurrences - 1)."""
    weights = penalty_weights(pool_users, penalty)
    chosen = rng.choice(pool_users.shape[0], size=count, replace=True, p=weights / weights.sum())
    return SampledUsers(users=pool_users[chosen], source=pool_source[chosen])


# ----------------------------------------------------------------------------- entry point


def _labelled(users: np.ndarray, source: str) -> SampledUsers:
    return SampledUsers(users=users, source=np.full(users.shape[0], source, dtype="<U10"))


def _validate(cfg: SamplingConfig, like_counts: np.ndarray, user_embeddings: np.ndarray | None) -> None:
    if like_counts.ndim != 1 or like_counts.shape[0] == 0 or np.any(like_counts < 0):
        raise ValueError(f"like_counts must be a non-empty 1-D array of counts >= 0, got shape {like_counts.shape}")
    n_users = like_counts.shape[0]
    check_sampling(cfg)  # the config's own ranges (also checked when a config loads)
    if cfg.strategy == "adaptive" and round_half_up(cfg.fraction * cfg.size) < 1:
        raise RecRankerError(
            f"sampling.fraction: expected round(fraction * size) >= 1 for adaptive sampling, "
            f"got {cfg.fraction!r} * {cfg.size}"
        )
    if cfg.strategy in ("cluster", "adaptive"):
        if user_embeddings is None:
            raise RecRankerError(
                f"sampling.strategy: {cfg.strategy!r} needs the backbone's user embeddings, but none were given"
            )
        if cfg.clusters > n_users:
            raise RecRankerError(
                f"sampling.clusters: expected at most the number of users ({n_users}), got {cfg.clusters}"
            )
    if user_embeddings is not None:
        if user_embeddings.ndim != 2 or user_embeddings.shape[0] != n_users:
            raise RecRankerError(
                f"user_embeddings: expected one row per user ({n_users} rows), got shape {user_embeddings.shape}"
            )
        if not np.all(np.isfinite(user_embeddings)):
            raise RecRankerError("user_embeddings: expected finite values, found NaN or inf")


def sample_users(
    cfg: SamplingConfig, like_counts: np.ndarray, user_embeddings: np.ndarray | None, seed: int
) -> SampledUsers:
    """Sample the users to build training instructions for; deterministic given `seed`.

    like_counts: [U] training likes per user. user_embeddings: [U, d] backbone user
    embeddings (needed for ``cluster`` and ``adaptive`` only). See the module
    docstring for each strategy and the rounding rule.
    """
    like_counts = np.asarray(like_counts)
    user_embeddings = None if user_embeddings is None else np.asarray(user_embeddings)
    _validate(cfg, like_counts, user_embeddings)
    n_users = like_counts.shape[0]
    size = int(cfg.size)
    importance_ss, kmeans_ss, cluster_ss, redraw_ss = np.random.SeedSequence(seed).spawn(4)

    if cfg.strategy == "uniform":
        rng = np.random.default_rng(importance_ss)
        return _labelled(rng.integers(0, n_users, size=size, dtype=np.int64), "uniform")
    if cfg.strategy == "importance":
        return _labelled(draw_importance(like_counts, size, np.random.default_rng(importance_ss)), "importance")

    labels = cluster_labels(user_embeddings, int(cfg.clusters), kmeans_ss)
    if cfg.strategy == "cluster":
        return _labelled(draw_clusters(labels, int(cfg.clusters), size, np.random.default_rng(cluster_ss)), "cluster")

    part = round_half_up(cfg.fraction * size)
    by_importance = _labelled(draw_importance(like_counts, part, np.random.default_rng(importance_ss)), "importance")
    by_cluster = _labelled(draw_clusters(labels, int(cfg.clusters), part, np.random.default_rng(cluster_ss)), "cluster")
    pool_users = np.concatenate([by_importance.users, by_cluster.users])
    pool_source = np.concatenate([by_importance.source, by_cluster.source])
    return redraw_with_penalty(pool_users, pool_source, size, float(cfg.penalty), np.random.default_rng(redraw_ss))
