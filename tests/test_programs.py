"""Real programs on a real mount: tar, git, sqlite, rsync / cp -a, an
editor's save pattern, dd. Every result is checked by content hashes
against the same data on the local disk.

Tests on `shared_volume` work in their own directory and do not depend on
each other; the sqlite test needs a remount and gets its own `volume`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.mounting import MountedVolume
from tests.volume_files import MiB, pattern, sha256_file

#: A real tree of a few thousand files: the system Python's standard library
#: and its Debian packages (together ~4,300 files, ~60 MiB).
SYSTEM_LIB = Path("/usr/lib")
TREES = ("python3.11", "python3")
STDLIB = SYSTEM_LIB / TREES[0]


def run(
    *argv: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a program; fail the test with its output if it fails."""
    result = subprocess.run(
        [os.fspath(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )
    return result.stdout


def tar_digest(parent: Path, name: str = ".") -> str:
    """sha256 of `tar c --sort=name` of parent/name: names, modes, owners,
    mtimes, symlink targets, hard links and contents, in one hash."""
    proc = subprocess.Popen(
        ["tar", "-C", str(parent), "--sort=name", "--format=gnu", "-cf", "-", name],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    digest = hashlib.sha256()
    while block := proc.stdout.read(MiB):
        digest.update(block)
    proc.stdout.close()
    assert proc.wait(600) == 0, f"tar c of {parent / name} failed"
    return digest.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under root (symlinks
    not followed), or '-> target' for symlinks."""
    digests = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            digests[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else sha256_file(path)
    return digests


@pytest.fixture(scope="module")
def stdlib_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tarball of a real tree (a few thousand files), made once per module."""
    trees = [t for t in TREES if (SYSTEM_LIB / t).is_dir()]
    if STDLIB.name not in trees:
        pytest.skip(f"{STDLIB} is missing")
    tarball = tmp_path_factory.mktemp("tarball") / "stdlib.tar"
    run("tar", "-C", SYSTEM_LIB, "--sort=name", "-cf", tarball, *trees)
    return tarball


def make_rich_tree(root: Path, tarball: Path) -> None:
    """A local tree with a bit of everything: part of a real tree, odd
    modes, old mtimes, symlinks, hard links, empty files and directories,
    a large random file."""
    root.mkdir()
    run("tar", "-C", root, "-xf", tarball, f"{STDLIB.name}/json", f"{STDLIB.name}/email")
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "big.bin").write_bytes(pattern(5, 5 * MiB + 333))
    secret = root / "secret.txt"
    secret.write_text("only me\n")
    secret.chmod(0o600)
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    readonly = root / "readonly.txt"
    readonly.write_text("do not touch\n")
    os.utime(readonly, ns=(1_000_000_000 * 10**9, 1_000_000_123 * 10**9))
    readonly.chmod(0o444)
    (root / "link-to-big").symlink_to("big.bin")
    (root / "dangling").symlink_to("nowhere/at/all")
    os.link(root / "big.bin", root / "hardlink-to-big")


# --- tar -------------------------------------------------------------------------


def test_tar_extract_of_a_real_tree(
    shared_volume: MountedVolume, stdlib_tarball: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    run("tar", "-C", reference, "-xf", stdlib_tarball)

    target = shared_volume.mountpoint / "tar"
    target.mkdir()
    run("tar", "-C", target, "-xf", stdlib_tarball)

    # Byte-identical tar streams: contents, modes, owners, mtimes, symlinks.
    trees = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in target.iterdir()) == trees
    for tree in trees:
        assert tar_digest(target, tree) == tar_digest(reference, tree), tree
    run("diff", "-r", "--no-dereference", reference, target)
    n_files = sum(len(files) for _, _, files in os.walk(target))
    assert n_files > 1000, n_files
    # Listing it again (from the daemon's caches) and re-reading it agree.
    assert file_digests(target) == file_digests(reference)


# --- git -------------------------------------------------------------------------


def _git_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="ecfs test",
        GIT_AUTHOR_EMAIL="test@ecfs.invalid",
        GIT_COMMITTER_NAME="ecfs test",
        GIT_COMMITTER_EMAIL="test@ecfs.invalid",
        GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
    )
    return env


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_init_commit_clone_fsck(
    shared_volume: MountedVolume, stdlib_tarball: Path, tmp_path: Path
) -> None:
    env = _git_env(tmp_path)
    base = shared_volume.mountpoint / "git"
    base.mkdir()
    repo = base / "repo"

    def git(*args: str | os.PathLike[str], cwd: Path = repo) -> str:
        return run("git", *args, cwd=cwd, env=env)

    git("init", "-q", "-b", "main", repo, cwd=base)
    run("tar", "-C", repo, "-xf", stdlib_tarball, f"{STDLIB.name}/json", f"{STDLIB.name}/email",
        f"{STDLIB.name}/asyncio")  # fmt: skip
    (repo / "big.bin").write_bytes(pattern(11, 3 * MiB + 5))
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    # A second commit that edits, deletes and renames.
    (repo / "big.bin").write_bytes(pattern(12, 2 * MiB))
    (repo / STDLIB.name / "json" / "tool.py").unlink()
    git("mv", f"{STDLIB.name}/email", "email")
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    git("gc", "-q")  # repack: pack files written, renamed and mmap()ed
    git("fsck", "--full", "--strict")
    head = git("rev-parse", "HEAD").strip()
    expected = file_digests(repo)

    # Clones from the mount to the mount: hard-linked objects, and packed.
    for name, args in (("clone", ()), ("clone-no-local", ("--no-local",))):
        clone = base / name
        git("clone", "-q", *args, repo, clone, cwd=base)
        git("fsck", "--full", "--strict", cwd=clone)
        assert git("rev-parse", "HEAD", cwd=clone).strip() == head
        assert git("status", "--porcelain", cwd=clone) == ""
        assert file_digests(clone) == expected
    assert git("log", "--format=%s", cwd=base / "clone-no-local").split() == ["second", "first"]
    # A commit in a clone, fetched back into the original.
    (base / "clone" / "new.txt").write_text("from the clone\n")
    git("add", "new.txt", cwd=base / "clone")
    git("commit", "-q", "-m", "third", cwd=base / "clone")
    git("pull", "-q", "--ff-only", base / "clone", "main")
    assert (repo / "new.txt").read_text() == "from the clone\n"
    git("fsck", "--full", "--strict")


# --- sqlite ----------------------------------------------------------------------


def _table_digest(con: sqlite3.Connection) -> str:
    digest = hashlib.sha256()
    for row in con.execute("SELECT id, name, payload FROM items ORDER BY id"):
        digest.update(repr(row).encode())
    return digest.hexdigest()


def _model_digest(model: dict[int, tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for key in sorted(model):
        digest.update(repr((key, *model[key])).encode())
    return digest.hexdigest()


def _write_batches(
    con: sqlite3.Connection, model: dict[int, tuple[str, bytes]], rng: random.Random, n: int
) -> None:
    """`n` rows inserted in transactions of 100, with some updates and deletes."""
    for _ in range(n // 100):
        with con:
            for _ in range(100):
                key = len(model) + rng.randrange(10**9) * 10**4
                row = (f"item-{key}", rng.randbytes(rng.choice([0, 10, 500, 3000, 9000])))
                con.execute("INSERT INTO items VALUES (?, ?, ?)", (key, *row))
                model[key] = row
            for key in rng.sample(sorted(model), 5):
                row = (model[key][0] + "'", rng.randbytes(700))
                con.execute("UPDATE items SET name = ?, payload = ? WHERE id = ?", (*row, key))
                model[key] = row
            victim = rng.choice(sorted(model))
            con.execute("DELETE FROM items WHERE id = ?", (victim,))
            del model[victim]


def _check(con: sqlite3.Connection, model: dict[int, tuple[str, bytes]]) -> None:
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("SELECT count(*) FROM items").fetchone()[0] == len(model)
    assert _table_digest(con) == _model_digest(model)


def test_sqlite_database_on_the_mount(volume: MountedVolume) -> None:
    rng = random.Random(2024)
    model: dict[int, tuple[str, bytes]] = {}
    path = volume.mountpoint / "db" / "test.sqlite"
    path.parent.mkdir()

    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        con.execute("PRAGMA synchronous=FULL")
        with con:
            con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
            con.execute("CREATE INDEX items_name ON items (name)")
        _write_batches(con, model, rng, 2000)
        _check(con, model)

        assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        _write_batches(con, model, rng, 2000)
        _check(con, model)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _write_batches(con, model, rng, 500)  # left in the WAL at close? no: close checkpoints
        _check(con, model)
    finally:
        con.close()

    # A second connection sees the same; then the same after a remount.
    con = sqlite3.connect(path)
    try:
        _check(con, model)
    finally:
        con.close()
    volume.remount()
    con = sqlite3.connect(path)
    try:
        _check(con, model)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent
        assert con.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        _write_batches(con, model, rng, 300)
        _check(con, model)
        con.execute("VACUUM")
        _check(con, model)
    finally:
        con.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.sqlite"]


# --- rsync / cp -a ------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("rsync") is None, reason="rsync is not installed (apt-get install rsync)"
)
def test_rsync_a(shared_volume: MountedVolume, stdlib_tarball: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_rich_tree(src, stdlib_tarball)
    dst = shared_volume.mountpoint / "rsync"
    run("rsync", "-aH", f"{src}/", f"{dst}/")
    assert tar_digest(dst) == tar_digest(src)
    run("diff", "-r", "--no-dereference", src, dst)
    assert os.stat(dst / "hardlink-to-big").st_ino == os.stat(dst / "big.bin").st_ino
    # Nothing left to do: sizes and mtimes match, and so do checksums.
    assert run("rsync", "-aHi", f"{src}/", f"{dst}/") == ""
    assert run("rsync", "-aHci", "--dry-run", f"{src}/", f"{dst}/") == ""
    # An update: rsync's delta transfer rewrites through a temp file + rename.
    big = src / "big.bin"
    data = bytearray(big.read_bytes())
    data[1_000_000:1_000_010] = b"X" * 10
    data += b"tail"
    big.write_bytes(bytes(data))
    (src / "secret.txt").unlink()
    run("rsync", "-aH", "--delete", f"{src}/", f"{dst}/")
    assert tar_digest(dst) == tar_digest(src)
    assert run("rsync", "-aHci", "--dry-run", f"{src}/", f"{dst}/") == ""


def test_cp_a(shared_volume: MountedVolume, stdlib_tarball: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_rich_tree(src, stdlib_tarball)
    dst = shared_volume.mountpoint / "cp-a"
    run("cp", "-a", src, dst)
    assert tar_digest(dst) == tar_digest(src)
    run("diff", "-r", "--no-dereference", src, dst)
    back = tmp_path / "back"
    run("cp", "-a", dst, back)  # and out again
    assert tar_digest(back) == tar_digest(src)


# --- an editor saving a file --------------------------------------------------------


def test_editor_save_pattern(shared_volume: MountedVolume) -> None:
    directory = shared_volume.mountpoint / "editor"
    directory.mkdir()
    path = directory / "notes.txt"
    path.write_bytes(pattern(0, 10_000))
    old = open(path, "rb")  # noqa: SIM115 - a reader that keeps the old version open
    try:
        inodes = {path.stat().st_ino}
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for version in range(1, 16):
                content = pattern(
                    version, random.Random(version).choice([0, 1, 4096, 70_000, 600_000])
                )
                tmp = directory / f".notes.txt.{version}.tmp"
                with open(tmp, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o640)
                os.rename(tmp, path)
                os.fsync(dir_fd)
                assert sha256_file(path) == hashlib.sha256(content).hexdigest()
                assert path.stat().st_mode & 0o777 == 0o640
                inodes.add(path.stat().st_ino)
        finally:
            os.close(dir_fd)
        assert len(inodes) == 16  # every save is a new file
        assert old.read() == pattern(0, 10_000)  # the replaced version stays readable
    finally:
        old.close()
    # vim-style: keep a backup by renaming, write anew, drop the backup.
    backup = directory / "notes.txt~"
    os.rename(path, backup)
    final = pattern(99, 12_345)
    with open(path, "wb") as f:
        f.write(final)
        os.fsync(f.fileno())
    os.unlink(backup)
    assert sorted(os.listdir(directory)) == ["notes.txt"]
    assert sha256_file(path) == hashlib.sha256(final).hexdigest()


# --- dd --------------------------------------------------------------------------


def test_dd_block_sizes_and_cmp(shared_volume: MountedVolume, tmp_path: Path) -> None:
    directory = shared_volume.mountpoint / "dd"
    directory.mkdir()
    src = tmp_path / "src.bin"
    src.write_bytes(pattern(31, 24 * MiB + 12_345))
    digest = sha256_file(src)
    for bs in ("1M", "4k"):
        target = directory / f"bs-{bs}.bin"
        run("dd", f"if={src}", f"of={target}", f"bs={bs}", "status=none")
        run("cmp", src, target)
        assert sha256_file(target) == digest
        back = tmp_path / f"back-{bs}.bin"  # read back with the other block size
        run("dd", f"if={target}", f"of={back}", f"bs={'4k' if bs == '1M' else '1M'}", "status=none")
        run("cmp", src, back)

    # In-place patches (conv=notrunc), synchronous 4k writes, a write past
    # the end (leaves a hole): the same on a local copy, then compare.
    target = directory / "bs-4k.bin"
    local = tmp_path / "local.bin"
    shutil.copyfile(src, local)
    patch = tmp_path / "patch.bin"
    patch.write_bytes(pattern(32, 3 * MiB))
    for args in (
        ["bs=4k", "seek=1000", "count=37"],
        ["bs=1M", "seek=5", "count=2"],
        ["bs=4k", "seek=3", "count=16", "oflag=sync"],
        ["bs=1M", "seek=30", "count=1"],
    ):
        for out in (target, local):
            run("dd", f"if={patch}", f"of={out}", *args, "conv=notrunc", "status=none")
        run("cmp", local, target)
    assert target.stat().st_size == 31 * MiB
    assert sha256_file(target) == sha256_file(local)
    # And truncating with dd (no conv=notrunc): the file ends where dd stopped.
    run("dd", f"if={patch}", f"of={target}", "bs=4k", "seek=10", "count=3", "status=none")
    run("dd", f"if={patch}", f"of={local}", "bs=4k", "seek=10", "count=3", "status=none")
    assert target.stat().st_size == 13 * 4096
    run("cmp", local, target)
