"""Opening a volume and wiring its services together.

Owns: finding and checking the stores given by the user, preparing the
metadata working copy from the freshest replica, building every service,
the mount's background tasks, and an orderly shutdown. Must not: contain
filesystem logic (see filedata, namespace) or speak FUSE (see fs).

Store tolerance at open: every store in the volume's store table is either
present (its marker names this volume and that store) or missing; at most
m may be missing, otherwise some data could be unreadable and the mount is
refused with a clear message.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import trio

from . import control
from .codec import Codec
from .damage import DamageRecorder
from .errors import EcfsError, FsError, StoreError, VolumeError
from .filedata import FileData
from .garbage import ChunkPins, Garbage
from .geometry import Layout
from .handles import Expected, HandleCache
from .metadb.database import Database
from .metadb.stores import StoreTable
from .metadb.writelog import ensure_write_log_table
from .mkfs import check_store_paths
from .namespace import Namespace
from .offload import StoreRunner
from .placement import Placement
from .reader import ChunkReader
from .repair import Repairer
from .replicas import (
    Replicator,
    copy_database,
    place_replica,
    prepare_working_copy,
    replica_path,
)
from .scrub import Scrubber
from .smallwrites import WriteLog
from .store import DirectoryStore, StoreMarker
from .store_admin import StoreAdmin
from .tasks import guarded, supervised
from .writer import ChunkWriter

log = logging.getLogger(__name__)

#: Seconds a metadata transaction may wait to be batched with others before
#: it is made durable on the replicas when nobody calls fsync (fsync() and
#: unmount never wait for it: they flush at once).
COMMIT_INTERVAL = 1.0

#: Seconds unmount waits for the metadata to become durable before giving
#: up (and keeping the working copy, see KEEP_MARKER).
SHUTDOWN_DRAIN_TIMEOUT = 300.0

#: In a working-copy directory: keep it (it holds metadata not durable anywhere).
KEEP_MARKER = "KEEP-not-durable-on-replicas"

#: Seconds a store probe may take before the store counts as failed.
PROBE_TIMEOUT = 2.0

#: An fsync waiting this long probes the stores of the replicas behind.
LAGGING_REPLICA_PROBE = 1.0

#: Minimum seconds between two on-demand probes of one store.
PROBE_SPACING = 1.0

#: Seconds between refreshes of store usage and probes of failed stores.
HEALTH_INTERVAL = 5.0


def expand_store_args(args: Sequence[str]) -> list[Path]:
    """Store arguments as given, with glob patterns expanded (sorted)."""
    paths: list[Path] = []
    for arg in args:
        if glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise VolumeError(f"no store matches {arg!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(arg))
    return paths


def read_markers(paths: Sequence[Path]) -> dict[Path, StoreMarker]:
    """Markers of the readable stores; unreadable ones are logged and left out."""
    markers: dict[Path, StoreMarker] = {}
    for path in paths:
        try:
            markers[path] = DirectoryStore(path).read_marker()
        except StoreError as exc:
            log.warning("store %s is unavailable: %s", path, exc)
    return markers


def remove_dead_working_copies(runtime_dir: Path | None) -> None:
    """Delete the working-copy directories of mounts that died (their pid is
    gone). Each is a full copy of some volume's metadata, made obsolete by
    the replicas at the next mount; a crash would otherwise leave it behind.
    One whose metadata could not be made durable at unmount is kept (the
    daemon exited normally then, but logged its path: its name says so)."""
    directory = Path(runtime_dir or tempfile.gettempdir())
    for path in directory.glob("ecfs-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or (path / KEEP_MARKER).exists():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def identify_stores(markers: dict[Path, StoreMarker]) -> dict[str, Path]:
    """Store UUID -> path; VolumeError if the stores belong to different
    volumes or one store was given twice (under two paths)."""
    volumes = {marker.volume_id for marker in markers.values()}
    if len(volumes) > 1:
        listing = ", ".join(f"{p} -> {m.volume_id}" for p, m in markers.items())
        raise VolumeError(f"the stores belong to different volumes: {listing}")
    by_store_id: dict[str, Path] = {}
    for path, marker in markers.items():
        if marker.store_id in by_store_id:
            raise VolumeError(f"{path} and {by_store_id[marker.store_id]} are the same store")
        by_store_id[marker.store_id] = path
    return by_store_id


class Volume:
    """An open volume: its parameters, stores and services."""

    def __init__(self, db: Database, stores: dict[int, DirectoryStore], workdir: Path) -> None:
        self.db = db
        self.workdir = workdir
        params = StoreTable(db).params()
        self.volume_id = str(params["uuid"])
        k, m = int(params["k"]), int(params["m"])
        self.layout = Layout(k, m, int(params["fragment_size"]), int(params["cell_size"]))
        self.inline_max = int(params["inline_max"])
        self.stores = stores
        self.store_table = StoreTable(db)
        self.runners = {i: StoreRunner(i, store) for i, store in stores.items()}
        self.codec = Codec(k, m)
        self.handles = HandleCache()
        self.placement = Placement(self.runners)
        self.pins = ChunkPins()
        self.namespace = Namespace(db)
        self.writer = ChunkWriter(
            self.layout,
            self.codec,
            self.runners,
            self.placement,
            uuid.UUID(self.volume_id).bytes,
            self._new_chunk_id,
            device_of={i: os.stat(s.path).st_dev for i, s in stores.items()},
        )
        self.damage = DamageRecorder(db, k)
        self.reader = ChunkReader(
            self.layout,
            self.codec,
            self.runners,
            self.handles,
            Expected(uuid.UUID(self.volume_id).bytes, k, m, self.layout.cell_size),
            self.damage.record,
            on_missing=self.store_may_be_gone,
        )
        self.replicator: Replicator | None = None
        self.garbage = Garbage(
            self.runners,
            self.handles,
            self.pins,
            self._durable_generation,
            lambda: self.filedata.last_activity,
        )
        self.writelog = WriteLog(db, self.layout.chunk_size)
        self.filedata = FileData(
            self.layout,
            db,
            self.namespace,
            self.reader,
            self.writer,
            self.garbage,
            self.pins,
            self._wait_durable,
            inline_max=self.inline_max,
            writelog=self.writelog,
        )
        self.repairer = Repairer(
            db,
            self.layout,
            self.codec,
            self.reader,
            self.runners,
            self.placement,
            self.handles,
            self.garbage,
            self.pins,
            uuid.UUID(self.volume_id).bytes,
            lambda: self.filedata.last_activity,
            lambda store: self.writer.unsynced.add(store),  # the set is swapped per sync
        )
        self.damage.on_queued = self.repairer.poke
        self.scrubber = Scrubber(
            db,
            self.layout,
            self.reader,
            self.runners,
            lambda: self.filedata.last_activity,
            self.repairer.poke,
        )
        self.store_change: dict[str, str | None] = {}
        self.stores_admin = StoreAdmin(self)
        self._devices = self.writer.device_of
        self.store_ids = dict(self.store_table.all())
        draining = {i for i, state in self.store_table.states().items() if state == "draining"}
        self.placement.draining |= draining
        self.repairer.draining |= draining
        self._last_probe: dict[int, float] = {}
        self._replacing_replicas = False
        self._replica_lock = trio.Lock()
        #: Set when unmount could not make the metadata durable anywhere: the
        #: working copy is then kept (its path is logged) instead of deleted.
        self.metadata_at_risk = False
        self._nursery: trio.Nursery | None = None

    def _remember_store_paths(self) -> None:
        """Record where each present store is, so a store that dies later
        can still be named by its path."""
        known = self.store_table.paths()
        changed = {i: str(s.path) for i, s in self.stores.items() if known.get(i) != str(s.path)}
        if changed:
            with self.db.transaction():
                for index, path in changed.items():
                    self.store_table.set_path(index, path)

    def _open_write_log(self) -> None:
        """Create the small-write log's table on a volume that predates it
        (replicated like any transaction), and load its index."""
        if ensure_write_log_table(self.db):
            log.info("created the small-write log table (write_log)")
        chunks = self.filedata.chunks

        def current(inode: int, idx: int) -> int:
            ref = chunks.get(inode, idx)
            return 0 if ref is None else ref.chunk_id

        for problem in self.writelog.load(current):
            log.warning("%s (ecfs fsck --repair deletes it)", problem)

    def missing_stores(self) -> dict[int, str]:
        """Stores of the volume that are not open in this mount: index -> last path."""
        return {i: p for i, p in self.store_table.paths().items() if i not in self.runners}

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, store_args: Sequence[str], *, runtime_dir: Path | None = None) -> Volume:
        """Blocking: check the stores, prepare the working copy, build."""
        paths = check_store_paths(expand_store_args(store_args))
        markers = read_markers(paths)
        if not markers:
            raise VolumeError("none of the given stores is readable")
        by_store_id = identify_stores(markers)
        replicas = [replica_path(DirectoryStore(p).meta_dir) for p in markers]
        remove_dead_working_copies(runtime_dir)
        workdir = Path(tempfile.mkdtemp(prefix=f"ecfs-{os.getpid()}-", dir=runtime_dir))
        try:
            working = workdir / "metadata.sqlite"
            prepared = prepare_working_copy(
                [r for r in replicas if r.exists()] or replicas, working
            )
            db = Database(working)
            stores = _match_stores(StoreTable(db).all(), by_store_id, db)
            volume = cls(db, stores, workdir)
            volume._setup_replicas(prepared.current)
            volume._remember_store_paths()  # after: so the change is replicated
            volume._open_write_log()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return volume

    def _setup_replicas(self, current: list[Path]) -> None:
        """Replicate to the current replicas, adding copies on other stores
        until there are m+1 (a replica lost with its store is rebuilt)."""
        targets: dict[int, Path] = {}
        for index, store in self.stores.items():
            path = replica_path(store.meta_dir)
            if path in current:
                targets[index] = path
        wanted = self.layout.m + 1
        snapshot = self.workdir / "replica-source.sqlite"
        try:
            for index, store in sorted(self.stores.items()):
                if len(targets) >= wanted:
                    break
                if index in targets:
                    continue
                if not snapshot.exists():  # the working copy is locked: copy a snapshot
                    self.db.snapshot(snapshot)
                path = replica_path(store.meta_dir)
                try:
                    copy_database(snapshot, path)
                except (StoreError, OSError) as exc:
                    log.warning("cannot add a metadata replica on store %d: %s", index, exc)
                    continue
                log.info("added metadata replica on store %d (%s)", index, store.path)
                targets[index] = path
        finally:
            snapshot.unlink(missing_ok=True)
        if len(targets) < wanted:
            log.warning("only %d metadata replicas (want %d)", len(targets), wanted)
        self.replicator = Replicator(
            targets,
            self.runners,
            self.writer.sync_stores,
            self.db.generation,
            commit_interval=COMMIT_INTERVAL,
        )
        self.db.on_commit = self.replicator.submit
        self.replicator.on_stale = lambda index: self._replace_replicas_soon()

    # -- running -----------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the background tasks and finish crash recovery."""
        assert self.replicator is not None
        self._nursery = nursery
        await nursery.start(supervised, "metadata replication", self.replicator.run)
        await nursery.start(supervised, "garbage collector", self.garbage.run)
        await nursery.start(supervised, "repair", self.repairer.run)
        await self.refresh_usage()
        nursery.start_soon(supervised, "store health", self._health_loop)
        nursery.start_soon(supervised, "attribute write-back", self.filedata.write_back_attributes)
        nursery.start_soon(
            supervised,
            "small-write fold",
            self.writelog.run,
            self.filedata.fold_chunk,
            lambda: self.filedata.last_activity,
        )
        self.filedata.attach(nursery)
        for ino in self.namespace.orphans():
            log.info("freeing inode %d (unlinked while open before a crash)", ino)
            await self.filedata.free(ino)

    async def shutdown(self) -> None:
        """Write back everything, make it durable, delete garbage."""
        await self.filedata.flush_all()
        await self.filedata.fold_all()
        try:
            with trio.fail_after(SHUTDOWN_DRAIN_TIMEOUT):
                await self._drain_metadata()
        except (StoreError, trio.TooSlowError) as exc:
            self.metadata_at_risk = True
            log.critical(
                "metadata not durable at unmount: %s; the working copy is kept at %s"
                " (copy it over a replica to recover the latest changes)",
                exc,
                self.db.path,
            )
            return
        await self.garbage.collect()

    async def _drain_metadata(self) -> None:
        """Make everything durable; if every replica went stale, place new
        ones on healthy stores first (a store that was full or away may be
        usable again)."""
        if self.replicator is None:
            return
        try:
            await self.replicator.drain()
        except StoreError:
            await self.refresh_usage()  # a store that was full may have room now
            await self.ensure_replicas()
            await self.replicator.drain()

    def close(self) -> None:
        """Release files (after shutdown and after the task nursery ended)."""
        self.reader.readahead.close()
        self.handles.close_all()
        self.db.close()
        if self.metadata_at_risk:
            (self.workdir / KEEP_MARKER).touch()
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def aclose_replicas(self) -> None:
        if self.replicator is not None:
            await self.replicator.aclose()

    async def refresh_usage(self) -> None:
        async def one(index: int, runner: StoreRunner) -> None:
            try:
                usage = await runner.call(runner.store.usage, timeout=5.0)
            except StoreError as exc:
                log.debug("store %d: usage unavailable: %s", index, exc)
                return
            self.placement.update_usage(index, usage)

        async with trio.open_nursery() as nursery:
            for index, runner in self.runners.items():
                nursery.start_soon(one, index, runner)

    async def _health_loop(self) -> None:
        while True:
            await trio.sleep(HEALTH_INTERVAL)
            await self.check_stores()
            await self.refresh_usage()
            await self.ensure_replicas()
            self.repairer.note_store_states()
            self.garbage.poke()

    async def check_stores(self) -> None:
        """Probe every store: a store whose marker vanished (or changed) is
        marked failed; a failed store whose marker is back is marked ok."""
        async with trio.open_nursery() as nursery:
            for index in self.runners:
                nursery.start_soon(self.probe_store, index)

    async def probe_store(self, index: int) -> None:
        runner = self.runners[index]
        was_available = runner.available
        try:
            marker = await runner.call(runner.store.probe, timeout=PROBE_TIMEOUT)
            if marker.store_id != self.store_ids[index] or marker.volume_id != self.volume_id:
                raise StoreError(f"{runner.store.path} now holds a different store")
        except StoreError as exc:
            if was_available:
                runner.mark_failed(str(exc))
                self.handles.discard_store(index)
                log.warning("store %d (%s) failed: %s", index, runner.store.path, exc)
            if self.replicator is not None:
                self.replicator.drop_replica(index, f"store failed: {exc}")
            return
        if not was_available:
            runner.mark_ok()
            log.warning("store %d (%s) is back", index, runner.store.path)

    def store_may_be_gone(self, index: int) -> None:
        """Reader callback on a missing fragment: probe that store soon
        (at most once per PROBE_SPACING seconds), so a vanished store is
        detected on first use and routed around."""
        now = trio.current_time()
        if now - self._last_probe.get(index, -PROBE_SPACING) < PROBE_SPACING:
            return
        self._last_probe[index] = now
        if self._nursery is not None:
            self._nursery.start_soon(guarded, "store probe", self.probe_store, index)

    def _replace_replicas_soon(self) -> None:
        if self._nursery is not None and not self._replacing_replicas:
            self._replacing_replicas = True
            self._nursery.start_soon(guarded, "replica replacement", self._replace_replicas)

    async def _replace_replicas(self) -> None:
        try:
            await trio.lowlevel.checkpoint()  # let the stale-marking caller finish
            await self.ensure_replicas()
        finally:
            self._replacing_replicas = False

    async def ensure_replicas(self) -> None:
        """Keep m+1 live metadata replicas: replace a stale one by a fresh
        copy on its own store if it is back, else on another healthy store."""
        async with self._replica_lock:
            await self._ensure_replicas()

    async def _ensure_replicas(self) -> None:
        replicator = self.replicator
        if replicator is None:
            return
        live = set(replicator.live_replicas())
        wanted = self.layout.m + 1
        if len(live) >= wanted:
            return
        stale = set(replicator.stale_replicas())
        candidates = sorted(
            (i for i, r in self.runners.items() if r.available and i not in live),
            key=lambda i: (i in self.placement.full, i not in stale, i),
        )
        for index in candidates[: wanted - len(live)]:
            await self.writer.sync_stores()  # what the copy refers to is durable
            generation = self.db.generation
            snapshot = self.workdir / f"replica-{index}.sqlite"
            self.db.snapshot(snapshot)  # on the loop: consistent at `generation`
            runner = self.runners[index]
            target = replica_path(runner.store.meta_dir)
            try:
                await runner.call(place_replica, snapshot, target, timeout=60.0)
            except EcfsError as exc:
                log.warning("cannot place a metadata replica on store %d: %s", index, exc)
                continue
            finally:
                snapshot.unlink(missing_ok=True)
            await replicator.add_replica(index, target, generation)

    def status(self) -> dict[str, object]:
        """A JSON-able snapshot (see control.status for the keys)."""
        status = control.status(self)
        status["store_change"] = dict(self.store_change)
        return status

    # -- operator commands -----------------------------------------------------------

    def start_scrub(self, max_duration: float | None) -> None:
        if self._nursery is None or self.scrubber.progress.running:
            return
        self._nursery.start_soon(guarded, "scrub", self.scrubber.run, max_duration)

    def start_store_change(self, op: str, old: str | None, new: str | None) -> None:
        """Begin replacing, adding or draining a store (progress in
        status()["store_change"])."""
        if self.store_change.get("state") == "running":
            raise FsError("a store change is already running", errno=errno.EBUSY)
        self.store_change = {"op": op, "old": old, "new": new, "state": "running", "message": ""}
        assert self._nursery is not None
        self._nursery.start_soon(guarded, "store change", self._store_change, op, old, new)

    async def _store_change(self, op: str, old: str | None, new: str | None) -> None:
        try:
            if op == "replace":
                message = await self.stores_admin.replace(old or "", new or "")
            elif op == "add":
                message = await self.stores_admin.add(new or "")
            else:
                message = await self.stores_admin.remove(old or "")
        except EcfsError as exc:
            self.store_change.update(state="failed", message=str(exc))
            log.error("store %s failed: %s", op, exc)
            return
        self.store_change.update(state="done", message=message)
        log.warning("store %s: %s", op, message)

    async def _new_chunk_id(self) -> int:
        """A chunk id that no later mount can hand out again: ids come in
        blocks, and the first use of a block waits until the reservation is
        durable (once per ID_BLOCK chunks)."""
        chunk_id, reserved_at = self.db.next_id_reserved("chunk")
        if self.replicator is not None and reserved_at > self.replicator.durable_generation:
            await self._wait_durable(reserved_at)
        return chunk_id

    def _durable_generation(self) -> int:
        return self.replicator.durable_generation if self.replicator else self.db.generation

    async def _wait_durable(self, generation: int) -> None:
        """fsync(): wait until `generation` is durable; if no replica is
        live, try to place new ones before giving up (EIO)."""
        replicator = self.replicator
        if replicator is None:
            return
        try:
            while True:
                with trio.move_on_after(LAGGING_REPLICA_PROBE):
                    await replicator.wait_durable(generation)
                    return
                # Slow: probe the stores of the replicas still behind; a
                # hung one is dropped (see probe_store) instead of waited for.
                async with trio.open_nursery() as nursery:
                    for index in replicator.lagging(generation):
                        nursery.start_soon(self.probe_store, index)
        except StoreError:
            await self.refresh_usage()
            await self.ensure_replicas()
            await replicator.wait_durable(generation)

    def capacity(self) -> tuple[int, int]:
        """(total, free) usable bytes: raw space of the stores' distinct
        filesystems, scaled by k/(k+m)."""
        total = free = 0
        seen: set[int] = set()
        for index, usage in self.placement.usage.items():
            device = self._devices.get(index)
            if device in seen or not self.runners[index].available:
                continue
            seen.add(device if device is not None else -index)
            total += usage.total_bytes
            free += usage.free_bytes
        k, n = self.layout.k, self.layout.n
        return total * k // n, free * k // n


def _match_stores(
    table: list[tuple[int, str]], by_store_id: dict[str, Path], db: Database
) -> dict[int, DirectoryStore]:
    """Store index -> DirectoryStore for the stores present; VolumeError if
    a given store is not in the volume or too many are missing."""
    known = {store_id: index for index, store_id in table}
    stores: dict[int, DirectoryStore] = {}
    for store_id, path in by_store_id.items():
        if store_id not in known:
            raise VolumeError(f"store {path} is not (or no longer) part of this volume")
        stores[known[store_id]] = DirectoryStore(path)
    m = int(StoreTable(db).params()["m"])
    missing = [index for index, _ in table if index not in stores]
    if len(missing) > m:
        raise VolumeError(
            f"only {len(stores)} of {len(table)} stores are present; at most {m} may be"
            f" missing (missing store indices: {missing})"
        )
    if missing:
        log.warning("mounting degraded: stores %s are missing", missing)
    return stores

