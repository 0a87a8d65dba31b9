"""The retrieval stage of a run: train every configured model on the split, evaluate them,
and write what later stages need into runs/<name>/retrieval/.

Outputs: metrics.json (model -> split -> metric), candidates.csv (test) and
candidates_valid.csv (user_id, rank, item_id, score) of the backbone, the planted
evaluation's candidates_planted.csv and candidates_planted_valid.csv and the sampled
evaluation's candidates_sampled.csv and candidates_sampled_valid.csv (same columns),
<model>/params (Orbax) and <model>/embeddings.npz, explicit_mf.npz (the rating
model behind the pointwise hint), history.json (validation curves).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from recranker_jax.config import Config
from recranker_jax.data.split import SplitData, load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import make_mesh
from recranker_jax.retrieval.evaluate import Scorer, evaluate, exclusions, top_k
from recranker_jax.retrieval.backbones import BACKBONES, Context, Fitted
from recranker_jax.run import SPLITS, RetrievalFolder, write_candidates, write_embeddings, write_json


def in_score_order(items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's (items, scores) [users, k] sorted by score, highest first; ties keep the
    column order (so an item appended last stays last among equals)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(scores, order, axis=1)


def planted_candidates(scorer: Scorer, data: SplitData, split: str, k: int,
                       batch_users: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The planted evaluation's candidates (items, scores), [users, k]: the split's held-out
    item plus the backbone's top k-1 other items, masked as for the retrieved candidates of
    that split (`exclusions`), all in backbone score order (a tie puts the held-out item last).

    The held-out item keeps its rank when it is among the top k-1 (the set is then the top k)
    and is last otherwise, so the backbone order's HR@j and NDCG@j for j < k equal the
    retrieved candidates'."""
    target = (data.test_item if split == "test" else data.valid_item).astype(np.int32)
    others = np.concatenate([exclusions(data, split), target[:, None]], axis=1)
    if k > 1:
        items, scores = top_k(scorer, others, k - 1, batch_users)
    else:
        items, scores = np.zeros((data.n_users, 0), np.int32), np.zeros((data.n_users, 0), np.float32)
    target_scores = np.einsum("ud,ud->u", scorer.user_factors, scorer.item_factors[target])
    items = np.concatenate([items, target[:, None]], axis=1)
    scores = np.concatenate([scores, target_scores[:, None].astype(scores.dtype)], axis=1)
    return in_score_order(items, scores)


def sampled_candidates(scorer: Scorer, data: SplitData, split: str, k: int, seed: int,
                       batch_users: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The sampled evaluation's candidates (items, scores), [users, k]: the split's held-out item
    plus k-1 items drawn uniformly, without replacement, from those the user never rated in any
    split (so no negative is a later like), all in backbone score order (a tie puts the
    held-out item last). The classic 1 + N sampled-negatives protocol at N = k-1: unlike the
    planted set, the backbone order puts the held-out item wherever its score falls."""
    target = (data.test_item if split == "test" else data.valid_item).astype(np.int32)
    rng = np.random.default_rng([seed, ("valid", "test").index(split)])
    negatives = np.zeros((data.n_users, k - 1), np.int32)
    for first in range(0, data.n_users, batch_users):  # [batch, items] at a time
        users = np.arange(first, min(first + batch_users, data.n_users))
        rated = np.zeros((len(users), data.n_items), bool)
        here = (data.train_user >= users[0]) & (data.train_user <= users[-1])
        rated[data.train_user[here] - users[0], data.train_item[here]] = True
        rated[np.arange(len(users)), data.valid_item[users]] = True
        rated[np.arange(len(users)), data.test_item[users]] = True
        if (short := np.flatnonzero((~rated).sum(axis=1) < k - 1)).size:
            user = users[short[0]]
            raise RecRankerError(f"user {data.user_ids[user]} has rated all but {int((~rated[short[0]]).sum())} of "
                                 f"the {data.n_items} items: too few to draw {k - 1} sampled candidates")
        # k-1 distinct unrated items: those with the smallest of i.i.d. uniform keys.
        keys = np.where(rated, np.inf, rng.random(rated.shape))
        negatives[users] = np.argsort(keys, axis=1, kind="stable")[:, : k - 1]
    items = np.concatenate([negatives, target[:, None]], axis=1)
    scores = np.einsum("ud,ukd->uk", scorer.user_factors, scorer.item_factors[items]).astype(np.float32)
    return in_score_order(items, scores)


# The embedding tables of each built-in model: its dimension's config key and the rows it trains
# (users and items, or items only: SASRec reads the user from the sequence).
TABLES = {"lightgcn": ("retrieval.dim", True), "mf": ("retrieval.dim", True),
          "explicit_mf": ("retrieval.explicit_mf.dim", True), "sasrec": ("retrieval.sequence.dim", False)}


def check_tables_fit(cfg: Config, data, mesh) -> None:
    """Before training: each model's embedding tables, with Adam's two moments and the
    gradients (16 bytes per float32 entry, spread over every device), fit one device."""
    from recranker_jax.config_checks import check_fits
    from recranker_jax.hardware import memory_capacity, memory_spread

    capacity, where = memory_capacity(mesh.devices.flat[0])
    for name in cfg.retrieval.models:
        if name not in TABLES:
            continue
        key, with_users = TABLES[name]
        dim = {"retrieval.dim": cfg.retrieval.dim, "retrieval.explicit_mf.dim": cfg.retrieval.explicit_mf.dim,
               "retrieval.sequence.dim": cfg.retrieval.sequence.dim}[key]
        rows = data.n_items + (data.n_users if with_users else 0)
        check_fits(key, dim, 16 * rows / memory_spread(mesh), 0, capacity,
                   f"training {name}'s embedding tables ({rows:,} rows, with Adam's state)", where)


def build_retrieval(cfg: Config, data_dir: Path, out: Path, checkpoint_root: Path, progress: bool = True) -> dict:
    """Train, evaluate and export every model of cfg.retrieval.models; returns metrics.json's content."""
    retrieval, folder = cfg.retrieval, RetrievalFolder(out)
    data = load_split(data_dir)
    if retrieval.candidates > data.n_items:
        raise RecRankerError(
            f"retrieval.candidates={retrieval.candidates} is larger than the catalogue ({data.n_items} items)"
        )
    exclusions(data, "test")  # fails early, with the user's id, if someone rated the whole catalogue
    mesh = make_mesh(cfg.mesh)
    check_tables_fit(cfg, data, mesh)
    metrics: dict[str, dict] = {}
    history: dict[str, list] = {}
    fitted: dict[str, Fitted] = {}
    for name in retrieval.models:
        started = time.time()
        folder.model(name).mkdir(parents=True, exist_ok=True)
        model = BACKBONES[name]
        fitted[name] = result = model.fit(Context(data, cfg, mesh, checkpoint_root / name, folder, progress))
        entry: dict = {"stats": result.stats} if result.stats else {}
        if result.params is not None:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save((folder.model(name) / "params").resolve(), result.params)
            checkpointer.wait_until_finished()
            history[name] = result.history
            entry.update(best_epoch=result.best_epoch, epochs_run=result.history[-1]["epoch"] if result.history else 0)
        if model.ranks:  # its factors score (user, item) pairs for the hints and cluster sampling (training data only)
            write_embeddings(folder.embeddings(name), result.scorers["valid"].user_factors,
                             result.scorers["valid"].item_factors)
        for split in ("valid", "test"):
            entry[split] = {**evaluate(result.scorers[split], data, split, retrieval.eval_batch_users),
                            **result.metrics.get(split, {})}
        entry["seconds"] = round(time.time() - started, 2)
        metrics[name] = entry

    backbone = fitted[retrieval.backbone].scorers
    for split in SPLITS:
        items, scores = top_k(backbone[split], exclusions(data, split), retrieval.candidates, retrieval.eval_batch_users)
        write_candidates(folder.candidates(split), data, items, scores)
        items, scores = planted_candidates(backbone[split], data, split, retrieval.candidates, retrieval.eval_batch_users)
        write_candidates(folder.planted(split), data, items, scores)
        items, scores = sampled_candidates(backbone[split], data, split, retrieval.candidates, cfg.run.seed,
                                           retrieval.eval_batch_users)
        write_candidates(folder.sampled(split), data, items, scores)
    result_json = {"backbone": retrieval.backbone, "candidates": retrieval.candidates, "models": metrics}
    write_json(folder.metrics, result_json)
    write_json(folder.history, history)
    return result_json


TABLE_COLUMNS = ("recall@10", "ndcg@10", "hr@10", "mrr@10", "recall@20", "ndcg@20", "protocol_hr@3", "protocol_ndcg@3", "protocol_hr@5", "protocol_ndcg@5")


def format_table(result: dict, split: str = "test") -> str:
    """A plain-text table of the chosen split's metrics, one row per model."""
    header = f"{'model':<12}" + "".join(f"{c:>16}" for c in TABLE_COLUMNS)
    rows = [header]
    for name, entry in result["models"].items():
        rows.append(f"{name:<12}" + "".join(f"{entry[split][c]:>16.4f}" for c in TABLE_COLUMNS))
    return "\n".join(rows)
