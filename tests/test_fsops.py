"""Issue 13 findings about file-system operations: far-future timestamps and
a failing shutdown (A0), system.* xattrs and xattr bounds (B5), control
commands (C8, C9), ctime ordering against the kernel's clock (E17),
read-only remount (E18) and open by handle (E19).

In-process tests drive `Namespace` and the control parser; the rest run on
real mounts through the real CLI (tests/mounting.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecfs.core import host
from ecfs.core.errors import EcfsError, FsError
from ecfs.data.namespace import (
    FILE_SIZE_MAX,
    TIME_NS_MAX,
    TIME_NS_MIN,
    Namespace,
    clamp_time_ns,
)
from tests import test_ecosystem, test_failures
from tests.mounting import FUSE_MISSING_REASON, MountedVolume, cli
from tests.test_namespace import Env, finish_env, make_env

ROOT = 1
REG = 0o100000

requires_mount = [
    pytest.mark.mount,
    pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or ""),
]

_libc = ctypes.CDLL(None, use_errno=True)

#: Year 2514 in ns (touch -d 'May 30 01:53:03 UTC 2514'): past the signed 64-bit range.
YEAR_2514_NS = 17_180_473_983 * 10**9


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = make_env(tmp_path)
    yield environment
    finish_env(environment)


# --- A0: timestamps are validated when set -------------------------------------------

extreme_times = st.one_of(
    st.integers(min_value=-(1 << 80), max_value=1 << 80),
    st.sampled_from(
        [
            0, -1, 1 << 63, (1 << 63) - 1, -(1 << 63), -(1 << 63) - 1, YEAR_2514_NS,
            -YEAR_2514_NS, (1 << 64), 10**9 * (1 << 62), 999_999_999, 10**9 - 1 + (1 << 63),
        ]
    ),  # fmt: skip
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    atime=st.none() | extreme_times,
    mtime=st.none() | extreme_times,
    defer=st.booleans(),
    size=st.none() | st.integers(min_value=-(1 << 64), max_value=1 << 65),
)
def test_setattr_with_extreme_values_never_fails_later(
    env: Env, atime: int | None, mtime: int | None, defer: bool, size: int | None
) -> None:
    """Any time is clamped to the storable range when it is set; a size
    past 2^63-1 is EFBIG, a negative one EINVAL: nothing is left for a
    deferred write to trip over, and a new entry in a far-future directory
    can be created."""
    ns = env.ns
    name = f"d{env.clock.now}".encode()
    directory = ns.mkdir(ROOT, name, 0o755, 0, 0)
    f = ns.create(directory.id, b"f", REG | 0o644, 0, 0)
    ns.setattr(directory.id, atime_ns=atime, mtime_ns=mtime, defer=True)
    if size is not None:
        if size < 0:
            expected: int | None = errno.EINVAL
        elif size > FILE_SIZE_MAX:
            expected = errno.EFBIG
        else:
            expected = None
        if expected is not None:
            with pytest.raises(FsError) as caught:
                ns.setattr(f.id, size=size, atime_ns=atime)
            assert caught.value.errno == expected
        else:
            ns.setattr(f.id, size=size, atime_ns=atime, mtime_ns=mtime)
            assert f.size == size
    ns.setattr(f.id, atime_ns=atime, mtime_ns=mtime, defer=defer)
    for node, old in ((directory, None), (f, None)):
        for value in (node.atime_ns, node.mtime_ns, node.ctime_ns):
            assert TIME_NS_MIN <= value <= TIME_NS_MAX, old
    if atime is not None:
        assert f.atime_ns == clamp_time_ns(atime)
    if mtime is not None:
        assert directory.mtime_ns == clamp_time_ns(mtime)
    ns.create(directory.id, b"new", REG | 0o644, 0, 0)  # the EIO
    ns.persist_dirty(ns.dirty_inodes())
    assert not ns.dirty_inodes()


def test_year_2514_is_clamped_to_2262(env: Env) -> None:
    d = env.ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    env.ns.setattr(d.id, atime_ns=YEAR_2514_NS, mtime_ns=YEAR_2514_NS, defer=True)
    assert d.mtime_ns == d.atime_ns == TIME_NS_MAX
    env.ns.create(d.id, b"new", REG | 0o644, 0, 0)
    assert env.reopen().get(d.id).atime_ns == TIME_NS_MAX


def test_one_unwritable_row_does_not_hold_back_the_others(env: Env) -> None:
    """Defence in depth: if a dirty row cannot be written (a bug that slipped
    past validation), persist_dirty writes every other row, keeps the bad one
    dirty and raises an EcfsError naming it."""
    good = env.ns.create(ROOT, b"good", REG | 0o644, 0, 0)
    bad = env.ns.create(ROOT, b"bad", REG | 0o644, 0, 0)
    env.ns.setattr(good.id, mode=0o600, defer=True)
    env.ns.setattr(bad.id, mode=0o600, defer=True)
    bad.atime_ns = 1 << 70  # what validation prevents: a value SQLite cannot store
    with pytest.raises(EcfsError, match=f"inode {bad.id}"):
        env.ns.persist_dirty(env.ns.dirty_inodes())
    assert env.reopen().get(good.id).mode & 0o777 == 0o600
    assert env.ns.dirty_inodes() == [bad.id]
    bad.atime_ns = 5  # repaired, so that the teardown oracles see a clean cache
    env.ns.persist_dirty([bad.id])


def test_the_clock_never_goes_backwards(tmp_path: Path) -> None:
    """E17 in-process: a clock stepped back (or past 2262) never yields a
    time earlier than one already handed out, nor one that cannot be stored."""
    env = make_env(tmp_path)
    second = 10**9
    times = iter([10, 20, 5, 1 << 64, 30, 7 * second, 7 * second - 5, 2 * second, 3 * second, 3 * second])
    ns = Namespace(env.db, lambda: next(times))
    try:
        # A lag of less than CLOCK_STEP_NS is held at the last stamp; a
        # larger step back is followed (as by the kernel).
        expected = [10, 20, 20, TIME_NS_MAX, 30, 7 * second, 7 * second, 2 * second, 3 * second]
        assert [ns.now_ns() for _ in range(9)] == expected
        ns.kernel_time_seen(3 * second + 500)
        assert ns.now_ns() == 3 * second + 500  # the clock says 3 s: the kernel's time is later
    finally:
        finish_env(env)


# --- A0 on a real mount ---------------------------------------------------------------


@pytest.mark.mount
def test_far_future_timestamp_keeps_every_change(volume: MountedVolume) -> None:
    """The issue's reproduction: touch -d year 2514 on a directory, then a
    new file in it, unmount (clean), remount: everything is there, and the
    time reads as the last storable one (2262)."""
    mnt = volume.mountpoint
    (mnt / "d").mkdir()
    (mnt / "d" / "keep").write_text("keep\n")
    os.sync()
    subprocess.run(["touch", "-d", "May 30 01:53:03 UTC 2514", str(mnt / "d")], check=True)
    (mnt / "d" / "new").write_text("x\n")
    os.utime(mnt / "d" / "keep", ns=(-(1 << 62), 1 << 62))
    subprocess.run(["touch", "-d", "1600-01-01 UTC", str(mnt / "d" / "new")], check=True)
    volume.unmount()
    assert "cleanly" in (volume.umount_result.stderr + volume.log_text())
    volume.mount()
    assert (mnt / "d" / "keep").read_text() == "keep\n"
    assert (mnt / "d" / "new").read_text() == "x\n"
    assert os.stat(mnt / "d").st_atime_ns == TIME_NS_MAX  # its mtime moved on with "new"
    assert os.stat(mnt / "d" / "keep").st_mtime_ns == 1 << 62
    assert os.stat(mnt / "d" / "new").st_mtime_ns == TIME_NS_MIN
    volume.unmount()
    fsck = cli("fsck", *volume.stores, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    volume.mount()


#: Times utimensat(2) can carry (seconds in a signed 64-bit time_t).
_utime_ns = st.one_of(
    st.integers(min_value=-(1 << 62) * 10**9, max_value=(1 << 62) * 10**9),
    st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.sampled_from([YEAR_2514_NS, TIME_NS_MAX, TIME_NS_MAX + 1, TIME_NS_MIN, TIME_NS_MIN - 1, 0, -1]),
)


@pytest.mark.mount
def test_utimens_fuzz_on_a_mount(volume: MountedVolume) -> None:
    """utimensat with extreme times on a directory and a file: every call
    succeeds, the directory reads back the clamped times at once (a regular
    file's the kernel keeps from its own cache until it drops the inode),
    entries can still be made in it, out-of-range nanoseconds are EINVAL
    (from the kernel), and after a clean unmount and a remount the last
    values, clamped, are there."""
    mnt = volume.mountpoint
    d, f = mnt / "d", mnt / "f"
    d.mkdir()
    f.write_bytes(b"f")
    last: list[tuple[int, int]] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(atime=_utime_ns, mtime=_utime_ns)
    def apply(atime: int, mtime: int) -> None:
        os.utime(d, ns=(atime, mtime))
        os.utime(f, ns=(atime, mtime))
        st_d = os.stat(d)
        assert (st_d.st_atime_ns, st_d.st_mtime_ns) == (clamp_time_ns(atime), clamp_time_ns(mtime))
        (d / "e").write_bytes(b"e")
        (d / "e").unlink()
        os.utime(d, ns=(atime, mtime))
        last[:] = [(atime, mtime)]

    apply()

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]

    times = (Timespec * 2)(Timespec(0, 10**9), Timespec(0, -1))
    if _libc.utimensat(-100, os.fsencode(f), times, 0) == 0:
        raise AssertionError("utimensat with tv_nsec = 10^9 succeeded")
    assert ctypes.get_errno() == errno.EINVAL
    volume.unmount()
    assert "cleanly" in volume.log_text()
    volume.mount()
    atime, mtime = last[0]
    for path in (d, f):
        st_p = os.stat(path)
        assert (st_p.st_atime_ns, st_p.st_mtime_ns) == (clamp_time_ns(atime), clamp_time_ns(mtime))


@pytest.mark.mount
def test_truncate_near_2_to_the_63(volume: MountedVolume) -> None:
    """Sizes near 2^63: the largest one works, past it the kernel or ecfs
    refuses with EFBIG/EINVAL; the mount stays up and the file shrinks back."""
    path = volume.mountpoint / "big"
    path.write_bytes(b"abc")
    with open(path, "r+b") as f:
        os.truncate(f.fileno(), FILE_SIZE_MAX)
        assert os.fstat(f.fileno()).st_size == FILE_SIZE_MAX
        for size in (FILE_SIZE_MAX + 1, 1 << 64):
            with pytest.raises((OSError, OverflowError)) as caught:
                os.truncate(f.fileno(), size)
            if isinstance(caught.value, OSError):
                assert caught.value.errno in (errno.EFBIG, errno.EINVAL)
        with pytest.raises(OSError) as write_error:
            os.pwrite(f.fileno(), b"x", FILE_SIZE_MAX)
        assert write_error.value.errno in (errno.EFBIG, errno.EINVAL)
        os.truncate(f.fileno(), 2)
    assert path.read_bytes() == b"ab"


# --- A0: a failing shutdown is never reported clean ------------------------------------

#: The faultfs stores of test_failures (module-scoped: six faultfs mounts).
faulty_dirs = test_failures.faulty_dirs
dirs = test_failures.dirs


@pytest.mark.mount
@pytest.mark.skipif(FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or "")
@pytest.mark.parametrize("failing", ["data-stores", "every-store"])
def test_a_failed_write_back_at_unmount_is_reported(
    tmp_path: Path, dirs: list, failing: str
) -> None:
    """More than m stores (only those without a metadata copy, or all of
    them) fail writes while a file's data is still buffered: `ecfs umount`
    must exit 1 and say that writing back failed (it said nothing and
    exited 0), the daemon must exit non-zero, and every other change must
    still be there after a remount."""
    allowed = [r"write-back failed|EIO|I/O error|not durable|replica|unmount|failed", r"store \d"]
    faulty = range(3, 6) if failing == "data-stores" else range(6)  # copies: stores 0..m
    with test_failures.failure_volume(tmp_path, dirs, faulty=faulty, allowed_log=allowed) as vol:
        (vol.mountpoint / "early").write_bytes(b"e" * 1000)
        (vol.mountpoint / "dir").mkdir()
        fd = os.open(vol.mountpoint / "late", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, os.urandom(600_000))  # buffered in the daemon, not written back
        for i in faulty:
            dirs[i].set("enospc")
        try:
            os.close(fd)  # the close reports the write-back error (EIO) ...
        except OSError:
            pass  # ... and the data stays buffered, to be tried again at unmount
        vol.unmount(check=False)
        result = vol.umount_result
        assert result is not None and result.returncode == 1, (result, vol.log_tail())
        assert "writing back failed" in result.stderr, result.stderr
        kept = "the latest metadata is kept in" in result.stderr
        assert kept == (failing == "every-store"), result.stderr
        assert vol.returncode == 1, vol.log_tail()
        assert "cleanly" not in vol.log_text()
        for d in dirs:
            d.set("ok")
        if failing == "data-stores":  # the metadata was durable: nothing else is lost
            vol.mount()
            assert (vol.mountpoint / "early").read_bytes() == b"e" * 1000
            assert (vol.mountpoint / "dir").is_dir()
            assert (vol.mountpoint / "late").exists()


# --- E17: times never go backwards as the kernel sees them ---------------------------


@pytest.mark.mount
def test_ctime_never_goes_backwards_against_kernel_stamped_times(volume: MountedVolume) -> None:
    """fstests generic/423's failure: a socket/FIFO made (stamped by ecfs)
    before `ln` showed a later ctime than the linked file, whose ctime the
    kernel stamps itself (writeback cache) from its coarse clock. Both
    directions, many times: a reference made by ecfs before a kernel-stamped
    change, and a kernel-stamped change before an ecfs-stamped one; and a
    CLOCK_REALTIME_COARSE reading (the kernel's own clock) taken before a
    change is never later than the ctime after it."""
    mnt = volume.mountpoint
    target = mnt / "target"
    target.write_bytes(b"t")
    coarse = 5  # CLOCK_REALTIME_COARSE
    for i in range(300):
        ref = mnt / f"ref{i}"
        os.mkfifo(ref)  # stamped by ecfs
        os.link(target, mnt / f"link{i}")  # the file's ctime: stamped by the kernel
        assert os.stat(target).st_ctime_ns >= os.stat(ref).st_ctime_ns, i
        before = time.clock_gettime_ns(coarse)
        os.chmod(target, 0o600 | (i & 0o77))  # kernel-stamped
        assert os.stat(target).st_ctime_ns >= before, i
        later = mnt / f"later{i}"
        os.mkfifo(later)  # ecfs-stamped after the kernel-stamped chmod
        assert os.stat(later).st_ctime_ns >= os.stat(target).st_ctime_ns, i
        os.link(target, mnt / f"again{i}")  # kernel-stamped
        after_link = mnt / f"after_link{i}"
        os.mkfifo(after_link)  # ecfs-stamped
        assert os.stat(after_link).st_ctime_ns >= os.stat(target).st_ctime_ns, i
        before = time.clock_gettime_ns(coarse)
        os.mkdir(mnt / f"dir{i}")  # ecfs-stamped
        assert os.stat(mnt / f"dir{i}").st_ctime_ns >= before, i


# --- B5: system.* xattrs and the per-inode xattr bound -------------------------------


def test_system_xattrs_are_refused_and_hidden(env: Env) -> None:
    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    for name in (b"system.posix_acl_access", b"system.foo", b"system.nfs4_acl", b"system."):
        with pytest.raises(FsError) as caught:
            ns.setxattr(f.id, name, b"v")
        assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(FsError) as caught:
            ns.removexattr(f.id, name)
        assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(FsError) as caught:
            ns.getxattr(f.id, name)
        assert caught.value.errno == errno.ENODATA
    ns.setxattr(f.id, b"user.ok", b"v")
    assert ns.listxattr(f.id) == [b"user.ok"]


def test_xattr_bytes_per_inode_are_bounded(env: Env) -> None:
    from ecfs.data.namespace import XATTR_SIZE_MAX, XATTR_TOTAL_MAX

    ns = env.ns
    f = ns.create(ROOT, b"f", REG | 0o644, 0, 0)
    ns.setxattr(f.id, b"user.a", b"a" * XATTR_SIZE_MAX)
    ns.setxattr(f.id, b"user.a", b"b" * XATTR_SIZE_MAX)  # a replacement counts once
    room = XATTR_TOTAL_MAX - (6 + XATTR_SIZE_MAX) - 6
    with pytest.raises(FsError) as caught:
        ns.setxattr(f.id, b"user.b", b"x" * (room + 1))
    assert caught.value.errno == errno.ENOSPC
    ns.setxattr(f.id, b"user.b", b"x" * room)  # exactly full
    with pytest.raises(FsError) as caught:
        ns.setxattr(f.id, b"user.c", b"")
    assert caught.value.errno == errno.ENOSPC
    ns.removexattr(f.id, b"user.a")
    ns.setxattr(f.id, b"user.c", b"y" * 1000)


@pytest.mark.mount
def test_system_xattrs_as_a_second_user(volume: MountedVolume) -> None:
    """A local user (nobody) can neither set nor remove system.* xattrs on
    root's files, the mount root or its own file (EOPNOTSUPP, as ext4),
    and cannot grow one file's xattrs past the bound (ENOSPC)."""
    from tests.as_user import NOBODY, run_as_user

    mnt = volume.mountpoint
    os.chmod(mnt, 0o777)
    (mnt / "roots").write_text("root's\n")
    os.chmod(mnt / "roots", 0o666)
    out = run_as_user(
        NOBODY,
        NOBODY,
        mnt,
        """
        open("mine", "w").close()
        results = {}
        for path in (".", "roots", "mine"):
            for name in ("system.foo", "system.posix_acl_access", "system.posix_acl_default"):
                results[f"set {path} {name}"] = attempt(os.setxattr, path, name, b"x" * 100)
                results[f"remove {path} {name}"] = attempt(os.removexattr, path, name)
        big = b"v" * 65536
        results["fill"] = [attempt(os.setxattr, "mine", f"user.{i}", big) for i in range(4)]
        results["list"] = sorted(os.listxattr("mine"))
        print(json.dumps(results))
        """,
    )
    import json

    results = json.loads(out)
    fill, listed = results.pop("fill"), results.pop("list")
    # The kernel answers a removal of a file's (not a directory's) default
    # ACL itself with success: a no-op that never reaches ecfs.
    for key in ("remove roots system.posix_acl_default", "remove mine system.posix_acl_default"):
        assert results.pop(key) in ("ok", "ENOTSUP", "EPERM")
    assert set(results.values()) <= {"ENOTSUP", "EPERM"}, json.dumps(results, indent=0)
    assert all(v == "ENOTSUP" for k, v in results.items() if k.startswith("set")), results
    assert fill[0] == "ok" and "ENOSPC" in fill, fill
    assert not any(name.startswith("system.") for name in listed), listed
    assert not [n for n in os.listxattr(mnt) if n.startswith("system.")]


# --- C9: every control argument is validated -----------------------------------------

control_words = st.one_of(
    st.sampled_from(
        ["scrub", "scrub-stop", "repair", "urgent", "normal", "store-add", "store-replace",
         "store-remove", "nan", "inf", "-inf", "-1", "0", "1e400", "0.5", "30", "''", '""',
         "/abs/path", "rel/path", ".", "..", "/", "3", "x" * 40, "0" * 32, "'a b'", "\\0", "\x00",
         "1_000", "0x10"]
    ),  # fmt: skip
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(words=st.lists(control_words, max_size=4), raw=st.none() | st.text(max_size=40))
def test_control_grammar_fuzz(words: list[str], raw: str | None) -> None:
    """Any text gives a validated Command or an FsError (EINVAL): never
    another exception, never a relative or empty path, never a scrub
    limit that is not a positive finite number."""
    from ecfs.volume.control import Command, parse_command

    text = raw if raw is not None else " ".join(words)
    try:
        command = parse_command(text)
    except FsError as exc:
        assert exc.errno == errno.EINVAL
        assert "refused" in str(exc)
        return
    assert isinstance(command, Command)
    if command.seconds is not None:
        assert command.verb == "scrub" and 0 < command.seconds < float("inf")
    for path in (command.new, command.old):
        if path is not None and not path.isdigit() and len(path) != 32:
            assert os.path.isabs(path) and "\0" not in path


@pytest.mark.parametrize(
    "text",
    ["scrub nan", "scrub inf", "scrub -1", "scrub 0", "scrub abc", "scrub 1 2", "store-add relative/path",
     "store-add ''", "store-add", "store-replace 0 ''", "store-replace '' /new", "store-remove rel",
     "repair maybe", "frobnicate", "", "   ", "scrub 'unterminated", "store-add '/a\x00b'"],
)  # fmt: skip
def test_bad_control_commands_are_refused(text: str) -> None:
    from ecfs.volume.control import parse_command

    with pytest.raises(FsError) as caught:
        parse_command(text)
    assert caught.value.errno == errno.EINVAL


def test_good_control_commands_parse() -> None:
    from ecfs.volume.control import Command, parse_command

    assert parse_command("scrub") == Command("scrub")
    assert parse_command("scrub 2.5") == Command("scrub", seconds=2.5)
    assert parse_command("repair urgent") == Command("repair", urgent=True)
    assert parse_command("store-add '/a b/../c'") == Command("store-add", new="/c")
    assert parse_command("store-replace 3 /n") == Command("store-replace", old="3", new="/n")
    assert parse_command("store-remove /old/") == Command("store-remove", old="/old")


@pytest.mark.mount
def test_bad_control_input_through_the_mount(volume: MountedVolume) -> None:
    """The issue's cases through setfattr: a clean EINVAL, nothing started,
    no /relative/path made, and a later scrub runs to its end."""
    mnt = volume.mountpoint
    for text in ("scrub nan", "scrub inf", "store-add relative/path", "store-add ''", "store-add"):
        with pytest.raises(OSError) as caught:  # what setfattr -n user.ecfs.control -v TEXT does
            os.setxattr(mnt, "user.ecfs.control", text.encode())
        assert caught.value.errno == errno.EINVAL, text
    assert not Path("/relative/path").exists()
    from tests.volume_files import status

    assert status(volume)["scrub"]["running"] is False
    assert status(volume)["store_change"] is None
    (mnt / "f").write_bytes(b"x" * 300_000)
    done = cli("scrub", mnt, timeout=60)
    assert done.returncode == 0
    empty = cli("store", "add", mnt, "", check=False)
    assert empty.returncode == 2 and "empty" in empty.stderr, empty


# --- C8: a store inside the mountpoint is refused, without a deadlock ----------------


@pytest.mark.mount
@pytest.mark.allow_log(r"store add failed: .* (inside the mountpoint|on the ecfs volume)")
def test_store_add_inside_the_mountpoint_is_refused(volume: MountedVolume, tmp_path: Path) -> None:
    mnt = volume.mountpoint
    for inner in (mnt / "inner", mnt / "deeper" / "inner"):
        result = cli("store", "add", mnt, inner, check=False, timeout=60)
        assert result.returncode == 1, result
        assert "inside the mountpoint" in result.stderr, result.stderr
    os.mkdir(mnt / "d")
    bind = tmp_path / "bind"  # the same mount under another path
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(mnt / "d"), str(bind)], check=True)
    try:
        result = cli("store", "add", mnt, bind / "inner", check=False, timeout=60)
        assert result.returncode == 1 and "on the ecfs volume" in result.stderr, result
    finally:
        subprocess.run(["umount", str(bind)], check=True)
    assert not (mnt / "inner").exists()
    (mnt / "after").write_text("the mount still answers")
    assert (mnt / "after").read_text() == "the mount still answers"


# --- E18: mount -o remount,ro and back ------------------------------------------------


@test_ecosystem.requires_mount_helper
@pytest.mark.mount
def test_remount_read_only_and_back(volume: MountedVolume) -> None:
    """`mount -o remount,ro MNT` (mount(8) runs mount.fuse.ecfs, which ran
    `ecfs mount -o remount,ro` and failed: "unknown mount option 'remount'")
    makes the mount read-only (EROFS, reads work, its other flags kept);
    remount,rw makes it writable again; the same daemon serves throughout."""
    mnt = volume.mountpoint
    (mnt / "before").write_text("before\n")
    env = test_ecosystem.helper_env(volume.log_path)
    pid = volume.proc.pid if volume.proc else None
    flags_before = set(test_ecosystem.fuse_mount_options(mnt)[1].split(",")) - {"rw"}
    result = test_ecosystem.run("mount", "-o", "remount,ro", mnt, env=env)
    assert result.returncode == 0, result.stderr
    fstype, mount_opts, _ = test_ecosystem.fuse_mount_options(mnt)
    assert fstype == "fuse.ecfs" and "ro" in mount_opts.split(",")
    assert flags_before <= set(mount_opts.split(",")), (flags_before, mount_opts)
    for attempt in (
        lambda: (mnt / "new").write_text("x"),
        lambda: (mnt / "before").write_text("changed"),
        lambda: os.mkdir(mnt / "dir"),
        lambda: os.chmod(mnt / "before", 0o600),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS
    assert (mnt / "before").read_text() == "before\n"
    result = test_ecosystem.run("mount", "-o", "remount,rw", mnt, env=env)
    assert result.returncode == 0, result.stderr
    assert "rw" in test_ecosystem.fuse_mount_options(mnt)[1].split(",")
    (mnt / "after").write_text("after\n")
    assert (mnt / "after").read_text() == "after\n"
    # The CLI itself, as the helper calls it (the source is ignored on a remount).
    cli("mount", "-o", "remount,ro,noatime", "ecfs", mnt)
    with pytest.raises(OSError) as caught:
        (mnt / "again").write_text("x")
    assert caught.value.errno == errno.EROFS
    cli("mount", "-o", "remount,rw", "ecfs", mnt)
    assert volume.proc is not None and volume.proc.pid == pid and volume.proc.poll() is None


def test_remount_options_parse() -> None:
    from ecfs.core.errors import VolumeError
    from ecfs.frontend.mount import parse_options

    parsed = parse_options(["rw,remount,ro,strictatime,_netdev,repair_rate=10M"])
    assert parsed.remount and parsed.remount_flags == ["rw", "ro", "strictatime"]
    with pytest.raises(VolumeError, match="strictatime"):
        parse_options(["strictatime"])  # only a remount takes it
    assert not parse_options(["ro,noatime"]).remount


# --- E19: open by file handle ---------------------------------------------------------


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 128),
    ]


def _name_to_handle(path: Path) -> _FileHandle:
    handle = _FileHandle()
    handle.handle_bytes = 128
    mount_id = ctypes.c_int()
    at_fdcwd = -100
    if _libc.name_to_handle_at(
        at_fdcwd, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0
    ):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
    return handle


def _open_by_handle(mount_fd: int, handle: _FileHandle, flags: int = os.O_RDONLY) -> int:
    fd = int(_libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags))
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd


def _drop_caches() -> None:
    assert host.drop_caches()


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at and drop_caches need root")
def test_open_by_handle_after_the_kernel_forgot_the_inode(volume: MountedVolume) -> None:
    """fstests' open_by_handle (generic/426...): handles of a file, its hard
    link and a directory stay valid once the kernel has dropped the inodes
    (it then looks up "." in the inode: ESTALE before); a removed file's
    handle is ESTALE."""
    mnt = volume.mountpoint
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"hello")
    os.link(mnt / "d" / "f", mnt / "d" / "link")
    (mnt / "gone").write_bytes(b"bye")
    handles = {name: _name_to_handle(mnt / name) for name in ("d/f", "d/link", "d", "gone")}
    os.unlink(mnt / "gone")
    mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2):
            _drop_caches()
            for name in ("d/f", "d/link"):
                fd = _open_by_handle(mount_fd, handles[name])
                try:
                    assert os.read(fd, 10) == b"hello", name
                finally:
                    os.close(fd)
            fd = _open_by_handle(mount_fd, handles["d"], os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert sorted(os.listdir(fd)) == ["f", "link"]
            finally:
                os.close(fd)
            with pytest.raises(OSError) as caught:
                os.close(_open_by_handle(mount_fd, handles["gone"]))
            assert caught.value.errno == errno.ESTALE
        fd = _open_by_handle(mount_fd, handles["d/link"], os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b" world")
        finally:
            os.close(fd)
        assert (mnt / "d" / "f").read_bytes() == b"hello world"
    finally:
        os.close(mount_fd)
