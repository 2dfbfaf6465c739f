"""Prometheus metrics of the status record (`ecfs.volume.status.VolumeStatus`).

`ecfs status --prometheus MOUNTPOINT` prints them (for a node_exporter
textfile collector); a mount with `-o metrics=[ADDR:]PORT` serves them at
http://ADDR:PORT/metrics itself (`MetricsEndpoint`). The metric names, types
and help texts are the table `METRICS` below, which scripts/manpages.py also
prints in ecfs-status(8): a name listed there keeps its meaning. The Grafana
dashboard ecfs/share/grafana/ecfs-dashboard.json queries these names
(tests/test_metrics_endpoint.py checks that it asks for nothing else).

Owns: metric names and which record field each shows (`samples`). The
exposition format is prometheus_client's: `StatusCollector` is a custom
collector (register it with any prometheus_client registry to serve live
values), `render_prometheus` the text of one record. Must not: compute
anything the record does not hold; a value that is unknown (None) gives no
sample rather than a wrong one. Only `MetricsEndpoint` does I/O (see there
for how its threads get records from the mount's trio loop).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import outcome
import trio
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import Metric as Family
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..storage.lease import LEASE_STATES
from ..storage.offload import LATENCY_BUCKETS
from ..volume.status import HEALTH_STATES, STORE_STATES, StoreStatus, VolumeStatus


@dataclass(frozen=True)
class Metric:
    """One metric family: its name, Prometheus type, labels and meaning."""

    name: str
    type: str  # "gauge" | "counter" | "summary" | "histogram"
    help: str
    labels: tuple[str, ...] = ()


def _m(name: str, type_: str, help_: str, *labels: str) -> Metric:
    return Metric(name, type_, help_, labels)


METRICS: tuple[Metric, ...] = (
    _m(
        "ecfs_volume_info", "gauge", "Always 1; the volume id and its code k+m.", "volume", "k", "m"
    ),
    _m("ecfs_volume_health", "gauge", "1 for the current health state, 0 for the others.", "state"),
    _m(
        "ecfs_volume_tolerance",
        "gauge",
        "How many more failure domains (disks, or labelled groups of stores) the worst"
        " chunk can lose (negative: data unreadable).",
    ),
    _m("ecfs_unrecoverable_chunks", "gauge", "Chunks that repair found unrecoverable."),
    _m("ecfs_store_info", "gauge", "Always 1; the store's path.", "store", "path"),
    _m(
        "ecfs_store_state",
        "gauge",
        "1 for the store's current state (ok, slow, failed, missing), 0 for the others.",
        "store",
        "state",
    ),
    _m("ecfs_store_draining", "gauge", "1 while the store is being removed.", "store"),
    _m("ecfs_store_in_flight", "gauge", "Operations running on the store now.", "store"),
    _m("ecfs_store_errors_total", "counter", "Failed operations on the store.", "store"),
    _m("ecfs_store_timeouts_total", "counter", "Timed-out operations on the store.", "store"),
    _m(
        "ecfs_store_latency_seconds",
        "summary",
        "Recent operation latency of the store (quantiles 0.5, 0.95 and 0.99 of the last"
        " 256 answered calls).",
        "store",
        "quantile",
    ),
    _m(
        "ecfs_store_op_latency_seconds",
        "histogram",
        "Latency of every answered operation on the store since mount, in buckets"
        " (use histogram_quantile over rate(..._bucket)).",
        "store",
        "le",
    ),
    _m("ecfs_store_read_ops_total", "counter", "Successful reads from the store.", "store"),
    _m("ecfs_store_write_ops_total", "counter", "Successful writes to the store.", "store"),
    _m("ecfs_store_bytes_read_total", "counter", "Bytes read from the store.", "store"),
    _m("ecfs_store_bytes_written_total", "counter", "Bytes written to the store.", "store"),
    _m("ecfs_store_free_bytes", "gauge", "Free space of the store's filesystem.", "store"),
    _m("ecfs_store_size_bytes", "gauge", "Size of the store's filesystem.", "store"),
    _m("ecfs_store_fragments", "gauge", "Fragments held by the store.", "store"),
    _m("ecfs_store_fragment_bytes", "gauge", "Bytes of fragments held by the store.", "store"),
    _m("ecfs_read_requested_bytes_total", "counter", "Bytes programs read from the mount."),
    _m("ecfs_read_store_bytes_total", "counter", "Bytes read from stores to serve them."),
    _m(
        "ecfs_degraded_reads_total",
        "counter",
        "Reads that had to decode from parity (a fragment was missing or bad).",
    ),
    _m("ecfs_degraded_read_requested_bytes_total", "counter", "Bytes served by degraded reads."),
    _m(
        "ecfs_degraded_read_store_bytes_total",
        "counter",
        "Bytes read from stores for degraded reads.",
    ),
    _m(
        "ecfs_hedged_reads_total",
        "counter",
        "Extra fragment reads sent because a store was slow to answer.",
    ),
    _m(
        "ecfs_unrecoverable_reads_total",
        "counter",
        "Reads that failed with EIO: fewer than k good fragments.",
    ),
    _m(
        "ecfs_read_nowait_hits_total",
        "counter",
        "Fragment reads served without a worker thread (page cache hits).",
    ),
    _m("ecfs_read_thread_reads_total", "counter", "Fragment reads done in a worker thread."),
    _m(
        "ecfs_routed_reads_total",
        "counter",
        "Reads decoded from other fragments because a data fragment's store lagged.",
    ),
    _m("ecfs_write_bytes_in_total", "counter", "Bytes programs wrote to the mount."),
    _m("ecfs_write_bytes_out_total", "counter", "Bytes written to stores (data and parity)."),
    _m("ecfs_repair_queue_chunks", "gauge", "Chunks queued for repair, by reason.", "reason"),
    _m("ecfs_repair_queue_bytes", "gauge", "File bytes of the chunks queued, by reason.", "reason"),
    _m("ecfs_repair_bytes_left", "gauge", "Fragment bytes still to rebuild."),
    _m(
        "ecfs_repair_deferred_chunks", "gauge", "Queued chunks waiting for a store to rebuild onto."
    ),
    _m(
        "ecfs_repair_rate_bytes_per_second",
        "gauge",
        "Repair speed: fragment bytes rebuilt per second over the last 5 s (0 when idle).",
    ),
    _m(
        "ecfs_repair_rate_limit_bytes_per_second",
        "gauge",
        "Repair bandwidth cap (-o repair_max_rate; 0: none).",
    ),
    _m(
        "ecfs_repair_min_rate_bytes_per_second",
        "gauge",
        "Rate urgent repair keeps, and takes no more, under load (-o repair_min_rate).",
    ),
    _m(
        "ecfs_repair_eta_seconds",
        "gauge",
        "Estimated time until the repair queue is empty (absent when idle).",
    ),
    _m("ecfs_repair_urgent", "gauge", "1 after `ecfs repair` (at least the minimum rate), else 0."),
    _m("ecfs_repair_busy", "gauge", "1 while a repair is running."),
    _m("ecfs_repair_fragments_rebuilt_total", "counter", "Fragments rebuilt by repair."),
    _m("ecfs_repair_chunks_repaired_total", "counter", "Chunks repaired."),
    _m(
        "ecfs_repair_chunks_checked_fine_total",
        "counter",
        "Queued chunks that turned out to need nothing.",
    ),
    _m("ecfs_repair_bytes_read_total", "counter", "Bytes repair read from stores."),
    _m("ecfs_repair_bytes_written_total", "counter", "Bytes repair wrote to stores."),
    _m(
        "ecfs_repair_skipped_chunks",
        "gauge",
        "Chunks whose repair failed or missed its deadline, waiting to be retried.",
    ),
    _m("ecfs_repair_deadline_misses_total", "counter", "Chunk repairs cut off by their deadline."),
    _m(
        "ecfs_repair_one_call_fallbacks_total",
        "counter",
        "Chunks whose sources repair read one by one after the one-call read failed or was slow.",
    ),
    _m(
        "ecfs_repair_fragments_shared_total",
        "counter",
        "Fragments rebuilt from what readers' degraded reads decoded, with no source read.",
    ),
    _m(
        "ecfs_background_paused",
        "gauge",
        "1 while background work is paused on purpose (`ecfs repair --pause`), else 0.",
    ),
    _m(
        "ecfs_background_paused_since_timestamp_seconds",
        "gauge",
        "When background work was paused (absent while running).",
    ),
    _m("ecfs_restripe_pending", "gauge", "Restripes (`ecfs restripe PATH`) not finished yet."),
    _m("ecfs_restripe_files", "gauge", "Regular files below the pending restripes' roots."),
    _m("ecfs_restripe_files_done", "gauge", "Of them, files converted."),
    _m("ecfs_restripe_chunks", "gauge", "Chunks of the pending restripes."),
    _m(
        "ecfs_restripe_chunks_done",
        "gauge",
        "Of them, chunks re-encoded or found with the right coding already.",
    ),
    _m("ecfs_restripe_bytes", "gauge", "File bytes of the pending restripes."),
    _m("ecfs_restripe_bytes_done", "gauge", "Of them, bytes done."),
    _m(
        "ecfs_restripe_rate_bytes_per_second",
        "gauge",
        "File bytes re-encoded per second of restripe work (this mount).",
    ),
    _m(
        "ecfs_restripe_skipped_chunks",
        "gauge",
        "Chunks whose restripe failed or missed its deadline, waiting to be retried.",
    ),
    _m("ecfs_scrub_running", "gauge", "1 while a scrub runs."),
    _m("ecfs_scrub_chunks", "gauge", "Chunks in the current or last scrub pass."),
    _m("ecfs_scrub_chunks_done", "gauge", "Of them, chunks verified so far."),
    _m("ecfs_scrub_fragments_verified", "gauge", "Fragments verified by the current or last pass."),
    _m("ecfs_scrub_bytes_verified", "gauge", "Bytes verified by the current or last pass."),
    _m(
        "ecfs_scrub_findings",
        "gauge",
        "Chunks with missing or corrupt fragments found by the current or last pass.",
    ),
    _m(
        "ecfs_scrub_last_start_timestamp_seconds",
        "gauge",
        "When the current or last scrub started (0: never).",
    ),
    _m(
        "ecfs_scrub_last_finish_timestamp_seconds",
        "gauge",
        "When the last scrub finished (0: never).",
    ),
    _m("ecfs_metadata_generation", "gauge", "Metadata generation (commits so far)."),
    _m(
        "ecfs_metadata_durable_generation",
        "gauge",
        "Newest metadata generation on every live replica.",
    ),
    _m("ecfs_metadata_live_replicas", "gauge", "Metadata replicas being kept up to date."),
    _m("ecfs_write_log_records", "gauge", "Small-write log records waiting to be folded."),
    _m("ecfs_write_log_bytes", "gauge", "Bytes of small-write log records waiting to be folded."),
    _m("ecfs_write_log_chunks", "gauge", "Chunks with small-write log records."),
    _m("ecfs_write_log_limit_bytes", "gauge", "Log bytes past which writers fold first."),
    _m("ecfs_write_log_records_total", "counter", "Small-write log records written."),
    _m("ecfs_write_log_written_bytes_total", "counter", "Bytes written as log records."),
    _m("ecfs_write_log_folds_total", "counter", "Chunks re-encoded with their log records."),
    _m(
        "ecfs_write_log_forced_folds_total",
        "counter",
        "Folds a writer waited for because the log was over its limit.",
    ),
    _m("ecfs_write_log_space_bytes", "gauge", "Bytes of small-write log segments on the stores."),
    _m(
        "ecfs_write_log_copies_missing",
        "gauge",
        "Small-write log records with fewer than m+1 copies on usable stores.",
    ),
    _m("ecfs_write_log_copies_made_total", "counter", "Log record copies re-created."),
    _m("ecfs_metadata_stale_replicas", "gauge", "Metadata replicas known to be out of date."),
    _m(
        "ecfs_lease_state",
        "gauge",
        "1 for the state of the volume's lease (held, fenced, lost, released), 0 for the"
        " others; absent for a volume without S3 stores.",
        "state",
    ),
    _m("ecfs_lease_epoch", "gauge", "The fencing epoch of the volume's lease."),
    _m("ecfs_events_total", "counter", "Events reported since mount (each one log line)."),
    _m("ecfs_event_hook_runs_total", "counter", "Runs of the event hook (-o event_hook) started."),
    _m(
        "ecfs_event_hook_failures_total",
        "counter",
        "Event hook runs that could not start or exited with a non-zero status.",
    ),
    _m(
        "ecfs_event_hook_timeouts_total",
        "counter",
        "Event hook runs killed after -o event_hook_timeout.",
    ),
    _m(
        "ecfs_event_hook_dropped_total",
        "counter",
        "Events whose hook run was dropped because the hook's queue was full.",
    ),
    _m(
        "ecfs_garbage_pending_chunks",
        "gauge",
        "Dropped chunk versions waiting until their dereference is durable.",
    ),
    _m("ecfs_garbage_deleted_chunks_total", "counter", "Dropped chunk versions deleted."),
    _m(
        "ecfs_garbage_leftover_fragments",
        "gauge",
        "Fragment deletions that failed and are retried later.",
    ),
)

BY_NAME = {metric.name: metric for metric in METRICS}

#: Status document keys -> metric names, for the plain counters and gauges.
_READS = {
    "requested_bytes": "ecfs_read_requested_bytes_total",
    "store_bytes": "ecfs_read_store_bytes_total",
    "degraded_reads": "ecfs_degraded_reads_total",
    "degraded_requested_bytes": "ecfs_degraded_read_requested_bytes_total",
    "degraded_store_bytes": "ecfs_degraded_read_store_bytes_total",
    "hedged_reads": "ecfs_hedged_reads_total",
    "unrecoverable_reads": "ecfs_unrecoverable_reads_total",
    "nowait_hits": "ecfs_read_nowait_hits_total",
    "thread_reads": "ecfs_read_thread_reads_total",
    "routed_reads": "ecfs_routed_reads_total",
}
_WRITES = {"bytes_in": "ecfs_write_bytes_in_total", "bytes_out": "ecfs_write_bytes_out_total"}
_WRITE_LOG = {
    "records": "ecfs_write_log_records",
    "bytes": "ecfs_write_log_bytes",
    "chunks": "ecfs_write_log_chunks",
    "limit": "ecfs_write_log_limit_bytes",
    "records_written": "ecfs_write_log_records_total",
    "bytes_written": "ecfs_write_log_written_bytes_total",
    "folds": "ecfs_write_log_folds_total",
    "forced_folds": "ecfs_write_log_forced_folds_total",
    "space_bytes": "ecfs_write_log_space_bytes",
    "copies_missing": "ecfs_write_log_copies_missing",
    "copies_made": "ecfs_write_log_copies_made_total",
}
_REPAIR = {
    "bytes_left": "ecfs_repair_bytes_left",
    "deferred": "ecfs_repair_deferred_chunks",
    "rate_bytes_per_s": "ecfs_repair_rate_bytes_per_second",
    "rate_limit": "ecfs_repair_rate_limit_bytes_per_second",
    "min_rate": "ecfs_repair_min_rate_bytes_per_second",
    "eta_seconds": "ecfs_repair_eta_seconds",
    "urgent": "ecfs_repair_urgent",
    "busy": "ecfs_repair_busy",
    "fragments_rebuilt": "ecfs_repair_fragments_rebuilt_total",
    "chunks_repaired": "ecfs_repair_chunks_repaired_total",
    "chunks_checked_fine": "ecfs_repair_chunks_checked_fine_total",
    "bytes_read": "ecfs_repair_bytes_read_total",
    "bytes_written": "ecfs_repair_bytes_written_total",
    "skipped": "ecfs_repair_skipped_chunks",
    "deadline_misses": "ecfs_repair_deadline_misses_total",
    "one_call_fallbacks": "ecfs_repair_one_call_fallbacks_total",
    "fragments_shared": "ecfs_repair_fragments_shared_total",
}
_SCRUB = {
    "running": "ecfs_scrub_running",
    "chunks_total": "ecfs_scrub_chunks",
    "chunks_done": "ecfs_scrub_chunks_done",
    "fragments_verified": "ecfs_scrub_fragments_verified",
    "bytes_verified": "ecfs_scrub_bytes_verified",
    "finding_count": "ecfs_scrub_findings",
}
_RESTRIPE = {
    "roots": "ecfs_restripe_pending",
    "files_total": "ecfs_restripe_files",
    "files_done": "ecfs_restripe_files_done",
    "chunks_total": "ecfs_restripe_chunks",
    "chunks_done": "ecfs_restripe_chunks_done",
    "bytes_total": "ecfs_restripe_bytes",
    "bytes_done": "ecfs_restripe_bytes_done",
    "rate_bytes_per_s": "ecfs_restripe_rate_bytes_per_second",
    "skipped": "ecfs_restripe_skipped_chunks",
}
_GARBAGE = {
    "pending": "ecfs_garbage_pending_chunks",
    "deleted_chunks": "ecfs_garbage_deleted_chunks_total",
    "leftovers": "ecfs_garbage_leftover_fragments",
}
_EVENTS = {
    "emitted": "ecfs_events_total",
    "hook_runs": "ecfs_event_hook_runs_total",
    "hook_failures": "ecfs_event_hook_failures_total",
    "hook_timeouts": "ecfs_event_hook_timeouts_total",
    "dropped": "ecfs_event_hook_dropped_total",
}
_STORE = {
    "in_flight": "ecfs_store_in_flight",
    "errors": "ecfs_store_errors_total",
    "timeouts": "ecfs_store_timeouts_total",
    "bytes_read": "ecfs_store_bytes_read_total",
    "bytes_written": "ecfs_store_bytes_written_total",
    "read_ops": "ecfs_store_read_ops_total",
    "write_ops": "ecfs_store_write_ops_total",
    "free_bytes": "ecfs_store_free_bytes",
    "total_bytes": "ecfs_store_size_bytes",
    "fragments": "ecfs_store_fragments",
    "fragment_bytes": "ecfs_store_fragment_bytes",
    "draining": "ecfs_store_draining",
}

Sample = tuple[str, dict[str, str], float]


class StatusCollector(Collector):
    """A prometheus_client collector of the record `status()` returns,
    one family per `METRICS` entry that has samples, in table order."""

    def __init__(self, status: Callable[[], VolumeStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Family]:
        found: dict[str, list[Sample]] = {}
        for sample in samples(self.status()):
            found.setdefault(_family_of(sample[0]), []).append(sample)
        for metric in METRICS:
            if metric.name not in found:
                continue
            # prometheus_client names a counter family without "_total".
            name = metric.name.removesuffix("_total") if metric.type == "counter" else metric.name
            family = Family(name, metric.help, metric.type)
            for sample_name, labels, value in found[metric.name]:
                family.add_sample(sample_name, labels, float(value))
            yield family


def render_prometheus(status: VolumeStatus) -> str:
    """The record in the Prometheus text format (ends with a newline)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status))
    return generate_latest(registry).decode()


def samples(status: VolumeStatus) -> Iterator[Sample]:
    """(metric name, labels, value) of every sample of the record."""
    yield "ecfs_volume_info", {"volume": status.volume, "k": str(status.k), "m": str(status.m)}, 1
    yield from _states("ecfs_volume_health", {}, HEALTH_STATES, status.health)
    yield "ecfs_volume_tolerance", {}, status.tolerance
    yield "ecfs_unrecoverable_chunks", {}, len(status.unrecoverable)
    for store in status.stores:
        label = {"store": str(store.index)}
        yield "ecfs_store_info", {**label, "path": store.path}, 1
        yield from _states("ecfs_store_state", label, STORE_STATES, store.state)
        yield from _fields(store, _STORE, label)
        quantiles = (("0.5", store.latency_p50_ms), ("0.95", store.latency_p95_ms),
                     ("0.99", store.latency_p99_ms))  # fmt: skip
        for quantile, ms in quantiles:
            yield "ecfs_store_latency_seconds", {**label, "quantile": quantile}, ms / 1000
        yield from _histogram("ecfs_store_op_latency_seconds", label, store)
    yield from _fields(status.reads, _READS)
    yield from _fields(status.writes, _WRITES)
    yield from _fields(status.write_log, _WRITE_LOG)
    yield from _fields(status.garbage, _GARBAGE)
    yield from _fields(status.scrub, _SCRUB)
    yield "ecfs_scrub_last_start_timestamp_seconds", {}, status.scrub.started_ns / 1e9
    yield "ecfs_scrub_last_finish_timestamp_seconds", {}, status.scrub.finished_ns / 1e9
    for reason, entry in sorted(status.repair.queue.items()):
        yield "ecfs_repair_queue_chunks", {"reason": reason}, entry.chunks
        yield "ecfs_repair_queue_bytes", {"reason": reason}, entry.bytes
    yield from _fields(status.repair, _REPAIR)
    if status.restripe is not None:
        yield from _fields(status.restripe, _RESTRIPE)
    yield "ecfs_background_paused", {}, status.background.paused
    if status.background.paused:
        yield "ecfs_background_paused_since_timestamp_seconds", {}, status.background.since_ns / 1e9
    yield from _fields(status.events, _EVENTS)
    metadata = status.metadata
    yield "ecfs_metadata_generation", {}, metadata.generation
    if metadata.durable_generation is not None:
        yield "ecfs_metadata_durable_generation", {}, metadata.durable_generation
    yield "ecfs_metadata_live_replicas", {}, len(metadata.live_replicas)
    yield "ecfs_metadata_stale_replicas", {}, len(metadata.stale_replicas)
    if status.lease is not None:
        yield from _states("ecfs_lease_state", {}, LEASE_STATES, status.lease.state)
        yield "ecfs_lease_epoch", {}, status.lease.epoch


def _family_of(sample_name: str) -> str:
    """The METRICS name a sample belongs to (a histogram's samples are
    NAME_bucket, NAME_sum and NAME_count)."""
    if sample_name not in BY_NAME:
        for suffix in ("_bucket", "_sum", "_count"):
            if sample_name.endswith(suffix):
                return sample_name.removesuffix(suffix)
    return sample_name


def _histogram(name: str, labels: dict[str, str], store: StoreStatus) -> Iterator[Sample]:
    """The store's latency histogram: cumulative buckets (le = each bound of
    LATENCY_BUCKETS, then +Inf), the sum and the count; nothing for a
    store without one (missing)."""
    counts = store.latency_histogram
    if len(counts) != len(LATENCY_BUCKETS) + 1:
        return
    total = 0
    for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
        total += count
        yield f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, total
    yield f"{name}_sum", labels, store.latency_sum_s
    yield f"{name}_count", labels, total


def _states(name: str, labels: dict[str, str], states: tuple[str, ...], current: str) -> Iterator[Sample]:
    """1 for the current state, 0 for the others (an unknown one is added)."""
    for state in (*states, *({current} - set(states))):
        yield name, {**labels, "state": state}, state == current


def _fields(record: object, names: dict[str, str], labels: dict[str, str] | None = None) -> Iterator[Sample]:
    """A sample per record field in `names` (field -> metric), None skipped."""
    for field, name in names.items():
        value = getattr(record, field)
        if value is not None:
            yield name, labels or {}, value


# -- the HTTP endpoint of a mount (-o metrics=) --------------------------------------

log = logging.getLogger(__name__)

#: The address `-o metrics=PORT` listens on: loopback only.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: A scrape serves the record of an earlier scrape up to this many seconds
#: old: many scrapers cost the loop at most one record a second.
SNAPSHOT_MAX_AGE = 1.0
#: How long a scrape waits for the loop to build a record; a loop that does
#: not answer in time gives the scraper an error (its target is down), not
#: old numbers.
SNAPSHOT_TIMEOUT = 10.0


def parse_metrics_address(text: str) -> tuple[str, int]:
    """`PORT` (on DEFAULT_METRICS_ADDRESS), `ADDR:PORT` or `[IPV6]:PORT` ->
    (address, port); ValueError naming what is wrong."""
    usage = f"{text!r}: give PORT, ADDR:PORT or [IPV6]:PORT"
    if text.isdigit():
        host, port_text = DEFAULT_METRICS_ADDRESS, text
    elif text.startswith("["):
        host, separator, port_text = text[1:].partition("]:")
        if not separator or not host:
            raise ValueError(usage)
    else:
        host, separator, port_text = text.rpartition(":")
        if not separator or not host or ":" in host:
            raise ValueError(usage)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


class MetricsEndpoint:
    """`/metrics` of a mounted volume over HTTP: prometheus_client's WSGI
    app and threading server (wsgiref), in their own threads, with a
    registry holding one StatusCollector.

    Concurrency: the server threads never touch the volume. A scrape hands
    `status` to the trio loop (`attach` gives its token; `run_sync_soon`),
    which builds the record between two steps of its tasks, as it does for
    `ecfs status`, and waits for it (SNAPSHOT_TIMEOUT); a record younger
    than SNAPSHOT_MAX_AGE is served again. Before `attach`, once the loop
    has ended or when it does not answer in time, a scrape gets 503 with
    the reason (Prometheus marks the target down); a failure building the
    record is logged and answered 500. Requests are not logged. `start`
    binds the port (OSError if it cannot); `close` stops serving and closes
    the port (idempotent; it waits up to half a second for the server
    thread, so call it off the loop).
    """

    def __init__(self, address: str, port: int, status: Callable[[], VolumeStatus]) -> None:
        self.address = address
        self.port = port
        self._status = status
        self._token: trio.lowlevel.TrioToken | None = None
        self._lock = threading.Lock()  # one snapshot at a time; guards _last
        self._last: tuple[float, VolumeStatus] | None = None
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(self._snapshot))
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            # (prometheus_client builds the text before it starts the response)
            try:
                return metrics_app(environ, start_response)
            except MetricsUnavailable as exc:
                return _plain(start_response, "503 Service Unavailable", str(exc))
            except Exception:
                log.exception("metrics: a scrape failed")
                return _plain(start_response, "500 Internal Server Error", "see the mount's log")

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        server = make_server(self.address, self.port, app, Server, handler_class=_QuietHandler)
        self._server = server
        self.port = server.server_port  # (port 0: the one the kernel chose)
        self._thread = threading.Thread(target=server.serve_forever, name="ecfs metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s/metrics", self.url_host())

    def url_host(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def attach(self, token: trio.lowlevel.TrioToken) -> None:
        """Scrapes may ask the loop of `token` for records from now on."""
        self._token = token

    def close(self) -> None:
        server, self._server = self._server, None
        self._token = None
        if server is not None:
            server.shutdown()
            server.server_close()
            log.info("stopped serving metrics")
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _snapshot(self) -> VolumeStatus:
        """In a server thread: a recent record built on the loop."""
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < SNAPSHOT_MAX_AGE:
                return self._last[1]
            record = self._from_loop()
            self._last = (time.monotonic(), record)
            return record

    def _from_loop(self) -> VolumeStatus:
        token = self._token
        if token is None:
            raise MetricsUnavailable("the mount is not serving (starting or stopping)")
        built: list[outcome.Outcome[VolumeStatus]] = []
        done = threading.Event()

        def build() -> None:  # on the loop
            built.append(outcome.capture(self._status))
            done.set()

        try:
            token.run_sync_soon(build)
        except trio.RunFinishedError:
            raise MetricsUnavailable("the mount has stopped") from None
        if not done.wait(SNAPSHOT_TIMEOUT):
            raise MetricsUnavailable(f"the mount did not answer within {SNAPSHOT_TIMEOUT:g} s")
        return built[0].unwrap()


class MetricsUnavailable(Exception):
    """A scrape found no record to serve (the server answers 503, and
    Prometheus marks the target down)."""


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request (the daemon's log is for events)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [f"{text}\n".encode()]
