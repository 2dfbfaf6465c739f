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
  their store; URL-like store arguments are refused.
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

from ecfs.store import MARKER_NAME
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
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[4] == target for line in f)


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
