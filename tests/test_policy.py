"""Redundancy per directory (issue 18): policies set on directories, chunks
of mixed codings through every data path, and restripe, on real mounts.

The volume is the usual 6-store k=4 m=2 one (chunk size 4 x 128 KiB).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ecfs.core.fragment import parse_header
from ecfs.data.restripe import MAX_GARBAGE
from ecfs.storage.replicas import replica_path
from ecfs.storage.store import DirectoryStore
from ecfs.volume.fsck import run_fsck
from tests.mounting import MountedVolume, cli
from tests.test_repair import run_scrub, wait_for, wait_repaired
from tests.volume_files import (
    drop_caches,
    fragment_files,
    sha256_file,
    status,
    write_pattern_file,
)

CHUNK = 4 * 128 * 1024


def query(volume: MountedVolume, sql: str, params: tuple[object, ...] = ()) -> list:
    """Rows of the first metadata replica (the volume must be unmounted)."""
    path = next(p for s in volume.stores if (p := replica_path(DirectoryStore(s).meta_dir)).exists())
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def codings(volume: MountedVolume, ino: int) -> set[tuple[int, int]]:
    """(k, n) of every chunk of inode `ino` (k NULL: the volume's 4)."""
    rows = query(volume, "SELECT k, length(stores) FROM chunks WHERE inode = ?", (ino,))
    return {(k or 4, n) for k, n in rows}


def fsck_clean(volume: MountedVolume) -> None:
    report = run_fsck([str(s) for s in volume.stores], repair=False, verify_data=True)
    assert report.clean, [f.message for f in report.findings]


def effective(path: Path) -> dict:
    return json.loads(os.getxattr(path, "user.ecfs.policy.effective"))


def test_a_policy_applies_to_files_created_below_and_get_names_its_source(
    volume: MountedVolume,
) -> None:
    root = volume.mountpoint
    (root / "photos" / "2024").mkdir(parents=True)
    (root / "hot").mkdir()
    (root / "plain").mkdir()
    out = cli("policy", "set", root / "photos", "2+2").stdout
    assert "2+2" in out
    os.setxattr(root / "hot", "user.ecfs.policy", b"1+2")  # the xattr works the same
    assert os.getxattr(root / "hot", "user.ecfs.policy") == b"1+2"
    assert effective(root / "photos" / "2024") == {
        "k": 2, "m": 2, "source": "/photos", "volume": "4+2", "stores": 6,
    }  # fmt: skip
    got = cli("policy", "get", root / "photos" / "2024").stdout
    assert "2+2" in got and "set on /photos" in got
    assert "4+2" in cli("policy", "get", root / "plain").stdout
    assert "volume's default" in cli("policy", "get", root / "plain").stdout
    hashes = {
        "photos/2024/a.raw": write_pattern_file(root / "photos/2024/a.raw", 1, 3 * CHUNK + 999),
        "hot/tiny": write_pattern_file(root / "hot/tiny", 2, CHUNK + 5),
        "plain/b": write_pattern_file(root / "plain/b", 3, 2 * CHUNK),
    }
    inodes = {name: os.stat(root / name).st_ino for name in hashes}
    # Moving a file keeps its chunks; new chunks follow its new place.
    shutil.move(root / "plain/b", root / "photos/b")
    with open(root / "photos/b", "ab") as f:
        f.write(b"x" * CHUNK)
    hashes["photos/b"] = sha256_file(root / "photos/b")
    del hashes["plain/b"]
    inodes["photos/b"] = inodes.pop("plain/b")
    assert "set on /photos" in cli("policy", "get", root / "photos/b").stdout
    cli("policy", "clear", root / "hot")
    assert effective(root / "hot")["source"] is None
    # A moved directory follows its new place too (the policy of a tree is
    # looked up when a chunk is written, see ecfs.data.policy).
    assert effective(root / "plain")["source"] is None
    os.rename(root / "plain", root / "photos" / "plain")
    assert effective(root / "photos" / "plain")["source"] == "/photos"
    volume.unmount()
    assert codings(volume, inodes["photos/2024/a.raw"]) == {(2, 4)}
    assert codings(volume, inodes["hot/tiny"]) == {(1, 3)}
    assert codings(volume, inodes["photos/b"]) == {(4, 6), (2, 4)}
    # The fragment files say the same (k, m in their headers).
    [(chunk_id,)] = query(
        volume, "SELECT chunk_id FROM chunks WHERE inode = ? AND idx = 0", (inodes["hot/tiny"],)
    )
    found = [
        parse_header(path.read_bytes()[:4096])
        for store in volume.stores
        for (cid, _), path in fragment_files(store).items()
        if cid == chunk_id
    ]
    assert len(found) == 3 and {(h.k, h.m) for h in found} == {(1, 2)}
    fsck_clean(volume)
    volume.mount()
    drop_caches()
    for name, digest in hashes.items():
        assert sha256_file(root / name) == digest, name


@pytest.mark.allow_log(r"policy .* refused", r"can be set on directories only")
def test_a_policy_the_stores_cannot_satisfy_is_refused(volume: MountedVolume) -> None:
    root = volume.mountpoint
    (root / "d").mkdir()
    (root / "f").write_bytes(b"x")
    result = cli("policy", "set", root / "d", "5+2", check=False)
    assert result.returncode == 1
    assert "5+2 needs 7 stores" in result.stderr and "6 active" in result.stderr
    for bad in (b"5+2", b"0+2", b"2+0", b"two", b"200+100"):
        with pytest.raises(OSError) as caught:
            os.setxattr(root / "d", "user.ecfs.policy", bad)
        assert caught.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as caught:
        os.setxattr(root / "f", "user.ecfs.policy", b"2+2")
    assert caught.value.errno == errno.EINVAL
    result = cli("policy", "set", root / "d", "0+1", check=False)
    assert result.returncode != 0 and "between 1 and" in result.stderr
    assert effective(root / "d")["source"] is None
    assert "had no policy" in cli("policy", "clear", root / "d").stdout
    with pytest.raises(OSError):
        os.setxattr(root / "d", "user.ecfs.policy.effective", b"{}")


@pytest.mark.allow_log(
    r"unreadable", r"queued for repair", r"store \d+", r"fragment", r"missing", r"rebuil",
    r"degraded", r"not found",
)
def test_mixed_policies_survive_a_lost_store_repair_scrub_and_fsck(volume: MountedVolume) -> None:
    root = volume.mountpoint
    for name, policy in (("two", "2+2"), ("copies", "1+2"), ("wide", "3+3"), ("deflt", None)):
        (root / name).mkdir()
        if policy:
            cli("policy", "set", root / name, policy)
    hashes = {}
    for i, name in enumerate(("two", "copies", "wide", "deflt")):
        for j, size in enumerate((CHUNK // 3, 2 * CHUNK + 12345)):
            path = root / name / f"f{j}"
            hashes[path] = write_pattern_file(path, 10 * i + j, size)
    scrub = run_scrub(volume)
    assert scrub["finding_count"] == 0
    volume.unmount()
    fsck_clean(volume)
    lost = volume.stores[0]
    for path in fragment_files(lost).values():
        path.unlink()
    volume.mount()
    drop_caches()
    for path, digest in hashes.items():  # degraded reads
        assert sha256_file(path) == digest, path
    run_scrub(volume)
    cli("repair", "--wait", root)
    wait_repaired(volume)
    volume.unmount()
    fsck_clean(volume)
    volume.mount()
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


def _restripe_state(volume: MountedVolume) -> dict | None:
    return status(volume).get("restripe")


def _keep_busy(root: Path) -> tuple[threading.Event, threading.Thread]:
    """A thread reading a file past the page cache every 10 ms until the
    event is set: background work yields to it, so it goes slowly."""
    busy = root / "busy"
    busy.write_bytes(os.urandom(CHUNK))
    stop = threading.Event()

    def foreground() -> None:
        while not stop.is_set():
            try:
                fd = os.open(busy, os.O_RDONLY)
                try:  # past the page cache: the reads reach the daemon
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.pread(fd, 4096, 0)
                finally:
                    os.close(fd)
            except OSError:
                pass
            time.sleep(0.01)

    reader = threading.Thread(target=foreground, daemon=True)
    reader.start()
    return stop, reader


def _stores_bytes(volume: MountedVolume) -> int:
    """Bytes of fragment files on the stores now (files may vanish meanwhile)."""
    total = 0
    for store in volume.stores:
        for dirpath, _, names in os.walk(store / "frags"):
            for name in names:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def test_restripe_killed_midway_resumes_after_remount(volume: MountedVolume) -> None:
    """A tree restriped from 4+2 to 2+2, the daemon killed (-9) midway,
    remounted: the restripe resumes from where it was and ends; every file
    reads back, every chunk is 2+2, and the extra space seen during the
    restripe stays a few chunks. The kill leaves no orphan: right after it
    fsck finds at most fragments the volume remembers (warnings), and once
    the restripe is done fsck (no --repair) finds nothing at all."""
    root = volume.mountpoint
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    hashes = {}
    for i in range(12):
        path = tree / ("sub" if i % 2 else ".") / f"f{i}"
        hashes[path] = write_pattern_file(path, 100 + i, 3 * CHUNK + 1000 * i)
    chunks_total = sum(-(-os.stat(p).st_size // CHUNK) for p in hashes)
    cli("policy", "set", tree, "2+2")
    before = _stores_bytes(volume)
    stop, reader = _keep_busy(root)  # the restripe yields (and is slow enough to kill)
    peak = before
    try:
        cli("restripe", tree)
        state = _restripe_state(volume)
        assert state is not None and state["chunks_total"] == chunks_total

        def midway() -> dict | None:
            nonlocal peak
            peak = max(peak, _stores_bytes(volume))
            s = _restripe_state(volume)
            return s if s and 3 <= s["chunks_done"] else None

        wait_for(midway, 120.0, "the restripe to be under way")
        assert _restripe_state(volume)["roots"] == 1
        volume.kill()
    finally:
        stop.set()
        reader.join()
    killed = run_fsck([str(s) for s in volume.stores], repair=False, verify_data=False)
    assert killed.clean, [f.message for f in killed.findings]
    volume.mount()
    s = _restripe_state(volume)
    # What the kill lost of the last transactions (not yet on the
    # replicas) is done again; the rest is not.
    assert s is not None and s["roots"] == 1 and s["chunks_done"] < chunks_total

    def finished() -> dict | None:
        nonlocal peak
        peak = max(peak, _stores_bytes(volume))
        s = _restripe_state(volume)
        return s if s and not s["roots"] else None

    wait_for(finished, 300.0, "the restripe to finish")
    assert "restripe" not in cli("status", root).stdout or "skipped" not in cli("status", root).stdout
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path
    inodes = [os.stat(p).st_ino for p in hashes]
    volume.unmount()
    for ino in inodes:
        assert codings(volume, ino) == {(2, 4)}, ino
    report = run_fsck([str(s) for s in volume.stores], repair=False, verify_data=True)
    assert report.clean, [f.message for f in report.findings]
    orphans = [f.message for f in report.findings if f.check == "no_orphan_fragments"]
    assert not orphans and not report.counts["orphan_fragments"], orphans
    assert query(volume, "SELECT COUNT(*) FROM pending_deletions") == [(0,)]
    after = _stores_bytes(volume)
    extra = peak - max(before, after)
    print(f"restripe: before {before} after {after} peak {peak}: extra {extra} bytes")
    # Bounded, whatever the tree: one chunk in flight (2+2: 4 x 256 KiB) and
    # at most MAX_GARBAGE replaced 4+2 versions (6 x 128 KiB) waiting for
    # the collector; the kill may leave as much again (deleted by the next
    # mount), which the peak after the remount counts too.
    old_version = 6 * (128 * 1024 + 4096)  # fragments with their headers
    assert extra <= 2 * ((MAX_GARBAGE + 1) * old_version + 2 * CHUNK), extra
    volume.mount()


def _converted(volume: MountedVolume) -> int:
    """Chunks coded 2+2 (the volume must be unmounted)."""
    return query(volume, "SELECT COUNT(*) FROM chunks WHERE k = 2")[0][0]


def test_repair_pause_stops_a_running_restripe_across_a_remount(volume: MountedVolume) -> None:
    """`ecfs repair --pause` stops a restripe under way: no chunk is
    converted while paused, not after a remount either, and status says
    why; `--resume` lets it finish, and fsck is clean."""
    root = volume.mountpoint
    tree = root / "tree"
    tree.mkdir()
    hashes = {
        tree / f"f{i}": write_pattern_file(tree / f"f{i}", 500 + i, 3 * CHUNK) for i in range(10)
    }
    cli("policy", "set", tree, "2+2")
    stop, reader = _keep_busy(root)
    try:
        cli("restripe", tree)
        wait_for(
            lambda: (s := _restripe_state(volume)) and s["chunks_done"] >= 2, 120.0,
            "the restripe to be under way",
        )  # fmt: skip
        assert "paused" in cli("repair", "--pause", root).stdout
    finally:
        stop.set()
        reader.join()
    time.sleep(1.0)  # the chunk in flight at the pause may still finish
    held = _restripe_state(volume)
    time.sleep(3.0)  # not busy any more: a running restripe would get far now
    assert _restripe_state(volume) == held, "the restripe went on while paused"
    assert held["roots"] == 1 and held["chunks_done"] < held["chunks_total"] == 30
    assert "paused on purpose" in cli("status", root, check=False).stdout
    volume.unmount()
    converted = _converted(volume)
    assert 2 <= converted < 30
    volume.mount()
    assert status(volume)["background"]["paused"]
    time.sleep(3.0)
    again = _restripe_state(volume)
    assert again["roots"] == 1 and again["chunks_done"] < 30
    volume.unmount()
    assert _converted(volume) == converted, "the restripe went on after the remount"
    volume.mount()
    assert "resumed" in cli("repair", "--resume", root).stdout
    wait_for(lambda: not _restripe_state(volume)["roots"], 120.0, "the restripe to finish")
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path
    volume.unmount()
    assert _converted(volume) == 30
    fsck_clean(volume)
    volume.mount()


def test_a_chunk_layout_keeps_the_volume_chunk_size() -> None:
    from ecfs.core.codec import Codec
    from ecfs.core.geometry import Layout
    from ecfs.core.model import ChunkRef

    volume = Layout(4, 2, 128 * 1024, 4096)
    assert volume.of(ChunkRef(1, 10, (0,) * 6)) is volume
    for k, m in ((1, 2), (2, 2), (3, 3), (8, 3), (5, 1)):
        layout = volume.of(ChunkRef(1, 10, (0,) * (k + m), k))
        assert (layout.k, layout.m, layout.chunk_size) == (k, m, volume.chunk_size)
        assert layout.fragment_size % 4096 == 0
        assert layout.payload_length(volume.chunk_size) <= layout.fragment_size
        data = os.urandom(volume.chunk_size - 7)
        payloads = Codec.of(k, m).encode(data)
        assert len(payloads) == k + m
        assert len(payloads[0]) == layout.payload_length(len(data))
        lost = {i: p for i, p in enumerate(payloads) if i >= m}  # any k survive
        rebuilt = Codec.of(k, m).decode(lost, range(k))
        assert b"".join(rebuilt[i] for i in range(k))[: len(data)] == data
    with pytest.raises(ValueError):
        volume.of(ChunkRef(1, 10, (0,) * 3, 3))  # no parity fragment: not a coding


def upgraded_from(path: Path, version: int, statements: list[tuple[str, tuple]]) -> sqlite3.Connection:
    """A schema-`version` database (1 to 3) at generation 7 with the rows
    `statements` insert, upgraded by `upgrade_database` (to generation 8,
    the current schema, its digest recorded anew): a connection to it."""
    from ecfs.storage.metadb import schema
    from ecfs.storage.metadb.digest import content_digest

    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(schema.SCHEMA)
    if version >= 2:
        schema._add_schema_2(conn)
    if version >= 3:
        conn.executescript(schema.SCHEMA_3_DDL)
    conn.execute("INSERT INTO volume (key, value) VALUES ('schema', ?)", (str(version),))
    conn.execute("INSERT INTO replica_state (id, generation) VALUES (0, 7)")
    for sql, params in statements:
        conn.execute(sql, params)
    assert schema.schema_version(conn) == version
    conn.close()
    assert schema.upgrade_database(path) == 8
    conn = sqlite3.connect(path)
    assert schema.schema_version(conn) == schema.SCHEMA_VERSION
    (digest,) = conn.execute("SELECT digest FROM replica_state").fetchone()
    assert digest == content_digest(conn)
    return conn


def test_a_schema_2_database_is_upgraded_to_the_current_one(tmp_path: Path) -> None:
    from ecfs.storage.metadb import schema

    conn = upgraded_from(
        tmp_path / "meta.sqlite", 2,
        [("INSERT INTO chunks (inode, idx, chunk_id, length, stores) VALUES (2, 0, 5, 9, ?)",
          (bytes(range(6)),))],
    )  # fmt: skip
    try:
        assert schema.schema_version(conn) == schema.SCHEMA_VERSION == 4
        assert conn.execute("SELECT k FROM chunks").fetchall() == [(None,)]
        assert conn.execute("SELECT value FROM volume WHERE key = 'schema'").fetchone() == ("4",)
    finally:
        conn.close()


@pytest.mark.allow_log(
    r"restripe of chunk .* skipped", r"unreadable", r"UNRECOVERABLE", r"fewer than", r"queued"
)
def test_restripe_skips_an_unreadable_chunk_and_converts_the_rest(volume: MountedVolume) -> None:
    root = volume.mountpoint
    (root / "t").mkdir()
    hashes = {
        root / "t" / f"f{i}": write_pattern_file(root / "t" / f"f{i}", 300 + i, 2 * CHUNK)
        for i in range(4)
    }
    bad_ino = os.stat(root / "t" / "f1").st_ino
    volume.unmount()
    [(chunk_id,)] = query(
        volume, "SELECT chunk_id FROM chunks WHERE inode = ? AND idx = 1", (bad_ino,)
    )
    lost = 0
    for store in volume.stores:  # 3 of its 6 fragments: fewer than k=4 left
        for (cid, _), path in fragment_files(store).items():
            if cid == chunk_id and lost < 3:
                path.unlink()
                lost += 1
    volume.mount()
    cli("policy", "set", root / "t", "2+2")
    cli("restripe", root / "t")

    def done() -> dict | None:
        s = _restripe_state(volume)
        return s if s and not s["roots"] and s["skipped"] == 1 else None

    found = wait_for(done, 120.0, "the restripe to finish around the bad chunk")
    [where] = found["skipped_ranges"]
    assert where.startswith(f"/t/f1 bytes [{CHUNK}, {2 * CHUNK})"), where
    assert "skipped" in cli("status", root, check=False).stdout
    drop_caches()
    for path, digest in hashes.items():
        if path.name != "f1":
            assert sha256_file(path) == digest, path
    inodes = {path.name: os.stat(path).st_ino for path in hashes}
    volume.unmount()
    for name, ino in inodes.items():
        expected = {(2, 4), (4, 6)} if name == "f1" else {(2, 4)}
        assert codings(volume, ino) == expected, name
    volume.mount()


# ---- yielding to foreground requests (in-process)


@pytest.mark.trio
async def test_wait_until_idle_waits_for_a_gap_but_never_longer_than_its_patience(
    autojump_clock: object,
) -> None:
    """What restripe (and scrub) call before each chunk: with requests
    seen just now it waits, in steps of the gap, up to its patience; with
    none for longer than the gap it returns at once."""
    import trio

    from ecfs.core.tasks import wait_until_idle

    start = trio.current_time()
    await wait_until_idle(lambda: 0.0, 0.05, 1.0)  # idle for ages: no wait
    assert trio.current_time() == start
    await wait_until_idle(time.monotonic, 0.05, 1.0)  # always busy: the whole patience
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.mark.trio
async def test_restripe_asks_for_a_gap_in_foreground_requests_before_each_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restripe yields to the mount's own requests: before every chunk it
    waits for a gap in them (`wait_until_idle` on filedata's last activity),
    so a busy volume converts slowly instead of competing."""
    import trio

    from ecfs.data import restripe
    from ecfs.data.policy import POLICY_XATTR
    from ecfs.storage.metadb.schema import ROOT_INODE
    from tests.inprocess import CHUNK as RIG_CHUNK
    from tests.inprocess import make_rig

    rig = make_rig(tmp_path)
    volume = rig.volume
    await volume.refresh_usage()
    for i in range(3):
        await rig.store_file(os.urandom(RIG_CHUNK), name=b"f%d" % i)
    volume.namespace.setxattr(ROOT_INODE, POLICY_XATTR, b"2+2")
    asked: list[float] = []

    async def recording_wait(last_activity, gap, patience):  # type: ignore[no-untyped-def]
        asked.append(last_activity())
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(restripe, "wait_until_idle", recording_wait)
    volume.filedata.last_activity = 1234.5  # the mount's last request
    volume.restriper.start(ROOT_INODE)
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.restriper.run)
        with trio.fail_after(60):
            while volume.restriper.statistics().roots:  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert len(asked) >= 3 and set(asked) == {1234.5}
    assert {volume.filedata.chunks.get(ino, 0).k for ino in _inodes(volume)} == {2}
    volume.close()


def _inodes(volume) -> list[int]:  # type: ignore[no-untyped-def]
    from ecfs.storage.metadb.schema import ROOT_INODE

    return [volume.namespace.lookup(ROOT_INODE, b"f%d" % i).id for i in range(3)]
