"""TensorFlow Datasets MovieLens (data.source=tfds:movielens/...) -> `Interactions`.

Reads a TFDS dataset that is already prepared in a local data_dir (never
downloads); a folder holding the GroupLens zip instead is read with the
GroupLens loader, without TensorFlow. tensorflow-datasets is an optional extra.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recranker_jax.data.grouplens import MOVIELENS_SCALE, load_ml1m, load_ml100k, year_from_title
from recranker_jax.data.table import Interactions, build_interactions
from recranker_jax.errors import RecRankerError

# TFDS name -> (the GroupLens zip of the same data, the GroupLens source name)
SUPPORTED = {
    "movielens/100k-ratings": ("ml-100k.zip", "ml-100k"),
    "movielens/1m-ratings": ("ml-1m.zip", "ml-1m"),
}
# TFDS renames GroupLens' genres; map back so that both routes give the same table.
_TFDS_TO_GROUPLENS_GENRE = {"Children": "Children's"}
_NOT_GENRES = ("Unknown", "(no genres listed)")
_BATCH = 65536


def load_tfds(name: str, path: str | Path | None, on_bad_lines: str) -> Interactions:
    """Ratings of the TFDS dataset `name` (see SUPPORTED) from the TFDS data_dir `path`.

    With `path` a folder holding ml-100k.zip / ml-1m.zip (TFDS' manual_dir
    layout), that zip is read by `load_ml100k` / `load_ml1m` under
    `on_bad_lines`. A prepared TFDS dataset has no lines, so the policy does not
    apply to it. Genres use GroupLens' names ("Children's"; "Unknown" dropped).
    """
    if name not in SUPPORTED:
        supported = ", ".join(f"tfds:{known}" for known in SUPPORTED)
        raise RecRankerError(f"data.source=tfds:{name} is not supported; expected one of: {supported}")
    zip_name, grouplens_name = SUPPORTED[name]
    data_dir = None if path is None else Path(path).expanduser()
    if data_dir is not None and (data_dir / zip_name).is_file():
        loader = load_ml100k if grouplens_name == "ml-100k" else load_ml1m
        return dataclasses.replace(loader(data_dir / zip_name, on_bad_lines), name=f"tfds:{name}")
    if data_dir is not None and not data_dir.is_dir():
        raise RecRankerError(
            f"data.path {data_dir} is not a folder; expected a TFDS data_dir with {name} prepared "
            f"or a folder holding {zip_name}"
        )
    columns = _read_prepared(name, data_dir, f"set data.source={grouplens_name} and data.path=<its {zip_name}>")
    return build_interactions(
        user_raw=pd.Series(_ids(columns["user_id"])),
        item_raw=pd.Series(_ids(columns["movie_id"])),
        rating=columns["user_rating"].astype(np.float64),
        timestamp=columns["timestamp"],
        item_meta=_movie_meta(columns),
        name=f"tfds:{name}",
        scale=MOVIELENS_SCALE,
        item_noun="movie",
    )


def _import_tfds() -> tuple[Any, Any]:
    try:
        import tensorflow_datasets as tfds
        import tensorflow as tf
    except ImportError:
        raise RecRankerError(
            'data.source=tfds:... needs TensorFlow Datasets: pip install "recranker-jax[tfds]"'
        ) from None
    return tf, tfds


def _read_prepared(name: str, data_dir: Path | None, alternative: str) -> dict[str, np.ndarray]:
    """Columns of the prepared split "train" (strings as bytes), genres as multi-hot `genre_flags`."""
    tf, tfds = _import_tfds()
    where = str(data_dir) if data_dir is not None else "the default TFDS data_dir"
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    try:
        dataset = builder.as_dataset(split="train", shuffle_files=False)
    except AssertionError:  # TFDS' way of saying "not prepared"
        raise RecRankerError(
            f"TFDS dataset {name} is not prepared in {where}; prepare it with TFDS first "
            f"(this project never downloads), or {alternative}"
        ) from None
    genre_names = list(builder.info.features["movie_genres"].feature.names)

    def fixed_shape(example: dict) -> dict:  # the variable-length genre list as a multi-hot vector
        flags = tf.reduce_sum(tf.one_hot(example["movie_genres"], len(genre_names), dtype=tf.int32), axis=0)
        kept = ("user_id", "movie_id", "movie_title", "user_rating", "timestamp")
        return {**{key: example[key] for key in kept}, "genre_flags": flags}

    batches = list(tfds.as_numpy(dataset.map(fixed_shape).batch(_BATCH)))
    if not batches:
        raise RecRankerError(f"TFDS dataset {name} in {where} has no ratings")
    columns = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    columns["genre_names"] = np.asarray(genre_names, dtype=object)
    return columns


def _movie_meta(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """item_id, title, year, genres of each movie, taken from its first rating."""
    _, first = np.unique(columns["movie_id"], return_index=True)
    titles = pd.Series([raw.decode("utf-8", errors="replace") for raw in columns["movie_title"][first]], dtype=object)
    names = np.asarray([_TFDS_TO_GROUPLENS_GENRE.get(g, g) for g in columns["genre_names"]], dtype=object)
    listed = np.asarray([g not in _NOT_GENRES for g in columns["genre_names"]])
    genres = ["|".join(names[flags & listed]) for flags in columns["genre_flags"][first] > 0]
    return pd.DataFrame(
        {
            "item_id": _ids(columns["movie_id"][first]),
            "title": titles,
            "year": year_from_title(titles),
            "genres": genres,
        }
    )


def _ids(raw: np.ndarray) -> np.ndarray:
    """Decoded ids, as int64 when every one is a whole number (as in GroupLens), else strings."""
    ids = np.asarray([value.decode("utf-8", errors="replace") for value in raw], dtype=object)
    numbers = pd.to_numeric(pd.Series(ids, dtype=object), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if len(numbers) and np.isfinite(numbers).all() and (numbers == np.round(numbers)).all():
        return numbers.astype(np.int64)
    return ids
