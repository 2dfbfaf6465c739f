"""The `ecfs` command line, driven in subprocesses exactly as a user would:
mkfs refusals, daemonised and foreground mounts, mount failures, umount.

Every refusal must be one line on stderr (`ecfs: ...`), never a traceback,
with exit status 2 for usage problems. Mounts started here are daemonised
ones (the harness in tests/mounting.py only runs `--foreground`), so each
goes through `daemon_mount()`, which unmounts and kills in `finally`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.mounting import (
    MOUNT_TIMEOUT,
    _cli_env,
    cli,
    is_mounted,
    lazy_unmount,
    requires_fuse,
)
from tests.volume_files import MiB, sha256_file, write_pattern_file

K, M = 4, 2


# --- helpers -----------------------------------------------------------------


def assert_refused(result: subprocess.CompletedProcess[str], *words: str, status: int = 2) -> None:
    """Exit `status`, exactly one line on stderr starting "ecfs: ", mentioning
    every word in `words` (case-insensitive), and no traceback."""
    shown = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == status, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("ecfs: "), shown
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in the message\n{shown}"


def make_volume(base: Path, n: int = K + M, prefix: str = "s", *args: str) -> list[Path]:
    """mkfs a k=4 m=2 volume over base/<prefix>0..n-1; returns the stores."""
    stores = [base / f"{prefix}{i}" for i in range(n)]
    cli("mkfs", "--data", K, "--parity", M, *args, *stores)
    return stores


def volume_id(store: Path) -> str:
    return str(json.loads((store / "ecfs-store.json").read_text())["volume_id"])


def daemon_pid(mountpoint: Path) -> int:
    return int(os.getxattr(mountpoint, "user.ecfs.pid"))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_pid_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def force_cleanup(mountpoint: Path, pid: int | None) -> None:
    """Detach the mount and kill the daemon, whatever state they are in."""
    if is_mounted(mountpoint):
        lazy_unmount(mountpoint)
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 10)


@contextmanager
def daemon_mount(
    stores: Sequence[str | Path], mountpoint: Path, log_file: Path, *extra: str
) -> Iterator[int]:
    """`ecfs mount` (daemonised); yields the daemon's pid; `ecfs umount` at
    the end, and in any case nothing stays mounted or running."""
    mountpoint.mkdir(exist_ok=True)
    cli("mount", "--log-file", log_file, "--log-level", "debug", *extra, *stores, mountpoint)
    pid: int | None = None
    try:
        assert is_mounted(mountpoint), "ecfs mount returned 0 but nothing is mounted"
        pid = daemon_pid(mountpoint)
        yield pid
        if is_mounted(mountpoint):
            cli("umount", mountpoint)
        assert wait_pid_gone(pid, 1), "the daemon outlived ecfs umount"
    finally:
        force_cleanup(mountpoint, pid)


@contextmanager
def cleanup_on_exit(mountpoint: Path) -> Iterator[None]:
    """For tests of mounts that should fail: if one succeeded anyway, undo it."""
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            pid = None
            try:
                pid = daemon_pid(mountpoint)
            except (OSError, ValueError):
                pass
            force_cleanup(mountpoint, pid)


# --- help --------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["mkfs"], ["mount"], ["umount"]])
def test_help(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.stdout.startswith(f"Usage: ecfs {' '.join(command)}".rstrip() + " ")
    assert result.stderr == ""
    if not command:
        for name in ("mkfs", "mount", "umount"):
            assert f"  {name} " in result.stdout


def test_version() -> None:
    assert cli("--version").stdout.startswith("ecfs, version ")


def test_unknown_command_and_missing_argument_are_one_line() -> None:
    assert_refused(cli("frobnicate", check=False), "frobnicate", "--help")
    assert_refused(cli("mkfs", check=False), "STORES", "ecfs mkfs --help")
    assert_refused(cli("mount", "--bogus", "a", "b", check=False), "--bogus")


# --- mkfs --------------------------------------------------------------------


def test_mkfs_creates_a_volume(tmp_path: Path) -> None:
    stores = [tmp_path / "new" / f"s{i}" for i in range(K + M)]  # parents made too
    (tmp_path / "empty").mkdir()
    stores[0] = tmp_path / "empty"  # an existing empty directory is fine
    result = cli("mkfs", "--data", K, "--parity", M, *stores)
    assert result.stdout.startswith("created volume ")
    ids = {volume_id(s) for s in stores}
    assert len(ids) == 1
    assert ids.pop() in result.stdout
    markers = [json.loads((s / "ecfs-store.json").read_text()) for s in stores]
    assert len({m["store_id"] for m in markers}) == K + M
    assert all((m["k"], m["m"]) == (K, M) for m in markers)


def _refused_mkfs_cases(base: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (mkfs arguments, words the message must contain). Every store
    path in them is under base/new unless the case prepared it."""
    new = [str(base / "new" / f"n{i}") for i in range(K + M)]
    return {
        "too few stores": (["--data", "4", "--parity", "2", *new[:5]], ["5 stores", "6"]),
        "non-empty dir": ([str(base / "full"), *new[1:]], ["full", "not empty"]),
        "store of another volume": (
            [str(base / "other0"), *new[1:]],
            ["other0", "already holds a store of volume"],
        ),
        "store of this volume again": (
            [str(base / f"other{i}") for i in range(K + M)],
            ["other0", "already holds a store"],
        ),
        "same dir twice": ([new[0], new[0], *new[2:]], ["given twice"]),
        "same dir via symlink": ([new[0], str(base / "link"), *new[2:]], ["link", "twice"]),
        "same dir via a/../a": (
            [new[0], str(base / "new" / "n0" / ".." / "n0"), *new[2:]],
            ["twice"],
        ),
        "nested store": ([new[0], new[0] + "/inner", *new[2:]], ["inside store"]),
        "file instead of dir": ([str(base / "afile"), *new[1:]], ["afile", "not a directory"]),
        "fragment size zero": (["--fragment-size", "0", *new], ["--fragment-size"]),
        "fragment size not a size": (["--fragment-size", "abc", *new], ["--fragment-size"]),
        "fragment size too big": (["--fragment-size", "2G", *new], ["--fragment-size"]),
        "fragment size not a multiple of cell size": (
            ["--fragment-size", "6K", *new],
            ["--fragment-size", "multiple", "--cell-size"],
        ),
        "fragment size odd bytes": (["--fragment-size", "5000", *new], ["multiple"]),
        "cell size not a power of two": (["--cell-size", "3000", *new], ["--cell-size"]),
        "data zero": (["--data", "0", *new], ["--data"]),
        "data negative": (["--data", "-1", *new], ["--data"]),
        "data not a number": (["--data", "x", *new], ["--data"]),
        "data too big": (["--data", "200", *new], ["--data"]),
        "parity zero": (["--parity", "0", *new], ["--parity"]),
        "parity negative": (["--parity", "-3", *new], ["--parity"]),
        "inline max too big": (["--inline-max", "10G", *new], ["--inline-max"]),
        "store under /proc": ([*new[:5], "/proc/ecfs-test/store"], ["cannot create store"]),
    }


MKFS_CASES = list(_refused_mkfs_cases(Path("/x")))


@pytest.mark.parametrize("case", MKFS_CASES)
def test_mkfs_refuses(tmp_path: Path, case: str) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.txt").write_text("keep me")
    (tmp_path / "afile").write_text("")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "n0").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "new" / "n0")
    make_volume(tmp_path, prefix="other")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    args, words = _refused_mkfs_cases(tmp_path)[case]
    assert_refused(cli("mkfs", *args, check=False), *words)

    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before, "a refused mkfs changed the directories"
    assert (tmp_path / "full" / "data.txt").read_text() == "keep me"


# --- mount: success paths -------------------------------------------------------


@requires_fuse
@pytest.mark.mount
def test_daemonised_mount_is_ready_when_mount_returns_and_umount_waits(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    with daemon_mount(stores, mnt, log) as pid:
        # ecfs mount has returned: the mount must exist and answer right away.
        assert is_mounted(mnt)
        assert os.stat(mnt).st_ino == 1
        assert pid != os.getpid() and pid_alive(pid)
        assert "mounted volume" in log.read_text()
        digest = write_pattern_file(mnt / "data.bin", seed=3, size=5 * MiB + 7)
        cli("umount", mnt)
        # ecfs umount has returned: unmounted, and the daemon is gone.
        assert not is_mounted(mnt)
        assert not pid_alive(pid)
    text = log.read_text()
    assert f"mounted volume {volume_id(stores[0])} on {mnt}" in text
    assert "unmounted" in text and "cleanly" in text
    assert "ERROR" not in text and "Traceback" not in text
    with daemon_mount(stores, mnt, log):
        assert sha256_file(mnt / "data.bin") == digest


@requires_fuse
@pytest.mark.mount
def test_stores_in_any_order_and_as_a_glob(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    shuffled = [stores[i] for i in (4, 1, 5, 0, 3, 2)]
    with daemon_mount(shuffled, mnt, log):
        digest = write_pattern_file(mnt / "f.bin", seed=9, size=3 * MiB)
    with daemon_mount([str(tmp_path / "s*")], mnt, log):
        assert sha256_file(mnt / "f.bin") == digest
    # Relative paths and a relative glob, from another working directory.
    result = subprocess.run(
        [sys.executable, "-m", "ecfs", "mount", "--log-file", "rel.log", "s[0-5]", "mnt"],
        cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    with cleanup_on_exit(mnt):
        assert result.returncode == 0, result.stderr
        assert sha256_file(mnt / "f.bin") == digest
        pid = daemon_pid(mnt)
        cli("umount", mnt)
        assert not pid_alive(pid)
    assert "mounted volume" in (tmp_path / "rel.log").read_text()


@requires_fuse
@pytest.mark.mount
def test_foreground_logs_to_stderr(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecfs", "mount", "--foreground", *map(str, stores), str(mnt)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=_cli_env(),
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "no mount"
            time.sleep(0.02)
        assert daemon_pid(mnt) == proc.pid  # it did not fork
        assert "mounted volume" in stderr_path.read_text()
        cli("umount", mnt)
        assert proc.wait(10) == 0
    finally:
        force_cleanup(mnt, proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    text = stderr_path.read_text()
    assert "unmounted" in text and "Traceback" not in text


# --- mount: refusals -----------------------------------------------------------


MOUNT_FAILURES = [
    "mountpoint missing",
    "mountpoint is a file",
    "mountpoint already mounted",
    "volume already mounted elsewhere",
    "stores of two volumes mixed",
    "one store each of two volumes",
    "glob matching nothing",
    "only 3 of 6 stores",
    "only 3 of 6 stores (foreground)",
    "unknown -o option",
    "store inside the mountpoint",
    "log file not writable",
]


@requires_fuse
@pytest.mark.mount
@pytest.mark.parametrize("case", MOUNT_FAILURES)
def test_mount_refuses(tmp_path: Path, case: str) -> None:
    stores = [str(s) for s in make_volume(tmp_path)]
    others = [str(s) for s in make_volume(tmp_path, prefix="o")]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = str(tmp_path / "ecfs.log")
    args: list[str]
    if case == "mountpoint missing":
        args, words = [*stores, str(tmp_path / "nowhere")], ["nowhere", "does not exist"]
    elif case == "mountpoint is a file":
        (tmp_path / "file").write_text("")
        args, words = [*stores, str(tmp_path / "file")], ["file", "not a directory"]
    elif case == "mountpoint already mounted":
        args, words = [*stores, str(mnt)], ["already a mount point"]
    elif case == "volume already mounted elsewhere":
        (tmp_path / "mnt2").mkdir()
        args, words = [*stores, str(tmp_path / "mnt2")], ["in use", "already mounted"]
    elif case == "stores of two volumes mixed":
        args, words = [*stores[:3], *others[3:], str(mnt)], ["different volumes"]
    elif case == "one store each of two volumes":
        # (one foreign store among the volume's own is left out instead:
        # tests/test_store_hostile.py)
        args, words = [stores[0], others[0], str(mnt)], ["different volumes", others[0]]
    elif case == "glob matching nothing":
        args, words = [str(tmp_path / "zz*"), str(mnt)], ["no store matches", "zz*"]
    elif case.startswith("only 3 of 6 stores"):
        args, words = [*stores[:3], str(mnt)], ["3 of 6", "at most 2 may be missing"]
        if "foreground" in case:
            args.insert(0, "--foreground")
    elif case == "unknown -o option":
        args, words = ["-o", "noatime,frobnicate", *stores, str(mnt)], ["frobnicate"]
    elif case == "store inside the mountpoint":
        inner = tmp_path / "mnt" / "inner"
        inner_stores = [str(inner / f"s{i}") for i in range(K + M)]
        cli("mkfs", *inner_stores)
        args, words = [*inner_stores, str(mnt)], ["inside the mountpoint"]
    elif case == "log file not writable":
        args, words = [*stores, str(mnt)], ["log file"]
        log = str(tmp_path / "no-such-dir" / "ecfs.log")
    else:
        raise AssertionError(case)

    with ExitStack() as stack:
        first_mounted = case in ("mountpoint already mounted", "volume already mounted elsewhere")
        if first_mounted:
            stack.enter_context(daemon_mount(stores, mnt, tmp_path / "first.log"))
        stack.enter_context(cleanup_on_exit(mnt))
        stack.enter_context(cleanup_on_exit(tmp_path / "mnt2"))
        result = cli("mount", "--log-file", log, *args, check=False, timeout=120)
        assert_refused(result, *words)
        assert is_mounted(mnt) == first_mounted
        assert not is_mounted(tmp_path / "mnt2")


# --- umount ----------------------------------------------------------------------


def test_umount_refuses_what_is_not_an_ecfs_mount(tmp_path: Path) -> None:
    assert_refused(cli("umount", tmp_path, check=False), "not a mount point")
    assert_refused(cli("umount", tmp_path / "nowhere", check=False), "not a mount point")
    assert_refused(cli("umount", "/proc", check=False), "not an ecfs mount")
    assert os.path.exists("/proc/self")  # untouched


@requires_fuse
@pytest.mark.mount
def test_umount_of_a_busy_mount_fails_clearly_and_keeps_serving(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    with daemon_mount(stores, mnt, log) as pid:
        f = open(mnt / "open.txt", "w")  # noqa: SIM115 - held open on purpose
        try:
            assert_refused(cli("umount", mnt, check=False), "cannot unmount", status=1)
            assert is_mounted(mnt) and pid_alive(pid)
            f.write("still here")
        finally:
            f.close()
        assert (mnt / "open.txt").read_text() == "still here"


@requires_fuse
@pytest.mark.mount
def test_fusermount_u_also_leaves_a_consistent_volume(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    with daemon_mount(stores, mnt, log) as pid:
        big = write_pattern_file(mnt / "big.bin", seed=1, size=9 * MiB + 1)
        small = write_pattern_file(mnt / "small.bin", seed=2, size=1000)
        (mnt / "dir").mkdir()
        (mnt / "dir" / "link").symlink_to("../small.bin")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)
        assert wait_pid_gone(pid), "the daemon did not exit after fusermount3 -u"
        assert not is_mounted(mnt)
    assert "cleanly" in log.read_text()
    with daemon_mount(stores, mnt, log):
        assert sha256_file(mnt / "big.bin") == big
        assert sha256_file(mnt / "small.bin") == small
        assert sha256_file(mnt / "dir" / "link") == small


@requires_fuse
@pytest.mark.mount
def test_umount_cleans_up_after_a_killed_daemon(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    with daemon_mount(stores, mnt, log) as pid:
        path = mnt / "synced.bin"
        with open(path, "wb") as f:
            f.write(os.urandom(3 * MiB))
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(path)
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_gone(pid)
        assert is_mounted(mnt)  # the dead mount the kernel keeps
        result = cli("umount", mnt, check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
    # The lock died with the daemon: the volume mounts again, fsync'd data intact.
    with daemon_mount(stores, mnt, log):
        assert sha256_file(path) == digest
