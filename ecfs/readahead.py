"""Read-ahead of fragments for sequential readers, off the event loop.

Owns: a few worker threads per store that opens the fragment files a
sequential reader will want next, verifies their headers, and asks the
kernel to read their payload into the page cache (POSIX_FADV_WILLNEED).
The opened handles are handed back to the loop's HandleCache, so that the
read itself is one page-cached pread on the loop (RWF_NOWAIT), with no
thread round trip. Must not: return payload bytes, decide what is
degraded, or change a store's health (a failed read-ahead is simply
forgotten; the real read meets the same problem and reports it).

Why not `StoreRunner.call`: a runner call costs the event loop a trio
thread round trip (limiter, cancel scope, outcome, wakeup: tens of
microseconds of loop CPU each, the loop being the bottleneck of a Python
filesystem), and nobody waits for read-ahead. Here a request costs the
loop a `queue.put`, and one `run_sync_soon` callback brings the handle
back.

Hung stores: a worker stuck in open() or fadvise() on a hung store blocks
only its own queue; once MAX_QUEUED requests wait for it, further requests
for that store are dropped, so nothing grows or stalls elsewhere.

Concurrency contract: `request` and the delivery callbacks run on the trio
loop thread; workers touch only their queue and the fragment files.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

import trio

from .errors import EcfsError
from .handles import Expected, FragmentHandle, HandleCache, HandleKey, close_later, open_fragment
from .store import DirectoryStore

log = logging.getLogger(__name__)

#: Requests waiting per store before new ones are dropped.
MAX_QUEUED = 64

#: Worker threads per store: opening a fragment waits for its header to be
#: read from disk, so one thread per store could not keep ahead of a
#: sequential reader at a few hundred MiB/s.
WORKERS_PER_STORE = 4

#: (handle key, store object, expected header, already open handle or None)
_Job = tuple[HandleKey, DirectoryStore, Expected, FragmentHandle | None]


class ReadAhead:
    """Best-effort background open + WILLNEED of fragments, per store."""

    def __init__(self, handles: HandleCache, expected: Expected) -> None:
        self.handles = handles
        self.expected = expected
        self.requested = 0
        self.dropped = 0
        self._queues: dict[int, queue.SimpleQueue[_Job | None]] = {}
        self._queued: dict[int, int] = {}
        self._pending: set[HandleKey] = set()
        self._token: trio.lowlevel.TrioToken | None = None

    def request(self, key: HandleKey, store: DirectoryStore) -> None:
        """Open fragment `key` = (store index, chunk id, index) and start
        reading its payload into the page cache, in the background. Called
        on the loop; returns at once."""
        if key in self._pending:
            return
        index = key[0]
        if self._queued.get(index, 0) >= MAX_QUEUED:
            self.dropped += 1
            return
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        handle = self.handles.acquire(key)  # released by _deliver
        self._pending.add(key)
        self._queued[index] = self._queued.get(index, 0) + 1
        self.requested += 1
        self._queue(index).put((key, store, self.expected, handle))

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
                    args=(q, self._token, self._deliver),
                    name=f"ecfs readahead {index}",
                    daemon=True,
                ).start()
        return q

    def _deliver(self, key: HandleKey, handle: FragmentHandle | None, opened: bool) -> None:
        """Loop side of a finished job: cache a newly opened handle, or
        release the one that was lent to the worker."""
        self._pending.discard(key)
        self._queued[key[0]] -= 1
        if handle is None:
            return
        if opened:
            handle = self.handles.insert(key, handle)
        self.handles.release(handle)


def _work(
    jobs: queue.SimpleQueue[_Job | None],
    token: trio.lowlevel.TrioToken,
    deliver: Callable[[HandleKey, FragmentHandle | None, bool], None],
) -> None:
    """A store's worker: open (if needed) and advise, one job at a time."""
    while (job := jobs.get()) is not None:
        key, store, expected, lent = job
        try:
            handle = _open_and_advise(key, store, expected, lent)
        except Exception:  # a bug: never leave the request pending
            log.exception("bug in read-ahead of %s", key)
            handle = lent
        try:
            token.run_sync_soon(deliver, key, handle, lent is None)
        except trio.RunFinishedError:
            if lent is None and handle is not None:
                close_later(handle.fd)
            return


def _open_and_advise(
    key: HandleKey, store: DirectoryStore, expected: Expected, lent: FragmentHandle | None
) -> FragmentHandle | None:
    """Blocking: the handle (`lent`, or newly opened) after asking for its
    payload to be read in; None if a new one could not be opened."""
    handle = lent
    try:
        if handle is None:
            handle = open_fragment(store, key[1], key[2], expected)
            handle.prefix = None
        os.posix_fadvise(
            handle.fd, handle.payload_offset, handle.header.payload_length, os.POSIX_FADV_WILLNEED
        )
    except (OSError, EcfsError) as exc:
        log.debug("read-ahead of %s failed: %s", key, exc)
        if lent is None and handle is not None:
            close_later(handle.fd)
            return None
    return handle
