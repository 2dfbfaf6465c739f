"""The repair queue's order index (schema 4): the repair task's looks at
the queue (`RepairQueue.next_batch`) walk it instead of sorting the whole
queue on the event loop, and an older database gets it when upgraded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ecfs.storage.metadb.chunks import RepairQueue
from tests.test_chunk_cache import open_db
from tests.test_policy import upgraded_from
from tests.test_tallies import vm_steps


def test_the_queue_is_read_in_its_index_order_not_sorted(tmp_path: Path) -> None:
    """`RepairQueue.next_batch` walks the index `repair_queue_order`: the
    same cost at 200 entries as at 20,000 (a sort of the whole queue on
    the event loop took 18 ms at 200,000, every look during a rebuild),
    and the same order as a sort."""
    db = open_db(tmp_path / "db.sqlite")
    conn: sqlite3.Connection = db._conn
    queue = RepairQueue(db)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    queue.next_batch(64)
    conn.set_trace_callback(None)
    plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statements[-1]}"))
    assert "repair_queue_order" in plan and "TEMP B-TREE" not in plan, plan

    def steps() -> int:
        return vm_steps(conn, lambda: queue.next_batch(64))

    def add(first: int, count: int) -> None:
        with db.transaction():
            for chunk_id in range(first, first + count):
                queue.add(chunk_id, "store-replaced", 9 - chunk_id % 3, chunk_id % 7, demand=chunk_id % 5)

    add(1, 200)
    small = steps()
    add(1000, 20_000)
    assert steps() <= small + 1
    got = [(e.priority, -e.demand) for e in queue.next_batch(500)]
    assert got == sorted(got)
    db.close()


def test_a_schema_3_database_gets_the_order_index(tmp_path: Path) -> None:
    from ecfs.storage.metadb import schema

    conn = upgraded_from(
        tmp_path / "meta.sqlite", 3,
        [("INSERT INTO repair_queue (chunk_id, reason, priority, demand, bad, enqueued_ns)"
          " VALUES (5, 'scrub', 3, 1, 2, 9)", ())],
    )  # fmt: skip
    try:
        assert schema.schema_version(conn) == schema.SCHEMA_VERSION == 4
        assert conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'repair_queue_order'"
        ).fetchone()
        assert conn.execute("SELECT chunk_id, bad FROM repair_queue").fetchall() == [(5, 2)]
    finally:
        conn.close()
