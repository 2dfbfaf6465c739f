"""The repair queue's order index (schema 4): the repair task's looks at
the queue (`RepairQueue.next_batch`) walk it instead of sorting the whole
queue on the event loop, and an older database gets it when upgraded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ecfs.storage.metadb.chunks import RepairQueue
from ecfs.storage.metadb.digest import content_digest
from tests.test_chunk_cache import open_db


def test_the_queue_is_read_in_its_index_order_not_sorted(tmp_path: Path) -> None:
    """`RepairQueue.next_batch` walks the index `repair_queue_order`: the
    same cost at 200 entries as at 20,000 (a sort of the whole queue on
    the event loop took 18 ms at 200,000, every look during a rebuild),
    and the same order as a sort."""
    db = open_db(tmp_path / "db.sqlite")
    conn: sqlite3.Connection = db._conn
    queue = RepairQueue(db)
    sql = (
        "SELECT chunk_id, reason, priority, demand, bad FROM repair_queue"
        " ORDER BY priority, demand DESC, enqueued_ns LIMIT ?"
    )
    plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (64,)))
    assert "repair_queue_order" in plan and "TEMP B-TREE" not in plan, plan

    def steps() -> int:
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        conn.set_progress_handler(tick, 100)
        try:
            queue.next_batch(64)
        finally:
            conn.set_progress_handler(None, 0)
        return count[0]

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

    path = tmp_path / "meta.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(schema.SCHEMA)
    schema._add_schema_2(conn)
    conn.executescript(schema.SCHEMA_3_DDL)
    conn.execute("INSERT INTO volume (key, value) VALUES ('schema', '3')")
    conn.execute("INSERT INTO replica_state (id, generation) VALUES (0, 7)")
    conn.execute(
        "INSERT INTO repair_queue (chunk_id, reason, priority, demand, bad, enqueued_ns)"
        " VALUES (5, 'scrub', 3, 1, 2, 9)"
    )
    assert schema.schema_version(conn) == 3
    conn.close()
    assert schema.upgrade_database(path) == 8
    conn = sqlite3.connect(path)
    try:
        assert schema.schema_version(conn) == schema.SCHEMA_VERSION == 4
        assert conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'repair_queue_order'"
        ).fetchone()
        assert conn.execute("SELECT chunk_id, bad FROM repair_queue").fetchall() == [(5, 2)]
        (digest,) = conn.execute("SELECT digest FROM replica_state").fetchone()
        assert digest == content_digest(conn)
    finally:
        conn.close()
