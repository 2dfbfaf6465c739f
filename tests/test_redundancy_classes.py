"""The redundancy classes of metadb.chunks (`ChunkTable.redundancy_classes`,
what `ecfs status` and every metrics scrape read): whatever the sequence
of writes and rollbacks, they are what a scan of the chunk table gives,
and once installed a call costs the same at 200 chunks as at 20,000 (the
scan it replaces took 0.58 s on the event loop at a million chunks)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecfs.core.model import NO_STORE, ChunkRef
from ecfs.storage.metadb.chunks import ChunkTable, decode_stores
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


PLACEMENTS = [(0, 1, 2, 3, 4, 5), (5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, NO_STORE), (0, 1, 2)]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "remove_from", "set_stores", "rollback", "classes"]),
        st.integers(2, 3),  # inode
        st.integers(0, 2),  # idx
        st.integers(0, len(PLACEMENTS) - 1),  # placement
        st.sampled_from([0, 1]),  # k of its own (1+2) or the volume's
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_the_classes_are_the_tables_whatever_the_writes(
    tmp_path_factory: pytest.TempPathFactory, ops: list
) -> None:
    db = open_db(tmp_path_factory.mktemp("classes") / "db.sqlite")
    try:
        table = ChunkTable(db)
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
                    raise Boom
            else:
                assert sorted(table.redundancy_classes()) == scanned(db)
        assert sorted(table.redundancy_classes()) == scanned(db)
    finally:
        db.close()


def _steps(db: Database, conn: sqlite3.Connection) -> int:
    """SQLite VM steps (in units of 100) one `redundancy_classes` call takes."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        ChunkTable(db).redundancy_classes()
    finally:
        conn.set_progress_handler(None, 0)
    return count[0]


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

    add(200)
    table.redundancy_classes()  # installs the kept classes (one scan)
    small = _steps(db, conn)
    add(20_000)
    large = _steps(db, conn)
    assert large <= small + 1, (small, large)  # (a scan: about 100x more)
    assert sorted(table.redundancy_classes()) == scanned(db)
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
    with db.transaction():
        table.put(2, 0, ChunkRef(101, 4096, PLACEMENTS[0]))
        assert table.redundancy_classes() == scanned(db)
    assert not db.query_one("SELECT 1 FROM temp.sqlite_master WHERE name = 'ecfs_redundancy_classes'")
    assert table.redundancy_classes() == scanned(db)
    assert db.query_one("SELECT 1 FROM temp.sqlite_master WHERE name = 'ecfs_redundancy_classes'")
    db.close()
