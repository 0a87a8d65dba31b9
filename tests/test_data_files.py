"""File-based sources (GroupLens ml-100k / ml-1m, BookCrossing, TFDS): fixtures written in the real formats."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recranker_jax.cli import main
from recranker_jax.data.bookcrossing import load_bookcrossing
from recranker_jax.data.grouplens import load_ml1m, load_ml100k
from recranker_jax.data.tfds_source import load_tfds
from recranker_jax.errors import RecRankerError

# ---------------------------------------------------------------- fixtures in the GroupLens / BX formats

# (user, item, rating, timestamp) as written to u.data / ratings.dat
ML_RATINGS = [
    (196, 2, 3, 881250949),
    (186, 1, 5, 891717742),
    (22, 4, 1, 878887116),
    (196, 1, 4, 881251000),
    (22, 2, 2, 878887200),
    (186, 5, 4, 891717800),  # movie 5 is not in u.item / movies.dat
]


def flags(*genres: str) -> str:
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
             "War", "Western"]  # fmt: skip
    return "|".join("1" if name in genres else "0" for name in names)


U_ITEM = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
    + flags("Animation", "Children's", "Comedy"),
    f"2|Café (1994)|01-Jan-1994||http://us.imdb.com/Title?Caf%E9|{flags('Drama', 'Romance')}",
    f"3|Untitled|12-Mar-1997||http://us.imdb.com/x|{flags('unknown')}",
    f"4|Heat (1995)|15-Dec-1995||http://us.imdb.com/y|{flags('Action', 'Crime', 'Thriller')}",
]
ML100K_EXPECTED_ITEMS = {
    1: ("Toy Story (1995)", 1995, "Animation|Children's|Comedy"),
    2: ("Café (1994)", 1994, "Drama|Romance"),
    4: ("Heat (1995)", 1995, "Action|Crime|Thriller"),
    5: ("movie #5", None, ""),
}
MOVIES_DAT = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)::Comedy|Romance",
    "4::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
]
ML1M_EXPECTED_ITEMS = {
    1: ("Toy Story (1995)", 1995, "Animation|Children's|Comedy"),
    2: ("Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", 2001, "Comedy|Romance"),
    4: ("Star Wars: Episode IV - A New Hope (1977)", 1977, "Action|Adventure|Fantasy|Sci-Fi"),
    5: ("movie #5", None, ""),
}


def u_data_lines(ratings=ML_RATINGS) -> list[str]:
    return [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings]


def write_lines(path: Path, lines: list[str], encoding: str = "latin-1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def ml100k_folder(root: Path, data_lines: list[str] | None = None, item_lines: list[str] | None = None) -> Path:
    write_lines(root / "u.data", u_data_lines() if data_lines is None else data_lines)
    write_lines(root / "u.item", U_ITEM if item_lines is None else item_lines)
    return root


def ml1m_folder(root: Path, rating_lines: list[str] | None = None, movie_lines: list[str] | None = None) -> Path:
    default_ratings = [f"{u}::{i}::{r}::{t}" for u, i, r, t in ML_RATINGS]
    write_lines(root / "ratings.dat", default_ratings if rating_lines is None else rating_lines)
    write_lines(root / "movies.dat", MOVIES_DAT if movie_lines is None else movie_lines)
    return root


def zip_folder(folder: Path, zip_path: Path, inner: str) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{inner}/{file.name}" if inner else file.name)
    return zip_path


BX_RATINGS = [
    '"User-ID";"ISBN";"Book-Rating"',
    '"276725";"034545104X";"0"',  # implicit: dropped
    '"276726";"0155061224";"5"',
    '"276727";"0446520802";"0"',  # implicit: dropped
    '"276729";"052165615x";"3"',  # lower-case check digit, matches 052165615X
    '"276729";"0521795028";"6"',  # no BX-Books entry
    '"276726";"034545104X";"10"',
]
BX_EXPLICIT = [(276726, "0155061224", 5), (276729, "052165615X", 3), (276729, "0521795028", 6),
               (276726, "034545104X", 10)]  # fmt: skip
BX_BOOKS = [
    '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"',
    '"034545104X";"Flesh Tones: A Novel";"M. J. Rose";"2002";"Ballantine Books";"http://s";"http://m";"http://l"',
    '"0155061224";"Rites of Passage \\"Rough\\" Cut";"Judith Rae";"2001";"Heinle";"http://s";"http://m";"http://l"',
    '"052165615X";"Café Stories &amp; Tales";"Amélie Nothomb";"0";"Cambridge";"http://s";"http://m";"http://l"',
]
BX_EXPECTED_ITEMS = {
    "034545104X": ("Flesh Tones: A Novel", 2002),
    "0155061224": ('Rites of Passage "Rough" Cut', 2001),
    "052165615X": ("Café Stories & Tales", None),
    "0521795028": ("book #0521795028", None),
}


def bx_folder(root: Path, rating_lines: list[str] | None = None, book_lines: list[str] | None = None) -> Path:
    write_lines(root / "BX-Book-Ratings.csv", BX_RATINGS if rating_lines is None else rating_lines)
    write_lines(root / "BX-Books.csv", BX_BOOKS if book_lines is None else book_lines)
    return root


def plain(value):
    """A numpy scalar as the Python value it holds, so that dict keys compare with the fixtures."""
    return value.item() if isinstance(value, np.generic) else value


def ratings_by_raw_ids(table) -> dict:
    """{(raw user, raw item): (rating, timestamp)} read back through the table's indices."""
    users = table.user_ids[table.ratings["user"].to_numpy()]
    items = table.items["item_id"].to_numpy()[table.ratings["item"].to_numpy()]
    values = zip(table.ratings["rating"], table.ratings["timestamp"], strict=True)
    return {(plain(u), plain(i)): value for u, i, value in zip(users, items, values, strict=True)}


def items_by_raw_id(table) -> dict:
    """{raw item id: (title, year or None, genres)}."""
    return {
        plain(row.item_id): (row.title, None if pd.isna(row.year) else int(row.year), row.genres)
        for row in table.items.itertuples()
    }


def bad_input(call) -> str:
    with pytest.raises(RecRankerError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- ml-100k


def test_ml100k_folder_gives_ratings_titles_years_and_genres(tmp_path):
    table = load_ml100k(ml100k_folder(tmp_path / "ml-100k"), "error")
    assert table.name == "ml-100k" and table.scale == (1.0, 5.0) and table.has_timestamps
    assert (table.n_users, table.n_items, len(table.ratings), table.skipped_lines) == (3, 4, 6, 0)
    assert list(table.user_ids) == [22, 186, 196]
    assert ratings_by_raw_ids(table) == {(u, i): (float(r), t) for u, i, r, t in ML_RATINGS}
    assert items_by_raw_id(table) == ML100K_EXPECTED_ITEMS
    assert table.ratings["order"].tolist() == list(range(6))


def test_ml100k_year_falls_back_to_release_date_and_unknown_genre_is_not_listed(tmp_path):
    lines = u_data_lines() + ["22\t3\t4\t878887300"]
    table = load_ml100k(ml100k_folder(tmp_path, data_lines=lines), "error")
    assert items_by_raw_id(table)[3] == ("Untitled", 1997, "")


@pytest.mark.parametrize("inner", ["ml-100k", ""])
def test_ml100k_zip_gives_the_same_table_as_the_folder(tmp_path, inner):
    folder = ml100k_folder(tmp_path / "ml-100k")
    from_folder = load_ml100k(folder, "error")
    from_zip = load_ml100k(zip_folder(folder, tmp_path / "ml-100k.zip", inner), "error")
    assert from_zip.ratings.equals(from_folder.ratings)
    assert from_zip.items.equals(from_folder.items)
    assert items_by_raw_id(from_zip)[2][0] == "Café (1994)"


def test_ml100k_files_one_folder_down(tmp_path):
    ml100k_folder(tmp_path / "downloads" / "ml-100k")
    table = load_ml100k(tmp_path / "downloads", "error")
    assert len(table.ratings) == len(ML_RATINGS)


def test_ml100k_wrong_field_count_names_file_line_and_the_skip_option(tmp_path):
    lines = u_data_lines()
    lines[2] = "22\t4\t1"
    message = bad_input(lambda: load_ml100k(ml100k_folder(tmp_path, data_lines=lines), "error"))
    expected = "line 3: expected 4 tab-separated fields (user, item, rating, timestamp), got 3"
    assert f"{tmp_path / 'u.data'} {expected}" in message
    assert "data.on_bad_lines=skip" in message


def test_ml100k_non_numeric_value_is_reported_with_its_line(tmp_path):
    lines = u_data_lines()
    lines[1] = "186\t1\tabc\t891717742"
    ml100k_folder(tmp_path, data_lines=lines)
    assert "u.data line 2: rating 'abc' is not a number" in bad_input(lambda: load_ml100k(tmp_path, "error"))
    lines[1] = "1x6\t1\t5\t891717742"
    ml100k_folder(tmp_path, data_lines=lines)
    assert "u.data line 2: user '1x6' is not a number" in bad_input(lambda: load_ml100k(tmp_path, "error"))


def test_ml100k_reports_the_first_bad_line_whatever_its_kind(tmp_path):
    lines = u_data_lines()
    lines[1], lines[3] = "186\t1\t9\t891717742", "196\t1"  # out of range on line 2, too few fields on line 4
    ml100k_folder(tmp_path, data_lines=lines)
    assert "u.data line 2: rating '9' is outside 1-5" in bad_input(lambda: load_ml100k(tmp_path, "error"))
    lines[1], lines[3] = "196\t1", "186\t1\t9\t891717742"
    ml100k_folder(tmp_path, data_lines=lines)
    assert "u.data line 2: expected 4" in bad_input(lambda: load_ml100k(tmp_path, "error"))


def test_ml100k_skip_drops_and_counts_every_kind_of_bad_line(tmp_path):
    lines = u_data_lines()
    lines[1] = "186\t1\tabc\t891717742"  # not a number
    lines[2] = "22\t4\t1"  # too few fields
    lines[4] = "22\t2\t7\t878887200"  # out of range
    lines.insert(3, "")  # blank lines are not malformed
    items = U_ITEM + ["5|Broken"]
    table = load_ml100k(ml100k_folder(tmp_path, data_lines=lines, item_lines=items), "skip")
    assert table.skipped_lines == 4
    kept = [ML_RATINGS[i] for i in (0, 3, 5)]
    assert ratings_by_raw_ids(table) == {(u, i): (float(r), t) for u, i, r, t in kept}
    assert items_by_raw_id(table)[5][0] == "movie #5"


def test_ml100k_comma_separated_data_fails_on_line_1(tmp_path):
    lines = [f"{u},{i},{r},{t}" for u, i, r, t in ML_RATINGS]
    message = bad_input(lambda: load_ml100k(ml100k_folder(tmp_path, data_lines=lines), "error"))
    assert "u.data line 1: expected 4 tab-separated fields" in message and "got 1" in message


def test_ml100k_u_item_problems_are_bad_lines_too(tmp_path):
    short = U_ITEM[:1] + ["2|Café (1994)|01-Jan-1994||url|" + flags("Drama")[2:]] + U_ITEM[2:]
    message = bad_input(lambda: load_ml100k(ml100k_folder(tmp_path, item_lines=short), "error"))
    assert "u.item line 2: expected 24 '|'-separated fields" in message and "got 23" in message
    bad_flag = U_ITEM[:3] + [U_ITEM[3][:-1] + "2"]
    message = bad_input(lambda: load_ml100k(ml100k_folder(tmp_path, item_lines=bad_flag), "error"))
    assert "u.item line 4: Western flag '2' is outside 0-1" in message


def test_ml100k_binary_and_empty_files_are_rejected(tmp_path):
    ml100k_folder(tmp_path)
    (tmp_path / "u.data").write_bytes(b"PK\x03\x04\x00\x00binary")
    assert "u.data: not a text file" in bad_input(lambda: load_ml100k(tmp_path, "error"))
    (tmp_path / "u.data").write_bytes(b"")
    assert f"{tmp_path / 'u.data'}: no ratings" in bad_input(lambda: load_ml100k(tmp_path, "error"))
    write_lines(tmp_path / "u.data", ["196\t2"])
    message = bad_input(lambda: load_ml100k(tmp_path, "skip"))
    assert "u.data: no ratings (1 malformed lines skipped)" in message


def test_missing_path_and_missing_file_are_named(tmp_path):
    message = bad_input(lambda: load_ml100k(tmp_path / "nowhere", "error"))
    assert str(tmp_path / "nowhere") in message and "does not exist" in message and "u.data and u.item" in message
    folder = tmp_path / "ml-100k"
    write_lines(folder / "u.data", u_data_lines())
    message = bad_input(lambda: load_ml100k(folder, "error"))
    assert f"{folder}: u.item not found next to u.data" in message
    message = bad_input(lambda: load_ml1m(folder, "error"))
    assert "no ratings.dat at the top or one folder down" in message and "ratings.dat and movies.dat" in message


def test_two_candidate_folders_are_an_error_not_a_guess(tmp_path):
    ml100k_folder(tmp_path / "a")
    ml100k_folder(tmp_path / "b")
    message = bad_input(lambda: load_ml100k(tmp_path, "error"))
    assert "u.data found in several folders (a, b)" in message


def test_missing_file_inside_zip_and_non_zip_file(tmp_path):
    folder = tmp_path / "src"
    write_lines(folder / "u.data", u_data_lines())
    archive = zip_folder(folder, tmp_path / "ml-100k.zip", "ml-100k")
    assert f"{archive}/ml-100k: u.item not found" in bad_input(lambda: load_ml100k(archive, "error"))
    not_zip = write_lines(tmp_path / "ml-100k.tar", ["hello"])
    assert "is neither a folder nor a .zip archive" in bad_input(lambda: load_ml100k(not_zip, "error"))


# ---------------------------------------------------------------- ml-1m


def test_ml1m_latin1_titles_with_colons_years_and_genres(tmp_path):
    table = load_ml1m(ml1m_folder(tmp_path / "ml-1m"), "error")
    assert table.name == "ml-1m" and table.scale == (1.0, 5.0)
    assert ratings_by_raw_ids(table) == {(u, i): (float(r), t) for u, i, r, t in ML_RATINGS}
    assert items_by_raw_id(table) == ML1M_EXPECTED_ITEMS


def test_ml1m_zip_and_utf8_movies_file(tmp_path):
    folder = ml1m_folder(tmp_path / "ml-1m")
    write_lines(folder / "movies.dat", MOVIES_DAT, encoding="utf-8")  # a re-encoded copy reads the same
    table = load_ml1m(zip_folder(folder, tmp_path / "ml-1m.zip", "ml-1m"), "error")
    assert items_by_raw_id(table) == ML1M_EXPECTED_ITEMS


def test_ml1m_bad_lines(tmp_path):
    lines = [f"{u}::{i}::{r}::{t}" for u, i, r, t in ML_RATINGS]
    lines[4] = "22::2::2"
    ml1m_folder(tmp_path, rating_lines=lines)
    message = bad_input(lambda: load_ml1m(tmp_path, "error"))
    assert "ratings.dat line 5: expected 4 '::'-separated fields (user, item, rating, timestamp), got 3" in message
    lines[4] = "22::2::2::soon"
    ml1m_folder(tmp_path, rating_lines=lines)
    assert "ratings.dat line 5: timestamp 'soon' is not a number" in bad_input(lambda: load_ml1m(tmp_path, "error"))
    table = load_ml1m(tmp_path, "skip")
    assert table.skipped_lines == 1 and len(table.ratings) == 5
    movies = MOVIES_DAT + ["7::No genres field"]
    ml1m_folder(tmp_path, movie_lines=movies)
    assert "movies.dat line 4: expected 3 '::'-separated fields" in bad_input(lambda: load_ml1m(tmp_path, "error"))


# ---------------------------------------------------------------- BookCrossing


def test_bookcrossing_explicit_ratings_titles_and_file_order(tmp_path):
    table = load_bookcrossing(bx_folder(tmp_path / "BX-CSV-Dump"), "error")
    assert table.name == "bookcrossing" and table.scale == (1.0, 10.0)
    assert not table.has_timestamps and (table.ratings["timestamp"] == -1).all()
    assert table.skipped_lines == 0  # the two rating-0 rows are implicit feedback, not malformed
    assert ratings_by_raw_ids(table) == {(u, isbn): (float(r), -1) for u, isbn, r in BX_EXPLICIT}
    users = table.user_ids[table.ratings["user"]]
    isbns = table.items["item_id"].to_numpy()[table.ratings["item"]]
    assert list(zip(users, isbns, strict=True)) == [(u, isbn) for u, isbn, _ in BX_EXPLICIT]  # file order
    assert {isbn: (title, year) for isbn, (title, year, _) in items_by_raw_id(table).items()} == BX_EXPECTED_ITEMS
    assert (table.items["genres"] == "").all()


def test_bookcrossing_zip_and_bad_records(tmp_path):
    folder = bx_folder(tmp_path / "bx")
    table = load_bookcrossing(zip_folder(folder, tmp_path / "BX-CSV-Dump.zip", ""), "error")
    assert len(table.ratings) == len(BX_EXPLICIT)
    ratings = BX_RATINGS[:3] + ['"276730";"0155061224"', '"276731";"0155061224";"great"', '"";"0155061224";"7"',
                                '"276732";"";"7"', '"276733";"0155061224";"11"'] + BX_RATINGS[3:]  # fmt: skip
    bx_folder(folder, rating_lines=ratings)
    message = bad_input(lambda: load_bookcrossing(folder, "error"))
    expected = "BX-Book-Ratings.csv line 4: expected 3 ';'-separated fields (User-ID, ISBN, Book-Rating), got 2"
    assert expected in message
    table = load_bookcrossing(folder, "skip")
    assert table.skipped_lines == 5 and len(table.ratings) == len(BX_EXPLICIT)
    del ratings[3]
    bx_folder(folder, rating_lines=ratings)
    assert "line 4: Book-Rating 'great' is not a number" in bad_input(lambda: load_bookcrossing(folder, "error"))
    del ratings[3]
    bx_folder(folder, rating_lines=ratings)
    assert "line 4: User-ID '' is not a number" in bad_input(lambda: load_bookcrossing(folder, "error"))
    del ratings[3]
    bx_folder(folder, rating_lines=ratings)
    assert "line 4: ISBN is empty" in bad_input(lambda: load_bookcrossing(folder, "error"))
    del ratings[3]
    bx_folder(folder, rating_lines=ratings)
    assert "line 4: Book-Rating '11' is outside 0-10" in bad_input(lambda: load_bookcrossing(folder, "error"))


def test_bookcrossing_line_numbers_survive_a_line_break_inside_a_quoted_title(tmp_path):
    books = BX_BOOKS[:2] + ['"0155061224";"Two\nLines";"A";"2001";"P";"s";"m";"l"', '"052165615X";"Short";"A"']
    folder = bx_folder(tmp_path, book_lines=books)
    message = bad_input(lambda: load_bookcrossing(folder, "error"))
    assert "BX-Books.csv line 5: expected 8 ';'-separated fields" in message
    table = load_bookcrossing(folder, "skip")
    assert table.skipped_lines == 1 and items_by_raw_id(table)["0155061224"][0] == "Two\nLines"


def test_bookcrossing_header_and_all_implicit(tmp_path):
    folder = bx_folder(tmp_path, rating_lines=BX_RATINGS[1:])
    message = bad_input(lambda: load_bookcrossing(folder, "skip"))
    expected = "BX-Book-Ratings.csv line 1: expected the header User-ID;ISBN;Book-Rating, got '276725;034545104X;0'"
    assert expected in message
    folder = bx_folder(tmp_path, rating_lines=[BX_RATINGS[0], BX_RATINGS[1], BX_RATINGS[3]])
    message = bad_input(lambda: load_bookcrossing(folder, "error"))
    assert "no explicit ratings; all 2 have Book-Rating 0" in message


# ---------------------------------------------------------------- TFDS


def test_tfds_unsupported_name_and_missing_package(tmp_path, monkeypatch):
    message = bad_input(lambda: load_tfds("movielens/25m-ratings", tmp_path, "error"))
    assert "tfds:movielens/25m-ratings is not supported" in message and "tfds:movielens/100k-ratings" in message
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    message = bad_input(lambda: load_tfds("movielens/100k-ratings", tmp_path, "error"))
    assert 'pip install "recranker-jax[tfds]"' in message


def test_tfds_folder_with_the_grouplens_zip_reads_it_without_tensorflow(tmp_path):
    (tmp_path / "manual").mkdir()
    zip_folder(ml100k_folder(tmp_path / "src"), tmp_path / "manual" / "ml-100k.zip", "ml-100k")
    table = load_tfds("movielens/100k-ratings", tmp_path / "manual", "error")
    assert table.name == "tfds:movielens/100k-ratings"
    assert ratings_by_raw_ids(table) == {(u, i): (float(r), t) for u, i, r, t in ML_RATINGS}
    assert items_by_raw_id(table) == ML100K_EXPECTED_ITEMS


def test_tfds_prepared_dataset_matches_its_examples(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    name = "movielens/100k-ratings"
    assert "is not prepared in" in bad_input(lambda: load_tfds(name, tmp_path, "error"))
    with tfds.testing.mock_data(num_examples=12):
        table = load_tfds(name, tmp_path, "error")
        examples = list(tfds.as_numpy(tfds.load(name, split="train", data_dir=str(tmp_path))))
        genre_names = tfds.builder(name).info.features["movie_genres"].feature.names
    assert table.name == f"tfds:{name}" and len(table.ratings) == len(examples) == 12

    def raw(value: bytes):
        text = value.decode()
        return int(text) if text.isdigit() else text

    expected_ratings = {(raw(ex["user_id"]), raw(ex["movie_id"])): (float(ex["user_rating"]), int(ex["timestamp"]))
                        for ex in examples}  # fmt: skip
    got = ratings_by_raw_ids(table)
    assert got.keys() == expected_ratings.keys()
    for key, (rating, timestamp) in expected_ratings.items():
        assert got[key][0] == pytest.approx(rating) and got[key][1] == timestamp
    items = items_by_raw_id(table)
    for ex in examples:
        ids = set(ex["movie_genres"].tolist())
        names = [("Children's" if n == "Children" else n) for k, n in enumerate(genre_names)
                 if k in ids and n not in ("Unknown", "(no genres listed)")]  # fmt: skip
        title, _, genres = items[raw(ex["movie_id"])]
        assert title == ex["movie_title"].decode().strip() and genres == "|".join(names)


# ---------------------------------------------------------------- CLI: one line, exit code 2


def _cli_cases(tmp: Path) -> list[tuple[list[str], list[str]]]:
    bad_data = ml100k_folder(tmp / "bad", data_lines=u_data_lines()[:2] + ["186\t1\tabc\t891717742"])
    short_line = ml100k_folder(tmp / "short", data_lines=u_data_lines()[:4] + ["22\t4"])
    no_item = tmp / "no-item"
    write_lines(no_item / "u.data", u_data_lines())
    bx = bx_folder(tmp / "bx", rating_lines=BX_RATINGS[1:])
    return [
        (["data.source=ml-100k", f"data.path={tmp / 'missing'}"], ["does not exist", "u.data and u.item"]),
        (["data.source=ml-100k", f"data.path={no_item}"], [str(no_item), "u.item not found"]),
        (["data.source=ml-100k", f"data.path={short_line}"], ["u.data line 5: expected 4", "got 2"]),
        (["data.source=ml-100k", f"data.path={bad_data}"], ["u.data line 3: rating 'abc' is not a number"]),
        (["data.source=bookcrossing", f"data.path={bx}"], ["BX-Book-Ratings.csv line 1: expected the header"]),
        (["data.source=tfds:movielens/20m-ratings", f"data.path={tmp}"], ["is not supported"]),
    ]


def test_cli_source_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for overrides, fragments in _cli_cases(tmp_path):
        rc = main(["data", "stats", *overrides, f"run.root={tmp_path / 'runs'}"])
        err = capsys.readouterr().err
        assert rc == 2, (overrides, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        for fragment in fragments:
            assert fragment in err, (fragment, err)


def test_cli_skip_option_reaches_the_loader(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    liked = [f"{user}\t{item}\t5\t{1000 + 10 * item}" for user in (1, 2, 3) for item in (1, 2, 4, 5, 6)]
    lines = liked[:7] + ["186\t1\tabc\t891717742"] + liked[7:]
    folder = ml100k_folder(tmp_path / "bad", data_lines=lines)
    args = ["data", "stats", "--json", "data.source=ml-100k", f"data.path={folder}", f"run.root={tmp_path / 'runs'}"]
    assert main(args) == 2
    assert "u.data line 8: rating 'abc' is not a number" in capsys.readouterr().err
    assert main([*args, "data.on_bad_lines=skip"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["skipped_lines"] == 1
