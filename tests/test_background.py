"""Background work that never gets stuck (ecfs.data.background): per-chunk
deadlines and skips with backoff, and pausing all background work.

The scheduling is tested in-process: a poisoned chunk on fake stores
(tests/inprocess.py, `FaultyStore.set(..., chunks=...)`) and the
small-write log over real directory stores (tests/test_smallwrites.py's
harness, Volume.open as a mount does). Pause and resume across a remount,
the CLI and the status go through a real mount.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import trio

from ecfs.data.background import BackgroundGate, ChunkPlace, RetryBook, chunk_deadline
from ecfs.storage.metadb.chunks import RepairQueue
from ecfs.storage.metadb.stores import StoreTable
from tests import test_smallwrites as sw
from tests.inprocess import CHUNK, make_rig
from tests.mounting import MountedVolume, cli
from tests.volume_files import (
    MiB,
    fragment_files,
    fsynced_overwrites,
    pattern,
    sha256_file,
    status,
    write_pattern_file,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the pure parts


def test_the_retry_book_backs_off_exponentially_up_to_its_cap() -> None:
    clock = FakeClock()
    book = RetryBook(clock, base=10.0, cap=35.0)
    place = ChunkPlace(7, 2, "/a/b", 2 * 1024, 3 * 1024)
    assert book.due(1) and book.next_due_in() is None
    assert book.skip(1, place, "slow") == 10.0
    assert not book.due(1) and book.due(2)  # only the skipped chunk waits
    clock.now += 10.0
    assert book.due(1)
    assert book.skip(1, None, "slower") == 20.0  # the place is kept
    assert book.skip(1, None, "slower") == 35.0  # capped
    assert book.failures(1) == 3 and book.failures(2) == 0
    [entry] = book.entries()
    assert (entry.path, entry.start, entry.stop, entry.failures) == ("/a/b", 2048, 3072, 3)
    assert entry.reason == "slower" and len(book) == 1 and book.skips == 3
    book.retry_now()
    assert book.due(1)
    book.done(1)
    assert len(book) == 0 and book.entries() == ()


def test_chunk_deadlines_follow_the_measured_speed_within_bounds() -> None:
    assert chunk_deadline(1 << 20, 0, 0.0, floor=0.1, ceiling=100) == pytest.approx(4 / 20)
    assert chunk_deadline(1 << 20, 0, 0.0, floor=5, ceiling=100) == 5  # the floor
    assert chunk_deadline(100 << 20, 1 << 20, 0.0, floor=5, ceiling=100) == 100  # the ceiling
    assert chunk_deadline(10 << 20, 1 << 20, 0.5, floor=1, ceiling=100) == pytest.approx(42.0)


# ---- a poisoned chunk never blocks the queue (in-process, fake stores)


@pytest.mark.trio
async def test_a_poisoned_chunk_is_skipped_while_the_1000_behind_it_are_repaired(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path)
    volume = rig.volume
    await volume.refresh_usage()
    count = 1001
    data = bytes(pattern(5, count * CHUNK))
    ino = rig.new_file(b"big")
    await volume.filedata.write(ino, 0, data)
    await volume.filedata.flush(ino)
    refs = [volume.filedata.chunks.get(ino, i) for i in range(count)]
    assert all(ref is not None for ref in refs)
    poisoned = refs[500]
    assert poisoned is not None
    queue = RepairQueue(volume.db)
    with volume.db.transaction():
        for ref in refs:
            assert ref is not None
            rig.memory[ref.stores[0]].delete_fragment(ref.chunk_id, 0)
            # The poisoned chunk is the most urgent: the 1,000 others queue behind it.
            priority = 0 if ref is poisoned else 1
            queue.add(ref.chunk_id, "scrub", priority, time.time_ns(), bad=1, demand=0)
    for store in rig.stores:  # every read of the poisoned chunk's fragments hangs
        store.set("hang", ops={"read"}, chunks={poisoned.chunk_id})
    repairer = volume.repairer
    repairer.deadline_floor = repairer.deadline_ceiling = 1.0
    repairer.skipped.base = 1.0

    def left() -> int:
        return sum(entry.chunks for entry in repairer.statistics().queue.values())

    async with trio.open_nursery() as nursery:
        await nursery.start(repairer.run)
        with trio.fail_after(300):
            while left() > 1:  # noqa: ASYNC110 (the repairer works meanwhile)
                await trio.sleep(0.1)
        stats = repairer.statistics()
        assert stats.chunks_repaired == count - 1
        assert stats.skipped == 1 and stats.deadline_misses >= 1
        [skipped] = stats.skipped_chunks
        assert skipped.chunk_id == poisoned.chunk_id
        assert (skipped.path, skipped.start, skipped.stop) == ("/big", 500 * CHUNK, 501 * CHUNK)
        assert "deadline" in skipped.reason
        # Retried later, with a longer wait each time.
        with trio.fail_after(60):
            while repairer.statistics().skipped_chunks[0].failures < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
        # Its next deadline is longer too (slow is not stuck).
        repairer.deadline_floor, repairer.deadline_ceiling = 5.0, 100.0
        failures = repairer.skipped.failures(poisoned.chunk_id)
        assert repairer.chunk_deadline(poisoned) == min(100.0, 5.0 * 2**failures)
        assert repairer.chunk_deadline(refs[0]) == 5.0  # type: ignore[arg-type]
        repairer.deadline_floor = repairer.deadline_ceiling = 1.0
        for store in rig.stores:
            store.heal()
        with trio.fail_after(60):
            while left() or repairer.statistics().skipped:  # noqa: ASYNC110
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert repairer.statistics().chunks_repaired == count
    for ref in refs:
        assert ref is not None
        now = volume.filedata.chunks.get(ino, refs.index(ref))
        assert now is not None
        assert rig.memory[now.stores[0]].fragment(now.chunk_id, 0) is not None
    volume.handles.close_all()
    assert bytes(await volume.filedata.read(ino, 0, len(data))) == data
    volume.close()


# ---- pause: persisted, and writes never wait for it (in-process, directory stores)


def test_the_gate_persists_a_pause_in_the_volume_table(tmp_path: Path) -> None:
    stores = sw.make_volume(tmp_path)

    async def pause(volume: sw.Volume) -> None:
        assert not volume.background_gate.paused
        assert volume.background_gate.pause("alice@host")
        assert not volume.background_gate.pause("bob@host")  # the first pause counts
        params = StoreTable(volume.db).params()
        assert params["background_paused_by"] == "alice@host"
        assert int(params["background_paused"]) > 0

    async def check(volume: sw.Volume) -> None:
        stats = volume.background_gate.statistics()
        assert stats.paused and stats.by == "alice@host" and stats.since_ns > 0
        assert volume.status().background == stats
        with trio.move_on_after(0.2) as waited:
            await volume.background_gate.wait_running()
        assert waited.cancelled_caught  # paused: waits
        assert volume.background_gate.resume()
        await volume.background_gate.wait_running()  # running: at once
        assert "background_paused" not in StoreTable(volume.db).params()

    async def running(volume: sw.Volume) -> None:
        assert not volume.background_gate.paused

    sw.run(tmp_path, stores, pause)
    sw.run(tmp_path, stores, check)
    sw.run(tmp_path, stores, running)


def test_writes_keep_working_while_paused_even_with_the_log_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused, the fold task and the garbage collector do nothing; writers
    that take the small-write log over its limit fold what they need
    themselves; a resume lets the background catch up. (Small segments, so
    that the segments' space stays below the bound that is kept even while
    paused.)"""
    import ecfs.data.logfiles

    monkeypatch.setattr(ecfs.data.logfiles, "SEGMENT_SIZE", 8192)
    stores = sw.make_volume(tmp_path)

    async def body(volume: sw.Volume) -> None:
        data, log = volume.filedata, volume.writelog
        log.fold_idle = 0.0  # would fold every chunk at once if running
        ino = sw.new_file(volume, b"f")
        expected = bytearray(sw.pattern(3, 4 * sw.CHUNK))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        volume.background_gate.pause("test")
        await trio.sleep(1.5)  # the fold task looks (FOLD_POLL) and stays put
        log.limit = 20_000
        for i in range(40):
            offset = (i % 4) * sw.CHUNK + (i * 997) % (sw.CHUNK - 3000)
            piece = bytes([65 + i % 26]) * 3000
            with trio.fail_after(30):
                await data.write(ino, offset, piece)
                await data.fsync(ino)
            expected[offset : offset + 3000] = piece
            assert log.total <= 20_000
        stats = log.statistics()
        assert log.files is not None and not log._space_over()
        assert stats.forced_folds == stats.folds > 0  # only the writers folded
        assert log.records > 0  # what fits in the log waits for the resume
        assert volume.garbage.pending > 0  # replaced versions wait too
        await trio.sleep(1.5)
        assert log.records > 0 and volume.garbage.pending > 0
        assert await data.read(ino, 0, 4 * sw.CHUNK) == expected
        volume.background_gate.resume()
        with trio.fail_after(60):
            while log.records or volume.garbage.pending:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert await data.read(ino, 0, 4 * sw.CHUNK) == expected

    sw.run(tmp_path, stores, body)


@pytest.mark.trio
async def test_scrub_and_repair_wait_at_the_gate(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    volume = rig.volume
    await volume.refresh_usage()
    ref = await rig.store_file(bytes(pattern(9, CHUNK)))
    rig.memory[ref.stores[1]].delete_fragment(ref.chunk_id, 1)
    gate: BackgroundGate = volume.background_gate
    gate.pause("test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(volume.scrubber.run)
        await trio.sleep(1.0)
        assert volume.scrubber.progress.running and volume.scrubber.progress.chunks_done == 0
        gate.resume()
        with trio.fail_after(30):
            while volume.scrubber.progress.running:  # noqa: ASYNC110
                await trio.sleep(0.05)
    assert volume.scrubber.progress.chunks_done == 1
    assert RepairQueue(volume.db).contains(ref.chunk_id)  # the finding is queued
    gate.pause("test")
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.repairer.run)
        await trio.sleep(1.0)
        assert volume.repairer.counters.fragments_rebuilt == 0  # paused: not repaired
        gate.resume()
        with trio.fail_after(30):
            while RepairQueue(volume.db).contains(ref.chunk_id):  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert volume.repairer.counters.fragments_rebuilt == 1
    volume.close()


# ---- through a real mount


def test_pause_survives_a_remount_and_nothing_is_repaired_until_resumed(
    volume: MountedVolume,
) -> None:
    files = {
        volume.mountpoint / f"f{i}": write_pattern_file(volume.mountpoint / f"f{i}", i, 3 * MiB + i)
        for i in range(3)
    }
    done = cli("repair", "--pause", volume.mountpoint)
    assert "paused" in done.stdout
    volume.unmount()
    lost = fragment_files(volume.stores[2])
    assert lost
    for path in lost.values():
        path.unlink()
    volume.mount()
    record = status(volume)
    assert record["background"]["paused"] and record["background"]["since_ns"] > 0
    text = cli("status", volume.mountpoint, check=False).stdout
    assert "paused on purpose since" in text
    metrics = cli("status", "--prometheus", volume.mountpoint).stdout
    assert "ecfs_background_paused 1.0" in metrics
    # Scrub and repair say so instead of waiting.
    for args in (("scrub",), ("repair", "--wait")):
        refused = cli(*args, volume.mountpoint, check=False, timeout=60)
        assert refused.returncode == 1 and "paused on purpose" in refused.stderr, refused
    # Reads work (degraded) and queue repairs, which wait.
    for path, digest in files.items():
        assert sha256_file(path) == digest
    # Writes work, small fsync'd overwrites included.
    target = volume.mountpoint / "small"
    expected = bytearray(pattern(11, 2 * MiB))
    target.write_bytes(expected)
    fsynced_overwrites(target, expected, 200, 4096, seed=4)
    assert target.read_bytes() == expected
    time.sleep(2.0)
    record = status(volume)
    assert record["repair"]["chunks"] > 0 and record["repair"]["fragments_rebuilt"] == 0
    assert not any(path.exists() for path in lost.values())
    done = cli("repair", "--resume", volume.mountpoint)
    assert "resumed" in done.stdout
    assert not status(volume)["background"]["paused"]
    assert "ecfs_background_paused 0.0" in cli("status", "--prometheus", volume.mountpoint).stdout
    cli("scrub", volume.mountpoint, check=False)  # finds the chunks nobody read
    repaired = cli("repair", "--wait", volume.mountpoint, timeout=300)
    assert "0 chunks still queued" in repaired.stdout
    volume.unmount()
    assert set(lost) <= set(fragment_files(volume.stores[2]))  # rebuilt
    volume.mount()
    assert not status(volume)["background"]["paused"]
    assert target.read_bytes() == expected
    for path, digest in files.items():
        assert sha256_file(path) == digest


def test_pause_and_resume_work_on_an_unmounted_volume(
    volume: MountedVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Who paused names the host as the lease does ($ECFS_HOST_ID).
    monkeypatch.setenv("ECFS_HOST_ID", "pausing-host")
    files = {
        volume.mountpoint / f"f{i}": write_pattern_file(volume.mountpoint / f"f{i}", i, 3 * MiB + i)
        for i in range(3)
    }
    # While mounted, the stores are the mount's: refused (use the mountpoint).
    refused = cli("repair", "--pause", *volume.stores, check=False)
    assert refused.returncode == 2 and "in use" in refused.stderr, refused
    volume.unmount()
    done = cli("repair", "--pause", *volume.stores)
    assert "background work paused" in done.stdout, done
    assert "already paused" in cli("repair", "--pause", *volume.stores).stdout
    assert cli("fsck", *volume.stores).returncode == 0  # every metadata copy has it
    lost = fragment_files(volume.stores[2])
    for path in lost.values():
        path.unlink()
    volume.mount()
    record = status(volume)["background"]
    assert record["paused"] and record["by"].endswith("@pausing-host"), record
    for path, digest in files.items():  # degraded reads queue repairs, which wait
        assert sha256_file(path) == digest
    time.sleep(2.0)
    record = status(volume)
    assert record["repair"]["chunks"] > 0 and record["repair"]["fragments_rebuilt"] == 0
    assert not any(path.exists() for path in lost.values())
    assert "resumed" in cli("repair", "--resume", volume.mountpoint).stdout
    repaired = cli("repair", "--wait", volume.mountpoint, timeout=300)
    assert "0 chunks still queued" in repaired.stdout
    # And back: paused through the mount, resumed offline.
    cli("repair", "--pause", volume.mountpoint)
    volume.unmount()
    assert "background work resumed" in cli("repair", "--resume", *volume.stores).stdout
    assert "was not paused" in cli("repair", "--resume", *volume.stores).stdout
    volume.mount()
    assert not status(volume)["background"]["paused"]
    for path, digest in files.items():
        assert sha256_file(path) == digest
    usage = cli("repair", "--wait", *volume.stores, check=False)
    assert usage.returncode == 2 and "--pause or --resume" in usage.stderr, usage


def test_pause_and_resume_are_refused_together(volume: MountedVolume) -> None:
    refused = cli("repair", "--pause", "--resume", volume.mountpoint, check=False)
    assert refused.returncode == 2 and "alone" in refused.stderr
    os.setxattr(volume.mountpoint, "user.ecfs.control", b"pause")  # the bare command works too
    assert json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))["background"]["paused"]
    os.setxattr(volume.mountpoint, "user.ecfs.control", b"resume")
    assert not status(volume)["background"]["paused"]


def test_status_json_text_and_metrics_show_the_pause_and_skipped_chunks() -> None:
    import dataclasses

    from ecfs.data.background import BackgroundStatistics, SkippedChunk
    from ecfs.frontend.metrics import render_prometheus
    from ecfs.frontend.render import render_status
    from ecfs.volume.status import from_json, to_json
    from tests.test_status import example_status

    base = example_status()
    skipped = tuple(
        SkippedChunk(100 + i, 7, i, "/photos/a.jpg" if i else "", i * 4096, (i + 1) * 4096, 1 + i,
                     "not repaired within its deadline of 10.0 s", 1_800_000_000 * 10**9)
        for i in range(7)
    )  # fmt: skip
    record = dataclasses.replace(
        base,
        repair=dataclasses.replace(
            base.repair, skipped=7, skipped_chunks=skipped, deadline_misses=9
        ),
        background=BackgroundStatistics(True, 1_800_000_000 * 10**9, "alice@host"),
    )
    assert from_json(json.loads(json.dumps(to_json(record)))) == record
    text = render_status(record)
    assert (
        "background work: paused on purpose since 2027-01-15 08:00:00 UTC by alice@host" in text
    )
    assert "repair: 3 chunks queued" in text and "(paused)" in text
    assert "skipped: 7 chunks (failed or missed their deadline; retried with backoff)" in text
    assert "inode 7 (unlinked) bytes [0, 4096): not repaired within its deadline" in text
    assert "/photos/a.jpg bytes [4096, 8192)" in text and "2 failures" in text
    assert "[20480, 24576)" not in text  # the first five only
    metrics = render_prometheus(record)
    assert "ecfs_background_paused 1.0" in metrics
    assert "ecfs_background_paused_since_timestamp_seconds 1.8e+09" in metrics
    assert "ecfs_repair_skipped_chunks 7.0" in metrics
    assert "ecfs_repair_deadline_misses_total 9.0" in metrics
    running = render_status(base)
    assert "background work: running" in running and "(paused)" not in running
    assert "ecfs_background_paused_since" not in render_prometheus(base)


@pytest.mark.trio
async def test_paused_garbage_still_deletes_past_its_backlog(tmp_path: Path) -> None:
    """Paused, replaced versions wait, but never more than BACKLOG of them:
    the space they hold must not pile up while paused."""
    from ecfs.data.garbage import BACKLOG

    rig = make_rig(tmp_path)
    volume = rig.volume
    refs = [rig.put_chunk(bytes(pattern(i, 1000)), chunk_id=(1 << 20) + i) for i in range(BACKLOG + 40)]
    volume.background_gate.pause("test")
    volume.garbage.discard(refs, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.garbage.run)
        with trio.fail_after(60):
            while volume.garbage.pending > BACKLOG:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        assert volume.garbage.pending == BACKLOG  # the rest waits for the resume
        assert rig.memory[0].fragment(refs[-1].chunk_id, 0) is not None
        volume.background_gate.resume()
        with trio.fail_after(60):
            while volume.garbage.pending:  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert not any(m.list_fragments() for m in rig.memory)
    volume.close()


@pytest.mark.trio
async def test_the_queue_is_read_past_many_skipped_chunks(tmp_path: Path) -> None:
    """300 skipped entries at the head of the queue (more than one look
    used to read) do not keep the chunk behind them waiting."""
    rig = make_rig(tmp_path)
    volume = rig.volume
    await volume.refresh_usage()
    ref = await rig.store_file(bytes(pattern(3, CHUNK)))
    rig.memory[ref.stores[2]].delete_fragment(ref.chunk_id, 2)
    queue = RepairQueue(volume.db)
    ahead = range(1 << 40, (1 << 40) + 300)
    with volume.db.transaction():
        for chunk_id in ahead:
            queue.add(chunk_id, "scrub", 0, time.time_ns(), bad=1, demand=0)
        queue.add(ref.chunk_id, "scrub", 1, time.time_ns(), bad=1 << 2, demand=0)
    for chunk_id in ahead:
        volume.repairer.skipped.skip(chunk_id, None, "test")
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.repairer.run)
        with trio.fail_after(30):
            while queue.contains(ref.chunk_id):  # noqa: ASYNC110
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert volume.repairer.counters.fragments_rebuilt == 1
    assert all(queue.contains(chunk_id) for chunk_id in ahead)  # still waiting their turn
    volume.close()


# ---- a poisoned chunk through a real mount (faultfs stores)


def test_a_poisoned_chunk_on_hanging_stores_is_skipped_while_1000_others_are_repaired(
    tmp_path: Path,
) -> None:
    """A 2+1 volume on a plain store and two faultfs stores; 1,001 files of
    one chunk each lose their fragment 0 and are read while repair is
    paused (each read queues its chunk). Then the fragment files of one
    chunk (the first queued, its fragment 0 on the plain store) hang on
    both faultfs stores (`hang@GLOB`), so its repair can never finish:
    it misses its deadline (`-o repair_deadline=2`), is skipped and
    reported with its file and byte range, and the 1,000 others are
    repaired meanwhile. Once the stores answer, `ecfs repair` repairs it
    too, and fsck is clean."""
    from tests.mounting import FUSE_MISSING_REASON
    from tests.test_faultfs import faultfs

    if FUSE_MISSING_REASON is not None:
        pytest.skip(FUSE_MISSING_REASON)
    count, size = 1001, 8192
    dirs = [faultfs.FaultyDir(tmp_path / f"faulty{i}") for i in (1, 2)]
    for d in dirs:
        d.launch()
    try:
        for d in dirs:
            d.wait_ready()
        stores = [tmp_path / "s0", dirs[0].path / "s1", dirs[1].path / "s2"]
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        cli("mkfs", "--data", 2, "--parity", 1, "--fragment-size", "16K", "--inline-max", "0",
            *stores)  # fmt: skip
        volume = MountedVolume(
            stores, mountpoint, tmp_path / "ecfs.log", mount_args=["-o", "repair_deadline=2"]
        )
        _poisoned_chunk_scenario(volume, dirs, count, size)
    finally:
        for d in dirs:
            d.close()


def _poisoned_chunk_scenario(volume: MountedVolume, dirs: list, count: int, size: int) -> None:
    import sqlite3

    from ecfs.storage.store import fragment_relpath
    from tests.volume_files import drop_caches

    root = volume.mountpoint
    contents = {f"f{i:04d}": bytes(pattern(i, size)) for i in range(count)}
    ok = False
    volume.mount()
    try:
        for name, data in contents.items():
            (root / name).write_bytes(data)
        volume.unmount()
        db = sqlite3.connect(f"file:{volume.stores[0] / 'meta' / 'ecfs-meta.sqlite'}?mode=ro",
                             uri=True)  # fmt: skip
        try:
            rows = db.execute(
                "SELECT d.name, c.chunk_id, c.stores FROM chunks AS c"
                " JOIN dentries AS d ON d.inode = c.inode WHERE d.parent = 1"
            ).fetchall()
        finally:
            db.close()
        chunks = {bytes(n).decode(): (cid & (2**64 - 1), list(s)) for n, cid, s in rows}
        assert set(chunks) == set(contents)
        lost = {}
        for chunk_id, where in chunks.values():  # every chunk loses fragment 0
            lost[chunk_id] = volume.stores[where[0]] / fragment_relpath(chunk_id, 0)
            lost[chunk_id].unlink()
        # The poisoned chunk: its fragment 0 was on the plain store, so both
        # fragments that repair must read are on faultfs stores.
        poisoned = next(name for name, (_, where) in sorted(chunks.items()) if where[0] == 0)
        poisoned_id = chunks[poisoned][0]
        volume.mount()
        cli("repair", "--pause", root)
        # Degraded reads work and queue the chunks, the poisoned one first
        # (a read routed around a lagging data fragment's store does not
        # see it missing: such files are read again).
        for _ in range(3):
            for name in [poisoned, *(n for n in contents if n != poisoned)]:
                assert (root / name).read_bytes() == contents[name], name
            if status(volume)["repair"]["chunks"] == count:
                break
            drop_caches()
        assert status(volume)["repair"]["chunks"] == count
        for d in dirs:
            d.set(f"hang@*{poisoned_id:016x}.*")
        cli("repair", "--resume", root)
        waited = cli("repair", "--wait", root, timeout=300)
        assert "1 chunks still queued" in waited.stdout, waited.stdout
        assert (
            f"SKIPPED: /{poisoned} bytes [0, {size}): not repaired within its deadline"
            in waited.stdout
        ), waited.stdout
        record = status(volume)["repair"]
        assert record["chunks"] == 1 and record["skipped"] == 1, record
        assert record["chunks_repaired"] == count - 1 and record["deadline_misses"] >= 1
        [skipped] = record["skipped_chunks"]
        assert (skipped["path"], skipped["start"], skipped["stop"]) == (f"/{poisoned}", 0, size)
        assert skipped["chunk_id"] == poisoned_id and "deadline" in skipped["reason"]
        assert f"/{poisoned} bytes [0, {size})" in cli("status", root, check=False).stdout
        for d in dirs:  # the stores answer again
            d.set("ok")
        done = cli("repair", "--wait", root, timeout=120)
        assert "0 chunks still queued" in done.stdout and "SKIPPED" not in done.stdout, done
        record = status(volume)["repair"]
        assert record["chunks"] == 0 and record["skipped"] == 0
        assert record["chunks_repaired"] == count
        volume.unmount()
        assert all(path.exists() for path in lost.values())  # rebuilt where they were
        assert cli("fsck", "--verify-data", *volume.stores).returncode == 0
        volume.mount()
        for name in (poisoned, "f0000", f"f{count - 1:04d}"):
            assert (root / name).read_bytes() == contents[name]
        ok = True
    finally:
        for d in dirs:
            d.set("ok")
        volume.unmount(check=ok)
    volume.check_log_clean([r"skipped|deadline|did not answer|abandon"])
