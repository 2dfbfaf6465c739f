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

Stragglers (issue 17: one slow disk must not slow every write down): with
a background nursery (`attach`; the mount has one), a chunk write does not
wait for the slowest stores. Once `min_fragments` fragments are written
(k+1: the k+1 rule is kept), the others get a grace period of
STRAGGLER_GRACE_FACTOR x the time those took (at least
STRAGGLER_GRACE_FLOOR); fragments still being written then are
"stragglers": the write completes with their stores in the ChunkRef and
they go on in the background. A straggler that then fails, times out or
is given up (beyond MAX_STRAGGLING_CHUNKS chunks with stragglers the
oldest one's are cancelled, which bounds the memory they hold) is not
placed elsewhere (the caller has committed the ref by then): it is
reported to `on_late_failure` (the volume queues the chunk for repair, as
for a fragment found missing) and its store keeps the fragment slot,
missing, until repair writes it; the file it may have left (or may still
leave: a timed-out write's thread runs on) goes to `on_abandoned`, so
that the garbage collector deletes it unless repair writes that very
fragment again (see `ecfs.data.garbage`). While a straggler runs it is in
`straggling`, which the reader consults: a read that finds it missing
decodes around it without reporting damage; and its chunk is pinned
(`pin_chunk`), so that the garbage collector does not delete a version
freed meanwhile before its stragglers' files landed (they were left
behind as orphans: seen in tests/test_mount_posix.py under load). The
unmount waits for the stragglers (`stragglers_done`), then gives up those
still running (`give_up_stragglers`), before it deletes garbage. Without a nursery (tools, tests) every
fragment is waited for as before.

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
durable metadata generation never refers to a chunk with fewer than
`min_fragments` durable fragments, nor to any fragment not durable except
a straggler's still being written (after a crash that one is missing, as
on a lost disk, and repair restores it when it is read or scrubbed).
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

#: Stragglers (see the module docstring): once min_fragments fragments are
#: written, the others get this many times the time those took, at least
#: the floor (seconds), before the write completes without them...
STRAGGLER_GRACE_FACTOR = 2.0
STRAGGLER_GRACE_FLOOR = 0.05
#: ... and at most this many chunks have stragglers in the background.
MAX_STRAGGLING_CHUNKS = 8
#: Seconds between two looks at the stragglers (`stragglers_done`).
STRAGGLER_POLL = 0.01

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
        #: Called with (chunk, [fragment index], reason) when a straggler
        #: fails after its chunk's write completed (see the module docstring).
        self.on_late_failure: Callable[[ChunkRef, list[int], str], None] = _log_late_failure
        self._cpu = trio.CapacityLimiter(2)
        self._buffers = BufferPool(POOLED_BUFFERS)
        self._nursery: trio.Nursery | None = None
        #: (store, chunk id, index) of the stragglers being written now
        #: (the reader does not count them as damage while missing).
        self.straggling: set[tuple[int, int, int]] = set()
        #: Cancel scopes (one per slot) of the chunks whose stragglers run
        #: now, oldest first.
        self._straggling: list[list[trio.CancelScope]] = []
        #: Called with a chunk id when stragglers of it go on in the
        #: background, and `unpin_chunk` when the last of them ended: the
        #: volume pins the chunk (`ecfs.data.garbage.ChunkPins`), so that a
        #: version freed meanwhile is not deleted under a straggler (its
        #: file would land after the deletion and stay behind).
        self.pin_chunk: Callable[[int], None] = lambda chunk_id: None
        self.unpin_chunk: Callable[[int], None] = lambda chunk_id: None

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the writer the nursery stragglers finish in (see the module
        docstring); without one, every fragment write is waited for."""
        self._nursery = nursery

    def statistics(self) -> WriteStatistics:
        return WriteStatistics(self.bytes_in, self.bytes_out)

    async def stragglers_done(self) -> None:
        """Return once no straggler runs (each ends by its write's timeout
        at the latest; the unmount waits for them before deleting garbage)."""
        while self.straggling:  # noqa: ASYNC110 (slots end in the background nursery)
            await trio.sleep(STRAGGLER_POLL)

    def give_up_stragglers(self) -> None:
        """Cancel every straggling write (the unmount, once it waited long
        enough): each is lost late, as one given up beyond
        MAX_STRAGGLING_CHUNKS is (its chunk queued for repair, the file it
        may leave remembered for the collector), and unpins its chunk
        when its slot ends, at the slot's next checkpoint."""
        for scopes in self._straggling:
            _cancel(scopes)

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
        # Stores given up on (timed out), or "straggling" if stragglers run.
        timed_out: list[int | str] = []
        try:
            stores = await self._place_all(layout, chunk_id, len(data), fragments, timed_out)
        except EcfsError:
            if buffer is not None and not timed_out:
                self._buffers.give(buffer)
            raise
        # A write given up on (or a straggler) may still read the buffer.
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
        codec = self.codec.for_layout(layout)
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
        self, layout: Layout, chunk_id: int, length: int, fragments: list[FragmentParts],
        timed_out: list[int | str],
    ) -> list[int]:  # fmt: skip
        """Write the fragments to distinct stores (see the module docstring);
        the stores whose write was given up on (timed out) go to `timed_out`,
        and "straggling" if stragglers go on in the background. A chunk of
        its own coding needs min(n', k' + 1) fragments stored (the same rule
        as `min_fragments`'s default)."""
        n = layout.n
        min_fragments = self.min_fragments if layout is self.layout else min(n, layout.k + 1)
        stores = [NO_STORE] * n
        errors: list[EcfsError] = []
        targets = self.placement.targets(n, layout.k)
        used = {t for t in targets if t is not None}
        abandoned: list[tuple[int, int, int]] = []
        #: The store each slot is being written to now, and whether it is done.
        current: list[int | None] = list(targets)
        finished = [False] * n
        enough = trio.Event()  # min_fragments written, or every slot done
        all_done = trio.Event()
        #: Set once the write completed without the stragglers: their ref.
        handed: list[ChunkRef] = []
        bugs: list[Exception] = []  # raised by a slot in the background
        #: One per slot when the slots run in the background nursery.
        scopes = [trio.CancelScope() for _ in range(n)]

        async def place(index: int, store: int | None) -> None:
            while store is not None:
                current[index] = store
                try:
                    if self.before_write is not None and not await self.before_write(store):
                        raise StoreError(f"store {store} is unavailable")
                    await self._write_one(store, chunk_id, index, fragments[index])
                    stores[index] = store
                    return
                except StoreError as exc:
                    if handed:  # committed with this slot: repair restores it
                        lost_late(index, store, f"straggling write: {exc}")
                        return
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

        def lost_late(index: int, store: int | None, reason: str) -> None:
            """A straggler lost after the ref was handed: the chunk is
            queued for repair, and the file the write may leave is garbage."""
            self.on_late_failure(handed[0], [index], reason)
            if store is not None:
                self.on_abandoned([(store, chunk_id, index)])

        async def slot(index: int, scope: trio.CancelScope | None) -> None:
            try:
                if scope is None:
                    await place(index, targets[index])
                    return
                with scope:
                    await place(index, targets[index])
                if scope.cancelled_caught and handed and stores[index] == NO_STORE:
                    reason = "straggling write given up (too many chunks straggle, or unmount)"
                    lost_late(index, current[index], reason)
            except Exception as exc:  # in the background nursery: never take the volume down
                if scope is None:
                    raise
                if handed:
                    log.exception("bug in a straggling write of chunk %016x", chunk_id)
                else:
                    bugs.append(exc)  # raised by the write itself, below
            finally:
                finished[index] = True
                if handed:
                    self.straggling.discard((handed[0].stores[index], chunk_id, index))
                if all(finished):
                    all_done.set()
                    if scopes in self._straggling:
                        self._straggling.remove(scopes)
                    if handed:
                        self.unpin_chunk(chunk_id)
                if all(finished) or sum(1 for s in stores if s != NO_STORE) >= self.min_fragments:
                    enough.set()

        if self._nursery is None:
            async with open_fan_out() as nursery:
                for index in range(n):
                    nursery.start_soon(slot, index, None)
        else:
            for index in range(n):
                self._nursery.start_soon(slot, index, scopes[index])
            started = trio.current_time()
            try:
                await enough.wait()
                grace = STRAGGLER_GRACE_FACTOR * (trio.current_time() - started)
                with trio.move_on_after(max(STRAGGLER_GRACE_FLOOR, grace)):
                    await all_done.wait()
            except BaseException:
                _cancel(scopes)  # the caller gave up: so do the writes
                raise
            if bugs:
                _cancel(scopes)
                raise bugs[0]
            if not all_done.is_set():
                stragglers = [i for i in range(n) if not finished[i]]
                chosen = list(stores)
                for index in stragglers:
                    now = current[index]
                    chosen[index] = now if now is not None else NO_STORE
                handed.append(ChunkRef(chunk_id, length, tuple(chosen)))
                self.pin_chunk(chunk_id)  # (unpinned by the last slot to end)
                self.straggling.update((chosen[i], chunk_id, i) for i in stragglers)
                timed_out.append("straggling")
                self._straggling.append(scopes)
                while len(self._straggling) > MAX_STRAGGLING_CHUNKS:
                    _cancel(self._straggling.pop(0))
                log.debug("chunk %016x: fragments %s straggle", chunk_id, stragglers)
                self.on_abandoned(abandoned)
                return chosen
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


def _cancel(scopes: list[trio.CancelScope]) -> None:
    for scope in scopes:
        scope.cancel()


def _log_late_failure(ref: ChunkRef, bad: list[int], reason: str) -> None:
    log.warning("chunk %016x: fragments %s not written (%s)", ref.chunk_id, bad, reason)


async def delete_fragment(runner: StoreRunner, chunk_id: int, index: int) -> bool:
    """Best-effort delete; False if the store could not be reached (the
    caller remembers the fragment, see garbage.Garbage.remember)."""
    try:
        await runner.call(runner.store.delete_fragment, chunk_id, index)
    except StoreError as exc:
        log.info("store %d: could not delete fragment %016x.%d: %s", runner.index, chunk_id, index, exc)
        return False
    return True
