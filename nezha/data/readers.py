"""Interaction files read in blocks with pyarrow: CSV, JSON lines or Parquet, one file or a directory of parts.

pyarrow rather than polars or DuckDB: it is already installed (Ray depends on it), it streams all three
formats in bounded blocks (`open_csv`, `open_json`, Parquet row groups), and its string kernels
(`index_in`, `dictionary_encode`) turn ids into integers without making a Python object per row.

Every block is checked as it is read; a problem is one line naming the file, the column and the row (or
line) and what to do. Refused: a missing column, a column of the wrong type, an empty id or order value,
a non-integer order value, timestamps whose unit (seconds, milliseconds, ...) differs between or within
parts. Skipped and counted (`InputStats`): an empty part (no rows, or no bytes), CSV lines with the wrong
number of fields (at most `MAX_MALFORMED_SHARE` of a part: beyond that the file is not what it claims).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from nezha.data.errors import DataError

log = logging.getLogger(__name__)

ID_COLUMNS = ("user_id", "item_id")
ORDER_COLUMNS = ("position", "timestamp")  # the first one a file has orders each user's interactions
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
MAX_MALFORMED_SHARE = 0.01
BLOCK_BYTES = 16 << 20  # CSV / JSON block size: a few hundred thousand rows
PARQUET_BATCH_ROWS = 1 << 20
# unit of integer timestamps by magnitude (the largest absolute value of a part): < 1e11 is seconds up to
# the year 5138, milliseconds reach 1e11 in 1973, microseconds 1e14 in 1973, ...
_UNITS = ((1e11, "seconds"), (1e14, "milliseconds"), (1e17, "microseconds"), (float("inf"), "nanoseconds"))


@dataclass
class Block:
    """Rows of one part: ids as strings, the order column as int64."""

    user: pa.Array
    item: pa.Array
    order: np.ndarray
    path: Path


@dataclass
class InputStats:
    parts: int = 0
    empty_parts: list[str] = field(default_factory=list)
    malformed_rows: int = 0  # CSV lines skipped for a wrong number of fields
    rows: int = 0
    order_column: str | None = None
    timestamp_unit: str | None = None


def part_files(path: Path) -> list[Path]:
    """The interaction files: `path` itself, or a directory's part files of one format in name order
    (hidden files and names starting with `_`, like Spark's `_SUCCESS`, are not parts)."""
    if path.is_file():
        return [path]
    parts = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    formats = {FORMATS.get(p.suffix) for p in parts}
    if None in formats:
        odd = next(p.name for p in parts if p.suffix not in FORMATS)
        raise DataError(f"{path}: {odd!r} is not a part file ({', '.join(FORMATS)}); move it out of the directory")
    if not parts:
        raise DataError(f"{path}: no part files ({', '.join(FORMATS)})")
    if len(formats) > 1:
        raise DataError(f"{path}: parts of several formats ({', '.join(sorted(f for f in formats if f))}); use one")
    return parts


def _unit(value: float) -> str:
    return next(name for limit, name in _UNITS if abs(value) < limit)


def _order_column(names: list[str], path: Path) -> str:
    missing = [c for c in ID_COLUMNS if c not in names]
    order = next((c for c in ORDER_COLUMNS if c in names), None)
    if order is None:
        missing.append(" or ".join(ORDER_COLUMNS))
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; has {names}. Every part needs user_id, item_id "
                        "and position (0-based order per user) or timestamp")
    return order


class _PartReader:
    """Reads one part in blocks and checks them; `row` counts the rows handed out so far."""

    def __init__(self, path: Path, stats: InputStats) -> None:
        self.path, self.stats, self.row = path, stats, 0
        self.fmt = FORMATS.get(path.suffix, "csv")
        self.skipped_lines: list[int] = []
        self.order_range = (np.inf, -np.inf)

    def where(self, index: int) -> str:
        """Where row `index` of the current block is: `file:line` for text formats, else `file, row n`."""
        row = self.row + index + 1
        if self.fmt == "parquet":
            return f"{self.path}, row {row}"
        return f"{self.path}:{row + (1 if self.fmt == 'csv' else 0) + self._skipped_before(row)}"

    def _skipped_before(self, row: int) -> int:
        return sum(1 for line in self.skipped_lines if line <= row + 1)

    def batches(self) -> Iterator[pa.RecordBatch]:
        try:
            if self.fmt == "parquet":
                yield from pq.ParquetFile(self.path).iter_batches(PARQUET_BATCH_ROWS)
            elif self.fmt == "jsonl":
                yield from pjson.open_json(self.path, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES))
            else:
                yield from self._csv_batches()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{self.path}: cannot read as {self.fmt} ({exc}); fix the file or move it out") from None

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        def skip(row: pcsv.InvalidRow) -> str:
            self.skipped_lines.append(row.number)
            if len(self.skipped_lines) == 1:
                log.warning("%s:%s: skipping a malformed line (%d fields, expected %d): %.80s",
                            self.path, row.number, row.actual_columns, row.expected_columns, row.text)
            return "skip"

        # the id and order columns as text: the checks below then name the row of a bad value
        reader = pcsv.open_csv(
            self.path,
            read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
            parse_options=pcsv.ParseOptions(invalid_row_handler=skip),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in (*ID_COLUMNS, *ORDER_COLUMNS)}),
        )
        yield from reader

    def blocks(self, order_column: str | None) -> Iterator[tuple[str, Block]]:
        for batch in self.batches():
            names = batch.schema.names
            column = _order_column(names, self.path)
            if order_column is not None and column != order_column:
                raise DataError(f"{self.path}: orders rows by {column!r} but the parts before by {order_column!r}; "
                                "give every part the same order column")
            order_column = column
            if batch.num_rows:
                yield column, self._check(batch, column)
                self.row += batch.num_rows
        malformed = len(self.skipped_lines)
        if malformed > max(10, MAX_MALFORMED_SHARE * (self.row + malformed)):
            raise DataError(f"{self.path}: {malformed} of {self.row + malformed} lines are malformed (wrong number "
                            f"of fields, first at line {self.skipped_lines[0]}); check the delimiter and quoting")
        self.stats.malformed_rows += malformed

    def _ids(self, batch: pa.RecordBatch, name: str) -> pa.Array:
        col = batch.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type)):
            raise DataError(f"{self.path}: column {name!r} has type {col.type}; ids are strings or integers")
        col = col.cast(pa.string())
        bad = pc.or_kleene(pc.is_null(col), pc.equal(col, "")).fill_null(True)
        if pc.any(bad).as_py():
            first = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{self.where(first)}: empty {name} ({pc.sum(bad).as_py()} such row(s) in this block); "
                            "fix or remove those rows")
        return col

    def _order(self, batch: pa.RecordBatch, name: str) -> np.ndarray:
        col = batch.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("us")).cast(pa.int64())  # exact for s/ms/us: one unit for every part
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # CSV
            col = pc.utf8_trim_whitespace(col)
        elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DataError(f"{self.path}: column {name!r} has type {col.type}; expected integers")
        empty = pc.is_null(col)
        if pa.types.is_string(col.type):
            empty = pc.or_(empty, pc.equal(col, ""))
        if pc.any(empty).as_py():
            first = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{self.where(first)}: empty {name}; fix or remove that row")
        try:
            values = col.cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = self._integral(col, name)
        self.order_range = (min(self.order_range[0], values.min()), max(self.order_range[1], values.max()))
        return values

    def _integral(self, col: pa.Array, name: str) -> np.ndarray:
        """Integers written as floats (`3.0`, as pandas writes a column that had a missing value)."""
        try:
            floats = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            floats = None
        if floats is not None and np.all(floats == np.round(floats)) and np.abs(floats).max() < 2**53:
            return floats.astype(np.int64)
        for i, value in enumerate(col.to_pylist()):
            try:
                if float(value) != int(float(value)):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{self.where(i)}: {name} {value!r} is not an integer; fix or remove that row") from None
        raise DataError(f"{self.path}: column {name!r} holds values too large for exact integers")

    def _check(self, batch: pa.RecordBatch, order_column: str) -> Block:
        return Block(self._ids(batch, "user_id"), self._ids(batch, "item_id"), self._order(batch, order_column),
                     self.path)


def read_blocks(source: Path, stats: InputStats) -> Iterator[Block]:
    """Checked blocks of every part of `source` (a file or a directory of parts), in file order."""
    unit_of: tuple[str, Path] | None = None
    for path in part_files(source):
        stats.parts += 1
        if path.stat().st_size == 0:
            log.warning("%s: empty file, skipped", path)
            stats.empty_parts.append(str(path))
            continue
        part = _PartReader(path, stats)
        for column, block in part.blocks(stats.order_column):
            stats.order_column = column
            yield block
        stats.rows += part.row
        if part.row == 0:
            log.warning("%s: no rows, skipped", path)
            stats.empty_parts.append(str(path))
            continue
        if stats.order_column == "timestamp":
            low, high = part.order_range
            unit = _unit(max(abs(low), abs(high)))
            if low > 1e8 and _unit(low) != unit:
                raise DataError(f"{path}: column 'timestamp' mixes units: from {low:.3g} ({_unit(low)}) to "
                                f"{high:.3g} ({unit}); store one unit")
            if unit_of is None:
                unit_of = (unit, path)
                stats.timestamp_unit = unit
            elif unit != unit_of[0]:
                raise DataError(f"{path}: column 'timestamp' is in {unit} (largest {high:.3g}) but {unit_of[1]} in "
                                f"{unit_of[0]}; convert every part to one unit")
