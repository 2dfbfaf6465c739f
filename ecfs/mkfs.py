"""Creating a new volume on a set of empty directories.

Owns: validating the store list and the geometry, writing each store's
marker and the initial metadata replicas. Must not: mount or open the
volume (see `volume`).

Every check runs before anything is written, so a refused mkfs leaves the
directories as they were.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError, VolumeError
from .geometry import Layout
from .metadb.schema import create_database
from .replicas import replica_path
from .store import MARKER_NAME, STORE_FORMAT, DirectoryStore, StoreMarker

DEFAULT_DATA = 4
DEFAULT_PARITY = 2
#: Measured default: a 4 KiB rewrite + fsync rewrites one chunk (k x F).
DEFAULT_FRAGMENT_SIZE = 128 * 1024
DEFAULT_CELL_SIZE = 4096
DEFAULT_INLINE_MAX = 64 * 1024


@dataclass(frozen=True)
class VolumeSpec:
    k: int = DEFAULT_DATA
    m: int = DEFAULT_PARITY
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    cell_size: int = DEFAULT_CELL_SIZE
    inline_max: int = DEFAULT_INLINE_MAX


def check_store_paths(paths: Sequence[Path]) -> list[Path]:
    """Resolved paths; VolumeError for duplicates or nesting."""
    resolved = [Path(os.path.realpath(p)) for p in paths]
    seen: dict[Path, Path] = {}
    for given, real in zip(paths, resolved, strict=True):
        if real in seen:
            raise VolumeError(f"store {given} is given twice (same directory as {seen[real]})")
        seen[real] = given
    for a in resolved:
        for b in resolved:
            if a != b and b.is_relative_to(a):
                raise VolumeError(f"store {b} is inside store {a}")
    return resolved


def create_volume(paths: Sequence[Path], spec: VolumeSpec) -> str:
    """Create a volume over `paths`; returns its UUID (hex)."""
    if spec.m < 1:
        raise VolumeError("--parity must be at least 1")
    try:
        Layout(spec.k, spec.m, spec.fragment_size, spec.cell_size)
    except ValueError as exc:
        raise VolumeError(str(exc)) from None
    if len(paths) < spec.k + spec.m:
        raise VolumeError(
            f"{len(paths)} stores given; k={spec.k} + m={spec.m} needs at least {spec.k + spec.m}"
        )
    if not 0 <= spec.inline_max <= spec.fragment_size * spec.k:
        raise VolumeError("--inline-max must be between 0 and one chunk")
    resolved = check_store_paths(paths)
    for path in resolved:
        _check_empty(path)
    volume_id = uuid.uuid4().hex
    store_ids = [uuid.uuid4().hex for _ in resolved]
    stores = []
    for path, store_id in zip(resolved, store_ids, strict=True):
        marker = StoreMarker(
            volume_id=volume_id,
            store_id=store_id,
            format=STORE_FORMAT,
            k=spec.k,
            m=spec.m,
            fragment_size=spec.fragment_size,
            cell_size=spec.cell_size,
            inline_max=spec.inline_max,
        )
        try:
            stores.append(DirectoryStore.initialise(path, marker))
        except StoreError as exc:
            raise VolumeError(f"cannot create store {path}: {exc}") from None
    params = {
        "uuid": volume_id,
        "k": spec.k,
        "m": spec.m,
        "fragment_size": spec.fragment_size,
        "cell_size": spec.cell_size,
        "inline_max": spec.inline_max,
    }
    for store in stores[: spec.m + 1]:
        create_database(
            replica_path(store.meta_dir),
            params,
            store_ids,
            root_uid=os.getuid(),
            root_gid=os.getgid(),
            now_ns=time.time_ns(),
        )
    return volume_id


def _check_empty(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise VolumeError(f"{path} is not a directory")
    entries = os.listdir(path)
    if MARKER_NAME in entries:
        raise VolumeError(f"{path} already holds an ecfs store (refusing to overwrite it)")
    if entries:
        raise VolumeError(f"{path} is not empty ({len(entries)} entries); give an empty directory")
