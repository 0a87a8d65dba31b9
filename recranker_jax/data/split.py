"""RecRanker preprocessing: like / dislike labels and the per-user leave-one-out split.

Per user, interactions are ordered by (timestamp, file order). The last like is
the test item, the second-to-last like the validation item, and training is
everything that comes before the validation item (likes, dislikes and neutral
ratings alike), so no side information from after a held-out item survives.
The split is written as plain CSVs with raw ids; `SplitData` reads them back
with contiguous indices for the later stages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.config_checks import check_min_likes
from recranker_jax.data.table import Interactions
from recranker_jax.errors import RecRankerError
from recranker_jax.run import DataFolder, read_json, write_json

RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclasses.dataclass(frozen=True)
class Split:
    """The split in source indices. train / valid / test: columns user, item, rating, timestamp,
    rows ordered by user then time; valid and test hold one row per kept user."""

    interactions: Interactions
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    like_threshold: float
    dislike_threshold: float
    min_likes: int

    def stats(self) -> dict[str, object]:
        ratings = self.interactions.ratings["rating"]
        n_users, n_items = self.interactions.n_users, self.interactions.n_items
        train_likes = int((self.train["rating"] >= self.like_threshold).sum())
        return {
            "source": self.interactions.name,
            "users": n_users,
            "items": n_items,
            "ratings": int(len(ratings)),
            "rating_scale": list(self.interactions.scale),
            "item_noun": self.interactions.item_noun,
            "like_threshold": self.like_threshold,
            "dislike_threshold": self.dislike_threshold,
            "likes": int((ratings >= self.like_threshold).sum()),
            "dislikes": int((ratings <= self.dislike_threshold).sum()),
            "density": float(len(ratings) / (n_users * n_items)),
            "has_timestamps": self.interactions.has_timestamps,
            "skipped_lines": self.interactions.skipped_lines,
            "min_likes": self.min_likes,
            "users_kept": int(len(self.test)),
            "train_interactions": int(len(self.train)),
            "train_likes": train_likes,
            "valid": int(len(self.valid)),
            "test": int(len(self.test)),
        }


def split_interactions(
    interactions: Interactions, like_threshold: float, dislike_threshold: float, min_likes: int
) -> Split:
    """Label likes and hold out each kept user's last two likes (test, then validation)."""
    low, high = interactions.scale
    if not low <= dislike_threshold < like_threshold <= high:
        raise RecRankerError(
            f"data.dislike_threshold={dislike_threshold} and data.like_threshold={like_threshold}: "
            f"expected {low} <= dislike < like <= {high} on the {interactions.name} scale"
        )
    check_min_likes(min_likes)
    ordered = interactions.ratings.sort_values(["user", "timestamp", "order"], kind="stable")
    ordered = ordered.reset_index(drop=True)
    is_like = (ordered["rating"] >= like_threshold).to_numpy()
    likes_per_user = pd.Series(is_like).groupby(ordered["user"]).transform("sum").to_numpy()
    kept = likes_per_user >= min_likes
    if not kept.any():
        most = int(likes_per_user.max()) if len(likes_per_user) else 0
        raise RecRankerError(
            f"data.min_likes={min_likes} leaves no users (the most likes any user has is {most} "
            f"with data.like_threshold={like_threshold}); lower data.min_likes or data.like_threshold"
        )
    ordered, is_like = ordered[kept].reset_index(drop=True), is_like[kept]
    # 0 for a user's last like, 1 for the second-to-last, ...; -1 for non-likes.
    likes_from_end = np.full(len(ordered), -1)
    like_rows = ordered[is_like]
    likes_from_end[is_like] = like_rows.groupby("user").cumcount(ascending=False).to_numpy()
    position = ordered.groupby("user").cumcount().to_numpy()
    valid_rows = likes_from_end == 1
    valid_position = pd.Series(position[valid_rows], index=ordered["user"][valid_rows])
    before_valid = position < valid_position.reindex(ordered["user"]).to_numpy()
    columns = ["user", "item", "rating", "timestamp"]
    return Split(
        interactions=interactions,
        train=ordered.loc[before_valid, columns].reset_index(drop=True),
        valid=ordered.loc[valid_rows, columns].reset_index(drop=True),
        test=ordered.loc[likes_from_end == 0, columns].reset_index(drop=True),
        like_threshold=float(like_threshold),
        dislike_threshold=float(dislike_threshold),
        min_likes=min_likes,
    )


def _with_raw_ids(frame: pd.DataFrame, interactions: Interactions, has_timestamps: bool) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": interactions.user_ids[frame["user"].to_numpy()],
            "item_id": interactions.items["item_id"].to_numpy()[frame["item"].to_numpy()],
            "rating": frame["rating"].map(lambda r: f"{r:g}"),
            "timestamp": frame["timestamp"] if has_timestamps else "",
        }
    )


def write_split(split: Split, out_dir: Path) -> dict[str, object]:
    """Write train/valid/test/items CSVs (raw ids) and meta.json; returns the stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = DataFolder(out_dir)
    has_time = split.interactions.has_timestamps
    for name, frame in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        _with_raw_ids(frame, split.interactions, has_time).to_csv(
            folder.csv(name), index=False, lineterminator="\n"
        )
    split.interactions.items.to_csv(folder.csv("items"), index=False, lineterminator="\n")
    stats = split.stats()
    write_json(folder.meta, stats)
    return stats


def format_stats(stats: dict) -> str:
    """meta.json's statistics as aligned `key  value` lines (and a note on file order)."""
    width = max(len(k) for k in stats)
    lines = [f"{key:<{width}}  {f'{value:.6f}' if isinstance(value, float) and key == 'density' else value}"
             for key, value in stats.items()]
    if not stats.get("has_timestamps", True):
        lines.append("note: this source has no timestamps; interactions are ordered by file order")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SplitData:
    """The split read back from its CSVs, with contiguous indices for the later stages.

    Users are the kept users in the order of test.csv (index = row there); items
    are the catalogue in the order of items.csv. train_* arrays hold every
    training interaction in time order per user; valid_* / test_* are indexed
    by user.
    """

    user_ids: np.ndarray
    items: pd.DataFrame
    train_user: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    train_timestamp: np.ndarray
    valid_item: np.ndarray
    valid_rating: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    meta: dict

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def train_is_like(self) -> np.ndarray:
        return self.train_rating >= self.meta["like_threshold"]


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise RecRankerError(f"{path} not found: run `recranker data split` (or the pipeline) first")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RecRankerError(f"{path}: expected columns {', '.join(columns)}; missing {', '.join(missing)}")
    return frame


def load_split(data_dir: Path) -> SplitData:
    """Read a split folder written by `write_split` (or by hand in the same format)."""
    data_dir = Path(data_dir)
    folder = DataFolder(data_dir)
    items = _read_csv(folder.csv("items"), ["item_id", "title"])
    train = _read_csv(folder.csv("train"), RATING_COLUMNS)
    valid = _read_csv(folder.csv("valid"), RATING_COLUMNS)
    test = _read_csv(folder.csv("test"), RATING_COLUMNS)
    meta = read_json(folder.meta, "run `recranker data split` (or the pipeline) first")
    user_index = pd.Index(test["user_id"])
    item_index = pd.Index(items["item_id"])

    def indices(frame: pd.DataFrame, column: str, index: pd.Index, file: str) -> np.ndarray:
        found = index.get_indexer(frame[column])
        if (found < 0).any():
            bad = frame[column][found < 0].iloc[0]
            raise RecRankerError(f"{data_dir / file}: {column} {bad} is not in {index.name or 'the index'}")
        return found.astype(np.int32)

    user_index.name, item_index.name = "test.csv", "items.csv"
    valid_users = indices(valid, "user_id", user_index, "valid.csv")
    if len(valid) != len(test) or (valid_users != np.arange(len(test))).any():
        raise RecRankerError(f"{data_dir / 'valid.csv'}: expected one row per user of test.csv, same order")
    timestamps = pd.to_numeric(train["timestamp"], errors="coerce").fillna(-1).astype(np.int64)
    return SplitData(
        user_ids=test["user_id"].to_numpy(),
        items=items,
        train_user=indices(train, "user_id", user_index, "train.csv"),
        train_item=indices(train, "item_id", item_index, "train.csv"),
        train_rating=train["rating"].astype(np.float64).to_numpy(),
        train_timestamp=timestamps.to_numpy(),
        valid_item=indices(valid, "item_id", item_index, "valid.csv"),
        valid_rating=valid["rating"].astype(np.float64).to_numpy(),
        test_item=indices(test, "item_id", item_index, "test.csv"),
        test_rating=test["rating"].astype(np.float64).to_numpy(),
        meta=meta,
    )
