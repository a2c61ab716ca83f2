"""Leave-one-out split into (history, target) examples, stored as offsets into one item-sequence array.

For a user sequence s of length n >= 3 (H = max_history):
  test:  target s[n-1], history s[:n-1][-H:]
  valid: target s[n-2], history s[:n-2][-H:]
  train: for every i in 1..n-3: target s[i], history s[:i][-H:]
Users with n < 3 cannot give a test and a validation example and are skipped (counted).

Every history is a slice of the users' concatenated sequences (`Ragged`: one values array plus a start
and an end per example), so a split costs 24 bytes per example (start, end, target) on top of the
sequences, whatever `max_history` is; nothing is stored per example as an array of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa

_PARTS = ("train", "valid", "test")
_STEP = 1 << 23  # elements per slice of the element-wise passes (bounds their temporaries)


class Ragged(Sequence[np.ndarray]):
    """Rows `values[starts[k]:ends[k]]` of one flat int array. A row is a view; slicing, a step or an
    index array gives another Ragged over the same values (no copy of the values)."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        if len(starts) != len(ends):
            raise ValueError(f"{len(starts)} starts but {len(ends)} ends")
        self.values, self.starts, self.ends = values, starts, ends

    @classmethod
    def from_offsets(cls, values: np.ndarray, offsets: np.ndarray) -> Ragged:
        return cls(values, offsets[:-1], offsets[1:])

    @classmethod
    def pack(cls, arrays: Sequence[np.ndarray]) -> Ragged:
        """A Ragged holding copies of `arrays` (int64), back to back."""
        if isinstance(arrays, Ragged):
            return arrays
        values, offsets = pack_ragged(arrays)
        return cls.from_offsets(values, offsets)

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, key: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, key: slice | np.ndarray) -> Ragged: ...
    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray | Ragged:
        if isinstance(key, slice | np.ndarray | list):
            return Ragged(self.values, self.starts[key], self.ends[key])
        return self.values[self.starts[key] : self.ends[key]]

    def __iter__(self) -> Iterator[np.ndarray]:
        values = self.values
        for start, end in zip(self.starts.tolist(), self.ends.tolist(), strict=True):
            yield values[start:end]

    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets) with the rows back to back; no copy when they already are."""
        if len(self) and self.starts[0] == 0 and np.array_equal(self.starts[1:], self.ends[:-1]):
            return self.values[: self.ends[-1]], np.concatenate([self.starts[:1], self.ends])
        return pack_ragged(self)


@dataclass
class Examples:
    histories: Ragged  # int64 item indices, oldest first, at most max_history long (a list is packed)
    targets: np.ndarray  # int64 [num_examples]

    def __post_init__(self) -> None:
        self.histories = Ragged.pack(self.histories)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, max_users: int, seed: int = 0) -> Examples:
        """A seeded random subset of `max_users` examples in their original order (0 or more: all).

        Training's validation, the evaluator and the tuner all score users through this, so the same
        (max_users, seed) always means the same users.
        """
        if not max_users or len(self) <= max_users:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), max_users, replace=False))
        return Examples(self.histories[keep], self.targets[keep])


@dataclass
class Split:
    train: Examples
    valid: Examples
    test: Examples
    skipped_users: int

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in _PARTS}

    def save(self, path: str | Path) -> None:
        """One `values` array (the sequences) and per part the examples' starts, ends and targets."""
        parts: list[Examples] = [getattr(self, name) for name in _PARTS]
        shared = all(p.histories.values is parts[0].histories.values for p in parts)
        values = parts[0].histories.values if shared else None
        arrays: dict[str, np.ndarray] = {"skipped_users": np.int64(self.skipped_users)}
        base = 0
        chunks = []
        for name, part in zip(_PARTS, parts, strict=True):
            h = part.histories
            if values is None:  # parts built separately: put their values back to back
                own, offsets = h.offsets()
                chunks.append(own)
                starts, ends = offsets[:-1] + base, offsets[1:] + base
                base += len(own)
            else:
                starts, ends = h.starts, h.ends
            arrays[f"{name}_starts"] = np.asarray(starts, dtype=np.int64)
            arrays[f"{name}_ends"] = np.asarray(ends, dtype=np.int64)
            arrays[f"{name}_targets"] = np.asarray(part.targets, dtype=np.int64)
        arrays["values"] = values if values is not None else np.concatenate(chunks)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        with np.load(path, allow_pickle=False) as data:
            if "values" in data:
                values = data["values"]
                histories = {name: Ragged(values, data[f"{name}_starts"], data[f"{name}_ends"]) for name in _PARTS}
            else:  # nezha-prepared/1: one packed array of histories per part
                histories = {name: Ragged.from_offsets(data[f"{name}_history_values"], data[f"{name}_history_offsets"])
                             for name in _PARTS}
            parts = {name: Examples(histories[name], data[f"{name}_targets"]) for name in _PARTS}
            return cls(**parts, skipped_users=int(data["skipped_users"]))


def leave_one_out(sequences: Sequence[np.ndarray], max_history: int = 20) -> Split:
    """The split of `sequences` (a Ragged, or a list of arrays that is packed first), computed with array
    operations: every example is a (start, end) into the sequences' values."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    seqs = Ragged.pack(sequences)
    values = seqs.values if seqs.values.dtype == np.int64 else seqs.values.astype(np.int64)
    first, end = seqs.starts, seqs.ends
    n = end - first
    eligible = n >= 3
    first, end, n = first[eligible], end[eligible], n[eligible]

    def examples(targets_at: np.ndarray, user_first: np.ndarray) -> Examples:
        starts = user_first  # reused in place: the history starts H before the target, or at the user's first item
        for s in range(0, len(starts), _STEP):
            np.maximum(starts[s : s + _STEP], targets_at[s : s + _STEP] - max_history, out=starts[s : s + _STEP])
        return Examples(Ragged(values, starts, targets_at), values[targets_at])

    # train targets: positions first+1 .. end-3 of each user, all users' runs back to back; built in
    # slices so that the temporaries stay small next to the 24 bytes per example that remain
    runs = n - 3
    total = int(runs.sum())
    at = np.repeat(first + 1 - (np.cumsum(runs) - runs), runs)
    for s in range(0, total, _STEP):
        at[s : s + _STEP] += np.arange(s, min(total, s + _STEP))
    train = examples(at, np.repeat(first, runs))
    return Split(train=train, valid=examples(end - 2, first.copy()), test=examples(end - 1, first.copy()),
                 skipped_users=int((~eligible).sum()))


def pack_ragged(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged int64 arrays -> (flat values, offsets [len+1]); array k is values[offsets[k]:offsets[k+1]]."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    values = np.concatenate(list(arrays)).astype(np.int64, copy=False) if len(arrays) else np.zeros(0, np.int64)
    return values, offsets


def save_sequences(path: str | Path, sequences: Sequence[np.ndarray], user_ids: Sequence[str]) -> None:
    """Per-user item-index sequences with their user ids (UTF-8 bytes and offsets, so no pickle and no
    fixed-width strings as long as the longest id)."""
    values, offsets = Ragged.pack(sequences).offsets()
    ids = pa.array(user_ids, pa.large_string())  # its buffers are the UTF-8 bytes and their offsets
    _, id_offsets_buf, id_bytes_buf = ids.buffers()
    id_offsets = np.frombuffer(id_offsets_buf, dtype=np.int64)[: len(ids) + 1]
    id_bytes = np.frombuffer(id_bytes_buf, dtype=np.uint8)[: id_offsets[-1]] if id_bytes_buf else np.zeros(0, np.uint8)
    np.savez(path, values=values.astype(np.int64, copy=False), offsets=offsets,
             user_id_bytes=id_bytes, user_id_offsets=id_offsets)


def load_sequences(path: str | Path) -> tuple[Ragged, list[str]]:
    with np.load(path, allow_pickle=False) as data:
        sequences = Ragged.from_offsets(data["values"], data["offsets"])
        if "user_ids" in data:  # nezha-prepared/1: a fixed-width unicode array
            return sequences, [str(u) for u in data["user_ids"]]
        raw, offsets = data["user_id_bytes"].tobytes(), data["user_id_offsets"].tolist()
        return sequences, [raw[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
