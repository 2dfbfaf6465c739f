"""SQL for restripe work: the `restripe` table and the files below a root.

Owns: the rows of `restripe` (see `schema`, SCHEMA_3_DDL), the query for
the regular files below a directory in inode order, and the `volume`
table row INTENT_KEY: the chunk ids restripe may be writing fragments
under that no chunk refers to yet (decimal, space separated; see
`ecfs.data.restripe`, "Crash contract"). Must not: read or
write chunks' fragments, or decide what a file's coding should be
(`ecfs.data.restripe` and `ecfs.data.policy` do).

All writes must run inside the caller's `db.transaction()`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from .database import Database
from .stores import StoreTable

#: The `volume` row of the chunk ids restripe writes under (see the module docstring).
INTENT_KEY = "restripe_writing"

_TREE = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT d.inode FROM dentries AS d"
    " JOIN tree AS t ON d.parent = t.id)"
)
_IS_FILE = f"(i.mode & {stat.S_IFMT(0o177777)}) = {stat.S_IFREG}"


@dataclass(frozen=True, slots=True)
class RestripeRow:
    """One row of `restripe` (see the schema)."""

    root: int
    cursor: int
    files_done: int
    files_total: int
    chunks_total: int
    bytes_total: int
    chunks_done: int
    bytes_done: int
    started_ns: int


class RestripeTable:
    """Restripe work of a volume (see `ecfs.data.restripe`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def rows(self) -> list[RestripeRow]:
        """Every pending restripe, oldest first."""
        return [
            RestripeRow(*(int(v) for v in row))
            for row in self.db.query(
                "SELECT root, cursor, files_done, files_total, chunks_total, bytes_total, chunks_done,"
                " bytes_done, started_ns FROM restripe ORDER BY started_ns, root"
            )
        ]

    def start(self, root: int, now_ns: int) -> RestripeRow:
        """Record a restripe of the files below `root` (from the start; a
        restripe of `root` already pending starts over) with its totals."""
        files, chunks, size = self.totals(root)
        self.db.write("DELETE FROM restripe WHERE root = ?", (root,))
        self.db.write(
            "INSERT INTO restripe (root, cursor, files_total, chunks_total, bytes_total,"
            " chunks_done, bytes_done, started_ns) VALUES (?, 0, ?, ?, ?, 0, 0, ?)",
            (root, files, chunks, size, now_ns),
        )
        return RestripeRow(root, 0, 0, files, chunks, size, 0, 0, now_ns)

    def totals(self, root: int) -> tuple[int, int, int]:
        """(regular files, chunks, chunk bytes) below `root` (itself included)."""
        row = self.db.query_one(
            f"{_TREE} SELECT COUNT(DISTINCT i.id), COUNT(c.chunk_id), COALESCE(SUM(c.length), 0)"
            f" FROM (SELECT DISTINCT id FROM tree) AS t JOIN inodes AS i ON i.id = t.id"
            f" LEFT JOIN chunks AS c ON c.inode = i.id WHERE {_IS_FILE}",
            (root,),
        )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def files_below(self, root: int, after: int, limit: int) -> list[int]:
        """Inode numbers > `after` of the regular files below `root`, in order."""
        return [
            int(r[0])
            for r in self.db.query(
                f"{_TREE} SELECT DISTINCT i.id FROM tree AS t JOIN inodes AS i ON i.id = t.id"
                f" WHERE {_IS_FILE} AND i.id > ? ORDER BY i.id LIMIT ?",
                (root, after, limit),
            )
        ]

    def advance(self, root: int, cursor: int | None, chunks: int, nbytes: int) -> None:
        """Count `chunks` more chunks (`nbytes` bytes) done; with a
        `cursor`, one more file is done, and every file up to it."""
        if cursor is None:
            self.db.write(
                "UPDATE restripe SET chunks_done = chunks_done + ?, bytes_done = bytes_done + ?"
                " WHERE root = ?",
                (chunks, nbytes, root),
            )
        else:
            self.db.write(
                "UPDATE restripe SET cursor = ?, files_done = files_done + 1,"
                " chunks_done = chunks_done + ?,"
                " bytes_done = bytes_done + ? WHERE root = ?",
                (cursor, chunks, nbytes, root),
            )

    def finish(self, root: int) -> None:
        self.db.write("DELETE FROM restripe WHERE root = ?", (root,))

    def intent(self) -> list[int]:
        """The chunk ids of the INTENT_KEY row ([] if none)."""
        value = self.db.query_value("SELECT value FROM volume WHERE key = ?", (INTENT_KEY,))
        return [int(v) for v in str(value or "").split()]

    def set_intent(self, chunk_ids: list[int]) -> None:
        """Record `chunk_ids` as the ids restripe writes under ([]: none)."""
        if chunk_ids:
            StoreTable(self.db).set_param(INTENT_KEY, " ".join(map(str, chunk_ids)))
        else:
            StoreTable(self.db).delete_param(INTENT_KEY)
