"""The mount's working copy of the metadata database, and its write log.

Owns: the sqlite3 connection of the working copy, transactions, and the
recording of every write statement into a `Transaction` that the replicator
ships to the replica databases. Must not: know about FUSE, stores, or what
the tables mean (see `inodes` and `chunks`).

Concurrency contract: the working copy is a local file (not on a store), so
its queries are fast and run directly on the trio event loop. A transaction
is a plain `with` block that must contain no `await`: trio only switches
tasks at awaits, so a transaction is atomic with respect to every other
request handler. Nested `transaction()` blocks join the outermost one.

Content digest: a `DigestTracker` keeps the digest of the working copy's
rows current (TEMP triggers on this connection), and every transaction
ends with ``UPDATE replica_state SET generation = ?, digest = ?``, so the
working copy and every replica always claim the digest of their own rows
(see `ecfs.storage.metadb.digest`). The working copy must have the current schema
(`ecfs.storage.metadb.schema.upgrade_database` upgrades an older one first).

Crash contract: the working copy is not durable (synchronous=OFF) and is
discarded at the next mount, which starts from the freshest replica.

Locking: the connection holds the file locked (``locking_mode=EXCLUSIVE``)
for as long as it is open. Nothing else opens the working copy (copies of
it are made with `snapshot`, through this connection), and the lock saves
every transaction its file-lock calls and its check that another process
changed the file: a one-row transaction went from ~19 us to ~7 us, which
is most of the metadata cost of a small-file workload (a 10,000-file
tarball extract makes ~150,000 transactions).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...core.model import Statement, Transaction
from .digest import DigestTracker, content_digest, format_digest, parse_digest

#: How many ids `next_id` reserves per database round trip.
ID_BLOCK = 1024


class Database:
    """The working copy. Reads with `query*`; writes with `write` inside
    `transaction()`; every committed transaction is passed to `on_commit`."""

    def __init__(self, path: Path, *, exclusive: bool = True) -> None:
        """Open the working copy at `path`; `exclusive=False` (tests that
        read the file from a second connection) leaves it unlocked between
        transactions."""
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=MEMORY")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute("PRAGMA temp_store=MEMORY")
        self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB
        if exclusive:
            self._conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # see the module docstring
        row = self._conn.execute(
            "SELECT generation, digest FROM replica_state WHERE id = 0"
        ).fetchone()
        self.generation: int = int(row[0])
        initial = parse_digest(row[1])
        if initial is None:  # never trust a claim that is not one: compute it
            initial = parse_digest(content_digest(self._conn))
        assert initial is not None
        self._digest = DigestTracker(self._conn, initial)
        self.on_commit: Callable[[Transaction], None] | None = None
        #: Called after a ROLLBACK: caches of table contents (see
        #: chunks.ChunkTable) must forget what the rolled-back writes put there.
        self.on_rollback: list[Callable[[], None]] = []
        self._statements: list[Statement] | None = None
        self._reserved: dict[str, list[int]] = {}
        self._reserved_at: dict[str, int] = {}

    def close(self) -> None:
        self._conn.close()

    # -- reads ---------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, params).fetchone()
        return row

    def query_value(self, sql: str, params: tuple[Any, ...] = (), default: Any = None) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return default if row is None else row[0]

    def snapshot(self, path: Path) -> None:
        """Write a consistent copy of the database (at the current
        generation) to `path` with SQLite's backup API. Must not be called
        inside a transaction."""
        if self._statements is not None:
            raise RuntimeError("snapshot inside a transaction")
        target = sqlite3.connect(path)
        try:
            self._conn.backup(target)
        finally:
            target.close()

    def install_temp(self, statements: Sequence[str]) -> None:
        """Run `statements` that create TEMP objects of this connection
        only (a table and the triggers that keep it: never in the file,
        never replicated, not digested), in order, outside a transaction
        (RuntimeError inside one). The caller keeps no await between them."""
        if self._statements is not None:
            raise RuntimeError("install_temp inside a transaction")
        for sql in statements:
            self._conn.execute(sql)

    # -- writes --------------------------------------------------------------

    @property
    def digest(self) -> str:
        """The content digest of the working copy (as in replica_state)."""
        return format_digest(self._digest.value)

    @property
    def in_transaction(self) -> bool:
        return self._statements is not None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block as one atomic, replicated transaction.

        On normal exit: COMMIT, generation += 1, and `on_commit` receives the
        statements (plus the generation bump). On an exception: ROLLBACK and
        nothing is shipped. Must not contain an `await`.
        """
        if self._statements is not None:
            yield
            return
        self._conn.execute("BEGIN")
        self._statements = []
        digest_before = self._digest.value
        try:
            yield
            generation = self.generation + 1
            self.write(
                "UPDATE replica_state SET generation = ?, digest = ? WHERE id = 0",
                (generation, format_digest(self._digest.value)),
            )
            statements = tuple(self._statements)
            self._conn.execute("COMMIT")
        except BaseException:
            self._statements = None
            self._digest.value = digest_before
            self._reserved.clear()  # the rolled-back counter rows are free again
            self._conn.execute("ROLLBACK")
            for forget in self.on_rollback:
                forget()
            raise
        self._statements = None
        self.generation = generation
        if self.on_commit is not None:
            self.on_commit(Transaction(generation, statements))

    def write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Execute one deterministic write statement; returns its rowcount."""
        if self._statements is None:
            raise RuntimeError("Database.write outside a transaction")
        cursor = self._conn.execute(sql, params)
        self._statements.append((sql, params))
        return cursor.rowcount

    def next_id_reserved(self, counter: str) -> tuple[int, int]:
        """Like next_id, also returning the generation of the transaction
        that reserved the id's block: an id must not be used where it
        outlives a crash (a fragment file name) before that generation is
        durable, or the next mount would hand it out again."""
        value = self.next_id(counter)
        return value, self._reserved_at[counter]

    def ensure_counter(self, counter: str, at_least: int) -> None:
        """Create id counter `counter`, or raise it, so that its next value
        is at least `at_least` (a counter added after mkfs: 'log')."""
        value = self.query_value("SELECT value FROM counters WHERE name = ?", (counter,))
        if value is not None and int(value) >= at_least:
            return
        with self.transaction():
            if value is None:
                self.write("INSERT INTO counters (name, value) VALUES (?, ?)", (counter, at_least))
            else:
                self.write("UPDATE counters SET value = ? WHERE name = ?", (at_least, counter))

    def next_id(self, counter: str) -> int:
        """Take a fresh value of an id counter ('inode' or 'chunk').

        Ids are reserved from the database in blocks of ID_BLOCK (one small
        replicated transaction per block); a crash only skips unused ids,
        which is harmless because ids need only be unique.
        """
        reserved = self._reserved.get(counter)
        if reserved is None or reserved[0] >= reserved[1]:
            with self.transaction():
                start = int(self.query_value("SELECT value FROM counters WHERE name = ?", (counter,)))
                self.write(
                    "UPDATE counters SET value = ? WHERE name = ?", (start + ID_BLOCK, counter)
                )
            reserved = [start, start + ID_BLOCK]
            self._reserved[counter] = reserved
            self._reserved_at[counter] = self.generation
        value = reserved[0]
        reserved[0] += 1
        return value
