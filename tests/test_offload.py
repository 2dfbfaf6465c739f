"""Tests for ecfs.storage.offload: timeouts, abandonment, health states, statistics.

Real worker threads run fake blocking functions; a "hung store" is a
function waiting on a threading.Event, and every test releases its Events in
`finally` and waits for the threads to return, so no thread outlives a test.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ecfs.core.errors import FragmentCorrupt, FragmentMissing, NoSpace, StoreError, StoreTimeout
from ecfs.core.model import NO_STORE
from ecfs.storage.metadb.chunks import RepairQueue
from ecfs.storage.offload import (
    CALL_TIMEOUT_FACTOR,
    CALL_TIMEOUT_FLOOR,
    HEDGE_FLOOR,
    LATENCY_WINDOW,
    LOOP_CPU_LIMIT,
    PROBE_TIMEOUT,
    SLOW_MIN_SAMPLES,
    TIMEOUT_MIN_SAMPLES,
    StoreRunner,
    StoreState,
    available_runner,
    run_cpu,
)
from ecfs.storage.store import (
    DIRECTORY_CONCURRENCY,
    REMOTE_CONCURRENCY,
    DirectoryStore,
    StoreMarker,
)

pytestmark = pytest.mark.trio


class Hang:
    """Blocking functions that return only when released (a hung disk)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.finished = 0
        self._lock = threading.Lock()

    def __call__(self, value: object = None) -> object:
        with self._lock:
            self.started += 1
        try:
            self.release.wait(timeout=20)  # a safety net, never reached
            return value
        finally:
            with self._lock:
                self.finished += 1


@pytest.fixture
def hang() -> Iterator[Hang]:
    h = Hang()
    try:
        yield h
    finally:
        h.release.set()


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    marker = StoreMarker(
        volume_id="0" * 31 + "1",
        store_id="0" * 31 + "2",
        format=1,
        k=2,
        m=1,
        fragment_size=4096,
        cell_size=4096,
        inline_max=0,
    )
    return DirectoryStore.initialise(tmp_path / "store", marker)


async def drain(runner: StoreRunner, hang: Hang) -> None:
    """Release hung calls and wait until their threads have all returned."""
    hang.release.set()
    with trio.fail_after(5):
        while runner.statistics().abandoned or runner.in_flight:  # noqa: ASYNC110
            await trio.sleep(0.005)


async def call_hang(runner: StoreRunner, hang: Hang) -> None:
    await runner.call(hang)


def raiser(exc: BaseException) -> Callable[[], None]:
    def fn() -> None:
        raise exc

    return fn


# ---- timeouts and abandonment


async def test_hung_call_times_out_while_other_store_keeps_working(
    store: DirectoryStore, hang: Hang
) -> None:
    hung = StoreRunner(0, store, timeout=0.2)
    healthy = StoreRunner(1, store)
    completed = 0

    async def keep_calling() -> None:
        nonlocal completed
        while True:
            assert await healthy.call(lambda: 42) == 42
            completed += 1
            await trio.sleep(0.01)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_calling)
            start = time.monotonic()
            with pytest.raises(StoreTimeout, match="store 0"):
                await hung.call(hang)
            elapsed = time.monotonic() - start
            nursery.cancel_scope.cancel()
        assert 0.2 <= elapsed < 1.0
        assert completed >= 3
        assert hung.statistics().timeouts == 1
        assert hung.state is StoreState.FAILED
        assert healthy.state is StoreState.OK
    finally:
        await drain(hung, hang)


async def test_a_timed_out_call_fails_the_store_only_if_nothing_else_answered(
    store: DirectoryStore, hang: Hang
) -> None:
    """A store whose other calls answer meanwhile is slow, not hung: a call
    over its deadline (a write queued behind others on a disk at 2 MiB/s)
    fails that call, not the store. A store that answers nothing for the
    whole deadline is failed."""
    runner = StoreRunner(0, store, max_threads=4, timeout=0.3)
    try:
        async with trio.open_nursery() as nursery:

            async def keep_answering() -> None:
                while True:
                    await runner.call(lambda: 1)
                    await trio.sleep(0.02)

            nursery.start_soon(keep_answering)
            with pytest.raises(StoreTimeout):
                await runner.call(hang)
            assert runner.available, runner.failure_reason
            nursery.cancel_scope.cancel()
        with pytest.raises(StoreTimeout):
            await runner.call(hang)  # nothing else answers now
        assert not runner.available
        assert "did not answer" in (runner.failure_reason or "")
    finally:
        await drain(runner, hang)


async def test_abandoned_counted_until_thread_returns(store: DirectoryStore, hang: Hang) -> None:
    runner = StoreRunner(0, store, max_threads=4, timeout=0.05)
    try:
        for expected in (1, 2):
            with pytest.raises(StoreTimeout):
                await runner.call(hang)
            assert runner.statistics().abandoned == expected
        assert runner.in_flight == 2
        await drain(runner, hang)
        stats = runner.statistics()
        assert (stats.abandoned, stats.in_flight, stats.timeouts) == (0, 0, 2)
        assert hang.finished == 2
    finally:
        await drain(runner, hang)


async def test_call_timeout_overrides_default(store: DirectoryStore, hang: Hang) -> None:
    runner = StoreRunner(0, store, timeout=60)
    try:
        with trio.fail_after(2):
            with pytest.raises(StoreTimeout):
                await runner.call(hang, timeout=0.05)
    finally:
        await drain(runner, hang)


async def test_enough_hung_calls_fail_the_store_and_probe_recovers(
    store: DirectoryStore, hang: Hang
) -> None:
    runner = StoreRunner(0, store, max_threads=3, timeout=5)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call_hang, runner, hang)
            await wait_until(lambda: hang.started == 3)
            assert runner.in_flight == 3
            assert runner.available
            nursery.cancel_scope.cancel()  # e.g. hedged reads giving up
        stats = runner.statistics()
        assert stats.abandoned == 3 and stats.timeouts == 0
        assert stats.state is StoreState.FAILED and not runner.available
        assert "stuck" in (runner.failure_reason or "")
        # FAILED still runs calls; with every thread stuck they time out
        with pytest.raises(StoreTimeout):
            await runner.call(lambda: 1, timeout=0.05)
        assert hang.started == 3  # that call never got a thread
        # the probe cannot get a thread either
        with trio.fail_after(PROBE_TIMEOUT + 1):
            assert await runner.probe() is False
        assert runner.state is StoreState.FAILED
        await drain(runner, hang)
        assert await runner.probe() is True
        assert runner.state is StoreState.OK and runner.available
    finally:
        await drain(runner, hang)


async def test_cancel_before_thread_starts_never_runs_fn(store: DirectoryStore, hang: Hang) -> None:
    runner = StoreRunner(0, store, max_threads=1, timeout=5)
    ran = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_hang, runner, hang)
            await wait_until(lambda: hang.started == 1)
            with pytest.raises(StoreTimeout):
                await runner.call(ran.set, timeout=0.05)
            nursery.cancel_scope.cancel()
        await drain(runner, hang)
        assert not ran.is_set()
        assert runner.statistics().abandoned == 0
    finally:
        await drain(runner, hang)


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 (polls threads)
            await trio.sleep(0.002)


# ---- errors


async def test_enospc_is_no_space_and_not_a_health_failure(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    with pytest.raises(NoSpace, match="store 0"):
        await runner.call(raiser(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(NoSpace):
        await runner.call(raiser(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert runner.state is StoreState.OK
    assert runner.statistics().errors == 0


async def test_os_error_is_store_error_and_fails_store(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    with pytest.raises(StoreError) as info:
        await runner.call(raiser(OSError(errno.EIO, "Input/output error")))
    assert type(info.value) is StoreError
    assert isinstance(info.value.__cause__, OSError)
    assert runner.state is StoreState.FAILED
    assert runner.statistics().errors == 1
    assert await runner.call(lambda: "still runs") == "still runs"
    assert runner.state is StoreState.FAILED  # sticky until probe / mark_ok
    assert await runner.probe() is True
    assert runner.state is StoreState.OK


async def test_domain_errors_pass_through(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    missing = FragmentMissing("gone")
    with pytest.raises(FragmentMissing) as info:
        await runner.call(raiser(missing))
    assert info.value is missing
    corrupt = FragmentCorrupt("bad cell")
    with pytest.raises(FragmentCorrupt):
        await runner.call(raiser(corrupt))
    with pytest.raises(ValueError):
        await runner.call(raiser(ValueError("a bug")))
    assert runner.state is StoreState.OK
    assert runner.statistics().errors == 0
    with pytest.raises(StoreError):
        await runner.call(raiser(StoreError("marker garbled")))
    assert runner.state is StoreState.FAILED


async def test_real_store_calls(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    await runner.call(store.write_fragment, 1, 0, [b"abc"], nbytes_written=3)
    buf = bytearray(3)
    assert await runner.call(store.read_fragment, 1, 0, 0, memoryview(buf), nbytes_read=3) == 3
    assert buf == b"abc"
    await runner.call(store.sync)
    with pytest.raises(FragmentMissing):
        await runner.call(store.read_fragment, 2, 0, 0, memoryview(buf))
    stats = runner.statistics()
    assert (stats.bytes_read, stats.bytes_written, stats.calls) == (3, 3, 4)
    assert runner.available


async def test_probe_of_missing_store_fails(tmp_path: Path) -> None:
    runner = StoreRunner(3, DirectoryStore(tmp_path / "gone"))
    assert await runner.probe() is False
    assert runner.state is StoreState.FAILED
    assert "probe failed" in (runner.failure_reason or "")


# ---- concurrency bound


async def test_limiter_bounds_concurrency(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store, max_threads=3)
    lock = threading.Lock()
    running = 0
    peak = 0
    peak_in_flight = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    async def watch() -> None:
        nonlocal peak_in_flight
        while True:
            peak_in_flight = max(peak_in_flight, runner.in_flight)
            await trio.sleep(0.001)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(runner.call, work)
            await wait_until(lambda: runner.waiting > 0)
        outer.cancel_scope.cancel()
    assert peak == 3
    assert 1 <= peak_in_flight <= 3
    assert runner.in_flight == 0 and runner.waiting == 0
    assert runner.statistics().calls == 12


# ---- latency signals


def fake_clock(step: float) -> Callable[[], float]:
    """A clock advancing by `step` on every read (one call = one step)."""
    counter = itertools.count()
    lock = threading.Lock()

    def clock() -> float:
        with lock:
            return next(counter) * step

    return clock


async def test_statistics_latencies_from_calls(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store, clock=fake_clock(0.004))
    for _ in range(10):
        await runner.call(lambda: None)
    stats = runner.statistics()
    assert stats.latency_p50 == pytest.approx(0.004)
    assert stats.latency_p95 == pytest.approx(0.004)
    assert stats.latency_ewma == pytest.approx(0.004)


async def test_percentiles_and_hedge_deadline(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    assert runner.statistics().latency_p95 == 0.0
    assert runner.hedge_deadline() == HEDGE_FLOOR
    for ms in range(1, 101):
        runner.record_latency(ms / 1000)
    stats = runner.statistics()
    assert stats.latency_p50 == pytest.approx(0.050)
    assert stats.latency_p95 == pytest.approx(0.095)
    assert runner.latency_p95() == stats.latency_p95
    assert runner.hedge_deadline() == pytest.approx(3 * 0.095)
    # the window keeps the last 256 samples only
    for _ in range(256):
        runner.record_latency(0.001)
    assert runner.statistics().latency_p95 == pytest.approx(0.001)
    assert runner.hedge_deadline() == HEDGE_FLOOR


async def test_expected_latency(store: DirectoryStore, hang: Hang) -> None:
    runner = StoreRunner(0, store, timeout=5)
    unmeasured = runner.expected_latency()
    assert unmeasured > 0
    runner.record_latency(0.002)
    assert runner.expected_latency() == pytest.approx(0.002)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_hang, runner, hang)
            nursery.start_soon(call_hang, runner, hang)
            await wait_until(lambda: runner.in_flight == 2)
            assert runner.expected_latency() == pytest.approx(0.006)
            hang.release.set()
    finally:
        await drain(runner, hang)


async def test_slow_state_relative_to_own_baseline(store: DirectoryStore) -> None:
    runner = StoreRunner(0, store)
    for _ in range(50):
        runner.record_latency(0.001)
    assert runner.state is StoreState.OK
    for _ in range(5):
        runner.record_latency(0.1)
    assert runner.state is StoreState.SLOW
    assert runner.available  # slow is still usable
    for _ in range(40):
        runner.record_latency(0.001)
    assert runner.state is StoreState.OK
    runner.mark_failed("test")
    assert runner.state is StoreState.FAILED
    runner.mark_ok()
    assert runner.state is StoreState.OK and runner.failure_reason is None


async def test_a_store_that_became_slow_stays_slow_until_it_is_quick_again(
    store: DirectoryStore,
) -> None:
    runner = StoreRunner(0, store)
    for _ in range(50):
        runner.record_latency(0.002)
    for _ in range(500):  # slow for long: not its new normal
        runner.record_latency(0.2)
    assert runner.state is StoreState.SLOW
    for _ in range(40):
        runner.record_latency(0.002)
    assert runner.state is StoreState.OK
    slow_from_start = StoreRunner(1, store)
    for _ in range(100):
        slow_from_start.record_latency(0.2)
    assert slow_from_start.state is StoreState.OK  # its normal


async def test_run_cpu_keeps_small_work_on_the_loop(store: DirectoryStore) -> None:
    """One cutoff for every encode and decode: up to LOOP_CPU_LIMIT bytes on
    the loop's thread, above it in a worker thread."""
    loop = threading.get_ident()
    assert await run_cpu(threading.get_ident, size=LOOP_CPU_LIMIT) == loop
    assert await run_cpu(threading.get_ident, size=LOOP_CPU_LIMIT + 1) != loop


async def test_available_runner_is_the_one_slot_lookup(store: DirectoryStore) -> None:
    runners = {0: StoreRunner(0, store), 1: StoreRunner(1, store)}
    runners[1].mark_failed("gone")
    assert available_runner(runners, 0) is runners[0]
    assert available_runner(runners, 1) is None  # failed
    assert available_runner(runners, 2) is None  # not open
    assert available_runner(runners, NO_STORE) is None


# ---- timeouts and concurrency derived from the store, late answers


async def test_call_timeout_follows_the_measured_p99_between_floor_and_bound(
    store: DirectoryStore,
) -> None:
    runner = StoreRunner(0, store)
    assert runner.call_timeout(10.0) == 10.0  # nothing measured: the caller's bound
    for _ in range(TIMEOUT_MIN_SAMPLES):
        runner.record_latency(0.001)
    assert runner.call_timeout(10.0) == CALL_TIMEOUT_FLOOR  # a fast disk: failed sooner
    assert runner.call_timeout(1.0) == 1.0  # never above the bound
    for _ in range(LATENCY_WINDOW):
        runner.record_latency(0.8)  # a far-away store
    assert runner.call_timeout(30.0) == pytest.approx(CALL_TIMEOUT_FACTOR * 0.8)
    assert runner.call_timeout(5.0) == 5.0


async def test_concurrency_is_what_the_store_serves_well_unless_set(
    store: DirectoryStore,
) -> None:
    from ecfs.storage.s3store import S3Store

    from .s3servers import s3_environment

    remote = S3Store("s3://bkt/p?endpoint=http://127.0.0.1:9", environ=s3_environment())
    assert StoreRunner(0, store).statistics().max_threads == DIRECTORY_CONCURRENCY
    assert StoreRunner(1, remote).statistics().max_threads == REMOTE_CONCURRENCY
    assert StoreRunner(2, remote, max_threads=3).statistics().max_threads == 3
    assert REMOTE_CONCURRENCY > DIRECTORY_CONCURRENCY


async def test_a_late_answer_marks_a_slowed_store_slow_but_not_its_hedge_deadline(
    store: DirectoryStore, hang: Hang
) -> None:
    runner = StoreRunner(0, store, clock=fake_clock(0.5))  # every call "takes" 0.5 s
    for _ in range(SLOW_MIN_SAMPLES):
        runner.record_latency(0.001)
    deadline = runner.hedge_deadline()
    try:
        with trio.move_on_after(0.05):
            await runner.call(hang)  # a hedge won: the call is abandoned
        assert runner.statistics().abandoned == 1
        assert runner.state is StoreState.OK
        hang.release.set()
        await wait_until(lambda: runner.statistics().late_answers == 1)
        stats = runner.statistics()
        assert (stats.abandoned, stats.abandoned_total, stats.errors) == (0, 1, 0)
        assert runner.state is StoreState.SLOW  # it answered, slowly
        assert runner.available
        assert runner.hedge_deadline() == deadline  # hedging stays as quick
        assert runner.expected_latency() > 0.05  # sources elsewhere come first
        runner.mark_ok()  # e.g. a probe after a failure: judged afresh
        assert runner.state is StoreState.OK
        runner.mark_failed("hung")
        again = Hang()
        try:
            with trio.move_on_after(0.05):
                await runner.call(again)  # abandoned while the store is failed
        finally:
            again.release.set()
        await wait_until(lambda: runner.statistics().late_answers == 2)
        runner.mark_ok()
        assert runner.state is StoreState.OK  # what it hung on does not count
    finally:
        await drain(runner, hang)


async def test_a_hedged_read_abandons_the_slow_request_and_returns(tmp_path: Path) -> None:
    """Through the reader, real threads: the slow store's request is still
    in flight (counted as abandoned) when the read has returned; when it
    answers, the store is SLOW and the next read does not ask it at all."""
    from .inprocess import CHUNK, make_rig

    rig = make_rig(tmp_path)
    data = bytes(i % 251 for i in range(CHUNK))
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    runner = rig.volume.runners[ref.stores[0]]
    for _ in range(SLOW_MIN_SAMPLES):
        for store in ref.stores:  # every source measured (Router.route_around)
            rig.volume.runners[store].record_latency(0.001)
    slow = rig.store_of(ref, 0)
    slow.set("slow", delay=60.0, ops={"read"})
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))  # its read goes to a thread
    try:
        with trio.fail_after(30):
            assert bytes(await reader.read(ref, 0, len(data))) == data
        assert reader.counters.hedged_reads == 1
        stats = runner.statistics()
        assert stats.abandoned == 1 and stats.in_flight == 1  # still running, given up
        assert slow.calls["read"] == 1
        await trio.sleep(0.3)
    finally:
        slow.heal()  # the slow request answers now
    await wait_until(lambda: runner.statistics().late_answers == 1)
    assert runner.statistics().abandoned == 0 and runner.in_flight == 0
    assert runner.state is StoreState.SLOW and runner.available
    # Another chunk with a fragment there: decoded from the others at once,
    # the slow store not asked, and no repair queued (slow is not damage).
    other = rig.put_chunk(data, chunk_id=ref.chunk_id + 1)
    rig.learn_headers(other)
    rig.volume.handles.discard((other.stores[0], other.chunk_id, 0))
    routed = reader.counters.routed_reads
    with trio.fail_after(30):
        assert bytes(await reader.read(other, 0, len(data))) == data
    # Read around: at most a probe read that nobody waits for (ChunkReader._probe).
    assert slow.calls["read"] <= 2
    assert reader.counters.hedged_reads == 1
    assert reader.counters.routed_reads == routed + 1
    assert not RepairQueue(rig.volume.db).contains(other.chunk_id)


async def test_a_read_of_a_hung_fast_store_times_out_at_the_derived_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    from .inprocess import CHUNK, make_rig

    rig = make_rig(tmp_path)
    data = bytes(i % 251 for i in range(CHUNK))
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    runner = rig.volume.runners[ref.stores[0]]
    for _ in range(TIMEOUT_MIN_SAMPLES):
        runner.record_latency(0.002)
    hung = rig.store_of(ref, 0)
    hung.set("hang")
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))
    try:
        start = trio.current_time()
        with pytest.raises(StoreTimeout):
            await reader.read_fragment(ref, 0, 0, 4096)
        assert trio.current_time() - start == pytest.approx(CALL_TIMEOUT_FLOOR)
        assert CALL_TIMEOUT_FLOOR < reader.read_timeout
        assert runner.state is StoreState.FAILED
    finally:
        hung.heal()


async def test_stores_slow_together_are_read_as_usual(tmp_path: Path) -> None:
    """A SLOW store is read around only while k others are much quicker
    (Router.route_around): when the others are about as slow (all
    under load), it is read."""
    from .inprocess import CHUNK, make_rig

    rig = make_rig(tmp_path)
    data = bytes(i % 251 for i in range(CHUNK))
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    runners = [rig.volume.runners[s] for s in ref.stores]
    for _ in range(SLOW_MIN_SAMPLES):
        runners[0].record_latency(0.001)
    for _ in range(5):
        runners[0].record_latency(0.1)
    assert runners[0].state is StoreState.SLOW  # slower than it was
    for runner in runners[1:]:
        for _ in range(SLOW_MIN_SAMPLES):
            runner.record_latency(0.08)  # as slow, and always were: not SLOW
        assert runner.state is StoreState.OK
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))
    asked = rig.store_of(ref, 0).calls["read"]
    with trio.fail_after(30):
        assert bytes(await reader.read(ref, 0, len(data))) == data
    assert rig.store_of(ref, 0).calls["read"] == asked + 1  # read, not decoded around
    assert reader.counters.degraded_reads == 0


async def test_a_store_slow_from_the_start_is_read_around_too(tmp_path: Path) -> None:
    """Never SLOW (its baseline is slow), but far slower than its peers:
    its fragments are decoded from quicker stores instead."""
    from .inprocess import CHUNK, make_rig

    rig = make_rig(tmp_path)
    data = bytes(i % 251 for i in range(CHUNK))
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    runners = [rig.volume.runners[s] for s in ref.stores]
    for _ in range(SLOW_MIN_SAMPLES):
        runners[0].record_latency(0.4)
        for runner in runners[1:]:
            runner.record_latency(0.005)
    assert runners[0].state is StoreState.OK
    rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))
    asked = rig.store_of(ref, 0).calls["read"]
    with trio.fail_after(30):
        assert bytes(await reader.read(ref, 0, len(data))) == data
    assert rig.store_of(ref, 0).calls["read"] == asked  # decoded around it
    assert reader.counters.routed_reads == 1
    assert not RepairQueue(rig.volume.db).contains(ref.chunk_id)


async def test_a_store_read_around_is_still_asked_now_and_then(tmp_path: Path) -> None:
    """A store read around still gets probe reads (nobody waits for them):
    once it answers quickly again, it is no longer read around."""
    from ecfs.data.routing import PROBE_INTERVAL

    from .inprocess import CHUNK, make_rig

    rig = make_rig(tmp_path)
    data = bytes(i % 251 for i in range(CHUNK))
    ref = rig.put_chunk(data)
    rig.learn_headers(ref)
    reader = rig.volume.reader
    runners = [rig.volume.runners[s] for s in ref.stores]
    for _ in range(SLOW_MIN_SAMPLES):
        runners[0].record_latency(0.4)  # slow, as far as the runner knows
        for runner in runners[1:]:
            runner.record_latency(0.005)
    store = rig.store_of(ref, 0)  # in fact quick again
    asked = store.calls["read"]
    for _ in range(40):
        rig.volume.handles.discard((ref.stores[0], ref.chunk_id, 0))
        with trio.fail_after(30):
            assert bytes(await reader.read(ref, 0, 4096)) == data[:4096]
        if runners[0].expected_latency() < 0.05:
            break
        await trio.sleep(PROBE_INTERVAL)  # probes go at most this often
    assert store.calls["read"] > asked  # asked now and then
    assert runners[0].expected_latency() < 0.05  # and seen quick again
    assert reader.counters.hedged_reads == 0  # probes are not hedges
