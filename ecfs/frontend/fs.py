"""The pyfuse3 Operations: a thin adapter, and the single errno boundary.

Owns: translating FUSE requests into namespace / filedata calls, kernel
lookup counts (an inode's data is freed only when it has no links, is not
open and the kernel has forgotten it), and the virtual control attributes
on the root directory. Must not: contain filesystem logic or SQL.

Page cache and direct I/O: opens keep the kernel's page cache of a file
(keep_cache), except after a direct write. An asynchronous O_DIRECT write
(io_submit) is not followed by an invalidation of the pages a concurrent
buffered reader cached while it was in flight (the kernel's FUSE module
does that only for synchronous ones; a plain pyfuse3 passthrough with the
same options returns the same stale bytes, fstests generic/451). So an
inode that a handle opened for writing with O_DIRECT may have changed is
marked, and every open of a marked inode drops its cached pages
(keep_cache off); the mark is cleared by such an open once no handle is
open. A buffered reader that keeps its file open across an asynchronous
direct write can still read pages cached during that write: that is the
kernel's behaviour, not ours to fix without an invalidation per write.

Errors: domain exceptions carry an errno and become FUSEError here; any
other exception is logged as a bug and becomes EIO, so that no request can
end the main loop (which would kill the mount).

File handles: the kernel's FUSE export support (requested by pyfuse3)
finds an inode it no longer caches by looking up "." in it; `lookup`
answers that for every file type, so open_by_handle_at and NFS export work.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3

from ..core.errors import EcfsError, FsError
from ..data.namespace import Inode
from ..data.policy import POLICY_XATTR, RESTRIPE_XATTR
from ..volume import control, status
from ..volume.assembly import Volume

log = logging.getLogger(__name__)

#: Seconds the kernel may cache entries and attributes. Every change goes
#: through this mount, so the cache can only go stale for unlinked names.
ATTR_TIMEOUT = 60.0
ENTRY_TIMEOUT = 60.0

#: Directory entries fetched from the database per step of a readdir (the
#: kernel takes ~25 per request; fetching all remaining entries for each
#: request would make listing a large directory quadratic).
READDIR_BATCH = 64

#: Virtual attributes of the root directory, used by the CLI (not listed).
CONTROL_PID = b"user.ecfs.pid"
CONTROL_STATUS = b"user.ecfs.status"
#: The cheap counters-only snapshot (`Volume.iostat`), for `ecfs iostat`.
CONTROL_IOSTAT = b"user.ecfs.iostat"
CONTROL_COMMAND = b"user.ecfs.control"
#: The daemon's working directory (see volume.SHUTDOWN_REPORT), for umount.
CONTROL_WORKDIR = b"user.ecfs.workdir"

CONTROL_READS = (CONTROL_PID, CONTROL_STATUS, CONTROL_IOSTAT, CONTROL_WORKDIR)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_boundary(fn: F) -> F:
    """Turn domain errors into FUSEError and bugs into EIO (logged)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except EcfsError as exc:
            if exc.errno == errno.EIO and not exc.already_logged:
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("bug in %s%r", fn.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class EcfsOperations(pyfuse3.Operations):
    """FUSE requests of one mounted volume."""

    enable_writeback_cache = True

    def __init__(self, volume: Volume, *, mount_uid: int) -> None:
        super().__init__()
        self.volume = volume
        self.ns = volume.namespace
        self.data = volume.filedata
        self.mount_uid = mount_uid
        self._lookups: Counter[int] = Counter()
        #: Inodes a direct write may have changed (see the module docstring).
        self._direct_written: set[int] = set()

    # -- attributes ------------------------------------------------------------

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.id
        entry.generation = 0
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = node.mode
        entry.st_nlink = node.nlink
        entry.st_uid = node.uid
        entry.st_gid = node.gid
        entry.st_rdev = node.rdev
        entry.st_size = node.size
        entry.st_blksize = self.volume.layout.fragment_size  # the preferred I/O size
        # Regular files: stored bytes, holes left out (see FileData.allocated_blocks).
        entry.st_blocks = self.data.allocated_blocks(node) if node.is_reg else -(-node.size // 512)
        entry.st_atime_ns = node.atime_ns
        entry.st_mtime_ns = node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns
        return entry

    def _looked_up(self, node: Inode) -> pyfuse3.EntryAttributes:
        self._lookups[node.id] += 1
        return self._entry(node)

    @errno_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if name == b".":
            # File handles (open_by_handle_at, NFS export): pyfuse3 asks for
            # FUSE_EXPORT_SUPPORT (supports_dot_lookup), and the kernel finds
            # an inode it no longer caches with a lookup of "." in it, for
            # any file type ("..": the parent of a directory, as usual).
            # ENOENT for an inode that is gone becomes ESTALE. Inode numbers
            # are never reused, so the handles' generation is always 0.
            node = self.ns.get(parent_inode)
            if node.nlink == 0:  # removed: its handles are stale (as on ext4)
                raise FsError(f"inode {parent_inode} was removed", errno=errno.ENOENT)
            return self._looked_up(node)
        return self._looked_up(self.ns.lookup(parent_inode, name))

    @errno_boundary
    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            self._lookups[ino] -= count
            if self._lookups[ino] <= 0:
                del self._lookups[ino]
                self._direct_written.discard(ino)  # the kernel dropped its pages too
                await self._free_if_unused(ino)

    async def _free_if_unused(self, ino: int) -> None:
        """Free an inode's data once nothing refers to it any more."""
        if ino in self._lookups or self.data.is_open(ino):
            return
        try:
            node = self.ns.get(ino)
        except FsError:
            return
        if node.nlink == 0:
            await self.data.free(ino)

    @errno_boundary
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(self.ns.get(inode))

    @errno_boundary
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            node = self.ns.get(inode)
            if node.is_dir:
                raise FsError("is a directory", errno=errno.EISDIR)
            if not node.is_reg:
                raise FsError("not a regular file", errno=errno.EINVAL)
            await self.data.truncate(inode, attr.st_size)
        if fields.update_ctime:
            self.ns.kernel_time_seen(attr.st_ctime_ns)  # see Namespace.now_ns
        # Attribute-only changes are deferred (written within a fraction of a
        # second, at close or at fsync: see Namespace.setattr); a truncate is
        # written with its data.
        node = self.ns.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            defer=not fields.update_size,
        )
        return self._entry(node)

    # -- namespace ---------------------------------------------------------------

    @errno_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.ns.readlink(inode)

    @errno_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(self.ns.create(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.ns.mkdir(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx.uid, ctx.gid)
        return self._looked_up(node)

    @errno_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(self.ns.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @errno_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(self.ns.link(inode, new_parent_inode, new_name))

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        node = self.ns.unlink(parent_inode, name)
        if node.nlink == 0:
            await self._free_if_unused(node.id)

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        node = self.ns.rmdir(parent_inode, name)
        if node is not None:
            await self._free_if_unused(node.id)

    @errno_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        replaced = self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        if replaced is not None and replaced.nlink == 0:
            await self._free_if_unused(replaced.id)

    # -- directories ---------------------------------------------------------------

    @errno_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self.ns.get(inode).is_dir:
            raise FsError("not a directory", errno=errno.ENOTDIR)
        return inode

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        offset = start_id
        while True:
            entries = self.ns.readdir(fh, offset, READDIR_BATCH)
            if not entries:
                return
            for name, node, next_offset in entries:
                if not pyfuse3.readdir_reply(token, name, self._entry(node), next_offset):
                    return
                if name not in (b".", b".."):
                    self._lookups[node.id] += 1
                offset = next_offset

    @errno_boundary
    async def releasedir(self, fh: int) -> None:
        return None

    @errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.ns.persist_dirty([fh])  # its own deferred attributes (fh is the inode)
        await self.volume._wait_durable(self.volume.db.generation)

    # -- files -----------------------------------------------------------------------

    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.ns.get(inode)
        if node.is_dir:
            raise FsError("is a directory", errno=errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse negotiates atomic O_TRUNC: the kernel sends no setattr
            # for open(O_TRUNC), the truncation is ours (and it updates mtime
            # and ctime even when the file is already empty, as POSIX says).
            await self.data.truncate(inode, 0)
            if ctx.uid != 0 and node.mode & (stat.S_ISUID | stat.S_ISGID):
                # The kernel's own kill-suid on truncate is skipped with
                # atomic O_TRUNC: clear the bits as a write would.
                mode = node.mode & ~stat.S_ISUID
                if mode & stat.S_IXGRP:
                    mode &= ~stat.S_ISGID
                self.ns.setattr(inode, mode=mode)
        keep_cache = self._note_direct_open(inode, flags)
        self.data.opened(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=keep_cache)

    def _note_direct_open(self, inode: int, flags: int) -> bool:
        """Whether an open of `inode` may keep the kernel's cached pages
        (see the module docstring); marks the inode for an O_DIRECT writer."""
        marked = inode in self._direct_written
        if marked and not self.data.is_open(inode):
            self._direct_written.discard(inode)  # this open drops every stale page
        if flags & os.O_DIRECT and flags & os.O_ACCMODE != os.O_RDONLY:
            self._direct_written.add(inode)
        return not marked

    @errno_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self.ns.create(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx.uid, ctx.gid)
        self._note_direct_open(node.id, flags)
        self.data.opened(node.id)
        return pyfuse3.FileInfo(fh=node.id), self._looked_up(node)

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 sends any buffer as it is (a bytearray, or a view of
        # kept bytes: `FileData.read`), not copied into bytes.
        return cast(bytes, await self.data.read(fh, off, size))

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.volume.check_lease()  # EIO while the lease is not held (volume docstring)
        return await self.data.write(fh, off, buf)

    @errno_boundary
    async def flush(self, fh: int) -> None:
        await self.data.flush(fh)

    @errno_boundary
    async def release(self, fh: int) -> None:
        await self.data.released(fh)
        await self._free_if_unused(fh)

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.data.fsync(fh)

    @errno_boundary
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # Needs pyfuse3 with the handler (scripts/pyfuse3/README.md).
        await self.data.fallocate(fh, mode, offset, length)

    # -- extended attributes -----------------------------------------------------------

    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name in CONTROL_READS:
            return self._control(name, ctx)
        return self.ns.getxattr(inode, name)

    @errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        # pyfuse3 does not pass setxattr's flags on: it emulates XATTR_CREATE
        # (EEXIST) and XATTR_REPLACE (ENODATA) by calling getxattr first. That
        # is atomic here, as neither handler awaits anything in between. One
        # case it gets wrong, which we cannot see: both flags together on a
        # missing attribute set it (ext4 and tmpfs answer ENODATA).
        if inode == pyfuse3.ROOT_INODE and name == CONTROL_COMMAND:
            self._check_control_access(ctx)
            self.volume.run_command(control.read_command(value.decode(errors="replace")))
            return
        if name == RESTRIPE_XATTR:  # `ecfs restripe PATH`: an operator command
            self._check_control_access(ctx)
            self.volume.start_restripe(inode)
            return
        if (
            inode == pyfuse3.ROOT_INODE
            and name.startswith(b"user.ecfs.")
            and name != POLICY_XATTR
        ):
            raise FsError("reserved attribute", errno=errno.EPERM)
        self.ns.setxattr(inode, name, value)

    @errno_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.ns.listxattr(inode)

    @errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.ns.removexattr(inode, name)

    def _check_control_access(self, ctx: Any) -> None:
        if ctx.uid not in (0, self.mount_uid):
            raise FsError("control attributes are for root and the mounting user", errno=errno.EACCES)

    def _control(self, name: bytes, ctx: Any) -> bytes:
        self._check_control_access(ctx)
        if name == CONTROL_PID:
            return str(os.getpid()).encode()
        if name == CONTROL_WORKDIR:
            return os.fsencode(self.volume.workdir)
        if name == CONTROL_IOSTAT:
            return json.dumps(status.iostat_to_json(self.volume.iostat())).encode()
        return json.dumps(status.to_json(self.volume.status()), sort_keys=True).encode()

    # -- whole filesystem ----------------------------------------------------------------

    @errno_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total, free = self.volume.capacity()
        inodes, _ = self.ns.counts()
        block = 4096
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = block
        stats.f_frsize = block
        stats.f_blocks = total // block
        stats.f_bfree = free // block
        stats.f_bavail = free // block
        stats.f_files = inodes + free // block
        stats.f_ffree = free // block
        stats.f_favail = free // block
        stats.f_namemax = 255
        return stats

    @errno_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self.ns.get(inode)
        return True
