"""GroupLens MovieLens downloads (ml-100k, ml-1m) -> `Interactions`.

The loaders behind data.source=ml-100k / ml-1m: they read the original files
(folder or zip) with `recranker_jax.data.files` and keep GroupLens' own ids,
titles and genre names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.data.files import (
    NumberField,
    Rows,
    locate_files,
    read_number_lines,
    read_split_lines,
    require_rows,
)
from recranker_jax.data.table import Interactions, build_interactions

# u.item's 19 genre flags, in file order; "unknown" is not a genre and is never listed.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
RATING_FIELDS = ("user", "item", "rating", "timestamp")
RATING_NUMBERS = (
    NumberField("user", whole=True),
    NumberField("item", whole=True),
    NumberField("rating", low=1, high=5),
    NumberField("timestamp", whole=True),
)
MOVIELENS_SCALE = (1.0, 5.0)
_TITLE_YEAR = r"\((\d{4})\)\s*$"


def year_from_title(titles: pd.Series) -> pd.Series:
    """The year in a trailing "(YYYY)" of each title ("Toy Story (1995)" -> 1995), <NA> when absent."""
    return pd.to_numeric(titles.astype(str).str.extract(_TITLE_YEAR, expand=False), errors="coerce").astype("Int64")


def _ratings(rows: Rows) -> dict:
    return {
        "user_raw": pd.Series(rows.columns["user"]),
        "item_raw": pd.Series(rows.columns["item"]),
        "rating": rows.columns["rating"],
        "timestamp": rows.columns["timestamp"],
    }


def load_ml100k(path: str | Path, on_bad_lines: str) -> Interactions:
    """ML-100K: u.data (user, item, rating, timestamp; tabs) and u.item (pipes, latin-1).

    Malformed lines in either file (wrong field count, an id, rating or
    timestamp that is not a number, a rating outside 1-5, a genre flag other
    than 0/1) raise under on_bad_lines="error" and are skipped and counted in
    `skipped_lines` under "skip". Year: the title's trailing "(YYYY)", else the
    release date's year.
    """
    files = locate_files(path, ("u.data", "u.item"), source="GroupLens ml-100k")
    ratings = read_number_lines(
        files["u.data"],
        separator="\t",
        separator_name="tab-separated",
        fields=RATING_FIELDS,
        number_fields=RATING_NUMBERS,
        on_bad_lines=on_bad_lines,
    )
    require_rows(ratings, "tab-separated lines user, item, rating, timestamp (e.g. '196<TAB>242<TAB>3<TAB>881250949')")
    flags = [f"{genre} flag" for genre in ML100K_GENRES]
    movies = read_split_lines(
        files["u.item"],
        separator="|",
        separator_name="'|'-separated",
        fields=("movie id", "title", "release date", "video release date", "IMDb URL", *flags),
        number_fields=(
            NumberField("movie id", whole=True),
            *(NumberField(flag, whole=True, low=0, high=1) for flag in flags),
        ),
        fields_description="movie id, title, release date, video release date, IMDb URL, 19 genre flags",
        on_bad_lines=on_bad_lines,
    )
    titles = pd.Series(movies.columns["title"], dtype=object)
    release_year = pd.Series(movies.columns["release date"], dtype=object).astype(str).str.extract(
        r"(\d{4})\s*$", expand=False
    )
    year = year_from_title(titles).fillna(pd.to_numeric(release_year, errors="coerce").astype("Int64"))
    flag_matrix = np.stack([movies.columns[flag] for flag in flags[1:]], axis=1).astype(bool)
    genre_names = np.asarray(ML100K_GENRES[1:], dtype=object)
    genres = ["|".join(genre_names[row]) for row in flag_matrix] if len(movies) else []
    item_meta = pd.DataFrame({"item_id": movies.columns["movie id"], "title": titles, "year": year, "genres": genres})
    return build_interactions(
        **_ratings(ratings),
        item_meta=item_meta,
        name="ml-100k",
        scale=MOVIELENS_SCALE,
        item_noun="movie",
        skipped_lines=ratings.skipped_lines + movies.skipped_lines,
    )


def load_ml1m(path: str | Path, on_bad_lines: str) -> Interactions:
    """ML-1M: ratings.dat (UserID::MovieID::Rating::Timestamp) and movies.dat (MovieID::Title::Genres, latin-1).

    Same malformed-line rules as `load_ml100k`; genres are kept as written
    ("|"-separated names), the year comes from the title's trailing "(YYYY)".
    """
    files = locate_files(path, ("ratings.dat", "movies.dat"), source="GroupLens ml-1m")
    ratings = read_number_lines(
        files["ratings.dat"],
        separator="::",
        separator_name="'::'-separated",
        fields=RATING_FIELDS,
        number_fields=RATING_NUMBERS,
        on_bad_lines=on_bad_lines,
    )
    require_rows(ratings, "lines UserID::MovieID::Rating::Timestamp (e.g. '1::1193::5::978300760')")
    movies = read_split_lines(
        files["movies.dat"],
        separator="::",
        separator_name="'::'-separated",
        fields=("movie id", "title", "genres"),
        number_fields=(NumberField("movie id", whole=True),),
        on_bad_lines=on_bad_lines,
    )
    titles = pd.Series(movies.columns["title"], dtype=object)
    item_meta = pd.DataFrame(
        {
            "item_id": movies.columns["movie id"],
            "title": titles,
            "year": year_from_title(titles),
            "genres": pd.Series(movies.columns["genres"], dtype=object).astype(str).str.strip(),
        }
    )
    return build_interactions(
        **_ratings(ratings),
        item_meta=item_meta,
        name="ml-1m",
        scale=MOVIELENS_SCALE,
        item_noun="movie",
        skipped_lines=ratings.skipped_lines + movies.skipped_lines,
    )
