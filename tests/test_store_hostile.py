"""Stores that are not what they claim, or hold what is not a fragment
(issue 13: A3, A4, B6, C7, D11, D14), on real mounts where it matters.

* A store swapped underneath a mounted volume (a bind mount of an empty
  directory over it, as when a disk drops off the bus) is noticed, marked
  failed with the reason, never written again, and recognised when it
  comes back.
* A directory, symlink or FIFO where a fragment file should be is a bad
  fragment (repaired around and queued), never a dead store; fsck replaces
  the bad entry.
* Store files are opened without following symlinks and without blocking
  on FIFOs; a bad header's bytes are never printed; the log file is 0600.
* Markers that disagree with the volume (geometry, volume id) degrade only
  their store; URL-like store arguments (but well-formed s3:// locations)
  are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecfs.core.host import mount_at
from ecfs.storage.store import MARKER_NAME
from tests.mounting import MountedVolume, cli
from tests.volume_files import (
    MiB,
    drop_caches,
    fragment_files,
    sha256_file,
    status,
    write_pattern_file,
)

#: Seconds a test waits for the daemon's health loop to notice a change.
NOTICE_TIMEOUT = 30.0


def _wait_for(predicate: object, timeout: float = NOTICE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return bool(predicate())  # type: ignore[operator]


def _store_row(vol: MountedVolume, index: int) -> dict:
    return next(row for row in status(vol)["stores"] if row["index"] == index)


def _is_mount_point(path: Path) -> bool:
    return mount_at(path) is not None


@contextlib.contextmanager
def _bind_mounted(source: Path, target: Path) -> Iterator[None]:
    """`mount --bind source target` (as root); always undone in finally."""
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield
    finally:
        _unbind(target)


def _unbind(target: Path) -> None:
    if not _is_mount_point(target):
        return
    done = subprocess.run(["umount", str(target)], capture_output=True, check=False)
    if done.returncode != 0 and _is_mount_point(target):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


# --------------------------------------------------------------------------
# A3: a store swapped underneath a mounted volume


@requires_root
@pytest.mark.allow_log(r"store 2 .*(failed|swapped|changed|marker|back)|unreadable|queued for repair")
def test_a_store_swapped_while_mounted_is_failed_never_written_and_comes_back(
    volume: MountedVolume, tmp_path: Path
) -> None:
    mnt = volume.mountpoint
    before = write_pattern_file(mnt / "before", 1, 3 * MiB + 5)
    os.sync()
    empty = tmp_path / "empty"
    empty.mkdir()
    swapped = volume.stores[2]
    with _bind_mounted(empty, swapped):
        # A new file written right after the swap (no waiting for the
        # periodic check): not one byte of it may land in the empty directory.
        after = write_pattern_file(mnt / "after", 2, 3 * MiB + 7)
        with open(mnt / "after", "rb+") as f:
            os.fsync(f.fileno())
        assert not any(empty.iterdir()), list(empty.rglob("*"))
        assert _wait_for(lambda: _store_row(volume, 2)["state"] == "failed")
        row = _store_row(volume, 2)
        assert row["reason"], row
        document = status(volume)
        assert document["health"] != "healthy"
        assert document["tolerance"] <= 1
        drop_caches()
        assert sha256_file(mnt / "before") == before
        assert sha256_file(mnt / "after") == after
        more = write_pattern_file(mnt / "more", 3, 2 * MiB)
        os.sync()
        time.sleep(1)
        assert not any(empty.iterdir()), list(empty.rglob("*"))
        assert _store_row(volume, 2)["state"] == "failed"
    # The bind mount is gone: the store is the same again and comes back.
    assert _wait_for(lambda: _store_row(volume, 2)["state"] == "ok")
    drop_caches()
    for name, digest in (("before", before), ("after", after), ("more", more)):
        assert sha256_file(mnt / name) == digest


# --------------------------------------------------------------------------
# A4, B6, C7: entries where fragment files belong that are not fragment files

SECRET = b"root:*:SECRET-SHADOW-LINE\n" * 200


def _populate(vol: MountedVolume) -> dict[str, str]:
    return {
        f"f{i}": write_pattern_file(vol.mountpoint / f"f{i}", 10 + i, (i + 2) * MiB + 333)
        for i in range(3)
    }


def _plant(stores: list[Path], secret: Path, kinds: list[str]) -> list[Path]:
    """Replace one fragment file on each of stores 0.. by an entry of
    `kinds[n]` ("dir", "fifo", "symlink"), each on a different chunk."""
    used: set[int] = set()
    victims = []
    for number, kind in enumerate(kinds):
        (chunk_id, _), victim = next(
            (key, path)
            for key, path in sorted(fragment_files(stores[number]).items())
            if key[0] not in used
        )
        used.add(chunk_id)
        victim.unlink()
        if kind == "dir":
            victim.mkdir()
            (victim / "junk").write_bytes(b"not a fragment")
        elif kind == "fifo":
            os.mkfifo(victim)
        else:
            victim.symlink_to(secret)
        victims.append(victim)
    return victims


def _regular_fragments(victims: list[Path]) -> bool:
    return all(stat.S_ISREG(os.lstat(v).st_mode) for v in victims if os.path.lexists(v))


@pytest.mark.allow_log(r"queued for repair|unreadable|not a regular file|symbolic link")
def test_bad_fragment_entries_are_bad_fragments_not_dead_stores(
    volume: MountedVolume, tmp_path: Path
) -> None:
    hashes = _populate(volume)
    volume.unmount()
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    victims = _plant(volume.stores, secret, ["dir", "dir", "dir", "fifo", "symlink"])
    volume.mount()
    for _ in range(2):
        drop_caches()
        for name, digest in hashes.items():
            assert sha256_file(volume.mountpoint / name) == digest, name
    document = status(volume)
    assert document["health"] != "data-loss", document
    assert document["tolerance"] >= 1
    for row in document["stores"]:  # no store failed, none flapped
        assert row["state"] == "ok", row
        assert row["errors"] == 0, row
    assert document["repair"]["chunks"] or document["repair"]["fragments_rebuilt"]
    # Scrub finds the bad parity entries too (reads never look at them), and
    # the repair replaces every bad entry with a fragment file.
    scrubbed = cli("scrub", volume.mountpoint, check=False, timeout=120)
    assert scrubbed.returncode in (0, 1), scrubbed.stderr
    assert all(row["state"] == "ok" for row in status(volume)["stores"])
    cli("repair", "--wait", volume.mountpoint, timeout=120)
    assert _wait_for(lambda: _regular_fragments(victims))
    assert all(row["state"] == "ok" for row in status(volume)["stores"])
    volume.unmount()
    assert SECRET[:20] not in volume.log_path.read_bytes()
    checked = cli("fsck", "--verify-data", *volume.stores, timeout=120)
    assert "clean" in checked.stdout
    volume.mount()
    drop_caches()
    for name, digest in hashes.items():
        assert sha256_file(volume.mountpoint / name) == digest, name


def test_fsck_never_blocks_nor_echoes_and_replaces_bad_entries(
    volume: MountedVolume, tmp_path: Path
) -> None:
    hashes = _populate(volume)
    volume.unmount()
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    victims = _plant(volume.stores, secret, ["dir", "fifo", "symlink", "dir"])
    found = cli("fsck", "--verify-data", *volume.stores, check=False, timeout=60)
    assert found.returncode == 1, found.stdout + found.stderr
    assert b"SECRET" not in (found.stdout + found.stderr).encode()
    assert "not a regular file" in found.stdout and "symbolic link" in found.stdout
    fixed = cli("fsck", "--repair", *volume.stores, check=False, timeout=60)
    assert fixed.returncode == 1 and "NOT fixed" not in fixed.stdout, fixed.stdout
    assert b"SECRET" not in (fixed.stdout + fixed.stderr).encode()
    assert _regular_fragments(victims)
    assert secret.read_bytes() == SECRET  # the symlink was removed, never followed
    clean = cli("fsck", "--verify-data", *volume.stores, timeout=60)
    assert "clean" in clean.stdout
    volume.mount()
    drop_caches()
    for name, digest in hashes.items():
        assert sha256_file(volume.mountpoint / name) == digest, name


# --------------------------------------------------------------------------
# C7: FIFOs as the other store files: nothing hangs, nothing stays locked


def _others_unlocked(stores: list[Path]) -> bool:
    from ecfs.storage.lock import VolumeLock

    VolumeLock.acquire(stores).release()  # raises if one is still locked
    return True


@pytest.mark.allow_log(r"store .* is unavailable|not a regular file|missing|is unusable")
def test_a_fifo_as_marker_or_metadata_file_degrades_that_store(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    marker = volume.stores[3] / MARKER_NAME
    saved = marker.read_bytes()
    marker.unlink()
    os.mkfifo(marker)
    replica = volume.stores[0] / "meta" / "ecfs-meta.sqlite"
    replica.unlink()
    os.mkfifo(replica)
    wal = volume.stores[1] / "meta" / "ecfs-meta.sqlite-wal"
    wal.unlink(missing_ok=True)
    os.mkfifo(wal)
    checked = cli("fsck", *volume.stores, check=False, timeout=60)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "not a regular file" in checked.stdout + checked.stderr
    volume.mount()  # within the harness's timeout: no hang
    try:
        drop_caches()
        for name, digest in hashes.items():
            assert sha256_file(volume.mountpoint / name) == digest, name
        row = _store_row(volume, 3)
        assert row["state"] == "missing"
        assert status(volume)["health"] != "healthy"
        assert stat.S_ISREG(os.lstat(replica).st_mode)  # replaced by a good copy
    finally:
        volume.unmount()
    marker.unlink()
    marker.write_bytes(saved)
    volume.mount()


def test_a_fifo_as_lock_file_is_refused_without_hanging_or_holding_locks(
    volume: MountedVolume,
) -> None:
    volume.unmount()
    lock = volume.stores[2] / "lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)
    refused = cli("mount", *volume.stores, volume.mountpoint, check=False, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert str(lock) in refused.stderr and "FIFO" in refused.stderr
    assert not volume.is_mounted
    assert _others_unlocked([s for s in volume.stores if s != volume.stores[2]])
    refused = cli("fsck", *volume.stores, check=False, timeout=60)
    assert refused.returncode == 2 and "FIFO" in refused.stderr, refused.stderr
    assert _others_unlocked([s for s in volume.stores if s != volume.stores[2]])
    lock.unlink()
    volume.mount()


# --------------------------------------------------------------------------
# B6: the daemon's log file is private


def test_the_log_file_is_created_private(tmp_path: Path) -> None:
    from ecfs.frontend.cli import open_log_file

    new = tmp_path / "new.log"
    open_log_file(new, private=False).close()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    default = tmp_path / "mount.log"
    default.write_text("old\n")
    default.chmod(0o644)
    with open_log_file(default, private=True) as f:
        f.write("new\n")
    assert stat.S_IMODE(default.stat().st_mode) == 0o600
    assert default.read_text() == "old\nnew\n"
    link = tmp_path / "link.log"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        open_log_file(link, private=True)
    assert not (tmp_path / "elsewhere").exists()


def test_a_background_mount_creates_its_log_file_0600(volume: MountedVolume, tmp_path: Path) -> None:
    volume.unmount()
    log_file = tmp_path / "daemon.log"
    cli("mount", "--log-file", log_file, *volume.stores, volume.mountpoint, timeout=60)
    try:
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert "mounted volume" in log_file.read_text()
    finally:
        cli("umount", volume.mountpoint, timeout=60)
    volume.mount()


# --------------------------------------------------------------------------
# D11: markers that disagree with the volume


def _edit_marker(store: Path, **changes: object) -> None:
    marker = store / MARKER_NAME
    data = json.loads(marker.read_text())
    data.update(changes)
    marker.write_text(json.dumps(data))


OTHER_VOLUME = "0123456789abcdef0123456789abcdef"


@pytest.mark.allow_log(r"left out|store .* is unavailable|missing")
@pytest.mark.parametrize("change", [{"k": 3}, {"volume_id": OTHER_VOLUME}])
def test_a_marker_that_disagrees_degrades_only_its_store(
    volume: MountedVolume, change: dict[str, object]
) -> None:
    hashes = _populate(volume)
    volume.unmount()
    saved = {s: (s / MARKER_NAME).read_bytes() for s in volume.stores}
    _edit_marker(volume.stores[4], **change)
    checked = cli("fsck", *volume.stores, check=False, timeout=60)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"store {volume.stores[4]} is not used" in checked.stdout, checked.stdout
    volume.mount()
    try:
        drop_caches()
        for name, digest in hashes.items():
            assert sha256_file(volume.mountpoint / name) == digest, name
        assert _store_row(volume, 4)["state"] == "missing"
        assert status(volume)["tolerance"] == 1
    finally:
        volume.unmount()
    assert "left out" in volume.log_text()
    # Beyond tolerance: refused, naming the reason.
    for store in volume.stores[3:4] + volume.stores[5:]:
        _edit_marker(store, **change)
    refused = cli("mount", *volume.stores, volume.mountpoint, check=False, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "at most 2" in refused.stderr or "different volumes" in refused.stderr
    for store, data in saved.items():
        (store / MARKER_NAME).write_bytes(data)
    volume.mount()


# --------------------------------------------------------------------------
# D14: store arguments


@pytest.mark.parametrize("command", ["mount", "fsck", "mkfs"])
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://host/store", "looks like a URL"),
        ("s3://Bad_Bucket/store", "bad bucket name"),  # s3:// is a store, if well-formed
    ],
)
def test_url_like_store_arguments_are_usage_errors(
    command: str, url: str, why: str, tmp_path: Path
) -> None:
    args = [tmp_path / "a", url, tmp_path / "b"]
    if command == "mount":
        (tmp_path / "mnt").mkdir()
        args.append(tmp_path / "mnt")
    refused = cli(command, *args, check=False, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert why in refused.stderr
    for scheme in ("s3:", "http:"):
        assert not (tmp_path / scheme).exists() and not Path(scheme).exists()


def test_too_many_blank_stores_names_the_metadata_copies(tmp_path: Path) -> None:
    stores = [tmp_path / f"s{i}" for i in range(6)]
    cli("mkfs", "--data", 4, "--parity", 2, *stores)
    holders = [s for s in stores if (s / "meta" / "ecfs-meta.sqlite").exists()]
    assert len(holders) == 3
    for store in holders:
        shutil.rmtree(store)
        store.mkdir()
    (tmp_path / "mnt").mkdir()
    for argv in (("mount", *stores, tmp_path / "mnt"), ("fsck", *stores)):
        refused = cli(*argv, check=False, timeout=60)
        assert refused.returncode == 2, refused.stderr
        message = refused.stderr
        assert "no metadata copy" in message, message
        assert "more than m = 2 stores are missing" in message, message
        for store in holders:
            assert str(store) in message
        assert "meta/ecfs-meta.sqlite" not in message


def test_a_store_is_verified_before_it_gets_fragments_after_idle_time(tmp_path: Path) -> None:
    """A directory swapped in that already has fan-out directories (a copy
    of another store here) gives no ENOENT to notice: the identity check
    before a write after IDENTITY_MAX_AGE does."""
    import trio

    from ecfs.volume.assembly import IDENTITY_MAX_AGE, Volume

    stores = [tmp_path / f"s{i}" for i in range(6)]
    cli("mkfs", "--data", 4, "--parity", 2, *stores)
    volume = Volume.open([str(s) for s in stores], runtime_dir=tmp_path)
    away = tmp_path / "s2-away"

    async def check() -> None:
        assert await volume.verify_before_write(2)
        os.rename(stores[2], away)
        shutil.copytree(stores[3], stores[2])
        await trio.sleep(IDENTITY_MAX_AGE + 0.2)
        assert not await volume.verify_before_write(2)
        runner = volume.runners[2]
        assert runner.failure_reason is not None and "another store" in runner.failure_reason
        shutil.rmtree(stores[2])
        os.rename(away, stores[2])
        await volume.probe_store(2)
        assert runner.available

    try:
        trio.run(check)
    finally:
        volume.close()
