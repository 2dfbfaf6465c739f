"""The garbage collector's memory of deletions that had to wait (a store
away), on a real volume opened in-process (no mount): what could not be
deleted is remembered durably and deleted once the store is back; what a
chunk refers to again, or a repair may be writing, is never deleted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ecfs.core import fragment
from ecfs.core.errors import StoreError
from ecfs.core.model import ChunkRef
from ecfs.storage.metadb.chunks import ChunkTable, PendingDeletions
from ecfs.volume.assembly import Volume
from ecfs.volume.mkfs import VolumeSpec, create_volume
from tests.volume_files import own_domains

K, M = 2, 1
N = K + M
PAYLOAD = b"x" * 4096


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    stores = [tmp_path / f"s{i}" for i in range(N)]
    create_volume(
        stores,
        VolumeSpec(k=K, m=M, fragment_size=4096, cell_size=4096, inline_max=1024),
        domains=own_domains(stores),
    )
    volume = Volume.open([str(s) for s in stores], runtime_dir=tmp_path)
    volume.garbage.load_leftovers()
    try:
        yield volume
    finally:
        volume.close()


def put_fragments(volume: Volume, chunk_id: int) -> ChunkRef:
    """Fragment i of `chunk_id` on store i."""
    vid = bytes.fromhex(volume.volume_id)
    for index in range(N):
        parts = fragment.build_fragment(vid, chunk_id, index, K, M, 4096, PAYLOAD)
        volume.stores[index].write_fragment(chunk_id, index, parts)
    return ChunkRef(chunk_id, K * len(PAYLOAD), tuple(range(N)))


def exists(volume: Volume, store: int, chunk_id: int, index: int) -> bool:
    return (volume.stores[store].path / volume.stores[store].fragment_relpath(chunk_id, index)).exists()


def test_deletions_on_a_failed_store_wait_for_it(volume: Volume) -> None:
    ref = put_fragments(volume, 1000)
    volume.runners[2].mark_failed("test: away")
    volume.garbage.discard([ref], 0)
    trio.run(volume.garbage.collect)
    assert not exists(volume, 0, 1000, 0) and not exists(volume, 1, 1000, 1)
    assert exists(volume, 2, 1000, 2)
    assert PendingDeletions(volume.db).on_stores([2]) == [(2, 1000, 2)]
    trio.run(volume.garbage.collect)  # still away: kept
    assert exists(volume, 2, 1000, 2) and volume.garbage.leftover_count == 1
    volume.runners[2].mark_ok()
    trio.run(volume.garbage.collect)
    assert not exists(volume, 2, 1000, 2)
    assert PendingDeletions(volume.db).count() == 0 and volume.garbage.leftover_count == 0


def test_a_vanished_store_does_not_count_as_deleted(volume: Volume, tmp_path: Path) -> None:
    ref = put_fragments(volume, 1001)
    store = volume.stores[1]
    away = tmp_path / "away"
    os.rename(store.path, away)  # unlink there says ENOENT: the store is gone, not the file
    with pytest.raises(StoreError):
        store.delete_fragment(1001, 1)
    volume.garbage.discard([ref], 0)
    trio.run(volume.garbage.collect)
    assert PendingDeletions(volume.db).on_stores([1]) == [(1, 1001, 1)]
    os.rename(away, store.path)
    trio.run(volume.check_stores)  # the health loop's probe: the store is back
    assert volume.runners[1].available
    trio.run(volume.garbage.collect)
    assert not exists(volume, 1, 1001, 1)
    assert volume.garbage.leftover_count == 0


def test_a_remembered_fragment_referred_to_again_or_pinned_is_kept(volume: Volume) -> None:
    put_fragments(volume, 1002)
    put_fragments(volume, 1003)
    volume.garbage.remember([(0, 1002, 0), (1, 1003, 1)])
    with volume.db.transaction():  # chunk 1002 has its fragment 0 on store 0 again
        ChunkTable(volume.db).put(1, 0, ChunkRef(1002, K * len(PAYLOAD), tuple(range(N))))
    volume.pins.pin(1003)  # a repair of chunk 1003 is running
    trio.run(volume.garbage.collect)
    assert exists(volume, 0, 1002, 0)
    assert exists(volume, 1, 1003, 1)
    assert PendingDeletions(volume.db).on_stores([0, 1]) == [(1, 1003, 1)]
    volume.pins.unpin(1003)
    trio.run(volume.garbage.collect)
    assert not exists(volume, 1, 1003, 1)
    assert exists(volume, 0, 1002, 0)
    assert PendingDeletions(volume.db).count() == 0


def test_a_version_remembered_with_its_dereference_waits_until_that_is_durable(
    volume: Volume,
) -> None:
    """Restripe records the version it gives up in pending_deletions in the
    transaction that drops it (so a crash cannot orphan it): those rows are
    not deleted while the version waits for its dereference to be durable
    (a crash then would bring the version back), and are removed with it."""
    ref = put_fragments(volume, 1004)
    with volume.db.transaction():
        PendingDeletions(volume.db).add([(i, 1004, i) for i in range(N)])
    volume.garbage.load_leftovers()  # as after a remount: the rows are counted
    durable = 0
    volume.garbage.durable_generation = lambda: durable
    volume.garbage.discard([ref], 1, remembered=True)  # dropped by generation 1, not durable
    trio.run(volume.garbage.collect)
    assert all(exists(volume, i, 1004, i) for i in range(N))
    assert PendingDeletions(volume.db).count() == N and volume.garbage.pending == 1
    durable = 1
    trio.run(volume.garbage.collect)
    assert not any(exists(volume, i, 1004, i) for i in range(N))
    assert PendingDeletions(volume.db).count() == 0 and volume.garbage.pending == 0
    assert volume.garbage.deleted_chunks == 1
