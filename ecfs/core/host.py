"""The host's mount table and page cache, for ecfs and its tests and scripts.

Owns: reading /proc/self/mountinfo (`mounts`, `mount_at`) and dropping the
kernel's caches (`drop_caches`). The mount table is read, never a stat()
of a mountpoint: a stat waits forever on a hung FUSE daemon and fails on
the dead mount a killed daemon leaves behind. Must not: import anything of
ecfs (tests and scripts import it on its own).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
DROP_CACHES = "/proc/sys/vm/drop_caches"


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo (see proc(5)); paths unescaped."""

    device: str  # "major:minor"
    mountpoint: Path
    options: str  # per-mount options ("rw,nosuid,...")
    fstype: str  # "ext4", "fuse.ecfs", ...
    source: str
    super_options: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(table: str = MOUNTINFO) -> list[Mount]:
    """Every mount in this namespace, in table order (a later mount on the
    same path hides the earlier ones). OSError if the table is unreadable."""
    found = []
    with open(table, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                found.append(
                    Mount(
                        device=fields[2],
                        mountpoint=Path(_unescape(fields[4])),
                        options=fields[5],
                        fstype=fields[sep + 1],
                        source=_unescape(fields[sep + 2]),
                        super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                    )
                )
            except (ValueError, IndexError):
                continue  # not a mountinfo line
    return found


def mount_at(path: os.PathLike[str] | str, *, resolve: bool = True) -> Mount | None:
    """The visible (last) mount exactly at `path`, or None (also when the
    table cannot be read). `resolve`: compare realpath(path); without it,
    only the parent is resolved (resolving the mountpoint itself would stat
    its root, which waits on a hung daemon)."""
    path = Path(path)
    target = (
        Path(os.path.realpath(path)) if resolve else Path(os.path.realpath(path.parent)) / path.name
    )
    try:
        table = mounts()
    except OSError:
        return None
    found = None
    for mount in table:
        if mount.mountpoint == target:
            found = mount
    return found


def fuse_mounts() -> list[Mount]:
    """The FUSE mounts (fstype fuse, fuse.*, fuseblk) in this namespace."""
    return [m for m in mounts() if m.fstype == "fuse" or m.fstype.startswith(("fuse.", "fuseblk"))]


def drop_caches(sync: bool = True) -> bool:
    """Drop the page, dentry and inode caches, so the next reads go to the
    filesystems; first write dirty data back unless `sync` is False (sync()
    would wait on a hung mount). False when not allowed (not root)."""
    if sync:
        os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True
