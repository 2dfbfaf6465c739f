"""SQL for chunk maps and the repair queue.

Owns: the `chunks`, `repair_queue` and `pending_deletions` tables (see
`schema`). Must not:
decide placement, read fragments, or know about FUSE.

All writes must run inside the caller's `db.transaction()`.

Chunk-map cache: every read request needs the chunk refs of the range it
reads, and a SQL point query costs ~100-200 us, as much as the rest of a
1 MiB read. So `get` and `get_range` answer from a cache of rows (and of
holes) that all ChunkTables of one Database share, kept exact by this
module's own write methods (the only writers of `chunks` while a volume is
open) and dropped on a rollback. It is bounded: past CACHE_LIMIT cached
indices it starts over.

Counts for the status (`ChunkTable.redundancy_classes`,
`RepairQueue.known_damage`): kept current by TEMP triggers, see
`ecfs.storage.metadb.tallies`.
"""

from __future__ import annotations

import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from ...core.model import NO_STORE, ChunkRef
from . import tallies
from .database import Database
from .schema import MISSING_STORE_BYTE

_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG


def encode_stores(stores: tuple[int, ...]) -> bytes:
    """ChunkRef.stores -> the `chunks.stores` blob (0xFF for NO_STORE)."""
    return bytes(MISSING_STORE_BYTE if s == NO_STORE else s for s in stores)


def decode_stores(blob: bytes) -> tuple[int, ...]:
    return tuple(NO_STORE if b == MISSING_STORE_BYTE else b for b in blob)


def _ref(chunk_id: int, length: int, stores: bytes, k: int | None) -> ChunkRef:
    return ChunkRef(chunk_id, length, decode_stores(stores), k or 0)


#: Cached chunk indices (refs and holes) per Database before the cache is
#: emptied (~200 bytes each).
CACHE_LIMIT = 1 << 17


class _ChunkCache:
    """Rows of `chunks` by inode and index (None: a hole), and where each
    cached chunk id sits. See the module docstring."""

    def __init__(self) -> None:
        self.by_inode: dict[int, dict[int, ChunkRef | None]] = {}
        self.where: dict[int, tuple[int, int]] = {}
        self.size = 0

    def clear(self) -> None:
        self.by_inode.clear()
        self.where.clear()
        self.size = 0

    def lookup(self, inode: int, idx: int) -> tuple[bool, ChunkRef | None]:
        entries = self.by_inode.get(inode)
        if entries is None or idx not in entries:
            return False, None
        return True, entries[idx]

    def store(self, inode: int, idx: int, ref: ChunkRef | None) -> None:
        entries = self.by_inode.get(inode)
        if entries is None:
            if self.size >= CACHE_LIMIT:
                self.clear()
            entries = self.by_inode[inode] = {}
        old = entries.get(idx)
        if old is not None:
            self.where.pop(old.chunk_id, None)
        elif idx not in entries:
            self.size += 1
        entries[idx] = ref
        if ref is not None:
            self.where[ref.chunk_id] = (inode, idx)

    def forget_from(self, inode: int, first: int) -> None:
        entries = self.by_inode.get(inode)
        if entries is None:
            return
        for idx in [i for i in entries if i >= first]:
            ref = entries.pop(idx)
            self.size -= 1
            if ref is not None:
                self.where.pop(ref.chunk_id, None)

    def forget_chunk(self, chunk_id: int) -> None:
        place = self.where.pop(chunk_id, None)
        if place is not None:
            entries = self.by_inode[place[0]]
            del entries[place[1]]
            self.size -= 1


_caches: weakref.WeakKeyDictionary[Database, _ChunkCache] = weakref.WeakKeyDictionary()


def _cache_of(db: Database) -> _ChunkCache:
    cache = _caches.get(db)
    if cache is None:
        cache = _caches[db] = _ChunkCache()
        db.on_rollback.append(cache.clear)
    return cache


class ChunkTable:
    """Chunk maps of files: which chunk version holds chunk index i of inode."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache = _cache_of(db)

    def get_range(self, inode: int, first: int, last: int) -> dict[int, ChunkRef]:
        """Chunk refs of indices first..last (inclusive) that exist (holes omitted)."""
        cache = self._cache
        entries = cache.by_inode.get(inode)
        if entries is not None and all(i in entries for i in range(first, last + 1)):
            return {i: ref for i in range(first, last + 1) if (ref := entries[i]) is not None}
        rows = self.db.query(
            "SELECT idx, chunk_id, length, stores, k FROM chunks"
            " WHERE inode = ? AND idx BETWEEN ? AND ?",
            (inode, first, last),
        )
        found = {idx: _ref(cid, length, stores, k) for idx, cid, length, stores, k in rows}
        for idx in range(first, last + 1):
            cache.store(inode, idx, found.get(idx))
        return found

    def get(self, inode: int, idx: int) -> ChunkRef | None:
        cached, ref = self._cache.lookup(inode, idx)
        if cached:
            return ref
        row = self.db.query_one(
            "SELECT chunk_id, length, stores, k FROM chunks WHERE inode = ? AND idx = ?",
            (inode, idx),
        )
        ref = None if row is None else _ref(*row)
        self._cache.store(inode, idx, ref)
        return ref

    def put(self, inode: int, idx: int, ref: ChunkRef) -> ChunkRef | None:
        """Make `ref` the chunk at (inode, idx); return the version it replaced."""
        old = self.get(inode, idx)
        self.db.write(
            "INSERT OR REPLACE INTO chunks (inode, idx, chunk_id, length, stores, k)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (inode, idx, ref.chunk_id, ref.length, encode_stores(ref.stores), ref.k or None),
        )
        self._cache.store(inode, idx, ref)
        if old is not None:
            self.db.write("DELETE FROM repair_queue WHERE chunk_id = ?", (old.chunk_id,))
        return old

    def remove(self, inode: int, idx: int) -> ChunkRef | None:
        """Delete chunk idx of inode (it becomes a hole); return it."""
        old = self.get(inode, idx)
        if old is not None:
            self.db.write("DELETE FROM chunks WHERE inode = ? AND idx = ?", (inode, idx))
            self._cache.store(inode, idx, None)
            self.db.write("DELETE FROM repair_queue WHERE chunk_id = ?", (old.chunk_id,))
        return old

    def remove_from(self, inode: int, first: int) -> list[ChunkRef]:
        """Delete chunks idx >= first of inode; return what was removed."""
        rows = self.db.query(
            "SELECT chunk_id, length, stores, k FROM chunks WHERE inode = ? AND idx >= ?",
            (inode, first),
        )
        self._cache.forget_from(inode, first)
        if rows:
            self.db.write("DELETE FROM chunks WHERE inode = ? AND idx >= ?", (inode, first))
            self.db.write(
                "DELETE FROM repair_queue WHERE chunk_id IN"
                " (SELECT chunk_id FROM repair_queue EXCEPT SELECT chunk_id FROM chunks)"
            )
        return [_ref(*row) for row in rows]

    def lengths_in(self, inode: int, first: int, last: int) -> list[tuple[int, int]]:
        """(idx, length) of the stored chunks first..last (inclusive) of
        inode, by index (uncached: for a range of any size, e.g. fallocate)."""
        return [
            (int(idx), int(length))
            for idx, length in self.db.query(
                "SELECT idx, length FROM chunks WHERE inode = ? AND idx BETWEEN ? AND ?"
                " ORDER BY idx",
                (inode, first, last),
            )
        ]

    def set_stores(self, chunk_id: int, stores: tuple[int, ...]) -> bool:
        """Record new fragment locations of a chunk (repair); False if gone."""
        self._cache.forget_chunk(chunk_id)
        return (
            self.db.write(
                "UPDATE chunks SET stores = ? WHERE chunk_id = ?",
                (encode_stores(stores), chunk_id),
            )
            > 0
        )

    def by_id(self, chunk_id: int) -> tuple[int, int, ChunkRef] | None:
        """(inode, idx, ref) of a chunk id, or None if it no longer exists."""
        row = self.db.query_one(
            "SELECT inode, idx, chunk_id, length, stores, k FROM chunks WHERE chunk_id = ?",
            (chunk_id,),
        )
        if row is None:
            return None
        return row[0], row[1], _ref(row[2], row[3], row[4], row[5])

    def iter_all(self) -> Iterator[tuple[int, int, ChunkRef]]:
        """Every (inode, idx, ref) of the volume (for fsck, scrub, rebuilds)."""
        for inode, idx, cid, length, stores, k in self.db.query(
            "SELECT inode, idx, chunk_id, length, stores, k FROM chunks ORDER BY chunk_id"
        ):
            yield inode, idx, _ref(cid, length, stores, k)

    def of_inode(self, inode: int) -> list[tuple[int, ChunkRef]]:
        """Every (idx, ref) of one file, by index (for `ecfs fsck --path`)."""
        return [
            (idx, _ref(cid, length, stores, k))
            for idx, cid, length, stores, k in self.db.query(
                "SELECT idx, chunk_id, length, stores, k FROM chunks WHERE inode = ? ORDER BY idx",
                (inode,),
            )
        ]

    def mark_verified(self, chunk_ids: list[int], now_ns: int) -> None:
        for chunk_id in chunk_ids:
            self.db.write("UPDATE chunks SET verified_ns = ? WHERE chunk_id = ?", (now_ns, chunk_id))

    def least_recently_verified(self, after: tuple[int, int], limit: int) -> list[tuple[int, int]]:
        """(verified_ns, chunk_id) of chunks in scrub order after `after`."""
        return [
            (int(v), int(c))
            for v, c in self.db.query(
                "SELECT verified_ns, chunk_id FROM chunks WHERE (verified_ns, chunk_id) > (?, ?)"
                " ORDER BY verified_ns, chunk_id LIMIT ?",
                (after[0], after[1], limit),
            )
        ]

    def redundancy_classes(self) -> list[tuple[tuple[int, ...], int, int, int]]:
        """(stores tuple, chunk k (0: the volume's), chunk count, bytes) per
        distinct placement and coding (`tallies`: O(classes), not O(chunks))."""
        return [
            (decode_stores(stores), int(k), int(count), int(size))
            for stores, k, count, size in tallies.redundancy_classes(self.db)
        ]

    def widest(self) -> int:
        """The most fragment slots of any chunk (0 without chunks)."""
        return int(self.db.query_value("SELECT COALESCE(MAX(length(stores)), 0) FROM chunks", default=0))

    def chunks_of(self, inode: int) -> list[tuple[int, ChunkRef]]:
        """(idx, ref) of every chunk of inode, by index (uncached)."""
        return [
            (int(idx), _ref(cid, length, stores, k))
            for idx, cid, length, stores, k in self.db.query(
                "SELECT idx, chunk_id, length, stores, k FROM chunks WHERE inode = ? ORDER BY idx",
                (inode,),
            )
        ]

    def replace_if(self, inode: int, idx: int, old_id: int, ref: ChunkRef) -> bool:
        """Make `ref` the chunk at (inode, idx) if chunk `old_id` still is
        (restripe's swap; a write in between wins). True if replaced."""
        current = self.get(inode, idx)
        if current is None or current.chunk_id != old_id:
            return False
        self.put(inode, idx, ref)
        return True

    def stored_bytes(self) -> int:
        return int(self.db.query_value("SELECT COALESCE(SUM(length), 0) FROM chunks", default=0))

    def stored_bytes_of(self, inode: int) -> int:
        """The summed lengths of one inode's chunks."""
        return int(
            self.db.query_value(
                "SELECT COALESCE(SUM(length), 0) FROM chunks WHERE inode = ?", (inode,), 0
            )
        )

    def count(self) -> int:
        """Number of chunk rows."""
        return int(self.db.query_value("SELECT COUNT(*) FROM chunks", default=0))

    def misplaced(self, chunk_size: int) -> list[tuple[int, int, ChunkRef, str]]:
        """(inode, idx, ref, reason) of chunk rows no file can own (fsck):
        reason 'no-inode' (the inode does not exist), 'not-a-file' (it is
        not a regular file) or 'beyond-size' (idx * chunk_size >= size)."""
        rows = self.db.query(
            "SELECT c.inode, c.idx, c.chunk_id, c.length, c.stores, c.k,"
            " CASE WHEN i.id IS NULL THEN 'no-inode'"
            f" WHEN (i.mode & {_S_IFMT}) != {_S_IFREG} THEN 'not-a-file'"
            " ELSE 'beyond-size' END"
            " FROM chunks AS c LEFT JOIN inodes AS i ON i.id = c.inode"
            f" WHERE i.id IS NULL OR (i.mode & {_S_IFMT}) != {_S_IFREG}"
            " OR c.idx * ? >= i.size ORDER BY c.inode, c.idx",
            (chunk_size,),
        )
        return [
            (int(inode), int(idx), _ref(cid, length, stores, k), str(reason))
            for inode, idx, cid, length, stores, k, reason in rows
        ]


@dataclass(frozen=True, slots=True)
class RepairEntry:
    """One queued chunk (see the repair_queue table)."""

    chunk_id: int
    reason: str
    priority: int
    demand: int
    bad: int  # bitmask of fragment indices known bad


class RepairQueue:
    """Persistent queue of chunks with missing or bad fragments."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        chunk_id: int,
        reason: str,
        priority: int,
        now_ns: int,
        bad: int = 0,
        demand: int = 1,
    ) -> None:
        """Queue a chunk, or merge into its entry: the more urgent priority,
        demand added up, bad fragments OR-ed."""
        self.db.write(
            "INSERT INTO repair_queue (chunk_id, reason, priority, demand, bad, enqueued_ns)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (chunk_id) DO UPDATE SET"
            " priority = MIN(priority, excluded.priority),"
            " demand = demand + excluded.demand, bad = bad | excluded.bad",
            (chunk_id, reason, priority, demand, bad, now_ns),
        )

    def remove(self, chunk_id: int) -> None:
        self.db.write("DELETE FROM repair_queue WHERE chunk_id = ?", (chunk_id,))

    def remove_unchanged(self, entries: list[tuple[int, int, int, int]]) -> None:
        """Remove the entries (chunk_id, priority, demand, bad) that are
        still as given: one merged into since it was read (a fragment
        reported bad, a degraded read's demand) stays queued."""
        for chunk_id, priority, demand, bad in entries:
            self.db.write(
                "DELETE FROM repair_queue WHERE chunk_id = ? AND priority = ?"
                " AND demand = ? AND bad = ?",
                (chunk_id, priority, demand, bad),
            )

    def contains(self, chunk_id: int) -> bool:
        return self.db.query_one("SELECT 1 FROM repair_queue WHERE chunk_id = ?", (chunk_id,)) is not None

    def bad_mask(self, chunk_id: int) -> int | None:
        """The known-bad fragment mask of a queued chunk; None if not queued."""
        row = self.db.query_one("SELECT bad FROM repair_queue WHERE chunk_id = ?", (chunk_id,))
        return None if row is None else int(row[0])

    def known_damage(self) -> list[tuple[tuple[int, ...], int, int, int]]:
        """(stores, chunk k (0: the volume's), bad mask, chunks) of the queued
        chunks with known-bad fragments, grouped (for the status's
        tolerance; `tallies`: O(groups), not O(queue))."""
        return [
            (decode_stores(stores), int(k), int(bad), int(count))
            for stores, k, bad, count in tallies.known_damage(self.db)
        ]

    def queued_on_stores(self, reason: str) -> Iterator[tuple[int, int]]:
        """(store, chunk_id) of the known-bad fragments of the chunks queued
        for `reason` (a chunk's entry keeps the reason it was first queued
        for; its bad mask may hold fragments reported bad since)."""
        for chunk_id, bad, stores in self.db.query(
            "SELECT q.chunk_id, q.bad, c.stores FROM repair_queue AS q"
            " JOIN chunks AS c ON c.chunk_id = q.chunk_id WHERE q.reason = ?",
            (reason,),
        ):
            for index, store in enumerate(decode_stores(stores)):
                if int(bad) >> index & 1 and store != NO_STORE:
                    yield store, int(chunk_id)

    def entries_of(self, chunk_ids: list[int]) -> list[RepairEntry]:
        """The entries of those of `chunk_ids` that are queued, in that order."""
        found: dict[int, RepairEntry] = {}
        for start in range(0, len(chunk_ids), 500):
            batch = chunk_ids[start : start + 500]
            marks = ", ".join("?" * len(batch))
            for a, b, c, d, e in self.db.query(
                "SELECT chunk_id, reason, priority, demand, bad FROM repair_queue"
                f" WHERE chunk_id IN ({marks})",
                tuple(batch),
            ):
                found[int(a)] = RepairEntry(int(a), str(b), int(c), int(d), int(e))
        return [found[c] for c in chunk_ids if c in found]

    def next_batch(self, limit: int = 64) -> list[RepairEntry]:
        """The most urgent entries: priority, then demand, then age (read
        in the order of the index `repair_queue_order`, not sorted)."""
        return [
            RepairEntry(int(a), str(b), int(c), int(d), int(e))
            for a, b, c, d, e in self.db.query(
                "SELECT chunk_id, reason, priority, demand, bad FROM repair_queue"
                " ORDER BY priority, demand DESC, enqueued_ns LIMIT ?",
                (limit,),
            )
        ]

    def entries(self, limit: int = 1000) -> list[tuple[int, str, int, int]]:
        """(chunk_id, reason, priority, demand), most urgent first."""
        return [(e.chunk_id, e.reason, e.priority, e.demand) for e in self.next_batch(limit)]

    def count(self) -> int:
        return int(self.db.query_value("SELECT COUNT(*) FROM repair_queue", default=0))

    def dangling(self) -> list[int]:
        """Queued chunk ids that no chunk row has (fsck), ascending."""
        return [
            int(r[0])
            for r in self.db.query(
                "SELECT chunk_id FROM repair_queue EXCEPT SELECT chunk_id FROM chunks"
                " ORDER BY 1"
            )
        ]

    def summary(self) -> list[tuple[str, int, int]]:
        """(reason, chunks, file bytes) per reason."""
        return [
            (str(reason), int(count), int(size))
            for reason, count, size in self.db.query(
                "SELECT q.reason, COUNT(*), COALESCE(SUM(c.length), 0) FROM repair_queue q"
                " LEFT JOIN chunks c ON c.chunk_id = q.chunk_id GROUP BY q.reason"
            )
        ]

    def enqueue_store(self, store: int, reason: str, priority: int, now_ns: int) -> list[int]:
        """Queue every chunk with a fragment on `store` (bulk rebuild);
        returns their chunk ids."""
        queued = []
        for chunk_id, stores in self.db.query("SELECT chunk_id, stores FROM chunks"):
            bad = 0
            for index, value in enumerate(stores):
                if value == store:
                    bad |= 1 << index
            if bad:
                self.add(chunk_id, reason, priority, now_ns, bad=bad, demand=0)
                queued.append(int(chunk_id))
        return queued


class PendingDeletions:
    """Fragment files that still have to be deleted, per store (see the
    `pending_deletions` table)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, fragments: list[tuple[int, int, int]]) -> None:
        """Remember (store, chunk_id, index) triples."""
        for store, chunk_id, index in fragments:
            self.db.write(
                "INSERT OR IGNORE INTO pending_deletions (store, chunk_id, idx) VALUES (?, ?, ?)",
                (store, chunk_id, index),
            )

    def remove(self, fragments: list[tuple[int, int, int]]) -> None:
        for store, chunk_id, index in fragments:
            self.db.write(
                "DELETE FROM pending_deletions WHERE store = ? AND chunk_id = ? AND idx = ?",
                (store, chunk_id, index),
            )

    def on_stores(self, stores: list[int], limit: int = 1024) -> list[tuple[int, int, int]]:
        """Up to `limit` remembered (store, chunk_id, index) on `stores`."""
        if not stores:
            return []
        marks = ",".join("?" * len(stores))
        return [
            (int(s), int(c), int(i))
            for s, c, i in self.db.query(
                f"SELECT store, chunk_id, idx FROM pending_deletions WHERE store IN ({marks})"
                " ORDER BY store, chunk_id, idx LIMIT ?",
                (*stores, limit),
            )
        ]

    def of_store(self, store: int) -> set[tuple[int, int]]:
        """(chunk_id, index) of every remembered fragment on `store`."""
        return {
            (int(c), int(i))
            for c, i in self.db.query(
                "SELECT chunk_id, idx FROM pending_deletions WHERE store = ?", (store,)
            )
        }

    def stores(self) -> set[int]:
        """The stores that have remembered fragments."""
        return {int(r[0]) for r in self.db.query("SELECT DISTINCT store FROM pending_deletions")}

    def forget_stores(self, stores: list[int]) -> None:
        """Drop every row of `stores` (stores no longer in the volume)."""
        for store in stores:
            self.db.write("DELETE FROM pending_deletions WHERE store = ?", (store,))

    def count(self) -> int:
        return int(self.db.query_value("SELECT COUNT(*) FROM pending_deletions", default=0))
