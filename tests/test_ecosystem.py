"""ecfs among the usual Linux tools: mount(8) and fstab through the mount
helper, systemd units, shell completion, JSON documents with stable keys,
Prometheus metrics, progress bars only on a terminal, and a one-line
error (exit 2, no traceback) for each bad input.

Mount tests here start daemons through `mount -t fuse.ecfs` or the
daemonising `ecfs mount`; each cleans up in `finally` (force_cleanup).
"""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ecfs.core.host import mount_at
from ecfs.frontend.metrics import METRICS
from tests.mounting import (
    FUSE_MISSING_REASON,
    REPO_ROOT,
    MountedVolume,
    _cli_env,
    cli,
    is_mounted,
    mounted_volume,
    requires_fuse,
)
from tests.test_cli import (
    assert_refused,
    cleanup_on_exit,
    daemon_mount,
    daemon_pid,
    force_cleanup,
    make_volume,
    pid_alive,
    wait_pid_gone,
)
from tests.volume_files import MiB, sha256_file, write_pattern_file

SCRIPTS = REPO_ROOT / "scripts"


def fuse_mount_options(mountpoint: Path) -> tuple[str, str, str]:
    """(fstype, mount options, super options) of the mount at `mountpoint`."""
    mount = mount_at(mountpoint)
    assert mount is not None, f"{mountpoint} is not mounted"
    return mount.fstype, mount.options, mount.super_options


# --- mount(8), umount(8) and fstab -------------------------------------------------


def _helper_skip_reason() -> str | None:
    if FUSE_MISSING_REASON is not None:
        return FUSE_MISSING_REASON
    if os.geteuid() != 0:
        return "mount -t needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount (util-linux)"
    for helper in ("mount.fuse.ecfs", "umount.fuse.ecfs"):
        installed = Path("/sbin") / helper
        if not installed.exists():
            return f"{installed} not installed (run scripts/install.sh as root)"
        if installed.read_bytes() != (SCRIPTS / helper).read_bytes():
            return f"{installed} differs from scripts/{helper} (run scripts/install.sh)"
    return None


requires_mount_helper = pytest.mark.skipif(
    _helper_skip_reason() is not None, reason=_helper_skip_reason() or "helpers installed"
)


def helper_env(log_file: Path) -> dict[str, str]:
    """mount(8) passes its environment to the helpers: make them run this
    checkout's ecfs and log to the test's directory."""
    return {**_cli_env(), "ECFS": f"{sys.executable} -m ecfs", "ECFS_LOG_FILE": str(log_file)}


def run(
    *argv: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout,
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@contextmanager
def system_mounted(mountpoint: Path) -> Iterator[None]:
    """Whatever the test did, nothing stays mounted or running."""
    pid = None
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            try:
                pid = daemon_pid(mountpoint)
            except (OSError, ValueError):
                pass
        force_cleanup(mountpoint, pid)


@requires_mount_helper
@pytest.mark.mount
def test_mount_t_fuse_ecfs_with_a_glob_and_fstab_options(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    mnt.mkdir()
    env = helper_env(log)
    with system_mounted(mnt):
        result = run(
            "mount", "-t", "fuse.ecfs", f"{tmp_path}/s*", mnt,
            "-o", "noallow_other,_netdev,nofail,x-systemd.automount,noatime", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + log.read_text()
        fstype, mount_opts, super_opts = fuse_mount_options(mnt)
        assert fstype == "fuse.ecfs"
        assert "noatime" in mount_opts.split(",")
        assert "allow_other" not in super_opts.split(",")
        pid = daemon_pid(mnt)
        digest = write_pattern_file(mnt / "big.bin", seed=3, size=5 * MiB + 17)
        (mnt / "small.txt").write_text("written through mount -t")
        assert json.loads(cli("status", "--json", mnt).stdout)["health"] == "healthy"

        # umount(8) recorded _netdev, so it runs umount.fuse.ecfs -> ecfs umount,
        # which returns only once the daemon has written everything and exited.
        result = run("umount", mnt, env=env)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert not pid_alive(pid), "umount returned before the daemon was done"
    fsck = json.loads(cli("fsck", "--json", *stores).stdout)
    assert fsck["clean"], fsck
    with daemon_mount(stores, mnt, log):
        assert sha256_file(mnt / "big.bin") == digest
        assert (mnt / "small.txt").read_text() == "written through mount -t"


@requires_mount_helper
@pytest.mark.mount
def test_an_fstab_line_mounts_with_a_store_list_and_plain_umount_flushes(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "ecfs.log"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    source = ":".join(str(s) for s in stores[:3]) + "," + ",".join(str(s) for s in stores[3:])
    fstab.write_text(
        "# a test fstab\n"
        f"{source}  {mnt}  fuse.ecfs  "
        "noatime,nofail,comment=ecfs,x-systemd.requires-mounts-for=/srv,repair_rate=10M  0  0\n"
    )
    env = helper_env(log)
    with system_mounted(mnt):
        result = run("mount", "--fstab", fstab, mnt, env=env)
        assert result.returncode == 0, result.stderr + log.read_text()
        assert fuse_mount_options(mnt)[0] == "fuse.ecfs"
        pid = daemon_pid(mnt)
        digest = write_pattern_file(mnt / "f.bin", seed=4, size=3 * MiB)
        # No option recorded: umount(8) detaches by itself; the daemon still
        # writes back and exits on its own.
        result = run("umount", mnt, env=env)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert wait_pid_gone(pid, 60), "the daemon did not exit after umount"
    assert "cleanly" in log.read_text()
    with daemon_mount(stores, mnt, log):
        assert sha256_file(mnt / "f.bin") == digest


@requires_mount_helper
@pytest.mark.mount
def test_mount_helper_failures_are_one_line_and_exit_32(tmp_path: Path) -> None:
    make_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = helper_env(tmp_path / "ecfs.log")
    with cleanup_on_exit(mnt):
        for source, options, words in (
            (f"{tmp_path}/s*", "noatime,frobnicate", ["frobnicate"]),
            (f"{tmp_path}/zz*", "noatime", ["no store matches"]),
        ):
            result = run("mount", "-t", "fuse.ecfs", source, mnt, "-o", options, env=env)
            assert result.returncode == 32, result
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ecfs: "), result.stderr
            assert all(w in lines[0] for w in words), lines[0]
            assert not is_mounted(mnt)
        usage = run(SCRIPTS / "mount.fuse.ecfs", "only-one-argument", env=env)
        assert usage.returncode == 1 and "usage" in usage.stderr


def test_mount_helper_passes_options_and_stores_to_ecfs(tmp_path: Path) -> None:
    """Without mounting: a fake `ecfs` records the command line it gets."""
    record = tmp_path / "argv"
    fake = tmp_path / "fake-ecfs"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = {**os.environ, "ECFS": str(fake)}
    result = run(
        SCRIPTS / "mount.fuse.ecfs", "/a/s1:/a/s2,/b/s*", "/mnt/x",
        "-o", "rw,noatime", "-n", "-v", "-o", "_netdev", "-r", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == [
        "mount", "-o", "rw,noatime,_netdev,ro", "/a/s1", "/a/s2", "/b/s*", "/mnt/x",
    ]  # fmt: skip
    record.unlink()
    assert run(SCRIPTS / "mount.fuse.ecfs", "/s*", "/mnt/x", "-f", env=env).returncode == 0
    assert not record.exists()  # -f: fake, nothing run
    fake.write_text("#!/bin/sh\nexit 2\n")
    assert run(SCRIPTS / "mount.fuse.ecfs", "/s*", "/mnt/x", env=env).returncode == 32
    assert run(SCRIPTS / "mount.fuse.ecfs", "/s*", "/mnt/x", "-N", "1", env=env).returncode == 1


def test_umount_helper_runs_ecfs_umount(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    fake = tmp_path / "fake-ecfs"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = {**os.environ, "ECFS": str(fake)}
    result = run(SCRIPTS / "umount.fuse.ecfs", "/mnt/x", "-n", "-t", "fuse.ecfs", env=env)
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == ["umount", "/mnt/x"]


# --- systemd -----------------------------------------------------------------------


def test_systemd_units_order_the_mount_after_the_store_disks() -> None:
    unit = (SCRIPTS / "systemd" / "mnt-pool.mount").read_text()
    assert re.search(r"^RequiresMountsFor=(/\S+ ?)+$", unit, re.MULTILINE)
    assert "Type=fuse.ecfs" in unit and "Where=/mnt/pool" in unit
    scrub = (SCRIPTS / "systemd" / "ecfs-scrub@.service").read_text()
    assert "After=%i.mount" in scrub and "ecfs scrub" in scrub


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    ecfs = Path(sys.executable).parent / "ecfs"
    if not ecfs.exists():
        pytest.skip(f"no {ecfs} (ecfs not installed in this environment)")
    names = {
        "mnt-pool.mount": "mnt-pool.mount",
        "ecfs-scrub@.service": "ecfs-scrub@mnt-pool.service",
        "ecfs-scrub@.timer": "ecfs-scrub@mnt-pool.timer",
    }
    for source, target in names.items():
        text = (SCRIPTS / "systemd" / source).read_text()
        # The units name /usr/local/bin/ecfs; verify checks that it exists.
        (tmp_path / target).write_text(text.replace("/usr/local/bin/ecfs", str(ecfs)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{n}" for n in names.values())],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if any(n in line for n in names.values())]
    assert not ours, "\n".join(ours)


# --- shell completion --------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell: str, tmp_path: Path) -> None:
    env = {**_cli_env(), "_ECFS_COMPLETE": f"{shell}_source"}
    result = run(sys.executable, "-m", "ecfs", env=env)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.strip() and "_ECFS_COMPLETE" in script and "ecfs" in script
    if shutil.which(shell):
        (tmp_path / "complete.sh").write_text(script)
        syntax = run(shell, "-n", tmp_path / "complete.sh")
        assert syntax.returncode == 0, syntax.stderr


def test_completion_completes_commands_and_options() -> None:
    env = {
        **_cli_env(), "_ECFS_COMPLETE": "bash_complete",
        "COMP_WORDS": "ecfs st", "COMP_CWORD": "1",
    }  # fmt: skip
    result = run(sys.executable, "-m", "ecfs", env=env)
    assert result.stdout.split() == ["plain,status", "plain,store"], result
    env.update(COMP_WORDS="ecfs status --", COMP_CWORD="2")
    completions = run(sys.executable, "-m", "ecfs", env=env).stdout.split()
    assert {"plain,--json", "plain,--prometheus"} <= set(completions)


def test_readme_documents_completion_and_the_new_sections() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "_ECFS_COMPLETE=bash_source ecfs" in readme
    assert "_ECFS_COMPLETE=zsh_source ecfs" in readme
    headings = re.findall(r"^#+ (.+)$", readme, re.MULTILINE)
    for heading in ("Quick start", "Concepts", "Day-2 operations", "How it compares",
                    "Limits and guarantees", "Mounting at boot", "Metrics"):  # fmt: skip
        assert heading in headings, heading
    for other in ("SnapRAID", "ZFS raidz", "GlusterFS disperse", "MinIO"):
        assert other in readme, other
    assert "ecfs store replace" in readme and "repair /mnt/data --wait" in readme


# --- JSON documents and metrics on a live mount ------------------------------------

STATUS_KEYS = {
    "volume", "k", "m", "health", "tolerance", "stores", "repair", "scrub", "reads",
    "writes", "metadata", "unrecoverable",
}  # fmt: skip
STORE_KEYS = {
    "index", "path", "state", "in_flight", "errors", "timeouts", "latency_p50_ms",
    "latency_p95_ms", "bytes_read", "bytes_written", "free_bytes", "total_bytes",
    "fragments", "fragment_bytes", "draining",
}  # fmt: skip
REPAIR_KEYS = {
    "queue", "chunks", "bytes_left", "rate_bytes_per_s", "eta_seconds", "urgent", "busy",
    "fragments_rebuilt",
}  # fmt: skip
SCRUB_KEYS = {
    "running", "chunks_total", "chunks_done", "fragments_verified", "bytes_verified",
    "finding_count", "findings", "started_ns", "finished_ns", "stopped_early",
}  # fmt: skip
FSCK_KEYS = {
    "volume", "clean", "exit_status", "repair", "verify_data", "findings", "unrecoverable",
    "counts",
}  # fmt: skip


def documented(page: str) -> str:
    """The JSON OUTPUT section of a man page, as plain text."""
    text = (REPO_ROOT / "man" / page).read_text().replace("\\-", "-")
    return text.split(".SH JSON OUTPUT")[1].split("\n.SH ")[0]


def assert_documented(keys: set[str], page: str) -> None:
    doc = documented(page)
    missing = sorted(k for k in keys if f"\\fB{k}\\fR" not in doc)
    assert not missing, (
        f"keys not documented in JSON OUTPUT of man/{page} "
        f"(edit man/src/, run python scripts/manpages.py): {missing}"
    )


@pytest.fixture(scope="module")
def busy_volume(shared_volume: MountedVolume) -> MountedVolume:
    """The shared volume with a file written and read back."""
    path = shared_volume.mountpoint / "ecosystem.bin"
    if not path.exists():
        write_pattern_file(path, seed=9, size=3 * MiB + 5)
        sha256_file(path)
    return shared_volume


def test_status_json_has_the_stable_documented_keys(busy_volume: MountedVolume) -> None:
    document = json.loads(cli("status", "--json", busy_volume.mountpoint).stdout)
    assert STATUS_KEYS <= set(document)
    assert_documented(set(document), "ecfs-status.8")
    assert len(document["stores"]) == 6
    for store in document["stores"]:
        assert STORE_KEYS <= set(store)
        assert_documented(set(store), "ecfs-status.8")
    assert REPAIR_KEYS <= set(document["repair"])
    assert_documented(set(document["repair"]), "ecfs-status.8")
    assert_documented(set(document["reads"]) | set(document["writes"]), "ecfs-status.8")
    assert_documented(set(document["metadata"]), "ecfs-status.8")


def test_scrub_json_has_the_stable_documented_keys(busy_volume: MountedVolume) -> None:
    result = cli("scrub", "--json", busy_volume.mountpoint)
    document = json.loads(result.stdout)
    assert SCRUB_KEYS <= set(document)
    assert_documented(set(document), "ecfs-scrub.8")
    assert document["chunks_done"] == document["chunks_total"] > 0
    assert result.stderr == ""


def test_fsck_json_has_the_stable_documented_keys(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    document = json.loads(cli("fsck", "--json", *stores).stdout)
    assert FSCK_KEYS <= set(document)
    assert_documented(set(document) | set(document["counts"]), "ecfs-fsck.8")


PROMETHEUS_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\})?'
    r" (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|NaN|Inf))$"
)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Check every line of the exposition format; return name -> samples."""
    assert text == "" or text.endswith("\n")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(r"^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
        elif line.startswith("# TYPE "):
            name, kind = line.split()[2:]
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped"), line
            assert name not in typed, f"{name} typed twice"
            typed[name] = kind
        else:
            match = PROMETHEUS_LINE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            family = next(
                (name.removesuffix(suffix) for suffix in ("_bucket", "_sum", "_count")
                 if typed.get(name.removesuffix(suffix)) == "histogram"),
                name,
            )  # fmt: skip
            assert family in typed, f"{name} has no # TYPE before it"
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            samples.setdefault(name, []).append((labels, float(match["value"])))
    for name, kind in typed.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    # And what Prometheus's own client library reads from it.
    parsed = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert parsed == set(samples)
    return samples


def test_prometheus_output_of_a_live_mount(busy_volume: MountedVolume) -> None:
    result = cli("status", "--prometheus", busy_volume.mountpoint)
    assert result.stderr == ""
    samples = parse_prometheus(result.stdout)
    exported = {m.name for m in METRICS} | {
        m.name + suffix for m in METRICS if m.type == "histogram"
        for suffix in ("_bucket", "_sum", "_count")
    }  # fmt: skip
    assert set(samples) <= exported
    assert samples["ecfs_volume_tolerance"] == [({}, 2.0)]
    assert ({"state": "healthy"}, 1.0) in samples["ecfs_volume_health"]
    latency = {(s["store"], s["quantile"]) for s, _ in samples["ecfs_store_latency_seconds"]}
    assert latency == {(str(i), q) for i in range(6) for q in ("0.5", "0.95", "0.99")}
    for name in (
        "ecfs_store_bytes_read_total", "ecfs_store_bytes_written_total",
        "ecfs_store_errors_total", "ecfs_store_free_bytes",
    ):  # fmt: skip
        assert {s["store"] for s, _ in samples[name]} == {str(i) for i in range(6)}, name
    assert sum(v for _, v in samples["ecfs_store_bytes_written_total"]) > 3 * MiB
    for name in (
        "ecfs_degraded_reads_total", "ecfs_hedged_reads_total", "ecfs_repair_bytes_left",
        "ecfs_repair_fragments_rebuilt_total", "ecfs_scrub_chunks_done",
        "ecfs_write_bytes_in_total",
    ):  # fmt: skip
        assert name in samples, name


def test_prometheus_and_json_exclude_each_other(busy_volume: MountedVolume) -> None:
    result = cli("status", "--json", "--prometheus", busy_volume.mountpoint, check=False)
    assert_refused(result, "--json", "--prometheus")


# --- progress bars: on a terminal only ---------------------------------------------


def run_with_tty_stderr(*args: str | Path, timeout: float = 300) -> tuple[int, str, str]:
    """Run `python -m ecfs ARGS` with stderr on a pseudo-terminal and stdout
    on a pipe; return (exit status, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "ecfs", *(os.fspath(a) for a in args)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=_cli_env()
    )
    os.close(slave)
    shown: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError as exc:  # EIO: the child closed the terminal
                assert exc.errno == errno.EIO
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, out.decode(), b"".join(shown).decode(errors="replace")


BAR = re.compile(r"\[[#-]{10,}\]\s+\d+%")


@pytest.mark.parametrize(
    "args, label",
    [(["scrub"], "scrubbing"), (["repair", "--wait"], "repairing")],
    ids=["scrub", "repair --wait"],
)
def test_progress_bar_on_a_terminal_only(
    busy_volume: MountedVolume, args: list[str], label: str
) -> None:
    code, stdout, terminal = run_with_tty_stderr(*args, busy_volume.mountpoint)
    assert code == 0, stdout + terminal
    assert label in terminal and BAR.search(terminal), terminal
    assert "[" not in stdout and stdout.strip()
    quiet = cli(*args, busy_volume.mountpoint)
    assert quiet.stderr == ""
    assert quiet.stdout == stdout.replace("\r\n", "\n")


@requires_fuse
@pytest.mark.mount
def test_fsck_verify_data_progress_on_a_terminal_only(tmp_path: Path) -> None:
    with mounted_volume(tmp_path) as volume:
        write_pattern_file(volume.mountpoint / "f.bin", seed=5, size=4 * MiB)
        stores = volume.stores
    code, stdout, terminal = run_with_tty_stderr("fsck", "--verify-data", *stores)
    assert code == 0, stdout + terminal
    assert "chunks" in terminal and BAR.search(terminal), terminal
    assert stdout.strip().endswith("is clean")
    quiet = cli("fsck", "--verify-data", *stores)
    assert quiet.stderr == "" and quiet.stdout == stdout


@requires_fuse
@pytest.mark.mount
def test_store_replace_progress_on_a_terminal(volume: MountedVolume, tmp_path: Path) -> None:
    write_pattern_file(volume.mountpoint / "f.bin", seed=6, size=2 * MiB)
    new = tmp_path / "new-store"
    code, stdout, terminal = run_with_tty_stderr(
        "store", "replace", volume.mountpoint, volume.stores[5], new
    )
    assert code == 0, stdout + terminal
    assert "moving fragments" in terminal and BAR.search(terminal), terminal
    assert stdout.strip() and "[" not in stdout
    cli("repair", "--wait", volume.mountpoint)
    volume.stores[5] = new


# --- one-line errors for bad input -------------------------------------------------


def _bad_input_cases(base: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (ecfs arguments, words the one-line message must contain)."""
    plain = str(base / "plain")
    missing = str(base / "nowhere")
    stores = [str(base / f"n{i}") for i in range(6)]
    return {
        "status of a plain directory": (["status", plain], ["not a mounted ecfs volume"]),
        "status of a missing path": (["status", missing], ["not a mounted ecfs volume"]),
        "status --json of a plain directory": (["status", "--json", plain], ["not a mounted"]),
        "status --prometheus of a plain directory": (
            ["status", "--prometheus", plain], ["not a mounted"],
        ),
        "scrub of a plain directory": (["scrub", plain], ["not a mounted ecfs volume"]),
        "repair of a plain directory": (["repair", plain], ["not a mounted ecfs volume"]),
        "repair --wait of a plain directory": (["repair", "--wait", plain], ["not a mounted"]),
        "repair --normal of a plain directory": (["repair", "--normal", plain], ["not a mounted"]),
        "store replace on a plain directory": (
            ["store", "replace", plain, "1", str(base / "new")], ["not a mounted ecfs volume"],
        ),
        "store add on a plain directory": (
            ["store", "add", plain, str(base / "new")], ["not a mounted ecfs volume"],
        ),
        "store remove on a plain directory": (
            ["store", "remove", plain, "1"], ["not a mounted ecfs volume"],
        ),
        "bad duration": (["scrub", "--max-duration", "5x", plain], ["5x", "duration"]),
        "negative duration": (["scrub", "--max-duration", "-5m", plain], ["duration"]),
        "bad size": (["mkfs", "--fragment-size", "12Q", *stores], ["--fragment-size", "12Q"]),
        "bad -o size": (["mount", "-o", "repair_rate=fast", *stores, plain], ["repair_rate=fast"]),
        "bad -o duration": (["mount", "-o", "rebuild_after=soon", *stores, plain], ["rebuild_after"]),
        "negative -o value": (["mount", "-o", "rebuild_after=-1", *stores, plain], ["negative"]),
        "empty fsname": (["mount", "-o", "fsname=", *stores, plain], ["fsname="]),
        "unknown -o option": (["mount", "-o", "ro,nosuchoption", *stores, plain], ["nosuchoption"]),
        "bad --log-level": (["mount", "--log-level", "loud", *stores, plain], ["loud"]),
        "k of zero": (["mkfs", "--data", "0", *stores], ["--data", "0"]),
        "too few stores": (["mkfs", *stores[:5]], ["5 stores", "6"]),
        "fsck of a directory that is no store": (["fsck", plain], ["readable"]),
        "umount of a plain directory": (["umount", plain], ["not a mount point"]),
        "json and prometheus together": (
            ["status", "--json", "--prometheus", plain], ["exclude each other"],
        ),
    }  # fmt: skip


BAD_INPUT_CASES = list(_bad_input_cases(Path("/x")))


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "plain").mkdir()
    args, words = _bad_input_cases(tmp_path)[case]
    assert_refused(cli(*args, check=False), *words)
    assert os.listxattr(tmp_path / "plain") == []  # no command left behind as an xattr
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="hiding /dev/fuse needs root and unshare(1)")  # fmt: skip
def test_missing_fuse_is_one_line(tmp_path: Path) -> None:
    """/dev/fuse hidden under a tmpfs in a private mount namespace."""
    stores = [str(s) for s in make_volume(tmp_path)]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs none /dev && exec "$@"'
    result = run(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        sys.executable, "-m", "ecfs", "mount", *stores, mnt, env=_cli_env(),
    )  # fmt: skip
    if "unshare failed" in result.stderr or "Operation not permitted" in result.stderr:
        pytest.skip(f"cannot make a mount namespace here: {result.stderr.strip()}")
    assert_refused(result, "/dev/fuse", "modprobe fuse")
    assert not is_mounted(mnt)


@requires_fuse
@pytest.mark.mount
def test_missing_fusermount3_at_umount_is_one_line(tmp_path: Path) -> None:
    stores = make_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with daemon_mount(stores, mnt, tmp_path / "ecfs.log"):
        result = run(
            sys.executable, "-m", "ecfs", "umount", mnt,
            env={**_cli_env(), "PATH": str(tmp_path / "empty-path")},
        )  # fmt: skip
        assert_refused(result, "fusermount3", "fuse3")
        assert is_mounted(mnt)


def _unprivileged_python() -> list[str] | None:
    """An interpreter uid 65534 can run that imports this checkout's ecfs
    (the venv's may live under /root), as argv; None if there is none."""
    site = next((p for p in sys.path if p.endswith("site-packages") and "venv" in p), "")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            probe = subprocess.run(
                [python, "-c", "import ecfs.frontend.cli, pyfuse3"],
                user=65534, group=65534, extra_groups=[], capture_output=True, timeout=60,
                env={"PYTHONPATH": f"{REPO_ROOT}:{site}", "HOME": "/tmp"},
            )  # fmt: skip
        except OSError:
            continue
        if probe.returncode == 0:
            return [python, "-m", "ecfs"]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as uid 65534")
@requires_fuse
def test_allow_other_without_permission_is_one_line() -> None:
    conf = Path("/etc/fuse.conf")
    if conf.exists() and "user_allow_other" in [x.strip() for x in conf.read_text().splitlines()]:
        pytest.skip("/etc/fuse.conf has user_allow_other: allow_other is permitted")
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run with ecfs importable")
    base = Path(tempfile.mkdtemp(prefix="ecfs-nobody-"))
    mnt = base / "mnt"
    try:
        base.chmod(0o755)
        make_volume(base)
        mnt.mkdir()
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534)
        site = next((p for p in sys.path if p.endswith("site-packages") and "venv" in p), "")
        env = {"PYTHONPATH": f"{REPO_ROOT}:{site}", "HOME": str(base), "PATH": "/usr/bin:/bin"}
        with cleanup_on_exit(mnt):
            result = subprocess.run(
                [*python, "mount", "-o", "allow_other", "--log-file", str(base / "log"),
                 f"{base}/s*", str(mnt)],
                user=65534, group=65534, extra_groups=[], capture_output=True, text=True,
                env=env, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert_refused(result, "allow_other", "user_allow_other", "/etc/fuse.conf")
            assert not is_mounted(mnt)
    finally:
        shutil.rmtree(base, ignore_errors=True)
