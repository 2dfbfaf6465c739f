"""SQL for the small-write log's former home (see `ecfs.data.smallwrites`).

The log's records now live in segment files on the stores
(`ecfs.data.logfiles`); this table stays in the schema (empty) so that a
volume last mounted by an ecfs that logged here keeps its records: the
mount reads them, writes them to the stores and deletes the rows
(`WriteLog.load`, `WriteLog.repair_copies`).

Owns: the `write_log` table: its DDL (documented column by column below),
and every statement on it. The table is part of schema 2: new volumes get it
at mkfs, schema-1 volumes when they are upgraded at mount
(`ecfs.storage.metadb.schema.upgrade_database`). Must not: decide when to log or fold, or verify
checksums (see `ecfs.data.smallwrites`).

All writes run inside the caller's `db.transaction()`. No other
table refers to it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from .database import Database

WRITE_LOG_SCHEMA = """
-- The small-write log: byte ranges written over a stored chunk version
-- that are durable here instead of in a re-encoded chunk (ecfs.data.smallwrites).
-- seq: the record's order (newer records win where they overlap); chosen by
--   ecfs (one more than the largest present), never by SQLite.
-- inode, idx: the chunk (chunk number idx of the inode) the record belongs to.
-- chunk_id: the chunk version (chunks.chunk_id) the record applies over;
--   the records of a chunk are deleted in the transaction that replaces or
--   removes that version, so it always names the current version.
-- offset: where data starts inside the chunk (bytes from the chunk's start).
-- checksum: xxh3_64 of (inode, idx, chunk_id, seq, offset, data) as a signed
--   64-bit integer (ecfs.data.smallwrites.record_checksum); a record whose
--   checksum does not match is never applied (the read fails with EIO).
-- data: the bytes written (never empty).
CREATE TABLE IF NOT EXISTS write_log (
    seq      INTEGER PRIMARY KEY,
    inode    INTEGER NOT NULL,
    idx      INTEGER NOT NULL,
    chunk_id INTEGER NOT NULL,
    offset   INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    data     BLOB NOT NULL
);
"""

#: Records per statement when many are read or deleted by seq (SQLite
#: limits the number of bound parameters).
_BATCH = 500

#: One row of `write_log` without its data: (seq, inode, idx, chunk_id,
#: offset, length, checksum).
RecordHead = tuple[int, int, int, int, int, int, int]


def create_write_log_table(conn: sqlite3.Connection) -> None:
    """For `ecfs.storage.metadb.schema` (schema 2)."""
    conn.executescript(WRITE_LOG_SCHEMA)


class WriteLogTable:
    """Statements on `write_log`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def heads(self) -> list[RecordHead]:
        """Every record without its data, in seq order (mount, fsck)."""
        return [
            (row[0], row[1], row[2], row[3], row[4], row[5], row[6])
            for row in self.db.query(
                "SELECT seq, inode, idx, chunk_id, offset, length(data), checksum"
                " FROM write_log ORDER BY seq"
            )
        ]

    def data(self, seqs: Sequence[int]) -> dict[int, tuple[int, bytes]]:
        """seq -> (checksum, data) of the given records (missing ones omitted)."""
        found: dict[int, tuple[int, bytes]] = {}
        for start in range(0, len(seqs), _BATCH):  # SQLite limits bound parameters
            part = tuple(seqs[start : start + _BATCH])
            marks = ",".join("?" * len(part))
            rows = self.db.query(
                f"SELECT seq, checksum, data FROM write_log WHERE seq IN ({marks})", part
            )
            found.update((seq, (checksum, data)) for seq, checksum, data in rows)
        return found

    def insert(
        self, seq: int, inode: int, idx: int, chunk_id: int, offset: int, checksum: int, data: bytes
    ) -> None:
        self.db.write(
            "INSERT INTO write_log (seq, inode, idx, chunk_id, offset, checksum, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, inode, idx, chunk_id, offset, checksum, data),
        )

    def delete(self, seqs: Iterable[int]) -> None:
        """Delete records by seq (by primary key: no scan on any replica)."""
        seqs = sorted(seqs)
        for start in range(0, len(seqs), _BATCH):
            part = seqs[start : start + _BATCH]
            marks = ",".join("?" * len(part))
            self.db.write(f"DELETE FROM write_log WHERE seq IN ({marks})", tuple(part))

    def largest_seq(self) -> int:
        return int(self.db.query_value("SELECT max(seq) FROM write_log", default=None) or 0)
