"""The small-write log on the stores: record format, segments, copies.

`ecfs.data.smallwrites` decides what to log and when to fold; this module makes
records durable: each record is written as m+1 copies on distinct stores,
into preallocated segment files (``<store>/wlog/<n>``, see
`ecfs.storage.store.Store.create_log_segment`), with one pwrite and one
fdatasync per store per append, the stores in parallel.

Record format (little-endian, `_HEAD`, then the data; the records of one
append follow each other and the append is padded with zeros to a
multiple of BLOCK, so an append starts on a BLOCK boundary)::

    magic     8 bytes  b"ECFSWLG1"
    seq       u64      the record's number (newer wins; never reused: the
                       metadata counter "log" hands them out in durable blocks)
    inode     u64
    idx       u64      chunk number within the file
    chunk_id  u64      the chunk version the record applies over
    offset    u64      where the data starts inside the chunk
    length    u64      data bytes (> 0)
    size      i64      the file size right after the write
    mtime_ns  i64      the file's mtime (= ctime) right after the write
    checksum  u64      xxh3_64 of the volume id, the header up to here, and
                       the data: a torn or damaged copy, or bytes of another
                       volume, never verify

A segment is scanned from its start: where the magic is and the record
verifies, that is a record and the scan goes on right after it (the next
record of the append, or its padding); where there is no magic, the scan
goes on at the next BLOCK boundary (the next append); a record that does
not verify is skipped (to the end it claims when a record starts there,
else to the next BLOCK boundary). Segments are reused once none of their records is live
any more (see `LogFiles.release`); the old records left in them verify but
are dead for good, since liveness is decided by the metadata (see
`ecfs.data.smallwrites`), which never makes a dead record live again.

Which stores: the m+1 copies of a record go to distinct failure domains
while the usable stores span enough of them (`LogFiles.write`), else as
evenly as they allow; only stores that hold log segments
(`ecfs.storage.store.Store.holds_log_segments`; `log_stores`). An object
store (`ecfs.storage.s3store.S3Store`) holds none: preallocated segments
overwritten in place do not map onto immutable objects. A volume whose
present stores include fewer than m+1 that hold segments (all-S3, or a
mixed one with fewer than m+1 local stores, or with local stores missing)
keeps no log at all (`LogFiles.enabled` is False): its small overwrites
are whole-chunk writes (`ecfs.data.smallwrites.WriteLog.log_max` is 0).
Design choice: that fallback rather than records as immutable objects (one
PUT per record copy, a DELETE when it dies): on an object store a record
would cost a PUT per copy and a listing at mount, to save a re-encode
whose fragments are PUTs too, and it would need a second format and
liveness bookkeeping for the same guarantee. A chunk write is already
correct, crash-safe and repaired like any other.

Segments are SEGMENT_SIZE bytes (8 MiB); an append larger than that gets
a segment of its own size. An append takes its bytes of the store's
current segment before its first await and counts as live there until it
failed, so a segment is never reused or deleted under a write.

Owns: the record format, which stores hold copies of which record, the
segments in use and free on each store. Must not: decide liveness (the
caller says which records are live), speak SQL, or touch a store file
except through the `Store` log-segment methods (through the
store's `StoreRunner.call` when the loop runs).

Concurrency contract: all methods run on the trio thread; the offsets a
write uses are taken before its first await, so concurrent appends never
overlap. Crash contract: a record is durable on a store when `write`
returned for it; a copy cut short by a crash fails its checksum.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from ..core.errors import NoSpace, StoreError
from ..core.fragment import checksum64
from ..storage.domains import spread
from ..storage.offload import StoreRunner
from ..storage.store import Store
from .writer import write_deadline

log = logging.getLogger(__name__)

MAGIC = b"ECFSWLG1"
#: Records start on, and are padded to, multiples of this (a page).
BLOCK = 4096
#: Bytes of one segment file.
SEGMENT_SIZE = 8 << 20
#: Free segments a store keeps for reuse (more are deleted).
KEEP_FREE = 2

_HEAD = struct.Struct("<8sQQQQQQqqQ")
HEADER_SIZE = _HEAD.size
_CHECKED = HEADER_SIZE - 8


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    inode: int
    idx: int
    chunk_id: int
    offset: int
    data: bytes
    size: int
    mtime_ns: int


#: Where one copy of a record is: (store index, segment number, byte offset).
Place = tuple[int, int, int]


def _padded_length(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def encode(record: Record, key: bytes) -> bytes:
    """The record as written: header and data (`padded` rounds an append
    up to BLOCK)."""
    head = _HEAD.pack(
        MAGIC,
        record.seq,
        record.inode,
        record.idx,
        record.chunk_id,
        record.offset,
        len(record.data),
        record.size,
        record.mtime_ns,
        0,
    )[:_CHECKED]
    checksum = checksum64(key + head + record.data)
    return head + struct.pack("<Q", checksum) + record.data


def padded(blob: bytes) -> bytes:
    """`blob` with zeros up to a multiple of BLOCK."""
    return blob + bytes(_padded_length(len(blob)) - len(blob))


def scan(blob: bytes, key: bytes) -> tuple[list[tuple[int, Record]], int]:
    """The records of one segment's bytes, as (offset, record), and how many
    blocks looked like a record start (the magic) but did not verify."""
    found: list[tuple[int, Record]] = []
    bad = 0
    pos = 0
    view = memoryview(blob)
    while pos + HEADER_SIZE <= len(blob):
        if blob[pos : pos + 8] != MAGIC:
            pos = (pos // BLOCK + 1) * BLOCK  # padding: the next append
            continue
        (_, seq, inode, idx, chunk_id, offset, length, size, mtime, checksum) = _HEAD.unpack_from(
            blob, pos
        )
        end = pos + HEADER_SIZE + length
        if length == 0 or end > len(blob):
            bad += 1
            pos = (pos // BLOCK + 1) * BLOCK
            continue
        data = bytes(view[pos + HEADER_SIZE : end])
        if checksum64(key + bytes(view[pos : pos + _CHECKED]) + data) != checksum:
            bad += 1
            # The rest of its append follows if only the data is damaged.
            pos = end if blob[end : end + 8] == MAGIC else (pos // BLOCK + 1) * BLOCK
            continue
        found.append((pos, Record(seq, inode, idx, chunk_id, offset, data, size, mtime)))
        pos = end  # the next record of the same append, or padding
    return found, bad


def log_stores(stores: Mapping[int, Store]) -> dict[int, Store]:
    """The stores of `stores` that hold log segments (the others are
    never written, scanned or counted for copies)."""
    return {i: s for i, s in stores.items() if s.holds_log_segments}


@dataclass(slots=True)
class _StoreLog:
    """The segments of one store."""

    #: segment -> live record copies in it
    live: dict[int, int] = field(default_factory=dict)
    #: segments with no live copy, reusable once `db` durability allows:
    #: segment -> generation that must be durable first
    freed: dict[int, int] = field(default_factory=dict)
    #: segment -> generation after which its released copies are dead
    released: dict[int, int] = field(default_factory=dict)
    #: segments being created: appends into them wait for this
    creating: dict[int, trio.Event] = field(default_factory=dict)
    #: segment -> its size, where it is not SEGMENT_SIZE (an append larger
    #: than a segment gets a segment of its own size)
    sizes: dict[int, int] = field(default_factory=dict)
    current: int | None = None
    position: int = 0
    next_number: int = 1


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What `LogFiles.scan` found on the stores."""

    #: (store, segment, offset, record) of every copy that verifies
    copies: list[tuple[int, int, int, Record]]
    #: store -> segment numbers present
    segments: dict[int, list[int]]
    #: blocks that started like a record and did not verify (torn, damaged)
    bad_blocks: int
    #: stores whose log could not be read: store -> why
    unreadable: dict[int, str]
    #: (store, segment) -> size in bytes
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)


class LogFiles:
    """m+1 copies of each record on distinct stores, in distinct failure
    domains while the usable stores allow it (`ecfs.storage.domains.spread`;
    the stores already holding a record count), so that losing one domain
    never takes every copy of a record."""

    def __init__(
        self,
        runners: Mapping[int, StoreRunner],
        copies: int,
        key: bytes,
        durable_generation: Callable[[], int],
        draining: set[int] | None = None,
        domain: Callable[[int], str] = str,
    ) -> None:
        self.runners = runners
        #: A store's failure domain (`ecfs.storage.domains`; read at each
        #: write, labels may change): a record's copies go to distinct ones.
        self.domain = domain
        #: Stores being emptied for removal (the volume's set, shared): no
        #: new copies go there, and copies there count as missing.
        self.draining = draining if draining is not None else set()
        self.copies = copies
        self.key = key
        self.durable_generation = durable_generation
        self._stores: dict[int, _StoreLog] = {i: _StoreLog() for i in runners}
        self._turn = 0
        self.bytes_written = 0

    @property
    def enabled(self) -> bool:
        """Whether at least `copies` of the stores hold log segments (see the
        module docstring: otherwise nothing is logged)."""
        return len(log_stores({i: r.store for i, r in self.runners.items()})) >= self.copies

    # -- mount -----------------------------------------------------------------

    @staticmethod
    def scan(stores: Mapping[int, Store], key: bytes) -> ScanResult:
        """Blocking (mount, fsck): every record copy that verifies on
        `stores` (those of them that hold log segments)."""
        copies: list[tuple[int, int, int, Record]] = []
        segments: dict[int, list[int]] = {}
        unreadable: dict[int, str] = {}
        sizes: dict[tuple[int, int], int] = {}
        bad = 0
        for index, store in sorted(log_stores(stores).items()):
            try:
                numbers = store.log_segments()
                segments[index] = numbers
                for number in numbers:
                    blob = store.read_log_segment(number)
                    sizes[index, number] = len(blob)
                    found, torn = scan(blob, key)
                    bad += torn
                    copies.extend((index, number, pos, rec) for pos, rec in found)
            except StoreError as exc:
                unreadable[index] = str(exc)
        return ScanResult(copies, segments, bad, unreadable, sizes)

    def adopt(
        self,
        segments: Mapping[int, Sequence[int]],
        live: Sequence[Place],
        sizes: Mapping[tuple[int, int], int] | None = None,
    ) -> None:
        """After `scan`: the segments found, and where the live copies are
        (all other segments are free: their records are dead in the durable
        metadata the mount started from)."""
        for store, numbers in segments.items():
            entry = self._stores.get(store)
            if entry is None:
                continue
            for number in numbers:
                entry.freed[number] = 0
                size = (sizes or {}).get((store, number), SEGMENT_SIZE)
                if size != SEGMENT_SIZE:
                    entry.sizes[number] = size
            entry.next_number = max(numbers, default=0) + 1
        for store, segment, _ in live:
            entry = self._stores.get(store)
            if entry is None:
                continue
            entry.freed.pop(segment, None)
            entry.live[segment] = entry.live.get(segment, 0) + 1

    # -- writing ---------------------------------------------------------------

    def usable(self) -> list[int]:
        """Stores that take copies and whose copies count: available, not
        draining, and holding log segments."""
        return sorted(
            i
            for i, r in self.runners.items()
            if r.available and i not in self.draining and r.store.holds_log_segments
        )

    async def write(
        self, records: Sequence[Record], exclude: dict[int, set[int]] | None = None, *, want: int = 0
    ) -> dict[int, list[Place]]:
        """Write every record to `want` (default: copies) stores, never one
        in exclude[seq] (stores that hold it already). Returns seq -> places
        of the new copies. A store whose write fails is marked failed and
        another one takes its copy; StoreError if no store took a copy."""
        want = want or self.copies
        exclude = exclude or {}
        blobs = [encode(r, self.key) for r in records]
        placed: dict[int, list[Place]] = {r.seq: [] for r in records}
        tried: set[int] = set()
        while True:
            # Stores that need a copy of which records, on one store each.
            candidates = [i for i in self._rotation() if i not in tried]
            jobs: dict[int, list[int]] = {}
            for n, record in enumerate(records):
                missing = want - len(placed[record.seq])
                banned = exclude.get(record.seq, set()) | {p[0] for p in placed[record.seq]}
                free = [store for store in candidates if store not in banned]
                taken = [self.domain(store) for store in banned]
                for store in spread(free, missing, self.domain, taken):
                    jobs.setdefault(store, []).append(n)
            if not jobs:
                break
            tried.update(jobs)
            async with trio.open_nursery() as nursery:
                for store, indices in jobs.items():
                    nursery.start_soon(self._write_one, store, indices, records, blobs, placed)
        if records and all(not placed[r.seq] for r in records):
            raise StoreError("no store could take the small-write log records")
        return placed

    def _rotation(self) -> list[int]:
        stores = self.usable()
        if not stores:
            return []
        self._turn = (self._turn + 1) % len(stores)
        return stores[self._turn :] + stores[: self._turn]

    async def _write_one(
        self,
        store: int,
        indices: list[int],
        records: Sequence[Record],
        blobs: list[bytes],
        placed: dict[int, list[Place]],
    ) -> None:
        data = padded(b"".join(blobs[n] for n in indices))
        runner = self.runners[store]
        segment, offset, fresh = self._allocate(store, len(data))
        size = self._stores[store].sizes.get(segment, SEGMENT_SIZE)
        entry = self._stores[store]
        # Counted live from now: the segment is never freed under the write.
        entry.live[segment] = entry.live.get(segment, 0) + len(indices)
        exists = not fresh
        try:
            # A hung store costs seconds, not the runner's whole timeout: the
            # copy then goes to another store (as fragments do, see writer).
            deadline = write_deadline(runner)
            if fresh:
                entry.creating[segment] = created = trio.Event()
                try:
                    await runner.call(
                        runner.store.create_log_segment, segment, size, timeout=deadline
                    )
                    exists = True
                finally:
                    del entry.creating[segment]
                    created.set()
            else:
                creating = entry.creating.get(segment)
                if creating is not None:
                    await creating.wait()
            await runner.call(
                runner.store.write_log_segment,
                segment,
                offset,
                data,
                timeout=deadline,
                nbytes_written=len(data),
            )
        except StoreError as exc:
            log.warning("store %d: small-write log write failed: %s", store, exc)
            if not isinstance(exc, NoSpace):  # a full store is still healthy
                runner.mark_failed(f"small-write log write failed: {exc}")
            self._forget_segment(store, segment)
            if exists:
                self.release([(store, segment, offset)] * len(indices), 0)
            else:  # never created: not a segment to reuse
                entry.live.pop(segment, None)
            return
        self.bytes_written += len(data)
        pos = offset
        for n in indices:
            placed[records[n].seq].append((store, segment, pos))
            pos += len(blobs[n])

    def _allocate(self, store: int, length: int) -> tuple[int, int, bool]:
        """(segment, offset, whether the segment must be created first) for
        `length` bytes on `store` (taken now: no other append gets them)."""
        entry = self._stores.setdefault(store, _StoreLog())
        current = entry.current
        if current is None or entry.position + length > entry.sizes.get(current, SEGMENT_SIZE):
            if current is not None and not entry.live.get(current):
                self._free(store, current)
            current, fresh = self._take_segment(entry, length)
            entry.current = current
            entry.position = 0
            entry.live.setdefault(current, 0)
        else:
            fresh = False
        offset = entry.position
        entry.position += length
        return current, offset, fresh

    def _take_segment(self, entry: _StoreLog, length: int) -> tuple[int, bool]:
        """A free segment with room for `length` bytes, or a new one."""
        durable = self.durable_generation()
        for number, generation in sorted(entry.freed.items()):
            if generation <= durable and entry.sizes.get(number, SEGMENT_SIZE) >= length:
                del entry.freed[number]
                return number, False
        number = entry.next_number
        entry.next_number += 1
        if length > SEGMENT_SIZE:
            entry.sizes[number] = length
        return number, True

    def _forget_segment(self, store: int, segment: int) -> None:
        """After a failed write: do not write into that segment again."""
        entry = self._stores[store]
        if entry.current == segment:
            entry.current = None

    async def verify(self, place: Place, record: Record) -> bool | None:
        """Whether the copy at `place` still holds `record` (None: its
        store could not be read, which is not damage)."""
        store, segment, offset = place
        runner = self.runners.get(store)
        if runner is None or not runner.available:
            return None
        length = _padded_length(HEADER_SIZE + len(record.data))
        try:
            blob = await runner.call(
                runner.store.read_log_range, segment, offset, length, nbytes_read=length
            )
        except StoreError:
            return None
        found, _ = scan(blob, self.key)
        return bool(found) and found[0] == (0, record)

    # -- releasing -----------------------------------------------------------------

    def release(self, places: Sequence[Place], generation: int) -> None:
        """The copies at `places` are dead once `generation` is durable."""
        for store, segment, _ in places:
            entry = self._stores.get(store)
            if entry is None:
                continue
            count = entry.live.get(segment, 0) - 1
            entry.live[segment] = count
            entry.released[segment] = max(entry.released.get(segment, 0), generation)
            if count <= 0 and entry.current != segment:
                self._free(store, segment)

    def retain(self, places: Sequence[Place]) -> None:
        """Undo `release` (a rolled-back transaction)."""
        for store, segment, _ in places:
            entry = self._stores.get(store)
            if entry is None:
                continue
            entry.freed.pop(segment, None)
            entry.live[segment] = entry.live.get(segment, 0) + 1

    def _free(self, store: int, segment: int) -> None:
        entry = self._stores[store]
        entry.live.pop(segment, None)
        generation = entry.released.pop(segment, 0)
        entry.freed[segment] = max(generation, entry.freed.get(segment, 0))

    async def trim(self, keep: int = KEEP_FREE) -> None:
        """Delete free segments beyond `keep` per store (every free one and
        an unused current one with keep=0, at unmount)."""
        durable = self.durable_generation()
        for store, entry in self._stores.items():
            runner = self.runners.get(store)
            if runner is None or not runner.available:
                continue
            if keep == 0 and entry.current is not None and not entry.live.get(entry.current):
                self._free(store, entry.current)
                entry.current = None
            ready = sorted(n for n, g in entry.freed.items() if g <= durable)
            for number in ready[keep:] if keep else ready:
                generation = entry.freed.pop(number, None)  # no append takes it now
                if generation is None:
                    continue  # taken by an append meanwhile
                try:
                    await runner.call(runner.store.delete_log_segment, number)
                except StoreError as exc:
                    log.info("store %d: cannot delete log segment %d: %s", store, number, exc)
                    entry.freed[number] = generation
                    continue
                entry.sizes.pop(number, None)

    def space(self) -> tuple[int, int]:
        """(segments, bytes) on the stores, in use or free."""
        count = space = 0
        for entry in self._stores.values():
            for number in (*entry.live, *entry.freed):
                count += 1
                space += entry.sizes.get(number, SEGMENT_SIZE)
        return count, space

    def live_segments(self) -> Iterator[tuple[int, int]]:
        for store, entry in self._stores.items():
            for segment, count in entry.live.items():
                if count > 0:
                    yield store, segment
