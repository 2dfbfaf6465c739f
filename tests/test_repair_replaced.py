"""The rebuild of a replaced store next to foreground reads (issue 17):
readers do not ask the new, empty store for fragments not rebuilt yet
(they would wait in its queue behind the rebuild's writes to learn that
they are missing), the rate shown is the volume's, not one chunk's, and
the queue entries of chunks rebuilt in place are removed in batches that
never drop a fragment reported bad meanwhile (ecfs.data.repair,
"Crash contract").

In-process on fake stores (tests/inprocess.py); rates with wide bounds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from ecfs.core.codec import Buffer, Codec
from ecfs.data.repair import BATCH, HORIZON, LOOK_INTERVAL, URGENT_PARALLEL, Repairer
from ecfs.frontend.metrics import render_prometheus
from ecfs.storage.metadb.chunks import RepairEntry, RepairQueue
from ecfs.storage.metadb.database import Database
from ecfs.volume.assembly import Volume
from ecfs.volume.status import to_json
from tests.inprocess import CHUNK, FRAGMENT, K, Rig, make_rig
from tests.volume_files import pattern

#: (chunk id, index) -> the fragment file `_replaced_rig` wiped last.
WIPED: dict[tuple[int, int], bytes | None] = {}


async def _replaced_rig(tmp_path: Path, count: int, **kwargs: object) -> tuple[Rig, int, int]:
    """A volume with a file of `count` chunks whose store holding the
    first chunk's fragment 0 is wiped and queued for rebuild as a store
    replace does ("store-replaced"); (rig, inode, that store)."""
    rig = make_rig(tmp_path, cached=False, **kwargs)  # type: ignore[arg-type]
    volume = rig.volume
    await volume.refresh_usage()
    ino = rig.new_file(b"big")
    await volume.filedata.write(ino, 0, bytes(pattern(5, count * CHUNK)))
    await volume.filedata.flush(ino)
    first = volume.filedata.chunks.get(ino, 0)
    assert first is not None
    replaced = first.stores[0]
    memory = rig.memory[replaced]
    for chunk_id, index in memory.list_fragments():
        WIPED[(chunk_id, index)] = memory.fragment(chunk_id, index)
        memory.delete_fragment(chunk_id, index)
    volume.repairer.queue_store_rebuild(replaced, "store-replaced")
    volume.handles.close_all()
    return rig, ino, replaced


async def _read_all(rig: Rig, ino: int, count: int) -> None:
    data = bytes(pattern(5, count * CHUNK))
    for index in range(count):
        got = await rig.volume.filedata.read(ino, index * CHUNK, CHUNK)
        assert bytes(got) == data[index * CHUNK : (index + 1) * CHUNK]


@asynccontextmanager
async def _repairing(volume: Volume) -> AsyncIterator[Repairer]:
    """The volume's repairer running at full speed (the foreground idle,
    urgent) for the block."""
    repairer = volume.repairer
    repairer.last_foreground = lambda: 0.0
    repairer.set_urgent(True)
    async with trio.open_nursery() as nursery:
        await nursery.start(repairer.run)
        yield repairer
        nursery.cancel_scope.cancel()


async def _until_idle(volume: Volume) -> None:
    """Wait until the repairer has nothing queued or under way."""
    with trio.fail_after(30):
        while volume.repairer.busy or RepairQueue(volume.db).count():  # noqa: ASYNC110
            await trio.sleep(0.02)


@pytest.mark.trio
async def test_reads_do_not_ask_a_replaced_store_for_fragments_not_rebuilt_yet(
    tmp_path: Path,
) -> None:
    count = 12
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    store = rig.stores[replaced]
    # The new store's queue is full of the rebuild's writes: every call of
    # it waits (old code: each read of a fragment not there yet waited
    # here, then was decoded anyway, and reported as damage).
    store.set("slow", delay=0.3)
    reads_before = store.calls["read"]
    with trio.fail_after(30):
        await _read_all(rig, ino, count)
    assert store.calls["read"] == reads_before  # never asked
    assert volume.reader.counters.degraded_reads > 0
    queue = RepairQueue(volume.db)
    assert all(e.reason == "store-replaced" and e.demand == 0 for e in queue.next_batch(100))
    # Once rebuilt, its fragments are read from it again.
    store.heal()
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    assert not repairer.not_rebuilt[replaced]
    volume.handles.close_all()
    reads_before = store.calls["read"]
    degraded_before = volume.reader.counters.degraded_reads
    await _read_all(rig, ino, count)
    assert store.calls["read"] > reads_before
    assert volume.reader.counters.degraded_reads == degraded_before
    volume.close()


@pytest.mark.trio
async def test_the_shown_rate_is_the_volumes_with_chunks_repaired_at_once(
    tmp_path: Path,
) -> None:
    count = 400
    rig, _, replaced = await _replaced_rig(tmp_path, count)
    # Each rebuilt fragment's write takes 100 ms: the repair's 8 chunks at
    # once rebuild about 8 x what one chunk does on its own.
    rig.stores[replaced].set("slow", delay=0.1, ops={"write"})
    async with _repairing(rig.volume) as repairer:
        await trio.sleep(1.0)
        started, written = time.monotonic(), repairer.counters.bytes_written
        await trio.sleep(2.0)
        real = (repairer.counters.bytes_written - written) / (time.monotonic() - started)
        stats = repairer.statistics()
    assert repairer.counters.fragments_rebuilt < count  # still under way
    assert real > 0
    # Old code: each chunk's own bytes per second (an EWMA), about an
    # eighth of the real rate here, and 8x the time left.
    assert 0.5 * real <= stats.rate_bytes_per_s <= 2 * real, (stats.rate_bytes_per_s, real)
    assert stats.eta_seconds is not None
    assert stats.eta_seconds <= 2 * stats.bytes_left / real
    rig.volume.close()


@pytest.mark.trio
async def test_a_fragment_reported_bad_during_a_rebuild_keeps_its_chunk_queued(
    tmp_path: Path,
) -> None:
    rig, ino, replaced = await _replaced_rig(tmp_path, 1)
    volume = rig.volume
    ref = volume.filedata.chunks.get(ino, 0)
    assert ref is not None
    other = next(i for i, s in enumerate(ref.stores) if s != replaced)
    store = rig.stores[replaced]
    store.set("slow", delay=0.5, ops={"write"})
    writes = store.calls["write"]
    async with _repairing(volume) as repairer:
        with trio.fail_after(10):
            while store.calls["write"] == writes:  # noqa: ASYNC110
                await trio.sleep(0.01)
        # While the rebuilt fragment is written, another fragment of the
        # chunk is lost and a reader reports it.
        rig.memory[ref.stores[other]].delete_fragment(ref.chunk_id, other)
        volume.damage.record(ref, [other], "fragment missing")
        await _until_idle(volume)
    # Old code removed the queue entry with the rebuild, and the report
    # with it: the lost fragment stayed lost, and nothing was queued.
    assert rig.memory[replaced].fragment(ref.chunk_id, 0) is not None
    assert rig.memory[ref.stores[other]].fragment(ref.chunk_id, other) is not None
    assert ref.chunk_id not in repairer.not_rebuilt[replaced]
    volume.close()


@pytest.mark.trio
async def test_a_remount_during_a_rebuild_still_reads_around_the_new_store(
    tmp_path: Path,
) -> None:
    count = 6
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    left = set(rig.volume.repairer.not_rebuilt[replaced])
    assert left
    rig.volume.close()
    workdir = tmp_path / "work-again"
    workdir.mkdir()
    volume = Volume(
        Database(tmp_path / "metadata.sqlite"), dict(enumerate(rig.stores)), workdir
    )
    rig = Rig(volume, rig.stores, rig.memory)
    assert volume.repairer.not_rebuilt[replaced] == left
    store = rig.stores[replaced]
    store.set("slow", delay=0.3)
    reads_before = store.calls["read"]
    await _read_all(rig, ino, count)
    assert store.calls["read"] == reads_before
    volume.close()


@pytest.mark.trio
async def test_the_rebuild_takes_what_a_sequential_reader_decoded(tmp_path: Path) -> None:
    count = 8
    WIPED.clear()
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    refs = [volume.filedata.chunks.get(ino, i) for i in range(count)]
    data_on_new = [
        r for r in refs if r is not None and replaced in r.stores[:K]
    ]
    assert data_on_new
    # A sequential reader (read ahead, as filedata plans it) reads the
    # file once: it decodes the fragments on the new store whole.
    data = bytes(pattern(5, count * CHUNK))
    for index, ref in enumerate(refs):
        assert ref is not None
        volume.reader.prefetch(ref)
        got = await volume.filedata.read(ino, index * CHUNK, CHUNK)
        assert bytes(got) == data[index * CHUNK : (index + 1) * CHUNK]
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    # Those chunks were rebuilt from the reader's bytes (old code: k
    # fragments read again for each), and rebuilt right; shown as such.
    assert repairer.counters.fragments_shared == len(data_on_new)
    status = volume.status()
    assert status.repair.fragments_shared == len(data_on_new)
    assert to_json(status)["repair"]["fragments_shared"] == len(data_on_new)
    shown = f"ecfs_repair_fragments_shared_total {float(len(data_on_new))}"
    assert shown in render_prometheus(status)
    on_new = [r for r in refs if r is not None and replaced in r.stores]
    # (the others: k sources each, more if widened: at most all n - 1)
    read_for_others = (len(rig.stores) - 2) * (len(on_new) - len(data_on_new))
    assert repairer.counters.bytes_read <= FRAGMENT * read_for_others
    for key, original in WIPED.items():
        assert rig.memory[replaced].fragment(*key) == original
    volume.close()


@pytest.mark.trio
async def test_a_rebuild_ahead_of_a_sequential_reader_decodes_once_for_both(
    tmp_path: Path,
) -> None:
    """The rebuild meets chunks that a sequential reader has read ahead
    but not decoded yet (the two run side by side: at 150 MiB/s per device
    the rebuild's front and the reader moved in step in 4 of 14 runs, each
    reading every chunk, and readers' decodes supplied 2-16 of ~235
    rebuilt fragments): the lost data fragment is decoded once, kept for
    the reader, and taken by the rebuild; the reader then reads it from
    its kept bytes, decoding nothing again."""
    count = 8
    WIPED.clear()
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    reader = volume.reader
    refs = [volume.filedata.chunks.get(ino, i) for i in range(count)]
    data_on_new = [r for r in refs if r is not None and replaced in r.stores[:K]]
    assert data_on_new
    for ref in refs:  # read ahead, as a sequential reader's, nothing read yet
        assert ref is not None
        reader.prefetch(ref)
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    assert repairer.counters.fragments_shared == len(data_on_new)
    on_new = [r for r in refs if r is not None and replaced in r.stores]
    read_for_others = (len(rig.stores) - 2) * (len(on_new) - len(data_on_new))
    assert repairer.counters.bytes_read <= FRAGMENT * read_for_others
    # The reader's decodes were those, one per chunk: its reads find them kept.
    decoded = reader.counters.degraded_reads
    assert decoded == len(data_on_new), reader.counters
    await _read_all(rig, ino, count)
    assert reader.counters.degraded_reads == decoded, reader.counters
    for key, original in WIPED.items():
        assert rig.memory[replaced].fragment(*key) == original
    volume.close()


@pytest.mark.trio
async def test_no_decode_for_a_repair_that_could_not_take_the_fragment_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`decode_for_repair` decodes a planned chunk's lost fragment only
    when one decode keeps it whole (KEEP_SPAN): a part would be decoded
    for nothing, the repair reading k fragments anyway."""
    rig, ino, replaced = await _replaced_rig(tmp_path, 4)
    reader = rig.volume.reader
    refs = [rig.volume.filedata.chunks.get(ino, i) for i in range(4)]
    ref = next(r for r in refs if r is not None and replaced in r.stores[:K])
    lost = ref.stores.index(replaced)
    for r in refs:
        assert r is not None
        reader.prefetch(r)
    monkeypatch.setattr("ecfs.data.reader.KEEP_SPAN", FRAGMENT // 2)
    await reader.decode_for_repair(ref, {lost})
    assert reader.counters.degraded_reads == 0
    assert reader.kept_payload(ref, lost) is None
    monkeypatch.undo()
    await reader.decode_for_repair(ref, {lost})
    assert reader.counters.degraded_reads == 1
    assert reader.kept_payload(ref, lost) is not None
    rig.volume.close()


@pytest.mark.trio
async def test_chunks_a_reader_reads_around_are_rebuilt_first(tmp_path: Path) -> None:
    """(The old code got this order from the damage its reads reported,
    after a wait in the new store's queue; the new one reports none.)"""
    count = 40
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    refs = [volume.filedata.chunks.get(ino, i) for i in range(count)]
    index = max(i for i, r in enumerate(refs) if r is not None and replaced in r.stores[:K])
    last = refs[index]
    assert last is not None
    await volume.filedata.read(ino, index * CHUNK, CHUNK)  # decoded around it
    queued = len(volume.repairer.not_rebuilt[replaced])
    rig.stores[replaced].set("slow", delay=0.05, ops={"write"})
    async with _repairing(volume) as repairer:
        with trio.fail_after(30):
            while last.chunk_id in repairer.not_rebuilt[replaced]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        left = len(repairer.not_rebuilt[replaced])
    # Among the first chunks rebuilt, not after the others.
    assert left >= queued - 2 * URGENT_PARALLEL, (left, queued)
    volume.close()



class _SourceCountingCodec(Codec):
    """A Codec that counts the parity fragments rebuilt, and those of them
    rebuilt from sources other than the k data fragments (a decode of the
    data first, then the encode: twice the CPU)."""

    def __init__(self, k: int, m: int) -> None:
        super().__init__(k, m)
        self.parity_rebuilt = 0
        self.parity_from_parity = 0

    def decode(self, pieces: Mapping[int, Buffer], wanted: Iterable[int]) -> dict[int, bytes]:
        wanted = list(wanted)
        if wanted and all(i >= self.k for i in wanted) and not set(wanted) <= pieces.keys():
            self.parity_rebuilt += 1
            self.parity_from_parity += any(i >= self.k for i in pieces)
        return super().decode(pieces, wanted)


@pytest.mark.trio
async def test_a_parity_fragment_is_rebuilt_from_the_data_fragments(tmp_path: Path) -> None:
    """Even when a data fragment's store answers slower than the other
    parity's: a parity rebuilt from k - 1 data fragments and the other
    parity costs a decode and an encode, from the k data fragments only
    the encode (ecfs.data.repair, `_cheapest_first`)."""
    count = 16
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    codec = _SourceCountingCodec(K, volume.layout.m)
    volume.repairer.codec = codec
    refs = [volume.filedata.chunks.get(ino, i) for i in range(count)]
    # Every store but the replaced one is slow to answer, by store number:
    # the fastest ones hold parity fragments of some chunks, slower ones
    # their data fragments (old code read the fastest k).
    for index, store in enumerate(rig.stores):
        if index != replaced:
            store.set("slow", delay=0.002 * index, ops={"read"})
    await _read_all(rig, ino, count)  # the stores' latencies measured
    rig.heal()
    parity_on_new = [r for r in refs if r is not None and replaced in r.stores[K:]]
    assert parity_on_new
    async with _repairing(volume):
        await _until_idle(volume)
    assert codec.parity_rebuilt == len(parity_on_new)
    assert codec.parity_from_parity == 0
    volume.handles.close_all()
    await _read_all(rig, ino, count)  # rebuilt right
    volume.close()


@pytest.mark.trio
async def test_a_rebuilt_fragment_costs_one_store_call(tmp_path: Path) -> None:
    """Thread round trips are most of what a rebuilt fragment costs beyond
    the reads, the decode and the write (issue 17: the rebuild at 150 MiB/s
    was CPU-bound): the k sources of a chunk are read in one worker-thread
    call outside the stores' runners, the rebuilt fragment is written and
    read back in one call of its store's runner. (Old code: one runner call
    per source, and two for the write and the read-back.)"""
    count = 12
    rig, _, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    queued = len(volume.repairer.not_rebuilt[replaced])
    calls = {i: r.statistics().calls for i, r in volume.runners.items()}
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    made = {i: r.statistics().calls - calls[i] for i, r in volume.runners.items()}
    rebuilt = repairer.counters.fragments_rebuilt
    assert rebuilt == queued > 0
    # (Besides: the free-space refresh urgent repair starts with, one call
    # per store, and the identity probe before the first write to the new
    # store, Volume.verify_before_write.)
    assert rebuilt <= made.pop(replaced) <= rebuilt + 2
    assert all(n <= 1 for n in made.values()), made
    assert repairer.counters.one_call_reads == rebuilt
    assert repairer.counters.bytes_read == rebuilt * K * FRAGMENT
    volume.close()


@pytest.mark.trio
async def test_a_one_call_read_that_falls_back_is_counted_and_shown(tmp_path: Path) -> None:
    """A chunk whose one-call source read takes too long (a source store
    slow for it) is read one by one, hedged, instead, and counted in
    `one_call_fallbacks`: in the repairer's statistics, `ecfs status
    --json` and the metrics (`ecfs_repair_one_call_fallbacks_total`)."""
    count = 4
    rig, ino, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    first = volume.filedata.chunks.get(ino, 0)
    assert first is not None and first.stores[0] == replaced
    queued = len(volume.repairer.not_rebuilt[replaced])
    # Its fragment 1 (a data fragment: among the k read first) answers
    # after 1 s, far past twice the hedge deadline (2 x HEDGE_FLOOR here).
    rig.stores[first.stores[1]].set("slow", delay=1.0, ops={"read"}, chunks={first.chunk_id})
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    fallbacks = repairer.counters.one_call_fallbacks
    assert fallbacks >= 1 and repairer.counters.fragments_rebuilt == queued
    status = volume.status()
    assert status.repair.one_call_fallbacks == fallbacks
    assert to_json(status)["repair"]["one_call_fallbacks"] == fallbacks
    assert f"ecfs_repair_one_call_fallbacks_total {float(fallbacks)}" in render_prometheus(status)
    rig.heal()
    volume.handles.close_all()
    await _read_all(rig, ino, count)  # rebuilt right
    volume.close()


class _LookCountingQueue(RepairQueue):
    """A RepairQueue that counts the looks at the whole queue (`next_batch`:
    a scan of every entry, ~55 ms for a million of them)."""

    looks = 0

    def next_batch(self, limit: int = 64) -> list[RepairEntry]:
        self.looks += 1
        return super().next_batch(limit)


@pytest.mark.trio
async def test_a_long_rebuild_looks_at_the_whole_queue_rarely(tmp_path: Path) -> None:
    """Entries are taken from one look at the queue, re-read by their keys,
    not from a scan of it per batch of BATCH (old code: a million entries
    cost 1.7 ms of the loop's CPU per chunk repaired)."""
    count = 400
    rig, _, replaced = await _replaced_rig(tmp_path, count)
    volume = rig.volume
    queue = _LookCountingQueue(volume.db)
    volume.repairer.queue = queue
    queued = len(volume.repairer.not_rebuilt[replaced])
    assert queued > 10 * BATCH
    started = time.monotonic()
    async with _repairing(volume) as repairer:
        await _until_idle(volume)
    assert repairer.counters.fragments_rebuilt == queued
    # One look per HORIZON entries, per LOOK_INTERVAL, and at the ends.
    seconds = time.monotonic() - started
    assert queue.looks <= queued / HORIZON + seconds / LOOK_INTERVAL + 4, (queue.looks, seconds)
    volume.close()
