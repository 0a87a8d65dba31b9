"""SASRec (Kang & McAuley, 2018): a causal self-attention model of each user's training likes,
trained and evaluated like the other retrieval backbones (not yet wired into the stage).

Sequences hold item index + 1 (0 is padding), left-padded, oldest first. Positions are
counted from the most recent item (the last one always gets position max_len - 1, as in the
paper's left-padded window), so extra left padding changes nothing. A user's scores are the
last position's hidden state dotted with the shared item embeddings, so the model reduces to
a `Scorer` and reuses the full-catalogue evaluation and top-k of `retrieval/evaluate.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from recranker_jax.config import MeshConfig, SequenceConfig
from recranker_jax.config_checks import check_batch
from recranker_jax.data.split import SplitData
from recranker_jax.errors import RecRankerError
from recranker_jax.parallel import logical_spec, place_tree
from recranker_jax.retrieval.evaluate import Scorer, evaluate
from recranker_jax.retrieval.train import fit, pad_rows, padded_rows, sample_negatives

NEG = -1e30  # masked attention / logit value (finite: a fully masked row stays NaN-free)


@dataclasses.dataclass
class SASRecSettings(SequenceConfig):
    """SASRec's hyper-parameters: the config's `retrieval.sequence` section (config.SequenceConfig,
    checked there at load) plus the users per scoring batch. loss: "ce" (full softmax over the
    catalogue at every position) or "bce" (one sampled negative per position, the paper's);
    l2: lambda/2 |params|^2."""

    eval_batch_users: int = 1024

    @classmethod
    def of(cls, retrieval) -> SASRecSettings:
        """The settings of a run config's retrieval section (`retrieval.sequence`)."""
        return cls(**dataclasses.asdict(retrieval.sequence), eval_batch_users=retrieval.eval_batch_users)


# ----------------------------------------------------------------------------- sequences


def user_sequences(data: SplitData, max_len: int) -> np.ndarray:
    """[n_users, max_len] int32: each user's last `max_len` training likes (item index + 1) in
    time order, left-padded with 0."""
    like = data.train_is_like
    users = data.train_user[like]
    order = np.argsort(users, kind="stable")  # keeps the time order within a user
    users, items = users[order], data.train_item[like][order] + 1
    counts = np.bincount(users, minlength=data.n_users)
    within = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
    from_end = counts[users] - 1 - within
    keep = from_end < max_len
    table = np.zeros((data.n_users, max_len), np.int32)
    table[users[keep], max_len - 1 - from_end[keep]] = items[keep]
    return table


def scoring_sequences(data: SplitData, split: str, max_len: int) -> np.ndarray:
    """The sequences whose last position scores the split: "valid" the training likes only,
    "test" the training likes followed by the validation item (nothing of the test split)."""
    if split not in ("valid", "test"):
        raise ValueError(split)
    sequences = user_sequences(data, max_len)
    if split == "valid":
        return sequences
    return np.concatenate([sequences[:, 1:], data.valid_item[:, None].astype(np.int32) + 1], axis=1)


def training_sequences(data: SplitData, max_len: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(inputs, targets) [rows, max_len] of the users with at least two training likes (target
    = the next like, 0 where there is none) and counts: users, users_trained, single_like_users,
    no_like_users, positions."""
    window = user_sequences(data, max_len + 1)
    inputs, targets = window[:, :-1], window[:, 1:]
    targets = np.where(inputs > 0, targets, 0)
    likes = np.bincount(data.train_user[data.train_is_like], minlength=data.n_users)
    rows = np.flatnonzero(likes >= 2)
    stats = {"users": int(data.n_users), "users_trained": int(len(rows)),
             "single_like_users": int(np.sum(likes == 1)), "no_like_users": int(np.sum(likes == 0)),
             "positions": int(np.sum(targets[rows] > 0))}
    if len(rows) == 0:
        raise RecRankerError("no user has two training likes: nothing to train SASRec on")
    return inputs[rows], targets[rows], stats


# ----------------------------------------------------------------------------- the model


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class Block(nnx.Module):
    """Pre-LN block as in the paper: x + Dropout(Attention(LN(x))), then x + Dropout(FFN(LN(x)))."""

    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.heads, self.dropout = heads, dropout
        self.attention_norm = nnx.LayerNorm(dim, epsilon=1e-8, rngs=rngs)
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(dim, epsilon=1e-8, rngs=rngs)
        self.ffn_in = nnx.Linear(dim, dim, rngs=rngs)
        self.ffn_out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """x [B, L, D]; mask [B, L, L] True where query i may attend to key j."""
        keys = list(jax.random.split(key, 4)) if key is not None else [None] * 4
        batch, length, dim = x.shape
        normed = self.attention_norm(x)

        def split_heads(t: jax.Array) -> jax.Array:
            return t.reshape(batch, length, self.heads, dim // self.heads)

        q, k, v = split_heads(self.query(normed)), split_heads(self.key(normed)), split_heads(self.value(normed))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // self.heads)
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits, NEG), axis=-1)
        weights = _dropout(weights, self.dropout, keys[0])
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
        x = x + _dropout(attended, self.dropout, keys[1])
        hidden = _dropout(jax.nn.relu(self.ffn_in(self.ffn_norm(x))), self.dropout, keys[2])
        return x + _dropout(self.ffn_out(hidden), self.dropout, keys[3])


class SASRec(nnx.Module):
    """Item + position embeddings, `blocks` causal self-attention blocks, a final LayerNorm.

    item_embedding row 0 is padding and rows 1..n_items the items (rows beyond are shard
    padding); the same table embeds inputs and scores outputs."""

    def __init__(self, n_items: int, settings: SASRecSettings, *, rngs: nnx.Rngs):
        dim = settings.dim
        self.n_items, self.max_len, self.dropout = n_items, settings.max_len, settings.dropout
        init = jax.nn.initializers.normal(1.0 / math.sqrt(dim))
        self.item_embedding = nnx.Param(init(rngs.params(), (n_items + 1, dim), jnp.float32))
        self.position_embedding = nnx.Param(init(rngs.params(), (settings.max_len, dim), jnp.float32))
        self.blocks = nnx.List([Block(dim, settings.heads, settings.dropout, rngs=rngs) for _ in range(settings.blocks)])
        self.final_norm = nnx.LayerNorm(dim, epsilon=1e-8, rngs=rngs)

    def __call__(self, sequences: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """[B, L] item sequences -> [B, L] x dim hidden states (zero at padding)."""
        real = sequences > 0
        # Position = max_len - 1 - (real items after this one): independent of the left padding.
        after = jnp.cumsum(real[:, ::-1], axis=1)[:, ::-1] - real
        position = jnp.clip(self.max_len - 1 - after, 0, self.max_len - 1)
        dim = self.item_embedding.shape[-1]
        x = self.item_embedding[...][sequences] * math.sqrt(dim) + self.position_embedding[...][position]
        keys = list(jax.random.split(dropout_key, len(self.blocks) + 1)) if dropout_key is not None else None
        x = _dropout(x, self.dropout, keys[-1] if keys else None) * real[..., None]
        length = sequences.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & real[:, None, :]
        for index, block in enumerate(self.blocks):
            x = block(x, mask, keys[index] if keys else None) * real[..., None]
        return self.final_norm(x) * real[..., None]

    def item_table(self) -> jax.Array:
        """[n_items, dim]: the embeddings of items 0..n_items-1 (row i + 1 of the table)."""
        return self.item_embedding[...][1 : self.n_items + 1]


def sasrec_loss(model: SASRec, batch: dict[str, jax.Array], loss: str, l2: float) -> jax.Array:
    """Mean over real positions (target > 0) of the next-item loss, + l2/2 |params|^2.

    ce: -log softmax over items 1..n_items of the target; bce: -log s(h.e_target)
    - log(1 - s(h.e_negative)) with batch["negative"] one sampled item per position."""
    key = batch.get("key")
    hidden = model(batch["inputs"], None if key is None else jax.random.wrap_key_data(key))
    targets = batch["targets"]
    weight = (targets > 0).astype(jnp.float32)
    table = model.item_embedding[...]
    if loss == "ce":
        if "positions" in batch:  # only the real positions, packed: [P] flat indices into B * L
            hidden = hidden.reshape(-1, hidden.shape[-1])[batch["positions"]]
            targets = targets.reshape(-1)[batch["positions"]]
            weight = batch["position_mask"].astype(jnp.float32)
        logits = jnp.einsum("...d,nd->...n", hidden, table)
        column = jnp.arange(table.shape[0])
        logits = jnp.where((column >= 1) & (column <= model.n_items), logits, NEG)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        per_position = jax.nn.logsumexp(logits, axis=-1) - target_logit
    else:
        positive = jnp.sum(hidden * table[targets], -1)
        negative = jnp.sum(hidden * table[batch["negative"]], -1)
        per_position = -jax.nn.log_sigmoid(positive) - jax.nn.log_sigmoid(-negative)
    value = jnp.sum(weight * per_position) / jnp.maximum(jnp.sum(weight), 1.0)
    if l2:
        value = value + l2 * 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return value


# ----------------------------------------------------------------------------- scoring


@jax.jit
def _last_hidden(graphdef, params, sequences):
    return nnx.merge(graphdef, params)(sequences)[:, -1]


def sasrec_scorer(model: SASRec, sequences: np.ndarray, batch_users: int = 1024) -> Scorer:
    """The model as user factors (last position's hidden state of each sequence) and item
    factors (the shared embeddings): the form `evaluate` and `top_k` take."""
    graphdef, params = nnx.split(model, nnx.Param)
    users = [np.asarray(_last_hidden(graphdef, params, jnp.asarray(sequences[start : start + batch_users])))
             for start in range(0, len(sequences), batch_users)]
    return Scorer(np.concatenate(users), np.asarray(model.item_table()))


def sasrec_scores(model: SASRec, sequences: np.ndarray) -> np.ndarray:
    """[users, n_items] scores of every item after each sequence."""
    scorer = sasrec_scorer(model, sequences)
    return scorer.user_factors @ scorer.item_factors.T


# ----------------------------------------------------------------------------- training


def real_positions(targets: np.ndarray, bucket: int = 1024) -> dict[str, np.ndarray]:
    """Each step's positions with a target, as flat indices into its [B, L] rows: `positions`
    and `position_mask` [steps, P], P the most any step has, rounded up to `bucket` (so epochs
    share a compiled shape) and at most B * L."""
    steps, rows, length = targets.shape
    flat = targets.reshape(steps, -1) > 0
    capacity = min(-(-max(int(flat.sum(axis=1).max()), 1) // bucket) * bucket, rows * length)
    positions = np.zeros((steps, capacity), np.int32)
    mask = np.zeros((steps, capacity), np.int32)
    for step, real in enumerate(flat):
        where = np.flatnonzero(real)
        positions[step, : len(where)] = where
        mask[step, : len(where)] = 1
    return {"positions": positions, "position_mask": mask}


@dataclasses.dataclass
class SASRecProblem:
    """One SASRec training run's pieces, shared by `fit_sasrec`, the tests and the benchmark."""

    model: SASRec
    loss: Callable[[SASRec, dict[str, jax.Array]], jax.Array]
    epoch_batches: Callable[[int], dict[str, np.ndarray]]
    shard_batches: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]
    stats: dict[str, int]


def sasrec_problem(data: SplitData, settings: SASRecSettings, seed: int, mesh: Mesh | None = None,
                   rules: dict[str, list[str]] | None = None) -> SASRecProblem:
    """The model (item table sharded along "items", padded to the shard count) and the epoch
    batches ([steps, B, L], users shuffled by a generator seeded by (seed, epoch); the last batch
    padded with empty rows) sharded along "batch"."""
    rules = MeshConfig().rules if rules is None else rules
    inputs, targets, stats = training_sequences(data, settings.max_len)
    model = SASRec(data.n_items, settings, rngs=nnx.Rngs(seed))
    if mesh is not None:
        check_batch("retrieval.sequence.batch_size", settings.batch_size, rules, dict(mesh.shape))
        # Pad after initialising so the sharded run starts from the same numbers as the unsharded one.
        rows = padded_rows(data.n_items + 1, mesh, "items", rules)
        model.item_embedding = nnx.Param(pad_rows(model.item_embedding[...], rows))
        params = nnx.state(model, nnx.Param)
        specs = jax.tree.map(lambda _: PartitionSpec(), params)
        specs["item_embedding"] = logical_spec(["items", None], rules)
        nnx.update(model, place_tree(params, mesh, specs))
    liked = data.train_is_like
    positive_keys = np.unique(data.train_user[liked].astype(np.int64) * data.n_items + data.train_item[liked])
    owner = np.flatnonzero(np.bincount(data.train_user[liked], minlength=data.n_users) >= 2)
    batch_size = settings.batch_size

    def epoch_batches(epoch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(inputs))
        steps = max(math.ceil(len(order) / batch_size), 1)
        pad = steps * batch_size - len(order)

        def stack(rows: np.ndarray) -> np.ndarray:
            return np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)]).reshape(steps, batch_size, -1)

        batch = {"inputs": stack(inputs[order]), "targets": stack(targets[order])}
        if settings.loss == "ce":  # the softmax runs only where there is a next item (~60% of positions here)
            batch.update(real_positions(batch["targets"]))
        if settings.loss == "bce":  # one uniform item per position that the user never liked in training
            users = np.repeat(owner[order], settings.max_len)
            batch["negative"] = stack((sample_negatives(rng, users, data.n_items, positive_keys) + 1).reshape(len(order), -1))
        if settings.dropout > 0:
            batch["key"] = rng.integers(0, 2**32, (steps, 2), dtype=np.uint32)
        return batch

    def shard_batches(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        row_spec = logical_spec([None, "batch", None], rules)
        replicated = ("key", "positions", "position_mask")
        return place_tree(batch, mesh, {k: PartitionSpec() if k in replicated else row_spec for k in batch})

    def loss(model: SASRec, batch: dict[str, jax.Array]) -> jax.Array:
        return sasrec_loss(model, batch, settings.loss, settings.l2)

    return SASRecProblem(model, loss, epoch_batches, shard_batches, stats)


def fit_sasrec(data: SplitData, settings: SASRecSettings, mesh: Mesh | None = None, seed: int = 0,
               progress: bool = True, *, rules: dict[str, list[str]] | None = None,
               checkpoint_dir: Path | None = None, tensorboard: Path | None = None) -> tuple[SASRec, dict]:
    """Train SASRec on the training likes, selected on validation NDCG@10 (early stopping as
    for LightGCN). Returns the best model and a history: {"records": [{epoch, loss,
    valid_ndcg@10, valid_recall@20}, ...], "best_epoch", "best_score", "stats"}; with `tensorboard`,
    the records as TensorBoard scalars (retrieval.train.fit)."""
    problem = sasrec_problem(data, settings, seed, mesh, rules)
    valid_sequences = scoring_sequences(data, "valid", settings.max_len)

    def validate(model: SASRec) -> tuple[float, dict[str, float]]:
        metrics = evaluate(sasrec_scorer(model, valid_sequences, settings.eval_batch_users), data, "valid",
                           settings.eval_batch_users)
        return metrics["ndcg@10"], {"valid_ndcg@10": metrics["ndcg@10"], "valid_recall@20": metrics["recall@20"]}

    best, best_epoch, best_score, records = fit(
        name="sasrec", model=problem.model, loss=problem.loss, tx=optax.adam(settings.lr),
        epoch_batches=problem.epoch_batches, validate=validate, epochs=settings.epochs,
        eval_every=settings.eval_every, patience=settings.patience, checkpoint_dir=checkpoint_dir,
        batch_sharding=problem.shard_batches, progress=progress, lr_key="retrieval.sequence.lr", lr=settings.lr,
        tensorboard=tensorboard,
    )
    return best, {"records": records, "best_epoch": best_epoch, "best_score": best_score, "stats": problem.stats}


def evaluate_sasrec(model: SASRec, data: SplitData, split: str, settings: SASRecSettings) -> dict[str, float]:
    """Full-catalogue metrics of the split (training items masked, and the validation item for test)."""
    scorer = sasrec_scorer(model, scoring_sequences(data, split, settings.max_len), settings.eval_batch_users)
    return evaluate(scorer, data, split, settings.eval_batch_users)
