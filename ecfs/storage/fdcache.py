"""A bounded cache of open fragment files of directory stores, so that
open() (which may block) is rare and a healthy read is one pread.

Owns: the read-only file descriptors of fragment files that
`ecfs.storage.store.DirectoryStore` keeps open between reads, and closing them.
Used only by `ecfs.storage.store` (nothing else sees a file descriptor). Must not:
read or interpret file contents.

One cache for the process (`OPEN_FILES`), keyed by (owner, chunk id,
fragment index) where the owner is a number unique to one DirectoryStore
object: its bound holds whatever the number of stores.

Contract: an entry is used between `acquire`/`insert` and `release`;
eviction and `discard` never close a descriptor that is in use (it is
closed when its last user releases it), so a descriptor number can never be
reused under a reader, whichever thread (the event loop reading page-cached
bytes, or a worker thread) uses it.

Concurrency: every method may be called from any thread; one lock guards
the table and the use counts (held for a few dictionary operations only,
never around I/O).

Closing happens in a small pool of closer threads: close() of a file on a
hung store (a network or FUSE-backed directory) can block forever,
uninterruptibly, and must never stall the caller, least of all the event
loop. It is fire-and-forget, so it does not go through `offload` (nobody
waits for it).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict

#: Closer threads (see the module docstring). Daemon threads: a close
#: stuck on a hung store must not keep the process from exiting either.
CLOSER_THREADS = 4

#: Idle descriptors kept open in the whole process (every store).
CAPACITY = 4096

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


#: (owner, chunk id, fragment index)
FileKey = tuple[int, int, int]


class OpenFile:
    """An open fragment file: its fd and how many callers use it now."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        #: No longer in the table: closed once the last user releases it.
        self.retired = False


class OpenFiles:
    """LRU of OpenFile by key, at most `capacity` of them kept open."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._files: OrderedDict[FileKey, OpenFile] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._files)

    def acquire(self, key: FileKey) -> OpenFile | None:
        """The open file for `key`, marked in use (call `release`), or None."""
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return None
            self._files.move_to_end(key)
            entry.users += 1
            return entry

    def insert(self, key: FileKey, fd: int) -> OpenFile:
        """Cache a freshly opened `fd` and return it in use. If another
        thread cached one for the same key meanwhile, `fd` is closed and
        that one is returned instead."""
        evicted = []
        with self._lock:
            entry = self._files.get(key)
            if entry is not None:
                self._files.move_to_end(key)
                entry.users += 1
            else:
                entry = self._files[key] = OpenFile(fd)
                entry.users = 1
                fd = -1
                while len(self._files) > self.capacity:
                    evicted.append(self._retire(self._files.popitem(last=False)[1]))
        if fd >= 0:
            close_later(fd)
        _close_all(evicted)
        return entry

    def release(self, entry: OpenFile) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.retired and entry.users == 0
        if close:
            close_later(entry.fd)

    def discard(self, key: FileKey) -> None:
        """Forget the file for `key` (deleted, or failed a read); closed
        once unused."""
        with self._lock:
            entry = self._files.pop(key, None)
            fd = self._retire(entry) if entry is not None else None
        _close_all([fd])

    def discard_owner(self, owner: int) -> None:
        """Forget every file of one store (closed once unused)."""
        with self._lock:
            keys = [key for key in self._files if key[0] == owner]
            fds = [self._retire(self._files.pop(key)) for key in keys]
        _close_all(fds)

    @staticmethod
    def _retire(entry: OpenFile) -> int | None:
        """Mark `entry` retired (lock held); its fd if it can be closed now."""
        entry.retired = True
        return entry.fd if entry.users == 0 else None


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            close_later(fd)


#: The process's cache (see the module docstring).
OPEN_FILES = OpenFiles()
