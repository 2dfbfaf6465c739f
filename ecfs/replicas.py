"""Metadata replicas: copies of the metadata database on m+1 stores.

Owns: the replica database files (one per replica store,
``<store>/meta/ecfs-meta.sqlite``), shipping committed transactions of the
mount's working copy to them in order (`Replicator`), choosing the freshest
replica at mount and resyncing the others (`prepare_working_copy`).

Must not: build SQL of its own beyond ``replica_state`` (statements come
ready-made, deterministic, from the metadata layer, see
`ecfs.model.Transaction`), touch fragment files (it only awaits the caller's
``sync_stores()``), open the working copy while the mount uses it, or run
any replica I/O on the event loop (everything goes through the store's
`StoreRunner.call`).

On disk: every database has the table
``replica_state(id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER
NOT NULL)`` with one row (created by `ecfs.metadb.schema`). A database at
generation g has applied exactly transactions 1..g. Replicas run with
``journal_mode=WAL`` and ``synchronous=FULL``, so a COMMIT that returned is
on the disk.

Durability rule (the crash-safety invariant): a replica never commits a
transaction before every fragment file that transaction references is
durable. The replicator awaits the caller's ``sync_stores()`` once per
batch, after taking the batch and before applying it to any replica.

Concurrency contract (`Replicator`): all its methods run on the trio
thread. `submit` only appends to an in-memory deque and sets an event.
`run` is the only task that applies batches; for one replica at most one
call is in flight at a time (calls for one replica are strictly
sequential), and each replica's connection is further guarded by a
``threading.Lock`` taken without blocking inside the worker thread, so a
call abandoned by a timeout that is still running in its thread can never
share the connection with a later call (the later call fails, the
connection is leaked rather than closed under it). A replica whose call
fails or times out is marked stale and never used again by this
replicator; its file is rewritten by `copy_database` at the next mount.
`wait_durable` waits on an event that `run` replaces every time the
durable generation or the set of live replicas changes.

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
- at the next mount the freshest readable replica wins
  (`prepare_working_copy`) and the others are overwritten with it.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from ecfs.errors import EcfsError, NoSpace, StoreError, VolumeError
from ecfs.model import Transaction

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

#: Suffixes of the side files SQLite may keep next to a database.
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")


class ReplicaError(EcfsError):
    """A replica cannot take the next batch for a reason that is not the
    store's health: it is at an unexpected generation, a statement fails on
    it (it diverged), or its connection is still held by an abandoned call.

    Deliberately not a StoreError, so `StoreRunner` does not mark the
    whole store FAILED for it.
    """


class Runner(Protocol):
    """What the replicator needs of `ecfs.offload.StoreRunner`."""

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
    a WAL left by a crash). Never raises for a bad file; logs why at
    WARNING (a missing file only at INFO: it is normal for a new replica).
    """
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


def choose_freshest(paths: Sequence[Path]) -> tuple[Path, int]:
    """Blocking. The readable replica with the highest generation and that
    generation (ties: the first in `paths`). VolumeError if none is readable.
    """
    candidates = _ranked_replicas(paths)
    if not candidates:
        raise VolumeError("no readable metadata replica among: " + ", ".join(str(p) for p in paths))
    return candidates[0]


@dataclass(frozen=True)
class PreparedMetadata:
    """Result of `prepare_working_copy`.

    `generation`: the working copy's (and every current replica's)
    generation. `current`: replica paths now at `generation`, in input
    order, i.e. the targets to give the Replicator. `resynced`: the subset
    of `current` that was rewritten. `failed`: replicas that could not be
    read or rewritten -> reason; they must not be used this mount.
    """

    generation: int
    current: list[Path]
    resynced: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def prepare_working_copy(replica_paths: Sequence[Path], working_path: Path) -> PreparedMetadata:
    """Blocking, at mount before serving. Copy the freshest replica to
    `working_path`, then bring every stale, missing or corrupt replica up to
    date from the working copy (creating its parent directory if needed).

    If the freshest replica cannot be copied, the next freshest is tried
    (and so on); a replica that failed as a source is never overwritten,
    in case it is fresher than what wins. A replica that cannot be
    rewritten is reported in `failed` and logged at WARNING; only when no
    replica can be copied at all does this raise VolumeError.
    """
    ranked = _ranked_replicas(replica_paths)
    failed: dict[Path, str] = {}
    source: Path | None = None
    generation = -1
    for candidate, candidate_generation in ranked:
        try:
            copy_database(candidate, working_path)
        except StoreError as exc:
            log.warning("cannot use metadata replica %s: %s", candidate, exc)
            failed[candidate] = str(exc)
            continue
        source, generation = candidate, candidate_generation
        break
    if source is None:
        reasons = "; ".join(f"{p}: {r}" for p, r in failed.items()) or "none is readable"
        raise VolumeError(
            "no metadata replica could be copied to the working copy"
            f" ({', '.join(str(p) for p in replica_paths)}): {reasons}"
        )
    known = dict(ranked)
    current: list[Path] = []
    resynced: list[Path] = []
    for path in replica_paths:
        if path in failed:
            continue
        if path == source or known.get(path) == generation:
            current.append(path)
            continue
        try:
            path.parent.mkdir(exist_ok=True)
            copy_database(working_path, path)
        except (StoreError, OSError) as exc:
            log.warning("cannot resync metadata replica %s: %s", path, exc)
            failed[path] = str(exc)
            continue
        log.info("resynced metadata replica %s to generation %d", path, generation)
        current.append(path)
        resynced.append(path)
    return PreparedMetadata(generation, current, resynced, failed)


def _ranked_replicas(paths: Sequence[Path]) -> list[tuple[Path, int]]:
    """Readable replicas with their generations, freshest first (stable)."""
    readable: list[tuple[Path, int]] = []
    for path in paths:
        generation = read_generation(path)
        if generation is not None:
            readable.append((path, generation))
    readable.sort(key=lambda item: -item[1])
    return readable


def _connect_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)


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
    still holds it, the method raises ReplicaError). `generation` is the
    last generation this replica committed (trio thread only).
    """

    def __init__(self, index: int, path: Path, runner: Runner, generation: int) -> None:
        self.index = index
        self.path = path
        self.runner = runner
        self.generation = generation
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open_blocking(self) -> None:
        """Open the (existing) file, set WAL + synchronous=FULL, check the
        generation is the one the replicator starts from."""
        with self._locked("open"):
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
                (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise ReplicaError(f"cannot switch {self.path} to WAL (journal_mode={mode})")
                conn.execute("PRAGMA synchronous=FULL")
                found = _generation_of(conn)
                if found != self.generation:
                    raise ReplicaError(
                        f"{self.path} is at generation {found}, expected {self.generation}"
                    )
            except sqlite3.Error as exc:
                conn.close()
                raise _translate_sqlite_error(exc, f"open {self.path}") from exc
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def apply_blocking(self, batch: Sequence[Transaction], previous: int) -> int:
        """Apply `batch` (generations previous+1.., consecutive) in one
        SQLite transaction; return the new generation. On any error the
        transaction is rolled back and the file stays at `previous`."""
        with self._locked("apply"):
            conn = self._connection()
            last = batch[-1].generation
            try:
                _apply_in_transaction(conn, batch, previous, last)
            except sqlite3.Error as exc:
                raise _translate_sqlite_error(
                    exc, f"apply generations {previous + 1}..{last} to {self.path}"
                ) from exc
            return last

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
    conn: sqlite3.Connection, batch: Sequence[Transaction], previous: int, last: int
) -> None:
    """BEGIN IMMEDIATE; check generation == previous; run every statement;
    set generation = last; COMMIT. Rolls back on any exception."""
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
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback failed: %s", exc)
        raise


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

    `targets`: store index -> replica path, each already at `generation`.
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
        targets: Mapping[int, Path],
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
            index: _Replica(index, path, runners[index], generation)
            for index, path in sorted(targets.items())
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

    async def add_replica(self, index: int, path: Path, generation: int) -> bool:
        """Start shipping to a new (or resynced) replica that already holds
        every transaction up to `generation` (a copy of the working copy
        taken at that generation, which must be >= durable_generation).
        Replaces a stale replica of the same store. False if it cannot be
        opened (it stays stale)."""
        runner = self._runners[index]
        replica = _Replica(index, path, runner, generation)
        try:
            await runner.call(replica.open_blocking, timeout=self._timeout)
        except EcfsError as exc:
            log.warning("cannot add metadata replica on store %d: %s", index, exc)
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
                await self._for_each_live(self._apply_one, batch)
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

    async def _open_one(self, replica: _Replica) -> None:
        try:
            await replica.runner.call(replica.open_blocking, timeout=self._timeout)
        except EcfsError as exc:
            self._mark_stale(replica, f"cannot open {replica.path}: {exc}")

    async def _apply_one(self, replica: _Replica, batch: Sequence[Transaction]) -> None:
        # A replica added mid-run already holds the start of the batch.
        batch = [txn for txn in batch if txn.generation > replica.generation]
        if not batch:
            return
        with trio.CancelScope() as scope:
            self._applying[replica.index] = scope
            try:
                replica.generation = await replica.runner.call(
                    replica.apply_blocking, batch, replica.generation, timeout=self._timeout
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
            await replica.runner.call(replica.close_blocking, timeout=self._timeout)
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
