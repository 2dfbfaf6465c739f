"""The one helper every blocking store call goes through, and store health.

Owns: running blocking store functions in worker threads (one
`trio.CapacityLimiter` per store, a timeout on every call, abandoning the
thread of a call that times out or is cancelled), translating OSError into
domain errors, and the per-store live signals that services use to choose
and hedge sources: latency (EWMA, p50, p95), queue depth, and a health state; and the counters a live view of the stores reads
(`statistics()`: bytes and operations, errors, a latency histogram).

Also owns the two other ways work leaves the loop, so that nothing else
calls `trio.to_thread` (tests/test_layering.py checks it): `run_in_thread`
for a blocking call that is not a store call (a replica file being
inspected, a sysfs knob, a store being created), and `run_cpu` for CPU work
(encode, decode) that runs on the loop up to LOOP_CPU_LIMIT bytes and in a
thread above; and `available_runner`, the one "which runner serves this
fragment slot now" lookup.

Must not: do any I/O itself (it only calls the functions it is given), know
what the functions do, decide routing (services read `available`,
`expected_latency()` and `hedge_deadline()` and decide), or probe stores on
its own (a health task calls `probe()`; nothing here runs in the background).

Concurrency contract: a StoreRunner belongs to one trio run and all of its
methods are called from that run's thread, except the small wrapper around
`fn` that runs in the worker thread and touches only `_abandon_lock`-guarded
state. A call that times out (or is cancelled) returns at once; its thread
keeps running until the disk answers and holds its limiter token until
then, so hung threads shrink the store's concurrency and are counted in
`abandoned` until they return.

Health policy (kept deliberately simple):

- OK -> FAILED on: a store error (an OSError escaping `fn`, or a StoreError
  other than FragmentMissing, BadFragmentEntry and NoSpace: a missing or
  bad fragment file is the fragment's problem and a full store still
  serves reads), a timeout while nothing else of the store answered for
  as long (a store that answers other calls is slow, not hung: a write
  queued behind others on a disk at 2 MiB/s times out alone), or
  `abandoned >= max_threads` while the store answered nothing for
  PROBE_TIMEOUT seconds (`silent_for`: the store has no thread left to
  run on and none comes back; a slow disk whose abandoned reads do come
  back, late, is not hung). `mark_failed()` does the same. Answers are
  the ends of this runner's calls, and whatever a service reports with
  `note_answer` (the reader's read-ahead, which reads the store outside
  the runner).
- FAILED is sticky: successful calls do not clear it; `mark_ok()` or a
  successful `probe()` does. `call` still runs on a FAILED store (callers
  route around it by checking `available`).
- SLOW (only when not FAILED): after at least SLOW_MIN_SAMPLES measured
  calls, the fast latency EWMA exceeds SLOW_FACTOR x the slow baseline EWMA
  and SLOW_FLOOR seconds; it clears when the fast EWMA falls below half of
  that bound. The baseline learns only while the store is not SLOW: a
  store that became slow stays SLOW until its answers are quick again
  (the reader routes around a store by its expected latency, which
  the late answers raise, and probes it now and then: `ecfs.data.routing`),
  instead of becoming its own new normal after some fifty slow calls. A
  store slow from its first call on has a slow baseline and is never
  SLOW (expected_latency and the hedge deadline still reflect it).
  `mark_ok` clears SLOW too and restarts the fast EWMA from the baseline.
  So do QUICK_ANSWERS data calls (bytes read or written) in a row that
  answer within the clearing bound while the fast EWMA is above it: a
  store that was slow for a while (a hang, the backlog after it) is judged
  by its answers again as soon as they are quick, instead of after the
  twenty-odd samples the EWMA needs to decay, which for a store the reader
  routes around (a probe read every 0.5 s) took over ten seconds. A store
  that is really slow answers its data reads slowly and is not reset by
  this (its health checks, quick as they may be, do not count). Nor is an
  estimate kept when nothing measures it: a health check that answers
  quickly restarts it too once no data call was measured for SLOW_STALE
  seconds and none is running (a store SLOW at the end of a hang, and
  read by nobody since, would otherwise stay SLOW for good; a slow store
  that is read around still gets the reader's probe reads, one at a time,
  which keep it measured or running).

- Every change between available and FAILED (either way) calls
  `on_health_change` (the volume's: it reports a store-failed or
  store-back event, `ecfs.core.events`); a new reason while FAILED does not.

Counters (`StoreStatistics`, for `ecfs iostat` and the Prometheus
endpoint): monotonic counts of read and write operations and their bytes
(a successful call that read or wrote bytes; a read served on the loop from
the page cache counts too, `record_loop_read`), and every measured latency
sample in the fixed buckets LATENCY_BUCKETS (one list increment per
sample: a Prometheus histogram without a lock, read on the loop).

Read latency is also kept per size class (up to SMALL_READ bytes, or
more: `expected_latency(nbytes)`, `measured_size`), so that a reader
compares a 4 KiB read of one store with 4 KiB reads of the others, not
with their 1 MiB ones (issue 17). `mark_ok` forgets them; nothing else
does (a slow disk answers small reads quicker than large ones, and a
quick small answer must not clear what its large reads showed). The last
SMALL_WINDOW small reads also give a median and a 90th percentile
(`small_read_quantiles`): a reader routing a small read around a store
waits for the slowest of k others, so it compares this store's typical
read with the others' slow tail.

Latency measured for a call is the time `fn` ran in its thread (service
time, without the limiter wait), only for calls that returned normally or
raised FragmentMissing (a fast, healthy answer). A call that its caller
abandoned (a hedge won, a timeout) is no error, whatever it raises; if it
returns after all, its time is a "late answer": it moves the fast EWMA
(expected_latency, SLOW) but not the baseline or the percentile window
(nor anything while the store is FAILED: what a hung store releases says
how long it hung). For the same reason a call that was running when the
store was marked FAILED is no sample either, even if its caller still
waited for it (a probe read not waited for, say): its time is the hang's.
A store slowed down is then seen as SLOW by the very reads that hedged
around it, while its hedge deadline and timeouts stay those of the calls
that were waited for (were late answers samples, a slowed store would
raise its own hedge deadline and become its own normal at once).

Health checks (`health_call`, `probe`): a store is failed by its health
check only when nothing of it answers: the check waits a window of
PROBE_TIMEOUT seconds, or PROBE_QUEUE_FACTOR x its expected latency (the
queue ahead of it at the measured latency, by the slowest of its EWMAs:
all calls, small reads, large reads) if longer, and waits another
window as long as some call of the store answered during the last one (up
to PROBE_TIMEOUT_MAX). A slow but working store (a disk at 2 MiB/s with
reads queued on it) is then shown SLOW, not failed (which would have its
chunks queued for repair); a hung one answers nothing and fails after one
window.

Timeouts (`call_timeout`): a caller passes the longest wait it accepts;
reads (`ecfs.data.reader`) ask the runner for one derived from the
store's measured latency: CALL_TIMEOUT_FACTOR x the p99 of answered
calls, at least CALL_TIMEOUT_FLOOR, at most the caller's bound (which
is also used until TIMEOUT_MIN_SAMPLES calls were measured). A fast
local disk that stops answering is failed after CALL_TIMEOUT_FLOOR
seconds; a remote store whose normal p99 is high gets up to the bound
before it is called failed. Writes keep the writer's deadline
(`ecfs.data.writer.write_deadline`); other calls the runner's `timeout`.
The derived timeout is recomputed only when the percentiles are.

Concurrency (`max_threads`, the per-store limiter): what the store says
it serves well at once (`Store.concurrency`) unless the caller sets it.
The rule: a local disk, DIRECTORY_CONCURRENCY calls (its queue is kept
full by a few; more only queue in the kernel and delay reads behind
writes); an object store, REMOTE_CONCURRENCY (each request waits mostly
on the network and the server parallelises: by Little's law, at 30 ms a
request 32 in flight carry ~1000 requests/s).

Threads: calls run in trio's thread cache, started with
`trio.lowlevel.start_thread_soon` and reported back with one
`run_sync_soon`, not through `trio.to_thread.run_sync`: measured here, a
round trip costs ~110 us this way against ~175 us through to_thread with a
limiter and a timeout, and a random 4 KiB read is one round trip. A call
can also outlive the task that started it (`start` / `PendingCall`), so a
caller may wait for it, give up waiting and wait again; today only `call`
uses that (the reader's hedged reads still race two tasks in a nursery).
"""

from __future__ import annotations

import bisect
import enum
import errno
import functools
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar, TypeVarTuple, cast

import outcome
import trio

from ..core.errors import (
    BadFragmentEntry,
    EcfsError,
    FragmentMissing,
    NoSpace,
    StoreError,
    StoreTimeout,
)
from ..core.model import NO_STORE
from .store import Store

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: A health check (`StoreRunner.health_call`) fails the store when neither
#: it nor any other call of the store answered for this long (seconds), or
#: for PROBE_QUEUE_FACTOR x its expected latency if that is longer...
PROBE_TIMEOUT = 2.0
PROBE_QUEUE_FACTOR = 3.0
#: ... and after this long in all, answers or not.
PROBE_TIMEOUT_MAX = 60.0
#: Latencies kept for p50/p95.
LATENCY_WINDOW = 256
#: Upper bounds (seconds, inclusive) of the latency histogram's buckets;
#: one more bucket counts the samples above the last bound (Prometheus'
#: le="+Inf"). From a page cache hit to a remote store timing out.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Weight of a new sample in the fast EWMA (`latency_ewma`).
EWMA_ALPHA = 0.2
#: Weight of a new sample in the slow baseline EWMA used for SLOW.
BASELINE_ALPHA = 0.02
#: expected_latency of a store with no measured call yet (seconds).
UNMEASURED_LATENCY = 0.01
#: The last this many small reads give `small_read_quantiles`, once there
#: are SMALL_MIN_SAMPLES of them.
SMALL_WINDOW = 16
SMALL_MIN_SAMPLES = 8
#: Reads of up to this many bytes are "small" for `expected_latency(nbytes)`.
SMALL_READ = 64 * 1024
#: hedge_deadline never goes below this (seconds).
HEDGE_FLOOR = 0.05
SLOW_MIN_SAMPLES = 20
#: Percentiles are exact for the first samples, then refreshed every
#: PERCENTILE_REFRESH samples (sorting the window on every call cost ~5% of
#: the write path's CPU).
PERCENTILE_EXACT_SAMPLES = 64
PERCENTILE_REFRESH = 16
SLOW_FACTOR = 5.0
SLOW_FLOOR = 0.02
#: Data calls in a row answering within the clearing bound that restart an
#: inflated fast EWMA from the baseline (see "SLOW" in the module docstring).
QUICK_ANSWERS = 3
#: A quick health check restarts it too when no data call was measured for
#: this many seconds.
SLOW_STALE = 2.0
#: `call_timeout`: this many times the p99 of answered calls, at least
#: CALL_TIMEOUT_FLOOR seconds (twice the health probe's PROBE_TIMEOUT: a
#: store that answers its probes is not failed by a read quicker than
#: that), once TIMEOUT_MIN_SAMPLES calls were measured.
CALL_TIMEOUT_FACTOR = 10.0
CALL_TIMEOUT_FLOOR = 4.0
TIMEOUT_MIN_SAMPLES = 20

#: CPU work (encode, decode) on more bytes than this runs in a worker thread
#: (`run_cpu`), smaller work on the loop: below it a thread round trip costs
#: more than the work itself.
LOOP_CPU_LIMIT = 64 * 1024

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PENDING, _RUNNING, _DONE, _GIVEN_UP, _ABANDONED = range(5)


class StoreState(enum.Enum):
    """Health of a store as seen by its runner."""

    OK = "ok"
    SLOW = "slow"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A snapshot of a runner's counters (from `StoreRunner.statistics()`).

    Latencies are in seconds and 0.0 before the first measured call.
    `in_flight` counts calls running in threads (abandoned ones included);
    `abandoned` those whose caller gave up but whose thread still runs;
    `abandoned_total` every call given up while it ran (a hedge won, a
    timeout), `late_answers` those of them that returned after all.
    `max_threads` is the store's concurrency limit. `read_ops` and
    `write_ops` count successful calls that read or wrote bytes (and reads
    served on the loop); `latency_p99` is of the same window as p50/p95;
    `latency_histogram` counts every latency sample per bucket of
    LATENCY_BUCKETS (not cumulative; the last entry: above the last bound),
    `latency_sum` is their total in seconds.
    """

    index: int
    state: StoreState
    in_flight: int
    calls: int
    errors: int
    timeouts: int
    abandoned: int
    abandoned_total: int
    late_answers: int
    max_threads: int
    latency_ewma: float
    latency_p50: float
    latency_p95: float
    bytes_read: int
    bytes_written: int
    read_ops: int = 0
    write_ops: int = 0
    latency_p99: float = 0.0
    latency_histogram: tuple[int, ...] = ()
    latency_sum: float = 0.0


class _ThreadJob(Generic[T]):
    """Runs `fn` in the worker thread, timing it and noticing abandonment.

    `stage` is guarded by the runner's abandon lock and moves
    pending -> running -> done, or pending -> given_up (the caller gave up
    before a thread picked the job: `fn` is then never called), or
    running -> abandoned -> done (the caller gave up while `fn` ran: the
    runner counts it as abandoned until `fn` returns).
    """

    __slots__ = ("abandoned", "elapsed", "failures", "fn", "runner", "stage")

    def __init__(self, runner: StoreRunner, fn: Callable[..., T]) -> None:
        self.runner = runner
        self.fn = fn
        self.stage = _PENDING
        self.elapsed = 0.0
        #: The runner's count of mark_failed calls when the call started.
        self.failures = runner._failures
        #: Set (for good) when the caller gave up while `fn` ran.
        self.abandoned = False

    def run(self, *args: object) -> T | None:
        if not self.runner._thread_starting(self):
            return None
        clock = self.runner._clock
        start = clock()
        try:
            return self.fn(*args)
        finally:
            self.elapsed = clock() - start
            self.runner._thread_finished(self)


class PendingCall(Generic[T]):
    """A store call started by `StoreRunner.start`.

    Its worker thread runs to the end whether or not anyone waits for it.
    `result()` waits for the outcome and may be cancelled or timed out
    without stopping the call; `abandon()` says nobody will wait any more
    (the store then counts the call as abandoned until its thread returns,
    which is how a hung store's stuck threads show). Health and latency are
    accounted when the call ends, on the loop.
    """

    __slots__ = ("_done", "_job", "_outcome", "nbytes_read", "nbytes_written")

    def __init__(self, job: _ThreadJob[T], nbytes_read: int, nbytes_written: int) -> None:
        self._job = job
        self._done = trio.Event()
        self._outcome: outcome.Outcome[T] | None = None
        self.nbytes_read = nbytes_read
        self.nbytes_written = nbytes_written

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def result(self) -> T:
        """The call's return value, or its (translated) exception."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()

    def abandon(self) -> None:
        """Nobody waits for this call any more (a no-op once it is done)."""
        if not self.done:
            self._job.runner._abandon_if_running(self._job)


class StoreRunner:
    """Runs blocking calls on one store and keeps its health and latency.

    `index` is the store's index in the volume; `store` the store object
    whose methods are passed to `call` (kept here so services find it).
    """

    #: Called with the runner on each change between available and FAILED
    #: (after the change; the volume turns it into an event, `ecfs.core.events`).
    on_health_change: Callable[[StoreRunner], None] | None = None

    def __init__(
        self,
        index: int,
        store: Store,
        *,
        max_threads: int | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_threads is None:
            max_threads = store.concurrency
        if max_threads < 1:
            raise ValueError("max_threads must be >= 1")
        self.index = index
        self.store = store
        self._max_threads = max_threads
        self._timeout = timeout
        self._clock = clock
        self._limiter = trio.CapacityLimiter(max_threads)
        self._thread_name = f"ecfs store {index}"
        self._abandon_lock = threading.Lock()
        self._abandoned = 0
        self._abandoned_total = 0
        self._late_answers = 0
        self._calls = 0
        self._errors = 0
        self._timeouts = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._read_ops = 0
        self._write_ops = 0
        self._histogram = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._failure: str | None = None
        #: mark_failed calls so far (a call running across one is no sample).
        self._failures = 0
        #: Quick data answers in a row while the fast EWMA is inflated.
        self._quick = 0
        #: Calls that ended with an answer from the store (any outcome),
        #: and answers noted by services (`note_answer`).
        self._answers = 0
        #: When (`clock`) the store last answered.
        self._last_answer = -math.inf
        #: When (`clock`) a data call was last measured.
        self._last_data = -math.inf
        #: Whether a read of data was timed (`measured`).
        self._read_measured = False
        self._slow = False
        self._samples = 0
        self._ewma = 0.0
        self._baseline = 0.0
        #: Read latency EWMAs by size class (small, large): `expected_latency`.
        self._size_ewma: list[float | None] = [None, None]
        #: The last SMALL_WINDOW small-read latencies, and their (median,
        #: p90) once asked for (`small_read_quantiles`).
        self._small_reads: deque[float] = deque(maxlen=SMALL_WINDOW)
        self._small_quantiles: tuple[float, float] | None = None
        self._window: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._sorted_window: list[float] | None = []
        #: (bound, timeout) of the last `call_timeout`; None once the
        #: percentiles may have changed.
        self._timeout_memo: tuple[float, float] | None = None

    def __repr__(self) -> str:
        return f"StoreRunner({self.index}, {self.store!r}, state={self.state.value})"

    # ---- running calls

    async def call(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        timeout: float | None = None,  # noqa: ASYNC109 (per-call deadline is the API)
        nbytes_read: int = 0,
        nbytes_written: int = 0,
    ) -> T:
        """Run ``fn(*args)`` in a worker thread of this store and return its result.

        At most `max_threads` calls of this store run at once; the others
        wait (the wait counts against the timeout). If no result arrives
        within `timeout` (default: the runner's), the thread is abandoned
        and StoreTimeout is raised; on cancellation the thread is abandoned
        too and Cancelled propagates. An OSError escaping `fn` becomes
        StoreError (NoSpace for ENOSPC/EDQUOT); EcfsError subclasses and
        any other exception pass through unchanged. `nbytes_read` and
        `nbytes_written` are added to the statistics on success.
        """
        limit = self._timeout if timeout is None else timeout
        pending: PendingCall[T] | None = None
        try:
            with trio.fail_after(limit):
                pending = await self.start(
                    fn, *args, nbytes_read=nbytes_read, nbytes_written=nbytes_written
                )
                return await pending.result()
        except trio.TooSlowError:
            if pending is not None:
                pending.abandon()
            raise self._timed_out(fn, limit) from None
        except trio.Cancelled:
            if pending is not None:
                pending.abandon()
            raise

    async def start(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        nbytes_read: int = 0,
        nbytes_written: int = 0,
    ) -> PendingCall[T]:
        """Start ``fn(*args)`` in a worker thread of this store and return
        at once (after waiting for a free thread of the store if all
        `max_threads` are busy). See PendingCall; `call` is start + result
        with a timeout. Errors are translated as `call` documents."""
        job: _ThreadJob[T] = _ThreadJob(self, fn)
        pending = PendingCall(job, nbytes_read, nbytes_written)
        self._calls += 1
        await self._limiter.acquire_on_behalf_of(pending)
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T | None]) -> None:  # in the worker thread
            try:
                token.run_sync_soon(self._finished, pending, result)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(
            functools.partial(job.run, *args), deliver, name=self._thread_name
        )
        return pending

    def _finished(self, pending: PendingCall[T], result: outcome.Outcome[T | None]) -> None:
        """Loop side of a finished call: account it, hand over its outcome."""
        self._limiter.release_on_behalf_of(pending)
        job = pending._job
        settled: outcome.Outcome[T] = cast("outcome.Outcome[T]", result)
        if job.stage == _DONE:
            self.note_answer()
        # A call that ran while the store was marked failed timed the hang.
        measured = job.failures == self._failures
        if isinstance(result, outcome.Error):
            exc = result.error
            if isinstance(exc, OSError):
                translated = _translate_os_error(exc, self.index, job.fn)
                translated.__cause__ = exc
                settled = outcome.Error(translated)
                exc = translated
            if not job.abandoned:
                if isinstance(exc, FragmentMissing):
                    if measured:
                        self._record_sample(job.elapsed, read=pending.nbytes_read > 0)
                elif isinstance(exc, EcfsError):
                    self._note_error(exc)
        elif not job.abandoned:
            if measured:
                read = pending.nbytes_read > 0
                self._record_sample(
                    job.elapsed, data=read or pending.nbytes_written > 0, read=read,
                    nbytes=pending.nbytes_read,
                )  # fmt: skip
            if pending.nbytes_read:
                self._bytes_read += pending.nbytes_read
                self._read_ops += 1
            if pending.nbytes_written:
                self._bytes_written += pending.nbytes_written
                self._write_ops += 1
        elif job.stage == _DONE:  # abandoned while it ran, and it answered after all
            self._record_late_answer(job.elapsed, pending.nbytes_read)
        pending._outcome = settled
        pending._done.set()

    def _abandon_if_running(self, job: _ThreadJob[T]) -> None:
        """Caller side: the caller gave up on `job`; count it if `fn` runs."""
        with self._abandon_lock:
            if job.stage == _PENDING:
                job.stage = _GIVEN_UP
                job.abandoned = True  # its (empty) outcome is dropped too
                return
            if job.stage != _RUNNING:
                return
            job.stage = _ABANDONED
            job.abandoned = True
            self._abandoned += 1
            self._abandoned_total += 1
            abandoned = self._abandoned
        if abandoned >= self._max_threads and self.silent_for(PROBE_TIMEOUT):
            self.mark_failed(f"{abandoned} threads stuck in store calls")

    def _thread_starting(self, job: _ThreadJob[T]) -> bool:
        """Worker side: whether to run `fn` (False if the caller gave up)."""
        with self._abandon_lock:
            if job.stage == _GIVEN_UP:
                return False
            job.stage = _RUNNING
            return True

    def _thread_finished(self, job: _ThreadJob[T]) -> None:
        """Worker side: `fn` returned; settle the abandoned count."""
        with self._abandon_lock:
            if job.stage == _ABANDONED:
                self._abandoned -= 1
            job.stage = _DONE

    def _timed_out(self, fn: Callable[..., object], limit: float) -> StoreTimeout:
        """A call got no answer within `limit`: the store is failed if
        nothing else of it answered meanwhile either (hung); one that
        answers other calls is slow, not failed (a disk at 2 MiB/s whose
        queued writes each wait seconds: the caller places that write
        elsewhere, reads decode around it)."""
        self._timeouts += 1
        exc = StoreTimeout(f"store {self.index}: {_name(fn)} did not answer within {limit:.3g} s")
        if self.silent_for(limit):
            self.mark_failed(str(exc))
        return exc

    def _note_error(self, exc: EcfsError) -> None:
        """Count `exc` and fail the store if it says the store is unhealthy."""
        if _is_health_error(exc):
            self._errors += 1
            self.mark_failed(str(exc))

    # ---- signals for services

    @property
    def in_flight(self) -> int:
        """Calls running in worker threads now (abandoned ones included);
        never more than max_threads."""
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        """Calls queued for a thread of this store."""
        return self._limiter.statistics().tasks_waiting

    @property
    def available(self) -> bool:
        """Whether services should use this store (state is not FAILED)."""
        return self._failure is None

    @property
    def state(self) -> StoreState:
        if self._failure is not None:
            return StoreState.FAILED
        return StoreState.SLOW if self._slow else StoreState.OK

    @property
    def failure_reason(self) -> str | None:
        """Why the store is FAILED (None when it is not)."""
        return self._failure

    @property
    def measured(self) -> bool:
        """Whether a read of this store's data has been timed yet (a call
        that read bytes, or `record_latency`): health checks and writes do
        not make a store an alternative for reads (the remote parity
        stores of a hybrid volume, say; see `ecfs.data.routing`)."""
        return self._read_measured

    def expected_latency(self, nbytes: int | None = None, *, queued: bool = True) -> float:
        """Estimated seconds for a new call: EWMA x (1 + queue depth).

        Queue depth = in_flight + waiting. A store never measured counts as
        UNMEASURED_LATENCY per call. With `nbytes` (a read of that size),
        the EWMA is that of the reads of its size class (up to SMALL_READ
        bytes, or more), once one was measured: a 4 KiB read and a 1 MiB
        one differ by the transfer time, so stores are compared like with
        like (a store whose last samples were large reads is not slower
        than one whose last samples were small ones). Without `queued`,
        the EWMA alone (the service time of one call).
        """
        per_call = self._ewma if self._samples else UNMEASURED_LATENCY
        if nbytes is not None:
            by_size = self._size_ewma[nbytes > SMALL_READ]
            if by_size is not None:
                per_call = by_size
        return per_call * (1 + self.in_flight + self.waiting) if queued else per_call

    def small_read_quantiles(self) -> tuple[float, float] | None:
        """(median, 90th percentile) of the last SMALL_WINDOW small reads'
        latencies; None before SMALL_MIN_SAMPLES were timed. The reader
        compares a store's typical small read with the slow tail of the
        reads that would replace it (see `ecfs.data.routing`)."""
        if self._small_quantiles is None and len(self._small_reads) >= SMALL_MIN_SAMPLES:
            ordered = sorted(self._small_reads)
            p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            self._small_quantiles = (statistics.median(ordered), p90)
        return self._small_quantiles

    @property
    def small_reads_timed(self) -> int:
        """How many small reads `small_read_quantiles` has (at most
        SMALL_WINDOW)."""
        return len(self._small_reads)

    def measured_size(self, nbytes: int) -> bool:
        """Whether a read of `nbytes`'s size class was timed, or no read of
        a known size was (see `expected_latency`): False when only reads
        of the other size class were, whose latency says little of this."""
        classes = self._size_ewma
        return classes[nbytes > SMALL_READ] is not None or classes == [None, None]

    def hedge_deadline(self) -> float:
        """Seconds to wait for this store before asking another source too:
        max(HEDGE_FLOOR, 3 x latency_p95)."""
        return max(HEDGE_FLOOR, 3 * self.latency_p95())

    def latency_p95(self) -> float:
        """p95 of the latency window, seconds (0.0 when empty): what
        `statistics` reports, without building the whole snapshot."""
        return self._percentile(0.95)

    def call_timeout(self, bound: float) -> float:
        """A timeout for one call derived from this store's measured
        latency: CALL_TIMEOUT_FACTOR x p99 of its answered calls, at least
        CALL_TIMEOUT_FLOOR, at most `bound` (also the answer until
        TIMEOUT_MIN_SAMPLES calls were measured). See the module docstring."""
        if self._samples < TIMEOUT_MIN_SAMPLES:
            return bound
        memo = self._timeout_memo
        if memo is None or memo[0] != bound:
            derived = max(CALL_TIMEOUT_FLOOR, CALL_TIMEOUT_FACTOR * self._percentile(0.99))
            memo = self._timeout_memo = (bound, min(bound, derived))
        return memo[1]

    def record_latency(self, seconds: float, nbytes: int = 0) -> None:
        """Record a latency measured elsewhere (e.g. an on-loop cached read,
        or what a read outrun by a hedge had waited): a data call's (a read
        of `nbytes`, if known: see `expected_latency`)."""
        self._record_sample(seconds, data=True, read=True, nbytes=nbytes)

    def record_loop_read(self, nbytes: int) -> None:
        """Count a read of `nbytes` made without one of this runner's
        threads (a page cache hit served on the loop, a repair's sources
        read in one call) in the read counters."""
        self._read_ops += 1
        self._bytes_read += nbytes

    def note_answer(self) -> None:
        """The store answered a request (one of this runner's calls, or
        one made outside it: a read-ahead): it is not hung."""
        self._answers += 1
        self._last_answer = self._clock()

    def silent_for(self, seconds: float) -> bool:
        """Whether nothing of the store answered for `seconds` (true of a
        store that never answered)."""
        return self._clock() - self._last_answer >= seconds

    def mark_failed(self, reason: str) -> None:
        """Move to FAILED (sticky until mark_ok) with a human-readable reason."""
        was_available = self._failure is None
        self._failure = reason
        self._failures += 1
        if was_available and self.on_health_change is not None:
            self.on_health_change(self)

    def mark_ok(self) -> None:
        """Clear FAILED and SLOW (e.g. after a successful probe); the fast
        EWMA starts again from the baseline: a store back from a hang is
        judged by its answers from now on, not by the late answers of the
        calls it hung on."""
        was_failed = self._failure is not None
        self._failure = None
        self._restart_fast_estimate()
        self._size_ewma = [None, None]  # from the baseline again too
        self._small_reads.clear()
        self._small_quantiles = None
        if was_failed and self.on_health_change is not None:
            self.on_health_change(self)

    def _restart_fast_estimate(self) -> None:
        self._slow = False
        self._quick = 0
        self._ewma = self._baseline

    def probe_window(self) -> float:
        """Seconds a health check waits for an answer of the store before
        it looks whether the store answered anything else meanwhile (see
        the module docstring)."""
        slowest = max([self._ewma if self._samples else 0.0, *filter(None, self._size_ewma)])
        queue = slowest * (1 + self.in_flight + self.waiting)
        return min(PROBE_TIMEOUT_MAX, max(PROBE_TIMEOUT, PROBE_QUEUE_FACTOR * queue))

    async def health_call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` as a health check: like `call`, but StoreTimeout
        (and FAILED) only if a whole `probe_window` passed with no answer
        from the store to this or any other call, or PROBE_TIMEOUT_MAX in
        all (see the module docstring)."""
        started = trio.current_time()
        pending: PendingCall[T] | None = None
        try:
            while True:
                answers = self._answers
                with trio.move_on_after(self.probe_window()):
                    if pending is None:
                        pending = await self.start(fn, *args)
                    result = await pending.result()
                    quick = pending._job.elapsed < self._slow_bound() / 2
                    idle = self.in_flight == 0 and self._clock() - self._last_data >= SLOW_STALE
                    if quick and idle:
                        self._restart_fast_estimate()  # nothing says it is slow now
                    return result
                waited = trio.current_time() - started
                if self._answers == answers or waited >= PROBE_TIMEOUT_MAX:
                    break  # nothing of the store answered: hung
        except trio.Cancelled:
            if pending is not None:
                pending.abandon()
            raise
        if pending is not None:
            pending.abandon()
        raise self._timed_out(fn, waited)

    async def probe(self) -> bool:
        """Run the store's cheap health check (`health_call`).

        Success -> mark_ok() and True; a StoreError (incl. timeout) ->
        mark_failed() and False. Runs through the limiter, so a store whose
        threads are all stuck fails its probe.
        """
        try:
            await self.health_call(self.store.probe)
        except StoreError as exc:
            self.mark_failed(f"probe failed: {exc}")
            return False
        self.mark_ok()
        return True

    def statistics(self) -> StoreStatistics:
        """A snapshot of this runner's counters and latencies."""
        return StoreStatistics(
            index=self.index,
            state=self.state,
            in_flight=self.in_flight,
            calls=self._calls,
            errors=self._errors,
            timeouts=self._timeouts,
            abandoned=self._abandoned,
            abandoned_total=self._abandoned_total,
            late_answers=self._late_answers,
            max_threads=self._max_threads,
            latency_ewma=self._ewma,
            latency_p50=self._percentile(0.5),
            latency_p95=self._percentile(0.95),
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            read_ops=self._read_ops,
            write_ops=self._write_ops,
            latency_p99=self._percentile(0.99),
            latency_histogram=tuple(self._histogram),
            latency_sum=self._latency_sum,
        )

    # ---- latency bookkeeping

    def _record_sample(
        self, seconds: float, *, data: bool = False, read: bool = False, nbytes: int = 0
    ) -> None:
        """A measured call took `seconds`; `data`: it read or wrote bytes
        (only those count as quick answers, see the module docstring);
        `read`: it read bytes (`measured`), `nbytes` of them if known."""
        seconds = max(0.0, seconds)
        if nbytes:
            self._size_sample(seconds, nbytes)
        if data:
            self._last_data = self._clock()
        if read:
            self._read_measured = True
        if self._samples == 0:
            self._ewma = self._baseline = seconds
        else:
            clear = self._slow_bound() / 2
            if data and seconds < clear < self._ewma:
                self._quick += 1
                if self._quick >= QUICK_ANSWERS:
                    self._restart_fast_estimate()  # quick again: as mark_ok does
            else:
                self._quick = 0
            self._ewma += EWMA_ALPHA * (seconds - self._ewma)
            if not self._slow:  # see "SLOW" in the module docstring
                self._baseline += BASELINE_ALPHA * (seconds - self._baseline)
        self._samples += 1
        self._histogram[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds
        self._window.append(seconds)
        if self._samples < PERCENTILE_EXACT_SAMPLES or self._samples % PERCENTILE_REFRESH == 0:
            self._sorted_window = None  # percentiles are re-sorted lazily, not per call
            self._timeout_memo = None
        self._update_slow()

    def _size_sample(self, seconds: float, nbytes: int) -> None:
        """Move the EWMA of `nbytes`'s size class (see `expected_latency`)."""
        large = nbytes > SMALL_READ
        old = self._size_ewma[large]
        self._size_ewma[large] = seconds if old is None else old + EWMA_ALPHA * (seconds - old)
        if not large:
            self._small_reads.append(seconds)
            self._small_quantiles = None

    def _record_late_answer(self, seconds: float, nbytes: int = 0) -> None:
        """An abandoned call returned after `seconds`: the fast EWMA only
        (see the module docstring); nothing before a first measured call,
        which gives the baseline to compare with, nor while FAILED (the
        calls a hung store releases say how long it hung, not how fast it
        is; `mark_ok` starts afresh)."""
        self._late_answers += 1
        if self._samples and self._failure is None:
            if nbytes:
                self._size_sample(seconds, nbytes)
            self._quick = 0
            self._last_data = self._clock()
            self._ewma += EWMA_ALPHA * (max(0.0, seconds) - self._ewma)
            self._update_slow()

    def _slow_bound(self) -> float:
        """The fast EWMA above which the store is SLOW (see the module docstring)."""
        return max(SLOW_FLOOR, SLOW_FACTOR * self._baseline)

    def _update_slow(self) -> None:
        if self._samples < SLOW_MIN_SAMPLES:
            return
        bound = self._slow_bound()
        if self._ewma > bound:
            self._slow = True
        elif self._ewma < bound / 2:
            self._slow = False

    def _percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latency window (0.0 when empty)."""
        if self._sorted_window is None:
            self._sorted_window = sorted(self._window)
        ordered = self._sorted_window
        if not ordered:
            return 0.0
        rank = math.ceil(q * len(ordered) - 1e-9)
        return ordered[min(max(rank, 1), len(ordered)) - 1]


async def run_in_thread(
    fn: Callable[[*Ts], T],
    *args: *Ts,
    limiter: trio.CapacityLimiter | None = None,
    abandon_on_cancel: bool = False,
) -> T:
    """Run a blocking ``fn(*args)`` that is not a store call in a worker
    thread (trio's `to_thread.run_sync`: `limiter` bounds how many run at
    once; with `abandon_on_cancel` a cancelled caller returns at once and
    the thread runs on). Store calls go through `StoreRunner.call`."""
    return await trio.to_thread.run_sync(
        fn, *args, limiter=limiter, abandon_on_cancel=abandon_on_cancel
    )


async def run_cpu(
    fn: Callable[[*Ts], T],
    *args: *Ts,
    size: int,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """``fn(*args)``, CPU work on `size` bytes: on the loop up to
    LOOP_CPU_LIMIT bytes, in a worker thread (bounded by `limiter`) above."""
    if size > LOOP_CPU_LIMIT:
        return await run_in_thread(fn, *args, limiter=limiter)
    return fn(*args)


def available_runner(runners: Mapping[int, StoreRunner], store: int) -> StoreRunner | None:
    """The runner serving fragment slots recorded on `store` if services
    should use it now; None for NO_STORE, a store the volume does not have
    open, or a FAILED one."""
    runner = runners.get(store) if store != NO_STORE else None
    return runner if runner is not None and runner.available else None


def _is_health_error(exc: EcfsError) -> bool:
    """Whether an error from a store call says the store is unhealthy."""
    return isinstance(exc, StoreError) and not isinstance(
        exc, (FragmentMissing, NoSpace, BadFragmentEntry)
    )


def _translate_os_error(exc: OSError, index: int, fn: Callable[..., object]) -> StoreError:
    reason = exc.strerror or str(exc)
    message = f"store {index}: {_name(fn)}: {reason}"
    if exc.errno in _NO_SPACE_ERRNOS:
        return NoSpace(message)
    return StoreError(message, errno=errno.EIO)


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
