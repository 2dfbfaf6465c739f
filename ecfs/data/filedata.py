"""File contents: write buffers, chunk maps, inline small files, truncate,
flush and fsync.

Owns: the per-inode write buffers (whole chunks, copy-on-write: a dirty
chunk is written as a NEW chunk version and the metadata switches to it in
one transaction), the choice between inline and chunked storage, and when
data is written back. Must not: speak SQL (see metadb), touch stores
directly (see reader/writer), or know pyfuse3.

Concurrency contract (trio; awaits are the only switch points):
* `FileState.lock(idx)` serialises everything that reads-modifies-writes
  or writes back chunk `idx` of one inode: a write that must load the chunk,
  the write-back of the chunk (held from taking the buffer until the commit,
  so commits of one chunk are in order), truncate (takes the locks of every
  chunk it cuts, in ascending order: no deadlock, since nothing else holds
  two chunk locks).
* A buffer being written back stays visible to readers in `flushing`.
* A metadata transaction never spans an await.

Crash contract: written fragments are committed by one transaction per
chunk (old or new version, never a mix); the replaced version is deleted
only after the commit is durable (see garbage). Log records are durable
when `WriteLog.append` returns (written after everything committed before
them is durable); a fold commits the new version, which is what makes the
records dead, in one transaction. Unflushed buffers and patches are
lost on a crash, as in any filesystem: fsync() is the promise.

Small files: a file whose size is at most `inline_max` is stored as one
blob in its inode row (no fragments); it moves to chunks when it grows.
A chunk whose bytes are all zero is not stored (a hole).

Small writes (see `ecfs.data.smallwrites`): a write of a few KiB into a stored
chunk that has no buffer is kept as a patch (`FileState.patches`) without
reading the chunk; flush/fsync logs the patch as records over the chunk's
version (carrying the inode's size and mtime: an fsync that changed
nothing else commits no metadata, see `_covered_by_log`), unless it grew
past `WriteLog.log_max` (then it becomes a whole-chunk buffer, built by
`_load`). Invariants: a chunk has a patch or a buffer, never both; a
buffer holds the chunk's records (`_load` lays them over it), so writing
a buffer back drops them in the transaction that switches versions;
`fold_chunk` is that write-back for a chunk with records and no buffer.
Reads lay records and patches over the stored bytes, captured with the
chunk ref before any await. Truncate drops the records of removed chunks
and writes the kept one back with the truncate when it has records or
its stored version holds bytes past the new size (see `truncate`); free
drops them all.

Holes and fallocate (`FileData.fallocate`): preallocation writes nothing
(there is nothing to reserve in a copy-on-write store) but checks the free
space. Punching or zeroing a range removes every chunk it covers whole
(buffer, patch, records, inline data and chunk row in one transaction,
under the chunks' locks in ascending order as truncate; the fragments go
through garbage) and writes zeros over the partial ends through `write`,
so they become patches and then log records newer than the ones they hide:
no record of a punched range can reappear, also after a crash. st_blocks
(`allocated_blocks`) counts the stored bytes, from a per-inode cache that
every change of an inode's chunks drops.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from ..core.errors import EcfsError, FsError, Unrecoverable
from ..core.geometry import ChunkSpan, FragmentPiece, Layout
from ..core.model import NO_STORE, ChunkRef, repair_priority
from ..core.tasks import gather_in_order, open_fan_out
from ..storage.metadb.chunks import ChunkTable, RepairQueue
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.schema import ROOT_INODE
from .garbage import ChunkPins, Garbage
from .namespace import Inode, Namespace, check_file_size
from .reader import ChunkReader
from .smallwrites import Extents, WriteLog, lay_over
from .writer import ChunkWriter

log = logging.getLogger(__name__)

#: Seconds a deferred attribute change (see `Namespace.setattr`) of an
#: inode with no buffered data may stay in the cache only. The replicator
#: batches for COMMIT_INTERVAL (1 s) on top, so without fsync a change is on
#: the replicas within ~1.2 s.
ATTRIBUTE_WRITEBACK_INTERVAL = 0.2

#: How many chunks ahead of a sequential reader are prefetched.
PREFETCH_CHUNKS = 16

#: A write of at least chunk_size / this many bytes into a chunk with no
#: buffer yet gets a whole-chunk buffer at once (see `FileData.write`).
PREALLOCATE_FRACTION = 8

#: fallocate(2) mode flags (linux/falloc.h; Python's os module has none).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: The modes `FileData.fallocate` implements; any other flag (COLLAPSE_RANGE,
#: INSERT_RANGE, UNSHARE_RANGE, ...) is EOPNOTSUPP.
FALLOC_SUPPORTED = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

#: Inodes whose stored bytes `FileData.allocated_blocks` remembers before
#: it starts over (one SQL sum per large file and change, then none).
ALLOCATION_CACHE_MAX = 1 << 16


@dataclass(frozen=True, slots=True)
class _SlowSpan:
    """Part of a read the page cache could not serve: `missing` pieces of
    chunk `ref` (span `span` of inode `ino`) still to be read into `dest`."""

    ino: int
    span: ChunkSpan
    ref: ChunkRef
    missing: list[FragmentPiece]
    dest: memoryview
    #: Whether the request continues a stream (see `FileData.read`).
    stream: bool


@dataclass(eq=False)
class FileState:
    """Data state of one inode that is open or has unwritten data."""

    ino: int
    opens: int = 0
    dirty: dict[int, bytearray] = field(default_factory=dict)
    flushing: dict[int, bytearray] = field(default_factory=dict)
    #: Small writes over a stored chunk with no buffer, kept without reading
    #: the chunk (see `FileData.write`); never both a patch and a buffer.
    patches: dict[int, Extents] = field(default_factory=dict)
    locks: dict[int, trio.Lock] = field(default_factory=dict)
    #: Ranges of a dirty buffer that were zero-filled to reach a later
    #: write and not written since. Concurrent FUSE writes arrive out of
    #: order: a chunk's tail often comes before its head, and a buffer is
    #: only complete (worth writing back at once) with no gap left;
    #: writing it back earlier would commit zeros and make the head's
    #: write re-read and re-encode the whole chunk.
    gaps: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: EcfsError | None = None
    #: The mtime (= ctime) that the newest log record of this inode carries
    #: (see `FileData._covered_by_log`).
    logged_mtime: int | None = None
    #: Where the last read ended (sequential detection) and the highest
    #: chunk index already prefetched.
    next_read: int = -1
    prefetched: int = -1

    def lock(self, idx: int) -> trio.Lock:
        lock = self.locks.get(idx)
        if lock is None:
            lock = self.locks[idx] = trio.Lock()
        return lock

    def note_gap(self, idx: int, start: int, end: int) -> None:
        self.gaps.setdefault(idx, []).append((start, end))

    def note_written(self, idx: int, start: int, end: int) -> None:
        """Bytes [start, end) of chunk idx's buffer now hold data (or no
        longer exist, after a truncate): they are no gap."""
        gaps = self.gaps.get(idx)
        if not gaps:
            return
        left = []
        for a, b in gaps:
            if a < start:
                left.append((a, min(b, start)))
            if b > end:
                left.append((max(a, end), b))
        if left:
            self.gaps[idx] = left
        else:
            del self.gaps[idx]

    def complete(self, idx: int, chunk_size: int) -> bool:
        """Whether chunk idx's dirty buffer is whole: full length, no gap."""
        buf = self.dirty.get(idx)
        return buf is not None and len(buf) == chunk_size and idx not in self.gaps

    def has_data(self) -> bool:
        return bool(self.dirty or self.flushing or self.patches)

    def buffered(self, idx: int) -> bytearray | None:
        buf = self.dirty.get(idx)
        return self.flushing.get(idx) if buf is None else buf

    @property
    def idle(self) -> bool:
        return (
            self.opens == 0
            and not self.dirty
            and not self.flushing
            and not self.patches
            and not any(lock.locked() for lock in self.locks.values())
        )


class FileData:
    """Reads and writes file contents by inode number."""

    #: Called once per lost chunk a read found: (chunk id, inode, chunk
    #: index, length, "read", why); the volume turns it into an event.
    on_unrecoverable: Callable[[int, int, int, int, str, str], None] | None = None

    def __init__(
        self,
        layout: Layout,
        db: Database,
        namespace: Namespace,
        reader: ChunkReader,
        writer: ChunkWriter,
        garbage: Garbage,
        pins: ChunkPins,
        wait_durable: Callable[[int], Awaitable[None]],
        *,
        inline_max: int,
        writelog: WriteLog | None = None,
        dirty_limit: int = 256 << 20,
        background_flushes: int = 8,
        clock_ns: Callable[[], int] = time.time_ns,
        free_space: Callable[[], int] | None = None,
    ) -> None:
        self.layout = layout
        self.db = db
        self.namespace = namespace
        self.chunks = ChunkTable(db)
        self.repairs = RepairQueue(db)
        self.reader = reader
        self.writer = writer
        self.garbage = garbage
        self.pins = pins
        self.wait_durable = wait_durable
        self.inline_max = min(inline_max, layout.chunk_size)
        self.dirty_limit = dirty_limit
        self.clock_ns = clock_ns
        #: Usable free bytes of the volume (fallocate's ENOSPC), if known.
        self.free_space = free_space
        self.dirty_bytes = 0
        self.inodes = InodeTable(db)
        self.log = writelog if writelog is not None else WriteLog(db, layout.chunk_size)
        self._reported_lost: set[tuple[int, int]] = set()
        #: Stored bytes (chunks + inline) by inode, see `allocated_blocks`.
        self._allocated: dict[int, int] = {}
        db.on_rollback.append(self._allocated.clear)
        #: time.monotonic() of the last read or write (foreground activity,
        #: which background repair yields to).
        self.last_activity = 0.0
        #: The coding of new chunks of a file: (k', m') of its redundancy
        #: policy, None for the volume's (`ecfs.data.policy.Policies.coding_of`).
        self.coding_of: Callable[[int], tuple[int, int] | None] = lambda ino: None
        self._states: dict[int, FileState] = {}
        self._background = trio.Semaphore(background_flushes)
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the service the nursery its background write-backs run in."""
        self._nursery = nursery

    # -- open / close --------------------------------------------------------

    def opened(self, ino: int) -> None:
        self._state(ino).opens += 1

    def is_open(self, ino: int) -> bool:
        state = self._states.get(ino)
        return state is not None and state.opens > 0

    async def released(self, ino: int) -> None:
        """Last step of a close: write back what is left, drop the state."""
        state = self._states.get(ino)
        if state is None:
            return
        state.opens -= 1
        if state.opens == 0:
            try:
                await self.flush(ino)
            except EcfsError as exc:
                log.error("inode %d: write-back at close failed: %s", ino, exc)
            self._forget_state_if_idle(ino)

    def allocated_blocks(self, node: Inode) -> int:
        """st_blocks of a regular file: its stored data bytes (chunk
        lengths + inline data; parity not counted) in 512-byte units, so
        holes (sparse files, punched chunks) are not counted. A file of at
        most `inline_max` bytes or with buffered data counts its size (no
        SQL for small files; never 0 for data not written back yet)."""
        by_size = -(-node.size // 512)
        if node.size <= self.inline_max or self._has_buffers(node.id):
            return by_size
        stored = self._allocated.get(node.id)
        if stored is None:
            if len(self._allocated) >= ALLOCATION_CACHE_MAX:
                self._allocated.clear()
            inline = self.namespace.inline_data(node.id)
            stored = self.chunks.stored_bytes_of(node.id) + len(inline or b"")
            self._allocated[node.id] = stored
        return min(by_size, -(-stored // 512))

    # -- read ----------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytearray | memoryview:
        """File bytes [offset, offset+size), clipped at the file size.

        Built in one buffer: buffered (dirty) bytes and inline data are
        copied in, holes are left zero, and stored chunks are read straight
        into it, first from the page cache on the loop (`read_cached`, no
        task, no thread) and only what that left in worker threads. A
        range that a degraded read keeps whole (`_read_kept`) is returned
        as a read-only view of those bytes instead, not copied."""
        self.last_activity = time.monotonic()
        file_size = self.namespace.get(ino).size
        end = min(offset + size, file_size)
        if offset >= end:
            return bytearray()
        state = self._states.get(ino)
        # (a stream's request, for decoding ahead: `ChunkReader.read_cached`)
        stream = state is None or offset in (0, state.next_read)
        if state is not None:
            self._maybe_prefetch(ino, state, offset, end, file_size)
        spans = self.layout.chunk_spans(offset, end - offset)
        if len(spans) == 1 and self.reader.keeps_bytes:
            kept = self._read_kept(ino, state, spans[0], stream)
            if kept is not None:
                return kept
        out = bytearray(end - offset)
        view = memoryview(out)
        slow: list[_SlowSpan] = []
        overlays: list[tuple[memoryview, int, list[tuple[int, bytes]]]] = []
        pos = 0
        try:
            for span in spans:
                dest = view[pos : pos + span.end - span.start]
                pos += span.end - span.start
                # Captured with the chunk ref, before any await (see smallwrites).
                pieces = self._overlay(ino, state, span)
                if pieces:
                    overlays.append((dest, span.start, pieces))
                job = self._read_span_cached(ino, state, span, dest, stream)
                if job is not None:
                    self.pins.pin(job.ref.chunk_id)
                    slow.append(job)
            if slow:
                await gather_in_order([functools.partial(self._finish_span, job) for job in slow])
        finally:
            for job in slow:
                self.pins.unpin(job.ref.chunk_id)
        for dest, start, pieces in overlays:
            lay_over(dest, start, pieces)
        return out

    def _read_kept(
        self, ino: int, state: FileState | None, span: ChunkSpan, stream: bool
    ) -> memoryview | None:
        """The bytes of `span` (a request's only one) as a view of a
        degraded read's kept bytes (`ChunkReader.read_kept`: not copied)
        when nothing is buffered, logged or patched over them; None if
        not."""
        if state is not None and (
            state.buffered(span.chunk_index) is not None or span.chunk_index in state.patches
        ):
            return None
        ref = self.chunks.get(ino, span.chunk_index)
        if ref is None or span.end > ref.length or self.log.has(ino, span.chunk_index):
            return None
        return self.reader.read_kept(ref, span.start, span.end, stream=stream)

    def _overlay(
        self, ino: int, state: FileState | None, span: ChunkSpan
    ) -> list[tuple[int, bytes]] | None:
        """The logged and patched bytes of a span of a chunk that has no
        buffer (a buffer holds them already), oldest first."""
        idx = span.chunk_index
        patch = state.patches.get(idx) if state is not None else None
        if patch is None and not self.log.has(ino, idx):
            return None
        if state is not None and state.buffered(idx) is not None:
            return None
        pieces = self.log.overlay(ino, idx, span.start, span.end)
        if patch is not None:
            pieces.extend(patch.items())
        return pieces

    def _maybe_prefetch(
        self, ino: int, state: FileState, offset: int, end: int, file_size: int
    ) -> None:
        """On a sequential read, prefetch the next PREFETCH_CHUNKS chunks."""
        sequential = offset == state.next_read
        state.next_read = end
        if not sequential:
            return
        chunk_size = self.layout.chunk_size
        first = max(state.prefetched + 1, (end - 1) // chunk_size + 1)
        last = min((end - 1) // chunk_size + PREFETCH_CHUNKS, (file_size - 1) // chunk_size)
        if first > last:
            return
        state.prefetched = last
        for idx, ref in self.chunks.get_range(ino, first, last).items():
            if idx not in state.dirty:
                self.reader.prefetch(ref)

    def _read_span_cached(
        self, ino: int, state: FileState | None, span: ChunkSpan, dest: memoryview,
        stream: bool,
    ) -> _SlowSpan | None:  # fmt: skip
        """Fill `dest` with chunk bytes [span.start, span.end) if that can be
        done without waiting; otherwise return what is left to read.
        `stream`: the request continues the file's previous one, or starts
        the file (see `ChunkReader.read_cached`)."""
        buf = state.buffered(span.chunk_index) if state is not None else None
        if buf is not None:
            _copy_padded(dest, buf, span.start)
            return None
        ref = self.chunks.get(ino, span.chunk_index)
        if ref is None:
            if span.chunk_index == 0:
                inline = self.namespace.inline_data(ino)
                if inline is not None:
                    _copy_padded(dest, inline, span.start)
            return None  # a hole: dest is already zero
        stop = min(span.end, ref.length)
        if span.start >= stop:
            return None
        dest = dest[: stop - span.start]
        missing = self.reader.read_cached(ref, span.start, stop, dest, stream=stream)
        return _SlowSpan(ino, span, ref, missing, dest, stream) if missing else None

    async def _finish_span(self, job: _SlowSpan) -> None:
        """Read what `_read_span_cached` left (the caller pins the chunk)."""
        try:
            await self.reader.read_missing(
                job.ref, job.span.start, job.missing, job.dest, stream=job.stream
            )
        except Unrecoverable as exc:
            self._report_unrecoverable(
                job.ino, job.span.chunk_index, job.ref.length, exc, job.ref.chunk_id
            )
            raise

    def _report_unrecoverable(
        self, ino: int, idx: int, length: int, exc: Unrecoverable, chunk_id: int
    ) -> None:
        """Log lost data once per chunk, with the file's path and range
        (and report it: `on_unrecoverable`, the volume's event)."""
        exc.already_logged = True
        key = (ino, idx)
        if key in self._reported_lost:
            return
        self._reported_lost.add(key)
        if self.on_unrecoverable is not None:
            self.on_unrecoverable(chunk_id, ino, idx, length, "read", str(exc))
        paths = [p.decode(errors="replace") for p in self.inodes.paths_of(ino, ROOT_INODE)]
        start = idx * self.layout.chunk_size
        log.error(
            "%s (inode %d): bytes [%d, %d) are unreadable: %s",
            " or ".join(paths) or "an unlinked file",
            ino,
            start,
            start + length,
            exc,
        )

    # -- write ---------------------------------------------------------------

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """Buffer a write; full chunks are written back in the background."""
        self.last_activity = time.monotonic()
        state = self._state(ino)
        chunk_size = self.layout.chunk_size
        view = memoryview(data)
        pos = 0
        for span in self.layout.chunk_spans(offset, len(data)):
            idx = span.chunk_index
            count = span.end - span.start
            async with state.lock(idx):
                buf = state.dirty.get(idx)
                if buf is None and self._patch(state, ino, span, view[pos : pos + count]):
                    pos += count
                    self.namespace.set_size(
                        ino,
                        max(self.namespace.get(ino).size, idx * chunk_size + span.end),
                        mtime_ns=self.clock_ns(),
                        persist=False,
                    )
                    continue
                if buf is None:
                    covers = span.start == 0 and span.end >= self._valid_length(ino, idx)
                    if covers:
                        self._drop_patch(state, idx)
                    buf = bytearray() if covers else await self._load(ino, idx)
                    if count >= chunk_size // PREALLOCATE_FRACTION and len(buf) < chunk_size:
                        # A large writer fills the whole chunk: size the
                        # buffer once (growing it write by write re-copied
                        # it each time); the rest is a gap until written.
                        state.note_gap(idx, len(buf), chunk_size)
                        buf.extend(bytes(chunk_size - len(buf)))
                    state.dirty[idx] = buf
                    self.dirty_bytes += len(buf)
                before = len(buf)
                if before < span.start:
                    buf.extend(bytes(span.start - before))
                    state.note_gap(idx, before, span.start)
                buf[span.start : span.end] = view[pos : pos + count]
                state.note_written(idx, span.start, span.end)
                self.dirty_bytes += len(buf) - before
                pos += count
                new_end = idx * chunk_size + span.end
                inode = self.namespace.get(ino)
                self.namespace.set_size(
                    ino, max(inode.size, new_end), mtime_ns=self.clock_ns(), persist=False
                )
            if state.complete(idx, chunk_size):
                await self._write_back_soon(state, idx)
        if self.dirty_bytes > self.dirty_limit:
            await self._flush_state(state)
        return len(data)

    def _patch(self, state: FileState, ino: int, span: ChunkSpan, data: memoryview) -> bool:
        """Keep a small write over a stored chunk that has no buffer as a
        patch, without reading the chunk (flush logs it, see smallwrites);
        False if it must go to a whole-chunk buffer (caller holds the lock).
        A patch that grows past `log.log_max` is left for the buffer, which
        `_load` builds with it."""
        idx = span.chunk_index
        patch = state.patches.get(idx)
        if patch is None:
            if (
                len(data) > self.log.log_max
                or (span.start == 0 and span.end >= self._valid_length(ino, idx))
                or self.chunks.get(ino, idx) is None
                or (idx == 0 and self.namespace.get(ino).size <= self.inline_max)
            ):
                return False
            patch = state.patches[idx] = Extents()
        before = patch.total
        patch.add(span.start, data)
        self.dirty_bytes += patch.total - before
        return patch.total <= self.log.log_max

    def _drop_patch(self, state: FileState, idx: int) -> Extents | None:
        patch = state.patches.pop(idx, None)
        if patch is not None:
            self.dirty_bytes -= patch.total
        return patch

    def _valid_length(self, ino: int, idx: int, size: int | None = None) -> int:
        """Bytes of chunk idx that lie below the current file size (or `size`)."""
        base = idx * self.layout.chunk_size
        if size is None:
            size = self.namespace.get(ino).size
        return max(0, min(self.layout.chunk_size, size - base))

    async def _load(self, ino: int, idx: int) -> bytearray:
        """The current content of chunk idx (its valid bytes), for a partial
        rewrite, with its logged records and its patch laid over (the patch
        is consumed). Caller holds the chunk's lock."""
        valid = self._valid_length(ino, idx)
        state = self._states.get(ino)
        if valid == 0:
            if state is not None:
                self._drop_patch(state, idx)
            return bytearray()
        ref = self.chunks.get(ino, idx)
        if ref is None:
            inline = self.namespace.inline_data(ino) if idx == 0 else None
            buf = bytearray(_padded(inline[:valid], valid) if inline else bytes(valid))
            pieces: list[tuple[int, bytes]] = []
        else:
            pieces = self.log.overlay(ino, idx, 0, valid)
            stop = min(valid, ref.length)
            self.pins.pin(ref.chunk_id)
            try:
                data = await self.reader.read(ref, 0, stop)
            finally:
                self.pins.unpin(ref.chunk_id)
            buf = bytearray(_padded(data, valid))
        patch = self._drop_patch(state, idx) if state is not None else None
        if patch is not None:
            pieces.extend(patch.items())
        lay_over(memoryview(buf), 0, pieces)
        return buf

    async def _write_back_soon(self, state: FileState, idx: int) -> None:
        """Write a full chunk back in the background (bounded: waits when
        too many write-backs are in flight, which is the backpressure)."""
        if self._nursery is None:
            await self._flush_chunk(state, idx)
            return
        await self._background.acquire()

        async def run() -> None:
            try:
                await self._flush_chunk(state, idx)
            except EcfsError:
                pass  # recorded in state.error, reported by flush/fsync
            except Exception as exc:  # a bug: keep the mount, report EIO later
                log.exception("bug in write-back of inode %d chunk %d", state.ino, idx)
                state.error = state.error or EcfsError(f"write-back failed: {exc}")
            finally:
                self._background.release()
                self._forget_state_if_idle(state.ino)

        self._nursery.start_soon(run)

    # -- write-back ----------------------------------------------------------

    async def flush(self, ino: int) -> None:
        """Write back all buffered data of ino and persist its attributes
        (unless the log records just written carry all that changed, see
        `_covered_by_log`). Raises the first write-back error since the
        last flush."""
        state = self._states.get(ino)
        if state is not None:
            await self._flush_state(state)
        if not self._covered_by_log(ino):
            self.namespace.persist_dirty([ino])
        if state is not None and state.error is not None:
            error, state.error = state.error, None
            raise error

    async def fsync(self, ino: int) -> None:
        """flush(), then wait until the metadata is durable on the replicas
        (fragments are made durable before that, see writer)."""
        await self.flush(ino)
        await self.wait_durable(self.db.generation)

    async def flush_all(self) -> None:
        """Write back everything (unmount). Every inode is tried; then an
        EcfsError names the ones that failed (each is logged)."""
        failed: list[str] = []
        for ino in list(self._states):
            try:
                await self.flush(ino)
            except Exception as exc:
                log.error("inode %d: write-back failed: %r", ino, exc)
                failed.append(f"inode {ino}: {exc}")
        try:
            self.namespace.persist_dirty(self.namespace.dirty_inodes())
        except EcfsError as exc:
            failed.append(str(exc))
        if failed:
            error = EcfsError("write-back failed: " + "; ".join(failed))
            error.already_logged = True
            raise error

    async def write_back_attributes(self) -> None:
        """Forever: every ATTRIBUTE_WRITEBACK_INTERVAL, persist the dirty
        attributes (deferred setattr, sizes of written-back files) of every
        inode with no buffered data, in one transaction. An inode with
        buffered data is left to its write-back, which persists its size
        together with the data it covers."""
        while True:
            await trio.sleep(ATTRIBUTE_WRITEBACK_INTERVAL)
            idle = [
                ino
                for ino in self.namespace.dirty_inodes()
                if not self._has_buffers(ino) and not self._covered_by_log(ino)
            ]
            self.namespace.persist_dirty(idle)

    def _covered_by_log(self, ino: int) -> bool:
        """Whether all that is unpersisted of ino's attributes is its mtime
        (= ctime) as carried by its newest log record: then a flush need not
        commit the inode (the record brings the time back after a crash, see
        `ecfs.data.smallwrites`); a fold or a later change persists it. Anything
        else (a size change, a deferred chmod...) is committed as usual."""
        state = self._states.get(ino)
        if state is None or state.logged_mtime is None or not self.namespace.is_dirty(ino):
            return False
        node = self.namespace.get(ino)
        if node.mtime_ns != state.logged_mtime or node.ctime_ns != node.mtime_ns:
            return False
        row = self.inodes.get(ino)
        new = node.row()
        return row is not None and row[:7] == new[:7] and row[9:] == new[9:]

    def _has_buffers(self, ino: int) -> bool:
        state = self._states.get(ino)
        return state is not None and state.has_data()

    async def _flush_state(self, state: FileState) -> None:
        indices = sorted(set(state.dirty) | set(state.flushing) | set(state.patches))
        if not indices:
            return

        async def one(idx: int) -> None:
            try:
                await self._flush_chunk(state, idx)
            except EcfsError:
                pass  # recorded in state.error

        if len(indices) == 1:  # most files: no limiter, no nursery (~30 us)
            await one(indices[0])
            return
        limit = trio.CapacityLimiter(8)

        async def limited(idx: int) -> None:
            async with limit:
                await one(idx)

        async with open_fan_out() as nursery:
            for idx in indices:
                nursery.start_soon(limited, idx)

    async def _flush_chunk(self, state: FileState, idx: int) -> None:
        async with state.lock(idx):
            try:
                logged = idx not in state.dirty and await self._log_patch(state, idx)
            except EcfsError as exc:  # the patch stays, for the next flush
                log.warning("inode %d chunk %d: logging failed: %s", state.ino, idx, exc)
                state.error = state.error or exc
                raise
            if not logged:
                if idx not in state.dirty and idx in state.patches:  # too big to log
                    state.dirty[idx] = buf = await self._load(state.ino, idx)
                    self.dirty_bytes += len(buf)
                await self._write_back_locked(state, idx)
        if logged and self.log.over_limit:
            await self.log.make_room(self.fold_chunk)

    async def _log_patch(self, state: FileState, idx: int) -> bool:
        """Make chunk idx's patch durable as log records carrying the
        inode's size and mtime; False if there is none to log (caller holds
        the lock). The inode itself is left to `flush`."""
        patch = state.patches.get(idx)
        ref = self.chunks.get(state.ino, idx)
        if patch is None or ref is None or patch.total > self.log.log_max:
            return False
        valid = self._valid_length(state.ino, idx)
        pieces = [(o, d[: valid - o]) for o, d in patch.items() if o < valid]
        if pieces:
            node = self.namespace.get(state.ino)
            mtime = node.mtime_ns
            await self.log.append(
                state.ino, idx, ref.chunk_id, pieces, size=node.size, mtime_ns=mtime
            )
            state.logged_mtime = mtime
        self._drop_patch(state, idx)
        return True

    async def fold_chunk(self, ino: int, idx: int) -> None:
        """Re-encode chunk idx of ino with its logged records as a new
        version (the commit drops the records, see `_store_chunk`).

        All under the chunk's lock, after logging any patch: a failed fold
        (EcfsError, for the caller) leaves the records and the old version
        as they were, and is no error of the file's (`state.error`). A
        chunk with a buffer gets the ordinary write-back instead."""
        state = self._state(ino)
        try:
            async with state.lock(idx):
                ordinary = idx in state.dirty or (
                    idx in state.patches and not await self._log_patch(state, idx)
                )
                if not ordinary and self.log.has(ino, idx):
                    buf = await self._load(ino, idx)
                    state.flushing[idx] = buf  # readers see it meanwhile
                    try:
                        await self._store_chunk(ino, idx, buf)
                    finally:
                        state.flushing.pop(idx, None)
            if ordinary:
                await self._flush_chunk(state, idx)
        finally:
            self._forget_state_if_idle(ino)

    async def fold_all(self) -> None:
        """Fold every logged chunk (unmount)."""
        for ino, idx in self.log.chunks():
            try:
                await self.fold_chunk(ino, idx)
            except EcfsError as exc:
                log.error("inode %d chunk %d: fold at unmount failed: %s", ino, idx, exc)

    async def _write_back_locked(
        self, state: FileState, idx: int, also: Callable[[], list[ChunkRef]] | None = None
    ) -> None:
        """Write back chunk idx's buffer (caller holds the lock); `also`:
        see `_store_chunk`."""
        buf = state.dirty.pop(idx, None)
        if buf is None:
            return
        self.dirty_bytes -= len(buf)
        state.flushing[idx] = buf
        try:
            # No copy: nothing modifies `buf` while its chunk lock is held.
            await self._store_chunk(state.ino, idx, buf, also)
            state.gaps.pop(idx, None)  # committed: the zeros are content now
        except EcfsError as exc:
            log.warning("inode %d chunk %d: write-back failed: %s", state.ino, idx, exc)
            state.error = state.error or exc
            if idx not in state.dirty:
                # A copy: a view of `buf` may outlive the failed write
                # (a traceback, an abandoned thread), and a bytearray
                # with views cannot be resized by later writes.
                state.dirty[idx] = bytearray(buf)
                self.dirty_bytes += len(buf)
            raise
        finally:
            state.flushing.pop(idx, None)

    async def _store_chunk(
        self,
        ino: int,
        idx: int,
        buf: bytearray,
        also: Callable[[], list[ChunkRef]] | None = None,
        size: int | None = None,
    ) -> None:
        """Commit the bytes of `buf` as the content of chunk idx (caller
        holds its lock, so `buf` does not change meanwhile). `also`, if
        given, runs first in the transaction that commits it and returns
        more versions to discard (truncate); it does not run when nothing
        is committed (the chunk was truncated away meanwhile). `size`: the
        file size to store the chunk for, when it is not the cached one
        (truncate: the new size, which `also` commits)."""
        extra: list[ChunkRef] = []
        if size is None:
            size = self.namespace.get(ino).size
        valid = self._valid_length(ino, idx, size)
        data = memoryview(buf)[:valid]
        if not data:
            return  # truncated away meanwhile; truncate removed the chunk
        self._allocated.pop(ino, None)
        if idx == 0 and size <= self.inline_max:
            with self.db.transaction():
                extra = also() if also is not None else []
                removed = extra + self.chunks.remove_from(ino, 0)
                self.log.drop_from(ino, 0)
                self.namespace.set_inline_data(ino, bytes(data))
                self.namespace.persist(ino)
            self.garbage.discard(removed, self.db.generation)
            return
        if _all_zero(data):
            with self.db.transaction():
                extra = also() if also is not None else []
                old = self.chunks.remove(ino, idx)
                self.log.drop(ino, idx)
                self._drop_inline(ino, idx)
                self.namespace.persist(ino)
            self.garbage.discard(extra + ([] if old is None else [old]), self.db.generation)
            return
        coding = self.coding_of(ino)
        ref = await (self.writer.write(data) if coding is None else self.writer.write(data, coding))
        if self._valid_length(ino, idx) == 0:
            self.garbage.discard([ref], self.db.generation)
            return
        self._allocated.pop(ino, None)
        with self.db.transaction():
            extra = also() if also is not None else []
            old = self._switch_version(ino, idx, ref)
            self.namespace.persist(ino)
        self.garbage.discard(extra + ([] if old is None else [old]), self.db.generation)

    def _switch_version(self, ino: int, idx: int, ref: ChunkRef) -> ChunkRef | None:
        """In the caller's transaction: make `ref` chunk idx's version (its
        records die with the old one: the new one holds them, see _load);
        queue a repair if fragments are missing or misplaced. Returns the old version."""
        old = self.chunks.put(ino, idx, ref)
        self.log.drop(ino, idx)
        self._drop_inline(ino, idx)
        missing = [i for i, s in enumerate(ref.stores) if s == NO_STORE]
        if not missing and self.writer.wrong_class(ref):
            # A fragment on a store of the wrong class (hybrid placement with
            # a class short) or in a shared failure domain (one was down or
            # full): repair moves it back when it can.
            why = self.writer.placement.misplaced_reason(ref.stores)
            self.repairs.add(
                ref.chunk_id, why, repair_priority(self.layout.of(ref).m, why),
                self.clock_ns(), bad=0, demand=0,
            )  # fmt: skip
        if missing:
            spare = self.layout.of(ref).m - len(missing)
            self.repairs.add(
                ref.chunk_id,
                "write",
                repair_priority(spare, "write"),
                self.clock_ns(),
                bad=sum(1 << i for i in missing),
                demand=0,
            )
        return old

    def _drop_inline(self, ino: int, idx: int) -> None:
        if idx == 0 and self.namespace.inline_data(ino) is not None:
            self.namespace.set_inline_data(ino, None)

    # -- fallocate -------------------------------------------------------------

    async def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on bytes [offset, offset + length) of a regular file.

        * mode 0 and KEEP_SIZE: nothing is written (chunks are copy-on-write,
          so no space can be reserved for later writes); ENOSPC if the
          stores' free space cannot hold the range's holes, as a caller of
          posix_fallocate expects; mode 0 extends the size.
        * PUNCH_HOLE (with KEEP_SIZE, as Linux requires) and ZERO_RANGE:
          the range reads zeros; ZERO_RANGE without KEEP_SIZE extends the
          size. Every chunk the range covers whole becomes a hole in one
          transaction (its buffer, patch, log records and inline data are
          dropped; its fragments are deleted once that is durable, see
          garbage, which keeps them for readers that pinned them). A partial
          chunk at either end gets zeros written over the range through
          `write`: a small range becomes a patch, logged at flush like any
          small write (see smallwrites), newer than every record it hides.
        """
        node = self.namespace.get(ino)
        if node.is_dir:
            raise FsError("fallocate on a directory", errno=errno.EISDIR)
        if not node.is_reg:
            raise FsError("fallocate on a non-regular file", errno=errno.ENODEV)
        if offset < 0 or length <= 0:
            raise FsError("fallocate: negative offset or non-positive length", errno=errno.EINVAL)
        if mode & ~FALLOC_SUPPORTED:
            raise FsError(f"fallocate mode {mode:#x} is not supported", errno=errno.EOPNOTSUPP)
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        if punch and mode & FALLOC_FL_ZERO_RANGE or punch and not mode & FALLOC_FL_KEEP_SIZE:
            raise FsError(f"fallocate mode {mode:#x} is invalid", errno=errno.EOPNOTSUPP)
        end = offset + length
        check_file_size(end)
        self.last_activity = time.monotonic()
        grow = not mode & FALLOC_FL_KEEP_SIZE and end > node.size
        try:
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                await self._zero_range(ino, offset, min(end, node.size))
            else:
                self._check_room(ino, offset, end)
            if grow and end > self.namespace.get(ino).size:
                self.namespace.set_size(ino, end, mtime_ns=self.clock_ns(), persist=True)
        finally:
            self._forget_state_if_idle(ino)

    def _check_room(self, ino: int, offset: int, end: int) -> None:
        """ENOSPC if the free space cannot hold bytes [offset, end) of ino
        where it has no stored chunk (a preallocation's promise)."""
        if self.free_space is None:
            return
        chunk_size = self.layout.chunk_size
        needed = end - offset
        first, last = offset // chunk_size, (end - 1) // chunk_size
        for idx, stored in self.chunks.lengths_in(ino, first, last):
            base = idx * chunk_size
            needed -= max(0, min(end, base + stored) - max(offset, base))
        free = self.free_space()
        if needed > free:
            raise FsError(
                f"fallocate of {needed} bytes: only {free} bytes are free", errno=errno.ENOSPC
            )

    async def _zero_range(self, ino: int, offset: int, end: int) -> None:
        """Make bytes [offset, end) (within the size) read zeros."""
        if offset >= end:
            return
        state = self._state(ino)
        chunk_size = self.layout.chunk_size
        first, last = offset // chunk_size, (end - 1) // chunk_size
        # Only chunks with content: a huge sparse range costs no loop.
        present = {idx for idx, _ in self.chunks.lengths_in(ino, first, last)}
        # A buffer being written back (`flushing`) is committed by the time
        # its lock is ours.
        buffered = (*state.dirty, *state.flushing, *state.patches)
        present.update(i for i in buffered if first <= i <= last)
        if first == 0 and self.namespace.inline_data(ino) is not None:
            present.add(0)
        whole: list[int] = []
        for span in self.layout.chunk_spans(offset, end - offset):
            idx = span.chunk_index
            if idx not in present:
                continue
            if span.start == 0 and span.end >= self._valid_length(ino, idx):
                whole.append(idx)
            else:  # the small-write path (patch, log) or the chunk's buffer
                await self.write(ino, idx * chunk_size + span.start, bytes(span.end - span.start))
        if not whole:
            return
        async with AsyncExitStack() as stack:
            for idx in whole:  # ascending, as truncate
                await stack.enter_async_context(state.lock(idx))
            for idx in whole:
                buf = state.dirty.pop(idx, None)
                if buf is not None:
                    self.dirty_bytes -= len(buf)
                state.gaps.pop(idx, None)
                self._drop_patch(state, idx)
            removed: list[ChunkRef] = []
            self._allocated.pop(ino, None)
            with self.db.transaction():
                for idx in whole:
                    old = self.chunks.remove(ino, idx)
                    if old is not None:
                        removed.append(old)
                    self.log.drop(ino, idx)
                    self._drop_inline(ino, idx)
                size = self.namespace.get(ino).size
                self.namespace.set_size(ino, size, mtime_ns=self.clock_ns(), persist=True)
            self.garbage.discard(removed, self.db.generation)

    # -- truncate / free -------------------------------------------------------

    async def truncate(self, ino: int, new_size: int) -> None:
        """Set the file size; bytes past it are gone, a later extension
        reads zeros, also after a crash.

        One transaction commits the size and removes the chunks past it
        (their log records die with them). The chunk the new size cuts is
        loaded into its buffer (records and patch laid over); when it has
        log records or its stored version holds bytes past the cut, its cut
        version is written (or made inline, or a hole) and committed in that
        same transaction, so that neither old records (live while their
        chunk version is current, see `ecfs.data.smallwrites`) nor stored
        bytes past the cut survive the truncate. That write is made from a
        copy before anything changes: if it fails, the truncate fails and
        the file is as it was. Otherwise the buffer is just cut and written
        back later (the committed version holds nothing past the cut)."""
        inode = self.namespace.get(ino)
        if new_size >= inode.size:
            self.namespace.set_size(ino, new_size, mtime_ns=self.clock_ns(), persist=True)
            return
        state = self._state(ino)
        chunk_size = self.layout.chunk_size
        keep = new_size // chunk_size
        first_dropped = -(-new_size // chunk_size)
        async with AsyncExitStack() as stack:
            for idx in sorted(set(state.locks) | {keep}):
                if idx >= keep:
                    await stack.enter_async_context(state.lock(idx))
            for idx in [i for i in state.dirty if i >= first_dropped]:
                self.dirty_bytes -= len(state.dirty.pop(idx))
                state.gaps.pop(idx, None)
            for idx in [i for i in state.patches if i >= first_dropped]:
                self._drop_patch(state, idx)
            cut = new_size - keep * chunk_size
            mtime_ns = self.clock_ns()
            committed = False

            def drop_past_cut() -> list[ChunkRef]:
                nonlocal committed
                committed = True
                removed = self.chunks.remove_from(ino, first_dropped)
                self.log.drop_from(ino, first_dropped)
                inline = self.namespace.inline_data(ino)
                if inline is not None and len(inline) > new_size:
                    self.namespace.set_inline_data(ino, inline[:new_size] or None)
                self.namespace.set_size(ino, new_size, mtime_ns=mtime_ns, persist=True)
                return removed

            self._allocated.pop(ino, None)
            if cut:
                buf = state.dirty.get(keep)
                if buf is None:
                    buf = await self._load(ino, keep)
                    state.dirty[keep] = buf
                    self.dirty_bytes += len(buf)
                stored = self.chunks.get(ino, keep)
                if self.log.has(ino, keep) or (stored is not None and stored.length > cut):
                    # The cut version is committed with the size, in one
                    # transaction: its records die with the old version (the
                    # buffer holds them, see _load) and the stored bytes past
                    # the cut with it, so that none comes back when the file
                    # grows again, also after a crash. Written from a copy
                    # before the buffer is cut: a failure leaves the file as
                    # it was (the size too: `_store_chunk` is told the new
                    # one, the cache keeps the old one until the commit).
                    await self._store_chunk(
                        ino, keep, bytearray(buf[:cut]), also=drop_past_cut, size=new_size
                    )
                    self.dirty_bytes -= len(state.dirty.pop(keep))
                    state.gaps.pop(keep, None)  # committed: the zeros are content now
                else:
                    self.dirty_bytes -= max(0, len(buf) - cut)
                    del buf[cut:]
                    state.note_written(keep, cut, chunk_size)
            if not committed:
                with self.db.transaction():
                    removed = drop_past_cut()
                self.garbage.discard(removed, self.db.generation)
        self._forget_state_if_idle(ino)

    async def free(self, ino: int) -> None:
        """Delete an inode and its data (nlink 0, no longer open or known
        to the kernel)."""
        state = self._states.get(ino)
        if state is not None:
            async with AsyncExitStack() as stack:
                for idx in sorted(state.locks):
                    await stack.enter_async_context(state.lock(idx))
                self.dirty_bytes -= sum(len(b) for b in state.dirty.values())
                self.dirty_bytes -= sum(p.total for p in state.patches.values())
                state.dirty.clear()
                state.patches.clear()
                state.gaps.clear()
            self._states.pop(ino, None)
        self._allocated.pop(ino, None)
        with self.db.transaction():
            removed = self.chunks.remove_from(ino, 0)
            self.log.drop_from(ino, 0)
            self.namespace.delete_inode(ino)
        self.garbage.discard(removed, self.db.generation)

    # -- states ----------------------------------------------------------------

    def _state(self, ino: int) -> FileState:
        state = self._states.get(ino)
        if state is None:
            state = self._states[ino] = FileState(ino)
        return state

    def _forget_state_if_idle(self, ino: int) -> None:
        state = self._states.get(ino)
        if state is not None and state.idle:
            del self._states[ino]


def _all_zero(data: memoryview) -> bool:
    """True if every byte is zero (cheap for real data: it almost always
    differs at one end; only candidates are compared in full, as bytes:
    comparing a memoryview goes element by element, 100x slower)."""
    return not data[0] and not data[-1] and data.tobytes() == bytes(len(data))


def _copy_padded(dest: memoryview, data: bytes | bytearray, start: int) -> None:
    """Copy data[start:] into `dest`, as far as both go (the rest of `dest`
    stays zero: bytes past a short buffer or inline blob read as zeros)."""
    n = max(0, min(len(dest), len(data) - start))
    dest[:n] = memoryview(data)[start : start + n]


def _padded(data: bytes | bytearray | memoryview, length: int) -> bytes:
    """`data` as bytes, zero-extended to `length` (holes, short chunks)."""
    data = bytes(data)
    return data if len(data) >= length else data + bytes(length - len(data))
