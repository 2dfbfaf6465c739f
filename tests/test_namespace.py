"""Tests for ecfs.data.namespace (and the SQL of ecfs.storage.metadb.inodes beneath it).

Every test that uses the `env` fixture is checked at teardown by two oracles:
* `check_invariants`: nlink equals what the directory entries imply, every
  entry points to an existing inode in an existing directory, the tree has
  no cycle, symlinks have targets, and clean cached attributes equal the
  database rows;
* `check_replicated`: the transactions passed to `db.on_commit`, replayed
  with plain sqlite3 on a copy of the freshly created database, give
  identical table contents (the writes are deterministic and all shipped).
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core.errors import FsError
from ecfs.core.model import Transaction
from ecfs.data.namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Inode,
    Namespace,
)
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import ROOT_INODE, create_database

ROOT = ROOT_INODE
REG = stat.S_IFREG


class Clock:
    """A fake clock: every call returns a strictly larger time."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


@dataclass
class Env:
    path: Path
    initial: Path
    db: Database
    ns: Namespace
    clock: Clock
    shipped: list[Transaction] = field(default_factory=list)
    reopened: list[Database] = field(default_factory=list)

    def reopen(self) -> Namespace:
        """A new Database + Namespace on the same file (sees only what was
        written). Read from it only: its writes would not be shipped."""
        db = Database(self.path, exclusive=False)
        self.reopened.append(db)
        return Namespace(db, self.clock)


def make_env(directory: Path, cache_size: int = 200_000) -> Env:
    path = directory / "m.db"
    create_database(path, {"uuid": "x", "k": 4, "m": 2}, ["s0"], root_uid=0, root_gid=0, now_ns=1)
    initial = directory / "initial.db"
    shutil.copyfile(path, initial)
    db = Database(path, exclusive=False)  # reopen() reads the file beside it
    clock = Clock()
    env = Env(path, initial, db, Namespace(db, clock, cache_size=cache_size), clock)
    db.on_commit = env.shipped.append
    return env


def finish_env(env: Env) -> None:
    check_invariants(env.db, env.ns)
    check_replicated(env)
    for db in env.reopened:
        db.close()
    env.db.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = make_env(tmp_path)
    yield environment
    finish_env(environment)


@pytest.fixture
def ns(env: Env) -> Namespace:
    return env.ns


# -- oracles -------------------------------------------------------------------

TABLE_DUMPS = {
    "volume": "SELECT * FROM volume ORDER BY key",
    "counters": "SELECT * FROM counters ORDER BY name",
    "replica_state": "SELECT * FROM replica_state",
    "stores": "SELECT * FROM stores ORDER BY idx",
    "inodes": "SELECT * FROM inodes ORDER BY id",
    "dentries": "SELECT rowid, * FROM dentries ORDER BY rowid",
    "symlinks": "SELECT * FROM symlinks ORDER BY inode",
    "xattrs": "SELECT * FROM xattrs ORDER BY inode, name",
    "chunks": "SELECT * FROM chunks ORDER BY inode, idx",
    "repair_queue": "SELECT * FROM repair_queue ORDER BY chunk_id",
}


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {table: conn.execute(sql).fetchall() for table, sql in TABLE_DUMPS.items()}


def check_replicated(env: Env) -> None:
    generations = [t.generation for t in env.shipped]
    assert generations == list(range(1, len(generations) + 1))
    replica_path = env.initial.with_name("replica.db")
    shutil.copyfile(env.initial, replica_path)
    replica = sqlite3.connect(replica_path, isolation_level=None)
    try:
        for transaction in env.shipped:
            replica.execute("BEGIN")
            for sql, params in transaction.statements:
                replica.execute(sql, params)
            replica.execute("COMMIT")
        # Through the mount's own connection: it holds the working copy locked.
        working = {table: env.db.query(sql) for table, sql in TABLE_DUMPS.items()}
        assert dump(replica) == working
    finally:
        replica.close()


def check_invariants(db: Database, ns: Namespace) -> None:
    inodes = {r[0]: r for r in db.query("SELECT id, mode, nlink, size FROM inodes")}
    entries = db.query("SELECT parent, name, inode FROM dentries")
    links: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for parent, name, ino in entries:
        assert parent in inodes and stat.S_ISDIR(inodes[parent][1]), (parent, name)
        assert ino in inodes, (parent, name, ino)
        assert isinstance(name, bytes) and name not in (b".", b"..") and b"/" not in name
        links[ino] = links.get(ino, 0) + 1
        if stat.S_ISDIR(inodes[ino][1]):
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for ino, mode, nlink, size in inodes.values():
        if nlink == 0:
            assert links.get(ino, 0) == 0, ino
        elif stat.S_ISDIR(mode):
            assert links.get(ino, 0) == (0 if ino == ROOT else 1), ino
            assert nlink == 2 + subdirs.get(ino, 0), ino
        else:
            assert nlink == links.get(ino, 0), ino
        if stat.S_ISLNK(mode):
            target = db.query_value("SELECT target FROM symlinks WHERE inode = ?", (ino,))
            assert target is not None and len(target) == size
    # No cycles: every directory with an entry reaches the root.
    parent_of = {ino: parent for parent, _, ino in entries if stat.S_ISDIR(inodes[ino][1])}
    for ino in parent_of:
        seen = set()
        while ino != ROOT:
            assert ino not in seen, "cycle"
            seen.add(ino)
            ino = parent_of[ino]
    # Clean cached attributes equal the database.
    dirty = set(ns.dirty_inodes())
    fresh = Namespace(db)
    for ino in list(ns._cache):  # noqa: SLF001 - the oracle may look inside
        if ino not in dirty:
            assert ns._cache[ino] == fresh.get(ino)  # noqa: SLF001


def errno_of(excinfo: pytest.ExceptionInfo[FsError]) -> int:
    return excinfo.value.errno


def expect_errno(code: int, func: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(FsError) as excinfo:
        func(*args, **kwargs)  # type: ignore[operator]
    assert excinfo.value.errno == code, (
        errno.errorcode[excinfo.value.errno],
        errno.errorcode[code],
    )


def names(ns: Namespace, ino: int) -> list[bytes]:
    return [name for name, _, _ in ns.readdir(ino, 0)]


# -- get / lookup / names ------------------------------------------------------


def test_root_attributes(ns: Namespace) -> None:
    root = ns.get(ROOT)
    assert root.is_dir and not root.is_reg and not root.is_symlink
    assert root.mode == stat.S_IFDIR | 0o755 and root.nlink == 2
    assert (root.uid, root.gid) == (0, 0)


def test_get_missing_is_enoent(ns: Namespace) -> None:
    expect_errno(errno.ENOENT, ns.get, 999)


def test_lookup(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = ns.create(d.id, b"f", REG | 0o644, 0, 0)
    assert ns.lookup(ROOT, b"d") is d
    assert ns.lookup(d.id, b"f") is f
    assert ns.lookup(d.id, b".") is d
    assert ns.lookup(d.id, b"..").id == ROOT
    assert ns.lookup(ROOT, b"..").id == ROOT
    expect_errno(errno.ENOENT, ns.lookup, d.id, b"nope")
    expect_errno(errno.ENOTDIR, ns.lookup, f.id, b"x")
    expect_errno(errno.ENOENT, ns.lookup, 999, b"x")


@pytest.mark.parametrize(
    "name", [b"\xff\xfe not utf-8", b"new\nline", b"x" * 255, b" ", b"-", b"\x01", b"...", b"\\"]
)
def test_weird_names_work(env: Env, name: bytes) -> None:
    ns = env.ns
    f = ns.create(ROOT, name, REG | 0o644, 0, 0)
    assert ns.lookup(ROOT, name) is f
    assert names(ns, ROOT) == [b".", b"..", name]
    assert env.reopen().lookup(ROOT, name).id == f.id
    ns.rename(ROOT, name, ROOT, name[:-1][::-1] + b"2")
    ns.unlink(ROOT, name[:-1][::-1] + b"2")


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (b"x" * 256, errno.ENAMETOOLONG),
        (b"", errno.EINVAL),
        (b"a/b", errno.EINVAL),
        (b"/", errno.EINVAL),
        (b"a\0b", errno.EINVAL),
    ],
)
def test_bad_names(ns: Namespace, name: bytes, code: int) -> None:
    ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(code, ns.lookup, ROOT, name)
    expect_errno(code, ns.create, ROOT, name, REG | 0o644, 0, 0)
    expect_errno(code, ns.mkdir, ROOT, name, 0o755, 0, 0)
    expect_errno(code, ns.symlink, ROOT, name, b"t", 0, 0)
    expect_errno(code, ns.link, 2, ROOT, name)
    expect_errno(code, ns.unlink, ROOT, name)
    expect_errno(code, ns.rmdir, ROOT, name)
    expect_errno(code, ns.rename, ROOT, b"f", ROOT, name)
    expect_errno(code, ns.rename, ROOT, name, ROOT, b"g")


def test_dot_names_cannot_be_created(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    for name in (b".", b".."):
        expect_errno(errno.EEXIST, ns.create, ROOT, name, REG | 0o644, 0, 0)
        expect_errno(errno.EEXIST, ns.mkdir, ROOT, name, 0o755, 0, 0)
        expect_errno(errno.EEXIST, ns.symlink, ROOT, name, b"t", 0, 0)
        expect_errno(errno.EEXIST, ns.link, f.id, ROOT, name)
        expect_errno(errno.EISDIR, ns.unlink, ROOT, name)
        expect_errno(errno.EINVAL, ns.rename, ROOT, b"f", ROOT, name)
        expect_errno(errno.EINVAL, ns.rename, ROOT, name, ROOT, b"g")
    expect_errno(errno.EINVAL, ns.rmdir, ROOT, b".")
    expect_errno(errno.ENOTEMPTY, ns.rmdir, ROOT, b"..")


# -- create / mkdir / symlink ----------------------------------------------------


def test_create_regular_file(env: Env) -> None:
    ns = env.ns
    before = env.clock.now
    f = ns.create(ROOT, b"f", REG | 0o640, 1000, 100)
    assert f.is_reg and f.mode == REG | 0o640 and (f.uid, f.gid) == (1000, 100)
    assert f.nlink == 1 and f.size == 0 and f.rdev == 0 and f.id != ROOT
    assert f.atime_ns == f.mtime_ns == f.ctime_ns > before
    root = ns.get(ROOT)
    assert root.mtime_ns == root.ctime_ns == f.mtime_ns
    assert root.nlink == 2
    assert env.reopen().get(f.id) == f


def test_create_without_type_is_regular(ns: Namespace) -> None:
    assert ns.create(ROOT, b"f", 0o600, 0, 0).mode == REG | 0o600


@pytest.mark.parametrize(
    ("kind", "rdev", "kept"),
    [
        (stat.S_IFIFO, 5, 0),
        (stat.S_IFSOCK, 5, 0),
        (stat.S_IFCHR, 0x0103, 0x0103),
        (stat.S_IFBLK, 0x0801, 0x0801),
        (REG, 7, 0),
    ],
)
def test_create_special_files(ns: Namespace, kind: int, rdev: int, kept: int) -> None:
    node = ns.create(ROOT, b"n", kind | 0o644, 0, 0, rdev)
    assert stat.S_IFMT(node.mode) == kind and node.rdev == kept
    assert ns.lookup(ROOT, b"n") is node


@pytest.mark.parametrize("kind", [stat.S_IFDIR, stat.S_IFLNK, 0o170000])
def test_create_rejects_dir_symlink_and_unknown_types(ns: Namespace, kind: int) -> None:
    expect_errno(errno.EINVAL, ns.create, ROOT, b"n", kind | 0o644, 0, 0)


def test_create_errors(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EEXIST, ns.create, ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EEXIST, ns.mkdir, ROOT, b"f", 0o755, 0, 0)
    expect_errno(errno.EEXIST, ns.symlink, ROOT, b"f", b"t", 0, 0)
    expect_errno(errno.ENOTDIR, ns.create, f.id, b"x", REG | 0o644, 0, 0)
    expect_errno(errno.ENOTDIR, ns.mkdir, f.id, b"x", 0o755, 0, 0)
    expect_errno(errno.ENOENT, ns.create, 999, b"x", REG | 0o644, 0, 0)


def test_create_in_removed_directory_is_enoent(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    ns.rmdir(ROOT, b"d")
    expect_errno(errno.ENOENT, ns.create, d.id, b"x", REG | 0o644, 0, 0)
    expect_errno(errno.ENOENT, ns.mkdir, d.id, b"x", 0o755, 0, 0)
    expect_errno(errno.ENOENT, ns.rename, ROOT, b"x", d.id, b"x")
    assert ns.readdir(d.id, 0) == []
    ns.delete_inode(d.id)


def test_mkdir_nlink_accounting(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o750, 5, 6)
    assert a.is_dir and a.mode == stat.S_IFDIR | 0o750 and a.nlink == 2
    assert ns.get(ROOT).nlink == 3
    b = ns.mkdir(a.id, b"b", 0o755, 0, 0)
    ns.create(a.id, b"f", REG | 0o644, 0, 0)
    assert (ns.get(a.id).nlink, b.nlink, ns.get(ROOT).nlink) == (3, 2, 3)
    assert ns.lookup(b.id, b"..") is a
    fresh = env.reopen()
    assert (fresh.get(a.id).nlink, fresh.get(ROOT).nlink) == (3, 3)


def test_setgid_directory_inheritance(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o2775, 1000, 50)
    assert d.mode & stat.S_ISGID
    f = ns.create(d.id, b"f", REG | 0o644, 1000, 100)
    assert f.gid == 50 and not f.mode & stat.S_ISGID
    sub = ns.mkdir(d.id, b"sub", 0o755, 1000, 100)
    assert sub.gid == 50 and sub.mode == stat.S_IFDIR | stat.S_ISGID | 0o755
    s = ns.symlink(d.id, b"s", b"f", 1000, 100)
    assert s.gid == 50 and s.mode == stat.S_IFLNK | 0o777
    deeper = ns.create(sub.id, b"g", REG | 0o644, 1000, 100)
    assert deeper.gid == 50
    plain = ns.mkdir(ROOT, b"plain", 0o755, 1000, 100)
    assert plain.gid == 100 and not plain.mode & stat.S_ISGID
    assert ns.create(plain.id, b"h", REG | 0o2755, 1000, 100).mode == REG | 0o2755


def test_symlink_and_readlink(env: Env) -> None:
    ns = env.ns
    target = b"../some/\xff/target"
    s = ns.symlink(ROOT, b"s", target, 7, 8)
    assert s.is_symlink and s.mode == stat.S_IFLNK | 0o777
    assert s.size == len(target) and s.nlink == 1 and (s.uid, s.gid) == (7, 8)
    assert ns.readlink(s.id) == target
    assert env.reopen().readlink(s.id) == target
    assert ns.get(ROOT).mtime_ns == s.mtime_ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EINVAL, ns.readlink, f.id)
    expect_errno(errno.EINVAL, ns.readlink, ROOT)
    expect_errno(errno.ENOENT, ns.readlink, 999)
    expect_errno(errno.ENOENT, ns.symlink, ROOT, b"e", b"", 0, 0)
    expect_errno(errno.ENAMETOOLONG, ns.symlink, ROOT, b"e", b"x" * 4096, 0, 0)
    assert ns.symlink(ROOT, b"long", b"x" * 4095, 0, 0).size == 4095


# -- link / unlink / rmdir -------------------------------------------------------


def test_hard_links(env: Env) -> None:
    ns = env.ns
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    created = f.ctime_ns
    same = ns.link(f.id, d.id, b"g")
    assert same is f and f.nlink == 2 and f.ctime_ns > created
    assert ns.lookup(d.id, b"g") is f
    dir_node = ns.get(d.id)
    assert dir_node.mtime_ns == dir_node.ctime_ns == f.ctime_ns
    assert dir_node.nlink == 2  # hard links to files do not count for the directory
    assert env.reopen().get(f.id).nlink == 2
    left = ns.unlink(ROOT, b"f")
    assert left is f and f.nlink == 1
    assert ns.lookup(d.id, b"g") is f
    expect_errno(errno.ENOENT, ns.lookup, ROOT, b"f")
    assert ns.unlink(d.id, b"g").nlink == 0
    expect_errno(errno.ENOENT, ns.link, f.id, ROOT, b"again")
    ns.delete_inode(f.id)


def test_link_errors(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EPERM, ns.link, d.id, ROOT, b"d2")
    expect_errno(errno.EEXIST, ns.link, f.id, ROOT, b"d")
    expect_errno(errno.ENOTDIR, ns.link, f.id, f.id, b"x")
    expect_errno(errno.ENOENT, ns.link, 999, ROOT, b"x")
    s = ns.symlink(ROOT, b"s", b"f", 0, 0)
    assert ns.link(s.id, ROOT, b"s2").nlink == 2  # symlinks can be hard-linked


def test_unlink(env: Env) -> None:
    ns = env.ns
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    f = ns.create(d.id, b"f", REG | 0o644, 0, 0)
    ns.setxattr(f.id, b"user.a", b"1")
    gone = ns.unlink(d.id, b"f")
    assert gone is f and f.nlink == 0 and f.ctime_ns == env.clock.now
    parent = ns.get(d.id)
    assert parent.mtime_ns == parent.ctime_ns == env.clock.now
    assert names(ns, d.id) == [b".", b".."]
    assert ns.get(f.id).nlink == 0  # still there until freed
    assert ns.orphans() == [f.id]
    assert env.reopen().orphans() == [f.id]
    ns.delete_inode(f.id)
    assert ns.orphans() == []
    expect_errno(errno.ENOENT, ns.get, f.id)
    assert env.db.query("SELECT * FROM xattrs") == []
    expect_errno(errno.ENOENT, ns.unlink, d.id, b"f")
    expect_errno(errno.EISDIR, ns.unlink, ROOT, b"d")
    expect_errno(errno.ENOTDIR, ns.unlink, ns.create(ROOT, b"g", REG, 0, 0).id, b"x")


def test_unlink_symlink_and_special(ns: Namespace) -> None:
    s = ns.symlink(ROOT, b"s", b"target", 0, 0)
    p = ns.create(ROOT, b"p", stat.S_IFIFO | 0o644, 0, 0)
    assert ns.unlink(ROOT, b"s").nlink == 0
    assert ns.unlink(ROOT, b"p").nlink == 0
    ns.delete_inode(s.id)
    ns.delete_inode(p.id)
    expect_errno(errno.ENOENT, ns.readlink, s.id)


def test_delete_inode_needs_nlink_zero(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EBUSY, ns.delete_inode, f.id)
    expect_errno(errno.EBUSY, ns.delete_inode, ROOT)
    expect_errno(errno.ENOENT, ns.delete_inode, 999)


def test_rmdir(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = ns.mkdir(a.id, b"b", 0o755, 0, 0)
    ns.create(a.id, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.ENOTEMPTY, ns.rmdir, ROOT, b"a")
    expect_errno(errno.ENOTDIR, ns.rmdir, a.id, b"f")
    expect_errno(errno.ENOENT, ns.rmdir, a.id, b"nope")
    expect_errno(errno.ENOTDIR, ns.rmdir, ns.lookup(a.id, b"f").id, b"x")
    assert ns.get(a.id).nlink == 3
    removed = ns.rmdir(a.id, b"b")
    assert removed is b and b.nlink == 0 and b.ctime_ns == env.clock.now
    parent = ns.get(a.id)
    assert parent.nlink == 2 and parent.mtime_ns == parent.ctime_ns == env.clock.now
    expect_errno(errno.ENOENT, ns.lookup, a.id, b"b")
    assert ns.orphans() == [b.id]
    ns.delete_inode(b.id)
    ns.unlink(a.id, b"f")
    ns.rmdir(ROOT, b"a")
    assert ns.get(ROOT).nlink == 2
    assert env.reopen().get(ROOT).nlink == 2


# -- rename ---------------------------------------------------------------------


def test_rename_file_within_directory(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    assert ns.rename(ROOT, b"f", ROOT, b"g") is None
    assert ns.lookup(ROOT, b"g") is f and f.ctime_ns == env.clock.now
    expect_errno(errno.ENOENT, ns.lookup, ROOT, b"f")
    root = ns.get(ROOT)
    assert root.mtime_ns == root.ctime_ns == env.clock.now
    assert env.reopen().lookup(ROOT, b"g").id == f.id


def test_rename_file_over_file(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    g = ns.create(ROOT, b"g", REG | 0o644, 0, 0)
    replaced = ns.rename(ROOT, b"f", ROOT, b"g")
    assert replaced is g and g.nlink == 0 and g.ctime_ns == env.clock.now
    assert ns.lookup(ROOT, b"g") is f
    assert names(ns, ROOT) == [b".", b"..", b"g"]
    assert ns.orphans() == [g.id]
    ns.delete_inode(g.id)


def test_rename_over_a_file_with_other_links(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    g = ns.create(ROOT, b"g", REG | 0o644, 0, 0)
    ns.link(g.id, ROOT, b"g2")
    replaced = ns.rename(ROOT, b"f", ROOT, b"g")
    assert replaced is g and g.nlink == 1
    assert ns.lookup(ROOT, b"g2") is g and ns.lookup(ROOT, b"g") is f


def test_rename_across_directories(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = ns.mkdir(ROOT, b"b", 0o755, 0, 0)
    f = ns.create(a.id, b"f", REG | 0o644, 0, 0)
    d = ns.mkdir(a.id, b"d", 0o755, 0, 0)
    assert (a.nlink, b.nlink) == (3, 2)
    ns.rename(a.id, b"f", b.id, b"f2")
    assert (a.nlink, b.nlink) == (3, 2)  # files do not move nlink
    ns.rename(a.id, b"d", b.id, b"d")
    assert (a.nlink, b.nlink, d.nlink) == (2, 3, 2)
    assert ns.lookup(d.id, b"..") is b
    assert ns.lookup(b.id, b"f2") is f
    now = env.clock.now
    assert a.mtime_ns == a.ctime_ns == b.mtime_ns == b.ctime_ns == d.ctime_ns == now
    assert ns.get(ROOT).nlink == 4
    fresh = env.reopen()
    assert (fresh.get(a.id).nlink, fresh.get(b.id).nlink) == (2, 3)
    assert fresh.lookup(d.id, b"..").id == b.id


def test_rename_dir_over_empty_dir(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = ns.mkdir(ROOT, b"b", 0o755, 0, 0)
    src = ns.mkdir(a.id, b"src", 0o755, 0, 0)
    ns.create(src.id, b"inside", REG | 0o644, 0, 0)
    dst = ns.mkdir(b.id, b"dst", 0o755, 0, 0)
    replaced = ns.rename(a.id, b"src", b.id, b"dst")
    assert replaced is dst and dst.nlink == 0
    assert ns.lookup(b.id, b"dst") is src
    assert (a.nlink, b.nlink) == (2, 3)
    assert ns.lookup(src.id, b"..") is b
    assert names(ns, src.id) == [b".", b"..", b"inside"]
    assert ns.orphans() == [dst.id]
    ns.delete_inode(dst.id)


def test_rename_dir_over_empty_dir_same_parent(ns: Namespace) -> None:
    ns.mkdir(ROOT, b"x", 0o755, 0, 0)
    y = ns.mkdir(ROOT, b"y", 0o755, 0, 0)
    assert ns.get(ROOT).nlink == 4
    assert ns.rename(ROOT, b"x", ROOT, b"y") is y
    assert ns.get(ROOT).nlink == 3


def test_rename_type_conflicts(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    ns.mkdir(ROOT, b"full", 0o755, 0, 0)
    ns.create(ns.lookup(ROOT, b"full").id, b"x", REG | 0o644, 0, 0)
    ns.mkdir(ROOT, b"empty", 0o755, 0, 0)
    ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.ENOTDIR, ns.rename, ROOT, b"d", ROOT, b"f")
    expect_errno(errno.EISDIR, ns.rename, ROOT, b"f", ROOT, b"empty")
    expect_errno(errno.ENOTEMPTY, ns.rename, ROOT, b"d", ROOT, b"full")
    expect_errno(errno.ENOENT, ns.rename, ROOT, b"missing", ROOT, b"x")
    expect_errno(errno.ENOTDIR, ns.rename, ROOT, b"f", ns.lookup(ROOT, b"f").id, b"x")
    expect_errno(errno.ENOTDIR, ns.rename, ns.lookup(ROOT, b"f").id, b"x", ROOT, b"y")
    # Nothing changed.
    assert names(ns, ROOT) == [b".", b"..", b"d", b"full", b"empty", b"f"]
    assert ns.get(ROOT).nlink == 5 and d.nlink == 2


def test_rename_into_own_subtree(ns: Namespace) -> None:
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = ns.mkdir(a.id, b"b", 0o755, 0, 0)
    c = ns.mkdir(b.id, b"c", 0o755, 0, 0)
    expect_errno(errno.EINVAL, ns.rename, ROOT, b"a", a.id, b"x")
    expect_errno(errno.EINVAL, ns.rename, ROOT, b"a", c.id, b"x")
    expect_errno(errno.EINVAL, ns.rename, a.id, b"b", c.id, b"x")
    # Moving a directory up (out of its ancestors) is fine; so is a file down.
    ns.rename(b.id, b"c", ROOT, b"c")
    ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.rename(ROOT, b"f", b.id, b"f")
    assert ns.lookup(c.id, b"..").id == ROOT
    # A directory over one of its ancestors: the ancestor is not empty.
    expect_errno(errno.ENOTEMPTY, ns.rename, a.id, b"b", ROOT, b"a")
    expect_errno(errno.EISDIR, ns.rename, b.id, b"f", ROOT, b"a")


def test_rename_same_inode_is_a_noop(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.link(f.id, ROOT, b"g")
    generation, ctime = env.db.generation, f.ctime_ns
    assert ns.rename(ROOT, b"f", ROOT, b"g") is None
    assert ns.rename(ROOT, b"f", ROOT, b"f") is None
    assert ns.rename(ROOT, b"f", ROOT, b"g", RENAME_EXCHANGE) is None
    assert env.db.generation == generation and f.ctime_ns == ctime and f.nlink == 2
    assert ns.lookup(ROOT, b"f") is f and ns.lookup(ROOT, b"g") is f
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert ns.rename(ROOT, b"d", ROOT, b"d") is None and d.nlink == 2
    expect_errno(errno.EEXIST, ns.rename, ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE)


def test_rename_noreplace(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.create(ROOT, b"g", REG | 0o644, 0, 0)
    expect_errno(errno.EEXIST, ns.rename, ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE)
    assert ns.rename(ROOT, b"f", ROOT, b"h", RENAME_NOREPLACE) is None
    assert ns.lookup(ROOT, b"h") is f


def test_rename_exchange(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = ns.mkdir(ROOT, b"b", 0o755, 0, 0)
    d = ns.mkdir(a.id, b"d", 0o755, 0, 0)
    f = ns.create(b.id, b"f", REG | 0o644, 0, 0)
    assert ns.rename(a.id, b"d", b.id, b"f", RENAME_EXCHANGE) is None
    assert ns.lookup(a.id, b"d") is f and ns.lookup(b.id, b"f") is d
    assert (a.nlink, b.nlink, d.nlink, f.nlink) == (2, 3, 2, 1)
    assert ns.lookup(d.id, b"..") is b
    now = env.clock.now
    assert d.ctime_ns == f.ctime_ns == a.mtime_ns == b.ctime_ns == now
    # Two directories in different parents: nlink stays.
    e = ns.mkdir(a.id, b"e", 0o755, 0, 0)
    assert ns.rename(a.id, b"e", b.id, b"f", RENAME_EXCHANGE) is None
    assert (a.nlink, b.nlink) == (3, 3)
    assert ns.lookup(e.id, b"..") is b and ns.lookup(d.id, b"..") is a
    expect_errno(errno.ENOENT, ns.rename, a.id, b"d", b.id, b"missing", RENAME_EXCHANGE)
    fresh = env.reopen()
    assert fresh.lookup(b.id, b"f").id == e.id and fresh.get(a.id).nlink == 3


def test_rename_exchange_with_an_ancestor(ns: Namespace) -> None:
    a = ns.mkdir(ROOT, b"a", 0o755, 0, 0)
    ns.mkdir(a.id, b"b", 0o755, 0, 0)
    expect_errno(errno.EINVAL, ns.rename, a.id, b"b", ROOT, b"a", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, ns.rename, ROOT, b"a", a.id, b"b", RENAME_EXCHANGE)


@pytest.mark.parametrize("flags", [3, 4, -1, 1 << 8])
def test_rename_bad_flags(ns: Namespace, flags: int) -> None:
    ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.EINVAL, ns.rename, ROOT, b"f", ROOT, b"g", flags)


def test_rename_keeps_readdir_position(ns: Namespace) -> None:
    for name in (b"a", b"b", b"c"):
        ns.create(ROOT, name, REG | 0o644, 0, 0)
    ns.rename(ROOT, b"b", ROOT, b"z")
    assert names(ns, ROOT) == [b".", b"..", b"a", b"z", b"c"]


# -- readdir ---------------------------------------------------------------------


def test_readdir_offsets(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    made = [ns.create(d.id, b"f%d" % i, REG | 0o644, 0, 0) for i in range(5)]
    listing = ns.readdir(d.id, 0)
    assert [n for n, _, _ in listing] == [b".", b"..", b"f0", b"f1", b"f2", b"f3", b"f4"]
    assert listing[0][1] is d and listing[0][2] == 1
    assert listing[1][1].id == ROOT and listing[1][2] == 2
    assert [node for _, node, _ in listing[2:]] == made
    offsets = [off for _, _, off in listing]
    assert offsets == sorted(set(offsets)) and offsets[2] > 2
    # Resuming from any entry's offset gives exactly the rest.
    for i, (_, _, off) in enumerate(listing):
        assert ns.readdir(d.id, off) == listing[i + 1 :]
    assert ns.readdir(d.id, offsets[-1]) == []


def test_readdir_pagination(ns: Namespace) -> None:
    wanted = [b"n%03d" % i for i in range(23)]
    for name in wanted:
        ns.create(ROOT, name, REG | 0o644, 0, 0)
    for limit in (1, 2, 5, 100):
        got: list[bytes] = []
        offset = 0
        while page := ns.readdir(ROOT, offset, limit=limit):
            assert len(page) <= limit
            got += [n for n, _, _ in page]
            offset = page[-1][2]
        assert got == [b".", b".."] + wanted
    assert ns.readdir(ROOT, 0, limit=0) == []


def test_readdir_with_changes_between_calls(ns: Namespace) -> None:
    for name in (b"a", b"b", b"c", b"d"):
        ns.create(ROOT, name, REG | 0o644, 0, 0)
    first = ns.readdir(ROOT, 0, limit=3)
    assert [n for n, _, _ in first] == [b".", b"..", b"a"]
    ns.unlink(ROOT, b"a")  # already returned
    ns.unlink(ROOT, b"b")  # not yet returned: must not appear
    ns.create(ROOT, b"e", REG | 0o644, 0, 0)
    rest = ns.readdir(ROOT, first[-1][2])
    assert [n for n, _, _ in rest] == [b"c", b"d", b"e"]
    # The `rm -rf` pattern: remove each entry as it is read.
    offset = 0
    while page := ns.readdir(ROOT, offset, limit=1):
        name, node, offset = page[0]
        if name not in (b".", b".."):
            ns.unlink(ROOT, name)
    assert names(ns, ROOT) == [b".", b".."]


def test_readdir_errors(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.ENOTDIR, ns.readdir, f.id, 0)
    expect_errno(errno.ENOENT, ns.readdir, 999, 0)


# -- setattr ----------------------------------------------------------------------


def test_chmod_keeps_type_and_sets_ctime(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    mtime = f.mtime_ns
    node = ns.setattr(f.id, mode=0o4711)
    assert node is f and f.mode == REG | 0o4711
    assert f.ctime_ns == env.clock.now and f.mtime_ns == mtime
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert ns.setattr(d.id, mode=stat.S_IFREG | 0o700).mode == stat.S_IFDIR | 0o700
    assert env.reopen().get(f.id).mode == REG | 0o4711


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (0o6755, 0o0755),
        (0o6555, 0o0555),
        (0o4755, 0o0755),
        (0o2755, 0o0755),
        (0o2745, 0o2745),
        (0o6745, 0o2745),
        (0o1777, 0o1777),
        (0o0644, 0o0644),
    ],
)
def test_chown_clears_suid_sgid_of_files(ns: Namespace, before: int, after: int) -> None:
    f = ns.create(ROOT, b"f", REG | before, 0, 0)
    assert ns.setattr(f.id, uid=65534, gid=65533).mode == REG | after
    assert (f.uid, f.gid) == (65534, 65533)
    g = ns.create(ROOT, b"g", REG | before, 0, 0)
    assert ns.setattr(g.id, gid=5).mode == REG | after
    assert (g.uid, g.gid) == (0, 5)


def test_chown_of_directory_keeps_bits(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o6755, 0, 0)
    assert ns.setattr(d.id, uid=1, gid=2).mode == stat.S_IFDIR | 0o6755


def test_chown_with_explicit_mode_keeps_mode(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    assert ns.setattr(f.id, uid=1, mode=0o6755).mode == REG | 0o6755


def test_setattr_without_changes_still_sets_ctime(env: Env) -> None:
    f = env.ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    env.ns.setattr(f.id)
    assert f.ctime_ns == env.clock.now and f.mode == REG | 0o644


def test_setattr_times_and_size(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.setattr(f.id, atime_ns=111, mtime_ns=222)
    assert (f.atime_ns, f.mtime_ns, f.ctime_ns) == (111, 222, env.clock.now)
    ns.setattr(f.id, size=10)  # truncate: size changed -> mtime = now
    assert f.size == 10 and f.mtime_ns == f.ctime_ns == env.clock.now
    ns.setattr(f.id, atime_ns=5, mtime_ns=6)
    ns.setattr(f.id, size=10)  # same size: mtime untouched
    assert f.mtime_ns == 6
    ns.setattr(f.id, size=0, mtime_ns=7)
    assert (f.size, f.mtime_ns) == (0, 7)
    assert env.reopen().get(f.id) == f
    expect_errno(errno.EISDIR, ns.setattr, ROOT, size=0)
    expect_errno(errno.EINVAL, ns.setattr, f.id, size=-1)
    p = ns.create(ROOT, b"p", stat.S_IFIFO | 0o644, 0, 0)
    expect_errno(errno.EINVAL, ns.setattr, p.id, size=0)
    expect_errno(errno.ENOENT, ns.setattr, 999, mode=0o644)


# -- data-path size updates, dirty cache, persist ---------------------------------------


def test_set_size_dirty_then_persist(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    generation = env.db.generation
    node = ns.set_size(f.id, 4096, mtime_ns=5_000, persist=False)
    assert node is f and (f.size, f.mtime_ns, f.ctime_ns) == (4096, 5_000, 5_000)
    assert env.db.generation == generation  # nothing written
    assert ns.dirty_inodes() == [f.id] and ns.is_dirty(f.id)
    assert ns.get(f.id).size == 4096
    assert env.reopen().get(f.id).size == 0
    ns.set_size(f.id, 8192, persist=False)  # no mtime: times unchanged
    assert (f.size, f.mtime_ns) == (8192, 5_000)
    ns.persist(f.id)
    assert ns.dirty_inodes() == []
    assert env.reopen().get(f.id) == f
    ns.persist(f.id)  # clean: no-op
    assert env.db.generation == generation + 1


def test_deferred_setattr_changes_only_the_cache_until_persisted(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o4755, 0, 0)
    generation = env.db.generation
    node = ns.setattr(f.id, uid=5, defer=True)  # a chown: clears S_ISUID too
    node = ns.setattr(f.id, mtime_ns=60_000, defer=True)
    assert node is f and (f.uid, f.mode, f.mtime_ns) == (5, REG | 0o755, 60_000)
    assert f.ctime_ns == env.clock.now
    assert env.db.generation == generation and ns.dirty_inodes() == [f.id]
    assert env.reopen().get(f.id).uid == 0  # not written yet
    ns.persist_dirty([f.id, f.id + 1000])  # ids that are not dirty are skipped
    assert env.db.generation == generation + 1 and ns.dirty_inodes() == []
    assert env.reopen().get(f.id) == f
    ns.persist_dirty([f.id])  # clean: no transaction
    assert env.db.generation == generation + 1
    check_replicated(env)


def test_deferred_setattr_is_written_by_the_next_operation_on_the_inode(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.setattr(f.id, mode=0o600, defer=True)
    ns.rename(ROOT, b"f", ROOT, b"g")  # stages and writes the whole row
    assert ns.dirty_inodes() == []
    assert env.reopen().get(f.id).mode == REG | 0o600


def test_deferral_refuses_sizes_and_transactions(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    with pytest.raises(ValueError):
        ns.setattr(f.id, size=1, defer=True)
    ns.setattr(f.id, mode=0o600, defer=True)
    with env.db.transaction(), pytest.raises(RuntimeError):
        ns.persist_dirty([f.id])
    assert ns.dirty_inodes() == [f.id]


def test_set_size_persist_now(env: Env) -> None:
    f = env.ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    env.ns.set_size(f.id, 7, mtime_ns=9_000, persist=True)
    assert env.ns.dirty_inodes() == []
    assert env.reopen().get(f.id).size == 7


def test_persist_joins_the_callers_transaction(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    g = ns.create(ROOT, b"g", REG | 0o644, 0, 0)
    ns.set_size(f.id, 1, persist=False)
    ns.set_size(g.id, 2, persist=False)
    count = len(env.shipped)
    with env.db.transaction():
        for ino in ns.dirty_inodes():
            ns.persist(ino)
        ns.set_inline_data(f.id, b"x")
    assert len(env.shipped) == count + 1
    assert env.reopen().get(g.id).size == 2


def test_other_operations_persist_dirty_attributes(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.set_size(f.id, 100, mtime_ns=50_000, persist=False)
    ns.link(f.id, ROOT, b"g")  # writes the whole row, dirty values included
    assert ns.dirty_inodes() == []
    again = env.reopen().get(f.id)
    assert (again.size, again.nlink, again.mtime_ns) == (100, 2, 50_000)


def test_failed_operation_leaves_cache_and_dirty_state(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.set_size(f.id, 3, persist=False)
    snapshot = f.copy()
    expect_errno(errno.EEXIST, ns.link, f.id, ROOT, b"f")
    expect_errno(errno.EINVAL, ns.rename, ROOT, b"f", ROOT, b"..")
    expect_errno(errno.EISDIR, ns.unlink, ROOT, b"..")
    assert f == snapshot and ns.dirty_inodes() == [f.id]


def test_cache_eviction_keeps_dirty_and_live_objects(env: Env) -> None:
    env.ns = ns = Namespace(env.db, env.clock, cache_size=10)
    held = ns.create(ROOT, b"held", REG | 0o644, 0, 0)
    dirty = ns.create(ROOT, b"dirty", REG | 0o644, 0, 0)
    ns.set_size(dirty.id, 42, persist=False)
    made = [ns.create(ROOT, b"f%d" % i, REG | 0o644, 0, 0) for i in range(50)]
    assert len(ns._cache) <= 10  # noqa: SLF001
    assert dirty.id in ns._cache  # noqa: SLF001
    assert ns.get(dirty.id).size == 42
    # An evicted object still referenced elsewhere is the one get() returns,
    # and changes show through it.
    assert ns.get(held.id) is held
    ns.setattr(made[0].id, mode=0o600)
    assert made[0].mode == REG | 0o600
    del made
    for i in range(50):
        assert ns.lookup(ROOT, b"f%d" % i).mode == REG | (0o600 if i == 0 else 0o644)
    assert len(ns._cache) <= 10  # noqa: SLF001
    ns.persist(dirty.id)


def test_tiny_cache(env: Env) -> None:
    env.ns = ns = Namespace(env.db, env.clock, cache_size=1)
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.set_size(f.id, 1, persist=True)
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    ns.rename(ROOT, b"f", d.id, b"f")
    assert ns.lookup(d.id, b"f").size == 1
    assert ns.get(ROOT).nlink == 3


# -- xattrs -----------------------------------------------------------------------


def test_xattrs(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    assert ns.listxattr(f.id) == []
    expect_errno(errno.ENODATA, ns.getxattr, f.id, b"user.a")
    ns.setxattr(f.id, b"user.b", b"\x00\xff binary")
    assert f.ctime_ns == env.clock.now
    ns.setxattr(f.id, b"user.a", b"")
    assert ns.getxattr(f.id, b"user.a") == b""
    assert ns.getxattr(f.id, b"user.b") == b"\x00\xff binary"
    assert ns.listxattr(f.id) == [b"user.a", b"user.b"]
    ns.setxattr(f.id, b"user.a", b"new")
    assert ns.getxattr(f.id, b"user.a") == b"new"
    assert env.reopen().getxattr(f.id, b"user.a") == b"new"
    ns.removexattr(f.id, b"user.a")
    assert f.ctime_ns == env.clock.now
    assert ns.listxattr(f.id) == [b"user.b"]
    expect_errno(errno.ENODATA, ns.removexattr, f.id, b"user.a")
    ns.setxattr(ROOT, b"user.on-root", b"1")
    assert ns.listxattr(ROOT) == [b"user.on-root"]
    for call in (ns.getxattr, ns.removexattr):
        expect_errno(errno.ENOENT, call, 999, b"user.a")
    expect_errno(errno.ENOENT, ns.setxattr, 999, b"user.a", b"")
    expect_errno(errno.ENOENT, ns.listxattr, 999)


def test_xattr_flags(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    expect_errno(errno.ENODATA, ns.setxattr, f.id, b"user.a", b"1", XATTR_REPLACE)
    ns.setxattr(f.id, b"user.a", b"1", XATTR_CREATE)
    expect_errno(errno.EEXIST, ns.setxattr, f.id, b"user.a", b"2", XATTR_CREATE)
    ns.setxattr(f.id, b"user.a", b"3", XATTR_REPLACE)
    assert ns.getxattr(f.id, b"user.a") == b"3"
    both = XATTR_CREATE | XATTR_REPLACE
    expect_errno(errno.EEXIST, ns.setxattr, f.id, b"user.a", b"4", both)
    expect_errno(errno.ENODATA, ns.setxattr, f.id, b"user.b", b"4", both)
    expect_errno(errno.EINVAL, ns.setxattr, f.id, b"user.a", b"4", 8)
    assert ns.getxattr(f.id, b"user.a") == b"3"
    assert ns.listxattr(f.id) == [b"user.a"]


def test_posix_acl_xattrs_are_refused(ns: Namespace) -> None:
    # No ACL support: refusing them makes libacl (cp -a, setfacl) use chmod.
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    for name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        expect_errno(errno.EOPNOTSUPP, ns.setxattr, f.id, name, b"\x02\x00\x00\x00")
        expect_errno(errno.ENODATA, ns.getxattr, f.id, name)
        expect_errno(errno.EOPNOTSUPP, ns.removexattr, f.id, name)
    assert ns.listxattr(f.id) == []


def test_xattr_limits(ns: Namespace) -> None:
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.setxattr(f.id, b"u" * 255, b"v" * 65536)
    assert len(ns.getxattr(f.id, b"u" * 255)) == 65536
    expect_errno(errno.ERANGE, ns.setxattr, f.id, b"u" * 256, b"v")
    expect_errno(errno.E2BIG, ns.setxattr, f.id, b"user.big", b"v" * 65537)
    expect_errno(errno.ERANGE, ns.setxattr, f.id, b"", b"v")
    expect_errno(errno.ERANGE, ns.getxattr, f.id, b"u" * 256)


# -- counts, inline data, orphans ------------------------------------------------------


def test_counts_and_inline_data(env: Env) -> None:
    ns = env.ns
    assert ns.counts() == (1, 0)
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert ns.counts() == (3, 0)
    assert ns.inline_data(f.id) is None
    ns.set_inline_data(f.id, b"hello")
    assert ns.inline_data(f.id) == b"hello"
    assert ns.counts() == (3, 5)
    ns.set_inline_data(f.id, b"hi")
    assert ns.counts() == (3, 2)
    assert env.reopen().inline_data(f.id) == b"hi"
    assert env.reopen().counts() == (3, 2)
    ns.unlink(ROOT, b"f")
    ns.delete_inode(f.id)
    assert ns.counts() == (2, 0) == env.reopen().counts()
    g = ns.create(ROOT, b"g", REG | 0o644, 0, 0)
    ns.set_inline_data(g.id, b"abc")
    ns.set_inline_data(g.id, None)
    assert ns.inline_data(g.id) is None
    assert ns.counts() == (3, 0) == env.reopen().counts()
    expect_errno(errno.ENOENT, ns.inline_data, 999)
    expect_errno(errno.ENOENT, ns.set_inline_data, 999, b"x")


def test_orphans_survive_reopen(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    d = ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    ns.create(ROOT, b"kept", REG | 0o644, 0, 0)
    ns.unlink(ROOT, b"f")
    ns.rmdir(ROOT, b"d")
    assert env.reopen().orphans() == [f.id, d.id]
    for ino in ns.orphans():
        ns.delete_inode(ino)
    assert env.reopen().orphans() == []


# -- replication -----------------------------------------------------------------------


def test_transactions_replay_to_an_identical_database(env: Env) -> None:
    ns = env.ns
    a = ns.mkdir(ROOT, b"a", 0o755, 1, 2)
    f = ns.create(a.id, b"\xfff", REG | 0o644, 1, 2)
    ns.symlink(ROOT, b"s", b"a/\xfff", 1, 2)
    ns.link(f.id, ROOT, b"hard")
    ns.setxattr(f.id, b"user.x", b"y")
    ns.set_size(f.id, 10, mtime_ns=77, persist=False)
    ns.persist(f.id)
    ns.set_inline_data(f.id, b"0123456789")
    ns.rename(ROOT, b"hard", a.id, b"moved")
    ns.setattr(f.id, mode=0o600, uid=3)
    b = ns.mkdir(ROOT, b"b", 0o755, 1, 2)
    ns.rename(ROOT, b"a", b.id, b"a", RENAME_NOREPLACE)
    ns.unlink(ROOT, b"s")
    check_replicated(env)
    assert len(env.shipped) > 10
    # Every statement is parameterised: no SQL clock or randomness.
    for transaction in env.shipped:
        for sql, _ in transaction.statements:
            lowered = sql.lower()
            assert "random" not in lowered and "now" not in lowered and "time(" not in lowered


def test_failed_operations_ship_nothing(env: Env) -> None:
    ns = env.ns
    ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    count = len(env.shipped)
    for call, args in [
        (ns.create, (ROOT, b"f", REG | 0o644, 0, 0)),
        (ns.rmdir, (ROOT, b"f")),
        (ns.unlink, (ROOT, b"d")),
        (ns.rename, (ROOT, b"d", ROOT, b"f")),
        (ns.link, (2, ROOT, b"d")),
    ]:
        with pytest.raises(FsError):
            call(*args)  # type: ignore[operator]
    assert len(env.shipped) == count


# -- random operation sequences ------------------------------------------------------

NAMES = [b"a", b"b", b"c"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["create", "mkdir", "symlink", "link", "unlink", "rmdir", "rename"]),
        st.integers(0, 20),  # pick a directory
        st.sampled_from(NAMES),
        st.integers(0, 20),  # pick another directory
        st.sampled_from(NAMES),
        st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_operations_keep_invariants(
    ops: list[tuple[str, int, bytes, int, bytes, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = make_env(Path(tmp), cache_size=8)
        ns = env.ns
        for op, i, name, j, other, flags in ops:
            live = env.db.query("SELECT id, mode FROM inodes WHERE nlink > 0 ORDER BY id")
            dirs = [ino for ino, mode in live if stat.S_ISDIR(mode)]
            files = [ino for ino, _ in live]
            parent, other_parent = dirs[i % len(dirs)], dirs[j % len(dirs)]
            try:
                if op == "create":
                    ns.create(parent, name, REG | 0o644, 0, 0)
                elif op == "mkdir":
                    ns.mkdir(parent, name, 0o755, 0, 0)
                elif op == "symlink":
                    ns.symlink(parent, name, b"t" * (i + 1), 0, 0)
                elif op == "link":
                    ns.link(files[j % len(files)], parent, name)
                elif op == "unlink":
                    gone = ns.unlink(parent, name)
                    if gone.nlink == 0:
                        ns.delete_inode(gone.id)
                elif op == "rmdir":
                    ns.delete_inode(ns.rmdir(parent, name).id)
                else:
                    replaced = ns.rename(parent, name, other_parent, other, flags)
                    if replaced is not None and replaced.nlink == 0:
                        ns.delete_inode(replaced.id)
            except FsError:
                pass
            check_invariants(env.db, ns)
        assert ns.orphans() == []
        finish_env(env)


def test_inode_dataclass() -> None:
    node = Inode(5, REG | 0o644, 1, 2, 1, 0, 3, 4, 5, 0)
    copy = node.copy()
    assert copy == node and copy is not node
    copy.size = 9
    node.assign(copy)
    assert node.size == 9 and node.row()[0] == 5
