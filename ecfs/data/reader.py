"""Reading byte ranges of chunks: healthy, and degraded by range decode.

Owns: turning "bytes [start, end) of chunk version X" into verified bytes,
choosing which fragments to read, and reporting damage. Must not: touch the
metadata database (damage goes to the `on_damage` callback), write anything
to stores, or know about files.

Healthy read: the data fragments holding the range are read, cell-aligned,
one store read each (on the event loop through `Store.read_fragment_cached`
when the store has the bytes at hand, e.g. in the page cache, otherwise one
thread call per fragment), and every touched cell is verified against its
checksum. A cached read that misses is tried once more after one pass of
the loop (the miss made the kernel start reading the pages: on a fast
device they are in by then) before the hedged read; cached reads are
never timed, so the stores' latency statistics are those of their
thread reads. Fragments are named to stores by (chunk, index, byte range); the
reader never sees how a store keeps them (no file descriptors here).

Degraded read: when a data fragment is missing, its store unavailable, its
cells fail their checksums, or the read errors or times out, the SAME
cell-aligned byte range [a, b) is read from k surviving fragments (those
read ahead for the chunk first, then the fastest stores, data fragments
before parity on ties) and only that range is decoded. When the headers of k of those fragments on healthy stores are
known (sequential readers have them read ahead, parity included), the k
reads, their checks
and the decode are one worker-thread call; otherwise, or if that call
fails or is slow, each source is read and hedged on its own. zfec is
systematic and works byte position by byte position, so bytes [a, b) of
any k fragments determine bytes [a, b) of every other one.
Fewer than k good fragments for the range: Unrecoverable (EIO), never
guessed or zeroed bytes. Every k, fragment length and header check above
is the chunk's own (`Layout.of(ref)`, `Expected.of(ref)`: a chunk written
under a redundancy policy has its own k' + m'; codecs are shared per
coding: `Codec.for_layout`).
A fragment the writer is still writing (a
straggler, `writing`, see `ecfs.data.writer`) that is found missing is
decoded around the same way but not reported as damage.
A fragment known not to be on its store yet (`not_rebuilt`: the store
was replaced and repair has not rebuilt it) is not asked for at all: it
is decoded from the others at once (not damage: it is queued), instead of
waiting in the new store's queue behind the rebuild's writes to learn
that it is missing; it is no source, and read-ahead skips it.

Kept bytes of degraded reads (`ecfs.data.kept`, which states what is
kept and for how long): a sequential reader (its chunk was read ahead:
`prefetch`, and the request looks like a stream's:
`KeptBytes.streaming`) that needs a data fragment decoded, because its
store is unavailable or routed around, has the range decoded up to
KEEP_SPAN bytes ahead at once (`_read_degraded_kept`), and the decoded
bytes and the verified data-fragment sources of that decode are kept.
Its next requests for that fragment and for the neighbouring data
fragments are then served from those bytes on the loop (`read_cached`),
and concurrent requests covered by a decode under way wait for it
(`_kept_or_span`). The decode starts with the chunk's first stream
request, whichever data fragment it is for (`_decode_first`): the
requests for the data fragments before the decoded one are served from
its kept sources too, so each cell is read and checked once, not by a
cached read and again by the decode. A repair takes the whole payloads
kept (`kept_payloads`, or one fragment's: `kept_payload`).

Decoding ahead: the first request of a chunk whose data fragment is
decoded waited for that decode (k sources read and checked, the decode:
about 5 ms for a 4 MiB chunk, as long as the chunk takes to stream at 750
MiB/s), and every request of the stream queued behind it; at 150 MiB/s
per device a sequential read with one device missing or slow ran at
0.8 of its limit, and one next to a rebuild at 0.55-0.65 of healthy.
So when a sequential reader reads a chunk (its first request of it that
looks like a stream's, in `read_cached`: from the chunk's start and
continuing the file's previous request, or of STREAM_REQUEST bytes or
more; random 4 KiB reads that fall on chunks read ahead earlier decoded
k MiB ahead each, and ran at 0.5-0.8 of their rate with one device slow
or missing), the next DECODE_AHEAD chunks it read ahead that have one
data fragment to decode (`_decoded_in_plan`: planned with a parity in
its place, its store unavailable, routed around or not rebuilt yet)
have it decoded in the background (`_decode_ahead`, in the nursery given
by `attach`), by the same path as that request would take
(`_read_hedged`: the same reasons, counters, damage reports and kept
bytes); the request finds the bytes kept, or waits for the decode under
way. Measured (scripts/bench_disks.py --reads-only, 150 MiB/s, one run
of the old code, six of the new, same session): one device missing 622
-> 698-747 MiB/s, one at 2 MiB/s 601 -> 677-725, the reader next to a
rebuild 489 -> 436-616 (median 602).

Shared with a rebuild: a repair about to rebuild a chunk's fragment that
a sequential reader's plan decodes (`_decoded_in_plan`) asks the reader
first (`decode_for_repair`): it waits for that decode if one is under
way, else has it done now by the decoding-ahead path, and takes the kept
payloads (the decoded fragment and its data-fragment sources) instead of
reading k fragments itself; the reader then finds the bytes kept. So the
rebuild's front and the reader decode each chunk once between them,
whichever of the two comes first (before, when the front ran in step
with the reader, both read every chunk: in 4 of 14 runs at 150 MiB/s per
device readers' decodes supplied 2-16 of ~235 rebuilt fragments, and the
repair read 870-930 MiB; with this, 166-170 in 18 of 20 runs, the
repair reading 236-348 MiB; in the other two, a reader slowed by
profiling was elsewhere in the file when the rebuild started and met its
front late: fewer shared, none read twice).

Which sources: a chunk planned with a data fragment replaced has its
parity read ahead from the store with the shortest read-ahead backlog
(`ReadAhead.queued`; latency estimates, which a sequential reader's
page-cache reads seldom update, sent every replacement to the same
stores: two of five devices idled a third of the time), and its
degraded reads use the fragments read ahead for it first (`_chosen`).

Reading around a lagging store (issue 17): whether a store is waited
for, and how long, is decided by the reader's `Router`
(`ecfs.data.routing`, which states the rule); the reader acts on its
answers. A data fragment whose store is routed around
(`Router.route_around`) is not waited for: its range is decoded from k
others at once (a "routed" read: not damage, nothing is queued for
repair; a small one on the loop from k cached sources when it can, tried
again after one pass of the loop as a healthy read is,
`_decode_cached`), read-ahead plans a parity fragment in its place (and
plans the chunks read ahead lately again when the store starts lagging
or is found unavailable: `_replan`, called by the router), cached reads
are not tried on it, and now and then a probe read, not waited for,
goes to it (`_probe`, when `Router.probe_due`) so that its latency stays
measured. A read that is waited for is hedged (`_read_hedged`) after
`Router.hedge_deadline`, when `Router.may_hedge`: the same range is
decoded from others too and the first answer wins; a hedge that wins
records what the abandoned read had waited so far (a lower bound of its
latency), so a store turning slow is measured as such, and tells the
router (`Router.note_outrun`), which fails a store only when it has
stopped answering altogether.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

import trio

from ..core import fragment
from ..core.codec import Codec
from ..core.errors import EcfsError, FragmentCorrupt, FragmentMissing, StoreError, Unrecoverable
from ..core.geometry import FragmentPiece, Layout
from ..core.model import ChunkRef
from ..core.tasks import gather_in_order, guarded, open_fan_out
from ..storage.handles import Expected, HandleCache, read_header
from ..storage.offload import SMALL_READ, StoreRunner, available_runner, run_cpu, run_in_thread
from ..storage.store import Store
from .damage import STORE_UNAVAILABLE
from .kept import KEEP_SPAN, STREAM_REQUEST, Bytes, KeptBytes
from .readahead import ReadAhead
from .routing import Router

log = logging.getLogger(__name__)

#: Called with (chunk, fragment indices found bad, reason) after a degraded read.
DamageCallback = Callable[[ChunkRef, list[int], str], None]

#: A cold read starting this close to the payload start is read together
#: with the header in one pread.
ONE_READ_GAP = 64 * 1024

#: Degraded reads done at once in one worker-thread call each.
ONE_CALL_THREADS = 8

#: A sequential reader's next chunks with a data fragment to decode have
#: it decoded in the background this many chunks ahead of the chunk it
#: reads (see "Decoding ahead" in the module docstring).
DECODE_AHEAD = 2

#: Chunks read ahead that are planned again when a store starts lagging:
#: a sequential reader's read-ahead window (filedata.PREFETCH_CHUNKS = 16)
#: and a few behind it (those, already read, cost a parity read each).
PLANNED_CHUNKS = 24
#: Chunks whose read-ahead sources are remembered (`_chosen`).
CHOSEN_CHUNKS = 2 * PLANNED_CHUNKS


@dataclass(slots=True)
class ReadCounters:
    """Bytes asked for versus bytes read from stores, healthy and degraded."""

    requested_bytes: int = 0
    #: Bytes read from stores for the healthy path (not a decode's sources).
    store_bytes: int = 0
    #: Decodes of a fragment range (for a request, or ahead of one).
    degraded_reads: int = 0
    #: Bytes asked for that were served decoded: at once, or from the
    #: kept bytes of a decode (see `_count_kept`).
    degraded_requested_bytes: int = 0
    #: Bytes read from stores to decode.
    degraded_store_bytes: int = 0
    unrecoverable_reads: int = 0
    hedged_reads: int = 0
    nowait_hits: int = 0
    thread_reads: int = 0
    #: Degraded reads done in one worker-thread call (`_decode_in_one_call`).
    one_call_reads: int = 0
    #: Data ranges decoded from k others because their store lagged (not damage).
    routed_reads: int = 0
    #: Reads sent to a routed-around store to keep its latency measured.
    probe_reads: int = 0
    #: Pieces served from the kept bytes of a degraded read (see KEEP_SPAN).
    kept_reads: int = 0


@dataclass(frozen=True, slots=True)
class ReadStatistics:
    """A snapshot of the read counters (from `ChunkReader.statistics()`)."""

    requested_bytes: int
    store_bytes: int
    degraded_reads: int
    degraded_requested_bytes: int
    degraded_store_bytes: int
    unrecoverable_reads: int
    hedged_reads: int
    nowait_hits: int
    thread_reads: int
    one_call_reads: int
    routed_reads: int = 0
    probe_reads: int = 0


def read_verified(
    store: Store, header: fragment.FragmentHeader, start: int, end: int
) -> bytearray:
    """Blocking: read payload bytes [start, end) (cell-aligned) and verify."""
    data = bytearray(end - start)
    n = store.read_fragment(
        header.chunk_id, header.index, header.payload_offset + start, memoryview(data)
    )
    verify_payload(header, start, end, memoryview(data)[:n])
    return data


def _open_and_read(
    store: Store, chunk_id: int, index: int, expected: Expected, start: int, end: int
) -> tuple[fragment.FragmentHeader, bytes | bytearray]:
    """Blocking: read and verify a fragment's header, then the range. A
    range near the start of the payload is read with the header in one
    request (one disk request for a cold fragment)."""
    together = fragment.HEADER_PROBE_SIZE + end if start < ONE_READ_GAP else 0
    header, prefix = read_header(store, chunk_id, index, expected, probe=together)
    offset = header.payload_offset
    if len(prefix) >= offset + end:
        data = bytes(prefix[offset + start : offset + end])
        verify_payload(header, start, end, data)
        return header, data
    return header, read_verified(store, header, start, end)


def _decode_range(
    codec: Codec,
    sources: list[tuple[Store, fragment.FragmentHeader]],
    lost: int,
    start: int,
    end: int,
    unopened: tuple[Store, int, int, Expected, int] | None = None,
) -> tuple[bytes, dict[int, bytearray], fragment.FragmentHeader | None] | None:
    """Blocking (one worker thread): bytes [start, end) of fragment `lost`,
    decoded from the same range of k `sources` (store, verified header),
    and the verified source bytes by index. Their reads are started
    together (`Store.prefetch`), then read and verified in turn, so the
    wait is about one disk read, not k. One more source may be given
    `unopened` (store, chunk id, index, expected, payload length): its
    header is read and verified here first, and returned (for the handle
    cache). None if a source cannot be read or fails its checksums (the
    caller then takes the general path, which finds out which one and
    reads another)."""
    opened = None
    try:
        if unopened is not None:
            store, chunk_id, index, expected, payload = unopened
            opened, _ = read_header(store, chunk_id, index, expected)
            if opened.payload_length != payload:
                return None
            sources = [*sources, (store, opened)]
        for store, header in sources:
            store.prefetch(
                header.chunk_id, header.index, header.payload_offset + start, end - start
            )
        pieces = {h.index: read_verified(store, h, start, end) for store, h in sources}
    except (EcfsError, FragmentCorrupt):
        return None
    return codec.decode(pieces, [lost])[lost], pieces, opened


def verify_payload(
    header: fragment.FragmentHeader, start: int, end: int, data: fragment.Buffer
) -> None:
    """`data` is payload bytes [start, end) of the fragment of `header`,
    whole and with good cells; FragmentCorrupt if not."""
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
        on_missing: Callable[[int], None] | None = None,
    ) -> None:
        self.layout = layout
        self.codec = codec
        self.runners = runners
        self.handles = handles
        self.expected = expected
        self.on_damage = on_damage
        self.on_missing = on_missing
        #: (store, chunk id, index) of fragments being written now (the
        #: writer's stragglers): a read that finds one missing decodes it
        #: from the others without reporting damage.
        self.writing: Container[tuple[int, int, int]] = frozenset()
        #: Store -> ids of chunks whose fragment on it is known not to be
        #: there yet (the repairer's `Repairer.not_rebuilt`): never read.
        self.not_rebuilt: Mapping[int, Container[int]] = {}
        #: Called with (ref, index) when a read decoded around such a
        #: fragment (the repairer rebuilds the chunks being read first,
        #: from what the read kept: `kept_payloads`).
        self.on_not_rebuilt: Callable[[ChunkRef, int], None] | None = None
        self.read_timeout = read_timeout
        self.counters = ReadCounters()
        #: Whether to wait for a store, and how long (`ecfs.data.routing`).
        self.router = Router(layout, runners, replan=self._replan)
        self.readahead = ReadAhead(
            handles, expected, on_failed=self._read_ahead_failed, on_answer=self.router.answered
        )
        self.router.delivery_rate = self.readahead.delivery_rate
        #: The chunks read ahead last (planned again when a store lags).
        #: (in the order planned, the last PLANNED_CHUNKS: an ordered dict,
        #: so that "was it read ahead?" costs one lookup per request)
        self._planned: OrderedDict[ChunkRef, None] = OrderedDict()
        #: Chunks planned lately with a data fragment replaced -> the
        #: fragment indices read ahead for them (the sources their
        #: degraded reads use first: `_read_degraded`).
        self._chosen: OrderedDict[ChunkRef, set[int]] = OrderedDict()
        #: Worker threads for one-call degraded reads (`_decode_in_one_call`).
        self._one_call_limiter = trio.CapacityLimiter(ONE_CALL_THREADS)
        #: Kept bytes of degraded reads (see `ecfs.data.kept`).
        self._kept = KeptBytes()
        #: Where decodes ahead run (`attach`; None: no decoding ahead), and
        #: the chunk whose read started the last look ahead (`_decode_ahead`).
        self._nursery: trio.Nursery | None = None
        self._ahead_of: int | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the reader the nursery its decodes ahead run in (see
        "Decoding ahead" in the module docstring); without one, a chunk's
        lost fragment is decoded when it is first asked for."""
        self._nursery = nursery

    def _codec(self, ref: ChunkRef) -> Codec:
        """The codec of chunk `ref` (its own coding, or the volume's:
        `Codec.for_layout`)."""
        return self.codec.for_layout(self.layout.of(ref))

    def statistics(self) -> ReadStatistics:
        c = self.counters
        return ReadStatistics(
            c.requested_bytes, c.store_bytes, c.degraded_reads, c.degraded_requested_bytes,
            c.degraded_store_bytes, c.unrecoverable_reads, c.hedged_reads, c.nowait_hits,
            c.thread_reads, c.one_call_reads, c.routed_reads, c.probe_reads,
        )  # fmt: skip

    def prefetch(self, ref: ChunkRef) -> None:
        """Open the data fragments of a chunk a sequential reader will want
        next and have their payload read into the page cache in the
        background (see readahead), so that the reads themselves are served
        on the loop. A data fragment whose store is unavailable, or lags
        (`Router.route_around`), will be decoded: one more fragment (the best
        available parity) is read ahead in its place, so that the degraded
        read finds all k sources in the page cache too. Best effort;
        returns at once."""
        planned = self._planned
        planned[ref] = None
        planned.move_to_end(ref)
        if len(planned) > PLANNED_CHUNKS:
            planned.popitem(last=False)
        self._plan(ref)

    def _plan(self, ref: ChunkRef) -> None:
        """Ask read-ahead for the fragments a read of `ref` will use (and
        note them: `_chosen`)."""
        k = self.layout.of(ref).k
        chosen: set[int] = set()
        replacements = 0
        for index in range(k):
            if self.router.route_around(ref, index) or not self._read_ahead(ref, index):
                replacements += 1
            else:
                chosen.add(index)
        before = self._chosen.pop(ref, None)
        if replacements:
            self._read_ahead_parity(ref, replacements, chosen, before)
            self._note_chosen(ref, chosen)

    def _read_ahead_parity(
        self, ref: ChunkRef, count: int, chosen: set[int], before: set[int] | None = None
    ) -> None:
        """Ask read-ahead for `count` parity fragments of `ref` not in
        `chosen` (in place of data fragments that will be decoded), from
        the stores with the shortest read-ahead backlog (those chosen
        `before` for the chunk first, then ties in the usual order,
        `sources`), and add them to `chosen`. (By latency alone, estimates
        that the page-cache reads of a sequential reader seldom update,
        the same parity stores took every replacement: at 150 MiB/s per
        device two of five stores idled a third of the time, and a read
        with one device slow ran at 4 x cap, not 5 x.)"""
        k = self.layout.of(ref).k
        parity = self.sources(ref, exclude=set(range(k)) | chosen)
        queued = self.readahead.queued
        parity.sort(key=lambda i: (before is None or i not in before, queued(ref.stores[i])))
        for index in parity:
            if count == 0:
                break
            if self._read_ahead(ref, index):
                chosen.add(index)
                count -= 1

    def _note_chosen(self, ref: ChunkRef, chosen: set[int]) -> None:
        """Remember the fragments read ahead for `ref` (the last
        CHOSEN_CHUNKS chunks with a replaced data fragment)."""
        self._chosen[ref] = chosen
        while len(self._chosen) > CHOSEN_CHUNKS:
            self._chosen.popitem(last=False)

    def _read_ahead_failed(self, key: tuple[int, int, int]) -> None:
        """Read-ahead could not open fragment `key` (missing: its store is
        being rebuilt, say): if it is a data fragment of a chunk planned
        lately, read a parity fragment not yet asked for ahead in its
        place (`_read_ahead_parity`), so that the degraded read finds k
        sources cached."""
        _, chunk_id, index = key
        for ref in reversed(self._planned):
            if ref.chunk_id == chunk_id:
                k = self.layout.of(ref).k
                if index >= k:
                    return
                chosen = self._chosen.pop(ref, None) or set(range(k))
                chosen.discard(index)
                if len(chosen) < k:
                    self._read_ahead_parity(ref, k - len(chosen), chosen)
                self._note_chosen(ref, chosen)
                return

    def _replan(self, store: int) -> None:
        """`store` lags or is unavailable now: drop its read-ahead still
        queued and plan the chunks read ahead lately that have a data
        fragment on it again (parity in its place)."""
        self.readahead.drop(store)
        for planned in list(self._planned):
            if store in planned.stores[: self.layout.of(planned).k]:
                self._plan(planned)

    def _read_ahead(self, ref: ChunkRef, index: int) -> bool:
        """Ask for fragment `index` of `ref` to be read ahead; False if its
        store is unavailable."""
        store = ref.stores[index]
        runner = available_runner(self.runners, store)
        if runner is None or self._not_rebuilt(store, ref.chunk_id):
            return False
        self.readahead.request((store, ref.chunk_id, index), runner.store, self.expected.of(ref))
        return True

    async def read(self, ref: ChunkRef, start: int, end: int) -> bytearray:
        """Verified chunk bytes [start, end), 0 <= start < end <= ref.length."""
        out = bytearray(end - start)
        await self.read_into(ref, start, end, memoryview(out))
        return out

    async def read_into(self, ref: ChunkRef, start: int, end: int, dest: memoryview) -> None:
        """Fill `dest` (end - start bytes) with verified chunk bytes [start, end)."""
        missing = self.read_cached(ref, start, end, dest)
        if missing:
            await self.read_missing(ref, start, missing, dest)

    def read_cached(
        self, ref: ChunkRef, start: int, end: int, dest: memoryview, *, stream: bool = True
    ) -> list[FragmentPiece]:
        """The fast path, on the loop without awaiting: fill the parts of
        `dest` (chunk bytes [start, end)) whose fragments are open and whose
        bytes are in the page cache. Returns the pieces not served (to be
        passed to `read_missing`); an empty list means `dest` is complete.
        `stream` False: the caller knows the request does not continue a
        sequential read (a small one from the chunk's start then starts no
        decoding ahead: see `_note_request`)."""
        if not 0 <= start < end <= ref.length:
            raise ValueError(f"bad chunk range [{start}, {end}) of {ref.length}")
        self._note_request(ref, start, end, stream)
        layout = self.layout.of(ref)
        payload = layout.payload_length(ref.length)
        missing = []
        for piece in layout.data_pieces(ref.length, start, end):
            at = piece.chunk_start - start
            if self._chosen and self._decode_first(ref, payload, piece) is not None:
                missing.append(piece)  # served from the decode's sources
            elif not self._read_cached_nowait(ref, payload, piece, dest[at : at + piece.length]):
                missing.append(piece)
        return missing

    @property
    def keeps_bytes(self) -> bool:
        """Whether degraded reads keep any bytes now (if not, `read_kept`
        serves nothing: a caller skips what it would look up for it)."""
        return bool(self._kept)

    def read_kept(
        self, ref: ChunkRef, start: int, end: int, *, stream: bool = True
    ) -> memoryview | None:
        """Chunk bytes [start, end) without reading or copying them, when
        they lie in one data fragment whose bytes a degraded read keeps
        (see `ecfs.data.kept`): a read-only view of the kept bytes, which
        never change. None if not (nothing is counted then: `read_cached`
        serves the request). Saves a sequential reader's degraded chunks
        the copy of each request out of the kept bytes. `stream`: as for
        `read_cached`."""
        if not self._kept or not 0 <= start < end <= ref.length:
            return None
        pieces = self.layout.of(ref).data_pieces(ref.length, start, end)
        if len(pieces) != 1:
            return None
        piece = pieces[0]
        kept = self._kept.view(ref, piece.index, piece.frag_start, piece.frag_end)
        if kept is None:
            return None
        self._note_request(ref, start, end, stream)
        self._count_kept(ref, piece.index, piece.frag_start, piece.frag_end, end - start)
        return kept

    def _note_request(self, ref: ChunkRef, start: int, end: int, stream: bool) -> None:
        """Count a request for chunk bytes [start, end), and if it is a
        sequential reader's first of the chunk (STREAM_REQUEST bytes or
        more, or from the chunk's start and continuing a `stream`), start
        decoding ahead of it (see "Decoding ahead" in the module
        docstring). (A small request from a chunk's start that does not
        continue the file's previous one is a random reader's: it decoded
        DECODE_AHEAD chunks ahead, k whole fragments each, when it fell on
        a chunk read ahead lately; bench.py's random reads with a store
        missing read 4.6-5.0 bytes per degraded byte instead of 4.)"""
        self.counters.requested_bytes += end - start
        if (
            self._chosen
            and ref.chunk_id != self._ahead_of
            and ((start == 0 and stream) or end - start >= STREAM_REQUEST)
        ):
            self._decode_ahead(ref)

    async def read_missing(
        self, ref: ChunkRef, start: int, pieces: list[FragmentPiece], dest: memoryview,
        *, stream: bool = True,
    ) -> None:  # fmt: skip
        """Fill the parts of `dest` (chunk bytes from `start`) that
        `read_cached` left: read in worker threads, hedged, or decoded.
        `stream`: as for `read_cached` (a small decode from a fragment's
        start keeps KEEP_SPAN only for a stream: `_read_degraded_kept`)."""
        payload = self.layout.of(ref).payload_length(ref.length)
        if self._chosen and ref in self._chosen:
            pieces = await self._read_from_decode(ref, payload, start, pieces, dest)
        await gather_in_order(
            [
                functools.partial(self._read_piece, ref, payload, p, start, dest, stream)
                for p in pieces
            ]
        )

    async def read_fragment(self, ref: ChunkRef, index: int, start: int, end: int) -> Bytes:
        """Verified bytes [start, end) (cell-aligned) of fragment `index`
        itself; StoreError or FragmentCorrupt if it cannot be read."""
        return await self._read_fragment(ref, index, start, end)

    async def read_fragment_range(
        self, ref: ChunkRef, index: int, start: int, end: int
    ) -> Bytes:
        """Verified bytes [start, end) (cell-aligned) of fragment `index`,
        decoded from others if it cannot be read (used by repair)."""
        try:
            return await self._read_fragment(ref, index, start, end)
        except (StoreError, FragmentCorrupt) as exc:
            return await self._read_degraded(ref, index, start, end, str(exc))

    # -- one data piece ---------------------------------------------------------

    async def _read_piece(
        self, ref: ChunkRef, payload: int, piece: FragmentPiece, start: int, dest: memoryview,
        stream: bool,
    ) -> None:  # fmt: skip
        at = piece.chunk_start - start
        part = dest[at : at + piece.length]
        a, b = self.layout.of(ref).cell_range(piece.frag_start, piece.frag_end, payload)
        store = ref.stores[piece.index]
        runner = available_runner(self.runners, store)
        with self.router.busy((store,)):
            if (
                runner is not None
                and store not in self.router.avoided
                and self.handles.get((store, ref.chunk_id, piece.index)) is not None
            ):
                # The cached read that just missed (`read_cached`) made the
                # kernel start reading these pages: let the loop serve the
                # other requests once and try again, before the hedged read
                # (a nursery, two tasks, a deadline: about half the loop's
                # time per 4 KiB request at QD16). A hit is not timed, as
                # no cached read is: the store's latency statistics stay
                # those of its thread reads. (Timed, as a first try had it,
                # the hits took the EWMAs and percentiles of some stores to
                # near zero, against which the others' thread reads looked
                # slow: QD16 fell to 1,300-4,000 requests/s in some runs,
                # healthy reads routed around their stores.)
                await trio.lowlevel.checkpoint()
                if self._read_cached_nowait(ref, payload, piece, part):
                    return
            data = await self._read_hedged(ref, piece.index, a, b, piece.length, stream=stream)
        part[:] = memoryview(data)[piece.frag_start - a : piece.frag_end - a]

    def _read_cached_nowait(
        self, ref: ChunkRef, payload: int, piece: FragmentPiece, dest: memoryview
    ) -> bool:
        """Fill `dest` with `piece` from a known header and the store's
        cached bytes, on the loop; False if it cannot be done without
        blocking."""
        if self._kept and self._copy_kept(ref, piece.index, piece.frag_start, dest):
            return True
        store = ref.stores[piece.index]
        runner = available_runner(self.runners, store)
        if runner is None or store in self.router.avoided:
            # (a cached read that misses makes the kernel read ahead: not
            # on a store that already lags)
            return False
        key = (store, ref.chunk_id, piece.index)
        header = self.handles.get(key)
        if header is None:
            return False
        a, b = self.layout.of(ref).cell_range(piece.frag_start, piece.frag_end, payload)
        try:
            self._check_payload(ref, header)
            if a == piece.frag_start and b == piece.frag_end:
                done = self._read_nowait(runner.store, header, a, dest)  # into the caller's buffer
            else:
                cells = bytearray(b - a)
                done = self._read_nowait(runner.store, header, a, memoryview(cells))
                if done:
                    dest[:] = memoryview(cells)[piece.frag_start - a : piece.frag_end - a]
        except FragmentCorrupt:
            self.handles.discard(key)
            return False  # the slow path reads it again and reports the damage
        if done:
            self.counters.store_bytes += b - a
            runner.record_loop_read(b - a)
            if not runner.measured:
                # A store that serves from its cache: at hand, i.e. fast
                # (the one sample `Router.route_around` needs to compare with it).
                runner.record_latency(0.0)
        return done

    async def _read_hedged(
        self, ref: ChunkRef, index: int, start: int, end: int, wanted: int, *,
        stream: bool = True,
    ) -> Bytes:  # fmt: skip
        """Read one fragment range; if it fails, decode it from others; if it
        is slow (past its store's hedge deadline), ALSO decode it from others
        and take whichever answers first. The slow read keeps running until
        then (cancelling it abandons its thread, which the store's health
        counts; if it answers later, its time marks the store SLOW). A
        store measurably slower than the alternative is not waited for
        (`Router.route_around`): the range is decoded from k others at once and
        the store gets only a probe read."""
        store = ref.stores[index]
        runner = available_runner(self.runners, store)
        if runner is None:
            self.router.note_unavailable(store)
            kept = await self._kept_or_span(ref, index, start, end, wanted)
            if kept is not None:
                return kept
            self.counters.degraded_reads += 1
            self.counters.degraded_requested_bytes += wanted
            return await self._read_degraded_kept(
                ref, index, start, end, STORE_UNAVAILABLE, stream=stream
            )
        self.router.note_available(store)
        if self._not_rebuilt(store, ref.chunk_id):
            kept = await self._kept_or_span(ref, index, start, end, wanted)
            if kept is None:
                self.counters.degraded_reads += 1
                self.counters.degraded_requested_bytes += wanted
                kept = await self._read_degraded_kept(
                    ref, index, start, end, "not rebuilt yet", damaged=False, stream=stream
                )
            if self.on_not_rebuilt is not None:  # (once what it decoded is kept)
                self.on_not_rebuilt(ref, index)
            return kept
        if self.router.route_around(ref, index, end - start):
            await self._probe(runner, ref, index, start, end)
            kept = await self._kept_or_span(ref, index, start, end, wanted)
            if kept is not None:
                return kept
            if end - start <= SMALL_READ and not (
                ref in self._planned and self._kept.streaming(ref, index, start, end, stream)
            ):
                # A small routed read: its k sources from the page cache and
                # the decode on the loop, tried again after one pass of it
                # as `_read_piece` does (a worker thread for the k reads
                # and the decode made it the p99 of 4 KiB reads at QD1).
                decoded = self._decode_cached(ref, index, start, end)
                if decoded is None:
                    await trio.lowlevel.checkpoint()
                    decoded = self._decode_cached(ref, index, start, end)
                if decoded is not None:
                    self.counters.routed_reads += 1
                    return decoded
            # Its k reads count as outstanding on the stores the decode
            # reads first (the router weighs their queues).
            routed = [ref.stores[j] for j in self.sources(ref, {index})[: self.layout.of(ref).k]]
            with self.router.busy(routed):
                try:
                    data = await self._read_degraded_kept(
                        ref, index, start, end, f"store {store} lags", damaged=False,
                        stream=stream,
                    )  # fmt: skip
                except Unrecoverable:
                    # Not unrecoverable (yet): the lagging store is the only
                    # hope, read below.
                    self.counters.unrecoverable_reads -= 1
                else:
                    self.counters.routed_reads += 1
                    return data
        winner: list[Bytes] = []
        started = time.monotonic()
        errors: list[EcfsError] = []
        primary_done = trio.Event()

        async with open_fan_out() as nursery:

            async def primary() -> None:
                with self.router.waiting(store, started):
                    try:
                        winner.append(await self._read_fragment(ref, index, start, end))
                        self.router.note_in_time(store)
                        nursery.cancel_scope.cancel()
                    except (StoreError, FragmentCorrupt) as exc:
                        errors.append(exc)
                        if (
                            isinstance(exc, FragmentMissing)
                            and self.on_missing is not None
                            and (store, ref.chunk_id, index) not in self.writing
                        ):
                            self.on_missing(store)  # a vanished store looks like this
                    finally:
                        primary_done.set()

            async def hedge() -> None:
                small = end - start <= SMALL_READ
                size = end - start if small else None
                with trio.move_on_after(self.router.hedge_deadline(runner, ref, index, size)):
                    await primary_done.wait()
                c = self.counters
                may_hedge = self.router.may_hedge(c.hedged_reads, c.thread_reads + c.nowait_hits)
                if winner or (not errors and not may_hedge):
                    return
                reason = str(errors[0]) if errors else f"store {store} slow: hedged"
                if not errors:
                    self.counters.hedged_reads += 1
                try:
                    winner.append(
                        await self._degraded(
                            ref, index, start, end, wanted, reason, damaged=bool(errors)
                        )
                    )
                except Unrecoverable:
                    if errors:
                        raise
                    self.counters.unrecoverable_reads -= 1  # not (yet): see below
                    return  # the slow primary is the only hope: wait for it
                if not primary_done.is_set():
                    # The read it outran is abandoned (its latency is never
                    # sampled): what it took so far is a lower bound.
                    runner.record_latency(time.monotonic() - started, end - start)
                    self.router.note_outrun(runner)
                nursery.cancel_scope.cancel()

            nursery.start_soon(primary)
            nursery.start_soon(hedge)
        if winner:
            return winner[0]
        raise errors[0]

    def _decode_cached(self, ref: ChunkRef, lost: int, start: int, end: int) -> Bytes | None:
        """Fragment `lost`'s bytes [start, end) (cell-aligned, small) decoded
        on the loop from the cached bytes of the first k other fragments
        (`sources`) whose headers are known, on stores available and not
        routed around; None if fewer than k are known or one of them
        misses (each is tried: a miss makes its store start reading it,
        `Store.read_fragment_cached`) or fails its checks."""
        k = self.layout.of(ref).k
        payload = self.layout.of(ref).payload_length(ref.length)
        pieces: dict[int, Bytes] = {}
        tried = 0
        for j in self.sources(ref, {lost}):
            store = ref.stores[j]
            runner = available_runner(self.runners, store)
            if runner is None or store in self.router.avoided:
                continue
            header = self.handles.get((store, ref.chunk_id, j))
            if header is None or header.payload_length != payload:
                continue
            data = bytearray(end - start)
            try:
                if self._read_nowait(runner.store, header, start, memoryview(data)):
                    runner.record_loop_read(end - start)
                    pieces[j] = data
            except FragmentCorrupt:
                return None  # the general path reads it and reports it
            tried += 1
            if tried == k:
                break
        if len(pieces) < k:
            return None
        self.counters.degraded_store_bytes += k * (end - start)
        return self._codec(ref).decode(pieces, [lost])[lost]

    async def _probe(
        self, runner: StoreRunner, ref: ChunkRef, index: int, start: int, end: int
    ) -> None:
        """Send the read of a routed-around store anyway, at most every
        PROBE_INTERVAL and only when nothing else of its runs, without
        waiting for it: its latency is sampled when it ends."""
        if not self.router.probe_due(runner):
            return
        self.counters.probe_reads += 1
        header = self.handles.get((runner.index, ref.chunk_id, index))
        if header is None:
            await runner.start(
                _open_and_read, runner.store, ref.chunk_id, index, self.expected.of(ref),
                start, end,
                nbytes_read=end - start,
            )  # fmt: skip
        else:
            await runner.start(
                read_verified, runner.store, header, start, end, nbytes_read=end - start
            )

    async def _read_fragment(
        self, ref: ChunkRef, index: int, start: int, end: int
    ) -> Bytes:
        """Verified bytes of one fragment; StoreError/FragmentCorrupt if not.

        A known fragment's cached read (`Store.read_fragment_cached`) is
        tried (again) before a worker thread: on a directory store a
        RWF_NOWAIT read that misses (in `read_cached`) makes the kernel
        start reading those pages, and the disk often answers before a
        thread would even be woken (measured: p50 of a random 4 KiB read
        ~290 us with this second try, ~500 us without)."""
        store = ref.stores[index]
        runner = available_runner(self.runners, store)
        if runner is None:
            raise StoreError(f"fragment {index} of chunk {ref.chunk_id:016x}: store unavailable")
        key = (store, ref.chunk_id, index)
        header = self.handles.get(key)
        try:
            data: bytes | bytearray
            if header is None:
                opened, data = await runner.call(
                    _open_and_read,
                    runner.store,
                    ref.chunk_id,
                    index,
                    self.expected.of(ref),
                    start,
                    end,
                    timeout=runner.call_timeout(self.read_timeout),
                    nbytes_read=end - start,
                )
                self.handles.insert(key, opened)
                self._check_payload(ref, opened)
                self.counters.thread_reads += 1
            else:
                self._check_payload(ref, header)
                data = bytearray(end - start)
                if not self._read_nowait(runner.store, header, start, memoryview(data)):
                    data = await runner.call(
                        read_verified,
                        runner.store,
                        header,
                        start,
                        end,
                        timeout=runner.call_timeout(self.read_timeout),
                        nbytes_read=end - start,
                    )
                    self.counters.thread_reads += 1
        except FragmentCorrupt:
            self.handles.discard(key)
            raise
        self.counters.store_bytes += end - start
        return data

    def _check_payload(self, ref: ChunkRef, header: fragment.FragmentHeader) -> None:
        if header.payload_length != self.layout.of(ref).payload_length(ref.length):
            raise FragmentCorrupt(f"chunk {ref.chunk_id:016x}: fragment payload length mismatch")

    def _read_nowait(
        self, store: Store, header: fragment.FragmentHeader, start: int, dest: memoryview
    ) -> bool:
        """Read payload bytes [start, start + len(dest)) (cell-aligned) into
        `dest` and verify them, if the store has them at hand
        (`Store.read_fragment_cached`: on the loop, never blocking); False
        if it has not. FragmentCorrupt if they fail their checksums."""
        if not store.read_fragment_cached(
            header.chunk_id, header.index, header.payload_offset + start, dest
        ):
            return False
        verify_payload(header, start, start + len(dest), dest)
        self.counters.nowait_hits += 1
        return True

    # -- degraded ---------------------------------------------------------------

    async def _degraded(
        self, ref: ChunkRef, lost: int, start: int, end: int, wanted: int, reason: str,
        damaged: bool = True,
    ) -> bytes:  # fmt: skip
        self.counters.degraded_reads += 1
        self.counters.degraded_requested_bytes += wanted
        return await self._read_degraded(ref, lost, start, end, reason, damaged)

    async def _read_degraded(
        self, ref: ChunkRef, lost: int, start: int, end: int, reason: str,
        damaged: bool = True, keep: bool = False,
    ) -> bytes:  # fmt: skip
        """Bytes [start, end) of fragment `lost`, decoded from k others.
        `lost` is reported as damaged (with any source found bad) unless
        `damaged` is False (it is only slow). With `keep`, the decoded bytes
        and the data-fragment sources are kept (see `ecfs.data.kept`)."""
        k = self.layout.of(ref).k
        candidates = self.sources(ref, exclude={lost})
        chosen = self._chosen.get(ref)
        if chosen:
            # The fragments read ahead for it first: in the page cache, and
            # spread over the stores (`_read_ahead_parity`).
            candidates.sort(key=lambda i: i not in chosen)  # stable
        one_call = await self._decode_in_one_call(
            ref, candidates, lost, start, end, chosen or ()
        )
        if one_call is not None:
            decoded_fast, sources = one_call
            self.counters.one_call_reads += 1
            self.counters.degraded_store_bytes += k * (end - start)
            if damaged:
                self._damage(ref, [lost], reason)
            if keep:
                self._kept.keep(ref, k, lost, start, end, decoded_fast, sources)
            return decoded_fast
        pieces, bad, bytes_read = await self.gather_fragments(ref, candidates, start, end)
        self.counters.degraded_store_bytes += bytes_read
        if damaged:
            self._damage(ref, [lost], reason)
        if bad:  # (logged apart: `reason` is the lost fragment's)
            self._damage(ref, bad, f"sources of a read around fragment {lost} ({reason})")
        if len(pieces) < k:
            self.counters.unrecoverable_reads += 1
            raise Unrecoverable(
                f"chunk {ref.chunk_id:016x}: fewer than {k} good fragments for"
                f" bytes [{start}, {end}) of fragment {lost}"
            )
        decoded = await run_cpu(self._codec(ref).decode, pieces, [lost], size=end - start)
        if keep:
            self._kept.keep(ref, k, lost, start, end, decoded[lost], pieces)
        return decoded[lost]

    def _damage(self, ref: ChunkRef, bad: list[int], reason: str) -> None:
        """Report `bad` fragments of `ref`, except those still being written
        (`writing`: a straggler is missing until it lands, not damaged)."""
        if self.writing:
            bad = [i for i in bad if (ref.stores[i], ref.chunk_id, i) not in self.writing]
        if bad:
            self.on_damage(ref, bad, reason)

    # -- kept bytes of degraded reads (see ecfs.data.kept) ----------------------

    def _copy_kept(
        self, ref: ChunkRef, index: int, frag_start: int, dest: memoryview,
        wanted: int | None = None,
    ) -> bool:  # fmt: skip
        """Fill `dest` with fragment `index` bytes from `frag_start` if they
        are kept (counted, as `wanted` bytes asked for, default all of
        `dest`: `_count_kept`); False if not."""
        if not self._kept.copy(ref, index, frag_start, dest):
            return False
        wanted = len(dest) if wanted is None else wanted
        self._count_kept(ref, index, frag_start, frag_start + len(dest), wanted)
        return True

    def _count_kept(
        self, ref: ChunkRef, index: int, frag_start: int, frag_end: int, wanted: int
    ) -> None:
        """Count a request served from kept bytes (`kept_reads`); one
        served from a decoded fragment's is a degraded read's, decoded
        ahead or for an earlier request: its `wanted` bytes count as
        `degraded_requested_bytes` (the decode counted its reads in
        `degraded_store_bytes`), so that the two still compare bytes read
        to decode with bytes served decoded. A kept source's bytes are a
        healthy fragment's (read once for the decode), not counted so."""
        self.counters.kept_reads += 1
        if self._kept.decoded(ref, index, frag_start, frag_end):
            self.counters.degraded_requested_bytes += wanted

    def _decode_first(self, ref: ChunkRef, payload: int, piece: FragmentPiece) -> int | None:
        """The data fragment to decode first for `piece` of a healthy data
        fragment, or None: in a sequential reader's chunk with a data
        fragment decoded (`_decoded_in_plan`), a stream's request
        (STREAM_REQUEST bytes, or a whole small fragment) whose bytes are
        not kept yet is served from the sources of that decode (which reads
        and verifies them anyway, and keeps them: see the module
        docstring) rather than read from its store first and by the decode
        again."""
        lost = self._decoded_in_plan(ref)  # (None at once for a chunk not in `_chosen`)
        if (
            lost is None
            or lost == piece.index
            or self._kept.covers(ref, piece.index, piece.frag_start, piece.frag_end)
        ):
            return None
        a, b = self.layout.of(ref).cell_range(piece.frag_start, piece.frag_end, payload)
        if b - a < min(STREAM_REQUEST, payload):
            return None
        return lost

    def _decoded_in_plan(self, ref: ChunkRef) -> int | None:
        """The one data fragment of `ref`, a chunk a sequential reader has
        read ahead lately, that its reads decode: planned with a parity in
        its place (`_chosen`), and its store unavailable, routed around, or
        new and without it (`not_rebuilt`); None if there is no such
        fragment, or more than one (the general path)."""
        chosen = self._chosen.get(ref)
        if chosen is None or ref not in self._planned:
            return None
        lost = None
        for index in range(self.layout.of(ref).k):
            if index not in chosen:
                if lost is not None:
                    return None  # two decoded: the general path
                lost = index
        if lost is None:
            return None
        store = ref.stores[lost]
        if (
            store not in self.router.avoided
            and available_runner(self.runners, store) is not None
            and not self._not_rebuilt(store, ref.chunk_id)
        ):
            return None  # read again
        return lost

    def _decode_ahead(self, ref: ChunkRef) -> None:
        """A sequential reader reads `ref` now: have the lost data fragment
        of each of the next DECODE_AHEAD chunks it read ahead
        (`_decoded_in_plan`) decoded in the background, so that its first
        request finds it kept (see "Decoding ahead" in the module
        docstring). Returns at once."""
        self._ahead_of = ref.chunk_id
        if self._nursery is None or ref not in self._planned:
            return
        after = itertools.dropwhile(lambda planned: planned != ref, self._planned)
        for ahead in itertools.islice(after, 1, 1 + DECODE_AHEAD):
            lost = self._decoded_in_plan(ahead)
            if lost is None or self._kept.under_way(ahead, lost):
                continue
            layout = self.layout.of(ahead)
            payload = layout.payload_length(ahead.length)
            stop = layout.cell_range(0, min(payload, KEEP_SPAN), payload)[1]
            if not self._kept.covers(ahead, lost, 0, stop):
                self._nursery.start_soon(guarded, "decode ahead", self._decode_one_ahead, ahead, lost, stop)

    async def decode_for_repair(self, ref: ChunkRef, broken: Container[int]) -> None:
        """A repair is about to rebuild the `broken` fragments of `ref`: if
        a sequential reader's plan decodes one of them (`_decoded_in_plan`),
        have it decoded once for both (see "Shared with a rebuild" in the
        module docstring): wait for that decode if it is under way, else
        decode it now as decoding ahead would. The repair then takes the
        kept payloads (`kept_payloads`); a decode that fails leaves it to
        read them itself. Nothing is done for a fragment longer than one
        decode keeps (KEEP_SPAN): the repair could not take it whole."""
        lost = self._decoded_in_plan(ref)
        if lost is None or lost not in broken:
            return
        layout = self.layout.of(ref)
        payload = layout.payload_length(ref.length)
        stop = layout.cell_range(0, min(payload, KEEP_SPAN), payload)[1]
        if stop < payload:
            return
        if not await self._kept.wait_for_decode(ref, lost, 0, stop):
            if not self._kept.covers(ref, lost, 0, stop):
                await self._decode_one_ahead(ref, lost, stop)

    async def _decode_one_ahead(self, ref: ChunkRef, lost: int, stop: int) -> None:
        """Decode and keep bytes [0, stop) of fragment `lost` of `ref` ahead
        of its reader, as its first request would have (`_read_hedged`:
        the same reasons, counters and damage reports), unless the plan
        changed meanwhile (its store read again, say). A failure is left
        to that request, which meets it again and reports it."""
        if self._decoded_in_plan(ref) != lost or self._kept.under_way(ref, lost):
            return
        try:
            await self._read_hedged(ref, lost, 0, stop, 0)
        except EcfsError as exc:
            if isinstance(exc, Unrecoverable):
                self.counters.unrecoverable_reads -= 1  # (the request that meets it counts it)
            log.debug("decoding chunk %016x fragment %d ahead failed: %s", ref.chunk_id, lost, exc)

    async def _read_from_decode(
        self, ref: ChunkRef, payload: int, start: int, pieces: list[FragmentPiece],
        dest: memoryview,
    ) -> list[FragmentPiece]:  # fmt: skip
        """Decode the ranges `_decode_first` names for `pieces` (or wait for
        the decode under way), then serve every piece whose bytes are kept
        (the decoded fragment's included); the pieces left (to be read)."""
        for piece in pieces:
            lost = self._decode_first(ref, payload, piece)
            if lost is None:
                continue
            a, b = self.layout.of(ref).cell_range(piece.frag_start, piece.frag_end, payload)
            try:
                await self._read_hedged(ref, lost, a, b, 0)
            except EcfsError:
                pass  # the piece's own fragment may still be read
        left = []
        for piece in pieces:
            at = piece.chunk_start - start
            if not self._copy_kept(ref, piece.index, piece.frag_start, dest[at : at + piece.length]):
                left.append(piece)
        return left

    def kept_payloads(self, ref: ChunkRef) -> dict[int, memoryview]:
        """The whole payloads of fragments of `ref` that degraded reads
        keep (decoded, or verified sources; see `ecfs.data.kept`): what
        a repair of the chunk can take instead of reading and decoding."""
        layout = self.layout.of(ref)
        return self._kept.whole_payloads(ref, layout.k, layout.payload_length(ref.length))

    def kept_payload(self, ref: ChunkRef, index: int) -> memoryview | None:
        """The whole payload of fragment `index` of `ref` if degraded reads
        keep it (`kept_payloads` of that one index, without joining or
        copying the others'); None if not."""
        payload = self.layout.of(ref).payload_length(ref.length)
        return self._kept.whole_payload(ref, index, payload)

    async def _kept_or_span(
        self, ref: ChunkRef, lost: int, start: int, end: int, wanted: int
    ) -> Bytes | None:
        """Fragment `lost`'s bytes [start, end) (`wanted` of them asked
        for) if a decode under way that covers them is kept (waited for):
        None if not."""
        if not await self._kept.wait_for_decode(ref, lost, start, end):
            return None
        data = bytearray(end - start)
        return data if self._copy_kept(ref, lost, start, memoryview(data), wanted) else None

    async def _read_degraded_kept(
        self, ref: ChunkRef, lost: int, start: int, end: int, reason: str,
        damaged: bool = True, stream: bool = True,
    ) -> Bytes:  # fmt: skip
        """`_read_degraded` of [start, end); for a sequential reader (its
        chunk was read ahead lately, and the range is a stream's: see
        `KeptBytes.streaming`, told whether the request continues a
        `stream`) up to KEEP_SPAN bytes from `start` are decoded and kept
        for its next requests (see `ecfs.data.kept`)."""
        if ref not in self._planned or not self._kept.streaming(ref, lost, start, end, stream):
            return await self._read_degraded(ref, lost, start, end, reason, damaged)
        layout = self.layout.of(ref)
        payload = layout.payload_length(ref.length)
        stop = max(end, layout.cell_range(start, min(payload, start + KEEP_SPAN), payload)[1])
        with self._kept.decoding(ref, lost, start, stop):
            data = await self._read_degraded(ref, lost, start, stop, reason, damaged, keep=True)
        return data if stop == end else data[: end - start]

    async def _decode_in_one_call(
        self, ref: ChunkRef, candidates: list[int], lost: int, start: int, end: int,
        chosen: Container[int] = (),
    ) -> tuple[bytes, dict[int, bytearray]] | None:  # fmt: skip
        """The common degraded read in ONE worker-thread call (k reads, their
        checks and the decode: `_decode_range`) instead of k thread round
        trips and a task each, then a decode: possible when the headers of k
        of the `candidates` (best first) on available stores not routed
        around are known (read
        ahead, or read before). None when it is not, or when the call fails
        or takes longer than twice the slowest source's hedge deadline (it
        is then abandoned and `gather_fragments`, which hedges and widens
        per source, takes over). Returns the decoded bytes and the sources'. An abandoned call's thread ends when its
        store answers (a store keeps what the thread uses open until then).
        A source read ahead for the chunk (in `chosen`) whose header is not
        delivered yet is opened there rather than replaced by one that
        was not read ahead (that one's payload would come from its disk)."""
        k = self.layout.of(ref).k
        sources: list[tuple[Store, fragment.FragmentHeader]] = []
        unopened: tuple[Store, int, int, Expected, int] | None = None
        payload = self.layout.of(ref).payload_length(ref.length)
        deadline = 0.0
        first_unopened: StoreRunner | None = None
        for index in candidates:
            if len(sources) == k or (
                len(sources) == k - 1 and unopened is not None and index not in chosen
                and unopened[2] in chosen
            ):  # fmt: skip
                break
            runner = self.runners.get(ref.stores[index])
            if runner is None or not runner.available or runner.index in self.router.avoided:
                # (a SLOW store is read: a healthy one is SLOW for a while
                # when its latency moves from small reads to large ones;
                # one that lags is routed around, i.e. avoided)
                continue
            header = self.handles.get((ref.stores[index], ref.chunk_id, index))
            if header is None:
                if unopened is None:  # kept in case k known ones are not found
                    unopened = (runner.store, ref.chunk_id, index, self.expected.of(ref), payload)
                    first_unopened = runner
                continue
            try:
                self._check_payload(ref, header)
            except FragmentCorrupt:
                return None  # the general path reads it and reports it
            sources.append((runner.store, header))
            deadline = max(deadline, 2 * runner.hedge_deadline())
        if len(sources) == k:
            unopened = None  # all known (read ahead): no header to read
        elif len(sources) == k - 1 and first_unopened is not None:
            # one header (a parity not read ahead yet) is read there
            deadline = max(deadline, 2 * first_unopened.hedge_deadline())
        else:
            return None
        with trio.move_on_after(deadline) as scope:
            decoded = await run_in_thread(
                _decode_range, self._codec(ref), sources, lost, start, end, unopened,
                abandon_on_cancel=True, limiter=self._one_call_limiter,
            )  # fmt: skip
        if scope.cancelled_caught or decoded is None:
            return None
        data, pieces, opened = decoded
        if opened is not None and unopened is not None:
            store = ref.stores[opened.index]
            self.handles.insert((store, ref.chunk_id, opened.index), opened)
        return data, pieces

    async def gather_fragments(
        self, ref: ChunkRef, candidates: list[int], start: int, end: int
    ) -> tuple[dict[int, Bytes], list[int], int]:
        """Read [start, end) of k fragments among `candidates` (best first).

        k reads start at once; a failed one is replaced by the next
        candidate; if they are not all in after the slowest store's hedge
        deadline, every remaining candidate is read too and the first k
        answers win. Returns (pieces, indices found bad, bytes read)."""
        k = self.layout.of(ref).k
        pieces: dict[int, Bytes] = {}
        bad: list[int] = []
        waiting = list(candidates)
        running = 0
        bytes_read = 0
        if len(candidates) < k:
            return pieces, bad, bytes_read

        async with open_fan_out() as nursery:

            def finish_if_done() -> None:
                if len(pieces) >= k or (running == 0 and not waiting):
                    nursery.cancel_scope.cancel()

            def launch(count: int) -> None:
                nonlocal running
                for _ in range(min(count, len(waiting))):
                    running += 1
                    nursery.start_soon(read_one, waiting.pop(0))

            async def read_one(index: int) -> None:
                nonlocal running, bytes_read
                try:
                    data = await self._read_fragment(ref, index, start, end)
                    bytes_read += end - start
                    if len(pieces) < k:
                        pieces[index] = data
                except (StoreError, FragmentCorrupt):
                    bad.append(index)
                    launch(1)
                finally:
                    running -= 1
                    finish_if_done()

            async def widen() -> None:
                deadline = max(
                    self.runners[ref.stores[i]].hedge_deadline() for i in candidates[:k]
                )
                await trio.sleep(deadline)
                launch(len(waiting))
                finish_if_done()

            launch(k)
            nursery.start_soon(widen)
        return pieces, bad, bytes_read

    def _not_rebuilt(self, store: int, chunk_id: int) -> bool:
        chunks = self.not_rebuilt.get(store)
        return chunks is not None and chunk_id in chunks

    def sources(self, ref: ChunkRef, exclude: set[int]) -> list[int]:
        """Fragment indices worth reading, best first: available stores,
        lowest expected latency, data before parity on ties."""
        k = self.layout.of(ref).k
        usable = []
        for index in ref.present():
            runner = available_runner(self.runners, ref.stores[index])
            if index in exclude or runner is None or self._not_rebuilt(ref.stores[index], ref.chunk_id):
                continue
            usable.append((runner.expected_latency(), index >= k, index))
        usable.sort()
        return [index for _, _, index in usable]
