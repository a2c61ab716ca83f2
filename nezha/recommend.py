"""`nezha recommend`: top-K recommendations for many users at once, offline (campaigns, caches, A/B analysis).

Input rows are `{"user_id": ..., "history": [item ids, oldest first]}` in JSONL or Parquet, or the users
of a prepared dataset's valid/test split. Output rows are `{"user_id": ..., "items": [{"item_id", "score",
"title"}]}` in Parquet or JSONL (by the extension of `out`), best first, in input order. Next to them,
`OUT.skipped.jsonl` lists everything that was not used, one JSON object a line:

    {"reason": "malformed", "line": 7, "detail": "not valid JSON: ..."}          bad JSON, missing fields,
                                                                                  non-list or empty history
    {"reason": "no_known_items", "line": 9, "user_id": "u9", "skipped_items": [...]}    user skipped
    {"reason": "unknown_items", "line": 3, "user_id": "u3", "skipped_items": [...]}     user recommended
                                                                                  from the items known
Both files are written to a temporary name and renamed when complete, so a crash never leaves a file
that looks finished. `OfflineRecommender` (one checkpoint in memory, users in, rows out) is shared with the
Ray Data path (`batch/run.py`), which runs one per actor.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from nezha.catalog import Catalog, UnknownItemError
from nezha.config import ConfigError
from nezha.decoding import DECODERS, decode
from nezha.device import resolve_device
from nezha.model.checkpoint import load_checkpoint, prepared_dir_of, read_meta
from nezha.model.model import ModelConfig
from nezha.ranking import DEFAULT_MAX_HISTORY, max_history_of, search_width, top_k

INPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
OUTPUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
SPLITS = ("valid", "test")
SKIPPED_SUFFIX = ".skipped.jsonl"

ITEM_TYPE = pa.struct([("item_id", pa.string()), ("score", pa.float64()), ("title", pa.string())])
RECS_SCHEMA = pa.schema([("user_id", pa.string()), ("items", pa.list_(ITEM_TYPE))])


@dataclass
class RecommendConfig:
    """Top-K recommendations for every user of a file (or of a prepared split), written to Parquet or JSONL."""

    checkpoint: str = "runs/train/best"
    input: str | None = field(default=None, metadata={
        "help": "JSONL or Parquet with user_id and history (item ids, oldest first); also --in"})
    from_split: str | None = field(default=None, metadata={
        "help": "valid or test: recommend for the prepared dataset's users instead of --in"})
    out: str = field(default="", metadata={"help": "RECS.parquet or RECS.jsonl (format by extension)"})
    k: int = field(default=10, metadata={"help": "items per user"})
    decoder: str = field(default="nezha", metadata={"help": "any decoder the checkpoint has the head for"})
    beam: int = field(default=0, metadata={"help": "beam width (0: max(10, k))"})
    exclude_history: bool = field(default=False, metadata={
        "help": "never recommend an item of the user's history (decodes wider, then drops those)"})
    batch_size: int = field(default=64, metadata={"help": "users per decode call"})
    max_history: int = field(default=0, metadata={
        "help": f"last items the model reads (0: the prepared dataset's, else {DEFAULT_MAX_HISTORY})"})
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.input is None) == (self.from_split is None):
            raise ConfigError("input: give exactly one of --in FILE and --from-split valid|test")
        if self.input is not None and Path(self.input).suffix.lower() not in INPUT_FORMATS:
            raise ConfigError(f"input: {self.input!r} must end in one of {sorted(INPUT_FORMATS)}")
        if self.from_split is not None and self.from_split not in SPLITS:
            raise ConfigError(f"from_split: must be valid or test, got {self.from_split!r}")
        if not self.out:
            raise ConfigError("out: required (--out RECS.parquet or RECS.jsonl)")
        if Path(self.out).suffix.lower() not in OUTPUT_FORMATS:
            raise ConfigError(f"out: {self.out!r} must end in one of {sorted(OUTPUT_FORMATS)}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder: unknown decoder {self.decoder!r}; choose one of {tuple(DECODERS)}")
        for name in ("k", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("beam", "max_history"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.beam == 0:
            self.beam = max(10, self.k)
        elif self.beam < self.k:
            raise ConfigError(f"beam: must be >= k ({self.k}), got {self.beam}")

    @property
    def skipped_path(self) -> Path:
        return Path(self.out + SKIPPED_SUFFIX)


# ---------------------------------------------------------------------------------------------- input


@dataclass
class UserHistory:
    user_id: str
    history: list[str]  # item ids, oldest first
    line: int | None = None  # 1-based line (JSONL) or row (Parquet, split); None where unknown (Ray Data)


@dataclass
class Skipped:
    """A line, a user or some history items that were not used, and why (one line of OUT.skipped.jsonl)."""

    reason: str  # malformed, no_known_items or unknown_items
    line: int | None = None
    user_id: str | None = None
    detail: str | None = None
    skipped_items: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and v != []}


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""


def parse_row(row: Any, line: int | None = None) -> UserHistory | Skipped:
    """A validated input row, or why it cannot be used."""
    if not isinstance(row, dict):
        return Skipped("malformed", line, detail="not a JSON object")
    user_id, history = row.get("user_id"), row.get("history")
    if not _is_id(user_id):
        return Skipped("malformed", line, detail="user_id: missing, empty, or not a string or integer")
    if history is None:
        return Skipped("malformed", line, str(user_id), "history: missing")
    if not isinstance(history, list):
        return Skipped("malformed", line, str(user_id), f"history: expected a list, got {type(history).__name__}")
    if not history:
        return Skipped("malformed", line, str(user_id), "history: empty")
    if not all(_is_id(item) for item in history):
        return Skipped("malformed", line, str(user_id), "history: item ids must be non-empty strings or integers")
    return UserHistory(str(user_id), [str(item) for item in history], line)


def parse_line(text: str, line: int | None = None) -> UserHistory | Skipped | None:
    """One JSONL line; None for a blank line (ignored, as Ray Data's read_text drops them)."""
    text = text.strip()  # also makes a JSON error's column point into the line, not past its newline
    if not text:
        return None
    try:
        parsed = parse_row(json.loads(text), line)
    except json.JSONDecodeError as exc:
        parsed = Skipped("malformed", line, detail=f"not valid JSON: {exc.msg} (column {exc.colno})")
    if isinstance(parsed, Skipped) and line is None and parsed.user_id is None:
        parsed.detail = f"{parsed.detail}: {text[:80]!r}"  # no line number to find it by: quote it
    return parsed


def read_jsonl(path: Path) -> Iterator[UserHistory | Skipped]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            parsed = parse_line(text, number)
            if parsed is not None:
                yield parsed


def check_parquet_columns(path: Path) -> None:
    names = pq.ParquetFile(path).schema_arrow.names
    missing = {"user_id", "history"} - set(names)
    if missing:
        raise ValueError(f"{path}: no {sorted(missing)} column(s); it has {names}")


def read_parquet(path: Path) -> Iterator[UserHistory | Skipped]:
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["user_id", "history"]):
        for row in batch.to_pylist():
            number += 1
            yield parse_row(row, number)


def split_histories(checkpoint: str | Path, split_name: str) -> list[UserHistory]:
    """The users of the prepared dataset's valid or test split, each with everything before its target."""
    from nezha.data.split import load_sequences
    from nezha.prepared import SEQUENCES_FILE, load_prepared  # local: prepare pulls in the embedding stack

    prepared = prepared_dir_of(checkpoint)
    if prepared is None:
        raise ValueError(f"{checkpoint} does not say which prepared dataset it was trained on: use --in FILE")
    catalog, split, _ = load_prepared(prepared)
    sequences, user_ids = load_sequences(prepared / SEQUENCES_FILE)
    # leave_one_out (nezha.data.split) keeps users with >= 3 items in order; test's target is the last
    # item, valid's the one before it. The full sequence before the target is the history here (the model
    # reads its tail), so --exclude-history drops all of it.
    drop = 1 if split_name == "test" else 2
    kept = [(user, seq) for user, seq in zip(user_ids, sequences, strict=True) if len(seq) >= 3]
    expected = len(getattr(split, split_name))
    if len(kept) != expected:
        raise ValueError(f"{prepared}: {len(kept)} users with >= 3 items but {expected} {split_name} examples")
    return [UserHistory(user, [catalog.item_ids[i] for i in seq[: len(seq) - drop]], number)
            for number, (user, seq) in enumerate(kept, 1)]


def open_input(cfg: RecommendConfig) -> tuple[Iterator[UserHistory | Skipped], int]:
    """The input's parsed rows and how many rows (lines) there are, for the progress bar."""
    if cfg.from_split is not None:
        users = split_histories(cfg.checkpoint, cfg.from_split)
        return iter(users), len(users)
    path = Path(cfg.input or "")
    if not path.is_file():
        raise FileNotFoundError(f"input: no such file {path}")
    if INPUT_FORMATS[path.suffix.lower()] == "parquet":
        check_parquet_columns(path)  # now: the reading generator would only fail once the run has begun
        return read_parquet(path), pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return read_jsonl(path), lines


# -------------------------------------------------------------------------------------------- decoding


def check_checkpoint(cfg: RecommendConfig) -> None:
    """Fail before any data is read or actor started: the checkpoint must exist and have the decoder's head."""
    objectives = ModelConfig(**read_meta(cfg.checkpoint)["model"]).objectives
    if DECODERS[cfg.decoder].missing(objectives):
        raise ValueError(DECODERS[cfg.decoder].missing_heads_error(objectives, str(cfg.checkpoint)))


class OfflineRecommender:
    """One checkpoint in memory (model, catalog, verifier): user histories in, ranked rows out.

    Built once per process (single-process run) or per Ray Data actor.
    """

    def __init__(self, cfg: RecommendConfig, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        check_checkpoint(cfg)
        self.model = load_checkpoint(cfg.checkpoint, self.device)
        self.catalog = Catalog.load(Path(cfg.checkpoint) / "catalog")
        self.verifier = self.catalog.verifier(self.device)
        self.max_history = max_history_of(cfg.checkpoint, cfg.max_history)

    def width(self, excluded: int) -> int:
        """Beam width for a user with `excluded` distinct known history items to drop: the service's rule
        (nezha.ranking.search_width), per user, so a user's list never depends on who shares the batch."""
        return search_width(self.cfg.beam, self.cfg.k, excluded if self.cfg.exclude_history else 0,
                            self.catalog.num_items)

    def recommend(self, users: list[UserHistory]) -> tuple[list[dict[str, Any]], list[Skipped]]:
        """(a row per user with a known history item, in order; what was skipped)."""
        skipped: list[Skipped] = []
        known: list[tuple[int, UserHistory, np.ndarray]] = []  # (position, user, item indices)
        for position, user in enumerate(users):
            indices, unknown = [], []
            for item in user.history:
                try:
                    indices.append(self.catalog.index_of(item))
                except UnknownItemError:
                    unknown.append(item)
            if unknown:
                reason = "unknown_items" if indices else "no_known_items"
                skipped.append(Skipped(reason, user.line, user.user_id, skipped_items=unknown))
            if indices:
                known.append((position, user, np.asarray(indices, dtype=np.int64)))
        by_width: dict[int, list[tuple[int, UserHistory, np.ndarray]]] = {}
        for entry in known:
            by_width.setdefault(self.width(len(set(entry[2].tolist()))), []).append(entry)
        rows: dict[int, dict[str, Any]] = {}
        for width, group in by_width.items():
            ids, scores = self._decode([indices for _, _, indices in group], width)
            for (position, user, _), user_ids, user_scores in zip(group, ids, scores, strict=True):
                rows[position] = {"user_id": user.user_id, "items": self._ranked(user, user_ids, user_scores)}
        return [rows[p] for p in sorted(rows)], skipped

    def _decode(self, histories: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
        codes = [self.catalog.codes[h[-self.max_history:]] for h in histories]
        with torch.inference_mode():
            out = decode(self.model, self.cfg.decoder, codes, self.verifier, width, width)
        return out.ids.cpu().numpy(), out.scores.float().cpu().numpy()

    def _ranked(self, user: UserHistory, ids: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        exclude = set(user.history) if self.cfg.exclude_history else set()
        kept = top_k(self.catalog.item_of_packed(ids), scores.tolist(), exclude, self.cfg.k)
        return [{"item_id": item, "score": score, "title": self.catalog.titles[self.catalog.index_of(item)] or None}
                for item, score in kept]


# ---------------------------------------------------------------------------------------------- output


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` (for a file or a folder), moved over `path` only when the block
    finishes without an error: readers never see a half-written output under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        if path.exists() and (path.is_dir() or tmp.is_dir()):  # rename() replaces files only
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)


class RecsWriter:
    """Rows to JSONL (no title key where the catalog has none) or Parquet (title null), in row groups."""

    def __init__(self, path: Path, fmt: str, row_group: int = 10_000) -> None:
        self.fmt = fmt
        self.row_group = row_group
        self.pending: list[dict[str, Any]] = []
        self.jsonl: TextIO | None = path.open("w", encoding="utf-8") if fmt == "jsonl" else None
        self.parquet = pq.ParquetWriter(path, RECS_SCHEMA) if fmt == "parquet" else None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self.jsonl is not None:
            for row in rows:
                items = [{k: v for k, v in item.items() if v is not None} for item in row["items"]]
                line = json.dumps({"user_id": row["user_id"], "items": items}, ensure_ascii=False)
                self.jsonl.write(line + "\n")
            return
        self.pending.extend(rows)
        if len(self.pending) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self.parquet is not None and self.pending:
            self.parquet.write_table(pa.Table.from_pylist(self.pending, schema=RECS_SCHEMA))
            self.pending = []

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.parquet is not None:
            self._flush()
            self.parquet.close()


# ----------------------------------------------------------------------------------------------- run


@dataclass
class RecommendStats:
    users: int = 0  # valid input rows
    recommended: int = 0
    skipped_users: int = 0  # no known history item
    skipped_items: int = 0  # unknown history items, over all users
    malformed_lines: int = 0
    seconds: float = 0.0  # reading, decoding and writing (the model is already loaded)
    load_seconds: float = 0.0

    def count(self, skipped: Iterable[Skipped]) -> None:
        for s in skipped:
            self.skipped_items += len(s.skipped_items)
            self.skipped_users += s.reason == "no_known_items"
            self.malformed_lines += s.reason == "malformed"

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.users} users ({self.recommended} recommended, {self.skipped_users} skipped: no known "
                f"item) in {self.seconds:.1f} s, {self.users_per_second:.1f} users/s "
                f"(+{self.load_seconds:.1f} s loading); "
                f"{self.skipped_items} unknown history items skipped; {self.malformed_lines} malformed lines")


def _chunks(rows: Iterable[UserHistory | Skipped], size: int) -> Iterator[list[UserHistory | Skipped]]:
    chunk: list[UserHistory | Skipped] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def recommend_all(cfg: RecommendConfig) -> RecommendStats:
    """Recommend for every user of the input in this process; writes cfg.out and its .skipped.jsonl."""
    start = time.perf_counter()
    check_checkpoint(cfg)
    rows, total = open_input(cfg)  # before the model loads: a missing input fails at once
    recommender = OfflineRecommender(cfg)
    stats = RecommendStats(load_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    out = Path(cfg.out)
    with atomic_path(out) as tmp, atomic_path(cfg.skipped_path) as tmp_skipped, \
            tmp_skipped.open("w", encoding="utf-8") as report:
        writer = RecsWriter(tmp, OUTPUT_FORMATS[out.suffix.lower()])
        try:
            bar = tqdm(total=total, unit="user", desc="recommend", disable=not cfg.progress)
            for chunk in _chunks(rows, cfg.batch_size):
                users = [r for r in chunk if isinstance(r, UserHistory)]
                recs, problems = recommender.recommend(users)
                writer.write(recs)
                problems += [r for r in chunk if isinstance(r, Skipped)]
                for s in sorted(problems, key=lambda s: s.line or 0):
                    report.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
                stats.users += len(users)
                stats.recommended += len(recs)
                stats.count(problems)
                bar.update(len(chunk))
            bar.close()
        finally:
            writer.close()
    stats.seconds = time.perf_counter() - start
    return stats
