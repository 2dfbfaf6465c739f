"""Deleting replaced chunk versions once it is safe.

Owns: the in-memory list of chunk versions that no file refers to any more,
and their deletion from the stores. Must not: touch the metadata database.

A version replaced or dropped by the transaction of generation g may only
be deleted once g is durable on the metadata replicas (otherwise a crash
could bring back metadata that still points at it) and no read is using it
(`pins`). A crash loses this list; the fragments then become orphans, which
fsck (and a later sweep) removes.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping

import trio

from .handles import HandleCache
from .model import NO_STORE, ChunkRef
from .offload import StoreRunner
from .writer import delete_fragment

log = logging.getLogger(__name__)


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
    ) -> None:
        self.runners = runners
        self.handles = handles
        self.pins = pins
        self.durable_generation = durable_generation
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
            await self.collect()
            if self._pending:
                await trio.sleep(0.2)
                self._wakeup.set()

    async def collect(self) -> None:
        """Delete everything that is safe to delete now."""
        durable = self.durable_generation()
        blocked: deque[tuple[int, ChunkRef]] = deque()
        while self._pending:
            generation, ref = self._pending.popleft()
            if generation > durable or self.pins.pinned(ref.chunk_id):
                blocked.append((generation, ref))
                continue
            await self._delete(ref)
        self._pending.extendleft(reversed(blocked))

    async def _delete(self, ref: ChunkRef) -> None:
        self.handles.discard_chunk(ref.chunk_id, len(ref.stores), ref.stores)
        async with trio.open_nursery() as nursery:
            for index, store in enumerate(ref.stores):
                runner = self.runners.get(store) if store != NO_STORE else None
                if runner is not None:
                    nursery.start_soon(delete_fragment, runner, ref.chunk_id, index)
        self.deleted_chunks += 1
