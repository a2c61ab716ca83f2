import numpy as np
import pyarrow.parquet as pq
import pytest

from nezha.config import ConfigError
from nezha.synth import SynthConfig, synthesize


def read(out):
    items = pq.read_table(out / "items.parquet")
    inter = pq.read_table(sorted((out / "interactions").glob("*.parquet")))
    return items, inter


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    cfg = dict(items=300, interactions=5_000, part_rows=2_000)
    synthesize(SynthConfig(out=str(tmp_path / "a"), seed=1, **cfg))
    synthesize(SynthConfig(out=str(tmp_path / "b"), seed=1, **cfg))
    synthesize(SynthConfig(out=str(tmp_path / "c"), seed=2, **cfg))
    a, b, c = (read(tmp_path / n) for n in "abc")
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not a[1].equals(c[1])
    parts = sorted(p.name for p in (tmp_path / "a" / "interactions").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_counts_titles_and_per_user_time_order(tmp_path):
    stats = synthesize(SynthConfig(out=str(tmp_path / "s"), items=500, interactions=20_000, part_rows=8_000))
    items, inter = read(tmp_path / "s")
    assert items.num_rows == 500 and inter.num_rows == 20_000 == stats["interactions"]
    assert len(items.column("item_id").unique()) == 500
    assert set(inter.column("item_id").to_pylist()) <= set(items.column("item_id").to_pylist())
    assert 40 <= np.mean([len(t) for t in items.column("title").to_pylist()]) <= 100  # Amazon-like titles
    frame = inter.to_pandas()
    assert frame["user_id"].nunique() == stats["users"]
    assert 7 <= len(frame) / stats["users"] <= 13  # mean length about 10
    # timestamps strictly increase within a user; rows are in time order within a part, so users interleave
    assert (frame.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    assert frame["user_id"].iloc[:50].nunique() > 10


def test_sequences_have_structure_to_learn(tmp_path):
    synthesize(SynthConfig(out=str(tmp_path / "s"), items=1_000, interactions=30_000, seed=3))
    items, inter = read(tmp_path / "s")
    brand = dict(zip(items.column("item_id").to_pylist(), items.column("brand").to_pylist(), strict=True))
    frame = inter.to_pandas().sort_values(["user_id", "timestamp"])
    same_user = frame["user_id"].to_numpy()[1:] == frame["user_id"].to_numpy()[:-1]
    ids = frame["item_id"].to_numpy()
    same_brand = np.array([brand[a] == brand[b] for a, b in zip(ids[:-1], ids[1:], strict=True)])[same_user]
    # a user stays in a cluster (one brand) most of the time; random pairs would rarely share one
    assert same_brand.mean() > 0.7
    # popularity is skewed: the top 1 % of items take a large share of the interactions
    counts = np.sort(frame["item_id"].value_counts().to_numpy())[::-1]
    assert counts[:10].sum() / counts.sum() > 0.1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"items": 0}, r"items: must be >= 1"),
    ({"mean_length": 2.0}, r"mean_length: must be > 3"),
    ({"switch": 1.5}, r"switch: a probability"),
    ({"clusters": 10, "items": 5}, r"clusters: must be 0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_data_bench_measures_every_step_in_a_child_per_size(tmp_path):
    from nezha.data_bench import REPO, DataBenchConfig, format_data_table, run_data_bench

    cfg = DataBenchConfig(sizes=["3k:200"], before_sizes=["3k:200"], work_dir=str(tmp_path / "work"),
                          json=str(tmp_path / "bench.json"), csv=True, before=str(REPO), k_core=0)
    report = run_data_bench(cfg)
    runs = {(r["code"], r["input"]): r for r in report["runs"]}
    assert set(runs) == {("after", "parquet"), ("after", "csv"), ("before", "csv")}
    after = runs["after", "parquet"]
    assert after["status"] == "ok" and set(after["steps"]) == {"items", "read", "filter", "group", "split", "write"}
    assert all(s["peak_rss_gb"] > 0.01 for s in after["steps"].values())
    assert runs["before", "csv"]["sizes"] == runs["after", "csv"]["sizes"] == after["sizes"]  # same split
    assert set(runs["before", "csv"]["steps"]) == {"read", "split", "write"}
    assert "3k:200" in format_data_table(report) and (tmp_path / "bench.json").is_file()
    # a child above the memory limit is stopped, and the step it was in recorded
    small = DataBenchConfig(**{**cfg.__dict__, "csv": False, "before": None, "memory_limit_gb": 0.01, "json": None})
    assert run_data_bench(small)["runs"][0]["status"].startswith("stopped: RSS above 0.01 GB in step")


def test_data_bench_runs_the_whole_prepare_with_embeddings_in_one_child(tmp_path):
    from nezha.data_bench import DataBenchConfig, format_data_table, run_data_bench

    cfg = DataBenchConfig(sizes=["5k:1k"], measure=["prepare"], embedding_dim=16, work_dir=str(tmp_path / "work"),
                          json=None)
    report = run_data_bench(cfg)
    [run] = report["runs"]  # no separate data-step run: measure is prepare only
    assert run["code"] == "prepare" and run["status"] == "ok", run["status"]
    assert {"load_s", "kmeans_s", "collisions_s", "split_s", "write_s"} <= set(run["timings"])
    assert run["items"] == 1000 and run["sizes"]["train"] > 0
    assert run["peak_rss_gb"] > 0.05 and run["rss_timeline"]
    # the memory trace: one entry per log line of prepare's own loggers, ending with its summary line
    assert run["trace"][-1][3].startswith("prepared ") and all(e[2] >= e[1] > 0 for e in run["trace"])
    emb = np.load(tmp_path / "work" / "emb-1000x16-seed0.npy", mmap_mode="r")
    assert emb.shape == (1000, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert "5k:1k prepare" in format_data_table(report)
    with pytest.raises(ConfigError, match="measure: choose from"):
        DataBenchConfig(measure=["everything"])
