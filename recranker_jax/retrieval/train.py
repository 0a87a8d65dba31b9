"""Training of the retrieval models: one jitted `lax.scan` per epoch, validation-based
early stopping, Orbax checkpoints that make an interrupted run resume exactly.

Host code only builds each epoch's batches (shuffling and negative sampling,
vectorised in numpy from a generator seeded by (seed, epoch), so a resumed run
sees the same batches), validates every `eval_every` epochs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from tqdm.auto import tqdm

from recranker_jax.config import ExplicitMFConfig, RetrievalConfig
from recranker_jax.data.split import SplitData
from recranker_jax.errors import RecRankerError
from recranker_jax.instruments import Scalars, memory_scalars
from recranker_jax.config_checks import check_batch
from recranker_jax.parallel import axis_size, logical_spec, place_tree
from recranker_jax.retrieval.evaluate import Scorer, evaluate
from recranker_jax.retrieval.graph import Graph, build_graph
from recranker_jax.retrieval.models import ExplicitMF, LightGCN, bpr_loss, rating_loss


@dataclasses.dataclass
class FitResult:
    """The best validation epoch's parameters, the scorer built from them and the history."""

    scorer: Scorer
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    params: Any


# ----------------------------------------------------------------------------- batches


def sample_negatives(rng: np.random.Generator, users: np.ndarray, n_items: int, positive_keys: np.ndarray) -> np.ndarray:
    """One uniform item per user, redrawn while it is one of the user's positives.

    positive_keys: sorted user * n_items + item keys of the positives.
    """
    negatives = rng.integers(0, n_items, len(users))
    rejected = np.isin(users.astype(np.int64) * n_items + negatives, positive_keys)
    while rejected.any():
        negatives[rejected] = rng.integers(0, n_items, int(rejected.sum()))
        rejected[rejected] = np.isin(users[rejected].astype(np.int64) * n_items + negatives[rejected], positive_keys)
    return negatives.astype(np.int32)


def to_batches(columns: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """[S, B] arrays plus a `weight` column that is 0 on the last batch's padding."""
    n = len(next(iter(columns.values())))
    steps = max(math.ceil(n / batch_size), 1)
    pad = steps * batch_size - n
    batches = {k: np.concatenate([v, np.zeros(pad, v.dtype)]).reshape(steps, batch_size) for k, v in columns.items()}
    batches["weight"] = (np.arange(steps * batch_size) < n).astype(np.float32).reshape(steps, batch_size)
    return batches


# ----------------------------------------------------------------------------- sharding


def padded_rows(n: int, mesh: Mesh | None, logical_name: str, rules: dict[str, list[str]]) -> int:
    """Rows of a table padded to a multiple of its shard count (padding rows stay zero)."""
    shards = axis_size(mesh, logical_name, rules) if mesh is not None else 1
    return math.ceil(n / shards) * shards


def pad_rows(table: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(table, [(0, rows - table.shape[0])] + [(0, 0)] * (table.ndim - 1))


# ----------------------------------------------------------------------------- the loop


def make_epoch_fn(graphdef: nnx.GraphDef, loss: Callable, tx: optax.GradientTransformation) -> Callable:
    """jit((params, opt_state, batches [S, B, ...]) -> (params, opt_state, mean loss)): one
    epoch of optimizer steps inside a single `lax.scan`."""

    def step(carry, batch):
        params, opt_state = carry
        value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    @jax.jit  # no buffer donation: the best epoch's params may alias the live ones
    def run_epoch(params, opt_state, batches):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.mean(losses)

    return run_epoch


def fit(
    *,
    name: str,
    model: nnx.Module,
    loss: Callable[[nnx.Module, dict[str, jax.Array]], jax.Array],
    tx: optax.GradientTransformation,
    epoch_batches: Callable[[int], dict[str, np.ndarray]],
    validate: Callable[[nnx.Module], tuple[float, dict[str, float]]],
    epochs: int,
    eval_every: int,
    patience: int,
    checkpoint_dir: Path | None,
    batch_sharding: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]] = lambda b: b,
    progress: bool = True,
    lr_key: str = "retrieval.lr",
    lr: float | None = None,
    tensorboard: Path | None = None,
) -> tuple[nnx.Module, int, float, list[dict[str, float]]]:
    """Train `model` in place with early stopping; returns (best model, best epoch, score, history).

    `validate` returns (score to maximise, metrics to log). With a checkpoint_dir,
    state is saved after every validation and the latest is restored first. A non-finite
    epoch loss stops training with a RecRankerError naming the epoch and the learning rate
    setting (`lr_key`=`lr`); the checkpoints before the epoch that gave it are kept.
    With `tensorboard` (a folder), each history record is also a TensorBoard step (its epoch):
    loss, validation metrics, the epoch's seconds and the memory (instruments.py).
    """
    scalars = Scalars(tensorboard, "retrieval")
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    run_epoch = make_epoch_fn(graphdef, loss, tx)
    state = {"params": params, "opt_state": opt_state, "best_params": params,
             "epoch": 0, "best_epoch": 0, "best_score": -np.inf, "stale": 0}
    history: list[dict[str, float]] = []
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(checkpoint_dir.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))
        if manager.latest_step() is not None:
            restored = manager.restore(
                manager.latest_step(),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
                    history=ocp.args.JsonRestore(),
                ),
            )
            state, history = dict(restored.state), list(restored.history)

    bar = tqdm(total=epochs, initial=int(state["epoch"]), desc=name, disable=not progress, leave=False)
    params, opt_state = state["params"], state["opt_state"]
    while int(state["epoch"]) < epochs and int(state["stale"]) < patience:
        epoch = int(state["epoch"])
        started = time.perf_counter()
        params, opt_state, mean_loss = run_epoch(params, opt_state, batch_sharding(epoch_batches(epoch)))
        epoch += 1
        if not math.isfinite(float(mean_loss)):
            kept = None
            if manager is not None:  # the state saved after epoch - 1 may already give it: dropped
                for saved in sorted(manager.all_steps()):
                    if saved >= epoch - 1:
                        manager.delete(saved)
                    else:
                        kept = saved
                manager.close()
            bar.close()
            scalars.close()
            where = f"its checkpoint of epoch {kept} is kept" if kept is not None else "it kept no checkpoint"
            raise RecRankerError(f"{name}: the mean loss of epoch {epoch} is {float(mean_loss)}: training diverged and "
                                 f"stopped, not marked done; {where}; lower the learning rate"
                                 + (f" ({lr_key}={lr})" if lr is not None else f" ({lr_key})"))
        seconds = time.perf_counter() - started  # the loss is on the host: the epoch has run
        state.update(params=params, opt_state=opt_state, epoch=epoch)
        bar.update(1)
        if epoch % eval_every == 0 or epoch == epochs:
            score, metrics = validate(nnx.merge(graphdef, params))
            record = {"epoch": epoch, "loss": float(mean_loss), **metrics}
            history.append(record)
            scalars.write(epoch, {**{k: v for k, v in record.items() if k != "epoch"},
                                  "epoch_seconds": seconds, **memory_scalars()})
            if score > float(state["best_score"]):
                state.update(best_params=params, best_epoch=epoch, best_score=score, stale=0)
            else:
                state["stale"] = int(state["stale"]) + 1
            bar.set_postfix(loss=f"{float(mean_loss):.4f}", valid=f"{score:.4f}")
            if manager is not None:
                manager.save(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))
                manager.wait_until_finished()
    bar.close()
    scalars.close()
    if manager is not None:
        manager.close()
    return nnx.merge(graphdef, state["best_params"]), int(state["best_epoch"]), float(state["best_score"]), history


# ----------------------------------------------------------------------------- models


def liked_pairs(data: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """Unique (user, item) training likes: LightGCN's graph and BPR's positives."""
    like = data.train_is_like
    keys = np.unique(data.train_user[like].astype(np.int64) * data.n_items + data.train_item[like])
    if len(keys) == 0:
        raise RecRankerError("the training split has no likes: nothing to train the retrieval models on")
    return (keys // data.n_items).astype(np.int32), (keys % data.n_items).astype(np.int32)


@dataclasses.dataclass
class BPRProblem:
    """Everything one BPR training run needs, shared by `train_bpr` and the benchmark."""

    model: LightGCN
    graph: Graph
    loss: Callable[[LightGCN, dict[str, jax.Array]], jax.Array]
    epoch_batches: Callable[[int], dict[str, np.ndarray]]
    shard_batches: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]
    scorer_of: Callable[[LightGCN], Scorer]


def bpr_problem(
    data: SplitData,
    cfg: RetrievalConfig,
    layers: int,
    seed: int,
    mesh: Mesh | None = None,
    rules: dict[str, list[str]] | None = None,
) -> BPRProblem:
    """LightGCN (layers > 0) or BPR-MF (layers = 0) on the training likes, sharded over `mesh`.

    Tables are padded to a multiple of their shard count (padding rows are
    zero, have no edges and are never sampled) and sliced off again by scorer_of.
    """
    rules = rules or {}
    pos_user, pos_item = liked_pairs(data)
    positive_keys = pos_user.astype(np.int64) * data.n_items + pos_item
    n_users = padded_rows(data.n_users, mesh, "users", rules)
    n_items = padded_rows(data.n_items, mesh, "items", rules)
    graph = build_graph(pos_user, pos_item, n_users, n_items, cfg.propagation)
    model = LightGCN(data.n_users, data.n_items, cfg.dim, layers, rngs=nnx.Rngs(seed))
    # Pad after initialising so the sharded run starts from the same numbers as the unsharded one.
    model.user_embedding = nnx.Param(pad_rows(model.user_embedding[...], n_users))
    model.item_embedding = nnx.Param(pad_rows(model.item_embedding[...], n_items))
    batch_spec = logical_spec([None, "batch"], rules)
    if mesh is not None:
        check_batch("retrieval.batch_size", cfg.batch_size, rules, dict(mesh.shape))
        table_specs = {"user_embedding": logical_spec(["users", None], rules),
                       "item_embedding": logical_spec(["items", None], rules)}
        nnx.update(model, place_tree(nnx.state(model, nnx.Param), mesh, nnx.State(table_specs)))
        graph = place_tree(graph, mesh, jax.tree.map(lambda _: PartitionSpec(), graph))

    def epoch_batches(epoch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(pos_user))
        users = pos_user[order]
        negatives = sample_negatives(rng, users, data.n_items, positive_keys)
        return to_batches({"user": users, "positive": pos_item[order], "negative": negatives}, cfg.batch_size)

    def loss(model: LightGCN, batch: dict[str, jax.Array]) -> jax.Array:
        return bpr_loss(model, graph, batch["user"], batch["positive"], batch["negative"], batch["weight"], cfg.l2)

    graphdef = nnx.graphdef(model)
    propagate_params = jax.jit(lambda params: nnx.merge(graphdef, params).embeddings(graph))

    def scorer_of(model: LightGCN) -> Scorer:
        users, items = propagate_params(nnx.state(model, nnx.Param))
        return Scorer(np.asarray(users)[: data.n_users], np.asarray(items)[: data.n_items])

    return BPRProblem(
        model=model, graph=graph, loss=loss, epoch_batches=epoch_batches, scorer_of=scorer_of,
        shard_batches=lambda b: place_tree(b, mesh, jax.tree.map(lambda _: batch_spec, b)),
    )


def train_bpr(
    data: SplitData,
    cfg: RetrievalConfig,
    layers: int,
    seed: int,
    *,
    mesh: Mesh | None = None,
    rules: dict[str, list[str]] | None = None,
    checkpoint_dir: Path | None = None,
    name: str = "lightgcn",
    progress: bool = True,
    tensorboard: Path | None = None,
) -> FitResult:
    """LightGCN (layers > 0) or BPR-MF (layers = 0) selected on validation NDCG@10."""
    problem = bpr_problem(data, cfg, layers, seed, mesh, rules)

    def validate(model: LightGCN) -> tuple[float, dict[str, float]]:
        metrics = evaluate(problem.scorer_of(model), data, "valid", cfg.eval_batch_users)
        return metrics["ndcg@10"], {"valid_ndcg@10": metrics["ndcg@10"], "valid_recall@20": metrics["recall@20"]}

    best, best_epoch, best_score, history = fit(
        name=name, model=problem.model, loss=problem.loss, tx=optax.adam(cfg.lr),
        epoch_batches=problem.epoch_batches, validate=validate, epochs=cfg.epochs, eval_every=cfg.eval_every,
        patience=cfg.patience, checkpoint_dir=checkpoint_dir, progress=progress, batch_sharding=problem.shard_batches,
        lr_key="retrieval.lr", lr=cfg.lr, tensorboard=tensorboard,
    )
    return FitResult(problem.scorer_of(best), best_epoch, best_score, history, nnx.state(best, nnx.Param))


def held_out_rmse(model: ExplicitMF, data: SplitData, split: str) -> float:
    """RMSE of the rating model on every user's validation or test item."""
    item, rating = (data.valid_item, data.valid_rating) if split == "valid" else (data.test_item, data.test_rating)
    predicted = np.asarray(model(jnp.arange(data.n_users), jnp.asarray(item)))
    return float(np.sqrt(np.mean((predicted - rating) ** 2)))


def train_explicit_mf(
    data: SplitData,
    cfg: ExplicitMFConfig,
    seed: int,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    tensorboard: Path | None = None,
) -> tuple[ExplicitMF, FitResult]:
    """Rating MF on every training rating, selected on validation RMSE (validation items are likes)."""
    if len(data.train_rating) == 0:
        raise RecRankerError("the training split is empty: nothing to train the explicit MF on")
    model = ExplicitMF(data.n_users, data.n_items, cfg.dim, float(data.train_rating.mean()), rngs=nnx.Rngs(seed))

    def epoch_batches(epoch: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(len(data.train_user))
        return to_batches({"user": data.train_user[order], "item": data.train_item[order],
                           "rating": data.train_rating[order].astype(np.float32)}, cfg.batch_size)

    def loss(model: ExplicitMF, batch: dict[str, jax.Array]) -> jax.Array:
        return rating_loss(model, batch["user"], batch["item"], batch["rating"], batch["weight"], cfg.l2)

    def validate(model: ExplicitMF) -> tuple[float, dict[str, float]]:
        rmse = held_out_rmse(model, data, "valid")
        return -rmse, {"valid_rmse": rmse}

    best, best_epoch, best_score, history = fit(
        name="explicit_mf", model=model, loss=loss, tx=optax.adam(cfg.lr), epoch_batches=epoch_batches,
        validate=validate, epochs=cfg.epochs, eval_every=cfg.eval_every, patience=cfg.patience,
        checkpoint_dir=checkpoint_dir, progress=progress, lr_key="retrieval.explicit_mf.lr", lr=cfg.lr,
        tensorboard=tensorboard,
    )
    user_factors = np.concatenate([np.asarray(best.user_factors[...]), np.ones((data.n_users, 1), np.float32)], 1)
    item_factors = np.concatenate([np.asarray(best.item_factors[...]), np.asarray(best.item_bias[...])[:, None]], 1)
    return best, FitResult(Scorer(user_factors, item_factors), best_epoch, best_score, history, nnx.state(best, nnx.Param))
