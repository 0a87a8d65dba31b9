"""Shared helpers of the file-based sources (GroupLens MovieLens, BookCrossing).

`locate_files` finds a source's files in a folder or a .zip (at the top or one
folder down); the `read_*` functions turn delimited text into string columns
with line numbers, and `convert_numbers` checks and converts numeric columns,
both applying the data.on_bad_lines policy ("error" or "skip").
"""

from __future__ import annotations

import _csv
import codecs
import csv
import dataclasses
import io
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from recranker_jax.errors import RecRankerError

BAD_LINE_POLICIES = ("error", "skip")
SKIP_HINT = "fix the file or set data.on_bad_lines=skip to skip such lines"
_IGNORED_FOLDERS = ("__MACOSX",)
_BINARY_SNIFF_BYTES = 1 << 16


# ---------------------------------------------------------------- locating files


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One file of a source, on disk or inside a zip; `name` is how messages refer to it."""

    name: str
    disk_path: Path | None = None
    zip_path: Path | None = None
    member: str | None = None

    def read_bytes(self) -> bytes:
        try:
            if self.zip_path is None:
                assert self.disk_path is not None
                return self.disk_path.read_bytes()
            with zipfile.ZipFile(self.zip_path) as archive:
                return archive.read(self.member)
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise RecRankerError(f"{self.name}: cannot be read ({reason})") from None


def _and_list(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def locate_files(path: str | Path, file_names: Sequence[str], *, source: str) -> dict[str, DataFile]:
    """The files `file_names` of one source, all in one folder of `path`.

    `path` is a folder or a .zip (or one of the files itself); the files lie at
    its top or in one folder one level down (as in the official zips, which
    hold "ml-100k/u.data"). `source` names the download in error messages.
    """
    root = Path(path).expanduser()
    expected = f"expected a folder or .zip holding {_and_list(file_names)} (the {source} files)"
    if not root.exists():
        raise RecRankerError(f"data.path {root} does not exist; {expected}")
    if root.is_file() and root.name in file_names:
        root = root.parent
    if root.is_dir():
        return _locate_in_folder(root, file_names, expected)
    if zipfile.is_zipfile(root):
        return _locate_in_zip(root, file_names, expected)
    raise RecRankerError(f"data.path {root} is neither a folder nor a .zip archive; {expected}")


def _pick_folder(
    root_name: str, candidates: dict[str, set[str]], file_names: Sequence[str], expected: str
) -> str:
    """The key of the candidate folder holding the first file ("" is the top)."""
    first = file_names[0]
    if first in candidates.get("", set()):
        chosen = ""
    else:
        holders = sorted(key for key, names in candidates.items() if key and first in names)
        if not holders:
            raise RecRankerError(f"{root_name}: no {first} at the top or one folder down; {expected}")
        if len(holders) > 1:
            raise RecRankerError(
                f"{root_name}: {first} found in several folders ({', '.join(holders)}); "
                "point data.path at one of them"
            )
        chosen = holders[0]
    missing = [name for name in file_names if name not in candidates[chosen]]
    if missing:
        folder = f"{root_name}/{chosen}" if chosen else root_name
        raise RecRankerError(f"{folder}: {_and_list(missing)} not found next to {first}; {expected}")
    return chosen


def _locate_in_folder(root: Path, file_names: Sequence[str], expected: str) -> dict[str, DataFile]:
    def present(folder: Path) -> set[str]:
        return {name for name in file_names if (folder / name).is_file()}

    candidates = {"": present(root)}
    if file_names[0] not in candidates[""]:
        try:
            subfolders = [p for p in root.iterdir() if p.is_dir()]
        except OSError as err:
            raise RecRankerError(f"data.path {root} cannot be listed ({err.strerror}); {expected}") from None
        for sub in subfolders:
            if not sub.name.startswith(".") and sub.name not in _IGNORED_FOLDERS:
                candidates[sub.name] = present(sub)
    chosen = _pick_folder(str(root), candidates, file_names, expected)
    folder = root / chosen if chosen else root
    return {name: DataFile(name=str(folder / name), disk_path=folder / name) for name in file_names}


def _locate_in_zip(root: Path, file_names: Sequence[str], expected: str) -> dict[str, DataFile]:
    try:
        with zipfile.ZipFile(root) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (OSError, zipfile.BadZipFile) as err:
        raise RecRankerError(f"data.path {root} is not a readable zip archive ({err}); {expected}") from None
    candidates: dict[str, set[str]] = {"": set()}
    for member in members:
        parts = PurePosixPath(member).parts
        if len(parts) == 1:
            candidates[""].add(parts[0])
        elif len(parts) == 2 and not parts[0].startswith(".") and parts[0] not in _IGNORED_FOLDERS:
            candidates.setdefault(parts[0], set()).add(parts[1])
    chosen = _pick_folder(str(root), candidates, file_names, expected)
    files = {}
    for name in file_names:
        member = f"{chosen}/{name}" if chosen else name
        files[name] = DataFile(name=f"{root}/{member}", zip_path=root, member=member)
    return files


# ---------------------------------------------------------------- rows of a file


@dataclasses.dataclass(frozen=True)
class Rows:
    """The well-formed records of one file, column by column, with their line numbers."""

    file: str
    columns: dict[str, np.ndarray]
    line_numbers: np.ndarray
    skipped_lines: int = 0

    def __len__(self) -> int:
        return len(self.line_numbers)

    def select(self, keep: np.ndarray) -> Rows:
        return dataclasses.replace(
            self,
            columns={name: values[keep] for name, values in self.columns.items()},
            line_numbers=self.line_numbers[keep],
        )


def check_policy(on_bad_lines: str) -> None:
    if on_bad_lines not in BAD_LINE_POLICIES:
        raise RecRankerError(
            f"data.on_bad_lines={on_bad_lines!r}: expected one of {', '.join(BAD_LINE_POLICIES)}"
        )


def reject_rows(
    rows: Rows,
    bad: np.ndarray,
    describe: Callable[[int], str],
    on_bad_lines: str,
    pending: tuple[int, str] | None = None,
) -> Rows:
    """Apply the policy to the rows flagged `bad`: raise on the first, or drop and count them.

    `describe(i)` says what is wrong with row i (e.g. "rating 'abc' is not a number").
    `pending` is a malformed line (number, problem) a reader met under
    on_bad_lines=error; whichever of it and the first bad row comes first in
    the file is reported.
    """
    if on_bad_lines == "error":
        first = int(np.flatnonzero(bad)[0]) if bad.any() else None
        if first is not None and (pending is None or rows.line_numbers[first] < pending[0]):
            pending = (int(rows.line_numbers[first]), describe(first))
        if pending is not None:
            raise RecRankerError(f"{rows.file} line {pending[0]}: {pending[1]}; {SKIP_HINT}")
    if not bad.any():
        return rows
    kept = rows.select(~bad)
    return dataclasses.replace(kept, skipped_lines=rows.skipped_lines + int(bad.sum()))


def _reject_binary(data: bytes, file: str, expected: str) -> None:
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        raise RecRankerError(f"{file}: not a text file (found binary data); expected {expected}")


def decode_text(data_file: DataFile, expected: str) -> str:
    """The file's text: UTF-8 when it is valid UTF-8, else latin-1 (the encoding of the original downloads)."""
    data = data_file.read_bytes()
    _reject_binary(data, data_file.name, expected)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.removeprefix("\ufeff")


def read_split_lines(
    data_file: DataFile,
    *,
    separator: str,
    separator_name: str,
    fields: Sequence[str],
    on_bad_lines: str,
    number_fields: Sequence[NumberField] = (),
    fields_description: str | None = None,
) -> Rows:
    """Split each line of a small text file on `separator` into `fields`.

    Blank lines are ignored; a line with another number of fields is malformed,
    and so is one whose `number_fields` fail `convert_numbers`. Columns are
    strings except the number fields. For metadata files (u.item, movies.dat);
    the large ratings files use `read_number_lines`.
    """
    check_policy(on_bad_lines)
    shape = FieldShape(separator_name, fields, fields_description or ", ".join(fields))
    text = decode_text(data_file, shape.expected)
    lines = text.replace("\r\n", "\n").split("\n")
    records = [line.split(separator) if line.strip() else [] for line in lines]
    line_numbers = np.arange(1, len(records) + 1, dtype=np.int64)
    return _rows_from_records(data_file.name, shape, records, line_numbers, on_bad_lines, number_fields)


@dataclasses.dataclass(frozen=True)
class FieldShape:
    """How a file's records look, for messages: "tab-separated", the field names, their description."""

    separator_name: str
    fields: Sequence[str]
    description: str

    @property
    def expected(self) -> str:
        return f"{self.separator_name} lines ({self.description})"

    def count_problem(self, got: int) -> str:
        return f"expected {len(self.fields)} {self.separator_name} fields ({self.description}), got {got}"


def _rows_from_records(
    file: str,
    shape: FieldShape,
    records: list[list[str]],
    line_numbers: np.ndarray,
    on_bad_lines: str,
    number_fields: Sequence[NumberField],
    nonempty_fields: Sequence[str] = (),
) -> Rows:
    """Rows from split records ([] for a blank line): field counts, then `convert_numbers`."""
    n_fields = len(shape.fields)
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    blank = lengths == 0
    malformed = ~blank & (lengths != n_fields)
    good = ~blank & ~malformed
    pending, skipped = None, 0
    if malformed.any():
        if on_bad_lines == "error":
            first = int(np.flatnonzero(malformed)[0])
            pending = (int(line_numbers[first]), shape.count_problem(int(lengths[first])))
            good[first:] = False  # only records before it can hold an earlier problem
        else:
            skipped = int(malformed.sum())
    kept = records if good.all() else [records[index] for index in np.flatnonzero(good)]
    table = np.array(kept, dtype=object) if kept else np.empty((0, n_fields), dtype=object)
    columns = {field: table[:, index] for index, field in enumerate(shape.fields)}
    rows = Rows(file, columns, line_numbers[good], skipped)
    return convert_numbers(rows, number_fields, on_bad_lines, pending=pending, nonempty_fields=nonempty_fields)


def read_csv_records(
    data_file: DataFile,
    *,
    header: Sequence[str],
    on_bad_lines: str,
    number_fields: Sequence[NumberField] = (),
    nonempty_fields: Sequence[str] = (),
    delimiter: str = ";",
    escapechar: str | None = "\\",
) -> Rows:
    """Read a quoted CSV file whose first record is `header`; columns are named by the header.

    Quoting follows the BookCrossing dump: every field in double quotes,
    backslash-escaped quotes inside fields. A record with another number of
    fields is malformed (its line number is where the record starts), and so is
    one whose `number_fields` or `nonempty_fields` fail `convert_numbers`.
    """
    check_policy(on_bad_lines)
    shape = FieldShape(f"'{delimiter}'-separated", header, ", ".join(header))
    text = decode_text(data_file, f"{shape.separator_name} quoted fields ({shape.description})")

    def reader() -> _csv.Reader:
        return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', escapechar=escapechar)

    records_reader = reader()
    try:
        records = list(records_reader)
        physical_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        if len(records) == physical_lines:  # no record spans lines: record k is on line k + 1
            line_numbers = np.arange(1, len(records) + 1, dtype=np.int64)
        else:  # a quoted field holds a line break: track where each record starts
            records_reader, starts, last_line = reader(), [], 0
            for _ in records_reader:
                starts.append(last_line + 1)
                last_line = records_reader.line_num
            line_numbers = np.asarray(starts, dtype=np.int64)
    except csv.Error as err:
        raise RecRankerError(f"{data_file.name} line {records_reader.line_num}: not valid CSV ({err})") from None
    if not records:
        return _rows_from_records(data_file.name, shape, [], line_numbers, on_bad_lines, number_fields)
    if [name.strip().lower() for name in records[0]] != [name.lower() for name in header]:
        shown = delimiter.join(records[0])[:120]
        raise RecRankerError(f"{data_file.name} line 1: expected the header {delimiter.join(header)}, got {shown!r}")
    return _rows_from_records(
        data_file.name, shape, records[1:], line_numbers[1:], on_bad_lines, number_fields, nonempty_fields
    )


def _unused_byte(data: bytes) -> bytes:
    for candidate in (b"\x1f", b"\x1e", b"\x1d", b"\x1c", b"\x01", b"\x02"):
        if candidate not in data:
            return candidate
    raise RecRankerError("internal: no free separator byte")  # unreachable for text files


def read_number_lines(
    data_file: DataFile,
    *,
    separator: str,
    separator_name: str,
    fields: Sequence[str],
    number_fields: Sequence[NumberField],
    on_bad_lines: str,
) -> Rows:
    """Read a large, unquoted, numbers-only delimited file (u.data, ratings.dat) quickly.

    Fields per line are counted with numpy on the raw bytes; well-formed lines
    are then parsed by pandas' C parser and checked by `convert_numbers`.
    Blank lines are ignored. About a second per million lines.
    """
    check_policy(on_bad_lines)
    shape = FieldShape(separator_name, fields, ", ".join(fields))
    data = data_file.read_bytes()
    _reject_binary(data, data_file.name, shape.expected)
    data = data.removeprefix(codecs.BOM_UTF8).replace(b"\r", b"")
    delimiter = separator.encode("latin-1")
    if len(delimiter) > 1:  # one byte per separator, with str.split's non-overlapping semantics
        single = _unused_byte(data)
        data, delimiter = data.replace(delimiter, single), single
    raw = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(raw)]])
    separators = np.flatnonzero(raw == delimiter[0])
    field_counts = np.searchsorted(separators, ends) - np.searchsorted(separators, starts) + 1
    blank = ends == starts
    malformed = ~blank & (field_counts != len(fields))
    for line in np.flatnonzero(malformed):  # lines of only spaces and separators count as blank
        if not data[starts[line] : ends[line]].replace(delimiter, b"").strip():
            blank[line], malformed[line] = True, False
    good = ~blank & ~malformed
    skipped = 0
    pending = None
    if malformed.any():
        if on_bad_lines == "error":
            line = int(np.flatnonzero(malformed)[0])
            pending = (line + 1, shape.count_problem(int(field_counts[line])))
            good[line:] = False  # only lines before it can hold an earlier problem
        else:
            skipped = int(malformed.sum())
    line_numbers = np.flatnonzero(good).astype(np.int64) + 1
    if not good.any():
        empty = {field: np.empty(0, dtype=object) for field in fields}
        rows = Rows(data_file.name, empty, line_numbers, skipped)
        return convert_numbers(rows, number_fields, on_bad_lines, pending=pending)
    if not (~good & (ends > starts)).any():
        clean = data  # only empty lines to drop, which the parser skips itself
    else:
        view = memoryview(data)
        clean = b"\n".join(view[s:e] for s, e in zip(starts[good], ends[good], strict=True))
    frame = pd.read_csv(
        io.BytesIO(clean),
        sep=delimiter.decode("latin-1"),
        header=None,
        names=list(fields),
        quoting=csv.QUOTE_NONE,
        na_filter=False,
        skip_blank_lines=True,
        low_memory=False,
        encoding="latin-1",
        engine="c",
    )
    if len(frame) != len(line_numbers):  # should not happen: counted and parsed lines agree
        raise RecRankerError(f"{data_file.name}: could not be parsed as {shape.expected}")
    columns = {field: frame[field].to_numpy() for field in fields}
    rows = Rows(data_file.name, columns, line_numbers, skipped)
    return convert_numbers(rows, number_fields, on_bad_lines, pending=pending)


# ---------------------------------------------------------------- numbers


@dataclasses.dataclass(frozen=True)
class NumberField:
    """A column that must hold numbers: whole numbers (ids, timestamps) and/or within [low, high]."""

    name: str
    whole: bool = False
    low: float | None = None
    high: float | None = None


def _parse_numbers(values: np.ndarray) -> np.ndarray:
    """float64 values, NaN where a value is not a number."""
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    if values.dtype.kind == "b":  # pandas read "True"/"False": text, not numbers
        values = values.astype(str).astype(object)
    try:
        return values.astype(np.float64)
    except (ValueError, TypeError):
        text = pd.Series(np.asarray(values, dtype=str)).str.strip()
        return pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def convert_numbers(
    rows: Rows,
    number_fields: Sequence[NumberField],
    on_bad_lines: str,
    pending: tuple[int, str] | None = None,
    nonempty_fields: Sequence[str] = (),
) -> Rows:
    """Replace the named string columns by numbers (int64 for whole fields, else float64).

    A value that is not a number, not whole where it must be, or out of range,
    or an empty (blank) value in one of `nonempty_fields`, makes its line
    malformed: an error under on_bad_lines=error, skipped and counted under
    skip. `pending`: see `reject_rows`.
    """
    check_policy(on_bad_lines)
    parsed: dict[str, np.ndarray] = {}
    problems: dict[str, np.ndarray] = {}  # 0 ok, 1 not a number, 2 not whole, 3 out of range
    empty = {
        name: pd.Series(rows.columns[name], dtype=object).astype(str).str.strip().eq("").to_numpy()
        for name in nonempty_fields
    }
    for field in number_fields:
        values = _parse_numbers(rows.columns[field.name])
        problem = np.where(np.isfinite(values), 0, 1)
        if field.whole:
            problem = np.where((problem == 0) & (values != np.round(values)), 2, problem)
        if field.low is not None:
            problem = np.where((problem == 0) & (values < field.low), 3, problem)
        if field.high is not None:
            problem = np.where((problem == 0) & (values > field.high), 3, problem)
        parsed[field.name] = values
        problems[field.name] = problem

    def describe(index: int) -> str:
        for name, is_empty in empty.items():
            if is_empty[index]:
                return f"{name} is empty"
        for field in number_fields:
            kind = problems[field.name][index]
            if kind:
                value = _shown(rows.columns[field.name][index])
                if kind == 1:
                    return f"{field.name} {value} is not a number"
                if kind == 2:
                    return f"{field.name} {value} is not a whole number"
                if field.low is not None and field.high is not None:
                    return f"{field.name} {value} is outside {field.low:g}-{field.high:g}"
                if field.low is not None:
                    return f"{field.name} {value} is below {field.low:g}"
                return f"{field.name} {value} is above {field.high:g}"
        raise AssertionError("row has no problem")

    converted = dataclasses.replace(
        rows,
        columns={
            **rows.columns,
            **{
                field.name: np.nan_to_num(parsed[field.name]).astype(np.int64) if field.whole else parsed[field.name]
                for field in number_fields
            },
        },
    )
    bad = np.zeros(len(rows), dtype=bool)
    for problem in problems.values():
        bad |= problem != 0
    for is_empty in empty.values():
        bad |= is_empty
    return reject_rows(converted, bad, describe, on_bad_lines, pending)


def require_rows(rows: Rows, expected: str) -> None:
    """Raise when a ratings file has no usable record."""
    if len(rows) == 0:
        skipped = f" ({rows.skipped_lines} malformed lines skipped)" if rows.skipped_lines else ""
        raise RecRankerError(f"{rows.file}: no ratings{skipped}; expected {expected}")
