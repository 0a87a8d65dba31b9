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
