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

from ecfs.storage.store import fragment_relpath
from ecfs.storage.storefactory import open_store

from .mounting import TEST_MKFS_ARGS, MountedVolume, cli
from .s3servers import MotoServer, moto_servers
from .test_fsck import edit_replicas, query_replica

pytestmark = pytest.mark.mount

#: Files of several sizes: inline, one short chunk, many chunks (k=2 and
#: 128 KiB fragments make 256 KiB chunks).
SIZES = (5, 100_000, 3 << 20, (1 << 20) + 12345)


def _status(volume: MountedVolume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))


def _fragment_indices(local: list[Path]) -> set[int]:
    """Fragment indices of the fragment files on the local stores."""
    return {int(p.name.rsplit(".", 1)[1]) for d in local for p in (d / "frags").glob("*/*/*")}


def _forge_parity_on_a_local_store(
    volume: MountedVolume, server: MotoServer, local: list[Path]
) -> None:
    """Put one parity fragment of a chunk on the local store holding no
    fragment of it, as if written while the remote stores were short: the
    object's bytes copied to the directory store, the metadata (every
    replica) pointing there."""
    [(chunk_id, stores)] = query_replica(
        volume, "SELECT chunk_id, stores FROM chunks WHERE length > 65536 LIMIT 1"
    )
    stores = list(stores)
    remote_index = stores[2]
    assert remote_index == 3  # store 3: servers[0]'s bucket ecfs-0
    free = ({0, 1, 2} - set(stores[:2])).pop()
    relpath = fragment_relpath(chunk_id, 2)
    buffer = bytearray(4 << 20)
    size = open_store(server.location(bucket="ecfs-0", prefix="vol")).read_fragment(
        chunk_id, 2, 0, memoryview(buffer)
    )
    data = bytes(buffer[:size])
    target = local[free] / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    stores[2] = free
    edit_replicas(
        volume, ("UPDATE chunks SET stores = ? WHERE chunk_id = ?", (bytes(stores), chunk_id))
    )


def test_healthy_reads_of_a_hybrid_volume_never_touch_the_remote_stores(
    tmp_path: Path, aws_env: None
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
            # df: the local stores' filesystem (one here), whole; nothing
            # for the S3 stores, whose size is unknown.
            mounted, disk = os.statvfs(volume.mountpoint), os.statvfs(local[0])
            assert mounted.f_blocks * mounted.f_frsize // 4096 == disk.f_blocks * disk.f_frsize // 4096
        finally:
            volume.unmount()
        assert _fragment_indices(local) == {0, 1}  # no parity on a local store
        for i, server in enumerate(servers):
            keys = [k for k in server.keys(bucket=f"ecfs-{i}") if "/frags/" in k]
            assert keys and {k.rsplit(".", 1)[1] for k in keys} <= {"2", "3"}  # parity only
        clean = cli("fsck", "--json", *stores, check=False)
        assert clean.returncode == 0, clean.stdout
        assert "wrong class" not in clean.stdout
        _forge_parity_on_a_local_store(volume, servers[0], local)
        found = json.loads(cli("fsck", "--json", *stores, check=False).stdout)
        assert found["counts"]["fragments_wrong_class"] == 1
        [warning] = [f for f in found["findings"] if "wrong class" in f["message"]]
        assert warning["severity"] == "warning"
        cli("fsck", "--repair", *stores, check=False)  # queues it for the mount's repair
        volume.mount()
        try:
            cli("repair", "--wait", volume.mountpoint, timeout=300)
        finally:
            volume.unmount()
        assert _fragment_indices(local) == {0, 1}  # the parity is back on S3
        moved = json.loads(cli("fsck", "--json", "--verify-data", *stores, check=False).stdout)
        assert moved["clean"] and "fragments_wrong_class" not in moved["counts"], moved

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
    tmp_path: Path, aws_env: None
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
