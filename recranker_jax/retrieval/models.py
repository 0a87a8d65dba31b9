"""LightGCN and BPR-MF as one Flax NNX module (BPR-MF is LightGCN with zero layers).

Parameters are the layer-0 user and item tables; `embeddings(graph)` propagates
them to the final representations, and scores are dot products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recranker_jax.retrieval.graph import Graph, propagate


class LightGCN(nnx.Module):
    """LightGCN (He et al., 2020) with `layers` propagation layers; layers=0 is BPR-MF."""

    def __init__(self, n_users: int, n_items: int, dim: int, layers: int, *, rngs: nnx.Rngs, init_std: float = 0.1):
        init = jax.nn.initializers.normal(init_std)
        self.user_embedding = nnx.Param(init(rngs.params(), (n_users, dim), jnp.float32))
        self.item_embedding = nnx.Param(init(rngs.params(), (n_items, dim), jnp.float32))
        self.layers = layers

    def embeddings(self, graph: Graph) -> tuple[jax.Array, jax.Array]:
        users, items = self.user_embedding[...], self.item_embedding[...]
        if self.layers == 0:
            return users, items
        return propagate(graph, users, items, self.layers)


def bpr_loss(
    model: LightGCN,
    graph: Graph,
    user: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    weight: jax.Array,
    l2: float,
) -> jax.Array:
    """BPR on the propagated embeddings + lambda/2 (|u|^2 + |i+|^2 + |i-|^2) / B on layer 0.

    `weight` is 1 for real examples and 0 for the padding of a last, short batch;
    B is the number of real examples.
    """
    users, items = model.embeddings(graph)
    margin = jnp.sum(users[user] * (items[positive] - items[negative]), axis=-1)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    ranking = -jnp.sum(weight * jax.nn.log_sigmoid(margin)) / count
    user0, item0 = model.user_embedding[...], model.item_embedding[...]
    squares = (
        jnp.sum(user0[user] ** 2, axis=-1)
        + jnp.sum(item0[positive] ** 2, axis=-1)
        + jnp.sum(item0[negative] ** 2, axis=-1)
    )
    return ranking + l2 * 0.5 * jnp.sum(weight * squares) / count


def explicit_mf_rating(mean_rating, user_bias, item_bias, interaction):
    """The explicit MF's rating r(u, i) = mean + b_u + b_i + p_u . q_i from its terms, added in
    this order (NumPy or JAX arrays). The caller computes the interaction p_u . q_i: training a
    product summed per pair in JAX, the prompts' hints a NumPy matmul, which round differently."""
    return mean_rating + user_bias + item_bias + interaction


class ExplicitMF(nnx.Module):
    """Rating MF: r(u, i) = mean + b_u + b_i + p_u . q_i (`explicit_mf_rating`), fitted to training
    ratings only.

    Its predictions are the pointwise prompts' hint ("another recommender system
    predicts a rating of 4.2").
    """

    def __init__(self, n_users: int, n_items: int, dim: int, mean_rating: float, *, rngs: nnx.Rngs, init_std: float = 0.1):
        init = jax.nn.initializers.normal(init_std)
        self.user_factors = nnx.Param(init(rngs.params(), (n_users, dim), jnp.float32))
        self.item_factors = nnx.Param(init(rngs.params(), (n_items, dim), jnp.float32))
        self.user_bias = nnx.Param(jnp.zeros((n_users,), jnp.float32))
        self.item_bias = nnx.Param(jnp.zeros((n_items,), jnp.float32))
        self.mean_rating = mean_rating

    def __call__(self, user: jax.Array, item: jax.Array) -> jax.Array:
        interaction = jnp.sum(self.user_factors[...][user] * self.item_factors[...][item], axis=-1)
        return explicit_mf_rating(self.mean_rating, self.user_bias[...][user], self.item_bias[...][item], interaction)


def rating_loss(
    model: ExplicitMF, user: jax.Array, item: jax.Array, rating: jax.Array, weight: jax.Array, l2: float
) -> jax.Array:
    """Mean squared error + lambda/2 (|p_u|^2 + |q_i|^2) over the batch's real examples."""
    count = jnp.maximum(jnp.sum(weight), 1.0)
    error = model(user, item) - rating
    squares = jnp.sum(model.user_factors[...][user] ** 2, -1) + jnp.sum(model.item_factors[...][item] ** 2, -1)
    return jnp.sum(weight * (error**2 + l2 * 0.5 * squares)) / count
