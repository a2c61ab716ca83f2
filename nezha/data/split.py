"""Leave-one-out split into (history, target) examples, and pickle-free storage of ragged int arrays.

For a user sequence s of length n >= 3 (H = max_history):
  test:  target s[n-1], history s[:n-1][-H:]
  valid: target s[n-2], history s[:n-2][-H:]
  train: for every i in 1..n-3: target s[i], history s[:i][-H:]
Users with n < 3 cannot give a test and a validation example and are skipped (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PARTS = ("train", "valid", "test")


@dataclass
class Examples:
    histories: list[np.ndarray]  # int64 item indices, oldest first, at most max_history long
    targets: np.ndarray  # int64 [num_examples]

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
        return Examples([self.histories[i] for i in keep], self.targets[keep])


@dataclass
class Split:
    train: Examples
    valid: Examples
    test: Examples
    skipped_users: int

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in _PARTS}

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"skipped_users": np.int64(self.skipped_users)}
        for name in _PARTS:
            part: Examples = getattr(self, name)
            values, offsets = pack_ragged(part.histories)
            arrays[f"{name}_history_values"] = values
            arrays[f"{name}_history_offsets"] = offsets
            arrays[f"{name}_targets"] = part.targets
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        with np.load(path, allow_pickle=False) as data:
            parts = {
                name: Examples(
                    histories=unpack_ragged(data[f"{name}_history_values"], data[f"{name}_history_offsets"]),
                    targets=data[f"{name}_targets"],
                )
                for name in _PARTS
            }
            return cls(**parts, skipped_users=int(data["skipped_users"]))


def leave_one_out(sequences: Sequence[np.ndarray], max_history: int = 20) -> Split:
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {name: ([], []) for name in _PARTS}
    skipped = 0
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        n = len(seq)
        if n < 3:
            skipped += 1
            continue
        for i in range(1, n - 2):
            parts["train"][0].append(seq[max(0, i - max_history) : i])
            parts["train"][1].append(int(seq[i]))
        for name, i in (("valid", n - 2), ("test", n - 1)):
            parts[name][0].append(seq[max(0, i - max_history) : i])
            parts[name][1].append(int(seq[i]))
    examples = {name: Examples(h, np.asarray(t, dtype=np.int64)) for name, (h, t) in parts.items()}
    return Split(**examples, skipped_users=skipped)


def pack_ragged(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged int64 arrays -> (flat values, offsets [len+1]); array k is values[offsets[k]:offsets[k+1]]."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    values = np.concatenate(arrays).astype(np.int64, copy=False) if len(arrays) else np.zeros(0, np.int64)
    return values, offsets


def unpack_ragged(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]


def save_sequences(path: str | Path, sequences: Sequence[np.ndarray], user_ids: Sequence[str]) -> None:
    """Per-user item-index sequences with their user ids (a fixed-width unicode array, so no pickle)."""
    values, offsets = pack_ragged(sequences)
    np.savez(path, values=values, offsets=offsets, user_ids=np.asarray(list(user_ids), dtype=str))


def load_sequences(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    with np.load(path, allow_pickle=False) as data:
        return unpack_ragged(data["values"], data["offsets"]), [str(u) for u in data["user_ids"]]
