"""ecfs.data.damage: degraded reads queue their chunk for repair, repeated
damage of a queued chunk does not cost a replicated transaction per read,
and chunks read around an unavailable store are summed up in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ecfs.core.model import ChunkRef
from ecfs.data.damage import (
    DEMAND_BATCH,
    STORE_UNAVAILABLE,
    UNAVAILABLE_LOG_INTERVAL,
    DamageRecorder,
)
from ecfs.storage.metadb.chunks import ChunkTable, RepairQueue
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import create_database

REF = ChunkRef(77, 4096, (0, 1, 2, 3, 4, 5))


def setup(tmp_path: Path) -> tuple[Database, DamageRecorder, list[int]]:
    path = tmp_path / "db.sqlite"
    create_database(path, {"uuid": "x", "k": 4, "m": 2}, ["s0"], root_uid=0, root_gid=0, now_ns=1)
    db = Database(path)
    with db.transaction():
        ChunkTable(db).put(2, 0, REF)
    commits: list[int] = []
    db.on_commit = lambda txn: commits.append(txn.generation)
    return db, DamageRecorder(db, 4, clock_ns=lambda: 5), commits


def demand(db: Database) -> int:
    return int(db.query_value("SELECT demand FROM repair_queue WHERE chunk_id = 77", default=0))


def test_repeated_damage_is_batched(tmp_path: Path) -> None:
    db, recorder, commits = setup(tmp_path)
    reads = 3 * DEMAND_BATCH
    for _ in range(reads):
        recorder.record(REF, [1], "store unavailable")
    assert len(commits) <= 1 + reads // DEMAND_BATCH
    assert reads - DEMAND_BATCH < demand(db) <= reads
    entry = RepairQueue(db).next_batch()[0]
    assert (entry.chunk_id, entry.bad) == (77, 0b10)
    db.close()


def test_new_damage_and_repaired_chunks_are_written_at_once(tmp_path: Path) -> None:
    db, recorder, commits = setup(tmp_path)
    recorder.record(REF, [1], "x")
    recorder.record(REF, [3], "another fragment")  # not yet known: written now
    assert RepairQueue(db).next_batch()[0].bad == 0b1010
    assert len(commits) == 2
    with db.transaction():  # the repair task fixed it
        RepairQueue(db).remove(77)
    recorder.record(REF, [1], "broken again")
    assert RepairQueue(db).next_batch()[0].bad == 0b10
    assert len(commits) == 4
    db.close()


def test_chunks_read_around_an_unavailable_store_are_summed_up_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One line when a store's chunks are first read around it, then one
    per UNAVAILABLE_LOG_INTERVAL with the count (the old code: one line
    per chunk, 256 per GiB read); other damage keeps its line per chunk."""
    path = tmp_path / "db.sqlite"
    create_database(path, {"uuid": "x", "k": 4, "m": 2}, ["s0"], root_uid=0, root_gid=0, now_ns=1)
    db = Database(path)
    refs = [ChunkRef(100 + i, 4096, (0, 1, 2, 3, 4, 5)) for i in range(50)]
    with db.transaction():
        for i, ref in enumerate(refs):
            ChunkTable(db).put(3, i, ref)
    now = [0.0]
    recorder = DamageRecorder(db, 4, clock_ns=lambda: 5, monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="ecfs.data.damage")
    for ref in refs[:40]:
        recorder.record(ref, [5], STORE_UNAVAILABLE)
        now[0] += 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "store 5 unavailable" in lines[0], lines
    now[0] = UNAVAILABLE_LOG_INTERVAL + 1.0
    recorder.record(refs[40], [5], STORE_UNAVAILABLE)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "40 chunks" in lines[1], lines
    assert RepairQueue(db).count() == 41  # every one queued all the same
    for ref in refs[41:]:
        recorder.record(ref, [2], "bad cells [0]")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 + len(refs[41:])
    assert all("unreadable (bad cells [0])" in line for line in lines[2:])
    db.close()
