"""Running a mount: options, daemonising, the trio main loop, shutdown.

Owns: FUSE mount options, the process life cycle of a mount (fork once the
mount is ready, report failures to the waiting parent), signals, and the
orderly shutdown after unmount. Must not: contain filesystem logic.

Life cycle: open the volume (blocking: stores, freshest metadata replica)
-> pyfuse3.init (the kernel mount exists) -> trio: start background tasks,
tell the parent "ready", serve until unmounted -> write back everything,
make metadata durable, delete garbage -> exit. SIGTERM/SIGINT end the loop
the same way and unmount.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from .errors import VolumeError
from .fs import EcfsOperations
from .volume import Volume

log = logging.getLogger(__name__)

#: FUSE options ecfs passes through when given with -o.
PASSTHROUGH_OPTIONS = {"allow_other", "default_permissions", "noatime", "ro", "nosuid", "nodev",
                       "noexec", "suid", "dev", "exec", "rw", "relatime", "atime"}
#: Options for mount helpers and fstab that mean nothing to the daemon.
IGNORED_OPTIONS = {"_netdev", "nofail", "auto", "noauto", "user", "users", "defaults"}


@dataclass
class MountOptions:
    """Parsed `-o` options."""

    fuse: set[str] = field(default_factory=set)
    allow_other: bool = os.geteuid() == 0
    fsname: str = "ecfs"

    def fuse_options(self) -> set[str]:
        options = {f"fsname={self.fsname}", "subtype=ecfs", "default_permissions"} | self.fuse
        if self.allow_other:
            options.add("allow_other")
        return options


def parse_options(values: Sequence[str]) -> MountOptions:
    """`-o a,b=c` values -> MountOptions; VolumeError for unknown options."""
    options = MountOptions()
    for value in values:
        for item in filter(None, value.split(",")):
            name, _, arg = item.partition("=")
            if name == "allow_other":
                options.allow_other = True
            elif name == "noallow_other":
                options.allow_other = False
            elif name == "fsname" and arg:
                options.fsname = arg
            elif name in PASSTHROUGH_OPTIONS and not arg:
                options.fuse.add(name)
            elif name in IGNORED_OPTIONS or name.startswith(("x-", "comment=")):
                continue
            else:
                raise VolumeError(f"unknown mount option {item!r}")
    return options


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


def check_mountpoint(mountpoint: Path, stores: Sequence[Path]) -> None:
    if not mountpoint.is_dir():
        raise VolumeError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise VolumeError(f"{mountpoint} is already a mount point; unmount it first")
    real = Path(os.path.realpath(mountpoint))
    for store in stores:
        store_real = Path(os.path.realpath(store))
        if store_real.is_relative_to(real):
            raise VolumeError(f"store {store} is inside the mountpoint {mountpoint}")
    if not os.path.exists("/dev/fuse"):
        raise VolumeError("/dev/fuse is missing: load the fuse module (modprobe fuse)")


def run_mount(
    store_args: Sequence[str],
    mountpoint: Path,
    options: MountOptions,
    *,
    foreground: bool,
    setup_logging: Callable[[bool], None],
) -> int:
    """Mount and serve until unmounted. Without `foreground`, the calling
    process returns (0 or 1) once the daemon child is ready or has failed."""
    if foreground:
        setup_logging(True)
        return _serve_process(store_args, mountpoint, options, ready=lambda msg: None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        sys.stderr.write(f"ecfs mount: {message or 'the mount daemon died; see its log'}\n")
        os.waitpid(pid, 0)
        return 1
    os.close(read_end)
    os.setsid()
    reported = False

    def ready(message: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(write_end, message.encode())
            os.close(write_end)

    try:
        setup_logging(False)
        _detach_stdio()
        code = _serve_process(store_args, mountpoint, options, ready=ready)
    except BaseException as exc:  # report anything to the parent, then exit
        ready(f"mount failed: {exc}")
        os._exit(1)
    ready("mount failed")
    os._exit(code)


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
    try:
        volume = Volume.open(store_args)
    except VolumeError as exc:
        ready(str(exc))
        raise
    try:
        operations = EcfsOperations(volume, mount_uid=os.getuid())
        try:
            pyfuse3.init(operations, str(mountpoint), options.fuse_options())
        except RuntimeError as exc:
            raise VolumeError(f"cannot mount on {mountpoint}: {exc}") from None
        log.info("mounted volume %s on %s", volume.volume_id, mountpoint)
        try:
            trio.run(_serve, volume, mountpoint, ready)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        volume.close()
    log.info("unmounted %s cleanly", mountpoint)
    return 0


async def _serve(volume: Volume, mountpoint: Path, ready: Callable[[str], None]) -> None:
    async with trio.open_nursery() as nursery:
        await volume.start(nursery)
        nursery.start_soon(_terminate_on_signals)
        nursery.start_soon(trio.to_thread.run_sync, set_read_ahead, mountpoint)
        ready("ok")
        try:
            await pyfuse3.main()
        finally:
            with trio.CancelScope(shield=True):
                await volume.shutdown()
                nursery.cancel_scope.cancel()
    await volume.aclose_replicas()


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
