"""Small value types shared by every layer (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

#: Marks a fragment slot whose fragment is not stored anywhere.
NO_STORE = -1


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One stored chunk version of a file.

    ``chunk_id`` is unique for the volume's lifetime and names this version:
    a rewrite creates a new id (copy-on-write). ``length`` is the number of
    file bytes the chunk holds. ``stores[i]`` is the store index holding
    fragment i (0 <= i < k+m), or NO_STORE when that fragment is missing.
    ``k`` is the chunk's own number of data fragments k' (its parity count
    is ``len(stores) - k``), or 0 for the volume's k and m (the common
    case, stored as NULL; see `ecfs.core.geometry.Layout.of`).
    """

    chunk_id: int
    length: int
    stores: tuple[int, ...]
    k: int = 0

    def present(self) -> list[int]:
        """Fragment indices that have a store."""
        return [i for i, s in enumerate(self.stores) if s != NO_STORE]


#: One recorded SQL write: the statement text and its parameters.
Statement = tuple[str, tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Transaction:
    """A committed metadata transaction as shipped to replicas.

    ``generation`` increases by one per transaction, starting after the
    generation the volume was opened at. ``statements`` replayed in order on
    a replica at generation ``generation - 1`` bring it to ``generation``.
    Statements are deterministic (no random(), no SQL time functions, every
    id chosen explicitly), so replaying them gives identical databases.
    """

    generation: int
    statements: tuple[Statement, ...]


#: Repair reasons in the order the repairer serves them at equal risk:
#: a degraded read, a write with reduced redundancy, a scrub finding, a
#: fragment `ecfs fsck --repair` found bad and could not rebuild (left to
#: the mount), the bulk rebuild of a failed or of a replaced store, a
#: fragment on a store of the wrong class (hybrid placement, moved back),
#: a fragment in a failure domain holding another of the chunk (moved to an
#: unused domain).
REPAIR_REASONS = (
    "degraded-read", "write", "scrub", "fsck", "store-failed", "store-replaced", "wrong-class",
    "shared-domain",
)


def repair_priority(spare: int, reason: str) -> int:
    """The repair-queue priority of a chunk (lower is repaired sooner).

    Risk first: `spare` is how many more fragments the chunk can lose
    (good fragments - k; negative means part of it is unreadable now).
    At equal risk: chunks readers hit, then short writes, then scrub
    findings, then what fsck left, then bulk rebuilds of a failed or replaced store,
    then fragments to move to a store of their class (hybrid placement), then
    fragments to move out of a shared failure domain. Within a
    priority, more read demand comes first (see RepairQueue.next_batch).
    """
    return max(spare, -1) * len(REPAIR_REASONS) + REPAIR_REASONS.index(reason)
