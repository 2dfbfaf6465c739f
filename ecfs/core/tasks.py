"""Background tasks that cannot take the mount down.

Owns: the rule that an unexpected exception in a background task is logged
as a bug and contained (the task is restarted, or the one-shot job is
dropped), because an exception escaping into the mount's nursery would end
`pyfuse3.main` and kill the mount. Cancellation passes through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from .errors import EcfsError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds before a crashed long-running task is started again.
RESTART_DELAY = 1.0


async def guarded(name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run a one-shot job; a bug in it is logged, never propagated."""
    try:
        await fn(*args)
    except Exception:
        log.exception("bug in background job %s (ignored)", name)


async def supervised(
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a long-lived task forever: restart it after a bug."""
    task_status.started()
    while True:
        try:
            await fn(*args)
            return
        except Exception:
            log.exception("bug in background task %s; restarting in %.0f s", name, RESTART_DELAY)
        await trio.sleep(RESTART_DELAY)


@asynccontextmanager
async def open_fan_out() -> AsyncIterator[trio.Nursery]:
    """A nursery for parallel parts of ONE request (the pieces of a read,
    the fragments of a write). trio groups child failures into an
    ExceptionGroup; callers of a request expect the domain error itself
    (it carries the errno), so a failed fan-out re-raises its first error,
    preferring an EcfsError. A group holding a Cancelled is re-raised as is,
    so cancellation keeps working."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if any(isinstance(e, trio.Cancelled) or not isinstance(e, Exception) for e in leaves):
            raise
        domain = [e for e in leaves if isinstance(e, EcfsError)]
        raise (domain or leaves)[0] from None


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def gather_in_order(jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs of one request concurrently; their results in order.
    A single job runs without a nursery (the common, cheap case)."""
    if len(jobs) == 1:
        return [await jobs[0]()]
    results: list[Any] = [None] * len(jobs)

    async def run(i: int) -> None:
        results[i] = await jobs[i]()

    async with open_fan_out() as nursery:
        for i in range(len(jobs)):
            nursery.start_soon(run, i)
    return results


async def wait_until_idle(last_activity: Callable[[], float], gap: float, patience: float) -> None:
    """Background work yields to foreground requests: wait until none was
    seen for `gap` seconds, but at most `patience` seconds (so background
    work never starves). `last_activity` returns a time.monotonic()."""
    waited = 0.0
    while time.monotonic() - last_activity() < gap and waited < patience:
        await trio.sleep(gap)
        waited += gap
    await trio.lowlevel.checkpoint()
