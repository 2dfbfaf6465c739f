"""The volume lock: at most one process (a mount, or fsck) uses a volume.

Owns: the lock file of each store directory and the advisory locks on it.
Must not: read or write anything else in a store, or decide what to do
about a volume that is in use (callers report the VolumeError).

On disk, part of the store layout (see `ecfs.storage.store`)::

    <store>/lock    empty regular file, 0600, created on first use and never
                    removed; its contents are meaningless. Opened with
                    O_NOFOLLOW | O_NONBLOCK and checked to be a regular
                    file: a symlink, FIFO or directory there is refused.

A user of the volume holds an exclusive ``flock(2)`` on ``<store>/lock`` of
every store it opened, for as long as it uses the volume: the mount for its
whole lifetime, ``ecfs fsck`` while it runs. The lock is non-blocking: a
second user is refused at once with VolumeError ("volume is in use
(already mounted?): <store> is locked by another process"), never queued.

Why flock: the kernel drops it when the holder's last file descriptor on the
lock file closes, including when the process dies (a crashed mount leaves no
stale lock to clean up). The lock belongs to the open file description, so a
mount that forks to daemonise keeps it in the child; the descriptor is
O_CLOEXEC, so a program the daemon runs does not inherit it. A second
open() of the same file, even in the same process, conflicts (tests rely on
this). flock on NFS is emulated with POSIX locks and works across clients
on Linux >= 2.6.12; on filesystems without locking the acquire fails with a
VolumeError saying so rather than silently not locking.

Concurrency: `acquire` takes the stores' locks one by one in the order
given; on any failure it releases the ones it took, so two processes
racing for one volume cannot both win, and the loser holds nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from ..core.errors import VolumeError
from .store import NotRegularFile, open_regular

#: Name of the lock file inside a store directory.
LOCK_NAME = "lock"

_FILE_MODE = 0o600
_BUSY_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


class VolumeLock:
    """Exclusive locks on the lock files of a volume's stores.

    Use as a context manager, or call `release` when done; releasing twice
    is harmless.
    """

    __slots__ = ("_held",)

    def __init__(self, held: list[tuple[Path, int]]) -> None:
        """Wrap already-locked (store path, fd) pairs; use `acquire`."""
        self._held = held

    @classmethod
    def acquire(cls, store_paths: Iterable[str | os.PathLike[str]]) -> VolumeLock:
        """Lock every store directory in `store_paths` (blocking only on the
        open; the lock itself never waits).

        Raises VolumeError if a store is locked by another holder or its lock
        file cannot be created or locked; nothing stays locked then.
        """
        held: list[tuple[Path, int]] = []
        try:
            for given in store_paths:
                store = Path(given)
                held.append((store, _lock_one(store)))
        except BaseException:
            _release_all(held)
            raise
        return cls(held)

    @property
    def stores(self) -> list[Path]:
        """The store directories locked (empty once released)."""
        return [store for store, _ in self._held]

    def release(self) -> None:
        """Unlock and close every lock file."""
        held, self._held = self._held, []
        _release_all(held)

    def __enter__(self) -> VolumeLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten lock must not outlive its object (and leak an fd).
        if getattr(self, "_held", None):
            self.release()


def _lock_one(store: Path) -> int:
    """Open (creating if needed) and exclusively flock ``store/lock``; the fd."""
    path = store / LOCK_NAME
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY_ERRNOS:
            raise VolumeError(
                f"volume is in use (already mounted?): {store} is locked by another process"
            ) from None
        raise VolumeError(f"cannot lock store {store}: {exc.strerror or exc}") from None
    return fd


def _open_lock_file(path: Path) -> int:
    """The lock file opened for locking: created 0600 if missing; opened
    read-only if the store is read-only (flock works on any fd). Never
    follows a symlink nor blocks on a FIFO; anything but a regular file is
    refused (VolumeError naming it), so a hostile entry cannot hang the
    caller while it holds the locks of other stores."""
    try:
        return open_regular(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unusable(path, exc) from None
    try:
        return open_regular(path)
    except OSError as exc:
        raise _unusable(path, exc) from None


def _unusable(path: Path, exc: OSError) -> VolumeError:
    if isinstance(exc, NotRegularFile):
        return VolumeError(
            f"cannot lock store {path.parent}: its lock file {path} {exc.strerror}"
            " (remove it)"
        )
    reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
    return VolumeError(f"cannot open lock file {path}: {reason}")


def _release_all(held: list[tuple[Path, int]]) -> None:
    """Unlock and close in reverse order; closing drops the lock even if
    the explicit unlock fails."""
    for _, fd in reversed(held):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)
