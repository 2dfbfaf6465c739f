"""The checks of `ecfs fsck`, one function per invariant, and what they report.

Owns: `Finding`, `UnrecoverableRange`, `FsckReport` (the result of a run),
`FsckContext` (what a check works on) and the checks:

* `check_replicas_agree`: every metadata replica is usable (schema,
  volume, stores, rows matching the content digest it records, see
  `ecfs.storage.replicas.inspect_copy`) and current; chooses the copy to check by
  the mount's rule (runs on the replica files before any working copy
  exists; its repair is the write-back done by `ecfs.volume.fsck`).
* `check_namespace_consistent`: directory entries, link counts,
  reachability, symlink/xattr/chunk/inline rows of the namespace.
* `check_repair_queue_valid`: the repair queue names only existing chunks.
* `check_write_log_valid`: every copy of every small-write log record on
  the stores is read and checked against its checksum (a torn or damaged
  copy is a warning: it is never applied); a record is live when it
  applies over its chunk's current version (older ones are dead, never
  applied) and each live record has m+1 copies, which repair writes.
  Rows an older ecfs left in the metadata table must match their checksum
  and apply over the current version; repair deletes the others.
* `check_chunk_fragments_present`: every fragment of every chunk (with the
  chunk's own coding k' + m' when it has one: a row whose k makes no
  coding, or whose slots do not match it, is malformed) exists on
  its store as a regular file (a directory, symlink or FIFO there is a bad
  entry; never followed nor blocked on) with a valid header (and, with
  verify_data, valid cells); repair rebuilds the fragment from k good
  ones through the mount's own path (`ecfs.data.rebuild.rebuild_fragments`:
  the same placement, a bad entry replaced, every rebuilt fragment read
  back and verified, the old one deleted only once the metadata names the
  new one) and queues what it cannot rebuild for the mount's repair
  (reason "fsck", `ecfs.core.model.repair_priority`, the bad fragments' mask).
  Under hybrid placement (`ecfs.data.placement`), fragments on a store of
  the wrong class (a data fragment on a remote store, parity on a local
  one) are reported as a warning; repair queues their chunks
  ('wrong-class') for the mount's repairer, which moves them. So are
  fragments in a failure domain holding another fragment of their chunk
  while a present store is in a domain holding none
  (`Placement.shared_domain`; 'shared-domain').
  A bad header is described, its bytes never printed.
* `check_no_orphan_fragments`: every fragment file on a store is referred
  to by a chunk at that (store, chunk, index); repair deletes the others,
  but never while the metadata copies disagree (`FsckContext.keep_orphans`).
  If the volume remembers every one of them as to be deleted (their store
  was away, see `ecfs.data.garbage`), that is a warning.

Scoped runs (`FsckContext.scope`, ``ecfs fsck --path DIR``): only the
inodes below DIR are checked: namespace_consistent looks at their entries,
link counts, symlinks and inline data, chunk_fragments_present at their
chunks (and with verify_data their cells). What only makes sense for the
whole volume is skipped and named in `FsckReport.skipped`: reachability
and inodes with no links (an inode outside every directory is in no
subtree), rows of missing inodes, repair_queue_valid, write_log_valid and
no_orphan_fragments (an orphan belongs to no file). replicas_agree always
runs: it chooses the metadata to check.

Must not: speak SQL (all queries are in `ecfs.storage.metadb`), open the volume
(see `ecfs.volume.fsck`), or run while anything else uses the volume: the caller
holds the `ecfs.storage.lock.VolumeLock`. Everything here is blocking; the shared
rebuild, which is async, runs in a trio run of its own per rebuilt chunk.

Repair order matters and is the order above: freeing namespace rows can
turn chunks into garbage, so fragments are checked after the namespace,
and orphans are looked for last, after rebuilt fragments were recorded.
Metadata fixes go to the working copy only; `ecfs.volume.fsck` writes it back to
the replicas after every repaired fragment file was made durable
(`FsckContext.sync_touched`), honouring the rule that durable metadata
never refers to a fragment that is not.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from ..core import fragment
from ..core.codec import Codec
from ..core.errors import BadFragmentEntry, FragmentCorrupt, FragmentMissing, StoreError
from ..core.geometry import Layout
from ..core.model import NO_STORE, ChunkRef, repair_priority
from ..data.logfiles import SEGMENT_SIZE, LogFiles, Record, log_stores, padded
from ..data.logfiles import encode as encode_record
from ..data.placement import POLICY_KEY, SPREAD, Placement
from ..data.rebuild import rebuild_fragments
from ..data.smallwrites import legacy_checksum
from ..storage.domains import labels_of, resolve_stores
from ..storage.handles import Expected, read_header
from ..storage.metadb.chunks import ChunkTable, PendingDeletions, RepairQueue
from ..storage.metadb.database import Database
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.restripe import RestripeTable
from ..storage.metadb.schema import ROOT_INODE
from ..storage.metadb.stores import StoreTable
from ..storage.metadb.writelog import WriteLogTable
from ..storage.replicas import CopyChoice, CopyExpectation, choose_copy, inspect_known
from ..storage.store import FRAGS_DIR, Store

log = logging.getLogger(__name__)

Severity = Literal["error", "warning"]
ProgressFn = Callable[[str, int, int], None]

#: Name of the directory in the root that unreachable inodes are linked into.
LOST_AND_FOUND = b"lost+found"

#: How many example names a finding about many files lists.
EXAMPLES = 5


# --------------------------------------------------------------------------
# What a run reports


@dataclass
class Finding:
    """One problem found. `check` is the name of the check (the invariant);
    `fixed` says whether --repair fixed it (always False without it)."""

    check: str
    severity: Severity
    message: str
    fixed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity,
            "message": self.message,
            "fixed": self.fixed,
        }


@dataclass(frozen=True)
class UnrecoverableRange:
    """File bytes ``[start, end)`` of `inode` that fewer than k good
    fragments hold: reads of them fail with EIO. `paths` are the file's
    names (empty if no directory entry reaches it)."""

    inode: int
    paths: tuple[str, ...]
    start: int
    end: int
    chunk_id: int

    def to_json(self) -> dict[str, Any]:
        return {
            "inode": self.inode,
            "paths": list(self.paths),
            "start": self.start,
            "end": self.end,
            "chunk_id": f"{self.chunk_id:016x}",
        }

    def describe(self) -> str:
        name = " = ".join(self.paths) if self.paths else f"inode {self.inode} (no path)"
        return f"{name}: bytes [{self.start}, {self.end}) (chunk {self.chunk_id:016x})"


@dataclass
class FsckReport:
    """The result of one fsck run.

    `clean`: no error findings and no unrecoverable ranges (warnings, such
    as stray non-fragment files, do not make a volume unclean). The CLI
    exits with `exit_status`: 0 clean, 1 problems found (fixed or not).
    """

    volume_id: str = ""
    repair: bool = False
    verify_data: bool = False
    findings: list[Finding] = field(default_factory=list)
    unrecoverable: list[UnrecoverableRange] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    #: The directory a scoped run checked (``--path``), None: the volume.
    scope: str | None = None
    #: The checks (or parts) a scoped run skipped as volume-wide.
    skipped: list[str] = field(default_factory=list)

    def add(
        self, check: str, message: str, *, severity: Severity = "error", fixed: bool = False
    ) -> Finding:
        finding = Finding(check, severity, message, fixed)
        self.findings.append(finding)
        log.log(logging.WARNING if severity == "error" else logging.INFO, "%s: %s", check, message)
        return finding

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def clean(self) -> bool:
        return not self.errors and not self.unrecoverable

    @property
    def exit_status(self) -> int:
        return 0 if self.clean else 1

    @property
    def all_fixed(self) -> bool:
        """True if every error was fixed and nothing is unrecoverable."""
        return not self.unrecoverable and all(f.fixed for f in self.errors)

    def summary(self) -> str:
        """One line for the end of the CLI's output."""
        return self._verdict() + (
            f"; only {self.scope} was checked ({self.counts['inodes']} inodes; skipped as"
            f" volume-wide: {', '.join(self.skipped)})"
            if self.scope is not None
            else ""
        )

    def _verdict(self) -> str:
        if self.clean:
            extra = f" ({len(self.warnings)} warning(s))" if self.warnings else ""
            return f"volume {self.volume_id} is clean{extra}"
        errors = self.errors
        fixed = sum(f.fixed for f in errors)
        parts = [f"{len(errors)} problem(s) found"]
        if self.repair:
            parts.append(f"{fixed} fixed, {len(errors) - fixed} not fixed")
        else:
            parts.append("none fixed (run with --repair)")
        if self.unrecoverable:
            parts.append(f"{len(self.unrecoverable)} unrecoverable file range(s)")
        return f"volume {self.volume_id}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with stable keys:

        ``volume`` (UUID hex), ``clean`` (bool), ``exit_status`` (0/1),
        ``repair`` and ``verify_data`` (the options), ``findings`` (list of
        {``check``, ``severity`` 'error'|'warning', ``message``, ``fixed``}),
        ``unrecoverable`` (list of {``inode``, ``paths`` (list of str),
        ``start``, ``end`` (file byte range), ``chunk_id`` (16 hex digits)}),
        ``counts`` (name -> int, see `COUNT_KEYS`; all keys always present),
        ``scope`` (the directory of ``--path``, or null: the whole volume)
        and ``skipped`` (the volume-wide checks a scoped run skipped).
        """
        return {
            "volume": self.volume_id,
            "clean": self.clean,
            "exit_status": self.exit_status,
            "repair": self.repair,
            "verify_data": self.verify_data,
            "findings": [f.to_json() for f in self.findings],
            "unrecoverable": [u.to_json() for u in self.unrecoverable],
            "counts": {key: int(self.counts[key]) for key in sorted({*COUNT_KEYS, *self.counts})},
            "scope": self.scope,
            "skipped": list(self.skipped),
        }


#: Counters every report carries (`FsckReport.counts`):
COUNT_KEYS = (
    "stores",  # stores of the volume (its store table)
    "stores_missing",  # of them, not given or unreadable
    "replicas",  # metadata replica files examined
    "replicas_written",  # replicas rewritten by --repair
    "inodes",  # inodes in the metadata (after repairs; below DIR with --path)
    "chunks",  # chunk rows checked
    "fragments_checked",  # fragment files whose header was verified
    "bytes_verified",  # payload bytes whose cell checksums were verified
    "fragments_rebuilt",  # fragment files rewritten by --repair
    "orphan_fragments",  # fragment files no chunk refers to
    "orphans_deleted",  # of them, deleted by --repair
    "inodes_freed",  # inodes with no links freed by --repair
)


# --------------------------------------------------------------------------
# What a check works on


@dataclass
class FsckContext:
    """The open volume as the checks see it.

    `stores`: the present stores by store index; `store_ids`: every store
    of the volume's store table (index -> store UUID), present or not.
    `touched`: indices of stores written to or deleted from, which must be
    synced before the metadata is written back. `keep_orphans`: why orphan
    fragments must not be deleted this run (the metadata copies disagree:
    a fragment no chunk of the chosen copy names may be named by another),
    or None. `scope`: the inodes of a scoped run (``--path``; see the
    module docstring), None for the whole volume.
    """

    db: Database
    layout: Layout
    volume_id: bytes
    stores: dict[int, Store]
    store_ids: dict[int, str]
    report: FsckReport
    repair: bool
    verify_data: bool
    progress: ProgressFn | None = None
    touched: set[int] = field(default_factory=set)
    keep_orphans: str | None = None
    scope: frozenset[int] | None = None

    def in_scope(self, ino: int) -> bool:
        return self.scope is None or ino in self.scope

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def sync_touched(self) -> list[str]:
        """Make every repair on the stores durable; the failures, described."""
        failures = []
        for index in sorted(self.touched):
            try:
                self.stores[index].sync()
            except StoreError as exc:
                failures.append(f"store {index}: {exc}")
        self.touched.clear()
        return failures

    def describe_inode(self, ino: int) -> str:
        paths = InodeTable(self.db).paths_of(ino, ROOT_INODE, limit=2)
        if not paths:
            return f"inode {ino}"
        return f"{os.fsdecode(paths[0])} (inode {ino})"


# --------------------------------------------------------------------------
# 1. replicas_agree


def check_replicas_agree(
    report: FsckReport,
    replicas: list[Path],
    wanted: int,
    progress: ProgressFn | None = None,
    expect: CopyExpectation | None = None,
    known: Mapping[Path, str] | None = None,
) -> CopyChoice:
    """Blocking, before the working copy exists: inspect every replica file
    in `replicas` (paths that do not exist are skipped) as a mount does
    (`ecfs.storage.replicas.inspect_copy`: schema, volume, stores, content against
    its recorded digest) with read-only connections, and choose the copy
    to check by the mount's rule (`choose_copy`). Nothing is changed.

    Every refused copy is an error naming why; so is a stale copy, and no
    choice at all (copies disagree with no majority). The findings it adds
    are fixed by the write-back of `ecfs.volume.fsck` with --repair (which marks
    them fixed). `known`: copies already found unusable -> why (an object
    copy that could not be rebuilt, see `ecfs.storage.metaobjects`).
    """
    check = "replicas_agree"
    existing = [p for p in replicas if p.exists() or (known and p in known)]
    inspections = []
    for n, path in enumerate(existing):
        if progress is not None:
            progress("replicas", n, len(existing))
        inspections.append(inspect_known(path, expect, known))
    if progress is not None:
        progress("replicas", len(existing), len(existing))
    report.counts["replicas"] = len(existing)
    choice = choose_copy(inspections)
    for path, why in choice.refused.items():
        report.add(check, f"metadata replica {path} is refused: {why}")
    winner = choice.winner
    if winner is None:
        if existing:
            report.add(check, f"no metadata replica can be trusted: {choice.problem}")
        return choice
    by_path = {i.path: i for i in inspections}
    for path in choice.stale:
        report.add(
            check,
            f"metadata replica {path} is stale: generation {by_path[path].generation}"
            f" (schema {by_path[path].schema}), the chosen one ({winner.path}) is at"
            f" {winner.generation}",
        )
    usable = len(choice.current) + len(choice.stale)
    if usable < wanted:
        report.add(
            check,
            f"only {usable} usable metadata replica(s); the volume needs {wanted}"
            " to survive the loss of m stores",
        )
    return choice


# --------------------------------------------------------------------------
# 2. namespace_consistent


def check_namespace_consistent(ctx: FsckContext) -> None:
    """Directory entries, link counts, reachability and the rows hanging off
    inodes. With repair: remove entries to missing inodes or in
    non-directories, free inodes with no links, link unreachable inodes
    into /lost+found, correct link counts, drop rows of missing or wrong
    inodes, clear or trim bad inline data."""
    check = "namespace_consistent"
    db, report, fix = ctx.db, ctx.report, ctx.repair
    inodes = InodeTable(db)
    chunks = ChunkTable(db)
    ctx.tick("namespace", 0, 6)

    for parent, name, ino in inodes.entries_to_missing_inodes():
        if not ctx.in_scope(parent):
            continue
        where = _entry_name(inodes, parent, name)
        if fix:
            with db.transaction():
                inodes.remove_entry(parent, name)
        report.add(check, f"entry {where} refers to missing inode {ino}", fixed=fix)
    for parent, name, ino in inodes.entries_in_non_directories():
        if not ctx.in_scope(parent):
            continue
        if fix:
            with db.transaction():
                inodes.remove_entry(parent, name)
        report.add(
            check,
            f"entry {os.fsdecode(name)!r} (inode {ino}) is in inode {parent},"
            " which is missing or not a directory",
            fixed=fix,
        )
    ctx.tick("namespace", 1, 6)

    # Inodes left with no link by a crash while they were open.
    reported: set[int] = set()
    for ino, _mode, nlink, entries, _subdirs in inodes.link_census():
        if ctx.scope is not None:
            break  # an inode with no entry is below no directory
        if nlink == 0 and entries == 0 and ino != ROOT_INODE:
            if fix:
                with db.transaction():
                    chunks.remove_from(ino, 0)
                    inodes.delete(ino)
                report.counts["inodes_freed"] += 1
            reported.add(ino)
            report.add(
                check,
                f"inode {ino} has no links (unlinked while open before a crash)"
                + (": freed" if fix else ""),
                fixed=fix,
            )
    ctx.tick("namespace", 2, 6)

    silent = _check_reachability(ctx, inodes, reported) if ctx.scope is None else set()
    ctx.tick("namespace", 3, 6)

    for ino, mode, nlink, entries, subdirs in inodes.link_census():
        if ino in reported or not ctx.in_scope(ino):
            continue
        is_dir = stat.S_ISDIR(mode)
        expected = 2 + subdirs if is_dir else entries
        if nlink == expected:
            continue
        if fix:
            with db.transaction():
                inodes.set_nlink(ino, expected)
        if ino not in silent:
            report.add(
                check,
                f"{ctx.describe_inode(ino)} has link count {nlink}, but"
                + (
                    f" {subdirs} subdirectories (expected {expected})"
                    if is_dir
                    else f" {entries} directory entries"
                ),
                fixed=fix,
            )
    ctx.tick("namespace", 4, 6)

    for ino in inodes.stray_symlinks() if ctx.scope is None else ():
        if fix:
            with db.transaction():
                inodes.delete_symlink(ino)
        report.add(
            check,
            f"symlink target stored for inode {ino}, which is missing or not a symlink",
            fixed=fix,
        )
    for ino in inodes.symlinks_without_target():
        if not ctx.in_scope(ino):
            continue
        report.add(check, f"symlink {ctx.describe_inode(ino)} has no target")
    for ino in inodes.stray_xattr_owners() if ctx.scope is None else ():
        if fix:
            with db.transaction():
                inodes.delete_xattrs(ino)
        report.add(check, f"extended attributes stored for missing inode {ino}", fixed=fix)
    ctx.tick("namespace", 5, 6)

    reasons = {
        "no-inode": "the inode does not exist",
        "not-a-file": "the inode is not a regular file",
        "beyond-size": "it starts at or beyond the end of the file",
    }
    for ino, idx, ref, reason in chunks.misplaced(ctx.layout.chunk_size):
        if not ctx.in_scope(ino):
            continue
        if fix:
            with db.transaction():
                chunks.remove(ino, idx)
        report.add(
            check,
            f"chunk {ref.chunk_id:016x} (index {idx} of inode {ino}): {reasons[reason]}"
            + ("; removed (its fragments are now orphans)" if fix else ""),
            fixed=fix,
        )
    for ino, mode, size, length in inodes.bad_inline_data():
        if not ctx.in_scope(ino):
            continue
        regular = stat.S_ISREG(mode)
        if fix:
            with db.transaction():
                inodes.set_inline_data(ino, _trimmed_inline(inodes, ino, size) if regular else None)
        problem = (
            f"{length} bytes of inline data but the file is {size} bytes"
            if regular
            else f"inline data ({length} bytes) but it is not a regular file"
        )
        report.add(check, f"{ctx.describe_inode(ino)} has {problem}", fixed=fix)
    report.counts["inodes"] = inodes.count() if ctx.scope is None else len(ctx.scope)
    ctx.tick("namespace", 6, 6)


def _check_reachability(ctx: FsckContext, inodes: InodeTable, reported: set[int]) -> set[int]:
    """Report inodes no path from the root reaches; with repair, link the
    ones without any entry into /lost+found. Adds them to `reported`;
    returns inodes whose link count may change silently as a consequence
    (the root, lost+found, the linked inodes)."""
    check = "namespace_consistent"
    db, report, fix = ctx.db, ctx.report, ctx.repair
    census = {row[0]: row for row in inodes.link_census()}
    unreachable = [ino for ino in inodes.unreachable(ROOT_INODE) if ino not in reported]
    detached = [ino for ino in unreachable if census[ino][3] == 0]
    silent: set[int] = set()
    if detached and fix:
        lost = _lost_and_found(ctx, inodes)
        if lost is None:
            fix = False
        else:
            silent.update({ROOT_INODE, lost, *detached})
            with db.transaction():
                for ino in detached:
                    inodes.add_entry(lost, b"inode-%d" % ino, ino)
    for ino in detached:
        reported.add(ino)
        report.add(
            check,
            f"inode {ino} has no directory entry (link count {census[ino][2]})"
            + (f": linked as /{LOST_AND_FOUND.decode()}/inode-{ino}" if fix else ""),
            fixed=fix,
        )
    # What is still unreachable now (after linking, if repairing) sits in a
    # directory cycle or under a directory that is itself unreachable.
    remaining = [ino for ino in inodes.unreachable(ROOT_INODE) if ino not in reported]
    if remaining and (fix or not detached):
        reported.update(remaining)
        shown = ", ".join(str(i) for i in remaining[:EXAMPLES])
        report.add(
            check,
            f"{len(remaining)} inode(s) are not reachable from the root (directory"
            f" cycle?): {shown}{' ...' if len(remaining) > EXAMPLES else ''}",
        )
    return silent


def _lost_and_found(ctx: FsckContext, inodes: InodeTable) -> int | None:
    """The inode of /lost+found, created if needed; None (reported) if the
    name is taken by something that is not a directory."""
    existing = inodes.find(ROOT_INODE, LOST_AND_FOUND)
    if existing is not None:
        row = inodes.get(existing)
        if row is not None and stat.S_ISDIR(row[1]):
            return existing
        ctx.report.add(
            "namespace_consistent",
            "/lost+found exists but is not a directory: cannot link unreachable inodes",
        )
        return None
    root = inodes.get(ROOT_INODE)
    uid, gid = (root[2], root[3]) if root is not None else (0, 0)
    now = time.time_ns()
    ino = ctx.db.next_id("inode")
    with ctx.db.transaction():
        inodes.insert((ino, stat.S_IFDIR | 0o700, uid, gid, 2, 0, now, now, now, 0))
        inodes.add_entry(ROOT_INODE, LOST_AND_FOUND, ino)
    return ino


def _entry_name(inodes: InodeTable, parent: int, name: bytes) -> str:
    paths = inodes.paths_of(parent, ROOT_INODE, limit=1)
    if not paths:
        return f"{os.fsdecode(name)!r} in inode {parent}"
    return os.fsdecode(paths[0].rstrip(b"/") + b"/" + name)


def _trimmed_inline(inodes: InodeTable, ino: int, size: int) -> bytes | None:
    _, data = inodes.inline_data(ino)
    return (data[:size] or None) if data is not None else None


# --------------------------------------------------------------------------
# 3. repair_queue_valid


def check_repair_queue_valid(ctx: FsckContext) -> None:
    """Repair-queue entries must name existing chunks; repair deletes the rest."""
    queue = RepairQueue(ctx.db)
    for chunk_id in queue.dangling():
        if ctx.repair:
            with ctx.db.transaction():
                queue.remove(chunk_id)
        ctx.report.add(
            "repair_queue_valid",
            f"repair queue entry for chunk {chunk_id:016x}, which does not exist",
            fixed=ctx.repair,
        )


def check_write_log_valid(ctx: FsckContext) -> None:
    """The small-write log (`ecfs.data.logfiles`): every record copy on the
    stores is read and its checksum verified (a torn or damaged copy is
    never applied: a warning, since a crash leaves one behind); a record
    is live when the chunk version it applies over is the current one, and
    each live record must have m+1 copies on distinct present stores that
    hold log segments (repair writes the missing copies; object stores
    hold none). Rows left in the schema-2 table
    must match their checksum and apply over the current version; repair
    deletes the ones that do not (a bad record is never applied: its bytes
    are lost either way)."""
    chunks = ChunkTable(ctx.db)
    scan = LogFiles.scan(ctx.stores, ctx.volume_id)
    for index, why in scan.unreadable.items():
        ctx.report.add("write_log_valid", f"store {index}: small-write log unreadable: {why}")
    if scan.bad_blocks:
        ctx.report.add(
            "write_log_valid",
            f"{scan.bad_blocks} blocks of the small-write log hold torn or damaged record"
            " copies (never applied)",
            severity="warning",
        )
    live: dict[int, tuple[Record, set[int]]] = {}
    current: dict[tuple[int, int], int] = {}
    for store, _segment, _pos, record in scan.copies:
        key = (record.inode, record.idx)
        if key not in current:
            ref = chunks.get(*key)
            current[key] = 0 if ref is None else ref.chunk_id
        if current[key] != record.chunk_id:
            continue  # folded, rewritten or removed since: dead, never applied
        live.setdefault(record.seq, (record, set()))[1].add(store)
    want = min(ctx.layout.m + 1, len(log_stores(ctx.stores)))
    short = {seq: rs for seq, rs in live.items() if len(rs[1]) < want}
    for seq, (record, holders) in sorted(short.items()):
        ctx.report.add(
            "write_log_valid",
            f"log record {seq} of {ctx.describe_inode(record.inode)} chunk {record.idx} has"
            f" {len(holders)} of {want} copies",
            fixed=ctx.repair and _copy_records(ctx, [record], holders, want),
        )
    table = WriteLogTable(ctx.db)
    bad: list[int] = []
    heads = table.heads()
    ctx.report.counts["write_log_records"] = len(heads) + len(live)
    for seq, inode, idx, chunk_id, offset, length, checksum in heads:
        ref = chunks.get(inode, idx)
        where = f"log record {seq} of {ctx.describe_inode(inode)} chunk {idx}"
        problem = None
        if ref is None:
            problem = f"{where} applies over chunk {chunk_id:016x}, which no longer exists"
        elif ref.chunk_id != chunk_id:
            problem = f"{where} is older than its chunk's version ({chunk_id:016x} is not the current {ref.chunk_id:016x})"
        else:
            _, data = table.data([seq])[seq]
            if legacy_checksum(inode, idx, chunk_id, seq, offset, data) != checksum:
                problem = f"{where} (bytes [{offset}, {offset + length})) fails its checksum"
        if problem is not None:
            bad.append(seq)
            ctx.report.add("write_log_valid", problem, fixed=ctx.repair)
    if bad and ctx.repair:
        with ctx.db.transaction():
            table.delete(bad)


def _copy_records(ctx: FsckContext, records: list[Record], holders: set[int], want: int) -> bool:
    """Write copies of `records` to present stores that lack one, in a new
    segment each, until `want` stores hold them; whether that succeeded."""
    blob = padded(b"".join(encode_record(r, ctx.volume_id) for r in records))
    have = set(holders)
    for index, store in sorted(log_stores(ctx.stores).items()):
        if len(have) >= want:
            break
        if index in have:
            continue
        try:
            number = max(store.log_segments(), default=0) + 1
            store.create_log_segment(number, max(SEGMENT_SIZE, len(blob)))
            store.write_log_segment(number, 0, blob)
        except StoreError as exc:
            log.warning("store %d: cannot write a log record copy: %s", index, exc)
            continue
        have.add(index)
    return len(have) >= want


# --------------------------------------------------------------------------
# 4. chunk_fragments_present


@dataclass
class _ChunkState:
    """What checking one chunk found. `good` maps index -> verified payload
    (None if only the header and size were checked); `bad` index -> why."""

    good: dict[int, bytes | None] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)
    unavailable: set[int] = field(default_factory=set)


def check_chunk_fragments_present(ctx: FsckContext) -> None:
    """Every fragment slot of every chunk: recorded on a store, present on
    it, header matching the chunk, file size matching the header; with
    verify_data every cell checksum too. Fragments on a missing store are
    not checked (one finding per missing store). With repair, each bad or
    missing fragment is rebuilt from k good ones; with fewer than k, the
    file range is reported as unrecoverable."""
    layout = ctx.layout
    codec = Codec(layout.k, layout.m)
    expected = Expected(ctx.volume_id, layout.k, layout.m, layout.cell_size)
    table = ChunkTable(ctx.db)
    if ctx.scope is None:
        all_chunks = list(table.iter_all())
    else:
        all_chunks = [
            (ino, idx, ref) for ino in sorted(ctx.scope) for idx, ref in table.of_inode(ino)
        ]
    on_missing_store: Counter[int] = Counter()
    total = len(all_chunks)
    placement = _placement(ctx) if ctx.repair else None
    classes = _policy_placement(ctx, {i: _Present(True) for i in ctx.stores})
    wrong_class: dict[int, int] = {}  # chunk id -> fragments on the wrong class
    shared_domain: dict[int, int] = {}  # chunk id -> fragments in a shared domain
    for n, (ino, idx, ref) in enumerate(all_chunks):
        ctx.tick("chunks", n, total)
        _check_chunk(ctx, codec, expected, placement, ino, idx, ref, on_missing_store)
        chunk_layout = _layout_of(ctx.layout, ref)
        wrong = [] if chunk_layout is None else classes.wrong_class(ref.stores, chunk_layout.k)
        if wrong:
            wrong_class[ref.chunk_id] = len(wrong)
        elif shared := classes.shared_domain(ref.stores):
            shared_domain[ref.chunk_id] = len(shared)
    ctx.tick("chunks", total, total)
    ctx.report.counts["chunks"] = total
    if wrong_class:
        _report_wrong_class(ctx, wrong_class)
    if shared_domain:
        _report_wrong_class(ctx, shared_domain, "shared-domain")
    for index in sorted(set(ctx.store_ids) - set(ctx.stores)):
        ctx.report.add(
            "chunk_fragments_present",
            f"store {index} ({ctx.store_ids[index]}) is missing: its"
            f" {on_missing_store[index]} fragment(s) were not checked (give every store,"
            " or replace the lost one)",
        )


def _check_chunk(
    ctx: FsckContext,
    codec: Codec,
    expected: Expected,
    placement: Placement | None,
    ino: int,
    idx: int,
    ref: ChunkRef,
    on_missing_store: Counter[int],
) -> None:
    check = "chunk_fragments_present"
    start = idx * ctx.layout.chunk_size

    def where() -> str:
        return (
            f"chunk {ref.chunk_id:016x} of {ctx.describe_inode(ino)}"
            f" bytes [{start}, {start + ref.length})"
        )

    layout = _layout_of(ctx.layout, ref)
    if layout is None or not 0 < ref.length <= layout.chunk_size or len(ref.stores) != layout.n:
        coding = f"k = {ref.k}" if layout is None else f"k + m = {layout.n}"
        ctx.report.add(
            check,
            f"{where()}: malformed chunk row (length {ref.length},"
            f" {len(ref.stores)} fragment slots for {coding})",
        )
        return
    if ref.k:  # a chunk of its own coding (a redundancy policy)
        codec = codec.for_layout(layout)
        expected = expected.of(ref)
    payload_length = layout.payload_length(ref.length)
    state = _ChunkState()
    for index, store_index in enumerate(ref.stores):
        if store_index == NO_STORE:
            state.bad[index] = "not stored (reduced redundancy)"
        elif store_index not in ctx.store_ids:
            state.bad[index] = f"recorded on store {store_index}, which is not in the volume"
        elif store_index not in ctx.stores:
            state.unavailable.add(index)
            on_missing_store[store_index] += 1
        else:
            problem, payload = _verify_fragment(
                ctx, ctx.stores[store_index], ref.chunk_id, index, payload_length, expected,
                full=ctx.verify_data,
            )  # fmt: skip
            if problem is None:
                state.good[index] = payload
            else:
                state.bad[index] = f"on store {store_index}: {problem}"
    if not state.bad:
        return
    payloads: dict[int, bytes] | None = None
    if len(state.good) >= layout.k and ctx.repair:
        payloads = _gather_payloads(ctx, expected, ref, payload_length, state)
    if len(state.good) < layout.k:
        _report_unrecoverable(ctx, ino, idx, ref, state, where())
        return
    fixed = False
    notes = ""
    severity: Severity = "error"
    if _queued_for_repair(ctx, ref, state):
        # Known damage the mount repairs by itself (e.g. written with
        # reduced redundancy while a store was full): not an error.
        severity = "warning"
        notes = "; queued for repair"
    if placement is not None and payloads is not None:
        failures = _rebuild(ctx, codec, expected, placement, ref, payloads, state)
        fixed = not failures
        notes += "; rebuilt" if fixed else "; NOT rebuilt: " + "; ".join(failures)
    details = "; ".join(f"fragment {i} {why}" for i, why in sorted(state.bad.items()))
    ctx.report.add(check, f"{where()}: {details}{notes}", severity=severity, fixed=fixed)


def _layout_of(layout: Layout, ref: ChunkRef) -> Layout | None:
    """The layout of chunk `ref` (its own coding), None if its row's k
    makes no coding (k' outside 1..MAX_K, or no parity fragment)."""
    try:
        return layout.of(ref)
    except ValueError:
        return None


def _report_wrong_class(
    ctx: FsckContext, wrong_class: dict[int, int], reason: str = "wrong-class"
) -> None:
    """A warning for the fragments on a store of the wrong class (hybrid
    placement), or in a failure domain holding another fragment of their
    chunk (`reason` 'shared-domain'); with repair, their chunks are queued
    (`reason`) for the mount's repairer, which moves them to a store of
    their class, or of an unused domain."""
    fragments = sum(wrong_class.values())
    ctx.report.counts[f"fragments_{reason.replace('-', '_')}"] = fragments
    where = "a store of their class" if reason == "wrong-class" else "an unused domain"
    note = f"the mount's repair moves them when {where} can take them"
    if ctx.repair:
        queue = RepairQueue(ctx.db)
        priority = repair_priority(ctx.layout.m, reason)
        now = time.time_ns()
        with ctx.db.transaction():
            for chunk_id in wrong_class:
                queue.add(chunk_id, reason, priority, now, bad=0, demand=0)
        note = "queued for the mount's repair, which moves them"
    what = (
        "are on a store of the wrong class for hybrid placement (a data fragment on a remote"
        " store or parity on a local one)"
        if reason == "wrong-class"
        else "share a failure domain with another fragment of their chunk while a store is in"
        " a domain holding none (losing that domain costs the chunk two fragments)"
    )
    ctx.report.add(
        "chunk_fragments_present",
        f"{fragments} fragment(s) of {len(wrong_class)} chunk(s) {what}; {note}",
        severity="warning",
        fixed=ctx.repair,
    )


def _queued_for_repair(ctx: FsckContext, ref: ChunkRef, state: _ChunkState) -> bool:
    """Whether every bad fragment of a recoverable chunk is already known to
    the persistent repair queue (its bad mask, or a slot without a store)."""
    mask = RepairQueue(ctx.db).bad_mask(ref.chunk_id)
    if mask is None:
        return False
    known = {i for i, s in enumerate(ref.stores) if s == NO_STORE or mask >> i & 1}
    return set(state.bad) <= known


def _verify_fragment(
    ctx: FsckContext,
    store: Store,
    chunk_id: int,
    index: int,
    payload_length: int,
    expected: Expected,
    *,
    full: bool,
    count: bool = True,
) -> tuple[str | None, bytes | None]:
    """(problem or None, payload if `full` and good) of one fragment file;
    with `count`, counted in the report's fragments_checked and bytes_verified."""
    try:
        header, _ = read_header(store, chunk_id, index, expected)
        size = store.fragment_size_on_disk(chunk_id, index)
    except FragmentMissing:
        return "missing", None
    except FragmentCorrupt as exc:
        return f"bad header ({exc})", None
    except BadFragmentEntry as exc:
        return f"not a fragment file ({exc})", None
    except StoreError as exc:
        return f"unreadable ({exc})", None
    if count:
        ctx.report.counts["fragments_checked"] += 1
    try:
        if header.payload_length != payload_length:
            return (
                f"header says payload length {header.payload_length},"
                f" the chunk needs {payload_length}"
            ), None
        if size != header.file_size:
            return f"file is {size} bytes, its header says {header.file_size}", None
        if not full:
            return None, None
        buf = bytearray(payload_length)
        got = store.read_fragment(chunk_id, index, header.payload_offset, memoryview(buf))
        payload = bytes(buf) if got == payload_length else bytes(buf[:got])
        if len(payload) != payload_length:
            return f"short read ({len(payload)} of {payload_length} payload bytes)", None
        if count:
            ctx.report.counts["bytes_verified"] += payload_length
        bad = fragment.bad_cells(header, 0, payload)
        if bad:
            shown = ", ".join(str(c) for c in bad[:EXAMPLES])
            return f"checksum mismatch in {len(bad)} cell(s): {shown}", None
        return None, payload
    except (StoreError, FragmentCorrupt, OSError) as exc:
        return f"unreadable ({exc})", None


def _gather_payloads(
    ctx: FsckContext,
    expected: Expected,
    ref: ChunkRef,
    payload_length: int,
    state: _ChunkState,
) -> dict[int, bytes]:
    """k fully verified payloads of good fragments (data fragments first);
    a good fragment that fails the full check moves to `state.bad`."""
    payloads: dict[int, bytes] = {}
    for index in sorted(state.good):
        if len(payloads) == ctx.layout.of(ref).k:
            break
        payload = state.good[index]
        if payload is None:
            store_index = ref.stores[index]
            problem, payload = _verify_fragment(
                ctx, ctx.stores[store_index], ref.chunk_id, index, payload_length, expected,
                full=True,
            )  # fmt: skip
            if problem is not None or payload is None:
                del state.good[index]
                state.bad[index] = f"on store {store_index}: {problem}"
                continue
        payloads[index] = payload
    return payloads


def _rebuild(
    ctx: FsckContext,
    codec: Codec,
    expected: Expected,
    placement: Placement,
    ref: ChunkRef,
    payloads: dict[int, bytes],
    state: _ChunkState,
) -> list[str]:
    """Rebuild the fragments in `state.bad` through the mount's repair path
    (`ecfs.data.rebuild.rebuild_fragments`, run here in a trio run of its own)
    and record their stores; the failures, described (empty: every one was
    rebuilt). What is not rebuilt is queued for the mount's repair."""
    done = trio.run(
        functools.partial(
            rebuild_fragments,
            ctx.db, ctx.layout, codec, ctx.volume_id, placement, _FsckStores(ctx, expected),
            ref, payloads, sorted(state.bad),
            reason="fsck", unchecked=len(state.unavailable),
        )  # fmt: skip
    )
    ctx.report.counts["fragments_rebuilt"] += len(done.rebuilt)
    return [f"fragment {i}: {why}" for i, why in sorted(done.failed.items())]


@dataclass(frozen=True)
class _Present:
    """A store as fsck's placement sees it (fsck has no store runners)."""

    available: bool


def _placement(ctx: FsckContext) -> Placement:
    """Placement over the present stores with their free space now; a store
    whose usage cannot be read takes no rebuilt fragment."""
    candidates: dict[int, _Present] = {}
    usage = {}
    for index, store in ctx.stores.items():
        try:
            usage[index] = store.usage()
        except StoreError:
            candidates[index] = _Present(False)
            continue
        candidates[index] = _Present(True)
    placement = _policy_placement(ctx, candidates)
    for index, found in usage.items():
        placement.update_usage(index, found)
    return placement


def _policy_placement(ctx: FsckContext, candidates: dict[int, _Present]) -> Placement:
    """Placement over `candidates` with the volume's policy; a store not
    present counts as local (see `ecfs.volume.assembly.Volume.is_remote`)."""
    params = StoreTable(ctx.db).params()
    policy = params.get(POLICY_KEY, SPREAD)
    stores = ctx.stores
    domains = resolve_stores(stores, labels_of(params, ctx.store_ids)) if candidates else {}
    return Placement(
        candidates,
        remote=lambda i: i in stores and stores[i].remote,
        policy=policy,
        k=ctx.layout.k,
        domain=lambda i: domains.get(i) or f"unknown:{i}",
    )


class _FsckStores:
    """fsck's way to the stores for `rebuild_fragments` (see
    `ecfs.data.rebuild.FragmentIO`): blocking calls on the present stores (fsck
    runs alone), every store written remembered in `ctx.touched` (synced
    before the write-back), what no metadata refers to deleted at once."""

    def __init__(self, ctx: FsckContext, expected: Expected) -> None:
        self.ctx = ctx
        self.expected = expected

    async def write_verified(
        self, store: int, ref: ChunkRef, index: int, parts: list[fragment.Buffer]
    ) -> int:
        target = self.ctx.stores[store]
        self.ctx.touched.add(store)
        target.delete_fragment(ref.chunk_id, index)  # fragment files are never overwritten
        written = target.write_fragment(ref.chunk_id, index, parts)
        payload_length = self.ctx.layout.of(ref).payload_length(ref.length)
        problem, _ = _verify_fragment(
            self.ctx, target, ref.chunk_id, index, payload_length, self.expected,
            full=True, count=False,
        )  # fmt: skip
        if problem is not None:
            raise FragmentCorrupt(f"fragment {index} read back: {problem}")
        return written

    def note_unsynced(self, store: int) -> None:
        self.ctx.touched.add(store)

    def remember(self, fragments: list[tuple[int, int, int]]) -> None:
        self._delete(fragments)

    def discard(self, refs: list[ChunkRef]) -> None:
        self._delete(
            [(s, ref.chunk_id, i) for ref in refs for i, s in enumerate(ref.stores) if s != NO_STORE]
        )

    def _delete(self, fragments: list[tuple[int, int, int]]) -> None:
        """Best effort: one left behind is an orphan, reported next run."""
        for store, chunk_id, index in fragments:
            if store not in self.ctx.stores:
                continue
            try:
                self.ctx.stores[store].delete_fragment(chunk_id, index)
            except StoreError as exc:
                log.warning("cannot delete fragment %016x.%d on store %d: %s",
                            chunk_id, index, store, exc)  # fmt: skip
            self.ctx.touched.add(store)


def _report_unrecoverable(
    ctx: FsckContext, ino: int, idx: int, ref: ChunkRef, state: _ChunkState, where: str
) -> None:
    start = idx * ctx.layout.chunk_size
    paths = tuple(os.fsdecode(p) for p in InodeTable(ctx.db).paths_of(ino, ROOT_INODE))
    ctx.report.unrecoverable.append(
        UnrecoverableRange(ino, paths, start, start + ref.length, ref.chunk_id)
    )
    details = "; ".join(f"fragment {i} {why}" for i, why in sorted(state.bad.items()))
    unavailable = f", {len(state.unavailable)} on missing stores" if state.unavailable else ""
    ctx.report.add(
        "chunk_fragments_present",
        f"{where}: UNRECOVERABLE, only {len(state.good)} good fragment(s) of the"
        f" {ctx.layout.of(ref).k} needed{unavailable}: {details}",
    )


# --------------------------------------------------------------------------
# 5. no_orphan_fragments


def check_no_orphan_fragments(ctx: FsckContext) -> None:
    """Every fragment file on a present store must be referred to by a chunk
    at that (store, chunk, index); repair deletes the others. Files under
    ``frags/`` that are not fragment files are warnings (never deleted)."""
    check = "no_orphan_fragments"
    referenced: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for _, _, ref in ChunkTable(ctx.db).iter_all():
        for index, store_index in enumerate(ref.stores):
            referenced[store_index].add((ref.chunk_id, index))
    total = len(ctx.stores)
    for n, (store_index, store) in enumerate(sorted(ctx.stores.items())):
        ctx.tick("orphans", n, total)
        try:
            found = store.list_fragments()
        except StoreError as exc:
            ctx.report.add(check, f"store {store_index}: cannot list fragments: {exc}")
            continue
        orphans = sorted(set(found) - referenced[store_index])
        if orphans:
            ctx.report.counts["orphan_fragments"] += len(orphans)
            failures = 0
            delete = ctx.repair and ctx.keep_orphans is None
            if delete:
                for chunk_id, index in orphans:
                    try:
                        store.delete_fragment(chunk_id, index)
                    except StoreError as exc:
                        log.warning("cannot delete orphan fragment: %s", exc)
                        failures += 1
                ctx.touched.add(store_index)
                ctx.report.counts["orphans_deleted"] += len(orphans) - failures
            shown = ", ".join(store.fragment_relpath(c, i) for c, i in orphans[:EXAMPLES])
            more = " ..." if len(orphans) > EXAMPLES else ""
            outcome = ""
            if delete:
                outcome = "; deleted" if not failures else f"; {failures} could not be deleted"
            elif ctx.repair:
                outcome = (
                    f"; not deleted: {ctx.keep_orphans} (run fsck --repair again once the"
                    " copies agree)"
                )
            # All of them remembered by the volume (left while the store was
            # away, or by a restripe cut short: ids of its intent, see
            # ecfs.data.restripe; the next mount deletes them): a warning.
            pending = PendingDeletions(ctx.db).of_store(store_index)
            intent = set(RestripeTable(ctx.db).intent())
            remembered = all(o in pending or o[0] in intent for o in orphans)
            ctx.report.add(
                check,
                f"store {store_index} ({store.path}): {len(orphans)} fragment file(s) no"
                f" chunk refers to: {shown}{more}{outcome}"
                + ("; left while the store was away or by a restripe cut short, the next"
                   " mount deletes them" if remembered else ""),
                severity="warning" if remembered else "error",
                fixed=delete and not failures,
            )  # fmt: skip
        stray = store.stray_entries(found)
        if stray:
            shown = ", ".join(stray[:EXAMPLES])
            ctx.report.add(
                check,
                f"store {store_index} ({store.path}): {len(stray)} file(s) under"
                f" {FRAGS_DIR}/ that are not fragments (left alone): {shown}"
                f"{' ...' if len(stray) > EXAMPLES else ''}",
                severity="warning",
            )
    ctx.tick("orphans", total, total)
