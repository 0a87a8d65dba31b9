"""BookCrossing (BX-CSV-Dump) -> `Interactions`.

The loader behind data.source=bookcrossing: explicit ratings 1-10 from
BX-Book-Ratings.csv, titles and years from BX-Books.csv; no timestamps, so
the file order is the interaction order.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from recranker_jax.data.files import (
    NumberField,
    locate_files,
    read_csv_records,
    require_rows,
)
from recranker_jax.data.table import Interactions, build_interactions
from recranker_jax.errors import RecRankerError

logger = logging.getLogger(__name__)

RATINGS_FILE = "BX-Book-Ratings.csv"
BOOKS_FILE = "BX-Books.csv"
RATINGS_HEADER = ("User-ID", "ISBN", "Book-Rating")
BOOKS_HEADER = (
    "ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher",
    "Image-URL-S", "Image-URL-M", "Image-URL-L",
)  # fmt: skip
BOOKCROSSING_SCALE = (1.0, 10.0)
IMPLICIT_RATING = 0


def normalise_isbn(isbns: np.ndarray) -> pd.Series:
    """ISBNs as matched between the two files: surrounding spaces dropped, check digit 'x' upper-cased."""
    return pd.Series(isbns, dtype=object).astype(str).str.strip().str.upper()


def load_bookcrossing(path: str | Path, on_bad_lines: str) -> Interactions:
    """BookCrossing ratings with book titles; rating 0 (implicit feedback) is dropped.

    Malformed records (wrong field count, a User-ID that is not a whole number,
    a Book-Rating that is not 0-10, an empty ISBN) raise under
    on_bad_lines="error" and are skipped and counted under "skip"; that also
    holds for BX-Books.csv records with the wrong field count. The number of
    dropped implicit ratings is logged (it is not a malformed line). Titles
    have HTML entities ("&amp;") decoded; Year-Of-Publication 0 or not a
    number means unknown. Rated ISBNs missing from BX-Books.csv get the
    fallback title "book #<ISBN>".
    """
    files = locate_files(path, (RATINGS_FILE, BOOKS_FILE), source="BookCrossing BX-CSV-Dump")
    ratings = read_csv_records(
        files[RATINGS_FILE],
        header=RATINGS_HEADER,
        number_fields=(NumberField("User-ID", whole=True), NumberField("Book-Rating", low=0, high=10)),
        nonempty_fields=("ISBN",),
        on_bad_lines=on_bad_lines,
    )
    require_rows(ratings, 'a header "User-ID";"ISBN";"Book-Rating" and lines like "276725";"034545104X";"5"')
    explicit = ratings.columns["Book-Rating"] != IMPLICIT_RATING
    n_implicit = int((~explicit).sum())
    if not explicit.any():
        raise RecRankerError(
            f"{ratings.file}: no explicit ratings; all {n_implicit} have Book-Rating 0 (implicit feedback)"
        )
    if n_implicit:
        logger.info("%s: dropped %d implicit ratings (Book-Rating 0)", ratings.file, n_implicit)
    ratings = ratings.select(explicit)

    books = read_csv_records(files[BOOKS_FILE], header=BOOKS_HEADER, on_bad_lines=on_bad_lines)
    titles = pd.Series(books.columns["Book-Title"], dtype=object).astype(str)
    has_entity = titles.str.contains("&", regex=False)
    titles = titles.where(~has_entity, titles[has_entity].map(html.unescape))
    year = pd.to_numeric(pd.Series(books.columns["Year-Of-Publication"], dtype=object), errors="coerce")
    item_meta = pd.DataFrame(
        {
            "item_id": normalise_isbn(books.columns["ISBN"]),
            "title": titles,
            "year": year.where(year > 0),
            "genres": "",
        }
    )
    return build_interactions(
        user_raw=pd.Series(ratings.columns["User-ID"]),
        item_raw=normalise_isbn(ratings.columns["ISBN"]),
        rating=ratings.columns["Book-Rating"],
        timestamp=None,
        item_meta=item_meta,
        name="bookcrossing",
        scale=BOOKCROSSING_SCALE,
        item_noun="book",
        skipped_lines=ratings.skipped_lines + books.skipped_lines,
    )
