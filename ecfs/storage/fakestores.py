"""In-process stores for tests: a store in memory, and a fault-injecting
wrapper around any store.

Owns: `MemoryStore` (the whole `ecfs.storage.store.Store` contract, fragments and
small-write log segments kept in dicts) and `FaultyStore` (wraps a store and, switched at run time,
hangs, fails with EIO, is slow, corrupts what is read, is full, or is gone).
Must not: be used by the mount (nothing in ecfs constructs them; tests and
tools do).

Why here and not under tests/: they implement the store interface and must
keep honouring it as it grows (the S3 store of the next issue is tested
against the same contract tests, tests/test_store_contract.py); beside the
interface they are linted and layered with it, and tools (benchmarks, a
demo) may use them too.

Concurrency: like every store, thread-safe; a lock guards each store's
state. `FaultyStore` in "hang" blocks the calling worker thread until the
mode is switched away from "hang" (or HANG_LIMIT seconds pass, so that a
forgotten hang never keeps a test process alive): the caller's
`StoreRunner` times out or is cancelled and abandons the thread, exactly as
with a hung disk.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

from ..core.errors import FragmentMissing, NoSpace, StoreError, StoreSwapped
from .store import (
    DIRECTORY_CONCURRENCY,
    FragmentParts,
    Store,
    StoreMarker,
    StoreUsage,
    fragment_relpath,
)

#: Seconds a hung call waits at most (see the module docstring).
HANG_LIMIT = 60.0

#: What FaultyStore can be switched to (see FaultyStore).
MODES = ("ok", "hang", "eio", "slow", "corrupt", "enospc", "gone")

#: Operation names a fault can be limited to (FaultyStore.set(..., ops=...)).
OPERATIONS = frozenset({"read", "write", "delete", "list", "sync", "probe", "usage", "marker"})

_devices = itertools.count(1 << 40)


class MemoryStore:
    """A store whose fragments are bytes in a dict. Every fragment is "at
    hand": `read_fragment_cached` serves it (unless `cached` is False)."""

    holds_log_segments = True
    concurrency = DIRECTORY_CONCURRENCY

    def __init__(
        self,
        marker: StoreMarker | None = None,
        *,
        name: str = "memory",
        capacity: int = 1 << 40,
        device: int | None = None,
        cached: bool = True,
        remote: bool = False,
        known_space: bool | None = None,
    ) -> None:
        self.path = Path(f"/memory/{name}")
        #: `Store.remote`: as the test configures it.
        self.remote = remote
        #: Whether `usage` reports real space (`StoreUsage.known`); by
        #: default a remote one does not, like an object store.
        self.known_space = not remote if known_space is None else known_space
        self.capacity = capacity
        #: Whether `read_fragment_cached` serves reads (False: every read
        #: takes the slow path, as from a cold disk).
        self.cached = cached
        self.syncs = 0
        self._marker = marker
        self._pinned: StoreMarker | None = None
        self._device = next(_devices) if device is None else device
        self._fragments: dict[tuple[int, int], bytes] = {}
        self._segments: dict[int, bytearray] = {}
        self._used = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore({self.path.name!r}, {len(self._fragments)} fragments)"

    def domain_atoms(self) -> frozenset[str]:
        """Each in-memory store is a failure domain of its own."""
        return frozenset([f"store:{self.path}"])

    @property
    def meta_dir(self) -> Path:
        return self.path / "meta"

    # ---- identity and health

    def read_marker(self) -> StoreMarker:
        marker = self._marker
        if marker is None:
            raise StoreError(f"{self.path}: no ecfs store marker (not a store?)")
        return marker

    def pin_identity(self, marker: StoreMarker | None = None) -> StoreMarker:
        self._pinned = marker if marker is not None else self.read_marker()
        return self._pinned

    def probe(self, *, accept_moved: bool = False) -> StoreMarker:
        marker = self.read_marker()
        if self._pinned is not None and marker != self._pinned:
            raise StoreSwapped(f"{self.path}: another store is here now")
        return marker

    def device(self) -> int:
        return self._device

    def usage(self) -> StoreUsage:
        with self._lock:
            return StoreUsage(self.capacity, max(0, self.capacity - self._used), self.known_space)

    def sync(self) -> None:
        self.syncs += 1

    def retire(self) -> None:
        self.read_marker()
        self._marker = None

    def close(self) -> None:
        pass

    # ---- fragments

    def fragment_relpath(self, chunk_id: int, index: int) -> str:
        return fragment_relpath(chunk_id, index)

    def write_fragment(self, chunk_id: int, index: int, parts: FragmentParts) -> int:
        name = fragment_relpath(chunk_id, index)
        data = b"".join(bytes(p) for p in parts)
        with self._lock:
            if (chunk_id, index) in self._fragments:
                raise StoreError(f"cannot create fragment {self.path}/{name}: File exists")
            if self._used + len(data) > self.capacity:
                raise NoSpace(f"cannot write fragment {self.path}/{name}: No space left on device")
            self._fragments[chunk_id, index] = data
            self._used += len(data)
        return len(data)

    def read_fragment(self, chunk_id: int, index: int, offset: int, dest: memoryview) -> int:
        data = self._get(chunk_id, index)
        piece = data[offset : offset + len(dest)]
        dest[: len(piece)] = piece
        return len(piece)

    def read_fragment_cached(
        self, chunk_id: int, index: int, offset: int, dest: memoryview
    ) -> bool:
        if not self.cached:
            return False
        data = self._fragments.get((chunk_id, index))
        if data is None or offset + len(dest) > len(data):
            return False
        dest[:] = data[offset : offset + len(dest)]
        return True

    def prefetch(self, chunk_id: int, index: int, offset: int, length: int) -> None:
        self._get(chunk_id, index)

    def fragment_size_on_disk(self, chunk_id: int, index: int) -> int:
        return len(self._get(chunk_id, index))

    def delete_fragment(self, chunk_id: int, index: int) -> None:
        fragment_relpath(chunk_id, index)
        with self._lock:
            data = self._fragments.pop((chunk_id, index), None)
            if data is not None:
                self._used -= len(data)

    def iter_fragments(self) -> Iterator[tuple[int, int]]:
        yield from self.list_fragments()

    def list_fragments(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._fragments)

    def stray_entries(self, fragments: list[tuple[int, int]]) -> list[str]:
        return []

    # ---- small-write log segments

    def log_segments(self) -> list[int]:
        with self._lock:
            return sorted(self._segments)

    def create_log_segment(self, number: int, size: int) -> None:
        with self._lock:
            if number in self._segments:
                raise StoreError(f"cannot create log segment {self.path}/wlog/{number}: File exists")
            if self._used + size > self.capacity:
                raise NoSpace(
                    f"cannot create log segment {self.path}/wlog/{number}: No space left on device"
                )
            self._segments[number] = bytearray(size)
            self._used += size

    def write_log_segment(self, number: int, offset: int, data: bytes | bytearray) -> None:
        with self._lock:
            segment = self._log_segment(number)
            grown = max(0, offset + len(data) - len(segment))
            if self._used + grown > self.capacity:
                raise NoSpace(
                    f"cannot write log segment {self.path}/wlog/{number}: No space left on device"
                )
            segment[offset : offset + len(data)] = data
            self._used += grown

    def read_log_segment(self, number: int) -> bytes:
        with self._lock:
            return bytes(self._log_segment(number))

    def read_log_range(self, number: int, offset: int, length: int) -> bytes:
        with self._lock:
            return bytes(self._log_segment(number)[offset : offset + length])

    def delete_log_segment(self, number: int) -> None:
        with self._lock:
            segment = self._segments.pop(number, None)
            if segment is not None:
                self._used -= len(segment)

    def _log_segment(self, number: int) -> bytearray:
        segment = self._segments.get(number)
        if segment is None:
            raise StoreError(f"log segment {self.path}/wlog/{number}: No such file or directory")
        return segment

    # ---- for tests

    def fragment(self, chunk_id: int, index: int) -> bytes | None:
        """The stored bytes of a fragment (None if absent)."""
        return self._fragments.get((chunk_id, index))

    def damage(self, chunk_id: int, index: int, offset: int) -> None:
        """Flip the bits of one stored byte (lasting damage, for scrub)."""
        with self._lock:
            data = bytearray(self._get(chunk_id, index))
            data[offset] ^= 0xFF
            self._fragments[chunk_id, index] = bytes(data)

    def _get(self, chunk_id: int, index: int) -> bytes:
        data = self._fragments.get((chunk_id, index))
        if data is None:
            name = fragment_relpath(chunk_id, index)
            raise FragmentMissing(f"fragment missing: {self.path}/{name}")
        return data


class FaultyStore:
    """Wraps a store; `set(mode)` switches what its calls do, at run time:

    - "ok": pass every call through;
    - "hang": block until switched away (the caller times out);
    - "eio": raise StoreError (Input/output error);
    - "slow": wait `delay` seconds first (or until switched), then pass
      through;
    - "corrupt": flip one byte of every fragment read;
    - "enospc": fragment and log segment writes raise NoSpace, usage shows
      no free space;
    - "gone": the disk vanished: fragments are missing (FragmentMissing),
      every other call raises StoreError.

    `ops` limits a fault to some operations (see OPERATIONS); the others
    pass through. `chunks` limits it to the fragment calls of those chunk
    ids (a "poisoned" chunk); every other call passes through. While a fault affects reads, `read_fragment_cached`
    misses (nothing of a sick store is at hand), except in "corrupt",
    where it serves the corrupted bytes. `calls` counts calls per
    operation, `hanging` the calls blocked now.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.path: Path = inner.path
        self.mode = "ok"
        self.delay = 0.0
        self.ops: frozenset[str] = OPERATIONS
        self.chunks: frozenset[int] | None = None
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        self.hanging = 0
        self._released = threading.Event()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r}, mode={self.mode})"

    def set(
        self,
        mode: str,
        *,
        delay: float = 0.0,
        ops: Collection[str] | None = None,
        chunks: Collection[int] | None = None,
    ) -> None:
        """Switch to `mode` (one of MODES), for operations `ops` (default
        all) on chunks `chunks` (default all)."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        unknown = set(ops or ()) - OPERATIONS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}")
        with self._lock:
            self.mode = mode
            self.delay = delay
            self.ops = frozenset(ops) if ops else OPERATIONS
            self.chunks = frozenset(chunks) if chunks is not None else None
            released, self._released = self._released, threading.Event()
        released.set()  # calls hanging in the previous mode go on

    def heal(self) -> None:
        self.set("ok")

    def _fault(self, op: str, chunk_id: int | None = None) -> str:
        """Count the call, apply hang/slow, and return the mode in force."""
        with self._lock:
            self.calls[op] += 1
            mode = self.mode if op in self.ops and self._affects(chunk_id) else "ok"
            released = self._released
            delay = self.delay
        if mode == "hang":
            with self._lock:
                self.hanging += 1
            try:
                released.wait(HANG_LIMIT)
            finally:
                with self._lock:
                    self.hanging -= 1
            return "ok"
        if mode == "slow":
            released.wait(delay)  # switching the mode ends the delay early
            return "ok"
        if mode == "eio":
            raise StoreError(f"{self.path}: {op}: Input/output error")
        if mode == "gone" and op != "read":
            raise StoreError(f"{self.path}: {op}: No such device")
        return mode

    def _affects(self, chunk_id: int | None) -> bool:
        return self.chunks is None or chunk_id in self.chunks

    @property
    def holds_log_segments(self) -> bool:
        return self.inner.holds_log_segments

    @property
    def remote(self) -> bool:
        return self.inner.remote

    def domain_atoms(self) -> frozenset[str]:
        return self.inner.domain_atoms()

    @property
    def concurrency(self) -> int:
        return self.inner.concurrency

    @property
    def meta_dir(self) -> Path:
        return self.inner.meta_dir

    # ---- identity and health

    def read_marker(self) -> StoreMarker:
        self._fault("marker")
        return self.inner.read_marker()

    def pin_identity(self, marker: StoreMarker | None = None) -> StoreMarker:
        self._fault("marker")
        return self.inner.pin_identity(marker)

    def probe(self, *, accept_moved: bool = False) -> StoreMarker:
        self._fault("probe")
        return self.inner.probe(accept_moved=accept_moved)

    def device(self) -> int:
        self._fault("probe")
        return self.inner.device()

    def usage(self) -> StoreUsage:
        if self._fault("usage") == "enospc":
            return StoreUsage(self.inner.usage().total_bytes, 0, self.inner.usage().known)
        return self.inner.usage()

    def sync(self) -> None:
        self._fault("sync")
        self.inner.sync()

    def retire(self) -> None:
        self._fault("marker")
        self.inner.retire()

    def close(self) -> None:
        self.inner.close()

    # ---- fragments

    def fragment_relpath(self, chunk_id: int, index: int) -> str:
        return self.inner.fragment_relpath(chunk_id, index)

    def write_fragment(self, chunk_id: int, index: int, parts: FragmentParts) -> int:
        if self._fault("write", chunk_id) == "enospc":
            name = fragment_relpath(chunk_id, index)
            raise NoSpace(f"cannot write fragment {self.path}/{name}: No space left on device")
        return self.inner.write_fragment(chunk_id, index, parts)

    def read_fragment(self, chunk_id: int, index: int, offset: int, dest: memoryview) -> int:
        mode = self._fault("read", chunk_id)
        if mode == "gone":
            name = fragment_relpath(chunk_id, index)
            raise FragmentMissing(f"fragment missing: {self.path}/{name}")
        n = self.inner.read_fragment(chunk_id, index, offset, dest)
        if mode == "corrupt" and n:
            dest[n // 2] ^= 0xFF
        return n

    def read_fragment_cached(
        self, chunk_id: int, index: int, offset: int, dest: memoryview
    ) -> bool:
        with self._lock:
            mode = self.mode if "read" in self.ops and self._affects(chunk_id) else "ok"
        if mode not in ("ok", "corrupt", "enospc"):
            return False
        if not self.inner.read_fragment_cached(chunk_id, index, offset, dest):
            return False
        if mode == "corrupt" and len(dest):
            dest[len(dest) // 2] ^= 0xFF
        return True

    def prefetch(self, chunk_id: int, index: int, offset: int, length: int) -> None:
        if self._fault("read", chunk_id) == "gone":
            name = fragment_relpath(chunk_id, index)
            raise FragmentMissing(f"fragment missing: {self.path}/{name}")
        self.inner.prefetch(chunk_id, index, offset, length)

    def fragment_size_on_disk(self, chunk_id: int, index: int) -> int:
        if self._fault("read", chunk_id) == "gone":
            name = fragment_relpath(chunk_id, index)
            raise FragmentMissing(f"fragment missing: {self.path}/{name}")
        return self.inner.fragment_size_on_disk(chunk_id, index)

    def delete_fragment(self, chunk_id: int, index: int) -> None:
        self._fault("delete", chunk_id)
        self.inner.delete_fragment(chunk_id, index)

    def iter_fragments(self) -> Iterator[tuple[int, int]]:
        yield from self.list_fragments()

    def list_fragments(self) -> list[tuple[int, int]]:
        self._fault("list")
        return self.inner.list_fragments()

    def stray_entries(self, fragments: list[tuple[int, int]]) -> list[str]:
        self._fault("list")
        return self.inner.stray_entries(fragments)

    # ---- small-write log segments (a segment is not a fragment: "gone"
    # makes every call fail, reads included)

    def log_segments(self) -> list[int]:
        self._fault("list")
        return self.inner.log_segments()

    def create_log_segment(self, number: int, size: int) -> None:
        self._log_fault("write", number)
        self.inner.create_log_segment(number, size)

    def write_log_segment(self, number: int, offset: int, data: bytes | bytearray) -> None:
        self._log_fault("write", number)
        self.inner.write_log_segment(number, offset, data)

    def read_log_segment(self, number: int) -> bytes:
        return self._corrupted(self._log_fault("read", number), self.inner.read_log_segment(number))

    def read_log_range(self, number: int, offset: int, length: int) -> bytes:
        mode = self._log_fault("read", number)
        return self._corrupted(mode, self.inner.read_log_range(number, offset, length))

    def delete_log_segment(self, number: int) -> None:
        self._fault("delete")
        self.inner.delete_log_segment(number)

    def _log_fault(self, op: str, number: int) -> str:
        mode = self._fault(op)
        if mode == "gone":
            raise StoreError(f"{self.path}: log segment {number}: No such device")
        if mode == "enospc" and op == "write":
            raise NoSpace(f"cannot write log segment {self.path}/wlog/{number}: No space left on device")
        return mode

    @staticmethod
    def _corrupted(mode: str, data: bytes) -> bytes:
        if mode != "corrupt" or not data:
            return data
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF
        return bytes(damaged)
