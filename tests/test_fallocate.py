"""fallocate(2) on a real mount (FileData.fallocate; needs the patched
pyfuse3 of scripts/pyfuse3): preallocation (mode 0, KEEP_SIZE, ENOSPC),
PUNCH_HOLE and ZERO_RANGE (whole chunks become holes whose fragments are
deleted, partial ranges go through the small-write log), degraded reads
of punched files, and a model-based test that mixes writes, fsync,
truncate, punch, zero range and reads with kill -9 of the daemon at random
points: every fsync'd state survives. In-process (FileData without FUSE,
on tests/test_smallwrites.py's volume): the errnos, punched records across
a crash, a hypothesis model with crashes, and the truncate crash bug the
kill -9 model found.

Mount test volumes: k=4, m=2, 128 KiB fragments, so a chunk is 512 KiB and
a patch of at most 64 KiB is logged (smallwrites.LOG_FRACTION)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core.errors import FsError
from ecfs.data.namespace import FILE_SIZE_MAX
from ecfs.storage.metadb.schema import ROOT_INODE
from ecfs.volume.assembly import Volume
from tests import test_smallwrites as sw
from tests.mounting import MountedVolume, mounted_volume
from tests.test_crash import ALLOWED_AFTER_KILL, fsck

KiB = 1024
MiB = 1024 * KiB
CHUNK = 512 * KiB
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def status(volume: MountedVolume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.ecfs.status"))


def fallocate_cmd(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """util-linux fallocate(1) (it never falls back to writing zeros)."""
    return subprocess.run(
        ["fallocate", *[os.fspath(a) for a in args]], capture_output=True, text=True, timeout=60
    )


def fallocate(path: Path, *args: str) -> None:
    done = fallocate_cmd(*args, path)
    assert done.returncode == 0, done.stderr


def fragment_files(volume: MountedVolume) -> int:
    return sum(1 for s in volume.stores for p in (s / "frags").rglob("*") if p.is_file())


def frag_dirs(stores: list[Path]) -> list[Path]:
    return [s / "frags" for s in stores]


def settled(volume: MountedVolume) -> bool:
    """Whether the stores hold exactly the fragments the metadata refers to
    (replaced and punched versions are deleted)."""
    expected = sum(store["fragments"] for store in status(volume)["stores"])
    return fragment_files(volume) == expected


def wait_for(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def vol(shared_volume: MountedVolume) -> MountedVolume:
    return shared_volume


def test_preallocate_extends_or_keeps_the_size(vol: MountedVolume) -> None:
    path = vol.mountpoint / "prealloc"
    fallocate(path, "-l", "3M")
    assert path.stat().st_size == 3 * MiB
    assert path.read_bytes() == bytes(3 * MiB)
    fallocate(path, "-n", "-o", "2M", "-l", "4M")  # KEEP_SIZE: only a reservation
    assert path.stat().st_size == 3 * MiB
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"abc", 100)
        os.posix_fallocate(fd, 1 * MiB, 4 * MiB)  # mode 0: extends to 5 MiB
        assert os.fstat(fd).st_size == 5 * MiB
        os.posix_fallocate(fd, 0, 1 * MiB)  # inside the file: no change
        assert os.fstat(fd).st_size == 5 * MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    vol.remount()
    data = path.read_bytes()
    assert len(data) == 5 * MiB and data[100:103] == b"abc"
    assert data.count(0) == 5 * MiB - 3


def test_preallocating_more_than_the_stores_hold_is_enospc(vol: MountedVolume) -> None:
    path = vol.mountpoint / "too-big"
    path.write_bytes(b"x")
    done = fallocate_cmd("-l", "1P", path)
    assert done.returncode != 0 and "No space left on device" in done.stderr, done.stderr
    done = fallocate_cmd("-n", "-l", "1P", path)
    assert done.returncode != 0 and "No space left on device" in done.stderr, done.stderr
    assert path.stat().st_size == 1
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as caught:
            os.posix_fallocate(fd, 0, 1 << 50)
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x"


def test_unsupported_modes_are_eopnotsupp(vol: MountedVolume) -> None:
    path = vol.mountpoint / "modes"
    write_file(path, os.urandom(2 * CHUNK))
    for flag in ("--collapse-range", "--insert-range"):
        done = fallocate_cmd(flag, "-o", "0", "-l", str(CHUNK), path)
        assert done.returncode != 0 and "Operation not supported" in done.stderr, done.stderr
    # PUNCH_HOLE without KEEP_SIZE (Linux refuses it before the filesystem).
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as caught:
            os_fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, CHUNK)
        assert caught.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert path.stat().st_size == 2 * CHUNK


def test_punching_whole_chunks_frees_their_fragments(vol: MountedVolume) -> None:
    path = vol.mountpoint / "punch-whole"
    content = bytearray(os.urandom(5 * CHUNK))
    write_file(path, bytes(content))
    wait_for(lambda: settled(vol), "garbage to settle")
    before = fragment_files(vol)
    blocks_before = path.stat().st_blocks
    # Chunks 1 and 2 whole, 100 bytes of chunk 0 and 1000 of chunk 3.
    start, end = CHUNK - 100, 3 * CHUNK + 1000
    fallocate(path, "-p", "-o", str(start), "-l", str(end - start))
    content[start:end] = bytes(end - start)
    assert path.stat().st_size == 5 * CHUNK
    assert path.read_bytes() == content
    fsync_path(path)
    wait_for(lambda: settled(vol), "the punched fragments to go")
    assert fragment_files(vol) <= before - 2 * 6
    assert path.stat().st_blocks <= blocks_before - 2 * CHUNK // 512
    vol.remount()
    assert path.read_bytes() == content
    assert fragment_files(vol) <= before - 2 * 6


@contextmanager
def private_tmpfs(path: Path, size: str = "256m") -> Iterator[Path]:
    """A tmpfs of its own at `path` (root only), so that its free space
    changes only with what the test does; unmounted at the end."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def test_punching_frees_space_in_statfs(tmp_path: Path) -> None:
    """statfs counts the stores' free space (refreshed every few seconds):
    it grows by the punched bytes. The stores are on a tmpfs of their own,
    so that nothing else changes its free space meanwhile."""
    with private_tmpfs(tmp_path / "fs") as base, mounted_volume(base) as volume:
        path = volume.mountpoint / "f"
        size = 48 * CHUNK  # 24 MiB, 36 MiB on the stores (one filesystem: k/n of it counts)
        write_file(path, os.urandom(size))
        wait_for(lambda: settled(volume), "garbage to settle")

        def free() -> int:
            st = os.statvfs(volume.mountpoint)
            return st.f_bfree * st.f_frsize

        time.sleep(6)  # a refresh of the stores' usage (volume.HEALTH_INTERVAL)
        before = free()
        fallocate(path, "-p", "-o", "0", "-l", str(size))
        fsync_path(path)
        assert path.read_bytes() == bytes(size)
        assert path.stat().st_blocks == 0
        wait_for(lambda: free() - before >= size * 9 // 10, "statfs to show the punched space")


def test_a_partial_punch_is_logged_not_reencoded(vol: MountedVolume) -> None:
    path = vol.mountpoint / "punch-partial"
    content = bytearray(os.urandom(3 * CHUNK))
    write_file(path, bytes(content))
    before = status(vol)
    fallocate(path, "-p", "-o", str(CHUNK + 4096), "-l", "8192")
    content[CHUNK + 4096 : CHUNK + 12288] = bytes(8192)
    fsync_path(path)
    after = status(vol)
    assert after["write_log"]["records_written"] > before["write_log"]["records_written"]
    # No chunk re-encoded: a rewrite of the 512 KiB chunk writes ~768 KiB.
    assert after["writes"]["bytes_out"] - before["writes"]["bytes_out"] < CHUNK
    assert path.read_bytes() == content
    vol.remount()
    assert path.read_bytes() == content


def test_zero_range_with_and_without_keep_size(vol: MountedVolume) -> None:
    path = vol.mountpoint / "zero-range"
    content = bytearray(os.urandom(2 * CHUNK + 5000))
    write_file(path, bytes(content))
    fallocate(path, "-z", "-o", "1000", "-l", str(CHUNK))
    content[1000 : 1000 + CHUNK] = bytes(CHUNK)
    assert path.read_bytes() == content
    # Past the end with KEEP_SIZE: the size stays.
    fallocate(path, "-z", "-n", "-o", str(2 * CHUNK), "-l", str(CHUNK))
    content[2 * CHUNK :] = bytes(len(content) - 2 * CHUNK)
    assert path.read_bytes() == content
    # Past the end without it: the file grows, the new bytes read zero.
    fallocate(path, "-z", "-o", str(2 * CHUNK + 10), "-l", str(2 * CHUNK))
    content.extend(bytes(4 * CHUNK + 10 - len(content)))
    assert path.read_bytes() == content
    fsync_path(path)
    vol.remount()
    assert path.read_bytes() == content


def test_punching_an_inline_file(vol: MountedVolume) -> None:
    path = vol.mountpoint / "inline"
    content = bytearray(os.urandom(10_000))
    write_file(path, bytes(content))
    fallocate(path, "-p", "-o", "100", "-l", "200")
    content[100:300] = bytes(200)
    assert path.read_bytes() == content
    fallocate(path, "-p", "-o", "0", "-l", "20000")  # all of it
    assert path.stat().st_size == 10_000
    assert path.read_bytes() == bytes(10_000)
    with path.open("r+b") as f:
        f.seek(5000)
        f.write(b"back")
    fsync_path(path)
    vol.remount()
    assert path.read_bytes() == bytes(5000) + b"back" + bytes(4996)


def test_punch_through_a_hard_link_then_rename_over_and_unlink(vol: MountedVolume) -> None:
    """Both names see the punch; a file renamed over the punched one and
    the unlinked last name leave no fragments of it behind."""
    wait_for(lambda: settled(vol), "garbage to settle")
    before = fragment_files(vol)
    first, second = vol.mountpoint / "linked", vol.mountpoint / "linked2"
    content = bytearray(os.urandom(3 * CHUNK))
    write_file(first, bytes(content))
    os.link(first, second)
    fd = os.open(second, os.O_RDWR)
    try:
        os.pwrite(fd, b"logged", CHUNK + 10)  # a small write: a log record at fsync
        os.fsync(fd)
    finally:
        os.close(fd)
    content[CHUNK + 10 : CHUNK + 16] = b"logged"
    fallocate(second, "-p", "-o", str(CHUNK - 5), "-l", str(CHUNK + 10))
    content[CHUNK - 5 : 2 * CHUNK + 5] = bytes(CHUNK + 10)
    assert first.read_bytes() == content == second.read_bytes()
    replacement = vol.mountpoint / "replacement"
    write_file(replacement, b"new")
    os.rename(replacement, first)
    assert second.read_bytes() == content
    second.unlink()
    assert first.read_bytes() == b"new"
    fsync_path(first)
    wait_for(lambda: settled(vol), "garbage to settle")
    assert fragment_files(vol) == before


def test_punched_file_reads_degraded(volume: MountedVolume) -> None:
    path = volume.mountpoint / "degraded"
    content = bytearray(os.urandom(4 * CHUNK + 777))
    write_file(path, bytes(content))
    for start, end in (
        (CHUNK, 2 * CHUNK),
        (2 * CHUNK + 10, 2 * CHUNK + 5000),
        (3 * CHUNK - 1, 3 * CHUNK + 3),
    ):
        fallocate(path, "-p", "-o", str(start), "-l", str(end - start))
        content[start:end] = bytes(end - start)
    fsync_path(path)
    volume.unmount()
    volume.mount(stores=volume.stores[2:])  # two of six stores gone
    assert path.read_bytes() == content


# -- model with kill -9 ---------------------------------------------------------

BLOCK = 4096
MODES = {
    "punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    "zero+": FALLOC_FL_ZERO_RANGE,
    "alloc": 0,
    "alloc-keep": FALLOC_FL_KEEP_SIZE,
}


def os_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself (os.posix_fallocate has no mode)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def random_op(rng: random.Random, size: int) -> tuple[str, int, int]:
    kind = rng.choice(
        ["write", "write", "small", "small", "punch", "punch", "zero", "zero+", "alloc",
         "alloc-keep", "truncate"]
    )  # fmt: skip
    offset = rng.randrange(min(size, 3 * CHUNK) + CHUNK)
    if kind == "small":
        return "write", offset, rng.randrange(1, 8 * KiB)
    if kind == "truncate":
        return kind, rng.randrange(3 * CHUNK), 0
    return kind, offset, rng.choice([rng.randrange(1, 16 * KiB), rng.randrange(1, 3 * CHUNK)])


def apply_op(model: bytearray, kind: str, offset: int, length: int, data: bytes) -> None:
    """What `kind` does to a file's bytes."""
    end = offset + length
    if kind == "write":
        model.extend(bytes(max(0, offset - len(model))))
        model[offset:end] = data
    elif kind == "truncate":
        del model[offset:]
        model.extend(bytes(offset - len(model)))
    else:
        if kind in ("punch", "zero", "zero+") and offset < len(model):
            stop = min(end, len(model))
            model[offset:stop] = bytes(stop - offset)
        if kind in ("zero+", "alloc") and end > len(model):
            model.extend(bytes(end - len(model)))


def run_op(fd: int, kind: str, offset: int, length: int, data: bytes) -> None:
    if kind == "write":
        os.pwrite(fd, data, offset)
    elif kind == "truncate":
        os.ftruncate(fd, offset)
    else:
        os_fallocate(fd, MODES[kind], offset, length)


def work(
    volume: MountedVolume,
    rng: random.Random,
    states: dict[str, list[bytes]],
    errors: list[str],
    killed: threading.Event,
) -> None:
    """Random ops until the daemon is gone (an OSError). `states[name]`:
    the file's last fsync'd content, then its content after each later op
    (the op in flight included: it may have been applied). Errors and
    wrong reads count only before `killed` is set (just before the kill:
    then anything may fail, or be cut short)."""
    fds: dict[str, int] = {}
    try:
        for name in states:
            fds[name] = os.open(volume.mountpoint / name, os.O_RDWR)
        for _ in range(400):
            name = rng.choice(list(states))
            model = bytearray(states[name][-1])
            kind, offset, length = random_op(rng, len(model))
            data = rng.randbytes(length) if kind == "write" else b""
            apply_op(model, kind, offset, length, data)
            states[name].append(bytes(model))
            run_op(fds[name], kind, offset, length, data)
            if rng.random() < 0.3:
                got = os.pread(fds[name], len(model) + 10, 0)
                if got != model and killed.is_set():
                    return  # a read cut short by the kill
                if got != model:
                    first = next(
                        (i for i, (x, y) in enumerate(zip(got, model, strict=False)) if x != y),
                        min(len(got), len(model)),
                    )
                    errors.append(
                        f"{name}: {kind} {offset} {length}: read back {len(got)} bytes, not"
                        f" {len(model)}, first difference at {first}"
                    )
                    return
            if rng.random() < 0.25:
                os.fsync(fds[name])
                states[name][:] = [bytes(model)]
    except OSError as exc:
        if not killed.is_set():
            errors.append(f"{exc!r} before the kill")
    finally:
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def check_survived(got: bytes, states: list[bytes], what: str) -> None:
    """`got` holds the fsync'd state states[0] or a later one, block by
    block (what was not fsync'd may be partly written back; the kernel
    writes a large write back in pieces, each of which may grow the size)."""
    sizes = [len(s) for s in states]
    assert min(sizes) <= len(got) <= max(sizes), f"{what}: size {len(got)} not in {sizes}"
    for offset in range(0, len(got), BLOCK):
        block = got[offset : offset + BLOCK]
        candidates = [s[offset : offset + BLOCK].ljust(len(block), b"\0") for s in states]
        if block in candidates:
            continue
        for i, byte in enumerate(block):
            assert any(c[i] == byte for c in candidates), f"{what}: byte {offset + i}"


@pytest.mark.parametrize("seed", [1, 2])
def test_model_with_kill_9(tmp_path: Path, seed: int) -> None:
    """Writes, small (logged) writes, truncates, punches, zero ranges and
    preallocations on two files, read back against a bytearray model and
    fsync'd at random; the daemon is killed with -9 at a random moment in
    each of four rounds and the volume mounted again: each file holds its
    last fsync'd state, or a later one. The volume ends with a clean fsck."""
    rng = random.Random(seed)
    with mounted_volume(tmp_path) as volume:
        states: dict[str, list[bytes]] = {}
        for name in ("a", "b"):
            write_file(volume.mountpoint / name, os.urandom(rng.randrange(3 * CHUNK)))
            states[name] = [(volume.mountpoint / name).read_bytes()]
        for round_ in range(4):
            errors: list[str] = []
            killed = threading.Event()
            thread = threading.Thread(
                target=work, args=(volume, random.Random(rng.random()), states, errors, killed)
            )
            thread.start()
            time.sleep(rng.uniform(0.2, 2.5))
            killed.set()
            volume.kill()
            thread.join(60)
            assert not thread.is_alive()
            assert not errors, errors
            volume.mount()
            for name in states:
                got = (volume.mountpoint / name).read_bytes()
                check_survived(got, states[name], f"round {round_}, file {name}")
                states[name] = [got]
        volume.unmount()
        report = fsck(volume.stores)
        bad = [f.message for f in report.errors if f.check not in ALLOWED_AFTER_KILL]
        assert not bad and not report.unrecoverable, bad
        volume.mount()


# -- in-process: FileData.fallocate without FUSE -----------------------------------
# (tests/test_smallwrites.py's volume: k=2, m=1, 128 KiB chunks, log_max 8 KiB)

SMALL_CHUNK = sw.CHUNK


def test_bad_arguments_and_modes(tmp_path: Path) -> None:
    stores = sw.make_volume(tmp_path)

    async def body(volume: Volume) -> None:
        data = volume.filedata
        ino = sw.new_file(volume, b"f")
        await data.write(ino, 0, b"x" * 100)
        cases = [
            (errno.EINVAL, 0, -1, 10),
            (errno.EINVAL, 0, 0, 0),
            (errno.EOPNOTSUPP, 0x08, 0, SMALL_CHUNK),  # COLLAPSE_RANGE
            (errno.EOPNOTSUPP, 0x20, 0, SMALL_CHUNK),  # INSERT_RANGE
            (errno.EOPNOTSUPP, 0x40, 0, SMALL_CHUNK),  # UNSHARE_RANGE
            (errno.EOPNOTSUPP, FALLOC_FL_PUNCH_HOLE, 0, 10),  # without KEEP_SIZE
            (errno.EOPNOTSUPP, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | 1, 0, 10),
            (errno.EFBIG, 0, FILE_SIZE_MAX, 10),
            (errno.ENOSPC, 0, 0, 1 << 60),
            (errno.ENOSPC, FALLOC_FL_KEEP_SIZE, 1 << 40, 1 << 60),
        ]
        for expected, mode, offset, length in cases:
            with pytest.raises(FsError) as caught:
                await data.fallocate(ino, mode, offset, length)
            assert caught.value.errno == expected, (mode, offset, length)
        with pytest.raises(FsError) as caught:
            await data.fallocate(ROOT_INODE, 0, 0, 10)
        assert caught.value.errno == errno.EISDIR
        assert volume.namespace.get(ino).size == 100
        assert await data.read(ino, 0, 200) == b"x" * 100

    sw.run(tmp_path, stores, body)


def test_punch_drops_or_hides_logged_records_also_after_a_crash(tmp_path: Path) -> None:
    stores = sw.make_volume(tmp_path)
    base = bytearray(sw.pattern(3, 3 * SMALL_CHUNK))
    expected = bytearray(base)

    async def before_crash(volume: Volume) -> None:
        data = volume.filedata
        ino = sw.new_file(volume, b"f")
        await data.write(ino, 0, bytes(base))
        await data.fsync(ino)
        for offset in (100, SMALL_CHUNK + 500, 2 * SMALL_CHUNK + 9000):
            await data.write(ino, offset, b"L" * 3000)
            expected[offset : offset + 3000] = b"L" * 3000
        await data.fsync(ino)
        assert sw.table_rows(volume) == 3
        old = data.chunks.get(ino, 1)
        # Chunk 1 whole: a hole, its record dropped with it.
        await data.fallocate(
            ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, SMALL_CHUNK, SMALL_CHUNK
        )
        expected[SMALL_CHUNK : 2 * SMALL_CHUNK] = bytes(SMALL_CHUNK)
        assert data.chunks.get(ino, 1) is None and not data.log.has(ino, 1)
        assert old is not None
        await data.fsync(ino)  # durable: the old fragments may go now
        for _ in range(600):  # garbage deletes them in the background
            if not any(next(s.rglob(f"{old.chunk_id:016x}.*"), None) for s in frag_dirs(stores)):
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError("the punched chunk's fragments are still there")
        # Partial ranges over records: newer zero records, no re-encode.
        refs = (data.chunks.get(ino, 0), data.chunks.get(ino, 2))
        await data.fallocate(ino, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 50, 2000)
        await data.fallocate(
            ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * SMALL_CHUNK + 8000, 3000
        )
        expected[50:2050] = bytes(2000)
        expected[2 * SMALL_CHUNK + 8000 : 2 * SMALL_CHUNK + 11000] = bytes(3000)
        await data.fsync(ino)
        assert (data.chunks.get(ino, 0), data.chunks.get(ino, 2)) == refs
        assert await data.read(ino, 0, 4 * SMALL_CHUNK) == expected
        raise sw.Crash

    async def after_crash(volume: Volume) -> None:
        data = volume.filedata
        ino = sw.lookup(volume, b"f")
        data.opened(ino)
        assert await data.read(ino, 0, 4 * SMALL_CHUNK) == expected
        await data.fold_all()
        assert sw.table_rows(volume) == 0
        assert await data.read(ino, 0, 4 * SMALL_CHUNK) == expected

    sw.run(tmp_path, stores, before_crash)
    sw.run(tmp_path, stores, after_crash)


FALLOC_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, 3 * SMALL_CHUNK),
            st.sampled_from([1, 100, 4096, 9000, SMALL_CHUNK + 7]),
            st.integers(0, 255),
        ),
        st.tuples(
            st.sampled_from(["punch", "zero", "zero+", "alloc", "alloc-keep"]),
            st.integers(0, 3 * SMALL_CHUNK),
            st.sampled_from([1, 3000, SMALL_CHUNK - 1, SMALL_CHUNK, 2 * SMALL_CHUNK + 5]),
        ),
        st.tuples(st.just("fsync")),
        st.tuples(st.just("truncate"), st.integers(0, 3 * SMALL_CHUNK)),
        st.tuples(st.just("fold")),
        st.tuples(st.just("crash")),
        st.tuples(st.just("read"), st.integers(0, 3 * SMALL_CHUNK), st.integers(1, SMALL_CHUNK)),
    ),
    max_size=25,
)


@settings(
    max_examples=int(os.environ.get("ECFS_MODEL_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=FALLOC_OPS)
def test_model_in_process(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]) -> None:
    """Like test_smallwrites::test_model, with punch, zero range and
    preallocation among the ops: reads agree with a bytearray model, and
    a crash (no write-back, no fold) keeps exactly the last fsync'd state."""
    root = tmp_path_factory.mktemp("falloc-model")
    stores = sw.make_volume(root)
    model = bytearray()
    durable = bytearray()

    async def main() -> None:
        nonlocal model, durable
        ino = None
        pending = list(ops) + [("read", 0, 5 * SMALL_CHUNK)]
        while True:
            try:
                async with sw.mounted(root, stores) as volume:
                    data = volume.filedata
                    if ino is None:
                        ino = sw.new_file(volume, b"f")
                        await data.fsync(ino)
                    else:
                        data.opened(ino)
                        assert await data.read(ino, 0, 5 * SMALL_CHUNK) == durable
                        model = bytearray(durable)
                    while pending:
                        op = pending.pop(0)
                        kind = op[0]
                        if kind == "write":
                            _, offset, length, value = op
                            piece = bytes([value]) * length
                            await data.write(ino, offset, piece)
                            apply_op(model, "write", offset, length, piece)
                        elif kind in MODES:
                            _, offset, length = op
                            await data.fallocate(ino, MODES[kind], offset, length)
                            apply_op(model, kind, offset, length, b"")
                        elif kind == "fsync":
                            await data.fsync(ino)
                            durable = bytearray(model)
                        elif kind == "truncate":
                            await data.truncate(ino, op[1])
                            apply_op(model, "truncate", op[1], 0, b"")
                        elif kind == "fold":
                            await data.fold_all()
                        elif kind == "read":
                            _, offset, length = op
                            got = await data.read(ino, offset, length)
                            assert got == model[offset : offset + length]
                        elif kind == "crash":
                            await data.fsync(ino)
                            durable = bytearray(model)
                            raise sw.Crash
                    else:
                        await data.fsync(ino)
                        durable = bytearray(model)
                        return
            except sw.Crash:
                pass

    trio.run(main)


def test_truncate_then_crash_never_brings_back_bytes_past_the_cut(tmp_path: Path) -> None:
    """Found by the kill -9 model: truncate into a stored chunk committed the
    new size but left the cut chunk in a buffer; a crash before its
    write-back kept the old version, whose bytes past the cut came back
    when the file grew again. The cut version now commits with the size."""
    stores = sw.make_volume(tmp_path)
    base = sw.pattern(5, 2 * SMALL_CHUNK)
    cut = SMALL_CHUNK // 3

    async def before_crash(volume: Volume) -> None:
        data = volume.filedata
        ino = sw.new_file(volume, b"f")
        other = sw.new_file(volume, b"other")
        await data.write(ino, 0, base)
        await data.fsync(ino)
        await data.truncate(ino, cut)
        await data.fsync(other)  # every commit so far is durable, the truncate's too
        raise sw.Crash

    async def after_crash(volume: Volume) -> None:
        data = volume.filedata
        ino = sw.lookup(volume, b"f")
        data.opened(ino)
        assert volume.namespace.get(ino).size == cut
        await data.write(ino, SMALL_CHUNK - 10, b"end")  # grows the file again
        expected = base[:cut] + bytes(SMALL_CHUNK - 10 - cut) + b"end"
        assert await data.read(ino, 0, 2 * SMALL_CHUNK) == expected
        await data.fsync(ino)
        assert await data.read(ino, 0, 2 * SMALL_CHUNK) == expected

    sw.run(tmp_path, stores, before_crash)
    sw.run(tmp_path, stores, after_crash)
