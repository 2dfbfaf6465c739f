"""Hybrid volumes through the real CLI and a real FUSE mount: data
fragments on local directories, parity on S3 stores (moto_server processes
on 127.0.0.1, one per store: tests/s3servers.py). Healthy reads touch no
S3 store (both servers are stopped with SIGSTOP and every file still reads
back, none of it degraded); the loss of m local disks is survived from the
remote parity; a local volume switches to hybrid with `store add
--placement hybrid` and repair moves its parity to the new remote stores."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .mounting import TEST_MKFS_ARGS, MountedVolume, cli
from .s3servers import moto_servers
from .test_s3_mount import aws_env  # noqa: F401 (a fixture)

pytestmark = pytest.mark.mount

#: Files of several sizes: inline, one short chunk, many chunks (k=2 and
#: 128 KiB fragments make 256 KiB chunks).
SIZES = (5, 100_000, 3 << 20, (1 << 20) + 12345)


def _status(volume: MountedVolume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))


def _fragment_indices(local: list[Path]) -> set[int]:
    """Fragment indices of the fragment files on the local stores."""
    return {int(p.name.rsplit(".", 1)[1]) for d in local for p in (d / "frags").glob("*/*/*")}


def test_healthy_reads_of_a_hybrid_volume_never_touch_the_remote_stores(
    tmp_path: Path, aws_env: None  # noqa: F811
) -> None:
    with moto_servers(2) as servers:
        local = [tmp_path / "stores" / f"d{i}" for i in range(3)]
        remote = [Path(s.location(bucket=f"ecfs-{i}", prefix="vol")) for i, s in enumerate(servers)]
        stores = [*local, *remote]
        made = cli("mkfs", "--data", 2, "--parity", 2, "--placement", "hybrid", *TEST_MKFS_ARGS, *stores)
        assert "hybrid placement" in made.stdout
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
        files = {f"f{i}": os.urandom(n) for i, n in enumerate(SIZES)}
        volume.mount()
        try:
            for name, data in files.items():
                (volume.mountpoint / name).write_bytes(data)
            os.sync()
            document = _status(volume)
            assert document["placement"] == "hybrid"
            assert [s["remote"] for s in document["stores"]] == [False] * 3 + [True] * 2
            assert "placement: hybrid" in cli("status", volume.mountpoint).stdout
        finally:
            volume.unmount()
        assert _fragment_indices(local) == {0, 1}  # no parity on a local store
        for i, server in enumerate(servers):
            keys = [k for k in server.keys(bucket=f"ecfs-{i}") if "/frags/" in k]
            assert keys and {k.rsplit(".", 1)[1] for k in keys} <= {"2", "3"}  # parity only
        clean = cli("fsck", "--json", *stores, check=False)
        assert clean.returncode == 0, clean.stdout
        assert "wrong class" not in clean.stdout

        # A new mount (nothing of the files in its caches); both S3 servers
        # stopped: a read that needed one would wait for its timeout and be
        # counted degraded. (Hedged reads are not asserted: a hedge is a
        # reaction to a slow local read, i.e. to timing; they were 0 here.)
        volume.mount()
        try:
            for server in servers:
                server.pause()
            try:
                for name, data in files.items():
                    assert (volume.mountpoint / name).read_bytes() == data
                reads = _status(volume)["reads"]
            finally:
                for server in servers:
                    server.resume()
            assert reads["degraded_reads"] == 0 and reads["unrecoverable_reads"] == 0, reads
            assert reads["requested_bytes"] >= sum(n for n in SIZES if n > 64 * 1024)  # not inline
        finally:
            volume.unmount()

        # m = 2 local disks lost: every file reads back from the parity on S3.
        for lost in local[:2]:
            shutil.rmtree(lost)
        volume.mount(stores=[local[2], *remote])
        try:
            for name, data in files.items():
                assert (volume.mountpoint / name).read_bytes() == data
            document = _status(volume)
            assert document["reads"]["degraded_reads"] > 0
            assert document["health"] != "healthy"
        finally:
            volume.unmount()


def test_a_local_volume_switches_to_hybrid_and_its_parity_moves_to_s3(
    tmp_path: Path, aws_env: None  # noqa: F811
) -> None:
    local = [tmp_path / "stores" / f"d{i}" for i in range(3)]
    refused = cli("mkfs", "--data", 2, "--parity", 1, "--placement", "hybrid", *local, check=False)
    assert refused.returncode == 2
    assert "needs at least 2 local and 1 remote stores" in refused.stderr
    assert not any(d.exists() for d in local)
    cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *local)
    with moto_servers(1) as [server]:
        (tmp_path / "mnt").mkdir()
        volume = MountedVolume(local, tmp_path / "mnt", tmp_path / "ecfs.log")
        files = {f"f{i}": os.urandom(n) for i, n in enumerate(SIZES)}
        new = server.location(prefix="parity")
        volume.mount()
        try:
            for name, data in files.items():
                (volume.mountpoint / name).write_bytes(data)
            os.sync()
            assert 2 in _fragment_indices(local)  # spread: parity on the local stores
            added = cli("store", "add", "--placement", "hybrid", volume.mountpoint, new)
            assert "placement is now hybrid" in added.stdout
            cli("repair", "--wait", volume.mountpoint, timeout=300)
            document = _status(volume)
            assert document["placement"] == "hybrid" and document["health"] == "healthy"
            # The only remote store cannot go while the placement is hybrid.
            removed = cli("store", "remove", volume.mountpoint, new, check=False)
            assert removed.returncode == 1 and "hybrid placement" in removed.stderr
        finally:
            volume.unmount()
        volume.stores = [*local, Path(new)]
        assert 2 not in _fragment_indices(local)  # the parity moved to S3
        assert [k for k in server.keys() if k.endswith(".2")]
        clean = cli("fsck", "--json", "--verify-data", *volume.stores, check=False)
        assert clean.returncode == 0, clean.stdout
        volume.mount()
        try:
            server.pause()
            try:
                for name, data in files.items():
                    assert (volume.mountpoint / name).read_bytes() == data
            finally:
                server.resume()
            assert _status(volume)["reads"]["degraded_reads"] == 0
        finally:
            volume.unmount()
