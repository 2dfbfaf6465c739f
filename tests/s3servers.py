"""Real S3 endpoints for tests: one `moto_server` process (moto[server])
per store, on 127.0.0.1 and a free port, stopped by its PID in a finally.

`MotoServer` is a context manager; `stop()`/`kill()` end it, `pause()`
(SIGSTOP) hangs it, `resume()` (SIGCONT) lets it go on. The credentials
tests use are fake ones that moto accepts; set them with `s3_environment`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

#: Fake credentials for moto (any are accepted); the secret is unusual so
#: that tests can grep logs and messages for it.
ACCESS_KEY = "AKIAECFSTESTKEY00001"
SECRET_KEY = "ecfs-test-SECRET-do-not-leak-7f3a9c"

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def s3_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: os.environ) with the test credentials set and
    the AWS files pointed away from the user's own."""
    env = dict(os.environ if environ is None else environ)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        env.pop(name, None)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_REGION="us-east-1",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_CONFIG_FILE="/nonexistent/config",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """One moto S3 server process."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def location(self, bucket: str = "ecfs", prefix: str = "store") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start within 60 s")

    def keys(self, bucket: str = "ecfs") -> list[str]:
        """Every object key in `bucket` (one ListObjectsV2 page, unsigned:
        moto takes it; enough for a test's few objects)."""
        url = f"{self.endpoint}/{bucket}?list-type=2&max-keys=1000"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = answer.read().decode()
        assert "<IsTruncated>false</IsTruncated>" in body, "more keys than one page"
        return re.findall(r"<Key>([^<]*)</Key>", body)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Gone: SIGKILL (after SIGCONT, in case it was paused)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        self.kill()
        self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def moto_servers(count: int) -> Iterator[list[MotoServer]]:
    """`count` running servers, all stopped (by PID) on the way out."""
    servers = [MotoServer() for _ in range(count)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
