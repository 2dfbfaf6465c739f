"""The real-mount test harness: drives the real `ecfs` CLI in subprocesses.

Every mount test goes through `mounted_volume()` (or the `volume` and
`shared_volume` fixtures in conftest.py, built on it), so that no test can
leave a FUSE mount or a daemon behind:

* `MountedVolume.mount()` runs `ecfs mount --foreground` as a child process,
  its stdout and stderr appended to `log_path`, and waits until the kernel
  lists the mount and the root answers a stat.
* `MountedVolume.unmount()` runs `ecfs umount`, and falls back to
  `fusermount3 -uz` and SIGKILL when that does not work.
* `mounted_volume()` unmounts in `finally`, even when the test failed.
* `cleanup_leftovers()` is the session-end safety net (see conftest.py).

Whether something is mounted is read from /proc/self/mountinfo, never with
`os.path.ismount()`: that stats the mountpoint, which blocks on a hung daemon
and says "not mounted" for the dead mount a killed daemon leaves behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from ecfs.core.host import fuse_mounts

REPO_ROOT = Path(__file__).resolve().parent.parent

MOUNT_TIMEOUT = 30.0  # seconds for a mount to appear
#: Test volumes use 128 KiB fragments (mkfs's default is 1 MiB): files of a
#: few MiB then span many chunks, so multi-chunk paths are exercised by
#: small, fast tests, and the tests' offsets are written for this geometry.
TEST_FRAGMENT_SIZE = 128 * 1024
TEST_MKFS_ARGS = ("--fragment-size", str(TEST_FRAGMENT_SIZE))
POLL_INTERVAL = 0.02
UMOUNT_TIMEOUT = 60.0  # seconds for `ecfs umount`
EXIT_TIMEOUT = 10.0  # seconds for the daemon to exit once unmounted

# Log level of the daemons the tests start; debug logs help when a test fails.
LOG_LEVEL = os.environ.get("ECFS_TEST_LOG_LEVEL", "debug")


def _fuse_missing_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE kernel module not available)"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (install the fuse3 package: scripts/install.sh)"
    return None


FUSE_MISSING_REASON = _fuse_missing_reason()
requires_fuse = pytest.mark.skipif(
    FUSE_MISSING_REASON is not None, reason=FUSE_MISSING_REASON or "FUSE available"
)

# Every daemon a test started, so that the session-end safety net can kill
# the ones a broken test forgot.
_live_daemons: set[subprocess.Popen[bytes]] = set()


class CLIError(subprocess.CalledProcessError):
    """A CLI command failed; unlike its base class, shows what it printed."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}"
            f"--- stderr ---\n{self.stderr or ''}"
        )


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run this checkout's ecfs even where it is not installed (editable or not).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONFAULTHANDLER"] = "1"
    return env


#: `ecfs mkfs` options that take a value (`labelled_mkfs_args` skips them).
_MKFS_VALUE_OPTIONS = {
    "--data", "-k", "--parity", "-m", "--fragment-size", "--cell-size", "--inline-max",
    "--placement", "--domain",
}  # fmt: skip


def labelled_mkfs_args(args: Sequence[str]) -> list[str]:
    """`ecfs mkfs` arguments `args` with ``--domain STORE=test-domain-I``
    for each store, unless they name domains or allow shared ones already.
    Test volumes keep all their stores on one disk but stand for volumes of
    independent disks: labelling each store its own failure domain keeps
    their status (tolerance m, healthy) what it would be on such disks."""
    if any(a == "--allow-shared-domains" or a.startswith("--domain") for a in args):
        return list(args)
    stores, skip = [], False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg in _MKFS_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            stores.append(arg)
    labels = [f"--domain={store}=test-domain-{i}" for i, store in enumerate(stores)]
    return [args[0], *labels, *args[1:]]


def cli(
    *args: str | os.PathLike[str] | int,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    test_domains: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m ecfs ARGS...` and return what it printed (as text).

    With `check`, a non-zero exit raises `CLIError` showing stdout and stderr.
    `ecfs mkfs` gets a failure domain label per store (`labelled_mkfs_args`)
    unless `test_domains` is False.
    """
    argv = [sys.executable, "-m", "ecfs"]
    words = [str(a) if isinstance(a, int) else os.fspath(a) for a in args]
    if test_domains and words[:1] == ["mkfs"]:
        words = labelled_mkfs_args(words)
    argv += words
    result = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_cli_env(),
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise CLIError(result.returncode, argv, result.stdout, result.stderr)
    return result


# --- the kernel's mount table -----------------------------------------------


def is_mounted(path: os.PathLike[str] | str) -> bool:
    """Whether a FUSE filesystem is mounted at `path` (dead mounts included)."""
    target = Path(os.path.realpath(path))
    return any(m.mountpoint == target for m in fuse_mounts())


def lazy_unmount(path: os.PathLike[str] | str) -> None:
    """Detach a FUSE mount now, even if busy or dead (`fusermount3 -uz`)."""
    subprocess.run(
        ["fusermount3", "-uz", os.fspath(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )


def _stat_answers(path: Path, timeout: float) -> bool:
    """Whether stat(path) succeeds within `timeout` (a hung FUSE stat never returns)."""
    done = threading.Event()
    ok = []

    def stat() -> None:
        try:
            os.stat(path)
            ok.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=stat, daemon=True).start()
    return done.wait(timeout) and bool(ok)


def cleanup_leftovers(root: Path) -> list[Path]:
    """Safety net: kill forgotten daemons, detach FUSE mounts under `root`.

    Returns the mountpoints it had to detach.
    """
    for proc in list(_live_daemons):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        _live_daemons.discard(proc)
    root = Path(os.path.realpath(root))
    leftovers = [
        m.mountpoint for m in fuse_mounts() if m.mountpoint == root or root in m.mountpoint.parents
    ]
    for mp in sorted(leftovers, key=lambda p: len(p.parts), reverse=True):
        lazy_unmount(mp)
    return leftovers


# --- log checks --------------------------------------------------------------

_BAD_LOG_LINE = re.compile(
    r"Traceback|\sERROR\s|CRITICAL"
    r'|"level": "ERROR"'  # a log line of `ecfs mount --log-format json`
    # Python warnings printed by the warnings module: "file.py:12: FooWarning: text"
    r"|^\S+:\d+: \w*Warning: "
)
_TRACEBACK_HEADER = "Traceback (most recent call last)"
_TRACEBACK_CHAINING = (
    "During handling of the above exception",
    "The above exception was the direct cause",
)


def _log_entries(text: str) -> list[str]:
    """Split a log into entries: a line plus any traceback printed right after it."""
    lines = text.splitlines()
    entries: list[str] = []
    i = 0
    while i < len(lines):
        entry = [lines[i]]
        i += 1
        if _TRACEBACK_HEADER in entry[0]:
            i = _end_of_traceback(lines, i, entry)
        while i < len(lines) and _TRACEBACK_HEADER in lines[i]:
            entry.append(lines[i])
            i = _end_of_traceback(lines, i + 1, entry)
        entries.append("\n".join(entry))
    return entries


def _end_of_traceback(lines: list[str], i: int, entry: list[str]) -> int:
    """Append the body of the traceback whose header is lines[i - 1] (and of the
    tracebacks chained to it) to `entry`; return the index of the next line."""
    n = len(lines)
    while True:
        indented_header = lines[i - 1][:1] in (" ", "\t")  # e.g. an exception group
        while i < n and lines[i][:1] in (" ", "\t"):
            entry.append(lines[i])
            i += 1
        if indented_header or i >= n:
            return i
        entry.append(lines[i])  # the exception line ends a plain traceback
        i += 1
        j = i
        while j < n and not lines[j].strip():
            j += 1
        if j < n and lines[j].startswith(_TRACEBACK_CHAINING):
            k = j + 1
            while k < n and not lines[k].strip():
                k += 1
            if k < n and _TRACEBACK_HEADER in lines[k]:
                entry.extend(lines[i : k + 1])
                i = k + 1
                continue
        return i


def find_log_problems(text: str, allowed: Sequence[str] = ()) -> list[str]:
    """Entries of a log showing errors, tracebacks or Python warnings that no
    regex in `allowed` matches (re.search on the entry, traceback included)."""
    allowed_res = [re.compile(a, re.MULTILINE) for a in allowed]
    return [
        entry
        for entry in _log_entries(text)
        if any(_BAD_LOG_LINE.search(line) for line in entry.splitlines())
        and not any(r.search(entry) for r in allowed_res)
    ]


# --- a mounted volume --------------------------------------------------------


class MountError(Exception):
    pass


class UnmountError(Exception):
    pass


class MountedVolume:
    """An ecfs volume made of `stores`, mounted (or not) at `mountpoint`.

    `mount_args` are passed to every `mount()` (and so to `remount()`).
    After an unmount or kill, `returncode` holds the daemon's exit status
    and `umount_result` the output of the last `ecfs umount`.
    """

    def __init__(
        self,
        stores: Sequence[Path],
        mountpoint: Path,
        log_path: Path,
        mount_args: Sequence[str] = (),
    ) -> None:
        self.stores: list[Path] = list(stores)
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.mount_args: list[str] = list(mount_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.umount_result: subprocess.CompletedProcess[str] | None = None

    def __repr__(self) -> str:
        return f"MountedVolume({self.mountpoint}, {len(self.stores)} stores)"

    @property
    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def mount(
        self, *extra_args: str, stores: Sequence[str | os.PathLike[str]] | None = None
    ) -> None:
        """Start `ecfs mount --foreground` and wait until the mount answers.

        `stores` replaces the volume's store list for this mount (a subset, or
        a glob pattern string that ecfs expands).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise MountError(f"{self} already has a running daemon")
        if self.is_mounted:
            raise MountError(f"something is already mounted at {self.mountpoint}")
        store_args = [os.fspath(s) for s in (self.stores if stores is None else stores)]
        argv = [
            sys.executable, "-m", "ecfs", "mount", "--foreground",
            "--log-level", LOG_LEVEL,
            *self.mount_args, *extra_args, *store_args, os.fspath(self.mountpoint),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: {' '.join(argv[1:])}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_cli_env(),
                start_new_session=True,  # a Ctrl-C in pytest must not kill it first
            )
        _live_daemons.add(self.proc)
        self.returncode = None
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self.is_mounted:
            if self.proc.poll() is not None:
                self._forget_proc()
                raise MountError(
                    f"ecfs mount exited with {self.returncode} before mounting\n" + self.log_tail()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise MountError(
                    f"ecfs mount did not mount within {MOUNT_TIMEOUT} s\n" + self.log_tail()
                )
            time.sleep(POLL_INTERVAL)
        if not _stat_answers(self.mountpoint, max(1.0, deadline - time.monotonic())):
            self.kill()
            raise MountError("mounted, but stat() of the root failed\n" + self.log_tail())

    def unmount(self, check: bool = True) -> None:
        """`ecfs umount`; if that fails, `fusermount3 -uz` and SIGKILL.

        With `check`, raises `UnmountError` (after cleaning up) if `ecfs umount`
        failed, force was needed, or the daemon exited non-zero.
        """
        if self.proc is None and not self.is_mounted:
            return
        problems = []
        if self.is_mounted:
            try:
                self.umount_result = cli(
                    "umount", self.mountpoint, check=False, timeout=UMOUNT_TIMEOUT
                )
                if self.umount_result.returncode != 0:
                    problems.append(
                        f"ecfs umount exited with {self.umount_result.returncode}: "
                        f"{self.umount_result.stdout}{self.umount_result.stderr}"
                    )
            except subprocess.TimeoutExpired:
                problems.append(f"ecfs umount took more than {UMOUNT_TIMEOUT} s")
            if self.is_mounted:
                problems.append("still mounted after ecfs umount: fusermount3 -uz")
                lazy_unmount(self.mountpoint)
        if self.proc is not None:
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"daemon still running {EXIT_TIMEOUT} s after unmount: killed")
                self.proc.kill()
                self.proc.wait()
            self._forget_proc()
            if self.returncode != 0:
                problems.append(f"daemon exited with {self.returncode}")
        if check and problems:
            raise UnmountError("; ".join(problems) + "\n" + self.log_tail())

    def remount(self, *extra_args: str, **kw: Sequence[str | os.PathLike[str]] | None) -> None:
        """Unmount (checked), then `mount(*extra_args, **kw)`."""
        self.unmount()
        self.mount(*extra_args, **kw)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (crash tests), detach its mount, reap it.

        `returncode` is then e.g. -9. Never raises for a daemon already gone.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        if self.is_mounted:
            lazy_unmount(self.mountpoint)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._forget_proc()

    def _forget_proc(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.wait()
        _live_daemons.discard(self.proc)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def check_log_clean(self, allowed: Sequence[str] = ()) -> None:
        """Fail if the log shows a traceback, an ERROR or CRITICAL line or a
        Python warning that no regex in `allowed` matches."""
        problems = find_log_problems(self.log_text(), allowed)
        if problems:
            shown = "\n".join(problems[:20])
            raise AssertionError(
                f"{len(problems)} unexpected problem(s) in {self.log_path}:\n{shown}"
            )


@contextmanager
def mounted_volume(
    base: Path,
    n_stores: int = 6,
    k: int = 4,
    m: int = 2,
    mkfs_args: Sequence[str] = (),
    mount_args: Sequence[str] = (),
) -> Iterator[MountedVolume]:
    """mkfs a volume of `n_stores` stores under `base`, mount it, yield it,
    and unmount it whatever happens.

    Layout: base/stores/s0..s{n-1} (created by mkfs), base/mnt, base/ecfs.log.
    """
    if FUSE_MISSING_REASON is not None:
        pytest.skip(FUSE_MISSING_REASON)
    (base / "stores").mkdir(parents=True, exist_ok=True)
    stores = [base / "stores" / f"s{i}" for i in range(n_stores)]
    mountpoint = base / "mnt"
    mountpoint.mkdir(exist_ok=True)
    volume = MountedVolume(stores, mountpoint, base / "ecfs.log", mount_args)
    cli("mkfs", "--data", k, "--parity", m, *TEST_MKFS_ARGS, *mkfs_args, *stores)
    try:
        volume.mount()
        yield volume
    except BaseException:
        volume.unmount(check=False)
        raise
    else:
        volume.unmount(check=True)
