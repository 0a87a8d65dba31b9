"""Pack tokenised instruction examples into fixed-length rows for training.

Each row holds whole examples back to back: `segment_ids` tell the model
which tokens may attend to which (never across examples), `positions` restart
at 0 for every example, and `loss_mask` is 1 only on answer tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recranker_jax.errors import RecRankerError


@dataclasses.dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [N, L] int32 (0 on padding)
    loss_mask: np.ndarray  # [N, L] int32: 1 where the *next* token is an answer token to predict
    segment_ids: np.ndarray  # [N, L] int32: 1, 2, ... per example; 0 on padding
    positions: np.ndarray  # [N, L] int32

    def __len__(self) -> int:
        return len(self.tokens)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], length: int) -> PackedRows:
    """First-fit packing, in order, of (ids, answer_mask) pairs into rows of `length` tokens.

    The loss at position t predicts token t+1, so `loss_mask[t] = answer_mask[t+1]` inside
    one example. An example longer than `length` is a configuration error (the prompt
    budget is set in the instructions stage).
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free: list[int] = []
    for index, (ids, answer) in enumerate(examples):
        if len(ids) > length:
            raise RecRankerError(
                f"instruction example {index} has {len(ids)} tokens, more than the training sequence length {length}; "
                "raise the sequence length or lower prompts.max_tokens"
            )
        for row, room in enumerate(free):
            if room >= len(ids):
                rows[row].append((ids, answer))
                free[row] -= len(ids)
                break
        else:
            rows.append([(ids, answer)])
            free.append(length - len(ids))
    shape = (len(rows), length)
    tokens, loss_mask, segments, positions = (np.zeros(shape, np.int32) for _ in range(4))
    for r, row in enumerate(rows):
        offset = 0
        for s, (ids, answer) in enumerate(row, start=1):
            n = len(ids)
            tokens[r, offset : offset + n] = ids
            loss_mask[r, offset : offset + n - 1] = answer[1:]
            segments[r, offset : offset + n] = s
            positions[r, offset : offset + n] = np.arange(n)
            offset += n
    return PackedRows(tokens, loss_mask, segments, positions)


def answer_capacity(loss_mask: np.ndarray, multiple: int = 64) -> int:
    """Answer positions per row to reserve: the most in any row, rounded up to `multiple`
    (one static shape for the whole training run), at most the row length."""
    most = int(loss_mask.sum(axis=1).max()) if loss_mask.size else 0
    return min(max(multiple, -(-most // multiple) * multiple), loss_mask.shape[1])


def batch_arrays(tokens: np.ndarray, loss_mask: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                 capacity: int) -> dict[str, np.ndarray]:
    """The train step's batch. When `capacity` is less than the row length, the loss positions
    are given as `answer_positions` / `answer_mask` [B, capacity] (left-aligned, padding
    masked), so the output head runs only there (answers are ~3% of the quickstart's tokens);
    otherwise as `loss_mask` [B, T]."""
    batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    if capacity >= tokens.shape[1]:
        return {**batch, "loss_mask": loss_mask}
    counts = loss_mask.sum(axis=1)
    if counts.max(initial=0) > capacity:
        raise RecRankerError(f"a row has {int(counts.max())} answer positions, more than the capacity {capacity}")
    answer_positions = np.zeros((len(tokens), capacity), np.int32)
    answer_mask = np.zeros((len(tokens), capacity), np.int32)
    for row, mask in enumerate(loss_mask):
        where = np.flatnonzero(mask)
        answer_positions[row, : len(where)] = where
        answer_mask[row, : len(where)] = 1
    return {**batch, "answer_positions": answer_positions, "answer_mask": answer_mask}
