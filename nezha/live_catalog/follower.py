"""The follower: one background thread per replica that keeps its `LocalCatalog` in step with Redis.

It blocks on the Redis change feed (XREAD BLOCK from its version), applies what each read returns as one
update (typically milliseconds after the write; when it is behind, reads are larger, so it catches up),
and resyncs from a full snapshot whenever it cannot trust the
feed: a gap in versions (feed trimmed past it), a `reset` entry (a push), a lower remote version or a new
epoch (data lost or replaced), or a Redis restart (new run_id). A failover can fork the history: a promoted
replica that lacked the last changes is behind this copy on the same epoch, or goes on with other changes
under the same version numbers. Each add/remove entry names the change before it (`prev`), so both show up
as a fork: counted in `health.forks`, logged with the resync, and the copy replaced by the store's state,
never a mix of the two histories.

A snapshot starts from Redis's snapshot blob when the feed still reaches back to it (redis_store.py). When
its copy is more than half a feed ahead of that blob (or there is none), a follower publishes its copy as
the new blob from a background thread at the lowest OS priority, at most every BLOB_CHECK_S, so the next
replica starts from it. Where the copy's last merge of its maps is recent enough (within half a feed), that
merge's table is published as it is, at its version: no second O(N) pass over the catalog.

The follower's applies allocate Python objects steadily (feed entries, dicts), so they trigger the cyclic
GC's full collections, which walk every object of the process (the model, torch, the catalog) while
holding the GIL: ~0.25 s at 1M items with a `small` model, a stall for any decode then. A replica calls
`freeze_heap()` once it has loaded its model and catalog, so those collections skip what was there.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nezha.live_catalog.errors import CatalogStoreError, NoCatalogError, StoreUnavailableError
from nezha.live_catalog.item_table import ItemTable
from nezha.live_catalog.local import LocalCatalog, lower_thread_priority
from nezha.live_catalog.redis_store import RedisCatalog, RedisItemMeta, Snapshot
from nezha.live_catalog.store import FeedEntry

log = logging.getLogger(__name__)

DEFAULT_BATCH_MS = 20  # a feed read that found changes waits this long before the next (CatalogFollower._step)
READ_COUNT = 1000  # feed entries per read at most
BLOB_CHECK_S = 10.0  # how often a follower may look at (and republish) the snapshot blob


def freeze_heap() -> int:
    """Collect, then move every object alive now out of the cyclic GC's reach (`gc.freeze`); returns how many.
    Call once the process's long-lived state is loaded. Refcounting still frees them; only garbage cycles among
    them are never collected (the model and the catalog copy live as long as the process anyway)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class FollowerHealth:
    connected: bool = False
    problem: str | None = None  # why the copy may be stale: unreachable / no catalog / incompatible
    since: float = field(default_factory=time.time)
    last_ok: float | None = None
    resyncs: int = 0
    forks: int = 0  # resyncs because the store's history forked from the one applied here (a failover lost changes)
    remote_version: int | None = None


class CatalogFollower(threading.Thread):
    """Keeps a LocalCatalog in step with a RedisCatalog; never raises out of its loop.

    `logger`: where its lines go (the service passes one under `ray.serve` so Serve's replica logs have them).
    """

    def __init__(self, store: RedisCatalog, local: LocalCatalog, block_ms: int = 500,
                 max_backoff_s: float = 2.0, logger: logging.Logger | None = None,
                 batch_ms: int = DEFAULT_BATCH_MS) -> None:
        super().__init__(name="nezha-catalog-follower", daemon=True)
        self._log = logger or log
        self.store = store
        self.local = local
        self.block_ms = block_ms
        self.batch_ms = batch_ms
        self._next_read = 0.0  # monotonic time before which the feed is not read again (see _step)
        self.max_backoff_s = max_backoff_s
        self.health = FollowerHealth()
        self._stop_event = threading.Event()
        self._epoch: str | None = None
        self._run_id: str | None = None
        self._need_resync = True
        self._head: str | None = None  # token of the last change applied (None: not looked up since the resync)
        self._blob_version: int | None = None  # the snapshot blob's version as last seen (None: none usable)
        self._next_blob_check = 0.0
        self._publisher: threading.Thread | None = None

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
        except CatalogStoreError as exc:  # e.g. the catalog changed under every snapshot read: the loop retries
            self._problem(str(exc), connected=True)

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
                self._log.exception("catalog follower step failed; resyncing")
                self._need_resync = True
                self._stop_event.wait(self.max_backoff_s)

    def _step(self) -> None:
        if self._need_resync or not self.health.connected:
            if not self._check_remote():
                self._stop_event.wait(self.max_backoff_s)
                return
        if self._head is None and self.local.version > 0:
            self._head = self._head_at(self.local.version)
        # After a read that found changes, the next waits batch_ms: under a stream of changes each read then
        # takes a batch, instead of a read, an apply and a new verifier version for every change or two, whose
        # fixed costs took half a core at 1,000 changes/s. A change after a quiet spell is read at once.
        self._stop_event.wait(max(0.0, self._next_read - time.monotonic()))
        entries = self.store.read_feed(self.local.version, self.block_ms, READ_COUNT)
        if not entries:
            self._check_remote()
            return
        if len(entries) < READ_COUNT:  # a full read is catching up: read on at once
            self._next_read = time.monotonic() + self.batch_ms / 1000
        batch: list[FeedEntry] = []
        for entry in entries:
            expected = self.local.version + len(batch) + 1
            if entry.op == "reset" or entry.version != expected or entry.epoch != self._epoch:
                self.local.apply(batch)
                reason = "catalog pushed" if entry.op == "reset" else \
                    f"feed does not continue version {expected - 1} (next entry {entry.version}, epoch {entry.epoch})"
                self._resync(reason)
                return
            last = batch[-1].token if batch else self._head
            if entry.prev is not None and last is not None and entry.prev != last:
                # Same version numbers, another history (a promoted replica lost changes, then took new ones):
                # nothing of it is applied on top of ours; the snapshot replaces the copy as a whole.
                self._fork(f"feed entry {entry.version} follows change {entry.prev or '(a push)'}, not {last or '(a push)'} "
                           "that this copy applied")
                return
            batch.append(entry)
        self.local.apply(batch)
        self._head = batch[-1].token
        self._ok(batch[-1].version)
        self._maybe_publish()

    def _check_remote(self) -> bool:
        """Compare Redis's version/epoch/run_id with ours; resync if they disagree. False: nothing to follow."""
        state = self.store.remote_state()
        if state.version is None:
            self._problem(str(NoCatalogError(self.store.display_url, self.store.prefix)), connected=True)
            return False
        if self._need_resync:
            self._resync("start")
        elif state.epoch == self._epoch and state.version < self.local.version:
            self._fork(f"the store's version {state.version} is behind this copy's {self.local.version} on the "
                       "same push (a replica promoted without the last changes)")
        elif state.run_id != self._run_id:
            head = self._head_at(self.local.version) if self._head is not None else None
            if head is not None and head != self._head:
                self._fork(f"after a Redis restart or failover, version {self.local.version} is another change than "
                           "the one this copy applied")
            else:
                self._resync("Redis restarted")  # persisted or not, a snapshot is the only safe starting point
        elif state.epoch != self._epoch or state.version < self.local.version:
            self._resync(f"remote version {state.version} / epoch {state.epoch} does not continue ours "
                         f"({self.local.version} / {self._epoch})")
        elif state.version > self.local.version and not self.store.read_feed(self.local.version, None, count=1):
            self._resync(f"feed trimmed past version {self.local.version} (remote {state.version})")
        else:
            self._ok(state.version)
        return self.health.problem is None

    def _head_at(self, version: int) -> str | None:
        """The token of the store's change `version` (None: no longer in the feed)."""
        entries = self.store.read_feed(version - 1, None, count=1)
        return entries[0].token if entries and entries[0].version == version else None

    def _fork(self, reason: str) -> None:
        """The store's history is not the one applied here: resync to the store's state (one log line), counted."""
        self.health.forks += 1
        self._resync(f"history forked: {reason}")

    def _resync(self, reason: str = "start") -> None:
        snapshot = self.store.snapshot()
        if snapshot is None:
            self._problem(str(NoCatalogError(self.store.display_url, self.store.prefix)), connected=True)
            return
        if snapshot.codebook_sizes != self.local.sizes:
            self._problem(f"the catalog in Redis has codebook sizes {list(snapshot.codebook_sizes)} but this "
                          f"model uses {list(self.local.sizes)}: not applied", connected=True)
            self._need_resync = True
            return
        self._apply_snapshot(snapshot)
        self._log.info("catalog resync (%s): version %d, %d items", reason, snapshot.version, len(snapshot.table))

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        # Metadata is read from Redis for the answered items; a fresh cache, since a push may change it.
        self.local.replace(snapshot.table, snapshot.version, source="redis", meta=RedisItemMeta(self.store))
        self._epoch, self._run_id = snapshot.epoch, snapshot.run_id
        self._head = None  # looked up at the snapshot's version by the next step
        self._need_resync = False
        self.health.resyncs += 1
        self._ok(snapshot.version)
        self._blob_version, self._next_blob_check = snapshot.blob_version, 0.0
        self._maybe_publish()

    def _maybe_publish(self) -> None:
        """Publish this copy as the snapshot blob when Redis's is more than half a feed behind it (or missing)."""
        ahead = max(1, self.store.feed_maxlen // 2)
        if self._blob_version is not None and self.local.version - self._blob_version <= ahead:
            return
        now = time.monotonic()
        if now < self._next_blob_check or (self._publisher is not None and self._publisher.is_alive()):
            return
        self._next_blob_check = now + BLOB_CHECK_S
        epoch, version = self.store.blob_state()  # another replica may have published meanwhile
        if epoch == self._epoch and version is not None:
            self._blob_version = version
            if self.local.version - version <= ahead:
                return
        merged = self.local.merged()
        if merged is not None and merged[0] > (self._blob_version or 0) and self.local.version - merged[0] <= ahead:
            version, table_of = merged[0], lambda: merged[1]
        else:
            view = self.local.view()
            version, table_of = view.version, view.items.as_table
        self._publisher = threading.Thread(target=self._publish, args=(table_of, version, self._epoch),
                                           name="nezha-catalog-blob", daemon=True)
        self._publisher.start()

    def _publish(self, table_of: Callable[[], ItemTable], version: int, epoch: str | None) -> None:
        """In its own thread, at the lowest priority: the catalog at `version` as one table (`table_of`: O(N)
        unless a merge built it), written as the blob (short commands only)."""
        lower_thread_priority()
        try:
            start = time.perf_counter()
            status = self.store.publish_snapshot(table_of(), version, epoch or "")
        except StoreUnavailableError as exc:
            self._log.info("snapshot blob not published: %s", exc)
            return
        except Exception:  # never let a blob take the follower down
            self._log.exception("snapshot blob publish failed")
            return
        if status == "ok":
            self._blob_version = version
        self._log.info("snapshot blob of version %d: %s (%.1f s)", version, status, time.perf_counter() - start)

    def _ok(self, remote_version: int) -> None:
        h = self.health
        if h.problem is not None:
            self._log.info("catalog store back to normal after: %s", h.problem)
        h.connected, h.problem, h.last_ok, h.remote_version = True, None, time.time(), remote_version

    def _problem(self, message: str, connected: bool) -> None:
        h = self.health
        if h.problem != message:
            self._log.warning("%s", message)
            h.since = time.time()
        h.connected, h.problem = connected, message
