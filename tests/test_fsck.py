"""fsck: every check has a corrupt -> detect -> repair -> clean test on a real
volume (built and filled through the real CLI and a real mount, then damaged
on its stores while unmounted), plus the volume lock.

Each test ends by remounting and comparing file contents with the hashes
taken when they were written.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from ecfs.core.errors import VolumeError
from ecfs.core.model import REPAIR_REASONS, repair_priority
from ecfs.storage.lock import LOCK_NAME, VolumeLock
from ecfs.storage.metadb.digest import content_digest
from ecfs.storage.replicas import replica_path
from ecfs.storage.store import DirectoryStore
from ecfs.volume.fsck import COUNT_KEYS, FsckReport, run_fsck
from tests.mounting import TEST_MKFS_ARGS, MountedVolume, cli
from tests.test_metadata_copies import KINDS, damage, forge
from tests.test_repair import wait_repaired
from tests.volume_files import (
    PAYLOAD_OFFSET,
    drop_caches,
    fragment_files,
    sha256_file,
    write_pattern_file,
)

K, M = 4, 2
CHUNK = K * 128 * 1024


# --- helpers -----------------------------------------------------------------


def populate(volume: MountedVolume) -> dict[str, str]:
    """Files of several shapes; relative path -> sha256."""
    root = volume.mountpoint
    hashes = {}
    (root / "dir" / "sub").mkdir(parents=True)
    for name, seed, size in [
        ("big", 1, 3 * CHUNK + 999),
        ("dir/medium", 2, CHUNK + 5),
        ("dir/sub/exact", 3, 2 * CHUNK),
        ("small", 4, 1000),  # inline
    ]:
        hashes[name] = write_pattern_file(root / name, seed=seed, size=size)
    os.symlink("big", root / "link")
    os.link(root / "dir" / "medium", root / "hardlink")
    hashes["hardlink"] = hashes["dir/medium"]
    os.setxattr(root / "big", "user.colour", b"blue")
    return hashes


def check_contents(volume: MountedVolume, hashes: dict[str, str]) -> None:
    """Mount, compare every file with its hash (and the other shapes)."""
    if not volume.is_mounted:
        volume.mount()
    drop_caches()
    root = volume.mountpoint
    for name, digest in hashes.items():
        assert sha256_file(root / name) == digest, name
    if (root / "link").is_symlink():
        assert os.readlink(root / "link") == "big"


def fsck(volume: MountedVolume, *, repair: bool = False, verify: bool = True) -> FsckReport:
    stages: list[str] = []
    report = run_fsck(
        [str(s) for s in volume.stores],
        repair=repair,
        verify_data=verify,
        progress=lambda stage, done, total: stages.append(stage),
    )
    assert set(stages) >= {"replicas", "namespace", "chunks", "orphans"}
    return report


def messages(report: FsckReport, check: str) -> list[str]:
    return [f.message for f in report.findings if f.check == check]


def assert_clean(volume: MountedVolume) -> FsckReport:
    report = fsck(volume, verify=True)
    assert report.clean, [f.message for f in report.findings]
    assert report.exit_status == 0
    assert not report.errors and not report.unrecoverable
    return report


def detect_and_repair(volume: MountedVolume, check: str, *, verify: bool = True) -> FsckReport:
    """fsck finds problems of `check` (and changes nothing), fsck --repair
    fixes them all, and a third run finds the volume clean."""
    before = snapshot(volume)
    found = fsck(volume, verify=verify)
    assert not found.clean and found.exit_status == 1
    assert messages(found, check), [f.message for f in found.findings]
    assert not any(f.fixed for f in found.findings)
    assert snapshot(volume) == before, "fsck without --repair changed the stores"
    repaired = fsck(volume, repair=True, verify=verify)
    assert repaired.exit_status == 1  # problems were found, even if all fixed
    assert messages(repaired, check)
    assert repaired.all_fixed, [f.message for f in repaired.findings if not f.fixed]
    assert_clean(volume)
    return found


def snapshot(volume: MountedVolume) -> dict[str, tuple[int, bytes]]:
    """Every file on the stores with its size and content, to prove a
    read-only fsck changes nothing; except the lock file and the side files
    SQLite creates to read a WAL-mode database (-shm, and an empty -wal)."""
    files = {}
    for store in volume.stores:
        for path in sorted(store.rglob("*")):
            if not path.is_file() or path.name == LOCK_NAME or path.name.endswith("-shm"):
                continue
            if path.name.endswith("-wal") and path.stat().st_size == 0:
                continue
            files[str(path)] = (path.stat().st_size, path.read_bytes())
    return files


def replicas(volume: MountedVolume) -> list[Path]:
    return [p for s in volume.stores if (p := replica_path(DirectoryStore(s).meta_dir)).exists()]


def edit_replicas(volume: MountedVolume, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Apply the same SQL to every replica (as if the volume had been left
    that way by ecfs itself): the replicas still agree with each other and
    each records the digest of its rows."""
    for path in replicas(volume):
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("UPDATE replica_state SET digest = ?", (content_digest(conn),))
            conn.execute("COMMIT")
        finally:
            conn.close()


def query_replica(volume: MountedVolume, sql: str, params: tuple[object, ...] = ()) -> list:
    conn = sqlite3.connect(replicas(volume)[0])
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def chunk_of(volume: MountedVolume, name: bytes, idx: int) -> tuple[int, list[int]]:
    """(chunk id, store number of each fragment) of chunk idx of root entry `name`."""
    [(chunk_id, stores)] = query_replica(
        volume,
        "SELECT c.chunk_id, c.stores FROM chunks AS c JOIN dentries AS d ON d.inode = c.inode"
        " WHERE d.parent = 1 AND d.name = ? AND c.idx = ?",
        (name, idx),
    )
    return chunk_id, list(stores)


def fragment_path(volume: MountedVolume, chunk_id: int, index: int, store_no: int) -> Path:
    store = DirectoryStore(volume.stores[store_no])
    return store.path / store.fragment_relpath(chunk_id, index)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- a clean volume ------------------------------------------------------------


def test_a_fresh_volume_is_clean(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    report = assert_clean(volume)
    counts = report.counts
    assert counts["stores"] == 6 and counts["stores_missing"] == 0
    assert counts["chunks"] == 4 + 2 + 2  # 'small' is inline
    assert counts["fragments_checked"] == counts["chunks"] * (K + M)
    assert counts["bytes_verified"] >= (3 * CHUNK + CHUNK + 2 * CHUNK) * (K + M) // K
    doc = report.to_json()
    assert set(doc) == {
        "volume", "clean", "exit_status", "repair", "verify_data", "findings",
        "unrecoverable", "counts", "scope", "skipped",
    }  # fmt: skip
    assert doc["clean"] is True and doc["findings"] == [] and doc["unrecoverable"] == []
    assert set(COUNT_KEYS) <= set(doc["counts"])
    # --repair on a clean volume changes nothing either.
    before = snapshot(volume)
    assert fsck(volume, repair=True).clean
    assert snapshot(volume) == before
    check_contents(volume, hashes)


# --- chunk_fragments_present -----------------------------------------------------


def test_a_deleted_fragment_is_rebuilt(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 1)
    victim = fragment_path(volume, chunk_id, 2, stores[2])
    original = victim.read_bytes()
    victim.unlink()
    found = detect_and_repair(volume, "chunk_fragments_present", verify=False)
    assert any(
        f"{chunk_id:016x}" in m and "missing" in m
        for m in messages(found, "chunk_fragments_present")
    )
    assert any("/big" in m for m in messages(found, "chunk_fragments_present"))
    assert victim.read_bytes() == original  # rebuilt in place, bit for bit
    check_contents(volume, hashes)


def test_a_rotten_payload_byte_is_found_only_by_verify_data(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 0)
    victim = fragment_path(volume, chunk_id, 0, stores[0])
    original = victim.read_bytes()
    flip_byte(victim, PAYLOAD_OFFSET + 70_000)
    assert fsck(volume, verify=False).clean  # headers and sizes are fine
    found = detect_and_repair(volume, "chunk_fragments_present", verify=True)
    assert any("checksum mismatch" in m for m in messages(found, "chunk_fragments_present"))
    assert victim.read_bytes() == original
    check_contents(volume, hashes)


def test_a_corrupt_fragment_header_is_rebuilt(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 3)
    victim = fragment_path(volume, chunk_id, K, stores[K])  # a parity fragment
    original = victim.read_bytes()
    flip_byte(victim, 20)  # payload_length
    found = detect_and_repair(volume, "chunk_fragments_present", verify=False)
    assert any("bad header" in m for m in messages(found, "chunk_fragments_present"))
    assert victim.read_bytes() == original
    check_contents(volume, hashes)


def test_a_slot_recorded_as_missing_is_rebuilt(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 2)
    fragment_path(volume, chunk_id, 1, stores[1]).unlink()
    stores[1] = 0xFF
    edit_replicas(
        volume, ("UPDATE chunks SET stores = ? WHERE chunk_id = ?", (bytes(stores), chunk_id))
    )
    found = detect_and_repair(volume, "chunk_fragments_present", verify=False)
    assert any("reduced redundancy" in m for m in messages(found, "chunk_fragments_present"))
    [(blob,)] = query_replica(volume, "SELECT stores FROM chunks WHERE chunk_id = ?", (chunk_id,))
    assert 0xFF not in blob and len(set(blob)) == K + M
    check_contents(volume, hashes)


@pytest.mark.allow_log(r"unrecoverable|fewer than|Unrecoverable|bytes \[|unreadable")
def test_more_than_m_lost_fragments_are_reported_unrecoverable(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    lost_id, lost_stores = chunk_of(volume, b"big", 1)
    for index in range(M + 1):
        fragment_path(volume, lost_id, index, lost_stores[index]).unlink()
    other_id, other_stores = chunk_of(volume, b"big", 3)
    other = fragment_path(volume, other_id, 5, other_stores[5])
    other.unlink()

    found = fsck(volume, verify=True)
    assert found.exit_status == 1
    [lost] = found.unrecoverable
    assert (lost.paths, lost.start, lost.end, lost.chunk_id) == (
        ("/big",),
        CHUNK,
        2 * CHUNK,
        lost_id,
    )
    assert any("UNRECOVERABLE" in m for m in messages(found, "chunk_fragments_present"))

    repaired = fsck(volume, repair=True, verify=True)
    assert repaired.exit_status == 1 and not repaired.all_fixed
    assert [u.paths for u in repaired.unrecoverable] == [("/big",)]
    assert other.exists()  # the recoverable chunk was rebuilt
    assert repaired.to_json()["unrecoverable"] == [
        {"inode": lost.inode, "paths": ["/big"], "start": CHUNK, "end": 2 * CHUNK,
         "chunk_id": f"{lost_id:016x}"}
    ]  # fmt: skip

    again = fsck(volume, verify=True)
    assert len(again.unrecoverable) == 1
    assert [f for f in again.errors if "UNRECOVERABLE" not in f.message] == []

    del hashes["big"]
    check_contents(volume, hashes)
    fd = os.open(volume.mountpoint / "big", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.pread(fd, 4096, CHUNK)
        assert caught.value.errno == errno.EIO
        assert len(os.pread(fd, 4096, 3 * CHUNK)) == 999
    finally:
        os.close(fd)


# --- no_orphan_fragments ------------------------------------------------------------


def test_orphan_fragments_are_deleted(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 0)
    source = fragment_path(volume, chunk_id, 0, stores[0])
    orphan = fragment_path(volume, 0xDEAD_BEEF, 0, 3)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, orphan)
    misplaced = fragment_path(volume, chunk_id, 0, (stores[0] + 1) % 6)  # right name, wrong store
    shutil.copyfile(source, misplaced)
    junk = volume.stores[4] / "frags" / "junk.tmp"
    junk.write_bytes(b"x")

    found = detect_and_repair(volume, "no_orphan_fragments", verify=True)
    assert found.counts["orphan_fragments"] == 2
    assert not orphan.exists() and not misplaced.exists() and source.exists()
    clean = assert_clean(volume)
    assert [w.message for w in clean.warnings if "junk.tmp" in w.message]  # left alone
    assert junk.exists()
    check_contents(volume, hashes)


# --- replicas_agree ----------------------------------------------------------------


def test_a_stale_replica_is_resynced(volume: MountedVolume, tmp_path: Path) -> None:
    hashes = populate(volume)
    volume.unmount()
    [first, second, *_] = replicas(volume)
    old = tmp_path / "old-replica"
    shutil.copyfile(second, old)
    volume.mount()
    hashes["later"] = write_pattern_file(volume.mountpoint / "later", seed=9, size=CHUNK + 1)
    volume.unmount()
    for suffix in ("-wal", "-shm"):
        Path(str(second) + suffix).unlink(missing_ok=True)
    shutil.copyfile(old, second)

    found = detect_and_repair(volume, "replicas_agree")
    assert any("stale" in m and str(second) in m for m in messages(found, "replicas_agree"))
    assert second.read_bytes() != old.read_bytes()
    check_contents(volume, hashes)


def test_a_garbage_replica_is_rewritten(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    victim = replicas(volume)[1]
    for suffix in ("-wal", "-shm"):
        Path(str(victim) + suffix).unlink(missing_ok=True)
    victim.write_bytes(os.urandom(50_000))
    found = detect_and_repair(volume, "replicas_agree")
    assert any(str(victim) in m for m in messages(found, "replicas_agree"))
    check_contents(volume, hashes)


def all_fragments(volume: MountedVolume) -> set[tuple[int, int, int]]:
    return {(n, *key) for n, s in enumerate(volume.stores) for key in fragment_files(s)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_bad_copy_is_refused_and_replaced_from_the_good_ones(
    volume: MountedVolume, kind: str, bad: int
) -> None:
    """Issue 13 A2 (a), (b), (c), in each position (s0 would win a tie):
    fsck names the bad copy, --repair rewrites it from the good ones (never
    the other way) and deletes no fragment."""
    hashes = populate(volume)
    volume.unmount()
    copies = replicas(volume)
    assert len(copies) == M + 1
    fragments = all_fragments(volume)
    damage(copies[bad], kind)
    found = detect_and_repair(volume, "replicas_agree")
    refused = [m for m in messages(found, "replicas_agree") if "refused" in m]
    assert len(refused) == 1 and str(copies[bad]) in refused[0], refused
    assert all_fragments(volume) == fragments
    assert copies[bad].with_name(copies[bad].name + ".refused").exists()
    check_contents(volume, hashes)


def test_orphans_are_kept_while_the_copies_disagree(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 0)
    orphan = fragment_path(volume, 0xABCDEF, 0, stores[0])
    orphan.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fragment_path(volume, chunk_id, 0, stores[0]), orphan)
    damage(replicas(volume)[0], "chunks-deleted")
    first = fsck(volume, repair=True)
    assert orphan.exists()
    assert any("not deleted" in m for m in messages(first, "no_orphan_fragments"))
    assert not first.all_fixed
    second = fsck(volume, repair=True)
    assert not orphan.exists() and second.all_fixed
    assert_clean(volume)
    check_contents(volume, hashes)


def test_copies_that_tie_stop_fsck(volume: MountedVolume) -> None:
    populate(volume)
    volume.unmount()
    copies = replicas(volume)
    forge(copies[1])  # verifies, but two contents now hold one vote each...
    forge(copies[2], uid=4343)  # ...and a third
    before = snapshot(volume)
    report = run_fsck([str(s) for s in volume.stores], repair=True, verify_data=False)
    assert any("none has a majority" in m for m in messages(report, "replicas_agree"))
    assert report.exit_status == 1 and not report.all_fixed
    assert snapshot(volume) == before


def test_too_few_replicas_are_replaced(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    for path in replicas(volume)[1:]:
        path.unlink()
    detect_and_repair(volume, "replicas_agree")
    assert len(replicas(volume)) == M + 1
    check_contents(volume, hashes)


# --- namespace_consistent --------------------------------------------------------------


def test_an_inode_without_links_is_freed(volume: MountedVolume) -> None:
    hashes = populate(volume)
    victim_hash = write_pattern_file(volume.mountpoint / "victim", seed=7, size=2 * CHUNK)
    assert victim_hash
    volume.unmount()
    [(ino,)] = query_replica(volume, "SELECT inode FROM dentries WHERE name = ?", (b"victim",))
    chunk_ids = {
        c for (c,) in query_replica(volume, "SELECT chunk_id FROM chunks WHERE inode = ?", (ino,))
    }
    assert len(chunk_ids) == 2
    # As left by a crash while the file was open after its unlink.
    edit_replicas(
        volume,
        ("DELETE FROM dentries WHERE name = ?", (b"victim",)),
        ("UPDATE inodes SET nlink = 0 WHERE id = ?", (ino,)),
        ("INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (ino, b"user.x", b"y")),
    )
    found = detect_and_repair(volume, "namespace_consistent")
    assert any(f"inode {ino} has no links" in m for m in messages(found, "namespace_consistent"))
    assert query_replica(volume, "SELECT 1 FROM inodes WHERE id = ?", (ino,)) == []
    assert query_replica(volume, "SELECT 1 FROM xattrs WHERE inode = ?", (ino,)) == []
    on_stores = {c for s in volume.stores for (c, _) in fragment_files(s)}
    assert not chunk_ids & on_stores  # its fragments were collected as orphans
    check_contents(volume, hashes)


def test_a_dangling_entry_is_removed(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    [(rowid,)] = query_replica(volume, "SELECT max(rowid) + 1 FROM dentries")
    edit_replicas(
        volume,
        (
            "INSERT INTO dentries (rowid, parent, name, inode) VALUES (?, 1, ?, 999999)",
            (rowid, b"ghost"),
        ),
    )
    found = detect_and_repair(volume, "namespace_consistent")
    assert any(
        "/ghost" in m and "missing inode 999999" in m
        for m in messages(found, "namespace_consistent")
    )
    check_contents(volume, hashes)
    assert "ghost" not in os.listdir(volume.mountpoint)


def test_wrong_link_counts_and_unreachable_inodes_are_fixed(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    [(exact,)] = query_replica(volume, "SELECT inode FROM dentries WHERE name = ?", (b"exact",))
    [(medium,)] = query_replica(volume, "SELECT inode FROM dentries WHERE name = ?", (b"medium",))
    edit_replicas(
        volume,
        ("UPDATE inodes SET nlink = 7 WHERE id = ?", (medium,)),
        ("DELETE FROM dentries WHERE name = ?", (b"exact",)),  # a lost entry
    )
    found = detect_and_repair(volume, "namespace_consistent")
    text = messages(found, "namespace_consistent")
    assert any(f"inode {exact} has no directory entry" in m for m in text)
    assert any("/hardlink" in m or "/dir/medium" in m for m in text if "link count 7" in m)
    hashes[f"lost+found/inode-{exact}"] = hashes.pop("dir/sub/exact")
    check_contents(volume, hashes)
    assert os.stat(volume.mountpoint / "hardlink").st_nlink == 2
    assert stat.S_ISDIR(os.stat(volume.mountpoint / "lost+found").st_mode)


# --- repair_queue_valid --------------------------------------------------------------


def test_a_repair_queue_entry_for_a_missing_chunk_is_deleted(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    edit_replicas(
        volume,
        (
            "INSERT INTO repair_queue (chunk_id, reason, priority, enqueued_ns)"
            " VALUES (?, 'scrub', 0, 0)",
            (987654321,),
        ),
    )
    found = detect_and_repair(volume, "repair_queue_valid")
    assert any(f"{987654321:016x}" in m for m in messages(found, "repair_queue_valid"))
    assert query_replica(volume, "SELECT * FROM repair_queue") == []
    check_contents(volume, hashes)


# --- the volume lock (no mount needed) -----------------------------------------------


def make_volume(base: Path, n: int = 6) -> list[Path]:
    stores = [base / f"s{i}" for i in range(n)]
    cli("mkfs", "--data", K, "--parity", M, *TEST_MKFS_ARGS, *stores)
    return stores


def test_fsck_refuses_a_locked_volume(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    with VolumeLock.acquire(stores[3:4]):
        with pytest.raises(VolumeError, match=r"volume is in use \(already mounted\?\): .*s3 is locked"):
            run_fsck([str(s) for s in stores], repair=True, verify_data=False)
    # Refused before it touched anything; free again once the lock is gone.
    assert run_fsck([str(s) for s in stores], repair=False, verify_data=True).clean


def test_volume_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    stores = [tmp_path / "a", tmp_path / "b"]
    for s in stores:
        s.mkdir()
    lock = VolumeLock.acquire(stores)
    assert lock.stores == stores
    assert stat.S_IMODE((stores[0] / LOCK_NAME).stat().st_mode) == 0o600
    with pytest.raises(VolumeError, match="is locked by another process"):
        VolumeLock.acquire(stores[1:])
    lock.release()
    lock.release()  # harmless
    with VolumeLock.acquire(stores) as again:
        with pytest.raises(VolumeError):
            VolumeLock.acquire(stores[:1])
    assert again.stores == []
    with VolumeLock.acquire(stores[1:]):
        with pytest.raises(VolumeError):
            VolumeLock.acquire(stores)
        # The failed acquire took 'a' first and let it go again.
        with VolumeLock.acquire(stores[:1]):
            pass


def test_fsck_refuses_stores_of_two_volumes(tmp_path: Path) -> None:
    one = make_volume(tmp_path / "one")
    two = make_volume(tmp_path / "two")
    with pytest.raises(VolumeError, match="different volumes"):
        run_fsck([str(s) for s in one[:3] + two[:3]], repair=False, verify_data=False)
    # One store of another volume among the volume's own is reported, not used.
    report = run_fsck([str(s) for s in one + two[:1]], repair=False, verify_data=False)
    assert not report.clean
    assert any(f"store {two[0]} is not used" in f.message for f in report.findings)


def test_a_missing_store_is_reported_not_rebuilt_around(volume: MountedVolume) -> None:
    hashes = populate(volume)
    volume.unmount()
    given = [str(s) for s in volume.stores[:5]]
    before = snapshot(volume)
    found = run_fsck(given, repair=False, verify_data=True)
    assert found.exit_status == 1 and found.counts["stores_missing"] == 1
    [missing] = messages(found, "chunk_fragments_present")
    assert missing.startswith("store 5 ") and "were not checked" in missing
    repaired = run_fsck(given, repair=True, verify_data=True)
    assert not repaired.all_fixed  # a missing store is for `ecfs store replace`
    after = snapshot(volume)
    assert {p for p in after if "/frags/" in p} == {p for p in before if "/frags/" in p}
    assert_clean(volume)
    check_contents(volume, hashes)


def test_what_fsck_cannot_rebuild_is_queued_for_the_mount(volume: MountedVolume) -> None:
    """A fragment fsck --repair has nowhere to rebuild (the store it was on
    is not given, every given one holds another fragment of the chunk) is
    queued for the mount's repair as the mount queues damage: a reason of
    model.REPAIR_REASONS, model.repair_priority of the fragments the chunk
    can still lose, the bad fragment's mask. The mount, given every store,
    rebuilds it through the same rebuild."""
    hashes = populate(volume)
    volume.unmount()
    chunk_id, stores = chunk_of(volume, b"big", 2)
    away = stores[1]
    fragment_path(volume, chunk_id, 1, away).unlink()
    stores[1] = 0xFF
    edit_replicas(
        volume, ("UPDATE chunks SET stores = ? WHERE chunk_id = ?", (bytes(stores), chunk_id))
    )
    given = [s for i, s in enumerate(volume.stores) if i != away]
    report = run_fsck([str(s) for s in given], repair=True, verify_data=True)
    [finding] = [f for f in report.findings if f"{chunk_id:016x}" in f.message]
    assert "NOT rebuilt" in finding.message and not finding.fixed
    copies = [p for s in given if (p := replica_path(DirectoryStore(s).meta_dir)).exists()]
    conn = sqlite3.connect(copies[0])
    try:
        rows = conn.execute(
            "SELECT reason, priority, bad FROM repair_queue WHERE chunk_id = ?", (chunk_id,)
        ).fetchall()
    finally:
        conn.close()
    spare = K + M - 1 - K
    assert rows == [("fsck", repair_priority(spare, "fsck"), 1 << 1)]
    assert "fsck" in REPAIR_REASONS
    volume.mount()
    wait_repaired(volume)
    volume.unmount()
    assert_clean(volume)
    assert chunk_of(volume, b"big", 2)[1][1] == away
    check_contents(volume, hashes)


# --- leftovers (issue 13, D13) ------------------------------------------------------


def test_fsck_removes_the_leftovers_of_a_killed_fsck(
    volume: MountedVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed fsck leaves its working directory (a full metadata copy) in
    $TMPDIR; it is named after its pid, and the next run removes those of
    dead processes only."""
    volume.unmount()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmpdir / f"ecfs-{dead.pid}-fsck-abcd"
    leftover.mkdir()
    (leftover / "metadata.sqlite").write_bytes(bytes(4096))
    alive = tmpdir / f"ecfs-{os.getpid()}-fsck-efgh"  # a run still going
    alive.mkdir()
    seen: set[str] = set()
    run_fsck(
        [str(s) for s in volume.stores],
        repair=False,
        verify_data=False,
        progress=lambda *_: seen.update(p.name for p in tmpdir.iterdir()),
    )
    assert not leftover.exists()
    assert sorted(tmpdir.iterdir()) == [alive]
    own = seen - {alive.name, leftover.name}
    assert own and all(n.startswith(f"ecfs-{os.getpid()}-fsck-") for n in own), seen
