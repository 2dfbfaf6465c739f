"""The small-write log: small overwrites made durable as records, folded
into new chunk versions later.

Without it, a flush or fsync of a chunk with a few dirty KiB re-encodes the
whole chunk (k x F = 4 MiB by default) and writes k+m new fragments (~6 MiB)
for a 4 KiB change. With it, `ecfs.data.filedata` keeps such writes as a sparse
`Extents` patch (no read of the chunk), and at flush/fsync appends the
patched ranges as records to this log; reads lay the records over the
stored chunk; a background fold re-encodes the chunk once with all of its
records, as a new copy-on-write version, and drops the records in the same
transaction that switches to that version.

Where the log lives, and why: records are rows of the replicated metadata
database (table `write_log`, see `ecfs.storage.metadb.writelog`), like inline
files, not log files on the stores:
* the metadata is already on m+1 stores, so any m lost stores lose no
  record (the fault tolerance of the chunk, as asked);
* fsync already waits for the replicas (`Replicator.wait_durable`), and
  one replicated transaction per fsync carries the records together with
  the inode's size and mtime: no second durability protocol, no ordering
  between a log file and the metadata to get right after a crash;
* "drop the records in the transaction that switches to the folded
  version" is one SQLite transaction; a fold interrupted by a crash leaves
  the old version and its records, or the new version without them;
* scrub and repair need nothing new: a lost or corrupt replica is
  re-created from the working copy like the rest of the metadata, and the
  metadata-copy checks (`ecfs fsck`) cover the records.
The price, counted per fsync'd 4 KiB write (4 KiB SQLite pages, WAL,
synchronous=FULL on each of the m+1 replicas): the record's leaf page (its
first ~490 bytes, shared by ~8 records) and one overflow page, the
`replica_state` page and the inode's page (mtime) go to each replica's WAL:
4 frames, which with their 24-byte headers dirty 5 pages of the WAL file
(20 KiB), and the record's page is written once more at the next
checkpoint: ~25 KiB per replica measured, ~75 KiB for 3 replicas plus the
working copy (scripts/BENCHMARKS.md: 93-181 KiB per write on a busy
machine), against ~6,400 KiB for a re-encoded chunk. That misses issue
14's 48 KiB: it needs fewer or smaller pages per commit (smaller replica
pages, or append-only log files on m+1 stores, which would need their own
durability and repair). Splitting records into pieces that fit a leaf
page was considered: it writes the same two pages per commit.
Records are kept out of memory (only an index of their ranges is held), so
the log may be large without costing RAM.

Integrity: each record carries an xxh3 checksum of its place (inode,
chunk, version, seq, offset) and its bytes, verified whenever its bytes
are read; a mismatch means this copy of the metadata is bad, and the read
fails with EIO (never wrong bytes); `ecfs fsck` reports it. A record whose
chunk version is not the chunk's current one (which the transactions
never leave behind) is ignored at mount with a warning, never applied.

Bounds and folding (`WriteLog.run`): a chunk is folded when its logged
bytes pass `fold_budget` (amortised: 1,000 fsync'd 4 KiB writes to one
chunk fold it ~4 times with the 1 MiB default), when it had no new record
for `fold_idle` seconds, and at unmount (`FileData.fold_all`). Folds yield
to foreground I/O like garbage collection (a gap of IDLE_GAP seconds, at
most PATIENCE of waiting). When the whole log passes `limit` bytes, a
writer that logs folds the largest chunks itself before its flush returns
(writers are slowed down; nothing fails).

Owns: the in-memory index of logged ranges (`LoggedChunk` per chunk,
loaded at mount), record checksums, the fold policy and its statistics.
Must not: speak SQL (see metadb.writelog), read or write fragments, or
decide file contents (the fold itself is `FileData.fold_chunk`).

Concurrency contract: everything runs on the trio thread. `append`,
`drop*` and `clip` run inside the caller's `db.transaction()` (no await);
the index changes with the SQL, and a rollback reloads the index from the
database. `overlay` reads the records' bytes synchronously, so a reader
captures the chunk version and its records at one instant: a fold that
commits while the reader waits for fragments cannot mix versions (the old
version is pinned, see garbage).

Crash contract: a record is durable when the transaction that wrote it is
(fsync waits for that); the fold's new version is durable before the
transaction that switches to it and drops the records (see replicas).
"""

from __future__ import annotations

import bisect
import errno
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from ..core.errors import EcfsError
from ..core.fragment import checksum64
from ..core.tasks import wait_until_idle
from ..storage.metadb.database import Database
from ..storage.metadb.writelog import WriteLogTable

log = logging.getLogger(__name__)

#: A flush logs a chunk's patch when it holds at most chunk_size / this many
#: bytes, and otherwise re-encodes the chunk; a patch that grows past it is
#: turned into a whole-chunk buffer at once. Logging L bytes costs ~6 L
#: written (m+1 = 3 replicas, each WAL + checkpoint) plus its share of the
#: fold (1.5 chunk_size per fold_budget logged), a re-encode 1.5 chunk_size:
#: break-even near chunk_size / 8. Measured (scripts/bench.py --small-writes,
#: SQLite WAL mode, 100-row updates spread over the table, ~410 KiB of WAL
#: frames per commit): 1/16 re-encoded a 4 MiB chunk per commit (1,272 MiB
#: written to the stores, 10.5 s); 1/8 logs them (106 MiB, 8.2 s).
LOG_FRACTION = 8
#: A chunk is folded once its logged bytes pass chunk_size / this many.
FOLD_FRACTION = 4
#: Seconds without a new record after which a chunk is folded.
FOLD_IDLE = 5.0
#: Bytes of records the whole volume may hold before writers fold.
LOG_LIMIT = 256 << 20
#: Seconds between looks at what to fold when nothing wakes the task.
FOLD_POLL = 1.0
#: Folds yield to foreground requests like garbage (see ecfs.data.garbage).
IDLE_GAP = 0.05
PATIENCE = 2.0

_PLACE = struct.Struct("<qqqqq")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")


class LogRecordError(EcfsError):
    """A log record's bytes do not match its checksum: this copy of the
    metadata is damaged. Reads of the chunk fail with EIO."""

    errno = errno.EIO


def record_checksum(inode: int, idx: int, chunk_id: int, seq: int, offset: int, data: bytes) -> int:
    """The `write_log.checksum` of a record: xxh3_64 of its place and bytes,
    as a signed 64-bit integer (what SQLite stores)."""
    unsigned = checksum64(_PLACE.pack(inode, idx, chunk_id, seq, offset) + data)
    (signed,) = _I64.unpack(_U64.pack(unsigned))
    return int(signed)


class Extents:
    """Non-overlapping byte ranges with their data, newest write winning:
    the patch of a chunk written over without loading it."""

    __slots__ = ("_starts", "_data", "total")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._data: list[bytearray] = []
        self.total = 0

    def add(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if offset == end:
            return
        # Merge with every extent that overlaps or touches [offset, end).
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and self._starts[i] + len(self._data[i]) >= offset:
            first = i
        else:
            first = i + 1
        last = first
        while last < len(self._starts) and self._starts[last] <= end:
            last += 1
        if first == last:
            self._starts.insert(first, offset)
            self._data.insert(first, bytearray(data))
            self.total += end - offset
            return
        start = min(offset, self._starts[first])
        stop = max(end, self._starts[last - 1] + len(self._data[last - 1]))
        merged = bytearray(stop - start)
        for j in range(first, last):
            old = self._data[j]
            self.total -= len(old)
            pos = self._starts[j] - start
            merged[pos : pos + len(old)] = old
        merged[offset - start : end - start] = data
        self._starts[first:last] = [start]
        self._data[first:last] = [merged]
        self.total += len(merged)

    def items(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of each extent, in offset order (copies)."""
        return [(s, bytes(d)) for s, d in zip(self._starts, self._data, strict=True)]

    def clip(self, cut: int) -> None:
        """Forget everything at or past `cut`."""
        keep_starts: list[int] = []
        keep_data: list[bytearray] = []
        for s, d in zip(self._starts, self._data, strict=True):
            if s < cut:
                keep_starts.append(s)
                keep_data.append(d[: cut - s])
        self._starts, self._data = keep_starts, keep_data
        self.total = sum(len(d) for d in keep_data)

    def __bool__(self) -> bool:
        return bool(self._starts)


def lay_over(dest: memoryview, start: int, pieces: Iterable[tuple[int, bytes]]) -> None:
    """Copy each (offset, data) piece (chunk offsets, in order: later ones
    win) over `dest`, which holds chunk bytes [start, start + len(dest))."""
    stop = start + len(dest)
    for offset, data in pieces:
        a = max(offset, start)
        b = min(offset + len(data), stop)
        if a < b:
            dest[a - start : b - start] = memoryview(data)[a - offset : b - offset]


@dataclass(eq=False, slots=True)
class LoggedChunk:
    """The records of one chunk: (seq, offset, length), oldest first."""

    chunk_id: int
    records: list[tuple[int, int, int]] = field(default_factory=list)
    logged: int = 0
    last: float = 0.0


@dataclass(frozen=True, slots=True)
class WriteLogStatistics:
    """A snapshot of the log (from `WriteLog.statistics()`)."""

    records: int  # records waiting to be folded
    bytes: int  # their data bytes
    chunks: int  # chunks with records
    records_written: int  # since mount
    bytes_written: int
    folds: int  # chunks folded since mount
    forced_folds: int  # of them, folds a writer waited for (log over its limit)
    limit: int


class WriteLog:
    """The index of logged ranges, and the fold policy."""

    def __init__(
        self,
        db: Database,
        chunk_size: int,
        *,
        limit: int = LOG_LIMIT,
        fold_idle: float = FOLD_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.table = WriteLogTable(db)
        self.chunk_size = chunk_size
        #: Largest patch a flush logs (bigger ones re-encode the chunk).
        self.log_max = chunk_size // LOG_FRACTION
        self.fold_budget = chunk_size // FOLD_FRACTION
        self.limit = limit
        self.fold_idle = fold_idle
        self.clock = clock
        self._chunks: dict[tuple[int, int], LoggedChunk] = {}
        self._by_inode: dict[int, set[int]] = {}
        self.total = 0
        self.records = 0
        self._next_seq = 1
        self._records_written = 0
        self._bytes_written = 0
        self.folds = 0
        self.forced_folds = 0
        self._wakeup = trio.Event()
        self._reported_bad: set[tuple[int, int]] = set()
        self._loaded = False
        db.on_rollback.append(self._reload)

    # -- index -----------------------------------------------------------------

    def load(self, current_chunk: Callable[[int, int], int] | None = None) -> list[str]:
        """Build the index from the database (at mount; again after a
        rollback). `current_chunk(inode, idx)` -> the chunk id of that chunk
        now (0 for none): records over any other version are left out
        (never applied) and described in the list returned."""
        self._loaded = True
        self._chunks.clear()
        self._by_inode.clear()
        self.total = self.records = 0
        problems = []
        largest = 0
        for seq, inode, idx, chunk_id, offset, length, _checksum in self.table.heads():
            largest = max(largest, seq)
            if current_chunk is not None and current_chunk(inode, idx) != chunk_id:
                problems.append(
                    f"log record {seq} of inode {inode} chunk {idx} applies over chunk"
                    f" version {chunk_id}, which is not the current one: ignored"
                )
                continue
            self._add(inode, idx, chunk_id, seq, offset, length, self.clock())
        self._next_seq = max(self._next_seq, largest + 1)
        return problems

    def _reload(self) -> None:
        """After a rollback: the index follows the database again (the
        chunk-map cache may not be reset yet, so no version check)."""
        if self._loaded:
            self.load()

    def _add(
        self, inode: int, idx: int, chunk_id: int, seq: int, offset: int, length: int, now: float
    ) -> None:
        key = (inode, idx)
        entry = self._chunks.get(key)
        if entry is None:
            entry = self._chunks[key] = LoggedChunk(chunk_id)
            self._by_inode.setdefault(inode, set()).add(idx)
        entry.records.append((seq, offset, length))
        entry.logged += length
        entry.last = now
        self.total += length
        self.records += 1

    def has(self, inode: int, idx: int) -> bool:
        return (inode, idx) in self._chunks

    def logged(self, inode: int, idx: int) -> int:
        entry = self._chunks.get((inode, idx))
        return 0 if entry is None else entry.logged

    @property
    def over_limit(self) -> bool:
        return self.total > self.limit

    # -- records ---------------------------------------------------------------

    def append(self, inode: int, idx: int, chunk_id: int, pieces: list[tuple[int, bytes]]) -> None:
        """Log `pieces` ((offset, data) in chunk `idx` of `inode`, over
        version `chunk_id`). Inside the caller's transaction."""
        entry = self._chunks.get((inode, idx))
        if entry is not None and entry.chunk_id != chunk_id:
            raise AssertionError(f"log of inode {inode} chunk {idx} is over another version")
        now = self.clock()
        for offset, data in pieces:
            seq = self._next_seq
            self._next_seq += 1
            checksum = record_checksum(inode, idx, chunk_id, seq, offset, data)
            self.table.insert(seq, inode, idx, chunk_id, offset, checksum, data)
            self._add(inode, idx, chunk_id, seq, offset, len(data), now)
            self._records_written += 1
            self._bytes_written += len(data)
        if self.logged(inode, idx) >= self.fold_budget or self.over_limit:
            self._wakeup.set()

    def overlay(self, inode: int, idx: int, start: int, stop: int) -> list[tuple[int, bytes]]:
        """The logged pieces of chunk bytes [start, stop), oldest first,
        their checksums verified (LogRecordError if one does not match)."""
        entry = self._chunks.get((inode, idx))
        if entry is None:
            return []
        wanted = [r for r in entry.records if r[1] < stop and r[1] + r[2] > start]
        if not wanted:
            return []
        datas = self._verified(inode, idx, entry.chunk_id, wanted)
        return [(r[1], data) for r, data in zip(wanted, datas, strict=True)]

    def _verified(
        self, inode: int, idx: int, chunk_id: int, records: list[tuple[int, int, int]]
    ) -> list[bytes]:
        """The bytes of `records` of one chunk, each checked against its checksum."""
        found = self.table.data([seq for seq, _, _ in records])
        datas = []
        for seq, offset, length in records:
            checksum, data = found.get(seq, (None, b""))
            if (
                len(data) != length
                or record_checksum(inode, idx, chunk_id, seq, offset, data) != checksum
            ):
                self._report_bad(inode, idx, seq)
                raise LogRecordError(
                    f"log record {seq} of inode {inode} chunk {idx} fails its checksum"
                    " (this metadata copy is damaged)"
                )
            datas.append(data)
        return datas

    def _report_bad(self, inode: int, idx: int, seq: int) -> None:
        if (inode, idx) not in self._reported_bad:
            self._reported_bad.add((inode, idx))
            log.error("inode %d chunk %d: log record %d fails its checksum", inode, idx, seq)

    def drop(self, inode: int, idx: int) -> None:
        """Delete the records of one chunk (its version is being replaced
        or removed). Inside the caller's transaction."""
        entry = self._forget(inode, idx)
        if entry is not None:
            self.table.delete(seq for seq, _, _ in entry.records)

    def _forget(self, inode: int, idx: int) -> LoggedChunk | None:
        """Remove a chunk from the index (not from the table)."""
        entry = self._chunks.pop((inode, idx), None)
        if entry is None:
            return None
        indices = self._by_inode.get(inode)
        if indices is not None:
            indices.discard(idx)
            if not indices:
                del self._by_inode[inode]
        self.total -= entry.logged
        self.records -= len(entry.records)
        return entry

    def drop_from(self, inode: int, first: int) -> None:
        """Delete the records of chunks idx >= first of `inode`."""
        for idx in sorted(i for i in self._by_inode.get(inode, ()) if i >= first):
            self.drop(inode, idx)

    def clip(self, inode: int, idx: int, cut: int) -> None:
        """Forget the logged bytes at or past chunk offset `cut` (truncate):
        records starting there are deleted, a record across it is replaced
        by its head (same seq). Inside the caller's transaction."""
        entry = self._chunks.get((inode, idx))
        if entry is None:
            return
        keep: list[tuple[int, int, int]] = []
        across: list[tuple[int, int, int]] = []
        gone: list[int] = []
        for record in entry.records:
            seq, offset, length = record
            if offset >= cut:
                gone.append(seq)
            elif offset + length > cut:
                across.append(record)
            else:
                keep.append(record)
        if not gone and not across:
            return
        heads = self._verified(inode, idx, entry.chunk_id, across)
        self.table.delete(gone + [seq for seq, _, _ in across])
        for (seq, offset, _), data in zip(across, heads, strict=True):
            head = data[: cut - offset]
            checksum = record_checksum(inode, idx, entry.chunk_id, seq, offset, head)
            self.table.insert(seq, inode, idx, entry.chunk_id, offset, checksum, head)
            keep.append((seq, offset, len(head)))
        if not keep:
            self._forget(inode, idx)
            return
        keep.sort()
        logged = sum(length for _, _, length in keep)
        self.total += logged - entry.logged
        self.records += len(keep) - len(entry.records)
        entry.records = keep
        entry.logged = logged

    # -- folding ---------------------------------------------------------------

    def statistics(self) -> WriteLogStatistics:
        return WriteLogStatistics(
            records=self.records,
            bytes=self.total,
            chunks=len(self._chunks),
            records_written=self._records_written,
            bytes_written=self._bytes_written,
            folds=self.folds,
            forced_folds=self.forced_folds,
            limit=self.limit,
        )

    def chunks(self) -> list[tuple[int, int]]:
        """Every (inode, idx) with records."""
        return list(self._chunks)

    def _due(self) -> list[tuple[int, int]]:
        """Chunks to fold now: over budget (largest first), then idle."""
        now = self.clock()
        over = [k for k, e in self._chunks.items() if e.logged >= self.fold_budget]
        over.sort(key=lambda k: -self._chunks[k].logged)
        idle = [
            k
            for k, e in self._chunks.items()
            if e.logged < self.fold_budget and now - e.last >= self.fold_idle
        ]
        return over + idle

    async def make_room(self, fold: Callable[[int, int], Awaitable[None]]) -> None:
        """While the log is over its limit, fold its largest chunks (a writer
        that just logged waits for this: the backpressure)."""
        while self.over_limit and self._chunks:
            key = max(self._chunks, key=lambda k: self._chunks[k].logged)
            before = self.logged(*key)
            await self._fold(fold, key, forced=True)
            if self.logged(*key) >= before:
                return  # the fold failed (logged by it): do not spin

    async def _fold(
        self, fold: Callable[[int, int], Awaitable[None]], key: tuple[int, int], *, forced: bool
    ) -> None:
        try:
            await fold(*key)
        except EcfsError as exc:
            log.warning("inode %d chunk %d: fold failed: %s", key[0], key[1], exc)
            return
        if not self.has(*key):
            self.folds += 1
            self.forced_folds += forced

    async def run(
        self,
        fold: Callable[[int, int], Awaitable[None]],
        last_foreground: Callable[[], float],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: fold what is due (see the module docstring)."""
        task_status.started()
        while True:
            with trio.move_on_after(FOLD_POLL):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            for key in self._due():
                if not self.has(*key):
                    continue
                if not self.over_limit:
                    await wait_until_idle(last_foreground, IDLE_GAP, PATIENCE)
                    if not self.has(*key):
                        continue
                await self._fold(fold, key, forced=False)
