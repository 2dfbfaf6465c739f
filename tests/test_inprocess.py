"""Reader, writer, filedata, repair, scrub and garbage in-process, on fake
stores (tests/inprocess.py): no FUSE mount, no disk; seconds for all.

Timeouts and hedging run on trio's MockClock(autojump_threshold=0)
(pytest-trio's `autojump_clock`): virtual time jumps as soon as every task
waits, so a read that waits for a deadline costs no real time. Worker
threads do not count as activity for the mock clock, so those tests keep
the healthy stores' reads on the loop (`Rig.learn_headers`: the reader
then serves them with `read_fragment_cached`) and only the faulty store's
calls go to threads. The faultfs mount tests stay the end-to-end layer.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from ecfs.core import fragment
from ecfs.core.errors import StoreTimeout, Unrecoverable
from ecfs.core.model import NO_STORE, ChunkRef
from ecfs.data.reader import ChunkReader
from ecfs.storage import offload
from ecfs.storage.metadb.chunks import PendingDeletions, RepairEntry, RepairQueue
from ecfs.storage.offload import QUICK_ANSWERS, SLOW_STALE, StoreRunner, StoreState
from ecfs.volume import assembly

from .inprocess import CELL, CHUNK, FRAGMENT, K, M, Rig, make_rig, pattern

pytestmark = pytest.mark.trio


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def _queued(rig: Rig) -> dict[int, int]:
    """chunk id -> bad mask of the repair queue."""
    queue = RepairQueue(rig.volume.db)
    return {c: queue.bad_mask(c) or 0 for c, *_ in queue.entries()}


# ---- reader


async def test_reader_plain_read_is_verified_and_served_from_data_fragments(rig: Rig) -> None:
    data = pattern(CHUNK - 1000)
    ref = await rig.store_file(data)
    reader = rig.volume.reader
    assert bytes(await reader.read(ref, 0, len(data))) == data
    assert bytes(await reader.read(ref, 5000, 20000)) == data[5000:20000]
    assert reader.counters.degraded_reads == 0
    parity_reads = sum(rig.stores[ref.stores[i]].calls["read"] for i in range(K, K + M))
    assert parity_reads == 0
    # Headers known now: the next read is served on the loop, no thread.
    threads = reader.counters.thread_reads
    assert bytes(await reader.read(ref, 0, 4096)) == data[:4096]
    assert reader.counters.thread_reads == threads
    assert reader.counters.nowait_hits > 0


@pytest.mark.parametrize("mode", ["eio", "gone"])
async def test_reader_degraded_with_m_stores_failing(rig: Rig, mode: str) -> None:
    data = pattern(CHUNK)
    ref = await rig.store_file(data)
    for index in range(M):  # two data fragments' stores
        rig.store_of(ref, index).set(mode)
    assert bytes(await rig.volume.reader.read(ref, 0, len(data))) == data
    assert rig.volume.reader.counters.degraded_reads >= M
    assert set(range(M)) <= {i for i in range(K + M) if _queued(rig)[ref.chunk_id] >> i & 1}
    rig.store_of(ref, M).set(mode)  # one more: fewer than k left
    rig.volume.handles.close_all()
    with pytest.raises(Exception) as info:
        await rig.volume.reader.read(ref, 0, len(data))
    assert getattr(info.value, "errno", None) == 5  # EIO, never guessed bytes


@pytest.mark.parametrize("lasting", [False, True])
async def test_reader_detects_a_corrupt_fragment_and_serves_from_others(
    rig: Rig, lasting: bool
) -> None:
    data = pattern(CHUNK, seed=3)
    ref = await rig.store_file(data)
    if lasting:
        rig.memory[ref.stores[1]].damage(ref.chunk_id, 1, 4096 + 4096 + 17)  # in payload cell 1
    else:
        rig.store_of(ref, 1).set("corrupt")
    assert bytes(await rig.volume.reader.read(ref, 0, len(data))) == data
    assert rig.volume.reader.counters.degraded_reads >= 1
    assert _queued(rig)[ref.chunk_id] & (1 << 1)  # reported for repair


async def test_hedged_read_around_a_slow_store(rig: Rig, autojump_clock: trio.abc.Clock) -> None:
    data = pattern(CHUNK, seed=5)
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    slow = rig.store_of(ref, 0)
    slow.set("slow", delay=30.0)
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))  # its read goes to a thread
    start = trio.current_time()
    try:
        assert bytes(await reader.read(ref, 0, len(data))) == data
    finally:
        slow.heal()
    elapsed = trio.current_time() - start
    runner = rig.volume.runners[ref.stores[0]]
    assert elapsed < 1.0  # the hedge deadline (>= HEDGE_FLOOR), not the 30 s store
    assert reader.counters.hedged_reads == 1
    assert reader.counters.degraded_reads == 1
    assert runner.available  # one slow read does not fail a store


async def test_a_hung_store_times_out_and_is_routed_around(
    rig: Rig, autojump_clock: trio.abc.Clock
) -> None:
    data = pattern(CHUNK, seed=7)
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    hung = rig.store_of(ref, 0)
    hung.set("hang")
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))
    runner = rig.volume.runners[ref.stores[0]]
    try:
        start = trio.current_time()
        with pytest.raises(StoreTimeout):
            await reader.read_fragment(ref, 0, 0, 4096)  # no hedge: waits for the timeout
        assert trio.current_time() - start == pytest.approx(reader.read_timeout)
        assert runner.state is StoreState.FAILED
        # Failed: reads go around it at once, without touching it.
        calls = hung.calls["read"]
        assert bytes(await reader.read(ref, 0, len(data))) == data
        assert hung.calls["read"] == calls
    finally:
        hung.heal()


# ---- writer


@pytest.mark.parametrize("mode", ["enospc", "gone", "eio"])
async def test_writer_places_a_fragment_elsewhere_when_a_store_fails(
    rig: Rig, mode: str
) -> None:
    volume = rig.volume
    await volume.refresh_usage()
    bad = 2
    rig.stores[bad].set(mode, ops={"write", "probe", "usage", "marker"})
    data = pattern(CHUNK, seed=11)
    ref = await volume.writer.write(data)
    assert bad not in ref.stores and NO_STORE not in ref.stores
    assert len(set(ref.stores)) == K + M
    assert (bad in volume.placement.full) == (mode == "enospc")
    assert volume.runners[bad].available == (mode == "enospc")  # full is not sick
    assert bytes(await volume.reader.read(ref, 0, len(data))) == data


async def test_writer_fails_cleanly_with_too_few_stores(rig: Rig) -> None:
    for store in rig.stores[:3]:
        store.set("eio", ops={"write"})
    with pytest.raises(Exception) as info:
        await rig.volume.writer.write(pattern(CHUNK))
    assert getattr(info.value, "errno", None) == 5
    assert all(not store.list_fragments() for store in rig.memory[:3])


# ---- filedata


async def test_filedata_write_flush_read_round_trip(rig: Rig) -> None:
    volume = rig.volume
    ino = rig.new_file()
    data = os.urandom(2 * CHUNK + 5000)
    async with trio.open_nursery() as nursery:
        volume.filedata.attach(nursery)
        volume.filedata.opened(ino)
        for offset in range(0, len(data), 7000):
            await volume.filedata.write(ino, offset, data[offset : offset + 7000])
        await volume.filedata.flush(ino)
        volume.handles.close_all()
        assert bytes(await volume.filedata.read(ino, 0, len(data) + 10)) == data
        assert bytes(await volume.filedata.read(ino, CHUNK - 10, 20)) == data[CHUNK - 10 : CHUNK + 10]
        # A small overwrite of a stored chunk: kept as a patch / log record,
        # laid over the stored bytes on read, before and after flush.
        await volume.filedata.write(ino, CHUNK + 100, b"patched!")
        expected = data[: CHUNK + 100] + b"patched!" + data[CHUNK + 108 :]
        assert bytes(await volume.filedata.read(ino, 0, len(data))) == expected
        await volume.filedata.flush(ino)
        assert bytes(await volume.filedata.read(ino, 0, len(data))) == expected
        await volume.filedata.released(ino)
    stored = sum(len(m.list_fragments()) for m in rig.memory)
    assert stored >= 3 * (K + M)


# ---- repair, scrub, garbage


async def test_repair_rebuilds_a_lost_fragment(rig: Rig) -> None:
    volume = rig.volume
    await volume.refresh_usage()
    ino = rig.new_file()
    data = pattern(CHUNK, seed=13)
    await volume.filedata.write(ino, 0, data)
    await volume.filedata.flush(ino)
    ref = volume.filedata.chunks.get(ino, 0)
    assert ref is not None
    lost = ref.stores[3]
    rig.memory[lost].delete_fragment(ref.chunk_id, 3)
    await volume.repairer.repair_chunk(RepairEntry(ref.chunk_id, "scrub", 0, 0, 1 << 3))
    assert volume.repairer.counters.fragments_rebuilt == 1
    assert rig.memory[lost].fragment(ref.chunk_id, 3) is not None
    now = volume.filedata.chunks.get(ino, 0)
    assert now == ref
    for index in range(M):  # data fragments gone: the read needs the rebuilt fragment 3
        rig.store_of(ref, index).set("gone")
    volume.handles.close_all()
    assert bytes(await volume.reader.read(ref, 0, len(data))) == data


async def test_scrub_finds_a_corrupt_fragment(rig: Rig) -> None:
    volume = rig.volume
    ino = rig.new_file()
    await volume.filedata.write(ino, 0, pattern(2 * CHUNK, seed=17))
    await volume.filedata.flush(ino)
    ref = volume.filedata.chunks.get(ino, 1)
    assert ref is not None
    rig.memory[ref.stores[4]].damage(ref.chunk_id, 4, 4096 * 2 + 5)  # a parity fragment
    progress = await volume.scrubber.run()
    assert progress.chunks_done == progress.chunks_total == 2
    assert progress.fragments_verified == 2 * (K + M) - 1
    [finding] = progress.findings
    assert (finding.chunk_id, finding.fragments) == (ref.chunk_id, (4,))
    assert _queued(rig)[ref.chunk_id] == 1 << 4


async def test_garbage_deletes_unreferenced_fragments_but_not_pinned_ones(rig: Rig) -> None:
    volume = rig.volume
    ino = rig.new_file()
    await volume.filedata.write(ino, 0, pattern(CHUNK, seed=19))
    await volume.filedata.flush(ino)
    old = volume.filedata.chunks.get(ino, 0)
    await volume.filedata.write(ino, 0, pattern(CHUNK, seed=23))  # a new version
    await volume.filedata.flush(ino)
    new = volume.filedata.chunks.get(ino, 0)
    assert old is not None and new is not None and new.chunk_id != old.chunk_id

    assert _held(rig, old.chunk_id) == K + M
    volume.pins.pin(old.chunk_id)  # a reader still uses it
    await volume.garbage.collect()
    assert _held(rig, old.chunk_id) == K + M
    volume.pins.unpin(old.chunk_id)
    await volume.garbage.collect()
    assert _held(rig, old.chunk_id) == 0
    assert _held(rig, new.chunk_id) == K + M


async def test_read_ahead_verifies_headers_so_reads_stay_on_the_loop(rig: Rig) -> None:
    data = pattern(CHUNK, seed=29)
    ref = await rig.store_file(data)
    volume = rig.volume
    volume.handles.close_all()
    volume.runners[ref.stores[1]].mark_failed("test: away")  # read ahead parity instead
    volume.reader.prefetch(ref)
    parity = volume.reader.sources(ref, exclude=set(range(K)))[0]  # the best one
    wanted = {(ref.stores[i], ref.chunk_id, i) for i in (0, 2, parity)}
    for _ in range(1000):  # read-ahead delivers from its threads: poll
        if all(volume.handles.get(key) for key in wanted):
            break
        await trio.sleep(0.01)
    prefetched = {i for i in range(K + M) if rig.stores[ref.stores[i]].calls["read"]}
    assert prefetched == {0, 2, parity}
    threads = volume.reader.counters.thread_reads
    assert bytes(await volume.reader.read(ref, 0, len(data))) == data  # fragment 1 decoded
    assert volume.reader.counters.thread_reads == threads
    assert volume.reader.counters.degraded_reads == 1


# ---- scheduling around a slow store (issue 17)


async def _written_file(
    rig: Rig, nursery: trio.Nursery, chunks: int
) -> tuple[int, bytes, dict[int, ChunkRef]]:
    """A new open file of `chunks` chunks of random bytes, written back
    (the file data's background work in `nursery`): (inode, data, chunk
    index -> its ref)."""
    volume = rig.volume
    data = os.urandom(chunks * CHUNK)
    ino = rig.new_file()
    volume.filedata.attach(nursery)
    volume.filedata.opened(ino)
    await volume.filedata.write(ino, 0, data)
    await volume.filedata.flush(ino)
    return ino, data, volume.filedata.chunks.get_range(ino, 0, chunks - 1)


async def _read_sequentially(rig: Rig, ino: int, size: int) -> bytes:
    out = bytearray()
    for offset in range(0, size, CHUNK):
        out += await rig.volume.filedata.read(ino, offset, CHUNK)
    return bytes(out)


async def test_a_slow_store_is_routed_around_not_waited_for(rig: Rig) -> None:
    """One store answers every read 100 ms late (real time: its reads run
    in worker threads), the others from their cache. A sequential read of
    a file of many chunks asks the slow store for (almost) nothing after
    the first few chunks: its data ranges are decoded from the other
    fragments (read ahead in its place), not waited for; it gets a probe
    read now and then, not waited for either. Counted, not timed."""
    volume = rig.volume
    chunks = 48
    async with trio.open_nursery() as nursery:
        ino, data, refs = await _written_file(rig, nursery, chunks)
        slow_index = 0
        on_slow = sum(1 for ref in refs.values() if slow_index in ref.stores[:K])
        assert on_slow >= chunks // 3  # stores take turns holding data
        volume.handles.close_all()
        slow = rig.stores[slow_index]
        slow.set("slow", delay=0.1)
        before = dict(slow.calls)
        try:
            assert await _read_sequentially(rig, ino, len(data)) == data
        finally:
            slow.heal()
        counters = volume.reader.counters
        asked = slow.calls["read"] - before["read"]
        # Slow is not failed, and not damage: nothing is queued for repair.
        assert volume.runners[slow_index].available
        assert _queued(rig) == {}
        # Waited for (until a hedge) once or twice while it was not yet measured.
        assert counters.hedged_reads <= 2, counters
        # Before it is measured, the slow store gets its share of the first
        # chunks' read-ahead (PREFETCH_CHUNKS = 16 chunks ahead: a header
        # read and a prefetch each) and a read or two; then probes only.
        assert asked <= 2 * 16 + 8, (asked, on_slow, counters)
        assert counters.routed_reads >= on_slow - 8, (counters, on_slow)
        await volume.filedata.released(ino)


async def test_healthy_reads_keep_to_the_data_fragments(rig: Rig) -> None:
    """All stores equally fast: a sequential read reads the data fragments
    only (hybrid volumes rely on it: their parity stores are remote), and
    nothing is routed around."""
    volume = rig.volume
    chunks = 24
    async with trio.open_nursery() as nursery:
        ino, data, refs = await _written_file(rig, nursery, chunks)
        volume.handles.close_all()
        for store in rig.stores:
            store.calls["read"] = 0
        assert await _read_sequentially(rig, ino, len(data)) == data
        counters = volume.reader.counters
        assert counters.routed_reads == 0 and counters.degraded_reads == 0, counters
        # no parity fragment was opened (read ahead or read)
        opened_parity = [
            (ref.chunk_id, i)
            for ref in refs.values()
            for i in range(K, K + M)
            if volume.handles.get((ref.stores[i], ref.chunk_id, i)) is not None
        ]
        assert opened_parity == []
        assert sum(store.calls["read"] for store in rig.stores) <= 3 * chunks * K
        await volume.filedata.released(ino)


async def test_random_reads_route_around_a_slow_store(rig: Rig) -> None:
    """Small random reads (no read-ahead) with one store slow: once it is
    measured (a hedge or two), its ranges are decoded from the others
    without waiting for it; it gets only probe reads. The other stores
    serve from their cache. (Placement rotates the stores, so every store
    holds data fragments of some chunks and is measured by reading them;
    a store that only ever holds parity, as the remote stores of a hybrid
    volume, is never switched to: see Router.route_around.)"""
    volume = rig.volume
    refs, datas = await rig.stored_files(12)
    slow_store = 0
    slow = rig.stores[slow_store]
    slow.set("slow", delay=0.1)
    reader = volume.reader
    calls = slow.calls["read"]
    try:
        on_slow = await rig.strided_small_reads(refs, datas, 96, slow_store)
    finally:
        slow.heal()
    counters = reader.counters
    assert on_slow >= 12
    assert volume.runners[slow_store].available
    assert counters.hedged_reads <= 2, counters
    assert counters.routed_reads >= on_slow - 4, (on_slow, counters)
    # the hedged reads, and a probe every PROBE_INTERVAL at most
    assert slow.calls["read"] - calls <= 8, (slow.calls, counters)


async def test_read_ahead_plans_parity_for_a_fragment_it_cannot_open(rig: Rig) -> None:
    """A data fragment missing on a healthy store (a replaced store not yet
    rebuilt, say): read-ahead fails to open it and plans the best parity
    fragment in its place, so the degraded read finds k sources cached and
    needs no worker thread."""
    data = pattern(CHUNK, seed=31)
    ref = await rig.store_file(data)
    volume = rig.volume
    volume.handles.close_all()
    rig.memory[ref.stores[1]].delete_fragment(ref.chunk_id, 1)
    volume.reader.prefetch(ref)
    parity = volume.reader.sources(ref, exclude=set(range(K)))[0]
    wanted = {(ref.stores[i], ref.chunk_id, i) for i in (0, 2, parity)}
    for _ in range(1000):  # read-ahead delivers from its threads: poll
        if all(volume.handles.get(key) for key in wanted):
            break
        await trio.sleep(0.01)
    assert all(volume.handles.get(key) for key in wanted)
    threads = volume.reader.counters.thread_reads
    assert bytes(await volume.reader.read(ref, 0, len(data))) == data  # fragment 1 decoded
    assert volume.reader.counters.one_call_reads == 1
    assert volume.reader.counters.thread_reads == threads


async def test_replacement_parity_is_spread_over_stores_and_the_decode_reads_it(
    rig: Rig,
) -> None:
    """A sequential reader's chunks with a data fragment on an unavailable
    store: read-ahead plans each chunk's parity replacement on the store
    with the shortest read-ahead backlog, not always on the one that looks
    fastest (latency estimates a sequential reader's page-cache reads
    seldom update: at 150 MiB/s per device two of five devices idled a
    third of the time), and each degraded read decodes from the fragments
    read ahead for its chunk, not from sources that merely look faster
    (here both parity fragments, whose headers are known from before)."""
    volume = rig.volume
    reader = volume.reader
    datas = [pattern(CHUNK, seed=40 + i) for i in range(9)]
    # every chunk on stores 0..K+M-1, fragment i on store i: parity on K, K+1
    refs = [rig.put_chunk(d, chunk_id=(1 << 20) + i) for i, d in enumerate(datas)]
    for ref in refs:
        rig.learn_headers(ref)  # as after an earlier read
    volume.runners[0].mark_failed("test: away")  # data fragment 0 decoded
    volume.runners[K].record_latency(0.001, FRAGMENT)  # looks faster than K+1
    volume.runners[K + 1].record_latency(0.002, FRAGMENT)  # and both than data
    # (a first read finds store 0 unavailable)
    assert bytes(await reader.read(refs[-1], 0, CHUNK)) == datas[-1]
    refs, datas = refs[:-1], datas[:-1]
    for ref in refs:  # planned at once, as a reader's read-ahead window
        reader.prefetch(ref)
    asked = {s: reader.readahead.queued(s) for s in (K, K + 1)}
    assert asked == {K: 4, K + 1: 4}, asked  # (the old choice: {K: 8, K + 1: 0})
    for _ in range(1000):  # read-ahead delivers from its threads: poll
        if not any(reader.readahead.queued(s) for s in range(K + M)):
            break
        await trio.sleep(0.01)
    before = {s: rig.stores[s].calls["read"] for s in range(1, K + M)}
    for ref, data in zip(refs, datas, strict=True):
        assert bytes(await reader.read(ref, 0, CHUNK)) == data
    assert reader.counters.one_call_reads == len(refs) + 1
    # each decode read (prefetch + read) the k fragments read ahead for its
    # chunk: both data fragments, and one parity (the old order: both
    # parity fragments and one data fragment, by latency)
    read = {s: rig.stores[s].calls["read"] - before[s] for s in range(1, K + M)}
    assert read == {1: 16, 2: 16, K: 8, K + 1: 8}, read


async def _streamed_degraded_chunk(rig: Rig, seed: int) -> tuple[ChunkReader, bytes, ChunkRef]:
    """A chunk of `pattern(CHUNK, seed)` whose fragment 1's store is
    unavailable (so decoded), read ahead as a sequential reader's and
    delivered (from the read-ahead's threads: polled); (reader, data, ref)."""
    reader = rig.volume.reader
    data = pattern(CHUNK, seed=seed)
    ref = rig.put_chunk(data)
    rig.volume.runners[ref.stores[1]].mark_failed("test: away")
    reader.prefetch(ref)
    for _ in range(1000):
        if not any(reader.readahead.queued(s) for s in range(K + M)):
            break
        await trio.sleep(0.01)
    return reader, data, ref


async def test_a_streamed_degraded_chunk_reads_and_verifies_each_cell_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential reader's chunk with a data fragment on an unavailable
    store, read fragment by fragment: the first request (of fragment 0,
    before the lost one) starts the decode, whose verified sources are
    kept and serve every request; no cell is read and checked once by
    the healthy read and again by the decode."""
    reader, data, ref = await _streamed_degraded_chunk(rig, seed=47)
    verified: dict[int, int] = {}
    bad_cells = fragment.bad_cells

    def counting(header: fragment.FragmentHeader, start: int, buf: fragment.Buffer) -> list[int]:
        verified[header.index] = verified.get(header.index, 0) + len(buf)
        return bad_cells(header, start, buf)

    monkeypatch.setattr(fragment, "bad_cells", counting)
    for start in range(0, CHUNK, FRAGMENT):  # a stream's requests
        got = await reader.read(ref, start, start + FRAGMENT)
        assert bytes(got) == data[start : start + FRAGMENT]
    parity = reader._chosen[ref] - set(range(K))
    assert len(parity) == 1
    # each source of the decode checked once (the old code: fragment 0
    # twice, by its cached read and by the decode)
    assert verified == dict.fromkeys({0, 2, *parity}, FRAGMENT), verified
    assert reader.counters.one_call_reads == 1
    assert reader.counters.nowait_hits == 0  # every request from the kept bytes


async def test_a_streamed_degraded_chunk_never_serves_a_corrupt_source(rig: Rig) -> None:
    """As above, with the data fragment before the decoded one corrupt on
    its store: the decode finds it bad and decodes from others, and the
    request for it is served verified bytes (decoded), never the bad ones."""
    reader, data, ref = await _streamed_degraded_chunk(rig, seed=53)
    rig.stores[ref.stores[0]].set("corrupt")
    try:
        for start in range(0, CHUNK, FRAGMENT):  # a stream's requests
            got = await reader.read(ref, start, start + FRAGMENT)
            assert bytes(got) == data[start : start + FRAGMENT]
    finally:
        rig.heal()


# ---- store health after a hang, and of a slow store (issue 17)


class _TimedCalls:
    """Store calls that take the time the test says, on a clock the test
    owns (the runner measures service time with it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def call(self, seconds: float) -> None:  # in the worker thread
        self.now += seconds


async def test_a_store_quick_again_after_a_slow_stretch_is_ok_at_once(rig: Rig) -> None:
    """After a hang (or the backlog after it) the store's late, slow
    answers raised its fast latency estimate and made it SLOW; the reader
    then routes around it and reads it only by a probe every 0.5 s. A few
    quick data answers in a row restart the estimate (as mark_ok does)
    instead of decaying through ~20 probe samples (tests/test_failures.py's
    hung-store test waited over 12 s for that under load). Quick health
    checks (no bytes) do not count: a slow disk answers those quickly too."""
    timed = _TimedCalls()
    runner = StoreRunner(0, rig.stores[0], clock=timed.clock)
    for _ in range(30):
        await runner.call(timed.call, 0.001, nbytes_read=4096)
    for _ in range(5):
        await runner.call(timed.call, 2.0, nbytes_read=4096)
    assert runner.state is StoreState.SLOW
    for _ in range(5):
        await runner.call(timed.call, 0.001)  # health checks: no data
    assert runner.state is StoreState.SLOW
    for _ in range(QUICK_ANSWERS):
        await runner.call(timed.call, 0.001, nbytes_read=4096)
    assert runner.state is StoreState.OK
    assert runner.expected_latency() < 0.1  # the baseline (it learnt a little of the first 2 s)
    # A store slow for real stays SLOW: its data answers are not quick.
    for _ in range(5):
        await runner.call(timed.call, 2.0, nbytes_read=4096)
    for _ in range(10):
        await runner.call(timed.call, 0.5, nbytes_read=4096)
    assert runner.state is StoreState.SLOW


async def test_a_slow_store_read_by_nobody_is_ok_again_after_a_quick_health_check(
    rig: Rig,
) -> None:
    """The flake of tests/test_failures.py's hung-store test: the hang
    ended with the store SLOW (late answers) but never failed, and nothing
    read it afterwards, so nothing measured it again: it stayed SLOW. A
    health check that answers quickly, once no data call was measured for
    SLOW_STALE seconds and none runs, restarts the estimate; while data
    calls measure it slow, or one runs (a probe read behind a queue on a
    slow disk), a quick health check does not."""
    timed = _TimedCalls()
    runner = StoreRunner(0, rig.stores[0], clock=timed.clock)
    for _ in range(30):
        await runner.call(timed.call, 0.001, nbytes_read=4096)
    for _ in range(5):
        await runner.call(timed.call, 2.0, nbytes_read=4096)
    assert runner.state is StoreState.SLOW
    await runner.health_call(timed.call, 0.001)
    assert runner.state is StoreState.SLOW  # just measured slow: kept
    timed.now += SLOW_STALE
    release = threading.Event()
    reading = await runner.start(release.wait, 10, nbytes_read=4096)  # a slow read running
    await runner.health_call(timed.call, 0.001)
    assert runner.state is StoreState.SLOW  # read around, still being measured: kept
    release.set()
    await reading.result()
    timed.now += SLOW_STALE
    await runner.health_call(timed.call, 0.001)
    assert runner.state is StoreState.OK


async def test_a_call_that_ran_across_a_hang_is_no_latency_sample(rig: Rig) -> None:
    """A read not waited for (the reader's probe read) that started before
    a hang returns when the hang ends, 20 s later: its time is the hang's,
    not the store's; once the store is back (mark_ok) its estimate is what
    it was before, not 0.4 s (the baseline learning 2% of 20 s)."""
    timed = _TimedCalls()
    runner = StoreRunner(0, rig.stores[0], clock=timed.clock)
    for _ in range(30):
        await runner.call(timed.call, 0.001, nbytes_read=4096)
    release = threading.Event()

    def hung() -> None:
        release.wait(10)
        timed.now += 20.0

    pending = await runner.start(hung, nbytes_read=4096)
    runner.mark_failed("test: hung")
    release.set()
    await pending.result()
    runner.mark_ok()
    assert runner.expected_latency() == pytest.approx(0.001)
    assert runner.statistics().latency_p95 == pytest.approx(0.001)


async def test_a_slow_working_store_passes_its_health_check_a_hung_one_fails(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose every thread is busy with slow reads (a disk at 2
    MiB/s) answers its health check late, after the queue ahead of it: it
    is not failed (nor has anything queued for repair), since it answers.
    A hung store answers nothing and is failed after one window. (The
    window is shortened to 0.2 s here, the old fixed probe timeout too.)"""
    monkeypatch.setattr(offload, "PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(assembly, "PROBE_TIMEOUT", 0.2, raising=False)
    volume = rig.volume
    index = 0
    runner = volume.runners[index]
    async with trio.open_nursery() as nursery:
        for _ in range(2 * runner.statistics().max_threads):  # each 0.15 s, 8 at once
            nursery.start_soon(functools.partial(runner.call, time.sleep, 0.15, nbytes_read=1))
        await trio.sleep(0.01)
        assert runner.waiting > 0
        started = trio.current_time()
        await volume.probe_store(index)
        assert trio.current_time() - started > 0.2  # longer than the old fixed timeout
        assert runner.available, runner.failure_reason
    assert _queued(rig) == {}
    rig.stores[index].set("hang")
    try:
        await volume.probe_store(index)
        assert not runner.available
    finally:
        rig.stores[index].heal()
    await volume.probe_store(index)
    assert runner.available


# ---- degraded sequential reads decode each range once (issue 17)


async def test_a_sequential_read_over_a_missing_store_decodes_each_range_once(
    rig: Rig,
) -> None:
    """One store away: a sequential reader asking small pieces (FUSE asks
    128 KiB at a time; 4 KiB here) has each of its chunks' lost data
    fragment decoded once, not once per request, and the next requests for
    the lost fragment and for the neighbouring data fragments read by that
    decode are served from the kept bytes: far fewer source reads. An
    overwrite is a new chunk version, read afresh (nothing stale)."""
    volume = rig.volume
    chunks = 8
    step = 4096
    async with trio.open_nursery() as nursery:
        ino, data, refs = await _written_file(rig, nursery, chunks)
        away = 0
        with_lost = sum(1 for ref in refs.values() if away in ref.stores[:K])
        assert with_lost >= 2
        volume.handles.close_all()
        volume.runners[away].mark_failed("test: away")
        counters = volume.reader.counters

        async def read_all(expected: bytes) -> None:
            out = bytearray()
            for offset in range(0, len(expected), step):
                out += await volume.filedata.read(ino, offset, step)
            assert bytes(out) == expected

        await read_all(data)
        # Without the kept bytes: FRAGMENT // step decodes per chunk with a
        # lost data fragment, each reading k sources again.
        per_fragment = FRAGMENT // step
        assert counters.degraded_reads == with_lost, counters
        assert counters.kept_reads >= with_lost * (per_fragment - 1), counters
        # Source reads: a read per piece not kept, k per decode (without
        # the kept bytes 120 here: 84 pieces + 3 x 12 decodes).
        pieces = chunks * K * per_fragment
        source_reads = counters.nowait_hits + counters.thread_reads + K * counters.degraded_reads
        assert source_reads <= pieces - with_lost * per_fragment + K * with_lost, counters
        # A rewrite is a new chunk version: read afresh, never the kept bytes.
        new = os.urandom(len(data))
        await volume.filedata.write(ino, 0, new)
        await volume.filedata.flush(ino)
        assert all(
            ref.chunk_id not in {old.chunk_id for old in refs.values()}
            for ref in volume.filedata.chunks.get_range(ino, 0, chunks - 1).values()
        )
        await read_all(new)
        await volume.filedata.released(ino)


async def test_requests_in_kept_bytes_are_answered_with_them_not_a_copy(rig: Rig) -> None:
    """One store away: a sequential reader's requests that lie in bytes
    its degraded reads keep are answered with a read-only view of those
    bytes, not a copy of them (`FileData.read`, `ChunkReader.read_kept`);
    the bytes are right, and a write over them (a buffer in one chunk; a
    patch, then the log record it becomes, in another) is seen by the
    next read, not hidden by the view."""
    volume = rig.volume
    step = 4096
    async with trio.open_nursery() as nursery:
        ino, data, _, lost_at = await _file_with_store_0_away(rig, nursery, chunks=8)
        assert len(lost_at) >= 2
        views = 0
        for offset in range(0, len(data), step):
            got = await volume.filedata.read(ino, offset, step)
            assert bytes(got) == data[offset : offset + step]
            if isinstance(got, memoryview):
                assert got.readonly
                views += 1
        # (4 KiB requests: the lost fragment's are served from its decode,
        # the other fragments' from their stores)
        assert views >= len(lost_at) * (FRAGMENT // step - 1), volume.reader.counters
        (buffered, lost_1), (patched, lost_2) = list(lost_at.items())[:2]

        # A write too large for a patch, short of the whole chunk: a
        # buffer, kept until flushed (`FileData.write`).
        at = lost_1 * FRAGMENT + step
        offset = buffered * CHUNK + at
        assert isinstance(await volume.filedata.read(ino, offset, step), memoryview)
        rewritten = os.urandom(max(volume.filedata.log.log_max + 1, at + step))
        assert len(rewritten) < CHUNK
        await volume.filedata.write(ino, buffered * CHUNK, rewritten)
        assert bytes(await volume.filedata.read(ino, offset, step)) == rewritten[at : at + step]

        offset = patched * CHUNK + lost_2 * FRAGMENT + step
        assert isinstance(await volume.filedata.read(ino, offset, step), memoryview)
        await volume.filedata.write(ino, offset + 10, b"patched")
        expected = data[offset : offset + 10] + b"patched" + data[offset + 17 : offset + step]
        assert bytes(await volume.filedata.read(ino, offset, step)) == expected
        await volume.filedata.flush(ino)  # the patch: a log record now
        assert volume.filedata.log.has(ino, patched)
        assert bytes(await volume.filedata.read(ino, offset, step)) == expected
        await volume.filedata.released(ino)


async def _file_with_store_0_away(
    rig: Rig, nursery: trio.Nursery, chunks: int
) -> tuple[int, bytes, dict[int, ChunkRef], dict[int, int]]:
    """`_written_file`, then store 0 failed, no header known, and the
    reader decoding ahead in `nursery`: (inode, data, chunk index -> ref,
    chunk index -> index of its data fragment on store 0, for the chunks
    that have one)."""
    ino, data, refs = await _written_file(rig, nursery, chunks)
    rig.volume.handles.close_all()
    rig.volume.runners[0].mark_failed("test: away")
    rig.volume.reader.attach(nursery)
    lost = {c: ref.stores.index(0) for c, ref in refs.items() if 0 in ref.stores[:K]}
    return ino, data, refs, lost


async def _file_read_ahead_with_store_0_away(
    rig: Rig, nursery: trio.Nursery, chunks: int
) -> tuple[int, bytes, dict[int, ChunkRef], dict[int, int]]:
    """`_file_with_store_0_away`, every chunk then read ahead as a
    sequential reader's would be (the reader's plan holds them)."""
    ino, data, refs, lost = await _file_with_store_0_away(rig, nursery, chunks)
    for idx in range(chunks):
        rig.volume.reader.prefetch(refs[idx])
    assert rig.volume.reader._chosen
    return ino, data, refs, lost


async def _read_cells(rig: Rig, ino: int, data: bytes, offsets: list[int]) -> None:
    """Read one cell at each of `offsets` in turn (a random reader's
    requests), checking the bytes."""
    for offset in offsets:
        got = await rig.volume.filedata.read(ino, offset, CELL)
        assert bytes(got) == data[offset : offset + CELL]


async def test_a_sequential_reader_finds_its_next_chunks_decoded_ahead(rig: Rig) -> None:
    """One store away: while a sequential reader reads a chunk, the lost
    data fragment of each of its next DECODE_AHEAD chunks read ahead is
    decoded in the background, so that their first request finds it kept
    (issue 17: the decode on the first request stalled the stream at
    every degraded chunk, 0.6-0.8 of the healthy read). Every byte read is
    still right, and each lost fragment is decoded once."""
    volume = rig.volume
    reader = volume.reader
    step = 4096
    async with trio.open_nursery() as nursery:
        ino, data, refs, lost = await _file_with_store_0_away(rig, nursery, chunks=8)
        assert len(lost) >= 3
        decoded_ahead = []
        out = bytearray()
        for offset in range(0, len(data), step):
            chunk = offset // CHUNK
            if offset % CHUNK == 0 and chunk in lost and chunk > 0:
                # (waits for the read-ahead threads: real time)
                for _ in range(500):
                    if reader._kept.covers(refs[chunk], lost[chunk], 0, FRAGMENT):
                        break
                    await trio.sleep(0.01)
                if reader._kept.covers(refs[chunk], lost[chunk], 0, FRAGMENT):
                    decoded_ahead.append(chunk)
            out += await volume.filedata.read(ino, offset, step)
        assert bytes(out) == data
        # every chunk with a lost fragment but the first read is decoded
        # ahead of its first request (the old code: none)
        assert decoded_ahead == sorted(c for c in lost if c > 0), (decoded_ahead, lost)
        assert reader.counters.degraded_reads == len(lost), reader.counters
        await volume.filedata.released(ino)


async def test_bytes_served_from_a_decode_count_as_degraded_requests(rig: Rig) -> None:
    """One store away, a sequential read of the whole file: the requests
    for a lost fragment are served from its decode (kept, decoded ahead),
    and each such byte counts as a degraded request, so that the bytes
    read to decode compare with the bytes served decoded: k per byte, as
    a degraded read of the range alone would read. The kept sources'
    bytes are healthy requests, not degraded ones. (Before, a request
    served from kept bytes counted nowhere: bench.py showed 168-680 bytes
    read per degraded byte for a sequential read with a store missing.)"""
    volume = rig.volume
    reader = volume.reader
    step = 4096
    async with trio.open_nursery() as nursery:
        ino, data, _, lost = await _file_with_store_0_away(rig, nursery, chunks=8)
        before = reader.statistics()
        for offset in range(0, len(data), step):
            assert bytes(await volume.filedata.read(ino, offset, step)) == data[offset : offset + step]
        after = reader.statistics()
        asked = after.degraded_requested_bytes - before.degraded_requested_bytes
        read = after.degraded_store_bytes - before.degraded_store_bytes
        assert reader.counters.kept_reads > 0
        assert asked == len(lost) * FRAGMENT, (asked, reader.counters)
        assert read == K * asked, (read, asked, reader.counters)
        await volume.filedata.released(ino)


async def test_random_small_reads_of_chunks_read_ahead_decode_nothing_ahead(rig: Rig) -> None:
    """As above, but after the sequential read, small reads that do not
    start a chunk (a random reader's) of the chunks read ahead decode
    nothing ahead: each would read k whole fragments for 4 KiB (a random
    reader after a sequential one ran at 0.5-0.8 of its rate with a
    device slow or missing)."""
    volume = rig.volume
    reader = volume.reader
    chunks = 8
    async with trio.open_nursery() as nursery:
        ino, data, refs, lost = await _file_read_ahead_with_store_0_away(rig, nursery, chunks)
        before = reader.counters.one_call_reads + reader.counters.degraded_reads
        await _read_cells(rig, ino, data, [idx * CHUNK + CELL for idx in range(chunks)])  # not starts
        await trio.sleep(0.2)  # (a decode ahead would be done by now)
        # only the reads of a lost fragment's own cells decode (4 KiB each)
        assert not any(reader._kept.covers(refs[c], i, 0, FRAGMENT) for c, i in lost.items())
        assert reader.counters.degraded_reads + reader.counters.one_call_reads - before <= 2 * len(lost)
        await volume.filedata.released(ino)


async def test_random_small_reads_from_chunk_starts_decode_nothing_ahead(rig: Rig) -> None:
    """As above, with the small reads from the chunks' starts, in an order
    no sequential reader reads them: a request from a chunk's start starts
    decoding ahead only when it continues the file's previous request
    (`FileData.read`'s `stream`); each would have decoded DECODE_AHEAD
    chunks ahead (bench.py: 4.6-5.0 bytes read per degraded byte of 4
    KiB random reads after a sequential read, against 4). Chunks whose
    lost fragment is their first are left out (a read of its first cell
    decodes that cell itself)."""
    volume = rig.volume
    reader = volume.reader
    chunks = 8
    async with trio.open_nursery() as nursery:
        ino, data, refs, lost = await _file_read_ahead_with_store_0_away(rig, nursery, chunks)
        starts = [idx for idx in range(1, chunks) if lost.get(idx) != 0]
        order = starts[1::2] + starts[0::2]  # (never the chunk after the one before)
        assert len(order) >= 4
        before = reader.statistics()
        await _read_cells(rig, ino, data, [idx * CHUNK for idx in order])
        await trio.sleep(0.2)  # (a decode ahead would be done by now)
        assert not any(reader._kept.covers(refs[c], i, 0, CELL) for c, i in lost.items())
        assert reader.statistics().degraded_store_bytes == before.degraded_store_bytes
        await volume.filedata.released(ino)


async def test_random_small_reads_from_lost_fragment_starts_decode_only_their_cells(
    rig: Rig,
) -> None:
    """As above, reading the first cell of each lost fragment (not a
    chunk's start) out of order: each decodes that cell from k others and
    keeps nothing; a stream's read from a fragment's start decodes and
    keeps KEEP_SPAN for its next requests (`KeptBytes.streaming` is told
    whether the request continues the file's previous one), a random
    reader's did too, k x KEEP_SPAN bytes read for 4 KiB."""
    volume = rig.volume
    reader = volume.reader
    chunks = 16
    async with trio.open_nursery() as nursery:
        ino, data, refs, lost = await _file_read_ahead_with_store_0_away(rig, nursery, chunks)
        starts = [c for c in range(chunks) if lost.get(c, 0) > 0]
        order = starts[1::2] + starts[0::2]
        assert len(order) >= 3
        before = reader.statistics()
        await _read_cells(rig, ino, data, [c * CHUNK + lost[c] * FRAGMENT for c in order])
        await trio.sleep(0.2)  # (a decode ahead would be done by now)
        assert not any(reader._kept.covers(refs[c], i, 0, 2 * CELL) for c, i in lost.items())
        read = reader.statistics().degraded_store_bytes - before.degraded_store_bytes
        assert read == K * CELL * len(order), (read, reader.counters)
        await volume.filedata.released(ino)


async def test_a_decode_ahead_that_fails_counts_no_unrecoverable_read(rig: Rig) -> None:
    """A chunk decoded ahead that turns out unrecoverable (too few good
    fragments) is not counted as an unrecoverable read until a request
    meets it (the counter is what readers got EIO for); then by that
    request's reads."""
    volume = rig.volume
    reader = volume.reader
    async with trio.open_nursery() as nursery:
        ino, _, refs, lost = await _file_with_store_0_away(rig, nursery, chunks=8)
        doomed = min(c for c in lost if c > 0)
        ref = refs[doomed]
        for j in [j for j in range(len(ref.stores)) if ref.stores[j] != 0][:2]:
            rig.stores[ref.stores[j]].set("eio", chunks={ref.chunk_id})
        for idx in range(len(refs)):  # read ahead, as a sequential reader's
            reader.prefetch(refs[idx])
        at = (doomed - 1) * CHUNK
        if at:  # (the request below then continues a stream)
            await volume.filedata.read(ino, at - CELL, CELL)
        degraded = reader.counters.degraded_reads
        await volume.filedata.read(ino, at, CELL)  # starts decoding ahead
        for _ in range(500):  # (read-ahead threads: real time)
            if not reader._kept.under_way(ref, lost[doomed]) and reader.counters.degraded_reads > degraded:
                break
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert reader.counters.degraded_reads > degraded  # it was tried ahead
        assert reader.counters.unrecoverable_reads == 0
        with pytest.raises(Unrecoverable):
            await volume.filedata.read(ino, doomed * CHUNK, CHUNK)
        assert reader.counters.unrecoverable_reads >= 1
        rig.heal()
        await volume.filedata.released(ino)


# ---- writes do not wait for a slow store (issue 17)


@pytest.mark.parametrize("fault", ["slow", "hang"])
async def test_a_chunk_write_does_not_wait_for_a_straggling_store(rig: Rig, fault: str) -> None:
    """One store's fragment writes are slow (or hang): once k+1 fragments
    of a chunk are written and the grace period passed, the write
    completes with the slow store's slot in its ref, the write going on
    in the background; a read meanwhile decodes around it without
    reporting damage. A slow straggler lands later (nothing to repair);
    a hung one times out and its fragment is marked missing: the chunk is
    queued for repair. The data reads back either way."""
    volume = rig.volume
    volume.writer.write_timeout = 1.5  # a hung write's deadline (default 30 s)
    slow = 0
    data = os.urandom(4 * CHUNK)
    ino = rig.new_file()
    async with trio.open_nursery() as nursery:
        volume.filedata.attach(nursery)
        volume.writer.attach(nursery)
        volume.filedata.opened(ino)
        rig.stores[slow].set(fault, delay=1.0, ops={"write"})
        try:
            await volume.filedata.write(ino, 0, data)
            await volume.filedata.flush(ino)
            refs = volume.filedata.chunks.get_range(ino, 0, 3)
            on_slow = {ref.chunk_id: ref.stores.index(slow) for ref in refs.values() if slow in ref.stores}
            assert on_slow, refs  # the slow store kept its slots: not replaced by the spare
            written = [rig.memory[slow].fragment(c, i) for c, i in on_slow.items()]
            assert written == [None] * len(on_slow)  # completed before the slow store answered
            # Read meanwhile: decoded around the fragments still being
            # written, which are not reported as damage.
            assert await _read_sequentially(rig, ino, len(data)) == data
            assert _queued(rig) == {}
            with trio.fail_after(10):
                while any(  # noqa: ASYNC110 (polls the stores)
                    rig.memory[slow].fragment(c, i) is None and not _queued(rig).get(c, 0) >> i & 1
                    for c, i in on_slow.items()
                ):
                    await trio.sleep(0.05)
        finally:
            rig.stores[slow].heal()
        if fault == "slow":
            assert _queued(rig) == {}
            assert all(rig.memory[slow].fragment(c, i) for c, i in on_slow.items())
        else:
            assert all(_queued(rig)[c] >> i & 1 for c, i in on_slow.items())
            # What the timed-out writes may leave is remembered for the
            # collector (deleted unless repair writes that fragment again).
            remembered = set(PendingDeletions(volume.db).on_stores([slow], 1000))
            assert {(slow, c, i) for c, i in on_slow.items()} <= remembered, remembered
        volume.handles.close_all()
        assert await _read_sequentially(rig, ino, len(data)) == data
        await volume.filedata.released(ino)


def _held(rig: Rig, chunk_id: int) -> int:
    """How many fragment files of `chunk_id` the stores hold."""
    return sum(1 for m in rig.memory for c, _ in m.list_fragments() if c == chunk_id)


async def _version_with_a_straggler(
    rig: Rig, nursery: trio.Nursery, fault: str
) -> tuple[int, ChunkRef]:
    """A new one-chunk file written with store 0's writes slow (0.2 s)
    and store 1's `fault` ("slow": 1.5 s, or "hang"), the writer's
    stragglers in `nursery`: whichever of the two its fragments go to,
    one straggles (the other is waited for). Its inode and chunk; the
    caller heals stores 0 and 1."""
    volume = rig.volume
    ino = rig.new_file()
    volume.filedata.attach(nursery)
    volume.writer.attach(nursery)
    volume.filedata.opened(ino)
    rig.stores[0].set("slow", delay=0.2, ops={"write"})
    rig.stores[1].set(fault, delay=1.5, ops={"write"})
    await volume.filedata.write(ino, 0, pattern(CHUNK, seed=31))
    await volume.filedata.flush(ino)
    ref = volume.filedata.chunks.get(ino, 0)
    assert ref is not None
    assert any(c == ref.chunk_id for _, c, _ in volume.writer.straggling)
    return ino, ref


async def test_a_version_freed_under_its_stragglers_is_deleted_after_they_land(rig: Rig) -> None:
    """A chunk version replaced while a straggler of it is still being
    written is not deleted until the straggler lands (the writer pins the
    chunk meanwhile), so the straggler's file is deleted too. Before, the
    collector deleted the fragments there were, the straggler's file landed
    after and stayed behind (tests/test_mount_posix.py's unlinked-file test
    found two under load)."""
    volume = rig.volume
    async with trio.open_nursery() as nursery:
        try:
            ino, old = await _version_with_a_straggler(rig, nursery, "slow")
            await volume.filedata.write(ino, 0, pattern(CHUNK, seed=37))  # a new version
            await volume.filedata.flush(ino)
            assert volume.filedata.chunks.get(ino, 0) != old
            await volume.garbage.collect()  # its straggler still runs: nothing deleted
            if any(c == old.chunk_id for _, c, _ in volume.writer.straggling):  # (not too late)
                assert _held(rig, old.chunk_id) == len(old.stores) - 1
            with trio.fail_after(10):
                await volume.writer.stragglers_done()
        finally:
            for store in (0, 1):
                rig.stores[store].heal()
        assert _held(rig, old.chunk_id) == len(old.stores)  # landed
        await volume.garbage.collect()
        assert _held(rig, old.chunk_id) == 0
        await volume.filedata.released(ino)
        nursery.cancel_scope.cancel()


async def test_a_hung_straggler_given_up_unpins_its_freed_version(rig: Rig) -> None:
    """The unmount's way with a straggler on a hung store: given up
    (`give_up_stragglers`), it ends at once, its file is remembered for
    the collector and its chunk unpinned, so the freed version's other
    fragments are deleted now, not left behind."""
    volume = rig.volume
    volume.writer.write_timeout = 60.0  # (it would not end by itself)
    async with trio.open_nursery() as nursery:
        try:
            ino, old = await _version_with_a_straggler(rig, nursery, "hang")
            [hung] = [(s, c, i) for s, c, i in volume.writer.straggling if c == old.chunk_id]
            await volume.filedata.write(ino, 0, pattern(CHUNK, seed=43))  # a new version
            await volume.filedata.flush(ino)
            await volume.garbage.collect()
            assert _held(rig, old.chunk_id) == len(old.stores) - 1  # pinned: kept
            volume.writer.give_up_stragglers()
            with trio.fail_after(5):
                await volume.writer.stragglers_done()
            assert hung in set(PendingDeletions(volume.db).on_stores([hung[0]], 1000))
            await volume.garbage.collect()
            assert _held(rig, old.chunk_id) == 0
        finally:
            for store in (0, 1):
                rig.stores[store].heal()
        await volume.filedata.released(ino)
        nursery.cancel_scope.cancel()


async def test_only_timed_reads_make_a_store_an_alternative_for_reads(rig: Rig) -> None:
    """The reader routes around a lagging store only towards stores whose
    reads were timed: health checks and writes (all a hybrid volume's
    remote parity stores get while it is healthy) do not count, or a busy
    local store would be read around towards a remote one (seen once in
    tests/test_hybrid_mount.py under load, with the remote servers paused)."""
    timed = _TimedCalls()
    runner = StoreRunner(0, rig.stores[0], clock=timed.clock)
    await runner.health_call(timed.call, 0.001)
    await runner.call(timed.call, 0.001, nbytes_written=4096)
    assert not runner.measured
    await runner.call(timed.call, 0.001, nbytes_read=4096)
    assert runner.measured
