"""Tests of ecfs.storage.replicas: replay, group commit, durability order, stale
replicas, freshest-replica choice and resync at mount.

Real SQLite files in tmp_path; a fake runner (runs the function in a trio
worker thread, can be told to fail or hang) instead of StoreRunner.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
import trio.testing

from ecfs.core.errors import StoreError, StoreTimeout
from ecfs.core.model import Statement, Transaction
from ecfs.storage import replicas
from ecfs.storage.replicas import (
    Replicator,
    _generation_of,
    copy_database,
    read_generation,
    replica_path,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE replica_state (
    id         INTEGER PRIMARY KEY CHECK (id = 0),
    generation INTEGER NOT NULL
);
CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT);
INSERT INTO replica_state (id, generation) VALUES (0, 0);
"""


# ---------------------------------------------------------------- helpers


def make_database(path: Path, transactions: Sequence[Transaction] = ()) -> Path:
    """A WAL database with the test schema, with `transactions` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        for txn in transactions:
            conn.execute("BEGIN")
            for sql, params in txn.statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
    finally:
        conn.close()
    return path


def make_transactions(count: int, start: int = 1) -> list[Transaction]:
    """Deterministic transactions start..start+count-1: inserts, updates,
    deletes and the generation bump, like the metadata layer records them."""
    result = []
    for generation in range(start, start + count):
        statements: list[Statement] = [
            ("INSERT INTO t (a, b) VALUES (?, ?)", (generation, f"row {generation}")),
        ]
        if generation % 3 == 0:
            statements.append(("UPDATE t SET b = b || ? WHERE a = ?", ("!", generation - 1)))
        if generation % 5 == 0:
            statements.append(("DELETE FROM t WHERE a = ?", (generation - 2,)))
        statements.append(("UPDATE replica_state SET generation = ? WHERE id = 0", (generation,)))
        result.append(Transaction(generation, tuple(statements)))
    return result


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def committed_generation(replicator: Replicator, index: int) -> int:
    """The generation replica `index` has committed, read on the
    replicator's own connection: while the replicator has a replica open it
    holds the file in exclusive locking mode, so no other connection can
    read it (the SIGBUS fix: no mapped ``-shm``)."""
    replica = replicator._replicas[index]
    with replica._locked("test read"):
        return _generation_of(replica._connection())


class FakeRunner:
    """Honours the `Runner` protocol: runs fn in a worker thread.

    `fail_on`: names of functions ("open_blocking", "apply_blocking",
    "close_blocking") that raise StoreError instead of running.
    `hang_on`: names that never answer (StoreTimeout after `timeout`).
    `log`: shared list; every call appends (fn name, index) before running.
    Like StoreRunner, a call that outlives `timeout` abandons its thread
    and raises StoreTimeout.
    """

    def __init__(self, index: int, log: list[Any] | None = None) -> None:
        self.index = index
        self.log = log if log is not None else []
        self.fail_on: set[str] = set()
        self.hang_on: set[str] = set()

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> T:
        name = fn.__name__
        self.log.append((name, self.index))
        if name in self.hang_on:
            with trio.move_on_after(timeout if timeout is not None else 0.1):
                await trio.sleep_forever()
            raise StoreTimeout(f"store {self.index}: {name} hung")
        if name in self.fail_on:
            raise StoreError(f"store {self.index}: injected failure in {name}")
        try:
            with trio.fail_after(timeout if timeout is not None else 30):
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise StoreTimeout(f"store {self.index}: {name} timed out") from None


class SyncRecorder:
    """A sync_stores() that logs its calls and can be held closed by a gate."""

    def __init__(self, log: list[Any] | None = None) -> None:
        self.log = log if log is not None else []
        self.calls = 0
        self.gate: trio.Event | None = None
        self.entered = trio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.log.append(("sync", self.calls))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()


def setup_replicas(
    tmp_path: Path, count: int = 3, generation: int = 0
) -> tuple[dict[int, Path], dict[int, FakeRunner], list[Any]]:
    log: list[Any] = []
    history = make_transactions(generation)
    targets = {
        i: make_database(replica_path(tmp_path / f"store{i}" / "meta"), history)
        for i in range(count)
    }
    runners = {i: FakeRunner(i, log) for i in range(count)}
    return targets, runners, log


# ---------------------------------------------------------------- Replicator


@pytest.mark.trio
async def test_replay_gives_identical_replicas(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path)
    reference = make_database(tmp_path / "reference.sqlite", make_transactions(60))
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in make_transactions(60):
            replicator.submit(txn)
            if txn.generation % 7 == 0:
                await trio.lowlevel.checkpoint()
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()

    assert replicator.submitted_generation == replicator.durable_generation == 60
    assert replicator.live_replicas() == [0, 1, 2]
    assert replicator.stale_replicas() == {}
    expected = dump(reference)
    for path in targets.values():
        assert read_generation(path) == 60
        assert dump(path) == expected


@pytest.mark.trio
async def test_group_commit_takes_everything_pending(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path)
    sync = SyncRecorder()
    sync.gate = trio.Event()
    replicator = Replicator(targets, runners, sync, 0)
    transactions = make_transactions(100)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        replicator.submit(transactions[0])
        await sync.entered.wait()  # batch 1 = [1], held in sync_stores
        for txn in transactions[1:]:
            replicator.submit(txn)
        sync.gate.set()
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()

    assert sync.calls == 2
    assert replicator.statistics().batches_applied == 2
    assert all(read_generation(p) == 100 for p in targets.values())


@pytest.mark.trio
async def test_max_batch_splits_a_long_queue(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path, count=2)
    sync = SyncRecorder()
    replicator = Replicator(targets, runners, sync, 0, max_batch=30)
    for txn in make_transactions(100):  # queued before run starts
        replicator.submit(txn)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()

    assert sync.calls == 4  # 30 + 30 + 30 + 10
    assert all(read_generation(p) == 100 for p in targets.values())


@pytest.mark.trio
async def test_sync_stores_runs_before_each_batch_is_applied(tmp_path: Path) -> None:
    targets, runners, log = setup_replicas(tmp_path)
    seen_during_sync: list[int | None] = []

    class CheckingSync(SyncRecorder):
        async def __call__(self) -> None:
            # No replica may have committed the batch yet.
            seen_during_sync.append(committed_generation(replicator, 0))
            await super().__call__()

    sync = CheckingSync(log)
    replicator = Replicator(targets, runners, sync, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in make_transactions(12):
            replicator.submit(txn)
            await replicator.wait_durable(txn.generation)
            assert committed_generation(replicator, 0) == txn.generation
        nursery.cancel_scope.cancel()
    await replicator.aclose()

    assert seen_during_sync == list(range(12))
    batches: list[list[Any]] = []
    for entry in log:
        if entry[0] == "sync":
            batches.append([])
        elif entry[0] == "apply_blocking":
            assert batches, "a batch was applied before any sync_stores()"
            batches[-1].append(entry[1])
    assert [sorted(batch) for batch in batches] == [[0, 1, 2]] * 12


@pytest.mark.trio
async def test_wait_durable_blocks_until_applied(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path, count=2)
    sync = SyncRecorder()
    sync.gate = trio.Event()
    replicator = Replicator(targets, runners, sync, 0)
    done = trio.Event()

    async def fsync_waiter() -> None:
        await replicator.wait_durable(1)
        done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        await replicator.wait_durable(0)  # already durable: returns at once
        replicator.submit(make_transactions(1)[0])
        nursery.start_soon(fsync_waiter)
        await sync.entered.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert replicator.durable_generation == 0
        assert committed_generation(replicator, 0) == 0
        sync.gate.set()
        with trio.fail_after(5):
            await done.wait()
        assert replicator.durable_generation == 1
        assert all(committed_generation(replicator, i) == 1 for i in targets)
        with pytest.raises(ValueError):
            await replicator.wait_durable(2)  # never submitted
        nursery.cancel_scope.cancel()
    await replicator.aclose()


@pytest.mark.trio
async def test_failing_replica_goes_stale_and_others_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    targets, runners, _ = setup_replicas(tmp_path)
    replicator = Replicator(targets, runners, SyncRecorder(), 0, timeout=0.05)
    transactions = make_transactions(20)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in transactions[:5]:
            replicator.submit(txn)
        await replicator.drain()
        runners[1].fail_on.add("apply_blocking")
        runners[2].hang_on.add("apply_blocking")
        with caplog.at_level(logging.WARNING, logger="ecfs.storage.replicas"):
            for txn in transactions[5:]:
                replicator.submit(txn)
                await trio.lowlevel.checkpoint()
            await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()

    assert replicator.live_replicas() == [0]
    stale = replicator.stale_replicas()
    assert sorted(stale) == [1, 2]
    assert "injected failure" in stale[1]
    assert "hung" in stale[2]
    assert replicator.durable_generation == 20
    assert read_generation(targets[0]) == 20
    # Stale replicas stay consistent at the generation they last committed.
    assert read_generation(targets[1]) == 5
    assert read_generation(targets[2]) == 5
    assert dump(targets[1]) == dump(make_database(tmp_path / "g5.sqlite", transactions[:5]))
    # Logged once each, with the store index.
    stale_logs = [r for r in caplog.records if "is stale" in r.getMessage()]
    assert len(stale_logs) == 2
    assert {r.args[0] for r in stale_logs} == {1, 2}  # type: ignore[index]


@pytest.mark.trio
async def test_a_replica_call_outliving_its_timeout_is_fenced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real blocking call that outlives the timeout: the replica goes
    stale, its abandoned thread keeps the connection (close is refused
    until it returns), and the file stays consistent. (The apply is held
    inside the worker thread: another connection can no longer lock the
    replica, which the replicator holds in exclusive locking mode.)"""
    targets, runners, _ = setup_replicas(tmp_path)
    replicator = Replicator(targets, runners, SyncRecorder(), 0, timeout=0.2)
    gate = threading.Event()
    real_apply = replicas._apply_in_transaction

    def held_apply(conn: sqlite3.Connection, *args: Any) -> None:
        if conn is replicator._replicas[1]._conn:
            gate.wait(30)
        real_apply(conn, *args)

    monkeypatch.setattr(replicas, "_apply_in_transaction", held_apply)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        replicator.submit(make_transactions(1)[0])
        await replicator.drain()
        assert replicator.live_replicas() == [0, 2]
        assert "timed out" in replicator.stale_replicas()[1]
        nursery.cancel_scope.cancel()
    with caplog.at_level(logging.WARNING, logger="ecfs.storage.replicas"):
        await replicator.aclose()  # replica 1's connection is still in use
    assert any("abandoned call" in r.getMessage() for r in caplog.records)
    gate.set()
    with trio.fail_after(10):  # the abandoned thread finishes its batch
        while replicator._replicas[1]._lock.locked():  # noqa: ASYNC110 (a thread's lock)
            await trio.sleep(0.02)
    await replicator.aclose()  # now it closes
    assert read_generation(targets[1]) == 1
    assert dump(targets[1]) == dump(targets[0])


@pytest.mark.trio
async def test_all_replicas_failing_makes_wait_durable_raise(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path, count=2)
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    transactions = make_transactions(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        replicator.submit(transactions[0])
        await replicator.drain()
        for runner in runners.values():
            runner.fail_on.add("apply_blocking")
        replicator.submit(transactions[1])
        with pytest.raises(StoreError):
            await replicator.wait_durable(2)
        replicator.submit(transactions[2])  # still accepted, never durable
        with pytest.raises(StoreError):
            await replicator.drain()
        await replicator.wait_durable(1)  # was durable before the failures
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert replicator.live_replicas() == []
    assert replicator.durable_generation == 1


@pytest.mark.trio
async def test_replica_that_cannot_open_is_stale_before_started(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path, count=3)
    make_database(targets[2].with_name("other.sqlite"), make_transactions(2))
    targets[2] = targets[2].with_name("other.sqlite")  # at generation 2, not 0
    runners[1].fail_on.add("open_blocking")
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        assert replicator.live_replicas() == [0]
        assert "expected 0" in replicator.stale_replicas()[2]
        replicator.submit(make_transactions(1)[0])
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert read_generation(targets[0]) == 1
    assert read_generation(targets[2]) == 2  # untouched


@pytest.mark.trio
async def test_sync_stores_failure_is_retried_before_applying(tmp_path: Path) -> None:
    targets, runners, log = setup_replicas(tmp_path, count=1)
    failures = [StoreError("disk 3 fsync failed")]

    async def flaky_sync() -> None:
        log.append(("sync", None))
        if failures:
            raise failures.pop()

    replicator = Replicator(targets, runners, flaky_sync, 0, retry_delay=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        replicator.submit(make_transactions(1)[0])
        await replicator.drain()
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    names = [entry[0] for entry in log if entry[0] != "open_blocking"]
    assert names[:3] == ["sync", "sync", "apply_blocking"]
    assert read_generation(targets[0]) == 1


def test_submit_requires_consecutive_generations(tmp_path: Path) -> None:
    targets, runners, _ = setup_replicas(tmp_path, count=1, generation=4)
    replicator = Replicator(targets, runners, SyncRecorder(), 4)
    with pytest.raises(ValueError):
        replicator.submit(make_transactions(1, start=6)[0])
    replicator.submit(make_transactions(1, start=5)[0])
    assert replicator.submitted_generation == 5
    assert replicator.durable_generation == 4


# ---------------------------------------------------------------- mount-time helpers


def test_read_generation_of_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 200)
    no_table = tmp_path / "no_table.sqlite"
    sqlite3.connect(no_table).executescript("CREATE TABLE x (y); INSERT INTO x VALUES (1);")
    good = make_database(tmp_path / "good.sqlite", make_transactions(3))

    assert read_generation(garbage) is None
    assert read_generation(no_table) is None
    assert read_generation(tmp_path / "missing.sqlite") is None
    assert read_generation(good) == 3
    assert not (tmp_path / "missing.sqlite").exists()


def test_read_generation_sees_a_crashed_wal(tmp_path: Path) -> None:
    """Committed frames still in the WAL (no checkpoint) count."""
    live = tmp_path / "live.sqlite"
    make_database(live)
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("UPDATE replica_state SET generation = 9")
    # Copy the files while the writer still holds them, as after a crash.
    crashed = tmp_path / "crashed.sqlite"
    crashed.write_bytes(live.read_bytes())
    crashed.with_name(crashed.name + "-wal").write_bytes(
        live.with_name(live.name + "-wal").read_bytes()
    )
    conn.close()
    assert read_generation(crashed) == 9
    copy = tmp_path / "copy.sqlite"
    copy_database(crashed, copy)
    assert read_generation(copy) == 9


def test_copy_database_replaces_stale_side_files(tmp_path: Path) -> None:
    src = make_database(tmp_path / "src.sqlite", make_transactions(8))
    dst = make_database(tmp_path / "dst.sqlite", make_transactions(2))
    # A stale WAL of another database must not be replayed onto the copy.
    dst.with_name(dst.name + "-wal").write_bytes(b"stale wal bytes")
    (tmp_path / f".{dst.name}.12345.tmp").write_bytes(b"left by a crash")
    copy_database(src, dst)
    assert read_generation(dst) == 8
    assert dump(dst) == dump(src)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("src."))
    assert left == ["dst.sqlite"]


# ---------------------------------------------------------------- no mapped -shm


def side_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(("-shm", "-wal")))


@pytest.mark.trio
async def test_replica_connections_never_map_a_shm_file(tmp_path: Path) -> None:
    """A page fault on a mapped ``-shm`` whose disk fails is a SIGBUS that
    kills the daemon: the replicator's connections keep the WAL index in
    heap memory (exclusive locking mode), so no ``-shm`` file exists while
    they are open and apply batches (they are in WAL mode all the same)."""
    targets, runners, _ = setup_replicas(tmp_path)
    for path in targets.values():
        assert side_files(path.parent) == []
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in make_transactions(5):
            replicator.submit(txn)
        await replicator.drain()
        for path in targets.values():
            assert side_files(path.parent) == [path.name + "-wal"]
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert all(read_generation(p) == 5 for p in targets.values())


def test_reading_a_copy_without_wal_frames_maps_nothing(tmp_path: Path) -> None:
    """A copy with no WAL frames is read ``immutable=1``: no side file is
    created (none mapped); one with frames left by a crash is still read
    whole (see test_read_generation_sees_a_crashed_wal)."""
    path = make_database(tmp_path / "copy.sqlite", make_transactions(3))
    assert side_files(tmp_path) == []
    assert read_generation(path) == 3
    assert side_files(tmp_path) == []


@pytest.mark.trio
async def test_a_replica_copied_before_forgotten_transactions_is_not_added(
    tmp_path: Path,
) -> None:
    """A new replica copied at generation g joins only if every transaction
    after g is still queued: transactions applied to every live replica
    while it was copied are forgotten, and it must never skip them."""
    targets, runners, _ = setup_replicas(tmp_path)
    late = targets.pop(2)  # at generation 0
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        for txn in make_transactions(3):
            replicator.submit(txn)
        await replicator.drain()  # 1..3 applied everywhere and forgotten
        assert not await replicator.add_replica(2, late, 0)
        assert replicator.live_replicas() == [0, 1]
        current = make_database(late.with_name("current.sqlite"), make_transactions(3))
        assert await replicator.add_replica(2, current, 3)
        replicator.submit(make_transactions(1, start=4)[0])
        await replicator.drain()
        assert replicator.live_replicas() == [0, 1, 2]
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert dump(current) == dump(targets[0])


class GatedRunner(FakeRunner):
    """A FakeRunner whose apply_blocking waits for `gate` (set: at once)."""

    def __init__(self, index: int, log: list[Any] | None = None) -> None:
        super().__init__(index, log)
        self.gate = trio.Event()
        self.gate.set()
        self.applying = trio.Event()

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> T:
        if fn.__name__ == "apply_blocking":
            self.applying.set()
            await self.gate.wait()
        return await super().call(fn, *args, timeout=timeout)


@pytest.mark.trio
async def test_a_replica_added_while_a_batch_is_applied_gets_the_rest_of_it(
    tmp_path: Path,
) -> None:
    """A replica copied at generation 3 joins while the batch 1..5 is being
    applied to the others: it must get 4..5 too. (It did not: the batch
    went to the replicas live when it started and was then forgotten, the
    new replica stayed at 3, the durable generation with it, and an
    fsync() waiting for 5 hung until some later write came along.)"""
    targets, _, log = setup_replicas(tmp_path)
    runners = {i: GatedRunner(i, log) for i in range(3)}
    late = targets.pop(2)
    replicator = Replicator(targets, runners, SyncRecorder(), 0)
    transactions = make_transactions(5)
    async with trio.open_nursery() as nursery:
        await nursery.start(replicator.run)
        runners[0].gate = trio.Event()  # replica 0 holds the batch in its apply
        for txn in transactions:
            replicator.submit(txn)
        nursery.start_soon(replicator.drain)  # a waiter: the batch 1..5 goes now
        await runners[0].applying.wait()
        current = make_database(late.with_name("current.sqlite"), transactions[:3])
        assert await replicator.add_replica(2, current, 3)
        runners[0].gate.set()
        with trio.fail_after(10):
            await replicator.wait_durable(5)
        assert replicator.live_replicas() == [0, 1, 2]
        nursery.cancel_scope.cancel()
    await replicator.aclose()
    assert dump(current) == dump(targets[0])
