#!/usr/bin/env python3
"""The CPU one rebuilt fragment costs, in-process (issue 17's rebuild row).

Makes a 4+2 volume of 1 MiB fragments over six directory stores in a temp
directory (tmpfs by default: the disks do not bind, the CPU does), opens
it as the mount does (`Volume.open`, metadata replicas on three stores,
every background task), writes a file of --size MiB, wipes one store and
queues its rebuild as `ecfs store replace` does ("store-replaced"), then
runs the repair urgent at full speed (no foreground) and prints the
process's CPU time (every thread, and the event loop's thread) and the
wall time per rebuilt fragment, and the SQLite transactions per chunk,
for each of --rounds rebuilds. With --profile FILE, the repair
of the last round under cProfile (the event loop's thread only),
sorted by cumulative time, to FILE; with --pyspy FILE, `py-spy record`
(every thread, raw collapsed stacks) of it to FILE; with --perf FILE,
`perf record -g` of it (native frames: copies, page faults, zfec, SQLite).

    .venv/bin/python scripts/profile_rebuild.py --size 512
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ecfs.storage.metadb.chunks import RepairQueue  # noqa: E402
from ecfs.storage.metadb.schema import ROOT_INODE  # noqa: E402
from ecfs.volume.assembly import Volume  # noqa: E402
from ecfs.volume.mkfs import VolumeSpec, create_volume  # noqa: E402

MiB = 1 << 20


async def rebuild_once(volume: Volume, args: argparse.Namespace, *, last: bool) -> None:
    """Wipe store 0 as a new empty one would be, queue its rebuild, rebuild
    it at full speed and print the figures."""
    repairer = volume.repairer
    replaced = 0
    store = volume.stores[replaced]
    fragments = await trio.to_thread.run_sync(lambda: list(store.list_fragments()))
    for chunk_id, index in fragments:
        await trio.to_thread.run_sync(store.delete_fragment, chunk_id, index)
    profiler = cProfile.Profile() if args.profile and last else None
    spy = None
    if (args.pyspy or args.perf) and last:
        if args.pyspy:
            pyspy = Path(sys.executable).parent / "py-spy"
            command = [str(pyspy), "record", "--threads", "--format", "raw", "--rate", "500",
                       "--pid", str(os.getpid()), "-o", str(args.pyspy)]  # fmt: skip
        else:
            command = ["perf", "record", "-g", "-F", "2000", "-p", str(os.getpid()),
                       "-o", str(args.perf)]  # fmt: skip
        spy = _start(command)
        await trio.sleep(1.0)
    volume.handles.close_all()
    queued = repairer.queue_store_rebuild(replaced, "store-replaced")
    generation0 = volume.db.generation
    counters0 = repairer.counters.fragments_rebuilt
    cpu0, loop0, wall0 = time.process_time(), time.thread_time(), time.monotonic()
    if profiler is not None:
        profiler.enable()
    repairer.set_urgent(True)
    while repairer.busy or RepairQueue(volume.db).count():  # noqa: ASYNC110
        await trio.sleep(0.01)
    if profiler is not None:
        profiler.disable()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    loop = time.thread_time() - loop0  # the event loop's thread
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its file
        await trio.to_thread.run_sync(spy.wait)
    rebuilt = repairer.counters.fragments_rebuilt - counters0
    one_call = getattr(repairer.counters, "one_call_reads", None)  # (newer trees)
    transactions = volume.db.generation - generation0
    print(
        f"{queued} chunks queued, {rebuilt} fragments rebuilt in {wall:.2f} s"
        f" ({rebuilt / wall:.1f} MiB/s): CPU {cpu * 1000 / rebuilt:.2f} ms per fragment"
        f" (loop thread {loop * 1000 / rebuilt:.2f}), wall {wall * 1000 / rebuilt:.2f} ms;"
        f" {transactions} transactions ({transactions / max(1, rebuilt):.2f} per fragment)"
        + (f"; sources read in one call (since the start): {one_call}" if one_call is not None else "")
    )
    if profiler is not None:
        _write_profile(profiler, args.profile)


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    with open(path, "w") as out:
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(80)
        stats.sort_stats("tottime").print_stats(60)


async def run(args: argparse.Namespace, base: Path) -> None:
    paths = [base / f"store{i}" for i in range(6)]
    create_volume(paths, VolumeSpec(k=4, m=2), domains={str(p): f"dev{i}" for i, p in enumerate(paths)})
    volume = Volume.open([str(p) for p in paths], runtime_dir=base)
    async with trio.open_nursery() as nursery:
        await volume.start(nursery)
        repairer = volume.repairer
        repairer.last_foreground = lambda: 0.0  # no foreground: full speed
        inode = volume.namespace.create(ROOT_INODE, b"data", 0o100644, os.getuid(), os.getgid())
        block = os.urandom(4 * MiB)
        for offset in range(0, args.size * MiB, len(block)):
            await volume.filedata.write(inode.id, offset, block)
        await volume.filedata.flush(inode.id)
        await trio.sleep(0.5)
        for round_ in range(args.rounds):
            await rebuild_once(volume, args, last=round_ == args.rounds - 1)
        repairer.set_urgent(False)
        await volume.shutdown()
        nursery.cancel_scope.cancel()
    volume.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="file MiB (default 512)")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where the stores go")
    parser.add_argument("--rounds", type=int, default=3, help="rebuilds, one after another")
    parser.add_argument("--profile", type=Path, help="cProfile output file (of the last round)")
    parser.add_argument("--pyspy", type=Path, help="py-spy output file (the last round)")
    parser.add_argument("--perf", type=Path, help="`perf record -g` output file (the last round)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ecfs-profile-rebuild-", dir=args.dir))
    try:
        trio.run(run, args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
