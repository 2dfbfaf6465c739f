"""File data through a real mount: large and small files, random rewrites
against an in-memory model, remounts, and where the bytes land on stores."""

from __future__ import annotations

import os
import random

from tests.mounting import MountedVolume
from tests.volume_files import (
    MiB,
    drop_caches,
    fragments_by_chunk,
    pattern,
    sha256_file,
    store_bytes,
    write_pattern_file,
)

K, M = 4, 2


def test_large_file_is_spread_over_distinct_stores_and_survives_remount(volume: MountedVolume) -> None:
    size = 100 * MiB + 12_345  # not a multiple of any block size
    path = volume.mountpoint / "large.bin"
    expected = write_pattern_file(path, seed=1, size=size)
    assert path.stat().st_size == size
    drop_caches()
    assert sha256_file(path) == expected
    volume.remount()
    drop_caches()
    assert sha256_file(path) == expected
    volume.unmount()

    chunks = fragments_by_chunk(volume.stores)
    assert chunks, "no fragments on the stores"
    for chunk_id, placed in chunks.items():
        assert sorted(placed) == list(range(K + M)), f"chunk {chunk_id:x} is missing fragments"
        assert len(set(placed.values())) == K + M, f"chunk {chunk_id:x}: fragments share a store"
    total = sum(store_bytes(s) for s in volume.stores)
    overhead = total / size
    assert (K + M) / K <= overhead < (K + M) / K * 1.06, overhead
    for store in volume.stores:  # spread evenly: each ~1/(k+m) of the total
        assert abs(store_bytes(store) / total - 1 / (K + M)) < 0.03


def test_thousands_of_small_files(volume: MountedVolume) -> None:
    root = volume.mountpoint / "small"
    root.mkdir()
    rng = random.Random(7)
    sizes = {}
    for i in range(2000):
        directory = root / f"d{i % 37}"
        directory.mkdir(exist_ok=True)
        size = rng.choice([0, 1, 100, 4095, 4096, 65_536, 65_537, rng.randrange(200_000)])
        (directory / f"f{i}").write_bytes(pattern(i, size))
        sizes[directory / f"f{i}"] = (i, size)

    def check() -> None:
        for path, (seed, size) in sizes.items():
            assert path.read_bytes() == pattern(seed, size), path

    check()
    volume.remount()
    check()
    assert sum(len(files) for _, _, files in os.walk(root)) == 2000


def test_random_writes_and_truncates_match_a_model(volume: MountedVolume) -> None:
    rng = random.Random(42)
    path = volume.mountpoint / "model.bin"
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(400):
            action = rng.random()
            if action < 0.55:
                offset = rng.randrange(0, 3 * MiB)
                data = rng.randbytes(rng.choice([1, 17, 4096, rng.randrange(1, 300_000)]))
                os.pwrite(fd, data, offset)
                if len(model) < offset:
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            elif action < 0.7:
                size = rng.randrange(0, 3 * MiB)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif action < 0.8:
                os.fsync(fd)
            elif action < 0.85:
                os.close(fd)
                drop_caches()
                fd = os.open(path, os.O_RDWR)
            else:
                offset = rng.randrange(0, max(1, len(model) + 1000))
                length = rng.randrange(1, 500_000)
                assert os.pread(fd, length, offset) == bytes(model[offset : offset + length]), step
            assert os.fstat(fd).st_size == len(model), step
    finally:
        os.close(fd)
    drop_caches()
    assert path.read_bytes() == bytes(model)
    volume.remount()
    assert path.read_bytes() == bytes(model)


def test_sparse_file_holes_read_as_zeros_and_are_not_stored(volume: MountedVolume) -> None:
    path = volume.mountpoint / "sparse"
    with open(path, "wb") as f:
        f.seek(50 * MiB)
        f.write(b"end")
    assert path.stat().st_size == 50 * MiB + 3
    with open(path, "rb") as f:
        f.seek(10 * MiB)
        assert f.read(MiB) == bytes(MiB)
        f.seek(50 * MiB - 2)
        assert f.read() == b"\0\0end"
    volume.unmount()
    assert sum(store_bytes(s) for s in volume.stores) < 2 * MiB
    volume.mount()


def test_truncate_down_then_up_reads_zeros(volume: MountedVolume) -> None:
    path = volume.mountpoint / "t"
    data = pattern(3, 3 * MiB + 5)
    path.write_bytes(data)
    os.truncate(path, 1 * MiB + 3)
    os.truncate(path, 2 * MiB)
    drop_caches()
    assert path.read_bytes() == data[: MiB + 3] + bytes(2 * MiB - MiB - 3)
    volume.remount()
    assert path.read_bytes() == data[: MiB + 3] + bytes(2 * MiB - MiB - 3)


def test_inline_small_file_grows_into_chunks_and_back(volume: MountedVolume) -> None:
    path = volume.mountpoint / "grow"
    path.write_bytes(b"x" * 1000)
    with open(path, "ab") as f:
        f.write(pattern(5, 2 * MiB))
    assert path.read_bytes() == b"x" * 1000 + pattern(5, 2 * MiB)
    os.truncate(path, 10)
    assert path.read_bytes() == b"x" * 10
    volume.remount()
    assert path.read_bytes() == b"x" * 10


def test_data_identical_after_remount_for_many_sizes(volume: MountedVolume) -> None:
    sizes = [0, 1, 4095, 4096, 4097, 65_536, 524_287, 524_288, 524_289, 5 * MiB + 3]
    hashes = {}
    for size in sizes:
        hashes[size] = write_pattern_file(volume.mountpoint / f"s{size}", size, size)
    volume.remount()
    drop_caches()
    for size in sizes:
        assert sha256_file(volume.mountpoint / f"s{size}") == hashes[size]


def test_concurrent_writers_and_readers(volume: MountedVolume) -> None:
    import threading

    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            path = volume.mountpoint / f"c{n}"
            data = pattern(n, 3 * MiB + n)
            for _ in range(3):
                path.write_bytes(data)
                assert path.read_bytes() == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
