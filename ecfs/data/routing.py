"""Routing reads around lagging stores: whom to wait for, and how long.

Owns: the decisions of issue 17's scheduling, for the reader
(`ecfs.data.reader`): whether a read of a data fragment is to be routed
around its store (its range decoded from k other fragments instead:
`Router.route_around`), after how long a read waited for is hedged
(`hedge_deadline`) and whether a hedge is allowed at all (`may_hedge`),
when a routed-around store gets a probe read (`probe_due`), and when a
store whose reads are outrun again and again is failed as hung
(`note_outrun`); and the evidence those decisions take beyond the
stores' own statistics (`StoreRunner`): the stores routed around now
(`avoided`), the pieces of requests being read from each store
(`busy`), and how long the reads of each store being waited for have
waited (`waiting`). Must not: read, decode or plan anything itself. The
reader acts on the answers (decodes, hedges, sends the probe) and is
told, through the `replan` callback, when a store starts lagging or is
found unavailable, so that it plans its read-ahead again.

The rule (`route_around`), for a data fragment whose store is measurably
slower than the alternative, which is then not waited for:

* A small read (up to SMALL_READ = 64 KiB, e.g. a 4 KiB random read)
  compares like with like, small reads of each store, by service time
  alone (queue imbalance at QD16 is no reason to read k fragments
  instead of one): once SMALL_MIN_SAMPLES of the store's small reads were
  timed, the median of its last ones (`StoreRunner.small_read_quantiles`)
  against the k-th smallest 90th percentile of the others' (a routed read
  waits for the slowest of k), routed above SMALL_AVOID_FACTOR x that
  plus SMALL_AVOID_MARGIN, read again below SMALL_RESUME_FACTOR x that
  (stores at their IOPS limit that all wait now and then route nothing:
  routing would cost k reads of stores just as limited; the EWMAs had
  each store in turn look 8x slower after a run of waits); before that,
  the EWMAs of small reads (`StoreRunner.expected_latency(nbytes)`; only
  stores measured by small reads count, on both sides: a store just
  measured by 1 MiB reads is not slower than one measured by 4 KiB ones)
  with FEW_SAMPLES_MARGIN, so that only a store far behind (100 ms) is
  routed around on few samples.
* A routed small read costs k reads of other stores: cheap while k of
  them are idle (no piece of a request being read there: a reader at
  QD1), and the rule above decides; while they are busy too (QD16), their
  k reads queue behind what other requests wait for, and a store that
  waits is mostly busier, not slower (more of the data read is on it, or
  a burst of requests came; latencies cannot tell on disks at their IOPS
  limit, where the others answer at once until they are at it too): then
  each read decides for itself, routed when its store has k more pieces
  outstanding than the k-th least busy other (`_queue_routes`), whatever
  the rule above had decided (stores routed around in turn for seconds
  cost 1.2-1.9 device reads per request there).
* A large read (a whole fragment read ahead, a 1 MiB request) compares
  the EWMAs of large reads times the queue depth when the store and k
  others were timed reading large, else the EWMAs of every sample (the
  stores serving a sequential reader from their page cache have few
  timed large reads); and how long a read of the store has been waited
  for already, against the large reads of the others when k of them were
  timed (a store turning slow is seen before its first late answer or
  hedge; their small reads say nothing of how long a large one takes).
* A large read never starts routing around a store that is busy, not
  slow (`_busy_not_slow`): its read-ahead delivers at least
  BUSY_NOT_SLOW of the median other's rate (`delivery_rate`, bytes per
  second while it has read-ahead to do: `ReadAhead.delivery_rate`). With
  a store missing at 40 MiB/s per disk, the busiest healthy disk's reads
  waited in its throttle's queue (0.08-0.19 s) while the others answered
  within their burst (0.002-0.02 s): 9x, as a disk at 2 MiB/s is, and it
  was routed around wholly for 2 s at a time, four disks serving the
  read (160 MiB/s instead of 200). By rate they differ by 10-20x: the
  busy disk delivers its cap, the slow one 2 MiB/s.
* Route when the store's estimate exceeds AVOID_FACTOR (8) x that of the
  k-th fastest other source plus a margin for what the routed read
  itself costs: SMALL_AVOID_MARGIN (1 ms) for small reads, AVOID_MARGIN
  (5 ms) for large ones. A 4 KiB read of a disk at 2 MiB/s (2-8 ms
  against 0.1-0.3 ms) is then routed, which one fixed 5 ms margin never
  did (its p99 stayed 3-4 ms); equal stores, however noisy, and a store
  just measured by large reads among stores measured by small ones, are
  not.
* Only measured stores count on either side, so a store never read (the
  remote parity stores of a hybrid volume) never attracts reads on a
  guess: healthy reads of a healthy volume read the data fragments only.
* A store routed around gets a probe read, not waited for, every
  PROBE_INTERVAL (`probe_due`: the reader sends it) so that its latency
  stays measured; below RESUME_FACTOR x (after RESUME_AFTER seconds at
  least, with none of its calls in flight) it is read again.

A store that answers, however late, is never failed by the reader:
OUTRUN_LIMIT hedges in a row fail it only if nothing of it answered for
PROBE_TIMEOUT (a slow disk was failed this way, and every chunk it holds
queued for repair); the read-ahead's answers count (`answered`,
`StoreRunner.note_answer`), and read-ahead keeps at most a few fragments
in flight per store (see `ecfs.data.readahead`), so a lagging store's
queue stays short and its health check is answered. A read that is
waited for is hedged after its store's hedge deadline, capped at
HEDGE_ALTERNATIVE_FACTOR x the alternative's expected latency (a small
read: after that factor x the others' slow tail, at least HEDGE_FLOOR,
see `hedge_deadline`); a hedge that wins records what the abandoned read
had waited so far (a lower bound of its latency), so a store turning
slow is measured as such. Hedges are allowed for at most HEDGE_FRACTION
of fragment reads plus HEDGE_BURST (`may_hedge`).

Concurrency: everything here runs on the event loop and never awaits;
a decision reads the state as it is when asked (`busy` and `waiting`
change as the reader's tasks start and end their reads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from contextlib import contextmanager

from ..core.geometry import Layout
from ..core.model import ChunkRef
from ..storage.offload import (
    HEDGE_FLOOR,
    PROBE_TIMEOUT,
    SMALL_READ,
    StoreRunner,
    available_runner,
)

log = logging.getLogger(__name__)

#: Consecutive reads of one store beaten by their hedge before the store
#: is marked failed (hung).
OUTRUN_LIMIT = 4

#: Slow-read hedges allowed: this fraction of fragment reads, plus a burst.
HEDGE_FRACTION = 0.05
HEDGE_BURST = 16

#: A data fragment's store is routed around (the range decoded from k other
#: fragments instead) when its expected latency for the read (small: up to
#: offload.SMALL_READ bytes, or large; see the module docstring) exceeds
#: AVOID_FACTOR times that of the k-th fastest other measured source plus a margin,
#: SMALL_AVOID_MARGIN for small reads and AVOID_MARGIN for large ones; it
#: is used again once it falls below RESUME_FACTOR times (hysteresis). The
#: factor keeps the queueing of equal stores (a busy healthy store reaches
#: 4-5x the others now and then) from routing; the margin is what a
#: routed read costs beyond the alternative's latency (k reads instead of
#: one, a worker thread, the decode: ~0.3-1 ms for 4 KiB here, a few ms
#: for the k MiB of a large one). Measured on 6 capped loop devices
#: (scripts/bench_disks.py): a 4 KiB read of a device at 2 MiB/s takes 2-8
#: ms against 0.1-0.2 ms for the others at 40 MiB/s (10-40x), a 1 MiB
#: read 0.5 s against 25 ms (20x). (One 5 ms margin for all sizes never
#: routed small reads around the slow device.)
AVOID_FACTOR = 8.0
#: Small reads: a store is routed around when the median of its last small
#: reads exceeds SMALL_AVOID_FACTOR x the k-th smallest 90th percentile of
#: the others' plus SMALL_AVOID_MARGIN, and read again once it is below
#: SMALL_RESUME_FACTOR x that (see `Router.route_around`).
SMALL_AVOID_FACTOR = 2.0
SMALL_RESUME_FACTOR = 1.0
#: Before SMALL_MIN_SAMPLES small reads of a store were timed, it is routed
#: around only when its EWMA exceeds AVOID_FACTOR x the alternative's plus
#: this (see `Router.route_around`).
FEW_SAMPLES_MARGIN = 0.05
AVOID_MARGIN = 0.005
SMALL_AVOID_MARGIN = 0.001
RESUME_FACTOR = 3.0

#: A store whose read-ahead delivers at least this fraction of the median
#: other's delivery rate is busy, not slow: a large read never starts
#: routing around it (see `Router._busy_not_slow`). A disk at 2 MiB/s
#: among disks at 40 or 150 delivers 1/20-1/75 of their rate (1/4-1/15
#: after its first slow delivery); a busy one 1/2-1 (the others, idle
#: between bursts, deliver up to 2x their cap).
BUSY_NOT_SLOW = 0.2

#: A read is hedged after at most this many times the expected latency of
#: doing without it (see `Router.hedge_deadline`).
HEDGE_ALTERNATIVE_FACTOR = 3.0

#: While a store is routed around, one real read (not waited for) goes to
#: it at most this often (seconds), so that its latency stays measured and
#: it is used again once it is fast.
PROBE_INTERVAL = 0.5

#: A store routed around is read again only after this many seconds, and
#: only with no call of it in flight (its probe reads then measured it:
#: the reads that were outrun and abandoned never are).
RESUME_AFTER = 2.0


class Router:
    """Decides, for one reader, whether to wait for a store and how long
    (see the module docstring). `runners` are the volume's stores by
    index; `replan` is called with a store that starts lagging or is
    found unavailable (the reader plans its read-ahead again)."""

    def __init__(
        self, layout: Layout, runners: Mapping[int, StoreRunner], replan: Callable[[int], None]
    ) -> None:
        self.layout = layout
        self.runners = runners
        self._replan = replan
        #: Store -> bytes/s its read-ahead delivers while busy, or None if
        #: not known (`ReadAhead.delivery_rate`; set by the reader).
        self.delivery_rate: Callable[[int], float | None] | None = None
        #: Store -> reads of it in a row beaten by their hedge (`note_outrun`).
        self._outrun: dict[int, int] = {}
        #: Stores routed around now -> when the last probe read was sent.
        self._avoided: dict[int, float] = {}
        self._avoided_since: dict[int, float] = {}
        #: Stores found unavailable by the last read of one of their fragments.
        self._unavailable: set[int] = set()
        #: Store -> when the reads of it being waited for now started
        #: (oldest first): evidence of a lag before any of them ends.
        self._reading: dict[int, list[float]] = {}
        #: Store -> pieces of requests being read from it now (`busy`):
        #: whether the other stores are busy too (`_queue_routes`).
        self._outstanding: dict[int, int] = {}

    @property
    def avoided(self) -> Container[int]:
        """The stores routed around now (their reads are decoded from
        others; no cached read is tried on them)."""
        return self._avoided

    @contextmanager
    def busy(self, stores: Iterable[int]) -> Iterator[None]:
        """Count a piece of a request as being read from each of `stores`
        for the body of the `with` (`_queue_routes` weighs these)."""
        stores = list(stores)
        outstanding = self._outstanding
        for store in stores:
            outstanding[store] = outstanding.get(store, 0) + 1
        try:
            yield
        finally:
            for store in stores:
                if outstanding[store] == 1:
                    del outstanding[store]
                else:
                    outstanding[store] -= 1

    @contextmanager
    def waiting(self, store: int, started: float) -> Iterator[None]:
        """A read of `store` started at `started` (time.monotonic()) is
        waited for during the body of the `with`: how long it waited
        already is evidence of a lag (`route_around`, large reads)."""
        reading = self._reading.setdefault(store, [])
        reading.append(started)
        try:
            yield
        finally:
            reading.remove(started)

    def note_unavailable(self, store: int) -> None:
        """A read found `store` unavailable: the first time (since it was
        last found available), its outrun reads are counted afresh once it
        is back and the reader plans its read-ahead again (`replan`)."""
        if store not in self._unavailable:
            self._unavailable.add(store)
            self._outrun.pop(store, None)  # back later: counted afresh
            self._replan(store)

    def note_available(self, store: int) -> None:
        """A read found `store` available (see `note_unavailable`)."""
        self._unavailable.discard(store)

    def note_in_time(self, store: int) -> None:
        """A read of `store` answered before its hedge won: the count of
        its reads outrun in a row starts again (`note_outrun`)."""
        self._outrun.pop(store, None)

    def answered(self, store: int) -> None:
        """Read-ahead of `store` returned: it answers (see `note_outrun`)."""
        runner = self.runners.get(store)
        if runner is not None:
            runner.note_answer()

    def may_hedge(self, hedged: int, reads: int) -> bool:
        """Whether one more slow read may be hedged, `hedged` of `reads`
        fragment reads having been: hedging costs k extra reads, so at
        most HEDGE_FRACTION of fragment reads (plus a small burst
        allowance, HEDGE_BURST)."""
        return hedged < HEDGE_BURST + HEDGE_FRACTION * reads

    def probe_due(self, runner: StoreRunner) -> bool:
        """Whether a probe read (not waited for) is to be sent to the
        routed-around store of `runner` now: at most every PROBE_INTERVAL,
        and only when nothing else of it runs. True notes it as sent."""
        now = time.monotonic()
        if runner.in_flight or now - self._avoided.get(runner.index, now) < PROBE_INTERVAL:
            return False
        self._avoided[runner.index] = now
        return True

    def note_outrun(self, runner: StoreRunner) -> None:
        """A hedge beat this store's read: after OUTRUN_LIMIT in a row, if
        nothing of the store answered for PROBE_TIMEOUT seconds either,
        the store is treated as hung and failed (its health probe brings it
        back once it answers again), instead of every read waiting for the
        hedge deadline first. A store that answers, however late, is slow,
        not hung: the latency the hedges sample routes reads around it
        (`route_around`) and it stays usable (issue 17: a disk at 2 MiB/s
        was failed this way, and every chunk it held queued for repair)."""
        count = self._outrun.get(runner.index, 0) + 1
        self._outrun[runner.index] = count
        if count >= OUTRUN_LIMIT and runner.available and runner.silent_for(PROBE_TIMEOUT):
            runner.mark_failed(f"{count} reads in a row outrun by hedged reads: store hung?")
            log.warning("store %d: %d reads in a row did not answer in time; routing around it",
                        runner.index, count)
            self._outrun.pop(runner.index, None)

    def route_around(self, ref: ChunkRef, index: int, nbytes: int | None = None) -> bool:
        """Whether data fragment `index` of `ref` should be decoded from k
        other fragments instead of read (`nbytes` of it: None for a whole
        fragment read ahead), because its store is measurably slower than
        the alternative, by the rule of the module docstring: its
        estimate exceeds AVOID_FACTOR x that of the k-th fastest other
        source plus the margin of the read's size (and, once
        routed around, until it falls below RESUME_FACTOR x). Only measured
        stores count on either side: a store never read (a remote parity
        store of a hybrid volume, say) is never switched to on a guess, so
        healthy reads keep to the data fragments. When a store starts
        lagging, the reader is told (`replan`): it plans the chunks read
        ahead lately again."""
        store = ref.stores[index]
        runner = available_runner(self.runners, store)
        if runner is None or not runner.measured:
            return False
        if nbytes is None:
            nbytes = self.layout.of(ref).payload_length(ref.length)
        avoided = store in self._avoided
        small = nbytes <= SMALL_READ
        avoid_factor, resume_factor, resume_margin = AVOID_FACTOR, RESUME_FACTOR, 0.0
        other: float | None
        if small:
            if not avoided and not runner.measured_size(nbytes):
                return False  # only what was measured for reads of this size
            # The routed read waits for the slowest of k others: this
            # store's typical small read (median) against the others' slow
            # tail (p90). Stores that all wait now and then (a disk at its
            # IOPS limit) then route nothing: routing would cost k reads
            # of stores just as limited and wait for the slowest of them.
            # A routed read costs k reads of other stores: while k of them
            # are idle (nothing of this reader's outstanding there: a
            # reader at QD1, say) that is cheap, and the rule below
            # decides. While they are busy too, the k reads queue there
            # behind what the other requests wait for, and a store that
            # waits is mostly busier, not slower (more of the data read is
            # on it, or a burst of requests came; latencies cannot tell:
            # on disks at their IOPS limit the others answer at once until
            # they are at it too): then this read alone is routed, when
            # its store has k more of them outstanding than the k-th least
            # busy other (`_queue_routes`), whatever was decided before.
            # (On the benchmark's HDD model, 200 IOPS per device, QD16:
            # routed by the rule below, such stores in turn cost k device
            # reads per request for seconds, 2.4-3.6x the passthrough
            # instead of 4-5x.)
            busy = self._queue_routes(ref, index)
            if busy is not None:
                return busy
            margin = SMALL_AVOID_MARGIN
            quantiles = runner.small_read_quantiles()
            tail = None
            if quantiles is not None and (avoided or quantiles[0] > margin):
                tail = self._small_alternative(ref, index, nbytes)
            if quantiles is not None and tail is not None:
                mine, other = quantiles[0], tail
                avoid_factor, resume_factor = SMALL_AVOID_FACTOR, SMALL_RESUME_FACTOR
                resume_margin = margin / 2
            else:
                # Too few small reads timed for the quantiles (or none, its
                # estimate that of its other calls), or routed around
                # already: the EWMAs; while a few small reads were timed,
                # with a margin of FEW_SAMPLES_MARGIN (a run of 10-40 ms
                # waits of a store at its IOPS limit is no lag; a store
                # 100 ms late is).
                if not avoided and runner.small_reads_timed:
                    margin = FEW_SAMPLES_MARGIN
                mine = runner.expected_latency(nbytes, queued=False)
                other = None if not avoided and mine <= margin else (
                    self._alternative_latency(ref, index, nbytes)
                )  # fmt: skip
        else:
            # Large reads: by their own EWMAs (times the queue) when this
            # store and k others were timed reading large; else (the stores
            # serving a sequential reader from their page cache have few
            # timed large reads) by every sample, as all are then; or how
            # long one has been waited for.
            margin = AVOID_MARGIN
            large = self._alternative_latency(ref, index, nbytes)
            if large is not None and runner.measured_size(nbytes):
                mine = runner.expected_latency(nbytes)
            else:
                mine = runner.expected_latency()
            reading = self._reading.get(store)
            if reading and not avoided and large is not None:
                # A read of it waited for longer than the bound, against
                # the large reads of k others (not their small ones), says
                # as much before it ends.
                waited = time.monotonic() - reading[0]
                if waited > AVOID_FACTOR * large + margin and not self._busy_not_slow(ref, index):
                    return self._start_avoiding(store, max(mine, waited), large)
            if not avoided and mine <= margin:
                other = None
            elif large is not None and runner.measured_size(nbytes):
                other = large
            else:
                other = self._alternative_latency(ref, index)
        if other is None:
            return avoided  # no evidence either way: as it was
        if avoided:
            verdict = (
                mine > resume_factor * other + resume_margin
                or runner.in_flight > 0
                or time.monotonic() - self._avoided_since[store] < RESUME_AFTER
            )
        else:
            verdict = mine > avoid_factor * other + margin
        if verdict and not avoided:
            if not small and self._busy_not_slow(ref, index):
                return False
            return self._start_avoiding(store, mine, other)
        if avoided and not verdict:
            log.info("store %d keeps up again: reading from it", store)
            del self._avoided[store], self._avoided_since[store]
        return verdict

    def _small_alternative(self, ref: ChunkRef, index: int, nbytes: int) -> float | None:
        """The slow tail of a small read of `ref` that does without
        fragment `index`: the k-th smallest 90th percentile of the small
        reads of the other sources (one with fewer than SMALL_MIN_SAMPLES
        timed, e.g. serving from its cache, by its estimate); None with
        fewer than k measured."""
        tails = []
        for j in ref.present():
            r = available_runner(self.runners, ref.stores[j])
            if j == index or r is None or not r.measured or not r.measured_size(nbytes):
                continue
            quantiles = r.small_read_quantiles()
            tails.append(quantiles[1] if quantiles else r.expected_latency(nbytes, queued=False))
        tails.sort()
        k = self.layout.of(ref).k
        return tails[k - 1] if len(tails) >= k else None

    def _queue_routes(self, ref: ChunkRef, index: int) -> bool | None:
        """None while k of the other fragments' stores have no piece of a
        request being read from them (`_outstanding`); else whether this
        read of fragment `index` is to be routed: its store has at least k
        more pieces outstanding (this one not counted) than the k-th least
        busy other, i.e. the k reads of the route wait behind fewer than
        the read itself would, by at least what they cost."""
        outstanding = self._outstanding
        others = sorted(outstanding.get(ref.stores[j], 0) for j in ref.present() if j != index)
        k = self.layout.of(ref).k
        if len(others) < k or others[k - 1] == 0:
            return None
        return outstanding.get(ref.stores[index], 1) - 1 >= others[k - 1] + k

    def _busy_not_slow(self, ref: ChunkRef, index: int) -> bool:
        """Whether the store of fragment `index` of `ref` delivers its
        read-ahead at BUSY_NOT_SLOW or more of the median rate of the other
        available stores of the chunk (k of them known at least): busy,
        not slow (see the module docstring); False when not known."""
        rate_of = self.delivery_rate
        if rate_of is None or (mine := rate_of(ref.stores[index])) is None:
            return False
        others = sorted(
            rate
            for j in ref.present()
            if j != index
            and available_runner(self.runners, ref.stores[j]) is not None
            and (rate := rate_of(ref.stores[j])) is not None
        )
        if len(others) < self.layout.of(ref).k:
            return False
        median = others[len(others) // 2]
        busy = mine >= BUSY_NOT_SLOW * median
        if busy:
            log.debug("store %d waited for but busy, not slow (%.0f MiB/s against %.0f)",
                      ref.stores[index], mine / 2**20, median / 2**20)  # fmt: skip
        return busy

    def _start_avoiding(self, store: int, mine: float, other: float) -> bool:
        """`store` lags: route around it from now on (see `route_around`)."""
        log.info("store %d lags (expected %.3f s against %.3f s): reading around it",
                 store, mine, other)  # fmt: skip
        self._avoided[store] = self._avoided_since[store] = time.monotonic()
        self._replan(store)
        return True

    def _alternative_latency(
        self, ref: ChunkRef, index: int, nbytes: int | None = None
    ) -> float | None:
        """Expected latency of a read (of `nbytes`) of `ref` that does
        without fragment `index`: that of the k-th fastest other source
        measured (for reads of that size: `StoreRunner.measured_size`; a
        store measured only by reads of the other size would look as fast
        or as slow as those); None with fewer than k measured."""
        queued = nbytes is None or nbytes > SMALL_READ
        others = sorted(
            r.expected_latency(nbytes, queued=queued)
            for j in ref.present()
            if j != index
            and (r := available_runner(self.runners, ref.stores[j])) is not None
            and r.measured
            and (nbytes is None or r.measured_size(nbytes))
        )
        k = self.layout.of(ref).k
        return others[k - 1] if len(others) >= k else None

    def hedge_deadline(
        self, runner: StoreRunner, ref: ChunkRef, index: int, nbytes: int | None = None
    ) -> float:
        """How long to wait for fragment `index` before decoding it from
        others as well: the store's own hedge deadline, but never more than
        HEDGE_ALTERNATIVE_FACTOR x the expected latency of doing without it
        (a store that turns slow must not stretch its own deadline: each
        hedged read samples what it waited, which raises its p95). A small
        read is hedged after HEDGE_ALTERNATIVE_FACTOR x the slow tail of
        the others' small reads (`_small_alternative`, as `route_around`
        uses), at least HEDGE_FLOOR, whatever its own deadline: the hedge
        waits for the slowest of k of them, k device reads. (By its own
        p95 or the others' EWMAs, mostly quick answers, stores at their
        IOPS limit, where a read now and then waits for a throttle's next
        slice, tens of ms for every store alike, were hedged at the 50 ms
        floor: ~5% of the reads cost k device reads more on devices just
        as limited.)"""
        if nbytes is not None and nbytes <= SMALL_READ:
            tail = self._small_alternative(ref, index, nbytes)
            if tail is not None:
                return max(HEDGE_FLOOR, HEDGE_ALTERNATIVE_FACTOR * tail)
        deadline = runner.hedge_deadline()
        other = self._alternative_latency(ref, index, nbytes)
        if other is not None:
            deadline = min(deadline, max(HEDGE_FLOOR, HEDGE_ALTERNATIVE_FACTOR * other))
        return deadline
