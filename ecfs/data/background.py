"""Background work that never gets stuck: one pause switch for all of it,
and a per-chunk deadline and retry book.

Owns: `BackgroundGate`, the volume's "paused on purpose" state,
`RetryBook` + `chunk_deadline`, the rules by which one chunk's repair (or
restripe) is given up for now and retried later, and `RatePacer`, which
spaces work out to a rate (repair's minimum and maximum rates, see
`ecfs.data.repair`, "Pacing"). Must not: know what the
work is; repair (`ecfs.data.repair`), scrub, the small-write log's fold
task, the garbage collector and restripe each call the gate before a chunk
and keep their own book.

The gate. `ecfs repair --pause` pauses every background task of a mount:
each one finishes the chunk it is working on, then waits in
`wait_running` until `ecfs repair --resume`. The state is persisted in the
metadata's key/value `volume` table (no schema change): key PAUSED_KEY
holds the time it was paused (nanoseconds since the epoch, decimal) and
PAUSED_BY_KEY who paused it (free text the CLI sends: user@host); no row
means running (`persist_pause` writes them). So a pause survives unmount
and remount until resumed, and an unmounted volume can be paused or
resumed (`ecfs.frontend.mount.run_offline` opens it as a mount does,
without FUSE, and closes it as an unmount does).
What a pause never stops (foreground work must not wait for it): a write
that finds the small-write log over its limit folds what it needs itself
(`WriteLog.make_room`), and the work that keeps memory and space bounded
goes on while paused, because stopping it would end up stopping writes:
the fold task folds the chunks whose records pin too many log segments,
and the garbage collector deletes replaced versions while more than
`garbage.BACKLOG` of them wait. Unmount folds and collects as always.

The retry book. A chunk whose repair misses its deadline (`chunk_deadline`:
from the bytes it moves and the measured speed and latency of the stores,
between a floor and a ceiling) or fails is skipped: the task goes on with
the chunks behind it, and the chunk is logged and listed in `ecfs status`
with its file (the path resolved from the inode) and byte range, and tried
again after a backoff that doubles with each failure (RETRY_BASE up to
RETRY_CAP), with a deadline that doubles too (up to the ceiling): a volume
that is merely slower than the floor assumes still gets each chunk done. The book lives in memory: after a remount every chunk still in
the queue is tried again at once.

Concurrency: everything runs on the trio thread; `pause`/`resume` commit a
metadata transaction (no await); `wait_running` is a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..storage.metadb.chunks import ChunkTable
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.schema import ROOT_INODE
from ..storage.metadb.stores import StoreTable

log = logging.getLogger(__name__)

#: The `volume` table rows of a pause (see the module docstring).
PAUSED_KEY = "background_paused"
PAUSED_BY_KEY = "background_paused_by"

#: A chunk's deadline: at least DEADLINE_FLOOR s, at most DEADLINE_CEILING s,
#: DEADLINE_SLACK x the time its bytes take at the measured speed (before any
#: speed is measured: ASSUMED_SPEED bytes/s).
DEADLINE_FLOOR = 10.0
DEADLINE_CEILING = 300.0
DEADLINE_SLACK = 4.0
ASSUMED_SPEED = 20 << 20
#: Seconds before a skipped chunk is tried again (doubling per failure, up to the cap).
RETRY_BASE = 30.0
RETRY_CAP = 3600.0
#: Skipped chunks a status snapshot lists (the count is always complete).
SKIPPED_SHOWN = 20
#: Seconds of work a `RatePacer` lets build up as credit while idle.
PACE_BURST = 0.5


@dataclass(frozen=True, slots=True)
class BackgroundStatistics:
    """The pause state (from `BackgroundGate.statistics()`): `since_ns`
    wall-clock nanoseconds (0 while running), `by` who paused it."""

    paused: bool = False
    since_ns: int = 0
    by: str = ""


class BackgroundGate:
    """Paused or running, for every background task of one volume."""

    def __init__(self, db: Database | None = None, clock_ns: Callable[[], int] = time.time_ns) -> None:
        """`db`: where the state is persisted (None: in memory only)."""
        self.db = db
        self.clock_ns = clock_ns
        self._since_ns = 0
        self._by = ""
        self._running = trio.Event()
        self._running.set()
        #: Called after a resume (the volume pokes the tasks that sleep).
        self.on_resume: Callable[[], None] | None = None
        if db is not None:
            self._load(db)

    def _load(self, db: Database) -> None:
        params = StoreTable(db).params()
        value = params.get(PAUSED_KEY, "")
        if not value:
            return
        try:
            since = int(value)
        except ValueError:
            since = 1  # a garbled time: still paused (the safe reading)
            log.warning("volume parameter %s=%r is not a time; background work stays paused",
                        PAUSED_KEY, value)  # fmt: skip
        self._since_ns = max(since, 1)
        self._by = params.get(PAUSED_BY_KEY, "")
        self._running = trio.Event()
        log.warning("background work is paused on purpose (since %s, by %s): nothing is repaired,"
                    " scrubbed or restriped until `ecfs repair --resume`",
                    format_time(self._since_ns), self._by or "?")  # fmt: skip

    @property
    def paused(self) -> bool:
        return self._since_ns != 0

    def statistics(self) -> BackgroundStatistics:
        return BackgroundStatistics(self.paused, self._since_ns, self._by)

    def pause(self, by: str = "") -> bool:
        """Pause all background work (persisted); False if it already was
        (the first pause's time and author are kept)."""
        if self.paused:
            return False
        since = self.clock_ns()
        if self.db is not None:
            persist_pause(self.db, since, by)
        self._since_ns, self._by = since, by
        self._running = trio.Event()
        log.warning("background work paused on purpose by %s", by or "?")
        return True

    def resume(self) -> bool:
        """Resume all background work; False if it was not paused."""
        if not self.paused:
            return False
        if self.db is not None:
            persist_pause(self.db, 0)
        self._since_ns, self._by = 0, ""
        self._running.set()
        log.warning("background work resumed")
        if self.on_resume is not None:
            self.on_resume()
        return True

    async def wait_running(self) -> None:
        """Return at once while running; while paused, wait for the resume."""
        while self.paused:
            await self._running.wait()
        await trio.lowlevel.checkpoint()


def persist_pause(db: Database, since_ns: int, by: str = "") -> None:
    """Write the pause state into `db`'s `volume` table in one transaction:
    paused since `since_ns` by `by`, or running (`since_ns` 0: the rows
    are deleted). The gate calls it; so does `ecfs repair --pause/--resume`
    on an unmounted volume, whose opened gate stays as it was loaded (its
    tasks must not start for the moment the volume is open)."""
    with db.transaction():
        table = StoreTable(db)
        if since_ns:
            table.set_param(PAUSED_KEY, str(since_ns))
            table.set_param(PAUSED_BY_KEY, by)
        else:
            table.delete_param(PAUSED_KEY)
            table.delete_param(PAUSED_BY_KEY)


def format_time(ns: int) -> str:
    """A wall-clock time for people: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9))


def chunk_deadline(
    nbytes: int,
    speed: float,
    latency: float,
    *,
    floor: float = DEADLINE_FLOOR,
    ceiling: float = DEADLINE_CEILING,
) -> float:
    """Seconds one chunk's work may take: moving `nbytes` at `speed`
    bytes/s (measured; 0: not yet, ASSUMED_SPEED) plus `latency` seconds of
    store round trips, times DEADLINE_SLACK, between `floor` and `ceiling`."""
    speed = speed if speed > 0 else ASSUMED_SPEED
    return min(ceiling, max(floor, DEADLINE_SLACK * (nbytes / speed + latency)))


class RatePacer:
    """Spaces work out to a rate in bytes/s: a virtual clock that each
    piece of work started moves on by its bytes / rate (`charge`, and
    `correct` once its real size is known); the next may start once the
    clock has caught up (`delay`). While nothing is charged, credit for at
    most `burst` seconds of work builds up (a repair that fell behind
    catches up by that much, not by everything it missed). The rate is
    passed to each call (0 or less: no pacing), so it can change at any
    time (`ecfs.data.repair`'s minimum and maximum rates)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, burst: float = PACE_BURST) -> None:
        self.clock = clock
        self.burst = burst
        self._next = -math.inf

    def delay(self, rate: float) -> float:
        """Seconds until work may start at `rate` (0.0: now)."""
        if rate <= 0:
            return 0.0
        return max(0.0, self._next - self.clock())

    def charge(self, nbytes: float, rate: float) -> None:
        """Work of `nbytes` starts now."""
        if rate > 0:
            self._next = max(self._next, self.clock() - self.burst) + nbytes / rate

    def correct(self, nbytes: float, rate: float) -> None:
        """Work charged earlier turned out `nbytes` larger (or smaller)."""
        if rate > 0 and self._next > -math.inf:
            self._next += nbytes / rate

    def restart(self) -> None:
        """Forget the past: no debt, no credit (e.g. after unpaced work)."""
        self._next = self.clock()

    def drop_credit(self) -> None:
        """Forget the credit built up while nothing was charged, keep any
        debt: the next work starts no earlier than `delay` says now, and
        what follows it is paced from then, with no burst."""
        self._next = max(self._next, self.clock())


@dataclass(frozen=True, slots=True)
class ChunkPlace:
    """Where a chunk's bytes are: its file (`path`: "" for an unlinked
    file; one of its names when it has several) and byte range."""

    inode: int
    chunk_index: int
    path: str
    start: int
    stop: int

    def describe(self) -> str:
        name = self.path or f"inode {self.inode} (unlinked)"
        return f"{name} bytes [{self.start}, {self.stop})"


def locate_chunk(db: Database, chunk_size: int, chunk_id: int) -> ChunkPlace | None:
    """The file and byte range of chunk `chunk_id` (None: no file has it)."""
    found = ChunkTable(db).by_id(chunk_id)
    if found is None:
        return None
    inode, idx, ref = found
    paths = InodeTable(db).paths_of(inode, ROOT_INODE, limit=1)
    start = idx * chunk_size
    path = paths[0].decode(errors="replace") if paths else ""
    return ChunkPlace(inode, idx, path, start, start + ref.length)


@dataclass(frozen=True, slots=True)
class SkippedChunk:
    """A chunk given up for now (see `RetryBook`): where it is, how often
    it failed, the last reason, and when it is tried again (wall clock ns)."""

    chunk_id: int
    inode: int
    chunk_index: int
    path: str
    start: int
    stop: int
    failures: int
    reason: str
    retry_ns: int


@dataclass(slots=True)
class _Entry:
    place: ChunkPlace
    failures: int
    reason: str
    retry_at: float  # on the book's clock


class RetryBook:
    """Chunks that missed their deadline or failed, and when to retry
    each (exponential backoff; see the module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        base: float = RETRY_BASE,
        cap: float = RETRY_CAP,
        what: str = "repair",
    ) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.what = what
        self._entries: dict[int, _Entry] = {}
        #: Skips since mount (a chunk skipped twice counts twice).
        self.skips = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk_id: int) -> bool:
        return chunk_id in self._entries

    def due(self, chunk_id: int) -> bool:
        """Whether the chunk may be worked on now (never skipped, or its backoff is over)."""
        entry = self._entries.get(chunk_id)
        return entry is None or entry.retry_at <= self.clock()

    def failures(self, chunk_id: int) -> int:
        """How often the chunk was skipped in a row (0: never, or done since)."""
        entry = self._entries.get(chunk_id)
        return 0 if entry is None else entry.failures

    def next_due_in(self) -> float | None:
        """Seconds until the next skipped chunk is due (None: none waits)."""
        if not self._entries:
            return None
        return max(0.0, min(e.retry_at for e in self._entries.values()) - self.clock())

    def skip(self, chunk_id: int, place: ChunkPlace | None, reason: str) -> float:
        """Give the chunk up for now; the seconds until it is tried again."""
        entry = self._entries.get(chunk_id)
        failures = 1 if entry is None else entry.failures + 1
        if place is None:
            place = entry.place if entry is not None else ChunkPlace(0, 0, "", 0, 0)
        delay = min(self.cap, self.base * 2 ** (failures - 1))
        self._entries[chunk_id] = _Entry(place, failures, reason, self.clock() + delay)
        self.skips += 1
        log.warning(
            "%s of chunk %016x (%s) skipped: %s; failure %d, retried in %.0f s",
            self.what, chunk_id, place.describe(), reason, failures, delay,
        )  # fmt: skip
        return delay

    def done(self, chunk_id: int) -> None:
        """The chunk's work succeeded (or is no longer needed)."""
        entry = self._entries.pop(chunk_id, None)
        if entry is not None:
            log.info("%s of chunk %016x (%s) done after %d skip(s)",
                     self.what, chunk_id, entry.place.describe(), entry.failures)  # fmt: skip

    def retry_now(self) -> None:
        """Make every skipped chunk due (an operator asked; failures are kept)."""
        now = self.clock()
        for entry in self._entries.values():
            entry.retry_at = now

    def entries(self, limit: int = SKIPPED_SHOWN) -> tuple[SkippedChunk, ...]:
        """The first `limit` skipped chunks, soonest retry first."""
        now, wall = self.clock(), time.time_ns()
        ordered = sorted(self._entries.items(), key=lambda item: (item[1].retry_at, item[0]))
        return tuple(
            SkippedChunk(
                chunk_id, e.place.inode, e.place.chunk_index, e.place.path, e.place.start,
                e.place.stop, e.failures, e.reason, wall + round(max(0.0, e.retry_at - now) * 1e9),
            )  # fmt: skip
            for chunk_id, e in ordered[:limit]
        )
