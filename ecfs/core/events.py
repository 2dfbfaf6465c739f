"""Events for alerting: one structured log line each, and the user's hook.

Owns: the event vocabulary (EVENTS: what happened, and the fields each
event carries), `EventSink.emit` (the one way a service reports an event),
running the optional user hook (`ecfs mount -o event_hook=PATH`, like a ZFS
zedlet) with the event in environment variables (`hook_environment`), and
the JSON log format (`JsonFormatter`, `ecfs mount --log-format json`).
Must not: decide when something is an event (the services that see it
call `emit`: the store health state in `ecfs.storage.offload` through
the volume, the file reads and the repairer for unrecoverable chunks, the
scrubber, the repairer), or block the caller.

The events (ECFS_EVENT; the fields, as ECFS_<FIELD> variables, are listed
in EVENTS and in ecfs-mount(8)):
  store-failed         a store became unavailable (probe, errors, timeouts)
  store-back           a failed store answers again and is used again
  chunk-unrecoverable  fewer than k good fragments of a chunk: bytes lost
                       (once per chunk per mount; reads of it fail with EIO)
  scrub-finding        scrub found missing or corrupt fragments of a chunk
                       (one per chunk, queued for repair) or a bad metadata copy
  scrub-finished       a scrub pass ended, with its counts
  repair-finished      the repair queue drained after work, with the counts
                       of that busy period

Every event is one log line on the logger `ecfs.events` (WARNING for the
bad news, INFO otherwise). With the JSON log format the line carries
`event` and each field as JSON members.

Hooks, the concurrency contract: `emit` is synchronous and never blocks:
it puts the event in a bounded queue (QUEUE_LENGTH); when the queue is
full the event's hook run is dropped, counted in `dropped` and logged (the
log line of the event itself is always written). `run_hooks` (a task in
the mount's nursery) runs at most HOOK_PARALLEL hooks at once, each as a
child process (`trio.run_process`, off the event loop: the loop only
waits for the pipe and the exit) in its own session, with stdin from
/dev/null and its output logged; a hook still running after
`hook_timeout` seconds gets its whole process group killed (SIGKILL), so
a hung hook, or a child it left behind, never piles up or blocks the
daemon. At unmount the hooks still queued are not run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
#: Hooks running at once.
HOOK_PARALLEL = 2
#: Seconds a hook may run before its process group is killed (-o event_hook_timeout=).
DEFAULT_HOOK_TIMEOUT = 60.0
#: Bytes of a hook's output that are logged.
OUTPUT_SHOWN = 2000


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    time_ns: int
    message: str
    fields: Mapping[str, str | int | float | bool]


@dataclass(frozen=True, slots=True)
class EventStatistics:
    emitted: int
    hooks_run: int
    hooks_failed: int
    hooks_killed: int
    dropped: int


def iso_time(time_ns: int) -> str:
    """'2026-12-03T23:47:36.123Z' (UTC, milliseconds)."""
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_hook(path: str) -> Path:
    """The hook at `path` as an absolute path; ValueError saying why it
    cannot be run (missing, not a regular file, not executable)."""
    hook = Path(os.path.abspath(path))
    if not hook.exists():
        raise ValueError(f"event hook {hook} does not exist")
    if not hook.is_file():
        raise ValueError(f"event hook {hook} is not a regular file")
    if not os.access(hook, os.X_OK):
        raise ValueError(f"event hook {hook} is not executable (chmod +x it)")
    return hook


class EventSink:
    """Where services report events (see the module docstring). Without a
    `hook` (offline tools, tests, a mount without -o event_hook) an event
    is only logged."""

    def __init__(self, volume: str = "", mountpoint: str = "") -> None:
        self.volume = volume
        self.mountpoint = mountpoint
        self.hook: Path | None = None
        self.hook_timeout = DEFAULT_HOOK_TIMEOUT
        self._send, self._receive = trio.open_memory_channel[Event](QUEUE_LENGTH)
        self._emitted = self._hooks_run = self._hooks_failed = self._hooks_killed = 0
        self._dropped = 0

    def statistics(self) -> EventStatistics:
        return EventStatistics(
            self._emitted, self._hooks_run, self._hooks_failed, self._hooks_killed, self._dropped
        )

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
        if self.hook is None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1
            log.warning(
                "event hook queue full (%d events): hook not run for %s (%d dropped so far)",
                QUEUE_LENGTH, name, self._dropped,
            )  # fmt: skip

    def hook_environment(self, event: Event) -> dict[str, str]:
        """The environment of a hook run: the daemon's, plus ECFS_EVENT,
        ECFS_TIME (ISO 8601, UTC), ECFS_TIME_NS, ECFS_VOLUME,
        ECFS_MOUNTPOINT, ECFS_MESSAGE and ECFS_<FIELD> for each field
        (booleans as 0/1)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECFS_")}
        env.update(
            ECFS_EVENT=event.name,
            ECFS_TIME=iso_time(event.time_ns),
            ECFS_TIME_NS=str(event.time_ns),
            ECFS_VOLUME=self.volume,
            ECFS_MOUNTPOINT=self.mountpoint,
            ECFS_MESSAGE=event.message,
        )
        for key, value in event.fields.items():
            env[f"ECFS_{key.upper()}"] = str(int(value)) if isinstance(value, bool) else str(value)
        return env

    async def run_hooks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the hook for each queued event, HOOK_PARALLEL at a time, until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(HOOK_PARALLEL):
                nursery.start_soon(self._hook_worker)
            task_status.started()

    async def _hook_worker(self) -> None:
        async for event in self._receive:
            if self.hook is not None:
                await self.run_hook(self.hook, event)

    async def run_hook(self, hook: Path, event: Event) -> None:
        """Run `hook` for `event`; its output and a failure are logged, a
        run longer than `hook_timeout` is killed with its process group."""
        self._hooks_run += 1
        result: subprocess.CompletedProcess[bytes] | None = None
        with trio.move_on_after(self.hook_timeout) as scope:
            try:
                result = await trio.run_process(
                    [str(hook)],
                    env=self.hook_environment(event),
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    stderr=subprocess.STDOUT,
                    check=False,
                    cwd="/",
                    start_new_session=True,  # its own process group: killed as one
                    deliver_cancel=_kill_process_group,
                )
            except OSError as exc:
                self._hooks_failed += 1
                log.warning("event hook %s for %s cannot run: %s", hook, event.name, exc)
                return
        if scope.cancelled_caught or result is None:
            self._hooks_killed += 1
            log.warning(
                "event hook %s for %s still ran after %g s: killed it and its process group",
                hook, event.name, self.hook_timeout,
            )  # fmt: skip
            return
        output = result.stdout.decode(errors="replace").strip()
        if len(output) > OUTPUT_SHOWN:
            output = output[:OUTPUT_SHOWN] + "..."
        if result.returncode != 0:
            self._hooks_failed += 1
            log.warning(
                "event hook %s for %s exited with %d%s",
                hook, event.name, result.returncode, f": {output}" if output else "",
            )  # fmt: skip
        elif output:
            log.info("event hook %s for %s: %s", hook, event.name, output)


async def _kill_process_group(process: trio.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await process.wait()


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
