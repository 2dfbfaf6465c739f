"""The metadata schema, documented column by column, and volume creation.

Owns: the DDL of every table and the initial rows of a new volume,
recognising a database's schema version (`schema_version`), upgrading an
older working copy (`upgrade_database`) and recording a digest anew
(`record_digest`), and the inline data checksum (`inline_checksum`). Must
not: run queries for the filesystem (see `inodes` and `chunks`).

Every database of a volume (the mount's working copy and each replica on a
store) has exactly this schema: `SCHEMA` (version 1) followed by
`SCHEMA_2_DDL`, `SCHEMA_3_DDL`, then `SCHEMA_4_DDL`. A new volume is made
by running all four, so that its DDL text is the same as that of an older
volume upgraded by `upgrade_database`,
and `schema_version` can compare a copy's ``sqlite_master`` with the
expected one exactly: any other table, index, view or trigger (or a
changed definition) makes the copy unknown, and `ecfs.storage.replicas` refuses
it. Ids (inode numbers, chunk ids) are always
chosen by ecfs from `counters`, never by SQLite, so that replaying the same
statements on a replica gives an identical database.
"""

from __future__ import annotations

import functools
import sqlite3
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...core.fragment import checksum64
from .digest import content_digest
from .writelog import create_write_log_table

#: Version of this schema; stored in `volume` under key "schema".
#: 1: the tables of `SCHEMA`; 2: plus `SCHEMA_2_DDL` (content digest,
#: inline data checksums, remembered deletions) and the small-write log;
#: 3: plus `SCHEMA_3_DDL` (per-chunk coding, restripe work); 4: plus
#: `SCHEMA_4_DDL` (the repair queue's order index).
SCHEMA_VERSION = 4

#: Schema versions `schema_version` recognises (older ones are upgraded).
KNOWN_VERSIONS = (1, 2, 3, 4)

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

-- Monotonic id counters: 'inode' (next inode number), 'chunk' (next chunk id),
-- 'log' (next small-write log record number; added at mount to older volumes).
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
-- priority: the repair order class (see ecfs.data.repair: risk first, then
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

SCHEMA_2_DDL = """
-- replica_state.digest: the content digest of this database's rows (32 hex
-- digits, see ecfs.storage.metadb.digest), written by every transaction together
-- with the generation, so that each copy can be checked against its rows.
ALTER TABLE replica_state ADD COLUMN digest TEXT NOT NULL DEFAULT '';
-- inodes.inline_checksum: xxh3_64 of inline_data as a signed 64-bit
-- integer (`inline_checksum`), NULL when inline_data is NULL; verified on
-- every read of the inline data.
ALTER TABLE inodes ADD COLUMN inline_checksum INTEGER;
-- Fragment files to delete that could not be deleted when they became
-- garbage (their store was away, failed or not mounted), or that a failed
-- write may have left behind: fragment `idx` of chunk `chunk_id` on store
-- `store`. Retried when the store is available (see ecfs.data.garbage); a row
-- whose (store, chunk, idx) a chunk refers to again is dropped, never
-- deleted. Added in schema 2.
CREATE TABLE pending_deletions (
    store    INTEGER NOT NULL,
    chunk_id INTEGER NOT NULL,
    idx      INTEGER NOT NULL,
    PRIMARY KEY (store, chunk_id, idx)
) WITHOUT ROWID;
"""


SCHEMA_3_DDL = """
-- chunks.k: the number of data fragments k' of this chunk's own coding
-- (its parity count is m' = length(stores) - k'); NULL: the volume's k
-- (and then length(stores) = k + m). A chunk still holds file bytes
-- [idx*k*F, (idx+1)*k*F) of the volume's chunk size; its `length` bytes are
-- split into k' data fragments of ceil(length / k') bytes (see
-- ecfs.core.geometry.Layout.coded). Set by writes under a per-directory
-- redundancy policy (the xattr user.ecfs.policy) and by restripe.
ALTER TABLE chunks ADD COLUMN k INTEGER;
-- Restripe work (ecfs.data.restripe): converting the files below directory
-- `root` to their effective policy. cursor: every file with an inode
-- number <= cursor is done (files_done of them); files_total /
-- chunks_total / bytes_total: what the work covered when it started;
-- chunks_done / bytes_done: chunks re-encoded or found right so far;
-- started_ns: when it was asked for. A row is deleted when its work is
-- finished.
CREATE TABLE restripe (
    root         INTEGER PRIMARY KEY,
    cursor       INTEGER NOT NULL DEFAULT 0,
    files_done   INTEGER NOT NULL DEFAULT 0,
    files_total  INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    bytes_total  INTEGER NOT NULL DEFAULT 0,
    chunks_done  INTEGER NOT NULL DEFAULT 0,
    bytes_done   INTEGER NOT NULL DEFAULT 0,
    started_ns   INTEGER NOT NULL DEFAULT 0
);
"""


SCHEMA_4_DDL = """
-- The repair queue in the order the repair task takes it (most urgent
-- first: ecfs.storage.metadb.chunks.RepairQueue.next_batch). Without it
-- every look at the queue sorted the whole of it on the event loop: 18 ms
-- at 200,000 entries (a replaced store's rebuild queues all its chunks),
-- every 2 s while a rebuild runs; 1.8 ms with it.
CREATE INDEX repair_queue_order ON repair_queue (priority, demand DESC, enqueued_ns);
"""


def _add_schema_2(conn: sqlite3.Connection) -> None:
    """What schema 2 adds to schema 1: `SCHEMA_2_DDL` and the small-write
    log's table (`ecfs.storage.metadb.writelog` documents it)."""
    conn.executescript(SCHEMA_2_DDL)
    create_write_log_table(conn)


def inline_checksum(data: bytes) -> int:
    """The value of ``inodes.inline_checksum`` for inline data `data`."""
    value = checksum64(data)
    return value - (1 << 64) if value >= 1 << 63 else value


@functools.cache
def _expected_master(version: int) -> frozenset[tuple[str, str, str, str]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(SCHEMA)
        if version >= 2:
            _add_schema_2(conn)
        if version >= 3:
            conn.executescript(SCHEMA_3_DDL)
        if version >= 4:
            conn.executescript(SCHEMA_4_DDL)
        return frozenset(_master(conn))
    finally:
        conn.close()


def _master(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
    return [
        (str(t), str(n), str(tb), str(sql))
        for t, n, tb, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        )
    ]


def schema_version(conn: sqlite3.Connection) -> int | None:
    """Blocking. The schema version whose DDL the database of `conn` has
    exactly (tables, columns, indexes, nothing else: no view, no trigger),
    or None. Raises sqlite3.Error if the schema cannot be read."""
    found = frozenset(_master(conn))
    for version in KNOWN_VERSIONS:
        if found == _expected_master(version):
            return version
    return None


def schema_difference(conn: sqlite3.Connection) -> str:
    """Blocking. What in `conn`'s schema is not in the current one (for messages)."""
    found = frozenset(_master(conn))
    expected = _expected_master(SCHEMA_VERSION)
    extra = sorted(f"{t} {n}" for t, n, _, _ in found - expected)
    missing = sorted(f"{t} {n}" for t, n, _, _ in expected - found)
    parts = []
    if extra:
        parts.append("unknown or changed: " + ", ".join(extra))
    if missing:
        parts.append("missing or changed: " + ", ".join(missing))
    return "; ".join(parts) or "no difference"


def upgrade_database(path: Path) -> int:
    """Blocking. Upgrade the schema-1, -2 or -3 database at `path` (a
    working copy no one else has open) to the current schema: add the
    `SCHEMA_2_DDL` columns and checksum every inline data (from 1), add
    `SCHEMA_3_DDL` (from 1 or 2: every chunk keeps the volume's coding,
    k NULL) and `SCHEMA_4_DDL` (from 1, 2 or 3), record the schema
    version and the content digest in one more transaction. Returns the
    new generation.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        version = schema_version(conn)
        if version is None or version >= SCHEMA_VERSION:
            raise ValueError(f"{path}: cannot upgrade schema {version}")
        if version < 2:
            _add_schema_2(conn)
        if version < 3:
            conn.executescript(SCHEMA_3_DDL)
        conn.executescript(SCHEMA_4_DDL)
        conn.create_function("ecfs_inline_checksum", 1, inline_checksum, deterministic=True)
        conn.execute("BEGIN")
        if version < 2:
            conn.execute(
                "UPDATE inodes SET inline_checksum = ecfs_inline_checksum(inline_data)"
                " WHERE inline_data IS NOT NULL"
            )
        conn.execute("UPDATE volume SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        generation = _advance_with_digest(conn)
        conn.execute("COMMIT")
        return generation
    finally:
        conn.close()


def _advance_with_digest(conn: sqlite3.Connection) -> int:
    """In the caller's transaction: one generation more, with the content
    digest of the rows as they are now; returns the new generation."""
    conn.execute(
        "UPDATE replica_state SET generation = generation + 1, digest = ? WHERE id = 0",
        (content_digest(conn),),
    )
    (generation,) = conn.execute("SELECT generation FROM replica_state").fetchone()
    return int(generation)


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
        _add_schema_2(conn)
        conn.executescript(SCHEMA_3_DDL)
        conn.executescript(SCHEMA_4_DDL)
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
            [("inode", ROOT_INODE + 1), ("chunk", 1), ("log", 1)],
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
        conn.execute("UPDATE replica_state SET digest = ? WHERE id = 0", (content_digest(conn),))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    path.chmod(0o600)


def record_digest(path: Path) -> int:
    """Blocking. Record the content digest of the rows of the database at
    `path` (a working copy no one else has open, of the current schema) in
    one more transaction; returns the new generation. For a copy whose rows
    no longer give its recorded digest and that was chosen anyway (see
    `ecfs.storage.replicas.choose_copy`)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        generation = _advance_with_digest(conn)
        conn.execute("COMMIT")
        return generation
    finally:
        conn.close()
