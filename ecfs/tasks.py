"""Background tasks that cannot take the mount down.

Owns: the rule that an unexpected exception in a background task is logged
as a bug and contained (the task is restarted, or the one-shot job is
dropped), because an exception escaping into the mount's nursery would end
`pyfuse3.main` and kill the mount. Cancellation passes through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

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
