"""The `ecfs.storage.store.Store` contract, run against every implementation
(DirectoryStore, MemoryStore, a FaultyStore passing through, an S3Store on
a real local moto server), fragments and small-write log segments (on the
stores that hold them; an S3Store refuses them), the fault modes of
FaultyStore, and the storage boundary: no file descriptor, preadv
or fadvise outside the store modules."""

from __future__ import annotations

import ast
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ecfs.core.errors import FragmentMissing, NoSpace, StoreError, StoreSwapped, StoreTimeout
from ecfs.storage.fakestores import FaultyStore, MemoryStore
from ecfs.storage.offload import StoreRunner, StoreState
from ecfs.storage.s3store import S3Store
from ecfs.storage.store import (
    STORE_FORMAT,
    DirectoryStore,
    Store,
    StoreMarker,
)
from ecfs.storage.storefactory import initialise_store, open_store

from .s3servers import MotoServer, s3_environment

PACKAGE = Path(__file__).resolve().parent.parent / "ecfs"


def _marker() -> StoreMarker:
    return StoreMarker(uuid.uuid4().hex, uuid.uuid4().hex, STORE_FORMAT, 2, 1, 8192, 4096, 0)


def _directory(tmp_path: Path) -> Store:
    return initialise_store(tmp_path / "store", _marker())


def _memory(tmp_path: Path) -> Store:
    return MemoryStore(_marker())


def _faulty(tmp_path: Path) -> Store:
    return FaultyStore(MemoryStore(_marker()))


KINDS: dict[str, Callable[[Path], Store]] = {
    "directory": _directory,
    "memory": _memory,
    "faulty": _faulty,
    "faulty-directory": lambda tmp_path: FaultyStore(_directory(tmp_path)),
}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(params=[*sorted(KINDS), "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        server: MotoServer = request.getfixturevalue("moto")
        location = server.location(prefix=f"t/{uuid.uuid4().hex}")
        made: Store = S3Store.initialise(location, _marker(), environ=s3_environment())
    else:
        made = KINDS[request.param](tmp_path)
    made.pin_identity()
    return made


def _read(store: Store, chunk_id: int, index: int, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    return bytes(buf[: store.read_fragment(chunk_id, index, offset, memoryview(buf))])


def test_fragments_by_name(store: Store) -> None:
    data = bytes(range(256)) * 40
    assert store.write_fragment(7, 2, [data[:100], memoryview(data[100:])]) == len(data)
    assert store.fragment_size_on_disk(7, 2) == len(data)
    assert _read(store, 7, 2, 0, len(data)) == data
    assert _read(store, 7, 2, 1000, 10) == data[1000:1010]
    assert _read(store, 7, 2, len(data) - 3, 10) == data[-3:]  # short only at the end
    assert _read(store, 7, 2, len(data) + 5, 10) == b""
    dest = memoryview(bytearray(10))
    if isinstance(store, S3Store):  # at hand only once prefetched (read-ahead)
        assert store.read_fragment_cached(7, 2, 1000, dest) is False
        store.prefetch(7, 2, 512, 4096)
        assert _read(store, 7, 2, 1000, 10) == data[1000:1010]  # waits for the prefetch
    assert store.read_fragment_cached(7, 2, 1000, dest) is True  # open and at hand now
    assert bytes(dest) == data[1000:1010]
    assert store.read_fragment_cached(7, 2, len(data) - 3, dest) is False  # short: a miss
    store.prefetch(7, 2, 0, len(data))
    with pytest.raises(StoreError):
        store.write_fragment(7, 2, [b"again"])  # never overwritten
    assert _read(store, 7, 2, 0, 4) == data[:4]
    store.write_fragment(7, 3, [b"x"])
    assert sorted(store.list_fragments()) == [(7, 2), (7, 3)]
    assert sorted(store.iter_fragments()) == [(7, 2), (7, 3)]
    assert store.stray_entries(store.list_fragments()) == []
    assert store.fragment_relpath(7, 2).endswith("0000000000000007.2")
    store.delete_fragment(7, 2)
    store.delete_fragment(7, 2)  # missing is fine
    with pytest.raises(FragmentMissing):
        _read(store, 7, 2, 0, 1)
    with pytest.raises(FragmentMissing):
        store.fragment_size_on_disk(7, 2)
    if isinstance(store, S3Store):  # prefetch starts a GET; the read meets the error
        store.prefetch(7, 2, 0, 1)
        with pytest.raises(FragmentMissing):
            _read(store, 7, 2, 0, 1)
    else:
        with pytest.raises(FragmentMissing):
            store.prefetch(7, 2, 0, 1)
    assert store.read_fragment_cached(7, 2, 0, memoryview(bytearray(1))) is False
    assert issubclass(FragmentMissing, StoreError)
    with pytest.raises(ValueError):
        store.fragment_relpath(-1, 0)


def test_health_identity_space(store: Store) -> None:
    marker = store.read_marker()
    assert store.probe() == marker
    usage = store.usage()
    assert 0 <= usage.free_bytes <= usage.total_bytes
    assert isinstance(store.device(), int)
    store.sync()
    store.close()  # never blocks; the store stays usable
    store.write_fragment(1, 0, [b"abc"])
    assert _read(store, 1, 0, 0, 3) == b"abc"
    store.retire()
    with pytest.raises(StoreError):
        store.read_marker()
    with pytest.raises(StoreError):
        store.probe()


def test_log_segments(store: Store) -> None:
    """Small-write log segments, on the stores that hold them (directories
    and the fakes): created at their size reading zeros, overwritten in
    place, read whole or in part, listed, deleted. An object store holds
    none: every log-segment method refuses with a StoreError saying so,
    and its fragments are untouched."""
    if not store.holds_log_segments:
        assert isinstance(store, S3Store)
        store.write_fragment(5, 0, [b"kept"])
        refusals = [
            store.log_segments,
            lambda: store.create_log_segment(1, 4096),
            lambda: store.write_log_segment(1, 0, b"x"),
            lambda: store.read_log_segment(1),
            lambda: store.read_log_range(1, 0, 4),
            lambda: store.delete_log_segment(1),
        ]
        for refused in refusals:
            with pytest.raises(StoreError, match="object stores hold no small-write log segments"):
                refused()
        assert store.list_fragments() == [(5, 0)] and store.stray_entries([(5, 0)]) == []
        return
    assert store.holds_log_segments is True
    assert store.log_segments() == []
    store.create_log_segment(3, 8192)
    store.create_log_segment(1, 4096)
    assert store.log_segments() == [1, 3]
    with pytest.raises(StoreError):
        store.create_log_segment(3, 8192)  # never created twice
    assert store.read_log_segment(3) == bytes(8192)
    store.write_log_segment(3, 4096, b"record")
    store.write_log_segment(3, 4100, b"RD")  # in place
    assert store.read_log_range(3, 4096, 6) == b"recoRD"
    assert store.read_log_range(3, 8190, 10) == bytes(2)  # fewer at its end
    whole = store.read_log_segment(3)
    assert len(whole) == 8192 and whole[4096:4102] == b"recoRD"
    with pytest.raises(StoreError):
        store.write_log_segment(9, 0, b"x")  # no such segment
    with pytest.raises(StoreError):
        store.read_log_segment(9)
    assert store.stray_entries([]) == []  # segments are not stray fragment entries
    store.delete_log_segment(3)
    store.delete_log_segment(3)  # gone already is fine
    assert store.log_segments() == [1]
    assert store.list_fragments() == []


def test_faulty_log_segments() -> None:
    faulty = FaultyStore(MemoryStore(_marker()))
    faulty.create_log_segment(1, 4096)
    faulty.write_log_segment(1, 0, b"abcd")
    faulty.set("eio")
    for call in (
        faulty.log_segments,
        lambda: faulty.create_log_segment(2, 4096),
        lambda: faulty.write_log_segment(1, 0, b"x"),
        lambda: faulty.read_log_segment(1),
        lambda: faulty.read_log_range(1, 0, 4),
        lambda: faulty.delete_log_segment(1),
    ):
        with pytest.raises(StoreError):
            call()
    faulty.set("corrupt")
    assert faulty.read_log_range(1, 0, 4) != b"abcd"
    faulty.set("enospc")
    with pytest.raises(NoSpace):
        faulty.create_log_segment(2, 4096)
    with pytest.raises(NoSpace):
        faulty.write_log_segment(1, 0, b"x")
    assert faulty.read_log_range(1, 0, 4) == b"abcd"
    faulty.set("gone")
    with pytest.raises(StoreError):
        faulty.read_log_segment(1)  # a segment is not a fragment: no FragmentMissing
    faulty.heal()
    assert faulty.read_log_segment(1)[:4] == b"abcd" and faulty.log_segments() == [1]


def test_memory_store_log_segments_take_space() -> None:
    store = MemoryStore(_marker(), capacity=10000)
    store.create_log_segment(1, 8192)
    assert store.usage().free_bytes == 10000 - 8192
    with pytest.raises(NoSpace):
        store.create_log_segment(2, 8192)
    store.delete_log_segment(1)
    assert store.usage().free_bytes == 10000


def test_open_store_opens_a_directory_store(tmp_path: Path) -> None:
    made = initialise_store(tmp_path / "s", _marker())
    again = open_store(tmp_path / "s")
    assert isinstance(again, DirectoryStore) and again.read_marker() == made.read_marker()


def test_memory_store_is_full_and_swapped_like_a_disk() -> None:
    store = MemoryStore(_marker(), capacity=10)
    store.pin_identity()
    store.write_fragment(1, 0, [b"12345678"])
    with pytest.raises(NoSpace):
        store.write_fragment(1, 1, [b"123"])
    assert store.usage().free_bytes == 2
    store.pin_identity(_marker())  # as if another store had been pinned here
    with pytest.raises(StoreSwapped):
        store.probe()


# ---- FaultyStore modes


def test_faulty_modes_switch_at_run_time() -> None:
    faulty = FaultyStore(MemoryStore(_marker()))
    faulty.write_fragment(5, 0, [b"0123456789"])
    dest = memoryview(bytearray(10))
    faulty.set("eio")
    with pytest.raises(StoreError, match="Input/output"):
        faulty.read_fragment(5, 0, 0, dest)
    with pytest.raises(StoreError):
        faulty.write_fragment(5, 1, [b"x"])
    assert faulty.read_fragment_cached(5, 0, 0, dest) is False
    faulty.set("corrupt")
    assert faulty.read_fragment(5, 0, 0, dest) == 10 and bytes(dest) != b"0123456789"
    assert faulty.read_fragment_cached(5, 0, 0, dest) and bytes(dest) != b"0123456789"
    faulty.set("enospc")
    with pytest.raises(NoSpace):
        faulty.write_fragment(5, 1, [b"x"])
    assert faulty.usage().free_bytes == 0
    assert faulty.read_fragment(5, 0, 0, dest) == 10 and bytes(dest) == b"0123456789"
    faulty.set("gone")
    with pytest.raises(FragmentMissing):
        faulty.read_fragment(5, 0, 0, dest)
    for call in (faulty.probe, faulty.usage, faulty.sync, faulty.list_fragments):
        with pytest.raises(StoreError):
            call()
    with pytest.raises(StoreError):
        faulty.delete_fragment(5, 0)
    faulty.set("eio", ops={"write"})  # limited to some operations
    assert faulty.read_fragment(5, 0, 0, dest) == 10
    with pytest.raises(StoreError):
        faulty.write_fragment(5, 1, [b"x"])
    faulty.heal()
    faulty.write_fragment(5, 1, [b"x"])
    assert faulty.calls["write"] == 5
    with pytest.raises(ValueError):
        faulty.set("melting")


def test_faulty_hang_blocks_until_switched_and_slow_delays() -> None:
    faulty = FaultyStore(MemoryStore(_marker()))
    faulty.write_fragment(5, 0, [b"abc"])
    faulty.set("hang")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (faulty.probe(), done.set()))
    thread.start()
    assert not done.wait(0.2) and faulty.hanging == 1
    assert faulty.read_fragment_cached(5, 0, 0, memoryview(bytearray(3))) is False  # never blocks
    faulty.heal()
    assert done.wait(5)
    thread.join()
    faulty.set("slow", delay=0.05)
    assert _read(faulty, 5, 0, 0, 3) == b"abc"  # late, but right


@pytest.mark.trio
async def test_a_hung_store_times_out_through_its_runner(autojump_clock: trio.abc.Clock) -> None:
    faulty = FaultyStore(MemoryStore(_marker()))
    runner = StoreRunner(0, faulty, timeout=30.0)
    faulty.set("hang")
    try:
        with pytest.raises(StoreTimeout):
            await runner.call(faulty.list_fragments)
        assert runner.state is StoreState.FAILED
        assert await runner.probe() is False
    finally:
        faulty.heal()


# ---- the boundary


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}:{alias.name}" for alias in node.names)
            names.add(f"module:{node.module}")
    return names


STORAGE_MODULES = {"store.py", "fdcache.py", "fakestores.py"}
#: Modules that may name DirectoryStore: only the factory that opens a store
#: by location (mkfs, mount, fsck and store admin all go through its
#: open_store/initialise_store).
CONSTRUCTION_SITES = {"storefactory.py"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_file_descriptor_crosses_the_store_boundary(path: Path) -> None:
    if path.name in STORAGE_MODULES:
        return
    names = _names_used(path)
    leaks = {"preadv", "pread", "posix_fadvise", "RWF_NOWAIT", "OPEN_FILES", "close_later"} & names
    assert not leaks, f"{path.name} uses {sorted(leaks)}: store I/O belongs behind ecfs.storage.store"
    assert "module:fdcache" not in names and "module:ecfs.storage.fdcache" not in names
    if path.name not in CONSTRUCTION_SITES:
        assert "DirectoryStore" not in names, f"{path.name} names DirectoryStore"
