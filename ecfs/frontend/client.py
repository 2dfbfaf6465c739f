"""The CLI's side of the control channel (see `control`): read a mount's
status and send it commands through the root directory's xattrs, and
read or set the redundancy policy of a directory and start a restripe
through that directory's (virtual) xattrs (`ecfs.data.policy`).

Owns: the attribute names, timeouts and error translation. Must not: know
what the commands do.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import EcfsError, VolumeError
from ..data.policy import EFFECTIVE_XATTR, POLICY_XATTR, RESTRIPE_XATTR
from ..volume.status import (
    IoStatus,
    StatusFormatError,
    VolumeStatus,
    from_json,
    iostat_from_json,
)

STATUS = "user.ecfs.status"
IOSTAT = "user.ecfs.iostat"
PID = "user.ecfs.pid"
COMMAND = "user.ecfs.control"

T = TypeVar("T")


class MountClient:
    """A running ecfs mount, reached through its mountpoint."""

    def __init__(self, mountpoint: str, timeout: float = 30.0) -> None:
        self.mountpoint = mountpoint
        self.timeout = timeout

    def status(self) -> VolumeStatus:
        """The mount's status record (sent as JSON, see `ecfs.volume.status`)."""
        return self._decoded(STATUS, from_json)

    def iostat(self) -> IoStatus:
        """The mount's cheap counters-only snapshot (`ecfs iostat`)."""
        return self._decoded(IOSTAT, iostat_from_json)

    def _decoded(self, name: str, decode: Callable[[object], T]) -> T:
        raw = self._call(lambda: os.getxattr(self.mountpoint, name))
        try:
            return decode(json.loads(raw))
        except (ValueError, StatusFormatError) as exc:
            raise EcfsError(
                f"{self.mountpoint}: the daemon's status is not understood ({exc}); was it"
                " mounted by another version of ecfs?"
            ) from None

    def pid(self) -> int:
        return int(self._call(lambda: os.getxattr(self.mountpoint, PID)))

    def command(self, text: str) -> None:
        self._call(lambda: os.setxattr(self.mountpoint, COMMAND, text.encode()))

    def effective_policy(self, path: str) -> dict[str, Any]:
        """The effective redundancy policy of `path` (see `ecfs.data.policy`)."""
        raw = self._call(lambda: os.getxattr(path, EFFECTIVE_XATTR))
        try:
            document = json.loads(raw)
        except ValueError:
            raise EcfsError(f"{path}: the daemon's answer is not understood") from None
        if not isinstance(document, dict):
            raise EcfsError(f"{path}: the daemon's answer is not understood")
        return document

    def set_policy(self, path: str, text: str) -> None:
        self._call(lambda: os.setxattr(path, POLICY_XATTR, text.encode()))

    def clear_policy(self, path: str) -> bool:
        """Remove the policy of directory `path`; False if it had none."""
        try:
            self._call(lambda: os.removexattr(path, POLICY_XATTR))
        except VolumeError:
            if POLICY_XATTR.decode() in self._call(lambda: os.listxattr(path)):
                raise
            return False
        return True

    def restripe(self, path: str) -> None:
        self._call(lambda: os.setxattr(path, RESTRIPE_XATTR, b"1"))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run fn in a thread so a hung mount cannot hang the CLI."""
        result: list[T] = []
        error: list[OSError] = []

        def run() -> None:
            try:
                result.append(fn())
            except OSError as exc:
                error.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise EcfsError(f"{self.mountpoint}: the ecfs daemon does not answer")
        if error:
            raise _translate(self.mountpoint, error[0])
        return result[0]


def _translate(mountpoint: str, exc: OSError) -> EcfsError:
    if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR):
        return VolumeError(f"{mountpoint} is not a mounted ecfs volume")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return VolumeError(f"{mountpoint}: only root and the user who mounted it may do this")
    if exc.errno == errno.EBUSY:
        return VolumeError(f"{mountpoint}: another operation of this kind is running")
    if exc.errno == errno.EINVAL:
        return VolumeError(f"{mountpoint}: the daemon refused the request (its log says why)")
    return EcfsError(f"{mountpoint}: {exc.strerror}")
