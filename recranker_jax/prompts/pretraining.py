"""The domain pre-training text: every user's training interactions in time order, rendered
as the pointwise prompt renders its history (`"title": rating`, one per line, under the same
header), cut into windows of at most `window_items` items that start every `stride_items`.

Only the training split is read, so no user's validation or test interaction is in that
user's text (another user's history may hold the same item). What a causal LM learns from it
is which items follow which in a history, the signal a graph backbone ignores.
"""

from __future__ import annotations

import numpy as np

from recranker_jax.config import PromptsConfig
from recranker_jax.data.split import SplitData
from recranker_jax.prompts.render import RatingScale, quote


def history_lines(data: SplitData, rating_mode: str) -> list[list[tuple[int, str]]]:
    """Per user, (item, line) of each training interaction, oldest first."""
    scale = data.meta["rating_scale"]
    answers = RatingScale(float(scale[0]), float(scale[1]), rating_mode).to_answer(data.train_rating)
    titles = [quote(str(t)) for t in data.items["title"]]
    order = np.argsort(data.train_user, kind="stable")  # train rows are already in time order per user
    bounds = np.searchsorted(data.train_user[order], np.arange(data.n_users + 1))
    return [[(int(data.train_item[row]), f"{titles[data.train_item[row]]}: {answers[row]}")
             for row in order[bounds[u]: bounds[u + 1]]] for u in range(data.n_users)]


def windows(count: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) item ranges covering `count` items: every `stride` items a window of at most
    `window`, the last one ending at the last item (no item is left out, none before 0)."""
    if count <= window:
        return [(0, count)] if count else []
    starts = list(range(0, count - window + 1, stride))
    if starts[-1] + window < count:
        starts.append(count - window)
    return [(s, s + window) for s in starts]


def pretraining_documents(data: SplitData, prompts: PromptsConfig, noun: str, window: int,
                          stride: int) -> list[tuple[int, list[int], str]]:
    """(user, items in the window, text) for every window of every user with two or more training
    interactions. The text is the pointwise instruction's history block."""
    header = f"The user's rated {noun}s:\n"
    documents = []
    for user, lines in enumerate(history_lines(data, prompts.rating_mode)):
        if len(lines) < 2:
            continue
        for start, end in windows(len(lines), window, stride):
            part = lines[start:end]
            documents.append((user, [item for item, _ in part], header + "\n".join(line for _, line in part)))
    return documents
