#!/usr/bin/env python3
"""faultfs: a pyfuse3 + trio passthrough filesystem that misbehaves on demand.

    python scripts/faultfs.py SOURCE MOUNTPOINT --control CONTROL_FILE [--foreground]

Mirrors the directory SOURCE at MOUNTPOINT, like scripts/passthrough.py,
and injects faults chosen at run time: CONTROL_FILE holds one mode (a
missing or empty file means ``ok``):

    ok        plain passthrough
    hang      every operation blocks until the mode changes (the handler
              awaits; the event loop keeps running, so the mode can change)
    eio       every operation fails with EIO
    enospc    create, mknod, mkdir, symlink, link and write fail
              with ENOSPC; statfs reports no free blocks; reads work
    slow:MS   every operation is delayed by MS milliseconds
    gone      every operation fails with ENOENT (a vanished directory)

Any mode but ``ok`` may be limited to some paths: ``MODE@GLOB`` (e.g.
``hang@frags/*/00ab*.1``, ``eio@*.2``) applies MODE only to operations on
a path that matches GLOB; every other operation passes through. GLOB is
matched (`fnmatch.fnmatchcase`: ``*`` also matches ``/``) against the
path relative to SOURCE, without a leading slash; the root is ``.``. An
operation's paths are its target's: the new entry of lookup, create,
mknod, mkdir and symlink; the new entry and the file's names for link;
both names for rename; the entry removed by unlink and rmdir; the
file's or directory's current names for the others, also those on an
open file (read, write, fsync, release...; a file with several names
matches if one does, an open file unlinked since matches nothing);
statfs is on the root. So a test can make one chunk's fragment files
hang while the rest of the store (its marker, probes, metadata) answers.

The control file is checked every CONTROL_POLL seconds (mtime, size and
inode) and re-read when it changed. Before a mode other than ``ok`` takes
effect, the kernel's page cache of every file faultfs has seen is
invalidated, so reads really reach the faulty filesystem instead of being
served from memory. Once a mode is in effect, its text is written to
``CONTROL_FILE.applied`` (atomically), so a controller can wait for it.

Only ``forget`` is never affected. ``release`` and ``releasedir`` honour
``hang`` and ``slow`` but always close the source file (the kernel ignores
their errors anyway). Writes are write-through (no writeback cache) and
entries and attributes are not cached by the kernel, so an error reaches
the very call that caused it. Locking is not passed to faultfs (the kernel
handles POSIX locks locally), which is all SQLite needs.

Mount options: fsname=faultfs, default_permissions, and allow_other when
run as root. Without --foreground the process detaches once the mount
answers.

From Python (tests, benchmarks): `FaultyDir` starts faultfs on a fresh
source directory, `.path` is the mountpoint, `.set(mode)` switches the mode
and waits until it is in effect, and leaving the context (or `close()`)
sets ``ok``, unmounts (``fusermount3 -u``, then ``-uz``) and kills the
process. scripts/ is not a package: import this file by path, e.g. with
``importlib.util.spec_from_file_location``.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import functools
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
from ecfs.core.host import mount_at  # noqa: E402  (the mount-table helper; no ecfs code runs)

CONTROL_POLL = 0.05  # seconds between checks of the control file
INVALIDATE_TIMEOUT = 2.0  # seconds to wait for the page-cache invalidation
MODES = ("ok", "hang", "eio", "enospc", "slow:MS", "gone", "MODE@GLOB")

STAT_FIELDS = (
    "st_mode st_nlink st_uid st_gid st_rdev st_size st_blksize st_blocks"
    " st_atime_ns st_mtime_ns st_ctime_ns"
).split()
STATVFS_FIELDS = (
    "f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_namemax".split()
)
# Operations that allocate space: they fail in `enospc` mode.
SPACE_OPS = frozenset({"create", "mknod", "mkdir", "symlink", "link", "write"})


@dataclass(frozen=True, slots=True)
class Mode:
    """A parsed control-file mode."""

    name: str  # ok, hang, eio, enospc, slow, gone
    delay: float = 0.0  # seconds, for slow
    glob: str | None = None  # MODE@GLOB: only paths matching it (None: all)

    @classmethod
    def parse(cls, text: str) -> Mode:
        spec, at, glob = text.strip().partition("@")
        word = spec.lower()
        if at and (not glob or word in ("", "ok")):
            raise ValueError(f"bad mode {text.strip()!r} (MODE@GLOB: a mode but ok, and a glob)")
        if word in ("", "ok"):
            return cls("ok")
        if word in ("hang", "eio", "enospc", "gone"):
            return cls(word, glob=glob or None)
        if word.startswith("slow:"):
            try:
                ms = float(word[5:])
            except ValueError:
                ms = -1.0
            if ms >= 0:
                return cls("slow", ms / 1000, glob or None)
        raise ValueError(f"unknown mode {text.strip()!r} (expected one of {', '.join(MODES)})")

    def applies_to(self, paths: Iterable[str]) -> bool:
        """Whether the mode affects an operation on `paths` (relative to
        the source; see the module docstring)."""
        if self.glob is None:
            return True
        return any(fnmatch.fnmatchcase(path, self.glob) for path in paths)

    def __str__(self) -> str:
        word = f"slow:{self.delay * 1000:g}" if self.name == "slow" else self.name
        return word if self.glob is None else f"{word}@{self.glob}"


# --- the filesystem (imports pyfuse3 and trio only when it runs) -------------


def make_operations(source: str, control: str) -> Any:
    """Build the faultfs Operations object (pyfuse3 is imported here so that
    FaultyDir users need neither pyfuse3 nor trio)."""
    import pyfuse3
    import trio

    class FaultFS(pyfuse3.Operations):
        """Passthrough of `source`, every handler behind `self.gate(op)`."""

        enable_writeback_cache = False

        def __init__(self) -> None:
            super().__init__()
            self.source = os.fsencode(os.path.realpath(source))
            self.source_ino = os.lstat(self.source).st_ino
            self.control = control
            self.paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {self.source}}
            self.lookups: defaultdict[int, int] = defaultdict(int)
            self.fd_inodes: dict[int, int] = {}  # open fd (= FUSE fh) -> inode
            self.dir_fds: dict[int, int] = {}  # directory fh -> fd (for fsyncdir)
            self.dir_listings: dict[
                int, tuple[bytes, list[tuple[bytes, pyfuse3.EntryAttributes]]]
            ] = {}
            self.next_dir_fh = 1
            self.limiter = trio.CapacityLimiter(32)
            self.as_root = os.geteuid() == 0
            self.mode = Mode("ok")
            self.mode_changed = trio.Event()

        # --- faults ---------------------------------------------------------
        async def gate(self, op: str, paths: Iterable[bytes] = ()) -> None:
            """Apply the current mode to operation `op` on `paths` (see
            `known`) before it runs."""
            paths = tuple(paths)
            while True:
                mode = self.mode
                if mode.name == "ok" or not mode.applies_to(self.relative(p) for p in paths):
                    return
                if mode.name == "hang":
                    await self.mode_changed.wait()
                    continue
                if mode.name == "slow":
                    await trio.sleep(mode.delay)
                    return
                if mode.name == "eio":
                    raise pyfuse3.FUSEError(errno.EIO)
                if mode.name == "gone":
                    raise pyfuse3.FUSEError(errno.ENOENT)
                if mode.name == "enospc" and op in SPACE_OPS:
                    raise pyfuse3.FUSEError(errno.ENOSPC)
                return

        async def gate_release(self, paths: Iterable[bytes] = ()) -> None:
            """release/releasedir: wait in hang, sleep in slow, never fail."""
            paths = tuple(paths)

            def applies() -> bool:
                return self.mode.applies_to(self.relative(p) for p in paths)

            while self.mode.name == "hang" and applies():
                await self.mode_changed.wait()
            if self.mode.name == "slow" and applies():
                await trio.sleep(self.mode.delay)

        def relative(self, path: bytes) -> str:
            """`path` relative to the source, as MODE@GLOB matches it."""
            rel = os.path.relpath(path, self.source)
            return os.fsdecode(rel)

        def known(self, inode: int, name: bytes | None = None) -> tuple[bytes, ...]:
            """The paths of `inode` (or of its entry `name`) for `gate`;
            () when unknown (the handler then fails as it would)."""
            paths = self.paths.get(inode, ())
            if name is None:
                return tuple(paths)
            return tuple(os.path.join(p, name) for p in paths)

        def known_fh(self, fh: int) -> tuple[bytes, ...]:
            """The paths of the file open as `fh`."""
            inode = self.fd_inodes.get(fh)
            return () if inode is None else self.known(inode)

        def set_mode(self, mode: Mode) -> None:
            self.mode = mode
            self.mode_changed.set()
            self.mode_changed = trio.Event()

        async def watch_control(self) -> None:
            """Poll the control file; apply a changed mode; acknowledge it."""
            seen: tuple[int, int, int] | None = None
            while True:
                try:
                    st = await trio.to_thread.run_sync(os.stat, self.control)
                    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
                except FileNotFoundError:
                    signature = (0, 0, 0)
                if signature != seen:
                    seen = signature
                    await self.apply_control()
                await trio.sleep(CONTROL_POLL)

        async def apply_control(self, invalidate: bool = True) -> None:
            try:
                text = await trio.to_thread.run_sync(_read_text, self.control)
                mode = Mode.parse(text)
            except (OSError, ValueError) as e:
                print(f"faultfs: control file: {e}; mode stays {self.mode}", file=sys.stderr)
                return
            if mode != self.mode:
                if invalidate and mode.name != "ok":
                    await self.invalidate_caches()
                self.set_mode(mode)
                print(f"faultfs: mode {mode}", file=sys.stderr, flush=True)
            await trio.to_thread.run_sync(_write_atomically, self.control + ".applied", str(mode))

        async def invalidate_caches(self) -> None:
            """Drop the kernel's cached pages and attributes of every inode
            we know, so that the new mode sees every later access. In a
            thread: the kernel may write back dirty mmap pages through us."""
            inodes = list(self.paths)

            def invalidate() -> None:
                for inode in inodes:
                    try:
                        pyfuse3.invalidate_inode(inode)
                    except OSError:
                        pass

            with trio.move_on_after(INVALIDATE_TIMEOUT):
                await trio.to_thread.run_sync(invalidate, abandon_on_cancel=True)

        # --- helpers --------------------------------------------------------
        async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            """Run a blocking call in a thread; OSError becomes FUSEError."""
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
            entry.entry_timeout = entry.attr_timeout = 0  # every access reaches us
            return entry

        async def remember(
            self, path: bytes, st: os.stat_result | None = None
        ) -> pyfuse3.EntryAttributes:
            entry = self.attr(st or await self.run(os.lstat, path))
            self.paths.setdefault(entry.st_ino, set()).add(path)
            self.lookups[entry.st_ino] += 1
            return entry

        def give_to_caller(
            self, path: bytes, ctx: pyfuse3.RequestContext, fd: int | None = None
        ) -> None:
            if self.as_root:
                if fd is None:
                    os.lchown(path, ctx.uid, ctx.gid)
                else:
                    os.fchown(fd, ctx.uid, ctx.gid)

        def forget_path(self, path: bytes) -> None:
            for paths in self.paths.values():
                paths.discard(path)

        # --- names ----------------------------------------------------------
        async def lookup(self, parent_inode, name, ctx):
            await self.gate("lookup", self.known(parent_inode, name))
            return await self.remember(self.path(parent_inode, name))

        async def forget(self, inode_list):
            for inode, count in inode_list:
                self.lookups[inode] -= count
                if self.lookups[inode] <= 0:
                    del self.lookups[inode]
                    if inode != pyfuse3.ROOT_INODE:
                        self.paths.pop(inode, None)

        async def getattr(self, inode, ctx):
            await self.gate("getattr", self.known(inode))
            if not self.paths.get(inode):  # unlinked but still open: use an fd
                fd = next((fd for fd, ino in self.fd_inodes.items() if ino == inode), None)
                if fd is not None:
                    return self.attr(await self.run(os.fstat, fd))
            return self.attr(await self.run(os.lstat, self.path(inode)))

        async def setattr(self, inode, attr, fields, fh, ctx):
            await self.gate("setattr", self.known(inode))
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

            return self.attr(await self.run(apply))

        async def readlink(self, inode, ctx):
            await self.gate("readlink", self.known(inode))
            return await self.run(os.readlink, self.path(inode))

        async def mknod(self, parent_inode, name, mode, rdev, ctx):
            await self.gate("mknod", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            await self.run(os.mknod, path, mode & ~ctx.umask, rdev)
            await self.run(self.give_to_caller, path, ctx)
            return await self.remember(path)

        async def mkdir(self, parent_inode, name, mode, ctx):
            await self.gate("mkdir", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            await self.run(os.mkdir, path, mode & ~ctx.umask)
            await self.run(self.give_to_caller, path, ctx)
            return await self.remember(path)

        async def symlink(self, parent_inode, name, target, ctx):
            await self.gate("symlink", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            await self.run(os.symlink, target, path)
            await self.run(self.give_to_caller, path, ctx)
            return await self.remember(path)

        async def link(self, inode, new_parent_inode, new_name, ctx):
            await self.gate("link", self.known(inode) + self.known(new_parent_inode, new_name))
            path = self.path(new_parent_inode, new_name)
            await self.run(os.link, self.path(inode), path, follow_symlinks=False)
            return await self.remember(path)

        async def unlink(self, parent_inode, name, ctx):
            await self.gate("unlink", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            await self.run(os.unlink, path)
            self.forget_path(path)

        async def rmdir(self, parent_inode, name, ctx):
            await self.gate("rmdir", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            await self.run(os.rmdir, path)
            self.forget_path(path)

        async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
            await self.gate(
                "rename",
                self.known(parent_inode_old, name_old) + self.known(parent_inode_new, name_new),
            )
            if flags:
                raise pyfuse3.FUSEError(errno.EINVAL)  # callers fall back to plain rename
            old = self.path(parent_inode_old, name_old)
            new = self.path(parent_inode_new, name_new)
            await self.run(os.rename, old, new)
            self.forget_path(new)
            prefix = old + b"/"
            for paths in self.paths.values():  # the entry and, for a directory, all below
                for p in [p for p in paths if p == old or p.startswith(prefix)]:
                    paths.discard(p)
                    paths.add(new + p[len(old) :])

        async def access(self, inode, mode, ctx):
            await self.gate("access", self.known(inode))
            return await self.run(os.access, self.path(inode), mode)

        # --- directories ----------------------------------------------------
        async def opendir(self, inode, ctx):
            await self.gate("opendir", self.known(inode))
            path = self.path(inode)

            def list_dir() -> tuple[int, list[tuple[bytes, os.stat_result]]]:
                with os.scandir(path) as it:
                    listing = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
                return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), listing

            fd, listing = await self.run(list_dir)
            fh, self.next_dir_fh = self.next_dir_fh, self.next_dir_fh + 1
            self.dir_listings[fh] = (path, [(name, self.attr(st)) for name, st in listing])
            self.dir_fds[fh] = fd
            return fh

        async def readdir(self, fh, start_id, token):
            await self.gate("readdir", self.dir_listings[fh][0:1])
            path, listing = self.dir_listings[fh]
            for i in range(start_id, len(listing)):
                name, entry = listing[i]
                if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                    break
                self.paths.setdefault(entry.st_ino, set()).add(os.path.join(path, name))
                self.lookups[entry.st_ino] += 1

        async def fsyncdir(self, fh, datasync):
            await self.gate("fsyncdir", self.dir_listings[fh][0:1])
            await self.run(os.fdatasync if datasync else os.fsync, self.dir_fds[fh])

        async def releasedir(self, fh):
            await self.gate_release(self.dir_listings[fh][0:1] if fh in self.dir_listings else ())
            self.dir_listings.pop(fh, None)
            fd = self.dir_fds.pop(fh, None)
            if fd is not None:
                await self.run(os.close, fd)

        # --- files ----------------------------------------------------------
        @staticmethod
        def open_flags(flags: int) -> int:
            # The kernel passes the offset of O_APPEND writes itself.
            return flags & ~os.O_APPEND

        async def open(self, inode, flags, ctx):
            await self.gate("open", self.known(inode))
            fd = await self.run(os.open, self.path(inode), self.open_flags(flags))
            self.fd_inodes[fd] = inode
            return pyfuse3.FileInfo(fh=fd)

        async def create(self, parent_inode, name, mode, flags, ctx):
            await self.gate("create", self.known(parent_inode, name))
            path = self.path(parent_inode, name)
            fd = await self.run(
                os.open, path, self.open_flags(flags) | os.O_CREAT, mode & ~ctx.umask
            )
            await self.run(self.give_to_caller, path, ctx, fd)
            entry = await self.remember(path, await self.run(os.fstat, fd))
            self.fd_inodes[fd] = entry.st_ino
            return pyfuse3.FileInfo(fh=fd), entry

        async def read(self, fh, off, size):
            await self.gate("read", self.known_fh(fh))
            return await self.run(os.pread, fh, size, off)

        async def write(self, fh, off, buf):
            await self.gate("write", self.known_fh(fh))

            def write_all() -> int:
                view, done = memoryview(buf), 0
                while done < len(view):
                    done += os.pwrite(fh, view[done:], off + done)
                return done

            return await self.run(write_all)

        async def flush(self, fh):
            await self.gate("flush", self.known_fh(fh))  # writes are synchronous: nothing to do

        async def fsync(self, fh, datasync):
            await self.gate("fsync", self.known_fh(fh))
            await self.run(os.fdatasync if datasync else os.fsync, fh)

        async def release(self, fh):
            await self.gate_release(self.known_fh(fh))
            self.fd_inodes.pop(fh, None)
            await self.run(os.close, fh)

        async def statfs(self, ctx):
            await self.gate("statfs", (self.source,))
            sv = await self.run(os.statvfs, self.source)
            data = pyfuse3.StatvfsData()
            for key in STATVFS_FIELDS:
                setattr(data, key, getattr(sv, key))
            if self.mode.name == "enospc" and self.mode.applies_to(["."]):
                data.f_bfree = data.f_bavail = 0
            return data

    return FaultFS()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096)
    except FileNotFoundError:
        return ""


def _write_atomically(path: str | os.PathLike[str], text: str) -> None:
    tmp = f"{os.fspath(path)}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# --- mounting ---------------------------------------------------------------


async def serve(ops: Any, ready_fd: int | None) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminate_on_signal)
        # The initial mode is in effect before the first request.
        await ops.apply_control(invalidate=False)
        nursery.start_soon(ops.watch_control)
        if ready_fd is not None:
            nursery.start_soon(announce_ready, ready_fd)
        await pyfuse3.main(max_tasks=1000)  # returns once unmounted
        nursery.cancel_scope.cancel()


async def announce_ready(ready_fd: int) -> None:
    """Tell the waiting parent, detach from the terminal."""
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)


async def terminate_on_signal() -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="file holding the mode")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    args = parser.parse_args(argv)

    import pyfuse3
    import trio

    ready_fd = None
    if not args.foreground:
        read_end, ready_fd = os.pipe()
        if os.fork():  # parent: wait until the child mounted (or failed)
            os.close(ready_fd)
            answer = os.read(read_end, 4096)
            if answer != b"ok":
                print(f"faultfs: mount failed: {answer.decode(errors='replace')}",
                      file=sys.stderr)  # fmt: skip
                return 1
            return 0
        os.close(read_end)
        os.setsid()

    try:
        os.umask(0)  # create() and mkdir() apply the caller's umask
        ops = make_operations(args.source, os.path.abspath(args.control))
        options = {"fsname=faultfs", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")
        pyfuse3.init(ops, args.mountpoint, options)
    except Exception as e:
        if ready_fd is None:
            raise
        os.write(ready_fd, f"{type(e).__name__}: {e}".encode())  # the parent reports it
        return 1
    try:
        trio.run(serve, ops, ready_fd)
    finally:
        pyfuse3.close(unmount=True)
    return 0


# --- the Python helper ------------------------------------------------------


def _mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, from the mount table (no stat:
    that would block on a hung filesystem)."""
    return mount_at(path) is not None


class FaultyDir:
    """A faultfs mount over a fresh directory, for tests and benchmarks.

    `base` gets ``src/`` (the real files), ``mnt/`` (the mountpoint, `.path`),
    ``control`` and ``faultfs.log``. Use as a context manager, or call
    `start()` and `close()` (idempotent; always leaves nothing mounted or
    running). Needs /dev/fuse and fusermount3.
    """

    START_TIMEOUT = 15.0
    SET_TIMEOUT = 10.0

    def __init__(self, base: str | os.PathLike[str], mode: str = "ok") -> None:
        self.base = Path(base)
        self.source = self.base / "src"
        self.path = self.base / "mnt"
        self.control = self.base / "control"
        self.log_path = self.base / "faultfs.log"
        self.mode = str(Mode.parse(mode))
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"FaultyDir({self.path}, mode={self.mode})"

    def __enter__(self) -> FaultyDir:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start faultfs; return once the mount answers."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the faultfs process (see `wait_ready`); lets several
        FaultyDirs start in parallel."""
        for d in (self.source, self.path):
            d.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.control, self.mode)
        argv = [
            sys.executable, os.path.abspath(__file__),
            os.fspath(self.source), os.fspath(self.path),
            "--control", os.fspath(self.control), "--foreground",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + self.START_TIMEOUT
        while not (_mounted(self.path) and self._applied() == self.mode):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"faultfs did not mount at {self.path}:\n{self.log_tail()}")
            time.sleep(0.01)

    def set(self, mode: str) -> None:
        """Switch to `mode` (see the module docstring) and wait until faultfs
        applies it (its page cache invalidated first)."""
        wanted = str(Mode.parse(mode))
        _write_atomically(self.control, wanted)
        self.mode = wanted
        if self.proc is None:
            return
        deadline = time.monotonic() + self.SET_TIMEOUT
        while self._applied() != wanted:
            if self.proc.poll() is not None:
                raise RuntimeError(f"faultfs exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultfs did not apply mode {wanted}:\n{self.log_tail()}")
            time.sleep(0.005)

    def _applied(self) -> str:
        return _read_text(os.fspath(self.control) + ".applied").strip()

    @property
    def mounted(self) -> bool:
        return _mounted(self.path)

    def close(self) -> None:
        """Set ok, unmount (fusermount3 -u, then -uz), end the process."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.set("ok")
            except (RuntimeError, TimeoutError):
                pass
        for flags in ("-u", "-uz"):
            if not self.mounted:
                break
            subprocess.run(
                ["fusermount3", flags, os.fspath(self.path)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
