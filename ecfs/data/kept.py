"""The kept bytes of degraded reads: decoded once, served many times.

Owns: the bytes that a sequential reader's degraded reads decoded, and
the verified data-fragment sources they were decoded from, keyed by
(chunk version, fragment index); the decodes under way whose bytes will
be kept; and the test of whether a request looks like a stream's. Must
not: read or decode anything (the reader, `ecfs.data.reader`, decides
when to decode and hands the bytes over), keep bytes that were not
verified or decoded from verified ones, or know about stores or files.

What is kept and why: a sequential reader (its chunk was read ahead, and
the request looks like a stream's: `streaming`, not a 4 KiB random read
of a chunk read ahead earlier) that needs a data fragment decoded,
because its store is unavailable or routed around (`ecfs.data.routing`),
has the range decoded up to KEEP_SPAN bytes ahead at once (the reader's
`_read_degraded_kept`), and the decoded bytes and the verified
data-fragment sources of that decode are kept (`keep`). The next
requests of the reader (FUSE asks 128 KiB at a time) for that fragment
and for the neighbouring data fragments are then served from those
bytes on the loop (`copy`, or `view`: a request that lies in one kept
range is answered with the kept bytes themselves, not a copy): each
range of the chunk is read, checksummed and decoded once instead of k
sources per request. Concurrent requests
covered by a decode under way wait for it (`decoding`, `wait_for_decode`)
instead of decoding the same range again. A repair of the chunk takes
the whole payloads kept (`whole_payloads`, or one fragment's:
`whole_payload`) instead of reading and decoding k fragments.

Contract:
* Only data fragments (index < k) are kept, and only bytes that were
  verified against their checksums (the sources) or decoded from such
  bytes (the lost fragment): whatever is served from here is as good as
  a verified read.
* Keys are chunk versions (`ChunkRef`): chunk ids are never reused,
  every rewrite of a chunk is a new id, and a fragment moved by repair is
  a new ref, so kept bytes never go stale; nothing is invalidated.
* At most KEEP_BYTES are kept, least recently kept fragment dropped first
  (an LRU over (ref, index) keys, all ranges of a key dropped together):
  bytes stay for as long as newer keeps leave room, seconds for a reader
  streaming at disk speed.
* Everything here runs on the event loop, without awaiting, except
  `wait_for_decode`; the byte ranges handed to `keep` are not copied, so
  the caller must not change them afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import trio

from ..core.model import ChunkRef

#: Verified bytes as read (a bytearray when read into a buffer: never copied again).
Bytes = bytes | bytearray

#: A sequential reader's degraded read decodes this many bytes of the lost
#: fragment at once (from the requested start, within its payload) and
#: keeps them, with the data-fragment sources, for its next requests; at
#: most KEEP_BYTES are kept (see the module docstring).
KEEP_SPAN = 1024 * 1024
KEEP_BYTES = 32 * 1024 * 1024
#: A degraded read of at least this many bytes is a stream's (`streaming`).
STREAM_REQUEST = 64 * 1024


class KeptBytes:
    """Verified or decoded byte ranges of data fragments, at most
    `limit` bytes, oldest key dropped first (see the module docstring)."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        self.limit = limit
        #: (chunk version, fragment index) -> [(start, end, verified bytes,
        #: whether they were decoded)], least recently kept first.
        self._ranges: OrderedDict[tuple[ChunkRef, int], list[tuple[int, int, Bytes, bool]]] = (
            OrderedDict()
        )
        self._bytes = 0
        #: Decodes to be kept under way: (ref, index) -> (start, end, done).
        self._decoding: dict[tuple[ChunkRef, int], tuple[int, int, trio.Event]] = {}

    def __bool__(self) -> bool:
        """Whether anything is kept (a cheap test before a lookup)."""
        return bool(self._ranges)

    def copy(self, ref: ChunkRef, index: int, frag_start: int, dest: memoryview) -> bool:
        """Fill `dest` with fragment `index` bytes from `frag_start` if they
        are kept (within one kept range); False if not."""
        kept = self.view(ref, index, frag_start, frag_start + len(dest))
        if kept is None:
            return False
        dest[:] = kept
        return True

    def view(self, ref: ChunkRef, index: int, frag_start: int, frag_end: int) -> memoryview | None:
        """Fragment `index` bytes [frag_start, frag_end) if they are kept
        (within one kept range): a read-only view of them, not a copy (it
        keeps the bytes alive after they are dropped here, and they never
        change: see the contract); None if not."""
        for a, _, data, _ in self._covering(ref, index, frag_start, frag_end):
            return memoryview(data).toreadonly()[frag_start - a : frag_end - a]
        return None

    def decoded(self, ref: ChunkRef, index: int, frag_start: int, frag_end: int) -> bool:
        """Whether fragment `index` bytes [frag_start, frag_end) are kept
        as decoded ones (a lost fragment's), not as a decode's verified
        source: a request served from them is a degraded read's (the
        reader counts it so)."""
        return any(decoded for *_, decoded in self._covering(ref, index, frag_start, frag_end))

    def covers(self, ref: ChunkRef, index: int, frag_start: int, frag_end: int) -> bool:
        """Whether fragment `index` bytes [frag_start, frag_end) are kept."""
        return any(True for _ in self._covering(ref, index, frag_start, frag_end))

    def _covering(
        self, ref: ChunkRef, index: int, frag_start: int, frag_end: int
    ) -> Iterator[tuple[int, int, Bytes, bool]]:
        """The kept ranges of fragment `index` that hold all of bytes
        [frag_start, frag_end), oldest first."""
        for kept in self._ranges.get((ref, index), ()):
            if kept[0] <= frag_start and frag_end <= kept[1]:
                yield kept

    def keep(
        self, ref: ChunkRef, k: int, lost: int, start: int, end: int, decoded: Bytes,
        sources: Mapping[int, Bytes],
    ) -> None:  # fmt: skip
        """Keep fragment `lost`'s decoded bytes [start, end) and those of the
        data-fragment `sources` (verified; indices below `k`, the chunk's
        data fragments: parity is not kept), dropping the oldest beyond
        `limit`."""
        for index, data in [(lost, decoded), *sources.items()]:
            if index >= k or len(data) != end - start:
                continue
            key = (ref, index)
            ranges = self._ranges.setdefault(key, [])
            ranges.append((start, end, data, index == lost))
            self._ranges.move_to_end(key)
            self._bytes += end - start
        while self._bytes > self.limit and self._ranges:
            _, dropped = self._ranges.popitem(last=False)
            self._bytes -= sum(b - a for a, b, _, _ in dropped)

    def whole_payloads(self, ref: ChunkRef, k: int, payload: int) -> dict[int, memoryview]:
        """The whole payloads (`payload` bytes) of the data fragments of
        `ref` (indices below `k`) that are kept: `whole_payload` of each."""
        whole: dict[int, memoryview] = {}
        for index in range(k):
            view = self.whole_payload(ref, index, payload)
            if view is not None:
                whole[index] = view
        return whole

    def whole_payload(self, ref: ChunkRef, index: int, payload: int) -> memoryview | None:
        """The whole payload (`payload` bytes) of fragment `index` of `ref`
        if it is kept, in one range (a view of it, not copied) or in ranges
        kept one after another (requests out of order: joined into a new
        buffer); None if not. Only this fragment's ranges are looked at."""
        ranges = sorted(self._ranges.get((ref, index), ()), key=lambda r: r[0])
        if ranges and ranges[0][0] == 0 and ranges[0][1] >= payload:
            return memoryview(ranges[0][2])[:payload]
        joined = bytearray()  # spans kept one after another (requests out of order)
        for a, b, data, _ in ranges:
            if a > len(joined):
                break
            if b > len(joined):
                joined += memoryview(data)[len(joined) - a :]
        return memoryview(joined)[:payload] if len(joined) >= payload else None

    def streaming(
        self, ref: ChunkRef, index: int, start: int, end: int, continues: bool = True
    ) -> bool:
        """Whether fragment range [start, end) looks like a sequential
        stream's: a large request (STREAM_REQUEST bytes or more: FUSE's
        read-ahead), the start of the fragment for a request that
        `continues` the file's previous one (the caller knows), or where
        bytes kept for it end. A small random read of a chunk that a
        sequential reader had read ahead earlier is not one: decoding
        KEEP_SPAN for it would read k x KEEP_SPAN bytes for 4 KiB
        (measured: it made the p99 of 4 KiB random reads after a
        sequential read 10x that of the others)."""
        if end - start >= STREAM_REQUEST or (start == 0 and continues):
            return True
        return any(b == start for _, b, _, _ in self._ranges.get((ref, index), ()))

    @contextmanager
    def decoding(self, ref: ChunkRef, index: int, start: int, end: int) -> Iterator[None]:
        """Mark a decode of fragment `index` bytes [start, end), to be kept,
        as under way for the body of the `with` (unless one of that
        fragment is under way already): `wait_for_decode` waits for it.
        Its waiters are woken when the body ends, however it ends."""
        key = (ref, index)
        done = trio.Event()
        if key not in self._decoding:
            self._decoding[key] = (start, end, done)
        try:
            yield
        finally:
            if self._decoding.get(key, (0, 0, None))[2] is done:
                del self._decoding[key]
            done.set()

    def under_way(self, ref: ChunkRef, index: int) -> bool:
        """Whether a decode of fragment `index` to be kept is under way."""
        return (ref, index) in self._decoding

    async def wait_for_decode(self, ref: ChunkRef, index: int, start: int, end: int) -> bool:
        """If a decode under way (`decoding`) covers fragment `index` bytes
        [start, end), wait for it to end and return True (its bytes are
        kept then, unless it failed or they were dropped already: `copy`
        tells); False at once, without a checkpoint, if none does."""
        decoding = self._decoding.get((ref, index))
        if decoding is None or not (decoding[0] <= start and end <= decoding[1]):
            return False
        await decoding[2].wait()
        return True
