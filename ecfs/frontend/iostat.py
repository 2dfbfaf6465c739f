"""`ecfs iostat`: per-store and volume rates between two iostat snapshots.

The daemon keeps monotonic counters (`ecfs.volume.status.IoStatus`, read
through the virtual attribute user.ecfs.iostat: no query over the chunk
table, cheap enough to ask every second); a rate is the difference of two
snapshots divided by the time between them on the daemon's monotonic
clock. A counter that went down (the daemon restarted between two
snapshots) counts from zero.

Owns: the rates (`rates`), their JSON document (`rates_to_json`, one object
per interval, keys in base units: bytes/s, operations/s, milliseconds), the
terminal table (`render_rates`: a slow, failed or missing store and an
interval with errors stand out in colour), and the poll loop (`watch`).
Must not: talk to the mount itself (the caller passes a function that
fetches a snapshot) or compute anything the snapshots do not hold.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..volume.status import IoStatus, StoreIo

MIB = 1024 * 1024
#: A store whose p99 latency is this many times the median p99 of the
#: stores that served calls (and above LATENCY_OUTLIER_FLOOR_MS) is shown
#: as an outlier even before its runner calls it SLOW.
LATENCY_OUTLIER_FACTOR = 4.0
LATENCY_OUTLIER_FLOOR_MS = 5.0


@dataclass(frozen=True, slots=True)
class StoreRates:
    """One store over one interval. Rates are per second; `errors` and
    `timeouts` are those of the interval; latencies are the daemon's recent
    window (p50, p99 of the last answered calls); `in_flight` and `waiting`
    are the queue at the end of the interval."""

    index: int
    path: str
    state: str
    reason: str | None
    read_bytes_per_s: float
    write_bytes_per_s: float
    read_iops: float
    write_iops: float
    latency_p50_ms: float
    latency_p99_ms: float
    in_flight: int
    waiting: int
    errors: int
    timeouts: int
    #: The latency stands out against the other stores (see LATENCY_OUTLIER_FACTOR).
    latency_outlier: bool


@dataclass(frozen=True, slots=True)
class VolumeRates:
    """The volume over one interval (per second, except the pending log)."""

    read_bytes_per_s: float  # what programs read from the mount
    write_bytes_per_s: float  # what programs wrote to the mount
    degraded_reads_per_s: float
    hedged_reads_per_s: float
    routed_reads_per_s: float
    unrecoverable_reads_per_s: float
    repair_busy: bool
    repair_chunks_per_s: float
    repair_fragments_per_s: float
    repair_bytes_per_s: float  # rebuilt fragment bytes written
    log_records_per_s: float  # small writes logged
    log_bytes_per_s: float
    log_folds_per_s: float  # chunks re-encoded with their log records
    log_pending_records: int
    log_pending_bytes: int


@dataclass(frozen=True, slots=True)
class Rates:
    """One interval of `ecfs iostat`: from `before` to `after`."""

    volume: str
    time_ns: int  # the daemon's wall clock at the end of the interval
    interval_s: float
    stores: tuple[StoreRates, ...]
    totals: VolumeRates


def rates(before: IoStatus, after: IoStatus) -> Rates:
    """The rates between two snapshots of the same mount."""
    seconds = max((after.monotonic_ns - before.monotonic_ns) / 1e9, 1e-9)

    def per_s(new: int, old: int) -> float:
        return _delta(new, old) / seconds

    old_stores = {store.index: store for store in before.stores}
    stores = []
    for store in after.stores:
        old = old_stores.get(store.index) or _idle(store)
        stores.append(
            StoreRates(
                index=store.index, path=store.path, state=store.state, reason=store.reason,
                read_bytes_per_s=per_s(store.bytes_read, old.bytes_read),
                write_bytes_per_s=per_s(store.bytes_written, old.bytes_written),
                read_iops=per_s(store.read_ops, old.read_ops),
                write_iops=per_s(store.write_ops, old.write_ops),
                latency_p50_ms=store.latency_p50_ms, latency_p99_ms=store.latency_p99_ms,
                in_flight=store.in_flight, waiting=store.waiting,
                errors=_delta(store.errors, old.errors),
                timeouts=_delta(store.timeouts, old.timeouts),
                latency_outlier=False,
            )  # fmt: skip
        )
    stores = _mark_outliers(stores)
    r0, r1 = before.reads, after.reads
    l0, l1 = before.write_log, after.write_log
    p0, p1 = before.repair, after.repair
    totals = VolumeRates(
        read_bytes_per_s=per_s(r1.requested_bytes, r0.requested_bytes),
        write_bytes_per_s=per_s(after.writes.bytes_in, before.writes.bytes_in),
        degraded_reads_per_s=per_s(r1.degraded_reads, r0.degraded_reads),
        hedged_reads_per_s=per_s(r1.hedged_reads, r0.hedged_reads),
        routed_reads_per_s=per_s(r1.routed_reads, r0.routed_reads),
        unrecoverable_reads_per_s=per_s(r1.unrecoverable_reads, r0.unrecoverable_reads),
        repair_busy=p1.busy,
        repair_chunks_per_s=per_s(p1.chunks_repaired, p0.chunks_repaired),
        repair_fragments_per_s=per_s(p1.fragments_rebuilt, p0.fragments_rebuilt),
        repair_bytes_per_s=per_s(p1.bytes_written, p0.bytes_written),
        log_records_per_s=per_s(l1.records_written, l0.records_written),
        log_bytes_per_s=per_s(l1.bytes_written, l0.bytes_written),
        log_folds_per_s=per_s(l1.folds, l0.folds),
        log_pending_records=l1.records,
        log_pending_bytes=l1.bytes,
    )
    return Rates(after.volume, after.time_ns, seconds, tuple(stores), totals)


def _delta(new: int, old: int) -> int:
    """new - old; a counter that went down was restarted: new."""
    return new - old if new >= old else new


def _idle(store: StoreIo) -> StoreIo:
    """A store's counters before it was there: all zero."""
    return replace(
        store, in_flight=0, waiting=0, read_ops=0, write_ops=0, bytes_read=0, bytes_written=0,
        errors=0, timeouts=0,
    )  # fmt: skip


def _mark_outliers(stores: list[StoreRates]) -> list[StoreRates]:
    busy = [s.latency_p99_ms for s in stores if s.state not in ("failed", "missing") and s.latency_p99_ms > 0]
    if len(busy) < 2:
        return stores
    median = statistics.median(busy)
    bound = max(LATENCY_OUTLIER_FLOOR_MS, LATENCY_OUTLIER_FACTOR * median)
    return [
        StoreRates(**{**asdict(s), "latency_outlier": True}) if s.latency_p99_ms > bound else s
        for s in stores
    ]


def rates_to_json(found: Rates) -> dict[str, Any]:
    """The JSON document of one interval (`ecfs iostat --json` prints one
    per line)."""
    return asdict(found)


# -- the terminal table ------------------------------------------------------------


def _style(store: StoreRates) -> str:
    if store.state in ("failed", "missing"):
        return "bold red"
    if store.state == "slow" or store.latency_outlier:
        return "bold yellow"
    return ""


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def _count(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def render_rates(found: Rates) -> Group:
    """The interval as a rich renderable: the store table and volume lines.
    Failed and missing stores in red, slow ones (or with a p99 far above the
    others) in yellow, errors of the interval in red."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("store", "state", "read MiB/s", "write MiB/s", "read IOPS", "write IOPS",
                 "p50 ms", "p99 ms", "queue", "errors"):  # fmt: skip
        table.add_column(
            name, justify="left" if name == "state" else "right", no_wrap=True,
            min_width=max(len(name), 7 if name == "state" else 0),
        )  # fmt: skip
    # A long path folds onto more lines in a narrow terminal; the figures never do.
    table.add_column("path", overflow="fold", min_width=8)
    for s in found.stores:
        style = _style(s)
        latency = "bold yellow" if s.latency_outlier else ""
        errors = s.errors + s.timeouts
        table.add_row(
            str(s.index),
            Text(s.state, style=style),
            _mib(s.read_bytes_per_s),
            _mib(s.write_bytes_per_s),
            _count(s.read_iops),
            _count(s.write_iops),
            Text(f"{s.latency_p50_ms:.2f}", style=latency),
            Text(f"{s.latency_p99_ms:.2f}", style=latency),
            str(s.in_flight + s.waiting),
            Text(str(errors), style="bold red" if errors else ""),
            Text(s.path + (f"  ({s.reason})" if s.reason else ""), style=style),
        )
    t = found.totals
    lines = [
        Text(f"volume {found.volume}  interval {found.interval_s:.1f} s  "
             f"read {_mib(t.read_bytes_per_s)} MiB/s  write {_mib(t.write_bytes_per_s)} MiB/s"),
        Text(f"reads/s: degraded {_count(t.degraded_reads_per_s)}  hedged "
             f"{_count(t.hedged_reads_per_s)}  routed {_count(t.routed_reads_per_s)}  "
             f"unrecoverable {_count(t.unrecoverable_reads_per_s)}",
             style="bold red" if t.unrecoverable_reads_per_s else ""),
        Text(f"repair: {'busy' if t.repair_busy else 'idle'}  {_count(t.repair_chunks_per_s)} chunks/s"
             f"  {_mib(t.repair_bytes_per_s)} MiB/s"),
        Text(f"small-write log: {_count(t.log_records_per_s)} records/s  "
             f"{_mib(t.log_bytes_per_s)} MiB/s  {_count(t.log_folds_per_s)} folds/s  "
             f"pending {t.log_pending_records} records"),
    ]  # fmt: skip
    return Group(table, Text(""), *lines)


# -- the poll loop -----------------------------------------------------------------


def intervals(
    fetch: Callable[[], IoStatus],
    interval: float,
    count: int | None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Rates]:
    """Rates of `count` intervals (None: forever), `interval` seconds apart."""
    before = fetch()
    done = 0
    while count is None or done < count:
        sleep(interval)
        after = fetch()
        yield rates(before, after)
        before = after
        done += 1


def watch(
    fetch: Callable[[], IoStatus],
    interval: float,
    count: int | None,
    *,
    as_json: bool,
    out: TextIO,
) -> None:
    """Print each interval: a JSON object per line (`as_json`), a table
    redrawn in place on a terminal, or one table after the other."""
    if as_json:
        for found in intervals(fetch, interval, count):
            out.write(json.dumps(rates_to_json(found), sort_keys=True) + "\n")
            out.flush()
        return
    # Cells are data (paths, reasons): no markup or emoji codes.
    console = Console(file=out, markup=False, emoji=False, highlight=False)
    if not console.is_terminal:
        for found in intervals(fetch, interval, count):
            console.print(render_rates(found))
            console.print()
        return
    with Live(console=console, auto_refresh=False, transient=False) as live:
        live.update(Text(f"ecfs iostat: first figures in {interval:g} s (Ctrl-C stops)"), refresh=True)
        for found in intervals(fetch, interval, count):
            live.update(render_rates(found), refresh=True)
