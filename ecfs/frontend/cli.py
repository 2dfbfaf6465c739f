"""The `ecfs` command line (click). No logic here: parse, call, report.

Exit status: 0 success, 1 the operation failed or found problems, 2 usage
error (bad arguments, refused request). Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import __version__
from ..core import units
from ..core.errors import EcfsError, VolumeError
from ..core.events import JsonFormatter
from ..data.placement import POLICIES, SPREAD
from ..storage.lease import host_id
from ..storage.s3store import is_s3_location
from ..volume.mkfs import VolumeSpec, check_store_arg, create_volume


def parse_size(value: str) -> int:
    """'128K', '1M', '4096' -> bytes (powers of two)."""
    try:
        return units.parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: object, param: object, ctx: object) -> int:
        return value if isinstance(value, int) else parse_size(str(value))


def _store_args(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Click callback: refuse empty and URL-like store arguments (exit 2)."""
    for arg in (value,) if isinstance(value, str) else value or ():
        try:
            check_store_arg(arg)
        except VolumeError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ecfs: {message}", err=True)
    sys.exit(code)


#: Mode of log files ecfs creates: store paths and errors are not for
#: every local user to read.
LOG_FILE_MODE = 0o600


def open_log_file(path: str | os.PathLike[str], *, private: bool) -> Any:
    """The log file at `path` opened for appending: created LOG_FILE_MODE
    if new, never through a symlink (O_NOFOLLOW). With `private` (ecfs's
    own default log), an existing file readable by others is made
    LOG_FILE_MODE too; a file the user named keeps its mode. OSError."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, LOG_FILE_MODE)
    try:
        if private and os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, LOG_FILE_MODE)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


#: The text log format (`--log-format text`).
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(
    level: str, log_file: str | None, volume_hint: str = "", log_format: str = "text"
) -> Callable[[bool], None]:
    def setup(foreground: bool) -> None:
        handlers: list[logging.Handler] = []
        if log_file:
            handlers.append(logging.StreamHandler(open_log_file(log_file, private=False)))
        elif foreground:
            handlers.append(logging.StreamHandler(sys.stderr))
        else:
            directory = (
                Path("/var/log/ecfs")
                if os.geteuid() == 0
                else (Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "ecfs")
            )
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = directory / f"mount{volume_hint}.log"
            handlers.append(logging.StreamHandler(open_log_file(path, private=True)))
        formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT)
        for handler in handlers:
            handler.setFormatter(formatter)
        logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers, force=True)

    return setup


class _EcfsGroup(click.Group):
    """Reports usage errors in one line (`ecfs: ... (see 'ecfs mkfs --help')`)
    instead of click's three-line usage block; exit status 2 as before."""

    def main(self, *args: Any, **extra: Any) -> Any:
        extra["standalone_mode"] = False
        if not extra.get("prog_name") and len(args) < 2:
            extra["prog_name"] = "ecfs"  # not "python -m ecfs"
        try:
            result = super().main(*args, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(2)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "ecfs"
            _fail(f"{exc.format_message()} (see '{where} --help')", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_EcfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ecfs")
def main() -> None:
    """ecfs: a filesystem that stores every file erasure-coded across
    several directories or disks, and keeps reading when some fail.

    \b
    Shell completion: add to ~/.bashrc or ~/.zshrc
      eval "$(_ECFS_COMPLETE=bash_source ecfs)"
      eval "$(_ECFS_COMPLETE=zsh_source ecfs)"
    Manual: man ecfs (MANPATH=.venv/share/man in a virtual environment)."""


@main.command()
@click.option(
    "--data", "-k", "k", default=4, show_default=True, help="Data fragments per chunk (k)."
)
@click.option(
    "--parity",
    "-m",
    "m",
    default=2,
    show_default=True,
    help="Parity fragments per chunk (m): stores that may fail.",
)
@click.option(
    "--fragment-size",
    type=SizeType(),
    default="1M",
    show_default=True,
    help="Bytes per fragment; a chunk holds k x this many file bytes. Smaller"
    " fragments make in-place rewrites of large files cheaper, larger ones"
    " make sequential I/O faster.",
)
@click.option(
    "--cell-size",
    type=SizeType(),
    default="4K",
    show_default=True,
    help="Checksum granularity inside a fragment.",
)
@click.option(
    "--inline-max",
    type=SizeType(),
    default="64K",
    show_default=True,
    help="Files up to this size are kept inline in the metadata.",
)
@click.option(
    "--placement",
    type=click.Choice(POLICIES),
    default=SPREAD,
    show_default=True,
    help="Where fragments go: 'spread' over all stores, or 'hybrid': data fragments on"
    " local stores and parity on remote (s3://) ones, so healthy reads never touch the"
    " network (needs at least k local and m remote stores).",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="STORE=LABEL",
    help="Name the failure domain of STORE (a host, an enclosure, a power circuit...);"
    " stores with one label fail together. Default: the disk a store is on (an S3"
    " store's endpoint). Repeatable.",
)
@click.option(
    "--allow-shared-domains",
    is_flag=True,
    help="Accept fewer distinct failure domains than k+m (e.g. all stores on one disk,"
    " for demos and tests): the volume then survives fewer failures than m.",
)
@click.argument("stores", nargs=-1, required=True, callback=_store_args)
def mkfs(
    k: int,
    m: int,
    fragment_size: int,
    cell_size: int,
    inline_max: int,
    placement: str,
    domains: tuple[str, ...],
    allow_shared_domains: bool,
    stores: tuple[str, ...],
) -> None:
    """Create a new volume over STORES (empty or new directories, ideally
    one per disk; at least k+m of them). A store may also be an unused
    's3://BUCKET/PREFIX?endpoint=URL[&profile=NAME]' location (the bucket
    is created if missing; credentials from the AWS environment variables
    or ~/.aws files only). The m+1 metadata copies go on local directories
    when there are m+1 of them, else also on S3 stores, as objects.
    Refused when the stores are in fewer failure domains (disks) than k+m,
    unless --allow-shared-domains."""
    spec = VolumeSpec(
        k=k, m=m, fragment_size=fragment_size, cell_size=cell_size, inline_max=inline_max,
        placement=placement,
    )  # fmt: skip
    labels = {}
    for item in domains:
        store_arg, sep, label = item.rpartition("=")
        if not sep or not store_arg:
            raise click.BadParameter(f"{item!r} is not STORE=LABEL", param_hint="--domain")
        labels[store_arg] = label
    try:
        volume_id = create_volume(
            [Path(s) for s in stores], spec, domains=labels,
            allow_shared_domains=allow_shared_domains,
        )  # fmt: skip
    except VolumeError as exc:
        _fail(str(exc), 2)
    except EcfsError as exc:
        _fail(str(exc), 1)
    click.echo(
        f"created volume {volume_id}: k={k} m={m} over {len(stores)} stores"
        + (f", {placement} placement" if placement != SPREAD else "")
    )


@main.command()
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground, log to stderr.")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="Mount options: allow_other, noallow_other, ro, noatime, fsname=NAME, lease_seconds=N,"
    " event_hook=PATH...",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Log to this file (default: stderr with --foreground, else"
    " ~/.local/state/ecfs/mount.log, /var/log/ecfs/mount.log for root).",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="'json': every log line is one JSON object (time, level, logger, message;"
    " events add 'event' and their fields), for log shippers.",
)
@click.option(
    "--takeover",
    is_flag=True,
    help="Take over the lease of a volume with S3 stores that another host held"
    " and did not release (it died or lost its stores); only once it expired.",
)
@click.argument("stores", nargs=-1, required=True, callback=_store_args)
@click.argument("mountpoint")
def mount(
    foreground: bool,
    options: tuple[str, ...],
    log_level: str,
    log_file: str | None,
    log_format: str,
    takeover: bool,
    stores: tuple[str, ...],
    mountpoint: str,
) -> None:
    """Mount the volume made of STORES (paths or quoted glob patterns, in
    any order) on MOUNTPOINT. Returns once the mount is ready; the daemon
    keeps running in the background until `ecfs umount`. With -o
    remount,ro (or rw, nosuid...), change the flags of the ecfs mount on
    MOUNTPOINT instead (root only; other options cannot change)."""
    from ..volume.assembly import expand_store_args
    from .mount import check_mountpoint, parse_options, remount, run_mount

    # Absolute paths: the daemon leaves the current directory (it changes to /).
    store_args = tuple(_absolute_store_arg(s) for s in stores)
    mountpoint_path = Path(os.path.abspath(mountpoint))
    try:
        parsed = parse_options(options)
        parsed.takeover = takeover
        if parsed.remount:
            remount(mountpoint_path, parsed)
            return
        check_mountpoint(mountpoint_path, expand_store_args(store_args))
    except VolumeError as exc:
        _fail(str(exc), 2)
    _check_unprivileged_mount(parsed.allow_other)
    if log_file is not None:
        log_file = os.path.abspath(log_file)
        try:
            open_log_file(log_file, private=False).close()
        except OSError as exc:
            _fail(f"cannot write the log file {log_file}: {exc.strerror}", 2)
    try:
        code = run_mount(
            store_args,
            mountpoint_path,
            parsed,
            foreground=foreground,
            setup_logging=_setup_logging(log_level, log_file, log_format=log_format.lower()),
        )
    except VolumeError as exc:
        _fail(str(exc), 2)
    except EcfsError as exc:
        _fail(str(exc), 1)
    sys.exit(code)


#: Where libfuse's fusermount3 reads `user_allow_other`.
FUSE_CONF = Path("/etc/fuse.conf")


def _check_unprivileged_mount(allow_other: bool) -> None:
    """A user who is not root mounts through the setuid fusermount3, which
    refuses -o allow_other unless /etc/fuse.conf says `user_allow_other`;
    its own message would be lost in the daemon's log, so refuse here."""
    if os.geteuid() == 0:
        return
    if shutil.which("fusermount3") is None:
        _fail("fusermount3 not found: install the fuse3 package (or mount as root)", 2)
    if allow_other and not _fuse_conf_allows_other():
        _fail(
            f"-o allow_other needs a line 'user_allow_other' in {FUSE_CONF} when not root;"
            " add it, mount as root, or leave allow_other out",
            2,
        )


def _fuse_conf_allows_other() -> bool:
    try:
        lines = FUSE_CONF.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


def _absolute_store_arg(arg: str) -> str:
    """A store path or glob pattern, made absolute (glob characters in the
    current directory's name are escaped, those in `arg` kept)."""
    if os.path.isabs(arg) or is_s3_location(arg):
        return arg
    cwd = os.getcwd()
    return os.path.join(glob.escape(cwd) if glob.has_magic(arg) else cwd, arg)


@main.command()
@click.option(
    "--timeout", default=300.0, show_default=True, help="Seconds to wait for the daemon to finish."
)
@click.argument("mountpoint")
def umount(timeout: float, mountpoint: str) -> None:
    """Write back everything and unmount MOUNTPOINT; waits until the
    daemon has made all data durable and exited; tells how many chunks
    still wait for repair, if any. Exits 1 if the daemon reported that its
    shutdown failed (the message says what failed)."""
    from ..volume.assembly import KEEP_MARKER, SHUTDOWN_REPORT
    from .client import MountClient
    from .mount import mounted_fstype

    fstype = mounted_fstype(Path(mountpoint))
    if fstype is None:
        _fail(f"{mountpoint} is not a mount point", 2)
    if fstype != "fuse.ecfs":
        _fail(f"{mountpoint} is not an ecfs mount (it is {fstype})", 2)
    pid, workdir = _daemon_identity(mountpoint)
    queued = 0
    if pid is not None:
        try:
            queued = MountClient(mountpoint).status().repair.chunks
        except EcfsError:
            pass
    try:
        result = subprocess.run(
            ["fusermount3", "-u", mountpoint],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        _fail("fusermount3 not found: install the fuse3 package (or use umount as root)", 2)
    if result.returncode != 0:
        reason = result.stderr.strip().removeprefix("fusermount3: ") or f"exit {result.returncode}"
        _fail(f"cannot unmount {mountpoint}: {reason}", 1)
    if pid is None:
        click.echo(f"ecfs: unmounted {mountpoint}; its daemon was not answering", err=True)
        return
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            _fail(
                f"unmounted, but the daemon (pid {pid}) is still writing back after {timeout} s", 1
            )
        time.sleep(0.05)
    if queued:
        click.echo(
            f"ecfs: unmounted {mountpoint}; {queued} chunk(s) still wait for repair (reduced"
            " redundancy): the next mount repairs them (`ecfs repair --wait MOUNTPOINT`"
            " before unmounting finishes them first)",
            err=True,
        )
    if workdir is None:
        return
    try:
        report = (workdir / SHUTDOWN_REPORT).read_text(errors="replace").strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        report = f"(cannot read {workdir / SHUTDOWN_REPORT}: {exc})"
    kept = (workdir / KEEP_MARKER).exists()
    _fail(
        f"{mountpoint} was unmounted, but writing back failed: {report}"
        + (f"; the latest metadata is kept in {workdir}" if kept else "")
        + " (see the daemon's log)",
        1,
    )


def _daemon_identity(mountpoint: str, timeout: float = 10.0) -> tuple[int | None, Path | None]:
    """The pid and working directory the ecfs daemon reports for
    `mountpoint`, None for what it does not answer (dead, or hung: asked
    from a thread so we never hang too)."""
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["pid"] = int(os.getxattr(mountpoint, "user.ecfs.pid"))
            answer["workdir"] = Path(os.fsdecode(os.getxattr(mountpoint, "user.ecfs.workdir")))
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer.get("pid"), answer.get("workdir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# -- talking to a running mount ------------------------------------------------------


def _client(mountpoint: str) -> Any:
    """A client for the mount at `mountpoint`; exit 2 if it is not one (asked
    before any command, which a plain directory would store as an xattr)."""
    from .client import MountClient

    client = MountClient(mountpoint)
    _run_client(client.pid)
    return client


def _run_client(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except VolumeError as exc:
        _fail(str(exc), 2)
    except EcfsError as exc:
        _fail(str(exc), 1)


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return units.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _watch(
    client: Any, label: str, progress: Callable[[Any], tuple[int, int]],
    done: Callable[[Any], bool], poll: float = 0.5,
) -> Any:
    """Poll the status (an `ecfs.volume.status.VolumeStatus`) until done(status);
    a progress bar on a terminal."""
    status = _run_client(client.status)
    if not sys.stderr.isatty():
        while not done(status):
            _fail_if_paused(status)
            time.sleep(poll)
            status = _run_client(client.status)
        return status
    total = max(progress(status)[1], 1)
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        shown = 0
        while not done(status):
            _fail_if_paused(status)
            current, total = progress(status)
            bar.length = max(total, 1)
            bar.update(max(0, current - shown))
            shown = max(shown, current)
            time.sleep(poll)
            status = _run_client(client.status)
        bar.update(max(0, (bar.length or 0) - shown))
    return status


def _fail_if_paused(status: Any) -> None:
    """Exit 1 saying so when background work is paused on purpose (a
    scrub or repair would wait until `ecfs repair --resume`)."""
    if status.background.paused:
        from .render import render_background

        _fail(
            render_background(status.background).replace("background work: ", "background work is ")
            + "; nothing is scrubbed or repaired until then",
            1,
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print the metrics in the Prometheus text format; exit status 0 whenever"
    " the mount answered.",
)
@click.argument("mountpoint")
def status(as_json: bool, prometheus: bool, mountpoint: str) -> None:
    """Show the health of a mounted volume: how many more stores it can
    lose, each store's state and latency, the repair queue and scrub.
    Exit status 0 when healthy, 1 otherwise."""
    import json

    if as_json and prometheus:
        raise click.UsageError("--json and --prometheus exclude each other")
    record = _run_client(_client(mountpoint).status)
    if prometheus:
        from .metrics import render_prometheus

        click.echo(render_prometheus(record), nl=False)
        return
    if as_json:
        from ..volume.status import to_json

        click.echo(json.dumps(to_json(record), indent=2, sort_keys=True))
    else:
        from .render import render_status

        click.echo(render_status(record))
    sys.exit(0 if record.health == "healthy" else 1)


@main.command()
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON object per interval, one per line (rates in bytes/s and operations/s).",
)  # fmt: skip
@click.option("--count", "-c", type=click.IntRange(min=1), metavar="N", help="Stop after N intervals.")
@click.argument("mountpoint")
@click.argument("interval", type=click.FloatRange(min=0.1), default=1.0, required=False)
def iostat(as_json: bool, count: int | None, mountpoint: str, interval: float) -> None:
    """Show each store's read and write MiB/s and IOPS, latency (p50,
    p99), queue and errors, and the volume's degraded, hedged and routed
    reads, repair and small-write log activity, every INTERVAL seconds
    (default 1) until Ctrl-C. A slow or failed store stands out in colour."""
    from .iostat import watch

    client = _client(mountpoint)
    try:
        watch(lambda: _run_client(client.iostat), interval, count, as_json=as_json, out=sys.stdout)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:  # `ecfs iostat --json MNT | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush at exit
        sys.exit(0)


@main.command()
@click.option("--max-duration", metavar="D", help="Stop after D (e.g. 30m, 2h); the next scrub resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("mountpoint")
def scrub(max_duration: str | None, as_json: bool, mountpoint: str) -> None:
    """Verify every cell of every fragment of a mounted volume (oldest
    verified first) and queue what is missing or corrupt for repair.
    Exit status 0 when nothing was found, 1 otherwise."""
    import dataclasses
    import json

    from .render import render_scrub

    seconds = _duration(max_duration)
    client = _client(mountpoint)
    first = _run_client(client.status)
    _fail_if_paused(first)
    before = first.scrub.started_ns
    _run_client(lambda: client.command("scrub" + (f" {seconds}" if seconds else "")))
    final = _watch(
        client,
        "scrubbing",
        lambda s: (s.scrub.chunks_done, s.scrub.chunks_total),
        lambda s: s.scrub.started_ns != before and not s.scrub.running,
    ).scrub
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(final), indent=2, sort_keys=True))
    else:
        click.echo(render_scrub(final))
    sys.exit(1 if final.finding_count or final.metadata_findings else 0)


@main.command()
@click.option("--wait", is_flag=True, help="Show progress until the repair queue is empty.")
@click.option("--normal", is_flag=True, help="Go back to repairing only when the volume is idle.")
@click.option(
    "--pause",
    is_flag=True,
    help="Pause all background work (repair, scrub, restripe, small-write log folds, garbage"
    " deletion) until --resume, across unmount and mount.",
)
@click.option("--resume", is_flag=True, help="Resume background work paused with --pause.")
@click.option(
    "--min-rate",
    type=SizeType(),
    help="Rebuilt bytes per second urgent repair keeps, and takes no more,"
    " while files are in use (for the rest of the mount; default -o repair_min_rate).",
)
@click.option(
    "--max-rate",
    type=SizeType(),
    help="Cap repair at SIZE bytes per second at any time, 0 for none (for the rest of"
    " the mount; default -o repair_max_rate).",
)
@click.argument("target", nargs=-1, required=True, metavar="MOUNTPOINT|STORES...")
def repair(
    wait: bool,
    normal: bool,
    pause: bool,
    resume: bool,
    min_rate: int | None,
    max_rate: int | None,
    target: tuple[str, ...],
) -> None:
    """Make background repair urgent: at full speed while the volume is
    idle, at its minimum rate (--min-rate) while files are being used;
    with --wait, follow it until nothing is left to repair.
    --pause and --resume also work on an unmounted volume: give its STORES
    (paths or quoted globs) instead of the MOUNTPOINT. Exit status 1 if some
    data cannot be recovered, or if background work is paused (see --pause)."""
    if pause + resume + wait + normal > 1 and (pause or resume):
        raise click.UsageError("--pause and --resume go alone")
    if (pause or resume) and (min_rate is not None or max_rate is not None):
        raise click.UsageError("--pause and --resume go alone")
    rates = "".join(
        f" {name}={value}"
        for name, value in (("min", min_rate), ("max", max_rate))
        if value is not None
    )
    from ..core.host import mount_at

    # One ecfs mount: the running volume; otherwise (--pause/--resume) stores.
    found = mount_at(os.path.abspath(target[0]), resolve=False) if len(target) == 1 else None
    mounted = found is not None and found.fstype == "fuse.ecfs"
    if (pause or resume) and not mounted:
        _store_args(click.get_current_context(), click.Argument(["stores"]), target)
        _pause_offline(target, pause)
        return
    if len(target) > 1:
        raise click.UsageError("give one MOUNTPOINT (STORES only with --pause or --resume)")
    mountpoint = target[0]
    client = _client(mountpoint)
    if pause or resume:
        import shlex

        if pause:
            who = _who()
            _run_client(lambda: client.command(f"pause {shlex.quote(who)}"))
            click.echo("background work paused (until `ecfs repair --resume`)")
        else:
            _run_client(lambda: client.command("resume"))
            click.echo("background work resumed")
        return
    if not normal:
        _fail_if_paused(_run_client(client.status))
    _run_client(lambda: client.command(("repair normal" if normal else "repair urgent") + rates))
    if not wait:
        return
    start = _run_client(client.status).repair.chunks
    final = _watch(
        client,
        "repairing",
        lambda s: (max(0, start - s.repair.chunks), max(start, 1)),
        lambda s: (s.repair.chunks == 0 or s.repair.deferred + s.repair.skipped >= s.repair.chunks)
        and not s.repair.busy,
    )
    left, skipped = final.repair.chunks, final.repair.skipped
    click.echo(
        f"repair: {final.repair.fragments_rebuilt} fragments rebuilt;"
        f" {left} chunks still queued"
        + (" (waiting for a store to rebuild onto" if left else "")
        + (f", or skipped: {skipped} failed or missed their deadline" if left and skipped else "")
        + (")" if left else "")
    )
    for chunk in final.repair.skipped_chunks:
        name = chunk.path or f"inode {chunk.inode} (unlinked)"
        click.echo(f"SKIPPED: {name} bytes [{chunk.start}, {chunk.stop}): {chunk.reason}")
    for message in final.unrecoverable:
        click.echo(f"UNRECOVERABLE: {message}")
    sys.exit(1 if final.unrecoverable else 0)


def _who() -> str:
    """user@host, for the record of a pause (the host as the lease names it:
    $ECFS_HOST_ID, else the host name)."""
    import getpass

    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    return f"{user}@{host_id()}"


def _pause_offline(stores: tuple[str, ...], pause: bool) -> None:
    """`ecfs repair --pause/--resume STORES...`: change the pause state of
    an unmounted volume (see `ecfs.frontend.mount.run_offline`)."""
    from ..data.background import persist_pause
    from .mount import run_offline

    # Opening and closing the volume logs what a mount would; only errors matter here.
    logging.basicConfig(level=logging.ERROR, format="ecfs: %(message)s", force=True)
    was_paused = False

    def change(volume: Any) -> None:
        nonlocal was_paused
        was_paused = volume.background_gate.paused
        if pause:
            volume.background_gate.pause(_who())
        elif was_paused:
            # The rows only: the opened gate stays paused, so that no
            # background task starts while the volume is open here.
            persist_pause(volume.db, 0)

    _run_client(lambda: run_offline(stores, change))
    if pause:
        click.echo(
            "background work was already paused" if was_paused
            else "background work paused (until `ecfs repair --resume`)"
        )  # fmt: skip
    else:
        click.echo("background work resumed" if was_paused else "background work was not paused")
# -- redundancy per directory -------------------------------------------------------


def _mountpoint_of(path: str) -> str:
    """The mountpoint of the filesystem holding `path`."""
    current = os.path.realpath(path)
    while not os.path.ismount(current):
        current = os.path.dirname(current)
    return current


def _policy_client(path: str) -> Any:
    """A client for the ecfs mount holding `path` (exit 2 if none does)."""
    if not os.path.exists(path):
        _fail(f"{path}: no such file or directory", 2)
    return _client(_mountpoint_of(path))


@main.group()
def policy() -> None:
    """Redundancy per directory: K data + M parity fragments for the files
    created below a directory (e.g. 2+2, 8+3, 1+2 = three copies)."""


@policy.command("set")
@click.argument("path")
@click.argument("policy_text", metavar="K+M")
def policy_set(path: str, policy_text: str) -> None:
    """Set the policy of directory PATH to K+M (new chunks of the files
    below it get it; `ecfs restripe PATH` converts the existing ones)."""
    from ..data.policy import parse_policy, policy_problem

    try:
        k, m = parse_policy(policy_text)
    except ValueError as exc:
        _fail(str(exc), 2)
    if not os.path.isdir(path):
        _fail(f"{path}: a policy can be set on directories only", 2)
    client = _policy_client(path)
    current = _run_client(lambda: client.effective_policy(path))
    problem = policy_problem(k, m, int(current.get("stores", 0)))
    if problem is not None:
        _fail(f"policy {k}+{m} refused for {path}: {problem}", 1)
    _run_client(lambda: client.set_policy(path, f"{k}+{m}"))
    click.echo(f"{path}: policy {k}+{m} (new files and new chunks; `ecfs restripe` for the rest)")


@policy.command("get")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.argument("path")
def policy_get(as_json: bool, path: str) -> None:
    """Show the effective policy of PATH and where it comes from."""
    client = _policy_client(path)
    found = _run_client(lambda: client.effective_policy(path))
    if as_json:
        click.echo(json.dumps(found, sort_keys=True))
        return
    source = found.get("source")
    origin = f"set on {source}" if source else f"the volume's default ({found.get('volume')})"
    click.echo(f"{path}: {found.get('k')}+{found.get('m')} ({origin})")


@policy.command("clear")
@click.argument("path")
def policy_clear(path: str) -> None:
    """Remove the policy of directory PATH (its files then follow the
    nearest directory above with a policy, or the volume's default)."""
    client = _policy_client(path)
    if not _run_client(lambda: client.clear_policy(path)):
        click.echo(f"{path}: had no policy of its own")
        return
    click.echo(f"{path}: policy cleared")


@main.command()
@click.option("--wait", is_flag=True, help="Show progress until the restripe is done.")
@click.argument("path")
def restripe(wait: bool, path: str) -> None:
    """Convert the existing files below PATH to their effective policy, in
    the background (resumed after a crash or unmount; progress in `ecfs
    status`)."""
    client = _policy_client(path)
    _run_client(lambda: client.restripe(path))
    if not wait:
        click.echo(f"{path}: restripe started (progress in `ecfs status`)")
        return

    def progress(s: Any) -> tuple[int, int]:
        r = s.restripe
        return (0, 1) if r is None else (r.chunks_done, max(r.chunks_total, 1))

    final = _watch(client, "restriping", progress, lambda s: s.restripe is None or not s.restripe.roots)
    skipped = final.restripe.skipped if final.restripe is not None else 0
    click.echo(f"{path}: restripe done" + (f"; {skipped} chunks skipped, retried later" if skipped else ""))
    sys.exit(1 if skipped else 0)


@main.group()
def store() -> None:
    """Replace, add or remove a store of a mounted volume, or label its
    failure domain."""


def _store_change(mountpoint: str, command: str) -> None:
    client = _client(mountpoint)
    _run_client(lambda: client.command(command))
    final = _watch(
        client, "moving fragments", lambda s: (0, 1),
        lambda s: s.store_change is not None and s.store_change.state in ("done", "failed"),
    ).store_change
    if final.state == "failed":
        _fail(final.message, 1)
    click.echo(final.message)


_DOMAIN_OPTION = click.option(
    "--domain", metavar="LABEL", help="The new store's failure domain label (see ecfs mkfs)."
)
_ALLOW_SHARED_OPTION = click.option(
    "--allow-shared-domains",
    is_flag=True,
    help="Accept a new store that shares a failure domain (disk) with another one"
    " while fewer than k+m distinct domains remain.",
)


def _domain_words(domain: str | None, allow_shared: bool) -> str:
    words = f" --domain={_quote(domain)}" if domain is not None else ""
    return words + (" --allow-shared-domains" if allow_shared else "")


@store.command("replace")
@_DOMAIN_OPTION
@_ALLOW_SHARED_OPTION
@click.argument("mountpoint")
@click.argument("old")
@click.argument("new", callback=_store_args)
def store_replace(
    mountpoint: str, old: str, new: str, domain: str | None, allow_shared_domains: bool
) -> None:
    """Replace store OLD (a path or store index; it may be dead) with NEW, an
    empty directory; its fragments are rebuilt onto NEW in the background
    (follow with `ecfs repair --wait`). Mount with NEW in the store list
    afterwards. Refused if NEW shares a failure domain with another store
    while fewer than k+m distinct domains would remain."""
    _store_change(
        mountpoint,
        f"store-replace {_store_ref(old)} {_new_store_path(new)}"
        + _domain_words(domain, allow_shared_domains),
    )


@store.command("add")
@click.option(
    "--placement",
    type=click.Choice(POLICIES),
    help="Switch the volume to this placement policy with the new store (see ecfs mkfs);"
    " switching to hybrid moves the fragments written before to a store of their class"
    " in the background.",
)
@_DOMAIN_OPTION
@_ALLOW_SHARED_OPTION
@click.argument("mountpoint")
@click.argument("new", callback=_store_args)
def store_add(
    mountpoint: str,
    new: str,
    placement: str | None,
    domain: str | None,
    allow_shared_domains: bool,
) -> None:
    """Add NEW (an empty directory or an s3:// location) as a store; new
    chunks use it at once. Refused if NEW shares a failure domain with
    another store while fewer than k+m distinct domains remain."""
    policy = f" {placement}" if placement else ""
    _store_change(
        mountpoint,
        f"store-add {_new_store_path(new)}{policy}" + _domain_words(domain, allow_shared_domains),
    )


@store.command("set-domain")
@click.argument("mountpoint")
@click.argument("store_ref", metavar="STORE")
@click.argument("label", required=False)
def store_set_domain(mountpoint: str, store_ref: str, label: str | None) -> None:
    """Set the failure domain label of STORE (a path, index or id): stores
    with one label fail together (a host, an enclosure...). Without LABEL,
    STORE goes back to its default domain (its disk). New chunks follow
    at once; chunks left with two fragments in one domain are queued for
    repair, which moves one to a domain holding none."""
    words = f" {_quote(label)}" if label is not None else ""
    _store_change(mountpoint, f"store-domain {_store_ref(store_ref)}{words}")


@store.command("remove")
@click.argument("mountpoint")
@click.argument("old")
def store_remove(mountpoint: str, old: str) -> None:
    """Drain store OLD: move its fragments to the other stores, then drop
    it from the volume (waits until done)."""
    _store_change(mountpoint, f"store-remove {_store_ref(old)}")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _new_store_path(path: str) -> str:
    """A new store's directory, made absolute (the daemon refuses relative
    paths: its working directory is /), quoted for the control command."""
    if not path:
        _fail("the new store's path is empty: give a directory", 2)
    return _quote(path if is_s3_location(path) else os.path.abspath(path))


def _store_ref(old: str) -> str:
    """A store index or id as given; anything else is a path, made absolute."""
    import re

    if not old:
        _fail("the store is empty: give its path, index or id", 2)
    if re.fullmatch(r"[0-9]{1,9}|[0-9a-f]{32}", old):
        return old
    return _quote(old if is_s3_location(old) else os.path.abspath(old))


@main.command()
@click.option("--repair", "do_repair", is_flag=True,
              help="Fix what can be fixed: rebuild fragments, delete orphans, resync replicas.")
@click.option("--verify-data", is_flag=True, help="Read every fragment and verify every cell.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--takeover",
    is_flag=True,
    help="Take over the lease of a volume with S3 stores that another host held"
    " and did not release; only once it expired (see ecfs mount --takeover).",
)
@click.option(
    "--path",
    "scope",
    metavar="DIR",
    help="Check only the files and directories below DIR, a directory of the volume given"
    " from its root (e.g. photos/2024); volume-wide checks are skipped (the report"
    " names them).",
)
@click.argument("stores", nargs=-1, required=True, callback=_store_args)
def fsck(
    do_repair: bool,
    verify_data: bool,
    as_json: bool,
    takeover: bool,
    scope: str | None,
    stores: tuple[str, ...],
) -> None:
    """Check an unmounted volume made of STORES (paths or quoted globs).
    Exit status 0 clean, 1 problems found (fixed or not), 2 usage."""
    import json

    from ..volume.fsck import run_fsck

    # The report says everything; the checker's log lines would repeat it.
    logging.basicConfig(level=logging.ERROR, format="ecfs: %(message)s", force=True)
    bar: Any = None

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if not sys.stderr.isatty() or as_json:
            return
        if bar is None or bar.label != stage:
            if bar is not None:
                bar.render_finish()
            bar = click.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
        bar.pos = min(done, bar.length)
        bar.render_progress()

    try:
        report = run_fsck(
            [_absolute_store_arg(s) for s in stores],
            repair=do_repair,
            verify_data=verify_data,
            progress=progress,
            takeover=takeover,
            under=scope,
        )
    except VolumeError as exc:
        _fail(str(exc), 2)
    except EcfsError as exc:
        _fail(str(exc), 1)
    if bar is not None:
        bar.render_finish()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for finding in report.findings:
            state = "fixed" if finding.fixed else "NOT fixed" if do_repair else "found"
            click.echo(f"{finding.severity}: [{finding.check}] {finding.message} ({state})")
        for item in report.unrecoverable:
            click.echo(f"UNRECOVERABLE: {item}")
        click.echo(report.summary())
    sys.exit(report.exit_status)


# -- for the man page generator (scripts/manpages.py, which must not import click) ----


def help_texts() -> dict[str, dict[str, Any]]:
    """What `--help` shows for every command, as plain data, keyed by command
    path ("ecfs", "ecfs mkfs", "ecfs store replace", ...) in help order:
    {"usage": "ecfs mkfs [OPTIONS] STORES...", "help": the docstring (dedented;
    paragraphs separated by blank lines), "short_help": one line, "options":
    [(terms, help)] as listed under Options, "commands": [(name, short help)]}."""
    import inspect

    texts: dict[str, dict[str, Any]] = {}

    def visit(command: click.Command, name: str, parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
        records = [
            param.get_help_record(ctx)
            for param in command.get_params(ctx)
            if isinstance(param, click.Option)
        ]
        entry: dict[str, Any] = {
            "usage": " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)]),
            "help": inspect.cleandoc(command.help or ""),
            "short_help": command.get_short_help_str(limit=200),
            "options": [record for record in records if record is not None],
            "commands": [],
        }
        texts[ctx.command_path] = entry
        if isinstance(command, click.Group):
            for sub_name in command.list_commands(ctx):
                sub = command.get_command(ctx, sub_name)
                if sub is not None and not sub.hidden:
                    entry["commands"].append((sub_name, sub.get_short_help_str(limit=200)))
                    visit(sub, sub_name, ctx)

    visit(main, "ecfs", None)
    return texts
