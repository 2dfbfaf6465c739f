"""Verified fragment headers: reading one through the store interface, and a
bounded cache of them, so that a healthy read needs no header read.

Owns: what a fragment's header must say to belong to a chunk of this
volume (`Expected`), reading and checking it (`read_header`), and the
cache of checked headers by (store index, chunk id, fragment index)
(`HandleCache`: a "handle" on a fragment is its verified header). Must
not: read payload bytes or decide what is degraded (see `reader`), or hold
anything of a store's own (open files live behind the store interface,
see `ecfs.storage.store` and `ecfs.storage.fdcache`).

Invalidation: whoever deletes or rewrites a fragment discards its handle
(`discard`, `discard_chunk`); a store that failed or was replaced loses
all of its handles (`discard_store`). Concurrency: the cache belongs to the
event loop thread; `read_header` is blocking and runs in worker threads.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

from ..core import fragment
from ..core.errors import FragmentCorrupt
from ..core.model import ChunkRef
from .store import Store

#: (store index, chunk id, fragment index)
HandleKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Expected:
    """What a fragment's header must say to belong to a chunk of this volume."""

    volume_id: bytes
    k: int
    m: int
    cell_size: int

    def coded(self, k: int, m: int) -> Expected:
        """What a fragment of a chunk of its own coding k + m must say."""
        if k == self.k and m == self.m:
            return self
        return _coded(self, k, m)

    def of(self, ref: ChunkRef) -> Expected:
        """What a fragment of stored chunk `ref` must say (its own coding)."""
        k = ref.k
        if not k:
            return self
        return self.coded(k, len(ref.stores) - k)


@functools.lru_cache(maxsize=256)
def _coded(base: Expected, k: int, m: int) -> Expected:
    return Expected(base.volume_id, k, m, base.cell_size)


def read_header(
    store: Store, chunk_id: int, index: int, expected: Expected, *, probe: int = 0
) -> tuple[fragment.FragmentHeader, memoryview]:
    """Blocking: read a fragment's header and verify it against what the
    metadata expects. Returns (header, prefix): the first
    max(probe, HEADER_PROBE_SIZE) bytes of the fragment (fewer at its end),
    read in one request, so that a caller may take payload bytes from it.
    Raises FragmentMissing, BadFragmentEntry, StoreError or FragmentCorrupt."""
    buf = bytearray(max(probe, fragment.HEADER_PROBE_SIZE))
    prefix = memoryview(buf)[: store.read_fragment(chunk_id, index, 0, memoryview(buf))]
    needed = fragment.header_size_needed(prefix)
    if needed > len(prefix):
        buf = bytearray(needed)
        prefix = memoryview(buf)[: store.read_fragment(chunk_id, index, 0, memoryview(buf))]
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
    return header, prefix


class HandleCache:
    """LRU of verified fragment headers by (store, chunk, index), at most
    `capacity` of them."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._headers: OrderedDict[HandleKey, fragment.FragmentHeader] = OrderedDict()

    def __len__(self) -> int:
        return len(self._headers)

    def get(self, key: HandleKey) -> fragment.FragmentHeader | None:
        """The verified header of fragment `key`, or None."""
        header = self._headers.get(key)
        if header is not None:
            self._headers.move_to_end(key)
        return header

    def insert(self, key: HandleKey, header: fragment.FragmentHeader) -> None:
        self._headers[key] = header
        self._headers.move_to_end(key)
        while len(self._headers) > self.capacity:
            self._headers.popitem(last=False)

    def discard(self, key: HandleKey) -> None:
        """Forget a fragment's header (bad, deleted or about to be rewritten)."""
        self._headers.pop(key, None)

    def discard_chunk(self, chunk_id: int, n: int, stores: tuple[int, ...]) -> None:
        for index in range(n):
            self.discard((stores[index], chunk_id, index))

    def discard_store(self, store: int) -> None:
        for key in [key for key in self._headers if key[0] == store]:
            del self._headers[key]

    def close_all(self) -> None:
        """Forget every header."""
        self._headers.clear()
