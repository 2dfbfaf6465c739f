"""A volume mixing local directories and S3 stores, through the real CLI
and a real FUSE mount: mkfs, mount, write, read; one S3 server killed and
the volume read degraded; status, scrub, fsck; repair onto a replacement
endpoint; one server slowed down (a delaying proxy: reads go around it,
status shows it slow), one hung (SIGSTOP), bit rot in an object (found by
fsck and scrub, repaired); the secret never in the
daemon's log, the status JSON or an error message; small fsync'd
overwrites logged on the local stores only, surviving kill -9. The S3 stores are
moto_server processes on 127.0.0.1 (tests/s3servers.py), one per store."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from .mounting import TEST_MKFS_ARGS, MountedVolume, cli
from .s3servers import ACCESS_KEY, SECRET_KEY, DelayProxy, moto_servers
from .test_crash import ALLOWED_AFTER_KILL, fsck
from .volume_files import drop_caches, fsynced_overwrites

pytestmark = pytest.mark.mount


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text


def test_mkfs_puts_metadata_copies_on_object_stores_when_few_are_local(
    tmp_path: Path, aws_env: None
) -> None:
    """2 local stores for m = 2: the third metadata copy is objects on an
    S3 store (see tests/test_s3_meta.py for what they go through)."""
    with moto_servers(1) as [server]:
        stores = [str(tmp_path / f"d{i}") for i in range(2)]
        stores += [server.location(prefix=f"p{i}") for i in range(3)]
        result = cli("mkfs", "--data", 3, "--parity", 2, *stores)
        _no_secret(result.stdout, result.stderr)
        assert all((Path(s) / "meta" / "ecfs-meta.sqlite").exists() for s in stores[:2])
        meta = [k for k in server.keys() if "/meta/" in k]
        assert len(meta) == 1 and meta[0].startswith("p0/meta/snap-")
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume([Path(p) for p in stores], tmp_path / "mnt", tmp_path / "ecfs.log")
        data = os.urandom(200_000)
        volume.mount()
        try:
            (volume.mountpoint / "f").write_bytes(data)
            os.sync()
            document = json.loads(cli("status", "--json", volume.mountpoint).stdout)
            assert document["metadata"]["copies"] == {"0": "file", "1": "file", "2": "objects"}
            assert "store 2 (objects)" in cli("status", volume.mountpoint).stdout
        finally:
            volume.unmount()
        # One file copy lost with its disk: the others (one of them objects) serve.
        (Path(stores[0]) / "meta" / "ecfs-meta.sqlite").unlink()
        volume.mount()
        try:
            assert (volume.mountpoint / "f").read_bytes() == data
        finally:
            volume.unmount()
        bad = cli("mkfs", "--data", 1, "--parity", 1, stores[0], "s3://xyz?secret=1", check=False)
        assert bad.returncode == 2 and "credentials never go in a location" in bad.stderr


def test_a_failed_mkfs_with_object_stores_can_be_rerun(tmp_path: Path, aws_env: None) -> None:
    with moto_servers(2) as servers:
        local = [str(tmp_path / f"d{i}") for i in range(2)]
        remote = [s.location(prefix="vol") for s in servers]
        servers[1].kill()  # the second object store cannot be created
        failed = cli("mkfs", "--data", 3, "--parity", 1, *local, *remote, check=False)
        assert failed.returncode != 0 and remote[1].split("?")[0] in failed.stderr
        _no_secret(failed.stdout, failed.stderr)
        assert not any(Path(s).exists() for s in local)
        servers[1].start()
        cli("mkfs", "--data", 3, "--parity", 1, *local, *remote)  # the first prefix is unused again


def test_a_mixed_volume_mounts_reads_degraded_and_checks(tmp_path: Path, aws_env: None) -> None:
    with moto_servers(4) as servers:
        local = [tmp_path / "stores" / f"d{i}" for i in range(3)]
        remote = [Path(s.location(bucket=f"ecfs-{i}", prefix="vol")) for i, s in enumerate(servers[:3])]
        stores = [*local, *remote]
        made = cli("mkfs", "--data", 4, "--parity", 2, *TEST_MKFS_ARGS, *stores)
        _no_secret(made.stdout, made.stderr)
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        files = {f"f{i}": os.urandom(n) for i, n in enumerate((5, 100_000, 3 << 20))}
        volume.mount()
        try:
            for name, data in files.items():
                (volume.mountpoint / name).write_bytes(data)
            os.sync()
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            status = cli("status", "--json", volume.mountpoint).stdout
            document = json.loads(status)
            assert document["health"] == "healthy"
            paths = [s["path"] for s in document["stores"]]
            # Shown as given (a Path would make "s3:/ecfs-0/...http:/127...").
            assert [servers[i].location(bucket=f"ecfs-{i}", prefix="vol") for i in range(3)] == [
                p for p in paths if p.startswith("s3:")
            ]
            scrub = cli("scrub", "--json", volume.mountpoint)
            assert json.loads(scrub.stdout)["findings"] == []
            # A fourth S3 store comes and goes while mounted.
            extra = servers[3].location(bucket="ecfs-extra", prefix="vol")
            _no_secret(cli("store", "add", volume.mountpoint, extra).stdout)
            (volume.mountpoint / "g").write_bytes(files["f2"])
            os.sync()
            removed = cli("store", "remove", volume.mountpoint, extra)
            _no_secret(removed.stdout, removed.stderr)
            assert (volume.mountpoint / "g").read_bytes() == files["f2"]
            document = json.loads(cli("status", "--json", volume.mountpoint).stdout)
            assert extra not in [s["path"] for s in document["stores"]]
        finally:
            volume.unmount()

        # One server dies under a mount (nothing of the files is in the page
        # cache of this new mount): reads go on, degraded.
        volume.mount()
        try:
            servers[0].kill()
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            assert (volume.mountpoint / "g").read_bytes() == files["f2"]
        finally:
            volume.unmount()

        # Still gone: the volume mounts without it and reads degraded.
        volume.mount()
        try:
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            status = cli("status", "--json", volume.mountpoint, check=False).stdout
            document = json.loads(status)
            assert document["health"] != "healthy"
            gone = [s["path"] for s in document["stores"] if s["state"] != "ok"]
            assert gone == [servers[0].location(bucket="ecfs-0", prefix="vol")]
            (volume.mountpoint / "after").write_bytes(b"written while one store is gone")
            assert (volume.mountpoint / "after").read_bytes().startswith(b"written")
        finally:
            volume.unmount()
        log = volume.log_text()
        _no_secret(log, status)

        fsck = cli("fsck", "--json", *stores, check=False)
        report = json.loads(fsck.stdout)
        assert fsck.returncode == 1  # the dead store is a finding
        assert any("s3:" in f["message"] for f in report["findings"])
        _no_secret(fsck.stdout, fsck.stderr)
        healthy = cli("fsck", "--json", *stores[:5], check=False)  # without the dead one
        _no_secret(healthy.stdout, healthy.stderr)

        # The dead endpoint is replaced by a new one; repair rebuilds onto it.
        new = servers[3].location(bucket="ecfs-new", prefix="vol")
        volume.mount()
        try:
            replaced = cli("store", "replace", volume.mountpoint, str(remote[0]), new)
            _no_secret(replaced.stdout, replaced.stderr)
            cli("repair", "--wait", volume.mountpoint, timeout=300)
            document = json.loads(cli("status", "--json", volume.mountpoint).stdout)
            assert document["health"] == "healthy"
            assert new in [s["path"] for s in document["stores"]]
        finally:
            volume.unmount()
        volume.stores = [*stores[:3], Path(new), *stores[4:]]
        clean = cli("fsck", "--json", "--verify-data", *volume.stores, check=False)
        assert clean.returncode == 0, clean.stdout
        volume.mount()
        try:
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
        finally:
            volume.unmount()


def test_small_fsynced_overwrites_on_a_mixed_volume_survive_kill_9(
    tmp_path: Path, aws_env: None
) -> None:
    """The small-write log keeps its copies on the local stores only (an
    object store holds no log segments): small fsync'd overwrites are
    logged there, none of the log reaches the S3 stores, and after kill -9
    of the daemon and a remount the fsync'd bytes are there."""
    block = 4096
    with moto_servers(1) as [server]:
        local = [tmp_path / "stores" / f"d{i}" for i in range(3)]
        remote = [Path(server.location(prefix=f"p{i}")) for i in range(3)]
        stores = [*local, *remote]
        cli("mkfs", "--data", 4, "--parity", 2, *TEST_MKFS_ARGS, *stores)
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        volume.mount()
        try:
            path = volume.mountpoint / "f"
            size = 2 << 20
            expected = bytearray(os.urandom(size))
            path.write_bytes(expected)
            fsynced_overwrites(path, expected, count=40, block=block, seed=16)
            document = json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))
            assert document["health"] == "healthy"  # no S3 store was tried and failed
            log = document["write_log"]
            assert log["records_written"] >= 40 and log["records"] > 0  # not folded yet
            assert log["copies_missing"] == 0  # m+1 copies, all on local stores
            volume.kill()
        finally:
            volume.unmount(check=False)
        for store in local:
            assert sorted((store / "wlog").iterdir()), f"no log segment on {store}"
        keys = server.keys()
        assert keys and not [k for k in keys if "wlog" in k]
        volume.mount()
        try:
            assert path.read_bytes() == expected
        finally:
            volume.unmount()
        report = fsck(stores)
        bad = [f.message for f in report.errors if f.check not in ALLOWED_AFTER_KILL]
        assert not bad and not report.unrecoverable, bad


def _store_state(volume: MountedVolume, path: str) -> str:
    document = json.loads(cli("status", "--json", volume.mountpoint, check=False).stdout)
    return next(s["state"] for s in document["stores"] if s["path"] == path)


def test_slow_hung_and_rotten_object_stores(tmp_path: Path, aws_env: None) -> None:
    """One S3 server behind a proxy that delays every answer by 1 s (below
    the 2 s health probe timeout: it answers, slowly): reads stay correct
    and go around it (hedged, then decoded from the others once the late
    answers have marked it slow), and status shows it "slow". Another one
    hung (SIGSTOP): reads go around it too. Then bit rot in one fragment
    object, written behind ecfs's back: fsck --verify-data and scrub find
    it, repair rebuilds it, fsck is clean."""
    with moto_servers(3) as servers, DelayProxy(servers[1].endpoint) as proxy:
        local = [tmp_path / "stores" / f"d{i}" for i in range(3)]
        remote = [
            servers[0].location(bucket="ecfs-0", prefix="vol"),
            proxy.location(bucket="ecfs-1", prefix="vol"),
            servers[2].location(bucket="ecfs-2", prefix="vol"),
        ]
        stores = [*local, *map(Path, remote)]
        cli("mkfs", "--data", 4, "--parity", 2, *TEST_MKFS_ARGS, *stores)
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        files = {f"f{i}": os.urandom(1 << 20) for i in range(16)}
        volume.mount()
        try:
            for name, data in files.items():  # 32 chunks: a latency baseline per store
                (volume.mountpoint / name).write_bytes(data)
            os.sync()
            drop_caches()
            proxy.delay = 1.0
            names = iter(files)
            deadline = time.monotonic() + 120
            while _store_state(volume, remote[1]) != "slow":
                assert time.monotonic() < deadline, "the slowed store never showed as slow"
                name = next(names, None)
                if name is None:
                    drop_caches()
                    names = iter(files)
                    continue
                assert (volume.mountpoint / name).read_bytes() == files[name]
            status = cli("status", "--json", volume.mountpoint, check=False).stdout
            reads = json.loads(status)["reads"]
            assert reads["hedged_reads"] + reads["degraded_reads"] >= 1
            # Slow, it is read around: no reads wait on it, nothing is lost.
            asked = proxy.requests
            drop_caches()
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            assert _store_state(volume, remote[1]) == "slow"
            assert proxy.requests - asked < len(files)  # a few prefetches and probes at most
            proxy.delay = 0.0

            servers[2].pause()  # hung
            try:
                drop_caches()
                for name, data in files.items():
                    assert (volume.mountpoint / name).read_bytes() == data
            finally:
                servers[2].resume()
        finally:
            volume.unmount()

        # Bit rot: one byte of one fragment object's payload changes on the server.
        key = next(k for k in servers[0].keys("ecfs-0") if "/frags/" in k)
        servers[0].rot("ecfs-0", key)
        found = cli("fsck", "--json", "--verify-data", *stores, check=False)
        assert found.returncode == 1, found.stdout
        assert any("checksum" in f["message"] for f in json.loads(found.stdout)["findings"])
        volume.mount()
        try:
            scrub = cli("scrub", "--json", volume.mountpoint, check=False)
            assert scrub.returncode == 1  # findings
            assert len(json.loads(scrub.stdout)["findings"]) == 1
            cli("repair", "--wait", volume.mountpoint, timeout=300)
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
        finally:
            volume.unmount()
        clean = cli("fsck", "--json", "--verify-data", *stores, check=False)
        assert clean.returncode == 0, clean.stdout
        _no_secret(volume.log_text())
