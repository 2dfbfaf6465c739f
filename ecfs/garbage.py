"""Deleting replaced chunk versions once it is safe.

Owns: the in-memory list of chunk versions that no file refers to any more,
and their deletion from the stores. Must not: touch the metadata database.

A version replaced or dropped by the transaction of generation g may only
be deleted once g is durable on the metadata replicas (otherwise a crash
could bring back metadata that still points at it) and no read is using it
(`pins`). A crash loses this list; the fragments then become orphans, which
fsck (and a later sweep) removes.

Pacing: the background collector yields to reads and writes (it waits for
a gap in foreground activity, at most PATIENCE seconds per chunk), as
deleting a replaced 1 GiB file's fragments competed with the writes that
replaced it; past BACKLOG chunks waiting it deletes at full speed, so that
space held by garbage cannot pile up under a steady load.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping

import trio

from .handles import HandleCache
from .model import NO_STORE, ChunkRef
from .offload import StoreRunner
from .tasks import wait_until_idle
from .writer import delete_fragment

log = logging.getLogger(__name__)

#: Chunks waiting beyond which the collector stops yielding to foreground I/O.
BACKLOG = 512
#: Seconds without a foreground request that count as a gap, and the
#: longest wait for one before a chunk is deleted anyway.
IDLE_GAP = 0.05
PATIENCE = 1.0


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


class Garbage:
    """Deletes the fragments of unreferenced chunk versions in the background."""

    def __init__(
        self,
        runners: Mapping[int, StoreRunner],
        handles: HandleCache,
        pins: ChunkPins,
        durable_generation: Callable[[], int],
        last_foreground: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.runners = runners
        self.handles = handles
        self.pins = pins
        self.durable_generation = durable_generation
        self.last_foreground = last_foreground
        self._pending: deque[tuple[int, ChunkRef]] = deque()
        self._wakeup = trio.Event()
        self.deleted_chunks = 0

    def discard(self, refs: list[ChunkRef], generation: int) -> None:
        """Schedule `refs`, dereferenced by transaction `generation`."""
        for ref in refs:
            self._pending.append((generation, ref))
        if refs:
            self._wakeup.set()

    def poke(self) -> None:
        """Wake the collector (e.g. after the durable generation advanced)."""
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

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
        to foreground requests, see the module docstring)."""
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
                await wait_until_idle(self.last_foreground, IDLE_GAP, PATIENCE)
                if not self._pending or self._pending[0][1] is not ref:
                    continue  # taken meanwhile
            self._pending.popleft()
            await self._delete(ref)

    async def _delete(self, ref: ChunkRef) -> None:
        self.handles.discard_chunk(ref.chunk_id, len(ref.stores), ref.stores)
        async with trio.open_nursery() as nursery:
            for index, store in enumerate(ref.stores):
                runner = self.runners.get(store) if store != NO_STORE else None
                if runner is not None:
                    nursery.start_soon(delete_fragment, runner, ref.chunk_id, index)
        self.deleted_chunks += 1
