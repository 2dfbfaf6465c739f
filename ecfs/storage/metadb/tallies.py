"""Tallies of the chunk table and the repair queue that `ecfs status` and
every metrics scrape read, kept current instead of counted each time.

Owns: two TEMP tables of the working copy's connection and the TEMP
triggers on `chunks` and `repair_queue` that keep them exact:
* the redundancy classes: chunks and bytes per (stores, k), the chunk's
  own k or 0 for the volume's (`redundancy_classes`);
* the known damage: queued chunks with known-bad fragments per
  (stores, k, bad mask), a queue entry counted while its chunk exists
  (`known_damage`).
Must not: be written by anything but its triggers, or exist anywhere but
on the working copy's connection.

Why: both were GROUP BY queries over a whole table, on the event loop. At
200,000 chunks (800 GiB of 4 MiB chunks) the classes scan took 105 ms
(0.58 s at a million, on a busier machine), and the damage join 180 ms
with as many entries queued, which a replaced store's rebuild queues.
Each `ecfs status`, each `ecfs repair --wait` poll and each scrape
stalled every request that long. Read from the tallies, a call costs
0.02-0.04 ms whatever the volume's size; a chunk row written costs 2.3
us more (13.4 against 11.1 us per `ChunkTable.put`), a queue entry 2.5
us more (6.1 against 3.6 per `RepairQueue.add`).

How: the first call (outside a transaction) creates the tables, fills them
with one scan each and installs the triggers, all in one step of the loop
(`Database.install_temp`): TEMP objects are never in the file (its schema
stays exactly the known one), never replicated and not in the content
digest, and their rows roll back with the transaction that changed
`chunks` or `repair_queue`. Until then, and for a call inside a
transaction before the first, the tallies are counted by the scans. The
triggers rely on ``recursive_triggers`` (set by the digest tracker on
this connection) so that the rows an ``INSERT OR REPLACE`` deletes are
taken off too.
"""

from __future__ import annotations

from typing import Any

from .database import Database

_CLASSES_SCAN = (
    "SELECT stores, COALESCE(k, 0), COUNT(*), SUM(length) FROM main.chunks"
    " GROUP BY stores, COALESCE(k, 0)"
)
_DAMAGE_SCAN = (
    "SELECT c.stores, COALESCE(c.k, 0), q.bad, COUNT(*) FROM main.repair_queue AS q"
    " JOIN main.chunks AS c ON c.chunk_id = q.chunk_id WHERE q.bad != 0"
    " GROUP BY c.stores, COALESCE(c.k, 0), q.bad"
)
_INSTALLED = "SELECT 1 FROM temp.sqlite_master WHERE type = 'table' AND name = 'ecfs_damage'"


def _add_class(row: str) -> str:
    return (
        f"INSERT INTO ecfs_classes VALUES ({row}.stores, COALESCE({row}.k, 0), 1, {row}.length)"
        " ON CONFLICT (stores, k) DO UPDATE SET chunks = chunks + 1,"
        " bytes = bytes + excluded.bytes;"
    )


def _remove_class(row: str) -> str:
    return (
        f"UPDATE ecfs_classes SET chunks = chunks - 1, bytes = bytes - {row}.length"
        f" WHERE stores = {row}.stores AND k = COALESCE({row}.k, 0);"
    )


def _add_damage(select: str) -> str:
    """(stores, k, bad) rows of `select` counted once more each."""
    return (
        f"INSERT INTO ecfs_damage {select}"
        " ON CONFLICT (stores, k, bad) DO UPDATE SET chunks = chunks + excluded.chunks;"
    )


def _remove_damage(select: str) -> str:
    return f"UPDATE ecfs_damage SET chunks = chunks - 1 WHERE (stores, k, bad) IN ({select});"


def _of_chunk(bad: str, chunk_id: str) -> str:
    """The damage group of queued chunk `chunk_id` with mask `bad`, if the chunk exists."""
    return (
        f"SELECT c.stores, COALESCE(c.k, 0), {bad}, 1 FROM chunks AS c"
        f" WHERE c.chunk_id = {chunk_id} AND {bad} != 0"
    )


def _of_queue(row: str) -> str:
    """The damage group of chunk row `row` if it is queued with known-bad fragments."""
    return (
        f"SELECT {row}.stores, COALESCE({row}.k, 0), q.bad, 1 FROM repair_queue AS q"
        f" WHERE q.chunk_id = {row}.chunk_id AND q.bad != 0"
    )


def _groups(select: str) -> str:
    """`select` (stores, k, bad, 1) without its count column, for IN."""
    return select.replace(", 1 FROM", " FROM", 1)


_DDL = (
    "CREATE TEMP TABLE ecfs_classes (stores BLOB NOT NULL, k INTEGER NOT NULL,"
    " chunks INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (stores, k)) WITHOUT ROWID",
    f"INSERT INTO temp.ecfs_classes {_CLASSES_SCAN}",
    "CREATE TEMP TABLE ecfs_damage (stores BLOB NOT NULL, k INTEGER NOT NULL,"
    " bad INTEGER NOT NULL, chunks INTEGER NOT NULL, PRIMARY KEY (stores, k, bad)) WITHOUT ROWID",
    f"INSERT INTO temp.ecfs_damage {_DAMAGE_SCAN}",
    "CREATE TEMP TRIGGER ecfs_tally_chunk_insert AFTER INSERT ON main.chunks BEGIN"
    f" {_add_class('NEW')} {_add_damage(_of_queue('NEW'))} END",
    "CREATE TEMP TRIGGER ecfs_tally_chunk_delete AFTER DELETE ON main.chunks BEGIN"
    f" {_remove_class('OLD')} {_remove_damage(_groups(_of_queue('OLD')))} END",
    "CREATE TEMP TRIGGER ecfs_tally_chunk_update AFTER UPDATE OF stores, k, length ON main.chunks"
    f" BEGIN {_remove_class('OLD')} {_remove_damage(_groups(_of_queue('OLD')))}"
    f" {_add_class('NEW')} {_add_damage(_of_queue('NEW'))} END",
    "CREATE TEMP TRIGGER ecfs_tally_queue_insert AFTER INSERT ON main.repair_queue BEGIN"
    f" {_add_damage(_of_chunk('NEW.bad', 'NEW.chunk_id'))} END",
    "CREATE TEMP TRIGGER ecfs_tally_queue_delete AFTER DELETE ON main.repair_queue BEGIN"
    f" {_remove_damage(_groups(_of_chunk('OLD.bad', 'OLD.chunk_id')))} END",
    "CREATE TEMP TRIGGER ecfs_tally_queue_update AFTER UPDATE OF bad, chunk_id"
    " ON main.repair_queue BEGIN"
    f" {_remove_damage(_groups(_of_chunk('OLD.bad', 'OLD.chunk_id')))}"
    f" {_add_damage(_of_chunk('NEW.bad', 'NEW.chunk_id'))} END",
)


def _kept(db: Database) -> bool:
    """Whether the tallies are kept on `db`'s connection, installing them
    first if they are not and `db` is not in a transaction."""
    if db.query_one(_INSTALLED):
        return True
    if db.in_transaction:
        return False
    db.install_temp(_DDL)
    return True


def redundancy_classes(db: Database) -> list[tuple[Any, ...]]:
    """(stores blob, k or 0, chunks, bytes) per class with chunks."""
    if _kept(db):
        return db.query("SELECT stores, k, chunks, bytes FROM temp.ecfs_classes WHERE chunks > 0")
    return db.query(_CLASSES_SCAN)


def known_damage(db: Database) -> list[tuple[Any, ...]]:
    """(stores blob, k or 0, bad mask, chunks) per group with chunks."""
    if _kept(db):
        return db.query("SELECT stores, k, bad, chunks FROM temp.ecfs_damage WHERE chunks > 0")
    return db.query(_DAMAGE_SCAN)
