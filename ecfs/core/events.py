"""Events for alerting: the vocabulary, and the sink services report to.

Owns: the event vocabulary (EVENTS: what happened, and the fields each
event carries), `EventSink.emit` (the one way a service reports an event:
one log line, and the event queued for the user's hook, which
`ecfs.volume.hooks` runs), and the JSON log format (`JsonFormatter`,
`ecfs mount --log-format json`). Must not: decide when something is an
event (the services that see it call `emit`: the store health state of
`ecfs.storage.offload` through the volume, file reads and the repairer for
lost chunks, the scrubber, the repairer), run anything, or block.

The events (a hook gets the name as ECFS_EVENT, each field as
ECFS_<FIELD>; ecfs-mount(8), EVENTS, describes them all):
  store-failed         a store became unavailable (probe, errors, timeouts),
                       or is missing at mount
  store-back           a failed store answers again and is used again
  chunk-unrecoverable  fewer than k good fragments of a chunk: bytes lost
                       (once per chunk per mount; reads of it fail with EIO)
  scrub-finding        scrub found missing or corrupt fragments of a chunk
                       (one per chunk, queued for repair) or a bad metadata copy
  scrub-finished       a scrub pass ended, with its counts (one per scrub,
                       so that a hook can report once per scrub)
  repair-finished      the repair queue drained after work, with the counts
                       of that busy period

Every event is one log line on the logger `ecfs.events` (WARNING for the
bad news, ALARMS; INFO otherwise); with the JSON log format the line
carries `event` and each field as JSON members.

Concurrency contract: `emit` is synchronous, runs on the caller's thread
(the trio thread while mounted) and never blocks: once a hook runner
listens (`open_queue`), the event goes into a bounded queue
(QUEUE_LENGTH); when it is full, the event's hook run is dropped, counted
in `dropped` and logged (the 1st, 10th, 100th... drop: a flood of events
is not logged twice; each event's own log line is written all the same).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger("ecfs.events")

STORE_FAILED = "store-failed"
STORE_BACK = "store-back"
CHUNK_UNRECOVERABLE = "chunk-unrecoverable"
SCRUB_FINDING = "scrub-finding"
SCRUB_FINISHED = "scrub-finished"
REPAIR_FINISHED = "repair-finished"

#: Event -> the fields it carries (besides the ones every event has:
#: event, time, volume, mountpoint, message). Checked by `emit`.
EVENTS: dict[str, tuple[str, ...]] = {
    STORE_FAILED: ("store", "store_path", "reason"),
    STORE_BACK: ("store", "store_path"),
    CHUNK_UNRECOVERABLE: ("chunk", "inode", "path", "offset", "length", "detected_by", "reason"),
    SCRUB_FINDING: ("chunk", "inode", "path", "offset", "fragments", "reason", "store"),
    SCRUB_FINISHED: ("chunks_verified", "chunks_total", "findings", "metadata_findings",
                     "stopped_early"),
    REPAIR_FINISHED: ("chunks_repaired", "fragments_rebuilt", "chunks_checked_fine",
                      "unrecoverable", "bytes_written", "deferred", "seconds"),
}  # fmt: skip

#: Events that are bad news (logged as WARNING, the others INFO).
ALARMS = {STORE_FAILED, CHUNK_UNRECOVERABLE, SCRUB_FINDING}

#: Events waiting for a hook run; more are dropped (and counted).
QUEUE_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    time_ns: int
    message: str
    fields: Mapping[str, str | int | float | bool]


@dataclass(frozen=True, slots=True)
class EventStatistics:
    emitted: int
    #: Events whose hook run was dropped (the queue was full).
    dropped: int


def iso_time(time_ns: int) -> str:
    """'2026-12-03T23:47:36.123Z' (UTC, milliseconds)."""
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventSink:
    """Where services report events (see the module docstring). Until a
    hook runner opens the queue (offline tools, tests, a mount without
    -o event_hook), an event is only logged. `volume` and `mountpoint`
    name the volume in every hook run."""

    def __init__(self, volume: str = "", mountpoint: str = "") -> None:
        self.volume = volume
        self.mountpoint = mountpoint
        self._send: trio.MemorySendChannel[Event] | None = None
        self._emitted = self._dropped = 0

    def statistics(self) -> EventStatistics:
        return EventStatistics(self._emitted, self._dropped)

    def open_queue(self) -> trio.MemoryReceiveChannel[Event]:
        """From now on, queue every event for the returned channel (the
        hook runner's; one runner per sink)."""
        assert self._send is None, "the event queue is open already"
        self._send, receive = trio.open_memory_channel[Event](QUEUE_LENGTH)
        return receive

    def emit(self, name: str, message: str, **fields: str | int | float | bool) -> None:
        """Log event `name` (one line: `message` plus the fields) and queue
        its hook run. Never blocks, never raises for a full queue."""
        unknown = set(fields) - set(EVENTS[name])
        assert not unknown, f"event {name}: unknown fields {sorted(unknown)}"
        event = Event(name, time.time_ns(), message, dict(fields))
        self._emitted += 1
        log.log(
            logging.WARNING if name in ALARMS else logging.INFO,
            "%s: %s",
            name,
            message,
            extra={"event": name, "event_fields": event.fields},
        )
        if self._send is None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1
            if _is_power_of_ten(self._dropped):  # a flood is not logged twice per event
                log.warning(
                    "event hook queue full (%d events): hook not run for %s (%d dropped so far)",
                    QUEUE_LENGTH, name, self._dropped,
                )  # fmt: skip


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time (ISO 8601, UTC), level, logger,
    message, and for an event `event` and its fields; `exception` holds a
    traceback if there is one. Never a line break inside a record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso_time(int(record.created * 1e9)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = event
            for key, value in getattr(record, "event_fields", {}).items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
