#!/usr/bin/env python3
"""Benchmark ecfs against the raw disk and a pyfuse3 passthrough (issue 5).

    python scripts/bench.py [--quick] [--reps N] [--out DIR] [--budget S] [--keep]
    python scripts/bench.py --s3 [--quick] [--size MIB] [--delay S] [--out DIR]

(--s3: the object-store mode, ecfs over 6 local S3 servers against the
client library to one server: see scripts/bench_s3.py.)

Sets up, under one temp dir on one disk: a plain directory ("raw"), the
passthrough mount of scripts/passthrough.py (the ceiling of a Python FUSE
filesystem) and an ecfs volume of 6 stores, k=4 m=2. Then, N times
(default 3), on each in turn: sequential 1 GiB writes (1 MiB requests,
without and with a final fsync), a sequential read and 4 KiB random reads
after dropping the caches (fio), and the small-file workloads (extract a
~10,000-file source tarball, `find | wc -l`, `tar c | sha256sum`, `rm -rf`).
On ecfs, before the `rm -rf`, the same reads run again with one store
missing (remounted without it) and with one store hung (its directory
served through scripts/faultfs.py switched to "hang"). Meanwhile it reads
the daemons' CPU time from /proc and ecfs's byte counters from the
`user.ecfs.status` xattr.

Prints a table of medians with ratios to the passthrough and the targets of
issue 5 (PASS/MISS), and writes it with all raw numbers to --out
(default ./bench-results/): results-<time>.json and results-<time>.md, and
the daemons' logs to logs-<time>/ (with py-spy stacks of a daemon that made
a workload time out).

The run is meant to fit in 10 minutes: a repetition after the first starts
only if the previous one's duration fits in what is left of --budget. A
workload that times out is recorded and the run goes on; after a timeout
with a store hung, that case is not tried again.

Needs root (to drop caches, and for the FUSE mounts), fio and fusermount3.
--quick: one repetition, smaller sizes (a smoke run of two or three minutes).
Every mount and daemon is removed on the way out, on failure and on Ctrl-C
too (lazy unmount and SIGKILL as the last resort).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_workloads as wl  # noqa: E402  (a sibling module, not a package)

from ecfs.core.host import fuse_mounts  # noqa: E402  (bench_workloads put the repository on the path)

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
K, M, N_STORES = 4, 2, 6
FRAGMENT_SIZE = 1024 * 1024  # mkfs's default
FRAGMENT_HEADER = 4096  # header + cell checksums, padded to 4 KiB (ecfs/core/fragment.py)
#: (k+m)/k, plus each fragment's header.
EXPECTED_WRITE_AMP = (K + M) / K * (FRAGMENT_SIZE + FRAGMENT_HEADER) / FRAGMENT_SIZE
#: The whole run must fit in 10 minutes; what remains is for cleanup and slack.
DEFAULT_BUDGET = 560.0
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
STUCK_UMOUNT_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Config:
    reps: int
    seq_size: int  # bytes of the sequential file
    rand_seconds: float  # duration of each random-read run
    tar_files: int
    tar_bytes: int
    timeout: float  # seconds any one workload may take
    hung_timeout: float  # the same with a store hung (at the targets: a few seconds)
    budget: float  # seconds the whole run should take at most (0: no limit)
    out: Path
    workdir_parent: Path | None
    keep: bool
    small_writes: bool = False  # only the small-overwrite workloads (issue 14)
    randwrite_seconds: float = 20.0
    sqlite_txns: int = 100

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        quick = args.quick
        return cls(
            reps=args.reps if args.reps is not None else (1 if quick else 3),
            seq_size=(256 if quick else 1024) * wl.MiB,
            rand_seconds=2 if quick else 5,
            tar_files=2_000 if quick else 10_000,
            tar_bytes=(48 if quick else 256) * wl.MiB,
            timeout=180.0,
            hung_timeout=90.0,
            budget=args.budget,
            out=args.out,
            workdir_parent=args.workdir,
            keep=args.keep,
            small_writes=args.small_writes,
            randwrite_seconds=5.0 if quick else 20.0,
            sqlite_txns=args.sqlite_txns,
        )


# --- FUSE daemons -----------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def fuse_mountpoints() -> list[Path]:
    """Mountpoints of every FUSE mount in this namespace (from the mount table:
    a stat would block on a hung daemon)."""
    return [mount.mountpoint for mount in fuse_mounts()]


def is_mounted(path: Path) -> bool:
    # realpath() of the parent only: resolving the mountpoint itself would
    # stat the mount's root, and wait forever on a stuck daemon.
    resolved = Path(os.path.realpath(path.parent)) / path.name
    return resolved in fuse_mountpoints()


def lazy_unmount(path: Path) -> None:
    with contextlib.suppress(wl.WorkloadTimeout):
        wl.run(["fusermount3", "-uz", str(path)], 30, check=False)


class Daemon:
    """A FUSE daemon we run in the foreground, its mountpoint and its log."""

    def __init__(
        self, name: str, argv: Sequence[str], mountpoint: Path, log: Path,
        unmount_argv: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.mountpoint = mountpoint
        self.log = log
        self.unmount_argv = list(unmount_argv or ["fusermount3", "-u", str(mountpoint)])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if is_mounted(self.mountpoint):
            raise RuntimeError(f"something is already mounted at {self.mountpoint}")
        with open(self.log, "ab") as log:
            log.write(f"=== bench: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=subprocess_env(),
                start_new_session=True,  # our Ctrl-C must not kill it before we unmount
            )  # fmt: skip
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before mounting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount in time\n{self.log_tail()}")
            time.sleep(0.05)
        wl.call_with_timeout(
            lambda: os.stat(self.mountpoint), max(1.0, deadline - time.monotonic())
        )

    def stop(self, stuck: bool = False) -> list[str]:
        """Unmount and reap the daemon, forcing it if needed (sooner if it is
        known to be `stuck`); the problems seen."""
        problems = []
        if is_mounted(self.mountpoint):
            try:
                result = wl.run(
                    self.unmount_argv,
                    STUCK_UMOUNT_TIMEOUT if stuck else UMOUNT_TIMEOUT,
                    check=False,
                    env=subprocess_env(),
                )
                if result.returncode != 0:
                    output = (result.stdout + result.stderr).decode(errors="replace").strip()
                    problems.append(f"unmount: {output[-1000:]}")
            except wl.WorkloadTimeout:
                problems.append("unmount timed out")
            if is_mounted(self.mountpoint):
                problems.append("still mounted: lazy unmount")
                lazy_unmount(self.mountpoint)
        if self.proc is not None:
            try:
                code = self.proc.wait(EXIT_TIMEOUT)
                if code != 0:
                    problems.append(f"exited with {code}")
            except subprocess.TimeoutExpired:
                problems.append("still running after unmount: killed")
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return [f"{self.name}: {p}" for p in problems]

    def dump_stacks(self) -> None:
        """Append the daemon's Python stacks to its log (with py-spy, if
        installed; --nonblocking: a py-spy that pauses the daemon and then
        hangs, say on a file of a hung store, would freeze the daemon too)."""
        py_spy = shutil.which("py-spy") or str(VENV_PYTHON.parent / "py-spy")
        if self.proc is None or not os.path.exists(py_spy):
            return
        try:
            result = wl.run(
                [py_spy, "dump", "--nonblocking", "--pid", str(self.proc.pid)], 30, check=False
            )
            text = result.stdout + result.stderr
        except (wl.WorkloadTimeout, OSError) as e:
            text = f"py-spy dump failed: {e}\n".encode()
        with open(self.log, "ab") as log:
            log.write(b"=== bench: a workload timed out; py-spy dump:\n" + text)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return ""
        return f"--- {self.log} ---\n" + "\n".join(text)


# --- what a workload runs on --------------------------------------------------------


@dataclass
class Target:
    """A directory to benchmark, and the daemon behind it (if any)."""

    name: str
    directory: Path
    daemon: Daemon | None = None
    is_ecfs: bool = False
    stuck: bool = False  # a workload timed out: skip the rest until remounted

    def pid(self) -> int | None:
        if self.daemon is None:
            return None
        if self.is_ecfs:
            mnt = self.daemon.mountpoint
            return int(wl.call_with_timeout(lambda: os.getxattr(mnt, "user.ecfs.pid"), 10))
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def status(self) -> dict[str, int]:
        """ecfs's read and write byte counters, flattened ("reads.store_bytes")."""
        if not self.is_ecfs:
            return {}
        assert self.daemon is not None
        mnt = self.daemon.mountpoint
        raw = wl.call_with_timeout(lambda: os.getxattr(mnt, "user.ecfs.status"), 10)
        status = json.loads(raw)
        flat = {f"reads.{k}": v for k, v in status["reads"].items()}
        flat.update({f"writes.{k}": v for k, v in status["writes"].items()})
        flat.update({f"write_log.{k}": v for k, v in status.get("write_log", {}).items()})
        return flat


@dataclass
class Observation:
    """What a daemon did during one workload: CPU seconds and counter deltas."""

    cpu_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def observe(target: Target) -> Iterator[Observation]:
    obs = Observation()
    pid = target.pid()
    cpu_before, counters_before = wl.cpu_seconds(pid), target.status()
    yield obs
    obs.cpu_s = wl.cpu_seconds(pid) - cpu_before
    after = target.status()
    obs.counters = {k: v - counters_before.get(k, 0) for k, v in after.items()}


class Results:
    """Every measurement, by (target label, metric): one value per repetition."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.errors: list[str] = []
        self.notes: dict[str, Any] = {}

    def add(self, label: str, metric: str, value: float) -> None:
        self.values[label][metric].append(value)

    def median(self, label: str, metric: str) -> float | None:
        values = self.values.get(label, {}).get(metric)
        return statistics.median(values) if values else None

    def error(self, message: str) -> None:
        self.errors.append(message)
        print(f"    ! {message}", flush=True)

    def measure(self, target: Target, label: str, what: str, fn: Callable[[], None]) -> str:
        """Run one workload on `target`; a timeout or failure is recorded, not
        fatal. After a timeout the target counts as stuck (its daemon's
        stacks go to its log) and its next workloads are skipped.
        Returns "ok", "failed", "timeout" or "skipped"."""
        if target.stuck:
            self.error(f"{label} {what}: skipped, the mount is stuck")
            return "skipped"
        start = time.monotonic()
        try:
            fn()
        except (wl.WorkloadTimeout, TimeoutError) as e:
            self.error(f"{label} {what}: {type(e).__name__}: {e}")
            target.stuck = True
            if target.daemon is not None:
                target.daemon.dump_stacks()
            return "timeout"
        except (wl.WorkloadFailed, OSError, ValueError, KeyError) as e:
            self.error(f"{label} {what}: {type(e).__name__}: {e}")
            return "failed"
        print(f"    {label:<14} {what:<12} {time.monotonic() - start:6.1f} s", flush=True)
        return "ok"


# --- the workloads, with what they record ----------------------------------------


def ratio(counters: dict[str, int], num: str, den: str) -> float | None:
    return counters[num] / counters[den] if counters.get(den) else None


def record_read_counters(res: Results, label: str, workload: str, obs: Observation) -> None:
    c = obs.counters
    for name, num, den in (
        ("amp", "reads.store_bytes", "reads.requested_bytes"),
        ("degraded_amp", "reads.degraded_store_bytes", "reads.degraded_requested_bytes"),
    ):
        value = ratio(c, num, den)
        if value is not None:
            res.add(label, f"{workload}_{name}", value)
    for key in ("reads.degraded_store_bytes", "reads.degraded_requested_bytes"):
        if key in c:
            res.add(label, f"{workload}_{key.split('.')[1]}", c[key])


def write_workloads(res: Results, target: Target, label: str, cfg: Config) -> None:
    d = target.directory
    cpu = 0.0
    written: dict[str, int] = defaultdict(int)
    for fsync in (False, True):
        metric = "seq_write_fsync_mib_s" if fsync else "seq_write_mib_s"

        def write(fsync: bool = fsync, metric: str = metric) -> None:
            nonlocal cpu
            with observe(target) as obs:
                r = wl.seq_write(d, cfg.seq_size, fsync, cfg.timeout)
            res.add(label, metric, r["mib_s"])
            cpu += obs.cpu_s
            for k, v in obs.counters.items():
                written[k] += v

        res.measure(target, label, "write+fsync" if fsync else "write", write)
    if target.daemon is not None:
        res.add(label, "cpu_s_per_gib_written", cpu / (2 * cfg.seq_size / wl.GiB))
    amp = ratio(written, "writes.bytes_out", "writes.bytes_in")
    if amp is not None:
        res.add(label, "write_amp", amp)


def read_workloads(
    res: Results,
    target: Target,
    label: str,
    cfg: Config,
    tree: Path | None,
    hung: bool = False,
) -> bool:
    """Sequential read, random reads, and (if `tree`) the read-back of a tree,
    each after dropping the caches. With `hung` (a store hangs): no sync()
    (it would hang too), the shorter timeout, and stop at the first timeout
    (the mount is stuck). Returns False if it stopped so."""
    d = target.directory
    sync = not hung
    timeout = cfg.hung_timeout if hung else cfg.timeout

    def seq() -> None:
        wl.drop_caches(sync)
        with observe(target) as obs:
            r = wl.seq_read(d, cfg.seq_size, timeout)
        res.add(label, "seq_read_mib_s", r["mib_s"])
        if target.daemon is not None:
            res.add(label, "cpu_s_per_gib_read", obs.cpu_s / (r["bytes"] / wl.GiB))
        record_read_counters(res, label, "seq_read", obs)

    def rand() -> None:
        wl.drop_caches(sync)
        with observe(target) as obs:
            r = wl.rand_read(d, cfg.seq_size, cfg.rand_seconds, timeout)
        for key in ("iops", "p50_us", "p99_us"):
            res.add(label, f"rand_read_{key}", r[key])
        record_read_counters(res, label, "rand_read", obs)

    workloads = [("seq read", seq), ("rand read", rand)]
    if tree is not None:
        workloads.append(("read-back", lambda: read_back(res, target, label, tree, timeout, sync)))
    for what, fn in workloads:
        if res.measure(target, label, what, fn) == "timeout" and hung:
            return False
    return True


def read_back(
    res: Results, target: Target, label: str, tree: Path, timeout: float, sync: bool
) -> None:
    wl.drop_caches(sync)
    with observe(target) as obs:
        r = wl.read_back(tree, timeout)
    res.add(label, "readback_s", r["seconds"])
    res.notes.setdefault("readback_sha256", {}).setdefault(label, []).append(r["sha256"])
    record_read_counters(res, label, "readback", obs)


def small_file_workloads(
    res: Results,
    target: Target,
    label: str,
    cfg: Config,
    tarball: Path,
    rep: int,
    before_rm: Callable[[Path], None] | None = None,
) -> None:
    """Extract, find, read-back, [before_rm(tree)], rm -rf, sync."""
    tree = target.directory / f"tree{rep}"

    def extract() -> None:
        wl.warm(tarball)
        res.add(label, "extract_s", wl.extract(tarball, tree, cfg.timeout)["seconds"])

    def find() -> None:
        wl.drop_caches()
        r = wl.count_entries(tree, cfg.timeout)
        res.add(label, "find_s", r["seconds"])
        res.notes.setdefault("find_entries", {}).setdefault(label, []).append(r["entries"])

    res.measure(target, label, "extract", extract)
    res.measure(target, label, "find", find)
    res.measure(
        target, label, "read-back", lambda: read_back(res, target, label, tree, cfg.timeout, True)
    )
    if before_rm is not None:
        before_rm(tree)
    res.measure(
        target,
        label, "rm -rf",
        lambda: res.add(label, "rm_s", wl.remove_tree(tree, cfg.timeout)["seconds"]),
    )  # fmt: skip
    res.measure(target, label, "sync", wl.sync_all)


def small_write_workloads(res: Results, target: Target, label: str, cfg: Config, work: Path) -> None:
    """Issue 14: 4 KiB random overwrites + fsync over the 1 GiB file (IOPS;
    bytes written per write: by the daemon from /proc/<pid>/io, by anyone
    on the disk from /proc/diskstats, and on ecfs also counting the folds
    that follow, once its small-write log is empty), then SQLite."""
    d = target.directory
    res.measure(
        target, label, "prepare", lambda: wl.seq_write(d, cfg.seq_size, True, cfg.timeout)
    )

    def randwrite() -> None:
        wl.sync_all()
        pid = target.pid()
        disk0, proc0 = wl.disk_sectors_written(work), wl.process_write_bytes(pid)
        with observe(target) as obs:
            r = wl.rand_write_fsync(d, cfg.seq_size, cfg.randwrite_seconds, cfg.timeout)
        disk = (wl.disk_sectors_written(work) - disk0) * 512
        proc = wl.process_write_bytes(pid) - proc0 if pid else disk
        writes = max(1, int(r["writes"]))
        res.add(label, "rand_write_fsync_iops", r["iops"])
        res.add(label, "rand_write_fsync_kib", proc / writes / 1024)
        res.add(label, "rand_write_fsync_disk_kib", disk / writes / 1024)
        if not target.is_ecfs:
            return
        res.add(label, "rand_write_fsync_store_kib",
                obs.counters.get("writes.bytes_out", 0) / writes / 1024)  # fmt: skip
        status = target.status()
        res.add(label, "write_log_bytes_after_run", status.get("write_log.bytes", 0))
        res.add(label, "write_log_records_after_run", status.get("write_log.records", 0))
        deadline = time.monotonic() + cfg.timeout
        while "write_log.records" in status and status["write_log.records"] and (
            time.monotonic() < deadline
        ):
            time.sleep(1.0)
            status = target.status()
        res.add(label, "write_log_folds", status.get("write_log.folds", 0))
        res.add(label, "rand_write_fsync_kib_with_folds",
                (wl.process_write_bytes(pid) - proc0) / writes / 1024)  # fmt: skip

    res.measure(target, label, "randwrite", randwrite)
    for mode in ("delete", "wal"):

        def sqlite(mode: str = mode) -> None:
            r = wl.sqlite_workload(d, mode, cfg.sqlite_txns, 1000, cfg.timeout)
            res.add(label, f"sqlite_{mode}_s", float(r["seconds"]))  # type: ignore[arg-type]
            if r["integrity"] != "ok":
                res.error(f"{label} sqlite {mode}: integrity_check: {r['integrity']}")

        res.measure(target, label, f"sqlite {mode}", sqlite)


# --- the table -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: `label`'s median of `metric`, compared.

    `goal` is ("ratio>=", x) or ("ratio<=", x) for ratios to the baseline
    (the passthrough, or `base_label`), or ("range", lo, hi) for the value itself.
    """

    title: str
    unit: str
    metric: str
    label: str = "ecfs"
    base_label: str = "passthrough"
    goal: tuple[Any, ...] | None = None
    show_raw_and_pt: bool = True


ROWS = [
    Row("seq write {size}, no fsync", "MiB/s", "seq_write_mib_s", goal=("ratio>=", 0.6)),
    Row("seq write {size} + fsync", "MiB/s", "seq_write_fsync_mib_s", goal=("ratio>=", 0.6)),
    Row("seq read 1 MiB", "MiB/s", "seq_read_mib_s", goal=("ratio>=", 0.85)),
    Row("seq read, one store missing", "MiB/s", "seq_read_mib_s", "ecfs-degraded",
        goal=("ratio>=", 0.7)),
    Row("seq read, one store hung", "MiB/s", "seq_read_mib_s", "ecfs-hung",
        goal=("ratio>=", 0.6)),
    Row("4 KiB random read", "IOPS", "rand_read_iops", goal=("ratio>=", 0.7)),
    Row("4 KiB random read, one store missing", "IOPS", "rand_read_iops", "ecfs-degraded",
        goal=("ratio>=", 0.5)),
    Row("4 KiB random read, one store hung", "IOPS", "rand_read_iops", "ecfs-hung"),
    Row("4 KiB random read p50", "us", "rand_read_p50_us"),
    Row("4 KiB random read p99", "us", "rand_read_p99_us"),
    Row("p50, one store missing", "us", "rand_read_p50_us", "ecfs-degraded"),
    Row("p99, one store missing (vs ecfs healthy)", "us", "rand_read_p99_us", "ecfs-degraded",
        base_label="ecfs", goal=("ratio<=", 3.0)),
    Row("p99, one store hung (vs ecfs healthy)", "us", "rand_read_p99_us", "ecfs-hung",
        base_label="ecfs"),
    Row("extract {files}-file tarball", "s", "extract_s", goal=("ratio<=", 1.5)),
    Row("find | wc -l (cold)", "s", "find_s"),
    Row("tar c | sha256sum read-back (cold)", "s", "readback_s", goal=("ratio<=", 1.3)),
    Row("read-back, one store missing", "s", "readback_s", "ecfs-degraded"),
    Row("read-back, one store hung", "s", "readback_s", "ecfs-hung"),
    Row("rm -rf", "s", "rm_s"),
    Row("store bytes read / byte returned, seq", "x", "seq_read_amp", goal=("range", 0.9, 1.1),
        show_raw_and_pt=False),
    Row("store bytes read / byte returned, random", "x", "rand_read_amp",
        goal=("range", 0.9, 1.1), show_raw_and_pt=False),
    Row("  same, seq, one store missing", "x", "seq_read_amp", "ecfs-degraded",
        show_raw_and_pt=False),
    Row("  same, random, one store missing", "x", "rand_read_amp", "ecfs-degraded",
        show_raw_and_pt=False),
    Row("  per degraded byte, random, one missing", "x", "rand_read_degraded_amp",
        "ecfs-degraded", goal=("range", 0, K * 1.1), show_raw_and_pt=False),
    Row("  per degraded byte, seq, one missing", "x", "seq_read_degraded_amp",
        "ecfs-degraded", goal=("range", 0, K * 1.1), show_raw_and_pt=False),
    Row("store bytes written / byte written", "x", "write_amp",
        goal=("range", (K + M) / K, EXPECTED_WRITE_AMP * 1.01), show_raw_and_pt=False),
    Row("daemon CPU per GiB read (seq)", "s", "cpu_s_per_gib_read", goal=("ratio<=", 1.5)),
    Row("  same, one store missing", "s", "cpu_s_per_gib_read", "ecfs-degraded"),
    Row("daemon CPU per GiB written", "s", "cpu_s_per_gib_written"),
    Row("4 KiB random overwrite + fsync", "IOPS", "rand_write_fsync_iops", goal=("ratio>=", 0.5)),
    Row("  KiB written per write (daemon; raw: disk)", "KiB", "rand_write_fsync_kib",
        goal=("range", 0, 48)),
    Row("  KiB written per write (/proc/diskstats)", "KiB", "rand_write_fsync_disk_kib"),
    Row("  store fragment KiB per write", "KiB", "rand_write_fsync_store_kib",
        show_raw_and_pt=False),
    Row("  KiB per write incl. the folds after it", "KiB", "rand_write_fsync_kib_with_folds",
        show_raw_and_pt=False),
    Row("  log bytes waiting at the end", "B", "write_log_bytes_after_run", show_raw_and_pt=False),
    Row("  chunks folded (run + after)", "", "write_log_folds", show_raw_and_pt=False),
    Row("SQLite {txns} txns x 1,000 rows, journal_mode=delete", "s", "sqlite_delete_s",
        goal=("ratio<=", 2.0)),
    Row("SQLite {txns} txns x 1,000 rows, journal_mode=wal", "s", "sqlite_wal_s",
        goal=("ratio<=", 2.0)),
]  # fmt: skip


#: Metric prefixes of the --small-writes rows.
SMALL_WRITE_METRICS = ("rand_write_fsync", "write_log", "sqlite")


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table_rows(res: Results, cfg: Config) -> list[dict[str, str]]:
    size = cfg.seq_size
    words = {
        "size": f"{size // wl.GiB} GiB" if size % wl.GiB == 0 else f"{size // wl.MiB} MiB",
        "files": f"{res.notes.get('tarball', {}).get('files', 0):,}",
        "txns": cfg.sqlite_txns,
    }
    rows = []
    for row in ROWS:
        if cfg.small_writes and not row.metric.startswith(SMALL_WRITE_METRICS):
            continue
        value = res.median(row.label, row.metric)
        base = res.median(row.base_label, row.metric)
        quotient = value / base if value is not None and base else None
        target = verdict = ""
        if row.goal is not None:
            kind, *limits = row.goal
            if kind == "ratio>=":
                target = f">= {limits[0]}x"
                ok = quotient is not None and quotient >= limits[0]
                have = quotient is not None
            elif kind == "ratio<=":
                target = f"<= {limits[0]}x"
                ok = quotient is not None and quotient <= limits[0]
                have = quotient is not None
            else:
                target = f"{limits[0]:.2f}-{limits[1]:.2f}" if limits[0] else f"<= {limits[1]:.1f}"
                ok = value is not None and limits[0] <= value <= limits[1]
                have = value is not None
            verdict = ("PASS" if ok else "MISS") if have else "n/a"
        compared = (
            "" if not row.show_raw_and_pt and row.base_label == "passthrough" else
            f"{quotient:.2f}x" if quotient is not None else "-"
        )  # fmt: skip
        if row.base_label != "passthrough" and compared not in ("", "-"):
            compared += f" of {row.base_label}"
        rows.append(
            {
                "workload": row.title.format(**words),
                "unit": row.unit,
                "raw": fmt(res.median("raw", row.metric), row.unit) if row.show_raw_and_pt else "",
                "passthrough": fmt(res.median("passthrough", row.metric), row.unit)
                if row.show_raw_and_pt else "",
                "ecfs": fmt(value, row.unit),
                "ratio": compared,
                "target": target,
                "result": verdict,
            }
        )  # fmt: skip
    return rows


COLUMNS = ["workload", "unit", "raw", "passthrough", "ecfs", "ratio", "target", "result"]


def markdown_table(rows: list[dict[str, str]]) -> str:
    """The rows as a Markdown table (drawn by rich; numbers right-aligned)."""
    right = {"raw", "passthrough", "ecfs", "ratio"}
    table = Table(box=box.MARKDOWN)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*(row[c] for c in COLUMNS))
    out = io.StringIO()
    Console(
        file=out, width=1000, color_system=None, force_terminal=False, markup=False, emoji=False,
        highlight=False,
    ).print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
    # Markdown's alignment row: a right-aligned column's dashes end with ':'.
    cells = lines[1].split("|")[1:-1]
    lines[1] = "|" + "|".join(
        cell[:-1] + ":" if column in right else cell for cell, column in zip(cells, COLUMNS, strict=True)
    ) + "|"  # fmt: skip
    return "\n".join(lines)


def repetitions(res: Results) -> dict[str, int]:
    """How many repetitions of each label produced numbers."""
    return {
        label: max((len(v) for v in metrics.values()), default=0)
        for label, metrics in res.values.items()
    }


def summary_notes(res: Results, cfg: Config, seconds: float) -> list[str]:
    notes = [
        "Medians of "
        + ", ".join(f"{n} {label}" for label, n in repetitions(res).items())
        + f" repetition(s); sequential file {cfg.seq_size // wl.MiB} MiB;"
        f" random reads {cfg.rand_seconds} s at queue depth 1 (fio psync);"
        f" tarball {res.notes.get('tarball', {}).get('files', '?')} files,"
        f" {res.notes.get('tarball', {}).get('bytes', 0) / wl.MiB:.0f} MiB;"
        f" ecfs {N_STORES} stores, k={K} m={M}; whole run {seconds:.0f} s.",
        '"one store missing": ecfs remounted without its last store; "one store hung":'
        " that store's directory served by scripts/faultfs.py switched to mode hang.",
    ]
    load = res.notes.get("loadavg", {})
    if load:
        notes.append(
            f"Load average (1 min) at the start {load['start'][0]:.1f}, at the end"
            f" {load['end'][0]:.1f}, on {os.cpu_count()} CPUs."
            + (" The machine was busy: the numbers are noisy." if load["start"][0] > 1 else "")
        )
    hashes = res.notes.get("readback_sha256", {})
    reference = set(hashes.get("raw", []))
    for label, values in sorted(hashes.items()):
        if reference and set(values) != reference:
            notes.append(f"WARNING: {label} read back a tree whose tar differs from raw's")
    if reference and all(set(v) == reference for v in hashes.values()):
        notes.append("Every read-back (healthy, degraded, hung) gave the same tar sha256 as raw.")
    for note in res.notes.get("budget", []):
        notes.append(f"Time budget: {note}.")
    for skipped in res.notes.get("skipped", []):
        notes.append(f"Skipped: {skipped}")
    if res.errors:
        notes.append(f"{len(res.errors)} workload(s) failed or timed out:")
        notes.extend(f"  - {e}" for e in res.errors)
    return notes


# --- orchestration ---------------------------------------------------------------


def get_tarball(cfg: Config) -> tuple[Path, dict[str, int]]:
    """The source tarball, built once per machine and size (cached)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecfs-bench"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"source-{cfg.tar_files}-{cfg.tar_bytes // wl.MiB}M.tar"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    print(f"building the source tarball {path} (once) ...", flush=True)
    tmp = path.with_suffix(".tmp")
    info = wl.build_tarball(tmp, cfg.tar_files, cfg.tar_bytes)
    tmp.rename(path)
    meta.write_text(json.dumps(info))
    return path, info


def load_faultfs() -> tuple[Any, str | None]:
    """scripts/faultfs.py's FaultyDir, or None and why not."""
    if not (REPO / "scripts" / "faultfs.py").exists():
        return None, "scripts/faultfs.py does not exist (yet): no hung-store numbers"
    try:
        import faultfs  # type: ignore[import-not-found]
    except Exception as e:  # noqa: BLE001 (any import problem means: skip this case)
        return None, f"scripts/faultfs.py does not import: {type(e).__name__}: {e}"
    faulty = getattr(faultfs, "FaultyDir", None)
    if faulty is None:
        return None, "scripts/faultfs.py has no FaultyDir"
    return faulty, None


class Bench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.rep_seconds: dict[str, float] = {}  # the last repetition's duration, by target
        self.hung_case_broken: str | None = None  # why the hung-store case is not run (again)
        self.hung_seconds = 0.0  # what the last hung-store case took
        self.work = work
        self.res = Results()
        self.daemons: list[Daemon] = []
        # The last store lives where faultfs's FaultyDir(base) expects its
        # source (base/src), so that it can be served through faultfs later.
        self.faulty_base = work / "ecfs" / f"faulty-s{N_STORES - 1}"
        self.stores = [work / "ecfs" / "stores" / f"s{i}" for i in range(N_STORES - 1)]
        self.stores.append(self.faulty_base / "src")
        self.ecfs_mnt = work / "ecfs" / "mnt"
        self.ecfs_log = work / "ecfs" / "ecfs.log"

    # -- mounts
    def start(self, daemon: Daemon) -> Daemon:
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def stop(self, daemon: Daemon, stuck: bool = False) -> None:
        problems = daemon.stop(stuck)
        if daemon in self.daemons:
            self.daemons.remove(daemon)
        for p in problems:
            self.res.error(p)

    def mount_ecfs(self, stores: Sequence[Path]) -> Daemon:
        argv = [
            PYTHON, "-m", "ecfs", "mount", "--foreground", "--log-level", "warning",
            *map(str, stores), str(self.ecfs_mnt),
        ]  # fmt: skip
        umount = [PYTHON, "-m", "ecfs", "umount", str(self.ecfs_mnt)]
        return self.start(Daemon("ecfs", argv, self.ecfs_mnt, self.ecfs_log, umount))

    def cleanup(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(Exception):
                self.stop(daemon)
        for mountpoint in sorted(fuse_mountpoints(), key=lambda p: -len(p.parts)):
            if self.work in mountpoint.parents:  # a last resort: nothing of ours stays
                lazy_unmount(mountpoint)

    # -- phases
    def run(self) -> None:
        cfg, res = self.cfg, self.res
        if cfg.small_writes:
            tarball = Path("/nonexistent")
        else:
            tarball, info = get_tarball(cfg)
            res.notes["tarball"] = {"path": str(tarball), **info}

        raw = Target("raw", self.work / "raw")
        raw.directory.mkdir()
        pt_src, pt_mnt = self.work / "pt-src", self.work / "pt-mnt"
        pt_src.mkdir()
        pt_mnt.mkdir()
        pt_daemon = self.start(
            Daemon(
                "passthrough",
                [PYTHON, str(REPO / "scripts" / "passthrough.py"), str(pt_src), str(pt_mnt),
                 "--foreground"],
                pt_mnt,
                self.work / "passthrough.log",
            )
        )  # fmt: skip
        passthrough = Target("passthrough", pt_mnt, pt_daemon)
        wl.run(
            [PYTHON, "-m", "ecfs", "mkfs", "--data", str(K), "--parity", str(M), "--allow-shared-domains",
             *map(str, self.stores)],
            60, env=subprocess_env(),
        )  # fmt: skip
        self.ecfs_mnt.mkdir()
        ecfs = Target("ecfs", self.ecfs_mnt, self.mount_ecfs(self.stores), is_ecfs=True)

        targets = [raw, passthrough, ecfs]
        rep = 0
        while self.another_rep(rep):
            for target in targets:
                print(f"-- repetition {rep + 1}/{cfg.reps}: {target.name}", flush=True)
                with self.timed_rep(target.name):
                    if cfg.small_writes:
                        small_write_workloads(res, target, target.name, cfg, self.work)
                        continue
                    write_workloads(res, target, target.name, cfg)
                    read_workloads(res, target, target.name, cfg, tree=None)
                    small_file_workloads(
                        res, target, target.name, cfg, tarball, rep,
                        (lambda tree: self.failure_reads(ecfs, tree)) if target is ecfs else None,
                    )  # fmt: skip
            rep += 1

    @contextlib.contextmanager
    def timed_rep(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.rep_seconds[name] = time.monotonic() - start

    def another_rep(self, done: int) -> bool:
        """Whether to start repetition `done` + 1: one always runs, more up to
        --reps while the last one's duration fits in what is left of the budget."""
        if done >= self.cfg.reps:
            return False
        if done == 0 or not self.cfg.budget:
            return True
        needed = sum(self.rep_seconds.values())
        if self.hung_case_broken is not None:  # the next repetition skips it
            needed -= self.hung_seconds
        left = self.cfg.budget - (time.monotonic() - self.t0)
        if needed <= left:
            return True
        note = (
            f"{done} of {self.cfg.reps} repetition(s): another would need ~{needed:.0f} s,"
            f" {max(0.0, left):.0f} s of the {self.cfg.budget:.0f} s budget were left"
        )
        print(f"-- {note}", flush=True)
        self.res.notes.setdefault("budget", []).append(note)
        return False

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        """Run a phase that may not be able to go on (a mount failed): its
        error is recorded and the benchmark goes on with the next one."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (recorded and shown in the results)
            self.res.error(f"phase {name!r} stopped: {type(e).__name__}: {e}")

    def failure_reads(self, ecfs: Target, tree: Path) -> None:
        """The reads (sequential, random, read-back of `tree`) with the last
        store missing, then hung; then ecfs is mounted healthy again."""
        assert ecfs.daemon is not None
        self.stop(ecfs.daemon, ecfs.stuck)
        ecfs.daemon = None
        try:
            self.phase("one store missing", lambda: self.missing_store_reads(ecfs, tree))
            if self.hung_case_broken is None:
                self.phase("one store hung", lambda: self.hung_store_reads(ecfs, tree))
            else:
                print(f"-- skipping the hung-store case: {self.hung_case_broken}", flush=True)
        finally:
            if ecfs.daemon is not None:
                self.stop(ecfs.daemon, ecfs.stuck)
            ecfs.daemon, ecfs.stuck = self.mount_ecfs(self.stores), False

    def missing_store_reads(self, ecfs: Target, tree: Path) -> None:
        print(f"-- ecfs without store {self.stores[-1]} (missing)", flush=True)
        ecfs.daemon, ecfs.stuck = self.mount_ecfs(self.stores[:-1]), False
        try:
            read_workloads(self.res, ecfs, "ecfs-degraded", self.cfg, tree)
        finally:
            self.stop(ecfs.daemon, ecfs.stuck)
            ecfs.daemon = None

    def hung_store_reads(self, ecfs: Target, tree: Path) -> None:
        """The reads with the last store served by faultfs in mode hang: every
        operation on it blocks until the mode changes back to ok. After a
        timeout (ecfs stuck) the later repetitions skip this case."""
        faulty_dir, why_not = load_faultfs()
        if faulty_dir is None:
            self.hung_case_broken = why_not
            print(f"-- SKIPPED the hung-store case: {why_not}", flush=True)
            self.res.notes.setdefault("skipped", []).append(f"one store hung: {why_not}")
            return
        print(f"-- ecfs with store {self.stores[-1]} hung (faultfs)", flush=True)
        start = time.monotonic()
        with faulty_dir(self.faulty_base) as faulty:
            ecfs.daemon = self.mount_ecfs([*self.stores[:-1], Path(faulty.path)])
            ecfs.stuck = False
            try:
                wl.drop_caches()
                faulty.set("hang")
                if not read_workloads(self.res, ecfs, "ecfs-hung", self.cfg, tree, hung=True):
                    self.hung_case_broken = (
                        f"a read with a hung store timed out ({self.cfg.hung_timeout:.0f} s)"
                        " in an earlier repetition"
                    )
                    self.res.error(f"ecfs-hung: {self.hung_case_broken}: not run again")
            finally:
                # Release the hung requests first, so that the unmount can finish.
                with contextlib.suppress(Exception):
                    faulty.set("ok")
                self.stop(ecfs.daemon, ecfs.stuck)
                self.hung_seconds = time.monotonic() - start
                ecfs.daemon = None


def write_outputs(cfg: Config, res: Results, rows: list[dict[str, str]], seconds: float,
                  started: datetime.datetime) -> tuple[Path, Path, str]:  # fmt: skip
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    notes = summary_notes(res, cfg, seconds)
    table = markdown_table(rows)
    md = "\n".join(
        [
            f"# ecfs benchmark, {started:%Y-%m-%d %H:%M} UTC",
            "",
            f"`{' '.join(['python scripts/bench.py', *sys.argv[1:]])}` on {platform.node()},"
            f" {os.cpu_count()} CPUs, kernel {platform.release()}.",
            "",
            table,
            "",
            *(f"{n}" if n.startswith("  ") else f"- {n}" for n in notes),
            "",
        ]
    )
    document = {
        "started": started.isoformat(),
        "argv": sys.argv,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "seconds": seconds,
        "values": {label: dict(metrics) for label, metrics in res.values.items()},
        "medians": {
            label: {m: statistics.median(v) for m, v in metrics.items() if v}
            for label, metrics in res.values.items()
        },
        "table": rows,
        "notes": res.notes,
        "errors": res.errors,
    }
    json_path = cfg.out / f"results-{stamp}.json"
    md_path = cfg.out / f"results-{stamp}.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(md)
    return json_path, md_path, table + "\n\n" + "\n".join(notes)


def save_logs(work: Path, logs: Path) -> None:
    """Copy the daemons' logs (ecfs, passthrough, faultfs) out of the work dir
    (known paths only: walking the work dir could enter a stuck mount)."""
    for log in (work / "passthrough.log", work / "ecfs" / "ecfs.log",
                work / "ecfs" / f"faulty-s{N_STORES - 1}" / "faultfs.log"):  # fmt: skip
        if log.is_file():
            logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(log, logs / log.name)


def check_requirements() -> str | None:
    if os.geteuid() != 0:
        return "run as root (dropping caches and the FUSE mounts need it)"
    for command in ("fio", "fusermount3", "tar", "find"):
        if not wl.have_command(command):
            hint = " (apt-get install -y fio)" if command == "fio" else ""
            return f"{command} is missing{hint}"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller sizes")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for the JSON and Markdown results")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="make the temp dir here (default: $TMPDIR)")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
        help="start no repetition that would end the run after this (default %(default)s;"
        " 0: no limit); at least one of each always runs",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (unmounted)")
    parser.add_argument(
        "--small-writes", action="store_true",
        help="run only the small-overwrite workloads: fio randwrite 4k + fsync, SQLite",
    )  # fmt: skip
    parser.add_argument("--sqlite-txns", type=int, default=100, metavar="N",
                        help="transactions of 1,000 rows in the SQLite workload (default 100)")  # fmt: skip
    return parser.parse_args(argv)


def reexec_in_venv() -> None:
    """Run under the repository's venv (pyfuse3 for the passthrough and
    faultfs, which start with this interpreter) when started with another."""
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        reexec_in_venv()
    given = sys.argv[1:] if argv is None else list(argv)
    if "--s3" in given:
        import bench_s3  # noqa: PLC0415 (only this mode needs the S3 servers)

        return bench_s3.main([a for a in given if a != "--s3"])
    args = parse_args(argv)
    if args.reps is not None and args.reps < 1:
        print("bench: --reps must be at least 1", file=sys.stderr)
        return 2
    problem = check_requirements()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 1
    cfg = Config.from_args(args)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the same cleanup as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    if cfg.workdir_parent:
        cfg.workdir_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ecfs-bench-", dir=cfg.workdir_parent)).resolve()
    logs = cfg.out / f"logs-{started:%Y%m%d-%H%M%S}"
    print(f"bench: working in {work}", flush=True)
    bench = Bench(cfg, work)
    bench.res.notes["loadavg"] = {"start": os.getloadavg()}
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted, cleaning up", file=sys.stderr)
    except Exception:
        for daemon in bench.daemons:
            print(daemon.log_tail(), file=sys.stderr)
        raise
    finally:
        bench.cleanup()
        bench.res.notes["loadavg"]["end"] = os.getloadavg()
        save_logs(work, logs)
        leftovers = [p for p in fuse_mountpoints() if work in p.parents]
        if leftovers:
            print(f"bench: could not unmount {leftovers}; leaving {work}", file=sys.stderr)
        elif cfg.keep:
            print(f"bench: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    seconds = time.monotonic() - t0
    rows = table_rows(bench.res, cfg)
    json_path, md_path, text = write_outputs(cfg, bench.res, rows, seconds, started)
    print("\n" + text)
    print(f"\nbench: {seconds:.0f} s; results in {md_path} and {json_path}, logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
