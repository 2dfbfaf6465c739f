"""Degraded reads through a real mount: missing stores, missing or rotten
fragments, range-limited decoding, and EIO (never wrong bytes) beyond m."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.mounting import TEST_FRAGMENT_SIZE, MountedVolume
from tests.volume_files import (
    MiB,
    drop_caches,
    flip_payload_bytes,
    fragment_files,
    fragments_by_chunk,
    pattern,
    sha256_file,
    status,
    write_pattern_file,
)

K, M = 4, 2
CELL = 4096


def _populate(volume: MountedVolume, count: int = 6) -> dict[Path, str]:
    hashes = {}
    for i in range(count):
        path = volume.mountpoint / f"f{i}"
        hashes[path] = write_pattern_file(path, seed=i, size=(i + 1) * 3 * MiB + 999)
    return hashes


def _queued_or_repaired(volume: MountedVolume) -> int:
    repair = status(volume)["repair"]
    return repair["chunks"] + repair["chunks_repaired"] + repair["chunks_checked_fine"]


def _check(hashes: dict[Path, str]) -> None:
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


def test_a_store_whose_fragments_vanished_is_read_around(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    shutil.rmtree(volume.stores[2] / "frags")
    volume.mount()
    _check(hashes)
    assert status(volume)["reads"]["degraded_reads"] > 0
    assert _queued_or_repaired(volume) > 0


def test_a_missing_store_is_read_around(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    volume.mount(stores=[s for i, s in enumerate(volume.stores) if i != 4])
    _check(hashes)
    reads = status(volume)["reads"]
    # Sequential readers have the k sources of a decode read ahead: most
    # degraded reads are then one worker-thread call (reads + decode).
    assert 0 < reads["one_call_reads"] <= reads["degraded_reads"], reads
    # Writes with a store missing: reduced redundancy, still readable.
    extra = volume.mountpoint / "written-degraded"
    hashes[extra] = write_pattern_file(extra, seed=99, size=5 * MiB + 1)
    _check(hashes)
    volume.remount(stores=volume.stores)
    _check(hashes)


def test_two_missing_stores_are_read_around(volume: MountedVolume) -> None:
    hashes = _populate(volume, 3)
    volume.unmount()
    volume.mount(stores=volume.stores[2:])
    _check(hashes)


@pytest.mark.allow_log(r"unreadable|bad cells")
def test_rotten_fragments_are_caught_by_checksums(volume: MountedVolume) -> None:
    hashes = _populate(volume, 4)
    volume.unmount()
    rng = random.Random(5)
    rotten = 0
    for path in fragment_files(volume.stores[1]).values():
        flip_payload_bytes(path, rng, 3)
        rotten += 1
    assert rotten > 0
    volume.mount()
    _check(hashes)
    assert _queued_or_repaired(volume) > 0


def test_degraded_read_reads_only_the_range_asked_for(volume: MountedVolume) -> None:
    path = volume.mountpoint / "big"
    data = pattern(11, 8 * MiB)
    path.write_bytes(data)
    volume.unmount()
    # Remove every fragment 1 (a data fragment) from wherever it is.
    for store in volume.stores:
        for (_, index), frag in fragment_files(store).items():
            if index == 1:
                frag.unlink()
    volume.mount()
    drop_caches()
    before = status(volume)["reads"]
    chunk = K * TEST_FRAGMENT_SIZE
    offset = 3 * chunk + TEST_FRAGMENT_SIZE + 5 * CELL  # inside fragment 1 of chunk 3
    with open(path, "rb", buffering=0) as f:
        # O_DIRECT is not needed: a fresh mount has nothing cached, and the
        # kernel reads ahead, so count per byte the kernel asked for.
        f.seek(offset)
        assert f.read(CELL) == data[offset : offset + CELL]
    after = status(volume)["reads"]
    asked = after["degraded_requested_bytes"] - before["degraded_requested_bytes"]
    read = after["degraded_store_bytes"] - before["degraded_store_bytes"]
    assert asked > 0
    # k cells per cell asked for, plus rounding to whole cells at both ends.
    assert read <= K * (asked + 2 * CELL), (read, asked)
    # Never the whole chunk for a small read.
    assert read < K * TEST_FRAGMENT_SIZE


@pytest.mark.allow_log(r"unrecoverable|fewer than|Unrecoverable|bytes \[")
def test_more_than_m_lost_fragments_give_eio_for_that_range_only(volume: MountedVolume) -> None:
    path = volume.mountpoint / "victim"
    data = pattern(12, 4 * MiB)
    path.write_bytes(data)
    other = volume.mountpoint / "bystander"
    other_data = pattern(13, 3 * MiB)
    other.write_bytes(other_data)
    volume.unmount()
    chunks = fragments_by_chunk(volume.stores)
    victim_chunk = min(chunks)  # the first chunk written: file offset 0
    for index in range(M + 1):  # data fragments 0..m: offset 0 is in fragment 0
        store_no = chunks[victim_chunk][index]
        (fragment_files(volume.stores[store_no])[(victim_chunk, index)]).unlink()
    volume.mount()
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.pread(fd, 4096, 0)
        assert caught.value.errno == errno.EIO
        chunk = K * TEST_FRAGMENT_SIZE
        assert os.pread(fd, chunk, chunk) == data[chunk : 2 * chunk]
        assert os.pread(fd, 100, 4 * MiB - 100) == data[-100:]
    finally:
        os.close(fd)
    assert other.read_bytes() == other_data
