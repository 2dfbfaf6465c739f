"""Store failures while a real ecfs volume is mounted and in use.

Stores vanish (renamed away, or faultfs mode `gone`), rot, hang, fail with
EIO or fill up under a mounted 6-store k=4 m=2 volume, while files are read
and written; every test checks file contents end to end with hashes.

Faults are injected with scripts/faultfs.py: six faultfs mounts are shared
by the module (`faulty_dirs`, all back to `ok` before every test), and a
test's volume puts the stores it wants to break in a fresh subdirectory of
those mounts; the others are plain directories. Metadata replicas live on
stores 0..m (mkfs), so the faultfs stores are 3..5 unless a test is about
the replicas too.

Cleanup order (`failure_volume`): every faultfs is set back to `ok` (a hung
store would otherwise hang the unmount), then ecfs is unmounted; the
faultfs mounts are unmounted at module end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ecfs.core import host
from tests.mounting import (
    FUSE_MISSING_REASON,
    TEST_FRAGMENT_SIZE,
    TEST_MKFS_ARGS,
    MountedVolume,
    cli,
)
from tests.test_faultfs import faultfs
from tests.volume_files import (
    MiB,
    drop_caches,
    flip_payload_bytes,
    fragment_files,
    pattern,
    sha256_file,
    status,
    write_pattern_file,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""),
]

K, M, N = 4, 2, 6
FRAGMENT = TEST_FRAGMENT_SIZE
HANG_READ_LIMIT = 5.0  # seconds a read touching a hung store may take
#: Seconds a write or fsync may take while a store hangs. Not a speed claim:
#: the hang lasts until the test releases it, so finishing at all proves that
#: the write went around the hung store (the writer gives up on a store after
#: its deadline, ~3 s); the bound is generous so that a loaded machine passes.
HANG_WRITE_LIMIT = 30.0
QUICK = 1.0  # seconds for ls / stat / small reads while a store misbehaves
RECOVERY_LIMIT = 12.0  # seconds to notice a store is back (probes every 5 s)


# --- fixtures and helpers ----------------------------------------------------


@pytest.fixture(scope="module")
def faulty_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    base = tmp_path_factory.mktemp("faultfs")
    dirs = [faultfs.FaultyDir(base / f"f{i}") for i in range(N)]
    try:
        for d in dirs:
            d.launch()
        for d in dirs:
            d.wait_ready()
        yield dirs
    finally:
        for d in dirs:
            d.close()


@pytest.fixture
def dirs(faulty_dirs: list) -> Iterator[list]:
    for d in faulty_dirs:
        d.set("ok")
    yield faulty_dirs
    for d in faulty_dirs:
        d.set("ok")


@contextmanager
def failure_volume(
    base: Path, dirs: Sequence, faulty: Sequence[int] = (), allowed_log: Sequence[str] = ()
) -> Iterator[MountedVolume]:
    """A mounted 6-store volume; store i is on faultfs dirs[i] for i in
    `faulty`, a plain directory otherwise. Every faultfs is set back to ok
    before ecfs is unmounted; the log is checked after a clean unmount."""
    stores = [
        dirs[i].path / base.name if i in faulty else base / "stores" / f"s{i}" for i in range(N)
    ]
    (base / "stores").mkdir(parents=True, exist_ok=True)
    mountpoint = base / "mnt"
    mountpoint.mkdir(exist_ok=True)
    cli("mkfs", "--data", K, "--parity", M, *TEST_MKFS_ARGS, *stores)
    volume = MountedVolume(stores, mountpoint, base / "ecfs.log")
    ok = False
    try:
        volume.mount()
        yield volume
        ok = True
    finally:
        for d in dirs:
            d.set("ok")
        volume.unmount(check=ok)
    volume.check_log_clean(allowed_log)


def store_index(volume: MountedVolume, path: Path) -> int:
    for store in status(volume)["stores"]:
        if Path(store["path"]) == Path(os.path.realpath(path)):
            return int(store["index"])
    raise AssertionError(f"{path} is not a store of {volume}")


def store_state(volume: MountedVolume, index: int) -> str:
    return str(status(volume)["stores"][index]["state"])


def populate(root: Path, count: int = 4, size: int = 2 * MiB + 4321) -> dict[Path, str]:
    hashes = {}
    for i in range(count):
        path = root / f"f{i}"
        hashes[path] = write_pattern_file(path, seed=i, size=size - i * 77777)
    return hashes


def check_all(hashes: dict[Path, str], caches: bool = True) -> None:
    if caches:
        drop_caches()
    else:
        drop_caches_nosync()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


def drop_caches_nosync() -> None:
    """drop_caches without sync(): sync() may wait on a hung store."""
    host.drop_caches(sync=False)


def timed(fn: Callable[[], Any], limit: float) -> tuple[float | None, Any]:
    """Run fn in a daemon thread; (seconds, result or exception), or
    (None, None) if it did not finish within `limit` (it is left running:
    the test's cleanup releases the fault it waits on)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return None, None
    return time.monotonic() - start, out[0]


def wait_for(
    predicate: Callable[[], bool], limit: float, poke: Callable[[], None] = lambda: None
) -> float | None:
    """Seconds until predicate() is true (polling, calling poke() between
    tries), or None after `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if predicate():
            return time.monotonic() - start
        poke()
        time.sleep(0.1)
    return None


def new_fragments(store: Path, before: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return set(fragment_files(store)) - before if (store / "frags").exists() else set()


class BackgroundIO:
    """Reads (verifying hashes) and writes files in two threads while a
    test breaks stores. `read_errors` and `write_errors` collect what went
    wrong; `written` holds the files written completely (path -> sha256)."""

    def __init__(self, hashes: dict[Path, str], write_dir: Path | None, size: int = MiB + 999):
        self.hashes = dict(hashes)
        self.write_dir = write_dir
        self.size = size
        self.read_errors: list[str] = []
        self.write_errors: list[str] = []
        self.written: dict[Path, str] = {}
        self.reads = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._reader, daemon=True)]
        if write_dir is not None:
            self._threads.append(threading.Thread(target=self._writer, daemon=True))

    def __enter__(self) -> BackgroundIO:
        for t in self._threads:
            t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "background I/O is stuck"

    def _reader(self) -> None:
        while not self._stop.is_set():
            for path, digest in self.hashes.items():
                try:
                    if sha256_file(path) != digest:
                        self.read_errors.append(f"{path}: WRONG BYTES")
                except OSError as exc:
                    self.read_errors.append(f"{path}: {exc}")
                self.reads += 1

    def _writer(self) -> None:
        assert self.write_dir is not None
        n = 0
        while not self._stop.is_set():
            path = self.write_dir / f"bg{n}"
            try:
                self.written[path] = write_pattern_file(path, seed=1000 + n, size=self.size)
            except OSError as exc:
                self.write_errors.append(f"{path}: {exc}")
            n += 1
            time.sleep(0.05)


def read_pieces(path: Path, data: bytes, piece: int = FRAGMENT) -> tuple[int, int]:
    """Read `path` in `piece`-sized preads: each must give the right bytes
    or EIO. Returns (good pieces, EIO pieces)."""
    good = failed = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, len(data), piece):
            try:
                got = os.pread(fd, piece, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, (path, offset, exc)
                failed += 1
                continue
            assert got == data[offset : offset + piece], f"WRONG BYTES in {path} at {offset}"
            good += 1
    finally:
        os.close(fd)
    return good, failed


# --- stores vanishing ----------------------------------------------------------


def test_a_store_renamed_away_while_mounted(tmp_path: Path) -> None:
    """Store 1 (it holds a metadata replica) is renamed away under load:
    reads go on (degraded), writes go on and put nothing in the lost store,
    and after a remount with the store back everything reads."""
    with failure_volume(tmp_path, [], allowed_log=[r"metadata|replica"]) as vol:
        hashes = populate(vol.mountpoint)
        (vol.mountpoint / "new").mkdir()
        drop_caches()
        lost = vol.stores[1]
        away = lost.with_name("s1-away")
        with BackgroundIO(hashes, vol.mountpoint / "new") as io:
            os.rename(lost, away)
            time.sleep(0.5)  # fragment writes that started before the rename end
            settled = set(fragment_files(away))
            written_before = len(io.written)
            time.sleep(2.0)
        assert io.read_errors == []
        assert io.write_errors == []
        assert len(io.written) > written_before
        check_all({**hashes, **io.written})
        assert new_fragments(away, settled) == set()  # nothing went to the lost store
        os.rename(away, lost)
        vol.remount()
        check_all({**hashes, **io.written})


def test_two_stores_renamed_away_reads_go_on(tmp_path: Path) -> None:
    with failure_volume(tmp_path, [], allowed_log=[r"metadata|replica"]) as vol:
        hashes = populate(vol.mountpoint)
        drop_caches()
        with BackgroundIO(hashes, None) as io:
            os.rename(vol.stores[1], tmp_path / "s1-away")
            os.rename(vol.stores[4], tmp_path / "s4-away")
            time.sleep(2.0)
        assert io.read_errors == []
        assert io.reads > 0
        check_all(hashes)
        os.rename(tmp_path / "s1-away", vol.stores[1])
        os.rename(tmp_path / "s4-away", vol.stores[4])
        vol.remount()
        check_all(hashes)


def test_two_stores_renamed_away_writes_fail_rather_than_lose_protection(
    tmp_path: Path,
) -> None:
    """The documented write policy (ecfs.data.writer): a chunk needs at least k+1
    stores. With 2 of 6 stores gone only k=4 remain, so new data is refused
    with EIO at close/fsync instead of being stored with no redundancy; the
    data already stored stays readable."""
    with failure_volume(
        tmp_path, [], allowed_log=[r"metadata|replica|place|write-back|flush|fsync|release"]
    ) as vol:
        hashes = populate(vol.mountpoint, count=2)
        os.rename(vol.stores[1], tmp_path / "s1-away")
        os.rename(vol.stores[4], tmp_path / "s4-away")
        try:
            with pytest.raises(OSError) as caught:
                with open(vol.mountpoint / "refused", "wb") as f:
                    f.write(pattern(50, MiB + 3))
                    f.flush()
                    os.fsync(f.fileno())
            assert caught.value.errno == errno.EIO
            check_all(hashes)
        finally:
            os.rename(tmp_path / "s1-away", vol.stores[1])
            os.rename(tmp_path / "s4-away", vol.stores[4])
        vol.remount()
        check_all(hashes)


# --- rot -------------------------------------------------------------------------


def test_fragments_rotting_while_mounted_are_read_around(tmp_path: Path) -> None:
    with failure_volume(tmp_path, [], allowed_log=[r"bad cells|unreadable|corrupt"]) as vol:
        hashes = populate(vol.mountpoint)
        check_all(hashes)  # fragments now open in the daemon and cached
        rng = random.Random(7)
        before = status(vol)["reads"]["degraded_reads"]
        with BackgroundIO(hashes, None) as io:
            rotten = 0
            for path in fragment_files(vol.stores[2]).values():
                flip_payload_bytes(path, rng, 4, mask=0x5A)
                rotten += 1
            drop_caches()
            time.sleep(1.0)
        assert rotten > 0
        assert io.read_errors == []
        check_all(hashes)
        assert status(vol)["reads"]["degraded_reads"] > before  # the rot was seen


# --- a hung store ----------------------------------------------------------------


def test_a_hung_store_does_not_stall_the_mount(tmp_path: Path, dirs: list) -> None:
    """Store 3 hangs (every call blocks): reads needing its fragments are
    served degraded within HANG_READ_LIMIT, ls/stat/small files answer at
    once, and once it answers again the volume uses it again."""
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint)
        small = {}
        for i in range(4):
            path = vol.mountpoint / f"small{i}"
            small[path] = write_pattern_file(path, seed=200 + i, size=5000 + i)
        hung = store_index(vol, vol.stores[3])
        drop_caches()
        dirs[3].set("hang")
        drop_caches_nosync()
        slow: list[str] = []
        busy = threading.Thread(
            target=lambda: [sha256_file(p) for p in hashes], daemon=True
        )  # keeps reads of the hung store in flight meanwhile
        busy.start()
        for path, digest in hashes.items():
            seconds, result = timed(lambda p=path: sha256_file(p), 3 * HANG_READ_LIMIT)
            if seconds is None or seconds > HANG_READ_LIMIT:
                slow.append(f"{path.name}: {seconds}")
            elif not isinstance(result, Exception):
                assert result == digest, path
            for probe in (
                lambda: os.listdir(vol.mountpoint),
                lambda p=path: os.stat(p),
                lambda: [p.read_bytes() for p in small],
            ):
                seconds, result = timed(probe, 10 * QUICK)
                assert seconds is not None and seconds < QUICK, (
                    "metadata/small read stalled",
                    seconds,
                )
                assert not isinstance(result, Exception), result
        for path, digest in small.items():
            assert sha256_file(path) == digest
        dirs[3].set("ok")
        busy.join(30)
        assert slow == [], f"reads touching the hung store took too long: {slow}"
        # Back: the health probe notices, and reads stop being degraded.
        assert wait_for(lambda: store_state(vol, hung) == "ok", RECOVERY_LIMIT), status(vol)

        def clean_pass() -> bool:
            before = status(vol)["reads"]["degraded_reads"]
            check_all(hashes)
            return status(vol)["reads"]["degraded_reads"] == before

        assert wait_for(clean_pass, RECOVERY_LIMIT), status(vol)["reads"]


def _timed_under_hang(
    dirs: list, hung: Sequence[int], fn: Callable[[], Any], limit: float = HANG_WRITE_LIMIT
) -> float | None:
    """Seconds fn() took with stores `hung` hanging, None if more than
    `limit` (the hang is then released so that fn can finish)."""
    for i in hung:
        dirs[i].set("hang")
    try:
        seconds, result = timed(fn, limit)
    finally:
        for i in hung:
            dirs[i].set("ok")
    if isinstance(result, Exception):
        raise result
    return seconds


def test_writes_do_not_stall_on_a_hung_store(tmp_path: Path, dirs: list) -> None:
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint, count=2)
        path = vol.mountpoint / "during-hang"
        seconds = _timed_under_hang(
            dirs, [3], lambda: write_pattern_file(path, seed=400, size=2 * MiB + 1)
        )
        assert seconds is not None, f"a 2 MiB write took more than {HANG_WRITE_LIMIT} s"
        hashes[path] = write_pattern_file(path, seed=400, size=2 * MiB + 1)
        check_all(hashes)


def test_fsync_does_not_stall_on_a_hung_replica_store(tmp_path: Path, dirs: list) -> None:
    with failure_volume(tmp_path, dirs, faulty=[0], allowed_log=[r"store 0|replica"]) as vol:
        path = vol.mountpoint / "small"
        path.write_bytes(b"before")
        fsync_file(path)

        def write_and_fsync() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, b"during the hang")
                os.fsync(fd)
            finally:
                os.close(fd)

        seconds = _timed_under_hang(dirs, [0], write_and_fsync)
        assert seconds is not None, f"fsync took more than {HANG_WRITE_LIMIT} s"
        vol.remount()
        assert path.read_bytes() == b"during the hang"


def test_a_replica_store_gone_then_failing_does_not_kill_the_daemon(
    tmp_path: Path, dirs: list
) -> None:
    """Store 0 holds a metadata replica; its filesystem goes away (faultfs
    `gone`), then fails with EIO, while files are written and fsync'd. A
    replica connection in WAL mode with a mapped ``-shm`` wal-index would
    take a SIGBUS there ("Fatal Python error: Bus error": the daemon dies
    and the mount with it); with the wal-index in heap memory the replica
    only goes stale and the mount goes on."""
    with failure_volume(tmp_path, dirs, faulty=[0], allowed_log=[r"store 0|replica"]) as vol:
        bad = store_index(vol, vol.stores[0])
        hashes = populate(vol.mountpoint, count=2, size=MiB + 4321)
        seed = 900
        for mode in ("gone", "eio"):
            dirs[0].set(mode)
            for i in range(12):
                path = vol.mountpoint / f"{mode}-{i}"
                hashes[path] = write_pattern_file(path, seed=seed, size=(i + 1) * 1000 + seed)
                fsync_file(path)  # makes the transaction durable: applied to the replicas
                seed += 1
            metadata = status(vol)["metadata"]
            assert bad not in metadata["live_replicas"], metadata
            assert str(bad) in metadata["stale_replicas"], metadata
        big = vol.mountpoint / "big"
        hashes[big] = write_pattern_file(big, seed=1, size=3 * MiB + 1)
        fsync_file(big)
        check_all(hashes, caches=False)
        assert vol.proc is not None and vol.proc.poll() is None, vol.log_tail()
        dirs[0].set("ok")
        vol.remount()  # checked: the daemon exited 0 after a clean unmount
        check_all(hashes)
        # The copy placed on another store while files were being written
        # holds every generation (it is not refused as damaged).
        assert "refused" not in vol.log_text(), vol.log_tail()


# --- EIO and ENOSPC ---------------------------------------------------------------


def test_a_store_failing_with_eio(tmp_path: Path, dirs: list) -> None:
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint)
        (vol.mountpoint / "new").mkdir()
        bad = store_index(vol, vol.stores[3])
        drop_caches()
        source = dirs[3].source / tmp_path.name
        before_frags = set(fragment_files(source))
        degraded_before = status(vol)["reads"]["degraded_reads"]
        dirs[3].set("eio")
        with BackgroundIO(hashes, vol.mountpoint / "new") as io:
            time.sleep(2.0)
        assert io.read_errors == []
        assert io.write_errors == []
        assert len(io.written) >= 1
        assert status(vol)["reads"]["degraded_reads"] > degraded_before
        assert store_state(vol, bad) == "failed"
        check_all({**hashes, **io.written})
        assert new_fragments(source, before_frags) == set()
        dirs[3].set("ok")
        check_all({**hashes, **io.written})


def test_a_full_store_is_skipped_by_writes(tmp_path: Path, dirs: list) -> None:
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint, count=2)
        source = dirs[3].source / tmp_path.name
        before_frags = set(fragment_files(source))
        dirs[3].set("enospc")
        written = {}
        for i in range(4):
            path = vol.mountpoint / f"w{i}"
            written[path] = write_pattern_file(path, seed=70 + i, size=MiB + 5)
            st = os.statvfs(vol.mountpoint)
            assert st.f_blocks > 0
        check_all({**hashes, **written})
        assert new_fragments(source, before_frags) == set()
        dirs[3].set("ok")
        vol.remount()
        check_all({**hashes, **written})


def write_until_enospc(path: Path, data: bytes) -> OSError | None:
    """Write, fsync and close `path`; the first error (or None)."""
    failure: OSError | None = None
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        failure = exc
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or exc
    return failure


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ALL_FULL_LOG = [
    r"[Nn]o space|ENOSPC|disk is full|cannot place chunk|replica|metadata not durable",
]


def test_all_stores_full_write_fails_with_enospc(tmp_path: Path, dirs: list) -> None:
    """Every store full (metadata replicas too): a write fails with ENOSPC;
    what was written and fsync()ed before stays readable, also after a
    remount once the stores have space again."""
    with failure_volume(tmp_path, dirs, faulty=range(N), allowed_log=ALL_FULL_LOG) as vol:
        hashes = populate(vol.mountpoint, count=2, size=MiB + 11)
        for path in hashes:
            fsync_file(path)
        late = vol.mountpoint / "late"  # closed, not fsync()ed
        hashes[late] = write_pattern_file(late, seed=93, size=MiB)
        for d in dirs:
            d.set("enospc")
        failure = write_until_enospc(vol.mountpoint / "too-much", pattern(90, 2 * MiB))
        assert failure is not None, "a write to a volume with every store full succeeded"
        assert failure.errno == errno.ENOSPC, failure
        assert os.statvfs(vol.mountpoint).f_blocks > 0  # statfs answers
        check_all(hashes)
        assert vol.proc is not None and vol.proc.poll() is None, "the daemon died"
        for d in dirs:
            d.set("ok")
        # Space again: the metadata replicas come back (health loop, every 5 s).
        replicas_back = wait_for(
            lambda: len(status(vol)["metadata"]["live_replicas"]) == M + 1, RECOVERY_LIMIT
        )
        assert replicas_back is not None, status(vol)["metadata"]
        vol.remount()
        check_all(hashes)


def test_files_closed_before_the_stores_filled_survive_a_clean_unmount(
    tmp_path: Path, dirs: list
) -> None:
    with failure_volume(tmp_path, dirs, faulty=range(N), allowed_log=ALL_FULL_LOG) as vol:
        hashes = populate(vol.mountpoint, count=2, size=MiB + 11)  # closed, no fsync
        last = vol.mountpoint / "last"
        hashes[last] = write_pattern_file(last, seed=92, size=MiB)
        for d in dirs:  # at once: the metadata waits up to 1 s to be batched
            d.set("enospc")
        metadata = status(vol)["metadata"]
        if metadata["durable_generation"] >= metadata["generation"]:
            pytest.skip(f"metadata was made durable before the stores filled: {metadata}")
        failure = write_until_enospc(vol.mountpoint / "too-much", pattern(91, 2 * MiB))
        assert failure is not None and failure.errno == errno.ENOSPC, failure
        # An fsync while full makes the replicator try (and fail) to commit.
        small = vol.mountpoint / "small"
        small.write_bytes(b"tiny")
        try:
            fsync_file(small)
        except OSError:
            pass
        if status(vol)["metadata"]["live_replicas"]:
            pytest.skip(f"no replica failed while the stores were full: {status(vol)['metadata']}")
        check_all(hashes)
        for d in dirs:  # space again: a clean unmount can save everything
            d.set("ok")
        vol.remount()
        check_all(hashes)


# --- more than m stores away -------------------------------------------------------


def test_three_stores_gone_give_eio_never_wrong_bytes(tmp_path: Path, dirs: list) -> None:
    with failure_volume(
        tmp_path, dirs, faulty=[3, 4, 5], allowed_log=[r"store [345]|fewer than|[Uu]nrecoverable"]
    ) as vol:
        data = {vol.mountpoint / f"g{i}": pattern(300 + i, 2 * MiB + i * 1000) for i in range(3)}
        for path, content in data.items():
            path.write_bytes(content)
        drop_caches()
        for i in (3, 4, 5):
            dirs[i].set("gone")
        drop_caches_nosync()
        good = failed = 0
        for path, content in data.items():
            g, f = read_pieces(path, content)
            good, failed = good + g, failed + f
        assert failed > 0, "every range read although 3 of 6 stores are gone"
        # Metadata keeps working; so do small (inline) files.
        root = vol.mountpoint
        assert sorted(os.listdir(root)) == sorted(p.name for p in data)
        (root / "dir").mkdir()
        (root / "dir" / "note").write_bytes(b"still here")
        os.rename(root / "dir" / "note", root / "dir" / "note2")
        assert (root / "dir" / "note2").read_bytes() == b"still here"
        assert os.stat(root / "g0").st_size == len(data[root / "g0"])
        assert vol.proc is not None and vol.proc.poll() is None, "the daemon died"
        for i in (3, 4, 5):
            dirs[i].set("ok")
        vol.remount()
        drop_caches()
        for path, content in data.items():
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()
        assert (root / "dir" / "note2").read_bytes() == b"still here"


# --- stores coming back ---------------------------------------------------------------


def test_a_store_that_comes_back_is_noticed(tmp_path: Path, dirs: list) -> None:
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint, count=2)
        index = store_index(vol, vol.stores[3])
        drop_caches()
        dirs[3].set("gone")

        def poke() -> None:  # reads and a write make the daemon touch store 3
            drop_caches_nosync()
            for path in hashes:
                sha256_file(path)
            write_pattern_file(vol.mountpoint / "poke", seed=5, size=MiB)

        assert wait_for(lambda: store_state(vol, index) == "failed", 10.0, poke), status(vol)
        check_all(hashes)
        dirs[3].set("ok")
        seconds = wait_for(lambda: store_state(vol, index) == "ok", RECOVERY_LIMIT)
        assert seconds is not None, json.dumps(status(vol)["stores"][index])
        check_all(hashes)


# --- what a store that was away leaves behind ----------------------------------------


def fsck_report(stores: Sequence[Path]) -> dict:
    return json.loads(cli("fsck", "--json", *stores, check=False).stdout)


def test_a_store_away_while_files_are_rewritten_leaves_nothing_behind(tmp_path: Path) -> None:
    """Files are rewritten (their old chunk versions become garbage) while
    store 1, which holds a metadata replica, is renamed away: the deletions
    that could not reach it are remembered and done once it is back, and its
    out-of-date metadata copy is removed at unmount. fsck then finds no
    orphan fragment and no stale copy."""
    with failure_volume(tmp_path, [], allowed_log=[r"metadata|replica|store 1"]) as vol:
        hashes = populate(vol.mountpoint, count=3, size=MiB + 4321)
        lost = vol.stores[1]
        away = lost.with_name("s1-away")
        os.rename(lost, away)
        deadline = time.monotonic() + 3.0
        seed = 500
        while time.monotonic() < deadline or store_state(vol, 1) != "failed":
            for path in list(hashes):
                hashes[path] = write_pattern_file(path, seed=seed, size=MiB + seed)
                seed += 1
            assert time.monotonic() < deadline + 30, status(vol)
        assert store_state(vol, 1) == "failed"

        def replaced() -> bool:  # its metadata copy is stale, a new one is live elsewhere
            metadata = status(vol)["metadata"]
            return "1" in metadata["stale_replicas"] and len(metadata["live_replicas"]) == M + 1

        assert wait_for(replaced, RECOVERY_LIMIT), status(vol)["metadata"]
        os.rename(away, lost)
        assert wait_for(lambda: store_state(vol, 1) == "ok", RECOVERY_LIMIT), status(vol)
        check_all(hashes)
    report = fsck_report(vol.stores)
    assert report["counts"]["orphan_fragments"] == 0, report
    assert report["clean"], report["findings"]
    vol.mount()
    check_all(hashes)


def test_a_vanished_store_under_writers_leaves_no_orphans(tmp_path: Path, dirs: list) -> None:
    """Store 3 vanishes (faultfs `gone`: every call says ENOENT) for a few
    seconds while files are rewritten and read: once it is back and the
    volume is unmounted cleanly, fsck finds no orphan fragment on it."""
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3"]) as vol:
        hashes = populate(vol.mountpoint, count=3, size=MiB + 4321)
        index = store_index(vol, vol.stores[3])
        drop_caches()
        dirs[3].set("gone")
        deadline = time.monotonic() + 3.0
        seed = 700
        while time.monotonic() < deadline or store_state(vol, index) != "failed":
            for path in list(hashes):
                hashes[path] = write_pattern_file(path, seed=seed, size=MiB + seed)
                seed += 1
                sha256_file(path)
            assert time.monotonic() < deadline + 30, status(vol)
        dirs[3].set("ok")
        assert wait_for(lambda: store_state(vol, index) == "ok", RECOVERY_LIMIT), status(vol)
        check_all(hashes)
    report = fsck_report(vol.stores)
    assert report["counts"]["orphan_fragments"] == 0, report
    assert report["clean"], report["findings"]


def test_reduced_redundancy_while_a_store_was_full_is_pending_repair(
    tmp_path: Path, dirs: list
) -> None:
    """A file written while a store is full has one fragment fewer per chunk
    (queued for repair). Unmounted before the repair: `ecfs umount` says so
    (exit 0) and fsck calls it a warning (the volume is clean). Once the store
    has room again, the repair happens (`ecfs repair --wait` follows it to the
    end): fsck has nothing to say."""
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3|[Nn]o space"]) as vol:
        hashes = populate(vol.mountpoint, count=1)
        dirs[3].set("enospc")
        late = vol.mountpoint / "late"
        hashes[late] = write_pattern_file(late, seed=71, size=MiB + 5)
        fsync_file(late)
        vol.unmount()  # still full: the repair had nowhere to go
        assert vol.umount_result is not None
        assert "wait for repair" in vol.umount_result.stderr, vol.umount_result
        dirs[3].set("ok")
        result = cli("fsck", "--json", *vol.stores, check=False)
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["clean"], report["findings"]
        queued = [f for f in report["findings"] if "queued for repair" in f["message"]]
        assert queued and all(f["severity"] == "warning" for f in queued), report["findings"]

        vol.mount()
        dirs[3].set("enospc")
        later = vol.mountpoint / "later"
        hashes[later] = write_pattern_file(later, seed=72, size=MiB + 7)
        fsync_file(later)
        dirs[3].set("ok")
        repaired = cli("repair", "--wait", vol.mountpoint)
        assert "0 chunks still queued" in repaired.stdout, repaired.stdout
        assert status(vol)["repair"]["chunks"] == 0
        check_all(hashes)
        vol.unmount()
        assert vol.umount_result is not None
        assert "repair" not in vol.umount_result.stderr, vol.umount_result
        report = fsck_report(vol.stores)
        assert report["clean"] and report["findings"] == [], report["findings"]
        vol.mount()


def test_fragments_that_had_no_room_are_rebuilt_once_there_is_room(
    tmp_path: Path, dirs: list
) -> None:
    """Chunks written while a store was full wait for repair; as soon as the
    store has room again (seen by the health loop's free-space refresh) they
    are rebuilt, without waiting out the retry delay and without an operator."""
    with failure_volume(tmp_path, dirs, faulty=[3], allowed_log=[r"store 3|[Nn]o space"]) as vol:
        dirs[3].set("enospc")
        path = vol.mountpoint / "while-full"
        digest = write_pattern_file(path, seed=73, size=MiB + 9)
        fsync_file(path)
        assert status(vol)["repair"]["chunks"] > 0
        dirs[3].set("ok")
        assert wait_for(lambda: status(vol)["repair"]["chunks"] == 0, RECOVERY_LIMIT), status(vol)[
            "repair"
        ]
        check_all({path: digest})
    report = fsck_report(vol.stores)
    assert report["clean"] and report["findings"] == [], report["findings"]


def test_deletions_remembered_across_an_unmount_are_done_at_the_next_mount(
    tmp_path: Path,
) -> None:
    """Store 4 is still away at unmount: the fragments that became garbage
    meanwhile stay on it. Once it is back, fsck calls them a warning (the
    volume remembers them), and the next mount deletes them."""
    with failure_volume(tmp_path, [], allowed_log=[r"store 4"]) as vol:
        hashes = populate(vol.mountpoint, count=2, size=MiB + 4321)
        lost = vol.stores[4]
        away = lost.with_name("s4-away")
        os.rename(lost, away)
        seed = 800
        while store_state(vol, 4) != "failed":
            for path in list(hashes):
                hashes[path] = write_pattern_file(path, seed=seed, size=MiB + seed)
                seed += 1
        for path in list(hashes):  # garbage made while it is known to be failed
            hashes[path] = write_pattern_file(path, seed=seed, size=MiB + seed)
            seed += 1
        vol.unmount()
        os.rename(away, lost)
        report = fsck_report(vol.stores)
        assert report["counts"]["orphan_fragments"] > 0, report
        assert report["clean"] and report["exit_status"] == 0, report["findings"]
        orphans = [f for f in report["findings"] if f["check"] == "no_orphan_fragments"]
        assert orphans and all(f["severity"] == "warning" for f in orphans), orphans
        vol.mount()
        check_all(hashes)
    report = fsck_report(vol.stores)
    assert report["counts"]["orphan_fragments"] == 0, report
    assert report["clean"], report["findings"]
