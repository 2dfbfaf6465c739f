"""scripts/bench_disks.py: the cgroup settings of its disk models and the
rebuild reader's timing (the benchmark itself needs root, loop devices and
minutes: its output is the proof, see scripts/BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_disks  # noqa: E402


def test_bandwidth_cap_v1_lifts_any_operation_cap() -> None:
    assert bench_disks.cap_settings("7:3", 1000, 0, v2=False) == [
        ("blkio.throttle.read_bps_device", "7:3 1000\n"),
        ("blkio.throttle.write_bps_device", "7:3 1000\n"),
        ("blkio.throttle.read_iops_device", "7:3 0\n"),
        ("blkio.throttle.write_iops_device", "7:3 0\n"),
    ]


def test_disk_model_v1_caps_operations_both_ways() -> None:
    settings = dict(bench_disks.cap_settings("7:3", 150 << 20, 200, v2=False))
    assert settings["blkio.throttle.read_iops_device"] == "7:3 200\n"
    assert settings["blkio.throttle.write_iops_device"] == "7:3 200\n"
    assert settings["blkio.throttle.read_bps_device"] == f"7:3 {150 << 20}\n"


def test_disk_model_v2_is_one_io_max_line() -> None:
    assert bench_disks.cap_settings("7:3", 1000, 200, v2=True) == [
        ("io.max", "7:3 rbps=1000 wbps=1000 riops=200 wiops=200\n")
    ]
    assert bench_disks.cap_settings("7:3", 1000, 0, v2=True) == [
        ("io.max", "7:3 rbps=1000 wbps=1000 riops=max wiops=max\n")
    ]


def test_device_reads_difference() -> None:
    before = bench_disks.DeviceReads(10, 1, 4096)
    after = before + bench_disks.DeviceReads(5, 0, 5 * 4096)
    assert after - before == bench_disks.DeviceReads(5, 0, 5 * 4096)


def test_reader_time_leaves_out_the_cache_drops_inside_the_window() -> None:
    """The rebuild's foreground reader is timed over the window less the
    benchmark's own cache drops (partly inside it: only that part)."""
    reader = bench_disks.Reader(Path("/nonexistent"))
    reader.drops = [(0.0, 0.3), (1.0, 1.25), (2.9, 3.2), (5.0, 5.1)]
    seconds, drops = reader.reading_seconds(0.1, 3.0)
    assert drops == 3
    assert seconds == pytest.approx(2.9 - 0.2 - 0.25 - 0.1)
    assert reader.reading_seconds(3.5, 4.5) == (1.0, 0)
