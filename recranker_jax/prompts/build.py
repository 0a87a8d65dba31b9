"""Candidate selection and the three RecRanker prompt tasks, for training and for inference.

Training examples use a sampled user's training interactions only: targets,
pairs and listwise candidates come from training ratings or never-rated items
(never the user's validation or test item), histories never contain the
prompt's own question items, and hints come from models fitted on the training
split. Inference prompts re-rank a user's retrieval candidates with the same
training-only history, as (shared prefix, per-candidate suffix) pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from recranker_jax.config import PromptsConfig
from recranker_jax.data.split import SplitData
from recranker_jax.prompts.render import RatingScale, quote


@dataclasses.dataclass
class HistoryEntry:
    position: int  # time order within the user's training interactions (0 = oldest)
    kind: str  # rated | liked | disliked
    item: int
    line: str


@dataclasses.dataclass
class PromptParts:
    """One prompt before the token budget is applied (history entries oldest first)."""

    task: str
    user: int
    entries: list[HistoryEntry]
    suffix: str
    question_items: list[int]
    response: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    dropped: int = 0


@dataclasses.dataclass(frozen=True)
class HintModels:
    """Hint sources fitted on the training split: explicit-MF ratings and backbone scores."""

    predict_rating: Callable[[int, np.ndarray], np.ndarray]
    backbone_score: Callable[[int, np.ndarray], np.ndarray]


class PromptBuilder:
    def __init__(self, data: SplitData, cfg: PromptsConfig, hints: HintModels, noun: str):
        self.data, self.cfg, self.hints, self.noun = data, cfg, hints, noun
        self.templates = cfg.templates
        scale = data.meta["rating_scale"]
        self.scale = RatingScale(float(scale[0]), float(scale[1]), cfg.rating_mode)
        self.titles = [quote(str(t)) for t in data.items["title"]]
        order = np.argsort(data.train_user, kind="stable")
        bounds = np.searchsorted(data.train_user[order], np.arange(data.n_users + 1))
        self._rows = [order[bounds[u] : bounds[u + 1]] for u in range(data.n_users)]
        self.like = float(data.meta["like_threshold"])
        self.dislike = float(data.meta["dislike_threshold"])

    # ------------------------------------------------------------------ histories

    def user_items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, ratings) of the user's training interactions, oldest first."""
        rows = self._rows[user]
        return self.data.train_item[rows], self.data.train_rating[rows]

    def known_items(self, user: int) -> set[int]:
        """Everything the user interacted with, held-out items included (never 'never-rated')."""
        items, _ = self.user_items(user)
        return set(items.tolist()) | {int(self.data.valid_item[user]), int(self.data.test_item[user])}

    def rated_history(self, user: int, exclude: set[int]) -> list[HistoryEntry]:
        items, ratings = self.user_items(user)
        answers = self.scale.to_answer(ratings)
        entries = [
            HistoryEntry(p, "rated", int(i), f"{self.titles[i]}: {a}")
            for p, (i, a) in enumerate(zip(items.tolist(), answers.tolist()))
            if i not in exclude
        ]
        return entries[-self.cfg.history_items :]

    def preference_history(self, user: int, exclude: set[int]) -> list[HistoryEntry]:
        items, ratings = self.user_items(user)
        liked = [HistoryEntry(p, "liked", int(i), self.titles[i]) for p, (i, r) in enumerate(zip(items.tolist(), ratings.tolist()))
                 if r >= self.like and i not in exclude][-self.cfg.history_items :]
        disliked = [HistoryEntry(p, "disliked", int(i), self.titles[i]) for p, (i, r) in enumerate(zip(items.tolist(), ratings.tolist()))
                    if r <= self.dislike and i not in exclude][-self.cfg.disliked_items :]
        return sorted(liked + disliked, key=lambda e: e.position)

    def never_rated(self, user: int, count: int, rng: np.random.Generator) -> list[int]:
        """`count` distinct catalogue items the user never interacted with (held-out ones excluded);
        fewer (none) when the catalogue has not that many left."""
        known = self.known_items(user)
        if self.data.n_items - len(known) < count:
            return []
        chosen: list[int] = []
        while len(chosen) < count:
            for item in rng.integers(0, self.data.n_items, 2 * count).tolist():
                if item not in known and item not in chosen:
                    chosen.append(item)
                    if len(chosen) == count:
                        break
        return chosen

    # ------------------------------------------------------------------ rendering

    def prefix(self, parts: PromptParts) -> str:
        kept = parts.entries[parts.dropped :]
        t = self.templates
        if parts.task == "pointwise":
            history = "\n".join(e.line for e in kept) or "None"
            return t.pointwise_instruction.format(noun=self.noun, max_rating=self.scale.max_rating, history=history)
        liked = "\n".join(e.line for e in kept if e.kind == "liked") or "None"
        disliked = "\n".join(e.line for e in kept if e.kind == "disliked") or "None"
        template = t.pairwise_instruction if parts.task == "pairwise" else t.listwise_instruction
        return template.format(noun=self.noun, history=liked, disliked=disliked)

    def item_ids(self, parts: PromptParts) -> list[int]:
        """Every item index that appears in the rendered prompt."""
        return [e.item for e in parts.entries[parts.dropped :]] + list(parts.question_items)

    # ------------------------------------------------------------------ questions

    def pointwise(self, user: int, target: int, history: list[HistoryEntry]) -> PromptParts:
        t = self.templates
        hint = t.pointwise_hint.format(rating=self.scale.hint(self.hints.predict_rating(user, np.array([target]))[0])) if self.cfg.hints else ""
        suffix = t.pointwise_question.format(noun=self.noun, target=self.titles[target], max_rating=self.scale.max_rating, hint=hint)
        return PromptParts("pointwise", user, history, suffix, [target])

    def pairwise(self, user: int, first: int, second: int, history: list[HistoryEntry]) -> PromptParts:
        t = self.templates
        hint = ""
        if self.cfg.hints:
            scores = self.hints.backbone_score(user, np.array([first, second]))
            preferred = first if scores[0] >= scores[1] else second
            hint = t.pairwise_hint.format(preferred=self.titles[preferred])
        suffix = t.pairwise_question.format(first=self.titles[first], second=self.titles[second], hint=hint)
        return PromptParts("pairwise", user, history, suffix, [first, second])

    def listwise(self, user: int, candidates: list[int], history: list[HistoryEntry]) -> PromptParts:
        t = self.templates
        hint = ""
        if self.cfg.hints:
            scores = self.hints.backbone_score(user, np.array(candidates))
            top = [candidates[i] for i in np.argsort(-scores, kind="stable")[:5]]
            hint = t.listwise_hint.format(ranked="\n".join(self.titles[i] for i in top))
        listing = "\n".join(self.titles[i] for i in candidates)
        suffix = t.listwise_question.format(noun=self.noun, candidates=listing, hint=hint)
        return PromptParts("listwise", user, history, suffix, list(candidates))

    # ------------------------------------------------------------------ training examples

    def train_example(self, task: str, user: int, rng: np.random.Generator) -> PromptParts | None:
        """One training example of `task` for `user`, or None when the user has too few ratings for it."""
        items, ratings = self.user_items(user)
        likes = items[ratings >= self.like]
        if task == "pointwise":
            if len(items) < 2:
                return None
            pick = int(rng.integers(len(items)))
            target = int(items[pick])
            parts = self.pointwise(user, target, self.rated_history(user, {target}))
            parts.response = str(int(self.scale.to_answer(ratings[pick])))
            return parts
        if task == "pairwise":
            if len(likes) < 1:
                return None
            liked = int(rng.choice(likes))
            dislikes = items[ratings <= self.dislike]
            if len(dislikes) and rng.random() < 0.5:
                other = int(rng.choice(dislikes))
            else:
                unrated = self.never_rated(user, 1, rng)
                if not unrated:
                    return None
                other = unrated[0]
            swap = self.cfg.position_shift and rng.random() < 0.5
            first, second = (other, liked) if swap else (liked, other)
            parts = self.pairwise(user, first, second, self.preference_history(user, {liked, other}))
            parts.response = "No" if swap else "Yes"
            return parts
        if task == "listwise":
            n_liked = self.cfg.listwise_liked
            if len(set(likes.tolist())) < n_liked:
                return None
            liked_rows = rng.choice(np.flatnonzero(ratings >= self.like), n_liked, replace=False)
            liked = [int(items[r]) for r in liked_rows]
            negatives = self.never_rated(user, self.cfg.listwise_candidates - n_liked, rng)
            if len(negatives) < self.cfg.listwise_candidates - n_liked:
                return None
            candidates = liked + negatives
            if self.cfg.position_shift:
                candidates = [candidates[i] for i in rng.permutation(len(candidates))]
            else:
                scores = self.hints.backbone_score(user, np.array(candidates))
                candidates = [candidates[i] for i in np.argsort(-scores, kind="stable")]
            # Answer: the liked items by rating, most recent first among equal ratings.
            answer = [int(items[r]) for r in sorted(liked_rows, key=lambda r: (-ratings[r], -r))]
            parts = self.listwise(user, candidates, self.preference_history(user, set(candidates)))
            parts.response = "\n".join(self.titles[i] for i in answer)
            return parts
        raise ValueError(task)

    # ------------------------------------------------------------------ inference prompts

    def inference_prompts(self, task: str, user: int, candidates: list[int], rng: np.random.Generator) -> list[PromptParts]:
        """Prompts that re-rank `candidates` (retrieval order): k pointwise, `pairs` disjoint pairs
        in both orders, or one listwise prompt; all of a task's prompts share the user's prefix."""
        if task == "pointwise":
            history = self.rated_history(user, set())
            prompts = [self.pointwise(user, c, history) for c in candidates]
            for rank, p in enumerate(prompts):
                p.extra = {"candidate": candidates[rank], "retrieval_rank": rank + 1}
            return prompts
        history = self.preference_history(user, set())
        if task == "pairwise":
            order = rng.permutation(len(candidates)).tolist()
            prompts = []
            for pair in range(min(self.cfg.pairs, len(candidates) // 2)):
                a, b = candidates[order[2 * pair]], candidates[order[2 * pair + 1]]
                for first, second in ((a, b), (b, a)):
                    p = self.pairwise(user, first, second, history)
                    p.extra = {"pair": [first, second], "pair_index": pair}
                    prompts.append(p)
            return prompts
        if task == "listwise":
            shown = list(candidates)
            if self.cfg.inference_listwise_order == "shuffle":
                shown = [shown[i] for i in rng.permutation(len(shown))]
            p = self.listwise(user, shown, history)
            p.extra = {"candidates": shown}
            return [p]
        raise ValueError(task)
