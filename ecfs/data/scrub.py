"""Online scrub: verify every cell of every fragment, oldest-verified first.

Owns: walking the chunks in order of `chunks.verified_ns`, reading each
present fragment whole (every cell checked against its checksum), queueing
what is missing or corrupt for repair (and, under hybrid placement, chunks
with a fragment on a store of the wrong class: 'wrong-class', and chunks
with two fragments in one failure domain while another domain is unused:
'shared-domain', both moved by the repairer), and recording progress. Must not:
repair anything itself (the repairer does), or hurt foreground I/O: like
repair, it yields to FUSE requests.

Metadata replicas: each pass first verifies every live metadata replica
online (`verify_metadata`, see `ecfs.storage.replicas.Replicator.verify_replicas`:
schema, and the rows against the content digest the replica records); a
bad replica is replaced from the working copy by the volume, which also
checks the working copy itself. The findings are in
`ScrubStatistics.metadata_findings` (store None: the working copy).

Events (`ecfs.core.events`): SCRUB_FINDING for each chunk with a
missing or corrupt fragment on an available store (a chunk whose only
bad fragments are on failed stores is a finding, but no event: the store
had its store-failed event, and a scrub must not send one per chunk), and
each bad metadata copy; SCRUB_FINISHED with the counts at the end of every
pass (stopped early or not), so that a hook can report once per scrub.

Pause (`ecfs repair --pause`, see `ecfs.data.background.BackgroundGate`):
the pass waits at the gate before each chunk (the chunk being verified is
finished); a scrub started while paused waits there too (the CLI says so
instead of waiting, see `ecfs scrub`).

Resumable and incremental: each verified chunk gets `verified_ns = now`
(committed every BATCH chunks), so a scrub that is stopped (max duration,
unmount, crash) continues next time with the chunks verified longest ago.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from ..core.errors import FragmentCorrupt, StoreError
from ..core.events import SCRUB_FINDING, SCRUB_FINISHED, EventSink
from ..core.geometry import Layout
from ..core.model import repair_priority
from ..core.tasks import wait_until_idle
from ..storage.metadb.chunks import ChunkTable, RepairQueue
from ..storage.metadb.database import Database
from ..storage.offload import StoreRunner, available_runner
from .background import BackgroundGate
from .reader import ChunkReader

log = logging.getLogger(__name__)

#: Chunks verified between two commits of their verified_ns.
BATCH = 64
#: Seconds without foreground requests before the next chunk is scrubbed.
IDLE_GAP = 0.05
MAX_STARVATION = 2.0


#: Findings a status snapshot lists (the count is always complete).
FINDINGS_SHOWN = 1000


@dataclass(frozen=True, slots=True)
class ScrubFinding:
    """A chunk with missing or corrupt fragments (queued for repair)."""

    chunk_id: int
    inode: int
    chunk_index: int
    fragments: tuple[int, ...]  # fragment indices found bad
    reasons: tuple[str, ...]  # "INDEX: why", one per bad fragment


@dataclass(frozen=True, slots=True)
class MetadataFinding:
    """A metadata copy that failed verification (store None: the working copy)."""

    store: int | None
    problem: str


@dataclass(frozen=True, slots=True)
class ScrubStatistics:
    """A snapshot of the current or last pass (from `Scrubber.statistics()`);
    `findings` holds the first FINDINGS_SHOWN of `finding_count`."""

    running: bool
    started_ns: int
    finished_ns: int
    chunks_total: int
    chunks_done: int
    fragments_verified: int
    bytes_verified: int
    findings: tuple[ScrubFinding, ...]
    finding_count: int
    stopped_early: bool
    metadata_replicas_verified: int
    metadata_findings: tuple[MetadataFinding, ...]


@dataclass(slots=True)
class ScrubProgress:
    running: bool = False
    started_ns: int = 0
    finished_ns: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    fragments_verified: int = 0
    bytes_verified: int = 0
    findings: list[ScrubFinding] = field(default_factory=list)
    stopped_early: bool = False
    metadata_replicas_verified: int = 0
    metadata_findings: list[MetadataFinding] = field(default_factory=list)


class Scrubber:
    """Runs one scrub pass at a time."""

    def __init__(
        self,
        db: Database,
        layout: Layout,
        reader: ChunkReader,
        runners: Mapping[int, StoreRunner],
        last_foreground: Callable[[], float],
        on_queued: Callable[[], None],
        verify_metadata: Callable[[], Awaitable[dict[int | None, str]]] | None = None,
        replica_count: Callable[[], int] = lambda: 0,
        wrong_class: Callable[[Sequence[int], int], list[int]] = lambda stores, k: [],
        gate: BackgroundGate | None = None,
        misplaced_reason: Callable[[Sequence[int], int], str] = lambda stores, k: "wrong-class",
    ) -> None:
        """`verify_metadata()` verifies the live metadata replicas (and
        replaces bad ones) and the working copy (store index, None for the
        working copy -> problem); `replica_count()` is how many replicas it
        looks at; `wrong_class(stores, k)`: the fragments of a chunk to move
        (`ecfs.data.placement.Placement.misplaced`: a store of the wrong
        class, a shared failure domain) and `misplaced_reason(stores, k)` the
        repair reason for them; `gate`: the volume's pause switch."""
        self.db = db
        self.gate = gate if gate is not None else BackgroundGate()
        self.wrong_class = wrong_class
        self.misplaced_reason = misplaced_reason
        self.verify_metadata = verify_metadata
        self.replica_count = replica_count
        self.chunks = ChunkTable(db)
        self.queue = RepairQueue(db)
        self.layout = layout
        self.reader = reader
        self.runners = runners
        self.last_foreground = last_foreground
        self.on_queued = on_queued
        self.progress = ScrubProgress()
        self._cancel: trio.CancelScope | None = None
        #: Where findings and the end of a pass are reported (events).
        self.events = EventSink()
        #: Inode -> its paths for a message (set by the volume).
        self.paths_of: Callable[[int], str] = lambda ino: ""

    def statistics(self) -> ScrubStatistics:
        progress = self.progress
        return ScrubStatistics(
            running=progress.running,
            started_ns=progress.started_ns,
            finished_ns=progress.finished_ns,
            chunks_total=progress.chunks_total,
            chunks_done=progress.chunks_done,
            fragments_verified=progress.fragments_verified,
            bytes_verified=progress.bytes_verified,
            findings=tuple(progress.findings[:FINDINGS_SHOWN]),
            finding_count=len(progress.findings),
            stopped_early=progress.stopped_early,
            metadata_replicas_verified=progress.metadata_replicas_verified,
            metadata_findings=tuple(progress.metadata_findings),
        )

    def stop(self) -> None:
        if self._cancel is not None:
            self.progress.stopped_early = True
            self._cancel.cancel()

    async def run(self, max_duration: float | None = None) -> ScrubProgress:
        """One pass over every chunk (or until max_duration seconds)."""
        if self.progress.running:
            return self.progress
        self.progress = progress = ScrubProgress(
            running=True,
            started_ns=time.time_ns(),
            chunks_total=self.chunks.count(),
        )
        start_ns = progress.started_ns
        try:
            with trio.CancelScope() as self._cancel:
                if max_duration is not None:
                    self._cancel.deadline = trio.current_time() + max_duration
                await self.gate.wait_running()
                await self._verify_metadata()
                await self._pass(start_ns)
        finally:  # also after a bug: a scrub that ended never shows "running"
            self._cancel = None
            progress.stopped_early = progress.chunks_done < progress.chunks_total
            progress.running = False
            progress.finished_ns = time.time_ns()
        self.events.emit(
            SCRUB_FINISHED,
            f"{progress.chunks_done} of {progress.chunks_total} chunks verified,"
            f" {len(progress.findings)} findings, {len(progress.metadata_findings)} in metadata"
            + (" (stopped early)" if progress.stopped_early else ""),
            chunks_verified=progress.chunks_done, chunks_total=progress.chunks_total,
            findings=len(progress.findings), metadata_findings=len(progress.metadata_findings),
            stopped_early=progress.stopped_early,
        )  # fmt: skip
        return progress

    async def _pass(self, start_ns: int) -> None:
        cursor = (-1, -1)
        done: list[int] = []
        try:
            while True:
                rows = self.chunks.least_recently_verified(cursor, 256)
                rows = [r for r in rows if r[0] < start_ns]
                if not rows:
                    break
                for verified_ns, chunk_id in rows:
                    cursor = (verified_ns, chunk_id)
                    await self.gate.wait_running()
                    await self._pace()
                    await self._verify_chunk(chunk_id)
                    done.append(chunk_id)
                    self.progress.chunks_done += 1
                    if len(done) >= BATCH:
                        self._commit(done)
        finally:
            self._commit(done)  # synchronous: runs even when cancelled

    async def _verify_metadata(self) -> None:
        if self.verify_metadata is None:
            return
        count = self.replica_count()
        problems = await self.verify_metadata()
        bad_replicas = [index for index in problems if index is not None]
        self.progress.metadata_replicas_verified = count - len(bad_replicas)
        for index in sorted(problems, key=lambda i: -1 if i is None else i):
            self.progress.metadata_findings.append(MetadataFinding(index, problems[index]))
            where = "the working copy" if index is None else f"the copy on store {index}"
            self.events.emit(
                SCRUB_FINDING, f"metadata: {where}: {problems[index]}",
                reason=problems[index], store="" if index is None else index,
            )  # fmt: skip

    def _commit(self, done: list[int]) -> None:
        if done:
            with self.db.transaction():
                self.chunks.mark_verified(done, time.time_ns())
            done.clear()

    async def _pace(self) -> None:
        await wait_until_idle(self.last_foreground, IDLE_GAP, MAX_STARVATION)

    async def _verify_chunk(self, chunk_id: int) -> None:
        found = self.chunks.by_id(chunk_id)
        if found is None:
            return
        inode, idx, ref = found
        layout = self.layout.of(ref)
        payload = layout.payload_length(ref.length)
        bad: list[int] = []
        unavailable: list[int] = []
        reasons: list[str] = []
        for index, store in enumerate(ref.stores):
            if available_runner(self.runners, store) is None:
                bad.append(index)
                unavailable.append(index)
                reasons.append(f"{index}: store unavailable")
                continue
            try:
                await self.reader.read_fragment(ref, index, 0, payload)
            except (StoreError, FragmentCorrupt) as exc:
                bad.append(index)
                reasons.append(f"{index}: {exc}")
                continue
            self.progress.fragments_verified += 1
            self.progress.bytes_verified += payload
        if not bad:
            if self.wrong_class(ref.stores, layout.k) and not self.queue.contains(chunk_id):
                why = self.misplaced_reason(ref.stores, layout.k)
                with self.db.transaction():
                    self.queue.add(
                        chunk_id, why, repair_priority(layout.m, why),
                        time.time_ns(), bad=0, demand=0,
                    )  # fmt: skip
                self.on_queued()
            return
        self.progress.findings.append(
            ScrubFinding(chunk_id, inode, idx, tuple(bad), tuple(reasons))
        )
        if len(unavailable) < len(bad):  # a failed store had its own event, not one per chunk
            path = self.paths_of(inode)
            offset = idx * self.layout.chunk_size
            self.events.emit(
                SCRUB_FINDING,
                f"chunk {chunk_id:016x} of {path or 'an unlinked file'} (inode {inode}, offset"
                f" {offset}): fragments {bad} bad, queued for repair ({'; '.join(reasons)})",
                chunk=f"{chunk_id:016x}", inode=inode, path=path, offset=offset,
                fragments=",".join(map(str, bad)), reason="; ".join(reasons),
            )  # fmt: skip
        spare = layout.n - len(bad) - layout.k
        with self.db.transaction():
            self.queue.add(
                chunk_id, "scrub", repair_priority(spare, "scrub"), time.time_ns(),
                bad=sum(1 << i for i in bad), demand=0,
            )
        self.on_queued()
