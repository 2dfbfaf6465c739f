"""The workloads of scripts/bench.py and the measuring helpers they share.

Owns: running fio and parsing its JSON, the small-file workloads (extract,
find, tar read-back, rm -rf), building the source tarball, dropping the page
cache, and reading a daemon's CPU time. Every function works on a plain
directory and knows nothing about which filesystem is behind it; mounting
and reporting live in bench.py.

Every external command runs with a timeout, so a hung filesystem costs the
benchmark a `WorkloadTimeout` for that measurement instead of the whole run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: ecfs
from ecfs.core import host  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYNC_TIMEOUT = 120.0
T = TypeVar("T")


class WorkloadTimeout(Exception):
    """A workload did not finish in time (typically: a hung store won)."""


class WorkloadFailed(Exception):
    """A workload's command failed."""


#: After a timeout, seconds to wait for a killed child. A process blocked in
#: a FUSE flush cannot die before the daemon answers (or dies): then it is
#: left behind, and killing the daemon at cleanup releases it.
REAP_TIMEOUT = 5.0


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child and reap it, but never wait for it for long."""
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(REAP_TIMEOUT)


def run(
    argv: Sequence[str], timeout: float, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; WorkloadTimeout / WorkloadFailed (with its stderr) on
    trouble. Returns within about `timeout` + REAP_TIMEOUT, whatever the
    command is stuck in."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C
        stop_child(proc)
        if isinstance(e, subprocess.TimeoutExpired):
            stuck = " (killed, still stuck in the kernel)" if proc.poll() is None else ""
            raise WorkloadTimeout(f"{argv[0]} took more than {timeout:.0f} s{stuck}") from None
        raise
    if check and proc.returncode != 0:
        msg = err.decode(errors="replace").strip()[-2000:]
        raise WorkloadFailed(f"{' '.join(argv)} exited with {proc.returncode}: {msg}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def call_with_timeout(fn: Callable[[], T], timeout: float) -> T:
    """fn() in a daemon thread; TimeoutError if it does not return in time.
    For calls into a filesystem that may hang: the thread is abandoned and
    the caller stays free."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]


# --- machine state ------------------------------------------------------------


def sync_all() -> None:
    """sync(), or WorkloadTimeout if a filesystem does not let it finish."""
    try:
        call_with_timeout(os.sync, SYNC_TIMEOUT)
    except TimeoutError:
        raise WorkloadTimeout(f"sync() took more than {SYNC_TIMEOUT:.0f} s") from None


def drop_caches(sync: bool = True) -> bool:
    """Write back dirty data (unless `sync` is False: a hung FUSE mount would
    make sync() hang too) and drop the page, dentry and inode caches.
    Returns False (cold-cache numbers are then warm) when not allowed."""
    if sync:
        sync_all()
    return host.drop_caches(sync=False)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of process `pid` (all its threads), in seconds; 0 for None."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# --- fio ----------------------------------------------------------------------


def fio(name: str, filename: Path, timeout: float, **options: object) -> dict:
    """Run one fio job (psync engine) on `filename`; return its JSON job record."""
    argv = [
        "fio", f"--name={name}", f"--filename={filename}", "--ioengine=psync",
        "--fallocate=none", "--output-format=json",
    ]  # fmt: skip
    for key, value in options.items():
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    result = run(argv, timeout)
    text = result.stdout.decode(errors="replace")
    # fio may print notes before the JSON document.
    report = json.loads(text[text.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        raise WorkloadFailed(f"fio {name}: error {job['error']}")
    return job


def seq_write(directory: Path, size: int, fsync: bool, timeout: float) -> dict[str, float]:
    """Write a new file of `size` bytes in 1 MiB requests (with a final fsync
    that counts in the time, or without); MiB/s as fio measured it.

    Both variants start from the same state: the previous file removed,
    everything written back and the page cache dropped. (Without that, the
    first write of a repetition paid for reclaiming the page cache the
    earlier workloads filled, and the second ran into the room the removed
    file left: raw and the passthrough "wrote faster with an fsync".)"""
    path = directory / "seq.dat"
    call_with_timeout(lambda: path.unlink(missing_ok=True), timeout)
    drop_caches()
    job = fio("seqwrite", path, timeout, rw="write", bs="1M", size=size, end_fsync=int(fsync))
    return {"mib_s": job["write"]["bw_bytes"] / MiB, "bytes": job["write"]["io_bytes"]}


def seq_read(directory: Path, size: int, timeout: float) -> dict[str, float]:
    """Read the file seq_write left, in 1 MiB requests; MiB/s."""
    job = fio(
        "seqread", directory / "seq.dat", timeout, rw="read", bs="1M", size=size, readonly=True
    )
    return {"mib_s": job["read"]["bw_bytes"] / MiB, "bytes": job["read"]["io_bytes"]}


def rand_read(directory: Path, size: int, seconds: float, timeout: float) -> dict[str, float]:
    """4 KiB random reads (one at a time) over the file seq_write left, for
    `seconds`; IOPS and completion latency p50/p99 in microseconds."""
    job = fio(
        "randread", directory / "seq.dat", timeout,
        rw="randread", bs="4k", size=size, readonly=True, time_based=1, runtime=f"{seconds}s",
    )  # fmt: skip
    read = job["read"]
    percentiles = read["clat_ns"].get("percentile", {})
    return {
        "iops": read["iops"],
        "p50_us": percentiles.get("50.000000", 0) / 1000,
        "p99_us": percentiles.get("99.000000", 0) / 1000,
        "bytes": read["io_bytes"],
    }


# --- small files ---------------------------------------------------------------

#: Trees a "real source tarball" is made of, in this order, capped at max_files.
SOURCE_TREES = (
    Path(sysconfig.get_paths()["stdlib"]),
    Path("/usr/include"),
    Path(sysconfig.get_paths()["purelib"]),  # the venv's packages
    Path("/usr/share/doc"),
)
SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
MAX_FILE_SIZE = 4 * MiB  # leave out static libraries and such


def _source_files(trees: Iterable[Path]) -> Iterable[tuple[Path, str]]:
    """(path, name in the archive) of the files, directories and symlinks
    under `trees`, in a stable order, without bytecode caches and without
    package directories nested in a tree (the stdlib's site-packages)."""
    for number, tree in enumerate(trees):
        if not tree.is_dir():
            continue
        prefix = f"src{number}-{tree.name}"
        for root, dirs, files in os.walk(tree):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            rel = os.path.relpath(root, tree)
            base = prefix if rel == "." else f"{prefix}/{rel}"
            yield Path(root), base
            for name in sorted(files):
                if not name.endswith((".pyc", ".pyo")):
                    yield Path(root) / name, f"{base}/{name}"


def build_tarball(path: Path, max_files: int, max_bytes: int) -> dict[str, int]:
    """Write a tar of up to `max_files` regular files (and their directories
    and symlinks) and `max_bytes` of file data, from the source trees on this
    machine (Python's standard library, C headers, the venv's packages, docs)."""
    files = total = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for source, name in _source_files(SOURCE_TREES):
            try:
                info = tar.gettarinfo(str(source), arcname=name)
            except OSError:
                continue
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                if info.size > MAX_FILE_SIZE:
                    continue
                if files >= max_files or total + info.size > max_bytes:
                    break
                try:
                    with open(source, "rb") as f:
                        tar.addfile(info, f)
                except OSError:
                    continue
                files += 1
                total += info.size
            elif info.isdir() or info.issym():
                tar.addfile(info)
    entries = files  # directories and symlinks come on top
    with tarfile.open(path) as tar:
        entries = len(tar.getmembers())
    return {"files": files, "entries": entries, "bytes": total}


def warm(path: Path) -> None:
    """Read a file so that it is in the page cache (the tarball before an extract)."""
    with open(path, "rb") as f:
        while f.read(4 * MiB):
            pass


def timed(argv: Sequence[str], timeout: float, **kwargs: Any) -> tuple[float, bytes]:
    start = time.perf_counter()
    result = run(argv, timeout, **kwargs)
    return time.perf_counter() - start, result.stdout


def extract(tarball: Path, dest: Path, timeout: float) -> dict[str, float]:
    """`tar xf` into a new directory `dest` (as root, owners and modes are
    kept); seconds, without a final sync."""
    call_with_timeout(dest.mkdir, timeout)
    seconds, _ = timed(["tar", "xf", str(tarball), "-C", str(dest)], timeout)
    return {"seconds": seconds}


def count_entries(tree: Path, timeout: float) -> dict[str, float]:
    """`find TREE | wc -l`; seconds and the count."""
    start = time.perf_counter()
    find = subprocess.Popen(["find", str(tree)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, _ = find.communicate(timeout=timeout)
    except BaseException as e:
        stop_child(find)
        if isinstance(e, subprocess.TimeoutExpired):
            raise WorkloadTimeout(f"find took more than {timeout:.0f} s") from None
        raise
    if find.returncode != 0:
        raise WorkloadFailed(f"find exited with {find.returncode}")
    return {"seconds": time.perf_counter() - start, "entries": out.count(b"\n")}


def read_back(tree: Path, timeout: float) -> dict[str, object]:
    """`tar c | sha256sum` of the tree (names sorted, so every filesystem that
    kept names, contents, modes, owners and mtimes gives the same hash)."""
    start = time.perf_counter()
    # The top-level names rather than ".": the tree's own mtime differs.
    names = sorted(call_with_timeout(lambda: os.listdir(tree), timeout))
    tar = subprocess.Popen(
        ["tar", "c", "--sort=name", "-C", str(tree), "--", *names],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None and tar.stderr is not None
    # tar blocked in a hung filesystem never reaches a check of ours: a timer
    # kills it (FUSE requests are killable), which ends the pipe.
    watchdog = threading.Timer(timeout, tar.kill)
    watchdog.start()
    digest, total = hashlib.sha256(), 0
    try:
        # sha256 in this process costs what `| sha256sum` would.
        while chunk := tar.stdout.read(MiB):
            digest.update(chunk)
            total += len(chunk)
        err = tar.stderr.read()
        tar.wait(timeout)
    finally:
        watchdog.cancel()
        tar.stdout.close()
        tar.stderr.close()
        if tar.poll() is None:
            stop_child(tar)
    seconds = time.perf_counter() - start
    if seconds >= timeout and tar.returncode != 0:
        raise WorkloadTimeout(f"tar c took more than {timeout:.0f} s")
    if tar.returncode != 0:
        msg = err.decode(errors="replace")[-2000:]
        raise WorkloadFailed(f"tar c exited with {tar.returncode}: {msg}")
    return {"seconds": seconds, "sha256": digest.hexdigest(), "bytes": total}


def remove_tree(tree: Path, timeout: float) -> dict[str, float]:
    """`rm -rf TREE`; seconds."""
    seconds, _ = timed(["rm", "-rf", str(tree)], timeout)
    return {"seconds": seconds}


def have_command(name: str) -> bool:
    return shutil.which(name) is not None


# --- small overwrites with fsync (issue 14) ---------------------------------------


def rand_write_fsync(directory: Path, size: int, seconds: float, timeout: float) -> dict[str, float]:
    """4 KiB random overwrites, each followed by fsync (fio randwrite
    --fsync=1, queue depth 1), over the file seq_write left, for `seconds`."""
    job = fio(
        "randwrite", directory / "seq.dat", timeout,
        rw="randwrite", bs="4k", size=size, fsync=1, time_based=1, runtime=f"{seconds}s",
        overwrite=1,
    )  # fmt: skip
    write = job["write"]
    percentiles = write["clat_ns"].get("percentile", {})
    return {
        "iops": write["iops"],
        "writes": write["total_ios"],
        "p50_us": percentiles.get("50.000000", 0) / 1000,
        "bytes": write["io_bytes"],
    }


#: The SQLite workload, run in a child Python (so that it can be timed out):
#: argv = database path, journal mode, transactions, rows per transaction.
SQLITE_SCRIPT = r"""
import sqlite3, sys, time
path, mode, txns, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.monotonic()
db = sqlite3.connect(path, isolation_level=None)
db.execute(f"PRAGMA journal_mode={mode}")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
for t in range(txns):
    db.execute("BEGIN")
    db.executemany("INSERT INTO t (a, b) VALUES (?, ?)",
                   [(t * rows + i, f"row {t} {i} " + "x" * 100) for i in range(rows)])
    db.execute("COMMIT")
step = txns * rows // 100
for t in range(100):  # 100 update transactions of 100 rows spread over the table
    db.execute("BEGIN")
    db.executemany("UPDATE t SET b = b || 'u' WHERE id = ?",
                   [(1 + (t + i * 100) * step // 100,) for i in range(100)])
    db.execute("COMMIT")
for t in range(100):  # 100 delete transactions of 100 rows
    db.execute("BEGIN")
    db.executemany("DELETE FROM t WHERE id = ?",
                   [(1 + (t + i * 100) * step // 100 + 1,) for i in range(100)])
    db.execute("COMMIT")
check = db.execute("PRAGMA integrity_check").fetchone()[0]
db.close()
print(time.monotonic() - t0, check)
"""


def sqlite_workload(
    directory: Path, mode: str, txns: int, rows: int, timeout: float
) -> dict[str, object]:
    """A SQLite database built with `txns` transactions of `rows` rows, then
    100 transactions updating and 100 deleting 100 rows each (by primary
    key, spread over the table), in journal mode `mode`; seconds, and
    PRAGMA integrity_check's answer."""
    path = directory / f"bench-{mode}.sqlite"
    for suffix in ("", "-wal", "-shm", "-journal"):
        call_with_timeout(lambda s=suffix: Path(f"{path}{s}").unlink(missing_ok=True), timeout)
    result = run([sys.executable, "-c", SQLITE_SCRIPT, str(path), mode, str(txns), str(rows)],
                 timeout)  # fmt: skip
    seconds, check = result.stdout.decode().split(maxsplit=1)
    return {"seconds": float(seconds), "integrity": check.strip()}


def disk_sectors_written(path: Path) -> int:
    """Sectors (512 B) written so far to the block device holding `path`
    (/proc/diskstats; counts every writer of that disk)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return int(fields[9])
    return 0


def process_write_bytes(pid: int | None) -> int:
    """Bytes process `pid` caused to be written to storage (/proc/pid/io
    write_bytes: its own writes and the page-cache pages it dirtied)."""
    if pid is None:
        return 0
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0
