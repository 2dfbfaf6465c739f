#!/usr/bin/env python3
"""Benchmark: rebuilding a replaced store, and what it costs foreground reads.

    python scripts/bench_repair.py [--store-gib 1] [--out DIR]

One run, on this machine's disk, under a temp dir:
1. mkfs a 6-store k=4 m=2 volume and write files until one store holds
   about --store-gib GiB of fragments;
2. baseline: random 4 KiB reads (O_DIRECT-like: page cache dropped) from
   the files, p50/p99 latency, on the healthy volume;
3. kill a disk: unmount, delete one store, mount the five others,
   `ecfs store replace` it with an empty directory; repair runs in its
   normal (yielding) mode: the same random reads again while it rebuilds;
4. `ecfs repair --wait` (urgent): the rebuild rate in MB/s of fragment
   bytes written to the new store, and bytes read per byte rebuilt.
Prints a table and writes JSON to --out. Cleans up every mount.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ecfs.core import host  # noqa: E402
from ecfs.frontend.client import MountClient  # noqa: E402

MiB = 1 << 20


def ecfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ecfs", *args], check=True, cwd=REPO)


def drop_caches() -> None:
    if not host.drop_caches():
        raise SystemExit("bench_repair: cannot drop caches (run as root)")


def random_reads(files: list[Path], count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    latencies = []
    fds = [os.open(f, os.O_RDONLY) for f in files]
    sizes = [os.fstat(fd).st_size for fd in fds]
    try:
        for _ in range(count):
            i = rng.randrange(len(fds))
            offset = rng.randrange(0, sizes[i] - 4096) & ~4095
            os.posix_fadvise(fds[i], offset, 4096, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            os.pread(fds[i], 4096, offset)
            latencies.append(time.perf_counter() - start)
    finally:
        for fd in fds:
            os.close(fd)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
        "reads": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store-gib", type=float, default=1.0)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ecfs-bench-repair-"))
    stores = [base / f"s{i}" for i in range(6)]
    mnt = base / "mnt"
    mnt.mkdir()
    result: dict[str, object] = {}
    try:
        ecfs("mkfs", "--allow-shared-domains", *map(str, stores))
        ecfs("mount", "--log-file", str(base / "ecfs.log"), *map(str, stores), str(mnt))
        file_bytes = int(args.store_gib * (1 << 30) * 4)  # a store holds 1/4 of file bytes
        files = []
        block = os.urandom(MiB)
        per_file = 256 * MiB
        for n in range(max(1, file_bytes // per_file)):
            path = mnt / f"data{n}"
            with open(path, "wb") as f:
                for _ in range(per_file // MiB):
                    f.write(block[: -n - 1] + bytes([n % 256]))  # distinct content per file
            files.append(path)
        ecfs("umount", str(mnt))
        ecfs("mount", "--log-file", str(base / "ecfs.log"), *map(str, stores), str(mnt))
        drop_caches()
        result["healthy"] = summary(random_reads(files, args.reads, 1))

        ecfs("umount", str(mnt))
        shutil.rmtree(stores[3])
        survivors = [s for i, s in enumerate(stores) if i != 3]
        ecfs("mount", "--log-file", str(base / "ecfs.log"), *map(str, survivors), str(mnt))
        new = base / "new-disk"
        ecfs("store", "replace", str(mnt), str(stores[3]), str(new))
        client = MountClient(str(mnt))
        drop_caches()
        result["during_repair"] = summary(random_reads(files, args.reads, 2))
        before = client.status().repair
        result["repaired_during_reads_bytes"] = before.bytes_written
        start = time.monotonic()
        ecfs("repair", "--wait", str(mnt))
        elapsed = time.monotonic() - start
        after = client.status().repair
        rebuilt = after.bytes_written - before.bytes_written
        read = after.bytes_read - before.bytes_read
        result["rebuild"] = {
            "seconds": round(elapsed, 2),
            "bytes_rebuilt": rebuilt,
            "rate_mb_s": round(rebuilt / elapsed / 1e6, 1) if elapsed else None,
            "bytes_read_per_byte_rebuilt": round(read / rebuilt, 2) if rebuilt else None,
            "fragments_rebuilt": after.fragments_rebuilt,
        }
        drop_caches()
        result["after_repair"] = summary(random_reads(files, args.reads, 3))
        ecfs("umount", str(mnt))
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repair.json").write_text(json.dumps(result, indent=2))
    healthy, during = result["healthy"], result["during_repair"]
    print(f"4 KiB random read healthy:      p50 {healthy['p50_ms']} ms  p99 {healthy['p99_ms']} ms")  # type: ignore[index]
    print(f"4 KiB random read during repair: p50 {during['p50_ms']} ms  p99 {during['p99_ms']} ms")  # type: ignore[index]
    print(f"rebuild (urgent): {json.dumps(result['rebuild'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
