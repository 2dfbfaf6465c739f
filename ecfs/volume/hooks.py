"""Running the user's event hook (`ecfs mount -o event_hook=PATH`).

Owns: checking the hook at mount (`check_hook`), the hook's environment
(`hook_environment`: the event in ECFS_* variables, like a ZFS zedlet's),
and running it for each event the volume's `EventSink`
(`ecfs.core.events`) queues. Must not: decide what is an event, or let a
hook hold up the daemon.

Concurrency contract: `HookRunner.run` is a task of the mount's nursery;
it runs at most HOOK_PARALLEL hooks at once, each as a child process
(`trio.run_process`: the event loop only waits for its pipe and its exit,
nothing blocks it) in a session of its own, in `/`, with stdin from
/dev/null; its output is logged, and so is a non-zero exit. A hook still
running after `timeout` seconds gets its whole process group killed
(SIGKILL), so a hung hook, or a child it left behind, never piles up.
Events that arrive while the hooks are busy wait in the sink's bounded
queue (the sink drops and counts what does not fit). Cancelling `run`
(unmount) kills the running hooks the same way; the queued ones are not
run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from ..core.events import Event, EventSink, iso_time

log = logging.getLogger("ecfs.events")

#: Hooks running at once.
HOOK_PARALLEL = 2
#: Seconds a hook may run before its process group is killed (-o event_hook_timeout=).
DEFAULT_HOOK_TIMEOUT = 60.0
#: Characters of a hook's output that are logged.
OUTPUT_SHOWN = 2000


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


def hook_environment(event: Event, volume: str, mountpoint: str) -> dict[str, str]:
    """The environment of a hook run: the daemon's (without ECFS_*
    variables), plus ECFS_EVENT, ECFS_TIME (ISO 8601, UTC), ECFS_TIME_NS,
    ECFS_VOLUME, ECFS_MOUNTPOINT, ECFS_MESSAGE and ECFS_<FIELD> for each
    of the event's fields (booleans as 0/1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECFS_")}
    env.update(
        ECFS_EVENT=event.name,
        ECFS_TIME=iso_time(event.time_ns),
        ECFS_TIME_NS=str(event.time_ns),
        ECFS_VOLUME=volume,
        ECFS_MOUNTPOINT=mountpoint,
        ECFS_MESSAGE=event.message,
    )
    for key, value in event.fields.items():
        env[f"ECFS_{key.upper()}"] = str(int(value)) if isinstance(value, bool) else str(value)
    return env


@dataclass(frozen=True, slots=True)
class HookStatistics:
    run: int
    failed: int
    killed: int


class HookRunner:
    """Runs `hook` for every event `sink` reports from now on."""

    def __init__(self, sink: EventSink, hook: Path, timeout: float = DEFAULT_HOOK_TIMEOUT) -> None:
        self.sink = sink
        self.hook = hook
        self.timeout = timeout
        self._receive = sink.open_queue()
        self._run = self._failed = self._killed = 0

    def statistics(self) -> HookStatistics:
        return HookStatistics(self._run, self._failed, self._killed)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the hook for each queued event, HOOK_PARALLEL at a time, until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(HOOK_PARALLEL):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        async for event in self._receive:
            await self.run_hook(event)

    async def run_hook(self, event: Event) -> None:
        """Run the hook for `event`; its output and a failure are logged, a
        run longer than `timeout` is killed with its process group."""
        self._run += 1
        hook = self.hook
        result: subprocess.CompletedProcess[bytes] | None = None
        with trio.move_on_after(self.timeout):
            try:
                result = await trio.run_process(
                    [str(hook)],
                    env=hook_environment(event, self.sink.volume, self.sink.mountpoint),
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    stderr=subprocess.STDOUT,
                    check=False,
                    cwd="/",
                    start_new_session=True,  # its own process group: killed as one
                    deliver_cancel=_kill_process_group,
                )
            except OSError as exc:
                self._failed += 1
                log.warning("event hook %s for %s cannot run: %s", hook, event.name, exc)
                return
        if result is None:
            self._killed += 1
            log.warning(
                "event hook %s for %s still ran after %g s: killed it and its process group",
                hook, event.name, self.timeout,
            )  # fmt: skip
            return
        output = result.stdout.decode(errors="replace").strip()
        if len(output) > OUTPUT_SHOWN:
            output = output[:OUTPUT_SHOWN] + "..."
        if result.returncode != 0:
            self._failed += 1
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
