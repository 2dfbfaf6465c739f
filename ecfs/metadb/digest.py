"""Content digests of a metadata database, for comparing replicas offline.

Owns: the read-only queries that fingerprint every table of a database
file. Must not: write to the file, or decide which replica is right (fsck
does that).

`digest_tables` is meant for replicas no process has open (fsck holds the
volume lock): it opens the file read-only, so it never changes it, except
that SQLite may create the (empty) ``-wal`` and ``-shm`` side files it
needs to read a database in WAL mode.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import StoreError

#: Pseudo table name under which the digest of the schema itself is given.
SCHEMA_KEY = "(schema)"

#: Tables left out: their difference is reported on its own (the generation).
EXCLUDED_TABLES = frozenset({"replica_state"})

_INT = struct.Struct("<q")
_FLOAT = struct.Struct("<d")


def digest_tables(path: Path) -> dict[str, str]:
    """Blocking. Table name -> hex sha256 of its rows, for every table of the
    database at `path` except `EXCLUDED_TABLES`, plus `SCHEMA_KEY` -> digest
    of the schema's SQL text.

    Rows are hashed in the order of all their columns (rowid first, where
    the table has one: dentry rowids matter), so two databases holding the
    same rows give the same digests whatever their page layout. Raises
    StoreError if the file cannot be read as a database.
    """
    try:
        conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open metadata replica {path}: {exc}") from None
    try:
        schema = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        ).fetchall()
        digests = {SCHEMA_KEY: _digest_rows(schema)}
        for _type, name, _tbl, _sql in schema:
            if _type == "table" and name not in EXCLUDED_TABLES:
                digests[name] = _digest_table(conn, name)
        return digests
    except (sqlite3.Error, ValueError) as exc:  # ValueError: text that is not UTF-8
        raise StoreError(f"cannot read metadata replica {path}: {exc}") from None
    finally:
        conn.close()


def _digest_table(conn: sqlite3.Connection, table: str) -> str:
    quoted = '"' + table.replace('"', '""') + '"'
    n_columns = len(conn.execute(f"SELECT * FROM {quoted} LIMIT 0").description)
    try:
        conn.execute(f"SELECT rowid FROM {quoted} LIMIT 0")
        columns, n_columns = "rowid, *", n_columns + 1
    except sqlite3.OperationalError:  # a WITHOUT ROWID table
        columns = "*"
    order = ", ".join(str(i) for i in range(1, n_columns + 1))
    return _digest_rows(conn.execute(f"SELECT {columns} FROM {quoted} ORDER BY {order}"))


def _digest_rows(rows: Iterable[Sequence[object]]) -> str:
    """sha256 over an unambiguous encoding (type tag, length, bytes) of the rows."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(b"R")
        for value in row:
            digest.update(_encode(value))
    return digest.hexdigest()


def _encode(value: object) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, int):
        return b"I" + _INT.pack(value)
    if isinstance(value, float):
        return b"F" + _FLOAT.pack(value)
    if isinstance(value, str):
        data, tag = value.encode("utf-8", "surrogatepass"), b"T"
    elif isinstance(value, bytes | bytearray | memoryview):
        data, tag = bytes(value), b"B"
    else:
        raise TypeError(f"unexpected SQLite value {type(value).__name__}")
    return tag + _INT.pack(len(data)) + data
