"""O_DIRECT writes and buffered reads of one file through a real mount.

fstests generic/451: a file is rewritten again and again with asynchronous
direct writes (io_submit), alternating two patterns, while buffered readers
keep reading it; after each write a fresh buffered open must read the new
bytes. The kernel's FUSE module does not drop the pages that a concurrent
reader cached while an asynchronous direct write was in flight (a plain
pyfuse3 passthrough shows the same), so ecfs drops them at the next open
(see ecfs.frontend.fs).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

from tests.mounting import MountedVolume

#: x86_64 / aarch64-generic syscall numbers of the native AIO interface.
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209
IOCB_CMD_PWRITE = 1
SIZE = 655360  # generic/451's file size
ROUNDS = 120

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _IOCB(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32),
    ]  # fmt: skip


class _IOEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64), ("res2", ctypes.c_int64),
    ]  # fmt: skip


def aio_pwrite(fd: int, buf: mmap.mmap, offset: int) -> None:
    """One asynchronous write through io_submit, waited for."""
    ctx = ctypes.c_ulong(0)
    if _libc.syscall(SYS_IO_SETUP, 1, ctypes.byref(ctx)) < 0:
        raise OSError(ctypes.get_errno(), "io_setup")
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        iocb = _IOCB(opcode=IOCB_CMD_PWRITE, fildes=fd, buf=address, nbytes=len(buf), offset=offset)
        iocbs = (ctypes.POINTER(_IOCB) * 1)(ctypes.pointer(iocb))
        if _libc.syscall(SYS_IO_SUBMIT, ctx, 1, iocbs) != 1:
            raise OSError(ctypes.get_errno(), "io_submit")
        event = _IOEvent()
        if _libc.syscall(SYS_IO_GETEVENTS, ctx, 1, 1, ctypes.byref(event), None) != 1:
            raise OSError(ctypes.get_errno(), "io_getevents")
        assert event.res == len(buf), f"aio write returned {event.res}"
    finally:
        _libc.syscall(SYS_IO_DESTROY, ctx)


def test_async_direct_writes_and_buffered_reads_agree(volume: MountedVolume) -> None:
    path = volume.mountpoint / "aio-dio-cycle"
    patterns = []
    for byte in (0x55, 0xAA):
        buf = mmap.mmap(-1, SIZE)  # page aligned, as O_DIRECT wants
        buf.write(bytes([byte]) * SIZE)
        patterns.append(buf)
    fd = os.open(path, os.O_DIRECT | os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.pwritev(fd, [patterns[0]], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set():
            Path(path).read_bytes()

    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    try:
        for round_ in range(ROUNDS):
            want = patterns[(round_ + 1) % 2]
            fd = os.open(path, os.O_DIRECT | os.O_RDWR)
            try:
                aio_pwrite(fd, want, 0)
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.pread(fd, SIZE, 0)
            finally:
                os.close(fd)
            if got != want[:]:
                at = next(i for i in range(SIZE) if got[i] != want[i])
                raise AssertionError(
                    f"round {round_}: stale data from a buffered read at {at}:"
                    f" {got[at:at + 8].hex(' ')} where {want[at:at + 8].hex(' ')} was written"
                )
    finally:
        stop.set()
        reader.join(30)
    assert not reader.is_alive()
