"""The chunk-map cache of metadb.chunks: whatever the sequence of writes,
rollbacks and reads through any ChunkTable of a Database, `get` and
`get_range` answer exactly what the SQL table holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecfs.core.model import ChunkRef
from ecfs.storage.metadb.chunks import ChunkTable
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import create_database


def open_db(path: Path) -> Database:
    create_database(path, {"uuid": "x", "k": 4, "m": 2}, ["s0"], root_uid=0, root_gid=0, now_ns=1)
    return Database(path)


def uncached(db: Database, inode: int, idx: int) -> ChunkRef | None:
    """What the table holds, read by a table with a cold cache."""
    row = db.query_one(
        "SELECT chunk_id, length, stores FROM chunks WHERE inode = ? AND idx = ?", (inode, idx)
    )
    return None if row is None else ChunkRef(row[0], row[1], tuple(row[2]))


def ref(chunk_id: int) -> ChunkRef:
    return ChunkRef(chunk_id, 4096, (0, 1, 2, 3, 4, 5))


class Boom(Exception):
    pass


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "remove_from", "set_stores", "get_range", "rollback"]),
        st.integers(2, 3),  # inode
        st.integers(0, 2),  # idx
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_cache_agrees_with_the_table(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    db = open_db(tmp_path_factory.mktemp("cache") / "db.sqlite")
    try:
        writer, reader = ChunkTable(db), ChunkTable(db)  # two tables share one cache
        next_id = 100
        for op, inode, idx in ops:
            if op == "put":
                next_id += 1
                with db.transaction():
                    writer.put(inode, idx, ref(next_id))
            elif op == "remove":
                with db.transaction():
                    writer.remove(inode, idx)
            elif op == "remove_from":
                with db.transaction():
                    writer.remove_from(inode, idx)
            elif op == "set_stores":
                current = reader.get(inode, idx)
                if current is not None:
                    with db.transaction():
                        writer.set_stores(current.chunk_id, (5, 4, 3, 2, 1, 0))
            elif op == "get_range":
                reader.get_range(inode, 0, idx)
            else:  # a write that is rolled back must not stay in the cache
                next_id += 1
                with pytest.raises(Boom), db.transaction():
                    writer.put(inode, idx, ref(next_id))
                    raise Boom
            for i in (2, 3):
                expected = {j: r for j in range(6) if (r := uncached(db, i, j)) is not None}
                assert reader.get_range(i, 0, 5) == expected
                for j in range(6):
                    assert reader.get(i, j) == expected.get(j)
    finally:
        db.close()
