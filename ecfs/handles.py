"""A bounded cache of open fragment files, so that open() (which may block)
is rare and a healthy read is one pread.

Owns: file descriptors of fragment files and their parsed, verified headers.
Must not: read payload bytes or decide what is degraded (see `reader`).

Contract: a handle is used between `acquire` and `release`; eviction never
closes a handle that is in use (it is closed when its last user releases
it), so a file descriptor number can never be reused under a reader.

Closing happens off the event loop, in a small pool of closer threads:
close() of a file on a hung store (a network or FUSE-backed directory)
can block forever, uninterruptibly, and must never stall the mount. It is
fire-and-forget, so it does not go through `offload` (nobody waits for it).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from . import fragment
from .errors import FragmentCorrupt
from .store import DirectoryStore

#: Closer threads (see the module docstring). Daemon threads: a close
#: stuck on a hung store must not keep the process from exiting either.
CLOSER_THREADS = 4
_to_close: queue.SimpleQueue[int] = queue.SimpleQueue()
_closers: list[threading.Thread] = []
_closers_lock = threading.Lock()


def close_later(fd: int) -> None:
    """Close `fd` in a closer thread: never blocks the caller."""
    if len(_closers) < CLOSER_THREADS:
        with _closers_lock:
            if len(_closers) < CLOSER_THREADS:
                thread = threading.Thread(target=_close_forever, name="ecfs-close", daemon=True)
                thread.start()
                _closers.append(thread)
    _to_close.put(fd)


def _close_forever() -> None:
    while True:
        fd = _to_close.get()
        try:
            os.close(fd)
        except OSError:
            pass


#: (store index, chunk id, fragment index)
HandleKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Expected:
    """What a fragment's header must say to belong to a chunk of this volume."""

    volume_id: bytes
    k: int
    m: int
    cell_size: int


@dataclass(eq=False, slots=True)
class FragmentHandle:
    """An open fragment file: its fd and its verified header."""

    fd: int
    header: fragment.FragmentHeader
    users: int = 0
    evicted: bool = field(default=False)
    #: The bytes read from the start of the file when it was opened (kept
    #: only until the opener has used them).
    prefix: bytes | None = None

    @property
    def payload_offset(self) -> int:
        return self.header.payload_offset


def open_fragment(
    store: DirectoryStore, chunk_id: int, index: int, expected: Expected, *, probe: int = 0
) -> FragmentHandle:
    """Blocking: open a fragment file and verify its header against what the
    metadata expects. Raises FragmentMissing, BadFragmentEntry (not a
    regular file: never followed nor blocked on), StoreError or
    FragmentCorrupt.
    The first max(probe, HEADER_PROBE_SIZE) bytes are read in one request
    and returned in `prefix`."""
    fd = store.open_fragment(chunk_id, index)
    try:
        prefix = store.read_at(fd, max(probe, fragment.HEADER_PROBE_SIZE), 0)
        needed = fragment.header_size_needed(prefix)
        if needed > len(prefix):
            prefix = store.read_at(fd, needed, 0)
        header = fragment.parse_header(prefix)
        if (
            header.volume_id != expected.volume_id
            or header.chunk_id != chunk_id
            or header.index != index
            or header.k != expected.k
            or header.m != expected.m
            or header.cell_size != expected.cell_size
        ):
            raise FragmentCorrupt(
                f"fragment {chunk_id:016x}.{index} on {store.path}: header does not match"
            )
    except BaseException:
        os.close(fd)
        raise
    return FragmentHandle(fd, header, prefix=prefix)


class HandleCache:
    """LRU of FragmentHandle by (store, chunk, index), at most `capacity`
    idle handles kept open."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._handles: OrderedDict[HandleKey, FragmentHandle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handles)

    def peek(self, key: HandleKey) -> FragmentHandle | None:
        """The cached handle for key, without using it."""
        return self._handles.get(key)

    def acquire(self, key: HandleKey) -> FragmentHandle | None:
        """The cached handle for key (marked in use), or None."""
        handle = self._handles.get(key)
        if handle is None:
            return None
        self._handles.move_to_end(key)
        handle.users += 1
        return handle

    def insert(self, key: HandleKey, handle: FragmentHandle) -> FragmentHandle:
        """Cache a freshly opened handle and return it in use. If another
        task cached one for the same key meanwhile, keep that one."""
        existing = self.acquire(key)
        if existing is not None:
            close_later(handle.fd)
            return existing
        handle.users += 1
        self._handles[key] = handle
        self._evict()
        return handle

    def release(self, handle: FragmentHandle) -> None:
        handle.users -= 1
        if handle.evicted and handle.users == 0:
            close_later(handle.fd)

    def discard(self, key: HandleKey) -> None:
        """Forget a handle (bad or deleted fragment); closed once unused."""
        handle = self._handles.pop(key, None)
        if handle is not None:
            self._retire(handle)

    def discard_chunk(self, chunk_id: int, n: int, stores: tuple[int, ...]) -> None:
        for index in range(n):
            self.discard((stores[index], chunk_id, index))

    def discard_store(self, store: int) -> None:
        for key in [key for key in self._handles if key[0] == store]:
            self.discard(key)

    def close_all(self) -> None:
        for key in list(self._handles):
            self.discard(key)

    def _evict(self) -> None:
        while len(self._handles) > self.capacity:
            _, handle = self._handles.popitem(last=False)
            self._retire(handle)

    @staticmethod
    def _retire(handle: FragmentHandle) -> None:
        handle.evicted = True
        if handle.users == 0:
            close_later(handle.fd)
