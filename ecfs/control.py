"""Talking to a running mount: status snapshots and operator commands.

How the CLI reaches a mount: through virtual extended attributes of the
mount's root directory, served by the daemon itself (no socket to secure
or clean up, and the kernel tells the daemon who asks):

* getxattr(MOUNTPOINT, "user.ecfs.status") -> the JSON document built by
  `status()` (keys documented there);
* getxattr(MOUNTPOINT, "user.ecfs.pid") -> the daemon's pid;
* setxattr(MOUNTPOINT, "user.ecfs.control", COMMAND) runs a command:
  "scrub [MAX_SECONDS]", "scrub-stop", "repair urgent", "repair normal",
  "store-replace OLD NEW", "store-add NEW", "store-remove OLD".

Only root and the user who mounted may use them (checked in `fs`).
Owns: the status document and command parsing. Must not: contain the
logic of repair, scrub or store management (it calls the volume).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import TYPE_CHECKING

from .errors import FsError
from .model import NO_STORE

if TYPE_CHECKING:
    from .volume import Volume

import errno


def status(volume: Volume) -> dict[str, object]:
    """The status document. Stable keys:

    volume, k, m, health ("healthy" | "degraded" | "at-risk" |
    "data-loss"), tolerance (how many more stores the worst chunk can
    lose; may be negative), stores[] (index, path, state, in_flight,
    errors, timeouts, latency_p50_ms, latency_p95_ms, bytes_read,
    bytes_written, free_bytes, total_bytes, fragments, fragment_bytes,
    draining), repair (queue {reason: {chunks, bytes}}, chunks, bytes_left,
    rate_bytes_per_s, eta_seconds, urgent, busy, counters...), scrub
    (running, chunks_total, chunks_done, findings...), reads (counters),
    writes (bytes_in, bytes_out), metadata (generation,
    durable_generation, live_replicas, stale_replicas), write_log (the
    small-write log: records and bytes waiting to be folded, chunks,
    records_written, bytes_written, folds, forced_folds, limit), unrecoverable
    (messages).
    """
    layout = volume.layout
    available = {i for i, r in volume.runners.items() if r.available}
    every_store = set(volume.store_ids)
    fragments: dict[int, int] = {i: 0 for i in every_store}
    fragment_bytes: dict[int, int] = {i: 0 for i in every_store}
    tolerance = layout.m
    for stores, count, size in volume.filedata.chunks.redundancy_classes():
        good = sum(1 for s in stores if s != NO_STORE and s in available)
        tolerance = min(tolerance, good - layout.k)
        for s in stores:
            if s in fragments:
                fragments[s] += count
                fragment_bytes[s] += size // layout.k
    store_rows = []
    for index, runner in sorted(volume.runners.items()):
        stats = runner.statistics()
        usage = volume.placement.usage.get(index)
        store_rows.append(
            {
                "index": index,
                "path": str(runner.store.path),
                "state": stats.state.value,
                "in_flight": stats.in_flight,
                "errors": stats.errors,
                "timeouts": stats.timeouts,
                "latency_p50_ms": round(stats.latency_p50 * 1000, 3),
                "latency_p95_ms": round(stats.latency_p95 * 1000, 3),
                "bytes_read": stats.bytes_read,
                "bytes_written": stats.bytes_written,
                "free_bytes": usage.free_bytes if usage else None,
                "total_bytes": usage.total_bytes if usage else None,
                "fragments": fragments.get(index, 0),
                "fragment_bytes": fragment_bytes.get(index, 0),
                "draining": index in volume.placement.draining,
            }
        )
    for index, path in sorted(volume.missing_stores().items()):
        store_rows.append(
            {
                "index": index, "path": path, "state": "missing", "in_flight": 0, "errors": 0,
                "timeouts": 0, "latency_p50_ms": 0.0, "latency_p95_ms": 0.0, "bytes_read": 0,
                "bytes_written": 0, "free_bytes": None, "total_bytes": None,
                "fragments": fragments.get(index, 0), "fragment_bytes": fragment_bytes.get(index, 0),
                "draining": False,
            }
        )
    repairer = volume.repairer
    queue = {
        reason: {"chunks": chunks, "bytes": size}
        for reason, chunks, size in volume.filedata.repairs.summary()
    }
    bytes_left = sum(int(v["bytes"]) for v in queue.values()) * layout.n // layout.k
    repair_stats = repairer.statistics()
    rate = int(repair_stats["rate_bytes_per_s"])  # type: ignore[call-overload]
    unrecoverable = list(repairer.unrecoverable.values())
    if tolerance < 0 or unrecoverable:
        health = "data-loss"
    elif tolerance == 0:
        health = "at-risk"
    elif len(available) < len(every_store) or queue:
        health = "degraded"
    else:
        health = "healthy"
    replication = volume.replicator.statistics() if volume.replicator else None
    return {
        "volume": volume.volume_id,
        "k": layout.k,
        "m": layout.m,
        "health": health,
        "tolerance": tolerance,
        "stores": store_rows,
        "repair": {
            **repair_stats,
            "queue": queue,
            "chunks": sum(int(v["chunks"]) for v in queue.values()),
            "bytes_left": bytes_left,
            "eta_seconds": round(bytes_left / rate) if rate else None,
        },
        "scrub": volume.scrubber.progress.as_dict(),
        "reads": volume.reader.counters.as_dict(),
        "writes": {"bytes_in": volume.writer.bytes_in, "bytes_out": volume.writer.bytes_out},
        "write_log": dataclasses.asdict(volume.writelog.statistics()),
        "metadata": {
            "generation": volume.db.generation,
            "durable_generation": replication.durable_generation if replication else None,
            "live_replicas": list(replication.live_replicas) if replication else [],
            "stale_replicas": dict(replication.stale_replicas) if replication else {},
        },
        "unrecoverable": unrecoverable,
    }


def run_command(volume: Volume, text: str) -> None:
    """Start an operator command (returns at once; progress via status)."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = []
    if not words:
        raise FsError("empty control command", errno=errno.EINVAL)
    verb, args = words[0], words[1:]
    if verb == "scrub" and len(args) <= 1:
        volume.start_scrub(float(args[0]) if args else None)
    elif verb == "scrub-stop" and not args:
        volume.scrubber.stop()
    elif verb == "repair" and args in (["urgent"], ["normal"]):
        volume.repairer.set_urgent(args[0] == "urgent")
    elif verb == "store-replace" and len(args) == 2:
        volume.start_store_change("replace", args[0], args[1])
    elif verb == "store-add" and len(args) == 1:
        volume.start_store_change("add", None, args[0])
    elif verb == "store-remove" and len(args) == 1:
        volume.start_store_change("remove", args[0], None)
    else:
        raise FsError(f"unknown control command {text!r}", errno=errno.EINVAL)
