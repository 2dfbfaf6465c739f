"""The tallies of metadb.tallies (`ChunkTable.redundancy_classes`,
`RepairQueue.known_damage`: what `ecfs status` and every metrics scrape
read): whatever the sequence of writes and rollbacks, they are what scans
of the tables give, and once installed a call costs the same at 200
chunks or queue entries as at 20,000 (the scan of the chunk table took
0.58 s on the event loop at a million chunks)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecfs.core.model import NO_STORE, ChunkRef
from ecfs.storage.metadb.chunks import ChunkTable, RepairQueue, decode_stores
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.digest import content_digest
from ecfs.storage.metadb.schema import SCHEMA_VERSION, schema_version
from tests.test_chunk_cache import Boom, open_db

Classes = list[tuple[tuple[int, ...], int, int, int]]


def scanned(db: Database) -> Classes:
    """The classes as a scan of the table gives them."""
    return sorted(
        (decode_stores(stores), int(k or 0), int(count), int(size))
        for stores, k, count, size in db.query(
            "SELECT stores, k, COUNT(*), SUM(length) FROM chunks GROUP BY stores, k"
        )
    )


def damage_scanned(db: Database) -> Classes:
    """The known damage as a scan of the queue and the chunk table gives it."""
    return sorted(
        (decode_stores(stores), int(k or 0), int(bad), int(count))
        for stores, k, bad, count in db.query(
            "SELECT c.stores, c.k, q.bad, COUNT(*) FROM repair_queue AS q"
            " JOIN chunks AS c ON c.chunk_id = q.chunk_id WHERE q.bad != 0"
            " GROUP BY c.stores, c.k, q.bad"
        )
    )


def agree(db: Database) -> None:
    assert sorted(ChunkTable(db).redundancy_classes()) == scanned(db)
    assert sorted(RepairQueue(db).known_damage()) == damage_scanned(db)


PLACEMENTS = [(0, 1, 2, 3, 4, 5), (5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, NO_STORE), (0, 1, 2)]


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["put", "remove", "remove_from", "set_stores", "rollback", "classes",
             "queue", "unqueue", "settle"]
        ),
        st.just(2),  # inode (one file: the ops meet each other's chunks)
        st.integers(0, 2),  # idx
        st.integers(0, len(PLACEMENTS) - 1),  # placement
        st.sampled_from([0, 1]),  # k of its own (1+2) or the volume's
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_the_tallies_are_the_tables_whatever_the_writes(
    tmp_path_factory: pytest.TempPathFactory, ops: list
) -> None:
    db = open_db(tmp_path_factory.mktemp("classes") / "db.sqlite")
    try:
        table, queue = ChunkTable(db), RepairQueue(db)
        agree(db)  # installs the tallies: every write below goes through their triggers
        next_id = 100
        for op, inode, idx, placement, k in ops:
            stores = PLACEMENTS[placement]
            own_k = k if len(stores) == 3 else 0
            if op == "put":
                next_id += 1
                with db.transaction():
                    table.put(inode, idx, ChunkRef(next_id, 4096 * (1 + idx), stores, own_k))
            elif op == "remove":
                with db.transaction():
                    table.remove(inode, idx)
            elif op == "remove_from":
                with db.transaction():
                    table.remove_from(inode, idx)
            elif op == "set_stores":
                found = table.get(inode, idx)
                if found is not None and len(found.stores) == len(stores):
                    with db.transaction():
                        table.set_stores(found.chunk_id, stores)
            elif op == "rollback":
                next_id += 1
                with pytest.raises(Boom), db.transaction():
                    table.put(inode, idx, ChunkRef(next_id, 512, stores, own_k))
                    table.remove(inode, (idx + 1) % 3)
                    queue.add(next_id, "scrub", 3, 1, bad=3)
                    raise Boom
            elif op in ("queue", "unqueue", "settle"):
                found = table.get(inode, idx)
                chunk_id = found.chunk_id if found is not None else next_id + 1  # (or none)
                with db.transaction():
                    if op == "queue":  # a new entry, or bad bits merged into one
                        queue.add(chunk_id, "scrub", 3, 1, bad=(1 << placement) * k)
                    elif op == "unqueue":
                        queue.remove(chunk_id)
                    else:
                        entries = queue.entries_of([chunk_id])
                        queue.remove_unchanged(
                            [(e.chunk_id, e.priority, e.demand, e.bad) for e in entries]
                        )
            else:
                agree(db)
        agree(db)
    finally:
        db.close()


def test_every_trigger_path_keeps_the_tallies(tmp_path: Path) -> None:
    """Each way a row of `chunks` or `repair_queue` changes, in turn (the
    random sequences above meet some of them seldom)."""
    db = open_db(tmp_path / "db.sqlite")
    table, queue = ChunkTable(db), RepairQueue(db)
    agree(db)
    steps = [
        lambda: queue.add(102, "scrub", 3, 1, bad=1),  # queued before its chunk exists
        lambda: table.put(2, 0, ChunkRef(101, 4096, PLACEMENTS[0])),
        lambda: table.put(2, 1, ChunkRef(102, 8192, PLACEMENTS[1])),  # its entry counts now
        lambda: queue.add(101, "scrub", 3, 1, bad=2),
        lambda: queue.add(101, "degraded-read", 2, 1, bad=4),  # bad bits merged: 6
        lambda: queue.add(101, "degraded-read", 2, 1, bad=0),  # demand only
        lambda: table.set_stores(101, PLACEMENTS[1]),  # its group moves
        lambda: table.put(2, 0, ChunkRef(103, 4096, PLACEMENTS[0])),  # replaced: 101 gone
        lambda: queue.add(103, "scrub", 3, 1, bad=8),
        lambda: queue.remove_unchanged(
            [(e.chunk_id, e.priority, e.demand, e.bad) for e in queue.entries_of([103])]
        ),
        lambda: queue.remove(101),  # (the entry of a chunk that is gone)
        lambda: table.remove(2, 1),  # chunk first, then its entry
        lambda: table.put(2, 2, ChunkRef(104, 4096, PLACEMENTS[2], 0)),
        lambda: queue.add(104, "scrub", 3, 1, bad=1),
        lambda: table.remove_from(2, 0),
    ]
    for step in steps:
        with db.transaction():
            step()
        agree(db)
    db.close()


def vm_steps(conn: sqlite3.Connection, call: Callable[[], object]) -> int:
    """SQLite VM steps (in units of 100) `call` takes on `conn`."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 0)
    return count[0]


def _steps(db: Database, conn: sqlite3.Connection) -> int:
    """VM steps of a `redundancy_classes` and a `known_damage` call."""
    return vm_steps(
        conn, lambda: (ChunkTable(db).redundancy_classes(), RepairQueue(db).known_damage())
    )


def test_a_call_costs_the_same_at_any_number_of_chunks(tmp_path: Path) -> None:
    db = open_db(tmp_path / "db.sqlite")
    conn: sqlite3.Connection = db._conn  # (white box: the working copy's connection)
    table = ChunkTable(db)
    next_id = 100

    def add(count: int) -> None:
        nonlocal next_id
        with db.transaction():
            for _ in range(count):
                next_id += 1
                table.put(next_id, 0, ChunkRef(next_id, 4096, PLACEMENTS[next_id % 2]))
                RepairQueue(db).add(next_id, "store-replaced", 9, 1, bad=1 << (next_id % 6))

    add(200)
    table.redundancy_classes()  # installs the tallies (one scan of each table)
    small = _steps(db, conn)
    add(20_000)
    large = _steps(db, conn)
    assert large <= small + 1, (small, large)  # (scans: about 100x more)
    agree(db)
    db.close()


def test_the_kept_classes_leave_the_file_and_its_digest_alone(tmp_path: Path) -> None:
    """TEMP objects: not in the file (its schema is still exactly the
    known one), not in the content digest the working copy claims."""
    db = open_db(tmp_path / "db.sqlite")
    table = ChunkTable(db)
    table.redundancy_classes()
    with db.transaction():
        table.put(2, 0, ChunkRef(101, 4096, PLACEMENTS[0]))
        table.put(2, 1, ChunkRef(102, 8192, PLACEMENTS[1]))
    claimed = db.digest
    snapshot = tmp_path / "copy.sqlite"
    db.snapshot(snapshot)
    db.close()
    copy = sqlite3.connect(snapshot)
    try:
        assert schema_version(copy) == SCHEMA_VERSION
        assert content_digest(copy) == claimed
    finally:
        copy.close()


def test_inside_a_transaction_before_the_first_call_it_scans(tmp_path: Path) -> None:
    db = open_db(tmp_path / "db.sqlite")
    table = ChunkTable(db)
    installed = (
        "SELECT COUNT(*) FROM temp.sqlite_master"
        " WHERE name IN ('ecfs_classes', 'ecfs_damage') OR name LIKE 'ecfs_tally_%'"
    )
    with db.transaction():
        table.put(2, 0, ChunkRef(101, 4096, PLACEMENTS[0]))
        RepairQueue(db).add(101, "scrub", 3, 1, bad=2)
        agree(db)
    assert db.query_value(installed) == 0
    agree(db)
    assert db.query_value(installed) == 8  # two tables, six triggers
    db.close()

