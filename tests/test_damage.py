"""ecfs.data.damage: degraded reads queue their chunk for repair, and repeated
damage of a queued chunk does not cost a replicated transaction per read."""

from __future__ import annotations

from pathlib import Path

from ecfs.core.model import ChunkRef
from ecfs.data.damage import DEMAND_BATCH, DamageRecorder
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
