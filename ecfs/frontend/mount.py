"""Running a mount: options, daemonising, the trio main loop, shutdown.

Owns: FUSE mount options, the process life cycle of a mount (fork once the
mount is ready, report failures to the waiting parent), signals, the
orderly shutdown after unmount, `-o remount` (the kernel's flags of a
running mount, see `remount`), and starting the event hook runner
(`-o event_hook=`, `ecfs.volume.hooks`) before the volume's tasks. Must
not: contain filesystem logic.

Life cycle: open the volume (blocking: stores, freshest metadata replica)
-> pyfuse3.init (the kernel mount exists) -> trio: start background tasks,
tell the parent "ready", serve until unmounted -> write back everything,
make metadata durable, delete garbage -> exit. SIGTERM/SIGINT end the loop
the same way and unmount.

The daemon holds the volume lock (see `lock`) on every store for its whole
life (`lock_stores`), so a second mount of the same volume is refused
instead of two daemons diverging on the same stores; a killed daemon's
locks die with it. A volume with S3 stores is also leased (see
`ecfs.storage.lease`): taken before the volume is opened (`take_lease`),
renewed while mounted, released after a clean unmount (kept until it
expires when the metadata could not be made durable).

Offline changes (`run_offline`, for `ecfs repair --pause/--resume STORES`):
the same life cycle without FUSE: lock, lease and open as a mount
(`open_volume`), apply the change before the background tasks start,
then start them and shut down at once as an unmount does, so the change
reaches every metadata copy by the mount's own path.

With `-o metrics=[ADDR:]PORT` the daemon serves Prometheus metrics
(`ecfs.frontend.metrics.MetricsEndpoint`): the port is bound before the
kernel mount exists (a port in use fails the mount), scrapes are answered
from the moment the loop runs, and the port is closed as soon as the
volume is unmounted, before the shutdown writes back.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..core.errors import EcfsError, VolumeError
from ..core.host import mount_at
from ..core.tasks import supervised
from ..core.units import parse_size
from ..data.background import DEADLINE_FLOOR
from ..data.repair import DEFAULT_MIN_RATE
from ..storage.lease import DEFAULT_TTL, MIN_TTL, Lease, lease_for_stores
from ..storage.lock import VolumeLock
from ..storage.offload import run_in_thread
from ..storage.store import MARKER_NAME
from ..volume.assembly import Volume, expand_store_args
from ..volume.hooks import DEFAULT_HOOK_TIMEOUT, HookRunner, check_hook
from .fs import EcfsOperations
from .metrics import MetricsEndpoint, parse_metrics_address

log = logging.getLogger(__name__)

#: FUSE options ecfs passes through when given with -o.
PASSTHROUGH_OPTIONS = {
    "allow_other",
    "default_permissions",
    "noatime",
    "ro",
    "nosuid",
    "nodev",
    "noexec",
    "suid",
    "dev",
    "exec",
    "rw",
    "relatime",
    "atime",
}
#: Options for mount helpers and fstab that mean nothing to the daemon.
IGNORED_OPTIONS = {"_netdev", "nofail", "auto", "noauto", "user", "users", "defaults"}
#: What `-o remount,...` can change: the kernel's flags of the mount (FUSE
#: accepts a remount that changes only those, and does not tell the
#: daemon; read-only is then enforced by the kernel: EROFS). Every other
#: option is fixed for the life of the daemon and is ignored on a remount
#: (mount(8) repeats the fstab options).
REMOUNT_FLAGS = {
    "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "nodiratime", "diratime",
    "lazytime", "nolazytime", "sync", "async",
}  # fmt: skip


@dataclass
class MountOptions:
    """Parsed `-o` options."""

    fuse: set[str] = field(default_factory=set)
    allow_other: bool = os.geteuid() == 0
    fsname: str = "ecfs"
    #: Repair bandwidth cap in bytes/s (`-o repair_max_rate=`, or its older
    #: name `repair_rate=`; 0: none). See ecfs.data.repair, "Pacing".
    repair_rate: int = 0
    #: The least bytes/s urgent repair keeps under foreground load, and the
    #: most it takes then (`-o repair_min_rate=`; 0: it yields as
    #: background repair does).
    repair_min_rate: int = DEFAULT_MIN_RATE
    #: Seconds a store may stay failed before all its chunks are rebuilt
    #: elsewhere (when there is a store to rebuild onto).
    rebuild_after: float = 900.0
    #: The least time one chunk's repair gets before it is skipped and
    #: retried later (`-o repair_deadline=`; see ecfs.data.background).
    repair_deadline: float = DEADLINE_FLOOR
    #: `-o remount,...`: change the flags of an existing mount (see `remount`).
    remount: bool = False
    #: The REMOUNT_FLAGS given, in order.
    remount_flags: list[str] = field(default_factory=list)
    #: Lifetime of the volume's lease in seconds (`-o lease_seconds=`).
    lease_seconds: float = DEFAULT_TTL
    #: Take over a lease that expired without release (`ecfs mount --takeover`).
    takeover: bool = False
    #: (address, port) to serve Prometheus metrics on (`-o metrics=`); None: off.
    metrics: tuple[str, int] | None = None
    #: The program run for each event (`-o event_hook=PATH`, see ecfs.volume.hooks).
    event_hook: Path | None = None
    #: Seconds an event hook may run before it is killed (`-o event_hook_timeout=`).
    event_hook_timeout: float = DEFAULT_HOOK_TIMEOUT

    def fuse_options(self) -> set[str]:
        options = {f"fsname={self.fsname}", "subtype=ecfs", "default_permissions"} | self.fuse
        if self.allow_other:
            options.add("allow_other")
        return options


def parse_options(values: Sequence[str]) -> MountOptions:
    """`-o a,b=c` values -> MountOptions; VolumeError for unknown options."""
    options = MountOptions()
    items = [item for value in values for item in value.split(",") if item]
    if "remount" in items:
        # mount(8) adds the options of the mount table (user_id=0, fsname=...)
        # and of fstab: only the flags can change, the rest is ignored.
        options.remount = True
        options.remount_flags = [item for item in items if item in REMOUNT_FLAGS]
        return options
    for value in values:
        for item in filter(None, value.split(",")):
            name, _, arg = item.partition("=")
            if name == "allow_other":
                options.allow_other = True
            elif name == "noallow_other":
                options.allow_other = False
            elif name == "fsname" and arg:
                options.fsname = arg
            elif name in ("repair_rate", "repair_max_rate") and arg:
                options.repair_rate = _option_number(item, parse_size, arg)
            elif name == "repair_min_rate" and arg:
                options.repair_min_rate = _option_number(item, parse_size, arg)
            elif name == "rebuild_after" and arg:
                options.rebuild_after = _option_number(item, float, arg)
            elif name == "repair_deadline" and arg:
                options.repair_deadline = _option_number(item, float, arg)
                if options.repair_deadline <= 0:
                    raise VolumeError(f"mount option {item!r} must be positive")
            elif name == "lease_seconds" and arg:
                options.lease_seconds = _option_number(item, float, arg)
                if options.lease_seconds < MIN_TTL:
                    raise VolumeError(f"mount option {item!r}: at least {MIN_TTL:g} seconds")
            elif name == "metrics" and arg:
                try:
                    options.metrics = parse_metrics_address(arg)
                except ValueError as exc:
                    raise VolumeError(f"mount option {item!r}: {exc}") from None
            elif name == "event_hook" and arg:
                try:
                    options.event_hook = check_hook(arg)
                except ValueError as exc:
                    raise VolumeError(f"mount option {item!r}: {exc}") from None
            elif name == "event_hook_timeout" and arg:
                options.event_hook_timeout = _option_number(item, float, arg)
                if options.event_hook_timeout <= 0:
                    raise VolumeError(f"mount option {item!r} must be positive")
            elif name in PASSTHROUGH_OPTIONS and not arg:
                options.fuse.add(name)
            elif name in IGNORED_OPTIONS or name.startswith(("x-", "comment=")):
                continue
            else:
                raise VolumeError(f"unknown mount option {item!r}")
    return options


def _option_number(item: str, parse: Callable[[str], float], arg: str) -> Any:
    try:
        value = parse(arg)
    except ValueError:
        raise VolumeError(f"bad value in mount option {item!r}") from None
    if value < 0:
        raise VolumeError(f"mount option {item!r} must not be negative")
    return value


def remount(mountpoint: Path, options: MountOptions) -> None:
    """Change the kernel flags (ro/rw, nosuid...) of the ecfs mount at
    `mountpoint`: what `mount -o remount,ro MNT` asks of mount.fuse.ecfs,
    also at system shutdown. Runs `mount --internal-only` (mount(2) with
    MS_REMOUNT and the mount's other flags kept, without calling this helper
    again); only root may (fusermount3 cannot remount). VolumeError if it
    is not an ecfs mount or the remount fails."""
    fstype = mounted_fstype(mountpoint)
    if fstype != "fuse.ecfs":
        raise VolumeError(f"{mountpoint} is not an ecfs mount" + (f" ({fstype})" if fstype else ""))
    if os.geteuid() != 0:
        raise VolumeError("only root can remount (fusermount3 cannot): use sudo mount -o remount,...")
    argv = ["mount", "--internal-only", "-o", ",".join(["remount", *options.remount_flags])]
    try:
        result = subprocess.run(
            [*argv, str(mountpoint)], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise VolumeError("mount(8) not found: cannot remount") from None
    if result.returncode != 0:
        raise VolumeError(f"remount of {mountpoint} failed: {result.stderr.strip()}")


def tune_gc() -> None:
    """Fewer cyclic-GC passes: every FUSE request allocates trio and
    request objects, and the default thresholds ran a collection every few
    requests. Objects alive at startup are frozen out of collections."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def tune_malloc() -> None:
    """Keep large buffers on the heap instead of fresh mmaps (zfec and
    fragment buffers page-faulted on every call without it: 20-40% faster)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def set_read_ahead(mountpoint: Path, kib: int = 1024) -> None:
    """Ask for 1 MiB read-ahead on the mount (fewer, larger FUSE reads)."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kib))
    except OSError as exc:
        log.debug("cannot set read-ahead of %s: %s", mountpoint, exc)


def mounted_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path` ("fuse.ecfs", "ext4"...),
    or None. Read from the mount table (`host.mount_at`), never by stat(),
    which hangs on a hung FUSE daemon and fails on the dead mount a killed
    daemon leaves."""
    mount = mount_at(path)
    return None if mount is None else mount.fstype


def check_mountpoint(mountpoint: Path, stores: Sequence[Path]) -> None:
    """VolumeError unless `mountpoint` is a directory, nothing is mounted
    on it, and no store lies inside it."""
    fstype = mounted_fstype(mountpoint)
    if fstype is not None:
        raise VolumeError(f"{mountpoint} is already a mount point ({fstype}); unmount it first")
    if not mountpoint.is_dir():
        if mountpoint.exists():
            raise VolumeError(f"mountpoint {mountpoint} is not a directory")
        raise VolumeError(f"mountpoint {mountpoint} does not exist")
    real = Path(os.path.realpath(mountpoint))
    for store in stores:
        store_real = Path(os.path.realpath(store))
        if store_real.is_relative_to(real):
            raise VolumeError(f"store {store} is inside the mountpoint {mountpoint}")
    if not os.path.exists("/dev/fuse"):
        raise VolumeError("/dev/fuse is missing: load the fuse module (modprobe fuse)")


def lock_stores(store_args: Sequence[str]) -> VolumeLock:
    """Take the volume lock (see `lock`) on every given store that exists,
    so that one volume is never served by two daemons at once, nor checked
    by fsck while mounted. Missing stores are skipped (Volume.open says
    whether that is within tolerance). VolumeError if one is in use."""
    present = [p for p in expand_store_args(store_args) if (p / MARKER_NAME).is_file()]
    return VolumeLock.acquire(present)


def take_lease(store_args: Sequence[str], lock: VolumeLock, options: MountOptions) -> Lease | None:
    """Take the lease of a volume with S3 stores (None without any; the
    local stores under `lock` count in its majority); VolumeError naming
    the holder if another host holds it."""
    paths = expand_store_args(store_args)
    lease = lease_for_stores(paths, lock.stores, ttl=options.lease_seconds)
    if lease is not None:
        lease.take(takeover=options.takeover)
    return lease


def open_volume(
    store_args: Sequence[str], options: MountOptions
) -> tuple[VolumeLock, Lease | None, Volume]:
    """Blocking: lock the stores, take the lease (S3 stores), open the
    volume. The caller releases them (see `_serve_process`, `run_offline`)."""
    lock = lock_stores(store_args)
    lease = None
    try:
        lease = take_lease(store_args, lock, options)
        volume = Volume.open(store_args, epoch=lease.epoch if lease is not None else 0)
        if lease is not None:
            try:
                local = [s for s in volume.stores.values() if not s.remote]
                lease.set_volume_stores(len(volume.store_table.paths()), len(local))
                if not lease.renew() and not lease.holds():  # opening may have taken long
                    raise VolumeError(f"cannot keep the volume's lease: {lease.why_not()}")
            except BaseException:
                volume.close()
                raise
            volume.lease = lease
    except BaseException:
        if lease is not None:
            lease.release()
        lock.release()
        raise
    return lock, lease, volume


def run_offline(store_args: Sequence[str], change: Callable[[Volume], None]) -> None:
    """Blocking: change the unmounted volume made of `store_args`. It is
    opened as a mount opens it (lock, lease, metadata copies checked),
    `change(volume)` runs before any background task starts (it commits
    metadata transactions), and the volume is closed as an unmount closes
    it, so the change is on every metadata copy. Used by `ecfs repair
    --pause/--resume` on an unmounted volume. VolumeError if the volume is
    mounted (its stores are locked) or cannot be opened; EcfsError if the
    change could not be made durable (what `ecfs umount` would report)."""
    lock, lease, volume = open_volume(store_args, MountOptions())
    try:
        trio.run(_run_offline, volume, change)
    finally:
        volume.close()
        if lease is not None and not volume.metadata_at_risk:
            lease.release()
        lock.release()
    if volume.shutdown_errors or volume.metadata_at_risk:
        raise EcfsError("; ".join(volume.shutdown_errors) or "the metadata is not durable")


async def _run_offline(volume: Volume, change: Callable[[Volume], None]) -> None:
    async with trio.open_nursery() as nursery:
        change(volume)
        await volume.start(nursery)
        with trio.CancelScope(shield=True):
            await volume.shutdown()
            nursery.cancel_scope.cancel()
    await volume.aclose_replicas()


def run_mount(
    store_args: Sequence[str],
    mountpoint: Path,
    options: MountOptions,
    *,
    foreground: bool,
    setup_logging: Callable[[bool], None],
) -> int:
    """Mount and serve until unmounted. Without `foreground`, the calling
    process returns once the daemon child is ready (0) or has failed (2 for
    a VolumeError, a usage problem; 1 otherwise), after printing the
    child's one-line reason on stderr.

    Parent and child talk through a pipe: the child writes "ok" once the
    mount answers, or "<exit status>:<message>"; end-of-file without a
    message means the child died."""
    if foreground:
        setup_logging(True)
        return _serve_process(store_args, mountpoint, options, ready=lambda msg: None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        status, _, text = message.partition(":")
        if not status.isdigit():
            status, text = "1", "the mount daemon died before mounting; see its log"
        sys.stderr.write(f"ecfs: {text}\n")
        return int(status)
    os.close(read_end)
    os.setsid()
    reported = False

    def ready(message: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(write_end, message.encode())
            os.close(write_end)

    code = 1
    try:
        setup_logging(False)
        _detach_stdio()
        os.chdir("/")  # never keep the caller's directory (and its filesystem) busy
        code = _serve_process(store_args, mountpoint, options, ready=ready)
    except VolumeError as exc:
        log.error("mount failed: %s", exc)
        ready(f"2:{exc}")
    except EcfsError as exc:
        log.error("mount failed: %s", exc)
        ready(f"1:{exc}")
    except BaseException as exc:  # report anything to the parent, then exit
        log.exception("mount failed")
        ready(f"1:mount failed: {type(exc).__name__}: {exc}")
    finally:
        ready("1:the mount daemon stopped before the mount was ready; see its log")
        logging.shutdown()
        os._exit(code)


def check_pyfuse3() -> None:
    """Warn when the installed pyfuse3 lacks a patch of ecfs's (a plain
    `pip install` of ecfs gets PyPI's pyfuse3; see scripts/pyfuse3): the
    mount works, but without the fallocate handler fallocate(2) on it fails
    with EOPNOTSUPP, and without the one that releases the GIL while the
    kernel copies requests and replies, large reads and writes are slower
    beside decodes and repairs (the worker threads wait meanwhile)."""
    missing = []
    if not hasattr(pyfuse3.Operations, "fallocate"):
        missing.append(
            "no fallocate handler: fallocate(2) on this mount fails with EOPNOTSUPP"
            " (posix_fallocate falls back to writing zeros)"
        )
    if not hasattr(pyfuse3, "ECFS_NOGIL_MIN"):
        missing.append(
            "requests and replies are copied with the GIL held: large reads and writes are"
            " slower beside decodes and repairs"
        )
    if missing:
        log.warning(
            "pyfuse3 %s lacks ecfs's patches: %s; to fix, run"
            " scripts/pyfuse3/install.sh %s from the ecfs source (see its README)",
            getattr(pyfuse3, "__version__", "?"), "; ".join(missing), sys.executable,
        )  # fmt: skip


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _serve_process(
    store_args: Sequence[str],
    mountpoint: Path,
    options: MountOptions,
    *,
    ready: Callable[[str], None],
) -> int:
    tune_malloc()
    tune_gc()
    lock, lease, volume = open_volume(store_args, options)
    try:
        volume.repairer.rate = options.repair_rate
        volume.repairer.min_rate = options.repair_min_rate
        volume.repairer.rebuild_after = options.rebuild_after
        volume.repairer.deadline_floor = options.repair_deadline
        volume.repairer.deadline_ceiling = max(
            volume.repairer.deadline_ceiling, options.repair_deadline
        )
        volume.mountpoint = mountpoint
        volume.events.mountpoint = str(mountpoint)
        hooks = None
        if options.event_hook is not None:
            hooks = HookRunner(volume.events, options.event_hook, options.event_hook_timeout)
            volume.hooks = hooks
    except BaseException:
        if lease is not None:
            lease.release()
        lock.release()
        raise
    endpoint = None
    try:
        if options.metrics is not None:
            endpoint = _serve_metrics(volume, *options.metrics)
        operations = EcfsOperations(volume, mount_uid=os.getuid())
        try:
            pyfuse3.init(operations, str(mountpoint), options.fuse_options())
        except RuntimeError as exc:
            raise VolumeError(f"cannot mount on {mountpoint}: {exc}") from None
        log.info("mounted volume %s on %s", volume.volume_id, mountpoint)
        check_pyfuse3()
        try:
            trio.run(_serve, volume, mountpoint, ready, endpoint, hooks)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        if endpoint is not None:
            endpoint.close()
        volume.close()
        if lease is not None and not volume.metadata_at_risk:
            lease.release()
        lock.release()
    if volume.shutdown_errors or volume.metadata_at_risk:
        log.error("unmounted %s with errors: %s", mountpoint, "; ".join(volume.shutdown_errors))
        return 1
    log.info("unmounted %s cleanly", mountpoint)
    return 0


def _serve_metrics(volume: Volume, address: str, port: int) -> MetricsEndpoint:
    endpoint = MetricsEndpoint(address, port, volume.status)
    try:
        endpoint.start()
    except OSError as exc:
        raise VolumeError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
    return endpoint


async def _serve(
    volume: Volume,
    mountpoint: Path,
    ready: Callable[[str], None],
    endpoint: MetricsEndpoint | None = None,
    hooks: HookRunner | None = None,
) -> None:
    if endpoint is not None:
        endpoint.attach(trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        if hooks is not None:  # first: events of the start (stores missing) are queued for it
            await nursery.start(supervised, "event hooks", hooks.run)
        await volume.start(nursery)
        nursery.start_soon(_terminate_on_signals)
        nursery.start_soon(_set_read_ahead_off_loop, mountpoint)
        ready("ok")
        try:
            await pyfuse3.main()
        finally:
            with trio.CancelScope(shield=True):
                if endpoint is not None:
                    await run_in_thread(endpoint.close)
                await volume.shutdown()
                nursery.cancel_scope.cancel()
    await volume.aclose_replicas()


async def _set_read_ahead_off_loop(mountpoint: Path) -> None:
    await run_in_thread(set_read_ahead, mountpoint)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
