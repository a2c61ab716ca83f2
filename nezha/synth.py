"""Synthetic datasets for benchmarks and tests (`nezha synth`): items with titles, interactions with Zipf
popularity and sequential structure, written as Parquet in the directory format `nezha prepare` reads.

The model behind the data, so that a recommender has something to learn:

- items fall into latent clusters (a brand and a product kind each; titles are made from the cluster's
  words, so text embeddings see the clusters too); item popularity is Zipf (`zipf`) over a random order;
- a user walks among the items of one cluster, picking each next item by popularity, and jumps to
  another cluster (chosen by its total popularity) with probability `switch`; with probability
  `follow` the next item is instead the successor of the previous one in its cluster (item k -> k+1, a
  "series" a model can learn from the last item alone);
- sequence lengths are 3 + geometric(mean `mean_length` - 3), capped at `max_length`; timestamps are
  seconds, strictly increasing per user; within a part rows are ordered by time, so users interleave.

Written, in chunks of `part_rows` interactions (memory stays flat in the number of interactions):

    items.parquet                  item_id, title, brand, categories (list of strings)
    interactions/part-00000.parquet  user_id, item_id, timestamp (int64 seconds)

The output depends only on the config (seed included), not on the machine: chunk k draws from its own
generator seeded by (seed, k), and the users of a chunk are numbered after those of earlier chunks.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nezha.config import ConfigError

log = logging.getLogger(__name__)

ITEMS_PARQUET = "items.parquet"
INTERACTIONS_DIR = "interactions"
_START_TIME = 1_420_070_400  # 2015-01-01, seconds
_TIME_SPAN = 8 * 365 * 86_400

_BRAND_A = ["Acme", "Nova", "Lumen", "Verde", "Aurora", "Silk", "Crest", "Bloom", "Pure", "Urban", "Coral", "Sage"]
_BRAND_B = ["Labs", "Naturals", "Beauty", "Botanics", "Studio", "& Co", "Essentials", "Organics", "Care", "Pro"]
_KINDS = ["Face Cream", "Shampoo", "Conditioner", "Lipstick", "Mascara", "Nail Polish", "Eau de Parfum",
          "Body Lotion", "Face Serum", "Eye Shadow Palette", "Hair Oil", "Sunscreen SPF 50", "Cleansing Gel",
          "Hand Cream", "Dry Shampoo", "Lip Balm", "Foundation", "Toner", "Face Mask", "Body Wash"]
_CATEGORIES = {"Face Cream": "Skin Care", "Shampoo": "Hair Care", "Conditioner": "Hair Care", "Lipstick": "Makeup",
               "Mascara": "Makeup", "Nail Polish": "Nails", "Eau de Parfum": "Fragrance", "Body Lotion": "Bath & Body",
               "Face Serum": "Skin Care", "Eye Shadow Palette": "Makeup", "Hair Oil": "Hair Care",
               "Sunscreen SPF 50": "Skin Care", "Cleansing Gel": "Skin Care", "Hand Cream": "Bath & Body",
               "Dry Shampoo": "Hair Care", "Lip Balm": "Makeup", "Foundation": "Makeup", "Toner": "Skin Care",
               "Face Mask": "Skin Care", "Body Wash": "Bath & Body"}
_ADJECTIVES = ["Hydrating", "Matte", "Organic", "Vanilla", "Argan", "Mint", "Rose", "Charcoal", "Gold", "Daily",
               "Intense", "Gentle", "Volumizing", "Long-Lasting", "Soothing", "Brightening", "Repairing", "Sheer",
               "Waterproof", "Fragrance-Free", "Coconut", "Lavender", "Vitamin C", "Hyaluronic", "Shea Butter"]
_SIZES = ["1 fl oz", "1.7 oz", "3.4 fl oz", "6.8 fl oz (200 ml)", "8 oz", "12 fl oz", "0.5 oz", "50 ml", "100 ml"]
_PACKS = ["", "", "", ", Pack of 2", ", Pack of 3", ", 2 Count", " Travel Size", " Value Set"]


@dataclass
class SynthConfig:
    """Write a synthetic dataset (items + interactions as Parquet) for benchmarks and tests."""

    out: str = field(default="data/synthetic", metadata={"help": "output directory (replaced if it exists)"})
    items: int = field(default=100_000, metadata={"help": "number of items"})
    interactions: int = field(default=1_000_000, metadata={"help": "number of interactions"})
    seed: int = field(default=0, metadata={"help": "random seed: the same config writes the same files"})
    clusters: int = field(default=0, metadata={"help": "latent item clusters (0: about sqrt(items))"})
    zipf: float = field(default=1.0, metadata={"help": "Zipf exponent of item popularity"})
    mean_length: float = field(default=10.0, metadata={"help": "mean interactions per user (> 3)"})
    max_length: int = field(default=200, metadata={"help": "longest user sequence"})
    switch: float = field(default=0.2, metadata={"help": "chance that a user's next item is from another cluster"})
    follow: float = field(default=0.3, metadata={"help": "chance that the next item is the previous one's successor"})
    part_rows: int = field(default=1 << 20, metadata={"help": "interactions per Parquet part"})

    def __post_init__(self) -> None:
        for name in ("items", "interactions", "max_length", "part_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.clusters < 0 or self.clusters > self.items:
            raise ConfigError(f"clusters: must be 0 (automatic) or 1..items, got {self.clusters}")
        if not 3 < self.mean_length <= self.max_length:
            raise ConfigError(f"mean_length: must be > 3 and <= max_length, got {self.mean_length}")
        for name in ("switch", "follow"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: a probability in [0, 1], got {getattr(self, name)}")
        if self.zipf < 0:
            raise ConfigError(f"zipf: must be >= 0, got {self.zipf}")


@dataclass
class _Catalog:
    """The latent structure: item -> cluster, the items of each cluster by rank, popularity CDFs."""

    cluster_of: np.ndarray  # [N] cluster of each item
    members: np.ndarray  # [N] item indices grouped by cluster
    starts: np.ndarray  # [C + 1] cluster c's items are members[starts[c]:starts[c + 1]]
    rank_in_cluster: np.ndarray  # [N] position of each item within its cluster's members
    item_cdf: np.ndarray  # [N] c + cumulative popularity share within cluster c, in members order
    cluster_cdf: np.ndarray  # [C] cumulative popularity share of the clusters


def _catalog(cfg: SynthConfig, rng: np.random.Generator) -> _Catalog:
    n = cfg.items
    num_clusters = cfg.clusters or max(1, round(np.sqrt(n)))
    weight = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** cfg.zipf
    weight = weight[rng.permutation(n)]  # popularity rank independent of item number and cluster
    cluster_of = rng.integers(0, num_clusters, size=n)
    cluster_of[:num_clusters] = np.arange(num_clusters)  # no empty cluster
    members = np.argsort(cluster_of, kind="stable")
    counts = np.bincount(cluster_of, minlength=num_clusters)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rank_in_cluster = np.empty(n, dtype=np.int64)
    rank_in_cluster[members] = np.arange(n) - np.repeat(starts[:-1], counts)
    w = weight[members]
    cluster_weight = np.add.reduceat(w, starts[:-1])
    within = np.cumsum(w) - np.repeat(np.cumsum(cluster_weight) - cluster_weight, counts)
    item_cdf = np.repeat(np.arange(num_clusters), counts) + within / np.repeat(cluster_weight, counts)
    cluster_cdf = np.cumsum(cluster_weight) / cluster_weight.sum()
    return _Catalog(cluster_of, members, starts, rank_in_cluster, item_cdf, cluster_cdf)


def _item_table(cfg: SynthConfig, cat: _Catalog, rng: np.random.Generator) -> pa.Table:
    """Item ids, titles (~60-90 characters, like Amazon's), brands and categories from each item's cluster."""
    num_clusters = len(cat.starts) - 1
    cluster_brand = [f"{_BRAND_A[a]} {_BRAND_B[b]}" for a, b in zip(
        rng.integers(0, len(_BRAND_A), num_clusters), rng.integers(0, len(_BRAND_B), num_clusters), strict=True)]
    cluster_kind = rng.integers(0, len(_KINDS), num_clusters)
    cluster_adjective = rng.integers(0, len(_ADJECTIVES), num_clusters)
    n = cfg.items
    adjective, size, pack = (rng.integers(0, len(v), n) for v in (_ADJECTIVES, _SIZES, _PACKS))
    width = len(str(n - 1))
    ids, titles, brands, categories = [], [], [], []
    for i, c in enumerate(cat.cluster_of.tolist()):
        kind = _KINDS[cluster_kind[c]]
        ids.append(f"I{i:0{width}d}")
        brands.append(cluster_brand[c])
        titles.append(f"{cluster_brand[c]} {_ADJECTIVES[cluster_adjective[c]]} {_ADJECTIVES[adjective[i]]} {kind} "
                      f"No. {cat.rank_in_cluster[i] + 1}, {_SIZES[size[i]]}{_PACKS[pack[i]]}")
        categories.append(["Beauty", _CATEGORIES[kind], kind])
    return pa.table({"item_id": ids, "title": titles, "brand": brands,
                     "categories": pa.array(categories, pa.list_(pa.string()))})


def _user_lengths(cfg: SynthConfig, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sequence lengths summing to exactly `rows` (the last user is cut short)."""
    mean_extra = cfg.mean_length - 3
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < rows:
        draw = 3 + rng.geometric(1.0 / (mean_extra + 1), size=max(16, int(rows / cfg.mean_length * 1.1))) - 1
        lengths = np.concatenate([lengths, np.minimum(draw, cfg.max_length)])
    ends = np.cumsum(lengths)
    last = int(np.searchsorted(ends, rows))
    lengths = lengths[: last + 1]
    lengths[-1] -= ends[last] - rows
    return lengths


def _chunk(cfg: SynthConfig, cat: _Catalog, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(user index within the chunk, item index, timestamp) of `rows` interactions, vectorised over users."""
    lengths = _user_lengths(cfg, rows, rng)
    user = np.repeat(np.arange(len(lengths)), lengths)
    first = np.zeros(rows, dtype=bool)
    first[np.cumsum(lengths) - lengths] = True
    # the cluster a user is in: a new one at the start and at each jump, kept in between
    jump = first | (rng.random(rows) < cfg.switch)
    jumped_to = np.searchsorted(cat.cluster_cdf, rng.random(int(jump.sum())), side="right")
    cluster = np.minimum(jumped_to, len(cat.cluster_cdf) - 1)[np.cumsum(jump) - 1]
    # a popular item of that cluster, or the successor of the previous item: a run of k "follow" steps
    # after a drawn item is that item's k-th successor in its cluster
    drawn_pos = np.searchsorted(cat.item_cdf, cluster + rng.random(rows), side="right")
    drawn_pos = np.clip(drawn_pos, cat.starts[cluster], cat.starts[cluster + 1] - 1)
    follow = ~jump & (rng.random(rows) < cfg.follow)
    run_start = np.maximum.accumulate(np.where(follow, 0, np.arange(rows)))
    size = cat.starts[cluster + 1] - cat.starts[cluster]
    pos = cat.starts[cluster] + (drawn_pos[run_start] - cat.starts[cluster] + np.arange(rows) - run_start) % size
    item = cat.members[pos]
    # timestamps: a start per user, then gaps of about a week
    start = _START_TIME + rng.integers(0, _TIME_SPAN, size=len(lengths))
    gaps = 1 + rng.exponential(7 * 86_400, size=rows).astype(np.int64)
    gaps[first] = 0
    cum = np.cumsum(gaps)
    timestamp = start[user] + cum - np.repeat(cum[first], lengths)
    order = np.argsort(timestamp, kind="stable")  # a log in time order: users interleave
    return user[order], item[order], timestamp[order]


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Write the dataset to `cfg.out` (replacing it) and return its statistics."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    (out / INTERACTIONS_DIR).mkdir(parents=True)
    cat = _catalog(cfg, np.random.default_rng([cfg.seed, 0]))
    items = _item_table(cfg, cat, np.random.default_rng([cfg.seed, 1]))
    pq.write_table(items, out / ITEMS_PARQUET)
    item_ids = items.column("item_id").combine_chunks()
    del items

    users = 0
    parts = -(-cfg.interactions // cfg.part_rows)
    for k in range(parts):
        rows = min(cfg.part_rows, cfg.interactions - k * cfg.part_rows)
        user, item, timestamp = _chunk(cfg, cat, rows, np.random.default_rng([cfg.seed, 2, k]))
        num_users = int(user.max()) + 1
        user_names = pa.array([f"U{u}" for u in range(users, users + num_users)])
        table = pa.table({"user_id": user_names.take(user), "item_id": item_ids.take(item), "timestamp": timestamp})
        pq.write_table(table, out / INTERACTIONS_DIR / f"part-{k:05d}.parquet")
        users += num_users
    stats = {"items": cfg.items, "interactions": cfg.interactions, "users": users, "parts": parts,
             "clusters": len(cat.starts) - 1, "seconds": round(time.perf_counter() - start, 2)}
    log.info("wrote %s: %s", out, stats)
    return stats
