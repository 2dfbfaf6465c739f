"""Failure domains and `ecfs fsck --path` through real mounts and the CLI.

Failure domains over loop devices: small ext4 filesystems on loop devices
whose backing files are on this machine's one disk (`loop_disks`, removed
in a finally). ecfs must see through them (sysfs: loop -> backing file ->
its disk): two loop devices over one disk are one domain, mkfs refuses
them, and status tells the true tolerance. With the domains named
explicitly (labels), a chunk never has two fragments in one domain, so
losing every store of a domain loses no data. Store add/set-domain use
the control channel of a mounted volume.

`ecfs fsck --path DIR` checks the files below DIR only: a damaged fragment
outside DIR is not reported, one inside is, and the report says which
volume-wide checks were skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecfs.core.model import NO_STORE
from ecfs.storage.domains import path_atoms
from ecfs.storage.metadb.chunks import ChunkTable
from ecfs.storage.metadb.database import Database
from ecfs.storage.replicas import replica_path
from tests.mounting import (
    FUSE_MISSING_REASON,
    TEST_MKFS_ARGS,
    MountedVolume,
    cli,
    lazy_unmount,
)
from tests.volume_files import (
    drop_caches,
    flip_payload_bytes,
    fragment_files,
    sha256_file,
    status,
    write_pattern_file,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""),
]

MiB = 1 << 20
CHUNK = 2 * 128 * 1024  # k=2 with the tests' 128 KiB fragments
VOLUME_CHUNK = 4 * 128 * 1024  # the `volume` fixture's k=4
LOOP_SIZE = 64 * MiB
FAIL_LIMIT = 20.0  # seconds for a mount to notice a store is gone


def _loop_reason() -> str | None:
    if os.geteuid() != 0:
        return "loop devices need root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


needs_loops = pytest.mark.skipif(_loop_reason() is not None, reason=_loop_reason() or "")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loop_disks(tmp_path: Path) -> Iterator[list[Path]]:
    """Two ext4 filesystems on loop devices over sparse files in tmp_path
    (one disk), mounted; unmounted and detached whatever happens."""
    devices: list[str] = []
    mounted: list[Path] = []
    try:
        for i in range(2):
            image = tmp_path / f"disk{i}.img"
            with open(image, "wb") as f:
                f.truncate(LOOP_SIZE)
            devices.append(_run("losetup", "--find", "--show", str(image)))
            _run("mkfs.ext4", "-q", "-F", devices[-1])
            where = tmp_path / f"disk{i}"
            where.mkdir()
            _run("mount", devices[-1], str(where))
            mounted.append(where)
        yield mounted
    finally:
        for where in reversed(mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                lazy_unmount(where)
        for device in reversed(devices):
            subprocess.run(["losetup", "-d", device], capture_output=True)


def _volume(tmp_path: Path, stores: list[Path]) -> MountedVolume:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    return MountedVolume(stores, mountpoint, tmp_path / "ecfs.log")


def _populate(root: Path, count: int = 6) -> dict[Path, str]:
    return {
        root / f"f{i}": write_pattern_file(root / f"f{i}", seed=i, size=3 * CHUNK + 1000 * i)
        for i in range(count)
    }


def _check(hashes: dict[Path, str]) -> None:
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


@needs_loops
def test_loop_devices_over_one_disk_are_one_domain_and_mkfs_refuses(
    tmp_path: Path, loop_disks: list[Path]
) -> None:
    disk0, disk1 = loop_disks
    assert path_atoms(disk0) == path_atoms(disk1) == path_atoms(tmp_path)
    assert next(iter(path_atoms(disk0))).startswith("disk:")
    stores = [disk0 / "s0", disk1 / "s1", tmp_path / "s2"]
    refused = cli("mkfs", "-k", 2, "-m", 1, *TEST_MKFS_ARGS, *stores, check=False,
                  test_domains=False)  # fmt: skip
    assert refused.returncode == 2
    assert "1 failure domain(s)" in refused.stderr and "k+m=3" in refused.stderr
    assert f"{stores[0]}, {stores[1]}, {stores[2]} share disk:" in refused.stderr
    assert "--allow-shared-domains" in refused.stderr
    assert not any(s.exists() for s in stores)


@needs_loops
def test_status_tells_the_true_tolerance_of_stores_on_one_disk(
    tmp_path: Path, loop_disks: list[Path]
) -> None:
    stores = [loop_disks[0] / "s0", loop_disks[1] / "s1", tmp_path / "s2"]
    cli("mkfs", "-k", 2, "-m", 1, "--allow-shared-domains", *TEST_MKFS_ARGS, *stores)
    volume = _volume(tmp_path, stores)
    volume.mount()
    try:
        hashes = _populate(volume.mountpoint, 2)
        record = status(volume)
        disk = next(iter(path_atoms(tmp_path)))
        assert [s["domain"] for s in record["stores"]] == [disk] * 3
        assert record["tolerance"] == 0 and record["domains"] == 1
        assert record["health"] == "at-risk"
        assert "illusory" in record["redundancy_warning"]
        text = cli("status", volume.mountpoint, check=False)
        assert text.returncode == 1
        assert "can lose 0 more failure domains" in text.stdout
        assert "WARNING: the redundancy is illusory" in text.stdout
        _check(hashes)
    finally:
        volume.unmount(check=False)
    volume.check_log_clean()


@needs_loops
def test_losing_every_store_of_a_labelled_domain_loses_no_data(
    tmp_path: Path, loop_disks: list[Path]
) -> None:
    """k=2 m=1 over four stores in three labelled domains: two stores on
    loop disk 0 ("enclosure-a"), one on loop disk 1, one in tmp_path. Each
    chunk has at most one fragment in enclosure-a, so with both its stores
    gone every file still reads back right."""
    lost = [loop_disks[0] / "a0", loop_disks[0] / "a1"]
    stores = [tmp_path / "c0", loop_disks[1] / "b0", *lost]  # metadata copies: c0, b0
    labels = ["enclosure-c", "enclosure-b", "enclosure-a", "enclosure-a"]
    cli(
        "mkfs", "-k", 2, "-m", 1, *TEST_MKFS_ARGS,
        *[f"--domain={s}={label}" for s, label in zip(stores, labels, strict=True)], *stores,
    )  # fmt: skip
    volume = _volume(tmp_path, stores)
    volume.mount()
    away = [loop_disks[0] / "a0-away", loop_disks[0] / "a1-away"]
    try:
        hashes = _populate(volume.mountpoint, 8)
        os.sync()
        record = status(volume)
        assert [s["domain"] for s in record["stores"]] == labels
        assert record["tolerance"] == 1 and record["redundancy_warning"] is None
        in_a: dict[int, int] = {}
        for store in lost:
            for chunk, _index in fragment_files(store):
                in_a[chunk] = in_a.get(chunk, 0) + 1
        assert in_a and max(in_a.values()) == 1, "two fragments of a chunk in one domain"
        for store, where in zip(lost, away, strict=True):
            os.rename(store, where)  # the enclosure is gone (renamed off its disk)
        drop_caches()
        deadline = time.monotonic() + FAIL_LIMIT
        while True:
            # Reading is what makes the mount notice (a missing fragment probes its store).
            _check(hashes)
            states = [s["state"] for s in status(volume)["stores"]]
            if states[2:] == ["failed", "failed"]:
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.5)
        _check(hashes)
        assert status(volume)["tolerance"] == 0  # one more domain lost would lose data
    finally:
        for store, where in zip(lost, away, strict=True):
            if where.exists():
                os.rename(where, store)
        volume.unmount(check=False)


def _labelled_volume(tmp_path: Path, names: list[str], labels: list[str], m: int = 1) -> MountedVolume:
    stores = [tmp_path / name for name in names]
    cli(
        "mkfs", "-k", 2, "-m", m, *TEST_MKFS_ARGS,
        *[f"--domain={s}={label}" for s, label in zip(stores, labels, strict=True)], *stores,
    )  # fmt: skip
    return _volume(tmp_path, stores)


def test_a_lost_domain_of_several_stores_is_survived_across_a_crash_and_remount(
    tmp_path: Path,
) -> None:
    """k=2 m=1 over a0, a1 (enclosure-a), b0, c0. The m+1 = 2 metadata
    copies are on a0 and b0 (by index alone they were on a0 and a1: one
    domain), every small-write record has a copy outside enclosure-a, and
    no chunk has two fragments there. With the daemon killed (nothing
    folded, no clean shutdown) and both stores of enclosure-a gone -- more
    than m stores, but one domain -- the volume mounts with its latest
    metadata: the fsync'd files and small overwrites read back."""
    volume = _labelled_volume(
        tmp_path, ["a0", "a1", "b0", "c0"], ["enclosure-a", "enclosure-a", "b", "c"]
    )
    a0, a1, b0, c0 = volume.stores
    assert [(s / "meta" / "ecfs-meta.sqlite").exists() for s in volume.stores] == [
        True, False, True, False,
    ]  # fmt: skip
    volume.mount()
    root = volume.mountpoint
    expected: dict[Path, bytes] = {}
    try:
        for i in range(5):
            write_pattern_file(root / f"f{i}", seed=i, size=3 * CHUNK + 1000 * i)
        rng = random.Random(7)
        for i in range(5):
            path = root / f"f{i}"
            with open(path, "r+b") as f:
                for _ in range(4):  # small overwrites: the small-write log
                    f.seek(rng.randrange(3 * CHUNK))
                    f.write(rng.randbytes(rng.randrange(1, 300)))
                os.fsync(f.fileno())
            expected[path] = path.read_bytes()
        late = root / "late"
        with open(late, "wb") as f:
            f.write(b"written last")
            os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        expected[late] = b"written last"
        in_a: dict[int, int] = {}
        for store in (a0, a1):
            for chunk, _index in fragment_files(store):
                in_a[chunk] = in_a.get(chunk, 0) + 1
        assert in_a and max(in_a.values()) == 1, "two fragments of a chunk in one domain"
    finally:
        volume.kill()
    for store in (a0, a1):
        os.rename(store, store.with_name(store.name + "-away"))  # the enclosure is gone
    volume.mount(stores=[b0, c0])
    try:
        drop_caches()
        for path, data in expected.items():
            assert path.read_bytes() == data, path
        record = status(volume)
        states = {s["index"]: s["state"] for s in record["stores"]}
        assert states == {0: "missing", 1: "missing", 2: "ok", 3: "ok"}
    finally:
        volume.unmount(check=False)


def test_more_than_m_missing_stores_in_more_than_m_domains_are_refused(tmp_path: Path) -> None:
    """The rule is per domain and per chunk: a1 and b0 (two domains, m=1)
    away is refused, naming the domains; so is one domain holding two
    fragments of a chunk."""
    volume = _labelled_volume(
        tmp_path, ["a0", "a1", "b0", "c0"], ["enclosure-a", "enclosure-a", "b", "c"]
    )
    volume.mount()
    try:
        write_pattern_file(volume.mountpoint / "f", seed=1, size=3 * CHUNK)
    finally:
        volume.unmount()
    a0, a1, b0, c0 = volume.stores
    refused = cli("fsck", a0, c0, check=False)
    assert refused.returncode not in (0, 1)
    assert "at most 1 may be missing" in refused.stderr
    assert "in 2 failure domains (b, enclosure-a)" in refused.stderr
    # Written while b0 was away, a chunk has two fragments in enclosure-a:
    # losing that domain (one domain, but this chunk's k) is refused too.
    volume.mount(stores=[a0, a1, c0])
    try:
        write_pattern_file(volume.mountpoint / "g", seed=2, size=CHUNK)
    finally:
        volume.unmount()
    refused = cli("fsck", b0, c0, check=False)
    assert refused.returncode not in (0, 1)
    assert "1 chunk(s) have fewer than k=2 fragments on the present stores" in refused.stderr


@pytest.mark.allow_log(r"store add failed: .* is in failure domain test-domain-0")
def test_store_add_and_set_domain_keep_the_domain_rule(volume: MountedVolume, tmp_path: Path) -> None:
    """A 6-store 4+2 test volume has six labelled domains. Labelling store 5
    like store 4 leaves five: status warns and new stores that share a
    domain are refused unless allowed; a store on an independent domain is
    accepted and the warning goes."""
    done = cli("store", "set-domain", volume.mountpoint, "5", "test-domain-4")
    assert "store 5 is in failure domain test-domain-4" in done.stdout
    assert "5 distinct failure domains" in done.stdout
    record = status(volume)
    assert record["stores"][5]["domain"] == "test-domain-4"
    assert "1 failure domain(s), not 2" in record["redundancy_warning"]
    refused = cli("store", "add", "--domain", "test-domain-0", volume.mountpoint,
                  tmp_path / "new0", check=False)  # fmt: skip
    assert refused.returncode == 1
    assert "test-domain-0 with store(s) 0" in refused.stderr
    assert "--allow-shared-domains" in refused.stderr
    assert not (tmp_path / "new0").exists()
    added = cli("store", "add", "--domain", "rack-7", volume.mountpoint, tmp_path / "new1")
    assert "store 6 added" in added.stdout
    record = status(volume)
    assert record["stores"][6]["domain"] == "rack-7"
    assert record["redundancy_warning"] is None and record["domains"] == 6
    back = cli("store", "set-domain", volume.mountpoint, "5")
    assert "store 5 is in failure domain disk:" in back.stdout
    volume.stores.append(tmp_path / "new1")


# --- fsck --path -------------------------------------------------------------------


def _fsck(volume: MountedVolume, *args: str) -> tuple[int, dict]:
    result = cli("fsck", "--json", *args, *volume.stores, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_fsck_path_checks_only_the_files_below_it(volume: MountedVolume) -> None:
    root = volume.mountpoint
    (root / "inside" / "deeper").mkdir(parents=True)
    (root / "outside").mkdir()
    inside = write_pattern_file(root / "inside" / "deeper" / "file", seed=1, size=VOLUME_CHUNK * 3)
    volume.unmount()
    before = {(n, *key): path for n, s in enumerate(volume.stores)
              for key, path in fragment_files(s).items()}  # fmt: skip
    volume.mount()
    write_pattern_file(root / "outside" / "file", seed=2, size=VOLUME_CHUNK * 3)
    volume.unmount()
    after = {(n, *key): path for n, s in enumerate(volume.stores)
             for key, path in fragment_files(s).items()}  # fmt: skip
    outside_fragments = sorted(set(after) - set(before))
    inside_fragments = sorted(before)
    assert outside_fragments and inside_fragments
    # A fragment outside DIR rots; nothing is wrong inside yet.
    (_, outside_chunk, _), rotten = outside_fragments[0], after[outside_fragments[0]]
    flip_payload_bytes(rotten, random.Random(7), 16)

    code, report = _fsck(volume, "--verify-data", "--path", "inside")
    assert code == 0, report["findings"]
    assert report["scope"] == "/inside"
    assert "no_orphan_fragments" in report["skipped"] and "write_log_valid" in report["skipped"]
    assert report["counts"]["inodes"] == 3  # inside, deeper, file
    assert report["counts"]["chunks"] == 3
    text = cli("fsck", "--path", "/inside/", *volume.stores, check=False).stdout
    assert "is clean; only /inside was checked (3 inodes; skipped as volume-wide:" in text

    # A fragment inside DIR goes missing: reported, the rotten one still not.
    inside_chunk = inside_fragments[0][1]
    before[inside_fragments[0]].unlink()
    code, report = _fsck(volume, "--verify-data", "--path", "inside")
    assert code == 1
    found = [f["message"] for f in report["findings"]]
    assert any(f"{inside_chunk:016x}" in m and "inside/deeper/file" in m for m in found), found
    assert not any(f"{outside_chunk:016x}" in m for m in found), found

    # --path outside (with --verify-data) finds the rotten cells, not the missing fragment.
    code, report = _fsck(volume, "--verify-data", "--path", "outside")
    found = [f["message"] for f in report["findings"]]
    assert code == 1 and any(f"{outside_chunk:016x}" in m for m in found), found
    assert not any(f"{inside_chunk:016x}" in m for m in found), found

    bad = cli("fsck", "--path", "nowhere", *volume.stores, check=False)
    assert bad.returncode == 2 and "no such directory in the volume" in bad.stderr
    # The whole volume: both, and --repair makes it clean again.
    code, report = _fsck(volume, "--verify-data", "--repair")
    assert code == 1 and report["scope"] is None and report["skipped"] == []
    code, report = _fsck(volume, "--verify-data")
    assert code == 0, report["findings"]
    volume.mount()
    drop_caches()
    assert sha256_file(root / "inside" / "deeper" / "file") == inside


@pytest.mark.allow_log(r"chunks queued to move misplaced fragments")
def test_fragments_in_a_shared_domain_after_a_label_change_move_back(
    volume: MountedVolume, tmp_path: Path
) -> None:
    """4+2 over seven stores in seven domains; labelling store 6 like store
    5 leaves six. Chunks with fragments on both 5 and 6 have two in one
    domain while the store they do not use is in a free one: set-domain and
    scrub queue them ('shared-domain', fsck warns), repair moves one
    fragment each there, and then no chunk has two fragments in a domain
    and fsck is clean."""
    cli("store", "add", "--domain", "rack-7", volume.mountpoint, tmp_path / "new")
    volume.stores.append(tmp_path / "new")
    root = volume.mountpoint
    hashes = {
        root / f"f{i}": write_pattern_file(root / f"f{i}", seed=i, size=3 * VOLUME_CHUNK + 77 * i)
        for i in range(8)
    }
    os.sync()
    done = cli("store", "set-domain", volume.mountpoint, "6", "test-domain-5")
    queued = int(done.stdout.split("new chunks follow it; ")[1].split()[0])
    assert queued > 0, done.stdout
    cli("scrub", volume.mountpoint)
    assert status(volume)["health"] == "healthy"  # only to be moved
    cli("repair", "--wait", volume.mountpoint)
    record = status(volume)
    assert [s["domain"] for s in record["stores"]][5:] == ["test-domain-5", "test-domain-5"]
    _check(hashes)
    volume.unmount()
    db = Database(replica_path(volume.stores[0] / "meta"))
    try:
        refs = [ref for _, _, ref in ChunkTable(db).iter_all()]
    finally:
        db.close()
    domain = {i: f"test-domain-{min(i, 5)}" for i in range(7)}
    assert refs
    for ref in refs:
        held = [domain[s] for s in ref.stores if s != NO_STORE]
        assert len(held) == len(set(held)) == 6, ref
    code, report = _fsck(volume)
    assert code == 0 and report["clean"], report
    assert "fragments_shared_domain" not in report["counts"]
    volume.mount()


def test_a_mount_moves_a_metadata_copy_out_of_a_shared_domain(tmp_path: Path) -> None:
    """k=2 m=1: the copies are on s0 and s1; labelling s1 like s0 puts both
    in one domain. The next mount writes a copy on s2 (a domain holding
    none) and removes the one on s1, and the volume keeps its data."""
    volume = _labelled_volume(tmp_path, ["s0", "s1", "s2", "s3"], ["r0", "r1", "r2", "r3"])
    copies = [s / "meta" / "ecfs-meta.sqlite" for s in volume.stores]
    assert [c.exists() for c in copies] == [True, True, False, False]
    volume.mount()
    try:
        digest = write_pattern_file(volume.mountpoint / "f", seed=3, size=3 * CHUNK)
        cli("store", "set-domain", volume.mountpoint, "1", "r0")
    finally:
        volume.unmount()
    volume.mount()
    try:
        assert [c.exists() for c in copies] == [True, False, True, False]
        assert status(volume)["stores"][1]["domain"] == "r0"
        drop_caches()
        assert sha256_file(volume.mountpoint / "f") == digest
    finally:
        volume.unmount()
    volume.check_log_clean()
