"""Talking to a running mount: status snapshots and operator commands.

How the CLI reaches a mount: through virtual extended attributes of the
mount's root directory, served by the daemon itself (no socket to secure
or clean up, and the kernel tells the daemon who asks):

* getxattr(MOUNTPOINT, "user.ecfs.status") -> the JSON document built by
  `status()` (keys documented there);
* getxattr(MOUNTPOINT, "user.ecfs.pid") -> the daemon's pid;
* getxattr(MOUNTPOINT, "user.ecfs.workdir") -> the daemon's working
  directory, where it leaves a report if its shutdown fails (`ecfs umount`
  reads it: see volume.SHUTDOWN_REPORT);
* setxattr(MOUNTPOINT, "user.ecfs.control", COMMAND) runs a command:
  "scrub [MAX_SECONDS]", "scrub-stop", "repair urgent", "repair normal",
  "store-replace OLD NEW", "store-add NEW", "store-remove OLD".

Only root and the user who mounted may use them (checked in `fs`).
Every argument is validated before anything starts (`parse_command`):
scrub seconds finite and positive, store paths absolute and non-empty; a
refused command answers EINVAL and is logged with the reason.
Owns: the status document and command parsing. Must not: contain the
logic of repair, scrub or store management (it calls the volume).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FsError, VolumeError
from .model import NO_STORE
from .s3store import S3Location, is_s3_location

if TYPE_CHECKING:
    from .volume import Volume

log = logging.getLogger(__name__)


def status(volume: Volume) -> dict[str, object]:
    """The status document. Stable keys:

    volume, k, m, health ("healthy" | "degraded" | "at-risk" |
    "data-loss"), tolerance (how many more stores the worst chunk can
    lose, counting its fragments on unavailable stores, slots without a
    store and fragments the repair queue knows to be bad; may be
    negative), stores[] (index, path, state, reason (why a store is failed
    or missing, else null), in_flight,
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
    # Known damage: fragments found missing or corrupt, waiting for repair.
    for stores, bad, _count in volume.repairer.queue.known_damage():
        lost = sum(
            1
            for i, s in enumerate(stores)
            if bad >> i & 1 or s == NO_STORE or s not in available
        )
        tolerance = min(tolerance, layout.n - lost - layout.k)
    store_rows = []
    for index, runner in sorted(volume.runners.items()):
        stats = runner.statistics()
        usage = volume.placement.usage.get(index)
        store_rows.append(
            {
                "index": index,
                "path": str(runner.store.path),
                "state": stats.state.value,
                "reason": runner.failure_reason,
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
                "index": index, "path": path, "state": "missing",
                "reason": volume.left_out.get(volume.store_ids.get(index, ""), "not given or unusable"),
                "in_flight": 0, "errors": 0,
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


#: Longest scrub duration accepted (seconds; ~31 years: "no limit" is no argument).
MAX_SCRUB_SECONDS = 1e9
#: How a store is named in store-replace OLD / store-remove OLD besides a
#: path: its index in the store table, or its store id (a UUID in hex).
_STORE_INDEX = re.compile(r"[0-9]{1,9}")
_STORE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Command:
    """One validated control command.

    verb: "scrub" (seconds: a limit, or None), "scrub-stop", "repair"
    (urgent), "store-replace" (old, new), "store-add" (new), "store-remove"
    (old). `new` is always an absolute path; `old` an absolute path, a
    store index or a store id."""

    verb: str
    seconds: float | None = None
    urgent: bool = False
    old: str | None = None
    new: str | None = None


def parse_command(text: str) -> Command:
    """The command in `text`; FsError (EINVAL) naming what is wrong for
    anything else. Pure: never touches the file system (a path may lie on
    this very mount, whose requests wait for the event loop that parses)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise _refused(text, f"cannot split it into words: {exc}") from None
    if not words:
        raise _refused(text, "it is empty")
    verb, args = words[0], words[1:]
    arity = {"scrub": (0, 1), "scrub-stop": (0, 0), "repair": (1, 1), "store-replace": (2, 2),
             "store-add": (1, 1), "store-remove": (1, 1)}  # fmt: skip
    if verb not in arity:
        raise _refused(text, f"unknown command {verb!r}")
    low, high = arity[verb]
    if not low <= len(args) <= high:
        raise _refused(text, f"{verb} takes {low}..{high} arguments, not {len(args)}")
    if verb == "scrub":
        return Command(verb, seconds=_seconds(text, args[0]) if args else None)
    if verb == "repair":
        if args[0] not in ("urgent", "normal"):
            raise _refused(text, "repair takes 'urgent' or 'normal'")
        return Command(verb, urgent=args[0] == "urgent")
    if verb == "store-replace":
        return Command(verb, old=_old_store(text, args[0]), new=_new_path(text, args[1]))
    if verb == "store-add":
        return Command(verb, new=_new_path(text, args[0]))
    if verb == "store-remove":
        return Command(verb, old=_old_store(text, args[0]))
    return Command(verb)


def run_command(volume: Volume, text: str) -> None:
    """Start an operator command (returns at once; progress via status).
    A refused one is logged (the control attribute can only answer EINVAL)."""
    try:
        command = parse_command(text)
    except FsError as exc:
        log.warning("%s", exc)
        raise
    if command.verb == "scrub":
        volume.start_scrub(command.seconds)
    elif command.verb == "scrub-stop":
        volume.scrubber.stop()
    elif command.verb == "repair":
        volume.repairer.set_urgent(command.urgent)
    elif command.verb == "store-replace":
        volume.start_store_change("replace", command.old, command.new)
    elif command.verb == "store-add":
        volume.start_store_change("add", None, command.new)
    else:
        volume.start_store_change("remove", command.old, None)


def _refused(text: str, reason: str) -> FsError:
    return FsError(f"control command {text!r} refused: {reason}", errno=errno.EINVAL)


def _seconds(text: str, word: str) -> float:
    try:
        seconds = float(word)
    except ValueError:
        raise _refused(text, f"{word!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SCRUB_SECONDS):
        raise _refused(text, f"scrub seconds must be > 0 and <= {MAX_SCRUB_SECONDS:g}")
    return seconds


def _new_path(text: str, word: str) -> str:
    """A new store's directory: an absolute path (the daemon's working
    directory is /, so a relative one would name a directory the user never
    meant; the CLI sends absolute ones), or an s3:// location."""
    if not word:
        raise _refused(text, "the store path is empty")
    if "\0" in word:
        raise _refused(text, "the store path contains a NUL byte")
    if is_s3_location(word):  # an object store (ecfs.s3store): no directory
        try:
            return str(S3Location.parse(word))
        except VolumeError as exc:
            raise _refused(text, str(exc)) from None
    if not os.path.isabs(word):
        raise _refused(text, f"the store path {word!r} is not absolute")
    return os.path.normpath(word)


def _old_store(text: str, word: str) -> str:
    if _STORE_INDEX.fullmatch(word) or _STORE_ID.fullmatch(word):
        return word
    return _new_path(text, word)
