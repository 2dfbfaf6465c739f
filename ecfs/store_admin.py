"""Changing the stores of a mounted volume: replace, add, remove (drain).

Owns: initialising a new store directory for this volume, switching the
store table, and queueing the rebuild or the moves. Must not: move data
itself (the repairer does, in the background).

* replace OLD NEW: NEW (an empty or new directory) becomes a store of this
  volume under OLD's index, so chunk maps need no change; every chunk that
  had a fragment on OLD is queued ('store-replaced') and rebuilt onto NEW.
  OLD may be dead; if it still answers, it is simply no longer used.
* add NEW: a new store index, used for new chunks at once (no rebalance).
* remove OLD: OLD is marked draining (no new fragments), all its chunks are
  queued and the repairer moves each fragment to a store holding none of
  that chunk; once nothing refers to OLD, it leaves the store table. Needs
  at least k+m other stores.

After a change, give the new store list (or a glob that matches it) to the
next `ecfs mount`.

A new store must be an absolute path (`control` refuses others), must not
be or nest with a store, and must not lie on the mount itself. Every path
operation (realpath, stat, marker) runs in a thread (`_off_loop`): the
event loop answers this mount's requests, so a path on the mount resolved
on the loop would wait for the loop forever.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from .errors import StoreError, VolumeError
from .mkfs import check_store_paths
from .offload import StoreRunner
from .s3store import is_s3_location
from .store import STORE_FORMAT, Store, StoreMarker, initialise_store

if TYPE_CHECKING:
    from .volume import Volume

#: Seconds between checks while a removed store drains.
DRAIN_POLL = 1.0
#: Seconds a path check (realpath, stat, marker) may take before the
#: command fails (a hung disk).
PATH_TIMEOUT = 30.0

T = TypeVar("T")


async def _retire(runner: StoreRunner) -> None:
    """Rename a store's marker away (best effort: the old disk may be dead),
    so that a glob still matching its directory no longer offers it to the
    volume; its fragment files are left for the operator to delete."""
    try:
        await runner.call(runner.store.retire, timeout=5.0)
    except StoreError:
        pass


async def _off_loop(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking path function (realpath, stat, reading a marker) in
    a thread, never on the event loop: a path may lie on this very mount,
    whose requests the loop answers (realpath of MNT/inner on the loop was a
    deadlock), or on a hung disk (the call is abandoned after a timeout)."""
    try:
        with trio.fail_after(PATH_TIMEOUT):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise VolumeError(f"a store path did not answer within {PATH_TIMEOUT:g} s") from None


def _resolve_index(given: str, paths: dict[int, str]) -> int | None:
    """The index whose path (from `paths`) is the same directory as `given`
    (blocking: realpath)."""
    real = Path(os.path.realpath(given))
    for index, path in paths.items():
        if path and Path(os.path.realpath(path)) == real:
            return index
    return None


def _check_new_store(known: list[Path], path: str, mountpoint: Path | None) -> None:
    """VolumeError unless `path` can become a new store: not a store
    already, not nested with one, and not on this mount (a store inside the
    volume it serves would hang or lose everything). Blocking."""
    check_store_paths([*known, Path(path)])
    if mountpoint is None or is_s3_location(path):
        return
    real = Path(os.path.realpath(path))
    if real.is_relative_to(Path(os.path.realpath(mountpoint))):
        raise VolumeError(f"{path} is inside the mountpoint {mountpoint}: a store cannot be")
    existing = real
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.stat(existing).st_dev == os.stat(mountpoint).st_dev:
        raise VolumeError(f"{path} is on the ecfs volume mounted at {mountpoint} itself")


def _device_and_id(store: Store) -> tuple[int, str]:
    return store.device(), store.read_marker().store_id


class StoreAdmin:
    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    async def _index_of(self, given: str) -> int:
        """A store by index number, store id or absolute path."""
        volume = self.volume
        if given.isdigit() and int(given) in volume.store_ids:
            return int(given)
        for index, store_id in volume.store_ids.items():
            if store_id == given:
                return index
        paths = {index: str(runner.store.path) for index, runner in volume.runners.items()}
        paths.update({i: p for i, p in volume.missing_stores().items() if i not in paths})
        found = await _off_loop(_resolve_index, given, paths)
        if found is None:
            raise VolumeError(f"{given} is not a store of this volume")
        return found

    async def _initialise(self, path: str) -> Store:
        volume = self.volume
        known = [runner.store.path for runner in volume.runners.values()]
        await _off_loop(_check_new_store, known, path, volume.mountpoint)
        marker = StoreMarker(
            volume_id=volume.volume_id,
            store_id=uuid.uuid4().hex,
            format=STORE_FORMAT,
            k=volume.layout.k,
            m=volume.layout.m,
            fragment_size=volume.layout.fragment_size,
            cell_size=volume.layout.cell_size,
            inline_max=volume.inline_max,
        )
        try:
            return await trio.to_thread.run_sync(initialise_store, path, marker)
        except StoreError as exc:
            raise VolumeError(f"cannot use {path} as a new store: {exc}") from None

    async def _install(self, index: int, store: Store) -> None:
        volume = self.volume
        device, store_id = await _off_loop(_device_and_id, store)
        volume.runners[index] = StoreRunner(index, store)  # shared by every service
        volume.handles.discard_store(index)
        volume.writer.device_of[index] = device
        volume.store_ids[index] = store_id

    async def replace(self, old: str, new: str) -> str:
        volume = self.volume
        index = await self._index_of(old)
        store = await self._initialise(new)
        marker = await trio.to_thread.run_sync(store.read_marker)
        with volume.db.transaction():
            volume.store_table.replace(index, marker.store_id)
            volume.store_table.set_path(index, str(store.path))
        if index in volume.runners:
            await _retire(volume.runners[index])
        await self._install(index, store)
        await volume.refresh_usage()
        count = volume.repairer.queue_store_rebuild(index, "store-replaced")
        await volume.ensure_replicas()
        return f"store {index} is now {new}; {count} chunks queued for rebuild onto it"

    async def add(self, new: str) -> str:
        volume = self.volume
        store = await self._initialise(new)
        marker = await trio.to_thread.run_sync(store.read_marker)
        with volume.db.transaction():
            index = volume.store_table.add(marker.store_id)
            volume.store_table.set_path(index, str(store.path))
        await self._install(index, store)
        await volume.refresh_usage()
        return f"store {index} added: {new}"

    async def remove(self, old: str) -> str:
        volume = self.volume
        index = await self._index_of(old)
        others = [i for i in volume.runners if i != index and i not in volume.placement.draining]
        if len(others) < volume.layout.n:
            raise VolumeError(
                f"removing store {index} would leave {len(others)} stores;"
                f" k+m={volume.layout.n} are needed"
            )
        with volume.db.transaction():
            volume.store_table.set_state(index, "draining")
        volume.placement.draining.add(index)
        volume.repairer.draining.add(index)
        volume.repairer.queue_store_rebuild(index, "store-failed")
        while True:
            left = volume.store_table.chunks_on(index)
            volume.store_change["message"] = f"{left} chunks left to move"
            if not left:
                break
            await trio.sleep(DRAIN_POLL)
        with volume.db.transaction():
            volume.store_table.remove(index)
        volume.placement.draining.discard(index)
        volume.repairer.draining.discard(index)
        runner = volume.runners.pop(index)
        volume.store_ids.pop(index, None)
        volume.handles.discard_store(index)
        await _retire(runner)
        return f"store {index} ({old}) drained and removed from the volume"
