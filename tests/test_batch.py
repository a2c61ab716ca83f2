"""batch/run.py: `nezha recommend` on Ray Data (a pool of decoder actors on a local Ray) gives the single
process's lists and report, from JSONL and Parquet input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from recommend_fixtures import BAD_LINES, json_or_none, read_recs, read_report

from batch.run import RayRecommendConfig
from batch.run import main as batch_main
from nezha.cli import main
from nezha.config import ConfigError


@pytest.mark.parametrize(("overrides", "message"), [
    ({"out": "r.jsonl"}, "^out: Ray Data writes a folder of Parquet"),
    ({"actors": 0}, "^actors: must be >= 1"),
    ({"cpus_per_actor": 0}, "^cpus_per_actor: must be > 0"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RayRecommendConfig(**{"checkpoint": "c", "input": "h.jsonl", "out": "r.parquet", **overrides})


@pytest.mark.slow
def test_ray_data_gives_the_single_process_output(ray_session, tiny_checkpoint, tmp_path):
    # Valid users (more than one batch), bad lines and unknown items, with --exclude-history: the widest case.
    lines = [json.dumps({"user_id": f"w{i}", "history": [f"I{(i + j) % 48:03d}" for j in range(1 + i % 25)]})
             for i in range(60)] + BAD_LINES
    histories = tmp_path / "h.jsonl"
    histories.write_text("\n".join(lines) + "\n")
    args = ["--checkpoint", str(tiny_checkpoint), "--in", str(histories), "--k", "4", "--exclude-history",
            "--batch-size", "16", "--progress", "false"]
    main(["recommend", *args, "--out", str(tmp_path / "single.parquet")])
    stats = batch_main([*args, "--out", str(tmp_path / "ray.parquet"), "--actors", "2"])
    assert (tmp_path / "ray.parquet").is_dir()  # Ray writes a folder of part files
    assert (stats.users, stats.recommended, stats.skipped_users, stats.skipped_items, stats.malformed_lines) == \
        (64, 63, 1, 3, 4)

    single = {r["user_id"]: r["items"] for r in read_recs(tmp_path / "single.parquet")}
    ray_rows = {r["user_id"]: r["items"] for r in read_recs(tmp_path / "ray.parquet")}
    assert ray_rows.keys() == single.keys() and len(single) == 63
    for user, items in single.items():
        assert [i["item_id"] for i in ray_rows[user]] == [i["item_id"] for i in items], user
        assert [i["title"] for i in ray_rows[user]] == [i["title"] for i in items]
        assert ray_rows[user]
        assert all(abs(a["score"] - b["score"]) <= 1e-5 for a, b in zip(ray_rows[user], items, strict=True))

    # The same report, except that Ray Data does not number lines (it quotes the bad ones instead).
    def reasons(path: Path) -> list[tuple[str, str | None]]:
        return sorted((r["reason"], r.get("user_id", "")) for r in read_report(path))

    assert reasons(tmp_path / "ray.parquet.skipped.jsonl") == reasons(tmp_path / "single.parquet.skipped.jsonl")

    # Parquet in (the rows that Parquet can hold: lists of ids, an empty one, a null user id): the same lists.
    rows = [r for r in map(json_or_none, lines) if r is not None and isinstance(r.get("history"), list)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "h.parquet")
    parquet_args = [a if a != str(histories) else str(tmp_path / "h.parquet") for a in args]
    batch_main([*parquet_args, "--out", str(tmp_path / "ray-from-parquet.parquet"), "--actors", "1"])
    from_parquet = {r["user_id"]: r["items"] for r in read_recs(tmp_path / "ray-from-parquet.parquet")}
    assert from_parquet.keys() == single.keys()
    assert all([i["item_id"] for i in from_parquet[u]] == [i["item_id"] for i in single[u]] for u in single)
    assert reasons(tmp_path / "ray-from-parquet.parquet.skipped.jsonl") == [
        ("malformed", ""), ("malformed", "empty"), ("no_known_items", "nobody"), ("unknown_items", "partly")]

