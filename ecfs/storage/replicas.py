"""Metadata replicas: copies of the metadata database on m+1 stores.

Owns: the replica database files (one per replica store,
``<store>/meta/ecfs-meta.sqlite``), shipping committed transactions of the
mount's working copy to them in order (`Replicator`), checking every copy
and choosing the one the mount starts from (`inspect_copy`, `choose_copy`,
`prepare_working_copy`), rewriting the others (`resync_replicas`), and
verifying the live replicas online (`Replicator.verify_replicas`, for scrub).

Copies kept as objects on an object store (`ecfs.storage.metaobjects`)
use the same machinery: they are rebuilt into local files that are
inspected and chosen like the others (`prepare_working_copy`'s `known`
names those that could not be rebuilt), rewritten through
`resync_replicas`'s `rewrite`, and shipped to by a `_Replica` subclass
whose `before_commit` PUTs each batch (`ReplicaTarget`); the SQL they need
(`replay_batches`, `_Replica.image_blocking`) stays here.

Must not: build SQL of its own beyond ``replica_state`` (statements come
ready-made, deterministic, from the metadata layer, see
`ecfs.core.model.Transaction`), touch fragment files (it only awaits the caller's
``sync_stores()``), open the working copy while the mount uses it, write
any copy before every copy was checked and one chosen, or run any replica
I/O on the event loop (everything goes through the store's
`StoreRunner.call`).

On disk: every database has the table ``replica_state(id INTEGER PRIMARY
KEY CHECK (id = 0), generation INTEGER NOT NULL, digest TEXT)`` with one
row (see `ecfs.storage.metadb.schema`). A database at generation g has applied
exactly transactions 1..g, and `digest` is the content digest of its rows
(`ecfs.storage.metadb.digest`): the sum of one hash per row, which the working copy
keeps current row by row and records in every transaction, so that each
copy claims the digest of its own rows at its own generation. Replicas run
with ``journal_mode=WAL`` and ``synchronous=FULL``, so a COMMIT that
returned is on the disk.

Which copy the mount uses (issue 13: one bad copy must never win, nor
spread). Design choice: a content digest recorded with every generation,
not a running digest of the statements. A running digest would let copies
at one generation be compared cheaply, but says nothing about whether a
copy's rows are still the ones it was given; the sum of row hashes does
both, for ~1-2 us per changed row on the working copy (measured: a
small-file create with its inline data went from ~21 to ~25 us of
metadata work), and nothing on the replicas. Every copy is inspected,
read-only, before anything is written:

- usable: it opens, passes ``PRAGMA quick_check``, its ``sqlite_master``
  is exactly the schema of a known version (any other table, index, view
  or trigger, e.g. ``AFTER UPDATE ON replica_state BEGIN DELETE FROM
  chunks; END``, refuses it), it belongs to the stores' volume and
  geometry and lists every store given, and (schema 2) its rows give the
  digest it records. That catches a flipped bit in any row, rows deleted
  or edited by hand with or without a raised generation, and another
  volume's copy with a huge generation.
- chosen: the freshest usable copy; copies of schema 1 (volumes made
  before digests existed, unverifiable) count only when no copy of schema
  2 is usable. Copies at the freshest generation with different contents
  (only possible if someone forged a digest, or for schema 1) are decided
  by majority; a tie chooses none and the mount is refused: nothing is
  picked blindly by position. Copies that merely lag are stale. Last
  resort, when no copy is usable: two or more copies at the freshest
  generation whose only fault is that their rows do not give their
  recorded digest, and that all hold the same rows, are used unverified
  with a warning and get a digest recorded anew (an older ecfs that keeps
  no digest mounted the volume; damage does not make copies agree).
- only then, and only after the volume's own checks passed, are the stale
  and refused copies rewritten from the working copy (`resync_replicas`;
  a refused file is kept as ``<name>.refused``). A mount that fails has
  written no copy. A chosen copy of schema 1 is upgraded in the working
  copy (`ecfs.storage.metadb.schema.upgrade_database`) and every copy rewritten.

The inline data of small files additionally carries its own checksum
(``inodes.inline_checksum``), verified on every read (EIO on a mismatch).
A forged copy whose digest was recomputed to match its rows, at a higher
generation than the others, is not detected: defending against a writer
who knows the format is beyond checksums.

Durability rule (the crash-safety invariant): a replica never commits a
transaction before every fragment file that transaction references is
durable. The replicator awaits the caller's ``sync_stores()`` once per
batch, after taking the batch and before applying it to any replica.

Concurrency contract (`Replicator`): all its methods run on the trio
thread. `submit` only appends to an in-memory deque and sets an event.
`run` is the only task that applies batches. Every call on a replica's
connection (open, apply, verify, close) goes through `Replicator._call`
or holds the replica's ``turn`` (a trio lock), so for one replica at most
one call is in flight at a time (calls for one replica are strictly
sequential), and each replica's connection is further guarded by a
``threading.Lock`` taken without blocking inside the worker thread, so a
call abandoned by a timeout or a cancellation that is still running in
its thread can never share the connection with a later call (the later
call fails, the connection is leaked rather than closed under it). A replica whose call
fails or times out is marked stale and never used again by this
replicator; its file is rewritten by `copy_database` at the next mount,
or by the volume placing a fresh copy, after `close_stale` closed the old
connection (SQLite deletes ``<file>-wal`` by name when the last
connection closes: a forgotten one must never outlive its file).
`verify_replicas` (scrub) checks each live replica on the replica's own
connection, in its turn between two batches (the batches wait for it),
after closing and reopening that connection so that the file on the disk
is read, not the connection's page cache; a bad replica is dropped like a
failed one (`drop_replica`).

Replica connections use ``locking_mode=EXCLUSIVE`` (set before the first
access): the WAL index then lives in the process's heap and
``<file>-shm`` is never mapped, because a page fault on a mapped file
whose disk fails is a SIGBUS that kills the daemon (see `_Replica._open`).
The file stays locked while the replicator has it open: nothing else
(another process, or a second connection) can read it then. Short reads
at mount and by fsck, under the volume lock, open a copy ``immutable=1``
unless a crash left WAL frames to read (`_connect_read_only`).
`wait_durable` waits on an event that `run` replaces every time the
durable generation or the set of live replicas changes. A replica added
while a batch is being applied (its copy taken at a generation inside the
batch) is given the rest of that batch before the batch is forgotten.

What a crash leaves behind, step by step:

- while transactions wait in the deque: they are lost, the working copy
  is discarded at the next mount; nothing acknowledged is lost because
  `wait_durable` had not returned for them.
- during ``sync_stores()``: some fragment files are durable, none is
  referenced by a replica yet (orphans, which fsck may collect).
- during the apply: each replica either committed the whole batch or
  none of it (one SQLite transaction), so replicas are at different
  generations <= submitted, each internally consistent; every generation
  that `wait_durable` acknowledged is on every replica that was live then.
- at the next mount the freshest usable replica wins (see above: every
  replica of a crashed mount still verifies, since each committed its
  whole batch or none of it) and the others are overwritten with it.
- during `copy_database`: the destination is either its old consistent
  file (older generation; its WAL may already be removed, which only
  loses frames of a stale replica) or the new complete copy; a leftover
  ``.<name>.<pid>.tmp`` file is ignored and removed by the next copy.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from ..core.errors import EcfsError, NoSpace, StoreError, VolumeError
from ..core.model import Transaction
from .metadb.digest import SCHEMA_KEY, format_digest, tables_of
from .metadb.schema import (
    SCHEMA_VERSION,
    record_digest,
    schema_difference,
    schema_version,
    upgrade_database,
)
from .store import irregular_entry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: File name of a replica database inside a store's metadata directory.
REPLICA_FILENAME = "ecfs-meta.sqlite"

#: SQLite primary result codes that say the disk or the file is bad (the
#: store is unhealthy). Any other SQLite error (constraint, SQL error,
#: busy) says the replica disagrees with the working copy: ReplicaError.
_STORE_RESULT_CODES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)

#: Seconds `Replicator.close_stale` waits for an abandoned call to let go
#: of a stale replica's connection.
CLOSE_STALE_WAIT = 2.0

#: Suffixes of the side files SQLite may keep next to a database.
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")

#: Size of a WAL file's header: a ``-wal`` no longer than this has no frames.
_WAL_HEADER_SIZE = 32


class ReplicaError(EcfsError):
    """A replica cannot take the next batch for a reason that is not the
    store's health: it is at an unexpected generation, a statement fails on
    it (it diverged), or its connection is still held by an abandoned call.

    Deliberately not a StoreError, so `StoreRunner` does not mark the
    whole store FAILED for it.
    """


class Runner(Protocol):
    """What the replicator needs of `ecfs.storage.offload.StoreRunner`."""

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109 (per-call deadline is the API)
    ) -> T: ...


# ---------------------------------------------------------------- blocking helpers


def replica_path(meta_dir: Path) -> Path:
    """The replica database inside a store's metadata directory."""
    return meta_dir / REPLICA_FILENAME


def read_generation(path: Path) -> int | None:
    """Blocking. The generation of the database at `path`, or None if it is
    unusable: missing, not a database, failing ``PRAGMA quick_check``, or
    without a readable ``replica_state`` row.

    Opens the file read-only (it may create the ``-shm`` side file to read
    a WAL left by a crash), and only if it and its side files are regular
    files or absent (a symlink or FIFO planted there is never opened). Never raises for a bad file; logs why at
    WARNING (a missing file only at INFO: it is normal for a new replica).
    """
    irregular = _irregular_file(path)
    if irregular is not None:
        log.warning("metadata replica %s is unusable: %s", path, irregular)
        return None
    if not path.exists():
        log.info("metadata replica %s does not exist", path)
        return None
    try:
        conn = _connect_read_only(path)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                log.warning("metadata replica %s is corrupt: %s", path, "; ".join(problems[:3]))
                return None
            return _generation_of(conn)
        finally:
            conn.close()
    except (sqlite3.Error, OSError, ReplicaError, ValueError) as exc:
        # ValueError: a damaged file can make SQLite hand back text that is
        # not valid UTF-8 (UnicodeDecodeError) or absurd values.
        log.warning("metadata replica %s is unreadable: %s", path, exc)
        return None


def copy_database(src: Path, dst: Path) -> None:
    """Blocking. Replace `dst` with a consistent, durable copy of `src`.

    Uses SQLite's backup API (so `src` may have a WAL left by a crash) into
    a temp file beside `dst`, switches the copy to ``journal_mode=DELETE``
    (no side files), fsyncs it, removes `dst`'s stale ``-wal``/``-shm``/
    ``-journal`` (fsyncing the directory), renames the copy over `dst` and
    fsyncs the directory. The parent directory of `dst` must exist.
    Raises StoreError on any failure; `dst` is then unchanged or lost only
    its stale side files (see the module docstring).
    """
    if src.absolute() == dst.absolute():
        raise ValueError(f"copy_database: source and destination are both {src}")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        _remove_stale_temps(dst)
        _backup_into(src, tmp)
        _fsync_path(tmp)
        for suffix in _SIDE_SUFFIXES:
            _remove_if_exists(_side_file(dst, suffix))
        _fsync_directory(dst.parent)
        os.replace(tmp, dst)
        _fsync_directory(dst.parent)
    except (sqlite3.Error, OSError) as exc:
        _remove_with_side_files(tmp)
        raise StoreError(f"cannot copy metadata {src} to {dst}: {exc}") from exc
    except BaseException:
        _remove_with_side_files(tmp)
        raise


def place_replica(snapshot: Path, target: Path) -> None:
    """Blocking: install a snapshot of the working copy as a new replica.
    A failure is a ReplicaError, not a StoreError: a store that cannot take
    a replica (full, say) still serves its fragments, so its health must
    not suffer (the caller tries another store)."""
    try:
        target.parent.mkdir(exist_ok=True)
        copy_database(snapshot, target)
    except (StoreError, OSError) as exc:
        raise ReplicaError(f"cannot place a metadata replica at {target}: {exc}") from exc


@dataclass(frozen=True)
class CopyExpectation:
    """What a metadata copy must match to be used: the volume id and
    geometry of the stores' markers, and the store ids of the stores given
    (every one must be in the copy's store table)."""

    volume_id: str
    k: int
    m: int
    store_ids: frozenset[str]
    #: store id -> where it was given (for messages).
    store_paths: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class CopyInspection:
    """What `inspect_copy` found out about one copy (read-only).

    `problem`: why the copy cannot be used (None: it can). `missing`: the
    file does not exist (normal for a new replica; not a refusal).
    `schema`: its schema version; `digest`: the content digest of its rows;
    `claimed`: the digest it records (schema >= 2). `tables`: per-table
    digests (for naming what differs). A usable schema-2 copy is
    `verified`: its rows give the digest it records. `unrecorded`: the
    only problem is that they do not.
    """

    path: Path
    problem: str | None = None
    missing: bool = False
    unrecorded: bool = False
    generation: int = -1
    schema: int = 0
    digest: str = ""
    claimed: str | None = None
    tables: dict[str, str] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.problem is None and self.schema >= 2 and self.claimed == self.digest


def _irregular_file(path: Path) -> str | None:
    """Why SQLite must not open the database at `path`: it or one of its
    side files is there but not a regular file (SQLite would follow a
    symlink, or block forever opening a FIFO); None if all are regular or
    absent."""
    for candidate in (path, *(_side_file(path, s) for s in _SIDE_SUFFIXES)):
        kind = irregular_entry(candidate)
        if kind is not None:
            return f"{candidate} is {kind}"
    return None


def inspect_copy(path: Path, expect: CopyExpectation | None = None) -> CopyInspection:
    """Blocking and read-only. Check one metadata copy: readable, passes
    ``PRAGMA quick_check``, has a known schema and nothing else (no
    trigger, view, extra table or index), belongs to `expect`'s volume and
    knows its stores, and (schema >= 2) its rows give the digest it
    records. Reads every row once (the content digest). Never raises for a
    bad file. SQLite may create the ``-shm`` side file it needs to read a
    WAL left by a crash."""
    irregular = _irregular_file(path)
    if irregular is not None:
        return CopyInspection(path, problem=f"it is unusable: {irregular}")
    if not path.exists():
        return CopyInspection(path, problem="it does not exist", missing=True)
    try:
        conn = _connect_read_only(path)
        try:
            conn.execute("BEGIN")  # one snapshot for the generation and the rows
            return _inspect(conn, path, expect)
        finally:
            conn.close()
    except (sqlite3.Error, OSError, ReplicaError, ValueError) as exc:
        # ValueError: a damaged file can make SQLite hand back text that is
        # not valid UTF-8 (UnicodeDecodeError) or absurd values.
        return CopyInspection(path, problem=f"it is unreadable: {exc}")


def inspect_known(
    path: Path, expect: CopyExpectation | None, known: Mapping[Path, str] | None
) -> CopyInspection:
    """`inspect_copy`, unless `known` already says why `path` is unusable."""
    if known and path in known:
        return CopyInspection(path, problem=known[path])
    return inspect_copy(path, expect)


def _inspect(
    conn: sqlite3.Connection, path: Path, expect: CopyExpectation | None
) -> CopyInspection:
    problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        return CopyInspection(path, problem="it is corrupt: " + "; ".join(problems[:3]))
    version = schema_version(conn)
    if version is None:
        return CopyInspection(
            path, problem=f"its schema is not ecfs's ({schema_difference(conn)})"
        )
    generation = _generation_of(conn)
    params = dict(conn.execute("SELECT key, value FROM volume").fetchall())
    if params.get("schema") != str(version):
        return CopyInspection(
            path, problem=f"it says schema {params.get('schema')!r} but has schema {version}"
        )
    if expect is not None:
        problem = _mismatch(conn, params, expect)
        if problem is not None:
            return CopyInspection(path, problem=problem, generation=generation)
    claimed = None
    if version >= 2:
        (claimed,) = conn.execute("SELECT digest FROM replica_state WHERE id = 0").fetchone()
    tables = tables_of(conn)
    digest = format_digest(sum(int(v, 16) for k, v in tables.items() if k != SCHEMA_KEY))
    inspection = CopyInspection(
        path,
        generation=generation,
        schema=version,
        digest=digest,
        claimed=claimed,
        tables=tables,
    )
    if claimed is not None and claimed != digest:
        return replace(
            inspection,
            unrecorded=True,
            problem=f"its rows do not give the digest it records for generation {generation}"
            " (changed outside ecfs: damaged, edited, or its generation raised by hand)",
        )
    return inspection


def _mismatch(
    conn: sqlite3.Connection, params: dict[str, str], expect: CopyExpectation
) -> str | None:
    """Why the copy does not belong to `expect`'s volume, or None."""
    if params.get("uuid") != expect.volume_id:
        return f"it belongs to volume {params.get('uuid')!r}, the stores to {expect.volume_id}"
    if (params.get("k"), params.get("m")) != (str(expect.k), str(expect.m)):
        return (
            f"its geometry k={params.get('k')} m={params.get('m')} is not the stores'"
            f" (k={expect.k} m={expect.m})"
        )
    table = {str(row[0]) for row in conn.execute("SELECT store_id FROM stores")}
    unknown = sorted(expect.store_ids - table)
    if unknown:
        named = ", ".join(f"{expect.store_paths.get(u, u)} ({u})" for u in unknown)
        return f"it does not list store(s) {named}: not (or no longer) part of its volume"
    return None  # too many missing stores is the volume's problem, not the copy's


@dataclass(frozen=True)
class CopyChoice:
    """Which copy becomes the working copy (`choose_copy`).

    `winner`: None if no copy can be chosen (`problem` says why).
    `current`: copies with the winner's generation and content (input
    order). `stale`: usable copies that are only older (or of an older
    schema). `refused`: path -> why it must not be used (unusable, or
    different content at the winning generation). `missing`: copies that
    do not exist. `trusted`: the winner's content is verified (schema >= 2)
    or (schema 1) every usable copy at its generation agrees with it.
    `note`: a warning about the choice (the last resort was taken).
    """

    winner: CopyInspection | None
    current: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)
    refused: dict[Path, str] = field(default_factory=dict)
    missing: list[Path] = field(default_factory=list)
    problem: str | None = None
    trusted: bool = False
    note: str | None = None

    @property
    def disagree(self) -> bool:
        """Some existing copy was refused or none could be chosen."""
        return self.winner is None or bool(self.refused)


def choose_copy(inspections: Sequence[CopyInspection]) -> CopyChoice:
    """Pure. The rule (see the module docstring): usable copies only; if
    any has schema >= 2 (verified content), copies of schema 1 are only
    stale; the freshest generation wins; copies at that generation with
    different contents are decided by majority, and a tie chooses none.
    When no copy is usable, copies whose rows merely do not give their
    recorded digest may still be chosen, unverified (`_agreeing_unrecorded`)."""
    refused = {i.path: str(i.problem) for i in inspections if i.problem and not i.missing}
    missing = [i.path for i in inspections if i.missing]
    usable = [i for i in inspections if i.problem is None]
    note = None
    if not usable:
        usable = _agreeing_unrecorded(inspections)
        if usable:
            for inspection in usable:
                del refused[inspection.path]
            usable = [replace(i, problem=None) for i in usable]
            note = (
                f"no copy's rows give the digest it records, but the {len(usable)} copies at"
                f" generation {usable[0].generation} agree (written by an older ecfs after"
                " this one?): using them, unverified"
            )
    pool = [i for i in usable if i.schema >= 2] or usable
    if not pool:
        return CopyChoice(None, refused=refused, missing=missing, problem="no copy is usable")
    top = max(i.generation for i in pool)
    at_top = [i for i in pool if i.generation == top]
    votes: dict[str, int] = {}
    for inspection in at_top:
        votes[inspection.digest] = votes.get(inspection.digest, 0) + 1
    most = max(votes.values())
    leaders = [d for d, n in votes.items() if n == most]
    if len(leaders) > 1:
        names = ", ".join(str(i.path) for i in at_top)
        return CopyChoice(
            None,
            refused=refused,
            missing=missing,
            problem=f"the copies at generation {top} ({names}) hold different contents"
            " and none has a majority",
        )
    winner = next(i for i in at_top if i.digest == leaders[0])
    current = [i.path for i in at_top if i.digest == winner.digest]
    for inspection in at_top:
        if inspection.digest != winner.digest:
            tables = sorted(
                t
                for t in {*inspection.tables, *winner.tables}
                if inspection.tables.get(t) != winner.tables.get(t)
            )
            refused[inspection.path] = (
                f"it is at generation {top} like {winner.path} but holds other contents"
                f" (in {', '.join(tables)}); {len(current)} of {len(at_top)} copies agree"
                " with the other"
            )
    stale = [i.path for i in usable if i.path not in current and i.path not in refused]
    unanimous = len(current) == len(at_top)
    trusted = winner.verified or (winner.schema < 2 and unanimous)
    return CopyChoice(winner, current, stale, refused, missing, trusted=trusted, note=note)


def _agreeing_unrecorded(inspections: Sequence[CopyInspection]) -> list[CopyInspection]:
    """The last resort when no copy is usable: copies whose only problem is
    a digest that does not match their rows (an older ecfs wrote to the
    volume after this one: it did not keep the digest), if at least two
    are at the freshest such generation and all of those hold the same
    rows. Damage does not make copies agree; a downgrade does."""
    unrecorded = [i for i in inspections if i.unrecorded]
    if not unrecorded:
        return []
    top = max(i.generation for i in unrecorded)
    at_top = [i for i in unrecorded if i.generation == top]
    if len(at_top) < 2 or len({i.digest for i in at_top}) != 1:
        return []
    return at_top


@dataclass
class PreparedMetadata:
    """Result of `prepare_working_copy`, completed by `resync_replicas`.

    `generation`: the working copy's generation. `current`: replica paths
    at `generation` with its content, in input order, i.e. the targets to
    give the Replicator (after `resync_replicas`, including the rewritten
    ones). `to_resync`: copies to rewrite from the working copy (stale,
    refused). `refused`: copies that must not be used -> why.
    `resynced`: copies rewritten. `failed`: copies that could not be
    read or rewritten -> reason; they must not be used this mount.
    `paths`: every copy looked at, in input order.
    """

    generation: int
    current: list[Path]
    to_resync: list[Path] = field(default_factory=list)
    refused: dict[Path, str] = field(default_factory=dict)
    resynced: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)


def prepare_working_copy(
    replica_paths: Sequence[Path],
    working_path: Path,
    expect: CopyExpectation | None = None,
    known: Mapping[Path, str] | None = None,
) -> PreparedMetadata:
    """Blocking, at mount before serving. Inspect every copy (`inspect_copy`,
    read-only), choose one (`choose_copy`), copy it to `working_path` and
    upgrade that to the current schema if it is older. Writes nothing but
    `working_path`: the caller checks what else it must and then calls
    `resync_replicas` to rewrite the stale and refused copies.

    Each refused copy is logged at WARNING with its path and why. If the
    chosen copy cannot be copied, the choice is made again without it.
    VolumeError if no copy can be chosen. Reads every copy whole (about
    3 us per row, e.g. 0.6 s per copy for 100,000 files), the copies in
    parallel. `known`: copies already found unusable (path -> why, e.g. an
    object copy whose snapshot failed its checksum, see
    `ecfs.storage.metaobjects`): refused without being opened.
    """
    # One thread per copy: they are on different disks, and SQLite reads
    # and checks pages without holding the GIL (the row hashing does hold it).
    with ThreadPoolExecutor(max_workers=max(1, len(replica_paths))) as pool:
        inspections = list(
            pool.map(lambda path: inspect_known(path, expect, known), replica_paths)
        )
    first = choose_copy(inspections)
    for path, why in first.refused.items():
        log.warning("metadata replica %s refused: %s", path, why)
    if first.note:
        log.warning("metadata replicas: %s", first.note)
    failed: dict[Path, str] = {}
    while True:
        choice = choose_copy(inspections)
        if choice.winner is None:
            reasons = "; ".join(f"{p}: {r}" for p, r in {**choice.refused, **failed}.items())
            raise VolumeError(
                f"no metadata replica can be used ({choice.problem})"
                + (f": {reasons}" if reasons else "")
            )
        source = choice.winner
        try:
            copy_database(source.path, working_path)
        except StoreError as exc:
            log.warning("cannot use metadata replica %s: %s", source.path, exc)
            failed[source.path] = str(exc)
            inspections = [
                replace(i, problem=str(exc)) if i.path == source.path else i for i in inspections
            ]
            continue
        break
    generation = source.generation
    current = list(choice.current)
    to_resync = [p for p in replica_paths if p in choice.stale or p in choice.refused]
    to_resync = [p for p in to_resync if p not in failed]
    if source.schema < SCHEMA_VERSION:
        generation = upgrade_database(working_path)
        log.warning(
            "metadata upgraded from schema %d to %d (generation %d); every replica is rewritten",
            source.schema,
            SCHEMA_VERSION,
            generation,
        )
    elif not source.verified:
        generation = record_digest(working_path)
        log.warning(
            "metadata: the digest of the rows is recorded anew (generation %d); every"
            " replica is rewritten",
            generation,
        )
    if generation != source.generation:
        to_resync = [p for p in replica_paths if p in to_resync or p in current]
        current = []
    log.info(
        "metadata: using replica %s at generation %d%s",
        source.path,
        source.generation,
        "" if source.verified else " (content not verified)",
    )
    return PreparedMetadata(
        generation, current, to_resync, dict(choice.refused), [], failed, list(replica_paths)
    )


def resync_replicas(
    prepared: PreparedMetadata,
    working_path: Path,
    rewrite: Mapping[Path, Callable[[Path, bool], None]] | None = None,
) -> None:
    """Blocking. Rewrite every copy in ``prepared.to_resync`` from the
    working copy (creating its parent directory if needed); a refused copy
    is first set aside as ``<name>.refused`` (replacing an older one), so
    its contents can still be examined. A copy in `rewrite` is rewritten
    by ``rewrite[path](working_path, refused)`` instead (an object copy:
    `ecfs.storage.metaobjects.ObjectCopy.install`). Updates
    ``prepared.current``, ``resynced`` and ``failed``; a copy that cannot
    be rewritten is logged at WARNING and must not be used this mount."""
    for path in prepared.to_resync:
        try:
            if rewrite is not None and path in rewrite:
                rewrite[path](working_path, path in prepared.refused)
                log.info("resynced metadata copy %s to generation %d", path, prepared.generation)
                prepared.resynced.append(path)
                continue
            path.parent.mkdir(exist_ok=True)
            if path in prepared.refused:
                set_aside(path)
            copy_database(working_path, path)
        except (EcfsError, OSError) as exc:
            log.warning("cannot resync metadata replica %s: %s", path, exc)
            prepared.failed[path] = str(exc)
            continue
        log.info("resynced metadata replica %s to generation %d", path, prepared.generation)
        prepared.resynced.append(path)
    now_current = {*prepared.current, *prepared.resynced}
    prepared.current = [p for p in prepared.paths if p in now_current]
    prepared.to_resync = []


def set_aside(path: Path) -> None:
    """Blocking. Rename a refused copy (and its side files) to
    ``<name>.refused``, replacing an older one: it is kept for a look, never
    read by ecfs."""
    aside = path.with_name(path.name + ".refused")
    for suffix in ("", *_SIDE_SUFFIXES):
        _remove_if_exists(_side_file(aside, suffix))
    for suffix in ("", *_SIDE_SUFFIXES):
        try:
            os.replace(_side_file(path, suffix), _side_file(aside, suffix))
        except FileNotFoundError:
            pass


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection for one short read of a copy that nothing
    else opens meanwhile: the caller holds the volume lock (mount before
    serving, fsck) or the file is a private snapshot.

    A connection in WAL mode maps the ``-shm`` wal-index, and a page fault
    on a mapped file whose filesystem fails is a SIGBUS, which kills the
    process. So when the copy has no WAL frames to read (no ``-wal`` or one
    without frames, the normal case: a closed replica checkpoints and
    deletes its WAL) nor a rollback journal, it is opened ``immutable=1``:
    the file alone is the content and nothing changes it while we read,
    and SQLite then takes no lock, creates no side file and maps nothing.
    Only a WAL left by a crash is read the ordinary way, which maps
    ``-shm`` for the duration of this read: its frames must be read, and
    the alternative that avoids the mapping (exclusive locking, as the
    replicator's connections use) needs a writable connection, which
    checkpoints into the copy when it closes, i.e. writes a copy before it
    was chosen (immutable=1 would silently ignore the frames).
    """
    uri = path.absolute().as_uri() + "?mode=ro"
    if not _has_side_content(path):
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True)


def _has_side_content(path: Path) -> bool:
    """Whether `path` has WAL frames or a (hot) rollback journal beside it."""
    for suffix, empty in (("-wal", _WAL_HEADER_SIZE), ("-journal", 0)):
        try:
            if os.stat(_side_file(path, suffix)).st_size > empty:
                return True
        except FileNotFoundError:
            continue
    return False


def _generation_of(conn: sqlite3.Connection) -> int:
    """The generation in ``replica_state`` (ReplicaError if there is none)."""
    row = conn.execute("SELECT generation FROM replica_state WHERE id = 0").fetchone()
    if row is None or not isinstance(row[0], int):
        raise ReplicaError(f"replica_state has no valid generation row: {row!r}")
    return row[0]


def _backup_into(src: Path, tmp: Path) -> None:
    """Backup API copy of `src` into a fresh file `tmp`, left without side files."""
    _remove_with_side_files(tmp)
    # Created 0600 before SQLite opens it: metadata is private (SQLite
    # itself would create it with the umask's mode, typically 0644).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    source = _connect_read_only(src)
    try:
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            source.backup(target)
            (mode,) = target.execute("PRAGMA journal_mode=DELETE").fetchone()
            if str(mode).lower() != "delete":
                raise sqlite3.OperationalError(f"cannot leave WAL mode (journal_mode={mode})")
        finally:
            target.close()
    finally:
        source.close()


def _side_file(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_if_exists(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_replica(path: Path) -> None:
    """Blocking: delete a replica that is no longer wanted (an out-of-date
    copy, replaced by one on another store), with its side files."""
    _remove_with_side_files(path)


def _remove_with_side_files(path: Path) -> None:
    """Best-effort removal of a temp database and its side files."""
    for candidate in (path, *(_side_file(path, s) for s in _SIDE_SUFFIXES)):
        try:
            _remove_if_exists(candidate)
        except OSError as exc:
            log.warning("cannot remove %s: %s", candidate, exc)


def _remove_stale_temps(dst: Path) -> None:
    """Remove temp copies of `dst` left by a crashed `copy_database`."""
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):
        _remove_with_side_files(stale)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate_sqlite_error(exc: sqlite3.Error, what: str) -> EcfsError:
    """StoreError (NoSpace when full) for disk/file errors, else ReplicaError."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    message = f"{what}: {exc}"
    if primary == sqlite3.SQLITE_FULL:
        return NoSpace(message)
    if primary in _STORE_RESULT_CODES:
        return StoreError(message)
    return ReplicaError(message)


# ---------------------------------------------------------------- one replica


class _Replica:
    """One replica database and its connection, used from worker threads.

    The `*_blocking` methods run in a worker thread of the replica's store,
    each holding `_lock` (taken without blocking: if an abandoned call
    still holds it, the method raises ReplicaError). The replicator makes
    them one at a time, each holding `turn` (a trio lock) for its call
    (`Replicator._call`). `generation` is the last generation this replica
    committed (trio thread only).
    """

    #: ``PRAGMA synchronous`` of the connection: FULL, so that a COMMIT
    #: that returned is on the disk (an object copy's local shadow, which
    #: is only a cache, uses OFF: see `ecfs.storage.metaobjects`).
    synchronous = "FULL"

    def __init__(self, index: int, path: Path, runner: Runner, generation: int) -> None:
        self.index = index
        self.path = path
        self.runner = runner
        self.generation = generation
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.turn = trio.Lock()

    def open_blocking(self) -> None:
        """Open the (existing) file in exclusive locking mode, set WAL +
        synchronous=FULL, check the generation is the one the replicator
        starts from."""
        with self._locked("open"):
            self._conn = self._open(self.generation)

    def verify_blocking(self, generation: int) -> CopyInspection:
        """Scrub: check the file as it is on the disk now (`inspect_copy`'s
        checks), the replica being at `generation`. The connection is
        closed and opened again first: in exclusive locking mode SQLite
        trusts its page cache across transactions (nobody else can take
        the lock), so a change made to the file behind its back would
        otherwise go unseen. Any failure, the reopening included (after
        which the replica has no connection), is returned as the problem:
        the replica must then be dropped."""
        with self._locked("verify"):
            conn, self._conn = self._conn, None
            try:
                if conn is not None:
                    conn.close()  # checkpoints and deletes the WAL (exclusive)
                self._conn = self._open(generation)
                self._conn.execute("BEGIN")  # one snapshot, as in inspect_copy
                try:
                    return _inspect(self._conn, self.path, None)
                finally:
                    self._conn.execute("ROLLBACK")
            except (sqlite3.Error, OSError, EcfsError, ValueError) as exc:
                return CopyInspection(self.path, problem=f"it is unreadable: {exc}")

    def _open(self, generation: int) -> sqlite3.Connection:
        """A connection to the file in exclusive locking mode and WAL with
        synchronous=FULL, at `generation` (the caller holds `_lock`).

        ``locking_mode=EXCLUSIVE`` is set before the first access to the
        file: SQLite then keeps the WAL index in heap memory and never maps
        ``<file>-shm`` (https://www.sqlite.org/wal.html, "Use of WAL
        Without Shared-Memory"). A page fault on a mapped file whose
        filesystem fails (a disk dying under its store) is a SIGBUS, which
        no Python code can catch: the daemon would die with it. Read or
        write errors are ordinary SQLite errors instead. The connection
        keeps the file locked: no other connection can read it while it is
        open (see `verify_blocking`)."""
        try:
            conn = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=rw",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise _translate_sqlite_error(exc, f"open {self.path}") from exc
        try:
            (locking,) = conn.execute("PRAGMA locking_mode=EXCLUSIVE").fetchone()
            if str(locking).lower() != "exclusive":
                raise ReplicaError(f"cannot lock {self.path} exclusively ({locking})")
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise ReplicaError(f"cannot switch {self.path} to WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            found = _generation_of(conn)
            if found != generation:
                raise ReplicaError(f"{self.path} is at generation {found}, expected {generation}")
        except sqlite3.Error as exc:
            conn.close()
            raise _translate_sqlite_error(exc, f"open {self.path}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def apply_blocking(self, batch: Sequence[Transaction], previous: int) -> int:
        """Apply `batch` (generations previous+1.., consecutive) in one
        SQLite transaction; return the new generation. On any error the
        transaction is rolled back and the file stays at `previous`."""
        with self._locked("apply"):
            conn = self._connection()
            last = batch[-1].generation
            try:
                _apply_in_transaction(
                    conn, batch, previous, last, lambda: self.before_commit(batch, previous, last)
                )
            except sqlite3.Error as exc:
                raise _translate_sqlite_error(
                    exc, f"apply generations {previous + 1}..{last} to {self.path}"
                ) from exc
            self.after_commit(last)
            return last

    def before_commit(self, batch: Sequence[Transaction], previous: int, last: int) -> None:
        """Hook, in `apply_blocking`'s transaction just before its COMMIT
        (an exception rolls the batch back). Nothing for a file replica; an
        object copy PUTs the batch's log object here."""

    def after_commit(self, last: int) -> None:
        """Hook, after `apply_blocking` committed generation `last`
        (compaction of an object copy)."""

    def image_blocking(self, target: Path) -> None:
        """A consistent copy of this replica's database (at its generation)
        into the new file `target`, left in ``journal_mode=DELETE``; the
        caller holds `_lock` (an object copy's snapshot of its shadow)."""
        _remove_with_side_files(target)
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        try:
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                self._connection().backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                copy.close()
        except sqlite3.Error as exc:
            _remove_with_side_files(target)
            raise _translate_sqlite_error(exc, f"copy {self.path}") from exc

    def close_blocking(self) -> None:
        """Close the connection (no-op if never opened)."""
        with self._locked("close"):
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise _translate_sqlite_error(exc, f"close {self.path}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ReplicaError(f"{self.path} is not open")
        return self._conn

    def _locked(self, what: str) -> _NonBlockingLock:
        return _NonBlockingLock(self._lock, f"{what} {self.path}")


class _NonBlockingLock:
    """Context manager: take a lock without waiting or raise ReplicaError."""

    def __init__(self, lock: threading.Lock, what: str) -> None:
        self._lock = lock
        self._what = what

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise ReplicaError(f"{self._what}: connection still held by an abandoned call")

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def _apply_in_transaction(
    conn: sqlite3.Connection,
    batch: Sequence[Transaction],
    previous: int,
    last: int,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """BEGIN IMMEDIATE; check generation == previous; run every statement;
    set generation = last; `before_commit()`; COMMIT. Rolls back on any
    exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _generation_of(conn)
        if found != previous:
            raise ReplicaError(f"replica is at generation {found}, expected {previous}")
        for txn in batch:
            for sql, params in txn.statements:
                conn.execute(sql, params)
        cursor = conn.execute("UPDATE replica_state SET generation = ? WHERE id = 0", (last,))
        if cursor.rowcount != 1:
            raise ReplicaError("replica_state row vanished during the batch")
        if before_commit is not None:
            before_commit()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback failed: %s", exc)
        raise


def replay_batches(path: Path, batches: Sequence[Sequence[Transaction]]) -> tuple[int, str | None]:
    """Blocking. Apply `batches` in order, each in one transaction, to the
    private database file `path` (a copy being rebuilt from its objects,
    see `ecfs.storage.metaobjects`); stop at the first that does not apply.
    Returns the generation reached and why it stopped early (None: all
    applied). The file is left in ``journal_mode=DELETE``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=OFF")
        generation = _generation_of(conn)
        for batch in batches:
            if not batch:
                continue
            try:
                _apply_in_transaction(conn, batch, generation, batch[-1].generation)
            except (sqlite3.Error, ReplicaError) as exc:
                return generation, (
                    f"generations {batch[0].generation}..{batch[-1].generation} do not apply: {exc}"
                )
            generation = batch[-1].generation
        return generation, None
    except sqlite3.Error as exc:
        raise _translate_sqlite_error(exc, f"replay into {path}") from exc
    finally:
        conn.close()


class ReplicaTarget(Protocol):
    """A replica that is not a database file on its store (an object copy,
    `ecfs.storage.metaobjects.ObjectTarget`): it makes its own `_Replica`."""

    def make_replica(self, index: int, runner: Runner, generation: int) -> _Replica: ...


def _new_replica(
    index: int, target: Path | ReplicaTarget, runner: Runner, generation: int
) -> _Replica:
    if isinstance(target, Path):
        return _Replica(index, target, runner, generation)
    return target.make_replica(index, runner, generation)


# ---------------------------------------------------------------- the replicator


@dataclass(frozen=True, slots=True)
class ReplicatorStatistics:
    """A snapshot of a Replicator (from `Replicator.statistics()`)."""

    submitted_generation: int
    durable_generation: int
    pending_transactions: int
    batches_applied: int
    live_replicas: tuple[int, ...]
    stale_replicas: tuple[tuple[int, str], ...]


class Replicator:
    """Ships committed transactions of the working copy to replica databases.

    `targets`: store index -> replica path, each already at `generation`,
    or a `ReplicaTarget` (a copy kept as objects, whose replica ships each
    batch as a log object: `ecfs.storage.metaobjects`).
    `runners[i].call` runs blocking functions for store i (limiter, timeout,
    abandon on cancel); all replica I/O goes through it. `sync_stores()`
    makes every fragment write so far durable; it is awaited once per batch
    before the batch is applied anywhere. `timeout` is passed to every
    `call` (None: the runner's default). If `sync_stores` raises
    StoreError, the batch is kept and retried after `retry_delay` seconds.
    `commit_interval`: how long a transaction may wait for company before
    its batch is applied when nobody waits for durability (see
    `_wait_batch`); 0 applies batches as soon as they arrive.
    """

    def __init__(
        self,
        targets: Mapping[int, Path | ReplicaTarget],
        runners: Mapping[int, Runner],
        sync_stores: Callable[[], Awaitable[None]],
        generation: int,
        *,
        max_batch: int = 2000,
        timeout: float | None = None,
        retry_delay: float = 1.0,
        commit_interval: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        missing = set(targets) - set(runners)
        if missing:
            raise ValueError(f"no runner for replica store(s) {sorted(missing)}")
        self._runners = runners
        self._replicas = {
            index: _new_replica(index, target, runners[index], generation)
            for index, target in sorted(targets.items())
        }
        self._live: set[int] = set(self._replicas)
        self._stale: dict[int, str] = {}
        self._sync_stores = sync_stores
        self._max_batch = max_batch
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._pending: deque[Transaction] = deque()
        self._applying: dict[int, trio.CancelScope] = {}
        #: Called (on the loop) whenever a replica goes stale.
        self.on_stale: Callable[[int], None] = lambda index: None
        self._commit_interval = commit_interval
        self._oldest_pending = 0.0
        self._waiters = 0
        self._submitted = generation
        self._durable = generation
        self._batches = 0
        self._pending_event = trio.Event()
        self._changed = trio.Event()
        self._running = False

    # ---- state

    @property
    def submitted_generation(self) -> int:
        """Generation of the last submitted transaction."""
        return self._submitted

    @property
    def durable_generation(self) -> int:
        """Highest generation committed on every live replica (it only grows;
        it stays where it was when no live replica remains)."""
        return self._durable

    def live_replicas(self) -> list[int]:
        """Store indices of the replicas that still receive batches."""
        return sorted(self._live)

    def stale_replicas(self) -> dict[int, str]:
        """Store index -> why it was dropped (resync it at the next mount)."""
        return dict(self._stale)

    def statistics(self) -> ReplicatorStatistics:
        return ReplicatorStatistics(
            submitted_generation=self._submitted,
            durable_generation=self._durable,
            pending_transactions=len(self._pending),
            batches_applied=self._batches,
            live_replicas=tuple(self.live_replicas()),
            stale_replicas=tuple(sorted(self._stale.items())),
        )

    # ---- the metadata layer's side

    def submit(self, txn: Transaction) -> None:
        """Queue a transaction the working copy just committed (non-blocking).

        Raises ValueError unless ``txn.generation == submitted_generation + 1``.
        """
        if txn.generation != self._submitted + 1:
            raise ValueError(
                f"transaction generation {txn.generation} submitted after {self._submitted}"
            )
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(txn)
        self._submitted = txn.generation
        self._pending_event.set()

    async def wait_durable(self, generation: int) -> None:
        """Return once every live replica has committed >= `generation`.

        Raises StoreError if no live replica remains before that (it returns
        for generations that were already durable), ValueError if
        `generation` was never submitted. Needs `run` to be running.
        """
        if generation > self._submitted:
            raise ValueError(f"generation {generation} was not submitted ({self._submitted})")
        await trio.lowlevel.checkpoint()
        self._waiters += 1
        self._pending_event.set()  # apply what is pending now, not later
        try:
            while self._durable < generation:
                if not self._live:
                    raise StoreError(
                        f"no live metadata replica: generation {generation} cannot be made"
                        f" durable (durable: {self._durable}; stale: {self._stale})"
                    )
                await self._changed.wait()
        finally:
            self._waiters -= 1

    async def add_replica(self, index: int, path: Path | ReplicaTarget, generation: int) -> bool:
        """Start shipping to a new (or resynced) replica that already holds
        every transaction up to `generation` (a copy of the working copy
        taken at that generation, which must be >= durable_generation).
        Replaces a stale replica of the same store. False if it cannot be
        opened, or if transactions after `generation` were applied to
        every live replica (and forgotten) while it was being copied: it
        could never catch up (it stays stale; place a newer copy)."""
        runner = self._runners[index]
        replica = _new_replica(index, path, runner, generation)
        try:
            await runner.call(replica.open_blocking, timeout=self._timeout)
        except EcfsError as exc:
            log.warning("cannot add metadata replica on store %d: %s", index, exc)
            return False
        shipped = self._pending[0].generation - 1 if self._pending else self._submitted
        if generation < shipped:  # checked after the last await: nothing is popped meanwhile
            log.info(
                "metadata replica on store %d at generation %d missed generations up to %d"
                " while it was copied: not added",
                index,
                generation,
                shipped,
            )
            await self._close_one(replica)
            return False
        old = self._replicas.get(index)
        if old is not None and index in self._live:
            return True  # raced with another add: keep the one in use
        self._replicas[index] = replica
        self._stale.pop(index, None)
        self._live.add(index)
        log.info("metadata replica on store %d is live at generation %d", index, generation)
        self._notify_changed()
        return True

    async def verify_replicas(self, call_timeout: float | None = None) -> dict[int, str]:
        """Online check of every live replica (scrub), the replicas in
        parallel: `_Replica.verify_blocking` on each, on its own connection
        in its store's runner, in its turn between two batches (a replica's
        batches wait meanwhile: about 3 us per row). A replica whose file,
        content or schema is bad is dropped (stale, which makes the volume
        place a fresh copy, see `on_stale`). Returns store index -> the
        problem, for the replicas found bad or that could not be verified
        (a call that failed or timed out: the replica stays live, and a
        call still running in its thread makes its next batch fail)."""
        problems: dict[int, str] = {}

        def live(replica: _Replica) -> bool:  # not dropped (nor replaced) meanwhile
            return replica.index in self._live and self._replicas[replica.index] is replica

        async def one(replica: _Replica) -> None:
            try:
                async with replica.turn:
                    if not live(replica):
                        return
                    found = await replica.runner.call(
                        replica.verify_blocking, replica.generation, timeout=call_timeout
                    )
            except EcfsError as exc:
                problems[replica.index] = f"cannot verify {replica.path}: {exc}"
                return
            if found.problem is not None and live(replica):
                problems[replica.index] = f"{replica.path}: {found.problem}"
                log.warning(
                    "metadata replica on store %d failed verification: %s",
                    replica.index,
                    problems[replica.index],
                )
                self.drop_replica(replica.index, f"failed verification: {found.problem}")

        async with trio.open_nursery() as nursery:
            for index in sorted(self._live):
                nursery.start_soon(one, self._replicas[index])
        return problems

    async def close_stale(self, index: int) -> bool:
        """Close the connection of a stale replica before its file is
        replaced: SQLite checkpoints and deletes ``<file>-wal`` by name when
        its last connection closes, so a forgotten connection to the old
        file could one day delete the new file's WAL. False if it cannot be
        closed (an abandoned call still holds it): do not replace the file."""
        replica = self._replicas.get(index)
        if replica is None or index in self._live:
            return replica is None
        # A batch abandoned by drop_replica may still be finishing in its
        # thread (it holds the connection): give it a moment.
        deadline = trio.current_time() + CLOSE_STALE_WAIT
        while True:
            try:
                await self._call(replica, replica.close_blocking)
                return True
            except ReplicaError as exc:
                if trio.current_time() >= deadline:
                    log.warning("cannot close stale metadata replica on store %d: %s", index, exc)
                    return False
                await trio.sleep(0.05)
            except EcfsError as exc:
                log.warning("cannot close stale metadata replica on store %d: %s", index, exc)
                return False

    async def drain(self) -> None:
        """Wait until every submitted transaction is durable (for unmount)."""
        await self.wait_durable(self._submitted)

    # ---- the background task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the replicas, report started, then apply batches until cancelled.

        A replica that cannot be opened is marked stale before `started`.
        """
        if self._running:
            raise RuntimeError("Replicator.run is already running")
        self._running = True
        try:
            await self._for_each_live(self._open_one)
            self._notify_changed()
            task_status.started()
            while True:
                batch = await self._wait_batch()
                await self._sync_before_apply()
                await self._apply_batch(batch)
                self._finish_batch(len(batch))
        finally:
            self._running = False

    async def aclose(self) -> None:
        """Close every replica connection (through its runner). Call after
        `run` has ended; errors are logged, never raised."""
        async with trio.open_nursery() as nursery:
            for replica in self._replicas.values():
                nursery.start_soon(self._close_one, replica)

    # ---- internals

    async def _wait_batch(self) -> list[Transaction]:
        """Wait for a batch worth applying; return up to max_batch pending
        transactions (left in the deque until applied).

        Group commit: a batch is applied at once when someone waits for
        durability (fsync, unmount) or max_batch are pending, otherwise at
        most `commit_interval` seconds after the oldest pending transaction
        was submitted (like a journalling filesystem's commit interval).
        With no live replica left the queue is dropped (nothing can take
        it) and waiting continues."""
        while True:
            if self._pending and not self._live:
                log.debug("dropping %d transactions: no live replica", len(self._pending))
                self._pending.clear()
            if self._pending and (
                self._waiters
                or len(self._pending) >= self._max_batch
                or time.monotonic() >= self._oldest_pending + self._commit_interval
            ):
                count = min(len(self._pending), self._max_batch)
                return [self._pending[i] for i in range(count)]
            self._pending_event = trio.Event()
            if self._pending:
                left = self._oldest_pending + self._commit_interval - time.monotonic()
                with trio.move_on_after(max(0.0, left)):
                    await self._pending_event.wait()
            else:
                await self._pending_event.wait()

    async def _sync_before_apply(self) -> None:
        """Await sync_stores(), retrying after StoreError (the batch waits)."""
        while True:
            try:
                await self._sync_stores()
                return
            except StoreError as exc:
                log.warning(
                    "making fragments durable failed (%s); retrying in %.3g s",
                    exc,
                    self._retry_delay,
                )
                await trio.sleep(self._retry_delay)

    async def _for_each_live(
        self, operation: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run ``operation(replica, *args)`` on every live replica concurrently."""
        async with trio.open_nursery() as nursery:
            for index in sorted(self._live):
                nursery.start_soon(operation, self._replicas[index], *args)

    async def _call(self, replica: _Replica, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the replica's runner, in the replica's turn (one
        call per replica at a time; an abandoned call lets go of the turn,
        its thread still holds the connection's lock)."""
        async with replica.turn:
            return await replica.runner.call(fn, *args, timeout=self._timeout)

    async def _apply_batch(self, batch: Sequence[Transaction]) -> None:
        """Apply `batch` to every live replica, including one added (by
        `add_replica`, at a generation inside the batch) while it was being
        applied to the others: the batch is forgotten afterwards, and a
        replica that missed its end would hold the durable generation back
        for good (an fsync() waiting for it hung until a later write)."""
        done: list[_Replica] = []  # the replica objects given the batch

        def not_given(replica: _Replica) -> bool:
            return not any(replica is given for given in done)

        while todo := [r for i in sorted(self._live) if not_given(r := self._replicas[i])]:
            done.extend(todo)
            async with trio.open_nursery() as nursery:
                for replica in todo:
                    nursery.start_soon(self._apply_one, replica, batch)

    async def _open_one(self, replica: _Replica) -> None:
        try:
            await self._call(replica, replica.open_blocking)
        except EcfsError as exc:
            self._mark_stale(replica, f"cannot open {replica.path}: {exc}")

    async def _apply_one(self, replica: _Replica, batch: Sequence[Transaction]) -> None:
        # A replica added mid-run already holds the start of the batch.
        batch = [txn for txn in batch if txn.generation > replica.generation]
        if not batch:
            return
        if batch[0].generation != replica.generation + 1:  # never skip a transaction
            self._mark_stale(
                replica,
                f"it is at generation {replica.generation}, the next batch starts at"
                f" {batch[0].generation}",
            )
            return
        with trio.CancelScope() as scope:
            self._applying[replica.index] = scope
            try:
                replica.generation = await self._call(
                    replica, replica.apply_blocking, batch, replica.generation
                )
            except EcfsError as exc:
                self._mark_stale(replica, str(exc))
            finally:
                self._applying.pop(replica.index, None)

    def lagging(self, generation: int) -> list[int]:
        """Live replicas that have not yet committed `generation`."""
        return sorted(i for i in self._live if self._replicas[i].generation < generation)

    def drop_replica(self, index: int, reason: str) -> None:
        """Stop waiting for a replica whose store failed (e.g. its probe
        timed out): it becomes stale now, and a batch being applied to it is
        abandoned, so fsync() does not wait for a hung store's timeout."""
        replica = self._replicas.get(index)
        if replica is None or index not in self._live:
            return
        self._mark_stale(replica, reason)
        scope = self._applying.pop(index, None)
        if scope is not None:
            scope.cancel()
        self._notify_changed()

    async def _close_one(self, replica: _Replica) -> None:
        try:
            await self._call(replica, replica.close_blocking)
        except EcfsError as exc:
            log.warning("closing metadata replica on store %d failed: %s", replica.index, exc)

    def _finish_batch(self, count: int) -> None:
        """The batch was applied (or failed) everywhere: drop it, advance."""
        for _ in range(count):
            self._pending.popleft()
        self._batches += 1
        self._notify_changed()

    def _mark_stale(self, replica: _Replica, reason: str) -> None:
        if replica.index in self._stale:
            return
        self._live.discard(replica.index)
        self._stale[replica.index] = reason
        self.on_stale(replica.index)
        log.warning(
            "metadata replica on store %d is stale at generation %d (%d live left): %s",
            replica.index,
            replica.generation,
            len(self._live),
            reason,
        )

    def _notify_changed(self) -> None:
        """Recompute the durable generation and wake every waiter."""
        if self._live:
            lowest = min(self._replicas[i].generation for i in self._live)
            self._durable = max(self._durable, lowest)
        self._changed.set()
        self._changed = trio.Event()
