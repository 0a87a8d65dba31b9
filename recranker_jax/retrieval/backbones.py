"""The conventional recommenders of the retrieval stage behind one interface, registered by
name: `retrieval.models` names them, `retrieval.backbone` picks the one whose candidates the
LLM re-ranks. A backbone is a function `fit(context) -> Fitted`: it trains on the split's
training data (validating on the validation item) and returns a scorer per split, so a
sequential model can rank the test item from the training sequence plus the validation item
and the validation item from the training sequence alone. The stage evaluates, exports and
draws candidates from what it returns; adding a model is one `@register_backbone` function,
with no edit to the stage (README: "For people extending the method").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from recranker_jax.config import Config
from recranker_jax.config_checks import register_model_name
from recranker_jax.data.split import SplitData
from recranker_jax.instruments import TENSORBOARD
from recranker_jax.retrieval.evaluate import Scorer
from recranker_jax.retrieval.train import held_out_rmse, liked_pairs, train_bpr, train_explicit_mf
from recranker_jax.run import RetrievalFolder, write_explicit_mf


@dataclasses.dataclass(frozen=True)
class Context:
    """What a backbone is fitted with: the split, the whole config (its own section in it),
    the mesh, a folder for its resumable training state, the run's retrieval folder (for
    files of its own), and whether to show progress."""

    data: SplitData
    cfg: Config
    mesh: Mesh | None
    checkpoint_dir: Path
    folder: RetrievalFolder
    progress: bool = True

    def tensorboard(self, name: str) -> Path | None:
        """The folder of backbone `name`'s TensorBoard event files (retrieval/tensorboard/<name>/),
        None when run.tensorboard is off."""
        return self.folder.path / TENSORBOARD / name if self.cfg.run.tensorboard else None


@dataclasses.dataclass
class Fitted:
    """A trained backbone: `scorers[split]` scores (user, item) pairs for ranking that split's
    held-out item (score = user_factors[u] . item_factors[i]); `params` (an nnx.State or None)
    is saved under retrieval/<name>/params; `metrics[split]` adds figures to its evaluation and
    `stats` facts about its training data (both in metrics.json)."""

    scorers: dict[str, Scorer]
    params: Any = None
    history: list[dict] = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Backbone:
    fit: Callable[[Context], Fitted]
    ranks: bool  # its scores rank items (it can be the backbone; its factors are exported)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, ranks: bool = True) -> Callable[[Callable[[Context], Fitted]], Callable]:
    """Register `fit` under `name` for `retrieval.models` (`ranks`: it may be `retrieval.backbone`)."""
    def add(fit: Callable[[Context], Fitted]) -> Callable[[Context], Fitted]:
        BACKBONES[name] = Backbone(fit, ranks)
        register_model_name(name, ranks)
        return fit
    return add


def same_for_both(scorer: Scorer) -> dict[str, Scorer]:
    """A non-sequential model ranks both held-out items with the same scores."""
    return {"valid": scorer, "test": scorer}


def _bpr(ctx: Context, layers: int, name: str) -> Fitted:
    result = train_bpr(ctx.data, ctx.cfg.retrieval, layers, ctx.cfg.run.seed, mesh=ctx.mesh, rules=ctx.cfg.mesh.rules,
                       checkpoint_dir=ctx.checkpoint_dir, name=name, progress=ctx.progress,
                       tensorboard=ctx.tensorboard(name))
    return Fitted(same_for_both(result.scorer), result.params, result.history, result.best_epoch)


@register_backbone("lightgcn")
def lightgcn(ctx: Context) -> Fitted:
    return _bpr(ctx, ctx.cfg.retrieval.layers, "lightgcn")


@register_backbone("mf")
def bpr_mf(ctx: Context) -> Fitted:
    return _bpr(ctx, 0, "mf")


@register_backbone("explicit_mf", ranks=False)
def explicit_mf(ctx: Context) -> Fitted:
    """The rating model behind the pointwise hint (also written to explicit_mf.npz)."""
    model, result = train_explicit_mf(ctx.data, ctx.cfg.retrieval.explicit_mf, ctx.cfg.run.seed,
                                      checkpoint_dir=ctx.checkpoint_dir, progress=ctx.progress,
                                      tensorboard=ctx.tensorboard("explicit_mf"))
    write_explicit_mf(ctx.folder.explicit_mf, {
        "user_factors": np.asarray(model.user_factors[...]), "item_factors": np.asarray(model.item_factors[...]),
        "user_bias": np.asarray(model.user_bias[...]), "item_bias": np.asarray(model.item_bias[...]),
        "mean_rating": np.float32(model.mean_rating)})
    return Fitted(same_for_both(result.scorer), result.params, result.history, result.best_epoch,
                  {split: {"rmse": held_out_rmse(model, ctx.data, split)} for split in ("valid", "test")})


@register_backbone("popularity")
def popularity(ctx: Context) -> Fitted:
    """Score = number of training likes of the item, the same for every user."""
    _, items = liked_pairs(ctx.data)
    counts = np.bincount(items, minlength=ctx.data.n_items).astype(np.float32)
    return Fitted(same_for_both(Scorer(np.ones((ctx.data.n_users, 1), np.float32), counts[:, None])))


@register_backbone("sasrec")
def sasrec(ctx: Context) -> Fitted:
    """SASRec on the training likes (retrieval.sequence); the test item is ranked from the
    training sequence plus the validation item, the validation item from the training one."""
    from recranker_jax.retrieval.sasrec import SASRecSettings, fit_sasrec, sasrec_scorer, scoring_sequences

    settings = SASRecSettings.of(ctx.cfg.retrieval)
    model, history = fit_sasrec(ctx.data, settings, ctx.mesh, ctx.cfg.run.seed, ctx.progress, rules=ctx.cfg.mesh.rules,
                                checkpoint_dir=ctx.checkpoint_dir, tensorboard=ctx.tensorboard("sasrec"))
    scorers = {split: sasrec_scorer(model, scoring_sequences(ctx.data, split, settings.max_len), settings.eval_batch_users)
               for split in ("valid", "test")}
    return Fitted(scorers, nnx.state(model, nnx.Param), history["records"], history["best_epoch"],
                  stats=history["stats"])
