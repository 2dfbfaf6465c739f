"""The volume lease through real mounts of a mixed volume (2 local stores
for the metadata, 3 S3 stores on their own moto servers; k=2, m=1): a
second host is refused while the volume is mounted, with the holder named;
after kill -9 the same host mounts again at once, another host only after
the lease expired and with --takeover (the epoch grows); after a clean
unmount any host mounts without takeover; a mount that cannot renew its
lease stops acknowledging writes and resumes once it can. The local
stores count in the lease's majority (2 of the 5 votes here).

Two hosts are played on one machine with $ECFS_HOST_ID (the documented
seam, `ecfs.storage.lease.HOST_ID_ENV`). While the first "host" is
mounted, the second is given copies of the local stores (the real local
ones are flock'ed by the first, which is the local lock's job, not the
lease's); the S3 stores are shared, as between real hosts."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecfs.storage.lease import HOST_ID_ENV

from .mounting import FUSE_MISSING_REASON, TEST_MKFS_ARGS, MountedVolume, cli, is_mounted
from .s3servers import ACCESS_KEY, SECRET_KEY, MotoServer, moto_servers

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""),
]

TTL = 6  # -o lease_seconds: short, so that expiry comes within a test
LEASE_ARGS = ("-o", f"lease_seconds={TTL}")
#: What these tests make the daemon log on purpose.
EXPECTED_LOG = (r"ERROR ecfs.storage.lease: the volume's lease (was not|could not be) renewed",)


@pytest.fixture
def servers() -> Iterator[list[MotoServer]]:
    with moto_servers(3) as running:
        yield running


def _make_volume(tmp_path: Path, servers: list[MotoServer]) -> MountedVolume:
    local = [tmp_path / "stores" / f"d{i}" for i in range(2)]
    remote = [Path(s.location(bucket=f"lease-{i}", prefix="vol")) for i, s in enumerate(servers)]
    cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *local, *remote)
    (tmp_path / "mnt").mkdir()
    return MountedVolume([*local, *remote], tmp_path / "mnt", tmp_path / "ecfs.log", LEASE_ARGS)


def _as_host(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv(HOST_ID_ENV, host)


def _mount_refused(stores: list[Path], mountpoint: Path, *extra: str) -> str:
    """`ecfs mount` that must be refused (exit 2): its message."""
    result = cli("mount", *LEASE_ARGS, *extra, *stores, mountpoint, check=False)
    if result.returncode == 0:  # never leave it mounted
        cli("umount", mountpoint, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not is_mounted(mountpoint)
    for text in (result.stdout, result.stderr):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    return result.stderr


def _lease_status(volume: MountedVolume) -> dict[str, object]:
    document = json.loads(cli("status", "--json", volume.mountpoint, check=False).stdout)
    lease = document["lease"]
    assert isinstance(lease, dict)
    return lease


def test_a_second_host_is_refused_while_mounted_and_mounts_after_a_clean_unmount(
    tmp_path: Path, aws_env: None, servers: list[MotoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = _make_volume(tmp_path, servers)
    # The other host's own copies of the local stores (see the docstring).
    copies = []
    for store in volume.stores[:2]:
        copies.append(tmp_path / "host-b" / store.name)
        shutil.copytree(store, copies[-1])
    other = [*copies, *volume.stores[2:]]
    (tmp_path / "mnt-b").mkdir()
    _as_host(monkeypatch, "host-a")
    volume.mount()
    try:
        (volume.mountpoint / "f").write_bytes(b"x" * 300_000)
        lease = _lease_status(volume)
        assert lease["state"] == "held" and lease["host"] == "host-a" and lease["epoch"] == 1
        assert lease["stores_held"] == 3 and lease["stores"] == 3 and lease["local_stores"] == 2
        assert volume.proc is not None
        _as_host(monkeypatch, "host-b")
        message = _mount_refused(other, tmp_path / "mnt-b")
        assert f"held by host host-a (pid {volume.proc.pid}) until" in message
        assert re.search(r"until \S+Z UTC \(\d+ s from now", message)
        # --takeover does not take a live lease; fsck is refused the same way.
        assert "held by host host-a" in _mount_refused(other, tmp_path / "mnt-b", "--takeover")
        fsck = cli("fsck", "--takeover", *other, check=False)
        assert fsck.returncode == 2 and "held by host host-a" in fsck.stderr
        assert "lease: held, host host-a" in cli("status", volume.mountpoint).stdout
        prometheus = cli("status", "--prometheus", volume.mountpoint).stdout
        assert re.search(r'^ecfs_lease_state\{state="held"\} 1(\.0)?$', prometheus, re.M)
        assert re.search(r"^ecfs_lease_epoch 1(\.0)?$", prometheus, re.M)
        _as_host(monkeypatch, "host-a")
    finally:
        volume.unmount()
    _as_host(monkeypatch, "host-b")  # the real stores now, as the metadata would be shared
    volume.mount()
    try:
        lease = _lease_status(volume)
        assert lease["host"] == "host-b" and lease["epoch"] == 2
        assert (volume.mountpoint / "f").read_bytes() == b"x" * 300_000
    finally:
        volume.unmount()
    volume.check_log_clean()


def test_after_kill_9_the_same_host_remounts_and_another_needs_expiry_and_takeover(
    tmp_path: Path, aws_env: None, servers: list[MotoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = _make_volume(tmp_path, servers)
    data = os.urandom(500_000)
    _as_host(monkeypatch, "host-a")
    volume.mount()
    try:
        path = volume.mountpoint / "f"
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        volume.kill()
    finally:
        volume.unmount(check=False)
    # The same host: its crashed daemon holds nothing any more.
    volume.mount()
    try:
        assert _lease_status(volume)["epoch"] == 2
        assert path.read_bytes() == data
        assert volume.proc is not None
        pid = volume.proc.pid
        volume.kill()
    finally:
        volume.unmount(check=False)
    # Another host: refused while the dead mount's lease runs, then until
    # it is taken over explicitly.
    _as_host(monkeypatch, "host-b")
    message = _mount_refused(volume.stores, volume.mountpoint)
    assert f"held by host host-a (pid {pid}) until" in message
    deadline = time.monotonic() + 4 * TTL
    while "not unmounted cleanly" not in message:
        assert time.monotonic() < deadline, message
        time.sleep(1)
        message = _mount_refused(volume.stores, volume.mountpoint)
    assert f"held by host host-a (pid {pid}), expired at" in message
    assert "--takeover" in message
    fsck = cli("fsck", *volume.stores, check=False)  # fsck takes the lease too
    assert fsck.returncode == 2 and "not unmounted cleanly" in fsck.stderr
    volume.mount("--takeover")
    try:
        lease = _lease_status(volume)
        assert lease["host"] == "host-b" and lease["epoch"] == 3
        assert path.read_bytes() == data
    finally:
        volume.unmount()
    assert "taking over the volume's lease from host host-a" in volume.log_text()
    _as_host(monkeypatch, "host-a")  # released cleanly: no takeover needed
    volume.mount()
    volume.unmount()


def test_a_mount_that_cannot_renew_its_lease_refuses_writes_until_it_can(
    tmp_path: Path, aws_env: None, servers: list[MotoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = _make_volume(tmp_path, servers)
    _as_host(monkeypatch, "host-a")
    volume.mount()
    try:
        (volume.mountpoint / "before").write_bytes(b"before")
        # Every S3 store hangs: the 2 local stores are no majority of 5.
        for server in servers:
            server.pause()
        try:
            deadline = time.monotonic() + 4 * TTL
            while _lease_status(volume)["state"] != "fenced":
                assert time.monotonic() < deadline, "the lease was never fenced"
                time.sleep(0.5)
            with pytest.raises(OSError) as refused:
                with open(volume.mountpoint / "during", "wb") as f:
                    f.write(b"refused")
            assert refused.value.errno == errno.EIO
        finally:
            for server in servers:
                server.resume()
        deadline = time.monotonic() + 4 * TTL
        while _lease_status(volume)["state"] != "held":
            assert time.monotonic() < deadline, "the lease was never renewed again"
            time.sleep(0.5)
        with open(volume.mountpoint / "after", "wb") as f:
            f.write(b"after")
            os.fsync(f.fileno())
        assert (volume.mountpoint / "after").read_bytes() == b"after"
    finally:
        volume.unmount()
    log = volume.log_text()
    assert re.search(r"ERROR .* lease (was not|could not be) renewed", log)
    assert "renewed again: writes resume" in log
    volume.check_log_clean(EXPECTED_LOG)
