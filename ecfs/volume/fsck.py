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
6. With --repair, if anything was found: the stores written to are synced,
   one more (empty) transaction bumps the generation above every replica's,
   and the working copy is copied over every replica file on the present
   stores (a refused one is first set aside as ``<name>.refused``),
   creating replicas on more stores until there are m+1.

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
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.errors import StoreError, VolumeError
from ..core.geometry import Layout
from ..storage.lease import Lease, held_lease
from ..storage.lock import VolumeLock
from ..storage.metadb.database import Database
from ..storage.metadb.schema import SCHEMA_VERSION, upgrade_database
from ..storage.metadb.stores import StoreTable
from ..storage.replicas import CopyChoice, copy_database, replica_path, set_aside
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

#: Progress stages passed to the `progress` callback, in order.
STAGES = ("replicas", "namespace", "chunks", "orphans", "write-back")


def run_fsck(
    store_args: Sequence[str],
    *,
    repair: bool,
    verify_data: bool,
    progress: Callable[[str, int, int], None] | None = None,
    takeover: bool = False,
) -> FsckReport:
    """Blocking: check (and with `repair`, fix) the volume made of the
    stores in `store_args` (paths or glob patterns, as for mount).

    `verify_data` reads every fragment payload and verifies every cell
    checksum (otherwise only headers and file sizes are checked).
    `progress(stage, done, total)` is called as work advances; stages are
    `STAGES`. `takeover`: take over a lease that expired without release.
    Raises VolumeError for usage problems (see the module
    docstring) and when the volume is in use; every problem found in the
    volume itself is a Finding in the returned report instead.
    """
    report = FsckReport(repair=repair, verify_data=verify_data)
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
    if not any(replica_path(open_store(p).meta_dir).exists() for p in markers):
        raise VolumeError(no_metadata_copy_message(markers, unusable))
    by_store_id = identify_stores(markers)
    first = next(iter(markers.values()))
    report.volume_id = first.volume_id
    local = local_stores(list(markers))
    lease = Lease.for_locations(paths, report.volume_id, local_votes=len(local))
    with VolumeLock.acquire(local), held_lease(lease, takeover=takeover):
        remove_dead_working_copies(None)  # e.g. of a killed fsck (full metadata copies)
        workdir = Path(tempfile.mkdtemp(prefix=f"ecfs-{os.getpid()}-fsck-"))
        try:
            _check_volume(
                report, markers, by_store_id, workdir, repair, verify_data, progress, lease
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
    lease: Lease | None = None,
) -> None:
    """Steps 3 to 6 of the module docstring, with the lock (and lease) held."""
    expect = expectation(markers, by_store_id)
    replicas = [replica_path(open_store(p).meta_dir) for p in markers]
    replica_findings_start = len(report.findings)
    choice = check_replicas_agree(report, replicas, expect.m + 1, progress, expect)
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
        stores = _match_stores(table, by_store_id, db)
        if lease is not None:
            local = [s for s in stores.values() if not is_s3_location(s.path)]
            lease.set_volume_stores(len(table), len(local))
        layout = Layout(
            int(params["k"]), int(params["m"]), int(params["fragment_size"]),
            int(params["cell_size"]),
        )  # fmt: skip
        report.counts["stores"] = len(table)
        report.counts["stores_missing"] = len(table) - len(stores)
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
        )
        check_namespace_consistent(ctx)
        check_repair_queue_valid(ctx)
        check_write_log_valid(ctx)
        check_chunk_fragments_present(ctx)
        check_no_orphan_fragments(ctx)
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
    if _write_back(report, working, stores, layout.m + 1, progress, set(choice.refused)):
        for finding in replica_findings:
            finding.fixed = True


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


def _write_back(
    report: FsckReport,
    working: Path,
    stores: dict[int, Store],
    wanted: int,
    progress: Callable[[str, int, int], None] | None,
    refused: set[Path],
) -> bool:
    """Copy the working copy over every replica file on the present stores
    (setting the `refused` ones aside first), then onto more stores until
    `wanted` exist. True if every copy was written and there are `wanted`
    of them."""
    present = [replica_path(store.meta_dir) for _, store in sorted(stores.items())]
    targets = [p for p in present if p.exists()]
    for path in present:
        if len(targets) >= wanted:
            break
        if path not in targets:
            targets.append(path)
    written = failed = 0
    for n, path in enumerate(targets):
        if progress is not None:
            progress("write-back", n, len(targets))
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            if path in refused:
                set_aside(path)
            copy_database(working, path)
        except (StoreError, OSError) as exc:
            report.add("replicas_agree", f"cannot write metadata replica {path}: {exc}")
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
