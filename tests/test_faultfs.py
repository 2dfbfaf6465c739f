"""The fault-injection tool itself (scripts/faultfs.py): each mode does what
it says, mode changes reach open files, and cleanup leaves nothing behind."""

from __future__ import annotations

import errno
import importlib.util
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.mounting import FUSE_MISSING_REASON, REPO_ROOT, is_mounted

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""),
]


def load_faultfs() -> ModuleType:
    """scripts/faultfs.py as a module (scripts/ is not a package)."""
    if "faultfs" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "faultfs", REPO_ROOT / "scripts" / "faultfs.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["faultfs"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["faultfs"]


faultfs = load_faultfs()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with faultfs.FaultyDir(tmp_path_factory.mktemp("faultfs")) as d:
        yield d


@pytest.fixture
def fd(faulty) -> Iterator:
    """`faulty`, reset to ok around each test, with a file `data` (64 KiB)."""
    faulty.set("ok")
    (faulty.path / "data").write_bytes(b"x" * 65536)
    try:
        yield faulty
    finally:
        faulty.set("ok")


def _errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def test_mode_parsing() -> None:
    assert str(faultfs.Mode.parse(" slow:250\n")) == "slow:250"
    assert faultfs.Mode.parse("").name == "ok"
    with pytest.raises(ValueError):
        faultfs.Mode.parse("slow:x")
    with pytest.raises(ValueError):
        faultfs.Mode.parse("explode")
    glob = faultfs.Mode.parse("HANG@frags/*/AB*.1\n")
    assert (glob.name, glob.glob, str(glob)) == ("hang", "frags/*/AB*.1", "hang@frags/*/AB*.1")
    assert str(faultfs.Mode.parse("slow:5@*.2")) == "slow:5@*.2"
    assert glob.applies_to(["frags/x/y/AB12.1"]) and not glob.applies_to(["frags/x/y/ab12.1"])
    assert not glob.applies_to([]) and faultfs.Mode.parse("hang").applies_to([])
    for bad in ("ok@x", "hang@", "@x"):
        with pytest.raises(ValueError):
            faultfs.Mode.parse(bad)


def test_ok_is_a_passthrough_good_enough_for_a_store_and_sqlite(fd) -> None:
    root = fd.path
    (root / "d" / "e").mkdir(parents=True)
    f = os.open(root / "d" / "e" / "frag", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    assert os.pwrite(f, b"abcdef", 0) == 6
    os.fsync(f)
    os.close(f)
    assert (
        _errno_of(os.open, root / "d" / "e" / "frag", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        == errno.EEXIST
    )
    os.rename(root / "d" / "e" / "frag", root / "d" / "frag2")
    os.truncate(root / "d" / "frag2", 3)
    os.chmod(root / "d" / "frag2", 0o644)
    assert (root / "d" / "frag2").read_bytes() == b"abc"
    assert (fd.source / "d" / "frag2").read_bytes() == b"abc"  # really passed through
    assert sorted(os.listdir(root / "d")) == ["e", "frag2"]
    dirfd = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dirfd)
    os.close(dirfd)
    os.unlink(root / "d" / "frag2")
    assert os.statvfs(root).f_blocks > 0
    # What a metadata replica needs: WAL (mmap'ed -shm), fsync, truncate.
    db = sqlite3.connect(root / "meta.sqlite")
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x)")
    with db:
        db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    db = sqlite3.connect(root / "meta.sqlite")
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
    db.close()


def test_eio_fails_everything_even_on_open_files_and_cached_pages(fd) -> None:
    path = fd.path / "data"
    f = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(f, 4096, 0) == b"x" * 4096  # now in the page cache
        fd.set("eio")
        assert _errno_of(os.pread, f, 4096, 0) == errno.EIO
        assert _errno_of(os.stat, path) == errno.EIO
        assert _errno_of(os.listdir, fd.path / ".") == errno.EIO
        assert _errno_of(os.statvfs, fd.path) == errno.EIO
        fd.set("ok")
        assert os.pread(f, 4096, 0) == b"x" * 4096
    finally:
        os.close(f)


def test_enospc_refuses_new_space_but_reads(fd) -> None:
    path = fd.path / "data"
    f = os.open(path, os.O_RDWR)
    try:
        fd.set("enospc")
        assert os.pread(f, 10, 0) == b"x" * 10
        assert path.read_bytes() == b"x" * 65536
        assert _errno_of(os.pwrite, f, b"y", 0) == errno.ENOSPC
        assert _errno_of(os.open, fd.path / "new", os.O_CREAT | os.O_WRONLY) == errno.ENOSPC
        assert _errno_of(os.mkdir, fd.path / "newdir") == errno.ENOSPC
        st = os.statvfs(fd.path)
        assert st.f_bavail == 0 and st.f_bfree == 0
        os.unlink(path)  # freeing space works
        fd.set("ok")
        assert os.pwrite(f, b"y", 0) == 1
    finally:
        os.close(f)


def test_gone_looks_like_a_vanished_directory(fd) -> None:
    path = fd.path / "data"
    f = os.open(path, os.O_RDONLY)
    try:
        fd.set("gone")
        assert _errno_of(os.stat, path) == errno.ENOENT
        assert _errno_of(os.pread, f, 10, 0) == errno.ENOENT
        assert _errno_of(os.statvfs, fd.path) == errno.ENOENT
        fd.set("ok")
        assert os.stat(path).st_size == 65536
    finally:
        os.close(f)


def test_slow_delays_each_operation(fd) -> None:
    f = os.open(fd.path / "data", os.O_RDONLY)
    try:
        fd.set("slow:200")
        start = time.monotonic()
        assert os.pread(f, 10, 0) == b"x" * 10
        assert 0.2 <= time.monotonic() - start < 2.0
        fd.set("ok")
        start = time.monotonic()
        os.pread(f, 10, 100)
        assert time.monotonic() - start < 0.15
    finally:
        os.close(f)


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_hang_blocks_until_the_mode_changes(fd) -> None:
    f = os.open(fd.path / "data", os.O_RDONLY)
    try:
        fd.set("hang")
        reader, read = _in_thread(os.pread, f, 10, 0)
        stat, stated = _in_thread(os.stat, fd.path / "data")
        time.sleep(0.3)
        assert reader.is_alive() and stat.is_alive()
        fd.set("eio")  # the control file is still read while everything hangs
        reader.join(5)
        stat.join(5)
        assert isinstance(read[0], OSError) and read[0].errno == errno.EIO
        assert isinstance(stated[0], OSError) and stated[0].errno == errno.EIO
        fd.set("hang")
        reader, read = _in_thread(os.pread, f, 10, 0)
        time.sleep(0.2)
        assert reader.is_alive()
        fd.set("ok")
        reader.join(5)
        assert read == [b"x" * 10]
    finally:
        fd.set("ok")
        os.close(f)


def test_a_mode_at_a_glob_affects_only_the_paths_it_matches(fd) -> None:
    (fd.path / "sub" / "deep").mkdir(parents=True, exist_ok=True)
    for name in ("sub/deep/c1.1", "sub/deep/c1.2", "sub/c2.1"):
        (fd.path / name).write_bytes(b"y" * 100)
    open_file = os.open(fd.path / "sub" / "deep" / "c1.1", os.O_RDONLY)
    try:
        assert os.pread(open_file, 10, 0) == b"y" * 10  # in the page cache
        fd.set("eio@sub/*/c1.*")
        assert _errno_of(os.pread, open_file, 10, 0) == errno.EIO  # an open file too
        assert _errno_of(os.stat, fd.path / "sub" / "deep" / "c1.2") == errno.EIO
        assert _errno_of((fd.path / "sub" / "deep" / "c1.9").write_bytes, b"z") == errno.EIO
        assert (fd.path / "sub" / "c2.1").read_bytes() == b"y" * 100  # not matched
        assert (fd.path / "data").stat().st_size == 65536
        assert sorted(os.listdir(fd.path / "sub" / "deep")) == ["c1.1", "c1.2"]
        assert os.statvfs(fd.path).f_blocks > 0
        fd.set("hang@*.2")
        reader, read = _in_thread(Path.read_bytes, fd.path / "sub" / "deep" / "c1.2")
        time.sleep(0.3)
        assert reader.is_alive()  # hangs...
        assert os.pread(open_file, 10, 0) == b"y" * 10  # ...while the rest answers
        assert (fd.path / "sub" / "c2.1").read_bytes() == b"y" * 100
        fd.set("ok")
        reader.join(5)
        assert read == [b"y" * 100]
    finally:
        os.close(open_file)
        fd.set("ok")


def test_close_releases_a_hang_and_leaves_nothing_behind(tmp_path: Path) -> None:
    d = faultfs.FaultyDir(tmp_path / "f")
    d.start()
    try:
        (d.path / "a").write_bytes(b"a")
        d.set("hang")
        reader, read = _in_thread(Path.read_bytes, d.path / "a")
        time.sleep(0.2)
        assert reader.is_alive()
    finally:
        d.close()
    reader.join(5)
    assert not reader.is_alive()
    assert not is_mounted(d.path)
    assert d.proc is None
    assert (d.source / "a").read_bytes() == b"a"
    d.close()  # idempotent
