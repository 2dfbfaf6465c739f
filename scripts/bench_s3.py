"""The object-store mode of scripts/bench.py (`bench.py --s3`, issue 16).

    python scripts/bench.py --s3 [--quick] [--size MIB] [--delay S] [--out DIR]

Starts 6 local S3 servers (moto_server processes on 127.0.0.1, one per
store, each keeping its request log; stopped by PID on the way out) and
makes an ecfs volume over them, k=4 m=2: all six stores on the servers
if mkfs takes a volume without local stores, otherwise m+1 local
directories for the metadata copies and the small-write log plus the six
S3 stores (placement puts every fragment on the S3 stores then: they
report the most free space; the table says which, and how many fragments
landed where). Then, on the mounted volume, with fio (1 MiB requests):

- healthy: a sequential write of --size MiB (default 256, --quick 64)
  with a final fsync, then a sequential read of it after dropping the
  caches;
- one server stopped (SIGSTOP) under a new mount: a new file written,
  the healthy file read (degraded); the server is the one the healthy
  read asked most (one holding data fragments of the file);
- one server slowed down: a new mount with its endpoint behind a TCP
  proxy that delays every answer by --delay seconds (default 0.5;
  tests/s3servers.py's DelayProxy); a new file written, the healthy
  file read. Twice: slowed "under" a running mount that has measured
  the server fast first (WARM_FILES small files read), and slow "from
  mount" on (its slowness is all the mount has seen of it). Each case
  uses another server holding data fragments of the file (reads while a
  server is failed queue its fragments for repair, rebuilt elsewhere).

Every read is cold: caches dropped, and a new mount for each case (an S3
store keeps the ranges it prefetched, so a second read of a file in the
same mount would make few requests).

Against the ceiling: the client library ecfs uses (obstore) moving the
same --size MiB straight to ONE server, as a well-tuned client would:
objects of 8 MiB, CEILING_CONCURRENCY PUTs at once, read back with as
many GETs at once; and the same with 1 MiB objects (ecfs's fragment
size), which tells the cost per request from the cost of ecfs.

Requests are counted at the servers, from their request logs (every S3
request, including ecfs's probes and listings during the workload),
per MiB of file data written or read. Prints a table (and writes it with
the raw numbers to --out). Needs root, fio and fusermount3, like bench.py.
The servers are Python processes: on a small machine they, not ecfs or
the client, are the bottleneck, and the ratios are what to read.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench as b  # the sibling script: daemons, cleanup, fio workloads
import bench_workloads as wl
from rich import box
from rich.console import Console
from rich.table import Table

from tests.s3servers import DelayProxy, MotoServer, s3_environment

N_SERVERS = 6
K, M = 4, 2
#: Object sizes of the ceiling: a well-tuned client's, and ecfs's fragment size.
CEILING_PARTS = (8 * wl.MiB, 1 * wl.MiB)
CEILING_CONCURRENCY = 8
BUCKET = "ecfs-bench"
#: Small files read before a server is slowed under a running mount: each
#: is one chunk, so each store gets a measured call per file.
WARM_FILES = 48
WARM_FILE_SIZE = 256 * 1024


class S3Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.size = args.size * wl.MiB
        self.delay = args.delay
        self.timeout = args.timeout
        self.work = work
        self.servers = [MotoServer(log=work / f"moto-{i}.log") for i in range(N_SERVERS)]
        self.proxy: DelayProxy | None = None
        #: The server stopped, then slowed: the one the healthy read asked most
        #: (placement may leave a server only parity of a file, which a
        #: healthy read never asks for).
        self.victim = N_SERVERS - 1
        self.daemons: list[b.Daemon] = []
        self.mnt = work / "mnt"
        self.log = work / "ecfs.log"
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}

    # -- the volume
    def make_volume(self) -> None:
        """All-S3 if mkfs takes it, else m+1 local directories + the S3 stores."""
        cli = [b.PYTHON, "-m", "ecfs", "mkfs", "--data", str(K), "--parity", str(M), "--allow-shared-domains"]
        env = b.subprocess_env()
        self.local: list[str] = []
        self.prefix = "vol"
        done = subprocess.run([*cli, *self.stores()], capture_output=True, text=True, env=env)
        if done.returncode == 0:
            self.notes["volume"] = f"all {N_SERVERS} stores on S3 servers (metadata as objects)"
            return
        refused = (done.stderr.strip().splitlines() or ["?"])[-1]
        self.local = [str(self.work / "local" / f"d{i}") for i in range(M + 1)]
        self.prefix = "mixed"  # a fresh prefix, whatever the refused mkfs left
        subprocess.run([*cli, *self.stores()], check=True, capture_output=True, env=env)
        self.notes["volume"] = (
            f"mixed: {M + 1} local directories (metadata copies, small-write log)"
            f" + {N_SERVERS} S3 stores; mkfs refused all-S3: {refused}"
        )

    def stores(self, proxied: bool = False) -> list[str]:
        remote = []
        for i, server in enumerate(self.servers):
            endpoint = server.endpoint
            if proxied and i == self.victim:
                assert self.proxy is not None
                endpoint = self.proxy.endpoint
            remote.append(f"s3://{BUCKET}-{i}/{self.prefix}?endpoint={endpoint}")
        return [*self.local, *remote]

    def mount(self, proxied: bool = False) -> b.Daemon:
        argv = [
            b.PYTHON, "-m", "ecfs", "mount", "--foreground", "--log-level", "warning",
            *self.stores(proxied), str(self.mnt),
        ]  # fmt: skip
        umount = [b.PYTHON, "-m", "ecfs", "umount", str(self.mnt)]
        daemon = b.Daemon("ecfs", argv, self.mnt, self.log, umount)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def unmount(self, daemon: b.Daemon) -> None:
        for problem in daemon.stop():
            self.notes.setdefault("problems", []).append(problem)
        self.daemons.remove(daemon)

    def status(self) -> dict[str, Any]:
        raw = wl.call_with_timeout(lambda: os.getxattr(self.mnt, "user.ecfs.status"), 30)
        return json.loads(raw)

    # -- measuring
    def counted(self, fn: Callable[[], dict[str, float]]) -> tuple[float, float]:
        """(MiB/s, requests per MiB) of one workload moving self.size bytes;
        the requests each server saw go to the notes."""
        before = [s.requests() for s in self.servers]
        result = fn()
        time.sleep(0.5)  # the servers' last log lines
        per_server = [s.requests() - n for s, n in zip(self.servers, before, strict=True)]
        self.notes.setdefault("requests_per_server", []).append(per_server)
        return result["mib_s"], sum(per_server) / (self.size / wl.MiB)

    def write(self, name: str) -> tuple[float, float]:
        directory = self.mnt / name
        directory.mkdir(exist_ok=True)
        return self.counted(lambda: wl.seq_write(directory, self.size, True, self.timeout))

    def read(self) -> tuple[float, float]:
        """Read the healthy file, cold: caches dropped, and never read
        before by this mount (an S3 store keeps prefetched ranges)."""
        wl.drop_caches()
        return self.counted(lambda: wl.seq_read(self.mnt / "healthy", self.size, self.timeout))

    def add_row(self, case: str, write: tuple[float, float], read: tuple[float, float]) -> None:
        self.rows.append(
            {"case": case, "write": write[0], "read": read[0],
             "write_req": write[1], "read_req": read[1]}
        )  # fmt: skip
        print(f"bench-s3: {case}: write {write[0]:.1f} MiB/s, read {read[0]:.1f} MiB/s", flush=True)

    def ceiling(self, part: int) -> None:
        """obstore straight to one server: --size bytes as objects of
        `part` bytes, CEILING_CONCURRENCY PUTs at once, then as many GETs
        of whole objects. (One big object in multipart parts read by
        ranged GETs is the textbook way, but moto copies the whole object
        for every part and range: quadratic, not a ceiling.)"""
        import obstore

        client = self.servers[0].client(f"{BUCKET}-0")
        data = memoryview(os.urandom(self.size))
        keys = [f"ceiling/{part}/{at:012}" for at in range(0, self.size, part)]

        def run(fn: Callable[[str], int]) -> dict[str, float]:
            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(CEILING_CONCURRENCY) as pool:
                moved = sum(pool.map(fn, keys))
            assert moved == self.size
            return {"mib_s": self.size / wl.MiB / (time.monotonic() - start)}

        def put(key: str) -> int:
            at = int(key.rsplit("/", 1)[1])
            obstore.put(client, key, data[at : at + part], use_multipart=False)
            return len(data[at : at + part])

        def get(key: str) -> int:
            return len(obstore.get(client, key).bytes())

        case = f"ceiling: obstore to 1 server, {part // wl.MiB} MiB objects"
        self.add_row(case, self.counted(lambda: run(put)), self.counted(lambda: run(get)))

    def run(self) -> None:
        for server in self.servers:
            server.start()
        os.environ.update(s3_environment())
        self.make_volume()
        self.mnt.mkdir()
        for part in CEILING_PARTS:
            self.ceiling(part)

        daemon = self.mount()
        write = self.write("healthy")
        self.add_row("ecfs healthy", write, self.read())
        asked = self.notes["requests_per_server"][-1]
        (self.mnt / "warm").mkdir()
        for i in range(WARM_FILES):  # for a latency baseline in a later mount
            (self.mnt / "warm" / f"w{i:03}").write_bytes(os.urandom(WARM_FILE_SIZE))
        by_requests = sorted(range(N_SERVERS), key=lambda i: -asked[i])
        self.victim = by_requests[0]
        self.notes["stopped_server"] = f"{self.victim} (asked most by the healthy read)"
        self.note_fragments("healthy")
        self.unmount(daemon)

        daemon = self.mount()
        self.servers[self.victim].pause()
        try:
            write = self.write("stopped")
            self.add_row("ecfs, 1 server stopped (SIGSTOP)", write, self.read())
            self.notes["stopped_state"] = self.state_of(self.victim)
            self.note_fragments("stopped")
        finally:
            self.servers[self.victim].resume()
        self.unmount(daemon)

        # Reads while a server is failed queue its fragments for repair
        # (rebuilt elsewhere at once): each case slows another server that
        # holds data fragments of the healthy file.
        self.slowed_case("under", by_requests[1])
        self.slowed_case("from mount", by_requests[2])

    def slowed_case(self, when: str, victim: int) -> None:
        """One server slowed: "under" a running mount that has measured it
        fast first (warm-up reads), or slow "from mount" on."""
        self.victim = victim
        self.notes[f"slowed_{when}_server"] = victim
        if self.proxy is not None:
            self.proxy.close()
        self.proxy = DelayProxy(self.servers[victim].endpoint)
        if when != "under":
            self.proxy.delay = self.delay
        daemon = self.mount(proxied=True)
        if when == "under":
            wl.drop_caches()
            for path in sorted((self.mnt / "warm").iterdir()):
                path.read_bytes()
            self.proxy.delay = self.delay
        write = self.write(f"slowed-{when.replace(' ', '-')}")
        case = f"ecfs, 1 server slowed {when} ({self.delay * 1000:.0f} ms/answer)"
        self.add_row(case, write, self.read())
        self.notes[f"slowed_{when}_state"] = self.state_of(victim)
        reads = self.status()["reads"]
        self.notes[f"slowed_{when}_reads"] = {
            k: reads[k] for k in ("hedged_reads", "degraded_reads", "thread_reads", "nowait_hits")
        }
        self.note_fragments(f"slowed_{when}")
        self.unmount(daemon)

    def note_fragments(self, case: str) -> None:
        """Fragments per store (local ones first) after `case`."""
        stores = self.status()["stores"]
        self.notes[f"fragments_after_{case}"] = [s["fragments"] for s in stores]

    def state_of(self, server: int) -> str:
        wanted = f"{BUCKET}-{server}/"
        for store in self.status()["stores"]:
            if wanted in store["path"]:
                return f"{store['state']} ({store['reason'] or ''})".replace(" ()", "")
        return "?"

    def cleanup(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(Exception):
                daemon.stop(stuck=True)
        if self.proxy is not None:
            self.proxy.close()
        for server in self.servers:
            server.stop()


def table(rows: list[dict[str, Any]], size_mib: int) -> Table:
    out = Table(
        title=f"ecfs over {N_SERVERS} S3 servers (k={K}, m={M}) vs obstore to one, {size_mib} MiB",
        box=box.SIMPLE_HEAVY,
    )
    for name in ("case", "write MiB/s", "read MiB/s", "req/MiB write", "req/MiB read"):
        if name == "case":
            out.add_column(name, no_wrap=True)
        else:
            out.add_column(name, justify="right")
    for row in rows:
        out.add_row(
            row["case"], f"{row['write']:.1f}", f"{row['read']:.1f}",
            f"{row['write_req']:.2f}", f"{row['read_req']:.2f}",
        )  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | write MiB/s | read MiB/s | requests/MiB write | requests/MiB read |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['write']:.1f} | {row['read']:.1f} "
            f"| {row['write_req']:.2f} | {row['read_req']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py --s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 256")
    parser.add_argument("--size", type=int, help="MiB written and read per case")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per answer, slowed")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per workload")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--workdir", type=Path, help="make the temp dir here")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.quick else 256
    return args


@contextlib.contextmanager
def _workdir(parent: Path | None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="ecfs-bench-s3-", dir=parent)).resolve()
    try:
        yield work
    finally:
        if not [p for p in b.fuse_mountpoints() if work in p.parents]:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = b.check_requirements()
    if problem:
        print(f"bench: {problem}")
        return 1
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    with _workdir(args.workdir) as work:
        bench = S3Bench(args, work)
        try:
            bench.run()
        finally:
            bench.cleanup()
            for daemon in bench.daemons:
                print(daemon.log_tail())
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table(bench.rows, args.size))
    for key, value in bench.notes.items():
        print(f"  {key}: {value}")
    seconds = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"s3-results-{started:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(
        json.dumps({"rows": bench.rows, "notes": bench.notes, "size_mib": args.size,
                    "seconds": seconds, "loadavg": os.getloadavg()}, indent=2)
    )  # fmt: skip
    stem.with_suffix(".md").write_text(markdown(bench.rows) + "\n")
    print(f"\nbench: {seconds:.0f} s; results in {stem}.md and .json")
    return 0
