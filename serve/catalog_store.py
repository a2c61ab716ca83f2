"""A replica's copy of the catalog, the in-process store, and the follower that keeps the copy in step with Redis.

The request path only reads `LocalCatalog` (dicts + a PrefixVerifier on the decoding device): it never
calls Redis, so a Redis outage costs freshness, not availability. `CatalogFollower` is one background
thread per replica: it blocks on the Redis change feed (XREAD BLOCK from its version), applies entries as
they arrive (typically milliseconds after the write), and resyncs from a full snapshot whenever it cannot
trust the feed: a gap in versions (feed trimmed past it), a `reset` entry (a push), a lower remote version
or a new epoch (data lost or replaced), or a Redis restart (new run_id).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.catalog_cli import (
    FeedEntry,
    IdTakenError,
    ItemExistsError,
    ItemNotFoundError,
    RedisCatalog,
    Snapshot,
    StoreUnavailableError,
)
from nezha.verify.codec import unpack
from nezha.verify.verifier import PrefixVerifier

log = logging.getLogger("ray.serve.nezha.catalog")  # in replicas, Serve's log file has it


class LocalCatalog:
    """item id <-> packed ID maps, the verifier and the version, changed together under one lock.

    A decode reads the verifier without the lock, but its answer is mapped from IDs to items afterwards,
    under the lock: a decode that saw the old verifier is mapped with the new maps once a change is in
    (an item removed meanwhile maps to nothing and is dropped), and one that saw the new verifier waits
    for the change to finish before mapping. So an applied removal is never returned by this replica.
    """

    def __init__(self, items: Mapping[str, int], sizes: Sequence[int], device: torch.device | str = "cpu",
                 version: int = 0, source: str = "checkpoint") -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self._lock = threading.Condition()
        self._item_to_id = {str(i): int(p) for i, p in items.items()}
        self._id_to_item = {p: i for i, p in self._item_to_id.items()}
        self.verifier = PrefixVerifier(np.fromiter(self._id_to_item, dtype=np.int64, count=len(self._id_to_item)),
                                       self.sizes, device=device)
        self.version = version
        self.source = source  # checkpoint | redis | embedded

    @classmethod
    def from_catalog(cls, catalog: Catalog, device: torch.device | str = "cpu") -> LocalCatalog:
        items = dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
        return cls(items, catalog.codebook_sizes, device)

    def __len__(self) -> int:
        return len(self._item_to_id)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version, "size": len(self._item_to_id), "source": self.source}

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(packed IDs of the known items in order, ids that are not in the catalog)."""
        with self._lock:
            found = [self._item_to_id.get(i) for i in item_ids]
        return [p for p in found if p is not None], [i for i, p in zip(item_ids, found, strict=True) if p is None]

    def items_of(self, packed: Iterable[int]) -> tuple[list[str | None], int]:
        """(item id or None for each packed ID, the catalog version they were mapped at)."""
        with self._lock:
            return [self._id_to_item.get(int(p)) for p in packed], self.version

    def codes(self, packed: Sequence[int]) -> np.ndarray:
        return unpack(np.asarray(packed, dtype=np.int64), self.sizes)

    def used_ids(self) -> set[int]:
        with self._lock:
            return set(self._id_to_item)

    def apply(self, entries: Sequence[FeedEntry]) -> None:
        """Apply consecutive add/remove entries in order (one verifier rebuild for all of them)."""
        if not entries:
            return
        with self._lock:
            touched = {p for e in entries for _, p in e.items}
            before = {p for p in touched if p in self._id_to_item}
            for entry in entries:
                for item_id, packed in entry.items:
                    if entry.op == "add":
                        self._item_to_id[item_id] = packed
                        self._id_to_item[packed] = item_id
                    else:
                        if self._item_to_id.get(item_id) == packed:
                            del self._item_to_id[item_id]
                        if self._id_to_item.get(packed) == item_id:
                            del self._id_to_item[packed]
            after = {p for p in touched if p in self._id_to_item}
            self.verifier.update(add=list(after - before), remove=list(before - after))
            self.version = entries[-1].version
            self._lock.notify_all()

    def replace(self, items: Mapping[str, int], version: int, source: str) -> None:
        item_to_id = {str(i): int(p) for i, p in items.items()}
        id_to_item = {p: i for i, p in item_to_id.items()}
        with self._lock:
            self.verifier.replace(list(id_to_item))
            self._item_to_id, self._id_to_item = item_to_id, id_to_item
            self.version, self.source = version, source
            self._lock.notify_all()

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until this copy reached `version` (True) or `timeout` seconds passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.version >= version, timeout)


class InProcessStore:
    """The catalog store without Redis: changes apply to this replica's copy only (one replica)."""

    mode = "embedded"

    def __init__(self, local: LocalCatalog) -> None:
        self.local = local
        self._write_lock = threading.Lock()  # checks + apply are one step

    def used_ids(self) -> set[int]:
        return self.local.used_ids()

    def add(self, items: Sequence[tuple[str, int]]) -> int:
        with self._write_lock:
            for item_id, _ in items:
                known, _ = self.local.lookup([item_id])
                if known:
                    raise ItemExistsError(f"item {item_id!r} is already in the catalog (semantic ID {known[0]}); "
                                          "remove it first to give it a new ID", item_id, known[0])
            holders, _ = self.local.items_of(p for _, p in items)
            for (item_id, packed), holder in zip(items, holders, strict=True):
                if holder is not None:
                    raise IdTakenError(f"semantic ID {packed} asked for item {item_id!r} belongs to item "
                                       f"{holder!r}", item_id, packed)
            version = self.local.version + 1
            self.local.apply([FeedEntry(version, "add", [(i, int(p)) for i, p in items])])
            return version

    def remove(self, item_ids: Sequence[str]) -> int:
        with self._write_lock:
            packed, missing = self.local.lookup(item_ids)
            if missing:
                raise ItemNotFoundError(f"item {missing[0]!r} is not in the catalog", missing[0])
            version = self.local.version + 1
            self.local.apply([FeedEntry(version, "remove", list(zip(item_ids, packed, strict=True)))])
            return version

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "note": "no Redis configured: changes apply to this replica only and are "
                                          "lost when it restarts"}


@dataclass
class FollowerHealth:
    connected: bool = False
    problem: str | None = None  # why the copy may be stale: unreachable / no catalog / incompatible
    since: float = field(default_factory=time.time)
    last_ok: float | None = None
    resyncs: int = 0
    remote_version: int | None = None


class CatalogFollower(threading.Thread):
    """Keeps a LocalCatalog in step with a RedisCatalog; never raises out of its loop."""

    def __init__(self, store: RedisCatalog, local: LocalCatalog, block_ms: int = 500,
                 max_backoff_s: float = 2.0) -> None:
        super().__init__(name="nezha-catalog-follower", daemon=True)
        self.store = store
        self.local = local
        self.block_ms = block_ms
        self.max_backoff_s = max_backoff_s
        self.health = FollowerHealth()
        self._stop_event = threading.Event()
        self._epoch: str | None = None
        self._run_id: str | None = None
        self._need_resync = True

    def stop(self) -> None:
        self._stop_event.set()

    def degraded(self) -> list[str]:
        """Human-readable reasons this replica's copy may be stale (empty when following normally)."""
        h = self.health
        return [] if h.problem is None else [f"{h.problem} (since {time.strftime('%H:%M:%S', time.localtime(h.since))}; "
                                             f"serving catalog version {self.local.version} from this replica's copy)"]

    def sync_once(self) -> None:
        """One full resync now (used at start-up so a replica begins with Redis's view when it can)."""
        try:
            self._resync()
        except StoreUnavailableError as exc:
            self._problem(str(exc), connected=False)

    def run(self) -> None:
        backoff = 0.1
        while not self._stop_event.is_set():
            try:
                self._step()
                backoff = 0.1
            except StoreUnavailableError as exc:
                self._problem(str(exc), connected=False)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception:  # a bug must not kill the thread silently; the copy stays as it is
                log.exception("catalog follower step failed; resyncing")
                self._need_resync = True
                self._stop_event.wait(self.max_backoff_s)

    def _step(self) -> None:
        if self._need_resync or not self.health.connected:
            if not self._check_remote():
                self._stop_event.wait(self.max_backoff_s)
                return
        entries = self.store.read_feed(self.local.version, self.block_ms)
        if not entries:
            self._check_remote()
            return
        batch: list[FeedEntry] = []
        for entry in entries:
            expected = self.local.version + len(batch) + 1
            if entry.op == "reset" or entry.version != expected or entry.epoch != self._epoch:
                self.local.apply(batch)
                reason = "catalog pushed" if entry.op == "reset" else \
                    f"feed does not continue version {expected - 1} (next entry {entry.version}, epoch {entry.epoch})"
                self._resync(reason)
                return
            batch.append(entry)
        self.local.apply(batch)
        self._ok(batch[-1].version)

    def _check_remote(self) -> bool:
        """Compare Redis's version/epoch/run_id with ours; resync if they disagree. False: nothing to follow."""
        state = self.store.remote_state()
        if state.version is None:
            self._problem(f"Redis at {self.store.display_url} holds no catalog under {self.store.prefix!r} "
                          "(never pushed, or lost on a restart without persistence): run `nezha catalog push`",
                          connected=True)
            return False
        if self._need_resync:
            self._resync("start")
        elif state.run_id != self._run_id:
            self._resync("Redis restarted")  # persisted or not, a snapshot is the only safe starting point
        elif state.epoch != self._epoch or state.version < self.local.version:
            self._resync(f"remote version {state.version} / epoch {state.epoch} does not continue ours "
                         f"({self.local.version} / {self._epoch})")
        elif state.version > self.local.version and not self.store.read_feed(self.local.version, None, count=1):
            self._resync(f"feed trimmed past version {self.local.version} (remote {state.version})")
        else:
            self._ok(state.version)
        return self.health.problem is None

    def _resync(self, reason: str = "start") -> None:
        snapshot = self.store.snapshot()
        if snapshot is None:
            self._problem(f"Redis at {self.store.display_url} holds no catalog under {self.store.prefix!r}: "
                          "run `nezha catalog push`", connected=True)
            return
        if snapshot.codebook_sizes != self.local.sizes:
            self._problem(f"the catalog in Redis has codebook sizes {list(snapshot.codebook_sizes)} but this "
                          f"model uses {list(self.local.sizes)}: not applied", connected=True)
            self._need_resync = True
            return
        self._apply_snapshot(snapshot)
        log.info("catalog resync (%s): version %d, %d items", reason, snapshot.version, len(snapshot.items))

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        self.local.replace(snapshot.items, snapshot.version, source="redis")
        self._epoch, self._run_id = snapshot.epoch, snapshot.run_id
        self._need_resync = False
        self.health.resyncs += 1
        self._ok(snapshot.version)

    def _ok(self, remote_version: int) -> None:
        h = self.health
        if h.problem is not None:
            log.info("catalog store back to normal after: %s", h.problem)
        h.connected, h.problem, h.last_ok, h.remote_version = True, None, time.time(), remote_version

    def _problem(self, message: str, connected: bool) -> None:
        h = self.health
        if h.problem != message:
            log.warning("%s", message)
            h.since = time.time()
        h.connected, h.problem = connected, message
