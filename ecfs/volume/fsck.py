"""`ecfs fsck`: the offline checker (and repairer) of a whole volume.

Owns: opening a volume for checking, the order of the checks (they live in
`ecfs.volume.fsck_checks`, one function per invariant), and with --repair the
write-back of the repaired metadata to the replicas. Must not: run while
the volume is mounted (it takes the `ecfs.storage.lock.VolumeLock` of every store
it opens, and the mount holds the same lock), print anything (the CLI
renders the `FsckReport`), or use trio (everything here is blocking; only
the rebuild of a damaged chunk, shared with the mount's repair, runs in a
short trio run of its own, see `ecfs.volume.fsck_checks`).

How a run goes:

1. The stores are found and identified as a mount does it
   (`ecfs.volume.assembly.expand_store_args`, `read_markers`, `_match_stores`):
   usage problems (stores of two volumes in equal numbers, one store given
   twice, no readable store, no metadata copy, more than m stores missing)
   raise VolumeError (exit 2). A store whose marker names another volume
   than most, or disagrees with the volume's geometry, is reported and not
   used (`ecfs.volume.assembly.select_volume`, `marker_mismatch`).
2. The volume lock is taken on every readable store, and the volume's
   lease on its S3 stores if it has any (`ecfs.storage.lease`; with
   `takeover`, a lease that expired without release is taken over); the
   lease is renewed while fsck runs and released at the end. A repair is
   not written back if the lease was lost meanwhile.
3. replicas_agree: every replica file is inspected, read-only, as a mount
   does it (schema, volume, stores, rows against the content digest it
   records) and one is chosen by the mount's rule (`ecfs.storage.replicas.choose_copy`),
   BEFORE anything is written. If none can be chosen (copies disagree
   with no majority) nothing else is checked or repaired. If the chosen
   copy is not trusted (schema 1 and another copy differs, or the last
   resort of `choose_copy`: copies that agree but whose rows do not give
   their recorded digest) nothing is repaired; if any copy is refused or stale, orphan fragments are not
   deleted (a fragment the chosen copy does not name may be named by
   another): a second --repair, after the write-back made the copies
   agree, deletes them.
4. The chosen replica is copied into a private temp directory
   (``ecfs-<pid>-fsck-*``: directories of dead fsck runs and mounts are
   removed at the start) as the working copy, and upgraded to the current
   schema if it is older; every check reads and (with --repair) fixes it.
5. namespace_consistent, repair_queue_valid, write_log_valid,
   chunk_fragments_present, no_orphan_fragments run in this order (see `ecfs.volume.fsck_checks`).
   With `under` (``--path DIR``: a directory of the volume, relative to its
   root; a leading ``/`` is the volume root, never the host's), only the
   inodes below DIR are checked and the volume-wide checks are skipped and
   named in the report (`ecfs.volume.fsck_checks`, "Scoped runs"); a DIR
   that does not exist in the metadata is a VolumeError.
6. With --repair, if anything was found: the stores written to are synced,
   one more (empty) transaction bumps the generation above every replica's,
   and the working copy is copied over every replica file on the present
   stores (a refused one is first set aside as ``<name>.refused``),
   creating replicas on more stores until there are m+1.

Copies kept as objects (a volume with fewer than m+1 local stores, see
`ecfs.storage.metaobjects`) are rebuilt into the private temp directory
first (read only) and then inspected and chosen like the files; an object
whose checksum fails is a finding (its copy refused, or stale when the log
stops there). The write-back PUTs a snapshot at `epoch`, or at the
copies' newest epoch if that is newer (a snapshot below it would be
ignored), and deletes the copy's older objects (the caller passes the
lease epoch (ecfs.storage.lease) or 0).

Without --repair nothing on the stores is changed, except that SQLite may
create the ``-shm`` side file it needs to read a replica whose WAL still
holds frames (left by a crash); other copies are read ``immutable=1``
(see `ecfs.storage.replicas._connect_read_only`).

Crash during a repair: rebuilt fragment files written before the crash are
not referred to by any replica yet (they are orphans, or replace a file
that was bad anyway); a replica is replaced atomically by `copy_database`.
Rerunning fsck finishes the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import StoreError, VolumeError
from ..core.geometry import Layout
from ..storage.domains import copy_helps, labels_of, resolve_stores, spread
from ..storage.lease import Lease, held_lease
from ..storage.lock import VolumeLock
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.schema import ROOT_INODE, SCHEMA_VERSION, upgrade_database
from ..storage.metadb.stores import StoreTable
from ..storage.metaobjects import (
    GatheredCopies,
    ObjectCopy,
    copy_stores,
    gather_copies,
    keeps_meta_objects,
)
from ..storage.replicas import (
    CopyChoice,
    copy_database,
    read_generation,
    replica_path,
    set_aside,
)
from ..storage.s3store import is_s3_location
from ..storage.store import MARKER_NAME, Store, StoreMarker
from ..storage.storefactory import open_store
from .assembly import (
    _match_stores,
    expand_store_args,
    expectation,
    identify_stores,
    leave_out_mismatched,
    no_metadata_copy_message,
    read_markers,
    remove_dead_working_copies,
    select_volume,
)
from .fsck_checks import (
    COUNT_KEYS,
    Finding,
    FsckContext,
    FsckReport,
    UnrecoverableRange,
    check_chunk_fragments_present,
    check_namespace_consistent,
    check_no_orphan_fragments,
    check_repair_queue_valid,
    check_replicas_agree,
    check_write_log_valid,
)
from .mkfs import check_store_paths, local_stores

__all__ = [
    "COUNT_KEYS",
    "Finding",
    "FsckReport",
    "UnrecoverableRange",
    "run_fsck",
]

log = logging.getLogger(__name__)

#: Check names, in the order they run (the `check` of every Finding is one).
CHECKS = (
    "replicas_agree",
    "namespace_consistent",
    "repair_queue_valid",
    "write_log_valid",
    "chunk_fragments_present",
    "no_orphan_fragments",
)

#: What a scoped run (``--path``) does not check (volume-wide).
SKIPPED_WHEN_SCOPED = (
    "namespace_consistent (reachability, unlinked inodes, rows of missing inodes)",
    "repair_queue_valid",
    "write_log_valid",
    "no_orphan_fragments",
)

#: Progress stages passed to the `progress` callback, in order.
STAGES = ("replicas", "namespace", "chunks", "orphans", "write-back")


def run_fsck(
    store_args: Sequence[str],
    *,
    repair: bool,
    verify_data: bool,
    progress: Callable[[str, int, int], None] | None = None,
    takeover: bool = False,
    under: str | None = None,
) -> FsckReport:
    """Blocking: check (and with `repair`, fix) the volume made of the
    stores in `store_args` (paths or glob patterns, as for mount).

    `verify_data` reads every fragment payload and verifies every cell
    checksum (otherwise only headers and file sizes are checked).
    `progress(stage, done, total)` is called as work advances; stages are
    `STAGES`. `takeover`: take over a lease that expired without release.
    `under`: check only the inodes below this directory of the volume
    (``--path``).
    Raises VolumeError for usage problems (see the module
    docstring) and when the volume is in use; every problem found in the
    volume itself is a Finding in the returned report instead.
    """
    report = FsckReport(repair=repair, verify_data=verify_data)
    if under is not None:
        report.scope = "/" + "/".join(_components(under))
    paths = check_store_paths(expand_store_args(store_args))
    unusable: dict[Path, str] = {}
    markers = read_markers(paths, unusable)
    for path in paths:
        if path not in markers:
            # A directory without any marker (never a store, or retired by
            # `ecfs store remove/replace`) is not part of the volume: a
            # warning. A store whose marker is unreadable is an error.
            retired = path.is_dir() and not (path / MARKER_NAME).exists()
            report.add(
                "chunk_fragments_present",
                f"store {path} is unreadable: {_why(path)}",
                severity="warning" if retired else "error",
            )
    if not markers:
        raise VolumeError("none of the given stores is readable")
    for path, why in select_volume(markers).items():
        unusable[path] = why
        report.add("chunk_fragments_present", f"store {path} is not used: {why}")
    by_store_id = identify_stores(markers)
    first = next(iter(markers.values()))
    report.volume_id = first.volume_id
    local = local_stores(list(markers))
    lease = Lease.for_locations(paths, report.volume_id, local_votes=len(local))
    with VolumeLock.acquire(local), held_lease(lease, takeover=takeover):
        remove_dead_working_copies(None)  # e.g. of a killed fsck (full metadata copies)
        workdir = Path(tempfile.mkdtemp(prefix=f"ecfs-{os.getpid()}-fsck-"))
        try:
            gathered = gather_copies(
                {p: open_store(p) for p in markers}, workdir, uuid.UUID(first.volume_id).bytes
            )
            if not gathered.paths:
                raise VolumeError(no_metadata_copy_message(markers, unusable))
            # Never write below the copies' newest epoch: it would be ignored.
            epoch = max([lease.epoch if lease else 0, *(f.epoch for f in gathered.objects.values())])
            _check_volume(
                report, markers, by_store_id, workdir, repair, verify_data, progress, gathered, epoch,
                lease,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _check_volume(
    report: FsckReport,
    markers: dict[Path, StoreMarker],
    by_store_id: dict[str, Path],
    workdir: Path,
    repair: bool,
    verify_data: bool,
    progress: Callable[[str, int, int], None] | None,
    gathered: GatheredCopies,
    epoch: int,
    lease: Lease | None = None,
) -> None:
    """Steps 3 to 6 of the module docstring, with the lock (and lease) held."""
    expect = expectation(markers, by_store_id)
    replicas = gathered.paths
    replica_findings_start = len(report.findings)
    for found in gathered.objects.values():
        for name, why in found.damaged.items():
            report.add("replicas_agree", f"metadata object {name} on {found.store}: {why}")
    choice = check_replicas_agree(
        report, replicas, expect.m + 1, progress, expect, gathered.known
    )
    replica_findings = report.findings[replica_findings_start:]
    if choice.winner is None:
        if not [p for p in replicas if p.exists()]:
            raise VolumeError(
                "no metadata replica could be read (" + ", ".join(str(p) for p in replicas) + ")"
            )
        return  # which metadata is right is unknown: check and repair nothing
    if repair and not choice.trusted:
        report.add(
            "replicas_agree",
            f"not repairing anything: the chosen metadata replica {choice.winner.path} cannot"
            " be verified (schema 1 with another copy differing, or no copy's rows give its"
            " recorded digest); mount the volume once (it records a verified state) and"
            " run fsck again",
        )
        repair = False
    working = workdir / "metadata.sqlite"
    _copy_chosen(choice, working)
    db = Database(working)
    try:
        params = StoreTable(db).params()
        if params.get("uuid") != report.volume_id:
            raise VolumeError(
                f"the metadata belongs to volume {params.get('uuid')}, the stores to"
                f" {report.volume_id}"
            )
        for path, why in leave_out_mismatched(markers, by_store_id, params).values():
            report.add("chunk_fragments_present", f"store {path} is not used: {why}")
        table = StoreTable(db).all()
        table_paths = StoreTable(db).paths()
        stores = _match_stores(table, by_store_id, db)
        if lease is not None:
            local = [s for s in stores.values() if not s.remote]
            lease.set_volume_stores(len(table), len(local))
        layout = Layout(
            int(params["k"]), int(params["m"]), int(params["fragment_size"]),
            int(params["cell_size"]),
        )  # fmt: skip
        report.counts["stores"] = len(table)
        report.counts["stores_missing"] = len(table) - len(stores)
        scope = _scope(db, report.scope) if report.scope is not None else None
        ctx = FsckContext(
            db=db,
            layout=layout,
            volume_id=uuid.UUID(report.volume_id).bytes,
            stores=stores,
            store_ids=dict(table),
            report=report,
            repair=repair,
            verify_data=verify_data,
            progress=progress,
            keep_orphans=(
                "the metadata replicas disagree"
                if choice.refused or choice.stale
                else None
            ),
            scope=scope,
        )
        check_namespace_consistent(ctx)
        if scope is None:
            check_repair_queue_valid(ctx)
            check_write_log_valid(ctx)
        check_chunk_fragments_present(ctx)
        if scope is None:
            check_no_orphan_fragments(ctx)
        else:
            report.skipped = list(SKIPPED_WHEN_SCOPED)
        if not repair or report.clean:
            return
        for failure in ctx.sync_touched():
            report.add("chunk_fragments_present", f"cannot make repairs durable: {failure}")
            return  # never write metadata that refers to fragments not durable
        with db.transaction():
            pass  # bump the generation above every replica's
        if lease is not None and not lease.holds():
            report.add("replicas_agree", f"repairs not written back: {lease.why_not()}")
            return
    finally:
        db.close()
    kinds = {i: is_s3_location(p) for i, p in table_paths.items() if p}
    kinds.update({i: keeps_meta_objects(s) for i, s in stores.items()})
    domains = resolve_stores(stores, labels_of(params, dict(table)))

    def domain(index: int) -> str:
        return domains.get(index) or f"unknown:{index}"

    holders = copy_stores(kinds, layout.m, domain)
    copies = WriteBack(gathered, uuid.UUID(report.volume_id).bytes, epoch, holders, domain)
    if _write_back(report, working, stores, layout.m + 1, progress, set(choice.refused), copies):
        for finding in replica_findings:
            finding.fixed = True


def _components(path: str) -> list[str]:
    """The names of `path` (relative to the volume root; "." and empty
    parts dropped); VolumeError for "..", which could leave the volume."""
    names = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in names:
        raise VolumeError(f"--path {path}: '..' is not allowed (give a path from the volume root)")
    return names


def _scope(db: Database, path: str) -> frozenset[int]:
    """The inodes below directory `path` of the volume (itself included);
    VolumeError if it does not exist or is not a directory."""
    inodes = InodeTable(db)
    ino = ROOT_INODE
    for name in _components(path):
        found = inodes.find(ino, os.fsencode(name))
        if found is None:
            raise VolumeError(f"--path {path}: no such directory in the volume")
        ino = found
    row = inodes.get(ino)
    if row is None or not stat.S_ISDIR(row[1]):
        raise VolumeError(f"--path {path}: not a directory of the volume")
    return frozenset(inodes.subtree(ino))


def _why(path: Path) -> str:
    try:
        open_store(path).read_marker()
    except StoreError as exc:
        return str(exc)
    return "unreadable"


def _copy_chosen(choice: CopyChoice, working: Path) -> None:
    """Copy the chosen replica to `working` and upgrade it to the current schema."""
    assert choice.winner is not None
    try:
        copy_database(choice.winner.path, working)
    except StoreError as exc:
        raise VolumeError(f"cannot copy metadata replica {choice.winner.path}: {exc}") from exc
    if choice.winner.schema < SCHEMA_VERSION:
        upgrade_database(working)


@dataclass(frozen=True)
class WriteBack:
    """Where fsck's write-back puts the metadata copies: the copies found
    (`gather_copies`), the volume id and epoch of object copies, and the
    stores allowed to hold one in order of preference (`copy_stores`), and
    each store's failure domain (new copies go to domains holding none)."""

    gathered: GatheredCopies
    volume: bytes
    epoch: int
    holders: list[int]
    domain: Callable[[int], str] = str


def _write_back(
    report: FsckReport,
    working: Path,
    stores: dict[int, Store],
    wanted: int,
    progress: Callable[[str, int, int], None] | None,
    refused: set[Path],
    copies: WriteBack,
) -> bool:
    """Copy the working copy over every metadata copy on the present stores
    (setting the `refused` ones aside first; an object copy gets a new
    snapshot), then onto more stores (in `copies.holders` order, domains
    holding no copy first) until `wanted` exist, in as many failure domains
    as they can be. True if every copy was written and there are `wanted`
    of them."""
    copy_of = {str(store): copy for copy, store in copies.gathered.store_of.items()}
    has_copy = [i for i, s in sorted(stores.items()) if str(s.path) in copy_of]
    targets = list(has_copy)
    allowed = [i for i in copies.holders if i in stores]
    reachable = len({copies.domain(i) for i in allowed})
    for index in spread(allowed, len(allowed), copies.domain, map(copies.domain, targets)):
        if index not in targets and copy_helps(targets, index, wanted, reachable, copies.domain):
            targets.append(index)
    image = working.with_name("write-back.sqlite")
    copy_database(working, image)  # one file at one generation, no side files
    generation = read_generation(image)
    written = failed = 0
    for n, index in enumerate(targets):
        store = stores[index]
        if progress is not None:
            progress("write-back", n, len(targets))
        copy = copy_of.get(str(store.path))
        try:
            if keeps_meta_objects(store):
                assert generation is not None
                ObjectCopy(store, copies.volume).install(  # type: ignore[arg-type]
                    image, generation, copies.epoch, set_aside=copy in refused
                )
            else:
                path = replica_path(store.meta_dir)
                path.parent.mkdir(mode=0o700, exist_ok=True)
                if path in refused:
                    set_aside(path)
                copy_database(working, path)
        except (StoreError, OSError) as exc:
            report.add("replicas_agree", f"cannot write metadata copy on {store.path}: {exc}")
            failed += 1
            continue
        written += 1
    if progress is not None:
        progress("write-back", len(targets), len(targets))
    report.counts["replicas_written"] = written
    if written < wanted:
        report.add(
            "replicas_agree",
            f"only {written} metadata replica(s) could be written; the volume needs {wanted}",
        )
    return not failed and written >= wanted
