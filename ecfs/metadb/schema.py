"""The metadata schema, documented column by column, and volume creation.

Owns: the DDL of every table and the initial rows of a new volume. Must
not: run queries for the filesystem (see `inodes` and `chunks`).

Every database of a volume (the mount's working copy and each replica on a
store) has exactly this schema. Ids (inode numbers, chunk ids) are always
chosen by ecfs from `counters`, never by SQLite, so that replaying the same
statements on a replica gives an identical database.
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from .writelog import create_write_log_table

#: Version of this schema; stored in `volume` under key "schema".
SCHEMA_VERSION = 1

#: Inode number of the root directory (FUSE's ROOT_INODE).
ROOT_INODE = 1

#: Byte value in `chunks.stores` meaning "this fragment is not stored".
MISSING_STORE_BYTE = 0xFF

SCHEMA = """
-- Volume parameters, key -> value (text): uuid, k, m, fragment_size,
-- cell_size, inline_max, schema, created_ns.
CREATE TABLE volume (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Monotonic id counters: 'inode' (next inode number), 'chunk' (next chunk id).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);

-- Generation of this database: the number of transactions applied. The
-- replica with the highest generation is the freshest.
CREATE TABLE replica_state (
    id         INTEGER PRIMARY KEY CHECK (id = 0),
    generation INTEGER NOT NULL
);

-- The stores of the volume. idx: the small integer used in chunks.stores
-- (stable for the life of the store); store_id: UUID hex in the store's
-- marker; state: 'active' (used for new data) or 'draining' (being
-- removed); path: where the store was last seen (so a dead store can still
-- be named by its path, e.g. in `ecfs store replace`).
CREATE TABLE stores (
    idx      INTEGER PRIMARY KEY,
    store_id TEXT NOT NULL UNIQUE,
    state    TEXT NOT NULL DEFAULT 'active',
    path     TEXT NOT NULL DEFAULT ''
);

-- One row per inode. mode: st_mode incl. file type; size: st_size in bytes;
-- times in ns since the epoch; rdev for device nodes; inline_data holds the
-- whole content of a small regular file (NULL when the data is in chunks,
-- and for every other file type).
CREATE TABLE inodes (
    id          INTEGER PRIMARY KEY,
    mode        INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    gid         INTEGER NOT NULL,
    nlink       INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    atime_ns    INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,
    rdev        INTEGER NOT NULL DEFAULT 0,
    inline_data BLOB
);

-- Directory entries: name (raw bytes, never '/' or NUL) in directory
-- `parent` refers to `inode`. A directory's '.' and '..' are not stored.
-- The rowid orders entries for readdir and serves as its resume cookie
-- (cookies need only be stable while the mount runs).
CREATE TABLE dentries (
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_inode ON dentries (inode);

-- Symlink targets (raw bytes).
CREATE TABLE symlinks (
    inode  INTEGER PRIMARY KEY,
    target BLOB NOT NULL
);

-- Extended attributes: raw name and value bytes.
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;

-- The chunk map: chunk number idx (file bytes [idx*k*F, (idx+1)*k*F)) of
-- inode is stored as chunk version chunk_id holding `length` file bytes.
-- stores: k+m bytes, byte i = index of the store holding fragment i, or
-- 0xFF when that fragment is missing. A chunk index with no row is a hole.
-- verified_ns: when scrub last verified every cell of every fragment (0:
-- never); scrub visits the oldest first.
CREATE TABLE chunks (
    inode       INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    chunk_id    INTEGER NOT NULL UNIQUE,
    length      INTEGER NOT NULL,
    stores      BLOB NOT NULL,
    verified_ns INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (inode, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_verified ON chunks (verified_ns);

-- Chunks that need repair. reason: why it was first queued ('degraded-read',
-- 'write' (reduced redundancy), 'scrub', 'store-failed', 'store-replaced');
-- priority: the repair order class (see ecfs.repair: risk first, then
-- demand, then scrub findings, then bulk rebuilds), lower is sooner;
-- demand: degraded reads that hit the chunk (more come first);
-- bad: bitmask of fragment indices known to be missing or corrupt;
-- enqueued_ns: when first queued.
CREATE TABLE repair_queue (
    chunk_id    INTEGER PRIMARY KEY,
    reason      TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    demand      INTEGER NOT NULL DEFAULT 0,
    bad         INTEGER NOT NULL DEFAULT 0,
    enqueued_ns INTEGER NOT NULL
);

-- readdir walks one directory in rowid order from a resume cookie; an index
-- on parent alone is implicitly (parent, rowid), so that walk is a range scan.
CREATE INDEX dentries_by_parent ON dentries (parent);
"""


def create_database(
    path: Path,
    params: Mapping[str, str | int],
    store_ids: Sequence[str],
    *,
    root_uid: int,
    root_gid: int,
    now_ns: int,
) -> None:
    """Create a new volume database at `path` (must not exist).

    `params` become rows of `volume`; `store_ids[i]` becomes store idx i. The
    root directory is inode 1 (mode 0755, owned by root_uid/root_gid). The
    file is fully written and fsynced when this returns.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        create_write_log_table(conn)  # ecfs.metadb.writelog documents it
        conn.execute("BEGIN")
        rows = dict(params)
        rows["schema"] = SCHEMA_VERSION
        rows["created_ns"] = now_ns
        conn.executemany(
            "INSERT INTO volume (key, value) VALUES (?, ?)",
            [(key, str(value)) for key, value in sorted(rows.items())],
        )
        conn.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?)",
            [("inode", ROOT_INODE + 1), ("chunk", 1)],
        )
        conn.execute("INSERT INTO replica_state (id, generation) VALUES (0, 0)")
        conn.executemany(
            "INSERT INTO stores (idx, store_id) VALUES (?, ?)", list(enumerate(store_ids))
        )
        conn.execute(
            "INSERT INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns)"
            " VALUES (?, ?, ?, ?, 2, 0, ?, ?, ?)",
            (ROOT_INODE, stat.S_IFDIR | 0o755, root_uid, root_gid, now_ns, now_ns, now_ns),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    path.chmod(0o600)
