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
away for a while costs nothing). Under hybrid placement, good fragments on
a store of the wrong class, and good fragments in a failure domain holding
another of the chunk ('shared-domain'), are rebuilt onto a store of their
class, or of an unused domain, with them (`Placement.movable`); a chunk whose
misplaced fragments have nowhere to go yet stays queued (deferred) until
such a store is back. k good fragments are read whole and verified,
data fragments first (`_cheapest_first`), in one worker-thread call that
also decodes the missing ones (`_read_in_one_call`), else one by one,
hedged, and decoded by `rebuild_fragments`; only the missing fragments are
regenerated, then placed, written, read back and verified (one store call)
and recorded by `ecfs.data.rebuild.rebuild_fragments` (the same path
`ecfs fsck --repair` takes), through `_RepairStores`: the store's runner,
the volume's identity check before a write, the handle cache, the
replicator's sync before the next metadata batch, the garbage collector. Nothing else of the chunk is rewritten. If the chunk was
rewritten meanwhile, the new fragments are orphans and are deleted.

A chunk that cannot be repaired now (no store can take a rebuilt
fragment, or the stores holding the rest are away) is put off for
RETRY_DELAY seconds, or until a store comes back or has room again
(`retry_deferred`, called by the volume), or an operator makes repair
urgent (`set_urgent`, which also refreshes the stores' free space first).

Crash contract: the queue entry is removed in the same transaction that
commits the new locations, or, when nothing moved (every fragment rebuilt
onto the store its slot names, e.g. a replaced store, or the chunk found
fine), after it, together with the entries of the other chunks settled
so far, in one transaction (SETTLE_BATCH of them, or as soon as no other
chunk is in flight, and before the queue is read again), and only if the
entry is unchanged since it was read (a fragment reported bad meanwhile
keeps its chunk queued). So a crash at any point
leaves the chunk queued (a fragment written but not committed is an
orphan for fsck; one rebuilt in place is found good by the next check).
A fragment write that fails is handed to the garbage collector's
remembered deletions (see garbage); the fragments rebuilt meanwhile are
recorded and the chunk stays queued for the others.

A replaced store (`queue_store_rebuild(..., "store-replaced")`) is new and
empty: its chunks are `not_rebuilt` until their fragment on it is
rebuilt (at mount, the chunks queued as "store-replaced" are). Their suspect check is skipped, and the reader decodes their
fragments on it from the others at once instead of asking the new store
(whose queue the rebuild's writes fill) for what is not there yet.

Shared with readers: a chunk that a reader decodes around its fragment
not rebuilt yet is rebuilt next (`want`, before the queue's order; the
reader is there, and its pass behind the rebuild reads the chunk healthy),
and when the reader's degraded reads keep k whole payloads of it (a
sequential reader decodes the lost data fragment whole and keeps it with
its verified data-fragment sources, see `ecfs.data.reader`), the rebuild
takes them instead of reading k fragments and decoding
(`counters.fragments_shared`): the survivors are read once for both. The
payload a reader decoded is taken when it tells (`want`) and held until
the chunk's rebuild (TAKEN_CHUNKS chunks at most): the reader's own kept
bytes are dropped within a few chunks. A chunk the rebuild reaches first,
which a sequential reader has read ahead and will decode, is decoded
once for both by the reader's path (`ChunkReader.decode_for_repair`,
asked before the sources are read).

The rate shown (`statistics().rate_bytes_per_s`, `ecfs status`, the
metrics) is the volume's: rebuilt bytes of the repairs that ended in the
last RATE_WINDOW seconds, per second, whatever the number of chunks
repaired at once (the deadlines use each chunk's own speed).

Events (`ecfs.core.events`): when the queue has nothing due any more
after a busy period that repaired or checked chunks, REPAIR_FINISHED
with that period's counts; a chunk found lost goes to `on_unrecoverable`
(the volume's chunk-unrecoverable event), once per chunk.

Deadlines and skips (see `ecfs.data.background`): each chunk's repair
runs under a deadline (`chunk_deadline`: the bytes it reads and writes at
the measured repair rate, plus the stores' p95 latency per round trip,
between `deadline_floor`, doubled for each time the chunk was skipped in a
row, and `deadline_ceiling`). A chunk that misses it,
or whose repair fails (an EcfsError), is skipped: it stays queued, is
logged and listed in the statistics (`skipped_chunks`: file and byte
range) and is tried again after a backoff that doubles per failure
(`skipped`, a `RetryBook`); the chunks behind it go on. What a chunk cut
off by its deadline had written is handed to the garbage collector's
remembered deletions (kept if a later repair refers to it). The queue is
read past the deferred and skipped entries (up to LOOKAHEAD of them), so
they cannot keep the rest waiting. `set_urgent` and `retry_deferred`
(a store back) make skipped chunks due again at once.

Reading the queue: one look at the queue (its order index: schema 4)
reads its HORIZON most urgent entries; they are taken BATCH at
a time, each re-read by its key when taken (as it is then, or gone). The
queue is looked at again when they run out, when something was queued
(`poke`), when the queue had nothing due, or after LOOK_INTERVAL seconds.

Pause (`ecfs repair --pause`, `BackgroundGate`): the task waits at the
gate before each chunk; a chunk under way is finished.

Pacing (like Linux md's speed_limit_min and speed_limit_max; rates count
rebuilt fragment bytes written, what a replaced disk receives). The
foreground is busy while a FUSE request was seen within IDLE_GAP seconds
(URGENT_IDLE_GAP for urgent repair).
- Idle: full speed, up to `rate` (`-o repair_max_rate`, 0 = no cap).
- Busy, not urgent (background repair): a chunk only once the foreground
  pauses, but at least one every MAX_STARVATION seconds (never starved).
- Busy, urgent (`ecfs repair`): `min_rate` (`-o repair_min_rate`,
  default DEFAULT_MIN_RATE), and no more: chunks start as the rate allows
  (a `RatePacer`: each start charges the bytes a chunk wrote on average,
  corrected when it ends), so the disks' time beyond the minimum is left
  to the foreground. If the stores cannot give the minimum, repair takes
  what it can (the minimum goes before the foreground's speed; a lagging
  repair catches up by at most background.PACE_BURST seconds). `min_rate` 0: as
  background repair.
- A busy period, and urgent repair, start without credit
  (`_drop_credit`; a debt, work done ahead of a rate, is kept, so chunks
  queued one by one still go at most at `rate`): the pacers' credit is
  for a repair that fell behind while busy, not for the time the queue
  was empty or background-paced. With it, urgent repair took PACE_BURST
  seconds of work at once beyond its minimum: bench_disks' rebuild at
  150 MiB/s ran at 0.61-0.64 x cap under a minimum of 0.55, taking that
  from the reader beside it.
Not urgent, one chunk at a time; urgent, up to URGENT_PARALLEL at once,
from the moment it is set (a batch under way follows); the next entries
are read from the queue as soon as a batch has started (those in flight
left out), so the chunks in flight do not drain between batches. `rate`
is one pacer for all chunks in flight. The rates are set by the mount options
and changed on a running mount by `ecfs repair --min-rate/--max-rate`.
Why 80 MiB/s by default: half of what one hard disk streams, the issue's
"rebuild at 0.5 x the replacement's speed" for HDDs: a 4 TB disk is
rebuilt within 14 hours under load; on slower disks the minimum is more
than they give and repair takes what it can (redundancy first: lower it
to favour the foreground). On 6 capped devices (scripts/bench_disks.py)
a rebuild at R reads k x R from the survivors, so with n x cap in all a
reader keeps at most (n - 1) x cap - k x R.
Sources are read data fragments first (the decode's CPU: a parity rebuilt
from the k data fragments is one encode pass, from the other parity a
decode and an encode), then fastest first (`ChunkReader.sources`: expected
latency, i.e. latency x queue depth: the least busy survivors); a data
fragment on a SLOW store goes by its latency (`_cheapest_first`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from ..core import fragment
from ..core.codec import Codec
from ..core.errors import EcfsError, FragmentCorrupt, StoreError
from ..core.events import REPAIR_FINISHED, EventSink
from ..core.geometry import Layout
from ..core.model import NO_STORE, REPAIR_REASONS, ChunkRef, repair_priority
from ..storage.handles import Expected, HandleCache, read_header
from ..storage.metadb.chunks import ChunkTable, RepairEntry, RepairQueue
from ..storage.metadb.database import Database
from ..storage.offload import StoreRunner, StoreState, available_runner, run_in_thread
from ..storage.store import Store
from .background import (
    DEADLINE_CEILING,
    DEADLINE_FLOOR,
    SKIPPED_SHOWN,
    BackgroundGate,
    RatePacer,
    RetryBook,
    SkippedChunk,
    chunk_deadline,
    locate_chunk,
)
from .garbage import ChunkPins, Garbage
from .placement import Placement
from .reader import Bytes, ChunkReader, read_verified, verify_payload
from .rebuild import decode_broken, rebuild_fragments

log = logging.getLogger(__name__)

#: Chunks repaired at once in urgent mode (at most: under foreground load
#: the minimum rate spaces their starts out; 16 did not rebuild faster on
#: six capped disks, where the daemon's CPU bounds it, and slowed readers).
URGENT_PARALLEL = 8
#: Default minimum rate of urgent repair under foreground load, in bytes
#: of rebuilt fragments written per second (`-o repair_min_rate=`): half
#: of what one HDD streams (see the module docstring).
DEFAULT_MIN_RATE = 80 << 20

#: Seconds without foreground requests before a non-urgent repair step.
IDLE_GAP = 0.05
#: Seconds without foreground requests before urgent repair goes past its
#: minimum rate: longer than a request delayed by repair itself, or the
#: pause of a program between two files, which must not count as idle.
URGENT_IDLE_GAP = 1.0
#: A non-urgent repair waits at most this long for the foreground to pause.
MAX_STARVATION = 2.0
#: Seconds before an entry that could not be repaired is tried again.
RETRY_DELAY = 30.0
#: Seconds a store stays failed before all its chunks are queued for rebuild.
DEFAULT_REBUILD_AFTER = 900.0
#: Queue entries taken per batch, and at most how many deferred or skipped
#: entries a look at the queue reads past (one query).
BATCH = 32
LOOKAHEAD = 100_000
#: Entries one look at the queue reads (`_look_at_queue`), taken BATCH at a
#: time, each re-read by its key when taken. A look reads the queue in the
#: order of its index (schema 4: 1.8 ms for 1,024 entries of 200,000;
#: before it, a sort of the whole queue on the loop: 18 ms there, ~55 ms
#: for a million), and is made when those run out, something was queued
#: (`poke`), or LOOK_INTERVAL seconds passed (what is queued without a
#: poke, e.g. a write at reduced redundancy), not before every batch.
HORIZON = 512
LOOK_INTERVAL = 2.0
#: Store round trips one chunk's repair makes one after another (suspect
#: check, source reads, write, read back: the last two are one call now,
#: whose time is both), for its deadline.
ROUND_TRIPS = 4
#: Chunks read around by readers that are remembered, to be rebuilt first.
WANTED = 64
#: Chunks whose payloads decoded by a reader are held for their rebuild
#: (one fragment each, typically: 1 MiB).
TAKEN_CHUNKS = 32
#: Queue entries of chunks settled (see "Crash contract") removed in one
#: transaction: SETTLE_BATCH of them, or fewer when no other chunk is in
#: flight or before the queue is read again.
SETTLE_BATCH = 16
#: The rate shown (`RepairStatistics.rate_bytes_per_s`) is the rebuilt
#: bytes of the repairs that ended within the last RATE_WINDOW seconds, per
#: second of that window (of the busy period, when it is younger; at least
#: RATE_MIN_SPAN seconds).
RATE_WINDOW = 5.0
RATE_MIN_SPAN = 0.5


@dataclass(slots=True)
class RepairCounters:
    chunks_repaired: int = 0
    chunks_checked_fine: int = 0
    fragments_rebuilt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    unrecoverable: int = 0
    deferred: int = 0
    deadline_misses: int = 0
    #: Rebuilt fragments taken from a reader's decode (no source read).
    fragments_shared: int = 0
    #: Chunks whose k sources were read in one call (`_read_in_one_call`),
    #: and those read one by one after such a call failed or took too long.
    one_call_reads: int = 0
    one_call_fallbacks: int = 0


@dataclass(frozen=True, slots=True)
class RepairQueueEntry:
    """Queued chunks for one reason, and their file bytes."""

    chunks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class RepairStatistics:
    """A snapshot of the repairer and its queue (from `Repairer.statistics()`).

    The counters count since mount; `deferred` is how many queued chunks
    wait for a store to rebuild onto; `bytes_left` is what rebuilding the
    queue writes (file bytes scaled by n/k), `eta_seconds` that at the
    current rate (None while the rate is 0). `skipped`: chunks given up for
    now (missed their deadline or failed; retried with backoff), the first
    SKIPPED_SHOWN of them in `skipped_chunks` with file and byte range;
    `deadline_misses` counts deadlines missed since mount;
    `one_call_fallbacks` the chunks whose sources were read one by one
    after the one-call read failed or took too long (`_read_in_one_call`);
    `fragments_shared` the fragments rebuilt from what readers' degraded
    reads had decoded and kept, with no source read (see "Shared with
    readers")."""

    chunks_repaired: int
    chunks_checked_fine: int
    fragments_rebuilt: int
    bytes_read: int
    bytes_written: int
    unrecoverable: int
    deferred: int
    urgent: bool
    rate_bytes_per_s: int
    rate_limit: float
    busy: bool
    queue: dict[str, RepairQueueEntry]
    chunks: int
    bytes_left: int
    eta_seconds: int | None
    skipped: int = 0
    skipped_chunks: tuple[SkippedChunk, ...] = ()
    deadline_misses: int = 0
    min_rate: float = 0.0
    one_call_fallbacks: int = 0
    fragments_shared: int = 0


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
        min_rate: float = DEFAULT_MIN_RATE,
        rebuild_after: float = DEFAULT_REBUILD_AFTER,
        clock: Callable[[], float] = time.monotonic,
        gate: BackgroundGate | None = None,
    ) -> None:
        self.db = db
        #: Paused: the task waits before each chunk (see `ecfs.data.background`).
        self.gate = gate if gate is not None else BackgroundGate()
        #: Chunks skipped (deadline missed, or failed) and their backoff.
        self.skipped = RetryBook(clock, what="repair")
        self.deadline_floor = DEADLINE_FLOOR
        self.deadline_ceiling = DEADLINE_CEILING
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
        #: The most bytes/s of rebuilt fragments written, at any time (0: no cap).
        self.rate = rate
        #: The least bytes/s urgent repair keeps under foreground load, and
        #: the most it takes then (see "Pacing" in the module docstring).
        self.min_rate = min_rate
        self._max_pacer = RatePacer(clock)
        self._min_pacer = RatePacer(clock)
        #: Bytes written per chunk repaired (EWMA): what a chunk is charged
        #: to the pacers when it starts (corrected when it ends).
        self._chunk_bytes = float(layout.payload_length(layout.chunk_size))
        self.rebuild_after = rebuild_after
        self.clock = clock
        self.urgent = False
        self.counters = RepairCounters()
        #: Where the end of a busy period is reported (REPAIR_FINISHED).
        self.events = EventSink()
        #: Called once per chunk found lost: (chunk id, inode, chunk index,
        #: length, "repair", why); the volume turns it into an event.
        self.on_unrecoverable: Callable[[int, int, int, int, str, str], None] | None = None
        #: (clock, counters) when the queue last became busy (None: idle).
        self._busy_since: tuple[float, RepairCounters] | None = None
        self.unrecoverable: dict[int, str] = {}
        #: Stores being drained: their fragments are moved, never kept (the
        #: placement's set itself: one truth for both).
        self.draining: set[int] = placement.draining
        #: Asked before a rebuilt fragment goes to a store (the volume
        #: re-checks its identity after idle time); False: retry later.
        self.before_write: Callable[[int], Awaitable[bool]] | None = None
        self._deferred: dict[int, float] = {}
        self._failed_since: dict[int, float] = {}
        self._bulk_queued: set[int] = set()
        self._wakeup = trio.Event()
        #: Rebuilt bytes / seconds of one chunk's repair (EWMA): its deadline.
        self._rate_ewma = 0.0
        #: (clock when it ended, bytes written) of the repairs that ended
        #: within RATE_WINDOW: the volume's repair rate (`statistics`).
        self._recent: deque[tuple[float, int]] = deque()
        self._idle = trio.Event()
        #: Store -> ids of the chunks whose fragment on it is known not to
        #: be there yet: queued when the store was replaced
        #: (`queue_store_rebuild(..., "store-replaced")`), until that
        #: fragment is rebuilt or the chunk is gone. The reader decodes them
        #: from the others at once instead of waiting in the replacement's
        #: queue behind the rebuild's writes (`ChunkReader.not_rebuilt`),
        #: and their suspect check is skipped. About 60 bytes per chunk.
        self.not_rebuilt: dict[int, set[int]] = {}
        # A rebuild under way at the last unmount (or crash) goes on: its
        # chunks left are not there either (those rebuilt just before it,
        # still queued, are rebuilt again).
        for store, chunk_id in self.queue.queued_on_stores("store-replaced"):
            self.not_rebuilt.setdefault(store, set()).add(chunk_id)
        #: Chunks under repair now (never taken from the queue twice).
        self._in_flight: set[int] = set()
        #: Chunks not rebuilt yet that readers read around lately (most
        #: recent last, at most WANTED): repaired before the others.
        self._wanted: dict[int, None] = {}
        #: Chunk id -> index -> the whole payload a reader decoded (taken
        #: from its kept bytes when it said so, `want`), at most
        #: TAKEN_CHUNKS chunks (the oldest dropped), until its rebuild.
        self._taken: dict[int, dict[int, Bytes | memoryview]] = {}
        #: Queue entries of chunks repaired with nothing to record but the
        #: entry's removal: removed together, in one transaction before the
        #: queue is read again (`_flush_settled`), if unchanged meanwhile.
        self._settled: list[RepairEntry] = []
        #: Refreshes the stores' free space (set by the volume); run before
        #: the retry that `set_urgent` starts, so that a store that was full
        #: and has room again takes the rebuilt fragments at once.
        self.refresh_usage: Callable[[], Awaitable[None]] | None = None
        self._refresh_first = False
        #: Ids of the most urgent queue entries not taken yet, in queue
        #: order, from the last look at the whole queue (`_look_at_queue`),
        #: when it was made (`clock`), and whether to look again first.
        self._horizon: deque[int] = deque()
        self._looked_at = -math.inf
        self._look_again = True
        #: Chunks repaired at once: URGENT_PARALLEL when urgent, else 1
        #: (changed in place by set_urgent, so a batch under way follows).
        self._parallel = trio.CapacityLimiter(1)
        #: Chunks whose sources are read in one call at once (`_read_in_one_call`).
        self._one_call_limiter = trio.CapacityLimiter(URGENT_PARALLEL)

    # -- control -------------------------------------------------------------------

    def poke(self) -> None:
        """Something was queued: look at the queue now."""
        self._look_again = True
        self._wakeup.set()

    def set_urgent(self, urgent: bool) -> None:
        self.urgent = urgent
        if urgent:
            self._drop_credit()
        self._parallel.total_tokens = URGENT_PARALLEL if urgent else 1
        self._deferred.clear()
        self.skipped.retry_now()
        self._refresh_first = True
        self.poke()
        if self._idle.is_set():  # busy until the task looked again (`ecfs repair --wait`)
            self._idle = trio.Event()

    def want(self, ref: ChunkRef, index: int) -> None:
        """A reader decoded around fragment `index` of `ref`, not rebuilt
        yet: rebuild that chunk next (see "Shared with readers")."""
        chunk_id = ref.chunk_id
        taken = self._taken.get(chunk_id)
        if (taken is None or index not in taken) and chunk_id not in self._in_flight:
            # Hold on to what the reader decoded (its kept bytes are dropped
            # within a few chunks of a sequential reader, often before the
            # rebuild of this one starts).
            payload = self.reader.kept_payload(ref, index)
            if payload is not None:
                if taken is None:
                    while len(self._taken) >= TAKEN_CHUNKS:
                        del self._taken[next(iter(self._taken))]
                    taken = self._taken[chunk_id] = {}
                taken[index] = payload
        if (
            chunk_id in self._wanted
            or chunk_id in self._in_flight
            or chunk_id in self._deferred  # (nowhere to go yet, or waiting for a store)
            or not self.skipped.due(chunk_id)
        ):
            return
        if len(self._wanted) >= WANTED:
            del self._wanted[next(iter(self._wanted))]
        self._wanted[chunk_id] = None
        self._wakeup.set()  # (read by its key: no new look at the whole queue)

    def retry_deferred(self) -> None:
        """A store came back or has room again: retry the entries that were
        put off (for RETRY_DELAY) because they had nowhere to go, and the
        skipped ones (their failure may have been that store's)."""
        if self._deferred or self.skipped:
            self._deferred.clear()
            self.skipped.retry_now()
            self.poke()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        """Return once the queue holds nothing repairable right now."""
        await self._idle.wait()

    def statistics(self) -> RepairStatistics:
        """Counters and the queue (one SQL query: call it for a status, not per chunk)."""
        queue = {
            reason: RepairQueueEntry(chunks, size) for reason, chunks, size in self.queue.summary()
        }
        # (at the volume's coding: an estimate for chunks of their own)
        bytes_left = sum(e.bytes for e in queue.values()) * self.layout.n // self.layout.k
        rate = round(self.current_rate())
        counters = self.counters
        return RepairStatistics(
            chunks_repaired=counters.chunks_repaired,
            chunks_checked_fine=counters.chunks_checked_fine,
            fragments_rebuilt=counters.fragments_rebuilt,
            bytes_read=counters.bytes_read,
            bytes_written=counters.bytes_written,
            unrecoverable=counters.unrecoverable,
            deferred=len(self._deferred),
            urgent=self.urgent,
            rate_bytes_per_s=rate,
            rate_limit=float(self.rate),
            min_rate=float(self.min_rate),
            busy=self.busy,
            queue=queue,
            chunks=sum(e.chunks for e in queue.values()),
            bytes_left=bytes_left,
            eta_seconds=round(bytes_left / rate) if rate else None,
            skipped=len(self.skipped),
            skipped_chunks=self.skipped.entries(SKIPPED_SHOWN),
            deadline_misses=counters.deadline_misses,
            one_call_fallbacks=counters.one_call_fallbacks,
            fragments_shared=counters.fragments_shared,
        )

    def current_rate(self) -> float:
        """The volume's repair rate now: rebuilt fragment bytes per second
        of the last RATE_WINDOW seconds (the repairs that ended in it),
        whatever number of chunks ran at once; 0 when idle."""
        now = self.clock()
        recent = self._recent
        while recent and recent[0][0] < now - RATE_WINDOW:
            recent.popleft()
        if not recent or self._busy_since is None:
            return 0.0
        span = min(RATE_WINDOW, max(RATE_MIN_SPAN, now - self._busy_since[0]))
        return sum(nbytes for _, nbytes in recent) / span

    def unrecoverable_chunks(self) -> tuple[str, ...]:
        """Why each chunk found unrecoverable is (one message per chunk)."""
        return tuple(self.unrecoverable.values())

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
            queued = self.queue.enqueue_store(
                store, reason, repair_priority(self.layout.m - 1, reason), time.time_ns()
            )
        if reason == "store-replaced":  # a new, empty store: nothing of them is there
            self.not_rebuilt[store] = set(queued)
        log.warning("store %d: %d chunks queued for rebuild (%s)", store, len(queued), reason)
        self.poke()
        return len(queued)

    def queue_wrong_class(self) -> int:
        """Queue every chunk with a fragment on a store of the wrong class
        for the placement policy (e.g. after a switch to hybrid placement:
        the parity written before moves to the remote stores), or in a
        shared failure domain (after a label change): `Placement.misplaced`."""
        now = time.time_ns()
        wrong = [
            (ref.chunk_id, self.placement.misplaced_reason(ref.stores, self.layout.of(ref).k))
            for _, _, ref in self.chunks.iter_all()
            if self.placement.misplaced(ref.stores, self.layout.of(ref).k)
        ]
        with self.db.transaction():
            for chunk_id, why in wrong:
                priority = repair_priority(self.layout.m, why)
                self.queue.add(chunk_id, why, priority, now, bad=0, demand=0)
        if wrong:
            log.warning("%d chunks queued to move misplaced fragments", len(wrong))
            self.poke()
        return len(wrong)

    # -- the task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._run()
        finally:
            self._flush_settled()

    async def _run(self) -> None:
        while True:
            if self._refresh_first and self.refresh_usage is not None:
                self._refresh_first = False
                await self.refresh_usage()
            self._flush_settled()
            entries = self._due_entries()
            if not entries:
                self._report_drained()
                self._idle.set()
                self._wakeup = trio.Event()
                retry = self.skipped.next_due_in()
                with trio.move_on_after(5.0 if retry is None else min(5.0, retry + 0.01)):
                    await self._wakeup.wait()
                continue
            if self._busy_since is None:
                self._busy_since = (self.clock(), dataclasses.replace(self.counters))
                self._drop_credit()
            if self._idle.is_set():  # (a `wait_idle` under way keeps its event)
                self._idle = trio.Event()
            # Urgent: several chunks at once (their fragments are on
            # different stores' queues); otherwise one at a time, paced.
            # The next entries are taken as soon as these have started
            # (those in flight left out), so the pipeline never drains
            # between batches.
            limit = self._parallel
            async with trio.open_nursery() as nursery:
                while entries:
                    for taken, entry in enumerate(entries):
                        if self._wanted and entry.chunk_id not in self._wanted:
                            # A reader waits for others: those first (these
                            # go back where they were taken from).
                            self._horizon.extendleft(e.chunk_id for e in reversed(entries[taken:]))
                            break
                        await self.gate.wait_running()
                        borrower = object()
                        await limit.acquire_on_behalf_of(borrower)
                        charged = await self._pace()
                        self._in_flight.add(entry.chunk_id)
                        nursery.start_soon(self._repair_entry, entry, limit, borrower, charged)
                    self._flush_settled()
                    entries = self._due_entries()

    async def _repair_entry(
        self, entry: RepairEntry, limit: trio.CapacityLimiter, borrower: object, charged: float
    ) -> None:
        written = 0
        try:
            written = await self.repair_chunk(entry)
        except EcfsError as exc:
            self._skip(entry.chunk_id, f"failed: {exc}")
        finally:
            self._in_flight.discard(entry.chunk_id)
            if len(self._settled) >= SETTLE_BATCH or not self._in_flight:
                self._flush_settled()
            limit.release_on_behalf_of(borrower)
            self._max_pacer.correct(written - charged, self.rate)
            self._min_pacer.correct(written - charged, self.min_rate)
            self._chunk_bytes += 0.2 * (written - self._chunk_bytes)

    def _report_drained(self) -> None:
        """The queue has nothing due: a REPAIR_FINISHED event if the busy
        period that ends repaired or checked anything (a chunk only put
        off again, e.g. a lost one, is not news: it had its own event)."""
        if self._busy_since is None:
            return
        started, before = self._busy_since
        self._busy_since = None
        now = self.counters
        repaired = now.chunks_repaired - before.chunks_repaired
        rebuilt = now.fragments_rebuilt - before.fragments_rebuilt
        fine = now.chunks_checked_fine - before.chunks_checked_fine
        if not (repaired or rebuilt or fine):
            return
        self.events.emit(
            REPAIR_FINISHED,
            f"repair queue drained: {repaired} chunks repaired ({rebuilt} fragments rebuilt,"
            f" {now.fragments_shared - before.fragments_shared} of them from readers' decodes),"
            f" {fine} found fine, {len(self._deferred)} put off",
            chunks_repaired=repaired, fragments_rebuilt=rebuilt, chunks_checked_fine=fine,
            unrecoverable=now.unrecoverable - before.unrecoverable,
            bytes_written=now.bytes_written - before.bytes_written,
            deferred=len(self._deferred), seconds=round(self.clock() - started, 3),
        )  # fmt: skip

    def _due_entries(self) -> list[RepairEntry]:
        """Up to BATCH entries to repair now, most urgent first (the chunks
        readers wait for, then the queue's order): taken from the last look
        at the queue (`_look_at_queue`), each as it is now (re-read by its
        key), past the deferred and skipped ones (never stuck behind them)."""
        now = self.clock()
        self._deferred = {c: t for c, t in self._deferred.items() if t > now}
        wanted = list(reversed(self._wanted))  # the latest first: the reader is there
        self._wanted.clear()
        due: dict[int, RepairEntry] = {}
        self._add_due(due, self.queue.entries_of(wanted) if wanted else [])
        looked = False
        while len(due) < BATCH:
            if not self._horizon or self._look_again or now - self._looked_at >= LOOK_INTERVAL:
                if looked:
                    break
                self._look_at_queue()
                looked = True
                if not self._horizon:
                    break
            count = min(BATCH - len(due), len(self._horizon))
            self._add_due(due, self.queue.entries_of([self._horizon.popleft() for _ in range(count)]))
        return list(due.values())

    def _add_due(self, due: dict[int, RepairEntry], entries: list[RepairEntry]) -> None:
        """Add those of `entries` that are due (not deferred, skipped or in
        flight) to `due`, up to BATCH of them."""
        for e in entries:
            if len(due) == BATCH:
                return
            if (
                e.chunk_id not in due
                and e.chunk_id not in self._deferred
                and e.chunk_id not in self._in_flight
                and self.skipped.due(e.chunk_id)
            ):
                due[e.chunk_id] = e

    def _look_at_queue(self) -> None:
        """Read the HORIZON most urgent entries of the whole queue (past as
        many deferred, skipped or in-flight ones as there are, up to
        LOOKAHEAD: one query) into the horizon (see HORIZON)."""
        self._look_again = False
        self._looked_at = self.clock()
        excluded = min(LOOKAHEAD, len(self._deferred) + len(self.skipped) + len(self._in_flight))
        self._horizon = deque(
            e.chunk_id
            for e in self.queue.next_batch(HORIZON + excluded)
            if e.chunk_id not in self._deferred
            and e.chunk_id not in self._in_flight
            and self.skipped.due(e.chunk_id)
        )

    def _flush_settled(self) -> None:
        """Remove the settled chunks' queue entries in one transaction
        (each only if it is as it was read: a fragment reported bad
        meanwhile keeps its chunk queued)."""
        if self._settled:
            settled, self._settled = self._settled, []
            with self.db.transaction():
                self.queue.remove_unchanged(
                    [(e.chunk_id, e.priority, e.demand, e.bad) for e in settled]
                )

    def _forget_absent(self, chunk_id: int, stores: tuple[int, ...] | None = None) -> None:
        """Chunk `chunk_id`'s fragments on `stores` (None: all: the chunk
        is gone) are rebuilt: no longer `not_rebuilt`."""
        for store, chunks in self.not_rebuilt.items():
            if stores is None or store in stores:
                chunks.discard(chunk_id)

    def _skip(self, chunk_id: int, reason: str) -> None:
        """Give the chunk up for now (see the module docstring)."""
        place = locate_chunk(self.db, self.layout.chunk_size, chunk_id)
        self.skipped.skip(chunk_id, place, reason)

    def chunk_deadline(self, ref: ChunkRef) -> float:
        """Seconds the repair of `ref` may take (see the module docstring)."""
        payload = self.layout.payload_length(ref.length)
        latency = max(
            (r.latency_p95() for r in self.runners.values() if r.available),
            default=0.0,
        )
        # Doubled per skip in a row: slow is not stuck (the rate is only
        # measured by repairs that finish).
        floor = self.deadline_floor * 2 ** self.skipped.failures(ref.chunk_id)
        return chunk_deadline(
            payload * (self.layout.n + self.layout.m), self._rate_ewma, ROUND_TRIPS * latency,
            floor=min(floor, self.deadline_ceiling), ceiling=self.deadline_ceiling,
        )  # fmt: skip

    def _defer(self, chunk_id: int) -> None:
        self._deferred[chunk_id] = self.clock() + RETRY_DELAY
        self.counters.deferred += 1

    def _drop_credit(self) -> None:
        """No credit from before; debts kept (see "Pacing" in the module docstring)."""
        self._max_pacer.drop_credit()
        self._min_pacer.drop_credit()

    def _foreground_busy(self) -> bool:
        gap = URGENT_IDLE_GAP if self.urgent and self.min_rate > 0 else IDLE_GAP
        return time.monotonic() - self.last_foreground() < gap

    async def _pace(self) -> float:
        """Wait until the next chunk may start (see "Pacing" in the module
        docstring); the bytes it was charged to the pacers."""
        since = time.monotonic()
        while True:
            wait = self._max_pacer.delay(self.rate)
            if wait > 0:
                await trio.sleep(wait)
                continue
            if not self._foreground_busy():
                self._min_pacer.restart()  # idle: full speed, no debt for later
                break
            if not self.urgent or self.min_rate <= 0:
                # Yield to the foreground, at most MAX_STARVATION (checked
                # again every IDLE_GAP: `ecfs repair` may come meanwhile).
                if time.monotonic() - since >= MAX_STARVATION:
                    self._min_pacer.restart()
                    break
                await trio.sleep(IDLE_GAP)
                continue
            wait = self._min_pacer.delay(self.min_rate)
            if wait <= 0:
                break
            # Busy and ahead of the minimum: wait, but not past the moment
            # the foreground pauses.
            await trio.sleep(min(wait, IDLE_GAP))
        charged = self._chunk_bytes
        self._max_pacer.charge(charged, self.rate)
        self._min_pacer.charge(charged, self.min_rate)
        return charged

    def _note_rate(self, nbytes: int, elapsed: float) -> None:
        if elapsed > 0:
            self._rate_ewma = 0.8 * self._rate_ewma + 0.2 * (nbytes / elapsed)
        if nbytes:
            self._recent.append((self.clock(), nbytes))

    # -- one chunk -----------------------------------------------------------------------

    async def repair_chunk(self, entry: RepairEntry) -> int:
        """Repair one queued chunk; the bytes of rebuilt fragments written."""
        found = self.chunks.by_id(entry.chunk_id)
        if found is None:
            with self.db.transaction():
                self.queue.remove(entry.chunk_id)
            self.skipped.done(entry.chunk_id)
            self._forget_absent(entry.chunk_id)
            return 0
        _, _, ref = found
        started = self.clock()
        deadline = self.chunk_deadline(ref)
        stores = _RepairStores(self)
        self.pins.pin(ref.chunk_id)
        try:
            # Nothing awaits between the metadata switch and the end of
            # `_repair`: a cut-off repair never committed.
            with trio.move_on_after(deadline) as scope:
                written = await self._repair(ref, entry.bad, entry.reason, stores, entry)
        finally:
            self.pins.unpin(ref.chunk_id)
        if scope.cancelled_caught:
            self.counters.deadline_misses += 1
            stores.remember(stores.touched)  # whatever landed: deleted unless referred to
            self._skip(ref.chunk_id, f"not repaired within its deadline of {deadline:.1f} s")
            return 0
        self.skipped.done(ref.chunk_id)
        self._note_rate(written, self.clock() - started)
        return written

    async def _repair(
        self,
        ref: ChunkRef,
        bad_mask: int,
        reason: str,
        stores: _RepairStores | None = None,
        entry: RepairEntry | None = None,
    ) -> int:
        """Repair `ref`; with the queue `entry` it was taken from, a chunk
        left with nothing to record but the entry's removal is settled
        (removed with others, `_flush_settled`)."""
        layout = self.layout.of(ref)
        payload = layout.payload_length(ref.length)
        suspects = {i for i in range(layout.n) if bad_mask >> i & 1}
        suspects |= {i for i, s in enumerate(ref.stores) if not self._usable(s)}
        broken = [
            i
            for i in sorted(suspects)
            if self._absent(ref, i) or not await self._still_good(ref, i, payload)
        ]
        moves = self._moves(ref, broken)
        if not broken and not moves:
            if self.placement.misplaced(ref.stores, layout.k):
                # Misplaced, and no store of its class can take it now: wait
                # for one (a store coming back retries deferred chunks).
                self._defer(ref.chunk_id)
                return 0
            if entry is not None:
                self._settled.append(entry)
            else:
                with self.db.transaction():
                    self.queue.remove(ref.chunk_id)
            self.counters.chunks_checked_fine += 1
            return 0
        broken = sorted({*broken, *moves})
        if all(self.placement.rebuild_target(ref.stores, i, layout.k) is None for i in broken):
            # Nowhere to put a rebuilt fragment (e.g. a store is gone and
            # every other one already holds a fragment of this chunk): do not
            # read k fragments and decode for nothing, while readers wait.
            log.info("chunk %016x: no store can take fragments %s now", ref.chunk_id, broken)
            self._defer(ref.chunk_id)
            return 0
        found_bad = set(broken)
        await self.reader.decode_for_repair(ref, found_bad)
        shared = self._shared(ref, found_bad)
        good: Mapping[int, Bytes | memoryview] = (
            shared if shared is not None else await self._read_good(ref, found_bad, payload)
        )
        broken = sorted(found_bad)  # sources found bad are rebuilt too
        if len(good) < layout.k and not good.keys() >= set(broken):
            away = [i for i in broken if not self._usable(ref.stores[i]) and ref.stores[i] != NO_STORE]
            if len(good) + len(away) + len(moves) >= layout.k:
                # Not lost: stores holding the rest are only unavailable now.
                log.info("chunk %016x: waiting for stores %s to come back", ref.chunk_id,
                         sorted({ref.stores[i] for i in away}))
                self._defer(ref.chunk_id)
            else:
                self._give_up(ref, broken)
            return 0
        done = await rebuild_fragments(
            self.db, layout, self.codec, self.volume_id, self.placement,
            stores if stores is not None else _RepairStores(self),
            ref, good, broken,
            reason=reason if reason in REPAIR_REASONS else "store-failed",
            defer_removal=entry is not None,
        )  # fmt: skip
        if not done.committed:
            self._forget_absent(ref.chunk_id)
        elif done.rebuilt:
            self._forget_absent(ref.chunk_id, tuple(ref.stores[i] for i in done.rebuilt))
        self.counters.fragments_rebuilt += len(done.rebuilt)
        self.counters.bytes_written += done.bytes_written
        if done.committed and done.rebuilt:
            self.counters.chunks_repaired += 1
        if done.failed:
            self._defer(ref.chunk_id)
        elif done.committed and self.placement.misplaced(done.stores, layout.k):
            # A fragment that could move only once others had moved (its
            # class's stores held them, or a shared domain had two): again, next.
            why = self.placement.misplaced_reason(done.stores, layout.k)
            with self.db.transaction():
                self.queue.add(
                    ref.chunk_id, why, repair_priority(layout.m, why),
                    time.time_ns(), bad=0, demand=0,
                )  # fmt: skip
        elif done.removal_deferred and entry is not None:
            self._settled.append(entry)
        return done.bytes_written

    def _shared(self, ref: ChunkRef, broken: set[int]) -> dict[int, Bytes | memoryview] | None:
        """The whole payloads of `ref` that a reader's degraded reads keep
        (see "Shared with readers") when they are those of every broken
        fragment, or k of them; else None."""
        kept = {**self.reader.kept_payloads(ref), **self._taken.pop(ref.chunk_id, {})}
        if not kept or not (broken <= kept.keys() or len(kept) >= self.layout.of(ref).k):
            return None
        self.counters.fragments_shared += len(broken & kept.keys())
        return dict(kept)

    def _absent(self, ref: ChunkRef, index: int) -> bool:
        """Fragment `index` of `ref` is known not to be on its store yet
        (`not_rebuilt`)."""
        chunks = self.not_rebuilt.get(ref.stores[index])
        return chunks is not None and ref.chunk_id in chunks

    def _moves(self, ref: ChunkRef, broken: list[int]) -> list[int]:
        """Good misplaced fragments (a store of the wrong class under
        hybrid placement, a shared failure domain) that a store of their
        class, or of an unused domain, can take now: rebuilt there (decoded
        from others, like a broken one), as many at once as leave k other
        fragments to decode from (data fragments first; the chunk is queued
        again for the rest)."""
        k = self.layout.of(ref).k
        moves = [i for i in self.placement.movable(ref.stores, k) if i not in broken]
        sources = [
            i for i, s in enumerate(ref.stores) if i not in broken and self._usable(s)
        ]
        return moves[: max(0, len(sources) - k)]

    def _usable(self, store: int) -> bool:
        return available_runner(self.runners, store) is not None

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

    async def _read_good(
        self, ref: ChunkRef, broken: set[int], payload: int
    ) -> Mapping[int, Bytes | memoryview]:
        """k whole, verified fragments (data fragments first, then the
        fastest stores, see `_cheapest_first`): in one worker-thread call
        with the decode of `broken` (`_read_in_one_call`), else read in
        parallel, hedged and widened (`ChunkReader.gather_fragments`);
        fragments found bad are added to `broken`."""
        candidates = self._cheapest_first(ref, self.reader.sources(ref, exclude=broken))
        in_one_call = await self._read_in_one_call(ref, candidates, payload, sorted(broken))
        if in_one_call is not None:
            return in_one_call
        good, bad, bytes_read = await self.reader.gather_fragments(ref, candidates, 0, payload)
        broken.update(bad)
        self.counters.bytes_read += bytes_read
        return good

    async def _read_in_one_call(
        self, ref: ChunkRef, candidates: list[int], payload: int, broken: list[int]
    ) -> dict[int, Bytes | memoryview] | None:
        """The first k `candidates` read whole and verified, and fragments
        `broken` decoded from them, in ONE worker-thread call
        (`_read_sources`): one thread round trip and no copy of the
        payloads, instead of k round trips, a task each and a copy each,
        then one more for the decode (measured: ~1 ms of CPU less per
        rebuilt 1 MiB fragment); the sources' payloads and the decoded ones
        (which `rebuild_fragments` takes as decoded already). None when there are fewer than k, when one cannot be read or fails
        its checks, or when the call takes longer than twice the slowest
        source's hedge deadline (abandoned: its thread ends when its stores
        answer): `gather_fragments`, which hedges, replaces and reports
        per fragment, then reads them. The headers read go to the handle
        cache, and the bytes to the stores' read counters, as a read
        through the reader would."""
        layout = self.layout.of(ref)
        k = layout.k
        if len(candidates) < k:
            return None
        chosen = [(self.runners[ref.stores[i]], i) for i in candidates[:k]]
        deadline = 2 * max(runner.hedge_deadline() for runner, _ in chosen)
        codec = self.codec.for_layout(layout)  # its own coding, or the volume's
        with trio.move_on_after(deadline):
            done = await run_in_thread(
                _read_sources, [(runner.store, i) for runner, i in chosen], ref.chunk_id,
                self.reader.expected.of(ref), payload, codec, broken,
                abandon_on_cancel=True, limiter=self._one_call_limiter,
            )  # fmt: skip
            if done is None:
                self.counters.one_call_fallbacks += 1
                return None
            read, decoded = done
            for runner, index in chosen:
                self.handles.insert((runner.index, ref.chunk_id, index), read[index][0])
                runner.note_answer()
                runner.record_loop_read(payload)
            self.counters.bytes_read += k * payload
            self.counters.one_call_reads += 1
            return {**{index: data for index, (_, data) in read.items()}, **decoded}
        self.counters.one_call_fallbacks += 1
        return None

    def _cheapest_first(self, ref: ChunkRef, sources: list[int]) -> list[int]:
        """`sources` (fastest first) on usable stores, the data fragments
        on stores that are not SLOW before the others: the decode costs one
        pass over the k sources per data fragment missing among them, plus
        one per parity fragment rebuilt, so a parity rebuilt from k data
        fragments costs one pass, from k - 1 of them and the other parity
        two (zfec: ~1.3 ms against ~3.3 ms per 1 MiB fragment here, a third
        of the rebuild's CPU). A slow data store is not waited for (it
        stays where its latency puts it; the reads hedge past it anyway)."""
        k = self.layout.of(ref).k
        usable: list[tuple[bool, int]] = []
        for index in sources:
            runner = available_runner(self.runners, ref.stores[index])
            if runner is not None:
                usable.append((index >= k or runner.state is StoreState.SLOW, index))
        usable.sort(key=lambda pair: pair[0])  # stable: fastest first within each
        return [index for _, index in usable]

    def _give_up(self, ref: ChunkRef, broken: list[int]) -> None:
        message = (
            f"chunk {ref.chunk_id:016x}: fewer than {self.layout.of(ref).k} good fragments"
            f" (bad: {broken}); its bytes cannot be recovered"
        )
        if ref.chunk_id not in self.unrecoverable:
            log.error("%s", message)
            found = self.chunks.by_id(ref.chunk_id)
            if found is not None and self.on_unrecoverable is not None:
                self.on_unrecoverable(ref.chunk_id, found[0], found[1], ref.length, "repair", message)
        self.unrecoverable[ref.chunk_id] = message
        self.counters.unrecoverable += 1
        self._defer(ref.chunk_id)


class _RepairStores:
    """The mount's way to the stores for `rebuild_fragments` (see
    `ecfs.data.rebuild.FragmentIO`)."""

    def __init__(self, repairer: Repairer) -> None:
        self.repairer = repairer
        #: Fragment files written (or being written) for this chunk.
        self.touched: list[tuple[int, int, int]] = []

    async def write_verified(
        self, store: int, ref: ChunkRef, index: int, parts: list[fragment.Buffer]
    ) -> int:
        repairer = self.repairer
        if repairer.before_write is not None and not await repairer.before_write(store):
            raise StoreError(f"store {store} is unavailable")
        runner = repairer.runners[store]
        key = (store, ref.chunk_id, index)
        repairer.handles.discard(key)
        size = sum(len(p) for p in parts)
        self.touched.append(key)
        # One call: one turn in the store's queue (which a replaced store
        # shares with the readers of what is rebuilt already), one thread
        # round trip for the write and its read-back. (The read-back is not
        # a latency sample of the store's reads: it is timed with the write.)
        written, header = await runner.call(
            _write_verified, runner.store, ref.chunk_id, index, parts,
            repairer.reader.expected.of(ref), repairer.layout.of(ref).payload_length(ref.length),
            nbytes_written=size,
        )  # fmt: skip
        repairer.handles.insert(key, header)  # verified: as a read would have
        return written

    def note_unsynced(self, store: int) -> None:
        # Made durable before any metadata batch that refers to it (the
        # replicator syncs every store written since its last batch).
        self.repairer.note_unsynced(store)

    def remember(self, fragments: list[tuple[int, int, int]]) -> None:
        self.repairer.garbage.remember(fragments)

    def discard(self, refs: list[ChunkRef]) -> None:
        self.repairer.garbage.discard(refs, self.repairer.db.generation)


def _write_verified(
    store: Store,
    chunk_id: int,
    index: int,
    parts: list[fragment.Buffer],
    expected: Expected,
    payload_length: int,
) -> tuple[int, fragment.FragmentHeader]:
    """In a worker thread: remove any fragment file by that name (they are
    never overwritten), write it, then read it back whole and verify it
    (`_read_whole`); (bytes written, its header). FragmentCorrupt if what
    was read back is not what was written."""
    store.delete_fragment(chunk_id, index)
    written = store.write_fragment(chunk_id, index, parts)
    header, _ = _read_whole(store, chunk_id, index, expected, payload_length)
    return written, header


def _read_sources(
    sources: list[tuple[Store, int]],
    chunk_id: int,
    expected: Expected,
    payload_length: int,
    codec: Codec,
    wanted: list[int],
) -> tuple[dict[int, tuple[fragment.FragmentHeader, Bytes | memoryview]], dict[int, bytes]] | None:
    """In one worker thread: k fragments (store, index) of chunk `chunk_id`
    read whole and verified (`_read_whole`), by index, and fragments
    `wanted` decoded from them. Their reads are started together first
    (`Store.prefetch`), so the wait is about one disk read, not k. None if
    one of them cannot be read or fails its checks (the caller then reads
    them one by one and finds out which)."""
    probe = fragment.HEADER_PROBE_SIZE + payload_length
    try:
        for store, index in sources:
            store.prefetch(chunk_id, index, 0, probe)
        read = {
            index: _read_whole(store, chunk_id, index, expected, payload_length)
            for store, index in sources
        }
    except (EcfsError, OSError):
        return None
    payloads = {i: data for i, (_, data) in read.items()}
    return read, decode_broken(codec, payloads, wanted) if wanted else {}


def _read_whole(
    store: Store, chunk_id: int, index: int, expected: Expected, payload_length: int
) -> tuple[fragment.FragmentHeader, Bytes | memoryview]:
    """Blocking: fragment (chunk_id, index) read whole (header and payload
    in one request) and verified against `expected`, `payload_length` and
    its cells' checksums: (header, payload: a view of the bytes read with
    the header, no copy). FragmentCorrupt, or the store's errors."""
    header, prefix = read_header(
        store, chunk_id, index, expected, probe=fragment.HEADER_PROBE_SIZE + payload_length
    )
    if header.payload_length != payload_length:
        raise FragmentCorrupt(f"fragment {chunk_id:016x}.{index}: payload length mismatch")
    start = header.payload_offset
    if len(prefix) < start + payload_length:  # a header block larger than the probe
        return header, read_verified(store, header, 0, payload_length)
    payload = prefix[start : start + payload_length]
    verify_payload(header, 0, payload_length, payload)
    return header, payload
