"""What both ways of recommending share, the service (serve/replica.py) and `nezha recommend`
(nezha/recommend.py): how much history the model reads, how wide the search goes when items are excluded,
and the top k that is left.

Light on purpose (checkpoint and prepared-dataset metadata only): a serving replica imports it.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from pathlib import Path

from nezha.model.checkpoint import prepared_dir_of
from nezha.prepared import read_summary

DEFAULT_MAX_HISTORY = 20  # the prepare default, for checkpoints whose prepared dataset is gone


def prepared_max_history(checkpoint: str | Path) -> int | None:
    """max_history of the prepared dataset the checkpoint was trained on, when that dataset is still there."""
    prepared = prepared_dir_of(checkpoint)
    return read_summary(prepared).get("config", {}).get("max_history") if prepared else None


def max_history_of(checkpoint: str | Path, configured: int | None = None) -> int:
    """The last history items the model reads: `configured` when set (not 0 or None), else the prepared
    dataset's max_history, else DEFAULT_MAX_HISTORY."""
    return configured or prepared_max_history(checkpoint) or DEFAULT_MAX_HISTORY


def search_width(beam: int, k: int, excluded: int, widest: int) -> int:
    """Beam width of a search that must leave k items after dropping `excluded` ones: `beam`, widened to
    k + excluded, but never past `widest` by widening."""
    return max(beam, min(widest, k + excluded))


def top_k(items: Iterable[str | None], scores: Iterable[float], exclude: Container[str],
          k: int) -> list[tuple[str, float]]:
    """The first k (item, score) of a best-first search result that are items and not excluded; an item of
    None is a searched ID that no item holds (padding where fewer IDs survived than the width)."""
    kept: list[tuple[str, float]] = []
    for item, score in zip(items, scores, strict=True):
        if item is not None and item not in exclude:
            kept.append((item, score))
            if len(kept) == k:
                break
    return kept
