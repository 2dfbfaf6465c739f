"""Where new fragments go.

Owns: the choice of stores for the fragments of a new chunk, and each
store's free-space estimate. Must not: do I/O (free space is refreshed by
the caller through `update_usage`), or know about files.

Policy: only available (not failed) active stores are candidates; stores
known to be full are skipped until their usage is refreshed. Candidates are
ordered by free space in whole GiB (most first), then round-robin, so
stores of different sizes fill evenly and equal stores share the load.

A rebuilt fragment (`rebuild_target`, used by `ecfs.data.rebuild` for both the
mount's repair and `ecfs fsck --repair`) stays on its own store when that
store is a candidate holding no other fragment of the chunk, and otherwise goes where `choose` says among the
stores holding no other fragment of the chunk (not even a bad one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from ..core.model import NO_STORE
from ..storage.store import StoreUsage

#: A full store is used again once it has this much free space.
FULL_MARGIN = 64 << 20

#: Stores whose free space differs by less than this are treated as equal.
FREE_SPACE_GRAIN = 1 << 30


class Candidate(Protocol):
    """What placement needs of a store: whether it may be used now (an
    `ecfs.storage.offload.StoreRunner` in a mount; fsck passes its present stores)."""

    @property
    def available(self) -> bool: ...


class Placement:
    """Chooses distinct stores for new fragments."""

    def __init__(self, runners: Mapping[int, Candidate]) -> None:
        self.runners = runners
        self.usage: dict[int, StoreUsage] = {}
        self.full: set[int] = set()
        #: Stores being removed: never chosen for new fragments.
        self.draining: set[int] = set()
        self._turn = 0

    def update_usage(self, store: int, usage: StoreUsage) -> None:
        """New free-space reading; a store marked full is retried only once
        it has room for a few more fragments again."""
        self.usage[store] = usage
        if usage.free_bytes > FULL_MARGIN:
            self.full.discard(store)

    def note_written(self, store: int, nbytes: int) -> None:
        usage = self.usage.get(store)
        if usage is not None:
            self.usage[store] = StoreUsage(usage.total_bytes, max(0, usage.free_bytes - nbytes))

    def mark_full(self, store: int) -> None:
        self.full.add(store)

    def choose(self, count: int, exclude: Iterable[int] = ()) -> list[int]:
        """Up to `count` distinct usable stores, best first."""
        excluded = set(exclude)
        n = max(len(self.runners), 1)
        self._turn = (self._turn + 1) % n
        candidates = [
            index
            for index, runner in self.runners.items()
            if runner.available
            and index not in excluded
            and index not in self.full
            and index not in self.draining
        ]
        candidates.sort(key=lambda index: (-self._free_grains(index), (index - self._turn) % n))
        return candidates[:count]

    def rebuild_target(self, stores: Sequence[int], index: int) -> int | None:
        """Where rebuilt fragment `index` of a chunk whose fragment slots are
        on `stores` goes: its own store if that is a candidate (available,
        not full, not draining) holding no other fragment of the chunk, else
        the best candidate holding no other fragment of the chunk; None if
        there is none."""
        own = stores[index]
        others = {s for i, s in enumerate(stores) if i != index and s != NO_STORE}
        runner = self.runners.get(own) if own != NO_STORE else None
        if (
            runner is not None
            and runner.available
            and own not in self.full
            and own not in self.draining
            and own not in others
        ):
            return own
        choice = self.choose(1, exclude=others)
        return choice[0] if choice else None

    def usable_stores(self) -> int:
        return sum(1 for i, r in self.runners.items() if r.available and i not in self.full)

    def _free_grains(self, store: int) -> int:
        usage = self.usage.get(store)
        return 0 if usage is None else usage.free_bytes // FREE_SPACE_GRAIN

    def capacity(self) -> tuple[int, int]:
        """(total, free) raw bytes over available stores."""
        total = free = 0
        for index, runner in self.runners.items():
            usage = self.usage.get(index)
            if usage is not None and runner.available:
                total += usage.total_bytes
                free += usage.free_bytes
        return total, free
