"""Text pieces of RecRanker prompts: quoted titles and ratings on the answer scale (the
templates' placeholders are checked with the config, `config_checks.check_templates`).

A prompt is a shared prefix (instruction + the user's history) and a suffix
(question + hint + "Answer:"); the scorers run a user's prefix once.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
