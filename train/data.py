"""Training data streamed from Ray Data (`data: stream`): no worker and not the driver loads the split.

The prepared split (split.npz, format nezha-prepared/2) is one item-sequence array `values` plus per part
the examples' (start, end, target). `np.savez` stores its arrays uncompressed, so each one is read here as
a memory map of its bytes inside the zip file: the driver learns the number of examples from the header
of `train_targets`, and Ray Data tasks read the training examples chunk by chunk (CHUNK_ROWS examples in
runs of SEGMENT_ROWS from all over the split, their histories gathered from `values` and padded to
`max_history`).

    driver:  ray.data.range(chunks) -> map_batches(read_chunks, one task at a time):
             rows {id, history[H], length, target}
    worker:  a thread: get_dataset_shard("train").iter_batches(windows) -> shuffle -> batches -> queue
             StreamData.batches(epoch) <- queue

Order of an epoch: the chunks come in one seeded random order (fixed for the run); every worker takes the
rows it receives in windows of `shuffle_buffer` rows (rounded up to whole buckets of BUCKET_BATCHES
batches), permutes each window (seeded per epoch and rank), cuts it into buckets, sorts each bucket by
history length (as the in-memory path does) and yields its batches in a shuffled order that is the same on
every rank, so the ranks' batches at one step are alike in length (DDP steps wait for the slowest rank). Ray Train splits
the stream with `equal=True`, so each of W workers gets N // W examples per epoch and makes (N // W) //
batch_size batches of them: the same steps per epoch as the in-memory path. The rows left over (fewer than
W + W x batch_size of them) are not trained on that epoch; which ones they are changes with the order.
The worker's thread reads the next epoch as soon as the current one's stream has ended, so Ray Data's
restart of the pipeline overlaps training. Validation examples are read the same way, only the
`eval_users` subset of them, and kept in memory (they are small).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray.data

from nezha.data.split import Examples, Ragged
from nezha.prepared import SPLIT_FILE, read_summary
from nezha.training import BUCKET_BATCHES, ExampleBatch, length_buckets, steps_per_epoch
from train.stream_read import CHUNK_ROWS, READ_CPUS, READ_TASKS, num_chunks, read_chunks, split_arrays

# Blocks of chunk numbers (see train_dataset): up to 256 chunks (2.1M examples) one chunk per block, as
# before; beyond, several chunks per read task.
RANGE_BLOCKS = 256


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


def train_dataset(prepared: str | Path, seed: int, chunk_rows: int = CHUNK_ROWS,
                  range_blocks: int = RANGE_BLOCKS) -> ray.data.Dataset:
    """The prepared split's training examples as a Ray Data dataset, read lazily chunk by chunk.

    The chunk numbers come from `ray.data.range` in at most `range_blocks` blocks: each of its blocks is a
    task of its own (not fused with the read, which asks for less CPU), ~0.1-0.4 s each on a busy 2-core
    machine, so one block per chunk (8,546 of them at 100M interactions) kept the read waiting for most
    of an hour before the first batch."""
    num_examples = count_examples(prepared)
    chunks = num_chunks(num_examples, chunk_rows)
    fn_kwargs = {"split_path": str(Path(prepared) / SPLIT_FILE), "width": max_history(prepared),
                 "num_examples": num_examples, "seed": seed, "chunk_rows": chunk_rows}
    return ray.data.range(chunks, override_num_blocks=min(chunks, range_blocks)).map_batches(
        read_chunks, fn_kwargs=fn_kwargs, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS))


def valid_examples(prepared: str | Path, max_users: int, seed: int = 0) -> Examples:
    """The validation examples training scores (`Examples.subset(max_users, seed)`: the same users as the
    in-memory path), copied out of the memory-mapped split."""
    arrays = split_arrays(str(Path(prepared) / SPLIT_FILE))
    chosen = Examples(Ragged(arrays["values"], arrays["valid_starts"], arrays["valid_ends"]),
                      arrays["valid_targets"]).subset(max_users, seed)
    return Examples(list(chosen.histories), np.array(chosen.targets))


class StreamData:
    """A worker's training data from its Ray Data shard (nezha.training.TrainingData).

    A background thread reads the shard and builds the batches: it starts the first epoch when the data is
    made (so Ray Data's start overlaps the model's) and each later epoch as soon as the previous one's
    stream has ended, while the loop still trains on its last batches. It stops after `epochs` epochs.
    """

    def __init__(self, shard: DataIterator, valid: Examples, num_examples: int, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int = 0, world_size: int = 1, epochs: int | None = None) -> None:
        self.shard, self.valid, self.num_examples = shard, valid, num_examples
        self.batch_size, self.shuffle_buffer, self.seed, self.rank = batch_size, shuffle_buffer, seed, rank
        self.steps = steps_per_epoch(num_examples, world_size, batch_size)
        self.epochs = epochs
        bucket_rows = batch_size * BUCKET_BATCHES
        # Whole buckets per shuffle window, so that only an epoch's last bucket has a rest under batch_size.
        self.window_rows = bucket_rows * max(1, -(-shuffle_buffer // bucket_rows))
        # Two windows of batches ahead at most: the memory the feed holds beside Ray Data's own prefetch.
        self._queue: queue.Queue[tuple[int, ExampleBatch | BaseException | None]] = \
            queue.Queue(maxsize=2 * self.window_rows // batch_size)
        self._lock = threading.Condition()
        self._target: int | None = 0  # the epoch the thread is to read next (None: wait)
        self._expected = 0  # the epoch `batches` expects to be asked for next
        threading.Thread(target=self._read, name=f"stream-rank{rank}", daemon=True).start()

    def batches(self, epoch: int) -> Iterator[ExampleBatch]:
        """Exactly `steps_per_epoch` batches: every rank must take as many steps as the others."""
        if epoch != self._expected:  # a resumed run: drop what was read ahead, read this epoch instead
            with self._lock:
                self._target = epoch
                self._lock.notify()
        self._expected = epoch + 1
        made = 0
        while made < self.steps:
            item_epoch, item = self._queue.get()
            if item_epoch != epoch:
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise RuntimeError(f"rank {self.rank}: the data stream gave {made} batches in epoch {epoch}, "
                                   f"expected {self.steps}")
            made += 1
            yield item

    def _read(self) -> None:
        """The reading thread: epoch after epoch, this rank's batches into the queue, then None."""
        while True:
            with self._lock:
                while self._target is None:
                    self._lock.wait()
                epoch = self._target
            try:
                for batch in self._epoch_batches(epoch):
                    if self._target != epoch:  # `batches` asked for another epoch: stop this one
                        break
                    self._queue.put((epoch, batch))
                else:
                    self._queue.put((epoch, None))
            except Exception as error:  # raised again in the training loop, by `batches`
                self._queue.put((epoch, error))
                return
            with self._lock:
                if self._target == epoch:
                    following = epoch + 1
                    self._target = following if self.epochs is None or following < self.epochs else None

    def _epoch_batches(self, epoch: int) -> Iterator[ExampleBatch]:
        """One epoch of the shard: each window of `window_rows` rows shuffled (a seeded permutation), cut into
        buckets of BUCKET_BATCHES batches sorted by history length, their batches in a random order.

        The rows' shuffle is this rank's own; the order of a bucket's batches is drawn the same on every rank
        (seeded without the rank), so at each step every rank trains on the same length rank of its bucket,
        as InMemoryData's shared permutation does. Drawn per rank, one rank's step was often a long batch
        while another's was a short one, and DDP's all-reduce made the short one wait: 27% of a worker's time
        (py-spy, Beauty, 2 workers), against 4% in memory."""
        rng = np.random.default_rng((self.seed, epoch, self.rank))
        batch_order = np.random.default_rng((self.seed, epoch))
        bucket_rows = self.batch_size * BUCKET_BATCHES
        for window in self.shard.iter_batches(batch_size=self.window_rows, batch_format="numpy", drop_last=False):
            rows = len(window["id"])
            order = rng.permutation(rows) if self.shuffle_buffer else np.arange(rows)
            for start in range(0, rows, bucket_rows):
                bucket = order[start:start + bucket_rows]
                lengths = window["length"][bucket]
                batches = length_buckets(lengths, self.batch_size)
                for k in batch_order.permutation(len(batches)):
                    chosen = bucket[batches[k]]
                    histories = [h[:n] for h, n in zip(window["history"][chosen], window["length"][chosen],
                                                       strict=True)]
                    yield ExampleBatch(window["id"][chosen], histories, window["target"][chosen])
