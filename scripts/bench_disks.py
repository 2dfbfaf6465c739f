#!/usr/bin/env python3
"""Benchmark ecfs over separate, bandwidth-capped block devices (issue 17).

    sudo python scripts/bench_disks.py [--quick] [--size MIB] [--caps 150,40] [--out DIR]

Sets up 6 loop devices (sparse image files on a tmpfs, i.e. in RAM, or
with --images-on-disk under one temp dir on the root filesystem; `losetup
--direct-io=on`), each with its own ext4 and mount, and one blkio cgroup that caps every device's read and write bandwidth
(cgroup v1 `blkio.throttle.{read,write}_bps_device`; cgroup v2 `io.max`
where the machine has only v2). This process moves itself into the cgroup
first (its pid written to the cgroup's procs file), so every daemon and
workload it starts runs capped too. On the devices: one store of a 4+2 ecfs
volume per device, and two baselines on device 0 only: "raw" (a plain file
on the device's ext4) and "passthrough" (scripts/passthrough.py over a
directory on it).

For each cap level (default 150 MiB/s, HDD-like, where Python FUSE binds,
and 40 MiB/s, where the disks bind):
  - sequential write, then a cold sequential read, of --size MiB on ecfs
    (and the write ceiling of ecfs: the same write with the caps lifted,
    the better of one before and one after the capped write)
    (1 MiB requests); the baselines write and read --size/4 (one device
    reaches its steady rate in that much, and at 40 MiB/s it keeps the run
    short). Writes are timed to the final fsync. cgroup v1 caps only direct
    and synchronous writes: ecfs writes its fragments with O_DIRECT, the
    raw baseline writes with O_DIRECT, the passthrough writes buffered and
    its fsync (in the capped daemon) writes the bytes back;
  - a second cold read (healthy = the faster of the two: the targets with
    one device slow or missing are ratios to it; those are the better of
    two cold reads too; a healthy read above the physical limit, a burst
    the throttle let through, counts as the limit for them, as the notes
    then say);
  - the page-cache ceiling of ecfs: the same read with the fragments in
    the stores' page cache (only the mount's own cache dropped; the better
    of two);
  - 4 KiB random reads at queue depth 1 and 16 (threads doing os.pread;
    the notes say how many read I/Os of what size the devices saw per
    request, from /sys/block/loopN/stat), and the request ceiling beside
    them: the same reads from the passthrough with --no-io (answered from
    memory: what a Python FUSE filesystem does per second here with no
    I/O at all; the "physical limit" of ecfs's random reads on bandwidth
    caps, where a device answers a 4 KiB read at once);
  - the 10,000-file extract (scripts/bench.py's source tarball) on ecfs and
    the passthrough;
  - the reads again with device 5 slowed to 2 MiB/s (its cap changed under
    the running mount), and with store 5 missing (deleted, ecfs mounted on
    the five others); with device 5 slow, also a sequential write of a
    quarter of the size (removed again after);
  - the rebuild of the replaced store (`ecfs store replace` to a new empty
    directory on device 5, then `ecfs repair --wait`) while a foreground
    reader reads the big file sequentially, pass after pass, the caches
    dropped before each (its speed is over the window less those drops,
    0.2-0.25 s each, as the healthy read is timed after its drop).

Random reads on a disk that seeks (--hdd-iops, default 200; 0 skips
them): the caps above limit bandwidth only, and a loop device on a tmpfs
answers a 4 KiB read at once, so there the random reads measure CPU (the
passthrough's as much as ecfs's), not how reads spread over disks. So once
more, after the cap levels, every device is capped like an HDD: 150 MiB/s
and 200 read and 200 write operations per second (cgroup v1
`blkio.throttle.{read,write}_iops_device`, v2 `io.max riops= wiops=`, with
the bandwidth caps), and raw (O_DIRECT, device 0), the passthrough (device
0) and ecfs (all six) each write a file of the baselines' size under that
model and read it at QD1 and QD16, caches dropped before. Rows "4K rand
read QDn, 200 IOPS/dev" (cap column 150) with the physical limit (1 x IOPS
for one device, n x IOPS for ecfs) and, at QD16, the target >= 4 x the
passthrough. The throttle counts each I/O sent to the device (a request the
kernel merged, or read ahead, of up to its largest size is one), as a disk
pays one seek for it; the notes give the device I/Os per request and
ecfs's read counters (routed, hedged and degraded reads cost k device
reads each instead of one). The model caps the rate, it adds no latency
to an I/O (there is no device-mapper here for dm-delay): a lone read on an
idle device is served at once, so QD1 measures how fast one reader's
reads spread over devices with budget left, not a seek-bound 1/latency;
QD16 is where the caps bind.

Images: by default the device images live in a tmpfs, so that a device
is exactly as fast as its cap (on this VM the host caches its disk, and
the first cold read after a write ran at a third of the second one: the
order of runs decided the ratios). With --images-on-disk they live on the
root filesystem and before every cold read the image files of the devices
that read touches are read once through (O_DIRECT, data extents only, from
this process: the root disk is not capped), the same way for every
contender. Either way the guest's caches are dropped before every cold
read (sync; echo 3 > /proc/sys/vm/drop_caches). Each store is labelled as
its own failure domain (`mkfs --domain STORE=devN`): the devices stand for
separate disks.

Prints a table (rich) with each figure next to its physical limit (n x cap
for reads, n x cap / 1.5 for writes, ecfs's page-cache ceiling (reads) or
write ceiling (caps lifted) where it is lower) and issue 17's target, and writes JSON and Markdown to --out.
The default run takes about 6-9 minutes (1 GiB: more would not fit 10
minutes at 40 MiB/s); --quick (one cap level, 256 MiB, a 2,000-file
extract) about 1-2; --reads-only skips the baselines, random reads and the
extract. ECFS_BENCH_LOG_LEVEL sets the daemons' log level (default
warning); ECFS_BENCH_PROFILE=DIR (with py-spy on PATH or in
ECFS_BENCH_PYSPY) records the daemon's stacks during the sequential write, the healthy, slow and
missing reads, the healthy random reads and the rebuild. Every FUSE mount, device mount, loop device
and the cgroup are removed on any exit (try/finally, SIGTERM/SIGHUP/SIGINT
handlers, lazy unmounts as the last resort).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import mmap
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (a sibling script: Daemon, the tarball, the venv)
import bench_workloads as wl  # noqa: E402

from ecfs.core.errors import EcfsError  # noqa: E402
from ecfs.frontend.client import MountClient  # noqa: E402

MiB = wl.MiB
K, M = 4, 2
N = K + M
SLOW_BPS = 2 * MiB
IMAGE_SIZE = 8 << 30  # sparse
#: The tmpfs holding the images (their written parts: about 5 GiB at --size 1024).
TMPFS_SIZE = 12 << 30
BLOCK = MiB
TIMEOUT = 300.0
#: A cold sequential read stops after this many seconds (with a slow
#: device a read the code does not route well could take minutes).
READ_LIMIT_S = 60.0
#: The disk model of the IOPS-capped random-read rows ("like an HDD"):
#: HDD_MIBS MiB/s and --hdd-iops read and write operations per second per
#: device (default HDD_IOPS), see `DiskBench.hdd_level`.
HDD_MIBS = 150
HDD_IOPS = 200
CGROUP_V1 = Path("/sys/fs/cgroup/blkio")
CGROUP_V2 = Path("/sys/fs/cgroup")


# --- the cgroup ---------------------------------------------------------------------


class Cgroup:
    """One blkio (v1) or io (v2) cgroup with per-device bandwidth caps."""

    def __init__(self, name: str) -> None:
        if (CGROUP_V1 / "blkio.throttle.read_bps_device").exists():
            self.v2, root = False, CGROUP_V1
        elif (CGROUP_V2 / "cgroup.controllers").exists():
            self.v2, root = True, CGROUP_V2
            controllers = (root / "cgroup.subtree_control").read_text().split()
            if "io" not in controllers:
                (root / "cgroup.subtree_control").write_text("+io")
        else:
            raise SystemExit("bench_disks: no blkio (v1) or io (v2) cgroup controller found")
        self.root = root
        self.path = root / name
        self.path.mkdir()

    @property
    def kind(self) -> str:
        return "cgroup v2 io.max" if self.v2 else "cgroup v1 blkio.throttle.*_bps_device"

    def cap(self, device: str, bps: int, iops: int = 0) -> None:
        """Cap reads and writes of block device `device` ("major:minor") at
        `bps` bytes per second each and, with `iops`, at `iops` read and
        `iops` write operations per second too (0: no operation cap; a
        cap set before is lifted); a `bps` of 0 lifts the bandwidth cap."""
        for name, text in cap_settings(device, bps, iops, v2=self.v2):
            (self.path / name).write_text(text)

    def enter(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self) -> None:
        """Move every process back to the root cgroup, then remove it."""
        for _ in range(50):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(f"{pid}\n")
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"bench_disks: could not remove {self.path}", file=sys.stderr)


def cap_settings(device: str, bps: int, iops: int, *, v2: bool) -> list[tuple[str, str]]:
    """The cgroup files and lines that cap `device` ("major:minor") at `bps`
    bytes/s and (`iops` > 0) `iops` operations/s, reads and writes each; an
    `iops` (or `bps`) of 0 lifts that cap (v1: the value 0 removes the
    rule, v2: "max")."""
    if v2:
        ops = f"riops={iops} wiops={iops}" if iops else "riops=max wiops=max"
        rate = bps or "max"
        return [("io.max", f"{device} rbps={rate} wbps={rate} {ops}\n")]
    return [
        ("blkio.throttle.read_bps_device", f"{device} {bps}\n"),
        ("blkio.throttle.write_bps_device", f"{device} {bps}\n"),
        ("blkio.throttle.read_iops_device", f"{device} {iops}\n"),
        ("blkio.throttle.write_iops_device", f"{device} {iops}\n"),
    ]


# --- devices --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceReads:
    """Read I/Os completed by block devices, merges, bytes (a counter
    snapshot; subtract two for what happened in between)."""

    ios: int = 0
    merges: int = 0
    nbytes: int = 0

    def __add__(self, other: DeviceReads) -> DeviceReads:
        return DeviceReads(
            self.ios + other.ios, self.merges + other.merges, self.nbytes + other.nbytes
        )

    def __sub__(self, other: DeviceReads) -> DeviceReads:
        return DeviceReads(
            self.ios - other.ios, self.merges - other.merges, self.nbytes - other.nbytes
        )


@dataclass
class Device:
    image: Path
    mountpoint: Path
    loop: str = ""
    majmin: str = ""
    mounted: bool = False


class Machine:
    """The loop devices, their mounts, the cgroup (and the tmpfs holding the
    images, with `in_memory`); everything torn down by close()."""

    def __init__(self, work: Path, n: int, in_memory: bool) -> None:
        self.work = work
        self.in_memory = in_memory
        self.images = work / "images"
        self.images_mounted = False
        self.devices = [Device(self.images / f"disk{i}.img", work / f"d{i}") for i in range(n)]
        self.cgroup: Cgroup | None = None

    def setup(self) -> None:
        self.cgroup = Cgroup(f"ecfs-bench-disks-{os.getpid()}")
        self.images.mkdir()
        if self.in_memory:
            # The images in RAM: a device is then as fast as its cap lets
            # it, whatever the host caches of this VM's disk (which made the
            # first cold read after a write run at a third of the second).
            sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE >> 20}m", "ecfs-bench", str(self.images))
            self.images_mounted = True
        for dev in self.devices:
            with open(dev.image, "wb") as f:
                f.truncate(IMAGE_SIZE)
            dev.loop = sh("losetup", "--find", "--show", "--direct-io=on", str(dev.image)).strip()
            rdev = os.stat(dev.loop).st_rdev
            dev.majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
            sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev.loop)
            dev.mountpoint.mkdir()
            # discard: a deleted file's blocks are punched out of the image
            # (the tmpfs then gives the memory back)
            sh("mount", "-o", "noatime,discard", dev.loop, str(dev.mountpoint))
            dev.mounted = True
        self.cgroup.enter(os.getpid())  # every child inherits it

    def cap_all(self, bps: int, iops: int = 0) -> None:
        assert self.cgroup is not None
        for dev in self.devices:
            self.cgroup.cap(dev.majmin, bps, iops)

    def cap(self, index: int, bps: int, iops: int = 0) -> None:
        assert self.cgroup is not None
        self.cgroup.cap(self.devices[index].majmin, bps, iops)

    def read_stats(self, indices: list[int]) -> DeviceReads:
        """Reads the block layer completed on these devices so far (summed
        over them, from /sys/block/loopN/stat): what the devices saw, after
        the page cache, read-ahead and merging."""
        total = DeviceReads()
        for i in indices:
            name = Path(self.devices[i].loop).name
            fields = (Path("/sys/block") / name / "stat").read_text().split()
            # read I/Os, read merges, read sectors (Documentation/block/stat.rst)
            total = total + DeviceReads(int(fields[0]), int(fields[1]), int(fields[2]) * 512)
        return total

    def warm_host(self, indices: list[int]) -> float:
        """Read the data extents of these devices' images once with O_DIRECT
        (the host then has them cached for every contender alike); seconds.
        Nothing to do for images in memory."""
        start = time.monotonic()
        if self.in_memory:
            return 0.0
        buf = mmap.mmap(-1, 8 * MiB)
        for i in indices:
            fd = os.open(self.devices[i].image, os.O_RDONLY | os.O_DIRECT)
            try:
                size, pos = os.fstat(fd).st_size, 0
                while pos < size:
                    try:
                        pos = os.lseek(fd, pos, os.SEEK_DATA)
                        end = os.lseek(fd, pos, os.SEEK_HOLE)
                    except OSError:  # ENXIO: no data after pos
                        break
                    while pos < end:
                        n = os.preadv(fd, [memoryview(buf)[: min(8 * MiB, end - pos)]], pos)
                        if n <= 0:
                            break
                        pos += n
            finally:
                os.close(fd)
        buf.close()
        return time.monotonic() - start

    def close(self) -> None:
        for dev in self.devices:
            if dev.mounted:
                if run_quiet("umount", str(dev.mountpoint)) != 0:
                    run_quiet("umount", "-l", str(dev.mountpoint))
                dev.mounted = False
            if dev.loop:
                run_quiet("losetup", "-d", dev.loop)
                dev.loop = ""
        if self.images_mounted and run_quiet("umount", str(self.images)) == 0:
            self.images_mounted = False
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


def sh(*argv: str) -> str:
    return wl.run(argv, 120).stdout.decode()


def run_quiet(*argv: str) -> int:
    try:
        return wl.run(argv, 60, check=False).returncode
    except wl.WorkloadTimeout:
        return -1


# --- workloads (in this process, hence in the cgroup) ------------------------------------


def pattern(size: int) -> bytes:
    return random.Random(17).randbytes(size)


def seq_write(path: Path, size: int, direct: bool) -> float:
    """Write `size` bytes in 1 MiB requests (O_DIRECT or buffered), fsync; MiB/s."""
    data = pattern(BLOCK + 4096 * 16)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned for O_DIRECT
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    start = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        for n in range(size // BLOCK):
            at = (n % 16) * 4096
            buf[:] = data[at : at + BLOCK]
            written = 0
            while written < BLOCK:
                written += os.write(fd, memoryview(buf)[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return size / MiB / (time.perf_counter() - start)


def seq_read(path: Path, limit_s: float = READ_LIMIT_S) -> float:
    """Read `path` in 1 MiB requests (stop after `limit_s`); MiB/s."""
    buf = bytearray(BLOCK)
    done = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(buf)) and time.perf_counter() - start < limit_s:
            done += n
    return done / MiB / (time.perf_counter() - start)


def read_counters(mnt: Path) -> dict[str, float]:
    """The ecfs daemon's read counters (since it mounted), its CPU seconds,
    and the machine's busy and total CPU seconds (all cores, /proc/stat)."""
    counters: dict[str, float] = dict(json.loads(os.getxattr(mnt, "user.ecfs.status"))["reads"])
    counters["cpu_s"] = wl.cpu_seconds(int(os.getxattr(mnt, "user.ecfs.pid")))
    counters["host_busy_s"], counters["host_total_s"] = host_cpu_seconds()
    return counters


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot, all cores: the
    first line of /proc/stat, idle and iowait counted as not busy."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # (guest time is counted in user already)
    return (total - fields[3] - fields[4]) / tick, total / tick


def requested_bytes(mnt: Path) -> int:
    """Bytes the ecfs daemon was asked to read since it mounted."""
    return int(read_counters(mnt)["requested_bytes"])


def parallel(fn: Callable[[Path], float], paths: list[Path]) -> float:
    """`fn` (returning MiB/s over the whole file) on every path at once, in
    threads; the sum of their rates."""
    rates: list[float] = []
    threads = [threading.Thread(target=lambda p=p: rates.append(fn(p))) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def drop_fuse_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rand_read(path: Path, depth: int, seconds: float, direct: bool = False) -> dict[str, float]:
    """4 KiB random reads from `depth` threads for `seconds`: IOPS, p50, p99 (ms).

    Every block is read at most once (a shuffled order shared by the
    threads), and the block is dropped from the file's page cache first
    (POSIX_FADV_DONTNEED: through FUSE, the mount's cache), so no read is
    served by the reading side's cache; `direct` (the raw baseline) reads
    with O_DIRECT instead."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    blocks = os.fstat(fd).st_size // 4096
    order = list(range(blocks))
    random.Random(depth).shuffle(order)
    queue = iter(order)  # next() on a list iterator is atomic under the GIL
    latencies: list[list[float]] = [[] for _ in range(depth)]
    stop = time.perf_counter() + seconds

    def worker(n: int) -> None:
        buf = mmap.mmap(-1, 4096)
        mine = latencies[n]
        for block in queue:
            if (t := time.perf_counter()) >= stop:
                break
            if not direct:
                os.posix_fadvise(fd, block * 4096, 4096, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
            os.preadv(fd, [buf], block * 4096)
            mine.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(depth)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + TIMEOUT)
    elapsed = time.perf_counter() - start
    os.close(fd)
    every = sorted(x for lat in latencies for x in lat)
    if not every:
        return {"iops": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "reads": 0}
    return {
        "reads": len(every),
        "iops": len(every) / elapsed,
        "p50_ms": every[len(every) // 2] * 1000,
        "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1000,
    }


#: The rebuild row rebuilds at least this much file data (see `rebuild`).
REBUILD_MIN_DATA = 1024 * MiB


class Reader(threading.Thread):
    """A foreground sequential reader: reads `path` over and over (guest
    caches dropped before each pass, without a sync: a reader does not
    wait for the rebuild's writes to reach the disk) until stopped; bytes
    and seconds.

    The cache drops are the benchmark's, not the reader's: one takes
    0.2-0.25 s here during a rebuild (the page cache then holds the
    stores' pages too), 8% of a 3 s rebuild at 150 MiB/s, in which the
    reader reads nothing. `reading_seconds` leaves them out, as the
    healthy read it is compared with is timed after its cache drop."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.done = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None
        #: (start, end) of every cache drop, time.monotonic()
        self.drops: list[tuple[float, float]] = []

    def run(self) -> None:
        buf = bytearray(BLOCK)
        try:
            while not self.halt.is_set():
                started = time.monotonic()
                wl.drop_caches(sync=False)
                self.drops.append((started, time.monotonic()))
                with open(self.path, "rb", buffering=0) as f:
                    while not self.halt.is_set() and (n := f.readinto(buf)):
                        self.done += n
        except BaseException as e:  # reported by the caller
            self.error = e

    def reading_seconds(self, start: float, end: float) -> tuple[float, int]:
        """Seconds of [start, end] not spent dropping caches, and how many
        drops fell (partly) in it."""
        overlaps = [min(b, end) - max(a, start) for a, b in self.drops if a < end and b > start]
        return end - start - sum(overlaps), len(overlaps)


# --- results -----------------------------------------------------------------------------


@dataclass
class Row:
    cap: int
    what: str
    who: str
    value: float | None
    unit: str
    limit: float | None = None
    limit_note: str = ""
    target: str = ""
    passed: bool | None = None


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        value = "-" if row.value is None else f"{row.value:.1f} {row.unit}"
        print(f"{time.strftime('%H:%M:%S')} {row.cap:>4} MiB/s  {row.what:<34} {row.who:<12} {value}",
              flush=True)
        return row


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render(res: Results) -> Table:
    table = Table(box=box.SIMPLE_HEAVY, title="ecfs over 6 capped devices (issue 17)")
    for col in ("cap", "measure", "who", "value", "physical limit", "of limit", "target", ""):
        table.add_column(col, justify="right" if col in ("value", "physical limit", "of limit") else "left")
    for r in res.rows:
        of = f"{r.value / r.limit:.2f}" if r.value is not None and r.limit else ""
        mark = {True: "[green]PASS[/]", False: "[red]MISS[/]", None: ""}[r.passed]
        table.add_row(
            f"{r.cap}", r.what, r.who, f"{fmt(r.value)} {r.unit}",
            f"{fmt(r.limit)} {r.limit_note}".strip() if r.limit else r.limit_note,
            of, r.target, mark,
        )  # fmt: skip
    return table


def markdown(res: Results) -> str:
    lines = [
        "| cap MiB/s | measure | who | value | physical limit | of limit | target | |",
        "|---|---|---|--:|--:|--:|---|---|",
    ]
    for r in res.rows:
        of = f"{r.value / r.limit:.2f}" if r.value is not None and r.limit else ""
        mark = {True: "PASS", False: "MISS", None: ""}[r.passed]
        limit = f"{fmt(r.limit)} {r.limit_note}".strip() if r.limit else r.limit_note
        lines.append(
            f"| {r.cap} | {r.what} | {r.who} | {fmt(r.value)} {r.unit} | {limit} | {of}"
            f" | {r.target} | {mark} |"
        )
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    size: int
    base_size: int
    rand_s: float
    caps: list[int]
    tar_files: int
    tar_bytes: int
    out: Path
    reads_only: bool = False
    images_on_disk: bool = False
    #: Operations per second of the disk model of the random-read rows
    #: "like a disk that seeks" (HDD_MIBS and this; 0: no such rows).
    hdd_iops: int = 0


class DiskBench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.machine = Machine(work, N, in_memory=not cfg.images_on_disk)
        self.res = Results()
        self.daemons: list[bench.Daemon] = []
        self.tarball: Path | None = None
        self.warm_s = 0.0

    # -- daemons
    def start(self, daemon: bench.Daemon) -> bench.Daemon:
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def stop(self, daemon: bench.Daemon) -> None:
        for problem in daemon.stop():
            self.res.errors.append(problem)
        self.daemons.remove(daemon)

    def start_passthrough(self, src: Path, mnt: Path, log_name: str, *options: str) -> bench.Daemon:
        """scripts/passthrough.py (with `options`) mirroring the directory
        `src` (made if new) at `mnt` (made if new)."""
        src.mkdir(exist_ok=True)
        mnt.mkdir(exist_ok=True)
        argv = [bench.PYTHON, str(bench.REPO / "scripts" / "passthrough.py"), str(src), str(mnt),
                "--foreground", *options]  # fmt: skip
        return self.start(bench.Daemon("passthrough", argv, mnt, self.work / log_name))

    def mount_ecfs(self, stores: list[Path], mnt: Path, log: Path) -> bench.Daemon:
        argv = [
            bench.PYTHON, "-m", "ecfs", "mount", "--foreground", "--log-level",
            os.environ.get("ECFS_BENCH_LOG_LEVEL", "warning"),
            *map(str, stores), str(mnt),
        ]  # fmt: skip
        umount = [bench.PYTHON, "-m", "ecfs", "umount", str(mnt)]
        return self.start(bench.Daemon("ecfs", argv, mnt, log, umount))

    def cleanup(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(Exception):
                self.stop(daemon)
        for mountpoint in bench.fuse_mountpoints():
            if self.work in mountpoint.parents:
                bench.lazy_unmount(mountpoint)
        self.machine.close()

    def cold(self, devices: list[int]) -> None:
        """Before a cold read: warm the host's cache of these devices, drop the guest's."""
        self.warm_s += self.machine.warm_host(devices)
        wl.drop_caches()

    def ecfs_cmd(self, *args: str, timeout: float = TIMEOUT) -> None:
        wl.run([bench.PYTHON, "-m", "ecfs", *args], timeout, env=bench.subprocess_env())

    # -- phases
    def run(self) -> None:
        cfg, m = self.cfg, self.machine
        m.setup()
        assert m.cgroup is not None
        where = "a tmpfs (RAM)" if m.in_memory else str(self.work)
        self.res.notes.append(
            f"devices: {N} loop devices (--direct-io=on) on sparse images on {where},"
            f" ext4 each; caps with {m.cgroup.kind}; this process, the daemons and"
            " the workloads run in the capped cgroup"
        )
        self.tarball, info = bench.get_tarball(
            bench.Config(1, 0, 0, cfg.tar_files, cfg.tar_bytes, 0, 0, 0, cfg.out, None, False)
        )
        self.res.raw["tarball"] = info
        for cap in cfg.caps:
            print(f"-- cap {cap} MiB/s per device", flush=True)
            self.level(cap)
        if cfg.hdd_iops and not cfg.reads_only:
            print(f"-- disk model {HDD_MIBS} MiB/s and {cfg.hdd_iops} IOPS per device", flush=True)
            self.hdd_level(cfg.hdd_iops)
        if not m.in_memory:
            self.res.notes.append(
                f"host cache: before every cold read the images of the devices it touches were"
                f" read once with O_DIRECT ({self.warm_s:.0f} s in all), then the guest caches"
                " dropped (sync; echo 3 > /proc/sys/vm/drop_caches)"
            )

    def level(self, cap: int) -> None:
        cfg, res, m = self.cfg, self.res, self.machine
        bps = cap * MiB
        m.cap_all(bps)
        d = [dev.mountpoint / f"c{cap}" for dev in m.devices]
        for x in d:
            x.mkdir()
        if cfg.reads_only:
            self.ecfs_level(cap, d, {}, {})
            for x in d:
                shutil.rmtree(x, ignore_errors=True)
            return
        # -- baselines on device 0
        raw_file = d[0] / "raw.dat"
        w = seq_write(raw_file, cfg.base_size, direct=True)
        res.add(Row(cap, "seq write (O_DIRECT, fsync)", "raw", w, "MiB/s", cap, "1 x cap"))
        self.cold([0])
        r = seq_read(raw_file)
        res.add(Row(cap, "seq read, cold", "raw", r, "MiB/s", cap, "1 x cap"))
        raw_rand = {}
        for depth in (1, 16):
            self.cold([0])
            raw_rand[depth] = self.rand(
                f"{cap} MiB/s QD{depth} raw", raw_file, depth, [0], direct=True
            )
            res.add(Row(cap, f"4K rand read QD{depth}", "raw", raw_rand[depth]["iops"], "IOPS"))
        raw_file.unlink()
        # what the machine gives all devices at once (the host's disk is shared)
        files = [x / "raw.dat" for x in d]
        w = parallel(lambda f: seq_write(f, cfg.base_size, direct=True), files)
        res.add(Row(cap, "seq write (O_DIRECT), all devices", "raw x6", w, "MiB/s",
                    N * cap, "n x cap"))  # fmt: skip
        self.cold(list(range(N)))
        r = parallel(seq_read, files)
        res.add(Row(cap, "seq read, cold, all devices", "raw x6", r, "MiB/s", N * cap, "n x cap"))
        for f in files:
            f.unlink()

        pt_src, pt_mnt = d[0] / "pt-src", self.work / f"pt-mnt-{cap}"
        pt = self.start_passthrough(pt_src, pt_mnt, f"passthrough-{cap}.log")
        pt_rand = {}
        try:
            w = seq_write(pt_mnt / "seq.dat", cfg.base_size, direct=False)
            res.add(Row(cap, "seq write (fsync)", "passthrough", w, "MiB/s", cap, "1 x cap"))
            self.cold([0])
            r = seq_read(pt_mnt / "seq.dat")
            res.add(Row(cap, "seq read, cold", "passthrough", r, "MiB/s", cap, "1 x cap"))
            for depth in (1, 16):
                self.cold([0])
                pt_rand[depth] = self.rand(
                    f"{cap} MiB/s QD{depth} passthrough", pt_mnt / "seq.dat", depth, [0]
                )
                res.add(Row(cap, f"4K rand read QD{depth}", "passthrough",
                            pt_rand[depth]["iops"], "IOPS"))  # fmt: skip
            res.add(Row(cap, "4K rand read QD1 p99", "passthrough", pt_rand[1]["p99_ms"], "ms"))
            assert self.tarball is not None
            wl.warm(self.tarball)
            t = wl.extract(self.tarball, pt_mnt / "tree", TIMEOUT)["seconds"]
            wl.sync_all()
            res.add(Row(cap, f"extract {cfg.tar_files:,} files", "passthrough", t, "s"))
        finally:
            self.stop(pt)
        # The request ceiling: the same reads answered from memory (no I/O).
        ceiling = {}  # queue depth -> requests/s
        pt = self.start_passthrough(pt_src, pt_mnt, f"passthrough-no-io-{cap}.log", "--no-io")
        try:
            for depth in (1, 16):
                ceiling[depth] = rand_read(pt_mnt / "seq.dat", depth, cfg.rand_s)["iops"]
                res.add(Row(cap, f"4K rand read QD{depth}, no I/O", "passthrough",
                            ceiling[depth], "IOPS", ceiling[depth], "request ceiling"))  # fmt: skip
        finally:
            self.stop(pt)
        shutil.rmtree(pt_src)

        self.ecfs_level(cap, d, pt_rand, ceiling)
        for x in d:
            shutil.rmtree(x, ignore_errors=True)

    def write_ceiling(self, mnt: Path, cap: int, bps: int, when: str) -> float:
        """MiB/s of a sequential write of the benchmark's size into ecfs with
        every device's cap lifted (the file is removed again)."""
        self.machine.cap_all(0)
        try:
            ceiling_file = mnt / "ceiling.dat"
            with self.profiled(mnt, f"{cap}-write-ceiling-{when}"):
                speed = seq_write(ceiling_file, self.cfg.size, direct=False)
            ceiling_file.unlink()
        finally:
            self.machine.cap_all(bps)
        return speed

    def ecfs_level(
        self, cap: int, d: list[Path], pt_rand: dict[int, dict[str, float]],
        request_ceiling: dict[int, float],
    ) -> None:  # fmt: skip
        """ecfs's rows at one cap level; `pt_rand` (the passthrough's
        random reads) and `request_ceiling` (its no-I/O request rate, by
        queue depth) are empty with --reads-only."""
        cfg, res, m = self.cfg, self.res, self.machine
        bps = cap * MiB
        stores = [x / "store" for x in d]
        mnt = self.work / f"ecfs-mnt-{cap}"
        mnt.mkdir()
        log = self.work / f"ecfs-{cap}.log"
        # Each store on its own (simulated) device: its own failure domain.
        domains = [f"--domain={s}=dev{i}" for i, s in enumerate(stores)]
        self.ecfs_cmd("mkfs", "--data", str(K), "--parity", str(M), *domains, *map(str, stores))
        daemon = self.mount_ecfs(stores, mnt, log)
        big = mnt / "seq.dat"
        all_devices = list(range(N))
        try:
            # The write ceiling of ecfs on this machine: the same write with
            # the devices' caps lifted (what binds where n x cap / 1.5 is
            # more than ecfs can write: CPU). Measured before and after the
            # capped write and the better of the two taken: measured only
            # after it, on a fuller page cache, it came out below the capped
            # write twice.
            write_ceiling = self.write_ceiling(mnt, cap, bps, "before")
            with self.profiled(mnt, f"{cap}-write"):
                w = seq_write(big, cfg.size, direct=False)
            write_ceiling = max(write_ceiling, self.write_ceiling(mnt, cap, bps, "after"))
            if w > write_ceiling:  # both uncapped writes were disturbed
                res.notes.append(
                    f"{cap} MiB/s: the uncapped writes ({write_ceiling:.0f} MiB/s) ran slower"
                    f" than the capped one ({w:.0f}): the ceiling is taken as the latter"
                )
                write_ceiling = w
            res.add(Row(cap, "seq write, ceiling (caps lifted)", "ecfs", write_ceiling, "MiB/s"))
            limit = min(N * cap / 1.5, write_ceiling)
            note = "n x cap / 1.5" if N * cap / 1.5 <= write_ceiling else "ceiling"
            res.add(Row(cap, "seq write (fsync)", "ecfs", w, "MiB/s", limit, note,
                        ">= 0.8 x limit", w >= 0.8 * limit))  # fmt: skip
            # healthy reads
            self.cold(all_devices)
            before_counters = read_counters(mnt)
            with self.profiled(mnt, f"{cap}-healthy"):
                healthy = seq_read(big)
            self.note_counters(cap, "healthy", before_counters, read_counters(mnt))
            drop_fuse_cache(big)
            before = requested_bytes(mnt)
            ceiling = seq_read(big)  # fragments in the stores' page cache
            drop_fuse_cache(big)
            ceiling = max(ceiling, seq_read(big))  # the better of two (a shared machine)
            through = (requested_bytes(mnt) - before) / (2 * cfg.size)
            res.add(Row(cap, "seq read, page-cache ceiling", "ecfs", ceiling, "MiB/s",
                        None, f"{through:.0%} via daemon"))  # fmt: skip
            # A second cold read: the first one after the write has been
            # seen slower (or faster) by a lot on this shared machine.
            self.cold(all_devices)
            again = seq_read(big)
            if max(healthy, again) > ceiling:  # the ceiling read was disturbed
                res.notes.append(
                    f"{cap} MiB/s: the page-cache reads ({ceiling:.0f} MiB/s) ran slower than a"
                    f" cold read ({max(healthy, again):.0f}): the ceiling is taken as the latter"
                )
                ceiling = max(healthy, again)
            limit = min(N * cap, ceiling)
            note = "n x cap" if N * cap <= ceiling else "ceiling"
            res.add(Row(cap, "seq read, cold (1st after write)", "ecfs", healthy, "MiB/s",
                        limit, note))  # fmt: skip
            healthy = max(healthy, again)
            res.add(Row(cap, "seq read, cold (best of 2)", "ecfs", healthy, "MiB/s", limit, note,
                        ">= 0.9 x limit", healthy >= 0.9 * limit))  # fmt: skip
            if healthy > limit:
                # The targets below are ratios to the healthy read: one above
                # the physical limit (the throttle let a burst through: 1,040-
                # 1,054 MiB/s against 6 x 150 = 900 in some runs, 873-889 in
                # others) would ask the slow-device read for more than its
                # own limit (0.75 x 1,054 = 791 > 5 x 150 + 2 = 752).
                res.notes.append(
                    f"{cap} MiB/s: the healthy read ({healthy:,.0f} MiB/s) ran above the physical"
                    f" limit ({limit:,.0f}); the targets relative to it take the limit"
                )
                healthy = limit
            rand: dict[int, dict[str, float]] = {}
            for depth in () if cfg.reads_only else (1, 16):
                self.cold(all_devices)
                with self.profiled(mnt, f"{cap}-rand-qd{depth}"):
                    rand[depth] = self.rand(f"{cap} MiB/s QD{depth} ecfs", big, depth, all_devices)
                row = Row(cap, f"4K rand read QD{depth}", "ecfs", rand[depth]["iops"], "IOPS")
                if depth in request_ceiling:
                    row.limit, row.limit_note = request_ceiling[depth], "request ceiling"
                if depth == 16 and pt_rand.get(16):
                    row.target = f">= 4 x passthrough ({4 * pt_rand[16]['iops']:,.0f})"
                    row.passed = rand[16]["iops"] >= 4 * pt_rand[16]["iops"]
                res.add(row)
            if rand:
                res.add(Row(cap, "4K rand read QD1 p99", "ecfs", rand[1]["p99_ms"], "ms"))
            # small files
            if not cfg.reads_only:
                assert self.tarball is not None
                wl.warm(self.tarball)
                t = wl.extract(self.tarball, mnt / "tree", TIMEOUT)["seconds"]
                wl.sync_all()
                res.add(Row(cap, f"extract {cfg.tar_files:,} files", "ecfs", t, "s"))
                # Removed again: the rebuild below then measures bandwidth,
                # not the per-chunk cost of 10,000 small chunks.
                wl.remove_tree(mnt / "tree", TIMEOUT)
                wl.sync_all()
            # one device slow
            m.cap(N - 1, SLOW_BPS)
            try:
                self.cold(all_devices)
                before_counters = read_counters(mnt)
                with self.profiled(mnt, f"{cap}-slow"):
                    slow = seq_read(big)
                self.note_counters(cap, "slow", before_counters, read_counters(mnt))
                res.add(Row(cap, "seq read, 1 dev slow (1st)", "ecfs", slow, "MiB/s"))
                self.cold(all_devices)
                slow = max(slow, seq_read(big))  # the better of two, as healthy
                limit = min((N - 1) * cap + SLOW_BPS / MiB, ceiling)
                res.add(Row(cap, "seq read, 1 dev at 2 MiB/s (best of 2)", "ecfs", slow, "MiB/s", limit,
                            "5 x cap + 2", f">= 0.75 x healthy ({0.75 * healthy:,.0f})",
                            slow >= 0.75 * healthy))  # fmt: skip
                slow_rand: dict[int, dict[str, float]] = {}
                for depth in () if cfg.reads_only else (1, 16):
                    self.cold(all_devices)
                    slow_rand[depth] = rand_read(big, depth, cfg.rand_s)
                    res.add(Row(cap, f"4K rand read QD{depth}, 1 dev slow", "ecfs",
                                slow_rand[depth]["iops"], "IOPS"))  # fmt: skip
                if slow_rand:
                    p99 = slow_rand[1]["p99_ms"]
                    res.add(Row(cap, "4K rand read QD1 p99, 1 dev slow", "ecfs", p99, "ms",
                                None, "", f"<= 2 x healthy ({2 * rand[1]['p99_ms']:.2f})",
                                p99 <= 2 * rand[1]["p99_ms"]))  # fmt: skip
                # a write with the device slow (a quarter of the size): the
                # writer does not wait for the slow store's fragments once
                # k+1 are written (stragglers, ecfs.data.writer); the file is
                # removed again so that the rest measures the same volume
                extra = mnt / "seq-slow.dat"
                w_slow = seq_write(extra, cfg.size // 4, direct=False)
                res.add(Row(cap, "seq write, 1 dev at 2 MiB/s", "ecfs", w_slow, "MiB/s",
                            (N - 1) * cap / 1.25, "5 x cap / 1.25",
                            f"{w_slow / w:.2f} x healthy write"))  # fmt: skip
                extra.unlink()
                wl.sync_all()
            finally:
                m.cap(N - 1, bps)
            # one device missing: its store deleted, ecfs mounted on the others
            self.stop(daemon)
            shutil.rmtree(stores[-1])
            daemon = self.mount_ecfs(stores[:-1], mnt, log)
            self.cold(all_devices)
            before_counters = read_counters(mnt)
            with self.profiled(mnt, f"{cap}-missing"):
                missing = seq_read(big)
            self.note_counters(cap, "missing", before_counters, read_counters(mnt))
            res.add(Row(cap, "seq read, 1 dev missing (1st)", "ecfs", missing, "MiB/s"))
            self.cold(all_devices)
            missing = max(missing, seq_read(big))
            limit = min((N - 1) * cap, ceiling)
            res.add(Row(cap, "seq read, 1 dev missing (best of 2)", "ecfs", missing, "MiB/s", limit,
                        "5 x cap", f">= 0.7 x healthy ({0.7 * healthy:,.0f})",
                        missing >= 0.7 * healthy))  # fmt: skip
            if not cfg.reads_only:
                self.cold(all_devices)
                miss16 = rand_read(big, 16, cfg.rand_s)
                res.add(Row(cap, "4K rand read QD16, 1 dev missing", "ecfs",
                            miss16["iops"], "IOPS"))  # fmt: skip
            # rebuild onto a new store on device 5 with a foreground reader
            self.rebuild(cap, mnt, stores[-1], d[-1] / "store-new", healthy)
        finally:
            self.stop(daemon)

    def rand(
        self, label: str, path: Path, depth: int, devices: list[int], direct: bool = False
    ) -> dict[str, float]:
        """`rand_read` of `path` (its file on `devices`), noting what the
        devices saw meanwhile (/sys/block/loopN/stat): read I/Os per
        request and their size, after the page cache, read-ahead and
        merging (in the notes and in raw["device_reads"])."""
        before = self.machine.read_stats(devices)
        result = rand_read(path, depth, self.cfg.rand_s, direct=direct)
        seen = self.machine.read_stats(devices) - before
        reads = max(1, int(result["reads"]))
        self.res.raw.setdefault("device_reads", {})[label] = {
            "requests": result["reads"], "ios": seen.ios, "merges": seen.merges, "bytes": seen.nbytes,
        }  # fmt: skip
        self.res.notes.append(
            f"devices under {label} 4K random reads: {seen.ios / reads:.2f} read I/Os per request,"
            f" {seen.nbytes / max(1, seen.ios) / 1024:.1f} KiB each, {seen.merges} merged"
        )
        return result

    def hdd_level(self, iops: int) -> None:
        """4 KiB random reads at QD1 and QD16 with every device capped like
        a disk that seeks: HDD_MIBS MiB/s and `iops` read and `iops` write
        operations per second (cgroup v1 blkio.throttle.*_iops_device, v2
        io.max riops/wiops, on top of the bandwidth caps). Raw (O_DIRECT)
        and the passthrough on device 0, ecfs over all six; the same file
        size (the baselines' size) for each, written under the same model.
        The throttle counts the I/Os the device is sent (a merged or
        read-ahead request of up to 128 KiB is one), as a disk's seek
        budget does; the notes say what the devices saw per request."""
        cfg, res, m = self.cfg, self.res, self.machine
        cap, bps = HDD_MIBS, HDD_MIBS * MiB
        m.cap_all(bps, iops)
        model = f"{iops} IOPS/dev"
        d = [dev.mountpoint / "hdd" for dev in m.devices]
        for x in d:
            x.mkdir()
        try:
            raw_file = d[0] / "raw.dat"
            seq_write(raw_file, cfg.base_size, direct=True)
            for depth in (1, 16):
                self.cold([0])
                r = self.rand(f"{model} QD{depth} raw", raw_file, depth, [0], direct=True)
                res.add(Row(cap, f"4K rand read QD{depth}, {model}", "raw", r["iops"], "IOPS",
                            iops, "1 x IOPS"))  # fmt: skip
            raw_file.unlink()
            pt_src, pt_mnt = d[0] / "pt-src", self.work / "pt-mnt-hdd"
            pt = self.start_passthrough(pt_src, pt_mnt, "passthrough-hdd.log")
            pt_rand: dict[int, dict[str, float]] = {}
            try:
                seq_write(pt_mnt / "seq.dat", cfg.base_size, direct=False)
                for depth in (1, 16):
                    self.cold([0])
                    pt_rand[depth] = self.rand(f"{model} QD{depth} passthrough", pt_mnt / "seq.dat",
                                               depth, [0])  # fmt: skip
                    res.add(Row(cap, f"4K rand read QD{depth}, {model}", "passthrough",
                                pt_rand[depth]["iops"], "IOPS", iops, "1 x IOPS"))  # fmt: skip
            finally:
                self.stop(pt)
            stores = [x / "store" for x in d]
            mnt = self.work / "ecfs-mnt-hdd"
            mnt.mkdir()
            domains = [f"--domain={s}=dev{i}" for i, s in enumerate(stores)]
            self.ecfs_cmd("mkfs", "--data", str(K), "--parity", str(M), *domains, *map(str, stores))
            daemon = self.mount_ecfs(stores, mnt, self.work / "ecfs-hdd.log")
            try:
                big = mnt / "seq.dat"
                seq_write(big, cfg.base_size, direct=False)
                for depth in (1, 16):
                    self.cold(list(range(N)))
                    before_counters = read_counters(mnt)
                    with self.profiled(mnt, f"hdd-rand-qd{depth}"):
                        r = self.rand(f"{model} QD{depth} ecfs", big, depth, list(range(N)))
                    self.note_counters(cap, f"{model}, random QD{depth}", before_counters,
                                       read_counters(mnt))  # fmt: skip
                    row = Row(cap, f"4K rand read QD{depth}, {model}", "ecfs", r["iops"], "IOPS",
                              N * iops, "n x IOPS")  # fmt: skip
                    if depth == 16 and pt_rand.get(16):
                        row.target = f">= 4 x passthrough ({4 * pt_rand[16]['iops']:,.0f})"
                        row.passed = r["iops"] >= 4 * pt_rand[16]["iops"]
                    res.add(row)
            finally:
                self.stop(daemon)
        finally:
            m.cap_all(bps)  # the operation caps lifted
            for x in d:
                shutil.rmtree(x, ignore_errors=True)

    @contextlib.contextmanager
    def profiled(self, mnt: Path, name: str) -> Iterator[None]:
        """With ECFS_BENCH_PROFILE=DIR and py-spy on PATH (or
        ECFS_BENCH_PYSPY): the daemon's stacks (py-spy record, raw
        collapsed format, --nonblocking) while the block runs, in DIR/name.txt
        (the sequential write, the healthy, slow and missing sequential
        reads, the healthy random reads and the rebuild)."""
        out_dir = os.environ.get("ECFS_BENCH_PROFILE")
        py_spy = os.environ.get("ECFS_BENCH_PYSPY") or shutil.which("py-spy")
        if not out_dir or not py_spy:
            yield
            return
        pid = int(os.getxattr(mnt, "user.ecfs.pid"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [py_spy, "record", "--nonblocking", "--threads", "--format", "raw", "--rate", "200",
             "--pid", str(pid), "-o", str(Path(out_dir) / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def note_counters(
        self, cap: int, case: str, before: dict[str, float], after: dict[str, float]
    ) -> None:
        """ecfs's read counters over one read, in the results (raw) and a note."""
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        self.res.raw.setdefault("read_counters", {})[f"{cap} {case}"] = delta
        shown = ("nowait_hits", "thread_reads", "degraded_reads", "hedged_reads",
                 "one_call_reads", "routed_reads", "probe_reads")  # fmt: skip
        text = ", ".join(f"{k} {delta[k]:.0f}" for k in shown if k in delta)
        if delta.get("requested_bytes"):
            gib = delta["requested_bytes"] / (1 << 30)
            text += f"; daemon CPU {delta.get('cpu_s', 0.0) / gib:.2f} s per GiB read"
        if delta.get("host_total_s"):
            busy = delta.get("host_busy_s", 0.0) / delta["host_total_s"]
            text += f"; the machine's CPUs {busy:.0%} busy"
        self.res.notes.append(f"ecfs read counters, {cap} MiB/s, {case}: {text}")

    def rebuild(self, cap: int, mnt: Path, old: Path, new: Path, healthy: float) -> None:
        res = self.res
        # At least REBUILD_MIN_DATA of file data to rebuild (a quarter of
        # it lands on the new store): with the 256 MiB of --quick alone the
        # rebuild took about a second, shorter than starting `ecfs repair`.
        extra = mnt / "rebuild-extra.dat"
        if self.cfg.size < REBUILD_MIN_DATA:
            seq_write(extra, REBUILD_MIN_DATA - self.cfg.size, direct=False)
            wl.drop_caches()  # its fragments are not read from the page cache
        client = MountClient(str(mnt))
        reader = Reader(mnt / "seq.dat")
        reader.start()
        time.sleep(1.0)  # the reader at speed before the rebuild starts
        profile = self.profiled(mnt, f"{cap}-rebuild")
        read0, start = reader.done, time.monotonic()
        survivors = list(range(N - 1))  # (the replaced store is on device N - 1)
        disks0, cpu0 = self.machine.read_stats(survivors), host_cpu_seconds()
        profile.__enter__()
        try:
            self.ecfs_cmd("store", "replace", "--domain", f"dev{N - 1}", str(mnt), str(old), str(new))
            # Urgent at once (the control command `ecfs repair` sends, without
            # the CLI's start-up), with the target (0.5 x cap) as the
            # operator's minimum rate under load (`ecfs repair --min-rate`;
            # the mount's default is 80M), plus 10% for the pipeline's ends
            # inside the window (the first chunk's latency, the last one's,
            # the status poll every 0.1 s: 0.1-0.2 s of the 3 s window at
            # 150 MiB/s; with 5% the rebuild measured 0.50-0.61 x cap over
            # 44 runs, once 0.497).
            # Timed from there: rebuild and reader over one window
            # (background repair may have done a little before).
            before = client.status().repair
            disks0, cpu0 = self.machine.read_stats(survivors), host_cpu_seconds()
            read0, start = reader.done, time.monotonic()
            minimum = f"repair urgent min={round(0.55 * cap * MiB)}"
            try:
                client.command(minimum)
            except EcfsError:  # refused by a tree from before the rates: plain urgent
                minimum = "repair urgent"
                client.command(minimum)
            while True:
                status = client.status().repair
                if status.chunks == 0 and not status.busy:
                    break
                if time.monotonic() - start > 600:
                    raise wl.WorkloadTimeout("the rebuild took more than 600 s")
                time.sleep(0.1)
        finally:
            end = time.monotonic()
            seconds = end - start
            read = reader.done - read0
            delivered = (self.machine.read_stats(survivors) - disks0).nbytes
            busy, total = (b - a for a, b in zip(cpu0, host_cpu_seconds(), strict=True))
            profile.__exit__(None, None, None)
            reader.halt.set()
            reader.join(TIMEOUT)
        if reader.error is not None:
            res.errors.append(f"foreground reader: {reader.error!r}")
        after = client.status().repair
        written = after.bytes_written - before.bytes_written
        rate = written / MiB / seconds
        res.add(Row(cap, "rebuild, written to new store", "ecfs", rate, "MiB/s", cap,
                    "1 x cap", ">= 0.5 x cap", rate >= 0.5 * cap))  # fmt: skip
        reading, drops = reader.reading_seconds(start, end)
        fg = read / MiB / reading
        res.add(Row(cap, "seq read during rebuild", "ecfs", fg, "MiB/s", None, "",
                    f">= 0.7 x healthy ({0.7 * healthy:,.0f})", fg >= 0.7 * healthy))  # fmt: skip
        repair_read = after.bytes_read - before.bytes_read
        res.raw.setdefault("rebuild", {})[cap] = {
            "seconds": seconds, "bytes_written": written, "bytes_read": repair_read,
            "foreground_bytes": read, "foreground_seconds": reading, "command": minimum,
            "written_before": before.bytes_written, "survivors_read_bytes": delivered,
            "host_cpu_busy": busy / max(total, 1e-9),
        }  # fmt: skip
        res.notes.append(
            f"rebuild at {cap} MiB/s: `{minimum}`, {seconds:.1f} s, {written / MiB:,.0f} MiB"
            f" written ({before.bytes_written / MiB:,.0f} before: background repair),"
            f" repair read {repair_read / MiB:,.0f} MiB; fragments rebuilt"
            f" {after.fragments_rebuilt - before.fragments_rebuilt}, of them from readers'"
            f" decodes {getattr(after, 'fragments_shared', 0) - getattr(before, 'fragments_shared', 0)};"
            f" the {N - 1} survivors' devices read {delivered / MiB / seconds:,.0f} MiB/s"
            f" (limit {(N - 1) * cap:,}: the reader's and the repair's reads after the page cache);"
            f" the machine's CPUs {busy / max(total, 1e-9):.0%} busy; the reader read"
            f" {read / MiB:,.0f} MiB in {reading:.2f} s: the window less its {drops} cache"
            f" drop(s) ({seconds - reading:.2f} s; over the whole window"
            f" {read / MiB / seconds:,.0f} MiB/s)"
        )
        if extra.exists():
            extra.unlink()
            wl.sync_all()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--quick", action="store_true",
                        help="one cap level (40), 256 MiB, 2 s random reads, 2,000 files")
    parser.add_argument("--size", type=int, metavar="MIB",
                        help="size of ecfs's sequential file (default 1024, --quick 256);"
                        " the baselines use a quarter of it")  # fmt: skip
    parser.add_argument("--caps", help="cap levels in MiB/s (default 150,40; --quick 40)")
    parser.add_argument("--rand-seconds", type=float, help="each random-read run (default 4)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where the images go (on the root filesystem; default /var/tmp)")
    parser.add_argument("--images-on-disk", action="store_true",
                        help="the device images on --workdir's disk instead of a tmpfs (the"
                        " host's cache of that disk then shows in the figures: each cold"
                        " read first reads the images once with O_DIRECT)")
    parser.add_argument("--hdd-iops", type=int, default=HDD_IOPS, metavar="IOPS",
                        help=f"the random reads again with every device capped like a disk that"
                        f" seeks: {HDD_MIBS} MiB/s and IOPS read and write operations per second"
                        f" (default {HDD_IOPS}; 0 skips them)")  # fmt: skip
    parser.add_argument("--reads-only", action="store_true",
                        help="only ecfs's sequential write, reads (healthy, slow, missing) and rebuild")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        bench.reexec_in_venv()
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_disks: run as root (loop devices, mounts, cgroups)", file=sys.stderr)
        return 1
    for tool in ("losetup", "mkfs.ext4", "fusermount3", "tar"):
        if shutil.which(tool) is None:
            print(f"bench_disks: {tool} not found", file=sys.stderr)
            return 1
    quick = args.quick
    size = (args.size or (256 if quick else 1024)) * MiB
    cfg = Config(
        size=size,
        base_size=max(64 * MiB, size // 4),
        rand_s=args.rand_seconds or (2.0 if quick else 4.0),
        caps=[int(c) for c in (args.caps or ("40" if quick else "150,40")).split(",")],
        tar_files=2_000 if quick else 10_000,
        tar_bytes=(48 if quick else 256) * MiB,
        out=args.out,
        reads_only=args.reads_only,
        images_on_disk=args.images_on_disk,
        hdd_iops=max(0, args.hdd_iops),
    )

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the same cleanup as Ctrl-C

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ecfs-bench-disks-", dir=args.workdir)).resolve()
    print(f"bench_disks: working in {work}", flush=True)
    run = DiskBench(cfg, work)
    load = os.getloadavg()
    interrupted = False
    try:
        run.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench_disks: interrupted, cleaning up", file=sys.stderr)
    except Exception as e:
        run.res.errors.append(f"stopped: {type(e).__name__}: {e}")
        for daemon in run.daemons:
            print(daemon.log_tail(), file=sys.stderr)
        raise
    finally:
        logs = cfg.out / f"disks-logs-{started:%Y%m%d-%H%M%S}"
        logs.mkdir(parents=True, exist_ok=True)
        for log in work.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(log, logs / log.name)
        run.cleanup()
        leftovers = [p for p in bench.fuse_mountpoints() if work in p.parents]
        if leftovers or run.machine.images_mounted or any(dev.mounted for dev in run.machine.devices):
            print(f"bench_disks: could not unmount everything; leaving {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    seconds = time.monotonic() - t0
    res = run.res
    res.notes.append(
        f"{seconds:.0f} s; load average {load[0]:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)"
    )
    res.notes.append(
        f"sizes: ecfs file {cfg.size // MiB} MiB, baselines {cfg.base_size // MiB} MiB;"
        f" random reads {cfg.rand_s:g} s each; cold reads stop after {READ_LIMIT_S:.0f} s"
    )
    console = Console(width=160)
    console.print(render(res))
    for note in res.notes:
        console.print(f"- {note}")
    for error in res.errors:
        console.print(f"[red]! {error}[/]")
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = f"{started:%Y%m%d-%H%M%S}"
    md = "\n".join([
        f"# ecfs over separate capped devices, {started:%Y-%m-%d %H:%M} UTC", "",
        f"`{' '.join(['scripts/bench_disks.py', *sys.argv[1:]])}` on {platform.node()},"
        f" {os.cpu_count()} CPUs, kernel {platform.release()}.", "",
        markdown(res), "", *(f"- {n}" for n in res.notes), *(f"- ERROR {e}" for e in res.errors),
        "",
    ])  # fmt: skip
    (cfg.out / f"disks-{stamp}.md").write_text(md)
    (cfg.out / f"disks-{stamp}.json").write_text(json.dumps({
        "started": started.isoformat(), "argv": sys.argv, "seconds": seconds,
        "rows": [vars(r) for r in res.rows], "notes": res.notes, "errors": res.errors,
        "raw": res.raw,
    }, indent=1, default=str))  # fmt: skip
    print(f"bench_disks: results in {cfg.out / f'disks-{stamp}.md'}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
