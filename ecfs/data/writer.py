"""Writing new chunk versions: encode, place, write fragments in parallel.

Owns: turning chunk bytes into k+m fragment files on distinct stores, the
reduced-redundancy policy, and the set of stores with writes not yet made
durable (`sync_stores`). Must not: touch the metadata database (the caller
commits the returned ChunkRef) or know about files.

Write policy: every fragment goes to a distinct store, fragment index i to
the store `Placement.targets` gives slot i (the volume's placement policy:
under hybrid placement, data fragments on local stores, parity on remote
ones). A store that fails during the write, or that `before_write`
refuses, is replaced by another healthy store that holds no fragment of
the chunk (`Placement.replacement`: one of the fragment's class if any).
A fragment that had to go to a store of the other class, or into a failure
domain holding another fragment of the chunk while an unused domain has a
store, is reported by `wrong_class` (the caller queues the chunk for repair
to move it).

If fewer than k+m fragments could be stored but at least `min_fragments`
(k+1 by default: the chunk still survives the loss of one store), the chunk is accepted with reduced redundancy, the missing
slots are NO_STORE, and the caller queues it for repair. Below that, the
fragments already written are deleted and the write fails: NoSpace
(ENOSPC) when stores were full, StoreError (EIO) otherwise. Data already
committed is never touched by a failed write.

Leftovers: a fragment write that failed other than for lack of space (the
store timed out, vanished or failed) may have left a file behind, and a
fragment of a failed write may not be deletable right away; both are
handed to `on_abandoned` (the volume remembers them for the garbage
collector, which deletes them once the store is back).

Coding: a chunk is coded with the volume's k + m, or with the (k', m')
of its file's redundancy policy (`write(data, coding)`; recorded in the
returned ref's `k`, see `ecfs.core.geometry.Layout.of`). Aligned buffers
for direct I/O are pooled for the volume's coding only.

Durability: fragment files are written without fsync. `sync_stores()`
makes every write so far durable (syncfs per store that was written to);
the replicator calls it before each metadata batch it commits, so a
durable metadata generation never refers to a fragment that is not.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from ..core import fragment
from ..core.aligned import BLOCK, BufferPool, aligned_copy
from ..core.codec import Codec
from ..core.errors import EcfsError, NoSpace, StoreError, StoreTimeout
from ..core.geometry import Layout
from ..core.model import NO_STORE, ChunkRef
from ..core.tasks import open_fan_out
from ..storage.offload import StoreRunner, run_cpu
from .placement import Placement

log = logging.getLogger(__name__)

#: A fragment write is given up (and placed elsewhere) after at least this.
WRITE_DEADLINE_FLOOR = 3.0
#: Longest wait for one store write (ChunkWriter's default `write_timeout`).
WRITE_TIMEOUT = 30.0

#: Encode buffers of full chunks kept for reuse (each n x F bytes).
POOLED_BUFFERS = 8

FragmentParts = list[fragment.Buffer]


def write_deadline(runner: StoreRunner, timeout: float = WRITE_TIMEOUT) -> float:
    """How long one write to `runner`'s store may take before its bytes go
    to another store instead: generous against the store's own latency,
    but a hung store costs seconds, not the full `timeout`. Used by the
    fragment writes and the small-write log's copies alike."""
    return min(timeout, max(WRITE_DEADLINE_FLOOR, 20 * runner.hedge_deadline()))


@dataclass(frozen=True, slots=True)
class WriteStatistics:
    """Chunk bytes written since mount, and fragment bytes (with parity) they became."""

    bytes_in: int
    bytes_out: int


class ChunkWriter:
    """Writes chunk versions as k+m fragment files."""

    def __init__(
        self,
        layout: Layout,
        codec: Codec,
        runners: Mapping[int, StoreRunner],
        placement: Placement,
        volume_id: bytes,
        new_chunk_id: Callable[[], Awaitable[int]],
        *,
        min_fragments: int | None = None,
        write_timeout: float = WRITE_TIMEOUT,
        device_of: Mapping[int, int] | None = None,
    ) -> None:
        self.layout = layout
        self.codec = codec
        self.runners = runners
        self.placement = placement
        self.volume_id = volume_id
        self.new_chunk_id = new_chunk_id
        self.min_fragments = min_fragments or min(layout.n, layout.k + 1)
        self.write_timeout = write_timeout
        self.unsynced: set[int] = set()
        #: Receives (store, chunk_id, index) of fragment files that may be
        #: left on a store (see the module docstring).
        self.on_abandoned: Callable[[list[tuple[int, int, int]]], None] = lambda fragments: None
        self.device_of = dict(device_of or {})
        self.bytes_in = 0
        self.bytes_out = 0
        #: Asked before a fragment goes to a store: False means use another
        #: (the volume re-checks a store's identity after idle time here).
        self.before_write: Callable[[int], Awaitable[bool]] | None = None
        self._cpu = trio.CapacityLimiter(2)
        self._buffers = BufferPool(POOLED_BUFFERS)

    def statistics(self) -> WriteStatistics:
        return WriteStatistics(self.bytes_in, self.bytes_out)

    def wrong_class(self, ref: ChunkRef) -> int:
        """Bitmask of the fragments of `ref` (just written) on a store of
        the wrong class for the placement policy, or in a shared failure
        domain (`Placement.misplaced`)."""
        k = self.layout.of(ref).k
        return sum(1 << i for i in self.placement.misplaced(ref.stores, k))

    async def write(
        self,
        data: bytes | bytearray | memoryview,
        coding: tuple[int, int] | None = None,
        *,
        chunk_id: int | None = None,
    ) -> ChunkRef:
        """Store `data` (1..chunk_size bytes) as a new chunk version, coded
        as `coding` = (k', m') (a redundancy policy; default and when equal
        to it: the volume's k + m, recorded as ref.k = 0), under a new id
        or `chunk_id` (one the caller took from `new_chunk_id`)."""
        if chunk_id is None:
            chunk_id = await self.new_chunk_id()
        layout = self.layout if coding is None else self.layout.coded(*coding)
        payload_length = -(-len(data) // layout.k)
        # Whole-block payloads (every full chunk) are laid out in aligned
        # memory, so that the stores can write them with direct I/O.
        buffer = (
            self._buffers.take(layout.n * payload_length)
            if payload_length % BLOCK == 0 and layout is self.layout
            else None
        )
        # Chunks larger than offload.LOOP_CPU_LIMIT are encoded in a thread.
        fragments = await run_cpu(
            self._build, layout, chunk_id, data, buffer, size=len(data), limiter=self._cpu
        )
        timed_out: list[int] = []
        try:
            stores = await self._place_all(layout, chunk_id, fragments, timed_out)
        except EcfsError:
            if buffer is not None and not timed_out:
                self._buffers.give(buffer)
            raise
        # A write given up on may still be reading the buffer in its thread.
        if buffer is not None and not timed_out:
            self._buffers.give(buffer)
        self.bytes_in += len(data)
        return ChunkRef(chunk_id, len(data), tuple(stores), 0 if layout is self.layout else layout.k)

    def _build(
        self,
        layout: Layout,
        chunk_id: int,
        data: bytes | bytearray | memoryview,
        buffer: memoryview | None,
    ) -> list[FragmentParts]:
        """Encode and frame every fragment (CPU only; may run in a thread).

        With a `buffer` (aligned, n x payload bytes), headers and payloads
        are laid out in aligned memory so that the store can write them with
        direct I/O (see `aligned`); the chunk is copied once into it, and
        nothing returned refers to `data`."""
        codec = self.codec if layout is self.layout else Codec.of(layout.k, layout.m)
        direct = buffer is not None
        if buffer is not None:
            payloads: Sequence[fragment.Buffer] = codec.encode_into(data, buffer)
        else:
            payloads = codec.encode(data)
        fragments = []
        for index, payload in enumerate(payloads):
            header, body = fragment.build_fragment(
                self.volume_id, chunk_id, index, layout.k, layout.m, layout.cell_size, payload
            )
            fragments.append([aligned_copy(header) if direct else header, body])
        return fragments

    async def _place_all(
        self, layout: Layout, chunk_id: int, fragments: list[FragmentParts], timed_out: list[int]
    ) -> list[int]:
        """Write the fragments to distinct stores (see the module docstring);
        the stores whose write was given up on (timed out) go to `timed_out`.
        A chunk of its own coding needs min(n', k' + 1) fragments stored
        (the same rule as `min_fragments`'s default)."""
        n = layout.n
        min_fragments = self.min_fragments if layout is self.layout else min(n, layout.k + 1)
        stores = [NO_STORE] * n
        errors: list[EcfsError] = []
        targets = self.placement.targets(n, layout.k)
        used = {t for t in targets if t is not None}
        abandoned: list[tuple[int, int, int]] = []

        async def place(index: int, store: int | None) -> None:
            while store is not None:
                try:
                    if self.before_write is not None and not await self.before_write(store):
                        raise StoreError(f"store {store} is unavailable")
                    await self._write_one(store, chunk_id, index, fragments[index])
                    stores[index] = store
                    return
                except StoreError as exc:
                    errors.append(exc)
                    if isinstance(exc, StoreTimeout):
                        timed_out.append(store)
                    if isinstance(exc, NoSpace):
                        self.placement.mark_full(store)
                    else:
                        abandoned.append((store, chunk_id, index))
                    store = self.placement.replacement(index, used, layout.k)
                    if store is not None:
                        used.add(store)

        async with open_fan_out() as nursery:
            for index in range(n):
                nursery.start_soon(place, index, targets[index])
        stored = sum(1 for s in stores if s != NO_STORE)
        if stored < min_fragments:
            abandoned += await self._remove(chunk_id, stores)
        self.on_abandoned(abandoned)
        if stored < min_fragments:
            # ENOSPC only when space is what is missing; too few healthy
            # stores is an I/O error (EIO).
            all_up = all(r.available for r in self.runners.values())
            if all_up and all(isinstance(e, NoSpace) for e in errors):
                raise NoSpace(f"cannot place chunk: only {stored} of {n} fragments fit")
            reason = f" ({errors[0]})" if errors else " (too few healthy stores)"
            raise StoreError(
                f"cannot place chunk: only {stored} of {n} fragments written, at least"
                f" {min_fragments} are needed{reason}"
            )
        if stored < n:
            log.warning(
                "chunk %016x written with reduced redundancy (%d of %d fragments)",
                chunk_id,
                stored,
                n,
            )
        return stores

    async def _write_one(self, store: int, chunk_id: int, index: int, parts: FragmentParts) -> None:
        runner = self.runners[store]
        size = sum(len(p) for p in parts)
        await runner.call(
            runner.store.write_fragment,
            chunk_id,
            index,
            parts,
            timeout=self._deadline(runner),
            nbytes_written=size,
        )
        self.unsynced.add(store)
        self.placement.note_written(store, size)
        self.bytes_out += size

    def _deadline(self, runner: StoreRunner) -> float:
        return write_deadline(runner, self.write_timeout)

    async def _remove(self, chunk_id: int, stores: list[int]) -> list[tuple[int, int, int]]:
        """Delete the fragments of a failed write; those that could not be."""
        failed = []
        for index, store in enumerate(stores):
            if store != NO_STORE and not await delete_fragment(self.runners[store], chunk_id, index):
                failed.append((store, chunk_id, index))
        return failed

    async def sync_stores(self) -> None:
        """Make every fragment written so far durable (files and dirents).

        Never raises: a store that cannot sync is marked failed instead.
        syncfs(2) flushes a whole filesystem, so stores sharing one
        (`device_of`) are synced once.
        """
        pending, self.unsynced = self.unsynced, set()
        one_per_device: dict[int, int] = {}
        for store in sorted(pending):
            one_per_device.setdefault(self.device_of.get(store, -1 - store), store)
        pending = set(one_per_device.values())

        async def sync(store: int) -> None:
            runner = self.runners[store]
            try:
                await runner.call(runner.store.sync, timeout=self.write_timeout)
            except StoreError as exc:
                # Its fragments may be lost: the store is routed around and
                # the chunks keep the redundancy of the other stores.
                runner.mark_failed(f"sync failed: {exc}")
                log.warning("store %d: sync failed: %s", store, exc)

        async with open_fan_out() as nursery:
            for store in pending:
                nursery.start_soon(sync, store)


async def delete_fragment(runner: StoreRunner, chunk_id: int, index: int) -> bool:
    """Best-effort delete; False if the store could not be reached (the
    caller remembers the fragment, see garbage.Garbage.remember)."""
    try:
        await runner.call(runner.store.delete_fragment, chunk_id, index)
    except StoreError as exc:
        log.info("store %d: could not delete fragment %016x.%d: %s", runner.index, chunk_id, index, exc)
        return False
    return True
