#!/usr/bin/env python3
"""Benchmark: restripe of a 1 GiB tree, killed midway and resumed.

    python scripts/bench_restripe.py [--gib 1] [--out DIR]

One run, on this machine's disk, under a temp dir:
1. mkfs a 6-store k=4 m=2 volume (mkfs defaults otherwise), write a tree
   of --gib GiB (64 MiB files in a few directories), unmount, remount;
2. `ecfs policy set TREE 2+2`, `ecfs restripe TREE`; a sampler thread
   sums the fragment bytes on the stores every 0.1 s;
3. once about 40% is converted, kill -9 the daemon, clean the dead
   mount, mount again: the restripe resumes from its persistent cursor;
   (`ecfs fsck` right after the kill must already be clean: what the kill
   left is remembered by the volume, warnings only);
4. wait for the end; unmount; `ecfs fsck --verify-data` (no --repair)
   must be clean and find no orphan fragment: the remount deleted them.
Prints the restripe throughput (file MiB/s converted, over the time the
restripe ran, downtime excluded) and the peak extra space: the largest
sampled fragment bytes above max(before, after) (what the kill left
counts until the remount deletes it). Writes JSON to --out. Cleans up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ecfs.frontend.client import MountClient  # noqa: E402

MiB = 1 << 20


def ecfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecfs", *args], check=check, cwd=REPO, text=True,
        capture_output=True,
    )  # fmt: skip


def fragment_bytes(stores: list[Path]) -> int:
    total = 0
    for store in stores:
        for dirpath, _, names in os.walk(store / "frags"):
            for name in names:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


class Sampler(threading.Thread):
    """Every 0.1 s: the fragment bytes on the stores (`peak`), and while
    the daemon answers, the extra space over what the progress accounts
    for: bytes - (before + (after - before) x bytes_done / bytes_total),
    the conversion's own footprint (`peak_live`, before the kill only:
    after it the kill's orphans would count)."""

    def __init__(self, stores: list[Path], mnt: Path, before: int, after: int) -> None:
        super().__init__(daemon=True)
        self.stores = stores
        self.client = MountClient(str(mnt), timeout=5.0)
        self.before = before
        self.after = after
        self.peak = 0
        self.peak_live = 0
        self.live = True
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            done = total = None
            if self.live:
                try:
                    r = self.client.status().restripe
                    if r is not None and r.bytes_total:
                        done, total = r.bytes_done, r.bytes_total
                except Exception:  # killed, remounting
                    pass
            found = fragment_bytes(self.stores)
            self.peak = max(self.peak, found)
            if done is not None and total and self.live:
                expected = self.before + (self.after - self.before) * done / total
                self.peak_live = max(self.peak_live, int(found - expected))
            time.sleep(0.1)


def wait_restripe(client: MountClient, until: float | None) -> tuple[int, float]:
    """Poll until `until` of the bytes are done (None: until the end);
    returns (bytes_done now, seconds waited)."""
    start = time.monotonic()
    while True:
        r = client.status().restripe
        assert r is not None
        if until is None and not r.roots:
            return 0, time.monotonic() - start
        if until is not None and r.bytes_total and r.bytes_done >= until * r.bytes_total:
            return r.bytes_done, time.monotonic() - start
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ecfs-bench-restripe-"))
    stores = [base / f"s{i}" for i in range(6)]
    mnt = base / "mnt"
    mnt.mkdir()
    log = base / "ecfs.log"
    result: dict[str, object] = {}
    sampler: Sampler | None = None
    try:
        ecfs("mkfs", "--allow-shared-domains", *map(str, stores))  # one disk here
        ecfs("mount", "--log-file", str(log), *map(str, stores), str(mnt))
        tree = mnt / "tree"
        total = int(args.gib * (1 << 30))
        per_file = 64 * MiB
        block = os.urandom(MiB)
        for n in range(max(1, total // per_file)):
            d = tree / f"d{n % 4}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"f{n}", "wb") as f:
                for i in range(per_file // MiB):
                    f.write(block[: -1] + bytes([(n + i) % 256]))
        ecfs("umount", str(mnt))
        before = fragment_bytes(stores)
        ecfs("mount", "--log-file", str(log), *map(str, stores), str(mnt))
        client = MountClient(str(mnt))
        ecfs("policy", "set", str(tree), "2+2")
        # 4+2 stores 6 quarter-chunk fragments per chunk, 2+2 four halves:
        # the end state is 4/3 of the start (headers scale alike).
        sampler = Sampler(stores, mnt, before, before * 4 // 3)
        sampler.peak = before
        sampler.start()
        ecfs("restripe", str(tree))
        done_1, seconds_1 = wait_restripe(client, 0.4)
        sampler.live = False
        os.kill(client.pid(), signal.SIGKILL)
        time.sleep(0.5)
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        killed = ecfs("fsck", *map(str, stores), check=False)
        ecfs("mount", "--log-file", str(log), *map(str, stores), str(mnt))
        resumed = client.status().restripe
        assert resumed is not None and resumed.roots == 1, "the restripe did not resume"
        done_at_resume = resumed.bytes_done
        _, seconds_2 = wait_restripe(client, None)
        ecfs("umount", str(mnt))
        sampler.stop.set()
        sampler.join()
        check = ecfs("fsck", "--verify-data", *map(str, stores), check=False)
        orphans = "no_orphan_fragments" in check.stdout + check.stderr
        after = fragment_bytes(stores)
        converted = total + (done_1 - done_at_resume)  # chunks lost by the kill ran twice
        result = {
            "tree_bytes": total,
            "fragment_bytes_before": before,
            "fragment_bytes_after": after,
            "peak_fragment_bytes": sampler.peak,
            "peak_extra_bytes": sampler.peak - max(before, after),
            "peak_extra_live_bytes_before_kill": sampler.peak_live,
            "killed_at_bytes_done": done_1,
            "bytes_done_after_remount": done_at_resume,
            "seconds_before_kill": round(seconds_1, 2),
            "seconds_after_remount": round(seconds_2, 2),
            "throughput_mib_s": round(converted / (seconds_1 + seconds_2) / MiB, 1),
            "fsck_after_kill_clean": killed.returncode == 0,
            "fsck_clean": check.returncode == 0 and not orphans,
        }
        for run in (killed, check):
            if run.returncode != 0 or run is check and orphans:
                print(run.stdout, run.stderr)
    finally:
        if sampler is not None:
            sampler.stop.set()
        if os.path.ismount(mnt):
            subprocess.run([sys.executable, "-m", "ecfs", "umount", str(mnt)], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restripe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"restripe 4+2 -> 2+2 of {total / MiB:.0f} MiB: {result['throughput_mib_s']} MiB/s;"
        f" peak extra space {int(result['peak_extra_bytes']) / MiB:.1f} MiB"  # type: ignore[call-overload]
        f" (what the kill left included; before the kill, over the progress:"
        f" {int(result['peak_extra_live_bytes_before_kill']) / MiB:.1f} MiB)"  # type: ignore[call-overload]
        f"; fsck clean: {result['fsck_clean']}"
    )
    return 0 if result["fsck_clean"] and result["fsck_after_kill_clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
