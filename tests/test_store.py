"""Tests for ecfs.storage.store: layout, marker format, fragment file operations."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core.aligned import BLOCK, aligned_copy
from ecfs.core.errors import FragmentMissing, NoSpace, StoreError, VolumeError
from ecfs.storage.store import (
    MARKER_MAX_BYTES,
    MARKER_NAME,
    STORE_FORMAT,
    DirectoryStore,
    StoreMarker,
    StoreUsage,
)

VOLUME = uuid.UUID(int=1).hex
MARKER_KEYS = [
    "volume_id",
    "store_id",
    "format",
    "k",
    "m",
    "fragment_size",
    "cell_size",
    "inline_max",
]


def make_marker(volume_id: str = VOLUME, **changes: object) -> StoreMarker:
    fields: dict[str, object] = dict(
        volume_id=volume_id,
        store_id=uuid.uuid4().hex,
        format=STORE_FORMAT,
        k=4,
        m=2,
        fragment_size=256 * 1024,
        cell_size=16 * 1024,
        inline_max=64 * 1024,
    )
    fields.update(changes)
    return StoreMarker(**fields)  # type: ignore[arg-type]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore.initialise(tmp_path / "s0", make_marker())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- initialise


def test_initialise_creates_private_layout(tmp_path: Path, umask_022: None) -> None:
    marker = make_marker()
    store = DirectoryStore.initialise(tmp_path / "a" / "b" / "store", marker)
    assert store.read_marker() == marker
    assert store.meta_dir == store.path / "meta"
    for directory in (store.path, store.path / "frags", store.meta_dir):
        assert directory.is_dir()
        assert mode_of(directory) == 0o700
    assert mode_of(store.path / MARKER_NAME) == 0o600
    assert sorted(os.listdir(store.path)) == sorted([MARKER_NAME, "frags", "meta"])

    store.write_fragment(12345, 3, [b"x"])
    path = store.path / store.fragment_relpath(12345, 3)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert mode_of(path.parent.parent) == 0o700


def test_initialise_accepts_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir(mode=0o755)
    store = DirectoryStore.initialise(tmp_path / "empty", make_marker())
    assert mode_of(store.path) == 0o700
    assert store.probe().volume_id == VOLUME


def test_initialise_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    with pytest.raises(VolumeError, match="not empty"):
        DirectoryStore.initialise(tmp_path / "d", make_marker())
    assert os.listdir(tmp_path / "d") == ["precious.txt"]


def test_initialise_refuses_store_of_another_volume(tmp_path: Path) -> None:
    other = uuid.uuid4().hex
    DirectoryStore.initialise(tmp_path / "d", make_marker(volume_id=other))
    with pytest.raises(VolumeError, match=f"belongs to volume {other}"):
        DirectoryStore.initialise(tmp_path / "d", make_marker())


def test_initialise_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(VolumeError, match="not a directory"):
        DirectoryStore.initialise(tmp_path / "f", make_marker())


def test_constructor_does_no_io(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "nowhere")
    assert store.path == tmp_path / "nowhere"
    assert not (tmp_path / "nowhere").exists()


# ---- marker


def test_marker_round_trip() -> None:
    marker = make_marker()
    assert StoreMarker.from_json(marker.to_json()) == marker
    assert json.loads(marker.to_json())["format"] == STORE_FORMAT


def test_marker_ignores_unknown_keys() -> None:
    marker = make_marker()
    obj = json.loads(marker.to_json())
    obj["future_option"] = [1, 2]
    assert StoreMarker.from_json(json.dumps(obj).encode()) == marker


@pytest.mark.parametrize(
    "change",
    [
        {"volume_id": "not-a-uuid"},
        {"volume_id": uuid.uuid4().hex.upper()},
        {"store_id": 7},
        {"format": STORE_FORMAT + 1},
        {"k": True},
        {"k": 0},
        {"k": 200, "m": 100},
        {"m": -1},
        {"m": 2.0},
        {"fragment_size": 0},
        {"fragment_size": 1 << 40},
        {"cell_size": 512 * 1024},
        {"inline_max": -1},
        {"inline_max": "64k"},
        {"k": None},
    ],
)
def test_marker_bad_values_rejected(change: dict[str, object]) -> None:
    obj = json.loads(make_marker().to_json())
    obj.update(change)
    with pytest.raises(StoreError, match="store marker"):
        StoreMarker.from_json(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"{}",
        b"\xff\xfe\x00garbage",
        b"[" * 50_000,
        b'{"k": ' + b"9" * 5000 + b"}",
        b" " * (MARKER_MAX_BYTES + 1),
    ],
)
def test_marker_garbage_rejected(data: bytes) -> None:
    with pytest.raises(StoreError):
        StoreMarker.from_json(data)


def test_marker_every_truncation_rejected() -> None:
    data = make_marker().to_json().rstrip()
    for end in range(len(data)):
        with pytest.raises(StoreError):
            StoreMarker.from_json(data[:end])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.binary(max_size=300))
def test_marker_random_bytes_only_store_error(data: bytes) -> None:
    with pytest.raises(StoreError):
        StoreMarker.from_json(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(MARKER_KEYS),
        json_values,
    )
)
def test_marker_random_objects_only_store_error(obj: dict[str, object]) -> None:
    with contextlib.suppress(StoreError):
        StoreMarker.from_json(json.dumps(obj).encode())


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(MARKER_KEYS),
    value=json_values,
)
def test_marker_one_bad_field_only_store_error(key: str, value: object) -> None:
    obj = json.loads(make_marker().to_json())
    obj[key] = value
    with contextlib.suppress(StoreError):
        StoreMarker.from_json(json.dumps(obj).encode())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(data=st.binary(max_size=200))
def test_read_marker_garbage_names_path(store: DirectoryStore, data: bytes) -> None:
    (store.path / MARKER_NAME).write_bytes(data)
    with pytest.raises(StoreError, match=str(store.path)):
        store.read_marker()


def test_read_marker_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no ecfs store marker"):
        DirectoryStore(tmp_path).read_marker()
    with pytest.raises(StoreError):
        DirectoryStore(tmp_path / "gone").probe()


# ---- fragments


def test_fragment_relpath_layout(store: DirectoryStore) -> None:
    rel = store.fragment_relpath(0x12_3456_78AB, 5)
    assert rel == "frags/56/78/00000012345678ab.5"  # bits 8..23 of the chunk id
    with pytest.raises(ValueError):
        store.fragment_relpath(-1, 0)
    with pytest.raises(ValueError):
        store.fragment_relpath(2**64, 0)
    with pytest.raises(ValueError):
        store.fragment_relpath(1, 256)


def test_fanout_keeps_consecutive_chunks_together(store: DirectoryStore) -> None:
    dirs = {store.fragment_relpath(i, 0).rsplit("/", 1)[0] for i in range(1024)}
    assert len(dirs) == 4  # 256 consecutive chunks per directory
    many = {store.fragment_relpath(i << 8, 0).rsplit("/", 1)[0] for i in range(1 << 16)}
    assert len(many) == 1 << 16


def test_fragment_round_trip(store: DirectoryStore) -> None:
    parts = [b"header!", memoryview(b"0123456789" * 1000), bytearray(b"tail")]
    n = store.write_fragment(42, 1, parts)  # type: ignore[arg-type]
    expected = b"".join(bytes(p) for p in parts)
    assert n == len(expected)
    assert store.fragment_size_on_disk(42, 1) == len(expected)
    assert _read(store, 42, 1, 7, 10) == b"0123456789"
    assert _read(store, 42, 1, len(expected) - 4, 100) == b"tail"
    assert _read(store, 42, 1, len(expected) + 10, 10) == b""
    assert _read(store, 42, 1, 0, len(expected)) == expected
    store.delete_fragment(42, 1)
    with pytest.raises(FragmentMissing):
        _read(store, 42, 1, 0, 1)
    store.delete_fragment(42, 1)  # missing is fine


def _read(store: DirectoryStore, chunk_id: int, index: int, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    return bytes(buf[: store.read_fragment(chunk_id, index, offset, memoryview(buf))])


def _page_cached(store: DirectoryStore, chunk_id: int, index: int, length: int) -> bool:
    fd = os.open(store.path / store.fragment_relpath(chunk_id, index), os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(length)], 0, os.RWF_NOWAIT) == length
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_aligned_parts_are_written_around_the_page_cache(store: DirectoryStore) -> None:
    header = aligned_copy(b"h" * BLOCK)
    payload = aligned_copy(os.urandom(16 * BLOCK))
    assert store.write_fragment(7, 2, [header, payload]) == 17 * BLOCK
    unaligned = [bytes(header), bytes(payload)]
    store.write_fragment(7, 3, unaligned)
    for index, cached in ((2, False), (3, True)):
        assert _page_cached(store, 7, index, 17 * BLOCK) is cached, index
        assert _read(store, 7, index, 0, 17 * BLOCK) == b"".join(unaligned)


def test_a_filesystem_without_direct_io_gets_ordinary_writes(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    refused = []

    def open_without_direct_io(path, flags, *args):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags & ~os.O_DIRECT, *args)
        if flags & os.O_DIRECT:  # like the kernel: the file exists, the open fails
            os.close(fd)
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return fd

    monkeypatch.setattr(os, "open", open_without_direct_io)
    parts = [aligned_copy(b"h" * BLOCK), aligned_copy(b"p" * BLOCK)]
    for chunk_id in (1, 2):
        assert store.write_fragment(chunk_id, 0, parts) == 2 * BLOCK
    monkeypatch.undo()
    assert len(refused) == 1  # tried once, then never again
    for chunk_id in (1, 2):
        assert _read(store, chunk_id, 0, 0, 3 * BLOCK) == b"h" * BLOCK + b"p" * BLOCK


def test_write_empty_and_many_parts(store: DirectoryStore) -> None:
    assert store.write_fragment(1, 0, []) == 0
    parts = [bytes([i % 256]) for i in range(3000)]  # more than IOV_MAX
    assert store.write_fragment(1, 1, parts) == 3000
    assert _read(store, 1, 1, 0, 5000) == b"".join(parts)


def test_write_same_fragment_twice_fails_and_keeps_first(store: DirectoryStore) -> None:
    store.write_fragment(7, 0, [b"first"])
    with pytest.raises(StoreError) as info:
        store.write_fragment(7, 0, [b"second"])
    assert not isinstance(info.value, NoSpace)
    assert store.fragment_size_on_disk(7, 0) == len(b"first")


def test_write_failure_removes_partial_file(store: DirectoryStore) -> None:
    with pytest.raises(TypeError):
        store.write_fragment(8, 0, [b"ok", object()])  # type: ignore[list-item]
    with pytest.raises(FragmentMissing):
        store.fragment_size_on_disk(8, 0)
    store.write_fragment(8, 0, [b"ok"])  # nothing left behind to collide with


def test_enospc_is_no_space() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to produce ENOSPC")
    from ecfs.storage.store import _store_error, _writev_all

    fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as info:
            _writev_all(fd, [b"x" * 100])
    finally:
        os.close(fd)
    assert isinstance(_store_error(info.value, "write"), NoSpace)
    assert not isinstance(_store_error(OSError(5, "EIO"), "write"), NoSpace)


def test_missing_fragment(store: DirectoryStore) -> None:
    with pytest.raises(FragmentMissing):
        _read(store, 99, 0, 0, 1)
    with pytest.raises(FragmentMissing):
        store.fragment_size_on_disk(99, 0)
    assert store.read_fragment_cached(99, 0, 0, memoryview(bytearray(1))) is False
    assert issubclass(FragmentMissing, StoreError)


def test_read_error_is_store_error_and_drops_the_open_file(store: DirectoryStore) -> None:
    store.write_fragment(3, 0, [b"abc"])
    assert _read(store, 3, 0, 0, 3) == b"abc"  # now open (cached)
    with pytest.raises(StoreError):
        store.read_fragment(3, 0, -5, memoryview(bytearray(3)))  # EINVAL
    assert store.read_fragment_cached(3, 0, 0, memoryview(bytearray(3))) is False  # dropped
    assert _read(store, 3, 0, 0, 3) == b"abc"  # reopened


def test_cached_read_serves_open_page_cached_files_only(store: DirectoryStore) -> None:
    store.write_fragment(4, 1, [b"0123456789"])
    dest = memoryview(bytearray(4))
    assert store.read_fragment_cached(4, 1, 2, dest) is False  # not open: never opens
    assert _read(store, 4, 1, 0, 1) == b"0"
    assert store.read_fragment_cached(4, 1, 2, dest) is True
    assert bytes(dest) == b"2345"
    assert store.read_fragment_cached(4, 1, 8, dest) is False  # short: past the end
    store.prefetch(4, 1, 0, 10)
    store.delete_fragment(4, 1)  # closes the cached file
    assert store.read_fragment_cached(4, 1, 2, dest) is False
    store.write_fragment(4, 1, [b"abcdefghij"])
    assert _read(store, 4, 1, 2, 4) == b"cdef"  # the new file, not the deleted one
    store.close()
    assert store.read_fragment_cached(4, 1, 2, dest) is False


def test_iter_fragments_finds_exactly_what_was_written(store: DirectoryStore) -> None:
    written = {(c, i) for c in (0, 1, 2**64 - 1, 0xDEADBEEF) for i in (0, 3, 255)}
    for chunk_id, index in written:
        store.write_fragment(chunk_id, index, [b"data"])
    frags = store.path / "frags"
    # junk that must be skipped
    (frags / "README").write_text("junk")
    (frags / "zz").mkdir()
    (frags / "zz" / "00").mkdir()
    (frags / "zz" / "00" / "0000000000000001.0").write_text("wrong fan dir")
    rel = Path(store.fragment_relpath(1, 0))
    fan = store.path / rel.parent
    (fan / "0000000000000001.0.tmp").write_text("")
    (fan / "0000000000000001.01").write_text("")
    (fan / "0000000000000001.256").write_text("")
    (fan / "000000000000001.0").write_text("")
    (fan / "0000000000000ABC.0").write_text("")
    (fan / "0000000000000002.0").mkdir()
    os.symlink(fan / rel.name, fan / "0000000000000001.7")
    assert store.fragment_relpath(0x300, 0).rsplit("/", 1)[0] != str(rel.parent)
    (fan / "0000000000000300.0").write_text("misplaced: not its fan-out dir")
    assert set(store.iter_fragments()) == written
    assert sorted(store.list_fragments()) == sorted(written)


def test_iter_fragments_empty_and_missing_store(tmp_path: Path, store: DirectoryStore) -> None:
    assert list(store.iter_fragments()) == []
    with pytest.raises(StoreError):
        list(DirectoryStore(tmp_path / "gone").iter_fragments())


def test_sync_and_usage(store: DirectoryStore) -> None:
    store.write_fragment(5, 0, [b"abc"])
    store.sync()
    usage = store.usage()
    assert isinstance(usage, StoreUsage)
    assert 0 <= usage.free_bytes <= usage.total_bytes
    assert usage.total_bytes > 0


def test_sync_missing_store_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        DirectoryStore(tmp_path / "gone").sync()
    with pytest.raises(StoreError):
        DirectoryStore(tmp_path / "gone").usage()


def test_a_failed_probe_drops_the_open_files(store: DirectoryStore) -> None:
    store.pin_identity()
    store.write_fragment(6, 0, [b"abc"])
    assert _read(store, 6, 0, 0, 3) == b"abc"
    dest = memoryview(bytearray(3))
    assert store.read_fragment_cached(6, 0, 0, dest) is True
    marker = store.path / MARKER_NAME
    marker.rename(marker.with_name("away"))
    with pytest.raises(StoreError):
        store.probe()
    assert store.read_fragment_cached(6, 0, 0, dest) is False  # never through old files
    marker.with_name("away").rename(marker)
    assert store.probe().volume_id == VOLUME
    assert _read(store, 6, 0, 0, 3) == b"abc"


def test_open_files_never_close_a_file_in_use(tmp_path: Path) -> None:
    from ecfs.storage.fdcache import OpenFiles

    files = OpenFiles(capacity=1)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    first = files.insert((0, 1, 0), os.open(path, os.O_RDONLY))  # in use
    files.insert((0, 2, 0), os.open(path, os.O_RDONLY))  # evicts the first: retired only
    assert len(files) == 1 and first.retired
    assert os.pread(first.fd, 1, 0) == b"x"  # still open under its user
    files.release(first)  # now it is closed (in a closer thread)
    for _ in range(100):
        try:
            os.fstat(first.fd)
        except OSError:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the retired file was never closed")
    assert files.acquire((0, 1, 0)) is None
    second = files.acquire((0, 2, 0))
    assert second is not None
    files.discard_owner(0)
    assert len(files) == 0 and os.pread(second.fd, 1, 0) == b"x"
    files.release(second)
