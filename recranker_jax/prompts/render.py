"""Text pieces of RecRanker prompts: quoted titles, ratings on the answer scale, and the
templates with their placeholders checked.

A prompt is a shared prefix (instruction + the user's history) and a suffix
(question + hint + "Answer:"); the scorers run a user's prefix once.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from recranker_jax.config import TemplatesConfig
from recranker_jax.errors import RecRankerError

REQUIRED = {
    "pointwise_instruction": {"noun", "max_rating", "history"},
    "pointwise_question": {"noun", "target", "max_rating", "hint"},
    "pointwise_hint": {"rating"},
    "pairwise_instruction": {"noun", "history", "disliked"},
    "pairwise_question": {"first", "second", "hint"},
    "pairwise_hint": {"preferred"},
    "listwise_instruction": {"noun", "history", "disliked"},
    "listwise_question": {"noun", "candidates", "hint"},
    "listwise_hint": {"ranked"},
}


def check_templates(templates: TemplatesConfig) -> None:
    """Every template must contain exactly the placeholders its task fills."""
    for name, required in REQUIRED.items():
        text = getattr(templates, name)
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError as err:
            raise RecRankerError(f"prompts.templates.{name}: not a valid format string ({err})") from None
        missing, unknown = required - fields, fields - required
        if missing:
            raise RecRankerError(
                f"prompts.templates.{name}: placeholder {{{sorted(missing)[0]}}} is missing; "
                f"expected {', '.join('{' + f + '}' for f in sorted(required))}"
            )
        if unknown:
            raise RecRankerError(
                f"prompts.templates.{name}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                f"expected {', '.join('{' + f + '}' for f in sorted(required))}"
            )


def quote(title: str) -> str:
    """A title in double quotes, with backslashes, quotes and line breaks escaped."""
    escaped = title.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    return f'"{escaped}"'


@dataclasses.dataclass(frozen=True)
class RatingScale:
    """Maps dataset ratings onto the integer answer scale 1..max_rating."""

    low: float
    high: float
    mode: str  # round | double

    @property
    def max_rating(self) -> int:
        top = int(np.floor(self.high + 0.5))
        return 2 * top if self.mode == "double" and self.low < 1 else top

    def to_answer(self, rating: np.ndarray | float) -> np.ndarray:
        """Round half up (4.5 -> 5, 2.5 -> 3) onto 1..H, or double half stars onto 1..2H."""
        value = np.asarray(rating, dtype=np.float64)
        if self.mode == "double" and self.low < 1:
            value = value * 2
        return np.clip(np.floor(value + 0.5), 1, self.max_rating).astype(int)

    def hint(self, predicted: float) -> str:
        value = float(predicted) * (2 if self.mode == "double" and self.low < 1 else 1)
        return f"{min(max(value, 1.0), float(self.max_rating)):.1f}"
