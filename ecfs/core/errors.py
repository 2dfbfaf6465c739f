"""Domain exceptions. Each carries the errno the FUSE layer reports for it.

Only `ecfs.frontend.fs` turns these into `pyfuse3.FUSEError`; any other exception that
reaches the FUSE boundary is logged as a bug and reported as EIO.
"""

from __future__ import annotations

import errno as _errno


class EcfsError(Exception):
    """Base class: an error with an errno and a human-readable message."""

    errno: int = _errno.EIO
    #: Set once the error was reported in the log where it happened, so the
    #: FUSE boundary does not log it again for every request.
    already_logged: bool = False

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class FsError(EcfsError):
    """A POSIX-level failure of a filesystem operation (ENOENT, EEXIST...)."""


class StoreError(EcfsError):
    """A store operation failed (I/O error, missing store, bad marker)."""

    errno = _errno.EIO


class StoreTimeout(StoreError):
    """A store operation did not answer within its deadline."""

    errno = _errno.EIO


class NoSpace(StoreError):
    """A store, or the whole volume, has no room for a new fragment."""

    errno = _errno.ENOSPC


class FragmentCorrupt(EcfsError):
    """A fragment's header or a cell checksum does not verify."""

    errno = _errno.EIO


class Unrecoverable(EcfsError):
    """Fewer than k good fragments exist for a byte range: never guess."""

    errno = _errno.EIO


class CodecError(EcfsError):
    """Invalid arguments to the erasure codec (a bug if it ever happens)."""

    errno = _errno.EIO


class VolumeError(EcfsError):
    """The volume cannot be created or opened as asked (a usage problem).

    The CLI prints the message on one line and exits with status 2.
    """

    errno = _errno.EINVAL


class FragmentMissing(StoreError):
    """A fragment file is not where it should be on its store.

    Not a sign of an unhealthy store (the offload helper does not count it
    as a store error): the reader treats the fragment as lost and decodes
    from the others, and repair recreates it.
    """

    errno = _errno.EIO


class BadFragmentEntry(StoreError):
    """The directory entry where a fragment file belongs is not a usable
    fragment file: a directory, symlink, FIFO, socket or device, or one the
    kernel refuses to open as such (ELOOP, EISDIR, ENXIO).

    The fragment is damaged, the store is fine: like FragmentMissing, the
    offload helper does not count it against the store's health; the reader
    decodes around it and queues the chunk, and repair (or fsck --repair)
    replaces the entry with a rebuilt fragment file.
    """

    errno = _errno.EIO


class StoreSwapped(StoreError):
    """A store directory no longer is the store that was opened: its marker
    changed or vanished, or its root is another directory (another device
    or inode), as when a disk drops off the bus and leaves its mountpoint
    behind. The store is failed until the same store is back."""

    errno = _errno.EIO
