"""The read side of the training stream (train/data.py), run in Ray Data's read tasks: chunks of the
prepared split's training examples, gathered from the memory-mapped split.npz.

Only numpy and the standard library are imported here: every read-task process imports this module,
and importing train.data (torch and the model code through nezha.training) cost each one ~12 s and
~0.5 GB on the loaded 2-core machine, which was most of a streamed run's slow start.
"""

from __future__ import annotations

import functools
import math
import zipfile
from pathlib import Path

import numpy as np

CHUNK_ROWS = 8192  # training examples per read (one Ray Data block of ~1.5 MB at max_history 20)
# A chunk is CHUNK_ROWS / SEGMENT_ROWS runs of SEGMENT_ROWS consecutive examples taken from all over the split
# (see chunk_ids): the split is written user by user, and its first examples have ~2.5x the history of its
# last (Beauty: 9.4 items on average in the first 8,192, 3.7 in the last), so with whole contiguous chunks one
# worker could draw most of the long ones; the ranks' batches only line up step by step (train/data.py) when
# their chunks hold the same mix.
SEGMENT_ROWS = 64
# Reading a chunk is a memory-mapped gather: a quarter of a CPU, so the reads fit beside CPU workers that
# hold most of a small machine's cores.
READ_CPUS = 0.25
# One read task at a time: a read is a ~3 ms gather of CHUNK_ROWS examples (~2.5M examples/s), while every
# further read process costs ~1-2 s of CPU to start, at each epoch (Ray ends idle task workers).
READ_TASKS = 1


def npz_member(path: Path, name: str) -> np.ndarray:
    """Array `name` of an uncompressed .npz file as a read-only memory map (nothing is read but its header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {name} is compressed, so it cannot be memory-mapped (np.savez, not savez_compressed)")
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths are at bytes 26-29
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {name} is not a plain C-ordered array")
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype)  # np.memmap refuses empty arrays
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


@functools.lru_cache(maxsize=4)  # per process: a Ray Data worker reads many chunks of the same split
def split_arrays(split_path: str) -> dict[str, np.ndarray]:
    """The memory-mapped arrays of a prepared split.npz (format nezha-prepared/2)."""
    path = Path(split_path)
    with zipfile.ZipFile(path) as archive:
        names = {n.removesuffix(".npy") for n in archive.namelist()}
    if "values" not in names:
        raise ValueError(f"{path} is an older split format (one array per part): streaming reads format "
                         "nezha-prepared/2; run `nezha prepare` again")
    return {name: npz_member(path, name) for name in sorted(names)}


def read_chunks(batch: dict[str, np.ndarray], split_path: str, width: int, num_examples: int,
                seed: int, chunk_rows: int = CHUNK_ROWS) -> dict[str, np.ndarray]:
    """Ray Data map function: chunk numbers -> their training examples, histories padded to `width`.

    Chunk k of the stream is chunk order[k] of the split (a seeded permutation), so the blocks arrive in
    a random order; each chunk's examples come from all over the split (chunk_ids), read in file order."""
    arrays = split_arrays(split_path)
    order = chunk_order(num_examples, seed, chunk_rows)
    ids = np.concatenate([chunk_ids(int(c), num_examples, seed, chunk_rows) for c in order[batch["id"]]])
    starts, ends = np.asarray(arrays["train_starts"][ids]), np.asarray(arrays["train_ends"][ids])
    lengths = ends - starts
    columns = np.arange(width)
    present = columns < lengths[:, None]
    positions = np.where(present, starts[:, None] + columns, 0)
    histories = np.where(present, arrays["values"][positions], 0)
    return {"id": ids, "history": histories, "length": lengths, "target": np.asarray(arrays["train_targets"][ids])}


def _segment_counts(num_examples: int, chunk_rows: int) -> tuple[int, int, int]:
    """(rows per segment, segments per chunk, segments in the split) of chunk_ids."""
    segment = min(SEGMENT_ROWS, chunk_rows)
    return segment, chunk_rows // segment, -(-num_examples // segment)


@functools.lru_cache(maxsize=4)
def _affine(segments: int, seed: int) -> tuple[int, int]:
    """(a, b) of chunk_ids' permutation s -> (a * s + b) mod segments: a coprime with segments (a bijection)
    and near its golden ratio, so a chunk's segments are spread evenly over the split; b from the seed."""
    a = int(segments * 0.6180339887) | 1
    while math.gcd(a, segments) != 1:
        a += 1
    return a, int(np.random.default_rng(seed).integers(segments))


def num_chunks(num_examples: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Chunks of the stream: whole segments each (see chunk_ids), at least one."""
    _segment, per_chunk, segments = _segment_counts(num_examples, chunk_rows)
    return max(1, -(-segments // per_chunk))


@functools.lru_cache(maxsize=4)
def chunk_order(num_examples: int, seed: int, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_chunks(num_examples, chunk_rows))


def chunk_ids(chunk: int, num_examples: int, seed: int, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """The example ids of chunk `chunk`, ascending: chunk_rows / SEGMENT_ROWS segments of SEGMENT_ROWS
    consecutive examples, the segments s = k * per_chunk ... of the split's segments under the permutation
    of `_affine`. No table is kept, whatever the split's size, and each segment is one sequential read."""
    segment, per_chunk, segments = _segment_counts(num_examples, chunk_rows)
    a, b = _affine(segments, seed)
    picked = np.arange(chunk * per_chunk, min(segments, (chunk + 1) * per_chunk), dtype=np.int64)
    starts = np.sort((a * picked + b) % segments) * segment
    ids = (starts[:, None] + np.arange(segment)).ravel()
    return ids[ids < num_examples]
