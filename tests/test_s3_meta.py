"""Volumes whose metadata copies are objects (fewer than m+1 local stores),
through the real CLI and a real FUSE mount on moto servers (one per store,
tests/s3servers.py): mkfs, mount, fsync, unmount, kill -9 and a remount by
a fresh process with nothing local left over ("any host"); small fsync'd
overwrites without a small-write log; a damaged snapshot or log object
detected, never served, rewritten, reported by fsck; a dead server."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import obstore
import pytest

from ecfs.storage.metaobjects import COMPACT_LOG_COUNT, DamagedObject, ObjectCopy, unpack
from ecfs.storage.s3store import S3Store

from .mounting import TEST_MKFS_ARGS, MountedVolume, MountError, cli
from .s3servers import MotoServer, moto_servers
from .test_crash import ALLOWED_AFTER_KILL, fsck
from .volume_files import fsynced_overwrites

pytestmark = pytest.mark.mount


def _store(server: MotoServer) -> S3Store:
    return S3Store(server.location(prefix="vol"))


def _get(server: MotoServer, name: str) -> bytes:
    return _store(server).get_meta(name)


def _meta_names(server: MotoServer) -> list[str]:
    return _store(server).list_meta()


def _flip(server: MotoServer, name: str) -> None:
    """Damage an object behind ecfs's back: one bit, overwritten in place."""
    data = bytearray(_get(server, name))
    data[len(data) // 2] ^= 0x04
    obstore.put(_store(server)._store(), f"meta/{name}", bytes(data))


def _volume_id(server: MotoServer) -> bytes:
    return uuid.UUID(_store(server).read_marker().volume_id).bytes


def _wait_until_verified(server: MotoServer, volume_id: bytes, timeout: float = 30) -> None:
    """Wait until every metadata object on `server` verifies (a copy
    replaced in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            names = _meta_names(server)
            for name in names:
                unpack(name, _get(server, name), volume_id)
            if any(n.startswith("snap-") for n in names):
                return
        except DamagedObject:
            pass
        assert time.monotonic() < deadline, "the damaged copy was not rewritten"
        time.sleep(0.2)


def _status(volume: MountedVolume) -> dict:
    return json.loads(cli("status", "--json", volume.mountpoint, check=False).stdout)


def _host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Run the next daemons as on host `name`: their own temp directory."""
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


def test_an_all_s3_volume_survives_kill_9_and_mounts_from_another_host(
    tmp_path: Path, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with moto_servers(3) as servers:
        stores = [Path(s.location(prefix="vol")) for s in servers]
        cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *stores)
        holding = [s for s in servers if _meta_names(s)]
        assert len(holding) == 2  # m+1 copies as objects, none locally
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        files = {f"f{i}": os.urandom(n) for i, n in enumerate((10, 70_000, 600_000))}
        first_host = _host(monkeypatch, tmp_path, "host1")
        volume.mount()
        try:
            for name, data in files.items():
                (volume.mountpoint / name).write_bytes(data)
            os.sync()
            document = _status(volume)
            assert sorted(document["metadata"]["copies"].values()) == ["objects", "objects"]
            assert document["health"] == "healthy"
        finally:
            volume.unmount()
        volume.mount()
        try:
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            # Small fsync'd overwrites: no log stores, whole-chunk writes.
            path = volume.mountpoint / "f2"
            expected = bytearray(files["f2"])
            fsynced_overwrites(path, expected, count=8, block=4096, seed=3)
            document = json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))
            assert document["write_log"]["records_written"] == 0
            fd = os.open(volume.mountpoint / "late", os.O_CREAT | os.O_WRONLY)
            os.write(fd, b"fsynced before the crash")
            os.fsync(fd)
            os.close(fd)
            volume.kill()  # kill -9: nothing unmounted cleanly
        finally:
            volume.unmount(check=False)
        shutil.rmtree(first_host)  # the first host is gone with whatever it kept
        _host(monkeypatch, tmp_path, "host2")
        volume.mount()
        try:
            assert (volume.mountpoint / "f2").read_bytes() == expected
            assert (volume.mountpoint / "late").read_bytes() == b"fsynced before the crash"
            for name in ("f0", "f1"):
                assert (volume.mountpoint / name).read_bytes() == files[name]
            scrub = cli("scrub", "--json", volume.mountpoint)
            assert json.loads(scrub.stdout)["findings"] == []
            assert json.loads(scrub.stdout)["metadata_findings"] == []
        finally:
            volume.unmount()
        report = fsck(stores)
        bad = [f.message for f in report.errors if f.check not in ALLOWED_AFTER_KILL]
        assert not bad and not report.unrecoverable, bad
        for server in servers:  # compacted at mount: a snapshot and few logs
            assert len(_meta_names(server)) <= 3


def test_a_damaged_metadata_object_is_never_served_and_is_rewritten(
    tmp_path: Path, aws_env: None
) -> None:
    with moto_servers(3) as servers:
        stores = [Path(s.location(prefix="vol")) for s in servers]
        cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *stores)
        volume_id = _volume_id(servers[0])
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        data = os.urandom(300_000)
        volume.mount()
        try:
            (volume.mountpoint / "a").write_bytes(data)
            os.sync()
        finally:
            volume.unmount()
        victim = next(s for s in servers if _meta_names(s))
        (snapshot,) = [k for k in _meta_names(victim) if k.startswith("snap-")]
        _flip(victim, snapshot)

        report = json.loads(cli("fsck", "--json", *stores, check=False).stdout)
        messages = [f["message"] for f in report["findings"]]
        assert any(snapshot in m and "checksum" in m for m in messages), messages

        volume.mount()
        try:
            assert (volume.mountpoint / "a").read_bytes() == data
            # The bad copy was rewritten at mount: its snapshot verifies again.
            (fresh,) = [k for k in _meta_names(victim) if k.startswith("snap-")]
            unpack(fresh, _get(victim, fresh), volume_id)
            # Now damage a log object of the running mount, then crash.
            fd = os.open(volume.mountpoint / "b", os.O_CREAT | os.O_WRONLY)
            os.write(fd, b"after the repair")
            os.fsync(fd)
            os.close(fd)
            logs = [k for k in _meta_names(victim) if k.startswith("log-")]
            assert logs
            _flip(victim, logs[-1])
            # Scrub rebuilds each copy from its objects: the damage is found
            # and the copy written anew.
            scrub = json.loads(cli("scrub", "--json", volume.mountpoint, check=False).stdout)
            assert any("checksum" in f["problem"] for f in scrub["metadata_findings"]), scrub
            _wait_until_verified(victim, volume_id)
            # Once more, then a crash: the next fsck and mount meet it.
            fd = os.open(volume.mountpoint / "b", os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"!")
            os.fsync(fd)
            os.close(fd)
            logs = [k for k in _meta_names(victim) if k.startswith("log-")]
            _flip(victim, logs[-1])
            with pytest.raises(DamagedObject):
                unpack(logs[-1], _get(victim, logs[-1]), volume_id)
            volume.kill()
        finally:
            volume.unmount(check=False)
        report = json.loads(cli("fsck", "--json", *stores, check=False).stdout)
        assert any("checksum" in f["message"] for f in report["findings"])
        # fsck --repair rewrites the damaged copy: every object verifies again.
        cli("fsck", "--repair", "--json", *stores, check=False)
        for name in _meta_names(victim):
            unpack(name, _get(victim, name), volume_id)
        volume.mount()
        try:
            assert (volume.mountpoint / "a").read_bytes() == data
            assert (volume.mountpoint / "b").read_bytes() == b"after the repair!"
        finally:
            volume.unmount()
        clean = cli("fsck", "--json", *stores, check=False)
        assert clean.returncode == 0, clean.stdout


def test_a_dead_server_costs_one_copy_and_the_volume_goes_on(
    tmp_path: Path, aws_env: None
) -> None:
    with moto_servers(4) as every:
        servers, spare = every[:3], every[3]
        stores = [Path(s.location(prefix="vol")) for s in servers]
        cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *stores)
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        data = os.urandom(500_000)
        volume.mount()
        try:
            (volume.mountpoint / "a").write_bytes(data)
            os.sync()
        finally:
            volume.unmount()
        victim = next(s for s in servers if _meta_names(s))
        victim.kill()
        volume.mount()
        try:
            assert (volume.mountpoint / "a").read_bytes() == data
            (volume.mountpoint / "b").write_bytes(b"written with a server gone")
            os.sync()
            copies = _status(volume)["metadata"]["copies"]
            assert len(copies) == 2  # placed on the third store
        finally:
            volume.unmount()
        alive = [s for s in servers if s is not victim]
        assert all(_meta_names(s) for s in alive)
        given = [str(p) for p, s in zip(stores, servers, strict=True) if s is not victim]
        volume.mount(stores=given)
        try:
            assert (volume.mountpoint / "a").read_bytes() == data
            assert (volume.mountpoint / "b").read_bytes() == b"written with a server gone"
            # The dead endpoint is replaced; then a store holding a copy is
            # removed: the copy moves, there are always m+1.
            dead = stores[servers.index(victim)]
            new = spare.location(prefix="vol")
            cli("store", "replace", volume.mountpoint, servers[servers.index(victim)].location(prefix="vol"), new)
            cli("repair", "--wait", volume.mountpoint, timeout=300)
            added = spare.location(prefix="more")
            # A second prefix of the spare server stands for another machine.
            cli("store", "add", "--domain", "spare-more", volume.mountpoint, added)
            document = _status(volume)
            holder = min(int(i) for i in document["metadata"]["copies"])
            removed = next(s["path"] for s in document["stores"] if s["index"] == holder)
            cli("store", "remove", volume.mountpoint, removed)
            _wait_store_change(volume)
            document = _status(volume)
            assert document["health"] == "healthy", document
            copies = document["metadata"]["copies"]
            assert len(copies) == 2 and str(holder) not in copies, copies
            kept = [s["path"] for s in document["stores"]]
        finally:
            volume.unmount()
        assert str(dead) not in kept
        volume.mount(stores=kept)  # a fresh mount from the new set of stores
        try:
            assert (volume.mountpoint / "a").read_bytes() == data
            assert (volume.mountpoint / "b").read_bytes() == b"written with a server gone"
        finally:
            volume.unmount()
        clean = cli("fsck", "--json", *kept, check=False)
        assert clean.returncode == 0, clean.stdout


def _wait_store_change(volume: MountedVolume, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        change = _status(volume)["store_change"]
        if change is None or change["state"] != "running":
            assert change is None or change["state"] == "done", change
            return
        assert time.monotonic() < deadline, change
        time.sleep(0.2)


def test_compaction_bounds_the_metadata_objects(tmp_path: Path, aws_env: None) -> None:
    """Hundreds of fsync'd transactions: each a log object per copy, until
    the logs are compacted into a new snapshot and deleted."""
    with moto_servers(2) as servers:
        stores = [Path(servers[0].location(prefix=f"p{i}")) for i in range(2)]
        stores.append(Path(servers[1].location(prefix="vol")))
        cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *stores)
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        volume.mount()
        most = 0
        try:
            first = {n for n in _store_names(servers[0]) if n.startswith(("p0/meta/snap-", "p1/meta/snap-"))}
            for i in range(COMPACT_LOG_COUNT + 40):
                fd = os.open(volume.mountpoint / f"f{i}", os.O_CREAT | os.O_WRONLY)
                os.write(fd, b"x")
                os.fsync(fd)
                os.close(fd)
                if i % 20 == 0:
                    most = max(most, *_meta_counts(servers).values())
            most = max(most, *_meta_counts(servers).values())
            now = {n for n in _store_names(servers[0]) if "/meta/snap-" in n}
            assert now - first, "no copy was compacted"
        finally:
            volume.unmount()
        assert most <= COMPACT_LOG_COUNT + 3
        volume.mount()
        try:
            assert len(list(volume.mountpoint.iterdir())) == COMPACT_LOG_COUNT + 40
        finally:
            volume.unmount()

        # Fencing: each mount took the lease (ecfs.storage.lease) at a new
        # epoch and wrote its copies at it. Another host that took the
        # volume at a far later epoch wrote its snapshot; a mount at a
        # lower epoch is refused.
        store = S3Store(servers[0].location(prefix="p0"))
        copy = ObjectCopy(store, _volume_id_of(store))
        found = copy.rebuild(tmp_path / "copy.sqlite")
        assert not found.missing and found.problem is None and found.epoch == 2
        later = found.epoch + 5
        copy.install(found.path, found.generation, later)
        try:
            with pytest.raises(MountError) as refused:
                volume.mount()
        finally:
            volume.unmount(check=False)
        assert f"epoch {later}" in str(refused.value) and "another host" in str(refused.value)


def _volume_id_of(store: S3Store) -> bytes:
    return uuid.UUID(store.read_marker().volume_id).bytes


def _store_names(server: MotoServer) -> list[str]:
    return server.keys()


def _meta_counts(servers: list[MotoServer]) -> dict[str, int]:
    """Metadata objects per store prefix."""
    counts: dict[str, int] = {}
    for server in servers:
        for key in server.keys():
            prefix, _, rest = key.partition("/")
            if rest.startswith("meta/"):
                counts[f"{server.port}/{prefix}"] = counts.get(f"{server.port}/{prefix}", 0) + 1
    return counts
