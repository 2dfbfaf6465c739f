"""Hybrid placement (`ecfs.data.placement`): data fragments on local stores,
parity on remote ones; the fallback to the other class when one is short,
repair moving such fragments back, the refusals of store changes, and
`df` counting only real space. Pure placement tests, then the volume's
services in-process on fake stores (tests/inprocess.py); the real mounts
over moto S3 servers are in tests/test_hybrid_mount.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from ecfs.core.errors import FsError, VolumeError
from ecfs.core.model import NO_STORE
from ecfs.data.placement import HYBRID, POLICY_KEY, SPREAD, Placement, policy_problem
from ecfs.storage.metadb.chunks import RepairEntry, RepairQueue
from ecfs.storage.metadb.stores import StoreTable
from ecfs.storage.store import StoreUsage
from ecfs.volume.control import parse_command

from .inprocess import CHUNK, K, M, Rig, make_rig

GiB = 1 << 30


@dataclass
class _Up:
    available: bool = True


def _placement(local: int, remote: int, k: int, policy: str = HYBRID) -> tuple[Placement, dict[int, _Up]]:
    runners = {i: _Up() for i in range(local + remote)}
    return Placement(runners, remote=lambda i: i >= local, policy=policy, k=k), runners


# ---- placement, pure


def test_hybrid_targets_put_data_on_local_and_parity_on_remote() -> None:
    placement, _ = _placement(4, 3, k=3)
    seen: set[int] = set()
    for _ in range(20):
        slots = placement.targets(5)
        assert all(s is not None and s < 4 for s in slots[:3]), slots
        assert all(s is not None and s >= 4 for s in slots[3:]), slots
        assert len(set(slots)) == 5
        seen.update(s for s in slots if s is not None)
        assert placement.wrong_class([s for s in slots if s is not None]) == []
    assert seen == set(range(7))  # round-robin within each class


def test_spread_targets_any_store() -> None:
    placement, _ = _placement(4, 3, k=3, policy=SPREAD)
    slots = placement.targets(5)
    assert None not in slots and len(set(slots)) == 5
    assert placement.wrong_class([5, 6, 4, 0, 1]) == []  # no classes under spread


def test_a_short_class_falls_back_to_the_other_and_is_moved_back_later() -> None:
    placement, runners = _placement(3, 3, k=3)
    runners[0].available = False  # a local disk failed
    slots = placement.targets(5)
    assert None not in slots and len(set(slots)) == 5 and 0 not in slots
    stores = [s for s in slots if s is not None]
    assert [s < 3 for s in stores[:3]].count(False) == 1  # one data fragment went remote
    wrong = placement.wrong_class(stores)
    assert len(wrong) == 1 and wrong[0] < 3
    assert placement.movable(stores) == []  # no local store free for it yet
    runners[0].available = True
    assert placement.movable(stores) == wrong
    assert placement.rebuild_target(stores, wrong[0]) == 0
    # A parity slot short of a remote store takes a local one.
    placement, runners = _placement(4, 2, k=3)
    runners[5].available = False
    slots = placement.targets(5)
    assert None not in slots and len(set(slots)) == 5 and 5 not in slots
    assert placement.wrong_class([s for s in slots if s is not None]) == [4]
    assert placement.replacement(3, exclude={4, *slots}) is None  # every store is used


def test_rebuild_target_keeps_each_fragment_in_its_class() -> None:
    placement, runners = _placement(4, 3, k=3)
    stores = [0, 1, 2, 4, 5]
    runners[1].available = False
    assert placement.rebuild_target(stores, 1) == 3  # the free local store
    runners[5].available = False
    assert placement.rebuild_target(stores, 4) == 6  # the free remote store
    runners[3].available = False  # no local store free: any store rather than none
    assert placement.rebuild_target(stores, 1) == 6
    runners[1].available = True
    assert placement.rebuild_target(stores, 1) == 1  # its own store, back


def test_object_stores_are_not_preferred_for_their_nominal_space() -> None:
    placement, _ = _placement(2, 1, k=1, policy=SPREAD)
    placement.update_usage(0, StoreUsage(100 * GiB, 50 * GiB))
    placement.update_usage(1, StoreUsage(100 * GiB, 5 * GiB))
    placement.update_usage(2, StoreUsage(1 << 50, 1 << 50, known=False))
    firsts = {placement.choose(1)[0] for _ in range(10)}
    assert firsts == {0, 2}  # the remote store ties with the roomiest, never beats it
    assert [placement.choose(3)[2] for _ in range(5)] == [1] * 5


def test_policy_problem_names_what_is_missing() -> None:
    assert policy_problem(SPREAD, 3, 2, 5, 0) is None
    assert policy_problem(HYBRID, 3, 2, 3, 2) is None
    short = policy_problem(HYBRID, 3, 2, 2, 3)
    assert short is not None and "at least 3 local and 2 remote" in short
    assert "2 local and 3 remote" in short
    unknown = policy_problem("mirror", 3, 2, 3, 2)
    assert unknown is not None and "unknown placement policy" in unknown


def test_the_control_command_carries_a_placement_policy() -> None:
    assert parse_command("store-add /srv/new hybrid").placement == HYBRID
    assert parse_command("store-add /srv/new").placement is None
    with pytest.raises(FsError, match="unknown placement policy"):
        parse_command("store-add /srv/new mirror")


# ---- the volume's services, in-process

def _data(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def _reasons(rig: Rig) -> dict[int, str]:
    return {c: reason for c, reason, *_ in RepairQueue(rig.volume.db).entries()}


@pytest.mark.trio
async def test_healthy_reads_of_a_hybrid_volume_touch_no_remote_store(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, remote=2, placement=HYBRID)  # stores 0..3 local, 4..5 remote
    volume = rig.volume
    await volume.refresh_usage()
    data = _data(3 * CHUNK, seed=3)
    ino = rig.new_file()
    await volume.filedata.write(ino, 0, data)
    await volume.filedata.flush(ino)
    refs = [volume.filedata.chunks.get(ino, i) for i in range(3)]
    for ref in refs:
        assert ref is not None
        assert all(s < 4 for s in ref.stores[:K]) and all(s >= 4 for s in ref.stores[K:])
    assert _reasons(rig) == {}
    volume.handles.close_all()
    for store in rig.stores[4:]:
        store.calls["read"] = 0
        store.set("hang")  # a remote read would wait, then be degraded
    try:
        with trio.fail_after(20):
            assert bytes(await volume.filedata.read(ino, 0, len(data))) == data
    finally:
        for store in rig.stores[4:]:
            store.heal()
    assert volume.reader.counters.degraded_reads == 0
    assert all(store.calls["read"] == 0 for store in rig.stores[4:])


@pytest.mark.trio
async def test_a_data_fragment_written_remote_while_a_local_disk_is_down_moves_back(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, remote=3, placement=HYBRID)  # 0..2 local (= k), 3..5 remote
    volume = rig.volume
    await volume.refresh_usage()
    rig.stores[0].set("gone")
    await volume.probe_store(0)
    assert not volume.runners[0].available
    data = _data(CHUNK, seed=5)
    ref = await rig.store_file(data)
    assert NO_STORE not in ref.stores and 0 not in ref.stores  # the write did not fail
    wrong = volume.placement.wrong_class(ref.stores)
    assert len(wrong) == 1 and wrong[0] < K
    assert _reasons(rig) == {ref.chunk_id: "wrong-class"}
    # Nowhere to move it while the local disk is down: it stays queued.
    entry = RepairEntry(ref.chunk_id, "wrong-class", 0, 0, 0)
    await volume.repairer.repair_chunk(entry)
    assert _reasons(rig) == {ref.chunk_id: "wrong-class"}
    rig.stores[0].heal()
    await volume.probe_store(0)
    await volume.repairer.repair_chunk(entry)
    [(_, _, moved)] = [row for row in volume.filedata.chunks.iter_all()]
    assert moved.stores[wrong[0]] == 0
    assert volume.placement.wrong_class(moved.stores) == []
    assert _reasons(rig) == {}
    volume.handles.close_all()
    assert bytes(await volume.reader.read(moved, 0, len(data))) == data


@pytest.mark.trio
async def test_switching_to_hybrid_queues_the_parity_to_move_and_scrub_finds_the_rest(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, remote=2)  # spread: parity anywhere
    volume = rig.volume
    await volume.refresh_usage()
    refs = [await rig.store_file(_data(CHUNK, seed=s), name=b"f%d" % s) for s in range(6)]
    wrong_before = [r for r in refs if any(s >= 4 for s in r.stores[:K]) or any(s < 4 for s in r.stores[K:])]
    assert wrong_before  # round-robin put some data fragments on the remote stores
    message = await volume.stores_admin.add(str(tmp_path / "new-local"), HYBRID)
    assert "placement is now hybrid" in message
    assert StoreTable(volume.db).params()[POLICY_KEY] == HYBRID
    assert volume.placement.policy == HYBRID
    assert set(_reasons(rig)) == {r.chunk_id for r in wrong_before}
    status = volume.status()
    assert status.placement == HYBRID and status.repair.queue["wrong-class"].chunks
    assert status.health == "healthy"  # only to be moved: no redundancy is missing
    # Scrub finds them too (e.g. after an offline fsck cleared the queue).
    with volume.db.transaction():
        for ref in wrong_before:
            RepairQueue(volume.db).remove(ref.chunk_id)
    await volume.scrubber.run()
    assert set(_reasons(rig)) == {r.chunk_id for r in wrong_before}
    volume.repairer.set_urgent(True)
    for _ in range(3):  # a fragment may move only once another has made room
        for entry in RepairQueue(volume.db).next_batch(100):
            await volume.repairer.repair_chunk(entry)
    rows = {ref.chunk_id: ref.stores for _, _, ref in volume.filedata.chunks.iter_all()}
    assert _reasons(rig) == {}, [(c, rows[c]) for c in _reasons(rig)]
    for _, _, ref in volume.filedata.chunks.iter_all():
        assert volume.placement.wrong_class(ref.stores) == []


@pytest.mark.trio
async def test_store_changes_that_break_hybrid_placement_are_refused(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, remote=3, placement=HYBRID)  # 3 local (= k), 3 remote
    admin = rig.volume.stores_admin
    with pytest.raises(VolumeError, match="at least 3 local and 2 remote"):
        await admin.remove("0")
    assert admin.placement.draining == set()
    # Switching to hybrid needs m remote stores.
    (tmp_path / "c").mkdir()
    rig = make_rig(tmp_path / "c", remote=1)
    with pytest.raises(VolumeError, match="hybrid placement"):
        await rig.volume.stores_admin.add(str(tmp_path / "c" / "new"), HYBRID)
    assert not (tmp_path / "c" / "new").exists()  # refused before anything was made
    assert rig.volume.placement.policy == SPREAD


@pytest.mark.trio
async def test_df_counts_only_known_space(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, remote=2)  # 4 local stores of 1 TiB, 2 remote of unknown size
    volume = rig.volume
    await volume.refresh_usage()
    local = 4 * rig.memory[0].capacity
    assert volume.capacity() == (local * K // (K + M), local * K // (K + M))
    volume.placement.policy = HYBRID  # the local stores hold data fragments only
    assert volume.capacity() == (local, local)
    assert volume.status().stores[5].free_bytes is None  # unknown, not 1 PiB
