"""`nezha recommend` on the tiny fixtures: formats, --exclude-history, --from-split, the bad-input report,
atomic output, the history window (its Ray Data twin: tests/test_batch.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from recommend_fixtures import BAD_LINES, GOOD, read_recs, read_report, write_jsonl

from nezha.catalog import Catalog
from nezha.cli import main
from nezha.config import ConfigError
from nezha.model.checkpoint import prepared_dir_of
from nezha.prepared import load_prepared
from nezha.recommend import OfflineRecommender, RecommendConfig, UserHistory, parse_line, recommend_all


def recommend(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["recommend", "--progress", "false", *argv]) == 0
    return capsys.readouterr().out


def test_jsonl_in_parquet_out_and_back_give_the_same_lists(tiny_checkpoint, tmp_path, capsys):
    histories = write_jsonl(tmp_path / "histories.jsonl", GOOD)
    out = recommend(["--checkpoint", str(tiny_checkpoint), "--in", str(histories), "--out",
                     str(tmp_path / "recs.parquet"), "--k", "5"], capsys)
    assert "4 users (4 recommended, 0 skipped" in out and "users/s" in out and "0 malformed lines" in out
    table = pq.read_table(tmp_path / "recs.parquet")
    assert table.schema.names == ["user_id", "items"]
    recs = table.to_pylist()
    assert [r["user_id"] for r in recs] == ["u1", "u2", "u3", "u4"]  # input order
    catalog = Catalog.load(tiny_checkpoint / "catalog")
    for rec in recs:
        assert len(rec["items"]) == 5
        scores = [item["score"] for item in rec["items"]]
        assert scores == sorted(scores, reverse=True)
        for item in rec["items"]:
            assert item["title"] == catalog.titles[catalog.index_of(item["item_id"])]
    assert (tmp_path / "recs.parquet.skipped.jsonl").read_text() == ""

    # Parquet in (what a warehouse export looks like), JSONL out: the same lists.
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "histories.parquet")
    recommend(["--checkpoint", str(tiny_checkpoint), "--in", str(tmp_path / "histories.parquet"), "--out",
               str(tmp_path / "recs.jsonl"), "--k", "5"], capsys)
    assert read_recs(tmp_path / "recs.jsonl") == recs


def test_exclude_history_never_recommends_what_the_user_has(tiny_checkpoint, tmp_path):
    histories = write_jsonl(tmp_path / "h.jsonl", GOOD)
    common = dict(checkpoint=str(tiny_checkpoint), input=str(histories), k=8, progress=False)
    recommend_all(RecommendConfig(**common, out=str(tmp_path / "plain.jsonl")))
    recommend_all(RecommendConfig(**common, out=str(tmp_path / "excl.jsonl"), exclude_history=True))
    plain, excluded = read_recs(tmp_path / "plain.jsonl"), read_recs(tmp_path / "excl.jsonl")
    # The tiny model learnt "next = previous + 1" over a 48-item catalog: with k=8 some history item
    # shows up in the plain lists, so the exclusion has something to remove.
    owned = {u["user_id"]: set(u["history"]) for u in GOOD}
    assert any(item["item_id"] in owned[r["user_id"]] for r in plain for item in r["items"])
    for rec in excluded:
        ids = [item["item_id"] for item in rec["items"]]
        assert len(ids) == 8 and not set(ids) & owned[rec["user_id"]]


def test_from_split_recommends_for_every_test_user(tiny_checkpoint, tmp_path, capsys):
    out = recommend(["--checkpoint", str(tiny_checkpoint), "--from-split", "test", "--out",
                     str(tmp_path / "recs.parquet"), "--k", "3", "--batch-size", "7"], capsys)
    _, split, _ = load_prepared(prepared_dir_of(tiny_checkpoint))
    recs = read_recs(tmp_path / "recs.parquet")
    assert len(recs) == len(split.test) and f"{len(split.test)} users ({len(split.test)} recommended" in out
    assert all(r["user_id"].startswith("U") and len(r["items"]) == 3 for r in recs)


def test_bad_input_is_reported_by_line_and_the_run_goes_on(tiny_checkpoint, tmp_path, capsys):
    histories = tmp_path / "bad.jsonl"
    histories.write_text("\n".join(BAD_LINES) + "\n")
    out = recommend(["--checkpoint", str(tiny_checkpoint), "--in", str(histories), "--out",
                     str(tmp_path / "recs.jsonl"), "--k", "3"], capsys)
    assert ("4 users (3 recommended, 1 skipped: no known item)" in out and "3 unknown history items skipped" in out
            and "4 malformed lines" in out)
    assert [r["user_id"] for r in read_recs(tmp_path / "recs.jsonl")] == ["ok1", "partly", "ok2"]
    report = read_report(tmp_path / "recs.jsonl.skipped.jsonl")
    assert [(r["line"], r["reason"]) for r in report] == [
        (2, "unknown_items"), (3, "no_known_items"), (4, "malformed"), (5, "malformed"), (6, "malformed"),
        (7, "malformed")]
    assert report[0]["user_id"] == "partly" and report[0]["skipped_items"] == ["GONE-1"]
    assert report[1]["skipped_items"] == ["GONE-2", "GONE-3"]
    assert report[2]["detail"] == "history: empty"
    assert report[3]["detail"].startswith("not valid JSON")
    assert "user_id" in report[4]["detail"] and "expected a list" in report[5]["detail"]


def test_parse_line_quotes_a_bad_line_when_there_is_no_line_number():
    assert parse_line("   \n") is None
    assert "'{this is not json'" in parse_line("{this is not json").detail
    assert parse_line("{oops", 5).detail == ("not valid JSON: Expecting property name enclosed in double quotes "
                                             "(column 2)")


def test_a_crash_leaves_the_previous_output_and_no_partial_file(tiny_checkpoint, tmp_path, monkeypatch):
    histories = write_jsonl(tmp_path / "h.jsonl", GOOD * 5)
    out = tmp_path / "recs.parquet"
    cfg = RecommendConfig(checkpoint=str(tiny_checkpoint), input=str(histories), out=str(out), batch_size=4,
                          progress=False)
    recommend_all(cfg)
    before = out.read_bytes()
    calls = 0
    original = OfflineRecommender.recommend

    def crash_on_third_batch(self, users):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("killed")
        return original(self, users)

    monkeypatch.setattr(OfflineRecommender, "recommend", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        recommend_all(cfg)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl", "recs.parquet", "recs.parquet.skipped.jsonl"]


def test_the_model_reads_only_the_last_max_history_items(tiny_checkpoint, tmp_path):
    cfg = RecommendConfig(checkpoint=str(tiny_checkpoint), from_split="test", out=str(tmp_path / "r.jsonl"))
    recommender = OfflineRecommender(cfg)
    assert recommender.max_history == 20  # the tiny prepared dataset's (prepare's default)
    tail = [f"I{i:03d}" for i in range(20, 40)]
    long = UserHistory("long", [f"I{i:03d}" for i in range(10)] + tail)
    short = UserHistory("short", tail)
    (long_row, short_row), skipped = recommender.recommend([long, short])
    assert long_row["items"] == short_row["items"] and not skipped


def test_config_errors_name_the_field(tmp_path):
    base = dict(checkpoint="c", input="h.jsonl", out="r.parquet")
    for overrides, field in [(dict(out="r.csv"), "out"), (dict(out=""), "out"), (dict(input="h.csv"), "input"),
                             (dict(from_split="test"), "input"), (dict(input=None), "input"),
                             (dict(input=None, from_split="train"), "from_split"), (dict(k=0), "k"),
                             (dict(k=20, beam=10), "beam"), (dict(decoder="greedy"), "decoder"),
                             (dict(batch_size=0), "batch_size"), (dict(max_history=-1), "max_history")]:
        with pytest.raises(ConfigError, match=f"^{field}:"):
            RecommendConfig(**{**base, **overrides})
    assert RecommendConfig(**base, k=25).beam == 25 and RecommendConfig(**base).beam == 10


@pytest.mark.parametrize("argv, message", [
    (["--in", "h.jsonl", "--out", "r.txt"], "out: 'r.txt' must end in one of"),
    (["--out", "r.jsonl"], "input: give exactly one of --in FILE and --from-split"),
    (["--in", "missing.jsonl", "--out", "r.jsonl"], "input: no such file missing.jsonl"),
    (["--in", "h.jsonl", "--out", "r.jsonl", "--k", "x"], "k: expected int, got 'x'"),
    (["--in", "users.parquet", "--out", "r.jsonl"], "users.parquet: no ['history'] column(s)"),
])
def test_cli_errors_are_one_line_not_a_traceback(argv, message, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "h.jsonl", GOOD)
    pq.write_table(pa.table({"user_id": ["u1"]}), tmp_path / "users.parquet")
    assert main(["recommend", "--checkpoint", str(tiny_checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nezha recommend: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "h.jsonl", GOOD)
    assert main(["recommend", "--checkpoint", str(tmp_path / "nope"), "--in", str(tmp_path / "h.jsonl"),
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "is not a nezha checkpoint" in err and "Traceback" not in err
