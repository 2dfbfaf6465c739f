"""Tests of verified metadata copies (issue 13, A1 and A2): the content
digest every transaction records, inline data checksums, the schema check,
the choice of the working copy at mount (`prepare_working_copy`, nothing
written before every copy was checked) and the online verification of the
replicas (`Replicator.verify_replicas`).

Real ecfs databases (`create_database` + `Namespace`), their transactions
replayed with plain sqlite3 into replica files, and copies damaged the
three ways the issue produced: (a) a bit flip in one file's inline data,
generation unchanged; (b) a file's chunk rows deleted and the generation
raised; (c) a trigger that deletes every chunk row, generation raised.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from ecfs.core.errors import Unrecoverable, VolumeError
from ecfs.core.model import ChunkRef, Transaction
from ecfs.data.namespace import Namespace
from ecfs.storage.metadb.chunks import ChunkTable
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.digest import content_digest
from ecfs.storage.metadb.schema import SCHEMA, SCHEMA_VERSION, create_database, inline_checksum
from ecfs.storage.replicas import (
    CopyExpectation,
    CopyInspection,
    Replicator,
    choose_copy,
    inspect_copy,
    prepare_working_copy,
    read_generation,
    replica_path,
    resync_replicas,
)
from tests.mounting import TEST_MKFS_ARGS, MountedVolume, MountError, cli
from tests.test_replicas import FakeRunner, SyncRecorder

VOLUME_ID = str(uuid.UUID(int=0x1234))
STORE_IDS = [str(uuid.UUID(int=0x100 + i)) for i in range(3)]
EXPECT = CopyExpectation(VOLUME_ID, 2, 1, frozenset(STORE_IDS))
PARAMS = {
    "uuid": VOLUME_ID,
    "k": 2,
    "m": 1,
    "fragment_size": 65536,
    "cell_size": 4096,
    "inline_max": 4096,
}
#: Inline content of file i is INLINE % i; file i also has one chunk row.
INLINE = b"inline content of file %d, and more words to make it longer"
KINDS = ("inline-bit-flip", "chunks-deleted", "trigger")


class Clock:
    def __init__(self) -> None:
        self.now = 10**18

    def __call__(self) -> int:
        self.now += 1
        return self.now


def make_history(directory: Path, files: int = 5) -> tuple[Path, list[Transaction]]:
    """A new volume database and the transactions that create `files`
    files (inline data and one chunk row each)."""
    initial = directory / "initial.sqlite"
    create_database(initial, PARAMS, STORE_IDS, root_uid=0, root_gid=0, now_ns=1)
    work = directory / "history.sqlite"
    shutil.copyfile(initial, work)
    db = Database(work)
    shipped: list[Transaction] = []
    db.on_commit = shipped.append
    ns = Namespace(db, Clock())
    chunks = ChunkTable(db)
    for i in range(files):
        ino = ns.create(1, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0).id
        ns.set_inline_data(ino, INLINE % i)
        with db.transaction():
            chunks.put(ino, 1, ChunkRef(1000 + i, 100, (0, 1, 2)))
    db.close()
    return initial, shipped


def replica_at(initial: Path, history: list[Transaction], generation: int, path: Path) -> Path:
    """`initial` with the first `generation` transactions replayed, in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(initial, path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        for txn in history[:generation]:
            conn.execute("BEGIN")
            for sql, params in txn.statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
    finally:
        conn.close()
    return path


def damage(path: Path, kind: str) -> None:
    """Damage one copy as the issue did."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        if kind == "inline-bit-flip":
            ino, data = conn.execute(
                "SELECT id, inline_data FROM inodes WHERE inline_data IS NOT NULL LIMIT 1"
            ).fetchone()
            flipped = bytearray(data)
            flipped[3] ^= 0x04
            conn.execute("UPDATE inodes SET inline_data = ? WHERE id = ?", (bytes(flipped), ino))
        elif kind == "chunks-deleted":
            (ino,) = conn.execute("SELECT inode FROM chunks LIMIT 1").fetchone()
            conn.execute("DELETE FROM chunks WHERE inode = ?", (ino,))
            conn.execute("UPDATE replica_state SET generation = generation + 1")
        else:
            conn.execute(
                "CREATE TRIGGER evil AFTER UPDATE ON replica_state BEGIN DELETE FROM chunks; END"
            )
            conn.execute("UPDATE replica_state SET generation = generation + 1")
    finally:
        conn.close()


def inline_pattern(path: Path) -> bytes:
    """The first bytes of some inline data in the copy (to find it in the file)."""
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        (data,) = conn.execute(
            "SELECT inline_data FROM inodes WHERE inline_data IS NOT NULL LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    return bytes(data[:24])


def rows(path: Path, table: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
    finally:
        conn.close()


def three_copies(tmp_path: Path, generation: int | None = None) -> tuple[list[Path], int]:
    initial, history = make_history(tmp_path)
    top = len(history) if generation is None else generation
    paths = [
        replica_at(initial, history, top, replica_path(tmp_path / f"s{i}" / "meta"))
        for i in range(3)
    ]
    return paths, top


# ---------------------------------------------------------------- the digest


def test_every_copy_records_the_digest_of_its_rows(tmp_path: Path) -> None:
    initial, history = make_history(tmp_path)
    for generation in (0, 1, 7, len(history)):
        path = replica_at(initial, history, generation, tmp_path / f"g{generation}.sqlite")
        found = inspect_copy(path, EXPECT)
        assert found.problem is None, found.problem
        assert found.verified and found.generation == generation
    conn = sqlite3.connect(tmp_path / "history.sqlite")
    (claimed,) = conn.execute("SELECT digest FROM replica_state").fetchone()
    assert claimed == content_digest(conn)
    conn.close()


def test_a_rolled_back_transaction_leaves_the_digest(tmp_path: Path) -> None:
    initial, _ = make_history(tmp_path, files=1)
    db = Database(tmp_path / "history.sqlite")
    before = db.digest
    with pytest.raises(RuntimeError), db.transaction():
        db.write("DELETE FROM chunks")
        raise RuntimeError("abort")
    assert db.digest == before
    with db.transaction():
        db.write("DELETE FROM chunks")
    db.close()
    assert inspect_copy(tmp_path / "history.sqlite", EXPECT).verified


def test_the_digest_follows_replace_upsert_and_multi_row_writes(tmp_path: Path) -> None:
    """INSERT OR REPLACE deletes the row it replaces (counted thanks to
    recursive_triggers), an upsert updates, a DELETE may take many rows."""
    make_history(tmp_path, files=3)
    path = tmp_path / "history.sqlite"
    db = Database(path)
    ns = Namespace(db, Clock())
    chunks = ChunkTable(db)
    with db.transaction():
        chunks.put(2, 1, ChunkRef(5000, 7, (2, 1, 0)))  # replaces chunk 1000
        ns.setxattr(2, b"user.a", b"1", 0)
    with db.transaction():
        ns.setxattr(2, b"user.a", b"2", 0)  # ON CONFLICT DO UPDATE
        db.write("DELETE FROM chunks WHERE chunk_id BETWEEN ? AND ?", (1001, 1999))
    db.close()
    assert rows(path, "chunks") == [(2, 1, 5000, 7, bytes([2, 1, 0]), 0, None)]
    assert inspect_copy(path, EXPECT).verified


def test_inline_data_is_checked_on_read(tmp_path: Path) -> None:
    initial, _ = make_history(tmp_path, files=1)
    path = tmp_path / "history.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    (ino, data, checksum) = conn.execute(
        "SELECT id, inline_data, inline_checksum FROM inodes WHERE inline_data IS NOT NULL"
    ).fetchone()
    assert checksum == inline_checksum(data)
    conn.execute("UPDATE inodes SET inline_data = ? WHERE id = ?", (b"J" + data[1:], ino))
    conn.close()
    db = Database(path)
    try:
        with pytest.raises(Unrecoverable):
            Namespace(db, Clock()).inline_data(ino)
    finally:
        db.close()


# ---------------------------------------------------------------- choosing at mount


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_bad_copy_in_any_position_is_refused(
    tmp_path: Path, kind: str, bad: int, caplog: pytest.LogCaptureFixture
) -> None:
    paths, top = three_copies(tmp_path)
    good = paths[(bad + 1) % 3]
    expected = {t: rows(good, t) for t in ("inodes", "chunks")}
    damage(paths[bad], kind)
    before = {p: p.read_bytes() for p in paths}
    working = tmp_path / "working.sqlite"

    prepared = prepare_working_copy(paths, working, EXPECT)

    assert prepared.generation == top
    assert list(prepared.refused) == [paths[bad]]
    assert prepared.current == [p for p in paths if p != paths[bad]]
    assert {p: p.read_bytes() for p in paths} == before  # nothing written yet
    assert any(str(paths[bad]) in r.message and "refused" in r.message for r in caplog.records)
    for table, content in expected.items():
        assert rows(working, table) == content
    resync_replicas(prepared, working)
    assert prepared.current == paths
    for path in paths:
        assert inspect_copy(path, EXPECT).verified
        assert rows(path, "chunks") == expected["chunks"]
    aside = paths[bad].with_name(paths[bad].name + ".refused")
    assert aside.exists()  # kept for a look


def test_a_foreign_copy_with_a_huge_generation_is_refused(tmp_path: Path) -> None:
    paths, top = three_copies(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    foreign_params = {**PARAMS, "uuid": str(uuid.UUID(int=0x9999))}
    foreign = paths[1]
    foreign.unlink()
    create_database(foreign, foreign_params, STORE_IDS, root_uid=0, root_gid=0, now_ns=5)
    conn = sqlite3.connect(foreign)
    conn.execute("UPDATE replica_state SET generation = 1000000")
    conn.commit()
    conn.close()
    before = {p: p.read_bytes() for p in paths}

    prepared = prepare_working_copy(paths, tmp_path / "working.sqlite", EXPECT)

    assert prepared.generation == top
    assert "belongs to volume" in prepared.refused[foreign]
    assert {p: p.read_bytes() for p in paths} == before


def test_copies_not_listing_a_given_store_are_refused_before_any_write(tmp_path: Path) -> None:
    paths, _ = three_copies(tmp_path)
    before = {p: p.read_bytes() for p in paths}
    stranger = CopyExpectation(VOLUME_ID, 2, 1, frozenset([*STORE_IDS, str(uuid.UUID(int=7))]))
    with pytest.raises(VolumeError, match="does not list store"):
        prepare_working_copy(paths, tmp_path / "working.sqlite", stranger)
    assert {p: p.read_bytes() for p in paths} == before


def test_the_freshest_verified_copy_wins(tmp_path: Path) -> None:
    initial, history = make_history(tmp_path)
    paths = [
        replica_at(initial, history, g, replica_path(tmp_path / f"s{i}" / "meta"))
        for i, g in enumerate((3, len(history), 7))
    ]
    prepared = prepare_working_copy(paths, tmp_path / "working.sqlite", EXPECT)
    assert prepared.generation == len(history)
    assert prepared.current == [paths[1]]
    assert prepared.to_resync == [paths[0], paths[2]]
    assert prepared.refused == {}


def forge(path: Path, uid: int = 4242) -> None:
    """Change a row and record the matching digest: a copy that verifies
    but holds other contents than its peers at the same generation."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE inodes SET uid = ? WHERE id = 1", (uid,))
    conn.execute("UPDATE replica_state SET digest = ?", (content_digest(conn),))
    conn.close()


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_the_majority_wins_among_verified_copies(tmp_path: Path, bad: int) -> None:
    paths, _ = three_copies(tmp_path)
    forge(paths[bad])
    assert inspect_copy(paths[bad], EXPECT).verified
    choice = choose_copy([inspect_copy(p, EXPECT) for p in paths])
    assert choice.winner is not None and choice.winner.path != paths[bad]
    assert list(choice.refused) == [paths[bad]]
    assert "inodes" in choice.refused[paths[bad]]


@pytest.mark.parametrize("bad", [0, 1])
def test_a_tie_chooses_no_copy(tmp_path: Path, bad: int) -> None:
    paths, _ = three_copies(tmp_path)
    paths = paths[:2]
    forge(paths[bad])
    before = {p: p.read_bytes() for p in paths}
    with pytest.raises(VolumeError, match="none has a majority"):
        prepare_working_copy(paths, tmp_path / "working.sqlite", EXPECT)
    assert {p: p.read_bytes() for p in paths} == before


def test_unverifiable_copies_are_trusted_only_when_all_agree(tmp_path: Path) -> None:
    """Schema-1 copies (no digest) can be chosen, by majority, but fsck
    must not repair from them unless every copy at that generation agrees."""
    paths = [tmp_path / f"c{i}.sqlite" for i in range(3)]
    inspections = [
        CopyInspection(p, generation=9, schema=1, digest="a" * 32, claimed=None) for p in paths
    ]
    assert choose_copy(inspections).trusted
    inspections[2] = replace(inspections[2], digest="b" * 32)
    choice = choose_copy(inspections)
    assert choice.winner is not None and choice.winner.path == paths[0]
    assert not choice.trusted and list(choice.refused) == [paths[2]]
    verified = [replace(i, schema=2, claimed=i.digest) for i in inspections]
    assert choose_copy(verified).trusted


def test_copies_edited_alike_without_their_digest_are_the_last_resort(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older ecfs mounting the volume keeps no digest: every copy then
    fails its digest, but they agree. The mount uses them (warning), records
    the digest anew and rewrites them all; fsck does not repair from them."""
    paths, top = three_copies(tmp_path)
    for path in paths:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE inodes SET mtime_ns = 7 WHERE id = 1")
        conn.execute("UPDATE replica_state SET generation = generation + 1")
        conn.close()
    choice = choose_copy([inspect_copy(p, EXPECT) for p in paths])
    assert choice.winner is not None and not choice.trusted and choice.note
    working = tmp_path / "working.sqlite"
    prepared = prepare_working_copy(paths, working, EXPECT)
    assert "agree" in caplog.text and "refused" not in caplog.text
    assert prepared.generation == top + 2 and prepared.to_resync == paths
    resync_replicas(prepared, working)
    for path in paths:
        assert inspect_copy(path, EXPECT).verified
        assert rows(path, "inodes")[0][7] == 7


def test_a_single_copy_without_its_digest_is_refused(tmp_path: Path) -> None:
    paths, _ = three_copies(tmp_path)
    damage(paths[0], "inline-bit-flip")
    damage(paths[1], "chunks-deleted")
    with pytest.raises(VolumeError, match="no metadata replica can be used"):
        prepare_working_copy(paths[:2], tmp_path / "working.sqlite", EXPECT)


def test_a_schema_1_volume_is_upgraded_at_mount(tmp_path: Path) -> None:
    """Volumes made by the previous version have no digest column and no
    inline checksums: the working copy is upgraded and every copy rewritten."""
    paths = []
    for i in range(3):
        path = replica_path(tmp_path / f"s{i}" / "meta")
        path.parent.mkdir(parents=True)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.executescript(SCHEMA)
        conn.executemany(
            "INSERT INTO volume (key, value) VALUES (?, ?)",
            [(k, str(v)) for k, v in {**PARAMS, "schema": 1}.items()],
        )
        conn.executemany("INSERT INTO stores (idx, store_id) VALUES (?, ?)", enumerate(STORE_IDS))
        conn.execute("INSERT INTO replica_state (id, generation) VALUES (0, 41)")
        conn.execute(
            "INSERT INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns,"
            " inline_data) VALUES (2, ?, 0, 0, 1, 5, 1, 1, 1, ?)",
            (stat.S_IFREG | 0o644, b"hello"),
        )
        conn.close()
        paths.append(path)
    working = tmp_path / "working.sqlite"
    prepared = prepare_working_copy(paths, working, EXPECT)
    assert prepared.generation == 42
    assert prepared.current == [] and prepared.to_resync == paths
    db = Database(working)
    assert Namespace(db, Clock()).inline_data(2) == b"hello"
    db.close()
    resync_replicas(prepared, working)
    for path in paths:
        found = inspect_copy(path, EXPECT)
        assert found.verified and found.schema == SCHEMA_VERSION and found.generation == 42


def test_prepare_reports_replicas_it_cannot_rewrite(tmp_path: Path) -> None:
    paths, top = three_copies(tmp_path)
    unreachable = tmp_path / "gone" / "meta" / "ecfs-meta.sqlite"  # store root missing
    stale = paths[2]
    shutil.copyfile(tmp_path / "initial.sqlite", stale)  # generation 0
    stale.with_name(stale.name + "-wal").unlink(missing_ok=True)
    prepared = prepare_working_copy([paths[0], unreachable, stale], tmp_path / "w.sqlite", EXPECT)
    assert prepared.generation == top
    assert prepared.to_resync == [stale]
    resync_replicas(prepared, tmp_path / "w.sqlite")
    assert prepared.current == [paths[0], stale]
    assert read_generation(stale) == top
    with pytest.raises(VolumeError):
        prepare_working_copy([unreachable], tmp_path / "w2.sqlite", EXPECT)


# ---------------------------------------------------------------- online (scrub)


@pytest.mark.trio
@pytest.mark.parametrize("bad", [0, 1, 2])
async def test_verify_replicas_drops_a_bad_live_replica(tmp_path: Path, bad: int) -> None:
    initial, history = make_history(tmp_path)
    top = len(history) - 3
    targets = {
        i: replica_at(initial, history, top, replica_path(tmp_path / f"s{i}" / "meta"))
        for i in range(3)
    }
    pattern = inline_pattern(targets[bad])
    runners = {i: FakeRunner(i) for i in targets}
    replicator = Replicator(targets, runners, SyncRecorder(), top)
    stale: list[int] = []
    replicator.on_stale = stale.append
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        assert await replicator.verify_replicas() == {}  # every row now in its page cache
        # While the replicator has it open (and locked: no SQLite
        # connection can change it), the disk flips a bit in the file.
        assert flip_every(targets[bad], pattern)
        for txn in history[top:]:
            replicator.submit(txn)
        problems = await replicator.verify_replicas()
        assert list(problems) == [bad] and "digest" in problems[bad]
        assert stale == [bad] and replicator.live_replicas() == sorted({0, 1, 2} - {bad})
        await replicator.drain()  # the others go on
        assert await replicator.close_stale(bad)
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    for index, path in targets.items():
        if index != bad:
            assert inspect_copy(path, EXPECT).verified


def test_garbage_and_missing_copies_are_resynced(tmp_path: Path) -> None:
    paths, top = three_copies(tmp_path)
    paths[0].write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        paths[0].with_name(paths[0].name + suffix).unlink(missing_ok=True)
    missing = replica_path(tmp_path / "s3" / "meta")  # meta dir missing too
    (tmp_path / "s3").mkdir()
    working = tmp_path / "working.sqlite"
    prepared = prepare_working_copy([*paths, missing], working, EXPECT)
    assert "unreadable" in prepared.refused[paths[0]]
    assert prepared.to_resync == [paths[0]]  # a missing copy is not created here
    resync_replicas(prepared, working)
    assert prepared.current == paths
    assert inspect_copy(paths[0], EXPECT).verified


@pytest.mark.trio
async def test_replicator_runs_on_prepared_replicas(tmp_path: Path) -> None:
    """Mount flow: prepare, resync, then replicate on top; every copy verifies."""
    initial, history = make_history(tmp_path)
    paths = {
        0: replica_at(initial, history, 3, replica_path(tmp_path / "s0" / "meta")),
        1: replica_at(initial, history, 10, replica_path(tmp_path / "s1" / "meta")),
    }
    working = tmp_path / "working.sqlite"
    prepared = prepare_working_copy(list(paths.values()), working, EXPECT)
    resync_replicas(prepared, working)
    assert prepared.generation == 10 and prepared.current == list(paths.values())
    replicator = Replicator(paths, {i: FakeRunner(i) for i in paths}, SyncRecorder(), 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in history[10:]:
            replicator.submit(txn)
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    for path in paths.values():
        found = inspect_copy(path, EXPECT)
        assert found.verified and found.generation == len(history)


# ---------------------------------------------------------------- real mounts


def mount_copies(volume: MountedVolume) -> list[Path]:
    """The metadata replica files of a volume, in store order."""
    return [p for s in volume.stores if (p := replica_path(s / "meta")).exists()]


def flip_every(path: Path, pattern: bytes) -> int:
    """Flip one bit in every occurrence of `pattern` in the file (0 if none)."""
    if not path.exists():
        return 0
    data = bytearray(path.read_bytes())
    count, at = 0, data.find(pattern)
    while at >= 0:
        data[at + 5] ^= 0x01
        count += 1
        at = data.find(pattern, at + 1)
    if count:
        with open(path, "r+b") as f:  # in place, like a disk would
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return count


@pytest.mark.allow_log(r"metadata replica .* refused: it belongs to volume")
def test_mount_refuses_a_foreign_copy_with_a_huge_generation(
    volume: MountedVolume, tmp_path: Path
) -> None:
    """Issue 13 A1: a copy of another volume's metadata with generation
    1000000 in s1 is refused (the log says which and why), the good copies
    are used, and the foreign one is kept aside, never copied over them."""
    (volume.mountpoint / "keep").write_bytes(b"keep me\n")
    volume.unmount()
    other = [tmp_path / "other" / f"s{i}" for i in range(3)]
    (tmp_path / "other").mkdir()
    cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *other)
    copies = mount_copies(volume)
    foreign = copies[1]
    for suffix in ("-wal", "-shm"):
        foreign.with_name(foreign.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(replica_path(other[0] / "meta"), foreign)
    conn = sqlite3.connect(foreign)
    conn.execute("UPDATE replica_state SET generation = 1000000")
    conn.commit()
    conn.close()

    volume.mount()
    assert (volume.mountpoint / "keep").read_bytes() == b"keep me\n"
    log = volume.log_text()
    assert f"metadata replica {foreign} refused: it belongs to volume" in log
    volume.unmount()
    for path in mount_copies(volume):
        found = inspect_copy(path)
        assert found.verified and found.generation < 1000000, found
    aside = foreign.with_name(foreign.name + ".refused")
    assert read_generation(aside) == 1000000


@pytest.mark.allow_log(r"metadata replica .* refused", r"no metadata replica can be used")
def test_a_mount_that_fails_writes_no_copy(volume: MountedVolume, tmp_path: Path) -> None:
    """Issue 13 A1: with no usable copy (a foreign one with a huge
    generation, the other two carrying a trigger) the mount fails and
    every copy is left exactly as it was."""
    volume.unmount()
    other = [tmp_path / "other" / f"s{i}" for i in range(3)]
    (tmp_path / "other").mkdir()
    cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *other)
    copies = mount_copies(volume)
    shutil.copyfile(replica_path(other[0] / "meta"), copies[1])
    conn = sqlite3.connect(copies[1])
    conn.execute("UPDATE replica_state SET generation = 1000000")
    conn.commit()
    conn.close()
    for path in (copies[0], copies[2]):
        damage(path, "trigger")
    before = {p: p.read_bytes() for p in copies}
    with pytest.raises(MountError):
        volume.mount()
    assert {p: p.read_bytes() for p in copies} == before
    assert "no metadata replica can be used" in volume.log_text()


@pytest.mark.allow_log(r"metadata replica .* refused: its rows do not give the digest")
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_bit_flip_in_inline_data_is_never_served(volume: MountedVolume, bad: int) -> None:
    """Issue 13 A2 (a) on a real mount: one bit of a small file's inline
    data flipped in one copy (generation unchanged; s0 would win a tie):
    the copy is refused, the right bytes are served, every copy is
    rewritten from the good ones."""
    content = b"small file content %d, never to be served wrong\n" % bad
    (volume.mountpoint / "small").write_bytes(content)
    volume.unmount()
    copies = mount_copies(volume)
    assert flip_every(copies[bad], content[:24]) >= 1
    volume.mount()
    assert (volume.mountpoint / "small").read_bytes() == content
    assert f"metadata replica {copies[bad]} refused" in volume.log_text()
    volume.unmount()
    for path in copies:
        assert inspect_copy(path).verified
    volume.mount()


def wait_metadata_settled(volume: MountedVolume, timeout: float = 30.0) -> None:
    """Wait until the mount's metadata is durable on every replica and no
    commit came for a while (deferred attribute write-backs come ~0.2 s
    after a close, then the 1 s commit interval): polled, never timed."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        meta = json.loads(cli("status", "--json", volume.mountpoint).stdout)["metadata"]
        now = (meta["generation"], meta["durable_generation"])
        if now == last and now[0] == now[1]:
            return
        last = now
        time.sleep(1.5)
    raise AssertionError(f"the metadata did not settle: {last}")


@pytest.mark.allow_log(r"failed verification", r"metadata replica on store \d is stale")
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_scrub_replaces_a_bad_replica_while_mounted(shared_volume: MountedVolume, bad: int) -> None:
    """Issue 13 A2: scrub verifies every metadata replica online and
    replaces a bad one from the working copy."""
    volume = shared_volume
    content = b"scrubbed small file %d: metadata replicas are verified online\n" % bad
    path = volume.mountpoint / f"scrubbed-{bad}"
    path.write_bytes(content)
    copy = mount_copies(volume)[bad]
    deadline = time.monotonic() + 10  # the commit interval ships it within ~1 s
    while content[:24] not in copy.read_bytes() + Path(f"{copy}-wal").read_bytes():
        assert time.monotonic() < deadline, "the content never reached the replica"
        time.sleep(0.1)
    wait_metadata_settled(volume)  # no later write may heal the flip
    assert sum(flip_every(Path(f"{copy}{s}"), content[:24]) for s in ("", "-wal"))
    result = cli("scrub", "--json", volume.mountpoint, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [finding] = report["metadata_findings"]
    assert finding["store"] == bad and "digest" in finding["problem"]
    status = json.loads(cli("status", "--json", volume.mountpoint).stdout)
    assert len(status["metadata"]["live_replicas"]) == 3, status["metadata"]
    again = json.loads(cli("scrub", "--json", volume.mountpoint).stdout)
    assert again["metadata_findings"] == [] and again["metadata_replicas_verified"] == 3
    assert path.read_bytes() == content


@pytest.mark.allow_log(r"failed verification", r"metadata replica on store \d is stale")
@pytest.mark.parametrize("kind", ["chunks-deleted", "trigger"])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_scrub_replaces_a_replica_changed_behind_its_back(
    shared_volume: MountedVolume, tmp_path: Path, kind: str, bad: int
) -> None:
    """Issue 13 A2 (b) and (c) while mounted: rows deleted with the
    generation raised, or a trigger added, in one live replica.

    The daemon holds its replicas in exclusive locking mode (no mapped
    -shm: no SIGBUS when a disk fails), so no SQLite connection can open a
    live replica any more: the edit is refused. What can still change one
    behind the daemon's back is a file put in its place (its WAL removed),
    here an edited copy of it, which scrub must read, not the daemon's
    open file."""
    volume = shared_volume
    big = volume.mountpoint / f"big-{kind}-{bad}"
    data = os.urandom(600_000)
    with open(big, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())  # its chunk rows are on every replica
    copy = mount_copies(volume)[bad]
    intruder = sqlite3.connect(copy, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            intruder.execute("SELECT count(*) FROM chunks").fetchone()
    finally:
        intruder.close()
    edited = tmp_path / copy.name
    for suffix in ("", "-wal"):  # the committed frames are a consistent copy
        shutil.copyfile(f"{copy}{suffix}", f"{edited}{suffix}")
    damage(edited, kind)  # then checkpointed into it on close: no side file
    os.replace(edited, copy)
    Path(f"{copy}-wal").unlink()  # the replaced file's WAL goes with it
    result = cli("scrub", "--json", volume.mountpoint, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    [finding] = json.loads(result.stdout)["metadata_findings"]
    store = int(copy.parent.parent.name[1:])
    assert finding["store"] == store, finding
    deadline = time.monotonic() + 10
    while True:  # replaced from the working copy (the live copy is locked: ask the daemon)
        status = json.loads(cli("status", "--json", volume.mountpoint).stdout)
        if len(status["metadata"]["live_replicas"]) == 3:
            break
        assert time.monotonic() < deadline, status["metadata"]
        time.sleep(0.1)
    again = json.loads(cli("scrub", "--json", volume.mountpoint).stdout)
    assert again["metadata_findings"] == [] and again["metadata_replicas_verified"] == 3
    assert big.read_bytes() == data


def downgrade_to_schema_1(path: Path) -> None:
    """Rewrite a replica as the previous ecfs version made it (schema 1:
    no digest, no inline checksums), rows unchanged."""
    old = path.with_name("schema2.sqlite")
    shutil.move(path, old)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(SCHEMA)
        conn.execute("ATTACH DATABASE ? AS new", (str(old),))
        conn.execute("BEGIN")
        tables = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
            rowid = "rowid, " if table == "dentries" else ""
            names = rowid + ", ".join(columns)
            conn.execute(f"INSERT INTO main.{table} ({names}) SELECT {names} FROM new.{table}")
        conn.execute("UPDATE main.volume SET value = '1' WHERE key = 'schema'")
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE new")
    finally:
        conn.close()
    old.unlink()


@pytest.mark.allow_log(r"metadata upgraded from schema 1")
def test_a_volume_of_the_previous_version_is_upgraded_at_mount(volume: MountedVolume) -> None:
    files = {"small": b"small and inline\n", "big": os.urandom(700_000)}
    for name, data in files.items():
        (volume.mountpoint / name).write_bytes(data)
    volume.unmount()
    copies = mount_copies(volume)
    generations = set()
    for path in copies:
        downgrade_to_schema_1(path)
        found = inspect_copy(path)
        assert found.problem is None and found.schema == 1
        generations.add(found.generation)
    volume.mount()
    assert f"metadata upgraded from schema 1 to {SCHEMA_VERSION}" in volume.log_text()
    for name, data in files.items():
        assert (volume.mountpoint / name).read_bytes() == data
    volume.unmount()
    for path in copies:
        found = inspect_copy(path)
        assert found.verified and found.schema == SCHEMA_VERSION
        assert found.generation > max(generations)
        conn = sqlite3.connect(path)  # the tables schemas 2 and 3 add are there
        try:
            for table in ("pending_deletions", "write_log", "restripe"):
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        finally:
            conn.close()
    from ecfs.volume.fsck import run_fsck

    report = run_fsck([str(s) for s in volume.stores], repair=False, verify_data=True)
    assert report.clean, [f.message for f in report.findings]
    volume.mount()
