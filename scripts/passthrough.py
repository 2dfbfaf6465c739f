#!/usr/bin/env python3
"""A minimal pyfuse3 + trio passthrough filesystem: the benchmark baseline.

    python scripts/passthrough.py SRC MOUNTPOINT [--foreground]

Mirrors the directory SRC at MOUNTPOINT. It costs what any Python FUSE
filesystem costs (one request through the kernel and pyfuse3) and nothing
more, so ecfs's numbers can be compared against it. It uses the FUSE setup
ecfs uses: options fsname, default_permissions and (as root) allow_other,
the writeback cache, and the mount's read-ahead raised to 1 MiB.

Inodes are the source's st_ino (the source root is ROOT_INODE), mapped to the
paths they were seen at.

Where a call runs is what makes a passthrough fast or slow, so it is chosen
as carefully as in ecfs. Metadata calls on a local directory (stat, create,
chmod, utime, mkdir, unlink, rename, a listing) take microseconds, much less
than a thread round trip (`trio.to_thread` costs 60-240 us here), so they
run on the loop, as ecfs runs its SQLite metadata on the loop: a 10,000-file
tarball extract makes ~120,000 such calls, and sending each to a thread
tripled the extract's time. Data that is in the page cache is served on the
loop too: `preadv`/`pwritev` with RWF_NOWAIT, and only a write that would
wait (dirty-page throttling, a block allocation the kernel will not do
without blocking) goes to a thread, as do truncate and fsync. A read that
misses the page cache is tried once more after the loop served the other
requests (a checkpoint), as ecfs's reads are: the miss made the kernel
start reading those pages, and a fast disk has often answered by then;
only a second miss goes to a thread. (Without that second try, which ecfs
had and this baseline had not, a cold 4 KiB read cost a thread hop: the
passthrough did 3,500-3,900 random reads/s at queue depth 1 on a loop
device, against 7,400-7,700 with it.)

--no-io answers every read with zeros from memory (the files' sizes are
still the source's): the request ceiling of a Python FUSE filesystem on
this machine, what no pyfuse3 filesystem can beat per request
(scripts/bench_disks.py prints it beside the random reads).

Without --foreground the process detaches once the mount answers.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import stat
import sys
from collections import defaultdict

import pyfuse3
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ecfs.core.host import mount_at  # noqa: E402  (the repository's helper; no ecfs code runs)

TIMEOUT = 60.0  # seconds the kernel may cache entries and attributes
STAT_FIELDS = (
    "st_mode st_nlink st_uid st_gid st_rdev st_size st_blksize st_blocks"
    " st_atime_ns st_mtime_ns st_ctime_ns"
).split()
ZEROS = memoryview(bytes(1 << 20))  # what --no-io answers (a request is at most 1 MiB)
STATVFS_FIELDS = (
    "f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_namemax".split()
)


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str, no_io: bool = False) -> None:
        super().__init__()
        self.no_io = no_io
        self.source = os.fsencode(os.path.realpath(source))
        self.source_ino = os.lstat(self.source).st_ino
        self.paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {self.source}}
        self.inode_at: dict[bytes, int] = {self.source: pyfuse3.ROOT_INODE}  # the reverse
        self.lookups: defaultdict[int, int] = defaultdict(int)
        self.fd_inodes: dict[int, int] = {}  # open fd (= FUSE fh) -> inode
        # directory fh -> (path, sorted listing taken at opendir)
        self.dir_listings: dict[int, tuple[bytes, list[tuple[bytes, pyfuse3.EntryAttributes]]]] = {}
        self.next_dir_fh = 1
        self.limiter = trio.CapacityLimiter(32)
        self.as_root = os.geteuid() == 0

    # --- helpers --------------------------------------------------------
    @staticmethod
    def now(fn, *args, **kwargs):
        """Run a quick call on the loop; OSError becomes FUSEError."""
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def run(self, fn, *args, **kwargs):
        """Run a call that may wait on the disk in a thread; OSError becomes FUSEError."""
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), limiter=self.limiter
            )
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    def path(self, inode: int, name: bytes | None = None) -> bytes:
        paths = self.paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        base = next(iter(paths))
        return base if name is None else os.path.join(base, name)

    def attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        for key in STAT_FIELDS:
            setattr(entry, key, getattr(st, key))
        entry.st_ino = pyfuse3.ROOT_INODE if st.st_ino == self.source_ino else st.st_ino
        entry.entry_timeout = entry.attr_timeout = TIMEOUT
        return entry

    async def remember(self, path: bytes, st: os.stat_result | None = None):
        """Stat `path`, map its inode to it, count a lookup; return attributes."""
        entry = self.attr(st or self.now(os.lstat, path))
        self.add_path(entry.st_ino, path)
        self.lookups[entry.st_ino] += 1
        return entry

    def give_to_caller(self, path: bytes, ctx: pyfuse3.RequestContext, fd: int | None = None):
        if self.as_root:
            if fd is None:
                os.lchown(path, ctx.uid, ctx.gid)
            else:
                os.fchown(fd, ctx.uid, ctx.gid)

    def add_path(self, inode: int, path: bytes) -> None:
        self.forget_path(path)
        self.paths.setdefault(inode, set()).add(path)
        self.inode_at[path] = inode

    def forget_path(self, path: bytes) -> None:
        inode = self.inode_at.pop(path, None)
        if inode is not None and inode in self.paths:
            self.paths[inode].discard(path)

    # --- names ----------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx):
        return await self.remember(self.path(parent_inode, name))

    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.lookups[inode] -= count
            if self.lookups[inode] <= 0:
                del self.lookups[inode]
                if inode != pyfuse3.ROOT_INODE:
                    for path in self.paths.pop(inode, ()):
                        if self.inode_at.get(path) == inode:
                            del self.inode_at[path]

    async def getattr(self, inode, ctx):
        if not self.paths.get(inode):  # unlinked but still open: use an fd
            fd = next((fd for fd, ino in self.fd_inodes.items() if ino == inode), None)
            if fd is not None:
                return self.attr(self.now(os.fstat, fd))
        return self.attr(self.now(os.lstat, self.path(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        target = fh if fh is not None else self.path(inode)

        def apply() -> os.stat_result:
            st = os.stat(target) if fh is not None else os.lstat(target)
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode and not stat.S_ISLNK(st.st_mode):
                os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(target, uid, gid, follow_symlinks=fh is not None)
            if fields.update_atime or fields.update_mtime:
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(target, ns=(atime, mtime), follow_symlinks=fh is not None)
            return os.stat(target) if fh is not None else os.lstat(target)

        if fields.update_size:  # freeing a file's blocks can wait on the disk
            return self.attr(await self.run(apply))
        return self.attr(self.now(apply))

    async def readlink(self, inode, ctx):
        return self.now(os.readlink, self.path(inode))

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self.path(parent_inode, name)
        self.now(os.mkdir, path, mode & ~ctx.umask)
        self.now(self.give_to_caller, path, ctx)
        return await self.remember(path)

    async def symlink(self, parent_inode, name, target, ctx):
        path = self.path(parent_inode, name)
        self.now(os.symlink, target, path)
        self.now(self.give_to_caller, path, ctx)
        return await self.remember(path)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self.path(new_parent_inode, new_name)
        self.now(os.link, self.path(inode), path, follow_symlinks=False)
        return await self.remember(path)

    async def unlink(self, parent_inode, name, ctx):
        path = self.path(parent_inode, name)
        self.now(os.unlink, path)
        self.forget_path(path)

    async def rmdir(self, parent_inode, name, ctx):
        path = self.path(parent_inode, name)
        self.now(os.rmdir, path)
        self.forget_path(path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # callers fall back to plain rename
        old, new = self.path(parent_inode_old, name_old), self.path(parent_inode_new, name_new)
        self.now(os.rename, old, new)
        moved = [old]
        if stat.S_ISDIR(self.now(os.lstat, new).st_mode):  # and every path below it
            prefix = old + b"/"
            moved += [p for p in self.inode_at if p.startswith(prefix)]
        for path in moved:
            inode = self.inode_at.get(path)
            self.forget_path(path)
            if inode is not None:
                self.add_path(inode, new + path[len(old) :])

    # --- extended attributes -------------------------------------------
    # Passed through like everything else: a passthrough without them would
    # be cheaper than any real filesystem, since the kernel asks every FUSE
    # filesystem for security.capability before each write() and chown()
    # unless getxattr answered ENOSYS once.
    async def getxattr(self, inode, name, ctx):
        return self.now(os.getxattr, self.path(inode), name, follow_symlinks=False)

    async def setxattr(self, inode, name, value, ctx):
        self.now(os.setxattr, self.path(inode), name, value, follow_symlinks=False)

    async def listxattr(self, inode, ctx):
        names = self.now(os.listxattr, self.path(inode), follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    async def removexattr(self, inode, name, ctx):
        self.now(os.removexattr, self.path(inode), name, follow_symlinks=False)

    # --- directories ----------------------------------------------------
    async def opendir(self, inode, ctx):
        path = self.path(inode)

        def list_dir() -> list[tuple[bytes, os.stat_result]]:
            with os.scandir(path) as it:
                return sorted((e.name, e.stat(follow_symlinks=False)) for e in it)

        listing = [(name, self.attr(st)) for name, st in self.now(list_dir)]
        fh, self.next_dir_fh = self.next_dir_fh, self.next_dir_fh + 1
        self.dir_listings[fh] = (path, listing)
        return fh

    async def readdir(self, fh, start_id, token):
        path, listing = self.dir_listings[fh]
        for i in range(start_id, len(listing)):
            name, entry = listing[i]
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                break
            self.add_path(entry.st_ino, os.path.join(path, name))
            self.lookups[entry.st_ino] += 1

    async def releasedir(self, fh):
        del self.dir_listings[fh]

    # --- files ----------------------------------------------------------
    @staticmethod
    def open_flags(flags: int) -> int:
        # With the writeback cache the kernel reads pages of files opened for
        # writing and does O_APPEND itself. O_DIRECT is the kernel's business
        # too: the buffers FUSE hands us are not aligned, so an O_DIRECT
        # source file would fail every write with EINVAL.
        flags &= ~(os.O_APPEND | os.O_DIRECT)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    async def open(self, inode, flags, ctx):
        fd = self.now(os.open, self.path(inode), self.open_flags(flags))
        self.fd_inodes[fd] = inode
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self.path(parent_inode, name)
        fd = self.now(os.open, path, self.open_flags(flags) | os.O_CREAT, mode & ~ctx.umask)
        self.now(self.give_to_caller, path, ctx, fd)
        entry = await self.remember(path, self.now(os.fstat, fd))
        self.fd_inodes[fd] = entry.st_ino
        return pyfuse3.FileInfo(fh=fd), entry

    async def read(self, fh, off, size):
        if self.no_io:
            return ZEROS[: max(0, min(size, self.now(os.fstat, fh).st_size - off))]
        buf = bytearray(size)
        try:  # page-cached data without a thread hop
            try:
                n = os.preadv(fh, [buf], off, os.RWF_NOWAIT)
            except BlockingIOError:  # the kernel now reads it: once more, after the others
                await trio.lowlevel.checkpoint()
                n = os.preadv(fh, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return await self.run(os.pread, fh, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        if n == size or n == 0:
            return buf if n else b""
        return bytes(buf[:n]) + await self.run(os.pread, fh, size - n, off + n)

    async def write(self, fh, off, buf):
        view, done = memoryview(buf), 0
        try:  # into the page cache without a thread hop, if it need not wait
            done = os.pwritev(fh, [view], off, os.RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        if done == len(view):
            return done

        def write_rest() -> int:
            written = done
            while written < len(view):
                written += os.pwrite(fh, view[written:], off + written)
            return written

        return await self.run(write_rest)

    async def fsync(self, fh, datasync):
        await self.run(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh):
        self.fd_inodes.pop(fh, None)
        self.now(os.close, fh)

    async def statfs(self, ctx):
        sv = self.now(os.statvfs, self.source)
        data = pyfuse3.StatvfsData()
        for key in STATVFS_FIELDS:
            setattr(data, key, getattr(sv, key))
        return data


# --- mounting ---------------------------------------------------------------


def mount_device(mountpoint: str) -> str | None:
    """The "major:minor" of the mount at `mountpoint`, from the mount table
    (no stat: that would wait for the filesystem to answer)."""
    mount = mount_at(mountpoint)  # the last one on a path is the top of the stack
    return None if mount is None else mount.device


def raise_read_ahead(mountpoint: str, kib: int = 1024) -> None:
    """Best effort: 1 MiB read-ahead gives 1 MiB read requests instead of 256 KiB.
    Done once the mount answered, so the kernel's FUSE INIT cannot lower it again."""
    try:
        os.stat(mountpoint)
        device = mount_device(mountpoint)
        if device is None:
            raise OSError(f"{mountpoint} is not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        print(f"passthrough: could not set read_ahead_kb: {e}", file=sys.stderr)


async def serve(mountpoint: str, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminate_on_signal)
        nursery.start_soon(announce_ready, mountpoint, ready_fd)
        await pyfuse3.main()  # returns once unmounted
        nursery.cancel_scope.cancel()


async def announce_ready(mountpoint: str, ready_fd: int | None) -> None:
    await trio.to_thread.run_sync(raise_read_ahead, mountpoint)
    if ready_fd is not None:  # tell the waiting parent, detach from the terminal
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)


async def terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    parser.add_argument("--no-io", action="store_true",
                        help="answer reads with zeros from memory (the request ceiling)")
    args = parser.parse_args()

    ready_fd = None
    if not args.foreground:
        read_end, ready_fd = os.pipe()
        if os.fork():  # parent: wait until the child mounted (or failed)
            os.close(ready_fd)
            answer = os.read(read_end, 4096)
            if answer != b"ok":
                print(f"passthrough: mount failed: {answer.decode(errors='replace')}",
                      file=sys.stderr)  # fmt: skip
                return 1
            return 0
        os.close(read_end)
        os.setsid()

    try:
        os.umask(0)  # create() and mkdir() apply the caller's umask
        ops = Passthrough(args.source, args.no_io)
        options = {"fsname=passthrough", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")
        pyfuse3.init(ops, args.mountpoint, options)
    except Exception as e:
        if ready_fd is None:
            raise
        os.write(ready_fd, f"{type(e).__name__}: {e}".encode())  # the parent reports it
        return 1
    try:
        trio.run(serve, args.mountpoint, ready_fd)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
