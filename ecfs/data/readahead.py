"""Read-ahead of fragments for sequential readers, off the event loop.

Owns: a few worker threads per store that read and verify the headers of
the fragments a sequential reader will want next and ask the store to
fetch their payload (`Store.prefetch`: a directory store opens the file,
keeps it open, and has the kernel read the payload into the page cache
with POSIX_FADV_WILLNEED). The headers are handed back to the loop's
HandleCache, so that the read itself is one `Store.read_fragment_cached`
on the loop (a page-cached preadv2 with RWF_NOWAIT), with no thread round
trip. Must not: return payload bytes, decide what is degraded, or change
a store's health (a failed read-ahead is reported to `on_failed`, which
may plan another fragment in its place; the real read meets the same
problem and reports it). Every request a store answered (read, or
failed to read) is reported to `on_answer` with the store's index: a
store slow to answer is not hung (its runner's `note_answer`).

Why not `StoreRunner.call`: a runner call costs the event loop a trio
thread round trip (limiter, cancel scope, outcome, wakeup: tens of
microseconds of loop CPU each, the loop being the bottleneck of a Python
filesystem), and nobody waits for read-ahead. Here a request costs the
loop a `queue.put`, and one `run_sync_soon` callback brings the handle
back.

Hung stores: a worker stuck in a store call on a hung store blocks
only its own queue; once MAX_QUEUED requests wait for it, further requests
for that store are dropped, so nothing grows or stalls elsewhere.

Slow stores: a worker waits for the payload it asked for of a local
store (a one-byte read of its last byte, `_wait_for`) before taking its
next job, so a disk has at most WORKERS_PER_STORE fragments being read
ahead at once (an object store's prefetches run in its own bounded pool):
a disk at 2 MiB/s among 40 MiB/s ones was handed the whole read-ahead
window (over 10 MiB, seconds of its bandwidth) before the reader saw it
lag, and every read of it, the health check included, queued behind that
(issue 17). Each finished job is an answer of the store (`on_answer`),
and `drop(store)` skips the jobs of a store still queued (the reader
plans parity in their place when it starts routing around the store).
`queued(store)` is a store's backlog: the reader reads a replacement
parity fragment ahead from the store with the shortest one.

Delivery rates: `delivery_rate(store)` is how fast a store's disk
delivers what is read ahead while it has some of it to do: payload bytes
per second of the time from a busy stretch's first request (or the
previous delivery) to each delivery, over the last few deliveries (sums
decayed by RATE_DECAY per delivery; the time since the last delivery
counts while it has some to do). A busy disk at its cap delivers its
cap however long its queue, a disk at 2 MiB/s delivers 2 MiB/s, and an
idle one delivers what one fetch takes: the router tells a busy disk
from a slow one by it (`ecfs.data.routing`), which their latencies
cannot (both 9x the others' at 40 MiB/s, issue 17).

Concurrency contract: `request` and the delivery callbacks run on the trio
loop thread; workers touch only their queue and the store (whose methods
are thread-safe).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import trio

from ..core.errors import EcfsError
from ..core.fragment import FragmentHeader
from ..storage.handles import Expected, HandleCache, HandleKey, read_header
from ..storage.store import Store

log = logging.getLogger(__name__)

#: Requests waiting per store before new ones are dropped.
MAX_QUEUED = 64

#: Worker threads per store: opening a fragment waits for its header to be
#: read from disk, so one thread per store could not keep ahead of a
#: sequential reader at a few hundred MiB/s.
WORKERS_PER_STORE = 4

#: Weight of the past in a store's delivery rate, per delivery (see
#: "Delivery rates" in the module docstring).
RATE_DECAY = 0.7

#: (handle key, store object, expected header, header already known or
#: None, sequence number)
_Job = tuple[HandleKey, Store, Expected, FragmentHeader | None, int]


class ReadAhead:
    """Best-effort background open + WILLNEED of fragments, per store."""

    def __init__(
        self,
        handles: HandleCache,
        expected: Expected,
        on_failed: Callable[[HandleKey], None] | None = None,
        on_answer: Callable[[int], None] | None = None,
    ) -> None:
        self.handles = handles
        self.expected = expected
        #: Called on the loop with the key of a fragment whose header could
        #: not be read (missing, say: a store being rebuilt).
        self.on_failed = on_failed
        #: Called on the loop with the store index of every finished job.
        self.on_answer = on_answer
        self.requested = 0
        self.dropped = 0
        self._queues: dict[int, queue.SimpleQueue[_Job | None]] = {}
        self._queued: dict[int, int] = {}
        self._pending: set[HandleKey] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        #: Jobs numbered below cutoff[store] are skipped (`drop`); read by
        #: the workers (a dict lookup: atomic).
        self._seq = 0
        self._cutoff: dict[int, int] = {}
        #: Store -> when its busy stretch started or its last job was
        #: delivered, and its decayed sums of bytes delivered and of the
        #: time they took (`delivery_rate`).
        self._since: dict[int, float] = {}
        self._rate_bytes: dict[int, float] = {}
        self._rate_seconds: dict[int, float] = {}
        self.clock: Callable[[], float] = time.monotonic

    def request(self, key: HandleKey, store: Store, expected: Expected | None = None) -> None:
        """Verify the header of fragment `key` = (store index, chunk id,
        index) against `expected` (the chunk's own coding; default: the
        volume's) and have the store fetch its payload, in the background.
        Called on the loop; returns at once."""
        if key in self._pending:
            return
        index = key[0]
        if self._queued.get(index, 0) >= MAX_QUEUED:
            self.dropped += 1
            return
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        known = self.handles.get(key)
        self._pending.add(key)
        if not self._queued.get(index):
            self._since[index] = self.clock()  # a busy stretch starts
        self._queued[index] = self._queued.get(index, 0) + 1
        self.requested += 1
        self._seq += 1
        self._queue(index).put((key, store, expected or self.expected, known, self._seq))

    def drop(self, index: int) -> None:
        """Skip the jobs of store `index` queued so far (those running
        finish); they are delivered as not read ahead, not as failed."""
        self._cutoff[index] = self._seq + 1

    def pending(self, key: HandleKey) -> bool:
        """Whether fragment `key` was asked for and is not delivered yet."""
        return key in self._pending

    def queued(self, index: int) -> int:
        """Fragments of store `index` asked for and not delivered yet (its
        read-ahead backlog: the reader plans parity on the least busy
        stores, see `ecfs.data.reader`)."""
        return self._queued.get(index, 0)

    def delivery_rate(self, index: int) -> float | None:
        """Bytes per second that store `index` delivered its read-ahead at
        while it had some to do, lately (see "Delivery rates" in the module
        docstring), the time since its last delivery counted while it has
        some to do (a disk that stopped delivering is not judged by its
        past); None before a first payload was delivered."""
        seconds = self._rate_seconds.get(index)
        if not seconds:
            return None
        if self._queued.get(index):
            seconds += max(0.0, self.clock() - self._since.get(index, 0.0))
        return self._rate_bytes[index] / seconds

    def close(self) -> None:
        """Stop the workers (a worker stuck on a hung store exits when its
        call returns, or with the process: they are daemon threads)."""
        for q in self._queues.values():
            for _ in range(WORKERS_PER_STORE):
                q.put(None)
        self._queues.clear()

    def _queue(self, index: int) -> queue.SimpleQueue[_Job | None]:
        q = self._queues.get(index)
        if q is None:
            q = self._queues[index] = queue.SimpleQueue()
            assert self._token is not None
            for _ in range(WORKERS_PER_STORE):
                threading.Thread(
                    target=_work,
                    args=(q, self._token, self._deliver, self._cutoff),
                    name=f"ecfs readahead {index}",
                    daemon=True,
                ).start()
        return q

    def _deliver(
        self, key: HandleKey, header: FragmentHeader | None, failed: bool, nbytes: int = 0
    ) -> None:
        """Loop side of a finished job (`nbytes` of payload fetched; 0 for a
        job skipped or failed): cache a newly verified header, count the
        delivery in the store's rate."""
        index, now = key[0], self.clock()
        self._pending.discard(key)
        self._queued[index] -= 1
        if nbytes > 0:
            since = self._since.get(index, now)
            self._rate_bytes[index] = self._rate_bytes.get(index, 0.0) * RATE_DECAY + nbytes
            self._rate_seconds[index] = (
                self._rate_seconds.get(index, 0.0) * RATE_DECAY + max(0.0, now - since)
            )
        self._since[index] = now
        if self.on_answer is not None:
            self.on_answer(index)
        if header is not None:
            self.handles.insert(key, header)
        elif failed and self.on_failed is not None:
            self.on_failed(key)


def _work(
    jobs: queue.SimpleQueue[_Job | None],
    token: trio.lowlevel.TrioToken,
    deliver: Callable[[HandleKey, FragmentHeader | None, bool, int], None],
    cutoff: dict[int, int],
) -> None:
    """A store's worker: verify the header (if needed), prefetch, and wait
    for the payload, one job at a time; jobs dropped meanwhile are skipped."""
    while (job := jobs.get()) is not None:
        key, store, expected, known, seq = job
        if seq < cutoff.get(key[0], 0):
            try:
                token.run_sync_soon(deliver, key, None, False, 0)
            except trio.RunFinishedError:
                return
            continue
        fetched = 0
        try:
            header, fetched = _verify_and_prefetch(key, store, expected, known)
        except Exception:  # a bug: never leave the request pending
            log.exception("bug in read-ahead of %s", key)
            header = None
        try:
            token.run_sync_soon(
                deliver, key, header if known is None else None, header is None, fetched
            )
        except trio.RunFinishedError:
            return


def _verify_and_prefetch(
    key: HandleKey, store: Store, expected: Expected, known: FragmentHeader | None
) -> tuple[FragmentHeader | None, int]:
    """Blocking: the fragment's verified header (`known`, or read now)
    after asking the store to fetch its payload, None if it could not be
    read; and the payload bytes waited for (0 if none: an object store's
    prefetch runs on, or it failed)."""
    header = known
    fetched = 0
    try:
        if header is None:
            header, _ = read_header(store, key[1], key[2], expected)
        store.prefetch(key[1], key[2], header.payload_offset, header.payload_length)
        if not store.remote:  # an object store bounds its prefetches itself
            _wait_for(store, key, header)
            fetched = header.payload_length
    except EcfsError as exc:
        log.debug("read-ahead of %s failed: %s", key, exc)
    return header, fetched


def _wait_for(store: Store, key: HandleKey, header: FragmentHeader) -> None:
    """Blocking: wait until the payload asked for is fetched, by reading
    its last byte (a directory store's read-ahead is read in order; an
    object store's read waits for its prefetch)."""
    if header.payload_length > 0:
        last = header.payload_offset + header.payload_length - 1
        store.read_fragment(key[1], key[2], last, memoryview(bytearray(1)))
