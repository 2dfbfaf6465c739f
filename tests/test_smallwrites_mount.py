"""The small-write log on a real mount (ecfs.data.smallwrites): fsync'd 4 KiB
overwrites are logged (the status shows records, then folds), survive
kill -9 of the daemon at random points, read back right after a remount
and after the folds, and leave a clean fsck; SQLite on the mount passes
its integrity check."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import MountedVolume, mounted_volume
from tests.test_crash import ALLOWED_AFTER_KILL, fsck
from tests.volume_files import fsynced_overwrites

BLOCK = 4096


def status(volume: MountedVolume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[MountedVolume]:
    with mounted_volume(tmp_path) as volume:
        yield volume


def test_fsynced_small_writes_are_logged_and_folded(vol: MountedVolume) -> None:
    path = vol.mountpoint / "f"
    size = 3 << 20
    expected = bytearray(os.urandom(size))
    path.write_bytes(expected)
    before = status(vol)
    fsynced_overwrites(path, expected, count=200, block=BLOCK, seed=1)
    after = status(vol)
    log = after["write_log"]
    assert log["records_written"] >= 200
    # Kilobytes per fsync'd write, not a chunk: 200 writes re-encoding even
    # a small test chunk each time would write far more fragment bytes.
    assert after["writes"]["bytes_out"] - before["writes"]["bytes_out"] < 200 * BLOCK
    assert path.read_bytes() == expected
    deadline = time.monotonic() + 60
    while status(vol)["write_log"]["records"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the idle fold
    final = status(vol)["write_log"]
    assert final["records"] == 0 and final["folds"] >= 1
    vol.remount()
    assert path.read_bytes() == expected


def overwrite(
    path: Path,
    size: int,
    seed: int,
    stop: threading.Event,
    acked: bytearray,
    in_flight: dict[int, bytes],
) -> None:
    """4 KiB overwrites + fsync until `stop` or an error (the daemon died):
    `acked` gets each fsync'd block, `in_flight` holds the one not yet acked."""
    r = random.Random(seed)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        while not stop.is_set():
            offset = r.randrange(size // BLOCK) * BLOCK
            data = r.randbytes(BLOCK)
            in_flight.clear()
            in_flight[offset] = data
            os.pwrite(fd, data, offset)
            os.fsync(fd)
            acked[offset : offset + BLOCK] = data
            in_flight.clear()
    except OSError:
        pass  # the daemon is gone
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_fsynced_small_writes_survive_kill_9(tmp_path: Path) -> None:
    """A writer thread does 4 KiB overwrites + fsync; the daemon is killed
    at a random moment, three times. After each remount every block holds
    its last fsync'd value (or, for the write in flight, the new one)."""
    with mounted_volume(tmp_path) as volume:
        path = volume.mountpoint / "f"
        size = 2 << 20
        content = bytearray(os.urandom(size))
        path.write_bytes(content)
        fd = os.open(path, os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        rng = random.Random(2)
        for round_ in range(3):
            acked = bytearray(content)
            in_flight: dict[int, bytes] = {}
            stop = threading.Event()

            thread = threading.Thread(
                target=overwrite, args=(path, size, round_, stop, acked, in_flight)
            )
            thread.start()
            time.sleep(rng.uniform(0.3, 2.0))
            volume.kill()
            stop.set()
            thread.join(30)
            assert not thread.is_alive()
            volume.mount()
            got = path.read_bytes()
            assert len(got) == size
            for offset in range(0, size, BLOCK):
                block = got[offset : offset + BLOCK]
                if block != acked[offset : offset + BLOCK]:
                    assert in_flight.get(offset) == block, f"round {round_}: block at {offset}"
            content = bytearray(got)
        volume.unmount()
        report = fsck(volume.stores)
        bad = [f.message for f in report.errors if f.check not in ALLOWED_AFTER_KILL]
        assert not bad and not report.unrecoverable, bad
        volume.mount()


def test_sqlite_on_the_mount(vol: MountedVolume) -> None:
    for mode in ("delete", "wal"):
        db = sqlite3.connect(vol.mountpoint / f"{mode}.db", isolation_level=None)
        db.execute(f"PRAGMA journal_mode={mode}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for t in range(20):
            db.execute("BEGIN")
            db.executemany("INSERT INTO t (v) VALUES (?)", [(f"{t} {i}" * 20,) for i in range(200)])
            db.execute("COMMIT")
        db.execute("UPDATE t SET v = v || 'x' WHERE id % 3 = 0")
        db.execute("DELETE FROM t WHERE id % 5 = 0")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = db.execute("SELECT count(*) FROM t").fetchone()[0]
        db.close()
        assert count == 4000 - 800
    assert status(vol)["write_log"]["records_written"] > 0
    vol.remount()
    for mode in ("delete", "wal"):
        db = sqlite3.connect(vol.mountpoint / f"{mode}.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
