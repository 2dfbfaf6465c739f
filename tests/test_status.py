"""The status document's tolerance and health on a volume opened in-process
(no mount): known damage in the repair queue counts, together with slots on
unavailable stores."""

from __future__ import annotations

import time

from ecfs import control
from ecfs.metadb.chunks import ChunkTable, RepairQueue
from ecfs.model import ChunkRef
from ecfs.volume import Volume
from tests.test_garbage import PAYLOAD, K, M, N, volume  # noqa: F401 (the fixture)


def test_tolerance_counts_known_bad_fragments_and_failed_stores(volume: Volume) -> None:  # noqa: F811
    with volume.db.transaction():
        ChunkTable(volume.db).put(2, 0, ChunkRef(2000, K * len(PAYLOAD), tuple(range(N))))
    s = control.status(volume)
    assert (s["tolerance"], s["health"]) == (M, "healthy")
    with volume.db.transaction():
        RepairQueue(volume.db).add(2000, "degraded-read", 0, time.time_ns(), bad=1 << 0)
    s = control.status(volume)
    assert (s["tolerance"], s["health"]) == (M - 1, "at-risk" if M == 1 else "degraded")
    volume.runners[2].mark_failed("test: away")  # fragment 2 of the chunk is on store 2
    s = control.status(volume)
    assert (s["tolerance"], s["health"]) == (M - 2, "data-loss")
    volume.runners[2].mark_ok()
    with volume.db.transaction():
        RepairQueue(volume.db).remove(2000)
    s = control.status(volume)
    assert (s["tolerance"], s["health"]) == (M, "healthy")
