"""Recording damage found by reads: the repair queue, and the log.

Owns: turning "these fragments of this chunk could not be read" into a
repair-queue entry (demand raises its priority) and the log of it: one
line per damaged chunk, except for fragments on a store that is
unavailable (STORE_UNAVAILABLE: failed, or missing at mount), whose
chunks are summed up per store, one line at the first and then at most
one per UNAVAILABLE_LOG_INTERVAL (the store's failure has its own event;
a line per chunk would be 256 lines per GiB read). Must not: repair
anything (see the repair task).

Cost: with a store gone, every read of one of its fragments is degraded,
so recording must not cost a replicated transaction each time. Damage
already queued (same chunk, no new bad fragment, entry still in the queue)
only adds to an in-memory demand count, written every DEMAND_BATCH reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..core.model import ChunkRef, repair_priority
from ..storage.metadb.chunks import ChunkTable, RepairQueue
from ..storage.metadb.database import Database

log = logging.getLogger(__name__)

#: Repeated degraded reads of a queued chunk counted before its demand is written.
DEMAND_BATCH = 32
#: Chunks remembered as queued (or logged) before that memory starts over.
QUEUED_MASKS_MAX = 100_000
#: The reason a reader gives for fragments on a store that is unavailable.
STORE_UNAVAILABLE = "store unavailable"
#: Seconds between two log lines summing up the chunks read around one
#: unavailable store.
UNAVAILABLE_LOG_INTERVAL = 60.0


class DamageRecorder:
    """The reader's `on_damage` callback."""

    def __init__(
        self,
        db: Database,
        k: int,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.queue = RepairQueue(db)
        self.chunks = ChunkTable(db)
        self.k = k
        self.clock_ns = clock_ns
        self.monotonic = monotonic
        self._logged: set[int] = set()
        #: store -> when its unavailable chunks were last logged, and how
        #: many were queued since (see UNAVAILABLE_LOG_INTERVAL).
        self._unavailable_logged: dict[int, float] = {}
        self._unavailable_since: dict[int, int] = {}
        #: chunk id -> bad-fragment mask written to the queue, and the
        #: degraded reads of it not yet added to its demand.
        self._queued_mask: dict[int, int] = {}
        self._unwritten_demand: dict[int, int] = {}
        #: Called after a chunk was queued (wakes the repairer).
        self.on_queued: Callable[[], None] = lambda: None

    def record(self, ref: ChunkRef, bad: list[int], reason: str) -> None:
        """Queue `ref` for repair, with the bad fragments and a priority
        from the spare fragments left (see model.repair_priority)."""
        mask = 0
        for index in bad:
            mask |= 1 << index
        chunk_id = ref.chunk_id
        queued = self._queued_mask.get(chunk_id)
        if queued is not None and not self.queue.contains(chunk_id):
            queued = None  # repaired (or dropped) since it was queued: start over
            self._unwritten_demand.pop(chunk_id, None)
        if queued is not None and mask & ~queued == 0:
            demand = self._unwritten_demand.get(chunk_id, 0) + 1
            if demand < DEMAND_BATCH:
                self._unwritten_demand[chunk_id] = demand
                return
        else:
            if self.chunks.by_id(chunk_id) is None:
                return  # replaced meanwhile: nothing to repair
            demand = 1 + self._unwritten_demand.get(chunk_id, 0)
        good = len(set(ref.present()) - set(bad))
        with self.db.transaction():
            self.queue.add(
                chunk_id,
                "degraded-read",
                repair_priority(good - (ref.k or self.k), "degraded-read"),
                self.clock_ns(),
                bad=mask,
                demand=demand,
            )
        if len(self._queued_mask) >= QUEUED_MASKS_MAX:
            self._queued_mask.clear()
            self._unwritten_demand.clear()
        self._queued_mask[chunk_id] = mask | (queued or 0)
        self._unwritten_demand.pop(chunk_id, None)
        self.on_queued()
        if reason == STORE_UNAVAILABLE:
            self._log_unavailable({ref.stores[i] for i in bad})
        elif chunk_id not in self._logged:
            if len(self._logged) >= QUEUED_MASKS_MAX:
                self._logged.clear()
            self._logged.add(chunk_id)
            log.warning(
                "chunk %016x: fragments %s unreadable (%s); queued for repair",
                chunk_id,
                sorted(set(bad)),
                reason,
            )

    def _log_unavailable(self, stores: set[int]) -> None:
        """Count a chunk queued because of `stores` being unavailable, and
        log the count of each at its first and then once per
        UNAVAILABLE_LOG_INTERVAL."""
        now = self.monotonic()
        for store in sorted(stores):
            count = self._unavailable_since.get(store, 0) + 1
            last = self._unavailable_logged.get(store)
            if last is None:
                log.warning(
                    "store %d unavailable: its fragments unreadable, chunks read around"
                    " it queued for repair (summed up every %.0f s from now on)",
                    store,
                    UNAVAILABLE_LOG_INTERVAL,
                )
            elif now - last >= UNAVAILABLE_LOG_INTERVAL:
                log.warning(
                    "store %d unavailable: its fragments unreadable, %d chunks read"
                    " around it queued for repair in the last %.0f s",
                    store,
                    count,
                    now - last,
                )
            else:
                self._unavailable_since[store] = count
                continue
            self._unavailable_logged[store] = now
            self._unavailable_since[store] = 0
