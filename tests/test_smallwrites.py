"""The small-write log (ecfs.data.smallwrites) in-process: a real volume on
temp-dir stores, driven through FileData and Namespace without FUSE.

Checked: small fsync'd overwrites become log records instead of new chunk
versions; reads (healthy and degraded) lay the records over the chunk;
folding re-encodes a chunk once for many records and drops them in the
same transaction; truncate, unlink, hard links, rename over and inline
files growing into chunks stay correct; a crash (the daemon gone without
unmount) keeps every fsync'd byte; a corrupt record is never applied; and
a hypothesis model of a file agrees with the volume after any sequence of
writes, fsyncs, truncates, folds and crashes.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core.errors import EcfsError
from ecfs.data.logfiles import HEADER_SIZE, LogFiles, Record
from ecfs.data.smallwrites import Extents
from ecfs.storage.metadb.schema import ROOT_INODE
from ecfs.storage.metadb.writelog import WriteLogTable
from ecfs.storage.store import DirectoryStore
from ecfs.volume.assembly import Volume
from ecfs.volume.mkfs import VolumeSpec, create_volume
from tests.volume_files import own_domains

K, M, F = 2, 1, 64 * 1024
CHUNK = K * F  # 128 KiB: log_max 8 KiB, fold budget 32 KiB
INLINE = 4096


def make_volume(root: Path) -> list[Path]:
    stores = [root / f"s{i}" for i in range(K + M + 1)]
    create_volume(
        stores, VolumeSpec(k=K, m=M, fragment_size=F, inline_max=INLINE), domains=own_domains(stores)
    )
    (root / "run").mkdir(exist_ok=True)
    return stores


@asynccontextmanager
async def mounted(
    root: Path, stores: list[Path], *, crash: bool = False
) -> AsyncIterator[Volume]:
    """The volume opened and started as a mount does; at the end an orderly
    shutdown, or with `crash`... see `Crash`."""
    volume = Volume.open([str(s) for s in stores], runtime_dir=root / "run")
    try:
        async with trio.open_nursery() as nursery:
            await volume.start(nursery)
            try:
                yield volume
            except Crash:
                nursery.cancel_scope.cancel()  # no write-back, no drain: a kill
            else:
                await volume.shutdown()
                nursery.cancel_scope.cancel()
        await volume.aclose_replicas()
    finally:
        volume.close()


class Crash(Exception):
    """Raised inside `mounted` to leave as a killed daemon would."""


def run(root: Path, stores: list[Path], body: Callable[[Volume], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            async with mounted(root, stores) as volume:
                await body(volume)
        except Crash:
            pass

    trio.run(main)


def new_file(volume: Volume, name: bytes) -> int:
    node = volume.namespace.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
    volume.filedata.opened(node.id)
    return node.id


def lookup(volume: Volume, name: bytes) -> int:
    return volume.namespace.lookup(ROOT_INODE, name).id


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + i * 7) % 251 for i in range(n))


@pytest.fixture
def stores(tmp_path: Path) -> list[Path]:
    return make_volume(tmp_path)


def table_rows(volume: Volume) -> int:
    """Live records (the schema-2 table, where the log once lived, stays empty)."""
    assert not WriteLogTable(volume.db).heads()
    return volume.writelog.records


def test_small_fsynced_overwrites_are_logged_not_reencoded(
    tmp_path: Path, stores: list[Path]
) -> None:
    base = pattern(1, 3 * CHUNK)

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        refs = {i: volume.filedata.chunks.get(ino, i) for i in range(3)}
        written = volume.writelog.statistics().records_written
        await data.write(ino, CHUNK + 100, b"x" * 4096)
        await data.fsync(ino)
        await data.write(ino, 2 * CHUNK + 5000, b"y" * 300)
        await data.fsync(ino)
        # No new chunk version: the writes are records.
        assert {i: data.chunks.get(ino, i) for i in range(3)} == refs
        assert volume.writelog.statistics().records_written == written + 2
        assert table_rows(volume) == 2
        expected = bytearray(base)
        expected[CHUNK + 100 : CHUNK + 4196] = b"x" * 4096
        expected[2 * CHUNK + 5000 : 2 * CHUNK + 5300] = b"y" * 300
        assert await data.read(ino, 0, 3 * CHUNK) == expected
        assert await data.read(ino, CHUNK + 50, 200) == expected[CHUNK + 50 : CHUNK + 250]

    run(tmp_path, stores, body)


def test_fold_drops_records_in_the_switching_transaction(
    tmp_path: Path, stores: list[Path]
) -> None:
    base = pattern(2, CHUNK)

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        old = data.chunks.get(ino, 0)
        expected = bytearray(base)
        for i in range(5):
            chunk = bytes([i + 1]) * 1000
            await data.write(ino, 7000 * i, chunk)
            expected[7000 * i : 7000 * i + 1000] = chunk
            await data.fsync(ino)
        assert table_rows(volume) == 5
        await data.fold_chunk(ino, 0)
        new = data.chunks.get(ino, 0)
        assert new is not None and old is not None and new.chunk_id != old.chunk_id
        assert table_rows(volume) == 0 and not volume.writelog.has(ino, 0)
        assert await data.read(ino, 0, CHUNK) == expected
        assert volume.writelog.statistics().folds == 0  # fold_chunk directly, not the policy

    run(tmp_path, stores, body)


def test_many_small_writes_fold_only_a_handful_of_times(
    tmp_path: Path, stores: list[Path]
) -> None:
    """1,000 fsync'd 4 KiB-class writes to one chunk: the budget (a quarter
    chunk here) folds it a few dozen times at most, never once per write."""
    base = pattern(3, CHUNK)

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        first = data.chunks.get(ino, 0)
        versions = set()
        expected = bytearray(base)
        for i in range(1000):
            offset = (i * 4099) % (CHUNK - 512)
            piece = pattern(i, 512)
            await data.write(ino, offset, piece)
            expected[offset : offset + 512] = piece
            await data.fsync(ino)
            ref = data.chunks.get(ino, 0)
            assert ref is not None
            versions.add(ref.chunk_id)
            if i % 10 == 0:
                await trio.lowlevel.checkpoint()  # let the fold task run
        await trio.sleep(0.5)
        stats = volume.writelog.statistics()
        assert await data.read(ino, 0, CHUNK) == expected
        assert first is not None
        # 1000 x 512 bytes = 500 KiB, budget 32 KiB: ~16 folds, not 1000.
        assert len(versions) <= 40
        assert stats.records_written >= 900

    run(tmp_path, stores, body)


def test_fsynced_records_survive_a_crash(tmp_path: Path, stores: list[Path]) -> None:
    base = pattern(4, 2 * CHUNK)
    expected = bytearray(base)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        for i in range(20):
            piece = pattern(100 + i, 777)
            offset = (i * 12345) % (2 * CHUNK - 777)
            await data.write(ino, offset, piece)
            expected[offset : offset + 777] = piece
            await data.fsync(ino)
        assert volume.writelog.records > 0
        raise Crash

    run(tmp_path, stores, write)

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert volume.writelog.records > 0  # loaded at mount
        assert await volume.filedata.read(ino, 0, 2 * CHUNK) == expected

    run(tmp_path, stores, check)

    async def after_unmount(volume: Volume) -> None:
        assert volume.writelog.records == 0  # folded at the previous unmount
        ino = lookup(volume, b"f")
        assert await volume.filedata.read(ino, 0, 2 * CHUNK) == expected

    run(tmp_path, stores, after_unmount)


def test_degraded_read_with_records(tmp_path: Path, stores: list[Path]) -> None:
    base = pattern(5, CHUNK)
    expected = bytearray(base)
    expected[1000:3000] = b"z" * 2000

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 1000, b"z" * 2000)
        await volume.filedata.fsync(ino)
        raise Crash

    run(tmp_path, stores, write)
    # Lose one store (any m): the data fragment 0 of the chunk may be on it.
    for store in stores:
        frags = list((store / "frags").rglob("*.0")) if (store / "frags").exists() else []
        if frags:
            shutil.rmtree(store)
            break
    remaining = [s for s in stores if s.exists()]

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert await volume.filedata.read(ino, 0, CHUNK) == expected
        assert await volume.filedata.read(ino, 500, 1000) == expected[500:1500]
        raise Crash

    run(tmp_path, remaining, check)


def log_copies(stores: list[Path]) -> list[tuple[Path, int, int, Record]]:
    """Every record copy that verifies on the stores: (segment file, offset
    in it, store number, record)."""
    present = {i: DirectoryStore(s) for i, s in enumerate(stores) if s.exists()}
    key = uuid.UUID(next(iter(present.values())).read_marker().volume_id).bytes
    found = LogFiles.scan(present, key)
    return [
        (stores[i] / "wlog" / f"{seg:016x}", pos, i, record)
        for i, seg, pos, record in found.copies
    ]


def damage(path: Path, offset: int) -> None:
    """Flip one byte of a segment file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_record_is_never_applied(tmp_path: Path, stores: list[Path]) -> None:
    """Every copy of a record damaged: it fails its checksum and is never
    applied (the chunk's own bytes read); one damaged copy of another
    record: the other copy is used, and a new one is made."""
    base = pattern(6, CHUNK)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 100, b"q" * 100)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 9000, b"w" * 100)
        await volume.filedata.fsync(ino)
        raise Crash

    run(tmp_path, stores, write)
    copies = log_copies(stores)
    first = min(r.seq for *_, r in copies)
    ruined = [c for c in copies if c[3].seq == first]
    assert len(ruined) == M + 1
    for path, pos, _, _ in ruined:
        damage(path, pos + HEADER_SIZE + 50)
    path, pos, _, _ = next(c for c in copies if c[3].seq != first)
    damage(path, pos + HEADER_SIZE + 1)

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert volume.writelog.records == 1
        assert await volume.filedata.read(ino, 0, 4096) == base[:4096]
        assert await volume.filedata.read(ino, 9000, 100) == b"w" * 100
        assert volume.writelog.statistics().copies_missing == 1
        await volume.writelog.upkeep()
        assert volume.writelog.statistics().copies_missing == 0
        assert volume.writelog.statistics().copies_made == 1
        raise Crash

    run(tmp_path, stores, check)
    good = [c for c in log_copies(stores) if c[3].seq != first]
    assert len({c[2] for c in good if c[3].data == b"w" * 100}) == M + 1


def test_scrub_replaces_a_damaged_copy(tmp_path: Path, stores: list[Path]) -> None:
    """A copy damaged under the mount is found when scrub reads the copies
    back, and written anew on another store."""
    base = pattern(21, CHUNK)

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 300, b"d" * 700)
        await volume.filedata.fsync(ino)
        assert await volume.writelog.verify_copies() == 0
        path, pos, _, _ = log_copies(stores)[0]
        damage(path, pos + HEADER_SIZE + 5)
        assert await volume.writelog.verify_copies() == 1
        stats = volume.writelog.statistics()
        assert stats.copies_missing == 0 and stats.copies_made == 1
        good = [c for c in log_copies(stores) if c[3].data == b"d" * 700]
        assert len({c[2] for c in good}) == M + 1
        raise Crash

    run(tmp_path, stores, body)


def test_torn_record_at_the_end_of_a_segment_is_never_applied(
    tmp_path: Path, stores: list[Path]
) -> None:
    """A crash in the middle of the last append: its copies are cut short
    (the tail of the record never reached the disk). The torn record is
    never applied, the records before it are."""
    base = pattern(17, CHUNK)
    expected = bytearray(base)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        for i in range(3):
            await volume.filedata.write(ino, 20000 * i, bytes([65 + i]) * 6000)
            await volume.filedata.fsync(ino)
        raise Crash

    run(tmp_path, stores, write)
    copies = log_copies(stores)
    last = max(c[3].seq for c in copies)
    for path, pos, _, record in copies:
        if record.seq == last:  # the second block of the record never written
            with open(path, "r+b") as f:
                f.seek(pos + 4096)
                f.write(bytes(4096))
    for i in range(2):
        expected[20000 * i : 20000 * i + 6000] = bytes([65 + i]) * 6000

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert volume.writelog.records == 2
        assert await volume.filedata.read(ino, 0, CHUNK) == expected
        raise Crash

    run(tmp_path, stores, check)


def test_a_lost_log_store_s_records_survive_and_get_a_new_copy(
    tmp_path: Path, stores: list[Path]
) -> None:
    """A store holding record copies fails while mounted: the records get a
    copy on another store (the next records avoid it), so that after a
    crash the volume without that store still has every fsync'd byte."""
    base = pattern(18, 2 * CHUNK)
    expected = bytearray(base)
    lost: list[int] = []

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        for i in range(4):
            await data.write(ino, 30000 * i + 7, bytes([97 + i]) * 3000)
            expected[30000 * i + 7 : 30000 * i + 3007] = bytes([97 + i]) * 3000
            await data.fsync(ino)
        holders = {p[0] for live in volume.writelog._live.values() for p in live.places}
        lost.append(min(holders))
        volume.runners[lost[0]].mark_failed("test: the disk is gone")
        assert volume.writelog.statistics().copies_missing > 0
        await data.write(ino, CHUNK + 50, b"z" * 1000)
        expected[CHUNK + 50 : CHUNK + 1050] = b"z" * 1000
        await data.fsync(ino)
        await volume.writelog.upkeep()
        stats = volume.writelog.statistics()
        assert stats.copies_missing == 0 and stats.copies_made > 0
        raise Crash

    run(tmp_path, stores, write)
    shutil.rmtree(stores[lost[0]] / "wlog")
    for c in log_copies(stores):
        assert c[2] != lost[0]
    remaining = [s for i, s in enumerate(stores) if i != lost[0]]
    # Only the remaining stores: each record still has m+1 copies there.
    per_record: dict[int, set[int]] = {}
    for _, _, store, record in log_copies(stores):
        per_record.setdefault(record.seq, set()).add(store)
    assert per_record and all(len(v) >= M + 1 for v in per_record.values())

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert await volume.filedata.read(ino, 0, 2 * CHUNK) == expected
        raise Crash

    run(tmp_path, remaining, check)


def test_fsync_fails_when_no_store_takes_the_records(tmp_path: Path, stores: list[Path]) -> None:
    """Every log write failing: fsync reports EIO (never success without
    the records on a store), and the write is still there to retry."""
    base = pattern(24, CHUNK)

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        await data.write(ino, 64, b"e" * 64)
        real = DirectoryStore.write_log_segment

        def failing(self: DirectoryStore, number: int, offset: int, blob: bytes) -> None:
            raise OSError(5, "injected")

        DirectoryStore.write_log_segment = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(EcfsError) as caught:
                await data.fsync(ino)
            assert caught.value.errno == 5
        finally:
            DirectoryStore.write_log_segment = real  # type: ignore[method-assign]
        for runner in volume.runners.values():
            runner.mark_ok()
        await data.fsync(ino)
        assert volume.writelog.records == 1
        assert await data.read(ino, 64, 64) == b"e" * 64
        raise Crash

    run(tmp_path, stores, body)


def test_records_move_off_a_draining_store(tmp_path: Path, stores: list[Path]) -> None:
    """A store being removed (draining) gets no new copies, and the copies
    it holds are made again elsewhere before it goes."""

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, pattern(25, CHUNK))
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 4000, b"m" * 400)
        await volume.filedata.fsync(ino)
        (live,) = volume.writelog._live.values()
        leaving = live.places[0][0]
        volume.placement.draining.add(leaving)
        await volume.writelog.upkeep()
        assert volume.writelog.statistics().copies_missing == 0
        assert len({p[0] for p in live.places if p[0] != leaving}) == M + 1
        raise Crash

    run(tmp_path, stores, body)


def test_small_segments_fill_switch_get_reused_and_recover(
    tmp_path: Path, stores: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 8 KiB segments: appends that do not fit start a new segment,
    one larger than a segment gets a segment of its size, folded segments
    are reused or deleted, and after a crash every fsync'd byte is back."""
    import ecfs.data.logfiles

    monkeypatch.setattr(ecfs.data.logfiles, "SEGMENT_SIZE", 8192)
    base = pattern(26, 2 * CHUNK)
    expected = bytearray(base)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        for i in range(40):
            idx = i % 2
            size = 12000 if i % 7 == 0 else 1000 + i
            offset = idx * CHUNK + (i * 3001) % (CHUNK - size)
            piece = pattern(200 + i, size)
            await data.write(ino, offset, piece)
            expected[offset : offset + size] = piece
            await data.fsync(ino)
            if i % 10 == 9:
                await data.fold_chunk(ino, 0)
                await data.fsync(ino)
                await volume.writelog.upkeep()
        assert await data.read(ino, 0, 2 * CHUNK) == expected
        assert volume.writelog.records > 0
        raise Crash

    run(tmp_path, stores, write)

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert await volume.filedata.read(ino, 0, 2 * CHUNK) == expected
        await volume.filedata.write(ino, 5, b"after")
        expected[5:10] = b"after"
        await volume.filedata.fsync(ino)
        raise Crash

    run(tmp_path, stores, check)

    async def again(volume: Volume) -> None:
        assert await volume.filedata.read(lookup(volume, b"f"), 0, 2 * CHUNK) == expected

    run(tmp_path, stores, again)
    assert not any((s / "wlog").exists() and any((s / "wlog").iterdir()) for s in stores)


def test_a_crash_in_the_middle_of_an_fsync(tmp_path: Path, stores: list[Path]) -> None:
    """kill -9 while an fsync writes its record (one copy written, the next
    store's write hung): every byte fsync'd before is there after the
    crash, and the interrupted write is there entirely or not at all."""
    base = pattern(19, CHUNK)
    before = bytearray(base)
    hung = threading.Event()

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        for i in range(3):
            await data.write(ino, 11000 * i, bytes([48 + i]) * 5000)
            before[11000 * i : 11000 * i + 5000] = bytes([48 + i]) * 5000
            await data.fsync(ino)
        real = DirectoryStore.write_log_segment
        calls = []

        def torn(self: DirectoryStore, number: int, offset: int, blob: bytes) -> None:
            calls.append(self)
            if len(calls) == 1:
                real(self, number, offset, blob)
                return
            real(self, number, offset, blob[: len(blob) // 3])  # cut short
            hung.set()
            time.sleep(2)

        DirectoryStore.write_log_segment = torn  # type: ignore[method-assign]
        try:
            await data.write(ino, 60000, b"!" * 6000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(data.fsync, ino)
                await trio.to_thread.run_sync(hung.wait, 10.0)
                nursery.cancel_scope.cancel()
        finally:
            DirectoryStore.write_log_segment = real  # type: ignore[method-assign]
        raise Crash

    run(tmp_path, stores, write)
    time.sleep(2)  # the hung write's thread is gone

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        got = await volume.filedata.read(ino, 0, CHUNK)
        after = bytearray(before)
        after[60000:66000] = b"!" * 6000
        assert got in (before, after)
        raise Crash

    run(tmp_path, stores, check)


def test_truncate_then_extend_after_a_crash_never_brings_back_records(
    tmp_path: Path, stores: list[Path]
) -> None:
    """Records of bytes a truncate cut off stay dead when the file grows
    again, across a crash (the kept chunk gets a new version with the
    truncate, which the old records do not apply over)."""
    base = pattern(20, 2 * CHUNK)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        await data.write(ino, 0, base)
        await data.fsync(ino)
        await data.write(ino, 5000, b"R" * 3000)
        await data.write(ino, CHUNK + 10, b"S" * 100)
        await data.fsync(ino)
        assert volume.writelog.records == 2
        await data.truncate(ino, 4000)
        await data.truncate(ino, 2 * CHUNK)
        await data.fsync(ino)
        small = new_file(volume, b"g")  # truncated below inline_max: inline again
        await data.write(small, 0, base[:CHUNK])
        await data.fsync(small)
        await data.write(small, 100, b"T" * 50)
        await data.fsync(small)
        await data.truncate(small, 1000)
        await data.fsync(small)
        assert volume.namespace.inline_data(small) == base[:100] + b"T" * 50 + base[150:1000]
        raise Crash

    run(tmp_path, stores, write)
    expected = base[:4000] + bytes(2 * CHUNK - 4000)

    async def check(volume: Volume) -> None:
        ino = lookup(volume, b"f")
        assert volume.writelog.records == 0
        assert await volume.filedata.read(ino, 0, 2 * CHUNK) == expected
        small = lookup(volume, b"g")
        want = base[:100] + b"T" * 50 + base[150:1000]
        assert await volume.filedata.read(small, 0, CHUNK) == want
        assert volume.filedata.chunks.get(small, 0) is None
        raise Crash

    run(tmp_path, stores, check)


def test_truncate_unlink_link_rename_with_records(tmp_path: Path, stores: list[Path]) -> None:
    base = pattern(7, 2 * CHUNK)

    async def body(volume: Volume) -> None:
        ns, data = volume.namespace, volume.filedata
        ino = new_file(volume, b"f")
        await data.write(ino, 0, base)
        await data.fsync(ino)
        await data.write(ino, CHUNK + 10, b"a" * 3000)
        await data.write(ino, 50, b"b" * 100)
        await data.fsync(ino)
        assert volume.writelog.records == 2
        # A hard link sees the records.
        ns.link(ino, ROOT_INODE, b"g")
        expected = bytearray(base)
        expected[CHUNK + 10 : CHUNK + 3010] = b"a" * 3000
        expected[50:150] = b"b" * 100
        assert await data.read(lookup(volume, b"g"), 0, 2 * CHUNK) == expected
        # Truncate into the middle of the record in chunk 1, then grow again:
        # the cut bytes read as zeros.
        await data.truncate(ino, CHUNK + 1000)
        await data.truncate(ino, 2 * CHUNK)
        expected[CHUNK + 1000 :] = bytes(CHUNK - 1000)
        assert await data.read(ino, 0, 2 * CHUNK) == expected
        await data.fsync(ino)
        assert await data.read(ino, 0, 2 * CHUNK) == expected
        # Rename another file over it and drop the last references: freed.
        other = new_file(volume, b"h")
        await data.write(other, 0, b"new")
        await data.fsync(other)
        await data.write(ino, 60, b"c" * 10)
        await data.fsync(ino)
        assert volume.writelog.records >= 1
        ns.unlink(ROOT_INODE, b"g")
        ns.rename(ROOT_INODE, b"h", ROOT_INODE, b"f")
        await data.released(ino)
        assert ns.get(ino).nlink == 0
        await data.free(ino)
        assert volume.writelog.records == 0 and table_rows(volume) == 0
        assert await data.read(lookup(volume, b"f"), 0, 10) == b"new"

    run(tmp_path, stores, body)


def test_inline_file_growing_into_chunks(tmp_path: Path, stores: list[Path]) -> None:
    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        await data.write(ino, 0, b"small")
        await data.fsync(ino)
        assert volume.namespace.inline_data(ino) == b"small"
        await data.write(ino, 0, b"S")  # inline: no record
        await data.fsync(ino)
        assert volume.writelog.records == 0
        await data.write(ino, 3 * INLINE, b"grown")
        await data.fsync(ino)
        await data.write(ino, 1, b"MALL")  # now chunked: a record
        await data.fsync(ino)
        assert volume.writelog.records == 1
        expected = b"SMALL" + bytes(3 * INLINE - 5) + b"grown"
        assert await data.read(ino, 0, 10 * INLINE) == expected

    run(tmp_path, stores, body)


def test_reading_while_a_chunk_folds(tmp_path: Path, stores: list[Path]) -> None:
    base = pattern(8, CHUNK)

    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        await data.write(ino, 0, base)
        await data.fsync(ino)
        expected = bytearray(base)
        for i in range(6):
            await data.write(ino, i * 9000, b"r" * 2000)
            expected[i * 9000 : i * 9000 + 2000] = b"r" * 2000
            await data.fsync(ino)
        results = []

        async def reader() -> None:
            for _ in range(50):
                results.append(await data.read(ino, 0, CHUNK) == expected)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(data.fold_chunk, ino, 0)
        assert all(results) and len(results) == 50
        assert not volume.writelog.has(ino, 0)

    run(tmp_path, stores, body)


def test_log_over_its_limit_makes_writers_fold(tmp_path: Path, stores: list[Path]) -> None:
    async def body(volume: Volume) -> None:
        data = volume.filedata
        volume.writelog.limit = 20_000
        ino = new_file(volume, b"f")
        base = pattern(9, 4 * CHUNK)
        await data.write(ino, 0, base)
        await data.fsync(ino)
        expected = bytearray(base)
        for i in range(30):
            offset = (i % 4) * CHUNK + (i * 997) % (CHUNK - 3000)
            await data.write(ino, offset, b"L" * 3000)
            expected[offset : offset + 3000] = b"L" * 3000
            await data.fsync(ino)
            assert volume.writelog.total <= 20_000
        assert volume.writelog.statistics().forced_folds > 0
        assert await data.read(ino, 0, 4 * CHUNK) == expected

    run(tmp_path, stores, body)


def test_segment_space_is_bounded(tmp_path: Path, stores: list[Path]) -> None:
    """A record that is neither over budget nor idle still gets folded when
    the segments (which it keeps from being reused) take too much space."""

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, pattern(23, CHUNK))
        await volume.filedata.fsync(ino)
        log = volume.writelog
        log.fold_idle, log.fold_budget = 3600.0, 1 << 40
        log.limit = 1 << 20  # segments of 8 MiB on 2 stores: over 8 x limit
        await volume.filedata.write(ino, 10, b"k" * 10)
        await volume.filedata.fsync(ino)
        assert not log.over_limit
        with trio.fail_after(30):
            while log.has(ino, 0):  # noqa: ASYNC110 (the fold task polls too)
                await trio.sleep(0.1)
        assert log.statistics().folds == 1
        assert await volume.filedata.read(ino, 10, 10) == b"k" * 10

    run(tmp_path, stores, body)


def test_scan_skips_a_damaged_record_inside_an_append() -> None:
    """Records of one append are packed: one whose data is damaged is
    skipped by the length it claims and the next one still found; a torn
    tail is skipped to the next append; another volume's key finds nothing."""
    from ecfs.data.logfiles import BLOCK, encode, padded, scan

    key = b"k" * 16
    records = [Record(i, 2, 0, 9, 100 * i, bytes([i]) * (1000 + i), 5, 6) for i in (1, 2, 3)]
    first = padded(b"".join(encode(r, key) for r in records))
    last = Record(4, 2, 0, 9, 0, b"z" * 5000, 5, 6)
    blob = bytearray(first + padded(encode(last, key)))
    assert [r.seq for _, r in scan(bytes(blob), key)[0]] == [1, 2, 3, 4]
    second = HEADER_SIZE + 1001
    blob[second + HEADER_SIZE + 7] ^= 0xFF  # record 2's data
    found, bad = scan(bytes(blob), key)
    assert [r.seq for _, r in found] == [1, 3, 4] and bad == 1
    blob[len(first) + 4096 :] = bytes(len(blob) - len(first) - 4096)  # record 4 torn
    found, bad = scan(bytes(blob), key)
    assert [r.seq for _, r in found] == [1, 3] and bad == 2
    assert len(first) % BLOCK == 0
    assert scan(bytes(blob), b"x" * 16)[0] == []


def test_the_log_skips_stores_that_hold_no_log_segments() -> None:
    """Copies go only to stores that hold log segments (an object store
    holds none and refuses): never tried, never marked failed, never
    scanned, and not counted as usable for copies."""
    from ecfs.core.errors import StoreError
    from ecfs.storage.fakestores import MemoryStore
    from ecfs.storage.offload import StoreRunner

    class ObjectLike(MemoryStore):
        holds_log_segments = False

        def log_segments(self) -> list[int]:
            raise StoreError("object stores hold no small-write log segments")

        def create_log_segment(self, number: int, size: int) -> None:
            raise StoreError("object stores hold no small-write log segments")

    stores = [MemoryStore(), ObjectLike(), MemoryStore(), ObjectLike()]
    runners = {i: StoreRunner(i, s) for i, s in enumerate(stores)}
    key = b"k" * 16
    files = LogFiles(runners, 3, key, lambda: 0)
    records = [Record(i, 2, 0, 9, 0, bytes([i]) * 100, 5, 6) for i in range(1, 6)]

    async def main() -> dict[int, list[tuple[int, int, int]]]:
        placed = {}
        for record in records:  # one append each: the rotation moves on
            placed.update(await files.write([record]))
        return placed

    placed = trio.run(main)
    assert files.usable() == [0, 2]
    assert all(sorted(p[0] for p in places) == [0, 2] for places in placed.values())
    assert all(r.available for r in runners.values())
    scanned = LogFiles.scan(dict(enumerate(stores)), key)
    assert scanned.unreadable == {} and set(scanned.segments) == {0, 2}
    assert sorted(r.seq for s, _, _, r in scanned.copies if s == 0) == [1, 2, 3, 4, 5]


def test_extents_newest_wins() -> None:
    ext = Extents()
    model = bytearray(100)
    touched = bytearray(100)
    for offset, length, value in [(10, 5, 1), (12, 10, 2), (30, 3, 3), (0, 11, 4), (33, 2, 5)]:
        ext.add(offset, bytes([value]) * length)
        model[offset : offset + length] = bytes([value]) * length
        touched[offset : offset + length] = b"\1" * length
    out = bytearray(100)
    for offset, data in ext.items():
        out[offset : offset + len(data)] = data
    assert out == model
    assert ext.total == sum(touched)


# -- the model ---------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, 3 * CHUNK),
            st.sampled_from([1, 100, 4096, 5000, 9000, CHUNK + 7]),
            st.integers(0, 255),
        ),
        st.tuples(st.just("fsync")),
        st.tuples(st.just("truncate"), st.integers(0, 3 * CHUNK)),
        st.tuples(st.just("fold")),
        st.tuples(st.just("crash")),
        st.tuples(st.just("remount")),
        st.tuples(st.just("read"), st.integers(0, 3 * CHUNK), st.integers(1, CHUNK)),
    ),
    max_size=25,
)


@settings(
    max_examples=int(os.environ.get("ECFS_MODEL_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPS)
def test_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]) -> None:
    root = tmp_path_factory.mktemp("model")
    stores = make_volume(root)
    model = bytearray()
    durable = bytearray()

    async def main() -> None:
        nonlocal model, durable
        ino = None
        pending = list(ops) + [("read", 0, 4 * CHUNK)]
        while True:
            try:
                async with mounted(root, stores) as volume:
                    data = volume.filedata
                    if ino is None:
                        ino = new_file(volume, b"f")
                        await data.fsync(ino)
                    else:
                        data.opened(ino)
                        assert await data.read(ino, 0, 4 * CHUNK) == durable
                        model = bytearray(durable)
                    while pending:
                        op = pending.pop(0)
                        if op[0] == "write":
                            _, offset, length, value = op
                            piece = bytes([value]) * length
                            await data.write(ino, offset, piece)
                            if len(model) < offset:
                                model.extend(bytes(offset - len(model)))
                            model[offset : offset + length] = piece
                        elif op[0] == "fsync":
                            await data.fsync(ino)
                            durable = bytearray(model)
                        elif op[0] == "truncate":
                            await data.truncate(ino, op[1])
                            del model[op[1] :]
                            model.extend(bytes(op[1] - len(model)))
                            # truncate persists the size in its own transaction
                        elif op[0] == "fold":
                            await data.fold_all()
                        elif op[0] == "read":
                            _, offset, length = op
                            got = await data.read(ino, offset, length)
                            assert got == model[offset : offset + length]
                        elif op[0] == "remount":
                            await data.fsync(ino)
                            durable = bytearray(model)
                            break
                        elif op[0] == "crash":
                            await data.fsync(ino)
                            durable = bytearray(model)
                            raise Crash
                    else:
                        await data.fsync(ino)
                        durable = bytearray(model)
                        return
            except Crash:
                pass

    trio.run(main)


# -- fsck ----------------------------------------------------------------------


def _corrupt_replicas(stores: list[Path], sql: str) -> None:
    """Apply `sql` to every replica as if ecfs had left it so: the copies
    agree and each records the digest of its rows (else the copies would be
    refused before the write log is looked at)."""
    import sqlite3

    from ecfs.storage.metadb.digest import content_digest

    for store in stores:
        path = store / "meta" / "ecfs-meta.sqlite"
        if path.exists():
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN")
            conn.execute(sql)
            conn.execute("UPDATE replica_state SET digest = ?", (content_digest(conn),))
            conn.execute("COMMIT")
            conn.close()


def test_records_left_in_the_metadata_by_an_older_ecfs_move_to_the_stores(
    tmp_path: Path, stores: list[Path]
) -> None:
    """A volume last mounted by an ecfs that kept the log in the metadata
    (table write_log): its records are applied, written to m+1 stores, and
    their rows deleted."""
    from ecfs.data.smallwrites import legacy_checksum

    base = pattern(22, CHUNK)
    chunk_ids: list[int] = []

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        ref = volume.filedata.chunks.get(ino, 0)
        assert ref is not None
        chunk_ids.extend([ino, ref.chunk_id])

    run(tmp_path, stores, write)
    ino, chunk_id = chunk_ids
    data = b"L" * 300
    checksum = legacy_checksum(ino, 0, chunk_id, 7, 1000, data)
    _corrupt_replicas(
        stores,
        "INSERT INTO write_log (seq, inode, idx, chunk_id, offset, checksum, data) VALUES"
        f" (7, {ino}, 0, {chunk_id}, 1000, {checksum}, x'{data.hex()}')",
    )
    expected = bytearray(base)
    expected[1000:1300] = data

    async def check(volume: Volume) -> None:
        assert volume.writelog.records == 1
        assert await volume.filedata.read(ino, 0, CHUNK) == expected
        await volume.writelog.upkeep()
        assert not WriteLogTable(volume.db).heads()
        assert volume.writelog.statistics().copies_missing == 0
        raise Crash

    run(tmp_path, stores, check)
    assert len({c[2] for c in log_copies(stores) if c[3].seq == 7}) == M + 1

    async def again(volume: Volume) -> None:
        assert await volume.filedata.read(lookup(volume, b"f"), 0, CHUNK) == expected
        raise Crash

    run(tmp_path, stores, again)


def test_fsck_checks_the_write_log(tmp_path: Path, stores: list[Path]) -> None:
    """A clean log passes; a record with a damaged copy (so fewer than m+1
    good ones) and a torn block are found; --repair writes the missing
    copy, and fsck is clean again; a crash's dead records are no finding."""
    from ecfs.volume.fsck import run_fsck

    base = pattern(10, 2 * CHUNK)

    async def write(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, base)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 100, b"a" * 100)
        await volume.filedata.write(ino, CHUNK + 100, b"b" * 100)
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 5000, b"c" * 100)
        await volume.filedata.fsync(ino)
        await volume.filedata.fold_chunk(ino, 1)  # its record is dead now
        await volume.filedata.fsync(ino)
        assert volume.writelog.records == 2
        raise Crash

    run(tmp_path, stores, write)
    args = [str(s) for s in stores]
    report = run_fsck(args, repair=False, verify_data=True)
    assert not [f for f in report.findings if f.check == "write_log_valid"]
    assert report.counts["write_log_records"] == 2
    path, pos, _, _ = next(c for c in log_copies(stores) if c[3].data == b"a" * 100)
    damage(path, pos + HEADER_SIZE + 3)
    report = run_fsck(args, repair=False, verify_data=False)
    findings = [f for f in report.findings if f.check == "write_log_valid"]
    assert any("1 of 2 copies" in f.message for f in findings), findings
    assert any(f.severity == "warning" and "torn or damaged" in f.message for f in findings)
    report = run_fsck(args, repair=True, verify_data=False)
    assert all(f.fixed for f in report.findings if f.check == "write_log_valid" and f.severity == "error")
    report = run_fsck(args, repair=False, verify_data=True)
    assert not [f for f in report.errors if f.check == "write_log_valid"]
    assert report.counts["write_log_records"] == 2


def test_status_and_metrics_show_the_log(tmp_path: Path, stores: list[Path]) -> None:
    from ecfs.frontend.metrics import render_prometheus
    from ecfs.frontend.render import render_status

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, pattern(11, CHUNK))
        await volume.filedata.fsync(ino)
        await volume.filedata.write(ino, 10, b"m" * 50)
        await volume.filedata.fsync(ino)
        record = volume.status()
        assert (record.write_log.records, record.write_log.bytes) == (1, 50)
        assert "small-write log: 1 records" in render_status(record)
        text = render_prometheus(record)
        assert "ecfs_write_log_records 1.0\n" in text
        assert "ecfs_write_log_bytes 50.0\n" in text
        await volume.filedata.fold_chunk(ino, 0)
        assert "ecfs_write_log_records 0.0\n" in render_prometheus(volume.status())

    run(tmp_path, stores, body)


def test_a_rolled_back_drop_keeps_the_records(
    tmp_path: Path, stores: list[Path]
) -> None:
    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        await volume.filedata.write(ino, 0, pattern(12, CHUNK))
        await volume.filedata.fsync(ino)
        ref = volume.filedata.chunks.get(ino, 0)
        assert ref is not None
        await volume.filedata.write(ino, 0, b"x" * 10)
        await volume.filedata.fsync(ino)
        assert volume.writelog.records == 1
        with pytest.raises(ZeroDivisionError), volume.db.transaction():
            volume.writelog.drop(ino, 0)
            assert not volume.writelog.has(ino, 0)
            _ = 1 / 0
        assert volume.writelog.has(ino, 0) and volume.writelog.records == 1
        await volume.writelog.upkeep()  # settles: the record is still live
        assert await volume.filedata.read(ino, 0, 10) == b"x" * 10

    run(tmp_path, stores, body)


def test_a_thousand_fsynced_4k_writes_to_one_default_chunk(tmp_path: Path) -> None:
    """The issue's count on the default geometry (k=4, 1 MiB fragments: a
    4 MiB chunk, a 1 MiB fold budget): 1,000 fsync'd 4 KiB writes to one
    chunk are 1,000 records and only a handful of new chunk versions."""
    stores = [tmp_path / f"s{i}" for i in range(6)]
    create_volume(stores, VolumeSpec(), domains=own_domains(stores))
    (tmp_path / "run").mkdir()
    chunk = 4 << 20

    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        expected = bytearray(pattern(13, chunk))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        versions = set()
        for i in range(1000):
            offset = (i * 7919 % 1024) * 4096
            piece = i.to_bytes(4, "little") * 1024
            await data.write(ino, offset, piece)
            expected[offset : offset + 4096] = piece
            await data.fsync(ino)
            ref = data.chunks.get(ino, 0)
            assert ref is not None
            versions.add(ref.chunk_id)
        stats = volume.writelog.statistics()
        assert stats.records_written == 1000
        assert len(versions) <= 8, len(versions)  # ~4 budget folds
        assert await data.read(ino, 0, chunk) == expected
        # Once the writer pauses, the chunk is folded (over its budget after
        # IDLE_GAP, else after FOLD_IDLE). Polled, never timed: a fold of a
        # 4 MiB chunk on a busy machine can take seconds.
        for _ in range(600):  # up to 60 s
            if not volume.writelog.has(ino, 0):
                break
            await trio.sleep(0.1)
        assert volume.writelog.statistics().folds >= 1
        assert not volume.writelog.has(ino, 0)
        assert await data.read(ino, 0, chunk) == expected

    run(tmp_path, stores, body)


def test_a_chunk_with_many_records(tmp_path: Path, stores: list[Path]) -> None:
    """Reading and folding a chunk with more records than one batch of the
    table's reads and deletes (SQLite limits bound parameters; the fold
    task may lag behind a busy writer)."""

    async def body(volume: Volume) -> None:
        ino = new_file(volume, b"f")
        data = volume.filedata
        expected = bytearray(pattern(15, CHUNK))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        ref = data.chunks.get(ino, 0)
        assert ref is not None
        volume.writelog.fold_idle = 3600.0
        volume.writelog.fold_budget = 1 << 40
        pieces = [((i * 37) % (CHUNK - 2), bytes([i % 251, 7])) for i in range(1500)]
        await volume.writelog.append(ino, 0, ref.chunk_id, pieces, size=CHUNK, mtime_ns=1)
        for offset, piece in pieces:
            expected[offset : offset + 2] = piece
        assert await data.read(ino, 0, CHUNK) == expected
        await data.fold_chunk(ino, 0)
        assert not volume.writelog.has(ino, 0)
        assert await data.read(ino, 0, CHUNK) == expected

    run(tmp_path, stores, body)


class FailingWriter:
    """A ChunkWriter whose next `failures` writes fail (a store error)."""

    def __init__(self, inner: object, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def write(self, data: memoryview) -> object:
        from ecfs.core.errors import StoreError

        if self.failures:
            self.failures -= 1
            raise StoreError("injected write failure")
        return await self.inner.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # the rest of a ChunkWriter


def test_a_failed_fold_keeps_the_records_and_is_not_the_files_error(
    tmp_path: Path, stores: list[Path]
) -> None:
    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        expected = bytearray(pattern(16, CHUNK))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        await data.write(ino, 10, b"r" * 100)
        expected[10:110] = b"r" * 100
        await data.fsync(ino)
        await data.write(ino, 500, b"p" * 10)  # a patch, not yet logged
        expected[500:510] = b"p" * 10
        real = data.writer
        data.writer = FailingWriter(real, 1)  # type: ignore[assignment]
        with pytest.raises(EcfsError):
            await data.fold_chunk(ino, 0)
        assert volume.writelog.records == 2  # the patch was logged first
        assert await data.read(ino, 0, CHUNK) == expected
        await data.fsync(ino)  # no error left behind by the fold
        await data.fold_chunk(ino, 0)
        assert volume.writelog.records == 0
        assert await data.read(ino, 0, CHUNK) == expected
        data.writer = real

    run(tmp_path, stores, body)


def test_a_truncate_whose_fold_fails_changes_nothing(tmp_path: Path, stores: list[Path]) -> None:
    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        expected = bytearray(pattern(27, CHUNK))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        await data.write(ino, 3000, b"t" * 3000)
        expected[3000:6000] = b"t" * 3000
        await data.fsync(ino)
        real = data.writer
        data.writer = FailingWriter(real, 1)  # type: ignore[assignment]
        with pytest.raises(EcfsError):
            await data.truncate(ino, 5000)  # above inline_max: a chunk write
        data.writer = real
        assert volume.namespace.get(ino).size == CHUNK
        assert await data.read(ino, 0, CHUNK) == expected
        await data.fsync(ino)
        await data.truncate(ino, 5000)
        assert await data.read(ino, 0, CHUNK) == expected[:5000]

    run(tmp_path, stores, body)


def test_a_truncate_into_a_stored_chunk_whose_write_fails_changes_nothing(
    tmp_path: Path, stores: list[Path]
) -> None:
    """No records, but the stored version holds bytes past the cut: the cut
    version is committed with the size (see test_fallocate's crash test);
    when its write fails, the truncate fails and the file is as it was."""

    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        expected = pattern(28, CHUNK)
        await data.write(ino, 0, expected)
        await data.fsync(ino)
        assert not volume.writelog.has(ino, 0)
        real = data.writer
        data.writer = FailingWriter(real, 1)  # type: ignore[assignment]
        with pytest.raises(EcfsError):
            await data.truncate(ino, 5000)
        data.writer = real
        assert volume.namespace.get(ino).size == CHUNK
        assert await data.read(ino, 0, CHUNK) == expected
        await data.fsync(ino)
        await data.truncate(ino, 5000)
        ref = volume.filedata.chunks.get(ino, 0)
        assert ref is not None and ref.length == 5000  # committed with the size
        assert await data.read(ino, 0, CHUNK) == expected[:5000]

    run(tmp_path, stores, body)


def test_concurrent_writers_readers_and_folds(tmp_path: Path, stores: list[Path]) -> None:
    """Writers (each owning its own 4 KiB blocks, so the expected content is
    known), readers checking blocks only their owner changes between
    checkpoints, and folds of random chunks, all at once."""
    import random

    size = 3 * CHUNK
    blocks = size // 4096

    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = new_file(volume, b"f")
        expected = bytearray(pattern(17, size))
        await data.write(ino, 0, bytes(expected))
        await data.fsync(ino)
        done = trio.Event()

        async def writer(me: int) -> None:
            rng = random.Random(me)
            mine = [b for b in range(blocks) if b % 3 == me]
            for i in range(150):
                block = rng.choice(mine)
                offset = block * 4096 + rng.randrange(0, 4000)
                piece = bytes([me * 50 + i % 50]) * rng.randrange(1, 96)
                await data.write(ino, offset, piece)
                expected[offset : offset + len(piece)] = piece
                # What a reader of this block must see right now.
                got = await data.read(ino, block * 4096, 4096)
                assert got == expected[block * 4096 : block * 4096 + 4096]
                if rng.random() < 0.5:
                    await data.fsync(ino)

        async def folder() -> None:
            rng = random.Random(99)
            while not done.is_set():
                await data.fold_chunk(ino, rng.randrange(3))
                await trio.sleep(0.003)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(folder)
            async with trio.open_nursery() as writers:
                for me in range(3):
                    writers.start_soon(writer, me)
            done.set()
        assert await data.read(ino, 0, size) == expected
        await data.fsync(ino)
        await data.fold_all()
        assert volume.writelog.records == 0
        assert await data.read(ino, 0, size) == expected

    run(tmp_path, stores, body)
