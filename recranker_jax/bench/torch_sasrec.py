"""A straightforward PyTorch SASRec, written for the retrieval benchmark (`bench retrieval --model sasrec`).

The same architecture and loss as `recranker_jax.retrieval.sasrec`: item (row 0 = padding) and
position embeddings (positions counted from the most recent item), pre-LN blocks of causal
self-attention (query/key/value projections, no output projection, padding keys masked) and a
point-wise ReLU FFN, dropout as there, a final LayerNorm, and the shared item table for scoring;
CE over the catalogue or BCE with the batch's sampled negatives, + l2/2 |params|^2, Adam.
Importable only when torch is installed (the `test` extra).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchBlock(torch.nn.Module):
    """x + Dropout(Attention(LN(x))), then x + Dropout(FFN(LN(x))), as `sasrec.Block`."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention_norm = torch.nn.LayerNorm(dim, eps=1e-8)
        self.query = torch.nn.Linear(dim, dim)
        self.key = torch.nn.Linear(dim, dim)
        self.value = torch.nn.Linear(dim, dim)
        self.ffn_norm = torch.nn.LayerNorm(dim, eps=1e-8)
        self.ffn_in = torch.nn.Linear(dim, dim)
        self.ffn_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; mask [B, 1, L, L] True where query i may attend to key j."""
        batch, length, dim = x.shape
        normed = self.attention_norm(x)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.query(normed)), split_heads(self.key(normed)), split_heads(self.value(normed)),
            attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
        ).transpose(1, 2).reshape(batch, length, dim)
        x = x + F.dropout(attended, self.dropout, self.training)
        hidden = F.dropout(F.relu(self.ffn_in(self.ffn_norm(x))), self.dropout, self.training)
        return x + F.dropout(self.ffn_out(hidden), self.dropout, self.training)


class TorchSASRec(torch.nn.Module):
    def __init__(self, n_items: int, max_len: int, dim: int, blocks: int, heads: int, dropout: float, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.n_items, self.max_len, self.dropout = n_items, max_len, dropout
        self.item_embedding = torch.nn.Embedding(n_items + 1, dim)
        self.position_embedding = torch.nn.Embedding(max_len, dim)
        for table in (self.item_embedding, self.position_embedding):  # the JAX model's N(0, 1/dim)
            torch.nn.init.normal_(table.weight, std=1.0 / math.sqrt(dim))
        self.blocks = torch.nn.ModuleList([TorchBlock(dim, heads, dropout) for _ in range(blocks)])
        self.final_norm = torch.nn.LayerNorm(dim, eps=1e-8)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, L] item sequences (item + 1, 0 = padding, left-padded) -> [B, L, D] (zero at padding)."""
        real = sequences > 0
        after = real.flip(1).cumsum(1).flip(1) - real.long()
        position = (self.max_len - 1 - after).clamp(0, self.max_len - 1)
        dim = self.item_embedding.embedding_dim
        keep = real.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        x = F.dropout(self.item_embedding(sequences) * math.sqrt(dim) + self.position_embedding(position),
                      self.dropout, self.training) * keep
        length = sequences.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=sequences.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=sequences.device)
        # A padding query also sees itself, so that no softmax row is empty (its output is zeroed anyway).
        mask = (causal & (real[:, None, :] | eye)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.final_norm(x) * keep


def sasrec_loss(model: TorchSASRec, inputs: torch.Tensor, targets: torch.Tensor, negative: torch.Tensor | None,
                loss: str, l2: float) -> torch.Tensor:
    """Mean over real positions (target > 0) of the next-item loss, + l2/2 |params|^2 (as the JAX loss).
    Only the real positions are scored (the JAX loss scores all and weights the padding by 0)."""
    hidden = model(inputs)
    real = targets > 0
    hidden, positive = hidden[real], targets[real]
    table = model.item_embedding.weight
    if loss == "ce":
        value = F.cross_entropy(hidden @ table[1 : model.n_items + 1].T, positive - 1)
    else:
        positive_logit = (hidden * table[positive]).sum(-1)
        negative_logit = (hidden * table[negative[real]]).sum(-1)
        value = -(F.logsigmoid(positive_logit) + F.logsigmoid(-negative_logit)).mean()
    if l2:
        value = value + l2 * 0.5 * sum(p.pow(2).sum() for p in model.parameters())
    return value


def batch_tensors(batches: dict[str, np.ndarray], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, negative or None) of step `step` of the [S, B, L] epoch arrays, as int64."""
    negative = batches.get("negative")
    return (torch.from_numpy(batches["inputs"][step].astype(np.int64)), torch.from_numpy(batches["targets"][step].astype(np.int64)),
            None if negative is None else torch.from_numpy(negative[step].astype(np.int64)))


def train_epoch(model: TorchSASRec, optimizer: torch.optim.Optimizer, batches: dict[str, np.ndarray], loss: str, l2: float) -> float:
    """One epoch over the JAX problem's [S, B, L] batches; returns the mean loss."""
    model.train()
    losses = []
    for step in range(batches["inputs"].shape[0]):
        inputs, targets, negative = batch_tensors(batches, step)
        optimizer.zero_grad()
        value = sasrec_loss(model, inputs, targets, negative, loss, l2)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return float(np.mean(losses))


@torch.no_grad()
def full_ranking(model: TorchSASRec, sequences: np.ndarray, exclude: np.ndarray, k: int, batch_users: int) -> np.ndarray:
    """Top-k items after each [U, L] sequence (last position . item table), [U, E] (-1 padded) excluded items masked."""
    model.eval()
    table = model.item_embedding.weight[1 : model.n_items + 1]
    tops = []
    for start in range(0, len(sequences), batch_users):
        users = model(torch.from_numpy(sequences[start : start + batch_users].astype(np.int64)))[:, -1]
        scores = users @ table.T
        block = exclude[start : start + batch_users]
        rows = np.repeat(np.arange(block.shape[0]), block.shape[1])
        cols = block.ravel()
        keep = cols >= 0
        scores[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep].astype(np.int64))] = -torch.inf
        tops.append(torch.topk(scores, k, dim=1).indices.numpy())
    return np.concatenate(tops)


@torch.no_grad()
def copy_jax_parameters(model: TorchSASRec, jax_model) -> None:
    """Load a `recranker_jax.retrieval.sasrec.SASRec`'s parameters (unsharded, unpadded) into `model`."""

    def assign(target: torch.Tensor, value) -> None:
        target.copy_(torch.from_numpy(np.array(value, np.float32)))

    def norm(target: torch.nn.LayerNorm, source) -> None:
        assign(target.weight, source.scale[...])
        assign(target.bias, source.bias[...])

    def linear(target: torch.nn.Linear, source) -> None:
        assign(target.weight, np.asarray(source.kernel[...]).T)  # nnx kernels are [in, out]
        assign(target.bias, source.bias[...])

    assign(model.item_embedding.weight, jax_model.item_embedding[...])
    assign(model.position_embedding.weight, jax_model.position_embedding[...])
    for block, source in zip(model.blocks, jax_model.blocks, strict=True):
        norm(block.attention_norm, source.attention_norm)
        norm(block.ffn_norm, source.ffn_norm)
        for name in ("query", "key", "value", "ffn_in", "ffn_out"):
            linear(getattr(block, name), getattr(source, name))
    norm(model.final_norm, jax_model.final_norm)
