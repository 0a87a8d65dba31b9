"""The LightGCN user-item graph and its propagation, with two interchangeable back ends.

The graph is built from training likes only: symmetric normalisation
R~ = D_u^-1/2 R D_i^-1/2 of the bipartite matrix, no self loops, degree-0 nodes
get zero rows. `dense` multiplies by R~ and R~^T (best for small, dense graphs);
`edges` gathers along the edge list and `jax.ops.segment_sum`s (memory linear
in the edges). Both compute the same embeddings and gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["dense", "edges"]

# Above this many dense matrix entries per edge the edge list wins on memory and time.
DENSE_MAX_ENTRIES_PER_EDGE = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Graph:
    """Normalised bipartite graph. Arrays are pytree leaves; sizes and backend are static."""

    edge_user: jax.Array  # [E] int32, sorted by user
    edge_item: jax.Array  # [E] int32
    edge_weight: jax.Array  # [E] float32: 1 / sqrt(deg(u) deg(i))
    dense: jax.Array | None  # [U, I] float32 R~ for the dense back end, else None
    n_users: int = dataclasses.field(metadata={"static": True})
    n_items: int = dataclasses.field(metadata={"static": True})
    backend: str = dataclasses.field(metadata={"static": True})


def choose_backend(n_users: int, n_items: int, n_edges: int) -> Backend:
    return "dense" if n_users * n_items <= DENSE_MAX_ENTRIES_PER_EDGE * max(n_edges, 1) else "edges"


def build_graph(
    user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, backend: str = "auto"
) -> Graph:
    """Graph of the (user, item) like pairs; duplicates count once."""
    keys = np.unique(np.asarray(user, np.int64) * n_items + np.asarray(item, np.int64))
    edge_user = (keys // n_items).astype(np.int32)
    edge_item = (keys % n_items).astype(np.int32)
    user_degree = np.bincount(edge_user, minlength=n_users).astype(np.float64)
    item_degree = np.bincount(edge_item, minlength=n_items).astype(np.float64)
    weight = (1.0 / np.sqrt(user_degree[edge_user] * item_degree[edge_item])).astype(np.float32)
    if backend == "auto":
        backend = choose_backend(n_users, n_items, len(keys))
    dense = None
    if backend == "dense":
        matrix = np.zeros((n_users, n_items), np.float32)
        matrix[edge_user, edge_item] = weight
        dense = jnp.asarray(matrix)
    elif backend != "edges":
        raise ValueError(f"unknown propagation backend {backend!r}")
    return Graph(
        edge_user=jnp.asarray(edge_user),
        edge_item=jnp.asarray(edge_item),
        edge_weight=jnp.asarray(weight),
        dense=dense,
        n_users=n_users,
        n_items=n_items,
        backend=backend,
    )


def propagate_once(graph: Graph, users: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One LightGCN layer: users <- R~ items, items <- R~^T users."""
    if graph.backend == "dense":
        return graph.dense @ items, graph.dense.T @ users
    weight = graph.edge_weight[:, None]
    new_users = jax.ops.segment_sum(
        weight * items[graph.edge_item], graph.edge_user, graph.n_users, indices_are_sorted=True
    )
    new_items = jax.ops.segment_sum(weight * users[graph.edge_user], graph.edge_item, graph.n_items)
    return new_users, new_items


def propagate(graph: Graph, users: jax.Array, items: jax.Array, layers: int) -> tuple[jax.Array, jax.Array]:
    """Mean of layers 0..K (K = `layers`; K = 0 is plain matrix factorisation)."""
    sum_users, sum_items = users, items
    for _ in range(layers):
        users, items = propagate_once(graph, users, items)
        sum_users, sum_items = sum_users + users, sum_items + items
    return sum_users / (layers + 1), sum_items / (layers + 1)
