"""Opening a volume and wiring its services together.

Owns: finding and checking the stores given by the user, preparing the
metadata working copy from the replica `ecfs.storage.replicas` chooses (every copy
checked before any is written; the stale and refused ones are rewritten
only once the volume opened; copies kept as objects on S3 stores are
rebuilt into the working directory first and written at the mount's
fencing epoch, see `ecfs.storage.metaobjects`), building every service,
the mount's background tasks, and an orderly shutdown. Must not: contain
filesystem logic (see filedata, namespace) or speak FUSE (see fs).

Shutdown: every step (write back, make the metadata durable, delete
garbage) runs even if an earlier one failed, and each failure is recorded
in `shutdown_errors`: the daemon then exits 1 and leaves a report that
`ecfs umount` prints (see SHUTDOWN_REPORT) instead of a clean unmount.

Store tolerance at open: every store in the volume's store table is either
present (its marker names this volume and that store) or missing; at most
m may be missing, otherwise some data could be unreadable and the mount is
refused with a clear message -- unless the missing stores are one lost
failure domain's worth: in at most m domains of a volume of more than m,
with every chunk still holding k fragments on the present stores
(`_too_many_missing` says why this is safe for the metadata too).

Markers, one rule (`select_volume`, `marker_mismatch`): a store whose
marker cannot be used is left out with a warning naming it and why, and
counts as missing: an unreadable or garbled marker (or a symlink, FIFO or
directory in its place), a marker of another volume (the volume is the one
most given stores belong to; a tie is refused), and a marker whose geometry
(k, m, fragment_size, cell_size, inline_max) differs from the
volume's metadata. Only when more than m stores are missing that way (and
not just one lost domain's worth, above) is the mount refused; fsck
reports every such store.

Store identity while mounted: each present store's marker and the device
and inode of its root are pinned at open (`Store.pin_identity`)
and checked by every probe: periodically (HEALTH_INTERVAL), on a missing
fragment (`store_may_be_gone`), and before a store not verified for
IDENTITY_MAX_AGE seconds gets new fragments (`verify_before_write`); a
write that finds a fan-out directory missing checks it too. A store that
is no longer the same is marked failed with the reason (status shows it),
gets no more writes, loses its cached file descriptors and its metadata
replica, and is marked ok again once a probe finds the same marker there
(a root that moved, e.g. a disk mounted anew, is then pinned again).

Events (`ecfs.core.events`): `events` is the volume's sink. The volume
reports store-failed and store-back from every store's health changes
(`StoreRunner.on_health_change`; also store-failed at `start` for each
store missing at open) and chunk-unrecoverable once per chunk for file
reads and the repairer (`chunk_unrecoverable`); the scrubber and the
repairer emit their own. The mount runs the hook (`ecfs.volume.hooks`).
A store failing or coming back is logged once, by its event's line (a
WARNING for store-failed, with the reason; INFO for store-back), not
again as a plain line.

The lease (volumes with S3 stores, see `ecfs.storage.lease`): the mount
takes it before opening the volume and sets `lease`; `start` renews it in
a background task. While it is not held (not renewed in time, or taken
over), this mount acknowledges no write: new fragments are refused
(`verify_before_write`), and fsync, write(2) and every wait for durability
fail with EIO (`check_lease`, `_wait_durable`).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import logging
import math
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

from ..core.codec import Codec
from ..core.errors import EcfsError, FsError, StoreError, VolumeError
from ..core.events import CHUNK_UNRECOVERABLE, STORE_BACK, STORE_FAILED, EventSink
from ..core.geometry import Layout
from ..core.tasks import guarded, supervised
from ..data.background import BackgroundGate
from ..data.damage import DamageRecorder
from ..data.filedata import FileData
from ..data.garbage import ChunkPins, Garbage
from ..data.logfiles import LogFiles
from ..data.namespace import Namespace
from ..data.placement import HYBRID, POLICIES, POLICY_KEY, SPREAD, Placement
from ..data.policy import Policies
from ..data.reader import ChunkReader
from ..data.repair import Repairer
from ..data.restripe import Restriper
from ..data.scrub import Scrubber
from ..data.smallwrites import WriteLog
from ..data.writer import ChunkWriter
from ..storage.domains import (
    copy_helps,
    labels_of,
    resolve_stores,
    spread,
    surplus_copies,
)
from ..storage.handles import Expected, HandleCache
from ..storage.lease import Lease
from ..storage.metadb.chunks import ChunkTable, RepairQueue
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.schema import ROOT_INODE
from ..storage.metadb.stores import StoreTable
from ..storage.metaobjects import (
    GatheredCopies,
    ObjectCopy,
    ObjectTarget,
    copy_stores,
    gather_copies,
    keeps_meta_objects,
    snapshot_name,
)
from ..storage.offload import StoreRunner, run_in_thread
from ..storage.replicas import (
    CopyExpectation,
    PreparedMetadata,
    ReplicaError,
    Replicator,
    copy_database,
    inspect_copy,
    place_replica,
    prepare_working_copy,
    remove_replica,
    replica_path,
    resync_replicas,
)
from ..storage.s3store import is_s3_location, location_path
from ..storage.store import Store, StoreMarker
from ..storage.storefactory import open_store
from .control import Command
from .hooks import HookRunner
from .mkfs import check_store_arg, check_store_paths
from .status import (
    IoStatus,
    MetadataStatus,
    RepairActivity,
    StoreChange,
    StoreIo,
    StoreStatus,
    VolumeStatus,
    assess,
    events_status,
    health_of,
    redundancy_warning,
)
from .store_admin import StoreAdmin

log = logging.getLogger(__name__)

#: Seconds a metadata transaction may wait to be batched with others before
#: it is made durable on the replicas when nobody calls fsync (fsync() and
#: unmount never wait for it: they flush at once).
COMMIT_INTERVAL = 1.0

#: Seconds unmount waits for the metadata to become durable before giving
#: up (and keeping the working copy, see KEEP_MARKER).
SHUTDOWN_DRAIN_TIMEOUT = 300.0
#: Seconds unmount waits for straggling fragment writes to land before it
#: gives them up and deletes garbage (a straggler on a hung store ends
#: only at its write timeout).
STRAGGLER_SHUTDOWN_WAIT = 5.0

#: In a working-copy directory: keep it (it holds metadata not durable anywhere).
KEEP_MARKER = "KEEP-not-durable-on-replicas"

#: In a working-copy directory: what went wrong at unmount, one line per
#: error. Written by a daemon whose shutdown failed; `ecfs umount` (which
#: learns the directory from the user.ecfs.workdir attribute) reports it
#: and exits 1. The next mount deletes the directory as usual.
SHUTDOWN_REPORT = "shutdown-errors"

#: An fsync waiting this long probes the stores of the replicas behind.
LAGGING_REPLICA_PROBE = 1.0

#: Minimum seconds between two on-demand probes of one store.
PROBE_SPACING = 1.0

#: Seconds between refreshes of store usage and probes of every store.
HEALTH_INTERVAL = 5.0

#: A store whose identity was last verified longer ago than this is probed
#: before it gets new fragments (the write waits for that one probe).
IDENTITY_MAX_AGE = 2.0

#: Seconds the online verification of one metadata replica may take (it
#: reads every row: about 1 s per million rows).
VERIFY_REPLICA_TIMEOUT = 600.0
#: Times a new metadata replica is copied when transactions were shipped
#: (and forgotten) while it was copied (`Replicator.add_replica`).
PLACE_REPLICA_ATTEMPTS = 3


def expand_store_args(args: Sequence[str]) -> list[Path]:
    """Store arguments as given, with glob patterns expanded (sorted);
    VolumeError for an empty or URL-like argument (`check_store_arg`)."""
    paths: list[Path] = []
    for arg in args:
        check_store_arg(arg)
        if is_s3_location(arg):  # a location, never a pattern ("?" starts its query)
            paths.append(location_path(arg))
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise VolumeError(f"no store matches {arg!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(arg))
    return paths


def read_markers(
    paths: Sequence[Path], problems: dict[Path, str] | None = None
) -> dict[Path, StoreMarker]:
    """Markers of the readable stores; unreadable ones are logged and left
    out (and their reasons put in `problems` if given)."""
    markers: dict[Path, StoreMarker] = {}
    for path in paths:
        try:
            markers[path] = open_store(path).read_marker()
        except StoreError as exc:
            log.warning("store %s is unavailable: %s", path, exc)
            if problems is not None:
                problems[path] = str(exc)
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


def select_volume(markers: dict[Path, StoreMarker]) -> dict[Path, str]:
    """Leave out (remove from `markers`) the stores of other volumes than
    the one most of them belong to; returns path -> reason for each left
    out (logged at WARNING). VolumeError if two volumes tie for most."""
    counts = Counter(marker.volume_id for marker in markers.values())
    if len(counts) <= 1:
        return {}
    (volume, most), (_, second) = counts.most_common(2)
    if most == second:
        listing = ", ".join(f"{p} -> {m.volume_id}" for p, m in markers.items())
        raise VolumeError(f"the stores belong to different volumes: {listing}")
    rejected: dict[Path, str] = {}
    for path, marker in list(markers.items()):
        if marker.volume_id != volume:
            rejected[path] = (
                f"its marker names volume {marker.volume_id}, the other stores volume {volume}"
            )
            del markers[path]
            log.warning("store %s is left out: %s", path, rejected[path])
    return rejected


def marker_mismatch(marker: StoreMarker, params: Mapping[str, object]) -> str | None:
    """Why a store's marker disagrees with the volume's metadata parameters
    (its geometry), or None if it agrees."""
    wrong = [
        f"{name}={getattr(marker, name)} (the volume has {params.get(key)})"
        for name, key in _GEOMETRY_KEYS
        if key in params and str(getattr(marker, name)) != str(params[key])
    ]
    return f"its marker says {', '.join(wrong)}" if wrong else None


def leave_out_mismatched(
    markers: dict[Path, StoreMarker], by_store_id: dict[str, Path], params: Mapping[str, object]
) -> dict[str, tuple[Path, str]]:
    """Remove from `by_store_id` the stores whose marker disagrees with the
    volume's metadata parameters (`marker_mismatch`), logged at WARNING;
    returns store id -> (path, why) for each."""
    left_out: dict[str, tuple[Path, str]] = {}
    for store_id, path in list(by_store_id.items()):
        mismatch = marker_mismatch(markers[path], params)
        if mismatch is not None:
            log.warning("store %s is left out: %s", path, mismatch)
            left_out[store_id] = (path, mismatch)
            del by_store_id[store_id]
    return left_out


#: Marker field -> metadata parameter that must agree.
_GEOMETRY_KEYS = (
    ("k", "k"),
    ("m", "m"),
    ("fragment_size", "fragment_size"),
    ("cell_size", "cell_size"),
    ("inline_max", "inline_max"),
)


def no_metadata_copy_message(
    markers: dict[Path, StoreMarker], unusable: dict[Path, str]
) -> str:
    """The VolumeError text when no readable store holds a metadata copy:
    which stores were given and why, and that more than m are missing when
    that follows from the geometry (a volume has at least k + m stores)."""
    some = next(iter(markers.values()))
    k, m = some.k, some.m
    readable = ", ".join(str(p) for p in markers)
    text = (
        f"no metadata copy: none of the {len(markers)} readable store(s) of volume"
        f" {some.volume_id} ({readable}) holds one; the copies are kept on m + 1 ="
        f" {m + 1} stores"
    )
    if unusable:
        listing = "; ".join(f"{p}: {why}" for p, why in unusable.items())
        text += f", which must be among the unusable stores given ({listing})"
    else:
        text += ", none of which was given"
    if len(markers) < k:
        text += (
            f"; the volume has at least k + m = {k + m} stores and only {len(markers)} are"
            f" usable: more than m = {m} stores are missing"
        )
    return text


def expectation(markers: dict[Path, StoreMarker], by_store_id: dict[str, Path]) -> CopyExpectation:
    """What a metadata copy must match for the stores given (their markers
    agree on the volume, see `identify_stores`)."""
    first = next(iter(markers.values()))
    # The geometry most markers give: a store whose marker disagrees is left
    # out later (`marker_mismatch`) and must not make every copy look wrong.
    (k, m), _ = Counter((marker.k, marker.m) for marker in markers.values()).most_common(1)[0]
    return CopyExpectation(first.volume_id, k, m, frozenset(by_store_id), dict(by_store_id))


def identify_stores(markers: dict[Path, StoreMarker]) -> dict[str, Path]:
    """Store UUID -> path; VolumeError if the stores belong to different
    volumes (call `select_volume` first) or one store was given twice
    (under two paths)."""
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

    def __init__(self, db: Database, stores: Mapping[int, Store], workdir: Path) -> None:
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
        #: Events for alerting (`ecfs.core.events`); the mount sets its hook.
        self.events = EventSink(self.volume_id)
        #: The mount's event hook runner (`-o event_hook=`; None: events are only logged).
        self.hooks: HookRunner | None = None
        #: Chunks reported unrecoverable by an event (once per chunk per mount).
        self._reported_unrecoverable: set[int] = set()
        self._watch_stores()
        self.codec = Codec(k, m)
        self.handles = HandleCache()
        policy = params.get(POLICY_KEY, SPREAD)
        if policy not in POLICIES:
            raise VolumeError(f"the metadata names an unknown placement policy {policy!r}")
        #: Store index -> failure domain (`ecfs.storage.domains`): labels from
        #: the volume parameters, else resolved from the store (blocking, once
        #: here; `StoreAdmin` updates it on store changes and labels).
        self.domains: dict[int, str] = resolve_stores(
            stores, labels_of(params, dict(StoreTable(db).all()))
        )
        self.placement = Placement(
            self.runners, remote=self.is_remote, policy=policy, k=k, domain=self.domain_of
        )
        self.pins = ChunkPins()
        #: Pauses all background work (persisted; see `ecfs.data.background`):
        #: repair, scrub, folds, garbage, and restripe wait at it per chunk.
        self.background_gate = BackgroundGate(db)
        self.background_gate.on_resume = self._background_resumed
        self.namespace = Namespace(db)
        self.policies = Policies(
            InodeTable(db), k, m, lambda: len(self.store_ids) - len(self.placement.draining)
        )
        self.namespace.policies = self.policies
        self.writer = ChunkWriter(
            self.layout,
            self.codec,
            self.runners,
            self.placement,
            uuid.UUID(self.volume_id).bytes,
            self._new_chunk_id,
            device_of={i: s.device() for i, s in stores.items()},
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
            db,
            gate=self.background_gate,
        )
        self.writer.on_abandoned = self.garbage.remember
        self.writer.on_late_failure = self.damage.record  # a straggler lost: repair it
        self.writer.pin_chunk, self.writer.unpin_chunk = self.pins.pin, self.pins.unpin
        self.reader.writing = self.writer.straggling  # missing until they land
        self.writelog = WriteLog(
            db,
            self.layout.chunk_size,
            files=LogFiles(
                self.runners,
                m + 1,
                uuid.UUID(self.volume_id).bytes,
                self._durable_generation,
                self.placement.draining,
                self.domain_of,
            ),
            wait_durable=self._wait_durable,
            gate=self.background_gate,
        )
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
            clock_ns=self.namespace.now_ns,  # one clock for every inode time
            writelog=self.writelog,
            free_space=lambda: self.capacity()[1],
        )
        self.filedata.coding_of = self.policies.coding_of
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
            gate=self.background_gate,
        )
        self.damage.on_queued = self.repairer.poke
        self.reader.not_rebuilt = self.repairer.not_rebuilt  # never read, decoded at once
        self.reader.on_not_rebuilt = self.repairer.want  # ... and rebuilt first
        self.restriper = Restriper(
            db,
            self.layout,
            self.reader,
            self.writer,
            self.garbage,
            self.pins,
            self.policies.coding_of,
            self.writelog.has,
            lambda: self.filedata.last_activity,
            self._describe_inode,
            gate=self.background_gate,
            wait_durable=self._wait_durable,
        )
        self.repairer.refresh_usage = self.refresh_usage
        self.scrubber = Scrubber(
            db,
            self.layout,
            self.reader,
            self.runners,
            lambda: self.filedata.last_activity,
            self.repairer.poke,
            self.verify_metadata_replicas,
            lambda: len(self.replicator.live_replicas()) if self.replicator else 0,
            wrong_class=self.placement.misplaced,
            misplaced_reason=self.placement.misplaced_reason,
            gate=self.background_gate,
        )
        self.scrubber.events = self.repairer.events = self.events
        self.scrubber.paths_of = self.paths_of
        self.repairer.on_unrecoverable = self.filedata.on_unrecoverable = self.chunk_unrecoverable
        #: The last store change of this mount (see `start_store_change`).
        self.store_change: StoreChange | None = None
        self._devices = self.writer.device_of
        self.store_ids = dict(self.store_table.all())
        #: Where the volume is mounted (set by `mount`; None offline): new
        #: stores must not lie on it.
        self.mountpoint: Path | None = None
        self.stores_admin = self._new_store_admin()
        draining = {i for i, state in self.store_table.states().items() if state == "draining"}
        self.placement.draining |= draining
        self.repairer.draining |= draining
        self._last_probe: dict[int, float] = {}
        #: Store id -> why the store was given but left out (its marker).
        self.left_out: dict[str, str] = {}
        #: Store index -> trio time of its last successful probe.
        self._verified: dict[int, float] = {}
        self._probing: dict[int, trio.Event] = {}
        self.writer.before_write = self.verify_before_write
        self.repairer.before_write = self.verify_before_write
        self._replacing_replicas = False
        self._replica_lock = trio.Lock()
        #: Set when unmount could not make the metadata durable anywhere: the
        #: working copy is then kept (its path is logged) instead of deleted.
        self.metadata_at_risk = False
        #: What failed at unmount (see `shutdown`); empty after a clean one.
        self.shutdown_errors: list[str] = []
        #: The volume's lease (volumes with S3 stores; set by the mount, None
        #: offline and without S3 stores); its `epoch` fences what it writes.
        self.lease: Lease | None = None
        #: Stale metadata replicas to delete once the replicas are closed.
        self._stale_replicas_to_remove: list[int] = []
        self._nursery: trio.Nursery | None = None
        #: The fencing epoch of this mount's metadata objects (see `open`).
        self.epoch = 0

    def domain_of(self, index: int) -> str:
        """Store `index`'s failure domain (``unknown:INDEX``: missing, no label)."""
        return self.domains.get(index) or f"unknown:{index}"

    def is_remote(self, index: int) -> bool:
        """Whether store `index` is remote (`Store.remote`; a store not
        open counts as local: its fragments are rebuilt anyway)."""
        runner = self.runners.get(index)
        return runner is not None and runner.store.remote

    def _new_store_admin(self) -> StoreAdmin:
        """The store changes' runner, given the parts of the volume it changes."""
        return StoreAdmin(
            db=self.db,
            store_table=self.store_table,
            layout=self.layout,
            volume_id=self.volume_id,
            inline_max=self.inline_max,
            runners=self.runners,
            store_ids=self.store_ids,
            handles=self.handles,
            device_of=self.writer.device_of,
            domains=self.domains,
            placement=self.placement,
            repairer=self.repairer,
            missing_stores=self.missing_stores,
            mountpoint=lambda: self.mountpoint,
            refresh_usage=self.refresh_usage,
            ensure_replicas=self.ensure_replicas,
            report=self._report_store_change,
        )

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
        """Load the small-write log (every store's segments) and give each
        inode with live records the mtime its newest record carries, when
        that is newer than the inode's last committed change."""
        chunks = self.filedata.chunks

        def current(inode: int, idx: int) -> int:
            ref = chunks.get(inode, idx)
            return 0 if ref is None else ref.chunk_id

        for problem in self.writelog.load(current, self.stores):
            log.warning("%s", problem)
        later = []
        for ino, record in self.writelog.recovered.items():
            node = self.namespace.get(ino)
            if record.mtime_ns > node.ctime_ns:
                later.append((ino, node.size, record.mtime_ns))
        if later:
            with self.db.transaction():
                for ino, size, mtime in later:
                    self.namespace.set_size(ino, size, mtime_ns=mtime, persist=True)

    def missing_stores(self) -> dict[int, str]:
        """Stores of the volume that are not open in this mount: index -> last path."""
        return {i: p for i, p in self.store_table.paths().items() if i not in self.runners}

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls, store_args: Sequence[str], *, runtime_dir: Path | None = None, epoch: int = 0
    ) -> Volume:
        """Blocking: check the stores, prepare the working copy, build.

        `epoch`: the fencing epoch the metadata copies kept as objects are
        written with (`ecfs.storage.metaobjects`); the caller passes the
        lease epoch (ecfs.storage.lease) or 0."""
        paths = check_store_paths(expand_store_args(store_args))
        unusable: dict[Path, str] = {}
        markers = read_markers(paths, unusable)
        if not markers:
            raise VolumeError("none of the given stores is readable")
        unusable.update(select_volume(markers))
        by_store_id = identify_stores(markers)
        expect = expectation(markers, by_store_id)
        remove_dead_working_copies(runtime_dir)
        workdir = Path(tempfile.mkdtemp(prefix=f"ecfs-{os.getpid()}-", dir=runtime_dir))
        try:
            working = workdir / "metadata.sqlite"
            # Object copies are rebuilt into local files first (reading only).
            gathered = gather_copies(
                {p: open_store(p) for p in markers}, workdir, uuid.UUID(expect.volume_id).bytes
            )
            if not gathered.paths:
                raise VolumeError(no_metadata_copy_message(markers, unusable))
            newer = max((f.epoch for f in gathered.objects.values()), default=0)
            if newer > epoch:  # fencing: a newer holder wrote the copies
                raise VolumeError(
                    f"the metadata copies were written at epoch {newer}, after this mount's"
                    f" epoch {epoch}: another host holds the volume"
                )
            # Every copy is checked (volume, stores, schema, content) and one
            # chosen before any copy is written: a refused copy must never
            # destroy the good ones (issue 13, A1).
            prepared = prepare_working_copy(gathered.paths, working, expect, gathered.known)
            db = Database(working)
            left_out = {
                store_id: f"{path}: {why}"
                for store_id, (path, why) in leave_out_mismatched(
                    markers, by_store_id, StoreTable(db).params()
                ).items()
            }
            stores = _match_stores(StoreTable(db).all(), by_store_id, db)
            for store in stores.values():
                store.pin_identity(markers[store.path])
            volume = cls(db, stores, workdir)
            volume.left_out = left_out
            volume.epoch = epoch
            volume._setup_replicas(prepared, gathered)
            volume._remember_store_paths()  # after: so the change is replicated
            volume._open_write_log()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return volume

    def _setup_replicas(self, prepared: PreparedMetadata, gathered: GatheredCopies) -> None:
        """Rewrite the stale and refused replicas (the first writes to any
        copy), replicate to the current ones, and add copies on other
        stores until there are m+1 (a replica lost with its store is
        rebuilt), on the stores `copy_stores` allows. Every object copy
        gets a snapshot at this mount's epoch first (fencing, and its logs
        compacted), unless it is exactly that snapshot already."""
        snapshot = self.workdir / "replica-source.sqlite"
        index_of = {str(store.path): i for i, store in self.stores.items()}
        copy_of = {
            index_of[str(store)]: copy
            for copy, store in gathered.store_of.items()
            if str(store) in index_of
        }
        objects: dict[int, ObjectTarget | Path] = {}

        def rewrite_object(index: int) -> Callable[[Path, bool], None]:
            def rewrite(source: Path, refused: bool) -> None:
                objects[index] = self._install_copy(index, source, self.db.generation, refused)

            return rewrite

        if prepared.to_resync or gathered.objects:  # the working copy is locked: copy a snapshot
            self.db.snapshot(snapshot)
        rewrite = {copy_of[i]: rewrite_object(i) for i in copy_of if copy_of[i] in gathered.objects}
        resync_replicas(prepared, snapshot, rewrite)
        current = prepared.current
        targets: dict[int, Path | ObjectTarget] = {}
        for index in sorted(self.stores):
            copy = copy_of.get(index)
            if copy is None or copy not in current:
                continue
            if copy not in gathered.objects:
                targets[index] = copy
                continue
            if index not in objects:  # current: a snapshot at this epoch unless it is one
                found = gathered.objects[copy]
                exact = found.base == snapshot_name(self.epoch, self.db.generation)
                try:
                    objects[index] = self._install_copy(
                        index, snapshot, self.db.generation, False, keep=exact and not found.logs
                    )
                except (EcfsError, OSError) as exc:
                    log.warning("cannot write the metadata copy on store %d: %s", index, exc)
                    continue
            targets[index] = objects[index]
        wanted = self.layout.m + 1
        allowed = [i for i in self._copy_stores() if i in self.stores]
        reachable = len({self.domain_of(i) for i in allowed})
        order = spread(allowed, len(allowed), self.domain_of, map(self.domain_of, targets))
        spread_out = False  # a copy added in a missing domain: a crowded one can go
        try:
            for index in order:
                if index in targets or not copy_helps(
                    targets, index, wanted, reachable, self.domain_of
                ):
                    continue
                if not snapshot.exists():
                    self.db.snapshot(snapshot)
                try:
                    targets[index] = self._install_copy(index, snapshot, self.db.generation)
                except (EcfsError, OSError) as exc:
                    log.warning("cannot add a metadata replica on store %d: %s", index, exc)
                    continue
                log.info("added metadata replica on store %d (%s)", index, self.stores[index].path)
                spread_out = spread_out or len(targets) > wanted
        finally:
            snapshot.unlink(missing_ok=True)
        for index in surplus_copies(list(targets), wanted, self.domain_of) if spread_out else ():
            try:  # a copy in a crowded domain (a label changed): one elsewhere replaced it
                self._remove_copy(index)
            except (EcfsError, OSError) as exc:
                log.warning("cannot remove the surplus metadata copy on store %d: %s", index, exc)
                continue
            del targets[index]
            log.info("removed the metadata copy on store %d (its domain holds another)", index)
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

    def _copy_stores(self) -> list[int]:
        """The stores allowed to hold a metadata copy, best first
        (`copy_stores`, spread over failure domains)."""
        return copy_stores(self._store_kinds(), self.layout.m, self.domain_of)

    def _store_kinds(self) -> dict[int, bool]:
        """Every store of the volume -> whether it keeps its metadata copy
        as objects (see `copy_stores`)."""
        kinds = {i: is_s3_location(p) for i, p in self.store_table.paths().items() if p}
        kinds.update({i: keeps_meta_objects(r.store) for i, r in self.runners.items()})
        return kinds

    def _install_copy(
        self, index: int, snapshot: Path, generation: int, refused: bool = False, *, keep: bool = False
    ) -> Path | ObjectTarget:
        """Blocking: make `snapshot` (the working copy at `generation`) the
        metadata copy on store `index`; what the replicator ships to. A file
        replica is placed (`place_replica`); an object copy is PUT as a
        snapshot at this mount's epoch (`ObjectCopy.install`; `keep`: the
        copy is that snapshot already) and gets a local shadow. ReplicaError
        if it cannot be written (the store's health does not suffer)."""
        store = self.runners[index].store
        if not keeps_meta_objects(store):
            target = replica_path(store.meta_dir)
            place_replica(snapshot, target)
            return target
        copy = ObjectCopy(store, uuid.UUID(self.volume_id).bytes)  # type: ignore[arg-type]
        name = snapshot_name(self.epoch, generation)
        try:
            if keep:
                copy.prune(self.epoch, keep=name)
            else:
                name = copy.install(snapshot, generation, self.epoch, set_aside=refused)
        except StoreError as exc:
            raise ReplicaError(f"cannot write the metadata copy on {store.path}: {exc}") from exc
        shadow = self.workdir / f"shadow-{index}.sqlite"
        copy_database(snapshot, shadow)
        return ObjectTarget(
            store,  # type: ignore[arg-type]
            copy.volume,
            shadow,
            self.epoch,
            name,
            snapshot.stat().st_size,
        )

    def _remove_copy(self, index: int) -> None:
        """Blocking: delete the (stale) metadata copy on store `index`."""
        store = self.runners[index].store
        if keeps_meta_objects(store):
            ObjectCopy(store, uuid.UUID(self.volume_id).bytes).remove()  # type: ignore[arg-type]
        else:
            remove_replica(replica_path(store.meta_dir))

    def metadata_copies(self) -> dict[int, str]:
        """Where the metadata copies are: store index -> "file" or "objects"
        (the live replicas)."""
        if self.replicator is None:
            return {}
        return {
            i: "objects" if keeps_meta_objects(self.runners[i].store) else "file"
            for i in self.replicator.live_replicas()
            if i in self.runners
        }

    # -- running -----------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the background tasks and finish crash recovery."""
        assert self.replicator is not None
        self._nursery = nursery
        for index, path in sorted(self.store_table.paths().items()):
            if index not in self.runners:  # missing at open: failed while unmounted
                self.events.emit(
                    STORE_FAILED, f"store {index} ({path}) is missing at mount",
                    store=index, store_path=path, reason="missing at mount",
                )  # fmt: skip
        await nursery.start(supervised, "metadata replication", self.replicator.run)
        self.garbage.load_leftovers()
        await nursery.start(supervised, "garbage collector", self.garbage.run)
        self.garbage.poke()  # fragments left on stores that were away last time
        await nursery.start(supervised, "repair", self.repairer.run)
        await nursery.start(supervised, "restripe", self.restriper.run)
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
        self.writer.attach(nursery)  # stragglers finish in the background
        self.reader.attach(nursery)  # decodes ahead of sequential readers
        if self.lease is not None:
            nursery.start_soon(supervised, "lease renewal", self.lease.keep_renewed)
        for ino in self.namespace.orphans():
            log.info("freeing inode %d (unlinked while open before a crash)", ino)
            await self.filedata.free(ino)

    async def shutdown(self) -> None:
        """Write back everything, make it durable, delete garbage (and make
        durable what that changed: remembered deletions done or added).

        Each step runs even if an earlier one failed (a file whose data
        cannot be written must not keep the metadata of every other change
        from the replicas); every failure is logged and recorded in
        `shutdown_errors`, so that the unmount is never reported clean."""
        try:
            # A store back, or with room again, since the last health check
            # (up to HEALTH_INTERVAL ago) can still take the buffered data.
            if not all(runner.available for runner in self.runners.values()):
                await self.check_stores()
            await self.refresh_usage()
            await self.filedata.flush_all()
            await self.filedata.fold_all()
        except Exception as exc:
            self._shutdown_failed("writing back data and attributes", exc)
        if not await self._drain_at_shutdown():
            return
        # Stragglers of a freed version keep it pinned (writer docstring):
        # let them land, so that it is deleted now rather than left behind;
        # those that do not (a hung store) are given up: the files they may
        # leave are remembered for deletion, their chunks queued for repair.
        with trio.move_on_after(STRAGGLER_SHUTDOWN_WAIT):
            await self.writer.stragglers_done()
        self.writer.give_up_stragglers()
        with trio.move_on_after(STRAGGLER_SHUTDOWN_WAIT):
            await self.writer.stragglers_done()
        try:
            await self.garbage.collect()
        except Exception as exc:
            self._shutdown_failed("deleting garbage", exc)
        if not await self._drain_at_shutdown():
            return
        try:
            await self.writelog.upkeep(keep=0)  # folded: the segments can go
        except Exception as exc:
            self._shutdown_failed("deleting small-write log segments", exc)
        replicator = self.replicator
        if replicator is not None and len(replicator.live_replicas()) >= self.layout.m + 1:
            self._stale_replicas_to_remove = sorted(
                set(replicator.stale_replicas()) - set(replicator.live_replicas())
            )

    def _shutdown_failed(self, step: str, exc: Exception) -> None:
        if not isinstance(exc, EcfsError) or not exc.already_logged:
            log.error("unmount: %s failed: %r", step, exc, exc_info=not isinstance(exc, EcfsError))
        self.shutdown_errors.append(f"{step} failed: {exc}")

    async def _drain_at_shutdown(self) -> bool:
        """Make the metadata durable; False (the working copy kept and the
        failure recorded) if that is impossible."""
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
            self.shutdown_errors.append(f"metadata not durable on the replicas: {exc}")
            return False
        except Exception as exc:
            self.metadata_at_risk = True
            self._shutdown_failed("making the metadata durable", exc)
            return False
        return True

    async def _remove_stale_replicas(self) -> None:
        """After a clean shutdown with m+1 replicas live and up to date
        (and their connections closed): delete the out-of-date copies on
        stores that are available again (their store was away, and the copy
        was replaced by one on another store), so that no stale copy is left
        behind for fsck to report or a later mount to count."""
        for index in self._stale_replicas_to_remove:
            runner = self.runners.get(index)
            if runner is None or not runner.available:
                continue
            try:
                await runner.call(self._remove_copy, index, timeout=10.0)
            except EcfsError as exc:
                log.warning("cannot remove the stale metadata replica on store %d: %s", index, exc)
                continue
            log.info("removed the stale metadata replica on store %d", index)

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
        for runner in self.runners.values():
            runner.store.close()
        self.db.close()
        if self.metadata_at_risk:
            (self.workdir / KEEP_MARKER).touch()
        elif self.shutdown_errors:  # the metadata is durable: keep only the report
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir.mkdir(mode=0o700, exist_ok=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.shutdown_errors:
            (self.workdir / SHUTDOWN_REPORT).write_text("\n".join(self.shutdown_errors) + "\n")

    async def aclose_replicas(self) -> None:
        if self.replicator is not None:
            await self.replicator.aclose()
            await self._remove_stale_replicas()

    async def refresh_usage(self) -> None:
        async def one(index: int, runner: StoreRunner) -> None:
            try:
                usage = await runner.call(runner.store.usage, timeout=5.0)
            except StoreError as exc:
                log.debug("store %d: usage unavailable: %s", index, exc)
                return
            self.placement.update_usage(index, usage)

        full_before = set(self.placement.full)
        async with trio.open_nursery() as nursery:
            for index, runner in self.runners.items():
                nursery.start_soon(one, index, runner)
        if full_before - self.placement.full:
            self.repairer.retry_deferred()  # room again for fragments that had none

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
        """Check that store `index` is reachable and still the store opened
        (see the module docstring): mark it failed (with the reason, its
        cached fds and replica dropped) or, if it was failed, ok again."""
        runner = self.runners[index]
        was_available = runner.available
        try:
            # (failed only if the store answers nothing: see StoreRunner.health_call)
            marker, device = await runner.health_call(_probe_store, runner.store, not was_available)
            if marker.store_id != self.store_ids[index] or marker.volume_id != self.volume_id:
                raise StoreError(f"{runner.store.path} now holds a different store")
        except StoreError as exc:
            # The reason status shows: the latest. The first failure is
            # logged once, as the store-failed event (`_store_health_changed`).
            runner.mark_failed(str(exc))
            self.handles.discard_store(index)
            runner.store.close()
            if self.replicator is not None:
                self.replicator.drop_replica(index, f"store failed: {exc}")
            return
        self._verified[index] = trio.current_time()
        if not was_available:
            self.writer.device_of[index] = device  # a disk mounted anew: maybe another
            runner.mark_ok()  # logged as the store-back event
            self.repairer.retry_deferred()  # chunks that waited for it

    async def verify_before_write(self, index: int) -> bool:
        """Writer hook: whether store `index` may get a new fragment. A
        store not verified for IDENTITY_MAX_AGE seconds is probed first
        (one probe per store at a time; concurrent writers wait for it)."""
        if self.lease is not None and not self.lease.holds():
            raise StoreError(self.lease.why_not())
        if trio.current_time() - self._verified.get(index, -math.inf) > IDENTITY_MAX_AGE:
            probing = self._probing.get(index)
            if probing is not None:
                await probing.wait()
            else:
                probing = self._probing[index] = trio.Event()
                try:
                    await self.probe_store(index)
                finally:
                    del self._probing[index]
                    probing.set()
        return self.runners[index].available

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
        allowed = self._copy_stores()  # local ones first, over distinct domains
        candidates = sorted(
            (i for i in allowed if i in self.runners and self.runners[i].available and i not in live),
            key=lambda i: (i in self.placement.full, i not in stale, allowed.index(i)),
        )
        taken = [self.domain_of(i) for i in live]
        for index in spread(candidates, wanted - len(live), self.domain_of, taken):
            if not await replicator.close_stale(index):
                continue  # its old connection is still busy: never replace the file under it
            # Again if transactions were shipped and forgotten while it was copied.
            for _attempt in range(PLACE_REPLICA_ATTEMPTS):
                if not await self._place_replica(replicator, index):
                    break

    async def _place_replica(self, replicator: Replicator, index: int) -> bool:
        """Copy the working copy to store `index` and add it to the
        replicator. True if it was copied but could not be added."""
        await self.writer.sync_stores()  # what the copy refers to is durable
        generation = self.db.generation
        snapshot = self.workdir / f"replica-{index}.sqlite"
        self.db.snapshot(snapshot)  # on the loop: consistent at `generation`
        runner = self.runners[index]
        try:
            target = await runner.call(
                self._install_copy, index, snapshot, generation, timeout=60.0
            )
        except EcfsError as exc:
            log.warning("cannot place a metadata replica on store %d: %s", index, exc)
            return False
        finally:
            snapshot.unlink(missing_ok=True)
        return not await replicator.add_replica(index, target, generation)

    def status(self) -> VolumeStatus:
        """A snapshot of the volume built from its services' statistics
        (the record and its JSON form: see `ecfs.volume.status`)."""
        layout = self.layout
        available = {i for i, r in self.runners.items() if r.available}
        found = assess(
            layout.k,
            layout.n,
            self.store_ids,
            available,
            ChunkTable(self.db).redundancy_classes(),
            RepairQueue(self.db).known_damage(),
            self.domain_of,
        )
        stores = [self._store_status(i, r, found.fragments, found.fragment_bytes)
                  for i, r in sorted(self.runners.items())]  # fmt: skip
        for index, path in sorted(self.missing_stores().items()):
            reason = self.left_out.get(self.store_ids.get(index, ""), "not given or unusable")
            stores.append(
                StoreStatus(
                    index, path, "missing", reason, 0, 0, 0, 0.0, 0.0, 0, 0, None, None,
                    found.fragments.get(index, 0), found.fragment_bytes.get(index, 0), False,
                    domain=self.domain_of(index),
                )  # fmt: skip
            )
        repair = self.repairer.statistics()
        unrecoverable = self.repairer.unrecoverable_chunks()
        active = [i for i in self.store_ids if i not in self.placement.draining]
        domains = {i: self.domain_of(i) for i in active}
        replication = self.replicator.statistics() if self.replicator else None
        return VolumeStatus(
            volume=self.volume_id,
            k=layout.k,
            m=layout.m,
            health=health_of(
                found.tolerance,
                bool(unrecoverable),
                len(available) < len(self.store_ids),
                # Fragments only to be moved (class, domain) lack no redundancy.
                any(reason not in ("wrong-class", "shared-domain") for reason in repair.queue),
            ),
            tolerance=found.tolerance,
            stores=tuple(stores),
            repair=repair,
            scrub=self.scrubber.statistics(),
            reads=self.reader.statistics(),
            writes=self.writer.statistics(),
            write_log=self.writelog.statistics(),
            garbage=self.garbage.statistics(),
            metadata=MetadataStatus(
                generation=self.db.generation,
                durable_generation=replication.durable_generation if replication else None,
                live_replicas=replication.live_replicas if replication else (),
                stale_replicas=dict(replication.stale_replicas) if replication else {},
                copies=self.metadata_copies(),
            ),
            unrecoverable=unrecoverable,
            store_change=self.store_change,
            lease=self.lease.statistics() if self.lease is not None else None,
            placement=self.placement.policy,
            background=self.background_gate.statistics(),
            domains=len(set(domains.values())),
            redundancy_warning=redundancy_warning(layout.k, layout.m, domains),
            events=events_status(
                self.events.statistics(),
                str(self.hooks.hook) if self.hooks is not None else "",
                self.hooks.statistics() if self.hooks is not None else None,
            ),
            restripe=self.restriper.statistics(),
        )

    def _store_status(
        self, index: int, runner: StoreRunner, fragments: dict[int, int], sizes: dict[int, int]
    ) -> StoreStatus:
        stats = runner.statistics()
        usage = self.placement.usage.get(index)
        return StoreStatus(
            index=index,
            path=str(runner.store.path),
            state=stats.state.value,
            reason=runner.failure_reason,
            in_flight=stats.in_flight,
            errors=stats.errors,
            timeouts=stats.timeouts,
            latency_p50_ms=round(stats.latency_p50 * 1000, 3),
            latency_p95_ms=round(stats.latency_p95 * 1000, 3),
            bytes_read=stats.bytes_read,
            bytes_written=stats.bytes_written,
            free_bytes=usage.free_bytes if usage and usage.known else None,
            total_bytes=usage.total_bytes if usage and usage.known else None,
            fragments=fragments.get(index, 0),
            fragment_bytes=sizes.get(index, 0),
            draining=index in self.placement.draining,
            remote=runner.store.remote,
            read_ops=stats.read_ops,
            write_ops=stats.write_ops,
            latency_p99_ms=round(stats.latency_p99 * 1000, 3),
            latency_histogram=stats.latency_histogram,
            latency_sum_s=stats.latency_sum,
            domain=self.domain_of(index),
        )

    def iostat(self) -> IoStatus:
        """The cheap counters-only snapshot for a live view (`ecfs iostat`):
        no query over the chunk table or the repair queue (see
        `ecfs.volume.status.IoStatus`)."""
        stores = []
        for index, runner in sorted(self.runners.items()):
            stats = runner.statistics()
            stores.append(
                StoreIo(
                    index, str(runner.store.path), stats.state.value, runner.failure_reason,
                    stats.in_flight, runner.waiting, stats.read_ops, stats.write_ops,
                    stats.bytes_read, stats.bytes_written, stats.errors, stats.timeouts,
                    round(stats.latency_p50 * 1000, 3), round(stats.latency_p99 * 1000, 3),
                )  # fmt: skip
            )
        for index, path in sorted(self.missing_stores().items()):
            reason = self.left_out.get(self.store_ids.get(index, ""), "not given or unusable")
            stores.append(StoreIo(index, path, "missing", reason, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0))
        counters = self.repairer.counters
        return IoStatus(
            volume=self.volume_id,
            time_ns=time.time_ns(),
            monotonic_ns=time.monotonic_ns(),
            stores=tuple(stores),
            reads=self.reader.statistics(),
            writes=self.writer.statistics(),
            write_log=self.writelog.statistics(),
            repair=RepairActivity(
                busy=self.repairer.busy,
                urgent=self.repairer.urgent,
                chunks_repaired=counters.chunks_repaired,
                fragments_rebuilt=counters.fragments_rebuilt,
                bytes_read=counters.bytes_read,
                bytes_written=counters.bytes_written,
            ),
        )

    # -- operator commands -----------------------------------------------------------

    async def verify_metadata_replicas(self) -> dict[int | None, str]:
        """Scrub: verify every live metadata replica online; a bad one is
        dropped and replaced by a fresh copy of the working copy (on its own
        store if it is healthy). Then verify the working copy itself (a
        snapshot of it, like a new replica's), and the copies of the
        small-write log's records (a damaged one is written anew, see
        `WriteLog.verify_copies`). Store index (None: the working copy) ->
        problem found."""
        problems: dict[int | None, str] = {}
        if self.replicator is not None:
            found = await self.replicator.verify_replicas(call_timeout=VERIFY_REPLICA_TIMEOUT)
            problems.update(found.items())
            if found:
                await self.ensure_replicas()
        working = await self._verify_working_copy()
        if working is not None:
            problems[None] = working
        await self.writelog.verify_copies()  # log copies are on the stores, not replicas
        return problems

    async def _verify_working_copy(self) -> str | None:
        """The working copy's rows against the digest it keeps: a mismatch
        means it was damaged under the mount (memory, the temp directory)
        or a bug; it cannot be fixed online, the replicas are still good."""
        snapshot = self.workdir / "verify-working.sqlite"
        try:
            self.db.snapshot(snapshot)  # on the loop: consistent at one generation
            found = await run_in_thread(inspect_copy, snapshot)
        finally:
            snapshot.unlink(missing_ok=True)
        if found.problem is None:
            return None
        log.critical(
            "the working copy of the metadata (%s) failed verification: %s; unmount and"
            " mount again to start from the verified replicas",
            self.db.path,
            found.problem,
        )
        return f"working copy {self.db.path}: {found.problem}"

    def run_command(self, command: Command) -> None:
        """Start a validated operator command (returns at once; progress
        shows in `status`)."""
        if command.verb == "scrub":
            self.start_scrub(command.seconds)
        elif command.verb == "scrub-stop":
            self.scrubber.stop()
        elif command.verb == "repair":
            if command.min_rate is not None:
                self.repairer.min_rate = command.min_rate
            if command.max_rate is not None:
                self.repairer.rate = command.max_rate
            self.repairer.set_urgent(command.urgent)
        elif command.verb == "pause":
            self.background_gate.pause(command.by)
        elif command.verb == "resume":
            self.background_gate.resume()
        elif command.verb == "store-replace":
            self.start_store_change("replace", command.old, command.new, command=command)
        elif command.verb == "store-add":
            self.start_store_change("add", None, command.new, command.placement, command=command)
        elif command.verb == "store-domain":
            self.start_store_change("domain", command.old, None, command=command)
        else:
            self.start_store_change("remove", command.old, None)

    def _background_resumed(self) -> None:
        """Background work was resumed: wake the tasks that sleep."""
        self.repairer.poke()
        self.garbage.poke()
        self.writelog.poke()

    def _describe_inode(self, ino: int) -> str:
        """A path of inode `ino` for messages (or "inode N")."""
        paths = InodeTable(self.db).paths_of(ino, ROOT_INODE, limit=1)
        return os.fsdecode(paths[0]) if paths else f"inode {ino}"

    def start_restripe(self, ino: int) -> None:
        """Queue `ecfs restripe` of inode `ino` (a directory or a file):
        the files below it get their effective policy (`ecfs.data.restripe`)."""
        node = self.namespace.get(ino)
        if not (node.is_dir or stat.S_ISREG(node.mode)):
            raise FsError("restripe takes a directory or a regular file", errno=errno.EINVAL)
        self.restriper.start(ino)

    def start_scrub(self, max_duration: float | None) -> None:
        if self._nursery is None or self.scrubber.progress.running:
            return
        self._nursery.start_soon(guarded, "scrub", self.scrubber.run, max_duration)

    def start_store_change(
        self,
        op: str,
        old: str | None,
        new: str | None,
        placement: str | None = None,
        *,
        command: Command | None = None,
    ) -> None:
        """Begin replacing, adding (switching to placement policy
        `placement` if given) or draining a store, or setting its failure
        domain label (`command`: its domain options; progress in
        `status().store_change`)."""
        if self.store_change is not None and self.store_change.state == "running":
            raise FsError("a store change is already running", errno=errno.EBUSY)
        self.store_change = StoreChange(op, old, new, "running", "")
        assert self._nursery is not None
        self._nursery.start_soon(
            guarded, "store change", self._store_change, op, old, new, placement, command
        )

    async def _store_change(
        self,
        op: str,
        old: str | None,
        new: str | None,
        placement: str | None = None,
        command: Command | None = None,
    ) -> None:
        before = set(self.runners)
        domain = command.domain if command is not None else None
        shared = command is not None and command.allow_shared
        try:
            if op == "replace":
                message = await self.stores_admin.replace(
                    old or "", new or "", domain=domain, allow_shared=shared
                )
            elif op == "add":
                message = await self.stores_admin.add(
                    new or "", placement, domain=domain, allow_shared=shared
                )
            elif op == "domain":
                message = await self.stores_admin.set_domain(old or "", domain)
            else:
                message = await self.stores_admin.remove(old or "")
        except EcfsError as exc:
            self._end_store_change("failed", str(exc))
            log.error("store %s failed: %s", op, exc)
            return
        if self.replicator is not None:
            # A removed store's metadata copy leaves with it: another store
            # gets one (the copy on the retired store is never read again).
            for index in before - set(self.runners):
                self.replicator.drop_replica(index, "store removed from the volume")
        self._end_store_change("done", message)
        log.warning("store %s: %s", op, message)

    def _report_store_change(self, message: str) -> None:
        if self.store_change is not None:
            self.store_change = dataclasses.replace(self.store_change, message=message)

    def _watch_stores(self) -> None:
        """Turn every store's health changes into events (also the runners
        a store change installed)."""
        for runner in self.runners.values():
            runner.on_health_change = self._store_health_changed

    def _store_health_changed(self, runner: StoreRunner) -> None:
        path = str(runner.store.path)
        if runner.available:
            self.events.emit(
                STORE_BACK, f"store {runner.index} ({path}) is back",
                store=runner.index, store_path=path,
            )  # fmt: skip
        else:
            reason = runner.failure_reason or "unknown"
            self.events.emit(
                STORE_FAILED, f"store {runner.index} ({path}) failed: {reason}",
                store=runner.index, store_path=path, reason=reason,
            )  # fmt: skip

    def paths_of(self, ino: int) -> str:
        """The paths of inode `ino` for a message ("a or b"; "" if unlinked)."""
        paths = self.filedata.inodes.paths_of(ino, ROOT_INODE)
        return " or ".join(p.decode(errors="replace") for p in paths)

    def chunk_unrecoverable(
        self, chunk_id: int, ino: int, chunk_index: int, length: int, detected_by: str, reason: str
    ) -> None:
        """A reader or the repairer found fewer than k good fragments of
        chunk `chunk_id`: the chunk-unrecoverable event, once per chunk."""
        if chunk_id in self._reported_unrecoverable:
            return
        self._reported_unrecoverable.add(chunk_id)
        path = self.paths_of(ino)
        offset = chunk_index * self.layout.chunk_size
        self.events.emit(
            CHUNK_UNRECOVERABLE,
            f"{path or 'an unlinked file'} (inode {ino}): bytes [{offset}, {offset + length})"
            f" cannot be recovered: {reason}",
            chunk=f"{chunk_id:016x}", inode=ino, path=path, offset=offset, length=length,
            detected_by=detected_by, reason=reason,
        )  # fmt: skip

    def _end_store_change(self, state: str, message: str) -> None:
        self._watch_stores()
        if self.store_change is not None:
            self.store_change = dataclasses.replace(self.store_change, state=state, message=message)

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
        """fsync(): wait until `generation` is durable (`_wait_replicated`);
        EIO if the lease is not held before or after (see `check_lease`)."""
        self.check_lease()
        await self._wait_replicated(generation)
        self.check_lease()

    async def _wait_replicated(self, generation: int) -> None:
        """Wait until `generation` is durable; if no replica is
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

    def check_lease(self) -> None:
        """FsError (EIO, the reason logged once by the lease) if this mount
        holds a lease that it may not write under now (see the module
        docstring); nothing without a lease. Cheap: a clock read."""
        if self.lease is not None:
            self.lease.check()

    def capacity(self) -> tuple[int, int]:
        """(total, free) usable bytes (`df` on the mount, fallocate's check).

        Only real space counts: the raw space of the distinct filesystems
        of the available stores whose space is known (local stores); an
        object store without a known size (`StoreUsage.known` False)
        contributes nothing, unless no store's space is known at all (a
        volume of object stores only: its nominal space, so it never looks
        full). Scaled by k/(k+m) under spread placement; under hybrid
        placement only the local stores count, and whole: they hold the
        data fragments only (parity is remote)."""
        usages = {
            index: usage
            for index, usage in self.placement.usage.items()
            if self.runners.get(index) is not None and self.runners[index].available
        }
        hybrid = self.placement.policy == HYBRID
        if hybrid:  # the data fragments' stores
            usages = {index: usage for index, usage in usages.items() if not self.is_remote(index)}
        if any(usage.known for usage in usages.values()):
            usages = {index: usage for index, usage in usages.items() if usage.known}
        total = free = 0
        seen: set[int] = set()
        for index, usage in usages.items():
            device = self._devices.get(index)
            if device in seen:
                continue
            seen.add(device if device is not None else -index)
            total += usage.total_bytes
            free += usage.free_bytes
        if hybrid:
            return total, free
        k, n = self.layout.k, self.layout.n
        return total * k // n, free * k // n


def _probe_store(store: Store, accept_moved: bool) -> tuple[StoreMarker, int]:
    """Blocking: `store.probe` and the device of the store root."""
    return store.probe(accept_moved=accept_moved), store.device()


def _match_stores(
    table: list[tuple[int, str]], by_store_id: dict[str, Path], db: Database
) -> dict[int, Store]:
    """Store index -> store for the stores present; VolumeError if
    a given store is not in the volume or too many are missing."""
    known = {store_id: index for index, store_id in table}
    stores: dict[int, Store] = {}
    for store_id, path in by_store_id.items():
        if store_id not in known:
            raise VolumeError(f"store {path} is not (or no longer) part of this volume")
        stores[known[store_id]] = open_store(path)
    params = StoreTable(db).params()
    m = int(params["m"])
    missing = [index for index, _ in table if index not in stores]
    if len(missing) > m:
        why = _too_many_missing(db, params, dict(table), stores, missing)
        if why is not None:
            raise VolumeError(
                f"only {len(stores)} of {len(table)} stores are present; at most {m} may be"
                f" missing (missing store indices: {missing}), {why}"
            )
    if missing:
        log.warning("mounting degraded: stores %s are missing", missing)
    return stores


def _too_many_missing(
    db: Database,
    params: dict[str, str],
    store_ids: dict[int, str],
    stores: dict[int, Store],
    missing: list[int],
) -> str | None:
    """Blocking: why more than m `missing` stores are too many, or None if
    the volume is still whole without them. It is whole when (1) they are
    in at most m failure domains (`ecfs.storage.domains`; a missing store
    without a label is a domain of its own) of a volume of at least m+1,
    and (2) every chunk of the chunk table has at least k fragments on the
    present stores. (2) is the per-chunk truth for the data; (1) is what
    makes the metadata and the small-write log safe to trust: their m+1
    copies are kept in distinct domains (`copy_stores`, `LogFiles`), so
    losing at most m domains leaves a current copy of each among the
    present stores, and the chosen copy is not a stale one whose newer
    siblings are all away. So a lost domain of several stores is survived
    across a remount, not only while mounted."""
    k, m = int(params["k"]), int(params["m"])
    domains = resolve_stores(stores, labels_of(params, store_ids))
    every = {i: domains.get(i) or f"unknown:{i}" for i in store_ids}
    lost = {every[i] for i in missing}
    if len(lost) > m:
        return f"in {len(lost)} failure domains ({', '.join(sorted(lost))})"
    if len(set(every.values())) <= m:
        return f"and the volume has only {len(set(every.values()))} failure domain(s)"
    short = 0
    for _inode, _idx, ref in ChunkTable(db).iter_all():
        if sum(1 for s in ref.stores if s in stores) < k:
            short += 1
    if short:
        return f"and {short} chunk(s) have fewer than k={k} fragments on the present stores"
    return None
