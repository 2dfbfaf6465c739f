"""Events for alerting (ecfs.core.events): the log line, the user's hook.

Unit tests drive an `EventSink` in-process (a hook that records its
environment, a hook that hangs, a full queue, the JSON log format); the
mount tests observe each event through a real hook of a real mount
(`-o event_hook=`): a store failing and coming back, a chunk becoming
unrecoverable, scrub findings and the end of a scrub, the end of a repair,
and a hung hook that must not stall the mount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from ecfs.core import events as ev
from ecfs.core.events import EventSink, JsonFormatter
from ecfs.volume import hooks as hk
from ecfs.volume.hooks import HookRunner, check_hook
from tests.mounting import (
    FUSE_MISSING_REASON,
    TEST_FRAGMENT_SIZE,
    MountedVolume,
    cli,
    mounted_volume,
)
from tests.volume_files import (
    PAYLOAD_OFFSET,
    drop_caches,
    flip_payload_bytes,
    fragment_files,
    fragments_by_chunk,
    pattern,
)

CHUNK = 4 * TEST_FRAGMENT_SIZE  # k=4


def recording_hook(directory: Path) -> tuple[Path, Path]:
    """A hook that appends its ECFS_* environment as one JSON line to a
    file; (hook, file)."""
    record = directory / "events.jsonl"
    hook = directory / "record-event"
    hook.write_text(
        f"#!{sys.executable}\n"
        "import json, os\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('ECFS_')}\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps(env) + '\\n')\n"
    )
    hook.chmod(0o755)
    return hook, record


def recorded(record: Path) -> list[dict[str, str]]:
    try:
        lines = record.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def wait_for_event(
    record: Path,
    name: str,
    timeout: float = 30.0,
    where: Callable[[dict[str, str]], bool] = lambda e: True,
    poke: Callable[[], None] = lambda: None,
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in recorded(record) if e["ECFS_EVENT"] == name and where(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} event within {timeout} s; got {recorded(record)}")
        poke()
        time.sleep(0.2)


# --- the sink, in-process ---------------------------------------------------------


async def wait_until(condition: Callable[[], bool], limit: float) -> None:
    with trio.fail_after(limit):
        while True:
            if condition():
                return
            await trio.sleep(0.05)


def test_a_hook_gets_the_event_in_its_environment(tmp_path: Path) -> None:
    hook, record = recording_hook(tmp_path)
    sink = EventSink("vol-1", "/mnt/x")
    runner = HookRunner(sink, check_hook(str(hook)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            sink.emit(ev.STORE_FAILED, "store 3 failed", store=3, store_path="/d/s3", reason="gone")
            sink.emit(ev.SCRUB_FINISHED, "done", chunks_verified=5, chunks_total=5, findings=0,
                      metadata_findings=0, stopped_early=False)  # fmt: skip
            await wait_until(lambda: len(recorded(record)) >= 2, 20)
            nursery.cancel_scope.cancel()

    trio.run(main)
    by_name = {e["ECFS_EVENT"]: e for e in recorded(record)}
    failed = by_name["store-failed"]
    assert failed["ECFS_STORE"] == "3"
    assert failed["ECFS_STORE_PATH"] == "/d/s3"
    assert failed["ECFS_REASON"] == "gone"
    assert failed["ECFS_VOLUME"] == "vol-1"
    assert failed["ECFS_MOUNTPOINT"] == "/mnt/x"
    assert failed["ECFS_MESSAGE"] == "store 3 failed"
    assert failed["ECFS_TIME"].endswith("Z")
    assert by_name["scrub-finished"]["ECFS_STOPPED_EARLY"] == "0"
    assert runner.statistics().run == 2


def test_a_hung_hook_is_killed_with_its_children_and_a_full_queue_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook starts a child and hangs: after the timeout both are gone.
    While the hooks hang, the queue fills: further events are logged
    but their hook runs dropped, and emit never blocks."""
    pids = tmp_path / "pids"
    hook = tmp_path / "hang"
    hook.write_text(f"#!/bin/sh\nsleep 1000 &\necho $$ $! >> {pids}\nwait\n")
    hook.chmod(0o755)
    sink = EventSink("vol", "/mnt")
    runner = HookRunner(sink, hook, timeout=1.0)
    extra = 5

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            with trio.fail_after(1):  # emit is synchronous: never waits for a hook
                for i in range(ev.QUEUE_LENGTH + hk.HOOK_PARALLEL + extra):
                    sink.emit(ev.STORE_BACK, f"back {i}", store=i, store_path="p")
                    if i == 0:
                        await trio.sleep(0.2)  # the workers take the first ones
            await wait_until(lambda: runner.statistics().killed >= hk.HOOK_PARALLEL, 10)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="ecfs.events"):
        trio.run(main)
    stats = sink.statistics()
    assert stats.dropped >= extra - 1
    assert stats.emitted == ev.QUEUE_LENGTH + hk.HOOK_PARALLEL + extra
    assert any("queue full" in r.getMessage() for r in caplog.records)
    assert any("killed it and its process group" in r.getMessage() for r in caplog.records)
    started = [int(p) for line in pids.read_text().split("\n") if line for p in line.split()]
    assert len(started) >= 2 * hk.HOOK_PARALLEL
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in started if _alive(p)], "a hook or its child survived the timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def test_json_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    sink = EventSink("vol")
    with caplog.at_level(logging.INFO, logger="ecfs.events"):
        sink.emit(ev.CHUNK_UNRECOVERABLE, "a\nb lost", chunk="00ff", inode=5, path="x/y",
                  offset=0, length=10, detected_by="read", reason="fewer than 4")  # fmt: skip
    line = JsonFormatter().format(caplog.records[0])
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "chunk-unrecoverable"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "ecfs.events"
    assert entry["message"] == "chunk-unrecoverable: a\nb lost"
    assert entry["inode"] == 5 and entry["path"] == "x/y"
    assert entry["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "ecfs.x", logging.ERROR, __file__, 1, "bad %s", ("it",), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "bad it" and "ValueError: boom" in entry["exception"]


def test_a_bad_hook_is_refused_at_mount(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    for path, why in [
        (tmp_path / "missing", "does not exist"),
        (plain, "not executable"),
        (tmp_path, "not a regular file"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_hook(str(path))
        (tmp_path / "mnt").mkdir(exist_ok=True)
        result = cli("mount", "-o", f"event_hook={path}", tmp_path / "s0", tmp_path / "mnt",
                     check=False)  # fmt: skip
        assert result.returncode == 2
        assert why in result.stderr and "event_hook" in result.stderr


def test_store_health_changes_are_reported_once_each_way() -> None:
    """StoreRunner.on_health_change: once when a store fails (not again for
    a new reason while failed), once when it is back."""
    from ecfs.core.errors import StoreError
    from ecfs.storage.fakestores import MemoryStore
    from ecfs.storage.offload import StoreRunner

    runner = StoreRunner(0, MemoryStore())
    seen: list[bool] = []
    runner.on_health_change = lambda r: seen.append(r.available)

    def broken() -> None:
        raise OSError(errno.EIO, "I/O error")

    async def main() -> None:
        with pytest.raises(StoreError):
            await runner.call(broken)  # an I/O error fails the store
        runner.mark_failed("again")
        assert runner.failure_reason == "again"
        runner.mark_ok()
        runner.mark_ok()

    trio.run(main)
    assert seen == [False, True]


def test_event_hook_options(tmp_path: Path) -> None:
    from ecfs.core.errors import VolumeError
    from ecfs.frontend.mount import parse_options

    hook, _ = recording_hook(tmp_path)
    options = parse_options([f"noatime,event_hook={hook},event_hook_timeout=2.5"])
    assert options.event_hook == hook and options.event_hook_timeout == 2.5
    assert parse_options([]).event_hook is None
    for bad in ("event_hook_timeout=0", "event_hook_timeout=soon", "event_hook=/no/such/hook"):
        with pytest.raises(VolumeError, match="event_hook"):
            parse_options([bad])


# --- real mounts --------------------------------------------------------------------

requires_fuse = pytest.mark.skipif(
    FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""
)


@contextmanager
def hooked_volume(base: Path, *extra: str) -> Iterator[tuple[MountedVolume, Path]]:
    """A mounted 6-store k=4 m=2 volume whose event hook records every
    event (and mount arguments `extra`)."""
    (base / "hook").mkdir()
    hook, record = recording_hook(base / "hook")
    with mounted_volume(base, mount_args=[*extra, "-o", f"event_hook={hook}"]) as vol:
        yield vol, record


@requires_fuse
@pytest.mark.mount
def test_store_failed_and_back(tmp_path: Path) -> None:
    """A store renamed away while mounted: store-failed (with its index and
    path); renamed back: store-back. The daemon's log is JSON, line by line."""
    with hooked_volume(tmp_path, "--log-format", "json") as (vol, record):
        _store_failed_and_back(vol, record, tmp_path)
    vol.check_log_clean()  # JSON lines are checked for errors too


def _store_failed_and_back(vol: MountedVolume, record: Path, tmp_path: Path) -> None:
    (vol.mountpoint / "f").write_bytes(pattern(1, 3 * CHUNK))
    lost, away = vol.stores[4], tmp_path / "s4-away"
    os.rename(lost, away)
    try:

        def poke() -> None:
            drop_caches()
            (vol.mountpoint / "f").read_bytes()

        failed = wait_for_event(record, "store-failed", poke=poke)
    finally:
        os.rename(away, lost)
    assert failed["ECFS_STORE_PATH"] == str(lost)
    assert failed["ECFS_REASON"]
    assert failed["ECFS_MOUNTPOINT"] == str(vol.mountpoint)
    assert len(failed["ECFS_VOLUME"]) == 32  # the volume's UUID, hex
    back = wait_for_event(record, "store-back")
    assert back["ECFS_STORE"] == failed["ECFS_STORE"]
    lines = [line for line in vol.log_text().splitlines() if not line.startswith("=== harness")]
    entries = [json.loads(line) for line in lines]  # each line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    events = [e for e in entries if "event" in e]
    assert [e["event"] for e in events][:2] == ["store-failed", "store-back"]
    assert events[0]["store_path"] == str(lost)
    # Each change is one log line, the event's (no plain line saying it again).
    said = [
        e for e in entries
        if f"({lost})" in e["message"] and ("failed" in e["message"] or "is back" in e["message"])
    ]  # fmt: skip
    assert [e.get("event") for e in said] == ["store-failed", "store-back"], said
    assert said[0]["level"] == "WARNING" and said[0]["reason"] in said[0]["message"]


@requires_fuse
@pytest.mark.mount
def test_a_store_missing_at_mount_is_an_event(tmp_path: Path) -> None:
    with hooked_volume(tmp_path) as (vol, record):
        vol.unmount()
        vol.mount(stores=vol.stores[:5])
        missing = wait_for_event(record, "store-failed")
        assert missing["ECFS_REASON"] == "missing at mount"
        assert missing["ECFS_STORE_PATH"] == str(vol.stores[5])
        assert missing["ECFS_MESSAGE"].endswith("is missing at mount")


@requires_fuse
@pytest.mark.mount
def test_scrub_finding_then_repair_finished(tmp_path: Path) -> None:
    with hooked_volume(tmp_path) as (vol, record):
        _scrub_finding_then_repair_finished(vol, record)


def _scrub_finding_then_repair_finished(vol: MountedVolume, record: Path) -> None:
    data = pattern(2, 2 * CHUNK)
    (vol.mountpoint / "dir").mkdir()
    (vol.mountpoint / "dir" / "file").write_bytes(data)
    os.sync()
    (chunk_id, index), path = sorted(fragment_files(vol.stores[1]).items())[0]
    flip_payload_bytes(path, random.Random(5), 1)
    drop_caches()
    result = cli("scrub", vol.mountpoint, check=False)
    assert result.returncode == 1, result.stdout
    finding = wait_for_event(record, "scrub-finding")
    assert finding["ECFS_CHUNK"] == f"{chunk_id:016x}"
    assert finding["ECFS_FRAGMENTS"] == str(index)
    assert finding["ECFS_PATH"] == "/dir/file"  # inside the volume
    finished = wait_for_event(record, "scrub-finished")
    assert finished["ECFS_FINDINGS"] == "1"
    assert finished["ECFS_CHUNKS_VERIFIED"] == finished["ECFS_CHUNKS_TOTAL"] == "2"
    repaired = wait_for_event(record, "repair-finished")
    assert repaired["ECFS_CHUNKS_REPAIRED"] == "1"
    assert repaired["ECFS_FRAGMENTS_REBUILT"] == "1"
    assert (vol.mountpoint / "dir" / "file").read_bytes() == data


@requires_fuse
@pytest.mark.mount
def test_chunk_unrecoverable(tmp_path: Path) -> None:
    """m+1 fragments of a chunk ruined: the read fails with EIO and the
    hook hears chunk-unrecoverable once, with the file and the range."""
    with hooked_volume(tmp_path) as (vol, record):
        _chunk_unrecoverable(vol, record)
    vol.check_log_clean([r"unreadable|cannot be recovered|fewer than|[Uu]nrecoverable"])


def _chunk_unrecoverable(vol: MountedVolume, record: Path) -> None:
    (vol.mountpoint / "lost").write_bytes(pattern(3, 2 * CHUNK))
    os.sync()
    chunks = fragments_by_chunk(vol.stores)
    chunk_id = sorted(chunks)[-1]
    for index in range(3):  # m + 1 = 3 data fragments: every byte of them garbage
        store = vol.stores[chunks[chunk_id][index]]
        frag = fragment_files(store)[(chunk_id, index)]
        with open(frag, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(PAYLOAD_OFFSET)
            f.write(random.Random(index).randbytes(size - PAYLOAD_OFFSET))
    drop_caches()
    with pytest.raises(OSError) as caught:
        (vol.mountpoint / "lost").read_bytes()
    assert caught.value.errno == errno.EIO
    lost = wait_for_event(record, "chunk-unrecoverable")
    assert lost["ECFS_CHUNK"] == f"{chunk_id:016x}"
    assert lost["ECFS_PATH"] == "/lost"
    assert int(lost["ECFS_OFFSET"]) in (0, CHUNK)
    assert lost["ECFS_DETECTED_BY"] in ("read", "repair")
    time.sleep(1.0)
    assert [e["ECFS_EVENT"] for e in recorded(record)].count("chunk-unrecoverable") == 1


@requires_fuse
@pytest.mark.mount
def test_a_hung_hook_never_stalls_the_mount(tmp_path: Path) -> None:
    """Every hook run hangs (and leaves a child): reads and writes go on,
    and each run is killed after event_hook_timeout with its child."""
    pids = tmp_path / "pids"
    hook = tmp_path / "hang"
    hook.write_text(f"#!/bin/sh\nsleep 1000 &\necho $$ $! >> {pids}\nwait\n")
    hook.chmod(0o755)
    args = ["-o", f"event_hook={hook},event_hook_timeout=2"]
    with mounted_volume(tmp_path / "v", mount_args=args) as vol:
        data = pattern(4, 2 * CHUNK)
        (vol.mountpoint / "a").write_bytes(data)
        os.sync()
        (_, _), path = sorted(fragment_files(vol.stores[2]).items())[0]
        flip_payload_bytes(path, random.Random(6), 1)
        drop_caches()
        cli("scrub", vol.mountpoint, check=False)  # scrub-finding, scrub-finished, repair-finished
        deadline = time.monotonic() + 1.5
        written = 0
        while time.monotonic() < deadline:  # the hooks hang meanwhile
            (vol.mountpoint / f"w{written}").write_bytes(data[:100_000])
            assert (vol.mountpoint / "a").read_bytes() == data
            written += 1
        assert written > 0
        deadline = time.monotonic() + 30
        while "killed it and its process group" not in vol.log_text():
            assert time.monotonic() < deadline, vol.log_tail()
            time.sleep(0.2)
        started = [int(p) for line in pids.read_text().splitlines() for p in line.split()]
        assert started
        deadline = time.monotonic() + 10
        while [p for p in started[:2] if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started[:2] if _alive(p)]


@requires_fuse
@pytest.mark.mount
def test_status_counts_events_and_hook_runs_failures_and_timeouts(tmp_path: Path) -> None:
    """A hook that fails for scrub-finding and hangs for repair-finished:
    `ecfs status` (JSON, text, Prometheus) counts the events, the runs, the
    failure and the run killed after event_hook_timeout."""
    ran = tmp_path / "ran"
    hook = tmp_path / "picky"
    hook.write_text(
        "#!/bin/sh\n"
        f"echo \"$ECFS_EVENT\" >> {ran}\n"
        'case "$ECFS_EVENT" in\n'
        "  scrub-finding) exit 3 ;;\n"
        "  repair-finished) exec sleep 1000 ;;\n"
        "esac\n"
    )
    hook.chmod(0o755)
    args = ["-o", f"event_hook={hook},event_hook_timeout=2"]
    with mounted_volume(tmp_path / "v", mount_args=args) as vol:
        record = json.loads(cli("status", "--json", vol.mountpoint).stdout)["events"]
        assert record == {"emitted": 0, "hook": str(hook), "hook_runs": 0, "hook_failures": 0,
                          "hook_timeouts": 0, "dropped": 0}  # fmt: skip
        (vol.mountpoint / "a").write_bytes(pattern(7, 2 * CHUNK))
        os.sync()
        (_, _), path = sorted(fragment_files(vol.stores[2]).items())[0]
        flip_payload_bytes(path, random.Random(8), 1)
        drop_caches()
        cli("scrub", vol.mountpoint, check=False)  # scrub-finding, scrub-finished, repair-finished
        deadline = time.monotonic() + 30
        while True:
            record = json.loads(cli("status", "--json", vol.mountpoint).stdout)["events"]
            if record["hook_timeouts"]:
                break
            assert time.monotonic() < deadline, (record, vol.log_tail())
            time.sleep(0.2)
        assert sorted(ran.read_text().split()) == [
            "repair-finished", "scrub-finding", "scrub-finished"
        ]  # fmt: skip
        assert record == {"emitted": 3, "hook": str(hook), "hook_runs": 3, "hook_failures": 1,
                          "hook_timeouts": 1, "dropped": 0}  # fmt: skip
        text = cli("status", vol.mountpoint).stdout
        assert (
            f"events: 3 since mount; hook {hook}: 3 runs, 1 failed, 1 killed after the timeout,"
            " 0 dropped (queue full)"
        ) in text
        metrics = cli("status", "--prometheus", vol.mountpoint).stdout
        for line in ("ecfs_events_total 3.0", "ecfs_event_hook_runs_total 3.0",
                     "ecfs_event_hook_failures_total 1.0", "ecfs_event_hook_timeouts_total 1.0",
                     "ecfs_event_hook_dropped_total 0.0"):  # fmt: skip
            assert line in metrics


def test_status_without_a_hook_says_events_are_only_logged() -> None:
    import dataclasses

    from ecfs.frontend.render import render_status
    from ecfs.volume.status import EventsStatus, from_json, to_json
    from tests.test_status import example_status

    record = dataclasses.replace(example_status(), events=EventsStatus(emitted=4, dropped=0))
    assert "events: 4 since mount (logged only: no event hook)" in render_status(record)
    assert from_json(json.loads(json.dumps(to_json(record)))) == record


# --- the example hook ---------------------------------------------------------------

EXAMPLE_HOOK = Path(__file__).resolve().parent.parent / "ecfs/share/hooks/mail-on-event"


def run_example_hook(tmp_path: Path, sendmail: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ["PATH"],
        "EVENT_SENDMAIL": sendmail,
        "EVENT_MAILTO": "ops@example.org",
    }
    return subprocess.run(
        [str(EXAMPLE_HOOK)], env={**base, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=30, cwd=tmp_path,
    )  # fmt: skip


def test_the_example_hook_mails_alarms_with_sendmail(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f'#!/bin/sh\necho "ARGS: $*" > {mail}\ncat >> {mail}\n')
    sendmail.chmod(0o755)
    assert os.access(EXAMPLE_HOOK, os.X_OK)
    event = {"ECFS_EVENT": "store-failed", "ECFS_MESSAGE": "store 3 (/srv/d4) failed: gone",
             "ECFS_STORE": "3", "ECFS_MOUNTPOINT": "/mnt/data"}  # fmt: skip
    result = run_example_hook(tmp_path, str(sendmail), **event)
    assert result.returncode == 0, result.stderr
    text = mail.read_text()
    assert "ARGS: -oi -- ops@example.org" in text
    assert "Subject: ecfs on " in text and "store-failed /mnt/data" in text
    assert "store 3 (/srv/d4) failed: gone" in text and "ECFS_STORE=3" in text
    mail.unlink()
    quiet = {"ECFS_EVENT": "scrub-finished", "ECFS_FINDINGS": "0", "ECFS_METADATA_FINDINGS": "0"}
    assert run_example_hook(tmp_path, str(sendmail), **quiet).returncode == 0
    assert not mail.exists()  # a clean scrub is no news
    found = {**quiet, "ECFS_FINDINGS": "2"}
    assert run_example_hook(tmp_path, str(sendmail), **found).returncode == 0
    assert mail.exists()


def test_the_example_hook_without_sendmail_logs_and_succeeds(tmp_path: Path) -> None:
    result = run_example_hook(
        tmp_path, str(tmp_path / "no-sendmail"), ECFS_EVENT="chunk-unrecoverable",
        ECFS_MESSAGE="/f: bytes [0, 10) cannot be recovered",
    )  # fmt: skip
    assert result.returncode == 0
    assert "no sendmail" in result.stdout + result.stderr
    assert "cannot be recovered" in result.stdout + result.stderr
    assert run_example_hook(tmp_path, "").returncode == 2  # not run by ecfs: no ECFS_EVENT
