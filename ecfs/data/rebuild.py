"""Rebuilding the bad fragments of one chunk: the one path used by the
mount's background repair (`ecfs.data.repair`) and by `ecfs fsck --repair`
(`ecfs.volume.fsck_checks`).

Owns: `rebuild_fragments`: from k verified payloads of a chunk, decode the
broken fragments and build their files (one worker-thread call: the decode
and the cells' checksums), choose where each goes (`ecfs.data.placement.
Placement.rebuild_target`: its own store when usable, else a store holding
no other fragment of the chunk), write each one (any file by its name on
the target is removed first: fragment files are never overwritten), read it
back and verify it (`FragmentIO.write_verified`: one call), note the store
as needing a sync, then switch the metadata in
one transaction: the new locations, and the repair-queue entry removed
(everything rebuilt) or added/merged with reason, `model.repair_priority`
and the bad mask of what is still broken. Fragments that moved off a store
are handed to `FragmentIO.discard` only after that switch. A fragment
rebuilt onto the store its slot names (a replaced or wiped store) changes
no location: the chunk row is left alone, and with `defer_removal` (the
mount's repair) so is the queue entry, which the caller removes later
together with others (`ecfs.data.repair`, "Crash contract").

Must not: find out what is broken or read the sources (the callers do,
each its own way: repair re-checks suspects and reads through the hedging
reader, fsck checks every fragment file; both hand over payloads whose
cells they verified), or reach the stores other than through `FragmentIO`.

Concurrency: the caller keeps the garbage collector off the chunk for the
whole rebuild (repair pins it, see `ecfs.data.garbage.ChunkPins`; fsck runs
alone under the volume lock). The chunk may be rewritten or deleted while
its fragments are written (a mount): the metadata switch then changes
nothing and what was written is discarded as orphans.

Crash contract: nothing refers to a rebuilt fragment before the metadata
switch (or, rebuilt onto the store its slot names, the slot referred to a
missing or bad fragment, which the chunk's queue entry says), and the
caller makes the written stores durable before that switch (or the entry's
removal) reaches durable metadata (`FragmentIO.note_unsynced`: the mount's
replicator syncs them before shipping the batch, fsck syncs before its
write-back). A crash before the switch leaves at most orphans (fsck deletes
them) and the chunk still queued or still found bad (a fragment rebuilt in
place is then found good by the next repair's check and kept). A write
that fails is handed to `FragmentIO.remember` (whatever landed is deleted later, unless
the chunk refers to it). A chunk rewritten or deleted while a fragment was
rebuilt in place: that fragment has its old version's name and store, and
is deleted with it by the garbage collector (the caller's pin keeps the
collector off until the rebuild is over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..core import fragment
from ..core.codec import Codec
from ..core.errors import FragmentCorrupt, NoSpace, StoreError
from ..core.geometry import Layout
from ..core.model import NO_STORE, REPAIR_REASONS, ChunkRef, repair_priority
from ..storage.metadb.chunks import ChunkTable, RepairQueue
from ..storage.metadb.database import Database
from ..storage.offload import run_cpu
from .placement import Placement

log = logging.getLogger(__name__)


class FragmentIO(Protocol):
    """How `rebuild_fragments` reaches the stores."""

    async def write_verified(
        self, store: int, ref: ChunkRef, index: int, parts: list[fragment.Buffer]
    ) -> int:
        """Write fragment file (ref.chunk_id, index) on `store` after
        removing any entry by that name, then read it back whole and check
        its header (against `ref`) and every cell; the bytes written.
        StoreError or FragmentCorrupt if not (what was written may have
        landed: the caller hands it to `remember`). The mount does both in
        one worker-thread call (one round trip, not two)."""
        ...

    def note_unsynced(self, store: int) -> None:
        """`store` was written: sync it before metadata naming it is durable."""
        ...

    def remember(self, fragments: list[tuple[int, int, int]]) -> None:
        """(store, chunk, index) a failed write may have left behind."""
        ...

    def discard(self, refs: list[ChunkRef]) -> None:
        """Fragments no metadata refers to after the switch (NO_STORE slots
        are not fragments): delete them once that is safe."""
        ...


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What `rebuild_fragments` did.

    `stores`: the chunk's fragment slots after the rebuild; `rebuilt`:
    fragment indices written, verified and recorded; `failed`: index ->
    why it was not rebuilt (left queued); `bytes_written`; `committed`:
    False if the chunk was rewritten or deleted meanwhile (nothing was
    recorded; what was written was discarded); `removal_deferred`: the
    chunk's repair-queue entry is the caller's to remove (`defer_removal`:
    nothing else was left to record).
    """

    stores: tuple[int, ...]
    rebuilt: tuple[int, ...] = ()
    failed: Mapping[int, str] = field(default_factory=dict)
    bytes_written: int = 0
    committed: bool = True
    removal_deferred: bool = False


async def rebuild_fragments(
    db: Database,
    layout: Layout,
    codec: Codec,
    volume_id: bytes,
    placement: Placement,
    io: FragmentIO,
    ref: ChunkRef,
    sources: Mapping[int, bytes | bytearray | memoryview],
    broken: Sequence[int],
    *,
    reason: str,
    unchecked: int = 0,
    defer_removal: bool = False,
) -> Rebuilt:
    """Rebuild fragments `broken` of `ref` from `sources` (at least k whole,
    verified payloads of other fragments, or the broken ones' own payloads
    decoded already) and record them (see the module
    docstring). `reason` (one of model.REPAIR_REASONS) and the chunk's
    spare fragments afterwards (n - what is still broken - `unchecked`
    fragments nobody could look at - k) queue what could not be rebuilt.
    `defer_removal`: when every fragment was rebuilt onto its own store
    (no location changes), the queue entry is left for the caller to
    remove (`Rebuilt.removal_deferred`; no transaction here). `layout` and
    `codec` are the volume's: a chunk of its own coding is rebuilt with
    its own (`Layout.of`, `Codec.for_layout`)."""
    if reason not in REPAIR_REASONS:
        raise ValueError(f"unknown repair reason {reason!r}")
    layout = layout.of(ref)  # a chunk of its own coding (a redundancy policy), or the volume's
    codec = codec.for_layout(layout)
    wanted = sorted(broken)
    payload_length = layout.payload_length(ref.length)
    built: Mapping[int, list[fragment.Buffer]]
    if all(i in sources for i in wanted):  # decoded already (a reader's or repair's, see repair)
        built = _built(layout, volume_id, ref.chunk_id, {i: sources[i] for i in wanted})
    elif len(sources) < layout.k:
        raise ValueError(f"{len(sources)} source fragments, {layout.k} needed")
    else:
        built = await run_cpu(
            _decode_and_build, codec, layout, volume_id, ref.chunk_id, sources, wanted,
            size=payload_length,
        )  # fmt: skip
    stores = list(ref.stores)
    failed: dict[int, str] = {}
    rebuilt: list[int] = []
    moved: list[int] = []
    written = 0
    for index in wanted:
        target = placement.rebuild_target(stores, index, layout.k)
        if target is None:
            failed[index] = "no usable store holds no other fragment of the chunk"
            continue
        landed = ChunkRef(ref.chunk_id, ref.length, _with(stores, index, target), ref.k)
        try:
            size = await io.write_verified(target, landed, index, built[index])
        except (StoreError, FragmentCorrupt) as exc:
            if isinstance(exc, NoSpace):
                placement.mark_full(target)
            io.remember([(target, ref.chunk_id, index)])
            failed[index] = f"on store {target}: {exc}"
            continue
        io.note_unsynced(target)
        placement.note_written(target, size)
        written += size
        if stores[index] not in (NO_STORE, target):
            moved.append(index)
        stores[index] = target
        rebuilt.append(index)
    chunks = ChunkTable(db)
    queue = RepairQueue(db)
    moved_any = tuple(stores) != ref.stores  # else the metadata already says it all
    if defer_removal and not failed and not moved_any:
        # Nothing to record. Were the chunk rewritten or deleted meanwhile,
        # the rebuilt fragments have the names and stores of its old
        # version's: the garbage collector deletes them with it (the
        # caller pins the chunk until then).
        return Rebuilt(tuple(stores), tuple(rebuilt), failed, written, removal_deferred=True)
    with db.transaction():
        if moved_any:
            committed = chunks.set_stores(ref.chunk_id, tuple(stores))
        else:
            committed = chunks.by_id(ref.chunk_id) is not None
        if committed and failed:
            spare = layout.n - len(failed) - unchecked - layout.k
            queue.add(
                ref.chunk_id, reason, repair_priority(spare, reason), time.time_ns(),
                bad=sum(1 << i for i in failed), demand=0,
            )  # fmt: skip
        elif committed:
            queue.remove(ref.chunk_id)
    if not committed:
        # Rewritten or deleted meanwhile: what we wrote is an orphan.
        new = _only(ref, {i: stores[i] for i in rebuilt})
        if rebuilt:
            io.discard([new])
        return Rebuilt(tuple(ref.stores), (), failed, written, committed=False)
    if moved:
        io.discard([_only(ref, {i: ref.stores[i] for i in moved})])
    for index, why in sorted(failed.items()):
        log.info("chunk %016x: fragment %d not rebuilt: %s", ref.chunk_id, index, why)
    return Rebuilt(tuple(stores), tuple(rebuilt), failed, written)


def _built(
    layout: Layout, volume_id: bytes, chunk_id: int, payloads: Mapping[int, fragment.Buffer]
) -> dict[int, list[fragment.Buffer]]:
    """Fragment files (header block, payload) of `payloads` by index."""
    return {
        index: fragment.build_fragment(
            volume_id, chunk_id, index, layout.k, layout.m, layout.cell_size, payload
        )
        for index, payload in payloads.items()
    }


def _decode_and_build(
    codec: Codec,
    layout: Layout,
    volume_id: bytes,
    chunk_id: int,
    sources: Mapping[int, bytes | bytearray | memoryview],
    wanted: list[int],
) -> dict[int, list[fragment.Buffer]]:
    """CPU work, in one worker-thread call: decode fragments `wanted` from
    `sources` (`decode_broken`) and build their files (the cells' checksums)."""
    return _built(layout, volume_id, chunk_id, decode_broken(codec, sources, wanted))


def decode_broken(
    codec: Codec, sources: Mapping[int, bytes | bytearray | memoryview], broken: Sequence[int]
) -> dict[int, bytes]:
    """CPU work (blocking: for a worker thread): fragments `broken` decoded
    from the k of `sources` with the lowest indices (data fragments first:
    the fewest passes). `rebuild_fragments` decodes this way; a caller that
    reads the sources in a worker thread may decode there too and hand
    the result over as decoded already (the mount's repair: one thread
    round trip less per chunk)."""
    return codec.decode(dict(sorted(sources.items())[: codec.k]), sorted(broken))


def _with(stores: Sequence[int], index: int, store: int) -> tuple[int, ...]:
    return tuple(store if i == index else s for i, s in enumerate(stores))


def _only(ref: ChunkRef, slots: Mapping[int, int]) -> ChunkRef:
    """`ref` with only the fragments `slots` (index -> store)."""
    return ChunkRef(
        ref.chunk_id,
        ref.length,
        tuple(slots.get(i, NO_STORE) for i in range(len(ref.stores))),
        ref.k,
    )
