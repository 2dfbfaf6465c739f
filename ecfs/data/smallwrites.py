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

Where the log lives, and why: in segment files on the stores, m+1 copies
of each record on distinct stores, like ZFS's intent log (the format, the
segments and the copies are `ecfs.data.logfiles`). Records live on the
stores that hold log segments (see
`ecfs.storage.store.Store.holds_log_segments`; an S3 store holds none); a
volume with fewer than m+1 of them logs nothing (`log_max` is 0: every
small overwrite becomes a whole-chunk write, see `ecfs.data.logfiles`). A record carries its place
(inode, chunk, the chunk version it applies over, offset), its bytes, the
file's size and mtime after the write, and an xxh3 checksum (with the
volume id) over all of it; it is padded to 4 KiB pages. An append writes
the records of one flush to m+1 stores in parallel, one pwrite and one
fdatasync each, into segments created at their full size by fallocate, so
a 4 KiB write costs 2 pages per copy, 24 KiB for m = 2, and no ext4
metadata once a segment has been used (its first use converts unwritten
extents: ~4-6 KiB of journal per fdatasync, measured; zero-filling the
segment instead would cost 8 KiB per page once).
The records lived in the replicated metadata before (a `write_log` table,
see `ecfs.storage.metadb.writelog`, still read at mount to move what an older
ecfs left there): simpler, but each fsync committed ~4-5 SQLite pages to
each of the m+1 replicas' WALs plus checkpoints: 83-92 KiB per fsync'd
4 KiB write, and one replica commit per fsync (scripts/bench.py
--small-writes on a shared 2-CPU VM: 875 IOPS, 0.48x the passthrough;
SQLite WAL mode 2.8x, delete mode 2.0x). Measured the same way with the
log on the stores (4 runs, the machine's load varied): 24-25 KiB written
by the daemon per fsync'd 4 KiB write (43 KiB on /proc/diskstats in a
run alone, which counts the ext4 journal of the segments' first use; 36-88
KiB during the benchmarks, with the other users of the shared disk),
0.59-0.71x the passthrough's IOPS (one outlier run 1.7x), SQLite WAL mode
1.25-2.1x and delete mode 0.96-2.0x (the last numbers after packing the
records of one append: SQLite's scattered 4 KiB pages had cost 8 KiB
each). The price here: records need their own liveness rule, copies and
recovery, which is what follows.

A record is live when the chunk version it was logged over is the
chunk's current version in the metadata; nothing else is consulted. That
holds because chunk ids are never reused, records are only logged over a
stored version (never a hole) after that version, and everything
committed before, is durable (`append` waits for it), and every
operation that takes bytes away from a chunk with records gives it a new
version or removes it in its transaction: a fold or write-back, a
truncate (the kept chunk is re-encoded with the truncate, see
`FileData.truncate`), an unlink, an inline conversion. So "the records
are dropped in the transaction that switches to the new version" is true
of the durable state by construction, and no per-record floor is needed.
A segment is reused (or deleted) only once none of its copies is live and
the transaction that killed the last one is durable: the old records left
in it are dead for good.

Attributes: a flush whose only attribute change is the mtime (= ctime)
that its newest record carries commits no metadata
(`FileData._covered_by_log`); the record brings the time back at mount
when it is newer than the inode's committed ctime. A size change, or any
other attribute, is committed as before (so sizes never come from
records).

Recovery at mount (`load`): every store's segments are read, each block
that starts with the magic and verifies is a record copy (a torn or
damaged copy does not verify and is never applied), copies are
deduplicated by seq, and the live records are indexed with their data.
Copies lost with a store (or damaged) are written anew on other stores
by `upkeep` (the fold task, every FOLD_POLL seconds, and right after an
append that could not place m+1 copies): any m lost stores lose no
record. Scrub reads every live copy back (`verify_copies`) and replaces
damaged ones the same way. `ecfs fsck` reads every copy and `--repair`
writes missing ones.
Segments whose records are all dead are reused; beyond KEEP_FREE per
store they are deleted, and all of them at unmount (the log is folded
then), so a mount after a clean unmount reads no segment.

Memory: the data of live records is kept in memory (the log is bounded
by `limit`, 256 MiB by default), so overlays never read the stores and
reads of logged chunks cost no I/O beyond the chunk's.

Bounds and folding (`WriteLog.run`): a chunk is folded when its logged
bytes pass `fold_budget` (amortised: 1,000 fsync'd 4 KiB writes to one
chunk fold it ~4 times with the 1 MiB default), when it had no new record
for `fold_idle` seconds, and at unmount (`FileData.fold_all`). Folds yield
to foreground I/O like garbage collection (a gap of IDLE_GAP seconds, at
most PATIENCE of waiting). When the whole log passes `limit` bytes, a
writer that logs folds the largest chunks itself before its flush returns
(writers are slowed down; nothing fails). The segments' space is bounded
too: a segment is reused only once all of its records are dead, so a few
old records could hold many; past SPACE_FACTOR x `limit` of segments, the
fold task folds the chunks with the oldest records first.

Pause (`ecfs repair --pause`, see `ecfs.data.background.BackgroundGate`):
the fold task stops folding and re-creating copies (a fold under way is
finished), except the folds that keep the segments' space bounded (past
SPACE_FACTOR x `limit`). Writers never wait for the gate: a writer whose
append takes the log over its limit folds what it needs itself
(`make_room`), paused or not, and a patch too big to log is written as a
whole chunk as always; unmount folds everything as always.

Owns: the in-memory index of logged ranges (`LoggedChunk` per chunk,
loaded at mount) and the live records' data, which records are live, the
fold policy and its statistics. Must not: speak SQL (see metadb.writelog),
read or write fragments or log files (see `ecfs.data.logfiles`), or decide file
contents (the fold itself is `FileData.fold_chunk`).

Concurrency contract: everything runs on the trio thread. `append` runs
outside any transaction under the chunk's lock (the caller's) and adds
the records to the index once their copies are written; `drop*` run
inside the caller's `db.transaction()` (no await): the index forgets the
records at once and a rollback puts them back. `overlay` is synchronous
(memory), so a reader captures the chunk version and its records at one
instant: a fold that commits while the reader waits for fragments cannot
mix versions (the old version is pinned, see garbage).

Crash contract: a record is durable when `append` returned (its copies
were fdatasync'd after everything committed before it was durable); the
fold's new version is durable before the transaction that switches to it,
and that transaction is what kills the records.
"""

from __future__ import annotations

import bisect
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import trio

from ..core.errors import EcfsError
from ..core.fragment import checksum64
from ..core.tasks import wait_until_idle
from ..storage.metadb.database import Database
from ..storage.metadb.writelog import WriteLogTable
from ..storage.store import Store
from .background import BackgroundGate
from .logfiles import LogFiles, Place, Record

log = logging.getLogger(__name__)

#: A flush logs a chunk's patch when it holds at most chunk_size / this many
#: bytes, and otherwise re-encodes the chunk; a patch that grows past it is
#: turned into a whole-chunk buffer at once. Logging L bytes costs ~3 L
#: written (m+1 = 3 copies, padded to 4 KiB) plus its share of the fold
#: (1.5 chunk_size per fold_budget logged), a re-encode 1.5 chunk_size:
#: break-even well above chunk_size / 8. Measured with the log in the
#: metadata (scripts/bench.py --small-writes, SQLite WAL mode, 100-row
#: updates spread over the table, ~410 KiB of WAL frames per commit): 1/16
#: re-encoded a 4 MiB chunk per commit (1,272 MiB written to the stores,
#: 10.5 s); 1/8 logs them (106 MiB, 8.2 s).
LOG_FRACTION = 8
#: A chunk is folded once its logged bytes pass chunk_size / this many.
FOLD_FRACTION = 4
#: Seconds without a new record after which a chunk is folded.
FOLD_IDLE = 5.0
#: Bytes of records the whole volume may hold before writers fold (they
#: are held in memory too, see the module docstring).
LOG_LIMIT = 256 << 20
#: Log segments may take this many times `limit` on the stores before the
#: chunks holding the oldest ones are folded (records are padded to 4 KiB
#: and have m+1 copies: 4 KiB writes with m = 2 take ~6x their bytes).
SPACE_FACTOR = 8
#: Chunks folded per look when the segments take too much space.
PINNING_FOLDS = 4
#: Seconds between looks at what to fold when nothing wakes the task.
FOLD_POLL = 1.0
#: Folds yield to foreground requests like garbage (see ecfs.data.garbage).
IDLE_GAP = 0.05
PATIENCE = 2.0
#: The metadata counter that hands out record numbers.
SEQ_COUNTER = "log"


_PLACE = struct.Struct("<qqqqq")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")


def legacy_checksum(
    inode: int, idx: int, chunk_id: int, seq: int, offset: int, data: bytes
) -> int:
    """The `write_log.checksum` of a record of the schema-2 table (records
    logged before the log moved to files): xxh3_64 of its place and bytes,
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


@dataclass(eq=False, slots=True)
class _Live:
    """A live record: its content and where its copies are."""

    record: Record
    places: list[Place]


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
    segments: int  # log segment files on the stores (in use or free)
    space_bytes: int  # their size
    disk_bytes_written: int  # record copies written, with headers and padding
    copies_missing: int  # live records with fewer than m+1 copies on usable stores
    copies_made: int  # copies re-created since mount (a log store lost)


class WriteLog:
    """The index of logged ranges, and the fold policy."""

    def __init__(
        self,
        db: Database,
        chunk_size: int,
        *,
        files: LogFiles | None = None,
        wait_durable: Callable[[int], Awaitable[None]] | None = None,
        limit: int = LOG_LIMIT,
        fold_idle: float = FOLD_IDLE,
        clock: Callable[[], float] = time.monotonic,
        gate: BackgroundGate | None = None,
    ) -> None:
        self.db = db
        #: The volume's pause switch (the fold task only; see the module docstring).
        self.gate = gate if gate is not None else BackgroundGate()
        self.table = WriteLogTable(db)
        self.files = files
        self.wait_durable = wait_durable
        self.chunk_size = chunk_size
        #: Largest patch a flush logs (bigger ones re-encode the chunk); 0
        #: when the stores cannot hold m+1 copies (`LogFiles.enabled`).
        self.log_max = chunk_size // LOG_FRACTION if files is None or files.enabled else 0
        self.fold_budget = chunk_size // FOLD_FRACTION
        self.limit = limit
        self.fold_idle = fold_idle
        self.clock = clock
        self._chunks: dict[tuple[int, int], LoggedChunk] = {}
        self._by_inode: dict[int, set[int]] = {}
        self._live: dict[int, _Live] = {}
        #: Drops of the transaction in progress: (generation, key, entry),
        #: put back if it rolls back.
        self._undo: list[tuple[int, tuple[int, int], LoggedChunk]] = []
        #: Records read from the schema-2 table at mount, to move to files.
        self._legacy: list[int] = []
        self.total = 0
        self.records = 0
        self._records_written = 0
        self._bytes_written = 0
        self._copies_made = 0
        self.folds = 0
        self.forced_folds = 0
        self._wakeup = trio.Event()
        #: Per inode, the newest live record found at mount (for its times).
        self.recovered: dict[int, Record] = {}
        db.on_rollback.append(self._rolled_back)

    # -- index -----------------------------------------------------------------

    def load(
        self,
        current_chunk: Callable[[int, int], int],
        stores: Mapping[int, Store],
    ) -> list[str]:
        """Build the index at mount: every record copy on `stores` that
        verifies, and the rows of the schema-2 table, deduplicated by seq;
        a record is live if `current_chunk(inode, idx)` (the chunk id of
        that chunk now, 0 for none) is the version it was logged over.
        Returns problems to report (records never applied)."""
        problems: list[str] = []
        self._chunks.clear()
        self._by_inode.clear()
        self._live.clear()
        self.total = self.records = 0
        largest = 0
        found: dict[int, _Live] = {}
        segments: dict[int, list[int]] = {}
        sizes: dict[tuple[int, int], int] = {}
        if self.files is not None:
            result = LogFiles.scan(stores, self.files.key)
            segments, sizes = result.segments, result.sizes
            if result.bad_blocks:
                problems.append(
                    f"{result.bad_blocks} small-write log blocks are torn or damaged copies:"
                    " never applied"
                )
            for index, why in result.unreadable.items():
                problems.append(f"store {index}: small-write log unreadable: {why}")
            for store, segment, pos, record in result.copies:
                largest = max(largest, record.seq)
                live = found.get(record.seq)
                if live is None:
                    found[record.seq] = _Live(record, [(store, segment, pos)])
                elif store not in {p[0] for p in live.places}:
                    live.places.append((store, segment, pos))
        for seq, inode, idx, chunk_id, offset, _length, _checksum in self.table.heads():
            largest = max(largest, seq)
            if seq in found:
                continue
            (checksum, data) = self.table.data([seq]).get(seq, (0, b""))
            if not data or checksum != legacy_checksum(inode, idx, chunk_id, seq, offset, data):
                problems.append(f"log record {seq} of inode {inode} fails its checksum: ignored")
                continue
            record = Record(seq, inode, idx, chunk_id, offset, data, -1, 0)
            found[seq] = _Live(record, [])
            self._legacy.append(seq)
        now = self.clock()
        live_places: list[Place] = []
        for seq in sorted(found):
            entry = found[seq]
            r = entry.record
            if current_chunk(r.inode, r.idx) != r.chunk_id:
                continue  # folded, rewritten or removed since: dead
            self._live[seq] = entry
            live_places.extend(entry.places)
            self._add(r.inode, r.idx, r.chunk_id, seq, r.offset, len(r.data), now)
            newest = self.recovered.get(r.inode)
            if r.size >= 0 and (newest is None or newest.seq < seq):
                self.recovered[r.inode] = r
        if self.files is not None:
            self.files.adopt(segments, live_places, sizes)
        self._ensure_counter(largest)
        return problems

    def _ensure_counter(self, largest: int) -> None:
        """The record-number counter (made by mkfs; added to an older
        volume's counters by its first mount that logs to files): above
        every seq ever seen."""
        self.db.ensure_counter(SEQ_COUNTER, largest + 1)

    def _rolled_back(self) -> None:
        """Put back what the rolled-back transaction dropped."""
        generation = self.db.generation
        self._settle()
        for _, key, entry in self._undo:
            if key in self._chunks:  # cannot happen: drops happen under the chunk lock
                continue
            self._chunks[key] = entry
            self._by_inode.setdefault(key[0], set()).add(key[1])
            self.total += entry.logged
            self.records += len(entry.records)
            if self.files is not None:
                for seq, _, _ in entry.records:
                    live = self._live.get(seq)
                    if live is not None:
                        self.files.retain(live.places)
        assert all(u[0] == generation for u in self._undo)
        self._undo = []

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

    async def append(
        self,
        inode: int,
        idx: int,
        chunk_id: int,
        pieces: list[tuple[int, bytes]],
        *,
        size: int,
        mtime_ns: int,
    ) -> None:
        """Make `pieces` ((offset, data) in chunk `idx` of `inode`, over
        version `chunk_id`) durable as records carrying the file's size and
        mtime after them: first everything committed so far is made durable
        (the version they apply over above all), then m+1 copies are written.
        Outside any transaction; the caller holds the chunk's lock."""
        entry = self._chunks.get((inode, idx))
        if entry is not None and entry.chunk_id != chunk_id:
            raise AssertionError(f"log of inode {inode} chunk {idx} is over another version")
        if self.files is None or self.wait_durable is None:
            raise AssertionError("the write log has no files to write to")
        records = []
        for offset, data in pieces:
            seq, _ = self.db.next_id_reserved(SEQ_COUNTER)
            records.append(Record(seq, inode, idx, chunk_id, offset, bytes(data), size, mtime_ns))
        await self.wait_durable(self.db.generation)
        placed = await self.files.write(records)
        now = self.clock()
        for record in records:
            self._live[record.seq] = _Live(record, placed[record.seq])
            self._add(inode, idx, chunk_id, record.seq, record.offset, len(record.data), now)
            self._records_written += 1
            self._bytes_written += len(record.data)
        if any(len(p) < self.files.copies for p in placed.values()):
            self._wakeup.set()  # the fold task re-creates the missing copies
        if self.logged(inode, idx) >= self.fold_budget or self.over_limit:
            self._wakeup.set()

    def overlay(self, inode: int, idx: int, start: int, stop: int) -> list[tuple[int, bytes]]:
        """The logged pieces of chunk bytes [start, stop), oldest first
        (from memory: their copies were verified when written or loaded)."""
        entry = self._chunks.get((inode, idx))
        if entry is None:
            return []
        return [
            (offset, self._live[seq].record.data)
            for seq, offset, length in entry.records
            if offset < stop and offset + length > start
        ]

    def drop(self, inode: int, idx: int) -> None:
        """Forget the records of one chunk: its version is being replaced or
        removed by the caller's transaction, which makes them dead (their
        segments are reused once it is durable; put back if it rolls back)."""
        entry = self._forget(inode, idx)
        if entry is None:
            return
        in_txn = self.db.in_transaction
        generation = self.db.generation + (1 if in_txn else 0)
        if in_txn:
            self._settle()
            self._undo.append((self.db.generation, (inode, idx), entry))
        for seq, _, _ in entry.records:
            live = self._live.get(seq)
            if live is not None and self.files is not None:
                self.files.release(live.places, generation)
        if not in_txn:
            self._purge(entry)

    def _purge(self, entry: LoggedChunk) -> None:
        for seq, _, _ in entry.records:
            self._live.pop(seq, None)

    def _forget(self, inode: int, idx: int) -> LoggedChunk | None:
        """Remove a chunk from the index."""
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
        """Forget the records of chunks idx >= first of `inode`."""
        for idx in sorted(i for i in self._by_inode.get(inode, ()) if i >= first):
            self.drop(inode, idx)

    def _settle(self) -> None:
        """Forget the data of records whose drop committed."""
        generation = self.db.generation
        for tagged, _, entry in self._undo:
            if tagged < generation:
                self._purge(entry)
        self._undo = [u for u in self._undo if u[0] >= generation]

    # -- copies ----------------------------------------------------------------

    def copies_missing(self) -> list[_Live]:
        """Live records with fewer than m+1 copies on usable stores."""
        if self.files is None:
            return []
        usable = set(self.files.usable())
        want = self.files.copies
        return [
            live
            for live in self._live.values()
            if sum(1 for p in live.places if p[0] in usable) < min(want, len(usable))
        ]

    async def repair_copies(self) -> int:
        """Write new copies of live records that lost some (a log store
        failed or left; records moved from the schema-2 table). Returns
        the copies made."""
        self._settle()
        if self.files is None:
            return 0
        short = [
            live for live in self.copies_missing() if self._is_live(live.record)
        ]
        if not short:
            return await self._finish_legacy()
        usable = set(self.files.usable())
        made = 0
        by_need: dict[int, list[_Live]] = {}
        for live in short:
            have = [p for p in live.places if p[0] in usable]
            need = min(self.files.copies, len(usable)) - len(have)
            if need > 0:
                by_need.setdefault(need, []).append(live)
        for need, group in by_need.items():
            exclude = {live.record.seq: {p[0] for p in live.places} for live in group}
            placed = await self.files.write([live.record for live in group], exclude, want=need)
            for live in group:
                new = placed.get(live.record.seq, [])
                if self._is_live(live.record):
                    live.places.extend(new)
                elif self.files is not None:
                    self.files.release(new, self.db.generation)
                made += len(new)
        self._copies_made += made
        await self._finish_legacy()
        return made

    async def verify_copies(self) -> int:
        """Scrub: read every copy of every live record back; a copy that no
        longer verifies is forgotten and a new one written elsewhere.
        Returns the damaged copies found."""
        if self.files is None:
            return 0
        damaged = 0
        for live in list(self._live.values()):
            for place in list(live.places):
                if not self._is_live(live.record):
                    break
                if await self.files.verify(place, live.record) is False:
                    log.warning(
                        "store %d: small-write log record %d: damaged copy (re-created)",
                        place[0],
                        live.record.seq,
                    )
                    damaged += 1
                    if place in live.places:
                        live.places.remove(place)
                        self.files.release([place], self.db.generation)
        if damaged:
            await self.repair_copies()
        return damaged

    def _is_live(self, record: Record) -> bool:
        return record.seq in self._live and (record.inode, record.idx) in self._chunks

    async def _finish_legacy(self) -> int:
        """Delete the schema-2 table's rows once their records have copies
        on the stores (or are dead)."""
        if not self._legacy or self.files is None:
            return 0
        enough = min(self.files.copies, len(self.files.usable()))
        done = [
            seq
            for seq in self._legacy
            if seq not in self._live or len(self._live[seq].places) >= max(1, enough)
        ]
        if not done:
            return 0
        if self.wait_durable is not None:
            await self.wait_durable(self.db.generation)
        with self.db.transaction():
            self.table.delete(done)
        self._legacy = [seq for seq in self._legacy if seq not in set(done)]
        return 0

    # -- folding ---------------------------------------------------------------

    def statistics(self) -> WriteLogStatistics:
        segments, space = self.files.space() if self.files is not None else (0, 0)
        return WriteLogStatistics(
            records=self.records,
            bytes=self.total,
            chunks=len(self._chunks),
            records_written=self._records_written,
            bytes_written=self._bytes_written,
            folds=self.folds,
            forced_folds=self.forced_folds,
            limit=self.limit,
            segments=segments,
            space_bytes=space,
            disk_bytes_written=self.files.bytes_written if self.files is not None else 0,
            copies_missing=len(self.copies_missing()),
            copies_made=self._copies_made,
        )

    def poke(self) -> None:
        """Wake the fold task (e.g. after background work was resumed)."""
        self._wakeup.set()

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
        return over + idle + self._pinning()

    def _space_over(self) -> bool:
        """Whether the segments take more than SPACE_FACTOR x limit on the stores."""
        return self.files is not None and self.files.space()[1] > SPACE_FACTOR * self.limit

    def _pinning(self) -> list[tuple[int, int]]:
        """When the segments take more than SPACE_FACTOR x limit on the
        stores (a few records can keep whole segments from being reused):
        the chunks with the oldest records, which hold the oldest segments."""
        if not self._space_over():
            return []
        oldest = sorted(self._chunks, key=lambda k: self._chunks[k].records[0][0])
        return oldest[:PINNING_FOLDS]

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

    async def upkeep(self, keep: int | None = None) -> None:
        """Re-create lost copies, reuse or delete free segments (`keep`:
        how many free ones a store keeps; 0 at unmount)."""
        try:
            await self.repair_copies()
        except EcfsError as exc:
            log.warning("small-write log: re-creating copies failed: %s", exc)
        if self.files is not None:
            if keep is None:
                await self.files.trim()
            else:
                await self.files.trim(keep)

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
            if self.gate.paused:
                if self.files is not None and self._space_over():
                    await self.files.trim()  # free segments count too
                due = self._pinning()  # only what bounds the segments' space
            else:
                await self.upkeep()
                due = self._due()
            for key in due:
                if self.gate.paused and not self._space_over():
                    break  # paused meanwhile: the rest waits for the resume
                if not self.has(*key):
                    continue
                if not self.over_limit:
                    await wait_until_idle(last_foreground, IDLE_GAP, PATIENCE)
                    if not self.has(*key):
                        continue
                await self._fold(fold, key, forced=False)
