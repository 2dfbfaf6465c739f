"""The background repair task: rebuild only what is broken, when nobody is
waiting.

Owns: draining the persistent repair queue (metadb.chunks.RepairQueue) in
priority order (see model.repair_priority: risk, then read demand, then
scrub findings, then bulk rebuilds), pacing against foreground I/O, and
queueing the bulk rebuild of a store that stays failed. Must not: serve
reads or writes of files.

Repairing one chunk: the fragments known bad (the queue's bitmask, slots
without a store, slots on failed stores) are re-checked first: a fragment
on a store that came back and still verifies is kept (a store that was only
away for a while costs nothing). k good fragments are read whole and
verified; only the missing fragments are regenerated (range decode of the
whole payload), written to the same store when it is available, otherwise
to a healthy store holding no other fragment of the chunk, made durable,
read back and verified, and then the new locations are committed. Nothing
else of the chunk is rewritten. If the chunk was rewritten meanwhile, the
new fragments are orphans and are deleted.

A chunk that cannot be repaired now (no store can take a rebuilt
fragment, or the stores holding the rest are away) is put off for
RETRY_DELAY seconds, or until a store comes back or has room again
(`retry_deferred`, called by the volume), or an operator makes repair
urgent (`set_urgent`, which also refreshes the stores' free space first).

Crash contract: the queue entry is removed in the same transaction that
commits the new locations, so a crash at any point leaves the chunk queued
(a fragment written but not committed is an orphan for fsck). A fragment
write that fails is handed to the garbage collector's remembered
deletions (see garbage).

Pacing: with `urgent` off, a chunk is repaired only when no FUSE request
has been seen for IDLE_GAP seconds (but at least one chunk every
MAX_STARVATION seconds, so repair never starves); `rate` (bytes/s, 0 =
unlimited) caps the rebuild bandwidth in any case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from . import fragment
from .codec import Codec
from .errors import EcfsError, FragmentCorrupt, StoreError
from .garbage import ChunkPins, Garbage
from .geometry import Layout
from .handles import HandleCache
from .metadb.chunks import ChunkTable, RepairEntry, RepairQueue
from .metadb.database import Database
from .model import NO_STORE, ChunkRef, repair_priority
from .offload import StoreRunner
from .placement import Placement
from .reader import Bytes, ChunkReader
from .tasks import wait_until_idle

log = logging.getLogger(__name__)

#: Chunks repaired at once in urgent mode.
URGENT_PARALLEL = 4

#: Seconds without foreground requests before a non-urgent repair step.
IDLE_GAP = 0.05
#: A non-urgent repair waits at most this long for the foreground to pause.
MAX_STARVATION = 2.0
#: Seconds before an entry that could not be repaired is tried again.
RETRY_DELAY = 30.0
#: Seconds a store stays failed before all its chunks are queued for rebuild.
DEFAULT_REBUILD_AFTER = 900.0


@dataclass(slots=True)
class RepairCounters:
    chunks_repaired: int = 0
    chunks_checked_fine: int = 0
    fragments_rebuilt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    unrecoverable: int = 0
    deferred: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Repairer:
    """Drains the repair queue in the background."""

    def __init__(
        self,
        db: Database,
        layout: Layout,
        codec: Codec,
        reader: ChunkReader,
        runners: Mapping[int, StoreRunner],
        placement: Placement,
        handles: HandleCache,
        garbage: Garbage,
        pins: ChunkPins,
        volume_id: bytes,
        last_foreground: Callable[[], float],
        note_unsynced: Callable[[int], None],
        *,
        rate: float = 0.0,
        rebuild_after: float = DEFAULT_REBUILD_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.chunks = ChunkTable(db)
        self.queue = RepairQueue(db)
        self.layout = layout
        self.codec = codec
        self.reader = reader
        self.runners = runners
        self.placement = placement
        self.handles = handles
        self.garbage = garbage
        self.pins = pins
        self.volume_id = volume_id
        self.last_foreground = last_foreground
        self.note_unsynced = note_unsynced
        self.rate = rate
        self.rebuild_after = rebuild_after
        self.clock = clock
        self.urgent = False
        self.counters = RepairCounters()
        self.unrecoverable: dict[int, str] = {}
        #: Stores being drained: their fragments are moved, never kept.
        self.draining: set[int] = set()
        #: Asked before a rebuilt fragment goes to a store (the volume
        #: re-checks its identity after idle time); False: retry later.
        self.before_write: Callable[[int], Awaitable[bool]] | None = None
        self._deferred: dict[int, float] = {}
        self._failed_since: dict[int, float] = {}
        self._bulk_queued: set[int] = set()
        self._wakeup = trio.Event()
        self._rate_ewma = 0.0
        self._idle = trio.Event()
        #: Refreshes the stores' free space (set by the volume); run before
        #: the retry that `set_urgent` starts, so that a store that was full
        #: and has room again takes the rebuilt fragments at once.
        self.refresh_usage: Callable[[], Awaitable[None]] | None = None
        self._refresh_first = False

    # -- control -------------------------------------------------------------------

    def poke(self) -> None:
        """Something was queued: look at the queue now."""
        self._wakeup.set()

    def set_urgent(self, urgent: bool) -> None:
        self.urgent = urgent
        self._deferred.clear()
        self._refresh_first = True
        self.poke()

    def retry_deferred(self) -> None:
        """A store came back or has room again: retry the entries that were
        put off (for RETRY_DELAY) because they had nowhere to go."""
        if self._deferred:
            self._deferred.clear()
            self.poke()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        """Return once the queue holds nothing repairable right now."""
        await self._idle.wait()

    def statistics(self) -> dict[str, object]:
        return {
            **self.counters.as_dict(),
            "urgent": self.urgent,
            "rate_bytes_per_s": round(self._rate_ewma),
            "rate_limit": self.rate,
            "busy": self.busy,
            "deferred": len(self._deferred),
        }

    def note_store_states(self) -> None:
        """Queue the bulk rebuild of stores failed for `rebuild_after` s
        (called periodically by the volume's health loop)."""
        now = self.clock()
        for index, runner in self.runners.items():
            if runner.available:
                self._failed_since.pop(index, None)
                self._bulk_queued.discard(index)
                continue
            since = self._failed_since.setdefault(index, now)
            if now - since >= self.rebuild_after and index not in self._bulk_queued:
                self.queue_store_rebuild(index, "store-failed")

    def queue_store_rebuild(self, store: int, reason: str) -> int:
        """Queue every chunk with a fragment on `store` (bulk rebuild)."""
        self._bulk_queued.add(store)
        with self.db.transaction():
            count = self.queue.enqueue_store(
                store, reason, repair_priority(self.layout.m - 1, reason), time.time_ns()
            )
        log.warning("store %d: %d chunks queued for rebuild (%s)", store, count, reason)
        self.poke()
        return count

    # -- the task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if self._refresh_first and self.refresh_usage is not None:
                self._refresh_first = False
                await self.refresh_usage()
            entries = self._due_entries()
            if not entries:
                self._idle.set()
                self._wakeup = trio.Event()
                with trio.move_on_after(5.0):
                    await self._wakeup.wait()
                continue
            self._idle = trio.Event()
            # Urgent: several chunks at once (their fragments are on
            # different stores' queues); otherwise one at a time, paced.
            limit = trio.Semaphore(URGENT_PARALLEL if self.urgent else 1)
            async with trio.open_nursery() as nursery:
                for entry in entries:
                    await self._pace()
                    await limit.acquire()
                    nursery.start_soon(self._repair_entry, entry, limit)

    async def _repair_entry(self, entry: RepairEntry, limit: trio.Semaphore) -> None:
        try:
            await self.repair_chunk(entry)
        except EcfsError as exc:
            log.warning("repair of chunk %016x failed: %s", entry.chunk_id, exc)
            self._defer(entry.chunk_id)
        finally:
            limit.release()

    def _due_entries(self) -> list[RepairEntry]:
        now = self.clock()
        self._deferred = {c: t for c, t in self._deferred.items() if t > now}
        return [e for e in self.queue.next_batch(256) if e.chunk_id not in self._deferred][:32]

    def _defer(self, chunk_id: int) -> None:
        self._deferred[chunk_id] = self.clock() + RETRY_DELAY
        self.counters.deferred += 1

    async def _pace(self) -> None:
        if not self.urgent:
            await wait_until_idle(self.last_foreground, IDLE_GAP, MAX_STARVATION)

    async def _throttle(self, nbytes: int, elapsed: float) -> None:
        if elapsed > 0:
            self._rate_ewma = 0.8 * self._rate_ewma + 0.2 * (nbytes / elapsed)
        if self.rate > 0:
            await trio.sleep(max(0.0, nbytes / self.rate - elapsed))

    # -- one chunk -----------------------------------------------------------------------

    async def repair_chunk(self, entry: RepairEntry) -> None:
        found = self.chunks.by_id(entry.chunk_id)
        if found is None:
            with self.db.transaction():
                self.queue.remove(entry.chunk_id)
            return
        _, _, ref = found
        started = self.clock()
        self.pins.pin(ref.chunk_id)
        try:
            written = await self._repair(ref, entry.bad)
        finally:
            self.pins.unpin(ref.chunk_id)
        await self._throttle(written, self.clock() - started)

    async def _repair(self, ref: ChunkRef, bad_mask: int) -> int:
        layout = self.layout
        payload = layout.payload_length(ref.length)
        suspects = {i for i in range(layout.n) if bad_mask >> i & 1}
        suspects |= {i for i, s in enumerate(ref.stores) if not self._usable(s)}
        broken = [i for i in sorted(suspects) if not await self._still_good(ref, i, payload)]
        if not broken:
            with self.db.transaction():
                self.queue.remove(ref.chunk_id)
            self.counters.chunks_checked_fine += 1
            return 0
        if all(self._target(ref, i, list(ref.stores)) is None for i in broken):
            # Nowhere to put a rebuilt fragment (e.g. a store is gone and
            # every other one already holds a fragment of this chunk): do not
            # read k fragments and decode for nothing, while readers wait.
            log.info("chunk %016x: no store can take fragments %s now", ref.chunk_id, broken)
            self._defer(ref.chunk_id)
            return 0
        good = await self._read_good(ref, set(broken), payload)
        if len(good) < layout.k:
            away = [i for i in broken if not self._usable(ref.stores[i]) and ref.stores[i] != NO_STORE]
            if len(good) + len(away) >= layout.k:
                # Not lost: stores holding the rest are only unavailable now.
                log.info("chunk %016x: waiting for stores %s to come back", ref.chunk_id,
                         sorted({ref.stores[i] for i in away}))
                self._defer(ref.chunk_id)
            else:
                self._give_up(ref, broken)
            return 0
        if payload > 64 * 1024:
            rebuilt = await trio.to_thread.run_sync(self.codec.decode, good, broken)
        else:
            rebuilt = self.codec.decode(good, broken)
        stores = list(ref.stores)
        moved: list[int] = []
        written = 0
        for index in broken:
            target = self._target(ref, index, stores)
            if target is None:
                log.info("chunk %016x: no store can take fragment %d now", ref.chunk_id, index)
                self._defer(ref.chunk_id)
                continue
            written += await self._write_fragment(ref, index, target, rebuilt[index])
            if stores[index] != NO_STORE and stores[index] != target:
                moved.append(index)
            stores[index] = target
        if written == 0:
            return 0
        self._commit(ref, tuple(stores), moved)
        return written

    def _usable(self, store: int) -> bool:
        runner = self.runners.get(store) if store != NO_STORE else None
        return runner is not None and runner.available

    async def _still_good(self, ref: ChunkRef, index: int, payload: int) -> bool:
        """A suspect fragment that is on an available store and verifies
        completely is fine after all (e.g. its store was only away)."""
        if not self._usable(ref.stores[index]) or ref.stores[index] in self.draining:
            return False
        try:
            await self.reader.read_fragment(ref, index, 0, payload)
        except (StoreError, FragmentCorrupt):
            return False
        self.counters.bytes_read += payload
        return True

    async def _read_good(self, ref: ChunkRef, broken: set[int], payload: int) -> dict[int, Bytes]:
        """k whole, verified fragments (read in parallel, fastest stores and
        data fragments first); fragments found bad are added to `broken`."""
        candidates = [
            i for i in self.reader.sources(ref, exclude=broken) if self._usable(ref.stores[i])
        ]
        good, bad, bytes_read = await self.reader.gather_fragments(ref, candidates, 0, payload)
        broken.update(bad)
        self.counters.bytes_read += bytes_read
        return good

    def _target(self, ref: ChunkRef, index: int, stores: list[int]) -> int | None:
        """The same store if it is usable, else a usable store holding no
        other fragment of the chunk."""
        keep = stores[index]
        if self._usable(keep) and keep not in self.placement.full and keep not in self.draining:
            return keep
        others = {s for i, s in enumerate(stores) if i != index and s != NO_STORE}
        choice = self.placement.choose(1, exclude=others)
        return choice[0] if choice else None

    async def _write_fragment(self, ref: ChunkRef, index: int, store: int, payload: bytes) -> int:
        runner = self.runners[store]
        layout = self.layout
        parts = fragment.build_fragment(
            self.volume_id, ref.chunk_id, index, layout.k, layout.m, layout.cell_size, payload
        )
        if self.before_write is not None and not await self.before_write(store):
            raise StoreError(f"store {store} is unavailable")
        self.handles.discard((store, ref.chunk_id, index))
        try:
            await runner.call(runner.store.delete_fragment, ref.chunk_id, index)
            size = await runner.call(runner.store.write_fragment, ref.chunk_id, index, parts)
            # Made durable before any metadata batch that refers to it (the
            # replicator syncs every store written since its last batch).
            self.note_unsynced(store)
            check = ChunkRef(ref.chunk_id, ref.length, tuple(
                store if i == index else s for i, s in enumerate(ref.stores)
            ))
            await self.reader.read_fragment(check, index, 0, len(payload))  # verify what landed
        except (StoreError, FragmentCorrupt):
            # Whatever landed is deleted once the store is available (unless
            # the chunk refers to it, i.e. it was rewritten in place).
            self.garbage.remember([(store, ref.chunk_id, index)])
            raise
        self.placement.note_written(store, size)
        self.counters.fragments_rebuilt += 1
        self.counters.bytes_written += size
        return size

    def _commit(self, ref: ChunkRef, stores: tuple[int, ...], moved: list[int]) -> None:
        with self.db.transaction():
            still_there = self.chunks.set_stores(ref.chunk_id, stores)
            if still_there and NO_STORE not in stores and ref.chunk_id not in self._deferred:
                self.queue.remove(ref.chunk_id)
        if still_there:
            self.counters.chunks_repaired += 1
            old = tuple(ref.stores[i] if i in moved else NO_STORE for i in range(self.layout.n))
            if moved:
                self.garbage.discard([ChunkRef(ref.chunk_id, ref.length, old)], self.db.generation)
        else:  # rewritten meanwhile: what we wrote is an orphan
            self.garbage.discard([ChunkRef(ref.chunk_id, ref.length, stores)], self.db.generation)

    def _give_up(self, ref: ChunkRef, broken: list[int]) -> None:
        message = (
            f"chunk {ref.chunk_id:016x}: fewer than {self.layout.k} good fragments"
            f" (bad: {broken}); its bytes cannot be recovered"
        )
        if ref.chunk_id not in self.unrecoverable:
            log.error("%s", message)
        self.unrecoverable[ref.chunk_id] = message
        self.counters.unrecoverable += 1
        self._defer(ref.chunk_id)
