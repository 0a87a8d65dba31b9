"""TensorFlow Datasets MovieLens (data.source=tfds:movielens/...) -> `Interactions`.

Reads a TFDS dataset that is already prepared in a local data_dir (never
downloads); a folder holding the GroupLens zip instead is read with the
GroupLens loader, without TensorFlow. tensorflow-datasets is an optional extra.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.data.grouplens import MOVIELENS_SCALE, load_ml1m, load_ml100k, year_from_title
from recranker_jax.data.table import Interactions, build_interactions
from recranker_jax.errors import RecRankerError

# TFDS name -> (GroupLens zip of the same data, GroupLens source name)
SUPPORTED = {
    "movielens/100k-ratings": ("ml-100k.zip", "ml-100k"),
    "movielens/1m-ratings": ("ml-1m.zip", "ml-1m"),
}
# TFDS renames GroupLens' genres; map back so that both routes give the same table.
_TFDS_TO_GROUPLENS_GENRE = {"Children": "Children's"}
_NOT_GENRES = ("Unknown", "unknown", "(no genres listed)")
_BATCH = 65536


def load_tfds(name: str, path: str | Path | None, on_bad_lines: str) -> Interactions:
    """Ratings of the TFDS dataset `name` (see SUPPORTED) from the data_dir `path`.

    With `path` a folder holding ml-100k.zip / ml-1m.zip (TFDS' manual_dir
    layout), that zip is loaded with `load_ml100k` / `load_ml1m` under
    `on_bad_lines`. A TFDS dataset has no lines, so the policy does not apply
    to it. Genres use GroupLens' names ("Children's"; "Unknown" dropped).
    """
    if name not in SUPPORTED:
        raise RecRankerError(f"data.source=tfds:{name} is not supported; expected one of: tfds:{', tfds:'.join(SUPPORTED)}")
    zip_name, grouplens_name = SUPPORTED[name]
    if path is not None and (Path(path).expanduser() / zip_name).is_file():
        loader = load_ml100k if grouplens_name == "ml-100k" else load_ml1m
        return dataclasses.replace(loader(Path(path).expanduser() / zip_name, on_bad_lines), name=f"tfds:{name}")
    if path is not None and not Path(path).expanduser().is_dir():
        raise RecRankerError(f"data.path {path} is not a folder; expected a TFDS data_dir with {name} prepared")
    columns = _read_tfds(name, None if path is None else str(Path(path).expanduser()), zip_name, grouplens_name)
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


def _movie_meta(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """item_id, title, year, genres of each movie, from its first rating."""
    _, first = np.unique(columns["movie_id"], return_index=True)
    titles = pd.Series([title.decode("utf-8", errors="replace") for title in columns["movie_title"][first]], dtype=object)
    names = np.asarray([_TFDS_TO_GROUPLENS_GENRE.get(g, g) for g in columns["genre_names"]], dtype=object)
    shown = np.asarray([g not in _NOT_GENRES for g in columns["genre_names"]])
    genres = ["|".join(names[row & shown]) for row in columns["genre_flags"][first] > 0]
    return pd.DataFrame(
        {"item_id": _ids(columns["movie_id"][first]), "title": titles, "year": year_from_title(titles), "genres": genres}
    )


def _import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise RecRankerError(
            'data.source=tfds:... needs TensorFlow Datasets: pip install "recranker-jax[tfds]"'
        ) from None
    return tf, tfds


def _read_tfds(name: str, data_dir: str | None, zip_name: str, grouplens_name: str) -> dict[str, np.ndarray]:
    """The columns of the prepared split "train" (strings as bytes), genres as multi-hot flags."""
    tf, tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        dataset = builder.as_dataset(split="train", shuffle_files=False)
    except AssertionError:  # TFDS' way of saying "not prepared"
        where = data_dir or "the default TFDS data_dir"
        raise RecRankerError(
            f"TFDS dataset {name} is not prepared in {where}; prepare it with TFDS first "
            f"(this project never downloads), or set data.source={grouplens_name} "
            f"and data.path=<the GroupLens {zip_name}>"
        ) from None
    genre_names = builder.info.features["movie_genres"].feature.names
    n_genres = len(genre_names)

    def fixed_shape(example):  # genres (a variable-length list) as a multi-hot vector
        return {
            "user_id": example["user_id"],
            "movie_id": example["movie_id"],
            "movie_title": example["movie_title"],
            "user_rating": example["user_rating"],
            "timestamp": example["timestamp"],
            "genre_flags": tf.reduce_sum(tf.one_hot(example["movie_genres"], n_genres, dtype=tf.int32), axis=0),
        }

    batches = list(tfds.as_numpy(dataset.map(fixed_shape).batch(_BATCH)))
    if not batches:
        raise RecRankerError(f"TFDS dataset {name} in {data_dir or 'the default data_dir'} has no ratings")
    columns = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    columns["genre_names"] = np.asarray(genre_names, dtype=object)
    return columns


def _ids(raw: np.ndarray) -> np.ndarray:
    """Decoded ids, as int64 when every one is a whole number (as in GroupLens), else strings."""
    ids = np.asarray([value.decode("utf-8", errors="replace") for value in raw], dtype=object)
    numbers = pd.to_numeric(pd.Series(ids, dtype=object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if len(numbers) and np.isfinite(numbers).all() and (numbers == np.round(numbers)).all():
        return numbers.astype(np.int64)
    return ids
