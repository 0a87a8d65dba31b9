"""The retrieval stage of a run: train every configured model on the split, evaluate them,
and write what later stages need into runs/<name>/retrieval/.

Outputs: metrics.json (model -> split -> metric), candidates.csv (test) and
candidates_valid.csv (user_id, rank, item_id, score) of the backbone,
<model>/params (Orbax) and <model>/embeddings.npz, explicit_mf.npz (the rating
model behind the pointwise hint), history.json (validation curves).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pandas as pd

from recranker_jax.config import Config
from recranker_jax.data.split import SplitData, load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import make_mesh
from recranker_jax.retrieval.evaluate import Scorer, evaluate, exclusions, top_k
from recranker_jax.retrieval.train import held_out_rmse, liked_pairs, train_bpr, train_explicit_mf

MODELS = ("lightgcn", "mf", "explicit_mf", "popularity")


def popularity_scorer(data: SplitData) -> Scorer:
    """Score = number of training likes of the item, the same for every user."""
    _, items = liked_pairs(data)
    counts = np.bincount(items, minlength=data.n_items).astype(np.float32)
    return Scorer(np.ones((data.n_users, 1), np.float32), counts[:, None])


def write_candidates(path: Path, data: SplitData, items: np.ndarray, scores: np.ndarray) -> None:
    k = items.shape[1]
    pd.DataFrame(
        {
            "user_id": np.repeat(data.user_ids, k),
            "rank": np.tile(np.arange(1, k + 1), data.n_users),
            "item_id": data.items["item_id"].to_numpy()[items.ravel()],
            "score": [f"{s:.6g}" for s in scores.ravel()],
        }
    ).to_csv(path, index=False, lineterminator="\n")


def check_config(cfg: Config) -> None:
    retrieval = cfg.retrieval
    unknown = [m for m in retrieval.models if m not in MODELS]
    if unknown:
        raise RecRankerError(f"retrieval.models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    if retrieval.backbone not in retrieval.models or retrieval.backbone == "explicit_mf":
        raise RecRankerError(
            f"retrieval.backbone={retrieval.backbone!r}: expected one of the ranking models in retrieval.models "
            f"(lightgcn, mf, popularity), got models {retrieval.models}"
        )
    for key in ("candidates", "dim", "batch_size", "epochs", "eval_every", "patience"):
        if getattr(retrieval, key) < 1:
            raise RecRankerError(f"retrieval.{key}={getattr(retrieval, key)}: expected a positive integer")


def build_retrieval(cfg: Config, data_dir: Path, out: Path, checkpoint_root: Path, progress: bool = True) -> dict:
    """Train, evaluate and export every model of cfg.retrieval.models; returns metrics.json's content."""
    check_config(cfg)
    retrieval = cfg.retrieval
    data = load_split(data_dir)
    if retrieval.candidates > data.n_items:
        raise RecRankerError(
            f"retrieval.candidates={retrieval.candidates} is larger than the catalogue ({data.n_items} items)"
        )
    exclusions(data, "test")  # fails early, with the user's id, if someone rated the whole catalogue
    mesh = make_mesh(cfg.mesh)
    metrics: dict[str, dict] = {}
    history: dict[str, list] = {}
    scorers: dict[str, Scorer] = {}
    for name in retrieval.models:
        started = time.time()
        (out / name).mkdir(parents=True, exist_ok=True)
        if name in ("lightgcn", "mf"):
            result = train_bpr(
                data, retrieval, retrieval.layers if name == "lightgcn" else 0, cfg.run.seed,
                mesh=mesh, rules=cfg.mesh.rules, checkpoint_dir=checkpoint_root / name, name=name, progress=progress,
            )
        elif name == "explicit_mf":
            model, result = train_explicit_mf(
                data, retrieval.explicit_mf, cfg.run.seed, checkpoint_dir=checkpoint_root / name, progress=progress
            )
            np.savez(
                out / "explicit_mf.npz",
                user_factors=np.asarray(model.user_factors[...]), item_factors=np.asarray(model.item_factors[...]),
                user_bias=np.asarray(model.user_bias[...]), item_bias=np.asarray(model.item_bias[...]),
                mean_rating=np.float32(model.mean_rating),
            )
        else:
            result = None
            scorers[name] = popularity_scorer(data)
        entry: dict = {}
        if result is not None:
            scorers[name] = result.scorer
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save((out / name / "params").resolve(), result.params)
            checkpointer.wait_until_finished()
            history[name] = result.history
            entry.update(best_epoch=result.best_epoch, epochs_run=result.history[-1]["epoch"] if result.history else 0)
        if name != "explicit_mf":  # a ranking model: its factors score (user, item) pairs for hints
            np.savez(out / name / "embeddings.npz", users=scorers[name].user_factors, items=scorers[name].item_factors)
        for split in ("valid", "test"):
            entry[split] = evaluate(scorers[name], data, split, retrieval.eval_batch_users)
        if name == "explicit_mf":
            for split in ("valid", "test"):
                entry[split]["rmse"] = held_out_rmse(model, data, split)
        entry["seconds"] = round(time.time() - started, 2)
        metrics[name] = entry

    backbone = scorers[retrieval.backbone]
    for split, filename in (("test", "candidates.csv"), ("valid", "candidates_valid.csv")):
        items, scores = top_k(backbone, exclusions(data, split), retrieval.candidates, retrieval.eval_batch_users)
        write_candidates(out / filename, data, items, scores)
    result_json = {"backbone": retrieval.backbone, "candidates": retrieval.candidates, "models": metrics}
    (out / "metrics.json").write_text(json.dumps(result_json, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    shutil.rmtree(checkpoint_root, ignore_errors=True)
    return result_json


TABLE_COLUMNS = ("recall@10", "ndcg@10", "hr@10", "mrr@10", "recall@20", "ndcg@20", "protocol_hr@3", "protocol_ndcg@3", "protocol_hr@5", "protocol_ndcg@5")


def format_table(result: dict, split: str = "test") -> str:
    """A plain-text table of the chosen split's metrics, one row per model."""
    header = f"{'model':<12}" + "".join(f"{c:>16}" for c in TABLE_COLUMNS)
    rows = [header]
    for name, entry in result["models"].items():
        rows.append(f"{name:<12}" + "".join(f"{entry[split][c]:>16.4f}" for c in TABLE_COLUMNS))
    return "\n".join(rows)
