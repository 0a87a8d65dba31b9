"""Host-side evaluation of re-ranked candidate orders under the RecRanker protocol: means over
all users, bootstrap intervals, metrics conditional on a retrieval hit, paired tests against
the backbone; and ranking/rankings.csv, from which anyone can recompute the metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.errors import RecRankerError
from recranker_jax.metrics import (
    bootstrap_interval,
    paired_permutation_pvalue,
    protocol_metrics,
)


def _number(value: float) -> float | None:
    """A JSON-safe float: NaN (e.g. a mean over no user) becomes null."""
    value = float(value)
    return None if math.isnan(value) else value


def _summary(per_user: Mapping[str, np.ndarray], names: Sequence[str], selected: np.ndarray,
             n_bootstrap: int, seed: int) -> tuple[dict, dict]:
    means, intervals = {}, {}
    for name in names:
        values = per_user[name][selected]
        means[name] = _number(values.mean()) if values.size else None
        intervals[name] = [_number(x) for x in bootstrap_interval(values, n_bootstrap, 0.95, seed)]
    return means, intervals


def evaluate_orders(
    orders: Mapping[str, np.ndarray],
    target: np.ndarray,
    ks: Sequence[int],
    n_bootstrap: int,
    seed: int,
    baseline: str = "backbone",
    n_permutations: int = 10000,
) -> dict:
    """Metrics of each method's order of the same candidates against one held-out item per user.

    orders: method -> [U, k] item indices, best first, -1 padded; target: [U] item index
    (users with target -1 have no held-out item and are left out). Returns a JSON-ready dict:
      {"users", "hit_users", "ks", "baseline", "bootstrap", "methods": {method: {
         "metrics": {"hr@k", "ndcg@k": mean over all users (target not among candidates = miss)},
         "intervals": {metric: [low, high]} (95% percentile bootstrap over users),
         "conditional": {"users": n with the target among the candidates, "metrics", "intervals"},
         "paired": {"ndcg@k": {"difference": mean(method - baseline), "p_value"}}  (not for the baseline)}}}
    Means over no user are null.
    """
    if baseline not in orders:
        raise RecRankerError(f"evaluate_orders: baseline {baseline!r} is not among the methods {list(orders)}")
    target = np.asarray(target)
    if target.ndim != 1:
        raise RecRankerError(f"evaluate_orders: target must be [users], got shape {target.shape}")
    base_order = np.asarray(orders[baseline])
    for name, order in orders.items():
        order = np.asarray(order)
        if order.ndim != 2 or order.shape[0] != target.shape[0] or order.shape != base_order.shape:
            raise RecRankerError(
                f"evaluate_orders: orders[{name!r}] has shape {order.shape}; expected {base_order.shape} "
                f"([users={target.shape[0]}, k]) like the baseline"
            )
        if not np.array_equal(np.sort(order, axis=1), np.sort(base_order, axis=1)):
            raise ValueError(f"evaluate_orders: orders[{name!r}] does not re-order the baseline's candidates")
    ks = tuple(int(k) for k in ks)
    names = [f"{metric}@{k}" for k in ks for metric in ("hr", "ndcg")]
    valid = target >= 0

    per_method: dict[str, dict[str, np.ndarray]] = {}
    for name, order in orders.items():
        raw = protocol_metrics(np.asarray(order), target, ks)
        per_method[name] = {key: np.asarray(value)[valid] for key, value in raw.items()}

    methods: dict[str, dict] = {}
    for name, per_user in per_method.items():
        everyone = np.ones(int(valid.sum()), dtype=bool)
        hits = per_user["in_candidates"].astype(bool)
        means, intervals = _summary(per_user, names, everyone, n_bootstrap, seed)
        hit_means, hit_intervals = _summary(per_user, names, hits, n_bootstrap, seed)
        entry = {
            "metrics": means,
            "intervals": intervals,
            "conditional": {"users": int(hits.sum()), "metrics": hit_means, "intervals": hit_intervals},
        }
        if name != baseline:
            entry["paired"] = {
                f"ndcg@{k}": {
                    "difference": _number(np.mean(per_user[f"ndcg@{k}"] - per_method[baseline][f"ndcg@{k}"]))
                    if per_user[f"ndcg@{k}"].size else None,
                    "p_value": paired_permutation_pvalue(
                        per_user[f"ndcg@{k}"], per_method[baseline][f"ndcg@{k}"], n_permutations, seed
                    ),
                }
                for k in ks
            }
        methods[name] = entry
    return {
        "users": int(valid.sum()),
        "hit_users": int(per_method[baseline]["in_candidates"].sum()),
        "ks": list(ks),
        "baseline": baseline,
        "bootstrap": int(n_bootstrap),
        "methods": methods,
    }


def write_rankings_csv(
    path: Path,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    orders: Mapping[str, np.ndarray],
    utilities: Mapping[str, np.ndarray],
    candidates: np.ndarray,
) -> None:
    """Write ranking/rankings.csv: user_id, method, position (1-based), item_id, utility.

    orders: method -> [U, k] item indices (-1 padded slots are skipped); candidates: [U, k]
    the same items in retrieval order; utilities: method -> [U, k] aligned with `candidates`
    (as the functions of rank.hybrid return them). A method without utilities (e.g. the
    backbone) gets an empty utility cell. Raw ids: user_ids [U], item_ids [n_items].
    """
    user_ids = np.asarray(user_ids)
    item_ids = np.asarray(item_ids)
    candidates = np.asarray(candidates)
    if not orders:
        raise RecRankerError("rankings.csv: no method orders to write")
    frames = []
    for method, order in orders.items():
        order = np.asarray(order)
        if order.shape != candidates.shape or order.shape[0] != user_ids.shape[0]:
            raise RecRankerError(
                f"rankings.csv: orders[{method!r}] has shape {order.shape}; expected {candidates.shape} "
                f"with one row per user ({user_ids.shape[0]})"
            )
        k = order.shape[1]
        if method in utilities:
            utility = np.asarray(utilities[method], dtype=np.float64)
            # Column of each ordered item in the retrieval-order candidates (padding maps to itself).
            matches = (order[:, :, None] == candidates[:, None, :]) & (order[:, :, None] >= 0)
            utility_by_slot = np.take_along_axis(utility, matches.argmax(axis=2), axis=1)
            shown = np.array(["" if np.isnan(u) else f"{u:.6g}" for u in utility_by_slot.ravel()], dtype=object)
        else:
            shown = np.full(order.size, "", dtype=object)
        keep = order.ravel() >= 0
        frames.append(pd.DataFrame({
            "user_index": np.repeat(np.arange(order.shape[0]), k)[keep],
            "user_id": np.repeat(user_ids, k)[keep],
            "method": method,
            "position": np.tile(np.arange(1, k + 1), order.shape[0])[keep],
            "item_id": item_ids[order.ravel()[keep]],
            "utility": shown[keep],
        }))
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values(["user_index"], kind="stable").drop(columns="user_index")
    table.to_csv(path, index=False, lineterminator="\n")
