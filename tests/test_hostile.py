"""Hostile and broken input: damaged or crafted fragment headers, store
markers and metadata replicas, unusual names and deep trees, and store
lists mkfs must refuse.

The parsers are fuzzed directly (hypothesis): they may only raise their
documented exception and must not allocate much more than the buffer they
were handed. The same damage is then applied to the files of a real volume:
reads still return the right bytes (served degraded), the daemon keeps
running, and a mount with a bad marker or replica says which store and
carries on while within tolerance.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import sqlite3
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core import fragment
from ecfs.core.errors import FragmentCorrupt, StoreError
from ecfs.storage.metadb.schema import create_database, record_digest
from ecfs.storage.replicas import choose_copy, inspect_copy, read_generation
from ecfs.storage.store import MARKER_NAME, StoreMarker
from tests.mounting import MountedVolume, cli, mounted_volume
from tests.volume_files import (
    MiB,
    drop_caches,
    fragment_files,
    sha256_file,
    status,
    write_pattern_file,
)

K, M = 4, 2
VOLUME_ID = bytes(range(16))

# --------------------------------------------------------------------------
# Fragment headers


def _valid_fragment(rng: random.Random) -> bytes:
    cell = rng.choice([512, 4096, 65536])
    payload = rng.randbytes(rng.randrange(0, 3 * cell + 1))
    k = rng.randrange(1, 8)
    m = rng.randrange(1, 4)
    parts = fragment.build_fragment(
        VOLUME_ID, rng.randrange(1 << 64), rng.randrange(k + m), k, m, cell, payload
    )
    return b"".join(bytes(p) for p in parts)


FIELD_OFFSETS = {  # offset, struct format of the fixed header fields
    "version": (8, "<H"),
    "k": (10, "<H"),
    "m": (12, "<H"),
    "index": (14, "<H"),
    "cell_size": (16, "<I"),
    "payload_length": (20, "<Q"),
    "chunk_id": (44, "<Q"),
    "n_cells": (52, "<I"),
}


@st.composite
def damaged_fragments(draw: st.DrawFn) -> bytes:
    data = bytearray(_valid_fragment(random.Random(draw(st.integers(0, 1 << 32)))))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["truncate", "zero", "flip", "field", "extend"]))
        if how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif how == "zero" and data:
            a = draw(st.integers(0, len(data) - 1))
            b = draw(st.integers(a, len(data)))
            data[a:b] = bytes(b - a)
        elif how == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == "field" and len(data) >= fragment.FIXED_HEADER_SIZE:
            name = draw(st.sampled_from(sorted(FIELD_OFFSETS)))
            offset, fmt = FIELD_OFFSETS[name]
            size = struct.calcsize(fmt)
            value = draw(
                st.integers(0, (1 << (8 * size)) - 1)
                | st.sampled_from([0, 1, (1 << (8 * size)) - 1])
            )
            struct.pack_into(fmt, data, offset, value)
            if draw(st.booleans()):  # make the header checksum match again
                _fix_header_checksum(data)
        elif how == "extend":
            data += draw(st.binary(max_size=64))
    return bytes(data)


def _fix_header_checksum(data: bytearray) -> None:
    (n_cells,) = struct.unpack_from("<I", data, 52)
    end = fragment.FIXED_HEADER_SIZE + 8 * n_cells
    if end + 8 <= len(data):
        struct.pack_into("<Q", data, end, fragment.checksum64(bytes(data[:end])))


def _largest_header() -> int:
    n_cells = -(-fragment.MAX_PAYLOAD // 512)
    return -(-(fragment.FIXED_HEADER_SIZE + 8 * n_cells + 8) // 4096) * 4096


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_fragments())
def test_header_parsers_raise_only_fragment_corrupt_with_bounded_memory(buf: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            needed = fragment.header_size_needed(buf)
            assert 4096 <= needed <= _largest_header()
        except FragmentCorrupt:
            pass
        try:
            header = fragment.parse_header(buf)
        except FragmentCorrupt:
            pass
        else:
            assert header.payload_offset <= len(buf)
            assert header.n_cells == -(-header.payload_length // header.cell_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * len(buf) + 64 * 1024, (peak, len(buf))


def test_crafted_header_claiming_a_huge_payload_needs_only_its_file() -> None:
    """A valid-looking fixed header claiming 1 GiB in 512-byte cells asks
    for a 2 MiB header block; given only the 4 KiB that exist, parsing fails
    without allocating the claimed size."""
    header = _crafted_huge_header()
    assert fragment.header_size_needed(header) == _largest_header()
    tracemalloc.start()
    try:
        with pytest.raises(FragmentCorrupt, match="truncated"):
            fragment.parse_header(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def _crafted_huge_header(chunk_id: int = 1, index: int = 0) -> bytes:
    block = bytearray(4096)
    n_cells = fragment.MAX_PAYLOAD // 512
    struct.pack_into(
        "<8sHHHHIQ16sQI", block, 0, fragment.MAGIC, fragment.FORMAT_VERSION, K, M, index, 512,
        fragment.MAX_PAYLOAD, VOLUME_ID, chunk_id, n_cells,
    )  # fmt: skip
    return bytes(block)


# --------------------------------------------------------------------------
# Store markers

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
VALID_MARKER = {
    "volume_id": "0" * 31 + "1",
    "store_id": "0" * 31 + "2",
    "format": 1,
    "k": 4,
    "m": 2,
    "fragment_size": 131072,
    "cell_size": 4096,
    "inline_max": 65536,
}


@st.composite
def hostile_markers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "truncated", "deep", "digits", "encoding", "bytes"]))
    if kind == "field":
        obj = dict(VALID_MARKER)
        obj[draw(st.sampled_from(sorted(VALID_MARKER)))] = draw(JSON_VALUES)
        return json.dumps(obj).encode()
    text = json.dumps(VALID_MARKER).encode()
    if kind == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "deep":
        depth = draw(st.integers(1000, 200_000))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if kind == "digits":
        return b'{"k": ' + b"9" * draw(st.integers(4000, 70_000)) + b"}"
    if kind == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"]))
        return json.dumps(VALID_MARKER, ensure_ascii=False).replace("4096", "4096 ").encode(codec)
    return draw(st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(hostile_markers())
def test_marker_parser_raises_only_store_error(data: bytes) -> None:
    try:
        marker = StoreMarker.from_json(data)
    except StoreError:
        return
    # What parses is a complete, well-formed marker.
    assert marker.k >= 1 and 0 < marker.cell_size <= marker.fragment_size


def test_a_marker_larger_than_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(StoreError, match="larger than"):
        StoreMarker.from_json(b" " * (1 << 20) + json.dumps(VALID_MARKER).encode())


# --------------------------------------------------------------------------
# Metadata replica files


@pytest.fixture(scope="module")
def replica_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("replica") / "meta.sqlite"
    create_database(
        path,
        {"uuid": "0" * 32, "k": K, "m": M, "fragment_size": 131072, "cell_size": 4096,
         "inline_max": 65536},
        ["1" * 32, "2" * 32],
        root_uid=0, root_gid=0, now_ns=0,
    )  # fmt: skip
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=DELETE")
    for i in range(300):  # a few pages of rows, so damage hits data too
        conn.execute("INSERT INTO xattrs VALUES (1, ?, ?)", (f"user.{i}".encode(), bytes(200)))
    conn.commit()
    conn.close()
    record_digest(path)
    assert inspect_copy(path).verified
    return path.read_bytes()


def damaged_replica(original: bytes, how: str, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(original)
    if how == "truncate":
        del data[rng.randrange(len(data)) :]
    elif how == "zero":
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randrange(1, 8192))
        data[a:b] = bytes(b - a)
    elif how == "flip":
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "garbage":
        return rng.randbytes(rng.randrange(9000))
    else:  # the 100-byte database header: page size, counts, schema cookie
        data[rng.randrange(16, 100)] = rng.randrange(256)
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(
    how=st.sampled_from(["truncate", "zero", "flip", "garbage", "header"]),
    seed=st.integers(0, 1 << 32),
)
def test_damaged_replica_files_give_none_or_a_generation(
    replica_bytes: bytes, how: str, seed: int
) -> None:
    damaged = damaged_replica(replica_bytes, how, seed)
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "good.sqlite", Path(tmp) / "bad.sqlite"
        good.write_bytes(replica_bytes)
        bad.write_bytes(damaged)
        generation = read_generation(bad)
        assert generation is None or isinstance(generation, int)
        # Inspecting never raises, and a damaged copy is never chosen with
        # content other than the good copy's (the damage may miss every
        # row: free space, say).
        wanted = inspect_copy(good).digest
        inspected = inspect_copy(bad)
        both = choose_copy([inspected, inspect_copy(good)])
        assert both.winner is not None and both.winner.digest == wanted
        alone = choose_copy([inspected]).winner
        assert alone is None or alone.digest == wanted


# --------------------------------------------------------------------------
# Damage on a real volume


def _populate(volume: MountedVolume) -> dict[Path, str]:
    return {
        volume.mountpoint / f"f{i}": write_pattern_file(
            volume.mountpoint / f"f{i}", i, (i + 1) * MiB + 333
        )
        for i in range(4)
    }


def _check(hashes: dict[Path, str]) -> None:
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


@pytest.mark.allow_log(r"corrupt|truncated|does not match|bad cells|not an ecfs fragment|checksum")
def test_hostile_fragment_files_are_read_around(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    rng = random.Random(9)
    for store_no, how in enumerate(["truncate", "zero", "huge", "other", "header-only"]):
        files = sorted(fragment_files(volume.stores[store_no]).items())
        (chunk_id, index), victim = rng.choice(files)
        if how == "truncate":
            os.truncate(victim, rng.randrange(1, victim.stat().st_size))
        elif how == "zero":
            victim.write_bytes(bytes(victim.stat().st_size))
        elif how == "huge":  # claims a 1 GiB payload and a 2 MiB header
            victim.write_bytes(_crafted_huge_header(chunk_id, index))
        elif how == "other":  # a valid fragment, of another chunk
            other = next(p for key, p in files if key[0] != chunk_id)
            shutil.copyfile(other, victim)
        else:
            os.truncate(victim, 4096)
    volume.mount()
    _check(hashes)
    assert status(volume)["reads"]["degraded_reads"] > 0
    assert volume.proc is not None and volume.proc.poll() is None
    (volume.mountpoint / "still-writable").write_bytes(b"yes")


@pytest.mark.allow_log(r"unavailable|store marker|missing")
def test_a_truncated_marker_is_named_and_the_mount_proceeds(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    marker = volume.stores[3] / MARKER_NAME
    marker.write_bytes(marker.read_bytes()[:20])
    volume.mount()
    _check(hashes)
    volume.unmount()
    mine = [
        line
        for line in volume.log_text().splitlines()
        if "WARNING" in line and str(volume.stores[3]) in line
    ]
    assert mine, "the log does not name the store with the bad marker"
    for store in volume.stores[:2]:  # two more: beyond tolerance
        (store / MARKER_NAME).write_bytes(b"")
    try:
        refused = cli("mount", *volume.stores, volume.mountpoint, check=False, timeout=60)
    finally:
        if volume.is_mounted:
            cli("umount", volume.mountpoint, check=False)
    assert refused.returncode != 0
    assert "3 of 6" in refused.stderr and "at most 2" in refused.stderr, refused.stderr


@pytest.mark.allow_log(r"metadata replica .* (unreadable|corrupt)|cannot use metadata replica")
def test_a_garbage_replica_is_skipped_and_resynced(volume: MountedVolume) -> None:
    hashes = _populate(volume)
    volume.unmount()
    replica = volume.stores[0] / "meta" / "ecfs-meta.sqlite"
    generations = {read_generation(s / "meta" / "ecfs-meta.sqlite") for s in volume.stores[1:3]}
    replica.write_bytes(random.Random(3).randbytes(replica.stat().st_size))
    for suffix in ("-wal", "-shm"):
        replica.with_name(replica.name + suffix).unlink(missing_ok=True)
    assert read_generation(replica) is None
    volume.mount()
    _check(hashes)
    volume.unmount()
    assert read_generation(replica) is not None
    assert read_generation(replica) == read_generation(
        volume.stores[1] / "meta" / "ecfs-meta.sqlite"
    )
    assert len(generations) == 1
    from ecfs.volume.fsck import run_fsck

    assert run_fsck([str(s) for s in volume.stores], repair=False, verify_data=True).clean
    volume.mount()


# --------------------------------------------------------------------------
# Names and deep trees


@pytest.fixture(scope="module")
def names_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    with mounted_volume(tmp_path_factory.mktemp("names")) as vol:
        yield vol
    vol.check_log_clean()


NAME_BYTES = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(NAME_BYTES, min_size=1, max_size=5, unique=True), renamed=NAME_BYTES)
def test_any_name_round_trips(
    names_volume: MountedVolume, names: list[bytes], renamed: bytes
) -> None:
    base = os.fsencode(names_volume.mountpoint / "names")
    shutil.rmtree(base, ignore_errors=True)
    os.mkdir(base)
    for i, name in enumerate(names):
        with open(os.path.join(base, name), "wb") as f:
            f.write(name + str(i).encode())
    assert sorted(os.listdir(base)) == sorted(names)
    for i, name in enumerate(names):
        with open(os.path.join(base, name), "rb") as f:
            assert f.read() == name + str(i).encode()
    os.rename(os.path.join(base, names[0]), os.path.join(base, renamed))
    with open(os.path.join(base, renamed), "rb") as f:
        assert f.read() == names[0] + b"0"
    expected = sorted({*names[1:], renamed})
    assert sorted(os.listdir(base)) == expected
    os.unlink(os.path.join(base, renamed))


def test_slash_and_nul_cannot_get_into_a_name(names_volume: MountedVolume) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    base = names_volume.mountpoint / "sep"
    base.mkdir()
    # NUL ends the C string: "x\0y" creates "x".
    fd = libc.open(os.fsencode(base / "x") + b"\0y", os.O_CREAT | os.O_WRONLY, 0o644)
    assert fd >= 0
    os.close(fd)
    # '/' separates: "a/b" looks for a directory "a".
    assert libc.open(os.fsencode(base / "a") + b"/b", os.O_CREAT | os.O_WRONLY, 0o644) == -1
    assert ctypes.get_errno() == errno.ENOENT
    assert os.listdir(base) == ["x"]


def test_stores_never_see_user_names(names_volume: MountedVolume) -> None:
    base = names_volume.mountpoint / "secret-names"
    base.mkdir()
    names = ["TOPSECRET-payroll.xlsx", "..%2f..%2fescape", "ümlaut-ÄÖÜ"]
    for name in names:
        (base / name).write_bytes(os.urandom(700_000))
        os.symlink("../../../../etc/passwd", base / f"{name}.lnk")
    os.sync()
    for store in names_volume.stores:
        for directory, dirnames, filenames in os.walk(store):
            for entry in dirnames + filenames:
                assert not any(n[:8] in entry for n in names), (directory, entry)
                assert not os.path.islink(os.path.join(directory, entry))


def test_a_300_level_tree_deeper_than_path_max(volume: MountedVolume) -> None:
    depth, name = 300, "d" * 20
    fds = [os.open(volume.mountpoint, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fds[-1])
        os.write(fd, b"deep down")
        os.close(fd)
        assert len(os.fsencode(volume.mountpoint)) + depth * (len(name) + 1) > 4096
    finally:
        for fd in fds:
            os.close(fd)
    volume.remount()
    fd = os.open(volume.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        bottom = os.open("bottom", os.O_RDONLY, dir_fd=fd)
        assert os.read(bottom, 100) == b"deep down"
        os.close(bottom)
    finally:
        os.close(fd)
    shutil.rmtree(volume.mountpoint / name)
    assert os.listdir(volume.mountpoint) == []
    volume.unmount()
    from ecfs.volume.fsck import run_fsck

    assert run_fsck([str(s) for s in volume.stores], repair=False, verify_data=True).clean
    volume.mount()


# --------------------------------------------------------------------------
# mkfs refusals not covered by tests/test_cli.py


def test_mkfs_refuses_a_store_nested_inside_an_existing_store(tmp_path: Path) -> None:
    old = [tmp_path / f"old{i}" for i in range(K + M)]
    cli("mkfs", *old)
    new = [tmp_path / f"new{i}" for i in range(K + M - 1)]
    for inside in (old[0] / "sub", old[1] / "frags" / "ab", old[2] / "meta" / "x" / "y"):
        result = cli("mkfs", *new, inside, check=False)
        assert result.returncode != 0
        assert "inside" in result.stderr and str(old[0].parent) in result.stderr, result.stderr
        assert not inside.exists()
        assert not any(p.exists() for p in new)
