"""Metadata copies kept as objects (ecfs.storage.metaobjects), in process:
the batch encoding, the object checksums, rebuilding a copy from a
snapshot and its logs, compaction bounding the objects, the fencing
epoch, and the rule of which stores hold the copies. The stores are an
in-memory object store with conditional PUTs (the real S3 path is
tests/test_s3_meta.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from ecfs.core.model import Transaction
from ecfs.storage.metaobjects import (
    KIND_SNAPSHOT,
    DamagedObject,
    ObjectCopy,
    ObjectTarget,
    copy_stores,
    decode_batch,
    encode_batch,
    log_name,
    pack,
    snapshot_name,
    unpack,
)
from ecfs.storage.replicas import Replicator, copy_database

from .test_replicas import FakeRunner, SyncRecorder, dump, make_database, make_transactions

VOLUME = bytes(range(16))


class ObjectStoreFake:
    """Objects in a dict, PUTs create-only (like If-None-Match: *)."""

    def __init__(self, name: str) -> None:
        self.path = Path(f"/objects/{name}")
        self.objects: dict[str, bytes] = {}
        self.aside: dict[str, bytes] = {}
        self.puts = 0
        self._lock = threading.Lock()

    def list_meta(self) -> list[str]:
        with self._lock:
            return sorted(self.objects)

    def put_meta(self, name: str, data: bytes) -> bool:
        with self._lock:
            if name in self.objects:
                return False
            self.objects[name] = bytes(data)
            self.puts += 1
            return True

    def get_meta(self, name: str) -> bytes:
        with self._lock:
            return self.objects[name]

    def delete_meta(self, name: str) -> None:
        with self._lock:
            self.objects.pop(name, None)

    def set_aside_meta(self, name: str) -> None:
        with self._lock:
            self.aside[name] = self.objects[name]

    def flip(self, name: str, offset: int = 60) -> None:
        data = bytearray(self.objects[name])
        data[offset] ^= 0x01
        self.objects[name] = bytes(data)


def test_batch_encoding_is_deterministic_and_round_trips() -> None:
    batch = [
        Transaction(7, (("INSERT INTO t VALUES (?, ?, ?, ?, ?)", (None, -(1 << 62), 0.5, "é", b"\0\1")),)),
        Transaction(8, (("UPDATE t SET b = ?", (True,)), ("DELETE FROM t", ()))),
    ]  # fmt: skip
    body = encode_batch(batch)
    assert body == encode_batch(batch)
    decoded = decode_batch(body)
    assert [t.generation for t in decoded] == [7, 8]
    assert decoded[0].statements == batch[0].statements
    assert decoded[1].statements[0] == ("UPDATE t SET b = ?", (1,))
    with pytest.raises(ValueError):
        encode_batch([Transaction(1, (("x", (object(),)),))])
    with pytest.raises(DamagedObject):
        decode_batch(body[:-1])


def test_an_object_verifies_only_unchanged_and_under_its_own_name() -> None:
    name = log_name(3, 10, 12)
    blob = pack(2, VOLUME, 3, 10, 12, b"body")
    assert unpack(name, blob, VOLUME) == b"body"
    for position in range(len(blob)):
        flipped = bytearray(blob)
        flipped[position] ^= 0x10
        with pytest.raises(DamagedObject):
            unpack(name, bytes(flipped), VOLUME)
    with pytest.raises(DamagedObject):
        unpack(log_name(3, 10, 13), blob, VOLUME)  # renamed
    with pytest.raises(DamagedObject):
        unpack(name, blob, bytes(16))  # another volume's


def _start(tmp_path: Path, count: int) -> tuple[ObjectStoreFake, ObjectCopy, Path]:
    """A store whose copy is the test database at generation `count`."""
    store = ObjectStoreFake("s")
    copy = ObjectCopy(store, VOLUME)
    source = make_database(tmp_path / "source.sqlite", make_transactions(count))
    image = tmp_path / "image.sqlite"
    copy_database(source, image)
    copy.install(image, count, 0)
    return store, copy, image


def _put_reference(tmp_path: Path, count: int) -> Path:
    return make_database(tmp_path / f"reference-{count}.sqlite", make_transactions(count))


@pytest.mark.trio
async def test_shipping_compacts_and_a_rebuild_gives_the_same_database(tmp_path: Path) -> None:
    stores = {i: ObjectStoreFake(f"s{i}") for i in range(2)}
    image = tmp_path / "image.sqlite"
    copy_database(make_database(tmp_path / "source.sqlite"), image)
    targets = {}
    for i, store in stores.items():
        name = ObjectCopy(store, VOLUME).install(image, 0, 0)
        shadow = tmp_path / f"shadow-{i}.sqlite"
        copy_database(image, shadow)
        targets[i] = ObjectTarget(store, VOLUME, shadow, 0, name, image.stat().st_size,
                                  compact_count=5, compact_bytes=0)  # fmt: skip
    runners = {i: FakeRunner(i) for i in stores}
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    most = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in make_transactions(60):
            replicator.submit(txn)
            await replicator.wait_durable(txn.generation)  # one batch (one log) each
            most = max(most, *(len(s.objects) for s in stores.values()))
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert replicator.live_replicas() == [0, 1]
    assert most <= 5 + 2  # a snapshot, at most compact_count logs, and the next one
    reference = dump(_put_reference(tmp_path, 60))
    for i, store in stores.items():
        assert store.puts > 60  # one log per batch, plus the snapshots
        found = ObjectCopy(store, VOLUME).rebuild(tmp_path / f"rebuilt-{i}.sqlite")
        assert found.problem is None and not found.damaged
        assert found.generation == 60
        assert dump(found.path) == reference


def test_a_damaged_log_ends_the_replay_and_a_damaged_snapshot_refuses_the_copy(
    tmp_path: Path,
) -> None:
    store, copy, _ = _start(tmp_path, 4)
    history = make_transactions(9)
    copy.put_log(0, history[4:6])  # 5..6
    copy.put_log(0, history[6:9])  # 7..9
    found = copy.rebuild(tmp_path / "all.sqlite")
    assert found.generation == 9 and found.logs == [log_name(0, 5, 6), log_name(0, 7, 9)]
    assert dump(found.path) == dump(_put_reference(tmp_path, 9))

    # A late log overlapping the snapshot (an abandoned call) is skipped.
    store.put_meta(log_name(0, 3, 5), pack(2, VOLUME, 0, 3, 5, encode_batch(history[2:5])))
    assert copy.rebuild(tmp_path / "late.sqlite").generation == 9

    store.flip(log_name(0, 7, 9))
    found = copy.rebuild(tmp_path / "stale.sqlite")
    assert found.problem is None and found.generation == 6  # stale, not wrong
    assert list(found.damaged) == [log_name(0, 7, 9)]
    assert dump(found.path) == dump(_put_reference(tmp_path, 6))

    store.flip(snapshot_name(0, 4))
    found = copy.rebuild(tmp_path / "bad.sqlite")
    assert found.problem is not None and "no snapshot" in found.problem
    assert snapshot_name(0, 4) in found.damaged


def test_a_newer_epoch_fences_the_logs_of_an_older_holder(tmp_path: Path) -> None:
    store, copy, image = _start(tmp_path, 4)
    # A new holder (epoch 1) wrote its snapshot; the old one (epoch 0)
    # still ships a log afterwards: it must be ignored.
    store.put_meta(snapshot_name(1, 4), pack(KIND_SNAPSHOT, VOLUME, 1, 4, 4, image.read_bytes()))
    copy.put_log(0, make_transactions(6)[4:6])
    found = copy.rebuild(tmp_path / "fenced.sqlite")
    assert (found.epoch, found.generation, found.logs) == (1, 4, [])
    # Installing at epoch 1 deletes everything of epoch <= 1 but the snapshot.
    name = copy.install(image, 4, 1)
    assert store.list_meta() == [name] == [snapshot_name(1, 4)]


def test_install_replaces_a_damaged_snapshot_of_the_same_name(tmp_path: Path) -> None:
    store, copy, image = _start(tmp_path, 4)
    copy.put_log(0, make_transactions(7)[4:7])  # a history that was not chosen
    store.flip(snapshot_name(0, 4))
    copy.install(image, 4, 0, set_aside=True)
    assert snapshot_name(0, 4) in store.aside  # kept for a look
    assert store.list_meta() == [snapshot_name(0, 4)]  # the log after it is gone too
    found = copy.rebuild(tmp_path / "again.sqlite")
    assert found.problem is None and found.generation == 4


def test_which_stores_hold_the_metadata_copies() -> None:
    # m+1 local stores: those only, as ever.
    assert copy_stores({0: False, 1: True, 2: False, 3: False}, 2) == [0, 2, 3]
    # Fewer: every store, local ones first.
    assert copy_stores({0: True, 1: False, 2: True, 3: True}, 2) == [1, 0, 2, 3]
    assert copy_stores({0: True, 1: True, 2: True}, 1) == [0, 1, 2]
