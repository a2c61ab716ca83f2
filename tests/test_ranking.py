"""nezha/ranking.py: the rules the service and `nezha recommend` share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nezha.ranking import DEFAULT_MAX_HISTORY, max_history_of, search_width, top_k


def test_the_search_widens_by_the_excluded_items_up_to_the_widest_and_never_narrows() -> None:
    assert search_width(beam=10, k=5, excluded=0, widest=64) == 10
    assert search_width(beam=10, k=5, excluded=4, widest=64) == 10  # k + excluded fits in the beam
    assert search_width(beam=10, k=5, excluded=12, widest=64) == 17
    assert search_width(beam=10, k=5, excluded=100, widest=64) == 64
    assert search_width(beam=80, k=5, excluded=100, widest=64) == 80  # the cap limits widening, not the beam


def test_top_k_skips_non_items_and_excluded_ones_and_stops_at_k() -> None:
    items = [None, "a", "b", "c", None, "d", "e"]
    scores = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]
    assert top_k(items, scores, {"b"}, 3) == [("a", -0.2), ("c", -0.4), ("d", -0.6)]
    assert top_k(items, scores, {"a", "b", "c", "d"}, 3) == [("e", -0.7)]  # fewer survive: fewer returned


def test_the_history_window_is_the_configured_else_the_prepared_datasets_else_the_default(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "prepare.json").write_text(json.dumps({"config": {"max_history": 13}}))

    def trained_on(path: Path) -> None:
        meta = json.loads((checkpoint / "nezha.json").read_text())
        meta["extra"]["prepared"] = str(path)
        (checkpoint / "nezha.json").write_text(json.dumps(meta))

    trained_on(prepared)
    assert max_history_of(checkpoint, 7) == 7 and max_history_of(checkpoint) == 13
    trained_on(tmp_path / "deleted")  # the prepared dataset is gone
    assert max_history_of(checkpoint) == DEFAULT_MAX_HISTORY
