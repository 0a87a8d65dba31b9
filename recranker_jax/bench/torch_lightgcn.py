"""A straightforward PyTorch LightGCN (torch.sparse.mm), written for the retrieval benchmark.

The same algorithm as `recranker_jax.retrieval`: symmetric-normalised
(U+I) x (U+I) adjacency of the training likes, mean of layers 0..K, BPR on the
propagated embeddings, L2 on the batch's layer-0 rows, Adam. Importable only
when torch is installed (the `test` extra).
"""

from __future__ import annotations

import numpy as np
import torch


class TorchLightGCN(torch.nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, layers: int, edge_user: np.ndarray, edge_item: np.ndarray, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.n_users, self.n_items, self.layers = n_users, n_items, layers
        self.user_embedding = torch.nn.Parameter(torch.randn(n_users, dim, generator=generator) * 0.1)
        self.item_embedding = torch.nn.Parameter(torch.randn(n_items, dim, generator=generator) * 0.1)
        n = n_users + n_items
        rows = np.concatenate([edge_user, edge_item + n_users])
        cols = np.concatenate([edge_item + n_users, edge_user])
        degree = np.bincount(rows, minlength=n).astype(np.float64)
        values = 1.0 / np.sqrt(degree[rows] * degree[cols])
        # COO, as the LightGCN reference code uses (measured faster than CSR here for training).
        self.adjacency = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values.astype(np.float32)), (n, n),
            check_invariants=False,
        ).coalesce()

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = torch.cat([self.user_embedding, self.item_embedding])
        total = layer
        for _ in range(self.layers):
            layer = torch.sparse.mm(self.adjacency, layer)
            total = total + layer
        total = total / (self.layers + 1)
        return total[: self.n_users], total[self.n_users :]

    def bpr_loss(self, user: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, l2: float) -> torch.Tensor:
        users, items = self.embeddings()
        margin = (users[user] * (items[positive] - items[negative])).sum(-1)
        squares = (
            self.user_embedding[user].pow(2).sum(-1)
            + self.item_embedding[positive].pow(2).sum(-1)
            + self.item_embedding[negative].pow(2).sum(-1)
        )
        return -torch.nn.functional.logsigmoid(margin).mean() + l2 * 0.5 * squares.mean()


def train_epoch(model: TorchLightGCN, optimizer: torch.optim.Optimizer, batches: dict[str, np.ndarray], l2: float) -> float:
    """One epoch over [S, B] batches (rows with weight 0 are dropped)."""
    losses = []
    for step in range(batches["user"].shape[0]):
        real = batches["weight"][step] > 0
        user, positive, negative = (torch.from_numpy(batches[k][step][real].astype(np.int64)) for k in ("user", "positive", "negative"))
        optimizer.zero_grad()
        loss = model.bpr_loss(user, positive, negative, l2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def full_ranking(model: TorchLightGCN, exclude: np.ndarray, k: int) -> np.ndarray:
    """Top-k items per user with the [U, E] (-1 padded) excluded items masked."""
    users, items = model.embeddings()
    scores = users @ items.T
    rows = np.repeat(np.arange(exclude.shape[0]), exclude.shape[1])
    cols = exclude.ravel()
    keep = cols >= 0
    scores[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep].astype(np.int64))] = -torch.inf
    return torch.topk(scores, k, dim=1).indices.numpy()
