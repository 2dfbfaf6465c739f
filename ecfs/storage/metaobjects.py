"""Metadata copies kept as objects on an object store (S3): snapshots plus
log segments.

Owns: the object format and names under ``<store>/meta/``, rebuilding a
copy from its objects into a local file (`ObjectCopy.rebuild`), writing a
whole copy (`ObjectCopy.install`), shipping batches as log objects and
compacting them (`ObjectTarget`, whose `_ObjectReplica` is one of the
`ecfs.storage.replicas.Replicator`'s replicas), and the one rule of which
stores hold the metadata copies (`copy_stores`). Must not: speak SQL
(every database step is `ecfs.storage.replicas`'s), choose between copies
(a rebuilt copy is a local file that goes through the same
`inspect_copy`/`choose_copy` as a file replica: one bad copy never wins
nor spreads), or run on the event loop (every method makes requests; the
volume calls them through the store's `StoreRunner.call`, or before it
serves).

Which stores hold the copies (`copy_stores`): a volume with at least m+1
local stores keeps them there, as files (``<store>/meta/ecfs-meta.sqlite``);
otherwise m+1 stores, local ones first, then object stores. Failure
domains (`ecfs.storage.domains`) come before that order: the local stores
alone hold the copies only if they span as many domains as the volume does
(up to m+1), and the stores are taken so that the m+1 copies are in
distinct domains whenever the stores allow it (`spread`; the mount adds a
copy in a missing domain and drops a crowded one, `copy_helps` and
`surplus_copies`), so losing one domain never takes every copy. The tolerance
is the same: any one of the m+1 copies is enough to mount. An object copy
needs no local directory: any host with the credentials can mount the
volume from the store locations alone, after the first host died.

Objects (under ``meta/``; every PUT is a conditional create, If-None-Match:
*, never an overwrite)::

    snap-<epoch:010d>-<generation:020d>           the database file at that generation
    log-<epoch:010d>-<first:020d>-<last:020d>     one batch: transactions first..last

Each object is a header then the body: magic ``ECFSMET1``, the kind (1
snapshot, 2 log), the volume id (16 bytes), epoch, first and last
generation (a snapshot: both its generation), the body's length, and the
xxh3-128 of all of that and the body. The body of a log is the batch in a
deterministic encoding of `ecfs.core.model.Transaction` (`encode_batch`;
not pickle: a damaged or forged object can only fail to decode). An
object whose header or checksum does not verify, or whose header does not
match its name, is damaged: never served.

Rebuilding a copy (`ObjectCopy.rebuild`): list ``meta/``; take the newest
epoch that has a snapshot, and in it the newest snapshot that verifies
(none verifies: the copy is unusable); write its body to a local file and
apply the epoch's log objects that follow it, in generation order, while
they are contiguous and verify (a gap or a damaged log ends it: the copy
is then only stale, and is rewritten like any stale copy). The file then
goes through `ecfs.storage.replicas.prepare_working_copy` with the file
copies.

Fencing epoch: every name carries the epoch of the mount that wrote it;
recovery reads only the newest epoch that has a snapshot, and a mount at
epoch E first writes a snapshot at epoch E (`ObjectCopy.install`, from
`ecfs.volume.assembly.Volume._setup_replicas`), so logs that a stale holder
of an older epoch still writes are ignored; a mount whose epoch is older
than the copies' newest is refused (another host holds the volume). The
caller passes the lease epoch (ecfs.storage.lease) or 0: `Volume.open(..., epoch=)` and
`ecfs.volume.fsck.run_fsck(..., epoch=)` are the places.

Shipping (`_ObjectReplica`): a batch is applied to a local shadow database
(a private file in the mount's working directory, at this copy's
generation) inside one SQLite transaction, and the log object is PUT
before that transaction commits: a failed PUT rolls the shadow back and
the copy goes stale like a failed file replica. The PUT is the
durability: an acknowledged PUT is on the server. The durability rule is
the replicator's (fragments synced before any copy gets a batch). One
shadow per object copy, not one shared: each copy's snapshot is then
exactly the state its own logs reach, whatever another copy did.

Compaction: when the logs since the copy's snapshot exceed
COMPACT_LOG_COUNT objects or max(COMPACT_MIN_BYTES, the snapshot's size)
bytes, a new snapshot is PUT from the shadow, then the older snapshot and
logs are DELETEd. So a copy has a bounded number of objects and a mount
replays a bounded log. A compaction that fails is retried after the next
batch (the logs are still there and still good).

Cost: one PUT per copy per batch (group commit makes a batch of every
fsync's worth of transactions), and at every mount one snapshot PUT per
object copy. Compaction runs inside the batch's call, so the fsync that
triggers it waits for one snapshot upload (about once per
COMPACT_LOG_COUNT batches; its size is the database's).

Concurrency: `ObjectCopy` methods are blocking and run in the store's
worker threads; an `_ObjectReplica` is used by the replicator exactly like
a file replica (one call at a time, under the connection's lock), its
compaction included. Nothing here touches the event loop.

Crash contract: a PUT is whole or absent; a snapshot is PUT before the
objects it replaces are deleted, so at every moment a copy rebuilds to a
state at least as new as its last acknowledged log (a crash between the
two leaves extra objects, deleted by the next compaction or mount).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..core.errors import EcfsError, FragmentMissing, StoreError
from ..core.fragment import checksum128
from ..core.model import Transaction
from .domains import spread
from .replicas import (
    CopyInspection,
    ReplicaError,
    Runner,
    _Replica,
    inspect_copy,
    remove_replica,
    replay_batches,
    replica_path,
)
from .store import Store

log = logging.getLogger(__name__)

MAGIC = b"ECFSMET1"
KIND_SNAPSHOT = 1
KIND_LOG = 2
#: magic, kind, volume id, epoch, first generation, last generation, body length.
_HEAD = struct.Struct("<8sB16sQQQQ")
_DIGEST = 16
#: Compaction bounds (see the module docstring).
COMPACT_LOG_COUNT = 200
COMPACT_MIN_BYTES = 4 << 20

_SNAP = re.compile(r"snap-([0-9]{10})-([0-9]{20})")
_LOG = re.compile(r"log-([0-9]{10})-([0-9]{20})-([0-9]{20})")

# Value tags of the batch encoding.
_NONE, _INT, _FLOAT, _TEXT, _BLOB = range(5)
_U32 = struct.Struct("<I")
_Q = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


class DamagedObject(EcfsError):
    """A metadata object that does not verify (checksum, header, name)."""


class MetaObjectStore(Protocol):
    """What an object store offers for a metadata copy (`S3Store`)."""

    path: Path

    def list_meta(self) -> list[str]: ...
    def put_meta(self, name: str, data: bytes) -> bool: ...
    def get_meta(self, name: str) -> bytes: ...
    def delete_meta(self, name: str) -> None: ...
    def set_aside_meta(self, name: str) -> None: ...


def keeps_meta_objects(store: object) -> bool:
    """Whether `store` keeps its metadata copy as objects (an object store)."""
    return bool(getattr(store, "holds_meta_objects", False))


def copy_stores(
    objects: Mapping[int, bool], m: int, domain: Callable[[int], str] = str
) -> list[int]:
    """The one rule of where the metadata copies are: the store indices
    that may hold one, in order of preference. `objects`: every store of
    the volume -> whether it is an object store; `domain(store)`: its
    failure domain (`ecfs.storage.domains`; default: every store its own).
    With at least m+1 local stores in as many distinct domains as the
    whole volume offers (up to m+1), the local ones only (as files);
    otherwise every store, local ones first (an object store keeps its
    copy as objects). Either way ordered so that each next store is from a
    domain holding the fewest of the stores before it (`spread`): the
    first m+1 are in distinct domains whenever the stores allow it, so
    losing one domain never takes every copy."""
    local = sorted(i for i, is_object in objects.items() if not is_object)
    remote = sorted(i for i, is_object in objects.items() if is_object)
    reachable = min(m + 1, len({domain(i) for i in objects}))
    if len(local) >= m + 1 and len({domain(i) for i in local}) >= reachable:
        return spread(local, len(local), domain)
    return spread(local + remote, len(local) + len(remote), domain)


# ---------------------------------------------------------------- names and format


def snapshot_name(epoch: int, generation: int) -> str:
    return f"snap-{epoch:010d}-{generation:020d}"


def log_name(epoch: int, first: int, last: int) -> str:
    return f"log-{epoch:010d}-{first:020d}-{last:020d}"


@dataclass(frozen=True, order=True)
class _Name:
    """A parsed object name: (epoch, first, last, kind, name)."""

    epoch: int
    first: int
    last: int
    kind: int
    name: str


def _parse(name: str) -> _Name | None:
    match = _SNAP.fullmatch(name)
    if match:
        generation = int(match[2])
        return _Name(int(match[1]), generation, generation, KIND_SNAPSHOT, name)
    match = _LOG.fullmatch(name)
    if match and int(match[2]) <= int(match[3]):
        return _Name(int(match[1]), int(match[2]), int(match[3]), KIND_LOG, name)
    return None


def pack(kind: int, volume: bytes, epoch: int, first: int, last: int, body: bytes) -> bytes:
    """One object: header, body, xxh3-128 of both."""
    head = _HEAD.pack(MAGIC, kind, volume, epoch, first, last, len(body))
    return head + body + checksum128(head + body).to_bytes(_DIGEST, "little")


def unpack(name: str, blob: bytes, volume: bytes) -> bytes:
    """The body of object `name`; DamagedObject unless its checksum
    verifies and its header matches its name and `volume`."""
    parsed = _parse(name)
    if parsed is None:
        raise DamagedObject(f"{name}: not a metadata object name")
    if len(blob) < _HEAD.size + _DIGEST:
        raise DamagedObject(f"{name}: only {len(blob)} bytes")
    body_end = len(blob) - _DIGEST
    if checksum128(blob[:body_end]).to_bytes(_DIGEST, "little") != blob[body_end:]:
        raise DamagedObject(f"{name}: checksum mismatch (damaged)")
    magic, kind, vol, epoch, first, last, length = _HEAD.unpack_from(blob)
    if magic != MAGIC or length != body_end - _HEAD.size:
        raise DamagedObject(f"{name}: bad header")
    if vol != volume:
        raise DamagedObject(f"{name}: belongs to another volume ({vol.hex()})")
    if (kind, epoch, first, last) != (parsed.kind, parsed.epoch, parsed.first, parsed.last):
        raise DamagedObject(f"{name}: its header does not match its name")
    return blob[_HEAD.size : body_end]


def encode_batch(batch: Sequence[Transaction]) -> bytes:
    """The batch, deterministically: per transaction its generation and
    statements; per statement its SQL text and tagged parameters (NULL,
    64-bit integer, double, UTF-8 text, blob). ValueError for another type."""
    out = bytearray(_U32.pack(len(batch)))
    for txn in batch:
        out += _Q.pack(txn.generation) + _U32.pack(len(txn.statements))
        for sql, params in txn.statements:
            text = sql.encode()
            out += _U32.pack(len(text)) + text + _U32.pack(len(params))
            for value in params:
                if value is None:
                    out.append(_NONE)
                elif isinstance(value, int):  # bool included, as SQLite stores it
                    out.append(_INT)
                    out += _I64.pack(int(value))
                elif isinstance(value, float):
                    out.append(_FLOAT)
                    out += _F64.pack(value)
                elif isinstance(value, str):
                    data = value.encode()
                    out.append(_TEXT)
                    out += _U32.pack(len(data)) + data
                elif isinstance(value, (bytes, bytearray, memoryview)):
                    data = bytes(value)
                    out.append(_BLOB)
                    out += _U32.pack(len(data)) + data
                else:
                    raise ValueError(f"cannot encode a {type(value).__name__} parameter")
    return bytes(out)


def decode_batch(body: bytes) -> list[Transaction]:
    """Inverse of `encode_batch`; DamagedObject if `body` is not one."""
    view = memoryview(body)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise DamagedObject("log body ends early")
        part = view[pos : pos + n]
        pos += n
        return part

    def u32() -> int:
        return int(_U32.unpack(take(4))[0])

    batch = []
    try:
        for _ in range(u32()):
            (generation,) = _Q.unpack(take(8))
            statements = []
            for _ in range(u32()):
                sql = bytes(take(u32())).decode()
                params: list[object] = []
                for _ in range(u32()):
                    tag = take(1)[0]
                    if tag == _NONE:
                        params.append(None)
                    elif tag == _INT:
                        params.append(_I64.unpack(take(8))[0])
                    elif tag == _FLOAT:
                        params.append(_F64.unpack(take(8))[0])
                    elif tag == _TEXT:
                        params.append(bytes(take(u32())).decode())
                    elif tag == _BLOB:
                        params.append(bytes(take(u32())))
                    else:
                        raise DamagedObject(f"unknown value tag {tag}")
                statements.append((sql, tuple(params)))
            batch.append(Transaction(generation, tuple(statements)))
    except UnicodeDecodeError as exc:
        raise DamagedObject(f"log body: {exc}") from None
    if pos != len(view):
        raise DamagedObject("log body has trailing bytes")
    return batch


# ---------------------------------------------------------------- one copy


@dataclass
class Rebuilt:
    """What `ObjectCopy.rebuild` found. `missing`: no snapshot at all (no
    copy here). `problem`: the copy is unusable (no snapshot of its newest
    epoch verifies, or the store cannot be read). `damaged`: objects that
    did not verify (name -> why). `generation`: what the rebuilt file
    reached; `base`: the snapshot it started from; `logs`: the log objects
    applied after it; `stopped`: why the log replay ended before the last
    log object (a gap, damage)."""

    path: Path
    store: Path
    missing: bool = False
    problem: str | None = None
    epoch: int = 0
    generation: int = -1
    base: str | None = None
    base_size: int = 0
    logs: list[str] = field(default_factory=list)
    log_bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None


class ObjectCopy:
    """The metadata copy kept as objects on one object store (blocking
    methods: run them in the store's runner)."""

    def __init__(self, store: MetaObjectStore, volume: bytes) -> None:
        self.store = store
        self.volume = volume

    def _names(self) -> list[_Name]:
        return sorted(n for n in map(_parse, self.store.list_meta()) if n is not None)

    def exists(self) -> bool:
        """Whether any snapshot is here (a copy, good or not)."""
        return any(n.kind == KIND_SNAPSHOT for n in self._names())

    def fetch(self, name: str) -> bytes:
        """The verified body of object `name` (DamagedObject otherwise)."""
        try:
            blob = self.store.get_meta(name)
        except FragmentMissing:
            raise DamagedObject(f"{name}: vanished") from None
        return unpack(name, blob, self.volume)

    def rebuild(self, dest: Path) -> Rebuilt:
        """Rebuild the copy into the new local file `dest` (see the module
        docstring). Never raises for damage or an unreachable store: the
        result says what was found."""
        found = Rebuilt(dest, self.store.path)
        try:
            names = self._names()
        except StoreError as exc:
            found.problem = f"its objects cannot be listed: {exc}"
            return found
        snapshots = [n for n in names if n.kind == KIND_SNAPSHOT]
        if not snapshots:
            found.missing = True
            return found
        epoch = max(n.epoch for n in snapshots)
        found.epoch = epoch
        for snap in sorted((n for n in snapshots if n.epoch == epoch), reverse=True):
            try:
                body = self.fetch(snap.name)
            except DamagedObject as exc:
                found.damaged[snap.name] = str(exc)
                continue
            except StoreError as exc:
                found.problem = f"cannot read {snap.name}: {exc}"
                return found
            remove_replica(dest)
            dest.touch(mode=0o600)
            dest.write_bytes(body)
            found.base, found.base_size, found.generation = snap.name, len(body), snap.first
            break
        else:
            found.problem = "no snapshot of its newest epoch verifies: " + "; ".join(
                found.damaged.values()
            )
            return found
        batches: list[list[Transaction]] = []
        expected = found.generation + 1
        later = [n for n in names if n.kind == KIND_LOG and n.epoch == epoch]
        for entry in later:
            if entry.first < expected:
                # Starts inside the snapshot: left by an interrupted
                # compaction, or PUT late by a call abandoned before the
                # copy was rewritten. Never a continuation of it.
                continue
            if entry.first != expected:
                found.stopped = f"gap: {entry.name} follows generation {expected - 1}"
                break
            try:
                body = self.fetch(entry.name)
                batch = decode_batch(body)
            except DamagedObject as exc:
                found.damaged[entry.name] = str(exc)
                found.stopped = str(exc)
                break
            except StoreError as exc:
                found.stopped = f"cannot read {entry.name}: {exc}"
                break
            if [t.generation for t in batch] != list(range(entry.first, entry.last + 1)):
                found.damaged[entry.name] = "its transactions are not the ones its name says"
                found.stopped = found.damaged[entry.name]
                break
            batches.append(batch)
            found.logs.append(entry.name)
            found.log_bytes += len(body)
            expected = entry.last + 1
        try:
            generation, stopped = replay_batches(dest, batches)
        except EcfsError as exc:
            found.problem = f"its snapshot {found.base} cannot be read: {exc}"
            return found
        if stopped is not None:
            found.stopped = stopped
            applied = [n for n in later if n.name in found.logs and n.last <= generation]
            found.logs = [n.name for n in applied]
        found.generation = generation
        return found

    def install(self, source: Path, generation: int, epoch: int, *, set_aside: bool = False) -> str:
        """Make the database file `source` (at `generation`, consistent, not
        in use) this store's copy: PUT it as snapshot (`epoch`,
        `generation`), then delete every older object. A snapshot of that
        name already here is deleted first (it is damaged or about to be
        replaced). `set_aside`: the copy here was refused; its newest
        snapshot is kept as ``meta-refused/<name>`` first. Returns the
        snapshot's name; StoreError if it cannot be written."""
        names = self._names()
        if set_aside:
            snaps = [n for n in names if n.kind == KIND_SNAPSHOT]
            if snaps:
                try:
                    self.store.set_aside_meta(max(snaps).name)
                except StoreError as exc:
                    log.warning("cannot set aside the refused copy on %s: %s", self.store.path, exc)
        name = snapshot_name(epoch, generation)
        blob = pack(KIND_SNAPSHOT, self.volume, epoch, generation, generation, source.read_bytes())
        if not self.store.put_meta(name, blob):
            self.store.delete_meta(name)
            if not self.store.put_meta(name, blob):
                raise StoreError(f"{self.store.path}: {name} was written again meanwhile")
        self.prune(epoch, keep=name)
        return name

    def put_log(self, epoch: int, batch: Sequence[Transaction]) -> tuple[str, int]:
        """PUT `batch` as a log object; its name and size. ReplicaError if
        an object of that name exists (another writer at this epoch)."""
        name = log_name(epoch, batch[0].generation, batch[-1].generation)
        blob = pack(
            KIND_LOG,
            self.volume,
            epoch,
            batch[0].generation,
            batch[-1].generation,
            encode_batch(batch),
        )
        if not self.store.put_meta(name, blob):
            raise ReplicaError(f"{self.store.path}: {name} exists already (another writer?)")
        return name, len(blob)

    def prune(self, epoch: int, keep: str) -> int:
        """Delete every object of epoch `epoch` or older but the snapshot
        `keep`, which is now the whole copy: older snapshots and logs, and
        logs after it that a crashed or refused history left (a log of this
        epoch must never be found under a name the next batch takes).
        Objects of a newer epoch are another holder's: left alone.
        Returns how many were deleted."""
        deleted = 0
        for entry in self._names():
            if entry.name != keep and entry.epoch <= epoch:
                self.store.delete_meta(entry.name)
                deleted += 1
        return deleted

    def remove(self) -> None:
        """Delete every object of the copy (it is no longer wanted)."""
        for entry in self._names():
            self.store.delete_meta(entry.name)


def rebuild_copies(
    stores: Mapping[Path, Store], workdir: Path, volume: bytes
) -> dict[Path, Rebuilt]:
    """Blocking: rebuild the copy of every object store in `stores` (store
    path -> store) into ``workdir`` (private), in parallel; store path ->
    what was found (`Rebuilt`, whose `path` is the local file)."""
    objects = [(p, s) for p, s in stores.items() if keeps_meta_objects(s)]
    if not objects:
        return {}

    def one(n: int, path: Path, store: Store) -> Rebuilt:
        # Named after the store, for the messages that name the copy.
        where = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path).split("?")[0].removeprefix("s3://"))
        dest = workdir / f"objects-{n}-{where[:80]}.sqlite"
        found = ObjectCopy(store, volume).rebuild(dest)  # type: ignore[arg-type]
        for name, why in found.damaged.items():
            log.warning("metadata object %s on %s is damaged: %s", name, path, why)
        if found.problem:
            log.warning("metadata copy on %s: %s", path, found.problem)
        elif not found.missing:
            log.info(
                "metadata copy on %s rebuilt from %s and %d log object(s) at generation %d"
                " into %s",
                path,
                found.base,
                len(found.logs),
                found.generation,
                dest,
            )
        return found

    with ThreadPoolExecutor(max_workers=len(objects)) as pool:
        results = list(pool.map(lambda a: one(*a), [(n, p, s) for n, (p, s) in enumerate(objects)]))
    return {path: found for (path, _), found in zip(objects, results, strict=True)}


@dataclass
class GatheredCopies:
    """Every metadata copy of the given stores, as local files to inspect.

    `paths`: the copies (file replicas that exist, rebuilt object copies,
    and object copies that could not be rebuilt). `known`: copies found
    unusable before inspection -> why. `objects`: local file of an object
    copy -> what its rebuild found. `store_of`: copy -> store path."""

    paths: list[Path] = field(default_factory=list)
    known: dict[Path, str] = field(default_factory=dict)
    objects: dict[Path, Rebuilt] = field(default_factory=dict)
    store_of: dict[Path, Path] = field(default_factory=dict)


def gather_copies(stores: Mapping[Path, Store], workdir: Path, volume: bytes) -> GatheredCopies:
    """Blocking: the file replicas of `stores` and their object copies
    rebuilt into `workdir` (mount, fsck: before anything is written)."""
    gathered = GatheredCopies()
    rebuilt = rebuild_copies(stores, workdir, volume)
    for path, store in stores.items():
        found = rebuilt.get(path)
        if found is None:
            copy = replica_path(store.meta_dir)
            if copy.exists():
                gathered.paths.append(copy)
                gathered.store_of[copy] = path
            continue
        if found.missing:
            continue
        gathered.paths.append(found.path)
        gathered.store_of[found.path] = path
        gathered.objects[found.path] = found
        if found.problem is not None:
            gathered.known[found.path] = f"(objects on {path}) {found.problem}"
    return gathered


# ---------------------------------------------------------------- shipping


@dataclass
class ObjectTarget:
    """An object copy for the `Replicator`: its store, the local shadow
    database (at the copy's generation), the epoch it writes, the snapshot
    it stands on and the logs written since (for compaction)."""

    store: MetaObjectStore
    volume: bytes
    shadow: Path
    epoch: int
    snapshot: str
    snapshot_size: int
    logs: int = 0
    log_bytes: int = 0
    compact_count: int = COMPACT_LOG_COUNT
    compact_bytes: int = COMPACT_MIN_BYTES

    def make_replica(self, index: int, runner: Runner, generation: int) -> _Replica:
        return _ObjectReplica(index, self, runner, generation)


class _ObjectReplica(_Replica):
    """An object copy as one of the replicator's replicas: the shadow is
    its database connection (see `_Replica`); each batch is PUT as a log
    object before the shadow commits it, and the logs are compacted."""

    synchronous = "OFF"  # the shadow is a cache: the objects are the copy

    def __init__(self, index: int, target: ObjectTarget, runner: Runner, generation: int) -> None:
        super().__init__(index, target.shadow, runner, generation)
        self.target = target
        self.copy = ObjectCopy(target.store, target.volume)

    def before_commit(self, batch: Sequence[Transaction], previous: int, last: int) -> None:
        _, size = self.copy.put_log(self.target.epoch, batch)
        self.target.logs += 1
        self.target.log_bytes += size

    def after_commit(self, last: int) -> None:
        target = self.target
        if target.logs <= target.compact_count and target.log_bytes <= max(
            target.compact_bytes, target.snapshot_size
        ):
            return
        image = target.shadow.with_name(target.shadow.name + ".snapshot")
        try:
            self.image_blocking(image)
            target.snapshot = self.copy.install(image, last, target.epoch)
            target.snapshot_size = image.stat().st_size
            target.logs = target.log_bytes = 0
            log.info("metadata copy on %s compacted into %s", target.store.path, target.snapshot)
        except (EcfsError, OSError) as exc:  # the logs are still good: try again later
            log.warning("cannot compact the metadata copy on %s: %s", target.store.path, exc)
        finally:
            remove_replica(image)

    def verify_blocking(self, generation: int) -> CopyInspection:
        """Scrub: rebuild the copy from its objects into a scratch file and
        inspect that (the objects are what a later mount reads, not the
        shadow); the copy must reach `generation` with no damaged object."""
        with self._locked("verify"):
            scratch = self.path.with_name(self.path.name + ".verify")
            try:
                found = self.copy.rebuild(scratch)
                if found.problem or found.missing:
                    return CopyInspection(self.path, problem=found.problem or "it has no snapshot")
                if found.damaged:
                    return CopyInspection(
                        self.path, problem="damaged objects: " + "; ".join(found.damaged.values())
                    )
                if found.generation != generation:
                    return CopyInspection(
                        self.path,
                        problem=f"its objects reach generation {found.generation}, not"
                        f" {generation} ({found.stopped})",
                    )
                return inspect_copy(scratch)
            finally:
                remove_replica(scratch)
