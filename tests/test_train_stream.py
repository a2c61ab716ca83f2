"""train/data.py: the prepared split streamed from Ray Data (`data: stream`).

The split's arrays are read as memory maps (the same numbers Split.load gives); the stream's rows are the
training examples; in a 2-worker Ray Train job every example is trained on at most once per epoch and all
but the documented leftover are; a streaming job trains end to end through train/run.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray.cloudpickle
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from train_fixtures import assert_checkpoint_learned

from nezha.config import ConfigError
from nezha.data.split import Split
from nezha.prepared import SPLIT_FILE
from nezha.training import steps_per_epoch
from train.config import RayTrainConfig
from train.data import StreamData, count_examples, split_arrays, train_dataset, valid_examples
from train.run import run
from train.stream_read import SEGMENT_ROWS, chunk_ids, num_chunks

SEED = 3
# Ray Train workers cannot import this test module: send its worker function by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_the_read_tasks_function_comes_from_a_module_without_torch():
    """Every Ray Data read-task process imports the module of `read_chunks`: it must stay numpy-only (with
    torch each read process took ~12 s and ~0.5 GB to start on the 2-core machine)."""
    import subprocess

    from train.data import read_chunks

    # A fresh process unpickles the function as a read task does: what does that import?
    code = ("import pickle, sys; fn = pickle.loads(sys.stdin.buffer.read()); "
            "print(fn.__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=ray.cloudpickle.dumps(read_chunks), capture_output=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.decode().split()
    assert out == ["train.stream_read", "False"]


def test_split_arrays_are_memory_maps_of_what_split_load_reads(tiny_prepared):
    split = Split.load(tiny_prepared / SPLIT_FILE)
    arrays = split_arrays(str(tiny_prepared / SPLIT_FILE))
    assert isinstance(arrays["values"], np.memmap)
    for part in ("train", "valid", "test"):
        examples = getattr(split, part)
        assert np.array_equal(arrays[f"{part}_starts"], examples.histories.starts)
        assert np.array_equal(arrays[f"{part}_ends"], examples.histories.ends)
        assert np.array_equal(arrays[f"{part}_targets"], examples.targets)
    assert np.array_equal(arrays["values"], split.train.histories.values)
    assert count_examples(tiny_prepared) == len(split.train) and count_examples(tiny_prepared, "valid") == len(split.valid)


def test_stream_validation_examples_are_the_in_memory_subset(tiny_prepared):
    split = Split.load(tiny_prepared / SPLIT_FILE)
    for users in (0, 7):
        expected, streamed = split.valid.subset(users), valid_examples(tiny_prepared, users)
        assert np.array_equal(streamed.targets, expected.targets)
        assert [h.tolist() for h in streamed.histories] == [h.tolist() for h in expected.histories]
        assert not isinstance(streamed.histories.values, np.memmap)  # a copy: the split file can go


def test_dataset_rows_are_the_training_examples_once_each(ray_session, tiny_prepared):
    split = Split.load(tiny_prepared / SPLIT_FILE)
    rows = train_dataset(tiny_prepared, SEED).take_batch(10_000, batch_format="numpy")
    assert sorted(rows["id"].tolist()) == list(range(len(split.train)))
    for i, history, length, target in zip(rows["id"], rows["history"], rows["length"], rows["target"], strict=True):
        assert history[:length].tolist() == split.train.histories[i].tolist() and target == split.train.targets[i]
        assert not history[length:].any()  # padded with zeros to max_history


@pytest.mark.parametrize(("num_examples", "chunk_rows"), [(1, 8192), (5, 7), (100, 7), (81_474, 8192), (50_000, 2048)])
def test_chunks_hold_every_example_once_in_runs_from_all_over_the_split(num_examples: int, chunk_rows: int):
    chunks = [chunk_ids(c, num_examples, SEED, chunk_rows) for c in range(num_chunks(num_examples, chunk_rows))]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(num_examples))
    assert all(np.all(np.diff(ids) > 0) for ids in chunks)  # each read goes forward through the file
    segment = min(SEGMENT_ROWS, chunk_rows)
    if chunk_rows // segment >= 16:  # the split is written user by user: a chunk must not be one region of it
        for ids in chunks[:-1]:
            assert np.count_nonzero(np.diff(ids) != 1) < chunk_rows // segment  # in runs of consecutive examples
            deciles = np.histogram(ids, bins=10, range=(0, num_examples))[0]
            assert deciles.min() > 0 and deciles.max() <= 3 * deciles.mean()


def test_several_chunks_per_range_block_read_the_same_rows_in_the_same_order(ray_session, tiny_prepared):
    """Many chunks (100M interactions: 8,546) are grouped into at most `range_blocks` blocks of chunk numbers;
    the rows, and their order, are those of one block per chunk."""
    split = Split.load(tiny_prepared / SPLIT_FILE)
    chunks = -(-len(split.train) // 7)
    assert chunks > 3
    one_each = train_dataset(tiny_prepared, SEED, chunk_rows=7).take_batch(10_000, batch_format="numpy")
    grouped = train_dataset(tiny_prepared, SEED, chunk_rows=7, range_blocks=3)
    rows = grouped.take_batch(10_000, batch_format="numpy")
    assert rows["id"].tolist() == one_each["id"].tolist() and sorted(rows["id"].tolist()) == list(range(len(split.train)))
    assert np.array_equal(rows["history"], one_each["history"]) and np.array_equal(rows["target"], one_each["target"])
    first_chunk = rows["id"][:7]
    assert first_chunk.tolist() == list(range(first_chunk[0], first_chunk[0] + 7))  # chunks stay whole, in order


def test_stream_refuses_a_shard_that_runs_short(ray_session, tiny_prepared):
    n = count_examples(tiny_prepared)
    data = StreamData(train_dataset(tiny_prepared, SEED).iterator(), valid_examples(tiny_prepared, 5),
                      num_examples=2 * n, batch_size=8, shuffle_buffer=64, seed=SEED, epochs=1)
    with pytest.raises(RuntimeError, match=f"gave {n // 8} batches in epoch 0, expected {2 * n // 8}"):
        list(data.batches(0))


class FakeShard:
    """A worker's shard without Ray: the same rows in the same block order at every epoch, as iter_batches
    windows of `batch_size` rows; counts the epochs it was asked for."""

    def __init__(self, rows: int, fail: bool = False) -> None:
        lengths = np.arange(rows) % 7 + 1
        self.rows = {"id": np.arange(rows), "length": lengths, "target": np.arange(rows) + 1000,
                     "history": np.where(np.arange(8) < lengths[:, None], np.arange(rows)[:, None], 0)}
        self.fail, self.epochs = fail, 0

    def iter_batches(self, *, batch_size: int, **kwargs: Any) -> Any:
        self.epochs += 1
        if self.fail:
            raise OSError("the split went away")
        for start in range(0, len(self.rows["id"]), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.rows.items()}


def fake_epochs(seed: int, epochs: list[int], rows: int = 1000, shuffle_buffer: int = 300) -> list[list[list[int]]]:
    data = StreamData(FakeShard(rows), valid=None, num_examples=rows, batch_size=8, shuffle_buffer=shuffle_buffer,
                      seed=seed, epochs=max(epochs) + 1)
    return [[b.ids.tolist() for b in data.batches(epoch)] for epoch in epochs]


def test_stream_epochs_hold_every_example_once_but_the_last_rest_and_shuffle_by_seed():
    rows, batch_size = 1000, 8
    first, second = fake_epochs(SEED, [0, 1])
    for batches in (first, second):
        seen = [i for b in batches for i in b]
        assert len(batches) == rows // batch_size and all(len(b) == batch_size for b in batches)
        assert len(seen) == len(set(seen)) and rows - len(seen) < batch_size  # only the last window's rest
    assert first != second  # each epoch shuffles anew
    assert fake_epochs(SEED, [0, 1]) == [first, second]  # deterministic by seed
    assert fake_epochs(SEED + 1, [0])[0] != first
    # rows are mixed across the window (shuffle_buffer rounds up to whole buckets: 400 rows), not only by length
    assert max(max(b) for b in first[:5]) > 50
    assert fake_epochs(SEED, [1]) == [second]  # a resumed run asks for a later epoch first: the same order


def test_ranks_train_on_batches_of_the_same_length_rank_at_each_step():
    """Each rank shuffles its own rows, but step k of every rank is the same length rank of its bucket, so a
    DDP step does not wait for one rank's long batch beside another's short one."""
    rows, batch_size = 2000, 8
    longest = []
    for rank, offset in ((0, 0), (1, 3)):  # different rows (ids, lengths shifted), the same length spread
        shard = FakeShard(rows)
        shard.rows["id"] = shard.rows["id"] + rank * rows
        shard.rows["length"] = (np.arange(rows) + offset) % 7 + 1
        data = StreamData(shard, valid=None, num_examples=2 * rows, batch_size=batch_size, shuffle_buffer=400,
                          seed=SEED, rank=rank, world_size=2, epochs=1)
        batches = list(data.batches(0))
        longest.append([int(shard.rows["length"][b.ids - rank * rows].max()) for b in batches])
    assert np.mean(np.abs(np.subtract(*longest))) < 0.5  # per rank alone the steps' lengths differ by ~2.3


def test_stream_without_shuffle_buffer_keeps_the_block_order_of_buckets():
    batches = fake_epochs(SEED, [0], rows=1000, shuffle_buffer=0)[0]
    # windows of one bucket (50 batches = 400 rows) in block order: the first 50 batches are rows 0-399
    assert sorted(i for b in batches[:50] for i in b) == list(range(400))


def test_stream_reads_ahead_no_further_than_its_epochs_and_raises_read_errors():
    shard = FakeShard(100)
    data = StreamData(shard, valid=None, num_examples=100, batch_size=8, shuffle_buffer=0, seed=SEED, epochs=2)
    for epoch in range(2):
        assert len(list(data.batches(epoch))) == 100 // 8
    time.sleep(0.2)  # time enough for the reading thread to start a third epoch, were it to
    assert shard.epochs == 2
    failing = StreamData(FakeShard(100, fail=True), valid=None, num_examples=100, batch_size=8, shuffle_buffer=0,
                         seed=SEED)
    with pytest.raises(OSError, match="the split went away"):
        list(failing.batches(0))


def record_epochs(config: dict[str, Any]) -> None:
    """Ray Train worker: two epochs of this rank's stream, the example ids of each batch written to a file."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    prepared = Path(config["prepared"])
    data = StreamData(ray.train.get_dataset_shard("train"), valid_examples(prepared, 5), count_examples(prepared),
                      config["batch_size"], shuffle_buffer=32, seed=SEED, rank=rank, world_size=world_size, epochs=2)
    epochs = [[b.ids.tolist() for b in data.batches(epoch)] for epoch in range(2)]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))


@pytest.mark.slow
def test_each_example_is_trained_at_most_once_per_epoch_and_only_the_leftover_is_not(
        ray_session, tiny_prepared, tmp_path):
    n, batch_size, workers = count_examples(tiny_prepared), 8, 2
    TorchTrainer(record_epochs, train_loop_config={"prepared": str(tiny_prepared), "batch_size": batch_size,
                                                   "out": str(tmp_path)},
                 datasets={"train": train_dataset(tiny_prepared, SEED)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="epochs")).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(workers)]
    steps = steps_per_epoch(n, workers, batch_size)
    orders = []
    for epoch in range(2):
        batches = [b for rank in ranks for b in rank[epoch]]
        assert all(len(rank[epoch]) == steps for rank in ranks) and all(len(b) == batch_size for b in batches)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == steps * batch_size * workers  # no example twice in an epoch
        assert set(seen) <= set(range(n))
        # not trained this epoch: the equal split's remainder (< workers) and each rank's last partial batch
        assert n - len(seen) < workers + workers * batch_size
        orders.append(seen)
    assert orders[0] != orders[1]  # each epoch shuffles anew


@pytest.mark.slow
def test_streaming_job_trains_end_to_end_through_run(ray_session, tiny_prepared, tmp_path):
    cfg = RayTrainConfig(prepared=str(tiny_prepared), storage_path=str(tmp_path), name="stream", backbone="tiny",
                         max_steps=30, batch_size=16, lr=3e-3, eval_every=15, checkpoint_every=15, eval_beam=5,
                         log_every=10, num_workers=2, cpus_per_worker=0.5, data="stream", shuffle_buffer=64)
    summary = run(cfg)
    assert summary["steps"] == 30 and [h["step"] for h in summary["history"]] == [15, 30]
    assert len(summary["worker_peak_rss_mb"]) == 2 and min(summary["worker_peak_rss_mb"]) > 0
    catalog, _, _ = assert_checkpoint_learned(summary["best_checkpoint"], tiny_prepared)
    assert summary["best_metrics"]["hit@10"] > 10 / catalog.num_items  # better than a random top-10


def test_data_source_must_be_known():
    with pytest.raises(ConfigError, match="data: must be one of"):
        RayTrainConfig(data="parquet")
