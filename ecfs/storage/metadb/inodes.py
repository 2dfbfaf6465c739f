"""SQL for the POSIX namespace: inodes, directory entries, symlinks, xattrs.

Owns: every statement on the `inodes`, `dentries`, `symlinks` and `xattrs`
tables (see `schema` for what each column means). Must not: decide anything
about POSIX semantics (permissions, nlink rules, errno choice, timestamps) —
that is `ecfs.data.namespace`, the only intended caller — nor touch `chunks`.

Contracts:
* Reads may run anywhere; every write method must be called inside
  `db.transaction()` (`Database.write` raises otherwise).
* Every write is deterministic: all values, including dentry rowids, are
  passed as parameters, so replaying the recorded statements on a replica
  gives an identical database.
* Inode attributes travel as `InodeRow` tuples in `INODE_COLUMNS` order.
* Names, targets and xattr names/values are raw `bytes` (stored as BLOBs).
* Inline data is stored with its checksum (``inodes.inline_checksum``) and
  checked on every read: a mismatch raises `Unrecoverable` (EIO), never
  wrong bytes.
"""

from __future__ import annotations

import logging
import stat
from typing import Any, cast

from ...core.errors import Unrecoverable
from .database import Database
from .schema import inline_checksum

log = logging.getLogger(__name__)

#: Attribute columns of `inodes`, in `InodeRow` order (inline_data excluded).
INODE_COLUMNS = (
    "id",
    "mode",
    "uid",
    "gid",
    "nlink",
    "size",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "rdev",
)

#: (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev)
InodeRow = tuple[int, int, int, int, int, int, int, int, int, int]

#: (dentry rowid, name) followed by the InodeRow of the entry's inode.
EntryRow = tuple[int, bytes, int, int, int, int, int, int, int, int, int, int]

_COLS = ", ".join(INODE_COLUMNS)

#: File type bits of st_mode, for the consistency queries.
_S_IFMT = stat.S_IFMT(0o170000)
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
#: Deepest directory nesting `paths_of` follows (a guard against cycles).
_MAX_DEPTH = 4096
_ICOLS = ", ".join(f"i.{c}" for c in INODE_COLUMNS)


class InodeTable:
    """Typed access to the namespace tables of one `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._bad_inline: set[int] = set()  # logged once each

    # -- inodes ----------------------------------------------------------------

    def get(self, ino: int) -> InodeRow | None:
        """The attribute row of inode `ino`, or None if there is none."""
        row = self._db.query_one(f"SELECT {_COLS} FROM inodes WHERE id = ?", (ino,))
        return None if row is None else _inode_row(row)

    def insert(self, row: InodeRow) -> None:
        """Add a new inode (no inline data)."""
        self._db.write(
            f"INSERT INTO inodes ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", tuple(row)
        )

    def update(self, row: InodeRow) -> None:
        """Overwrite every attribute column of inode `row[0]`."""
        ino, *attrs = row
        self._db.write(
            "UPDATE inodes SET mode = ?, uid = ?, gid = ?, nlink = ?, size = ?,"
            " atime_ns = ?, mtime_ns = ?, ctime_ns = ?, rdev = ? WHERE id = ?",
            (*attrs, ino),
        )

    def delete(self, ino: int) -> None:
        """Remove inode `ino` with its xattrs and symlink target.

        Directory entries are not touched (the caller ensures none refer to
        it) and neither are chunks (file data is freed by its owner first).
        """
        self._db.write("DELETE FROM xattrs WHERE inode = ?", (ino,))
        self._db.write("DELETE FROM symlinks WHERE inode = ?", (ino,))
        self._db.write("DELETE FROM inodes WHERE id = ?", (ino,))

    def orphans(self) -> list[int]:
        """Ids of inodes with nlink == 0, ascending."""
        return [r[0] for r in self._db.query("SELECT id FROM inodes WHERE nlink = 0 ORDER BY id")]

    def count(self) -> int:
        """The number of inodes."""
        return int(self._db.query_value("SELECT count(*) FROM inodes", (), 0))

    def inline_bytes(self) -> int:
        """Total length of all inline data."""
        return int(
            self._db.query_value("SELECT coalesce(sum(length(inline_data)), 0) FROM inodes", (), 0)
        )

    def inline_data(self, ino: int) -> tuple[bool, bytes | None]:
        """(inode exists, its inline data or None). Unrecoverable (EIO) if
        the data does not match its checksum."""
        row = self._db.query_one(
            "SELECT inline_data, inline_checksum FROM inodes WHERE id = ?", (ino,)
        )
        if row is None:
            return False, None
        if row[0] is None:
            return True, None
        data = bytes(row[0])
        if row[1] != inline_checksum(data):
            if ino not in self._bad_inline:
                self._bad_inline.add(ino)
                log.error("inline data of inode %d does not match its checksum", ino)
            raise Unrecoverable(f"inline data of inode {ino} does not match its checksum")
        return True, data

    def set_inline_data(self, ino: int, data: bytes | None) -> None:
        """Set (or clear with None) the inline data of inode `ino`, with its checksum."""
        checksum = None if data is None else inline_checksum(data)
        self._db.write(
            "UPDATE inodes SET inline_data = ?, inline_checksum = ? WHERE id = ?",
            (data, checksum, ino),
        )

    # -- directory entries -------------------------------------------------------

    def find(self, parent: int, name: bytes) -> int | None:
        """The inode that `name` in directory `parent` refers to, or None."""
        value = self._db.query_value(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        )
        return None if value is None else int(value)

    def parent_of(self, directory: int) -> int | None:
        """The directory holding the (only) entry of directory `directory`.

        None for the root and for removed directories (they have no entry).
        """
        value = self._db.query_value(
            "SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (directory,)
        )
        return None if value is None else int(value)

    def is_empty(self, directory: int) -> bool:
        """True if no entry has `directory` as its parent."""
        return (
            self._db.query_one("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (directory,))
            is None
        )

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Insert entry `name` -> `ino` in `parent` with the next free rowid.

        The rowid is chosen here (max + 1) and passed explicitly, so a
        replica assigns the same one.
        """
        rowid = int(self._db.query_value("SELECT coalesce(max(rowid), 0) + 1 FROM dentries", (), 1))
        self._db.write(
            "INSERT INTO dentries (rowid, parent, name, inode) VALUES (?, ?, ?, ?)",
            (rowid, parent, name, ino),
        )

    def remove_entry(self, parent: int, name: bytes) -> None:
        """Delete entry `name` of `parent` (no-op if absent)."""
        self._db.write("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    def move_entry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        """Rename an entry in place (keeps its rowid). The new name must be free."""
        self._db.write(
            "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
            (new_parent, new_name, parent, name),
        )

    def repoint_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Make existing entry `name` of `parent` refer to inode `ino`."""
        self._db.write(
            "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    def entries(self, parent: int, after_rowid: int, limit: int | None) -> list[EntryRow]:
        """Entries of `parent` with rowid > `after_rowid`, in rowid order,
        each with its inode's attributes; at most `limit` (None: all)."""
        rows = self._db.query(
            f"SELECT d.rowid, d.name, {_ICOLS} FROM dentries AS d"
            " JOIN inodes AS i ON i.id = d.inode"
            " WHERE d.parent = ? AND d.rowid > ? ORDER BY d.rowid LIMIT ?",
            (parent, after_rowid, -1 if limit is None else limit),
        )
        return [cast(EntryRow, (r[0], bytes(r[1]), *r[2:])) for r in rows]

    # -- symlinks --------------------------------------------------------------

    def symlink_target(self, ino: int) -> bytes | None:
        """The target of symlink `ino`, or None if it has none."""
        value = self._db.query_value("SELECT target FROM symlinks WHERE inode = ?", (ino,))
        return None if value is None else bytes(value)

    def insert_symlink(self, ino: int, target: bytes) -> None:
        self._db.write("INSERT INTO symlinks (inode, target) VALUES (?, ?)", (ino, target))

    # -- xattrs ----------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        value = self._db.query_value(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        )
        return None if value is None else bytes(value)

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Create or overwrite one attribute."""
        self._db.write(
            "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
            (ino, name, value),
        )

    def xattr_values(self, name: bytes) -> list[bytes]:
        """The values of xattr `name` on every inode that has one."""
        return [bytes(v) for (v,) in self._db.query("SELECT value FROM xattrs WHERE name = ?", (name,))]

    def list_xattrs(self, ino: int) -> list[bytes]:
        """Attribute names of `ino`, in byte order."""
        rows = self._db.query("SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (ino,))
        return [bytes(r[0]) for r in rows]

    def xattr_bytes(self, ino: int) -> int:
        """Total length of the names and values of the xattrs of `ino`."""
        return int(
            self._db.query_value(
                "SELECT coalesce(sum(length(name) + length(value)), 0) FROM xattrs"
                " WHERE inode = ?",
                (ino,),
                0,
            )
        )

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        """Delete one attribute; False if it did not exist."""
        return self._db.write("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name)) > 0

    # -- consistency checks (fsck) -------------------------------------------------
    #
    # Read-only queries that find rows breaking the namespace's invariants,
    # and the few writes fsck needs to repair them. Nothing else calls these.

    def entries_to_missing_inodes(self) -> list[tuple[int, bytes, int]]:
        """(parent, name, inode) of entries whose inode does not exist."""
        rows = self._db.query(
            "SELECT d.parent, d.name, d.inode FROM dentries AS d"
            " WHERE NOT EXISTS (SELECT 1 FROM inodes AS i WHERE i.id = d.inode)"
            " ORDER BY d.parent, d.name"
        )
        return [(int(p), bytes(n), int(i)) for p, n, i in rows]

    def entries_in_non_directories(self) -> list[tuple[int, bytes, int]]:
        """(parent, name, inode) of entries whose parent is missing or is
        not a directory."""
        rows = self._db.query(
            "SELECT d.parent, d.name, d.inode FROM dentries AS d"
            " LEFT JOIN inodes AS p ON p.id = d.parent"
            f" WHERE p.id IS NULL OR (p.mode & {_S_IFMT}) != {_S_IFDIR}"
            " ORDER BY d.parent, d.name"
        )
        return [(int(p), bytes(n), int(i)) for p, n, i in rows]

    def link_census(self) -> list[tuple[int, int, int, int, int]]:
        """(id, mode, nlink, entries, subdirectories) of every inode:
        `entries` counts the directory entries naming it, `subdirectories`
        the entries inside it that name a directory."""
        rows = self._db.query(
            "SELECT i.id, i.mode, i.nlink,"
            " (SELECT count(*) FROM dentries AS d WHERE d.inode = i.id),"
            " (SELECT count(*) FROM dentries AS d JOIN inodes AS c ON c.id = d.inode"
            f"   WHERE d.parent = i.id AND (c.mode & {_S_IFMT}) = {_S_IFDIR})"
            " FROM inodes AS i ORDER BY i.id"
        )
        return [(int(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e in rows]

    def unreachable(self, root: int) -> list[int]:
        """Ids of inodes no chain of directory entries from `root` reaches
        (excluding `root` itself), ascending."""
        rows = self._db.query(
            "WITH RECURSIVE reach(id) AS (SELECT ?"
            " UNION SELECT d.inode FROM dentries AS d JOIN reach AS r ON d.parent = r.id)"
            " SELECT id FROM inodes WHERE id NOT IN (SELECT id FROM reach) ORDER BY id",
            (root,),
        )
        return [int(r[0]) for r in rows]

    def subtree(self, top: int) -> list[int]:
        """Ids of `top` and of every inode a chain of directory entries from
        `top` reaches, ascending (for `ecfs fsck --path`)."""
        rows = self._db.query(
            "WITH RECURSIVE reach(id) AS (SELECT ?"
            " UNION SELECT d.inode FROM dentries AS d JOIN reach AS r ON d.parent = r.id)"
            " SELECT id FROM reach ORDER BY id",
            (top,),
        )
        return [int(r[0]) for r in rows]

    def stray_symlinks(self) -> list[int]:
        """Inodes with a symlink row that are missing or not symlinks."""
        rows = self._db.query(
            "SELECT s.inode FROM symlinks AS s LEFT JOIN inodes AS i ON i.id = s.inode"
            f" WHERE i.id IS NULL OR (i.mode & {_S_IFMT}) != {_S_IFLNK} ORDER BY s.inode"
        )
        return [int(r[0]) for r in rows]

    def symlinks_without_target(self) -> list[int]:
        """Symlink inodes that have no symlink row."""
        rows = self._db.query(
            f"SELECT i.id FROM inodes AS i WHERE (i.mode & {_S_IFMT}) = {_S_IFLNK}"
            " AND NOT EXISTS (SELECT 1 FROM symlinks AS s WHERE s.inode = i.id) ORDER BY i.id"
        )
        return [int(r[0]) for r in rows]

    def stray_xattr_owners(self) -> list[int]:
        """Inode numbers that own xattrs but do not exist."""
        rows = self._db.query(
            "SELECT DISTINCT x.inode FROM xattrs AS x"
            " WHERE NOT EXISTS (SELECT 1 FROM inodes AS i WHERE i.id = x.inode) ORDER BY x.inode"
        )
        return [int(r[0]) for r in rows]

    def bad_inline_data(self) -> list[tuple[int, int, int, int]]:
        """(id, mode, size, inline length) of inodes whose inline data is on
        a file that is not regular, or is longer than the file."""
        rows = self._db.query(
            "SELECT id, mode, size, length(inline_data) FROM inodes"
            " WHERE inline_data IS NOT NULL"
            f" AND ((mode & {_S_IFMT}) != {_S_IFREG} OR length(inline_data) > size)"
            " ORDER BY id"
        )
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]

    def paths_of(self, ino: int, root: int, limit: int = 16) -> list[bytes]:
        """Up to `limit` absolute paths (b"/a/b") naming inode `ino`, found by
        walking directory entries up to `root`; empty if none reaches it.
        The root itself is b"/"."""
        if ino == root:
            return [b"/"]
        paths: list[bytes] = []
        for parent, name in self._db.query(
            "SELECT parent, name FROM dentries WHERE inode = ? ORDER BY parent, name LIMIT ?",
            (ino, limit),
        ):
            parts = [bytes(name)]
            seen = {ino}
            current = int(parent)
            while current != root:
                if current in seen or len(parts) > _MAX_DEPTH:
                    break
                seen.add(current)
                row = self._db.query_one(
                    "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (current,)
                )
                if row is None:
                    break
                parts.append(bytes(row[1]))
                current = int(row[0])
            if current == root:
                paths.append(b"/" + b"/".join(reversed(parts)))
        return paths

    def set_nlink(self, ino: int, nlink: int) -> None:
        """Overwrite the link count of inode `ino` (fsck)."""
        self._db.write("UPDATE inodes SET nlink = ? WHERE id = ?", (nlink, ino))

    def delete_symlink(self, ino: int) -> None:
        """Remove the symlink row of `ino`, if any (fsck)."""
        self._db.write("DELETE FROM symlinks WHERE inode = ?", (ino,))

    def delete_xattrs(self, ino: int) -> None:
        """Remove every xattr of `ino` (fsck: of an inode that is gone)."""
        self._db.write("DELETE FROM xattrs WHERE inode = ?", (ino,))


def _inode_row(row: tuple[Any, ...]) -> InodeRow:
    return cast(InodeRow, tuple(row))
