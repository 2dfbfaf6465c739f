"""POSIX behaviour through a real mount: one test per behaviour.

Most tests share one mounted volume (`shared_volume`) and work in their own
subdirectory (the `d` fixture); tests that remount or count what is left on
the stores get a fresh `volume`.

Permission tests run a child process as uid 65534 (`nobody`): the mount uses
`default_permissions`, so the kernel decides, from the modes ecfs reports.
The child runs the system python with its working directory inside the
mount (the directories above the mountpoint may not be searchable by nobody).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.as_user import NOBODY, run_as_user
from tests.mounting import MountedVolume
from tests.volume_files import MiB, drop_caches, fragment_files, pattern

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid child)")


@pytest.fixture
def d(shared_volume: MountedVolume, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount, named after the test."""
    path = shared_volume.mountpoint / request.node.name
    path.mkdir()
    yield path


def expect_errno(code: int, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, (
        f"{fn.__name__}: expected {errno.errorcode[code]}, "
        f"got {errno.errorcode.get(info.value.errno, info.value.errno)}"
    )


def run_as(uid: int, cwd: Path, code: str, gid: int | None = None) -> str:
    """Run python `code` (after the `attempt` helper) as `uid` with `cwd` as
    working directory; return its stdout. The code reports by printing."""
    return run_as_user(uid, uid if gid is None else gid, cwd, code).strip()


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    if not hasattr(_libc, "renameat2"):
        pytest.skip("libc has no renameat2")
    ret = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def inode_count(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def fresh_lstat(path: Path) -> os.stat_result:
    """lstat after dropping the kernel's caches, so the answer comes from the
    daemon (with the writeback cache the kernel keeps its own size and times
    of a cached inode, which hides what the daemon recorded)."""
    drop_caches()
    return os.lstat(path)


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# --- create / open / read / write -----------------------------------------------


def test_create_write_read_back(d: Path) -> None:
    path = d / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        assert os.pread(fd, 5, 6) == b"world"
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"hello world"
    finally:
        os.close(fd)
    assert path.read_bytes() == b"hello world"
    assert stat.S_ISREG(path.stat().st_mode)
    assert path.stat().st_size == 11


def test_o_append_appends_from_two_descriptors(d: Path) -> None:
    path = d / "log"
    path.write_bytes(b"start\n")
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 else b, f"line {i}\n".encode())
        os.lseek(a, 0, os.SEEK_SET)  # O_APPEND ignores the offset
        os.write(a, b"end\n")
    finally:
        os.close(a)
        os.close(b)
    expected = b"start\n" + b"".join(f"line {i}\n".encode() for i in range(20)) + b"end\n"
    assert path.read_bytes() == expected
    drop_caches()
    assert path.read_bytes() == expected


def test_o_trunc_empties_the_file(d: Path) -> None:
    path = d / "f"
    path.write_bytes(pattern(1, 300_000))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    drop_caches()
    assert path.read_bytes() == b"new"


def test_o_excl_on_existing_name_is_eexist(d: Path) -> None:
    path = d / "f"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    expect_errno(errno.EEXIST, os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.symlink("dangling-target", d / "link")
    expect_errno(errno.EEXIST, os.open, d / "link", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.mkdir(d / "dir")
    expect_errno(errno.EEXIST, os.open, d / "dir", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_o_creat_mode_honours_umask(d: Path) -> None:
    old = os.umask(0o027)
    try:
        os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(d / "sub", 0o777)
        os.mkfifo(d / "fifo", 0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "fifo").stat().st_mode) == 0o640
    # The mode only applies at creation: reopening with O_CREAT keeps it.
    os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o600))
    assert stat.S_IMODE((d / "f").stat().st_mode) == 0o640


def test_open_errors(d: Path) -> None:
    expect_errno(errno.ENOENT, os.open, d / "missing", os.O_RDONLY)
    (d / "file").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.open, d / "file" / "x", os.O_RDONLY)
    expect_errno(errno.ENOTDIR, os.open, d / "file", os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir(d / "dir")
    expect_errno(errno.EISDIR, os.open, d / "dir", os.O_WRONLY)


# --- unlink of an open file -----------------------------------------------------------


def test_unlinked_open_file_lives_until_closed_then_is_freed(volume: MountedVolume) -> None:
    mnt = volume.mountpoint
    before = inode_count(mnt)
    path = mnt / "victim"
    data = pattern(11, 3 * MiB + 7)
    path.write_bytes(data)
    assert inode_count(mnt) == before + 1
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert "victim" not in os.listdir(mnt)
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"tail", len(data))
        os.fsync(fd)
        drop_caches()
        assert os.pread(fd, len(data) + 100, 0) == data + b"tail"
        assert os.fstat(fd).st_size == len(data) + 4
        # A new file may take the name meanwhile.
        path.write_bytes(b"other")
        assert os.pread(fd, 4, len(data)) == b"tail"
        os.unlink(path)
    finally:
        os.close(fd)
    assert wait_for(lambda: inode_count(mnt) == before), (inode_count(mnt), before)
    volume.unmount()
    left = [p for store in volume.stores for p in fragment_files(store).values()]
    assert left == [], f"fragments of the freed file remain: {left[:5]}"


def test_unlinked_open_file_is_freed_at_close_after_rename_over(volume: MountedVolume) -> None:
    mnt = volume.mountpoint
    before = inode_count(mnt)
    (mnt / "old").write_bytes(pattern(12, 2 * MiB))
    fd = os.open(mnt / "old", os.O_RDONLY)
    try:
        (mnt / "new").write_bytes(b"small")
        os.rename(mnt / "new", mnt / "old")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 2 * MiB, 0) == pattern(12, 2 * MiB)
    finally:
        os.close(fd)
    assert wait_for(lambda: inode_count(mnt) == before + 1)
    volume.unmount()
    left = [p for store in volume.stores for p in fragment_files(store).values()]
    assert left == []


# --- directories --------------------------------------------------------------------


def test_mkdir_rmdir_errors(d: Path) -> None:
    os.mkdir(d / "a")
    expect_errno(errno.EEXIST, os.mkdir, d / "a")
    (d / "file").write_bytes(b"")
    expect_errno(errno.EEXIST, os.mkdir, d / "file")
    expect_errno(errno.ENOTDIR, os.mkdir, d / "file" / "x")
    expect_errno(errno.ENOENT, os.mkdir, d / "missing" / "x")
    (d / "a" / "inside").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "a")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "file")
    expect_errno(errno.ENOENT, os.rmdir, d / "missing")
    expect_errno(errno.EISDIR, os.unlink, d / "a")
    os.unlink(d / "a" / "inside")
    os.rmdir(d / "a")
    assert not (d / "a").exists()
    assert sorted(os.listdir(d)) == ["file"]


def test_directory_nlink_counts_subdirectories(d: Path) -> None:
    assert d.stat().st_nlink == 2
    for name in "abc":
        os.mkdir(d / name)
    (d / "file").write_bytes(b"")
    assert d.stat().st_nlink == 5
    os.rmdir(d / "b")
    assert d.stat().st_nlink == 4
    os.mkdir(d / "other")
    os.rename(d / "a", d / "other" / "a")
    assert d.stat().st_nlink == 4  # lost a, gained other
    assert (d / "other").stat().st_nlink == 3
    assert os.stat(d / "other" / "a" / "..").st_ino == (d / "other").stat().st_ino


def test_removed_cwd_directory(d: Path) -> None:
    os.mkdir(d / "gone")
    fd = os.open(d / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d / "gone")
        assert os.fstat(fd).st_nlink in (0, 1)  # Linux shows 0 for a removed dir
        expect_errno(errno.ENOENT, os.open, "new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


# --- rename ---------------------------------------------------------------------------


def test_rename_over_existing_file_replaces_it(d: Path) -> None:
    (d / "src").write_bytes(b"new content")
    (d / "dst").write_bytes(b"old content")
    ino = (d / "src").stat().st_ino
    os.rename(d / "src", d / "dst")
    assert not (d / "src").exists()
    assert (d / "dst").stat().st_ino == ino
    assert (d / "dst").read_bytes() == b"new content"
    assert sorted(os.listdir(d)) == ["dst"]


def test_rename_over_existing_file_is_atomic_for_readers(d: Path) -> None:
    target = d / "target"
    target.write_bytes(b"version -1")
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                content = target.read_bytes()
            except FileNotFoundError:
                problems.append("ENOENT during rename")
                return
            if not content.startswith(b"version "):
                problems.append(f"bad content {content!r}")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(150):
            tmp = d / f"tmp{i}"
            tmp.write_bytes(f"version {i}".encode())
            os.rename(tmp, target)
    finally:
        stop.set()
        thread.join()
    assert not problems, problems
    assert target.read_bytes() == b"version 149"
    assert os.listdir(d) == ["target"]


def test_rename_across_directories(d: Path) -> None:
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    (d / "a" / "f").write_bytes(b"data")
    os.rename(d / "a" / "f", d / "b" / "g")
    assert os.listdir(d / "a") == []
    assert (d / "b" / "g").read_bytes() == b"data"


def test_rename_directory_with_contents(d: Path) -> None:
    os.makedirs(d / "a" / "x" / "y")
    (d / "a" / "x" / "y" / "f").write_bytes(b"deep")
    os.mkdir(d / "b")
    os.rename(d / "a" / "x", d / "b" / "z")
    assert (d / "b" / "z" / "y" / "f").read_bytes() == b"deep"
    assert os.stat(d / "b" / "z" / "..").st_ino == (d / "b").stat().st_ino
    assert (d / "a").stat().st_nlink == 2
    assert (d / "b").stat().st_nlink == 3


def test_rename_directory_over_empty_directory(d: Path) -> None:
    os.mkdir(d / "src")
    (d / "src" / "f").write_bytes(b"x")
    os.mkdir(d / "dst")
    os.rename(d / "src", d / "dst")
    assert os.listdir(d / "dst") == ["f"]
    assert sorted(os.listdir(d)) == ["dst"]
    assert d.stat().st_nlink == 3


def test_rename_directory_over_non_empty_directory_is_enotempty(d: Path) -> None:
    os.mkdir(d / "src")
    os.mkdir(d / "dst")
    (d / "dst" / "f").write_bytes(b"x")
    expect_errno(errno.ENOTEMPTY, os.rename, d / "src", d / "dst")
    assert (d / "src").is_dir() and (d / "dst" / "f").exists()


def test_rename_type_mismatches(d: Path) -> None:
    os.mkdir(d / "dir")
    (d / "file").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.rename, d / "dir", d / "file")
    expect_errno(errno.EISDIR, os.rename, d / "file", d / "dir")
    expect_errno(errno.ENOENT, os.rename, d / "missing", d / "other")


def test_rename_directory_into_its_own_subdirectory_is_einval(d: Path) -> None:
    os.makedirs(d / "a" / "b" / "c")
    expect_errno(errno.EINVAL, os.rename, d / "a", d / "a" / "b" / "c" / "a")
    expect_errno(errno.EINVAL, os.rename, d / "a", d / "a" / "x")
    assert (d / "a" / "b" / "c").is_dir()


def test_rename_same_inode_hard_links_is_a_no_op(d: Path) -> None:
    (d / "a").write_bytes(b"x")
    os.link(d / "a", d / "b")
    os.rename(d / "a", d / "b")
    assert sorted(os.listdir(d)) == ["a", "b"]
    assert (d / "a").stat().st_nlink == 2


def test_renameat2_noreplace(d: Path) -> None:
    (d / "a").write_bytes(b"a")
    (d / "b").write_bytes(b"b")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    assert (d / "b").read_bytes() == b"b"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(d)) == ["b", "c"]


def test_renameat2_exchange(d: Path) -> None:
    os.mkdir(d / "x")
    (d / "file").write_bytes(b"file")
    os.mkdir(d / "dir")
    (d / "dir" / "inner").write_bytes(b"inner")
    file_ino, dir_ino = (d / "file").stat().st_ino, (d / "dir").stat().st_ino
    renameat2(d / "file", d / "dir", RENAME_EXCHANGE)
    assert (d / "dir").stat().st_ino == file_ino
    assert (d / "dir").read_bytes() == b"file"
    assert (d / "file" / "inner").read_bytes() == b"inner"
    assert (d / "file").stat().st_ino == dir_ino
    # across directories: the directory's ".." follows it
    renameat2(d / "file", d / "x", RENAME_EXCHANGE)
    assert (d / "file").is_dir() and not (d / "file" / "inner").exists()
    assert (d / "x" / "inner").read_bytes() == b"inner"
    expect_errno(errno.ENOENT, renameat2, d / "dir", d / "nothing", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, d / "dir", d / "x", RENAME_EXCHANGE | RENAME_NOREPLACE)


# --- hard links and symlinks ------------------------------------------------------------


def test_hard_links_share_data_and_count(d: Path) -> None:
    (d / "a").write_bytes(b"first")
    os.mkdir(d / "sub")
    os.link(d / "a", d / "sub" / "b")
    sa, sb = (d / "a").stat(), (d / "sub" / "b").stat()
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    with open(d / "sub" / "b", "r+b") as f:
        f.write(b"FIRST and more")
    assert (d / "a").read_bytes() == b"FIRST and more"
    os.unlink(d / "a")
    assert (d / "sub" / "b").stat().st_nlink == 1
    assert (d / "sub" / "b").read_bytes() == b"FIRST and more"
    expect_errno(errno.EEXIST, os.link, d / "sub" / "b", d / "sub" / "b")
    expect_errno(errno.EPERM, os.link, d / "sub", d / "sub2")
    expect_errno(errno.ENOENT, os.link, d / "missing", d / "x")


def test_symlinks(d: Path) -> None:
    os.mkdir(d / "dir")
    (d / "dir" / "file").write_bytes(b"target data")
    os.symlink("dir/file", d / "rel")
    os.symlink("../dir", d / "dir" / "updown")
    os.symlink("nowhere/at/all", d / "dangling")
    os.symlink(str(d / "dir"), d / "absolute")
    assert os.readlink(d / "rel") == "dir/file"
    st = os.lstat(d / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("dir/file")
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (d / "rel").read_bytes() == b"target data"
    assert os.stat(d / "rel").st_ino == (d / "dir" / "file").stat().st_ino
    assert (d / "dir" / "updown" / "file").read_bytes() == b"target data"
    assert (d / "absolute" / "file").read_bytes() == b"target data"
    assert stat.S_ISLNK(os.lstat(d / "dangling").st_mode)
    expect_errno(errno.ENOENT, os.stat, d / "dangling")
    assert os.path.lexists(d / "dangling") and not os.path.exists(d / "dangling")
    expect_errno(errno.EINVAL, os.readlink, d / "dir" / "file")
    expect_errno(errno.EEXIST, os.symlink, "x", d / "rel")
    long_target = "x" * 4095
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    # O_NOFOLLOW refuses the last component
    expect_errno(errno.ELOOP, os.open, d / "rel", os.O_RDONLY | os.O_NOFOLLOW)
    os.unlink(d / "rel")
    assert (d / "dir" / "file").exists()


def test_symlink_loop_is_eloop(d: Path) -> None:
    os.symlink("b", d / "a")
    os.symlink("a", d / "b")
    expect_errno(errno.ELOOP, os.stat, d / "a")


# --- attributes ---------------------------------------------------------------------


def test_chmod(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"")
    for mode in (0o000, 0o644, 0o4755, 0o2711, 0o1777, 0o7777):
        os.chmod(path, mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert stat.S_ISREG(path.stat().st_mode)
    os.mkdir(d / "dir")
    os.chmod(d / "dir", 0o1750)
    assert (d / "dir").stat().st_mode == stat.S_IFDIR | 0o1750
    assert fresh_lstat(d / "dir").st_mode == stat.S_IFDIR | 0o1750
    assert fresh_lstat(path).st_mode == stat.S_IFREG | 0o7777


@requires_root
def test_chown_to_other_user_and_group(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    os.chown(path, 1234, 5678)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 42)
    st = fresh_lstat(path)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    before = st.st_ctime_ns
    time.sleep(0.01)
    os.chown(path, -1, -1)  # changes nothing but ctime (Linux)
    st = fresh_lstat(path)
    assert (st.st_uid, st.st_gid, st.st_ctime_ns >= before) == (1234, 42, True)
    os.symlink("f", d / "link")
    os.chown(d / "link", 77, 88, follow_symlinks=False)
    assert (os.lstat(d / "link").st_uid, os.lstat(d / "link").st_gid) == (77, 88)
    assert path.stat().st_uid == 1234


@requires_root
def test_chown_clears_setuid_and_setgid(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, 0o6755)
    os.chown(path, 1000, 1000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE(fresh_lstat(path).st_mode) == 0o755
    os.mkdir(d / "dir")
    os.chmod(d / "dir", 0o2775)
    os.chown(d / "dir", 1000, 1000)
    assert stat.S_IMODE((d / "dir").stat().st_mode) == 0o2775  # not for directories


@requires_root
def test_write_by_non_owner_clears_setuid(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o6777)
    out = run_as(NOBODY, d, """
        with open("f", "ab") as f:
            f.write(b"more")
        print("ok")
    """)
    assert out == "ok"
    assert path.read_bytes() == b"xmore"
    assert stat.S_IMODE(path.stat().st_mode) == 0o777
    assert stat.S_IMODE(fresh_lstat(path).st_mode) == 0o777


def test_utime_with_nanoseconds(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    atime, mtime = 1_000_000_123_456_789, 1_500_000_987_654_321
    os.utime(path, ns=(atime, mtime))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    drop_caches()
    assert (path.stat().st_atime_ns, path.stat().st_mtime_ns) == (atime, mtime)
    before = time.time_ns()
    os.utime(path)
    st = path.stat()
    assert before - 10**9 <= st.st_mtime_ns <= time.time_ns() + 10**9
    # a symlink's own times
    os.symlink("f", d / "link")
    os.utime(d / "link", ns=(5 * 10**18, 6 * 10**18), follow_symlinks=False)
    assert os.lstat(d / "link").st_mtime_ns == 6 * 10**18
    assert path.stat().st_mtime_ns != 6 * 10**18
    # pre-epoch times
    os.utime(path, ns=(-10**9, -2 * 10**9 + 5))
    assert path.stat().st_mtime_ns == -2 * 10**9 + 5


def _ctime_changes(path: Path, action, follow: bool = True) -> None:  # type: ignore[no-untyped-def]
    before = os.stat(path, follow_symlinks=follow)
    time.sleep(0.02)
    action()
    after = os.stat(path, follow_symlinks=follow)
    assert after.st_ctime_ns > before.st_ctime_ns, action
    drop_caches()
    assert os.stat(path, follow_symlinks=follow).st_ctime_ns >= after.st_ctime_ns, action


def test_ctime_changes_on_chmod_link_rename_write_xattr(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    _ctime_changes(path, lambda: os.chmod(path, 0o600))
    _ctime_changes(path, lambda: os.link(path, d / "g"))
    _ctime_changes(path, lambda: os.unlink(d / "g"))
    _ctime_changes(path, lambda: os.utime(path, ns=(1, 2)))
    _ctime_changes(path, lambda: os.setxattr(path, "user.a", b"1"))

    def write() -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    _ctime_changes(path, write)
    _ctime_changes(path, lambda: os.truncate(path, 1))
    before = path.stat().st_ctime_ns
    time.sleep(0.02)
    os.rename(path, d / "h")
    assert (d / "h").stat().st_ctime_ns > before
    assert fresh_lstat(d / "h").st_ctime_ns > before


def test_mtime_changes_on_write_and_truncate_and_directory_changes(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"x")
    old = 10**18
    os.utime(path, ns=(old, old))
    with open(path, "ab") as f:
        f.write(b"y")
    assert path.stat().st_mtime_ns > old + 10**17
    assert fresh_lstat(path).st_mtime_ns > old + 10**17
    os.utime(path, ns=(old, old))
    os.truncate(path, 100)
    assert path.stat().st_mtime_ns > old + 10**17
    assert fresh_lstat(path).st_mtime_ns > old + 10**17
    for size in (100, 0):  # O_TRUNC updates the times, even of an empty file
        os.utime(path, ns=(old, old))
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert path.stat().st_mtime_ns > old + 10**17, size
        assert path.stat().st_size == 0
        st = fresh_lstat(path)
        assert (st.st_size, st.st_mtime_ns > old + 10**17) == (0, True), size
    # times set on an open file with unwritten data stick (tar, cp -p)
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, pattern(9, 600_000))
    os.utime(fd, ns=(old, old))
    os.close(fd)
    st = fresh_lstat(path)
    assert (st.st_size, st.st_mtime_ns) == (600_000, old)
    # a directory's mtime changes when entries are added or removed
    for action in (
        lambda: (d / "new").write_bytes(b""),
        lambda: os.rename(d / "new", d / "new2"),
        lambda: os.unlink(d / "new2"),
        lambda: os.mkdir(d / "sub"),
        lambda: os.rmdir(d / "sub"),
    ):
        os.utime(d, ns=(old, old))
        action()
        assert d.stat().st_mtime_ns > old + 10**17, action
        assert fresh_lstat(d).st_mtime_ns > old + 10**17, action


def test_truncate_extends_with_zeros_and_shrinks(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"abcdef")
    os.truncate(path, 3)
    assert path.read_bytes() == b"abc"
    os.truncate(path, 10)
    assert path.read_bytes() == b"abc" + bytes(7)
    with open(path, "r+b") as f:
        f.truncate(2)
    assert path.read_bytes() == b"ab"
    assert fresh_lstat(path).st_size == 2
    drop_caches()
    assert path.read_bytes() == b"ab"
    expect_errno(errno.EISDIR, os.truncate, d, 0)
    expect_errno(errno.EINVAL, os.truncate, path, -1)


# --- xattrs ---------------------------------------------------------------------------


def test_xattrs_set_get_list_remove(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"")
    assert os.listxattr(path) == []
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.two", b"\x00binary\xff" * 100)
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.two") == b"\x00binary\xff" * 100
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(os.listxattr(path)) == ["user.empty", "user.one", "user.two"]
    os.setxattr(path, "user.one", b"changed")
    assert os.getxattr(path, "user.one") == b"changed"
    os.removexattr(path, "user.one")
    assert sorted(os.listxattr(path)) == ["user.empty", "user.two"]
    expect_errno(errno.ENODATA, os.getxattr, path, "user.one")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.one")
    # directories have them too
    os.setxattr(d, "user.dir", b"yes")
    assert os.getxattr(d, "user.dir") == b"yes"
    # a value of the maximum size
    big = pattern(3, 65536)
    os.setxattr(path, "user.big", big)
    assert os.getxattr(path, "user.big") == big
    drop_caches()
    assert os.getxattr(path, "user.two") == b"\x00binary\xff" * 100


def test_xattr_create_and_replace_flags(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"")
    expect_errno(errno.ENODATA, os.setxattr, path, "user.a", b"1", os.XATTR_REPLACE)
    os.setxattr(path, "user.a", b"1", os.XATTR_CREATE)
    expect_errno(errno.EEXIST, os.setxattr, path, "user.a", b"2", os.XATTR_CREATE)
    assert os.getxattr(path, "user.a") == b"1"
    os.setxattr(path, "user.a", b"3", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.a") == b"3"
    # both flags: each condition applies (as ext4 and tmpfs do)
    expect_errno(errno.EEXIST, os.setxattr, path, "user.a", b"4", os.XATTR_CREATE | os.XATTR_REPLACE)
    assert os.getxattr(path, "user.a") == b"3"


def test_xattr_size_errors(d: Path) -> None:
    path = d / "f"
    path.write_bytes(b"")
    os.setxattr(path, "user.v", b"0123456789")
    buf_too_small = ctypes.create_string_buffer(4)
    size = _libc.getxattr(os.fsencode(path), b"user.v", buf_too_small, 4)
    assert size == -1 and ctypes.get_errno() == errno.ERANGE
    assert _libc.getxattr(os.fsencode(path), b"user.v", None, 0) == 10
    expect_errno(errno.ERANGE, os.setxattr, path, "user." + "n" * 251, b"x")
    expect_errno(errno.E2BIG, os.setxattr, path, "user.huge", bytes(65537))


# --- whole filesystem -----------------------------------------------------------------


def test_statvfs_is_plausible(shared_volume: MountedVolume) -> None:
    st = os.statvfs(shared_volume.mountpoint)
    assert st.f_namemax == 255
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert 0 < st.f_bavail <= st.f_bfree <= st.f_blocks
    assert 0 < st.f_ffree <= st.f_files
    store = os.statvfs(shared_volume.stores[0])
    raw_total = store.f_blocks * store.f_frsize
    # all stores share one filesystem here: usable = raw * k / (k + m)
    total = st.f_blocks * st.f_frsize
    assert raw_total * 4 // 6 * 0.9 <= total <= raw_total * 1.01


def test_statvfs_free_space_drops_after_a_write(volume: MountedVolume) -> None:
    # Only checks the kernel reaches statfs and the numbers are in bytes.
    st = os.statvfs(volume.mountpoint)
    assert st.f_bfree * st.f_frsize > MiB


def test_mkfifo_and_mknod(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o644)
    st = os.stat(d / "fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    got: list[bytes] = []

    def reader() -> None:
        with open(d / "fifo", "rb") as f:
            got.append(f.read())

    thread = threading.Thread(target=reader)
    thread.start()
    with open(d / "fifo", "wb") as f:
        f.write(b"through the pipe")
    thread.join(10)
    assert got == [b"through the pipe"]
    if os.geteuid() == 0:
        os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.stat(d / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(d / "plain", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(d / "plain").st_mode)
    assert (d / "plain").read_bytes() == b""


def test_fsync_and_fdatasync_on_files_and_directories(d: Path) -> None:
    path = d / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, pattern(4, 700_000))
        os.fsync(fd)
        os.write(fd, b"more")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
        os.fdatasync(dfd)
    finally:
        os.close(dfd)
    rfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(rfd)  # allowed on a read-only descriptor
    finally:
        os.close(rfd)
    assert path.read_bytes() == pattern(4, 700_000) + b"more"


def test_mmap_write_msync_survives_remount(volume: MountedVolume) -> None:
    path = volume.mountpoint / "mapped"
    size = 3 * MiB + 123
    path.write_bytes(bytes(size))
    small = volume.mountpoint / "small-mapped"
    small.write_bytes(b"." * 100)
    expected = bytearray(size)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        for offset in (0, 4095, MiB - 3, 2 * MiB + 17, size - 10):
            piece = pattern(offset, 10)
            mm[offset : offset + 10] = piece
            expected[offset : offset + 10] = piece
        mm.flush()
    with open(small, "r+b") as f, mmap.mmap(f.fileno(), 100) as mm:
        mm[10:15] = b"HELLO"
        mm.flush()
    volume.remount()
    drop_caches()
    assert path.read_bytes() == bytes(expected)
    assert small.read_bytes() == b"." * 10 + b"HELLO" + b"." * 85
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        assert mm[2 * MiB + 17 : 2 * MiB + 27] == pattern(2 * MiB + 17, 10)
        assert mm[:] == bytes(expected)


def test_mmap_shared_sees_write(d: Path) -> None:
    path = d / "f"
    path.write_bytes(bytes(8192))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
        os.pwrite(f.fileno(), b"written", 5000)
        assert mm[5000:5007] == b"written"


def test_unix_socket_bind(d: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(d / "sock"))
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(d / "sock"))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    os.unlink(d / "sock")


def test_posix_fallocate_and_flock(d: Path) -> None:
    import fcntl

    path = d / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 3 * MiB)  # glibc writes zeros when unsupported
        assert os.fstat(fd).st_size == 3 * MiB
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert fresh_lstat(path).st_size == 3 * MiB
    assert path.read_bytes() == bytes(3 * MiB)


def test_o_direct_write_and_read(d: Path) -> None:
    path = d / "direct"
    block = mmap.mmap(-1, 1 << 16)  # page-aligned buffer
    block.write(pattern(10, 1 << 16))
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as exc:
        pytest.fail(f"O_DIRECT open failed: {exc}")
    try:
        assert os.pwrite(fd, block, 0) == 1 << 16
        assert os.pwrite(fd, block, 1 << 16) == 1 << 16
        back = mmap.mmap(-1, 1 << 17)
        assert os.preadv(fd, [back], 0) == 1 << 17
        assert back[:] == pattern(10, 1 << 16) * 2
    finally:
        os.close(fd)
    drop_caches()
    assert path.read_bytes() == pattern(10, 1 << 16) * 2


def test_utimensat_omit_and_now(d: Path) -> None:
    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    utime_now, utime_omit = (1 << 30) - 1, (1 << 30) - 2
    path = d / "f"
    path.write_bytes(b"x")
    os.utime(path, ns=(10**18, 2 * 10**18))
    times = (Timespec * 2)(Timespec(0, utime_omit), Timespec(123, 456))
    assert _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) == 0
    st = fresh_lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 123_000_000_456)
    before = time.time_ns()
    times = (Timespec * 2)(Timespec(0, utime_now), Timespec(0, utime_omit))
    assert _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) == 0
    st = fresh_lstat(path)
    assert st.st_mtime_ns == 123_000_000_456
    assert before - 10**9 <= st.st_atime_ns <= time.time_ns() + 10**9


def test_sqlite_database_in_wal_mode(d: Path) -> None:
    import sqlite3

    db = sqlite3.connect(d / "test.db")
    try:
        assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        with db:
            db.executemany("INSERT INTO t VALUES (?, ?)", ((i, pattern(i, 300)) for i in range(2000)))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with db:
            db.execute("DELETE FROM t WHERE k % 2 = 0")
    finally:
        db.close()
    drop_caches()
    db = sqlite3.connect(d / "test.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
        assert db.execute("SELECT v FROM t WHERE k = 999").fetchone()[0] == pattern(999, 300)
    finally:
        db.close()


def test_tar_round_trip(d: Path) -> None:
    src = d / "src"
    for i in range(30):
        sub = src / f"d{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(pattern(i, i * 997))
        os.utime(sub / f"f{i}", ns=(10**18, 10**18 + i * 10**9))  # tar: whole seconds
    os.symlink("d0/f0", src / "link")
    os.link(src / "d1" / "f1", src / "hard")
    archive = d / "a.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src), "."], check=True, timeout=120)
    (d / "out").mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(d / "out")], check=True, timeout=120)
    drop_caches()
    for i in range(30):
        out = d / "out" / f"d{i % 5}" / f"f{i}"
        assert out.read_bytes() == pattern(i, i * 997)
        assert out.stat().st_mtime_ns == 10**18 + i * 10**9
    assert os.readlink(d / "out" / "link") == "d0/f0"
    assert (d / "out" / "hard").stat().st_ino == (d / "out" / "d1" / "f1").stat().st_ino


@pytest.mark.skipif(not shutil.which("git"), reason="no git")
def test_git_init_commit_and_status(d: Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", HOME=str(d))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=d / "repo", env=env,
                              check=True, capture_output=True, text=True, timeout=120).stdout

    (d / "repo").mkdir()
    git("init", "-q")
    for i in range(20):
        (d / "repo" / f"file{i}.txt").write_text(f"content {i}\n" * i)
    git("add", ".")
    git("commit", "-q", "-m", "first")
    (d / "repo" / "file3.txt").write_text("changed\n")
    os.rename(d / "repo" / "file4.txt", d / "repo" / "moved.txt")
    git("commit", "-q", "-am", "second")
    git("gc", "-q")
    assert git("status", "--porcelain").strip() == "?? moved.txt"
    git("fsck", "--strict")
    assert len(git("log", "--oneline").splitlines()) == 2


# --- names ----------------------------------------------------------------------------


def test_unusual_names(d: Path) -> None:
    base = os.fsencode(d)
    names = [b"\xff\xfe not utf-8 \x80", b"new\nline", b"tab\there", b" space ", b"x" * 255,
             "ünïcödé ✓".encode(), b"-dash", b"...", b"a:b*c?"]
    for i, name in enumerate(names):
        with open(os.path.join(base, name), "wb") as f:
            f.write(str(i).encode())
    assert sorted(os.listdir(base)) == sorted(names)
    for i, name in enumerate(names):
        with open(os.path.join(base, name), "rb") as f:
            assert f.read() == str(i).encode()
    os.mkdir(os.path.join(base, b"d" * 255))
    os.symlink(b"t", os.path.join(base, b"s" * 255))
    os.rename(os.path.join(base, names[0]), os.path.join(base, b"r" * 255))
    assert os.path.exists(os.path.join(base, b"r" * 255))


def test_name_of_256_bytes_is_enametoolong(d: Path) -> None:
    long = os.path.join(os.fsencode(d), b"y" * 256)
    (d / "f").write_bytes(b"")
    expect_errno(errno.ENAMETOOLONG, os.open, long, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENAMETOOLONG, os.stat, long)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, long)
    expect_errno(errno.ENAMETOOLONG, os.symlink, b"t", long)
    expect_errno(errno.ENAMETOOLONG, os.link, d / "f", long)
    expect_errno(errno.ENAMETOOLONG, os.rename, d / "f", long)
    expect_errno(errno.ENAMETOOLONG, os.mkfifo, long)
    assert os.listdir(d) == ["f"]


# --- readdir ----------------------------------------------------------------------------


def test_readdir_of_5000_entries_returns_each_once(d: Path) -> None:
    names = {f"entry-{i:05d}" for i in range(5000)}
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(d)
    assert len(listed) == 5000
    assert set(listed) == names
    with os.scandir(d) as it:
        kinds = {e.name: e.is_file(follow_symlinks=False) for e in it}
    assert len(kinds) == 5000 and all(kinds.values())


def test_readdir_while_deleting_returns_each_once(d: Path) -> None:
    names = {f"e{i}" for i in range(3000)}
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    seen: list[str] = []
    with os.scandir(d) as it:  # deletes what it has read, like rm -rf
        for entry in it:
            seen.append(entry.name)
            os.unlink(entry.path)
    assert len(seen) == len(set(seen)), "an entry came back twice"
    assert set(seen) == names
    assert os.listdir(d) == []


def test_rm_rf_of_a_large_tree(d: Path) -> None:
    for i in range(20):
        sub = d / "tree" / f"dir{i}"
        sub.mkdir(parents=True)
        for j in range(100):
            (sub / f"file{j}").write_bytes(b"x" * j)
        os.symlink("file1", sub / "link")
    subprocess.run(["rm", "-rf", str(d / "tree")], check=True, timeout=120)
    assert os.listdir(d) == []
    assert d.stat().st_nlink == 2


def test_readdir_dot_and_dotdot_inodes(d: Path) -> None:
    os.mkdir(d / "sub")
    out = subprocess.run(["ls", "-ai", str(d / "sub")], capture_output=True, text=True, check=True)
    inos = {line.split()[1]: int(line.split()[0]) for line in out.stdout.split("\n") if line.strip()}
    assert inos["."] == (d / "sub").stat().st_ino
    assert inos[".."] == d.stat().st_ino


# --- permissions (kernel checks, our modes) -----------------------------------------


@requires_root
def test_access_for_non_root_user(d: Path) -> None:
    os.chmod(d, 0o755)
    (d / "secret").write_bytes(b"root only")
    os.chmod(d / "secret", 0o600)
    (d / "public").write_bytes(b"everyone")
    os.chmod(d / "public", 0o644)
    (d / "mine").write_bytes(b"nobody's")
    os.chown(d / "mine", NOBODY, NOBODY)
    os.chmod(d / "mine", 0o600)
    os.mkdir(d / "closed", 0o700)
    out = run_as(NOBODY, d, """
        print(os.access("secret", os.R_OK), os.access("secret", os.W_OK),
              os.access("public", os.R_OK), os.access("public", os.W_OK),
              os.access("mine", os.R_OK | os.W_OK), os.access("public", os.X_OK))
        print(attempt(open, "secret", "rb"))
        print(attempt(open, "public", "ab"))
        print(attempt(os.listdir, "closed"))
        print(attempt(os.open, "newfile", os.O_CREAT | os.O_WRONLY, 0o644))
        print(attempt(os.chmod, "public", 0o777))
        print(attempt(os.chown, "mine", 0, 0))
        print(open("public", "rb").read().decode(), open("mine", "rb").read().decode())
    """)
    assert out.splitlines() == [
        "False False True False True False",
        "EACCES",
        "EACCES",
        "EACCES",
        "EACCES",
        "EPERM",
        "EPERM",
        "everyone nobody's",
    ]


@requires_root
def test_sticky_directory_protects_other_users_files(d: Path) -> None:
    os.chmod(d, 0o755)
    os.mkdir(d / "tmp")
    os.chmod(d / "tmp", 0o1777)
    (d / "tmp" / "theirs").write_bytes(b"x")
    os.chown(d / "tmp" / "theirs", 1000, 1000)
    os.chmod(d / "tmp" / "theirs", 0o666)
    out = run_as(NOBODY, d / "tmp", """
        print(attempt(os.unlink, "theirs"))
        print(attempt(os.rename, "theirs", "stolen"))
        open("own", "wb").close()
        print(attempt(os.unlink, "own"))
    """)
    assert out.splitlines() == ["EPERM", "EPERM", "ok"]
    assert (d / "tmp" / "theirs").exists()
    assert not (d / "tmp" / "own").exists()


@requires_root
def test_new_files_belong_to_the_creating_user_and_setgid_directories(d: Path) -> None:
    os.chmod(d, 0o777)
    os.mkdir(d / "shared")
    os.chown(d / "shared", 0, 4242)
    os.chmod(d / "shared", 0o2777)
    run_as(NOBODY, d, """
        open("by-nobody", "wb").close()
        open("shared/in-setgid", "wb").close()
        import os; os.mkdir("shared/subdir")
    """)
    st = (d / "by-nobody").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    st = (d / "shared" / "in-setgid").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, 4242)
    st = (d / "shared" / "subdir").stat()
    assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID


# --- blocks and tools -----------------------------------------------------------------


def test_st_blocks_plausible(d: Path) -> None:
    (d / "empty").write_bytes(b"")
    assert (d / "empty").stat().st_blocks == 0
    (d / "one").write_bytes(b"x")
    assert 1 <= (d / "one").stat().st_blocks <= 8 * 2
    (d / "big").write_bytes(pattern(6, 2 * MiB + 1))
    st = (d / "big").stat()
    assert st.st_size <= st.st_blocks * 512 < st.st_size + 2 * 128 * 1024
    assert st.st_blksize >= 4096


def test_ls_find_du(d: Path) -> None:
    os.makedirs(d / "a" / "b")
    (d / "a" / "file").write_bytes(pattern(7, 300_000))
    (d / "a" / "b" / "small").write_bytes(b"tiny")
    os.symlink("file", d / "a" / "link")
    ls = subprocess.run(["ls", "-la", str(d / "a")], capture_output=True, text=True, check=True)
    lines = ls.stdout.splitlines()
    assert lines[0].startswith("total")
    assert any(line.endswith(" link -> file") and line.startswith("l") for line in lines)
    assert any(line.endswith(" file") and " 300000 " in line for line in lines)
    assert any(line.endswith(" .") for line in lines) and any(line.endswith(" ..") for line in lines)
    find = subprocess.run(["find", str(d / "a")], capture_output=True, text=True, check=True)
    expected = {str(d / "a")} | {str(d / "a" / p) for p in ("b", "file", "link", "b/small")}
    assert set(find.stdout.splitlines()) == expected
    find = subprocess.run(["find", str(d / "a"), "-type", "f", "-size", "+100k"],
                          capture_output=True, text=True, check=True)
    assert find.stdout.splitlines() == [str(d / "a" / "file")]
    du = subprocess.run(["du", "-sk", str(d / "a")], capture_output=True, text=True, check=True)
    kib = int(du.stdout.split()[0])
    assert 290 <= kib <= 600, du.stdout
    du = subprocess.run(["du", "-sb", str(d / "a")], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) >= 300_004


def _tree_snapshot(root: Path) -> dict[str, tuple]:
    """Everything `cp -a` promises to preserve, by relative path."""
    snap: dict[str, tuple] = {}
    inode_groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            link_group = None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link_group = inode_groups.setdefault(st.st_ino, rel)
            xattrs = (
                {} if stat.S_ISLNK(st.st_mode)
                else {n: os.getxattr(path, n) for n in os.listxattr(path)}
            )
            mtime = st.st_mtime_ns
            snap[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, mtime,
                         content, link_group, xattrs)
    return snap


@requires_root
def test_cp_a_preserves_modes_times_links(d: Path) -> None:
    src = d / "src"
    os.makedirs(src / "dir" / "sub")
    (src / "plain").write_bytes(b"plain")
    (src / "big").write_bytes(pattern(8, 3 * MiB + 5))
    (src / "dir" / "private").write_bytes(b"secret")
    os.chmod(src / "dir" / "private", 0o600)
    (src / "dir" / "script").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "dir" / "script", 0o755)
    os.link(src / "plain", src / "dir" / "hardlink")
    os.symlink("../plain", src / "dir" / "rel-link")
    os.symlink("/nonexistent/absolute", src / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    (src / "owned").write_bytes(b"")
    os.chown(src / "owned", 1234, 4321)
    os.setxattr(src / "plain", "user.note", b"kept")
    os.chmod(src / "dir" / "sub", 0o2750)
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(src), reverse=True)):
        for name in filenames + dirnames:
            os.utime(Path(dirpath) / name, ns=(10**18 + i, 10**18 + 1000 * i + len(name)),
                     follow_symlinks=False)
    os.utime(src, ns=(10**18, 10**18))
    subprocess.run(["cp", "-a", str(src), str(d / "dst")], check=True, timeout=120,
                   capture_output=True)
    a, b = _tree_snapshot(src), _tree_snapshot(d / "dst")
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], rel
    assert (d / "dst").stat().st_mtime_ns == 10**18
    assert (d / "dst" / "dir" / "hardlink").stat().st_ino == (d / "dst" / "plain").stat().st_ino
    assert (d / "dst" / "plain").stat().st_ino != (src / "plain").stat().st_ino
