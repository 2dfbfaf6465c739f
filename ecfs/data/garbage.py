"""Deleting replaced chunk versions once it is safe, and fragment files
whose deletion had to wait.

Owns: the in-memory list of chunk versions that no file refers to any more,
their deletion from the stores, and the durable list of fragment files that
could not be deleted (metadb `pending_deletions`). Must not: touch any
other table.

A version replaced or dropped by the transaction of generation g may only
be deleted once g is durable on the metadata replicas (otherwise a crash
could bring back metadata that still points at it) and no read is using it
(`pins`). A crash loses this in-memory list; the fragments then become
orphans, which fsck removes -- except for versions whose caller also
recorded their fragments in `pending_deletions` in the very transaction
that dereferenced them (`discard(..., remembered=True)`, as restripe
does): those rows survive a crash and the next mount deletes the files.
While such a version waits in the list its rows are left alone (its
dereference may not be durable yet); once its fragments are deleted,
their rows are removed.

Deletions that fail because the store is away (failed, vanished, not
mounted) are remembered durably (`remember`), as are fragments a failed
write may have left on a store (the writer's `on_abandoned`). They are
retried (`retry_leftovers`) whenever the collector wakes (the volume's
health loop pokes it every few seconds, so a store that comes back is
cleaned within seconds), at mount and at unmount. A remembered fragment is
never deleted while its chunk is pinned or queued for repair (a repair
may write that very fragment again), and a row whose (store, chunk, index)
a chunk refers to again is dropped instead of deleted. Chunk ids are never
reused, so no new chunk can take a remembered fragment's name.

Pacing: the background collector yields to reads and writes (it waits for
a gap in foreground activity, at most PATIENCE seconds per chunk), as
deleting a replaced 1 GiB file's fragments competed with the writes that
replaced it; past BACKLOG chunks waiting it deletes at full speed, so that
space held by garbage cannot pile up under a steady load.

Pause (`ecfs repair --pause`, see `ecfs.data.background.BackgroundGate`):
the background collector waits at the gate before each chunk version and
before retrying remembered deletions, except past BACKLOG chunks waiting
(space must not pile up while paused either). `collect()` without `paced`
(unmount, tests) ignores the gate.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from ..core.model import NO_STORE, ChunkRef
from ..core.tasks import wait_until_idle
from ..storage.handles import HandleCache
from ..storage.metadb.chunks import ChunkTable, PendingDeletions, RepairQueue
from ..storage.metadb.database import Database
from ..storage.metadb.stores import StoreTable
from ..storage.offload import StoreRunner, available_runner
from .background import BackgroundGate
from .writer import delete_fragment

log = logging.getLogger(__name__)

#: Chunks waiting beyond which the collector stops yielding to foreground I/O.
BACKLOG = 512
#: Seconds without a foreground request that count as a gap, and the
#: longest wait for one before a chunk is deleted anyway.
IDLE_GAP = 0.05
PATIENCE = 1.0
#: Remembered fragments looked at per query when retrying.
LEFTOVER_BATCH = 512

#: A fragment file: (store index, chunk id, fragment index).
Fragment = tuple[int, int, int]


class ChunkPins:
    """Counts reads in progress per chunk id, so garbage waits for them."""

    def __init__(self) -> None:
        self._pins: Counter[int] = Counter()

    def pin(self, chunk_id: int) -> None:
        self._pins[chunk_id] += 1

    def unpin(self, chunk_id: int) -> None:
        self._pins[chunk_id] -= 1
        if self._pins[chunk_id] <= 0:
            del self._pins[chunk_id]

    def pinned(self, chunk_id: int) -> bool:
        return chunk_id in self._pins


@dataclass(frozen=True, slots=True)
class GarbageStatistics:
    """A snapshot of the collector (from `Garbage.statistics()`)."""

    pending: int  # chunk versions waiting until their dereference is durable
    deleted_chunks: int  # chunk versions deleted since mount
    leftovers: int  # remembered fragment deletions that failed, to retry


class Garbage:
    """Deletes the fragments of unreferenced chunk versions in the background."""

    def __init__(
        self,
        runners: Mapping[int, StoreRunner],
        handles: HandleCache,
        pins: ChunkPins,
        durable_generation: Callable[[], int],
        last_foreground: Callable[[], float] = lambda: 0.0,
        db: Database | None = None,
        gate: BackgroundGate | None = None,
    ) -> None:
        """`db`: where deletions that must wait are remembered (None: they
        are only logged, and left for fsck); `gate`: the volume's pause switch."""
        self.gate = gate if gate is not None else BackgroundGate()
        self.runners = runners
        self.handles = handles
        self.pins = pins
        self.durable_generation = durable_generation
        self.last_foreground = last_foreground
        self._pending: deque[tuple[int, ChunkRef]] = deque()
        #: Chunk ids in `_pending` whose fragments have pending_deletions rows.
        self._remembered_ids: set[int] = set()
        self._wakeup = trio.Event()
        self.deleted_chunks = 0
        self.db = db
        self._leftovers = PendingDeletions(db) if db is not None else None
        #: Rows in pending_deletions (read at `load_leftovers`, kept up to date).
        self.leftover_count = 0
        self._retrying = False

    def discard(self, refs: list[ChunkRef], generation: int, *, remembered: bool = False) -> None:
        """Schedule `refs`, dereferenced by transaction `generation`
        (`remembered`: which also recorded their fragments in
        pending_deletions, see the module docstring)."""
        for ref in refs:
            self._pending.append((generation, ref))
            if remembered:
                self._remembered_ids.add(ref.chunk_id)
        if refs:
            self._wakeup.set()

    def poke(self) -> None:
        """Wake the collector (e.g. after the durable generation advanced)."""
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def statistics(self) -> GarbageStatistics:
        return GarbageStatistics(len(self._pending), self.deleted_chunks, self.leftover_count)

    def load_leftovers(self) -> None:
        """At mount: count the remembered deletions."""
        if self._leftovers is not None:
            self.leftover_count = self._leftovers.count()

    def remember(self, fragments: list[Fragment]) -> None:
        """Fragment files that must be deleted once their store is
        available again (one replicated transaction)."""
        if not fragments:
            return
        if self._leftovers is None or self.db is None:
            for store, chunk_id, index in fragments:
                log.info("store %d: fragment %016x.%d left for fsck", store, chunk_id, index)
            return
        with self.db.transaction():
            self._leftovers.add(fragments)
        self.leftover_count += len(fragments)
        log.info("%d fragment file(s) to delete once their store is back", len(fragments))

    async def retry_leftovers(self) -> None:
        """Delete the remembered fragments whose store is available now."""
        if not self.leftover_count or self._leftovers is None or self.db is None:
            return
        db, leftovers = self.db, self._leftovers
        if self._retrying:
            return
        self._retrying = True
        try:
            await self._retry_leftovers(db, leftovers)
        finally:
            self._retrying = False

    async def _retry_leftovers(self, db: Database, leftovers: PendingDeletions) -> None:
        known = {index for index, _ in StoreTable(db).all()}
        unknown = sorted(leftovers.stores() - known)
        if unknown:  # stores removed from the volume: nothing to delete there
            with db.transaction():
                leftovers.forget_stores(unknown)
        chunks, queue = ChunkTable(db), RepairQueue(db)
        while True:
            available = sorted(i for i, r in self.runners.items() if r.available)
            rows = leftovers.on_stores(available, LEFTOVER_BATCH)
            done: list[Fragment] = []
            for store, chunk_id, index in rows:
                if chunk_id in self._remembered_ids:
                    continue  # its version waits until its dereference is durable
                if self.pins.pinned(chunk_id) or queue.contains(chunk_id):
                    continue  # a repair may write this very fragment: later
                found = chunks.by_id(chunk_id)
                if found is not None and found[2].stores[index] == store:
                    done.append((store, chunk_id, index))  # referred to again: keep the file
                    continue
                runner = self.runners[store]
                self.handles.discard((store, chunk_id, index))
                if await delete_fragment(runner, chunk_id, index):
                    done.append((store, chunk_id, index))
            if done:
                with db.transaction():
                    leftovers.remove(done)
            self.leftover_count = leftovers.count()
            if len(rows) < LEFTOVER_BATCH or not done:
                if done:
                    log.info("deleted %d fragment file(s) left on stores that were away", len(done))
                return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.collect(paced=True)
            if self._pending:
                await trio.sleep(0.2)
                self._wakeup.set()

    async def collect(self, *, paced: bool = False) -> None:
        """Delete everything that is safe to delete now (`paced`: yielding
        to foreground requests, see the module docstring), and retry the
        remembered deletions."""
        await self._collect_versions(paced)
        if paced:
            await self.gate.wait_running()
        await self.retry_leftovers()

    async def _collect_versions(self, paced: bool) -> None:
        durable = self.durable_generation()
        # Each entry is looked at once; nothing is held outside the queue
        # while waiting (another collect, at unmount, may run meanwhile).
        for _ in range(len(self._pending)):
            if not self._pending:
                return
            generation, ref = self._pending[0]
            if generation > durable or self.pins.pinned(ref.chunk_id):
                self._pending.rotate(-1)  # not yet: keep it for a later pass
                continue
            if paced and len(self._pending) <= BACKLOG:
                await self.gate.wait_running()
                await wait_until_idle(self.last_foreground, IDLE_GAP, PATIENCE)
                if not self._pending or self._pending[0][1] is not ref:
                    continue  # taken meanwhile
            self._pending.popleft()
            await self._delete(ref)

    async def _delete(self, ref: ChunkRef) -> None:
        self.handles.discard_chunk(ref.chunk_id, len(ref.stores), ref.stores)
        waiting: list[Fragment] = []
        remembered = ref.chunk_id in self._remembered_ids

        async def delete(runner: StoreRunner, index: int) -> None:
            if not await delete_fragment(runner, ref.chunk_id, index):
                waiting.append((runner.index, ref.chunk_id, index))

        async with trio.open_nursery() as nursery:
            for index, store in enumerate(ref.stores):
                if store == NO_STORE:
                    continue
                runner = available_runner(self.runners, store)
                if runner is None:
                    waiting.append((store, ref.chunk_id, index))  # away: later
                else:
                    nursery.start_soon(delete, runner, index)
        if remembered and self._leftovers is not None and self.db is not None:
            # Its rows exist already: drop those of the files deleted; the
            # others stay for `retry_leftovers`.
            self._remembered_ids.discard(ref.chunk_id)
            deleted = [
                (store, ref.chunk_id, index)
                for index, store in enumerate(ref.stores)
                if store != NO_STORE and (store, ref.chunk_id, index) not in waiting
            ]
            with self.db.transaction():
                self._leftovers.remove(deleted)
            self.leftover_count += len(waiting)
        else:
            self._remembered_ids.discard(ref.chunk_id)
            self.remember(waiting)
        self.deleted_chunks += 1
