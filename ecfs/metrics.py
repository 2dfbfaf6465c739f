"""Prometheus text rendering of the status document (`control.status`).

`ecfs status --prometheus MOUNTPOINT` prints it; a node_exporter textfile
collector or a tiny HTTP wrapper can serve it. The metric names, types and
help texts are the table `METRICS` below, which `ecfs.manpages` also prints
in ecfs-status(8): a name listed there keeps its meaning.

Owns: metric names and the exposition format (version 0.0.4: `# HELP`,
`# TYPE`, then `name{label="value"} number` lines). Must not: do I/O or
compute anything the status document does not hold. Keys missing from the
document (an older daemon) are skipped, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HEALTH_STATES = ("healthy", "degraded", "at-risk", "data-loss")
STORE_STATES = ("ok", "slow", "failed", "missing")


@dataclass(frozen=True)
class Metric:
    """One metric family: its name, Prometheus type, labels and meaning."""

    name: str
    type: str  # "gauge" | "counter" | "summary"
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
        "How many more stores the worst chunk can lose (negative: data unreadable).",
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
        "Recent operation latency of the store (quantiles 0.5 and 0.95).",
        "store",
        "quantile",
    ),
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
    _m("ecfs_write_bytes_in_total", "counter", "Bytes programs wrote to the mount."),
    _m("ecfs_write_bytes_out_total", "counter", "Bytes written to stores (data and parity)."),
    _m("ecfs_repair_queue_chunks", "gauge", "Chunks queued for repair, by reason.", "reason"),
    _m("ecfs_repair_queue_bytes", "gauge", "File bytes of the chunks queued, by reason.", "reason"),
    _m("ecfs_repair_bytes_left", "gauge", "Fragment bytes still to rebuild."),
    _m(
        "ecfs_repair_deferred_chunks", "gauge", "Queued chunks waiting for a store to rebuild onto."
    ),
    _m("ecfs_repair_rate_bytes_per_second", "gauge", "Current repair speed."),
    _m(
        "ecfs_repair_rate_limit_bytes_per_second",
        "gauge",
        "Repair bandwidth cap (-o repair_rate; 0: none).",
    ),
    _m(
        "ecfs_repair_eta_seconds",
        "gauge",
        "Estimated time until the repair queue is empty (absent when idle).",
    ),
    _m("ecfs_repair_urgent", "gauge", "1 after `ecfs repair` (full speed), else 0."),
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
    "eta_seconds": "ecfs_repair_eta_seconds",
    "urgent": "ecfs_repair_urgent",
    "busy": "ecfs_repair_busy",
    "fragments_rebuilt": "ecfs_repair_fragments_rebuilt_total",
    "chunks_repaired": "ecfs_repair_chunks_repaired_total",
    "chunks_checked_fine": "ecfs_repair_chunks_checked_fine_total",
    "bytes_read": "ecfs_repair_bytes_read_total",
    "bytes_written": "ecfs_repair_bytes_written_total",
}
_SCRUB = {
    "running": "ecfs_scrub_running",
    "chunks_total": "ecfs_scrub_chunks",
    "chunks_done": "ecfs_scrub_chunks_done",
    "fragments_verified": "ecfs_scrub_fragments_verified",
    "bytes_verified": "ecfs_scrub_bytes_verified",
    "finding_count": "ecfs_scrub_findings",
}
_STORE = {
    "in_flight": "ecfs_store_in_flight",
    "errors": "ecfs_store_errors_total",
    "timeouts": "ecfs_store_timeouts_total",
    "bytes_read": "ecfs_store_bytes_read_total",
    "bytes_written": "ecfs_store_bytes_written_total",
    "free_bytes": "ecfs_store_free_bytes",
    "total_bytes": "ecfs_store_size_bytes",
    "fragments": "ecfs_store_fragments",
    "fragment_bytes": "ecfs_store_fragment_bytes",
    "draining": "ecfs_store_draining",
}

Sample = tuple[str, dict[str, str], float]


def render_prometheus(status: dict[str, Any]) -> str:
    """The status document as Prometheus text (ends with a newline). Every
    family in `METRICS` with at least one sample gets # HELP and # TYPE."""
    samples: dict[str, list[Sample]] = {}
    for name, labels, value in _samples(status):
        samples.setdefault(name, []).append((name, labels, value))
    lines = []
    for metric in METRICS:
        if metric.name not in samples:
            continue
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for name, labels, value in samples[metric.name]:
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "".join(line + "\n" for line in lines)


def _samples(status: dict[str, Any]) -> Iterator[tuple[str, dict[str, str], float]]:
    if "volume" in status:
        yield (
            "ecfs_volume_info",
            {
                "volume": str(status["volume"]),
                "k": str(status.get("k", "")),
                "m": str(status.get("m", "")),
            },
            1,
        )
    if "health" in status:
        for state in (*HEALTH_STATES, *({status["health"]} - set(HEALTH_STATES))):
            yield "ecfs_volume_health", {"state": state}, status["health"] == state
    yield from _value("ecfs_volume_tolerance", {}, status.get("tolerance"))
    if isinstance(status.get("unrecoverable"), list):
        yield "ecfs_unrecoverable_chunks", {}, len(status["unrecoverable"])
    for store in status.get("stores", []):
        label = {"store": str(store.get("index"))}
        if "path" in store:
            yield "ecfs_store_info", {**label, "path": str(store["path"])}, 1
        if "state" in store:
            for state in (*STORE_STATES, *({store["state"]} - set(STORE_STATES))):
                yield "ecfs_store_state", {**label, "state": state}, store["state"] == state
        for key, name in _STORE.items():
            yield from _value(name, label, store.get(key))
        for key, quantile in (("latency_p50_ms", "0.5"), ("latency_p95_ms", "0.95")):
            if isinstance(store.get(key), int | float):
                yield (
                    "ecfs_store_latency_seconds",
                    {**label, "quantile": quantile},
                    store[key] / 1000,
                )
    for section, names in (
        ("reads", _READS),
        ("writes", _WRITES),
        ("write_log", _WRITE_LOG),
        ("scrub", _SCRUB),
    ):
        values = status.get(section) or {}
        for key, name in names.items():
            yield from _value(name, {}, values.get(key))
    scrub = status.get("scrub") or {}
    for key, name in (
        ("started_ns", "ecfs_scrub_last_start_timestamp_seconds"),
        ("finished_ns", "ecfs_scrub_last_finish_timestamp_seconds"),
    ):
        if isinstance(scrub.get(key), int):
            yield name, {}, scrub[key] / 1e9
    repair = status.get("repair") or {}
    for reason, entry in sorted((repair.get("queue") or {}).items()):
        yield from _value("ecfs_repair_queue_chunks", {"reason": reason}, entry.get("chunks"))
        yield from _value("ecfs_repair_queue_bytes", {"reason": reason}, entry.get("bytes"))
    for key, name in _REPAIR.items():
        yield from _value(name, {}, repair.get(key))
    metadata = status.get("metadata") or {}
    yield from _value("ecfs_metadata_generation", {}, metadata.get("generation"))
    yield from _value("ecfs_metadata_durable_generation", {}, metadata.get("durable_generation"))
    for key, name in (
        ("live_replicas", "ecfs_metadata_live_replicas"),
        ("stale_replicas", "ecfs_metadata_stale_replicas"),
    ):
        if isinstance(metadata.get(key), list | dict):
            yield name, {}, len(metadata[key])


def _value(name: str, labels: dict[str, str], value: object) -> Iterator[Sample]:
    """One sample if `value` is a number or a bool; nothing for None/absent."""
    if isinstance(value, bool | int | float):
        yield name, labels, value


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
