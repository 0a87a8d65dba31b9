"""The one in-memory ratings table that every data source produces.

Sources (`recranker_jax.data.sources`) turn files or packages into an
`Interactions`; the split (`recranker_jax.data.split`) turns that into the
RecRanker train / validation / test sets.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from recranker_jax.errors import RecRankerError


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Explicit ratings with contiguous indices.

    ratings: one row per rating, in source file order, columns
      user (int32, 0..n_users-1), item (int32, 0..n_items-1), rating (float64),
      timestamp (int64; -1 when the source has none), order (int64, file order).
    user_ids: raw id of each user index (sorted).
    items: one row per item index: item_id (raw), title, year (Int64, may be <NA>),
      genres (str, "|"-separated, may be "").
    name: the source name; scale: (min, max) rating of the dataset's scale;
    item_noun: what the items are ("movie", "book"), for prompts.
    has_timestamps: False for sources without time (BookCrossing): order is file order.
    skipped_lines: malformed lines skipped under data.on_bad_lines=skip.
    """

    ratings: pd.DataFrame
    user_ids: np.ndarray
    items: pd.DataFrame
    name: str
    scale: tuple[float, float]
    has_timestamps: bool
    skipped_lines: int = 0
    item_noun: str = "item"

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.items)


def _sorted_unique(raw: pd.Series) -> np.ndarray:
    """Unique raw ids, numeric order when all are integers, else lexicographic."""
    unique = pd.unique(raw)
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if len(unique) and numeric.notna().all() and (numeric == numeric.round()).all():
        return np.asarray(unique)[np.argsort(numeric.to_numpy(), kind="stable")]
    return np.sort(np.asarray(unique, dtype=str))


def build_interactions(
    *,
    user_raw: pd.Series,
    item_raw: pd.Series,
    rating: np.ndarray,
    timestamp: np.ndarray | None,
    item_meta: pd.DataFrame,
    name: str,
    scale: tuple[float, float],
    item_noun: str = "item",
    skipped_lines: int = 0,
) -> Interactions:
    """Index raw ratings and item metadata into an `Interactions`.

    item_meta has columns item_id, title, year, genres for (at least) every rated
    item; extra or duplicate rows are ignored. A rated item without metadata or
    without a title gets the readable fallback title "<item_noun> #<id>" instead
    of being dropped ("movie #108583"). The catalogue is the set of rated items.
    """
    if len(user_raw) == 0:
        raise RecRankerError(f"data source {name!r} has no ratings")
    user_ids = _sorted_unique(user_raw)
    item_ids = _sorted_unique(item_raw)
    user_index = pd.Index(user_ids.astype(str)).get_indexer(user_raw.astype(str))
    item_index = pd.Index(item_ids.astype(str)).get_indexer(item_raw.astype(str))
    ratings = pd.DataFrame(
        {
            "user": user_index.astype(np.int32),
            "item": item_index.astype(np.int32),
            "rating": np.asarray(rating, dtype=np.float64),
            "timestamp": (
                np.full(len(user_raw), -1, np.int64)
                if timestamp is None
                else np.asarray(timestamp, dtype=np.int64)
            ),
            "order": np.arange(len(user_raw), dtype=np.int64),
        }
    )
    meta = item_meta.assign(item_id=item_meta["item_id"].astype(str)).drop_duplicates("item_id")
    meta = meta.set_index("item_id").reindex(item_ids.astype(str))
    titles = meta["title"].astype("string").str.strip()
    missing = titles.isna() | (titles == "")
    fallback = pd.Series([f"{item_noun} #{i}" for i in item_ids], index=titles.index, dtype="string")
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": titles.where(~missing, fallback).to_numpy(dtype=object),
            "year": pd.array(pd.to_numeric(meta["year"], errors="coerce"), dtype="Float64")
            .round()
            .astype("Int64"),
            "genres": meta["genres"].fillna("").astype(str).to_numpy(dtype=object),
        }
    )
    return Interactions(
        ratings=ratings,
        user_ids=user_ids,
        items=items,
        name=name,
        scale=scale,
        has_timestamps=timestamp is not None,
        skipped_lines=skipped_lines,
        item_noun=item_noun,
    )
