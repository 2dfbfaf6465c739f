"""Changing the stores of a mounted volume: replace, add, remove (drain).

Owns: initialising a new store directory for this volume, switching the
store table, and queueing the rebuild or the moves. Must not: move data
itself (the repairer does, in the background).

* replace OLD NEW: NEW (an empty or new directory) becomes a store of this
  volume under OLD's index, so chunk maps need no change; every chunk that
  had a fragment on OLD is queued ('store-replaced') and rebuilt onto NEW.
  OLD may be dead; if it still answers, it is simply no longer used.
* add NEW [POLICY]: a new store index, used for new chunks at once (no
  rebalance). With a placement POLICY (`ecfs.data.placement`), the volume
  switches to it in the same transaction; a switch to hybrid queues every
  chunk with a fragment on a store of the wrong class ('wrong-class'), and
  the repairer moves those fragments (parity written before onto the
  remote stores).
* remove OLD: OLD is marked draining (no new fragments), all its chunks are
  queued and the repairer moves each fragment to a store holding none of
  that chunk; once nothing refers to OLD, it leaves the store table. Needs
  at least k+m other stores.

* set-domain OLD [LABEL]: OLD's failure domain label (`ecfs.storage.domains`,
  kept in the volume table) is set, or removed (back to its default).
  Placement follows at once; chunks now with two fragments in one domain
  while a store is in a domain holding none of theirs are queued
  ('shared-domain', `Repairer.queue_wrong_class`) and repair moves them.

Failure domains (`_check_domains`): replace and add refuse a new store that
shares a failure domain with another active store when the volume would
then have fewer distinct domains than k+m (some chunk would need two
fragments in one domain), naming the stores that share it, unless the
command says ``--allow-shared-domains`` (the new store's domain is its
``--domain LABEL`` if given, else resolved from its location). A new store that shares a
domain while enough others remain is accepted, and the message says so.
remove and set-domain are not refused; their message warns when fewer
than k+m distinct domains remain (status says so too).

Refused before anything changes (`_check_classes`): a change that leaves
the stores unfit for the placement policy (hybrid: fewer than k local or m
remote active stores, `ecfs.data.placement.policy_problem`). Nothing is
refused for the metadata's sake: after a change the copies go where
`ecfs.storage.metaobjects.copy_stores` says (files on m+1 local stores, or
objects on object stores when fewer are local).

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from ..core.errors import StoreError, VolumeError
from ..core.geometry import Layout
from ..data.placement import HYBRID, POLICY_KEY, Placement, policy_problem
from ..data.policy import Policies
from ..data.repair import Repairer
from ..storage.domains import check_label, label_key, labels_of, resolve_stores
from ..storage.handles import HandleCache
from ..storage.metadb.chunks import ChunkTable
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.stores import StoreTable
from ..storage.offload import StoreRunner, run_in_thread
from ..storage.s3store import is_s3_location
from ..storage.store import STORE_FORMAT, Store, StoreMarker
from ..storage.storefactory import initialise_store, open_store
from .mkfs import check_store_paths

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
            return await run_in_thread(fn, *args, abandon_on_cancel=True)
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


def _location_atoms(location: str) -> frozenset[str]:
    """The default failure domain atoms of a new store location (blocking);
    an unreachable one is a domain of its own."""
    try:
        return open_store(location).domain_atoms()
    except OSError:
        return frozenset([f"unknown:{location}"])


def _device_and_id(store: Store) -> tuple[int, str]:
    return store.device(), store.read_marker().store_id


class StoreAdmin:
    """Runs store changes; every part of the volume it changes is given
    explicitly (the mappings are the volume's own, changed in place)."""

    def __init__(
        self,
        *,
        db: Database,
        store_table: StoreTable,
        layout: Layout,
        volume_id: str,
        inline_max: int,
        runners: dict[int, StoreRunner],
        store_ids: dict[int, str],
        handles: HandleCache,
        device_of: dict[int, int],
        domains: dict[int, str],
        placement: Placement,
        repairer: Repairer,
        missing_stores: Callable[[], dict[int, str]],
        mountpoint: Callable[[], Path | None],
        refresh_usage: Callable[[], Awaitable[None]],
        ensure_replicas: Callable[[], Awaitable[None]],
        report: Callable[[str], None],
    ) -> None:
        """`missing_stores()`: index -> last path of the stores not open;
        `mountpoint()`: where the volume is mounted; `report(message)`:
        progress of a running change (shown by status); `domains`: store
        index -> failure domain, kept up to date here."""
        self.db = db
        self.store_table = store_table
        self.layout = layout
        self.volume_id = volume_id
        self.inline_max = inline_max
        self.runners = runners
        self.store_ids = store_ids
        self.handles = handles
        self.device_of = device_of
        self.domains = domains
        self.placement = placement
        self.repairer = repairer
        self.missing_stores = missing_stores
        self.mountpoint = mountpoint
        self.refresh_usage = refresh_usage
        self.ensure_replicas = ensure_replicas
        self.report = report

    async def _index_of(self, given: str) -> int:
        """A store by index number, store id or absolute path."""
        if given.isdigit() and int(given) in self.store_ids:
            return int(given)
        for index, store_id in self.store_ids.items():
            if store_id == given:
                return index
        paths = {index: str(runner.store.path) for index, runner in self.runners.items()}
        paths.update({i: p for i, p in self.missing_stores().items() if i not in paths})
        found = await _off_loop(_resolve_index, given, paths)
        if found is None:
            raise VolumeError(f"{given} is not a store of this volume")
        return found

    async def _initialise(self, path: str) -> Store:
        known = [runner.store.path for runner in self.runners.values()]
        await _off_loop(_check_new_store, known, path, self.mountpoint())
        marker = StoreMarker(
            volume_id=self.volume_id,
            store_id=uuid.uuid4().hex,
            format=STORE_FORMAT,
            k=self.layout.k,
            m=self.layout.m,
            fragment_size=self.layout.fragment_size,
            cell_size=self.layout.cell_size,
            inline_max=self.inline_max,
        )
        try:
            return await run_in_thread(initialise_store, path, marker)
        except StoreError as exc:
            raise VolumeError(f"cannot use {path} as a new store: {exc}") from None

    async def _install(self, index: int, store: Store) -> None:
        device, store_id = await _off_loop(_device_and_id, store)
        self.runners[index] = StoreRunner(index, store)  # shared by every service
        self.handles.discard_store(index)
        self.device_of[index] = device
        self.store_ids[index] = store_id
        await self._refresh_domains()

    async def _refresh_domains(self) -> None:
        """Resolve every present store's failure domain again (labels from
        the volume parameters) into `domains`."""
        labels = labels_of(self.store_table.params(), self.store_ids)
        stores = {index: runner.store for index, runner in self.runners.items()}
        found = await _off_loop(resolve_stores, stores, labels)
        self.domains.clear()
        self.domains.update(found)

    async def _check_domains(
        self, new: str, label: str | None, allow_shared: bool, drop: int | None = None
    ) -> str:
        """VolumeError if store `new` (labelled `label`, else resolved)
        would share a failure domain with an active store while fewer
        distinct domains than k+m would remain (module docstring); else a
        note for the message ("" if it shares none)."""
        atoms = (
            frozenset([label])
            if label is not None
            else await _off_loop(_location_atoms, new)
        )
        active = {
            i: self.domains.get(i) or f"unknown:{i}"
            for i in self.store_ids
            if i != drop and i not in self.placement.draining
        }
        sharing = sorted(i for i, name in active.items() if atoms & set(name.split("+")))
        if not sharing:
            return ""
        name = active[sharing[0]]
        distinct = len(set(active.values()))
        listing = ", ".join(f"{i} ({self._path_of(i)})" for i in sharing)
        if distinct < self.layout.n and not allow_shared:
            hint = "" if label is not None else "--domain LABEL if it is in fact independent, or "
            raise VolumeError(
                f"{new} is in failure domain {name} with store(s) {listing}: the volume would"
                f" have {distinct} distinct failure domains for the k+m={self.layout.n}"
                f" fragments of a chunk, so losing that domain could lose data; give {hint}"
                "--allow-shared-domains"
            )
        return f" (note: it shares failure domain {name} with store(s) {listing})"

    def _path_of(self, index: int) -> str:
        runner = self.runners.get(index)
        if runner is not None:
            return str(runner.store.path)
        return self.missing_stores().get(index, "missing")

    async def set_domain(self, old: str, label: str | None) -> str:
        """Label store `old`'s failure domain (None: back to its default)."""
        index = await self._index_of(old)
        if label is not None:
            check_label(label)
        with self.db.transaction():
            self.store_table.set_param(label_key(self.store_ids[index]), label or "")
        await self._refresh_domains()
        name = self.domains.get(index, label or "unknown")
        message = f"store {index} is in failure domain {name}" + self._domain_note()
        moving = self.repairer.queue_wrong_class()  # now in a shared domain: moved out
        return message + f" (new chunks follow it; {moving} chunk(s) queued to move a fragment)"

    async def replace(
        self, old: str, new: str, *, domain: str | None = None, allow_shared: bool = False
    ) -> str:
        index = await self._index_of(old)
        if index in self.runners:  # a missing store's class is unknown: not counted
            try:
                self._check_classes(self.placement.policy, add=new, drop=index)
            except VolumeError as exc:
                raise VolumeError(f"replacing store {index} by {new} is refused: {exc}") from None
        try:
            note = await self._check_domains(new, domain, allow_shared, drop=index)
        except VolumeError as exc:
            raise VolumeError(f"replacing store {index} by {new} is refused: {exc}") from None
        store = await self._initialise(new)
        marker = await run_in_thread(store.read_marker)
        with self.db.transaction():
            self.store_table.replace(index, marker.store_id)
            self.store_table.set_path(index, str(store.path))
            if domain is not None:
                self.store_table.set_param(label_key(marker.store_id), domain)
        if index in self.runners:
            await _retire(self.runners[index])
        await self._install(index, store)
        await self.refresh_usage()
        count = self.repairer.queue_store_rebuild(index, "store-replaced")
        await self.ensure_replicas()
        return f"store {index} is now {new}; {count} chunks queued for rebuild onto it{note}"

    async def add(
        self,
        new: str,
        policy: str | None = None,
        *,
        domain: str | None = None,
        allow_shared: bool = False,
    ) -> str:
        if policy is not None:
            self._check_classes(policy, add=new)
        note = await self._check_domains(new, domain, allow_shared)
        store = await self._initialise(new)
        marker = await run_in_thread(store.read_marker)
        switched = policy is not None and policy != self.placement.policy
        with self.db.transaction():
            index = self.store_table.add(marker.store_id)
            self.store_table.set_path(index, str(store.path))
            if switched:
                self.store_table.set_param(POLICY_KEY, policy or "")
            if domain is not None:
                self.store_table.set_param(label_key(marker.store_id), domain)
        await self._install(index, store)
        await self.refresh_usage()
        message = f"store {index} added: {new}{note}"
        if switched:
            self.placement.policy = policy or ""
            message += f"; placement is now {policy}"
            if policy == HYBRID:
                moving = self.repairer.queue_wrong_class()
                message += f" ({moving} chunks queued to move fragments to a store of their class)"
        return message

    def _check_classes(
        self, policy: str, *, add: str | None = None, drop: int | None = None
    ) -> None:
        """VolumeError if the active stores, with `add` (a location) and
        without store `drop`, would not suit `policy` or the metadata
        replicas (see the module docstring)."""
        remote = {
            i: runner.store.remote
            for i, runner in self.runners.items()
            if i != drop and i not in self.placement.draining
        }
        local_count = sum(1 for r in remote.values() if not r)
        remote_count = len(remote) - local_count
        if add is not None:
            if open_store(add).remote:
                remote_count += 1
            else:
                local_count += 1
        problem = policy_problem(policy, self.layout.k, self.layout.m, local_count, remote_count)
        if problem is not None:
            raise VolumeError(problem)

    async def remove(self, old: str) -> str:
        index = await self._index_of(old)
        others = [i for i in self.runners if i != index and i not in self.placement.draining]
        # Chunks and directories of their own coding (redundancy policies)
        # may need more stores than the volume's k+m.
        chunk_n = ChunkTable(self.db).widest()
        policy_n = Policies(InodeTable(self.db), self.layout.k, self.layout.m, lambda: 0).widest()
        needed = max(self.layout.n, chunk_n, policy_n)
        if len(others) < needed:
            why = (
                f"k+m={needed} are needed"
                if needed == self.layout.n
                else f"a redundancy policy (or chunks of one) needs {needed}; see `ecfs policy`"
            )
            raise VolumeError(f"removing store {index} would leave {len(others)} stores; {why}")
        try:
            self._check_classes(self.placement.policy, drop=index)
        except VolumeError as exc:
            raise VolumeError(f"removing store {index} is refused: {exc}") from None
        with self.db.transaction():
            self.store_table.set_state(index, "draining")
        self.placement.draining.add(index)
        self.repairer.draining.add(index)
        self.repairer.queue_store_rebuild(index, "store-failed")
        while True:
            left = self.store_table.chunks_on(index)
            self.report(f"{left} chunks left to move")
            if not left:
                break
            await trio.sleep(DRAIN_POLL)
        with self.db.transaction():
            self.store_table.remove(index)
        self.placement.draining.discard(index)
        self.repairer.draining.discard(index)
        runner = self.runners.pop(index)
        self.store_ids.pop(index, None)
        self.handles.discard_store(index)
        await _retire(runner)
        self.domains.pop(index, None)
        return f"store {index} ({old}) drained and removed from the volume" + self._domain_note()

    def _domain_note(self) -> str:
        """A warning when the active stores are in fewer distinct failure
        domains than k+m ("" otherwise)."""
        active = {
            self.domains.get(i) or f"unknown:{i}"
            for i in self.store_ids
            if i not in self.placement.draining
        }
        if len(active) >= self.layout.n:
            return ""
        return (
            f"; the volume has {len(active)} distinct failure domains for the"
            f" k+m={self.layout.n} fragments of a chunk: losing one can lose data"
        )
