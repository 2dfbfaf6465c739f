"""The store interface, and one store = one directory: its on-disk layout
and every blocking call on it.

Owns: the `Store` interface (fragments by name: chunk id, fragment index,
byte range into a caller's buffer; no file descriptor ever crosses it), the
layout of a store directory, the store marker format, and the file
operations on fragment files (create, read, page-cache reads, read-ahead
hints, delete, list, durability via syncfs, free space), with the cache of
open fragment files (`ecfs.storage.fdcache`, used only from here), and the file operations on
small-write log segments (create preallocated, overwrite in place +
fdatasync, read, list, delete; their contents are `ecfs.data.logfiles`'s).

Must not: run on the event loop, except `Store.read_fragment_cached` and
`Store.close`, which never block (every other method may block on a disk,
so callers go through `ecfs.storage.offload.StoreRunner.call`), interpret fragment
contents (`ecfs.core.fragment` builds and parses them; here they are opaque
bytes), touch the metadata replica database (`ecfs.storage.replicas` owns `meta/`),
or decide placement or health (services above do that). Other kinds of
store (the in-memory and fault-injecting fakes of `ecfs.storage.fakestores`,
the S3 object stores of `ecfs.storage.s3store`) implement the same `Store`
interface.

On-disk layout of a store directory (created 0700, subdirectories 0700,
files 0600)::

    <store>/
      ecfs-store.json           the marker (JSON object, see StoreMarker)
      frags/XX/YY/<chunk>.<i>   fragment i of chunk <chunk>
      meta/                     the metadata replica database (ecfs.storage.replicas)
      wlog/<n>                  small-write log segment n (ecfs.data.logfiles)

- ``<chunk>`` is the chunk id as exactly 16 lowercase hex digits, ``<i>`` the
  fragment index in decimal without leading zeros (0 <= i < 256).
- ``XXYY`` are 4 lowercase hex digits: bits 8..23 of the chunk id, so 256
  consecutive chunks share a directory (chunk ids are handed out in
  order, so a file written sequentially lands in few directories, close
  together on disk: few directory creations when writing, disk locality
  when reading it back; measured 30-60% faster than hashing each chunk to
  a random directory). A directory holds at most 256 fragments per 2**24
  chunks of the volume's life.
- A fragment file is created once (O_EXCL) and never modified: chunks are
  copy-on-write, a rewrite makes a new chunk id.
- Fan-out directories are created on demand and never removed.
- ``<n>`` of a log segment is 16 lowercase hex digits. A segment is
  created at its full size with fallocate (so that writing into it later
  changes no block allocation) and then overwritten in place; its
  contents are records that `ecfs.data.logfiles` formats and checks. ``wlog/``
  is created with the first segment.

Marker keys (``ecfs-store.json``, UTF-8 JSON object, at most 64 KiB; unknown
keys are ignored so that a later format can add optional ones):

    volume_id      UUID of the volume, 32 lowercase hex digits
    store_id       UUID of this store, 32 lowercase hex digits
    format         store layout version, must equal STORE_FORMAT
    k, m           data and parity fragments per chunk (1 <= k, 0 <= m,
                   k + m <= 256)
    fragment_size  bytes of chunk data per fragment (F)
    cell_size      checksum granularity inside a fragment (<= F)
    inline_max     largest file kept inline in the metadata (bytes, >= 0)

A marker is checked here only for being well-formed. Whether it belongs to
the volume being opened is decided by `ecfs.volume.assembly` (one rule for mount and
fsck): a store whose marker is unreadable, names another volume than most
stores given, or whose geometry (k, m, fragment_size, cell_size,
inline_max) differs from the volume's metadata is left out and counts as
missing; more than m missing refuses the volume.

Hostile contents: every store file is opened with O_NOFOLLOW and
O_NONBLOCK and checked with fstat to be a regular file (`open_regular`), so
a symlink planted in a store is never followed and a FIFO never blocks an
open. An entry where a fragment file belongs that is not one (a directory,
symlink, FIFO, socket or device) raises BadFragmentEntry: a damaged
fragment, not a sick store; `delete_fragment` removes such an entry
(a directory with its contents), so repair can put the fragment back.

Identity: `pin_identity` remembers the marker and the device and inode of
the store root as found when the volume was opened; `probe` then fails
(StoreSwapped) if either changed, e.g. when a disk dropped off the bus and
left its empty mountpoint directory behind, or something was mounted over
the store. A write that finds a fan-out directory missing checks the
identity before creating any directory, so fragments never go into a
directory that replaced the store.

Crash behaviour: `DirectoryStore.initialise` writes the marker last and
atomically (tmp file, fsync, rename, fsync directory), so a store directory
either has a complete marker or is not a store. `write_fragment` does not
fsync: after a crash a fragment written since the last `sync()` may be
missing or truncated; the header/checksums written by ``ecfs.core.fragment`` and
fsck detect that. `sync()` makes everything written before it durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.aligned import is_aligned
from ..core.errors import (
    BadFragmentEntry,
    FragmentMissing,
    NoSpace,
    StoreError,
    StoreSwapped,
    VolumeError,
)
from .fdcache import OPEN_FILES, OpenFile

MARKER_NAME = "ecfs-store.json"
STORE_FORMAT = 1
FRAGS_DIR = "frags"
META_DIR = "meta"
LOG_DIR = "wlog"

#: Largest marker file accepted (bytes); anything bigger is garbage.
MARKER_MAX_BYTES = 64 * 1024
#: Store.concurrency of a local disk and of an object store (the rule is in
#: ecfs.storage.offload's docstring).
DIRECTORY_CONCURRENCY = 8
REMOTE_CONCURRENCY = 32

#: Largest accepted fragment_size / inline_max: far above any sane volume.
_MAX_SIZE = 1 << 30
_MAX_FRAGMENTS = 256
_CHUNK_ID_LIMIT = 1 << 64
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_HEX2 = re.compile(r"[0-9a-f]{2}")
_SEGMENT_NAME = re.compile(r"[0-9a-f]{16}")
_FRAGMENT_NAME = re.compile(r"([0-9a-f]{16})\.(0|[1-9][0-9]{0,2})")
_INT_FIELDS = ("format", "k", "m", "fragment_size", "cell_size", "inline_max")
#: Flags of every open of an existing store file: never follow a symlink
#: planted in a store, never block on a FIFO.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: open() errors that concern one directory entry, not the store: a
#: symlink (O_NOFOLLOW), a directory, a socket or a device without driver.
_BAD_ENTRY_ERRNOS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV})
_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT")
#: Numbers that tell DirectoryStore objects apart in the open-file cache.
_OWNERS = itertools.count()


# --------------------------------------------------------------------------
# Marker


@dataclass(frozen=True, slots=True)
class StoreMarker:
    """The identity and geometry of a store, as kept in ``ecfs-store.json``.

    Construction validates every field and raises StoreError on a bad one,
    so a StoreMarker that exists is always well-formed.
    """

    volume_id: str
    store_id: str
    format: int
    k: int
    m: int
    fragment_size: int
    cell_size: int
    inline_max: int

    def __post_init__(self) -> None:
        _check_uuid("volume_id", self.volume_id)
        _check_uuid("store_id", self.store_id)
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int:
                raise StoreError(f"store marker: {name} must be an integer, got {value!r:.40}")
        if self.format != STORE_FORMAT:
            raise StoreError(
                f"store marker: unsupported store format {self.format} "
                f"(this ecfs reads format {STORE_FORMAT})"
            )
        _check_geometry(self)

    def to_json(self) -> bytes:
        """Serialise to the marker file's bytes (UTF-8 JSON, sorted keys)."""
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> StoreMarker:
        """Parse a marker file's bytes.

        Raises StoreError with a one-line reason for anything that is not a
        valid marker (too big, not UTF-8 JSON, not an object, missing keys,
        wrong types, bad UUIDs, out-of-range values); never another type.
        """
        if len(data) > MARKER_MAX_BYTES:
            raise StoreError(f"store marker: larger than {MARKER_MAX_BYTES} bytes")
        try:
            obj: Any = json.loads(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise StoreError(f"store marker: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(obj, dict):
            raise StoreError("store marker: not a JSON object")
        names = ("volume_id", "store_id", *_INT_FIELDS)
        missing = [name for name in names if name not in obj]
        if missing:
            raise StoreError(f"store marker: missing keys {', '.join(missing)}")
        return cls(**{name: obj[name] for name in names})


def _check_uuid(name: str, value: object) -> None:
    """Raise StoreError unless `value` is a UUID as 32 lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 32:
        raise StoreError(f"store marker: {name} must be 32 hex digits, got {value!r:.40}")
    try:
        canonical = uuid.UUID(hex=value).hex
    except ValueError:
        canonical = None
    if canonical != value:
        raise StoreError(f"store marker: {name} is not a UUID in lowercase hex: {value!r}")


def _check_geometry(marker: StoreMarker) -> None:
    """Raise StoreError if k, m and the sizes are outside sane bounds."""
    if not (marker.k >= 1 and marker.m >= 0 and marker.k + marker.m <= _MAX_FRAGMENTS):
        raise StoreError(
            f"store marker: bad k={marker.k}, m={marker.m} "
            f"(need k >= 1, m >= 0, k + m <= {_MAX_FRAGMENTS})"
        )
    if not 0 < marker.fragment_size <= _MAX_SIZE:
        raise StoreError(f"store marker: bad fragment_size {marker.fragment_size}")
    if not 0 < marker.cell_size <= marker.fragment_size:
        raise StoreError(f"store marker: bad cell_size {marker.cell_size}")
    if not 0 <= marker.inline_max <= _MAX_SIZE:
        raise StoreError(f"store marker: bad inline_max {marker.inline_max}")


# --------------------------------------------------------------------------
# Store interface


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Space on the filesystem holding a store (bytes; free = usable by us).

    `known` is False where the medium tells no size (an object store
    without a quota, `ecfs.storage.s3store`): the two numbers are then
    nominal, never counted as real space (`df` on the mount, see
    `ecfs.volume.assembly.Volume.capacity`) nor preferred by placement for
    their size (`ecfs.data.placement`)."""

    total_bytes: int
    free_bytes: int
    known: bool = True


#: What a writer hands over: the parts of one fragment, concatenated.
FragmentParts = Sequence[bytes | bytearray | memoryview]


class Store(Protocol):
    """What services need from a store: fragments by name, never by fd.

    A fragment is named by (chunk id, fragment index), 0 <= chunk id <
    2**64, 0 <= index < 256; its contents are opaque bytes here (built and
    checked by `ecfs.core.fragment`), written once and never modified. The
    implementations are `DirectoryStore` (one directory, the real one),
    `ecfs.storage.s3store.S3Store` (an object store; both opened by
    location by `ecfs.storage.storefactory.open_store`) and the fakes in
    `ecfs.storage.fakestores`; they all honour this contract, exception
    types included, so services and their tests cannot tell them apart.

    Errors (all `ecfs.core.errors.StoreError` or subclasses; a method raises no
    other exception type except ValueError for an out-of-range name, a
    caller bug):

    - FragmentMissing: no fragment by that name (a fast, healthy answer:
      not a store failure);
    - BadFragmentEntry: something that is not a fragment took its name (a
      damaged fragment, not a sick store; `delete_fragment` removes it);
    - NoSpace: the store is full (ENOSPC/EDQUOT);
    - StoreSwapped: the store is not the one pinned by `pin_identity`;
    - StoreError: anything else; the store may be sick (`offload` counts it
      against the store's health).

    Concurrency: thread-safe; methods may run concurrently in several
    worker threads. Every method may block on a disk or network (and may
    hang until the device answers), so callers run them through
    `ecfs.storage.offload.StoreRunner.call` (a limiter, a timeout and abandonment
    of a hung call), never on the event loop, with two exceptions that
    never block and are meant for the loop: `read_fragment_cached` and
    `close`.
    """

    #: Where the store is, for messages and status: a directory, or an
    #: s3:// location (`ecfs.storage.s3store.LocationPath`, whose str() is the
    #: location as given); `ecfs.storage.storefactory.open_store(path)` opens
    #: the same store.
    path: Path

    #: Whether the store holds small-write log segments (the six
    #: log-segment methods below). True for stores with files that can be
    #: preallocated and overwritten in place (`DirectoryStore`, the fakes);
    #: False for `ecfs.storage.s3store.S3Store`: objects are immutable,
    #: and its log-segment methods raise StoreError. The log
    #: (`ecfs.data.logfiles`) keeps its copies on the stores that hold
    #: segments only, and is off when fewer than m+1 do.
    holds_log_segments: bool

    #: Whether the store is on another machine, reached over the network
    #: (an object store): False for `DirectoryStore` (even on a network
    #: mount: it is a directory to us), True for
    #: `ecfs.storage.s3store.S3Store`, as configured for the fakes. Hybrid
    #: placement (`ecfs.data.placement`) keeps data fragments on the stores
    #: that are not remote and parity on those that are.
    remote: bool
    #: How many calls the store serves well at once: the default size of
    #: its runner's limiter (`ecfs.storage.offload.StoreRunner`, whose
    #: docstring gives the rule): DIRECTORY_CONCURRENCY for a local disk,
    #: REMOTE_CONCURRENCY for an object store.
    concurrency: int

    def domain_atoms(self) -> frozenset[str]:
        """The store's default failure domain, as the atoms it shares a
        fate with (`ecfs.storage.domains`: a directory's disk(s) found
        through sysfs, an object store's endpoint); stores whose atoms
        overlap are one domain unless labelled. No I/O beyond stat and
        sysfs reads."""
        ...

    @property
    def meta_dir(self) -> Path:
        """Directory of the metadata replica database (owned by
        `ecfs.storage.replicas`). An object store has none: its meta_dir
        never exists, and it keeps a metadata copy as objects instead
        (`ecfs.storage.metaobjects`; where the copies go: `copy_stores`)."""
        ...

    # ---- identity and health

    def read_marker(self) -> StoreMarker:
        """The store's marker; StoreError if missing, unreadable or garbled."""
        ...

    def pin_identity(self, marker: StoreMarker | None = None) -> StoreMarker:
        """Remember this store as it is now (its marker, read unless given,
        and what tells its medium apart); `probe` and fragment writes then
        check it. StoreError if it cannot be read."""
        ...

    def probe(self, *, accept_moved: bool = False) -> StoreMarker:
        """Cheap health check: the marker after checking the pinned identity
        (StoreSwapped if another store is here; `accept_moved` re-pins a
        store that came back on another mount). StoreError if the store is
        gone or unreadable; cached resources are then dropped."""
        ...

    def device(self) -> int:
        """A number equal for stores that share one filesystem (one
        `sync` makes all of them durable); StoreError if unreachable."""
        ...

    def usage(self) -> StoreUsage:
        """Total and free bytes of the medium; StoreError if unreachable."""
        ...

    def sync(self) -> None:
        """Make every fragment written (and deleted) so far durable."""
        ...

    def retire(self) -> None:
        """This store leaves its volume: its marker is retired, so it no
        longer opens as a store of the volume."""
        ...

    def close(self) -> None:
        """Release what the store holds open (cached file descriptors,
        connections). Never blocks (may be called on the event loop); the
        store stays usable and reopens what it needs on demand."""
        ...

    # ---- fragments

    def fragment_relpath(self, chunk_id: int, index: int) -> str:
        """The fragment's name inside the store (for messages and fsck);
        does no I/O. ValueError for an out-of-range name."""
        ...

    def write_fragment(self, chunk_id: int, index: int, parts: FragmentParts) -> int:
        """Create the fragment with the concatenation of `parts`; returns
        the bytes written. It must not exist (StoreError otherwise: never
        overwritten; delete first). Not durable until `sync`. On failure
        nothing (or nothing readable as complete) is left under its name."""
        ...

    def read_fragment(self, chunk_id: int, index: int, offset: int, dest: memoryview) -> int:
        """Read the fragment's bytes [offset, offset + len(dest)) into
        `dest`; returns how many were read: len(dest), fewer only at the end
        of the fragment (0 past it). FragmentMissing, BadFragmentEntry or
        StoreError."""
        ...

    def read_fragment_cached(
        self, chunk_id: int, index: int, offset: int, dest: memoryview
    ) -> bool:
        """The fast path: fill all of `dest` with the fragment's bytes at
        `offset` only if that needs no waiting for a device (a directory
        store: the file is open and the bytes are in the page cache), on
        the calling thread (the event loop). False on any miss (not open,
        not cached, not supported, short, or an error: the slow path
        `read_fragment` then meets it and reports it); `dest` is then
        unspecified. Never raises for a miss, never blocks."""
        ...

    def prefetch(self, chunk_id: int, index: int, offset: int, length: int) -> None:
        """Hint: bytes [offset, offset + length) of the fragment will be read
        soon; start fetching them (a directory store: opens the file and
        asks the kernel to read them into the page cache; an object store
        starts a GET in the background). May block; errors as
        `read_fragment`, or none (a background fetch leaves them for the
        read to meet); callers treat them as best effort."""
        ...

    def fragment_size_on_disk(self, chunk_id: int, index: int) -> int:
        """Size in bytes of the stored fragment; FragmentMissing or
        BadFragmentEntry."""
        ...

    def delete_fragment(self, chunk_id: int, index: int) -> None:
        """Remove the fragment (or whatever entry took its name). Missing is
        fine, unless the whole store is gone (StoreError: the fragment may
        still be there when it comes back)."""
        ...

    def iter_fragments(self) -> Iterator[tuple[int, int]]:
        """(chunk id, index) of every fragment held, in no order. A
        generator: run the whole iteration in the worker thread (or use
        `list_fragments`)."""
        ...

    def list_fragments(self) -> list[tuple[int, int]]:
        """`iter_fragments` as a list (convenient to offload)."""
        ...

    def stray_entries(self, fragments: list[tuple[int, int]]) -> list[str]:
        """Names (relative, sorted) of entries where fragments are kept that
        are not the fragments listed (`list_fragments`): what fsck reports
        and leaves alone."""
        ...

    # ---- small-write log segments (contents owned by `ecfs.data.logfiles`);
    # only where `holds_log_segments`: elsewhere every one raises StoreError

    def log_segments(self) -> list[int]:
        """Numbers of the log segments held (none yet is fine). StoreError."""
        ...

    def create_log_segment(self, number: int, size: int) -> None:
        """Create segment `number` with `size` bytes that read as zeros,
        durable (with its name) when this returns. NoSpace, or StoreError
        (also if it exists: it is then left as it was); a failed creation
        leaves no segment of that number."""
        ...

    def write_log_segment(self, number: int, offset: int, data: bytes | bytearray) -> None:
        """Overwrite bytes [offset, offset + len(data)) of segment `number`,
        durable when this returns. StoreError (a missing segment too)."""
        ...

    def read_log_segment(self, number: int) -> bytes:
        """The whole content of segment `number`. StoreError."""
        ...

    def read_log_range(self, number: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of segment `number` (fewer at its
        end). StoreError."""
        ...

    def delete_log_segment(self, number: int) -> None:
        """Remove segment `number` (gone already is fine). StoreError."""
        ...


# --------------------------------------------------------------------------
# Directory store


class DirectoryStore:
    """A store kept in one local (or network-mounted) directory.

    Implements `Store`. Its state: its path, whether its filesystem takes
    direct I/O and RWF_NOWAIT reads, its pinned identity, and the fragment
    files it keeps open (in `ecfs.storage.fdcache.OPEN_FILES`, under a number of
    its own). Thread-safe: methods may run concurrently in several worker
    threads, and `read_fragment_cached` on the event loop meanwhile.

    The measured optimisations of the read and write paths live here:

    - open files are cached (`ecfs.storage.fdcache`), so a healthy read is one
      pread, and open() (which may block) is rare;
    - `read_fragment_cached` is one preadv2(RWF_NOWAIT) on the caller's
      thread: page-cached bytes are served on the event loop without a
      thread round trip;
    - `prefetch` is posix_fadvise(WILLNEED) on the cached file;
    - `write_fragment` writes block-aligned parts with O_DIRECT.
    """

    __slots__ = ("path", "_direct_io", "_nowait", "_owner", "_pinned")

    holds_log_segments = True
    remote = False
    concurrency = DIRECTORY_CONCURRENCY

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Refer to the store at `path`; does no I/O."""
        self.path = Path(path)
        #: Cleared (for good) the first time the filesystem refuses O_DIRECT.
        self._direct_io = True
        #: Cleared (for good) the first time the filesystem refuses RWF_NOWAIT.
        self._nowait = _HAVE_NOWAIT
        #: This store's part of the open-file cache.
        self._owner = next(_OWNERS)
        #: (marker, st_dev, st_ino of the root) once `pin_identity` ran.
        self._pinned: tuple[StoreMarker, int, int] | None = None

    def domain_atoms(self) -> frozenset[str]:
        from .domains import path_atoms

        return path_atoms(self.path)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.path)!r})"

    @property
    def meta_dir(self) -> Path:
        """Directory for the metadata replica database (owned by ecfs.storage.replicas)."""
        return self.path / META_DIR

    # ---- creation and identity

    @classmethod
    def initialise(cls, path: str | os.PathLike[str], marker: StoreMarker) -> DirectoryStore:
        """Create a new store at `path` for `marker` (mkfs).

        `path` must not exist or be an empty directory; otherwise VolumeError
        says why ("not a directory", "not empty", "belongs to volume X").
        Creates it 0700 (parents as needed), then ``frags/`` and ``meta/``
        0700, then writes the marker atomically, last. OSError -> StoreError
        (NoSpace for ENOSPC/EDQUOT).
        """
        store = cls(path)
        store._check_can_initialise()
        try:
            store._create_directories()
            _write_file_atomically(store.path / MARKER_NAME, marker.to_json())
        except OSError as exc:
            raise _store_error(exc, f"cannot initialise store {store.path}") from exc
        store.pin_identity(marker)
        return store

    def _check_can_initialise(self) -> None:
        """Raise VolumeError unless self.path is absent or an empty directory."""
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise VolumeError(f"{self.path}: not a directory") from None
        except OSError as exc:
            raise VolumeError(f"{self.path}: cannot read directory: {exc.strerror}") from None
        if not entries:
            return
        if MARKER_NAME in entries:
            try:
                existing = self.read_marker()
            except StoreError:
                pass
            else:
                raise VolumeError(f"{self.path}: not empty, belongs to volume {existing.volume_id}")
        raise VolumeError(f"{self.path}: not empty ({len(entries)} entries)")

    def _create_directories(self) -> None:
        """Create the store directory (parents as needed), frags/ and meta/, 0700."""
        if not self.path.exists():
            parent = self.path.parent
            parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=_DIR_MODE)
            _fsync_directory(parent)
        os.chmod(self.path, _DIR_MODE)
        for name in (FRAGS_DIR, META_DIR):
            sub = self.path / name
            sub.mkdir(mode=_DIR_MODE)
            os.chmod(sub, _DIR_MODE)

    def read_marker(self) -> StoreMarker:
        """Read and parse the marker; StoreError (naming the path) if missing,
        unreadable or garbled."""
        marker_path = self.path / MARKER_NAME
        try:
            fd = open_regular(marker_path)
            try:
                data = _read_up_to(fd, MARKER_MAX_BYTES + 1)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise StoreError(f"{marker_path}: no ecfs store marker (not a store?)") from None
        except OSError as exc:
            raise StoreError(
                f"{marker_path}: cannot read store marker: {_entry_problem(exc)}"
            ) from None
        try:
            return StoreMarker.from_json(data)
        except StoreError as exc:
            raise StoreError(f"{marker_path}: {exc}") from None

    def retire(self) -> None:
        """Rename the marker to MARKER_NAME + '.retired': this directory is
        no longer a store of its volume (after `ecfs store remove/replace`)."""
        marker = self.path / MARKER_NAME
        self.close()
        try:
            os.rename(marker, marker.with_name(MARKER_NAME + ".retired"))
            _fsync_directory(self.path)
        except OSError as exc:
            raise _store_error(exc, f"cannot retire {self.path}") from exc

    def close(self) -> None:
        """Close the fragment files kept open (in the background: a close
        on a hung store may block). Never blocks; reads reopen them."""
        OPEN_FILES.discard_owner(self._owner)

    def device(self) -> int:
        """st_dev of the store root (stores on one filesystem share it)."""
        try:
            return os.stat(self.path).st_dev
        except OSError as exc:
            raise _store_error(exc, f"cannot stat store {self.path}") from exc

    def pin_identity(self, marker: StoreMarker | None = None) -> StoreMarker:
        """Remember this store as it is now: its marker (read unless given)
        and the device and inode of its root. From then on `probe` and the
        creation of fan-out directories check that it is still the same
        store. StoreError if the root or the marker cannot be read."""
        try:
            root = os.stat(self.path)
        except OSError as exc:
            raise _store_error(exc, f"cannot stat store {self.path}") from exc
        if marker is None:
            marker = self.read_marker()
        self._pinned = (marker, root.st_dev, root.st_ino)
        return marker

    def check_identity(self, *, accept_moved: bool = False) -> StoreMarker:
        """The marker, after checking that this is still the pinned store.

        StoreSwapped if the marker differs from the pinned one, or if the
        root is another directory (device or inode changed) and not
        `accept_moved`; with `accept_moved`, a root that moved but holds
        the same marker (a disk that came back, mounted anew) is pinned
        again. StoreError if the root or the marker cannot be read. Without
        a pinned identity, only reads the marker.
        """
        try:
            root = os.stat(self.path)
            marker = self.read_marker()
        except OSError as exc:
            self.close()  # a store gone: never read through its old files
            raise _store_error(exc, f"cannot stat store {self.path}") from exc
        except StoreError:
            self.close()
            raise
        pinned = self._pinned
        if pinned is None:
            return marker
        was = pinned[0]
        if marker != was:
            self.close()
            if _same_ids(marker, was):
                raise StoreSwapped(f"{self.path}: the store marker changed (its geometry)")
            raise StoreSwapped(
                f"{self.path}: another store is here now (volume {marker.volume_id}, store"
                f" {marker.store_id}; it was volume {was.volume_id}, store {was.store_id})"
            )
        if (root.st_dev, root.st_ino) != pinned[1:]:
            self.close()  # files of the old mount
            if not accept_moved:
                raise StoreSwapped(
                    f"{self.path}: the store directory was replaced (device {root.st_dev},"
                    f" inode {root.st_ino}; it was device {pinned[1]}, inode {pinned[2]})"
                )
            self._pinned = (marker, root.st_dev, root.st_ino)
        return marker

    def probe(self, *, accept_moved: bool = False) -> StoreMarker:
        """Cheap health check: check the identity (`check_identity`), then
        statvfs the directory.

        Raises StoreError if the store is gone, unreadable, garbled or
        swapped. (The marker is usually in the page cache, so this proves
        the directory is reachable, not that the disk is healthy.)
        """
        marker = self.check_identity(accept_moved=accept_moved)
        self.usage()
        return marker

    # ---- fragments

    def fragment_relpath(self, chunk_id: int, index: int) -> str:
        """Path of a fragment file relative to the store directory.

        Raises ValueError (a caller bug) if chunk_id is not in [0, 2**64) or
        index not in [0, 256).
        """
        return fragment_relpath(chunk_id, index)

    def _fragment_path(self, chunk_id: int, index: int) -> str:
        return os.path.join(self.path, self.fragment_relpath(chunk_id, index))

    def write_fragment(
        self, chunk_id: int, index: int, parts: Sequence[bytes | bytearray | memoryview]
    ) -> int:
        """Create the fragment file with the concatenation of `parts`.

        The file must not exist (O_EXCL: fragments are never overwritten).
        Fan-out directories are created as needed. No fsync: call `sync()`
        for durability. Returns the number of bytes written. ENOSPC/EDQUOT
        -> NoSpace; any other OSError -> StoreError. On failure a partially
        written file is removed (best effort); an existing file is left alone.

        When every part is block-aligned (`aligned.is_aligned`: what the
        writer builds for full chunks), the file is written with O_DIRECT,
        bypassing the page cache (see `aligned` for why); a filesystem that
        refuses it (tmpfs, some network and FUSE filesystems) gets ordinary
        writes from then on. Durability is the same either way: `sync()`.
        """
        path = self._fragment_path(chunk_id, index)
        direct = self._direct_io and all(is_aligned(p) for p in parts)
        try:
            fd = self._create_exclusive(path, direct)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                # The file is created before the open fails: remove it.
                _unlink_quietly(path)
                self._direct_io = False
                return self.write_fragment(chunk_id, index, parts)
            raise _store_error(exc, f"cannot create fragment {path}") from exc
        try:
            written = _writev_all(fd, parts)
        except BaseException as exc:
            os.close(fd)
            _unlink_quietly(path)
            if direct and isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                self._direct_io = False
                return self.write_fragment(chunk_id, index, parts)
            if isinstance(exc, OSError):
                raise _store_error(exc, f"cannot write fragment {path}") from exc
            raise
        try:
            os.close(fd)
        except OSError as exc:
            _unlink_quietly(path)
            raise _store_error(exc, f"cannot write fragment {path}") from exc
        return written

    def _create_exclusive(self, path: str, direct: bool = False) -> int:
        """Open a new file O_EXCL 0600 (with O_DIRECT if `direct`), creating
        missing fan-out directories (and frags/ itself, but never the store
        directory), after checking the pinned identity (StoreSwapped)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        if direct:
            flags |= os.O_DIRECT
        try:
            return os.open(path, flags, _FILE_MODE)
        except FileNotFoundError:
            pass
        # A directory is missing: an empty directory that took the store's
        # place (a disk gone, its mountpoint left behind) looks like this.
        # It must never get fragments.
        self.check_identity()
        # Recreate frags/ too (a store that lost its fragments), but never
        # the store directory itself: a missing one means the disk is gone.
        fan_yy = os.path.dirname(path)
        fan_xx = os.path.dirname(fan_yy)
        for directory in (os.path.dirname(fan_xx), fan_xx, fan_yy):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, _DIR_MODE)
        return os.open(path, flags, _FILE_MODE)

    def _open_fragment(self, chunk_id: int, index: int) -> int:
        """Open a fragment read-only and return the fd (the caller closes it).

        Missing file -> FragmentMissing; an entry that is not a regular file
        (`open_regular`) -> BadFragmentEntry; any other OSError -> StoreError.
        """
        path = self._fragment_path(chunk_id, index)
        try:
            return open_regular(path)
        except FileNotFoundError:
            raise FragmentMissing(f"fragment missing: {path}") from None
        except OSError as exc:
            if isinstance(exc, NotRegularFile) or exc.errno in _BAD_ENTRY_ERRNOS:
                raise BadFragmentEntry(f"fragment {path}: {_entry_problem(exc)}") from None
            raise _store_error(exc, f"cannot open fragment {path}") from exc

    def _acquire_file(self, chunk_id: int, index: int) -> OpenFile:
        """The fragment's cached open file (opened and cached if needed),
        in use until `OPEN_FILES.release`."""
        key = (self._owner, chunk_id, index)
        entry = OPEN_FILES.acquire(key)
        if entry is None:
            entry = OPEN_FILES.insert(key, self._open_fragment(chunk_id, index))
        return entry

    def read_fragment(self, chunk_id: int, index: int, offset: int, dest: memoryview) -> int:
        """Read bytes [offset, offset + len(dest)) of the fragment into
        `dest` (preadv through the cached open file, looping on short
        reads); the count, fewer than len(dest) only at end of file.
        FragmentMissing, BadFragmentEntry; another OSError -> StoreError
        (and the cached file is dropped: the next read opens it anew)."""
        entry = self._acquire_file(chunk_id, index)
        try:
            return _preadv_all(entry.fd, dest, offset)
        except OSError as exc:
            OPEN_FILES.discard((self._owner, chunk_id, index))
            path = self._fragment_path(chunk_id, index)
            raise _store_error(exc, f"cannot read fragment {path}") from exc
        finally:
            OPEN_FILES.release(entry)

    def read_fragment_cached(
        self, chunk_id: int, index: int, offset: int, dest: memoryview
    ) -> bool:
        """One preadv2(RWF_NOWAIT) into `dest` if the fragment file is open
        (never opens: open() may block); True if all of `dest` came from
        the page cache. See `Store.read_fragment_cached`."""
        if not self._nowait:
            return False
        entry = OPEN_FILES.acquire((self._owner, chunk_id, index))
        if entry is None:
            return False
        try:
            n = os.preadv(entry.fd, [dest], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False
            return False
        finally:
            OPEN_FILES.release(entry)
        return n == len(dest)

    def prefetch(self, chunk_id: int, index: int, offset: int, length: int) -> None:
        """Open (and cache) the fragment file and posix_fadvise(WILLNEED)
        its bytes [offset, offset + length): the kernel starts reading them
        into the page cache and this returns without waiting for them."""
        entry = self._acquire_file(chunk_id, index)
        try:
            os.posix_fadvise(entry.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise _store_error(exc, f"cannot prefetch fragment {chunk_id:016x}.{index}") from exc
        finally:
            OPEN_FILES.release(entry)

    def delete_fragment(self, chunk_id: int, index: int) -> None:
        """Remove a fragment file, or whatever entry took its name (a
        symlink or FIFO is unlinked, never followed; a directory is removed
        with its contents: the name belongs to ecfs). A missing one is
        fine, unless the whole store is missing (its marker is gone too: the
        directory vanished or was unmounted), which is a StoreError like any
        other OSError: the fragment may still be there when the store comes
        back. A directory that cannot be removed -> BadFragmentEntry."""
        path = self._fragment_path(chunk_id, index)
        OPEN_FILES.discard((self._owner, chunk_id, index))
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not os.path.lexists(self.path / MARKER_NAME):
                raise StoreError(f"cannot delete fragment {path}: the store is gone") from None
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.EPERM) or not os.path.isdir(path):
                raise _store_error(exc, f"cannot delete fragment {path}") from exc
            try:
                shutil.rmtree(path)  # never follows symlinks inside
            except OSError as rm_exc:
                raise BadFragmentEntry(
                    f"cannot remove the directory {path} where a fragment belongs:"
                    f" {rm_exc.strerror or rm_exc}"
                ) from None

    def fragment_size_on_disk(self, chunk_id: int, index: int) -> int:
        """Size in bytes of a fragment file; FragmentMissing if absent,
        BadFragmentEntry if the entry is not a regular file."""
        path = self._fragment_path(chunk_id, index)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FragmentMissing(f"fragment missing: {path}") from None
        except OSError as exc:
            raise _store_error(exc, f"cannot stat fragment {path}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BadFragmentEntry(f"fragment {path}: is {_file_kind(st.st_mode)}")
        return st.st_size

    def iter_fragments(self) -> Iterator[tuple[int, int]]:
        """Yield (chunk_id, index) of every well-named fragment file.

        Skips anything else: other names, non-regular files, and fragment
        names in the wrong fan-out directory. Order is unspecified. This is a
        generator: run the whole iteration in the worker thread (e.g.
        offload ``list_fragments``), not just the call. OSError -> StoreError.
        """
        frags = os.path.join(self.path, FRAGS_DIR)
        try:
            for xx in _subdirectories(frags):
                for yy in _subdirectories(os.path.join(frags, xx)):
                    yield from _fragments_in(os.path.join(frags, xx, yy), xx + yy)
        except OSError as exc:
            raise _store_error(exc, f"cannot list fragments in {frags}") from exc

    def list_fragments(self) -> list[tuple[int, int]]:
        """`iter_fragments` collected into a list (convenient to offload)."""
        return list(self.iter_fragments())

    def stray_entries(self, fragments: list[tuple[int, int]]) -> list[str]:
        """Paths (relative to the store) of non-directory entries under
        frags/ that are not among `fragments` (well-named fragment files in
        their fan-out directory): symlinks to directories included."""
        known = {self.fragment_relpath(c, i) for c, i in fragments}
        stray = []
        for directory, dirnames, filenames in os.walk(self.path / FRAGS_DIR):
            relative = Path(directory).relative_to(self.path)
            links = [d for d in dirnames if os.path.islink(os.path.join(directory, d))]
            for name in filenames + links:
                path = (relative / name).as_posix()
                if path not in known:
                    stray.append(path)
        return sorted(stray)

    # ---- small-write log segments (see ecfs.data.logfiles)

    def _segment_path(self, number: int) -> str:
        return os.path.join(self.path, LOG_DIR, f"{number:016x}")

    def log_segments(self) -> list[int]:
        """Numbers of the log segments in ``wlog/`` (none if it is missing);
        entries with other names are ignored. OSError -> StoreError."""
        try:
            names = os.listdir(os.path.join(self.path, LOG_DIR))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _store_error(exc, f"cannot list log segments of {self.path}") from exc
        return sorted(int(n, 16) for n in names if _SEGMENT_NAME.fullmatch(n))

    def create_log_segment(self, number: int, size: int) -> None:
        """Create segment `number` (must not exist) with `size` bytes
        allocated (fallocate: reads as zeros), durable with its directory
        entry when this returns. ENOSPC -> NoSpace, OSError -> StoreError."""
        path = self._segment_path(number)
        created = False  # a segment that existed already is left alone
        try:
            with contextlib.suppress(FileExistsError):
                self.check_identity()  # never create wlog/ where the store was
                os.mkdir(os.path.dirname(path), _DIR_MODE)
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(path, flags, _FILE_MODE)
            created = True
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_directory(os.path.dirname(path))
        except OSError as exc:
            if created:
                _unlink_quietly(path)
            raise _store_error(exc, f"cannot create log segment {path}") from exc

    def write_log_segment(self, number: int, offset: int, data: bytes | bytearray) -> None:
        """Overwrite bytes [offset, offset+len(data)) of segment `number`
        and make them durable (fdatasync) before returning. OSError (a
        missing segment too) -> StoreError."""
        path = self._segment_path(number)
        try:
            fd = open_regular(path, os.O_WRONLY)
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _store_error(exc, f"cannot write log segment {path}") from exc

    def read_log_segment(self, number: int) -> bytes:
        """The whole content of segment `number`. OSError -> StoreError."""
        path = self._segment_path(number)
        try:
            fd = open_regular(path)
            try:
                return _read_up_to(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _store_error(exc, f"cannot read log segment {path}") from exc

    def read_log_range(self, number: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of segment `number` (fewer at its
        end). OSError -> StoreError."""
        path = self._segment_path(number)
        try:
            fd = open_regular(path)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _store_error(exc, f"cannot read log segment {path}") from exc

    def delete_log_segment(self, number: int) -> None:
        """Remove segment `number` (gone already is fine). OSError -> StoreError."""
        path = self._segment_path(number)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _store_error(exc, f"cannot delete log segment {path}") from exc

    # ---- whole store

    def sync(self) -> None:
        """Make everything written to this store so far durable (files and
        directory entries): syncfs(2) on the store's filesystem, or os.sync()
        where syncfs is unavailable. OSError -> StoreError."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _syncfs(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _store_error(exc, f"cannot sync store {self.path}") from exc

    def usage(self) -> StoreUsage:
        """Total and free (usable by unprivileged writers) bytes, by statvfs."""
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            raise _store_error(exc, f"cannot statvfs store {self.path}") from exc
        return StoreUsage(
            total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize
        )


def fragment_relpath(chunk_id: int, index: int) -> str:
    """A fragment's name inside a store: its path relative to a directory
    store (see the layout in the module docstring). ValueError (a caller
    bug) if chunk_id is not in [0, 2**64) or index not in [0, 256)."""
    if not 0 <= chunk_id < _CHUNK_ID_LIMIT:
        raise ValueError(f"chunk id out of range: {chunk_id}")
    if not 0 <= index < _MAX_FRAGMENTS:
        raise ValueError(f"fragment index out of range: {index}")
    fan = _fanout(chunk_id)
    return f"{FRAGS_DIR}/{fan[:2]}/{fan[2:]}/{chunk_id:016x}.{index}"


# --------------------------------------------------------------------------
# Opening store files


class NotRegularFile(OSError):
    """`open_regular` found a directory, FIFO, socket or device."""


def open_regular(
    path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600
) -> int:
    """Open a store file and return its fd, never following a symlink
    (O_NOFOLLOW: ELOOP) nor blocking on a FIFO (O_NONBLOCK), and only if
    fstat says it is a regular file (NotRegularFile otherwise). `mode` is
    for a file that `flags` (O_CREAT) creates. Raises OSError; closes what
    it opened on failure."""
    fd = os.open(path, flags | _OPEN_FLAGS, mode)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, f"is {_file_kind(mode)}, not a regular file")
    return fd


def irregular_entry(path: str | os.PathLike[str]) -> str | None:
    """What the entry at `path` is if it exists and is not a regular file
    ("a FIFO", "a symbolic link", ...), without following it; None for a
    regular file, a missing entry or one that cannot be looked at (opening
    it then reports the problem). For files that others open by name
    (SQLite), to check them before they do."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _entry_problem(exc: OSError) -> str:
    """A short reason for an OSError from opening a store file."""
    if isinstance(exc, NotRegularFile):
        return exc.strerror or "not a regular file"
    if exc.errno == errno.ELOOP:
        return "is a symbolic link (not followed)"
    return exc.strerror or str(exc)


def _read_up_to(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from the start of `fd` (fewer only at EOF)."""
    pieces = []
    got = 0
    while got < limit:
        piece = os.read(fd, limit - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _same_ids(a: StoreMarker, b: StoreMarker) -> bool:
    return a.volume_id == b.volume_id and a.store_id == b.store_id


# --------------------------------------------------------------------------
# Helpers


def _fanout(chunk_id: int) -> str:
    """The 4 hex digits XXYY of a chunk's fan-out directory."""
    return f"{(chunk_id >> 8) & 0xFFFF:04x}"


def _store_error(exc: OSError, what: str) -> StoreError:
    """Translate an OSError: NoSpace for ENOSPC/EDQUOT, else StoreError."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{what}: {reason}")
    return StoreError(f"{what}: {reason}")


def _preadv_all(fd: int, dest: memoryview, offset: int) -> int:
    """preadv into all of `dest`, looping on short reads; the count (less
    only at end of file)."""
    got = os.preadv(fd, [dest], offset)
    total = len(dest)
    while 0 < got < total:
        more = os.preadv(fd, [dest[got:]], offset + got)
        if not more:
            break
        got += more
    return got


def _writev_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> int:
    """Write all of `parts` with os.writev, looping on short writes."""
    pending = [memoryview(p).cast("B") for p in parts]
    pending = [p for p in pending if len(p)]
    total = 0
    iov_max = _iov_max()
    while pending:
        written = os.writev(fd, pending[:iov_max])
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        total += written
        while written:
            head = pending[0]
            if written >= len(head):
                written -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0
    return total


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 1024


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_directory(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) via tmp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, _FILE_MODE)
    try:
        _writev_all(fd, [data])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(str(tmp))
        raise
    os.close(fd)
    os.rename(tmp, path)
    _fsync_directory(path.parent)


def _subdirectories(path: str) -> list[str]:
    """Names of the 2-hex-digit subdirectories of `path`."""
    with os.scandir(path) as entries:
        return [
            e.name for e in entries if _HEX2.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]


def _fragments_in(directory: str, fan: str) -> Iterator[tuple[int, int]]:
    """(chunk_id, index) of the well-named regular fragment files in `directory`."""
    with os.scandir(directory) as entries:
        found = [(e.name, e.is_file(follow_symlinks=False)) for e in entries]
    for name, is_file in found:
        match = _FRAGMENT_NAME.fullmatch(name)
        if not (match and is_file):
            continue
        chunk_id, index = int(match[1], 16), int(match[2])
        if index < _MAX_FRAGMENTS and _fanout(chunk_id) == fan:
            yield chunk_id, index


def _load_syncfs() -> Any:
    """libc's syncfs function, or None where it does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


_SYNCFS = _load_syncfs()


def _syncfs(fd: int) -> None:
    """syncfs(fd), falling back to os.sync(); raises OSError on failure."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
