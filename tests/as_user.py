"""Run a piece of Python as another user (permission tests on a mount).

The child is the system python (not the venv, which another user may not
be able to read) started with `user=`/`group=`; `CHILD_PRELUDE` gives it
`attempt(fn, *args)`, which returns the errno name of an OSError or "ok".
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

NOBODY = 65534
CHILD_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

CHILD_PRELUDE = """
import errno, json, os, stat
def attempt(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
"""


def run_as_user(uid: int, gid: int, cwd: Path, code: str) -> str:
    """Run `code` (after the prelude) as uid/gid in `cwd`; its stdout."""
    result = subprocess.run(
        [CHILD_PYTHON, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        cwd=cwd,
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
