"""Content digests of metadata databases: what makes a copy verifiable.

Owns: the row digest, the content digest of a database, the
`DigestTracker` that keeps a working copy's digest current as it changes,
and `digest_tables` (per-table digests, for comparing copies). Must not:
write to a database it did not get a connection to, or decide which copy
is right (`ecfs.storage.replicas` and fsck do).

The content digest of a database is the sum, modulo 2**128, of one
xxh3_128 per row of every table except `EXCLUDED_TABLES`, seeded with the
crc32 of the table's name and taken over ``repr`` of the row (rowid first
where the table has one: dentry rowids matter). A sum of row digests does
not depend on the order of the rows or the page layout, and it can be
kept current row by row: an inserted row adds its digest, a deleted row
subtracts it, an updated row does both. The working copy does exactly
that (`DigestTracker`, with TEMP triggers that exist only on its
connection, never in the file) and every transaction records the result
in ``replica_state.digest`` beside the generation; replicas receive that
statement like any other. So every copy claims the digest of its own
rows, and anything that changes rows without going through ecfs (a bit
flip, an edit with the sqlite3 shell, a stray trigger) makes the claim
false, which `content_digest` finds by reading the copy once.

``repr`` of SQLite's value types (int, str, bytes, None, float) is stable
across Python versions (floats use the shortest round-trip form; the
schema has none).
"""

from __future__ import annotations

import hashlib
import sqlite3
import zlib
from collections.abc import Iterable, Sequence

from ...core.fragment import checksum128

#: Pseudo table name under which `tables_of` gives the schema's digest.
SCHEMA_KEY = "(schema)"

#: Tables left out of content digests: replica_state holds the generation
#: and the digest itself.
EXCLUDED_TABLES = frozenset({"replica_state"})

#: Content digests are sums modulo 2**128.
_MASK = (1 << 128) - 1

#: The digest of a database without rows (as text: see `format_digest`).
EMPTY_DIGEST = "0" * 32


def format_digest(value: int) -> str:
    """A content digest as stored in ``replica_state.digest``: 32 hex digits."""
    return f"{value & _MASK:032x}"


def parse_digest(text: object) -> int | None:
    """The value of a stored digest, or None if it is not one."""
    if not isinstance(text, str) or len(text) != 32:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _seed(table: str) -> int:
    return zlib.crc32(table.encode("utf-8"))


def _row_digest(seed: int, row: tuple[object, ...]) -> int:
    # repr escapes every character that is not printable (lone surrogates
    # included), so its text always encodes.
    return checksum128(repr(row).encode(), seed)


def _user_tables(conn: sqlite3.Connection, schema: str = "main") -> list[tuple[str, bool]]:
    """(name, has rowid) of the tables whose rows are digested."""
    rows = conn.execute(
        f"SELECT name, sql FROM {schema}.sqlite_master WHERE type = 'table'"
        " AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    return [
        (name, "WITHOUT ROWID" not in str(sql).upper())
        for name, sql in rows
        if name not in EXCLUDED_TABLES
    ]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_sums(conn: sqlite3.Connection) -> dict[str, int]:
    """Blocking. Table name -> sum of its row digests, for every digested
    table of `conn`'s main database (read in whatever transaction the
    caller holds)."""
    sums: dict[str, int] = {}
    for table, has_rowid in _user_tables(conn):
        seed = _seed(table)
        columns = "rowid, *" if has_rowid else "*"
        total = 0
        for row in conn.execute(f"SELECT {columns} FROM main.{_quote(table)}"):
            total += _row_digest(seed, tuple(row))
        sums[table] = total & _MASK
    return sums


def content_digest(conn: sqlite3.Connection) -> str:
    """Blocking. The content digest of `conn`'s main database (a full read)."""
    return format_digest(sum(table_sums(conn).values()))


def tables_of(conn: sqlite3.Connection) -> dict[str, str]:
    """Blocking. Table name -> digest of its rows (hex), for every digested
    table of `conn`'s main database, plus `SCHEMA_KEY` -> a digest of the
    schema's SQL text. Two databases holding the same rows give the same
    digests whatever their page layout."""
    schema = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master"
        " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    ).fetchall()
    digests = {SCHEMA_KEY: _digest_schema(schema)}
    for table, value in table_sums(conn).items():
        digests[table] = format_digest(value)
    return digests


def _digest_schema(rows: Iterable[Sequence[object]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(tuple(row)).encode("utf-8", "backslashreplace"))
    return digest.hexdigest()


class DigestTracker:
    """Keeps the content digest of a connection's main database current.

    Installs TEMP triggers (on this connection only: the file is not
    changed) on every digested table that call back into `value` for each
    row inserted, deleted or updated, and turns on ``recursive_triggers``
    so that the rows ``INSERT OR REPLACE`` deletes are counted too. The
    caller saves `value` before a transaction and restores it after a
    ROLLBACK. Costs about 1-2 us per changed row (a ~20 us transaction of
    a small-file create gains ~3 us).
    """

    def __init__(self, conn: sqlite3.Connection, initial: int) -> None:
        self.value = initial
        conn.create_function("ecfs_row_added", -1, self._added)
        conn.create_function("ecfs_row_removed", -1, self._removed)
        conn.execute("PRAGMA recursive_triggers = ON")
        for table, has_rowid in _user_tables(conn):
            columns = [row[1] for row in conn.execute(f"PRAGMA main.table_info({_quote(table)})")]
            if has_rowid:
                columns.insert(0, "rowid")
            new = ", ".join(f"NEW.{_quote(c)}" for c in columns)
            old = ", ".join(f"OLD.{_quote(c)}" for c in columns)
            seed = _seed(table)
            for event, body in (
                ("INSERT", f"SELECT ecfs_row_added({seed}, {new});"),
                ("DELETE", f"SELECT ecfs_row_removed({seed}, {old});"),
                (
                    "UPDATE",
                    f"SELECT ecfs_row_removed({seed}, {old}); SELECT ecfs_row_added({seed}, {new});",
                ),
            ):
                name = _quote(f"ecfs_digest_{table}_{event.lower()}")
                conn.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS {name} AFTER {event}"
                    f" ON main.{_quote(table)} BEGIN {body} END"
                )

    # The hot path (every changed row of every transaction): no masking
    # here, `format_digest` reduces the sum.

    def _added(self, seed: int, *row: object) -> None:
        self.value += checksum128(repr(row).encode(), seed)

    def _removed(self, seed: int, *row: object) -> None:
        self.value -= checksum128(repr(row).encode(), seed)
