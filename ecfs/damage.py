"""Recording damage found by reads: the repair queue, and one log line.

Owns: turning "these fragments of this chunk could not be read" into a
repair-queue entry (demand raises its priority) and a single log line per
chunk. Must not: repair anything (see the repair task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .metadb.chunks import ChunkTable, RepairQueue
from .metadb.database import Database
from .model import ChunkRef, repair_priority

log = logging.getLogger(__name__)


class DamageRecorder:
    """The reader's `on_damage` callback."""

    def __init__(
        self, db: Database, k: int, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.db = db
        self.queue = RepairQueue(db)
        self.chunks = ChunkTable(db)
        self.k = k
        self.clock_ns = clock_ns
        self._logged: set[int] = set()
        #: Called after a chunk was queued (wakes the repairer).
        self.on_queued: Callable[[], None] = lambda: None

    def record(self, ref: ChunkRef, bad: list[int], reason: str) -> None:
        """Queue `ref` for repair, with the bad fragments and a priority
        from the spare fragments left (see model.repair_priority)."""
        if self.chunks.by_id(ref.chunk_id) is None:
            return  # replaced meanwhile: nothing to repair
        good = len(set(ref.present()) - set(bad))
        mask = 0
        for index in bad:
            mask |= 1 << index
        with self.db.transaction():
            self.queue.add(
                ref.chunk_id,
                "degraded-read",
                repair_priority(good - self.k, "degraded-read"),
                self.clock_ns(),
                bad=mask,
            )
        self.on_queued()
        if ref.chunk_id not in self._logged:
            self._logged.add(ref.chunk_id)
            log.warning(
                "chunk %016x: fragments %s unreadable (%s); queued for repair",
                ref.chunk_id,
                sorted(set(bad)),
                reason,
            )
