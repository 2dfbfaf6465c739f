"""`ecfs iostat`: the rates between two iostat snapshots (pure), the
snapshot's JSON round trip, and the real command on a real mount: in JSON
while files are written and read, and in a real terminal (tmux) where the
table shows, a failed store stands out in red and Ctrl-C ends it cleanly."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from ecfs.data.reader import ReadStatistics
from ecfs.data.smallwrites import WriteLogStatistics
from ecfs.data.writer import WriteStatistics
from ecfs.frontend.iostat import rates, rates_to_json, render_rates, watch
from ecfs.storage.fakestores import MemoryStore
from ecfs.storage.offload import LATENCY_BUCKETS, StoreRunner, StoreStatistics
from ecfs.volume.status import (
    IoStatus,
    RepairActivity,
    StatusFormatError,
    StoreIo,
    iostat_from_json,
    iostat_to_json,
)
from tests.mounting import REPO_ROOT, MountedVolume, _cli_env, mounted_volume
from tests.volume_files import MiB, drop_caches, write_pattern_file

# -- pure: rates and rendering -------------------------------------------------------


def store_io(index: int, **changes: object) -> StoreIo:
    store = StoreIo(
        index=index, path=f"/srv/d{index}", state="ok", reason=None, in_flight=0, waiting=0,
        read_ops=0, write_ops=0, bytes_read=0, bytes_written=0, errors=0, timeouts=0,
        latency_p50_ms=0.5, latency_p99_ms=2.0,
    )  # fmt: skip
    return dataclasses.replace(store, **changes)  # type: ignore[arg-type]


def snapshot(seconds: float, stores: tuple[StoreIo, ...], **changes: object) -> IoStatus:
    record = IoStatus(
        volume="ab" * 16, time_ns=1_700_000_000 * 10**9 + int(seconds * 1e9),
        monotonic_ns=int(seconds * 1e9), stores=stores,
        reads=ReadStatistics(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        writes=WriteStatistics(0, 0),
        write_log=WriteLogStatistics(0, 0, 0, 0, 0, 0, 0, 1 << 20, 0, 0, 0, 0, 0),
        repair=RepairActivity(False, False, 0, 0, 0, 0),
    )  # fmt: skip
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def test_rates_are_deltas_over_the_daemons_clock() -> None:
    before = snapshot(10.0, (store_io(0, bytes_read=MiB, read_ops=10, errors=1), store_io(1)))
    after = snapshot(
        12.0,
        (
            store_io(0, bytes_read=5 * MiB, read_ops=50, bytes_written=2 * MiB, write_ops=4,
                     errors=3, in_flight=2, waiting=1),
            store_io(1, state="failed", reason="gone", timeouts=1),
            store_io(2, bytes_read=MiB),  # added in between: counted from zero
        ),
        reads=ReadStatistics(4 * MiB, 0, 6, 0, 0, 0, 2, 0, 0, 0, routed_reads=8),
        writes=WriteStatistics(2 * MiB, 3 * MiB),
        write_log=WriteLogStatistics(3, 300, 1, 10, 1000, 2, 0, 1 << 20, 0, 0, 0, 0, 0),
        repair=RepairActivity(True, False, 4, 6, 0, 3 * MiB),
    )  # fmt: skip
    found = rates(before, after)
    assert found.interval_s == 2.0
    s0, s1, s2 = found.stores
    assert (s0.read_bytes_per_s, s0.read_iops, s0.write_bytes_per_s, s0.write_iops) == (
        2 * MiB, 20.0, MiB, 2.0
    )
    assert (s0.errors, s0.in_flight, s0.waiting) == (2, 2, 1)
    assert (s1.state, s1.reason, s1.timeouts) == ("failed", "gone", 1)
    assert s2.read_bytes_per_s == MiB / 2
    t = found.totals
    assert (t.read_bytes_per_s, t.write_bytes_per_s) == (2 * MiB, MiB)
    assert (t.degraded_reads_per_s, t.hedged_reads_per_s, t.routed_reads_per_s) == (3, 1, 4)
    assert (t.repair_busy, t.repair_chunks_per_s, t.repair_bytes_per_s) == (True, 2, 1.5 * MiB)
    assert (t.log_records_per_s, t.log_bytes_per_s, t.log_folds_per_s) == (5, 500, 1)
    assert (t.log_pending_records, t.log_pending_bytes) == (3, 300)
    document = json.loads(json.dumps(rates_to_json(found)))
    assert document["stores"][0]["read_bytes_per_s"] == 2 * MiB
    assert document["totals"]["routed_reads_per_s"] == 4
    # The daemon restarted between two snapshots: counters start from zero.
    again = rates(after, snapshot(13.0, (store_io(0, bytes_read=MiB),)))
    assert again.stores[0].read_bytes_per_s == MiB


def test_a_lagging_store_stands_out() -> None:
    stores = tuple(store_io(i, latency_p99_ms=2.0) for i in range(5))
    lagging = (*stores, store_io(5, latency_p99_ms=80.0))
    found = rates(snapshot(0, lagging), snapshot(1, lagging))
    assert [s.latency_outlier for s in found.stores] == [False] * 5 + [True]
    calm = rates(snapshot(0, stores), snapshot(1, stores))
    assert not any(s.latency_outlier for s in calm.stores)


def test_the_table_text() -> None:
    before = snapshot(0, (store_io(0), store_io(1)))
    after = snapshot(1, (store_io(0, bytes_read=3 * MiB, read_ops=24),
                         store_io(1, state="failed", reason="[gone]", errors=2)))  # fmt: skip
    out = io.StringIO()
    from rich.console import Console

    Console(file=out, width=200, color_system=None, markup=False).print(render_rates(rates(before, after)))
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.split()[:2] == ["store", "state"])
    assert "read MiB/s" in header and "p99 ms" in header and header.split()[-1] == "path"
    row0 = next(line for line in lines if line.split()[:1] == ["0"])
    assert row0.split()[:6] == ["0", "ok", "3.0", "0.0", "24", "0"]
    row1 = next(line for line in lines if line.split()[:1] == ["1"])
    assert row1.split()[1] == "failed" and row1.rstrip().endswith("/srv/d1  ([gone])")
    assert any(line.startswith("reads/s: degraded 0") for line in lines)
    assert any(line.startswith("small-write log: 0 records/s") for line in lines)


def test_the_iostat_snapshot_survives_the_json_round_trip() -> None:
    record = snapshot(1.0, (store_io(0, reason="x"), store_io(1)))
    assert iostat_from_json(json.loads(json.dumps(iostat_to_json(record)))) == record
    document = iostat_to_json(record)
    del document["stores"][1]["read_ops"]
    with pytest.raises(StatusFormatError, match=r"iostat\.stores\[1\]\.read_ops is missing"):
        iostat_from_json(document)


def test_watch_prints_one_json_object_per_interval() -> None:
    snapshots = iter(snapshot(float(i), (store_io(0, bytes_read=i * MiB),)) for i in range(4))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "sleep", lambda seconds: None)
        watch(lambda: next(snapshots), 1.0, 3, as_json=True, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["stores"][0]["read_bytes_per_s"] for line in lines] == [MiB] * 3


# -- the counters behind it ------------------------------------------------------------


def test_a_runner_counts_operations_and_buckets_latencies(tmp_path: Path) -> None:
    store = MemoryStore()

    async def main() -> StoreStatistics:
        runner = StoreRunner(0, store, clock=lambda: 0.0)  # every call takes 0 s
        await runner.call(lambda: b"x", nbytes_read=4096)
        await runner.call(lambda: None, nbytes_written=8192)
        await runner.call(lambda: None)  # moved no bytes (a probe): no I/O operation
        runner.record_loop_read(100)  # a page cache hit served on the loop
        for seconds in (0.0001, 0.003, 0.003, 60.0):
            runner.record_latency(seconds)
        return runner.statistics()

    stats = trio.run(main)
    assert (stats.read_ops, stats.write_ops) == (2, 1)
    assert (stats.bytes_read, stats.bytes_written) == (4196, 8192)
    histogram = stats.latency_histogram
    assert len(histogram) == len(LATENCY_BUCKETS) + 1
    assert histogram[0] == 3 + 1  # the calls, and 0.1 ms (a bound is inclusive)
    assert histogram[LATENCY_BUCKETS.index(0.005)] == 2
    assert histogram[-1] == 1  # above the last bound
    assert sum(histogram) == 7
    assert stats.latency_sum == pytest.approx(60.0061)


# -- a real mount ------------------------------------------------------------------


def start_iostat(mountpoint: Path, *options: str, interval: str = "1") -> subprocess.Popen[str]:
    """`ecfs iostat` with SIGINT at its default disposition, as in a
    terminal: a suite started in the background by a non-interactive shell
    (`.ci/run &`) has SIGINT ignored, and a Python started so keeps
    ignoring it (the Ctrl-C test below then waited 60 s for nothing)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ecfs", "iostat", *options, os.fspath(mountpoint), interval],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(),
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


@contextmanager
def busy(mountpoint: Path, size: int = 6 * MiB) -> Iterator[None]:
    """Write and read files on the mount until the block ends (reads go
    to the stores: the page cache is dropped, the daemon's caches are
    missed by reading files written before it last dropped them)."""
    stop = threading.Event()
    write_pattern_file(mountpoint / "old", 1, size)
    drop_caches()

    def run() -> None:
        n = 0
        while not stop.is_set():
            write_pattern_file(mountpoint / f"new{n % 2}", n, size // 4)
            with open(mountpoint / "old", "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while f.read(MiB):
                    pass
            n += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def test_iostat_json_on_a_busy_mount(volume: MountedVolume) -> None:
    with busy(volume.mountpoint):
        proc = start_iostat(volume.mountpoint, "--json", "--count", "4", interval="0.5")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    documents = [json.loads(line) for line in out.splitlines()]
    assert len(documents) == 4
    for document in documents:
        assert 0.3 < document["interval_s"] < 5
        assert [s["index"] for s in document["stores"]] == list(range(6))
        assert all(s["state"] in ("ok", "slow") for s in document["stores"])  # slow: a busy CPU
    stores = [s for d in documents for s in d["stores"]]
    read = {s["index"] for s in stores if s["read_bytes_per_s"] > 0 and s["read_iops"] > 0}
    written = {s["index"] for s in stores if s["write_bytes_per_s"] > 0 and s["write_iops"] > 0}
    assert len(read) >= 4  # k data fragments of every chunk
    assert written == set(range(6))
    assert any(s["latency_p99_ms"] > 0 for s in stores)
    assert any(d["totals"]["read_bytes_per_s"] > 0 for d in documents)
    assert any(d["totals"]["write_bytes_per_s"] > 0 for d in documents)
    # Ctrl-C (SIGINT) ends it quietly with exit status 0, whatever it was doing.
    proc = start_iostat(volume.mountpoint, "--json", interval="0.2")
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never left running (its pipes leak into later tests)
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (0, "")


def test_iostat_refuses_a_plain_directory(tmp_path: Path) -> None:
    proc = start_iostat(tmp_path, "--count", "1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "not a mounted ecfs volume" in err


# -- a real terminal -------------------------------------------------------------------

requires_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux (scripts/install.sh)")


def tmux(socket: Path, *args: str, check: bool = True) -> str:
    """Run a tmux command on the test's own server (its socket under the
    test's directory: never the user's server, whose clients' size would
    win, and nothing left in /tmp)."""
    argv = ["tmux", "-S", os.fspath(socket), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def wait_for_pane(socket: Path, session: str, predicate, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux(socket, "capture-pane", "-p", "-t", session)
        if predicate(screen) or time.monotonic() > deadline:
            return screen
        time.sleep(0.1)


@requires_tmux
@pytest.mark.mount
def test_iostat_in_a_terminal(tmp_path: Path) -> None:
    """The live table under tmux: it shows the stores, a store renamed away
    turns red once the mount finds it failed, and Ctrl-C exits with status 0
    and no traceback."""
    session = "iostat"
    socket = tmp_path / "tmux.sock"
    env = " ".join(f"{k}={v}" for k, v in _cli_env().items() if k in ("PYTHONPATH", "PATH"))
    with mounted_volume(tmp_path) as vol:
        command = (
            f"cd {REPO_ROOT} && env {env} {sys.executable} -m ecfs iostat {vol.mountpoint} 0.5;"
            " echo iostat-exit=$?; sleep 60"
        )
        away = vol.stores[5].with_name("s5-away")
        try:
            tmux(socket, "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command)
            with busy(vol.mountpoint, size=2 * MiB):
                screen = wait_for_pane(socket, session, lambda s: "read MiB/s" in s and "reads/s:" in s)
                assert "read MiB/s" in screen, screen
                rows = [line.split() for line in screen.splitlines()]
                assert [r[0] for r in rows if r and r[0].isdigit()][:6] == [str(i) for i in range(6)]
                os.rename(vol.stores[5], away)
                screen = wait_for_pane(socket, session, lambda s: _row(s, 5)[:2] == ["5", "failed"], 60)
                assert _row(screen, 5)[:2] == ["5", "failed"], screen
            coloured = tmux(socket, "capture-pane", "-p", "-e", "-t", session)
            lines = {_plain(line).split()[0]: line for line in coloured.splitlines() if _plain(line).split()[:1]}
            assert re.search(r"\x1b\[[0-9;]*31[;m][^\x1b]*failed", lines["5"]), repr(lines["5"])
            assert "failed" not in _plain(lines["0"]) and not re.search(r"\x1b\[[0-9;]*31[;m]", lines["0"])
            tmux(socket, "send-keys", "-t", session, "C-c")
            screen = wait_for_pane(socket, session, lambda s: "iostat-exit=" in s)
            assert "iostat-exit=0" in screen, screen
            assert "Traceback" not in screen and "Aborted" not in screen
        finally:
            tmux(socket, "kill-session", "-t", session, check=False)
            tmux(socket, "kill-server", check=False)
            if away.exists():
                os.rename(away, vol.stores[5])


def _plain(line: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", line)


def _row(screen: str, index: int) -> list[str]:
    for line in screen.splitlines():
        words = line.split()
        if words[:1] == [str(index)]:
            return words
    return []
