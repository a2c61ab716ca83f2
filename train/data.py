"""Training data streamed from Ray Data (`data: stream`): no worker and not the driver loads the split.

The prepared split (split.npz, format nezha-prepared/2) is one item-sequence array `values` plus per part
the examples' (start, end, target). `np.savez` stores its arrays uncompressed, so each one is read here as
a memory map of its bytes inside the zip file: the driver learns the number of examples from the header
of `train_targets`, and Ray Data tasks read the training examples chunk by chunk (CHUNK_ROWS examples,
their histories gathered from `values` and padded to `max_history`).

    driver:  ray.data.range(chunks) -> map_batches(read_chunks): rows {id, history[H], length, target}
    worker:  get_dataset_shard("train").iter_batches(window, local shuffle)  -> StreamData.batches(epoch)

Order of an epoch: the chunks come in one seeded random order (fixed for the run), every worker shuffles
the rows it receives within a bounded buffer (`shuffle_buffer` rows, seeded per epoch and rank), then cuts
windows of BUCKET_BATCHES batches, sorts each by history length (as the in-memory path does) and yields
its batches in a shuffled order. Ray Train splits the stream with `equal=True`, so each of W workers gets
N // W examples per epoch and makes (N // W) // batch_size batches of them: the same steps per epoch as
the in-memory path. The rows left over (fewer than W + W x batch_size of them) are not trained on that
epoch; which ones they are changes with the order. Validation examples are read the same way, only the
`eval_users` subset of them, and kept in memory (they are small).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray.data

from nezha.data.split import Examples, Ragged
from nezha.prepared import SPLIT_FILE, read_summary
from nezha.training import BUCKET_BATCHES, ExampleBatch, length_buckets, steps_per_epoch
from train.stream_read import CHUNK_ROWS, READ_CPUS, read_chunks, split_arrays


class DataIterator(Protocol):
    """What a worker gets from `ray.train.get_dataset_shard` (ray.data.DataIterator), as used here."""

    def iter_batches(self, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]: ...


def count_examples(prepared: str | Path, part: str = "train") -> int:
    """Examples of one part of the prepared split, read from the array's header (the split is not loaded)."""
    return len(split_arrays(str(Path(prepared) / SPLIT_FILE))[f"{part}_targets"])


def max_history(prepared: str | Path) -> int:
    """The `max_history` the split was prepared with (prepare.json): the width of a streamed history."""
    config = read_summary(prepared).get("config", {})
    if "max_history" not in config:
        raise ValueError(f"{prepared}/prepare.json does not say the split's max_history; run `nezha prepare` again")
    return int(config["max_history"])


def train_dataset(prepared: str | Path, seed: int) -> ray.data.Dataset:
    """The prepared split's training examples as a Ray Data dataset, read lazily chunk by chunk."""
    num_examples = count_examples(prepared)
    chunks = max(1, -(-num_examples // CHUNK_ROWS))
    fn_kwargs = {"split_path": str(Path(prepared) / SPLIT_FILE), "width": max_history(prepared),
                 "num_examples": num_examples, "seed": seed}
    return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
        read_chunks, fn_kwargs=fn_kwargs, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS)


def valid_examples(prepared: str | Path, max_users: int, seed: int = 0) -> Examples:
    """The validation examples training scores (`Examples.subset(max_users, seed)`: the same users as the
    in-memory path), copied out of the memory-mapped split."""
    arrays = split_arrays(str(Path(prepared) / SPLIT_FILE))
    chosen = Examples(Ragged(arrays["values"], arrays["valid_starts"], arrays["valid_ends"]),
                      arrays["valid_targets"]).subset(max_users, seed)
    return Examples(list(chosen.histories), np.array(chosen.targets))


class StreamData:
    """A worker's training data from its Ray Data shard (nezha.training.TrainingData)."""

    def __init__(self, shard: DataIterator, valid: Examples, num_examples: int, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.shard, self.valid, self.num_examples = shard, valid, num_examples
        self.batch_size, self.shuffle_buffer, self.seed, self.rank = batch_size, shuffle_buffer, seed, rank
        self.steps = steps_per_epoch(num_examples, world_size, batch_size)

    def batches(self, epoch: int) -> Iterator[ExampleBatch]:
        """Exactly `steps_per_epoch` batches: every rank must take as many steps as the others."""
        made = 0
        for batch in islice(self._batches(epoch), self.steps):
            made += 1
            yield batch
        if made < self.steps:
            raise RuntimeError(f"rank {self.rank}: the data stream gave {made} batches in epoch {epoch}, "
                               f"expected {self.steps}")

    def _batches(self, epoch: int) -> Iterator[ExampleBatch]:
        rng = np.random.default_rng((self.seed, epoch, self.rank))
        windows = self.shard.iter_batches(
            batch_size=self.batch_size * BUCKET_BATCHES, batch_format="numpy", drop_last=False,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=int(rng.integers(2**31)))
        for window in windows:
            buckets = length_buckets(window["length"], self.batch_size)
            for k in rng.permutation(len(buckets)):
                rows = buckets[k]
                histories = [h[:n] for h, n in zip(window["history"][rows], window["length"][rows], strict=True)]
                yield ExampleBatch(window["id"][rows], histories, window["target"][rows])
