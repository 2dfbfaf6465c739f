"""Real S3 endpoints for tests: one `moto_server` process (moto[server])
per store, on 127.0.0.1 and a free port, stopped by its PID in a finally.

`MotoServer` is a context manager; `stop()`/`kill()` end it, `pause()`
(SIGSTOP) hangs it, `resume()` (SIGCONT) lets it go on; with `log` set
it keeps its request log there and `requests()` counts what it served.
`DelayProxy` is a TCP proxy in front of one server that delays its
answers (slow), switched at run time, and counts requests. The
credentials tests use are fake ones that moto accepts; set them with
`s3_environment`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _holds_port(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on TCP `port`
    (/proc/net/tcp's LISTEN entries, matched to the process's fds)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            listening.add(f"socket:[{fields[9]}]")
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in listening:
                return True
    return False


#: A request line in moto's (werkzeug's) log, e.g. '"GET /b/k HTTP/1.1" 200'.
_REQUEST_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/')


class MotoServer:
    """One moto S3 server process (its request log in `log`, if given)."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log
        self._started = False  # (a restart keeps its port)

    def location(self, bucket: str = "ecfs", prefix: str = "store") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def start(self) -> MotoServer:
        """Start the server (again, after `stop`/`kill`: on the same port).
        A first start whose port another process took between `_free_port`
        and the server's bind (a test in another xdist worker: this one
        then exits, and the other answered in its place, with another
        volume in its buckets) is retried on a new port."""
        first = not self._started
        for _ in range(5):
            self._start_once()
            assert self.proc is not None
            if _holds_port(self.proc.pid, self.port):
                self._started = True
                return self
            self.stop()
            if not first:
                break
            self.port = _free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
        raise RuntimeError(f"moto_server: port {self.port} is held by another process")

    def _start_once(self) -> None:
        """Run moto_server on `port`; return once something answers there."""
        with contextlib.ExitStack() as files:
            err = files.enter_context(self.log.open("ab")) if self.log else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return
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

    def client(self, bucket: str = "ecfs") -> Any:
        """An obstore client of `bucket` on this server (the test
        credentials): to change objects behind ecfs's back."""
        import obstore.store

        return obstore.store.S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            client_options={"allow_http": True},
        )

    def rot(self, bucket: str, key: str, from_end: int = 10) -> None:
        """Bit rot: flip one byte of object `key` (`from_end` bytes before
        its end: in the payload of a fragment) with a plain PUT."""
        import obstore

        client = self.client(bucket)
        blob = bytearray(bytes(obstore.get(client, key).bytes()))
        blob[-from_end] ^= 0xFF
        obstore.put(client, key, bytes(blob))

    def requests(self) -> int:
        """S3 requests the server has logged (its own /moto-api/ polls
        excepted); needs `log`."""
        assert self.log is not None, "started without a request log"
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(1 for m in _REQUEST_LINE.finditer(text) if not m[2].startswith("/moto-api"))

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


class DelayProxy:
    """A TCP proxy on 127.0.0.1 in front of `endpoint` ("http://host:port")
    that delays every answer by `delay` seconds (settable at run time:
    a slow server) and counts requests.

    One thread accepts, two per connection pump bytes. An answer is what
    the server sends after the client sent something: its first bytes wait
    `delay`; the rest flows at once (a slow round trip, not a slow link).
    `requests` counts client sends that follow an answer (or open a
    connection): HTTP/1.1 without pipelining, one per request.
    `close()` stops accepting and drops every connection.
    """

    def __init__(self, endpoint: str, delay: float = 0.0) -> None:
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.delay = delay
        self.requests = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def location(self, bucket: str = "ecfs", prefix: str = "store") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            asked = threading.Event()  # the client sent; the server's answer is due
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, upstream, asked), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, upstream: bool, asked: threading.Event
    ) -> None:
        try:
            while data := source.recv(1 << 16):
                if upstream:
                    if not asked.is_set():
                        with self._lock:
                            self.requests += 1
                        asked.set()
                elif asked.is_set():
                    asked.clear()
                    if self.delay > 0:
                        time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._sockets.discard(sock)
                sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = list(self._sockets), set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
