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
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .errors import StoreError, VolumeError
from .mkfs import check_store_paths
from .offload import StoreRunner
from .store import STORE_FORMAT, DirectoryStore, StoreMarker

if TYPE_CHECKING:
    from .volume import Volume

#: Seconds between checks while a removed store drains.
DRAIN_POLL = 1.0


async def _retire(runner: StoreRunner) -> None:
    """Rename a store's marker away (best effort: the old disk may be dead),
    so that a glob still matching its directory no longer offers it to the
    volume; its fragment files are left for the operator to delete."""
    try:
        await runner.call(runner.store.retire, timeout=5.0)
    except StoreError:
        pass


class StoreAdmin:
    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def _index_of(self, given: str) -> int:
        """A store by index number or by path."""
        if given.isdigit() and int(given) in self.volume.store_ids:
            return int(given)
        real = Path(os.path.realpath(given))
        for index, runner in self.volume.runners.items():
            if Path(os.path.realpath(runner.store.path)) == real:
                return index
        for index, path in self.volume.missing_stores().items():
            if path and Path(os.path.realpath(path)) == real:
                return index
        for index, store_id in self.volume.store_ids.items():
            if store_id == given:
                return index
        raise VolumeError(f"{given} is not a store of this volume")

    async def _initialise(self, path: str) -> DirectoryStore:
        volume = self.volume
        known = [runner.store.path for runner in volume.runners.values()]
        check_store_paths([*known, Path(path)])
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
            return await trio.to_thread.run_sync(DirectoryStore.initialise, path, marker)
        except StoreError as exc:
            raise VolumeError(f"cannot use {path} as a new store: {exc}") from None

    def _install(self, index: int, store: DirectoryStore) -> None:
        volume = self.volume
        volume.runners[index] = StoreRunner(index, store)  # shared by every service
        volume.handles.discard_store(index)
        volume.writer.device_of[index] = os.stat(store.path).st_dev
        volume.store_ids[index] = store.read_marker().store_id

    async def replace(self, old: str, new: str) -> str:
        volume = self.volume
        index = self._index_of(old)
        store = await self._initialise(new)
        marker = await trio.to_thread.run_sync(store.read_marker)
        with volume.db.transaction():
            volume.store_table.replace(index, marker.store_id)
            volume.store_table.set_path(index, str(store.path))
        if index in volume.runners:
            await _retire(volume.runners[index])
        self._install(index, store)
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
        self._install(index, store)
        await volume.refresh_usage()
        return f"store {index} added: {new}"

    async def remove(self, old: str) -> str:
        volume = self.volume
        index = self._index_of(old)
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
