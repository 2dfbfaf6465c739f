"""Restripe: converting existing files to their effective redundancy policy.

Owns: the background loop that re-encodes, chunk by chunk, the chunks
of the files below a directory whose coding differs from their file's
effective policy (`ecfs.data.policy`), its progress and its skipped
chunks. Must not: decide policies, or touch the metadata other than
through ChunkTable / RestripeTable / RepairQueue / PendingDeletions in one
transaction per chunk (and one per INTENT_BATCH chunks, see below).

One chunk at a time: read it (verified; degraded if it must be), write
it anew with the new coding (new chunk id: copy-on-write, exactly like an
overwrite), then in ONE transaction swap the chunk row if the chunk is
still the version read (`ChunkTable.replace_if`: a write in between wins
and the new version is thrown away) and count the progress. The version
given up (the old one, or the new one if a write won) goes to the garbage
collector like any overwritten chunk, and its fragments are recorded in
`pending_deletions` in that same transaction (`Garbage.discard(...,
remembered=True)`).

Crash contract: the work is persistent (`restripe` table: the root, a
cursor = the last file finished, counters), and a crash leaves no orphan
fragment, so `ecfs fsck` is clean once the next mount has run (without
--repair). Before new fragments are written their chunk id is recorded:
ids are taken INTENT_BATCH at a time and written to the `volume` row
`RestripeTable.intent` in a transaction that is made durable (on the
metadata replicas) before the first of them is used. A crash or unmount
before a swap commits leaves the old version in place, after it the new
one, and the version given up is in `pending_deletions` from the swap's
transaction on: the garbage collector deletes it once the swap is durable,
or the next mount does. At mount (`recover`) the ids of the intent that no
chunk refers to (their write was cut short, or their swap not durable)
get `pending_deletions` rows for every store and fragment index, in the
transaction that clears the intent, and the collector deletes whatever
files exist (fsck meanwhile counts those files as remembered, a warning).
The intent is cleared whenever the loop runs out of work (an unmount
midway leaves it: the next mount then only deletes files that do not
exist, store x index x INTENT_BATCH no-op deletions). Then the loop
starts over from the cursor; the chunks of a file already converted are
found to match and skipped, so nothing is converted twice.

Bounded space: one chunk is converted at a time, and before the next
one starts the loop waits (up to GARBAGE_PATIENCE) until the garbage
collector holds at most MAX_GARBAGE replaced versions (a replaced version
is deleted once its swap is durable on the metadata replicas, which ship
at least every second): the extra space is one chunk's new fragments
plus at most MAX_GARBAGE old versions, whatever the size of the tree
(measured by scripts/bench_restripe.py). Waiting for each swap to be
durable instead would cap the rate at one chunk per commit interval.

Yielding: before each chunk the loop waits for the background `gate`
(pause/resume of all background work; by default always running) and
for a gap in foreground I/O (`wait_until_idle`, as scrub does). Each
chunk's read has a deadline (`ecfs.data.background.chunk_deadline`, from
the chunk's bytes and this mount's restripe rate; the floor doubles with
each failure of the chunk): a chunk that cannot be read in time, or fails
(unrecoverable, a store error, no space), is skipped, logged with its
file and byte range, and retried after the rest, with backoff (the
background `RetryBook`; a skipped chunk never blocks the ones behind
it). A chunk with small writes in the log is left for after their fold.

Concurrency: one task (`run`) in the volume's nursery; `start` is
called from the FUSE adapter on the loop (the virtual xattr
``user.ecfs.restripe``, see `ecfs.data.policy`). A chunk's write and
swap are shielded from cancellation, so an unmount leaves no orphan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..core.errors import EcfsError
from ..core.geometry import Layout
from ..core.model import NO_STORE, ChunkRef, repair_priority
from ..core.tasks import wait_until_idle
from ..storage.metadb.chunks import ChunkTable, PendingDeletions, RepairQueue
from ..storage.metadb.database import Database
from ..storage.metadb.restripe import RestripeRow, RestripeTable
from ..storage.metadb.stores import StoreTable
from .background import DEADLINE_CEILING, DEADLINE_FLOOR, RetryBook, chunk_deadline, locate_chunk
from .garbage import ChunkPins, Garbage
from .reader import ChunkReader
from .writer import ChunkWriter

log = logging.getLogger(__name__)

#: Files fetched per query of the tree.
FILE_BATCH = 64
#: Foreground gap (s) waited for before each chunk, and the longest wait.
IDLE_GAP = 0.05
PATIENCE = 1.0
#: Replaced versions the garbage collector may hold before the next chunk.
MAX_GARBAGE = 8
GARBAGE_PATIENCE = 10.0
#: Chunk ids recorded (and made durable) at a time before their fragments are written.
INTENT_BATCH = 16
#: Skipped chunks a status lists (the count is always complete).
SKIPPED_SHOWN = 16


class Gate(Protocol):
    """Pause gate of background work (ecfs.data.background)."""

    async def wait_running(self) -> None: ...


class _Open:
    """The default gate: never paused."""

    async def wait_running(self) -> None:
        await trio.lowlevel.checkpoint()


@dataclass(frozen=True, slots=True)
class RestripeStatistics:
    """Progress of the pending restripes (from `Restriper.statistics()`)."""

    roots: int  # restripes pending
    files_total: int
    files_done: int
    chunks_total: int
    chunks_done: int  # chunks re-encoded or found with the right coding already
    bytes_total: int
    bytes_done: int
    rate_bytes_per_s: int  # re-encoded file bytes per second (this mount)
    skipped: int  # chunks skipped, to be retried
    skipped_ranges: tuple[str, ...] = ()  # "path [start, end): why" of skipped chunks


async def _durable_now(generation: int) -> None:
    await trio.lowlevel.checkpoint()


class Restriper:
    """Background restripe of directory trees (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        layout: Layout,
        reader: ChunkReader,
        writer: ChunkWriter,
        garbage: Garbage,
        pins: ChunkPins,
        coding_of: Callable[[int], tuple[int, int] | None],
        logged: Callable[[int, int], bool],
        last_activity: Callable[[], float],
        describe: Callable[[int], str] = str,
        *,
        gate: Gate | None = None,
        wait_durable: Callable[[int], Awaitable[None]] = _durable_now,
        deadline_floor: float = DEADLINE_FLOOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`wait_durable(g)`: returns once generation g is on the metadata
        replicas (the intent must be, see the module docstring)."""
        self.db = db
        self.layout = layout
        self.reader = reader
        self.writer = writer
        self.garbage = garbage
        self.pins = pins
        self.coding_of = coding_of
        self.logged = logged
        self.last_activity = last_activity
        self.describe = describe
        self.gate: Gate = gate if gate is not None else _Open()
        self.wait_durable = wait_durable
        self.deadline_floor = deadline_floor
        self.table = RestripeTable(db)
        self.chunks = ChunkTable(db)
        self.repairs = RepairQueue(db)
        self.leftovers = PendingDeletions(db)
        self.skipped = RetryBook(clock, what="restripe")
        #: Chunk ids recorded in the intent and not used yet.
        self._ids: list[int] = []
        self._wake = trio.Event()
        self._bytes_this_mount = 0
        self._busy_seconds = 0.0
        #: Highest garbage backlog seen (replaced versions not yet deleted).
        self.peak_garbage = 0

    # -- control -----------------------------------------------------------

    def start(self, root: int) -> RestripeRow:
        """Queue a restripe of the files below directory (or file) `root`."""
        with self.db.transaction():
            row = self.table.start(root, time.time_ns())
        log.info(
            "restripe of %s queued: %d files, %d chunks", self.describe(root), row.files_total,
            row.chunks_total,
        )  # fmt: skip
        self._wake.set()
        return row

    def statistics(self) -> RestripeStatistics:
        """One SQL query: for a status, not per chunk."""
        rows = self.table.rows()
        rate = round(self._bytes_this_mount / self._busy_seconds) if self._busy_seconds else 0
        ranges = tuple(
            f"{s.path or f'inode {s.inode} (unlinked)'} bytes [{s.start}, {s.stop}): {s.reason}"
            for s in self.skipped.entries(SKIPPED_SHOWN)
        )
        return RestripeStatistics(
            roots=len(rows),
            files_total=sum(r.files_total for r in rows),
            files_done=sum(min(r.files_done, r.files_total) for r in rows),
            chunks_total=sum(r.chunks_total for r in rows),
            chunks_done=sum(min(r.chunks_done, r.chunks_total) for r in rows),
            bytes_total=sum(r.bytes_total for r in rows),
            bytes_done=sum(min(r.bytes_done, r.bytes_total) for r in rows),
            rate_bytes_per_s=rate,
            skipped=len(self.skipped),
            skipped_ranges=ranges,
        )

    # -- the loop ----------------------------------------------------------

    def recover(self) -> int:
        """At mount: the fragments a crash may have left under the intent's
        ids go to pending_deletions, and the intent is cleared (one
        transaction); the number of rows added."""
        ids = self.table.intent()
        if not ids:
            return 0
        stores = [index for index, _ in StoreTable(self.db).all()]
        rows = [
            (store, chunk_id, index)
            for chunk_id in ids
            if self.chunks.by_id(chunk_id) is None
            for store in stores
            for index in range(len(stores))
        ]
        with self.db.transaction():
            self.leftovers.add(rows)
            self.table.set_intent([])
        if rows:
            log.info("restripe: %d chunk id(s) a crash may have left fragments under, to delete",
                     len(rows) // (len(stores) ** 2))  # fmt: skip
            self.garbage.load_leftovers()
            self.garbage.poke()
        return len(rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Work until cancelled (the volume's nursery)."""
        self.recover()
        task_status.started()
        while True:
            rows = self.table.rows()
            for row in rows:
                await self._run_root(row)
            if not rows and self.skipped:
                await self._retry_skipped()
                wait = self.skipped.next_due_in()
                if wait is not None:
                    self._clear_intent()
                    with trio.move_on_after(wait):
                        await self._wake_wait()
                    continue
            if not self.table.rows():
                self._clear_intent()
                await self._wake_wait()

    def _clear_intent(self) -> None:
        """Out of work: no id of the intent is in use (see the module docstring)."""
        if self._ids or self.table.intent():
            with self.db.transaction():
                self.table.set_intent([])
            self._ids = []

    async def _next_id(self) -> int:
        """A chunk id recorded in the durable intent (see the module docstring)."""
        if not self._ids:
            ids = [await self.writer.new_chunk_id() for _ in range(INTENT_BATCH)]
            with self.db.transaction():
                self.table.set_intent(ids)
            await self.wait_durable(self.db.generation)
            self._ids = ids
        return self._ids.pop(0)

    async def _wake_wait(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    async def _run_root(self, row: RestripeRow) -> None:
        cursor = row.cursor
        while True:
            files = self.table.files_below(row.root, cursor, FILE_BATCH)
            if not files:
                break
            for ino in files:
                right, right_bytes = await self._convert_file(row.root, ino)
                with self.db.transaction():
                    # chunks that had the right coding already count as done
                    self.table.advance(row.root, ino, right, right_bytes)
                cursor = ino
        with self.db.transaction():
            self.table.finish(row.root)
        log.info("restripe of %s done (%d skipped chunks to retry)", self.describe(row.root),
                 len(self.skipped))  # fmt: skip

    async def _convert_file(self, root: int | None, ino: int) -> tuple[int, int]:
        """Convert the chunks of file `ino`; (chunks, bytes) of those that
        had the right coding already."""
        right = right_bytes = 0
        for idx, ref in self.chunks.chunks_of(ino):
            if self.needs_work(ino, ref) is None:
                self.skipped.done(ref.chunk_id)
                right += 1
                right_bytes += ref.length
                continue
            await self._convert_chunk(root, ino, idx, ref)
        return right, right_bytes

    async def _retry_skipped(self) -> None:
        """Try the skipped chunks that are due again."""
        for entry in self.skipped.entries(len(self.skipped)):
            if not self.skipped.due(entry.chunk_id):
                continue
            found = self.chunks.by_id(entry.chunk_id)
            if found is None:  # rewritten or gone: the writer chose its coding
                self.skipped.done(entry.chunk_id)
                continue
            ino, idx, ref = found
            await self._convert_chunk(None, ino, idx, ref)

    def needs_work(self, ino: int, ref: ChunkRef) -> tuple[int, int] | None:
        """The coding chunk `ref` of file `ino` must get, or None if it has it."""
        coding = self.coding_of(ino) or (self.layout.k, self.layout.m)
        layout = self.layout.of(ref)
        return None if (layout.k, layout.m) == coding else coding

    async def _convert_chunk(self, root: int | None, ino: int, idx: int, ref: ChunkRef) -> None:
        coding = self.needs_work(ino, ref)
        if coding is None:
            self.skipped.done(ref.chunk_id)
            return
        t0 = time.monotonic()
        await self.gate.wait_running()
        await wait_until_idle(self.last_activity, IDLE_GAP, PATIENCE)
        t1 = time.monotonic()
        current = self.chunks.get(ino, idx)
        if current is None or current.chunk_id != ref.chunk_id:
            return  # rewritten or gone meanwhile: the writer chose its coding
        if self.logged(ino, idx):
            self._skip(ref, "small writes waiting in the log (retried after their fold)")
            return
        started = time.monotonic()
        self.pins.pin(ref.chunk_id)
        try:
            deadline = self.chunk_deadline(ref)
            with trio.move_on_after(deadline) as scope:
                data = await self.reader.read(ref, 0, ref.length)
            if scope.cancelled_caught:
                self._skip(ref, f"not read within {deadline:g} s")
                return
            chunk_id = await self._next_id()
            t2 = time.monotonic()
            # Shielded: an unmount waits for this write (bounded by the
            # writer's own timeouts) and its swap, rather than leave its
            # fragments behind (the intent covers a crash, not an unmount).
            with trio.CancelScope(shield=True):
                new = await self.writer.write(data, coding, chunk_id=chunk_id)
            t3 = time.monotonic()
        except EcfsError as exc:
            self._skip(ref, str(exc))
            return
        finally:
            self.pins.unpin(ref.chunk_id)
        with self.db.transaction():
            swapped = self.chunks.replace_if(ino, idx, ref.chunk_id, new)
            given_up = ref if swapped else new
            # Deleted by the collector once durable, or after a crash by the next mount.
            self.leftovers.add(
                [(s, given_up.chunk_id, i) for i, s in enumerate(given_up.stores) if s != NO_STORE]
            )
            if swapped:
                self._queue_if_short(new)
                if root is not None:
                    self.table.advance(root, None, 1, ref.length)
        generation = self.db.generation
        self.garbage.discard([given_up], generation, remembered=True)
        self.skipped.done(ref.chunk_id)
        if swapped:
            self._bytes_this_mount += ref.length
        self._busy_seconds += time.monotonic() - started
        await self._bound_space()
        log.debug(
            "restripe chunk %016x: idle wait %.3f s, read %.3f s, write %.3f s, space wait %.3f s",
            ref.chunk_id, t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3,
        )  # fmt: skip

    def _queue_if_short(self, ref: ChunkRef) -> None:
        """In the transaction: a chunk written with reduced redundancy is
        queued for repair (as the file writer does)."""
        missing = [i for i, s in enumerate(ref.stores) if s == NO_STORE]
        if missing:
            spare = self.layout.of(ref).m - len(missing)
            self.repairs.add(
                ref.chunk_id, "write", repair_priority(spare, "write"), time.time_ns(),
                bad=sum(1 << i for i in missing), demand=0,
            )  # fmt: skip

    async def _bound_space(self) -> None:
        """Wait until the collector has deleted all but MAX_GARBAGE replaced
        versions (at most GARBAGE_PATIENCE s: a collector held up by an
        away store must not stop the restripe for good)."""
        self.peak_garbage = max(self.peak_garbage, self.garbage.pending)
        self.garbage.poke()
        with trio.move_on_after(GARBAGE_PATIENCE):
            while self.garbage.pending > MAX_GARBAGE:
                await trio.sleep(0.02)
                self.garbage.poke()

    def chunk_deadline(self, ref: ChunkRef) -> float:
        """Seconds the read of `ref` may take (see the module docstring)."""
        rate = self._bytes_this_mount / self._busy_seconds if self._busy_seconds else 0.0
        failures = self.skipped.failures(ref.chunk_id)
        floor = min(self.deadline_floor * 2**failures, DEADLINE_CEILING)
        return chunk_deadline(ref.length, rate, 0.0, floor=floor)

    def _skip(self, ref: ChunkRef, why: str) -> None:
        """Give the chunk up for now (logged, listed, retried with backoff)."""
        place = locate_chunk(self.db, self.layout.chunk_size, ref.chunk_id)
        self.skipped.skip(ref.chunk_id, place, why)
