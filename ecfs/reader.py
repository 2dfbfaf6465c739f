"""Reading byte ranges of chunks: healthy, and degraded by range decode.

Owns: turning "bytes [start, end) of chunk version X" into verified bytes,
choosing which fragments to read, and reporting damage. Must not: touch the
metadata database (damage goes to the `on_damage` callback), write anything
to stores, or know about files.

Healthy read: the data fragments holding the range are read, cell-aligned,
one pread each (on the event loop with RWF_NOWAIT when the bytes are in the
page cache, otherwise one thread call per fragment), and every touched cell
is verified against its checksum.

Degraded read: when a data fragment is missing, its store unavailable, its
cells fail their checksums, or the read errors or times out, the SAME
cell-aligned byte range [a, b) is read from k surviving fragments (fastest
stores first, data fragments before parity on ties) and only that range is
decoded. zfec is systematic and works byte position by byte position, so
bytes [a, b) of any k fragments determine bytes [a, b) of every other one.
Fewer than k good fragments for the range: Unrecoverable (EIO), never
guessed or zeroed bytes.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from . import fragment
from .codec import Codec
from .errors import EcfsError, FragmentCorrupt, StoreError, Unrecoverable
from .geometry import FragmentPiece, Layout
from .handles import Expected, FragmentHandle, HandleCache, open_fragment
from .model import NO_STORE, ChunkRef
from .offload import StoreRunner
from .store import DirectoryStore

log = logging.getLogger(__name__)

#: Called with (chunk, fragment indices found bad, reason) after a degraded read.
DamageCallback = Callable[[ChunkRef, list[int], str], None]

#: A cold read starting this close to the payload start is read together
#: with the header in one pread.
ONE_READ_GAP = 64 * 1024

#: Fragment opens + read-ahead hints in flight for sequential prefetch.
PREFETCH_CONCURRENCY = 16

#: Decodes larger than this run in a worker thread instead of on the loop.
LOOP_DECODE_LIMIT = 64 * 1024


@dataclass(slots=True)
class ReadCounters:
    """Bytes asked for versus bytes read from stores, healthy and degraded."""

    requested_bytes: int = 0
    store_bytes: int = 0
    degraded_reads: int = 0
    degraded_requested_bytes: int = 0
    degraded_store_bytes: int = 0
    unrecoverable_reads: int = 0
    nowait_hits: int = 0
    thread_reads: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def _pread_verified(fd: int, header: fragment.FragmentHeader, start: int, end: int) -> bytes:
    """Blocking: read payload bytes [start, end) (cell-aligned) and verify."""
    data = DirectoryStore.read_at(fd, end - start, header.payload_offset + start)
    _verify(header, start, end, data)
    return data


def _open_and_read(
    store: DirectoryStore, chunk_id: int, index: int, expected: Expected, start: int, end: int
) -> tuple[FragmentHandle, bytes]:
    """Blocking: open a fragment (one thread hop on a cache miss) and read.
    A range near the start of the payload is read with the header in one
    pread (one disk request for a cold fragment)."""
    together = fragment.HEADER_PROBE_SIZE + end if start < ONE_READ_GAP else 0
    handle = open_fragment(store, chunk_id, index, expected, probe=together)
    try:
        offset = handle.payload_offset
        if handle.prefix is not None and len(handle.prefix) >= offset + end:
            data = bytes(handle.prefix[offset + start : offset + end])
            handle.prefix = None
            _verify(handle.header, start, end, data)
            return handle, data
        handle.prefix = None
        return handle, _pread_verified(handle.fd, handle.header, start, end)
    except BaseException:
        os.close(handle.fd)
        raise


def _open_and_advise(
    store: DirectoryStore, chunk_id: int, index: int, expected: Expected
) -> FragmentHandle:
    """Blocking: open a fragment and ask the kernel to read its payload
    into the page cache in the background (sequential prefetch)."""
    handle = open_fragment(store, chunk_id, index, expected)
    handle.prefix = None
    try:
        os.posix_fadvise(
            handle.fd, handle.payload_offset, handle.header.payload_length, os.POSIX_FADV_WILLNEED
        )
    except OSError:
        pass
    return handle


def _verify(header: fragment.FragmentHeader, start: int, end: int, data: bytes) -> None:
    if len(data) != end - start:
        raise FragmentCorrupt(f"fragment {header.chunk_id:016x}.{header.index} is truncated")
    bad = fragment.bad_cells(header, start, data)
    if bad:
        raise FragmentCorrupt(
            f"fragment {header.chunk_id:016x}.{header.index}: bad cells {bad[:8]}"
        )


class ChunkReader:
    """Reads verified byte ranges of chunk versions."""

    def __init__(
        self,
        layout: Layout,
        codec: Codec,
        runners: Mapping[int, StoreRunner],
        handles: HandleCache,
        expected: Expected,
        on_damage: DamageCallback,
        *,
        read_timeout: float = 10.0,
    ) -> None:
        self.layout = layout
        self.codec = codec
        self.runners = runners
        self.handles = handles
        self.expected = expected
        self.on_damage = on_damage
        self.read_timeout = read_timeout
        self.counters = ReadCounters()
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._prefetch_limit = trio.CapacityLimiter(PREFETCH_CONCURRENCY)

    async def prefetch(self, ref: ChunkRef) -> None:
        """Open the data fragments of a chunk a sequential reader will want
        next and start reading them into the page cache, so that the read
        itself is served on the loop (RWF_NOWAIT) without a thread hop.
        Best effort: errors are ignored (the real read will see them)."""
        async with trio.open_nursery() as nursery:
            for index in range(self.layout.k):
                store = ref.stores[index]
                if store != NO_STORE and self.handles.peek((store, ref.chunk_id, index)) is None:
                    nursery.start_soon(self._prefetch_fragment, ref, index, store)

    async def _prefetch_fragment(self, ref: ChunkRef, index: int, store: int) -> None:
        runner = self.runners.get(store)
        if runner is None or not runner.available:
            return
        async with self._prefetch_limit:
            try:
                handle = await runner.call(
                    _open_and_advise,
                    runner.store,
                    ref.chunk_id,
                    index,
                    self.expected,
                    timeout=self.read_timeout,
                )
            except (StoreError, FragmentCorrupt):
                return
        self.handles.release(self.handles.insert((store, ref.chunk_id, index), handle))

    async def read(self, ref: ChunkRef, start: int, end: int) -> bytes:
        """Verified chunk bytes [start, end), 0 <= start < end <= ref.length."""
        if not 0 <= start < end <= ref.length:
            raise ValueError(f"bad chunk range [{start}, {end}) of {ref.length}")
        payload = self.layout.payload_length(ref.length)
        pieces = self.layout.data_pieces(ref.length, start, end)
        self.counters.requested_bytes += end - start
        if len(pieces) == 1:
            return await self._read_piece(ref, payload, pieces[0])
        parts: list[bytes] = [b""] * len(pieces)

        async def read_one(i: int, piece: FragmentPiece) -> None:
            parts[i] = await self._read_piece(ref, payload, piece)

        async with trio.open_nursery() as nursery:
            for i, piece in enumerate(pieces):
                nursery.start_soon(read_one, i, piece)
        return b"".join(parts)

    async def read_fragment_range(
        self, ref: ChunkRef, index: int, start: int, end: int
    ) -> bytes:
        """Verified bytes [start, end) (cell-aligned) of fragment `index`,
        decoded from others if it cannot be read (used by repair)."""
        try:
            return await self._read_fragment(ref, index, start, end)
        except (StoreError, FragmentCorrupt) as exc:
            return await self._read_degraded(ref, index, start, end, str(exc))

    # -- one data piece ---------------------------------------------------------

    async def _read_piece(self, ref: ChunkRef, payload: int, piece: FragmentPiece) -> bytes:
        a, b = self.layout.cell_range(piece.frag_start, piece.frag_end, payload)
        try:
            data = await self._read_fragment(ref, piece.index, a, b)
        except (StoreError, FragmentCorrupt) as exc:
            self.counters.degraded_reads += 1
            self.counters.degraded_requested_bytes += piece.frag_end - piece.frag_start
            data = await self._read_degraded(ref, piece.index, a, b, str(exc))
        return data[piece.frag_start - a : piece.frag_end - a]

    async def _read_fragment(self, ref: ChunkRef, index: int, start: int, end: int) -> bytes:
        """Verified bytes of one fragment; StoreError/FragmentCorrupt if not."""
        store = ref.stores[index]
        runner = self.runners.get(store) if store != NO_STORE else None
        if runner is None or not runner.available:
            raise StoreError(f"fragment {index} of chunk {ref.chunk_id:016x}: store unavailable")
        key = (store, ref.chunk_id, index)
        handle = self.handles.acquire(key)
        try:
            if handle is None:
                opened, data = await runner.call(
                    _open_and_read,
                    runner.store,
                    ref.chunk_id,
                    index,
                    self.expected,
                    start,
                    end,
                    timeout=self.read_timeout,
                    nbytes_read=end - start,
                )
                handle = self.handles.insert(key, opened)
                self._check_payload(ref, handle)
                self.counters.thread_reads += 1
            else:
                self._check_payload(ref, handle)
                data = self._read_nowait(handle, start, end, runner)
                if data is None:
                    data = await runner.call(
                        _pread_verified,
                        handle.fd,
                        handle.header,
                        start,
                        end,
                        timeout=self.read_timeout,
                        nbytes_read=end - start,
                    )
                    self.counters.thread_reads += 1
        except FragmentCorrupt:
            self.handles.discard(key)
            raise
        finally:
            if handle is not None:
                self.handles.release(handle)
        self.counters.store_bytes += end - start
        return data

    def _check_payload(self, ref: ChunkRef, handle: FragmentHandle) -> None:
        if handle.header.payload_length != self.layout.payload_length(ref.length):
            raise FragmentCorrupt(f"chunk {ref.chunk_id:016x}: fragment payload length mismatch")

    def _read_nowait(
        self, handle: FragmentHandle, start: int, end: int, runner: StoreRunner
    ) -> bytes | None:
        """Page-cache hit on the loop without blocking, or None."""
        if not self._nowait:
            return None
        buf = bytearray(end - start)
        try:
            n = os.preadv(handle.fd, [buf], handle.payload_offset + start, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False
            return None
        if n != len(buf):
            return None
        data = bytes(buf)
        _verify(handle.header, start, end, data)
        self.counters.nowait_hits += 1
        return data

    # -- degraded ---------------------------------------------------------------

    async def _read_degraded(
        self, ref: ChunkRef, lost: int, start: int, end: int, reason: str
    ) -> bytes:
        """Bytes [start, end) of fragment `lost`, decoded from k others."""
        k = self.layout.k
        bad = [lost]
        candidates = self._sources(ref, exclude={lost})
        pieces: dict[int, bytes] = {}
        while len(pieces) < k:
            batch = candidates[: k - len(pieces)]
            del candidates[: len(batch)]
            if len(batch) < k - len(pieces):
                self.counters.unrecoverable_reads += 1
                self.on_damage(ref, bad, reason)
                raise Unrecoverable(
                    f"chunk {ref.chunk_id:016x}: fewer than {k} good fragments for"
                    f" bytes [{start}, {end}) of fragment {lost}"
                )
            results = await self._read_many(ref, batch, start, end)
            for index, result in results.items():
                if isinstance(result, bytes):
                    pieces[index] = result
                    self.counters.degraded_store_bytes += end - start
                else:
                    bad.append(index)
        self.on_damage(ref, bad, reason)
        if end - start > LOOP_DECODE_LIMIT:
            decoded = await trio.to_thread.run_sync(self.codec.decode, pieces, [lost])
        else:
            decoded = self.codec.decode(pieces, [lost])
        return decoded[lost]

    def _sources(self, ref: ChunkRef, exclude: set[int]) -> list[int]:
        """Fragment indices worth reading, best first: available stores,
        lowest expected latency, data before parity on ties."""
        usable = []
        for index in ref.present():
            runner = self.runners.get(ref.stores[index])
            if index in exclude or runner is None or not runner.available:
                continue
            usable.append((runner.expected_latency(), index >= self.layout.k, index))
        usable.sort()
        return [index for _, _, index in usable]

    async def _read_many(
        self, ref: ChunkRef, indices: list[int], start: int, end: int
    ) -> dict[int, bytes | EcfsError]:
        results: dict[int, bytes | EcfsError] = {}

        async def read_one(index: int) -> None:
            try:
                results[index] = await self._read_fragment(ref, index, start, end)
            except (StoreError, FragmentCorrupt) as exc:
                results[index] = exc

        async with trio.open_nursery() as nursery:
            for index in indices:
                nursery.start_soon(read_one, index)
        return results
