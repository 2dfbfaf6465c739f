"""The POSIX namespace: inodes, directories, links, symlinks, xattrs.

Owns: the POSIX rules of the namespace (which errno, nlink accounting,
timestamps, setgid inheritance, suid clearing on chown, rename semantics) and
the in-memory attribute cache. Must not: contain SQL text (that is
`ecfs.storage.metadb.inodes`), know about pyfuse3, touch stores or file data, or check
permission bits (the kernel does, the mount uses default_permissions).

Contracts:
* Synchronous: the working database is local, so the FUSE layer calls these
  methods directly on the event loop. Each mutating method is one
  `db.transaction()` (joining the caller's transaction if there is one), so it
  is atomic and shipped to the replicas as one unit.
* Validation happens before any write: an `FsError` leaves the database and
  the cache unchanged. Changed attributes are staged on copies, written, and
  copied into the cached objects only once the transaction block has exited
  (an exception inside it rolls back and leaves the cache untouched).
* Cache: `get`/`lookup` answer from a dict of `Inode` by id, bounded to
  `cache_size` entries. Eviction drops clean entries in insertion order; an
  evicted object that someone still references is found again through a
  weak map, so there is never more than one live `Inode` object per inode
  and a held reference always shows current values. Dirty entries (size/mtime
  from the data path, attributes of a deferred `setattr`, not yet written)
  are never evicted.
* Deferred attributes: `setattr(..., defer=True)` changes only the cache; the
  row is written by the next transaction that stages the inode, by `persist`
  or by `persist_dirty`, which the data layer calls for idle inodes a
  fraction of a second later. A tarball extract sends ~4 setattr requests
  per file (chown, chmod, utimens, the kernel's mtime at close): deferred,
  they cost one row write per file instead of four transactions.
* The `Inode` objects returned are the live cached objects: read them, never
  assign to them; change attributes only through this class.
* Inode ids are taken with `db.next_id` before the transaction starts (see
  `_add`), never inside one.
* Values are validated when they are set, never when they are written: a
  time outside the storable range (`TIME_NS_MIN`..`TIME_NS_MAX`, signed
  64-bit ns) is clamped to it, a size past `FILE_SIZE_MAX` is EFBIG, so a
  deferred row cannot fail to be written later. Change times come from
  `now_ns` (the kernel's clock, never backwards: see `coarse_realtime_ns`).
* `system.*` xattrs are refused and the xattrs of one inode are bounded
  (see `SYSTEM_XATTR_PREFIX`, `XATTR_TOTAL_MAX`).
"""

from __future__ import annotations

import errno
import logging
import stat
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from ..core.errors import EcfsError, FsError
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeRow, InodeTable
from ..storage.metadb.schema import ROOT_INODE
from .policy import EFFECTIVE_XATTR, POLICY_XATTR, Policies

log = logging.getLogger(__name__)

#: Longest file name, in bytes.
NAME_MAX = 255
#: Longest symlink target, in bytes (PATH_MAX without the NUL).
SYMLINK_MAX = 4095
#: Longest xattr name and value, in bytes.
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

#: Timestamps are kept in ns since the epoch in signed 64-bit columns:
#: 1677-09-21 to 2262-04-11. A time set outside that range (touch -d 2514,
#: utimensat with any seconds the kernel accepts) is clamped to it when it
#: is set, as ext4 clamps to its own range, so a deferred write can never
#: fail later (see `clamp_time_ns`).
TIME_NS_MIN = -(1 << 63)
TIME_NS_MAX = (1 << 63) - 1
#: Linux's clock id (Python's time module names it only from 3.13 on).
CLOCK_REALTIME_COARSE: int = getattr(time, "CLOCK_REALTIME_COARSE", 5)
#: A clock reading this much behind the last stamp is a stepped clock (NTP,
#: date -s), not the sub-tick lag between the clocks (see `Namespace.now_ns`).
CLOCK_STEP_NS = 1_000_000_000
#: Largest file size (off_t; the kernel's MAX_LFS_FILESIZE for FUSE).
FILE_SIZE_MAX = (1 << 63) - 1

#: rename flags (as in renameat2).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: setxattr flags.
XATTR_CREATE = 1
XATTR_REPLACE = 2
#: Total bytes (names + values) of the xattrs of one inode: room for one
#: value of the largest size and a few small ones. ext4 gives one block
#: (4 KiB) without ea_inode; either way a user cannot grow the metadata
#: database without bound through one file. Past it: ENOSPC, as ext4.
XATTR_TOTAL_MAX = 128 * 1024
#: The `system.` namespace is for attributes a filesystem implements itself
#: (POSIX ACLs, on other filesystems also richacl, nfs4_acl...); the kernel
#: leaves their permission checks to the filesystem and FUSE passes them
#: through. ecfs implements none of them: the mount uses default_permissions
#: and nothing enforces ACLs, so storing system.posix_acl_* would let libacl
#: (`cp -a`, `setfacl`) believe it set permissions that do not apply, and
#: storing any system.* name would let every user attach them to any file,
#: root's included. Set and remove are refused with EOPNOTSUPP (as ext4
#: mounted without ACL support, and for names it does not know); get says
#: ENODATA and list leaves them out (also ones an older version stored).
SYSTEM_XATTR_PREFIX = b"system."

#: Default bound of the attribute cache (entries).
CACHE_SIZE = 200_000
#: Bound of the absent-xattr cache (entries) before it starts over.
ABSENT_XATTRS_MAX = 100_000

#: File types `create` accepts (everything but directories and symlinks).
_CREATE_TYPES = frozenset({stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})
#: Deeper than this while walking up ".." means the tree has a cycle (a bug).
_MAX_DEPTH = 1 << 16


@dataclass(slots=True, weakref_slot=True)
class Inode:
    """The attributes of one inode (st_* values; times in ns since the epoch)."""

    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def row(self) -> InodeRow:
        """The attributes in `metadb.inodes.INODE_COLUMNS` order."""
        return (
            self.id,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.rdev,
        )

    def copy(self) -> Inode:
        return replace(self)

    def assign(self, other: Inode) -> None:
        """Take every attribute of `other` (same inode id)."""
        (
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.rdev,
        ) = other.row()[1:]


#: Inode copies being changed by one operation, by id (see `Namespace._stage`).
_Staged = dict[int, Inode]


def clamp_time_ns(value: int) -> int:
    """`value` (ns since the epoch) clamped to the storable range."""
    return min(max(int(value), TIME_NS_MIN), TIME_NS_MAX)


def coarse_realtime_ns() -> int:
    """The clock the kernel stamps its own inode times with
    (`current_time()` reads CLOCK_REALTIME_COARSE). With the writeback
    cache the kernel stamps a regular file's mtime and ctime itself (write,
    truncate, chmod, link...), so stamping ours from the finer
    CLOCK_REALTIME could put them up to one tick ahead of a later
    kernel-stamped time: a socket made before `ln` showed a later ctime than
    the linked file (fstests generic/423). One clock for both keeps time
    from going backwards as the kernel sees it."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


class Namespace:
    """POSIX operations on the namespace of one volume's working database."""

    def __init__(
        self,
        db: Database,
        clock_ns: Callable[[], int] = coarse_realtime_ns,
        *,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._db = db
        self._table = InodeTable(db)
        self._clock = clock_ns
        self._last_now = TIME_NS_MIN
        self._cache_size = max(1, cache_size)
        self._cache: dict[int, Inode] = {}
        self._evicted: weakref.WeakValueDictionary[int, Inode] = weakref.WeakValueDictionary()
        self._dirty: set[int] = set()
        self._counts: list[int] | None = None  # [inodes, inline bytes], once loaded
        #: (inode, xattr name) pairs known to be absent. The kernel asks for
        #: security.capability before every write() to a file (to clear it),
        #: and almost no file has one: answering from memory saves a SQL
        #: query per write request. Only setxattr adds xattrs (it discards the
        #: pair); inode ids are never reused, so no other change can make a
        #: remembered pair wrong.
        self._absent_xattrs: set[tuple[int, bytes]] = set()
        #: Redundancy policies (`ecfs.data.policy`), set by the volume: the
        #: policy xattr is checked when set, EFFECTIVE_XATTR is served, and
        #: resolved policies are forgotten on a change or a rename.
        self.policies: Policies | None = None

    # -- attributes and lookup ---------------------------------------------------

    def now_ns(self) -> int:
        """The time to stamp a change with: the clock (`coarse_realtime_ns`
        by default), clamped to the storable range and never earlier than a
        time this method returned or the kernel stamped before
        (`kernel_time_seen`) — unless the clock was stepped back by more
        than CLOCK_STEP_NS: then it is followed, as the kernel follows it,
        instead of stamping every change with one frozen time."""
        now = self._clock()
        if not TIME_NS_MIN <= now <= TIME_NS_MAX:  # (on the write path: no call when in range)
            now = clamp_time_ns(now)
        if self._last_now - CLOCK_STEP_NS <= now < self._last_now:
            return self._last_now
        self._last_now = now
        return now

    def kernel_time_seen(self, time_ns: int) -> None:
        """Note a time the kernel stamped (the ctime it sends with a setattr
        of a regular file under the writeback cache). The kernel's clock is
        the coarse one raised to the multigrain floor (the latest fine time
        another filesystem handed out), so it can run up to a tick ahead of
        CLOCK_REALTIME_COARSE as a process reads it: later stamps of ours
        must not come out earlier. A time in the future of the fine clock is
        not the kernel's current time and is ignored."""
        if self._last_now < time_ns <= time.time_ns():
            self._last_now = time_ns

    def get(self, ino: int) -> Inode:
        """The attributes of inode `ino`. ENOENT if there is no such inode."""
        node = self._cache.get(ino)
        if node is not None:
            return node
        node = self._live(ino)
        if node is not None:
            return node
        row = self._table.get(ino)
        if row is None:
            raise FsError(f"no inode {ino}", errno=errno.ENOENT)
        return self._remember(Inode(*row))

    def lookup(self, parent: int, name: bytes) -> Inode:
        """The inode `name` refers to in directory `parent` ("." and ".." too).

        ENOENT (no parent or no entry), ENOTDIR (parent is not a directory),
        ENAMETOOLONG (name > 255 bytes), EINVAL (empty, "/" or NUL in name).
        """
        _check_name(name)
        directory = self._dir(parent)
        if name == b".":
            return directory
        if name == b"..":
            return self.get(self._parent_of(parent))
        ino = self._table.find(parent, name)
        if ino is None:
            raise FsError(f"{name!r} not found in {parent}", errno=errno.ENOENT)
        return self.get(ino)

    # -- creating entries -------------------------------------------------------

    def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        """Make a new non-directory, non-symlink inode at `name` in `parent`.

        The type comes from `mode` (none means S_IFREG); S_IFDIR/S_IFLNK or an
        unknown type give EINVAL. `rdev` is kept for device nodes only.
        EEXIST if the name is taken; ENOENT if `parent` is gone or was removed.
        In a setgid directory the new inode takes the directory's group.
        Updates the parent's mtime and ctime.
        """
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in _CREATE_TYPES:
            raise FsError(f"create cannot make file type {kind:o}", errno=errno.EINVAL)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        return self._add(parent, name, kind | stat.S_IMODE(mode), uid, gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Make a directory (nlink 2; the parent's nlink grows by one).

        In a setgid directory the new directory takes its group and S_ISGID.
        Errors as `create`.
        """
        return self._add(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        """Make a symlink (mode S_IFLNK|0777, size = len(target)).

        ENOENT for an empty target, ENAMETOOLONG above 4095 bytes, EINVAL for
        a NUL in it; otherwise errors as `create`.
        """
        if not target:
            raise FsError("empty symlink target", errno=errno.ENOENT)
        if len(target) > SYMLINK_MAX:
            raise FsError("symlink target too long", errno=errno.ENAMETOOLONG)
        if b"\0" in target:
            raise FsError("NUL in symlink target", errno=errno.EINVAL)
        return self._add(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        """The target of symlink `ino`. EINVAL if it is not a symlink."""
        node = self.get(ino)
        if not node.is_symlink:
            raise FsError(f"inode {ino} is not a symlink", errno=errno.EINVAL)
        target = self._table.symlink_target(ino)
        if target is None:
            raise FsError(f"symlink {ino} has no target", errno=errno.EIO)
        return target

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        """Add a hard link to `ino` (nlink += 1, ctime). EPERM for a directory;
        ENOENT if `ino` has no links left (an open, unlinked file);
        otherwise errors as `create`."""
        self._check_new_entry(new_parent, new_name)
        node = self.get(ino)
        if node.is_dir:
            raise FsError("cannot hard-link a directory", errno=errno.EPERM)
        if node.nlink == 0:
            raise FsError(f"inode {ino} has been removed", errno=errno.ENOENT)
        now = self.now_ns()
        staged: _Staged = {}
        target = self._stage(staged, ino)
        target.nlink += 1
        target.ctime_ns = now
        self._touch_dir(staged, new_parent, now)
        with self._db.transaction():
            self._table.add_entry(new_parent, new_name, ino)
            self._write(staged)
        self._install(staged.values())
        return self.get(ino)

    # -- removing entries -------------------------------------------------------

    def unlink(self, parent: int, name: bytes) -> Inode:
        """Remove a non-directory entry; returns its inode with the new nlink.

        EISDIR for a directory (and for "." / ".."), ENOENT, ENOTDIR. The
        inode row stays: the caller frees it (`delete_inode`) once nlink is 0
        and no handle is open. Sets the inode's ctime and the parent's
        mtime/ctime.
        """
        _check_name(name)
        self._dir(parent)
        if name in (b".", b".."):
            raise FsError(f"cannot unlink {name!r}", errno=errno.EISDIR)
        node = self._entry(parent, name)
        if node.is_dir:
            raise FsError(f"{name!r} is a directory", errno=errno.EISDIR)
        now = self.now_ns()
        staged: _Staged = {}
        victim = self._stage(staged, node.id)
        victim.nlink -= 1
        victim.ctime_ns = now
        self._touch_dir(staged, parent, now)
        with self._db.transaction():
            self._table.remove_entry(parent, name)
            self._write(staged)
        self._install(staged.values())
        return node

    def rmdir(self, parent: int, name: bytes) -> Inode:
        """Remove an empty directory; returns it (nlink 0).

        ENOTDIR if it is not a directory, ENOTEMPTY if it has entries (and
        for ".."), EINVAL for ".". The parent's nlink drops by one. The inode
        row stays until the caller frees it with `delete_inode`.
        """
        _check_name(name)
        self._dir(parent)
        if name == b".":
            raise FsError("cannot rmdir '.'", errno=errno.EINVAL)
        if name == b"..":
            raise FsError("cannot rmdir '..'", errno=errno.ENOTEMPTY)
        node = self._entry(parent, name)
        if not node.is_dir:
            raise FsError(f"{name!r} is not a directory", errno=errno.ENOTDIR)
        if not self._table.is_empty(node.id):
            raise FsError(f"{name!r} is not empty", errno=errno.ENOTEMPTY)
        now = self.now_ns()
        staged: _Staged = {}
        gone = self._stage(staged, node.id)
        gone.nlink = 0
        gone.ctime_ns = now
        self._touch_dir(staged, parent, now).nlink -= 1
        with self._db.transaction():
            self._table.remove_entry(parent, name)
            self._write(staged)
        self._install(staged.values())
        return node

    # -- rename -------------------------------------------------------------------

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> Inode | None:
        """Move entry `old_name` of `old_parent` to `new_name` of `new_parent`.

        One transaction. flags: 0, RENAME_NOREPLACE (EEXIST if the target
        exists) or RENAME_EXCHANGE (swap the two entries; ENOENT if the
        target is missing); anything else EINVAL. Errors: ENOENT, ENOTDIR
        (a parent is not a directory, or a directory over a non-directory),
        EISDIR (a non-directory over a directory), ENOTEMPTY (over a
        non-empty directory), EINVAL (a directory into its own subtree, or
        "." / ".." as a name). Both names referring to the same inode: no-op.

        Sets ctime of the moved (and exchanged/replaced) inodes and
        mtime/ctime of both parents; moves a directory's ".." link between
        the parents' nlink. Returns the replaced inode (nlink decremented; 0
        for a directory) if one was overwritten, else None: the caller frees
        it when its nlink is 0 and it is not open.
        """
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise FsError(f"unsupported rename flags {flags:#x}", errno=errno.EINVAL)
        for name in (old_name, new_name):
            _check_name(name)
            if name in (b".", b".."):
                raise FsError(f"cannot rename {name!r}", errno=errno.EINVAL)
        self._dir(old_parent)
        if self._dir(new_parent).nlink == 0:
            raise FsError(f"directory {new_parent} was removed", errno=errno.ENOENT)
        source = self._entry(old_parent, old_name)
        target_ino = self._table.find(new_parent, new_name)
        if flags == RENAME_EXCHANGE and target_ino is None:
            raise FsError(f"{new_name!r} not found for exchange", errno=errno.ENOENT)
        if flags == RENAME_NOREPLACE and target_ino is not None:
            raise FsError(f"{new_name!r} exists", errno=errno.EEXIST)
        if target_ino == source.id:
            return None
        target = None if target_ino is None else self.get(target_ino)
        if self.policies is not None:  # a moved inode may fall under another policy
            self.policies.moved(source.id, source.is_dir)
            if target is not None:
                self.policies.moved(target.id, target.is_dir)
        if source.is_dir:
            self._check_not_within(new_parent, source.id)
        if flags == RENAME_EXCHANGE:
            assert target is not None
            if target.is_dir:
                self._check_not_within(old_parent, target.id)
            self._exchange(old_parent, old_name, source, new_parent, new_name, target)
            return None
        if target is not None:
            _check_replaceable(source, target, self._table.is_empty(target.id))
        return self._move(old_parent, old_name, source, new_parent, new_name, target)

    def _move(
        self,
        old_parent: int,
        old_name: bytes,
        source: Inode,
        new_parent: int,
        new_name: bytes,
        target: Inode | None,
    ) -> Inode | None:
        """Rename after validation, replacing `target` if given."""
        now = self.now_ns()
        staged: _Staged = {}
        self._stage(staged, source.id).ctime_ns = now
        old_dir = self._touch_dir(staged, old_parent, now)
        new_dir = self._touch_dir(staged, new_parent, now)
        if target is not None:
            replaced = self._stage(staged, target.id)
            replaced.ctime_ns = now
            if replaced.is_dir:
                replaced.nlink = 0
                new_dir.nlink -= 1
            else:
                replaced.nlink -= 1
        if source.is_dir and old_parent != new_parent:
            old_dir.nlink -= 1
            new_dir.nlink += 1
        with self._db.transaction():
            if target is not None:
                self._table.remove_entry(new_parent, new_name)
            self._table.move_entry(old_parent, old_name, new_parent, new_name)
            self._write(staged)
        self._install(staged.values())
        return target

    def _exchange(
        self,
        old_parent: int,
        old_name: bytes,
        source: Inode,
        new_parent: int,
        new_name: bytes,
        target: Inode,
    ) -> None:
        """RENAME_EXCHANGE after validation: swap what the two entries name."""
        now = self.now_ns()
        staged: _Staged = {}
        self._stage(staged, source.id).ctime_ns = now
        self._stage(staged, target.id).ctime_ns = now
        old_dir = self._touch_dir(staged, old_parent, now)
        new_dir = self._touch_dir(staged, new_parent, now)
        if old_parent != new_parent:
            moved = int(source.is_dir) - int(target.is_dir)
            old_dir.nlink -= moved
            new_dir.nlink += moved
        with self._db.transaction():
            self._table.repoint_entry(old_parent, old_name, target.id)
            self._table.repoint_entry(new_parent, new_name, source.id)
            self._write(staged)
        self._install(staged.values())

    # -- readdir ----------------------------------------------------------------

    def readdir(
        self, ino: int, offset: int, limit: int | None = None
    ) -> list[tuple[bytes, Inode, int]]:
        """Entries of directory `ino` after resume cookie `offset` (0 = start).

        Each item is (name, inode, next_offset): pass next_offset back to
        continue after that entry. "." (next 1) and ".." (next 2) come first,
        then real entries in rowid order with next_offset = rowid + 2.
        Cookies stay valid when entries are added or removed between calls
        (removed ones are simply not returned). At most `limit` items (None:
        all). ENOTDIR; a removed directory lists nothing.
        """
        directory = self._dir(ino)
        if directory.nlink == 0 or (limit is not None and limit <= 0):
            return []
        items: list[tuple[bytes, Inode, int]] = []
        if offset < 1:
            items.append((b".", directory, 1))
        if offset < 2:
            items.append((b"..", self.get(self._parent_of(ino)), 2))
        if limit is not None:
            items = items[:limit]
            limit -= len(items)
            if limit == 0:
                return items
        for rowid, name, *row in self._table.entries(ino, max(offset - 2, 0), limit):
            node = self._live(row[0]) or self._remember(Inode(*row))
            items.append((name, node, rowid + 2))
        return items

    # -- attributes ---------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        defer: bool = False,
    ) -> Inode:
        """Change attributes and persist them now (or, with `defer`, only
        in the cache, marking the inode dirty: see `persist_dirty`); ctime = now.

        mode changes only the permission bits (the file type is kept). A
        chown (uid or gid given) of a non-directory clears S_ISUID, and
        S_ISGID when S_IXGRP is set, unless `mode` is given in the same call
        (an explicit mode wins). `size` only records the new size (the caller
        handles file data); if it changes the size and no mtime is given,
        mtime = now (truncate). size: EISDIR for a directory, EINVAL for other
        non-regular files or a negative size, EFBIG above `FILE_SIZE_MAX`.
        `defer` with `size` is a ValueError (a truncate changes data, which is
        persisted with it). Times outside the storable range are clamped to
        it (`clamp_time_ns`), here, so that a deferred write cannot fail.
        """
        if defer and size is not None:
            raise ValueError("a size change cannot be deferred")
        node = self.get(ino)
        now = self.now_ns()
        staged: _Staged = {}
        new = self._stage(staged, ino)
        if uid is not None or gid is not None:
            new.uid = new.uid if uid is None else uid
            new.gid = new.gid if gid is None else gid
            if not new.is_dir and mode is None:
                new.mode = _clear_suid(new.mode)
        if mode is not None:
            new.mode = stat.S_IFMT(new.mode) | stat.S_IMODE(mode)
        if size is not None:
            _check_truncatable(node, size)
            if size != new.size and mtime_ns is None:
                new.mtime_ns = now
            new.size = size
        if atime_ns is not None:
            new.atime_ns = clamp_time_ns(atime_ns)
        if mtime_ns is not None:
            new.mtime_ns = clamp_time_ns(mtime_ns)
        new.ctime_ns = now
        if defer:
            node.assign(new)
            self._dirty.add(ino)
            return node
        with self._db.transaction():
            self._write(staged)
        self._install(staged.values())
        return node

    def set_size(self, ino: int, size: int, *, mtime_ns: int | None = None, persist: bool) -> Inode:
        """Data-path update of size (and mtime; then ctime = mtime too).

        persist=False changes only the cache and marks the inode dirty (cheap
        enough for every write); persist=True also writes it now (inside the
        caller's transaction if there is one).
        """
        node = self.get(ino)
        node.size = size
        if mtime_ns is not None:
            node.mtime_ns = node.ctime_ns = mtime_ns
        self._dirty.add(ino)
        if persist:
            self.persist(ino)
        return node

    def persist(self, ino: int) -> None:
        """Write a dirty inode's attributes; no-op if it is clean.

        Joins the caller's transaction if there is one. If that transaction
        later rolls back, the caller must mark the inode dirty again
        (`set_size(..., persist=False)`): the cache cannot see the rollback.
        """
        if ino not in self._dirty:
            return
        node = self.get(ino)
        with self._db.transaction():
            self._table.update(node.row())
        self._dirty.discard(ino)

    def persist_dirty(self, inodes: Iterable[int]) -> None:
        """Write the attributes of those of `inodes` that are dirty, in one
        transaction of its own (RuntimeError inside another: a rollback of
        that one could not mark them dirty again).

        If that transaction fails, each inode is written in a transaction of
        its own, so that one row that cannot be written (a bug: values are
        validated when set) never holds back the others; the ones that fail
        stay dirty, are logged, and an EcfsError (EIO) naming them is raised
        once the rest are written."""
        if self._db.in_transaction:
            raise RuntimeError("persist_dirty inside a transaction")
        dirty = [ino for ino in inodes if ino in self._dirty]
        if not dirty:
            return
        try:
            with self._db.transaction():
                for ino in dirty:
                    self._table.update(self.get(ino).row())
        except Exception:
            self._persist_one_by_one(dirty)
            return
        self._dirty.difference_update(dirty)

    def _persist_one_by_one(self, inodes: list[int]) -> None:
        failed: list[str] = []
        for ino in inodes:
            try:
                with self._db.transaction():
                    self._table.update(self.get(ino).row())
            except Exception as exc:
                log.error("cannot write the attributes of inode %d: %r", ino, exc)
                failed.append(f"inode {ino}: {exc!r}")
                continue
            self._dirty.discard(ino)
        if failed:
            error = EcfsError("cannot write attributes: " + "; ".join(failed))
            error.already_logged = True
            raise error

    def dirty_inodes(self) -> list[int]:
        """Inodes whose cached attributes are newer than the database."""
        return sorted(self._dirty)

    def is_dirty(self, ino: int) -> bool:
        """True if `ino` has cached attributes not yet written (O(1))."""
        return ino in self._dirty

    def delete_inode(self, ino: int) -> None:
        """Remove inode `ino` with its xattrs and symlink target.

        Only for an inode with nlink == 0 (EBUSY otherwise, and for the root);
        the caller frees its file data first. ENOENT if it does not exist.
        """
        node = self.get(ino)
        if node.nlink != 0 or ino == ROOT_INODE:
            raise FsError(f"inode {ino} still has links", errno=errno.EBUSY)
        inline_len = len(self.inline_data(ino) or b"")
        with self._db.transaction():
            self._table.delete(ino)
        self._forget(ino)
        if self._counts is not None:
            self._counts[0] -= 1
            self._counts[1] -= inline_len

    def orphans(self) -> list[int]:
        """Inodes with nlink == 0 (left by a crash while they were open)."""
        return self._table.orphans()

    # -- xattrs -------------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of xattr `name`. ENODATA if absent (always for
        `system.*`), ENOENT, ERANGE (name)."""
        self.get(ino)
        _check_xattr_name(name)
        if name == EFFECTIVE_XATTR and self.policies is not None:
            return self.policies.describe(ino)
        key = (ino, name)
        if name.startswith(SYSTEM_XATTR_PREFIX):
            value = None
        else:
            value = None if key in self._absent_xattrs else self._table.get_xattr(ino, name)
        if value is None:
            if len(self._absent_xattrs) >= ABSENT_XATTRS_MAX:
                self._absent_xattrs.clear()
            self._absent_xattrs.add(key)
            raise FsError(f"no xattr {name!r}", errno=errno.ENODATA)
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set xattr `name`; ctime = now.

        flags: XATTR_CREATE (EEXIST if present) and/or XATTR_REPLACE (ENODATA
        if absent; both flags: both checks, as ext4 and tmpfs); others:
        EINVAL. ERANGE for an empty name or a name over 255 bytes, E2BIG for
        a value over 64 KiB (as Linux), ENOSPC past `XATTR_TOTAL_MAX` bytes
        for the inode. EOPNOTSUPP for `system.*` names (see
        `SYSTEM_XATTR_PREFIX`).
        """
        inode = self.get(ino)
        _check_xattr_name(name)
        _check_not_system(name)
        if name == EFFECTIVE_XATTR:
            raise FsError(f"{name!r} is read-only", errno=errno.EPERM)
        if name == POLICY_XATTR and self.policies is not None:
            value = self.policies.checked_value(inode.is_dir, bytes(value))
        if len(value) > XATTR_SIZE_MAX:
            raise FsError("xattr value too long", errno=errno.E2BIG)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise FsError(f"bad setxattr flags {flags:#x}", errno=errno.EINVAL)
        old = self._table.get_xattr(ino, name)
        exists = old is not None
        if flags & XATTR_CREATE and exists:
            raise FsError(f"xattr {name!r} exists", errno=errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            raise FsError(f"no xattr {name!r}", errno=errno.ENODATA)
        total = self._table.xattr_bytes(ino) + len(name) + len(value)
        if old is not None:
            total -= len(name) + len(old)
        if total > XATTR_TOTAL_MAX:
            raise FsError(
                f"xattrs of inode {ino} would take {total} bytes (at most {XATTR_TOTAL_MAX})",
                errno=errno.ENOSPC,
            )
        staged: _Staged = {}
        self._stage(staged, ino).ctime_ns = self.now_ns()
        self._absent_xattrs.discard((ino, name))
        with self._db.transaction():
            self._table.set_xattr(ino, name, bytes(value))
            self._write(staged)
        self._install(staged.values())
        if name == POLICY_XATTR and self.policies is not None:
            self.policies.changed()

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of the xattrs of `ino`, in byte order (no `system.*`). ENOENT."""
        self.get(ino)
        return [n for n in self._table.list_xattrs(ino) if not n.startswith(SYSTEM_XATTR_PREFIX)]

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove xattr `name`; ctime = now. ENODATA if absent, EOPNOTSUPP
        for `system.*`."""
        self.get(ino)
        _check_xattr_name(name)
        _check_not_system(name)
        self.getxattr(ino, name)
        staged: _Staged = {}
        self._stage(staged, ino).ctime_ns = self.now_ns()
        with self._db.transaction():
            self._table.remove_xattr(ino, name)
            self._write(staged)
        self._install(staged.values())
        if name == POLICY_XATTR and self.policies is not None:
            self.policies.changed()

    # -- statfs and inline data ---------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(number of inodes, total bytes of inline data), for statfs.

        Counted once, then kept up to date by this class's own changes.
        """
        if self._counts is None:
            self._counts = [self._table.count(), self._table.inline_bytes()]
        return self._counts[0], self._counts[1]

    def inline_data(self, ino: int) -> bytes | None:
        """The inline (small-file) content of `ino`, or None. ENOENT."""
        exists, data = self._table.inline_data(ino)
        if not exists:
            raise FsError(f"no inode {ino}", errno=errno.ENOENT)
        return data

    def set_inline_data(self, ino: int, data: bytes | None) -> None:
        """Store (or clear with None) the inline content of `ino`. ENOENT.

        Joins the caller's transaction if there is one. Does not change the
        size or times: use `set_size` for those.
        """
        old_len = len(self.inline_data(ino) or b"")
        with self._db.transaction():
            self._table.set_inline_data(ino, None if data is None else bytes(data))
        if self._counts is not None:
            self._counts[1] += len(data or b"") - old_len

    # -- internals ----------------------------------------------------------------

    def _add(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        """Create a new inode of type `mode` named `name` in `parent`."""
        self._check_new_entry(parent, name)
        is_dir = stat.S_ISDIR(mode)
        parent_node = self.get(parent)
        if parent_node.mode & stat.S_ISGID:
            gid = parent_node.gid
            if is_dir:
                mode |= stat.S_ISGID
        ino = self._db.next_id("inode")  # before the transaction: see module doc
        now = self.now_ns()
        node = Inode(
            id=ino,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=2 if is_dir else 1,
            size=0 if target is None else len(target),
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            rdev=rdev,
        )
        staged: _Staged = {}
        directory = self._touch_dir(staged, parent, now)
        if is_dir:
            directory.nlink += 1
        with self._db.transaction():
            self._table.insert(node.row())
            if target is not None:
                self._table.insert_symlink(ino, target)
            self._table.add_entry(parent, name, ino)
            self._write(staged)
        self._install([node, *staged.values()])
        if self._counts is not None:
            self._counts[0] += 1
        return self.get(ino)

    def _check_new_entry(self, parent: int, name: bytes) -> None:
        """Validate that `name` can be created in `parent`.

        EINVAL/ENAMETOOLONG (name), ENOENT/ENOTDIR (parent), ENOENT (parent
        removed), EEXIST ("." / ".." or an existing entry).
        """
        _check_name(name)
        directory = self._dir(parent)
        if directory.nlink == 0:
            raise FsError(f"directory {parent} was removed", errno=errno.ENOENT)
        if name in (b".", b"..") or self._table.find(parent, name) is not None:
            raise FsError(f"{name!r} exists", errno=errno.EEXIST)

    def _dir(self, ino: int) -> Inode:
        """Inode `ino`, which must be a directory (ENOENT, ENOTDIR)."""
        node = self.get(ino)
        if not node.is_dir:
            raise FsError(f"inode {ino} is not a directory", errno=errno.ENOTDIR)
        return node

    def _entry(self, parent: int, name: bytes) -> Inode:
        """The inode of an existing entry (ENOENT)."""
        ino = self._table.find(parent, name)
        if ino is None:
            raise FsError(f"{name!r} not found in {parent}", errno=errno.ENOENT)
        return self.get(ino)

    def _parent_of(self, directory: int) -> int:
        """The ".." of a directory (the root, and removed directories: itself)."""
        if directory == ROOT_INODE:
            return ROOT_INODE
        parent = self._table.parent_of(directory)
        return directory if parent is None else parent

    def _check_not_within(self, directory: int, ancestor: int) -> None:
        """EINVAL if `directory` is `ancestor` or inside its subtree."""
        current = directory
        for _ in range(_MAX_DEPTH):
            if current == ancestor:
                raise FsError("cannot move a directory into itself", errno=errno.EINVAL)
            parent = self._parent_of(current)
            if parent == current:
                return
            current = parent
        raise FsError(f"directory cycle above {directory}", errno=errno.EIO)

    def _stage(self, staged: _Staged, ino: int) -> Inode:
        """A private copy of inode `ino` to change (one per id per operation)."""
        node = staged.get(ino)
        if node is None:
            node = staged[ino] = self.get(ino).copy()
        return node

    def _touch_dir(self, staged: _Staged, ino: int, now: int) -> Inode:
        """Stage directory `ino` with mtime = ctime = now (its content changed)."""
        directory = self._stage(staged, ino)
        directory.mtime_ns = directory.ctime_ns = now
        return directory

    def _write(self, staged: _Staged) -> None:
        """Write every staged inode's full row (inside the open transaction)."""
        for node in staged.values():
            self._table.update(node.row())

    def _install(self, nodes: Iterable[Inode]) -> None:
        """After a commit: make the cache show `nodes`; they are now clean."""
        for node in nodes:
            live = self._live(node.id)
            if live is None:
                self._remember(node)
            elif live is not node:
                live.assign(node)
            self._dirty.discard(node.id)

    def _live(self, ino: int) -> Inode | None:
        """The live object of `ino` if there is one (cached or still referenced)."""
        node = self._cache.get(ino)
        if node is None:
            node = self._evicted.get(ino)
            if node is not None:
                self._remember(node)
        return node

    def _remember(self, node: Inode) -> Inode:
        """Put `node` in the cache (first evicting clean entries if it is full;
        never `node` itself, so the caller may mark it dirty at once)."""
        if node.id not in self._cache and len(self._cache) >= self._cache_size:
            self._evict(len(self._cache) + 1 - self._cache_size * 9 // 10)
        self._cache[node.id] = node
        return node

    def _evict(self, count: int) -> None:
        """Drop up to `count` clean entries, oldest first."""
        victims: list[int] = []
        for ino in self._cache:
            if len(victims) >= count:
                break
            if ino not in self._dirty:
                victims.append(ino)
        for ino in victims:
            self._evicted[ino] = self._cache.pop(ino)

    def _forget(self, ino: int) -> None:
        self._cache.pop(ino, None)
        self._evicted.pop(ino, None)
        self._dirty.discard(ino)


def _check_name(name: bytes) -> None:
    """EINVAL for an empty name or one with "/" or NUL; ENAMETOOLONG > 255."""
    if not isinstance(name, bytes) or not name:
        raise FsError("empty or non-bytes name", errno=errno.EINVAL)
    if len(name) > NAME_MAX:
        raise FsError("name too long", errno=errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise FsError(f"invalid name {name!r}", errno=errno.EINVAL)


def _check_xattr_name(name: bytes) -> None:
    """ERANGE for an empty xattr name or one over 255 bytes (as Linux)."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError("bad xattr name length", errno=errno.ERANGE)


def _check_not_system(name: bytes) -> None:
    """EOPNOTSUPP for a `system.*` xattr name (see SYSTEM_XATTR_PREFIX)."""
    if name.startswith(SYSTEM_XATTR_PREFIX):
        raise FsError(f"{name!r}: system.* attributes are not supported", errno=errno.EOPNOTSUPP)


def _check_replaceable(source: Inode, target: Inode, target_empty: bool) -> None:
    """POSIX rules for renaming `source` over an existing, different `target`."""
    if source.is_dir and not target.is_dir:
        raise FsError("cannot rename a directory over a non-directory", errno=errno.ENOTDIR)
    if not source.is_dir and target.is_dir:
        raise FsError("cannot rename a non-directory over a directory", errno=errno.EISDIR)
    if target.is_dir and not target_empty:
        raise FsError("target directory is not empty", errno=errno.ENOTEMPTY)


def _check_truncatable(node: Inode, size: int) -> None:
    if node.is_dir:
        raise FsError("cannot truncate a directory", errno=errno.EISDIR)
    if not node.is_reg or size < 0:
        raise FsError("can only truncate a regular file to size >= 0", errno=errno.EINVAL)
    check_file_size(size)


def check_file_size(size: int) -> None:
    """EFBIG for a file size above `FILE_SIZE_MAX` (as the kernel for
    a size past s_maxbytes), EINVAL for a negative one."""
    if size < 0:
        raise FsError("negative file size", errno=errno.EINVAL)
    if size > FILE_SIZE_MAX:
        raise FsError(f"file size {size} is too large", errno=errno.EFBIG)


def _clear_suid(mode: int) -> int:
    """Mode after a chown of a non-directory: no S_ISUID; no S_ISGID if group-executable."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
