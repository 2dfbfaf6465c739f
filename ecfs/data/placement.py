"""Where new fragments go.

Owns: the choice of stores for the fragments of a new chunk, each store's
free-space estimate, and the volume's placement policy (`SPREAD` or
`HYBRID`, kept in the metadata's volume parameters under POLICY_KEY and
checked by `policy_problem`). Must not: do I/O (free space is refreshed by
the caller through `update_usage`), or know about files.

Candidates: only available (not failed) active stores; stores known to be
full are skipped until their usage is refreshed. Candidates are ordered by
free space in whole GiB (most first), then round-robin, so stores of
different sizes fill evenly and equal stores share the load. A store whose
space is unknown (`StoreUsage.known` False: an object store) ranks with the
roomiest known store, never ahead of it for a nominal size.

Policies:

* `SPREAD` (the default): any fragment on any candidate.
* `HYBRID`: data fragments (indices 0..k-1) on local stores, parity
  (k..n-1) on remote ones (`ecfs.storage.store.Store.remote`). The code is
  systematic, so a healthy read touches only the local stores, and the
  loss of m local stores is survived from the remote parity. It needs at
  least k local and m remote active stores (`policy_problem`: mkfs,
  `store add/remove` refuse otherwise). When a class is short at write time
  (a local store failed, or is full), the slot takes a store of the other
  class rather than failing a write spread placement could serve: a data
  fragment then goes to a remote store (healthy reads of that chunk touch
  the network). Such a fragment is on the wrong class (`wrong_class`); the
  caller queues the chunk ('wrong-class'), and repair moves the fragment to
  a store of its class once one is a candidate (`movable`).

A rebuilt fragment (`rebuild_target`, used by `ecfs.data.rebuild` for both the
mount's repair and `ecfs fsck --repair`) stays on its own store when that
store is a candidate of its class holding no other fragment of the chunk,
and otherwise goes where `choose` says among the stores of its class
holding no other fragment of the chunk (not even a bad one); failing that,
its own store if usable, else any such candidate.

Failure domains (`ecfs.storage.domains`; `domain(store)` names a store's,
read at each choice: a label may change while mounted): among the
candidates ordered as above, `choose` takes each next store from a domain
holding the fewest fragments of the chunk so far (`ecfs.storage.domains.spread`),
so no two fragments of a chunk share a domain while enough domains have a
candidate, and they are spread as evenly as possible when not (a volume
made with ``--allow-shared-domains``, or with a domain's stores failed or
full). This holds for any number of fragments, for `targets`,
`replacement` (the stores already used count) and `rebuild_target`: a
rebuilt fragment stays on its own store only if no candidate is in a
domain holding fewer of the chunk's other fragments. A chunk left with two
fragments in one domain (written while a domain was down or full, or
before a label changed) while some store is in a domain holding none of
its fragments has fragments in a shared domain (`shared_domain`): like a
wrong-class one, the caller queues the chunk ('shared-domain': scrub, a
write, fsck), and repair moves one such fragment at a time to a candidate
in an unused domain (`movable`, `rebuild_target`) until none is left or
no candidate is (`misplaced` covers both kinds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from ..core.model import NO_STORE
from ..storage.domains import spread
from ..storage.store import StoreUsage

#: A full store is used again once it has this much free space.
FULL_MARGIN = 64 << 20

#: Stores whose free space differs by less than this are treated as equal.
FREE_SPACE_GRAIN = 1 << 30

#: The placement policies (see the module docstring).
SPREAD = "spread"
HYBRID = "hybrid"
POLICIES = (SPREAD, HYBRID)
#: Volume parameter (metadata `volume` table) holding the policy; a volume
#: without it (made before policies existed) is SPREAD.
POLICY_KEY = "placement"


def policy_problem(policy: str, k: int, m: int, local: int, remote: int) -> str | None:
    """Why a volume with `local` local and `remote` remote active stores
    cannot have `policy`, or None if it can."""
    if policy not in POLICIES:
        return f"unknown placement policy {policy!r} (known: {', '.join(POLICIES)})"
    if policy == HYBRID and (local < k or remote < m):
        return (
            f"hybrid placement keeps the k={k} data fragments of a chunk on local stores and"
            f" the m={m} parity fragments on remote ones: it needs at least {k} local and"
            f" {m} remote stores; there would be {local} local and {remote} remote"
        )
    return None


class Candidate(Protocol):
    """What placement needs of a store: whether it may be used now (an
    `ecfs.storage.offload.StoreRunner` in a mount; fsck passes its present stores)."""

    @property
    def available(self) -> bool: ...


class Placement:
    """Chooses distinct stores for new fragments."""

    def __init__(
        self,
        runners: Mapping[int, Candidate],
        *,
        remote: Callable[[int], bool] = lambda store: False,
        policy: str = SPREAD,
        k: int = 0,
        domain: Callable[[int], str] = str,
    ) -> None:
        """`remote(store)`: whether store index `store` is remote (read at
        each choice: stores come and go); `k`: data fragments per chunk
        (needed by HYBRID); `domain(store)`: its failure domain (default:
        every store its own)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}")
        self.runners = runners
        self.remote = remote
        self.domain = domain
        #: SPREAD or HYBRID; may change while mounted (`ecfs store add --placement`).
        self.policy = policy
        self.k = k
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
            self.usage[store] = StoreUsage(
                usage.total_bytes, max(0, usage.free_bytes - nbytes), usage.known
            )

    def mark_full(self, store: int) -> None:
        self.full.add(store)

    def choose(
        self,
        count: int,
        exclude: Iterable[int] = (),
        *,
        remote: bool | None = None,
        taken: Iterable[int] = (),
    ) -> list[int]:
        """Up to `count` distinct usable stores, best first, spread over
        failure domains (module docstring; `taken`: the stores holding the
        chunk's other fragments); only remote (True) or only local (False)
        ones if `remote` is given."""
        n = max(len(self.runners), 1)
        self._turn = (self._turn + 1) % n
        candidates = self._candidates(set(exclude), remote)
        known = [self._free_grains(i) for i in candidates if self._space_known(i)]
        roomiest = max(known, default=0)

        def grains(index: int) -> int:
            return self._free_grains(index) if self._space_known(index) else roomiest

        candidates.sort(key=lambda index: (-grains(index), (index - self._turn) % n))
        return spread(candidates, count, self.domain, [self.domain(s) for s in taken])

    def targets(self, n: int, k: int | None = None) -> list[int | None]:
        """A store for each fragment index 0..n-1 of a new chunk (distinct;
        None where no store is left), by the policy (module docstring).
        `k`: the chunk's data fragments when it has its own coding (a
        redundancy policy; default: the volume's k); the same for every
        `k` argument below."""
        if self.policy != HYBRID:
            chosen: list[int | None] = list(self.choose(n))
            return chosen + [None] * (n - len(chosen))
        k = min(self.k if k is None else k, n)
        local = self.choose(n, remote=False)
        remote = self.choose(n, remote=True, taken=local[:k])
        data, parity = local[:k], remote[: n - k]
        data += remote[n - k :][: k - len(data)]  # the other class, when one is short
        parity += local[k:][: n - k - len(parity)]
        return [*data, *([None] * (k - len(data))), *parity, *([None] * (n - k - len(parity)))]

    def replacement(self, index: int, exclude: Iterable[int], k: int | None = None) -> int | None:
        """Another store for fragment `index` whose store failed: one of its
        class if any, else any candidate; None if there is none."""
        excluded = set(exclude)
        if self.policy == HYBRID:
            choice = self.choose(
                1, excluded, remote=index >= (self.k if k is None else k), taken=excluded
            )
            if choice:
                return choice[0]
        choice = self.choose(1, excluded, taken=excluded)
        return choice[0] if choice else None

    def wrong_class(self, stores: Sequence[int], k: int | None = None) -> list[int]:
        """Fragment indices of a chunk (slots `stores`) on a store of the
        wrong class for the policy (HYBRID only; NO_STORE slots are not)."""
        if self.policy != HYBRID:
            return []
        dk = self.k if k is None else k
        return [i for i, s in enumerate(stores) if s != NO_STORE and self.remote(s) != (i >= dk)]

    def shared_domain(self, stores: Sequence[int]) -> list[int]:
        """Fragment indices of a chunk (slots `stores`) in a failure domain
        holding an earlier fragment of the chunk, while a layout exists that
        avoids it: some store of the volume (not draining) is in a domain
        holding none of the chunk's fragments. NO_STORE slots are not."""
        held = [(i, self.domain(s)) for i, s in enumerate(stores) if s != NO_STORE]
        used = {domain for _, domain in held}
        if len(used) == len(held) or not any(
            self.domain(s) not in used for s in self.runners if s not in self.draining
        ):
            return []
        seen: set[str] = set()
        extra = []
        for index, domain in held:
            if domain in seen:
                extra.append(index)
            seen.add(domain)
        return extra

    def misplaced(self, stores: Sequence[int], k: int | None = None) -> list[int]:
        """The fragments of a chunk to move: `wrong_class` and `shared_domain`."""
        return sorted({*self.wrong_class(stores, k), *self.shared_domain(stores)})

    def misplaced_reason(self, stores: Sequence[int], k: int | None = None) -> str:
        """The repair reason of a `misplaced` chunk: 'wrong-class' if a
        fragment is on the wrong class, else 'shared-domain'."""
        return "wrong-class" if self.wrong_class(stores, k) else "shared-domain"

    def movable(self, stores: Sequence[int], k: int | None = None) -> list[int]:
        """The `misplaced` fragments that a candidate could take now: for a
        `wrong_class` one, a candidate of its class holding no other fragment
        of the chunk; for a `shared_domain` one, such a candidate (of its
        class under HYBRID) in a domain holding none of the chunk's other
        fragments (`rebuild_target` then chooses one)."""
        moves = []
        dk = self.k if k is None else k
        for index in self.wrong_class(stores, dk):
            others = {s for i, s in enumerate(stores) if i != index and s != NO_STORE}
            if self._candidates(others, index >= dk):
                moves.append(index)
        for index in self.shared_domain(stores):
            others = {s for i, s in enumerate(stores) if i != index and s != NO_STORE}
            used = {self.domain(s) for s in others}
            kind = index >= self.k if self.policy == HYBRID else None
            if index not in moves and any(
                self.domain(c) not in used for c in self._candidates(others, kind)
            ):
                moves.append(index)
        return moves

    def rebuild_target(
        self, stores: Sequence[int], index: int, k: int | None = None
    ) -> int | None:
        """Where rebuilt fragment `index` of a chunk whose fragment slots are
        on `stores` goes (see the module docstring): its own store if that
        is a candidate (available, not full, not draining) of its class
        holding no other fragment of the chunk, else the best such
        candidate of its class; failing that its own store if usable, else
        any candidate holding no other fragment of the chunk; None if
        there is none."""
        own = stores[index]
        holders = [s for i, s in enumerate(stores) if i != index and s != NO_STORE]
        others = set(holders)
        own_usable = own != NO_STORE and bool(self._candidates(others, None, only=own))
        if self.policy != HYBRID:
            choice = self.choose(1, exclude=others, taken=holders)
            if own_usable and not self._better_domain(holders, own, choice):
                return own
            return choice[0] if choice else None
        wants_remote = index >= (self.k if k is None else k)
        choice = self.choose(1, exclude=others, remote=wants_remote, taken=holders)
        if (
            own_usable
            and self.remote(own) == wants_remote
            and not self._better_domain(holders, own, choice)
        ):
            return own
        if choice:
            return choice[0]
        if own_usable:
            return own
        choice = self.choose(1, exclude=others, taken=holders)
        return choice[0] if choice else None

    def _better_domain(self, holders: Sequence[int], own: int, choice: Sequence[int]) -> bool:
        """Whether the store in `choice` is in a domain holding fewer of the
        chunk's other fragments (on `holders`) than `own`'s domain."""
        if not choice:
            return False
        held = [self.domain(s) for s in holders]
        return held.count(self.domain(choice[0])) < held.count(self.domain(own))

    def usable_stores(self) -> int:
        return sum(1 for i, r in self.runners.items() if r.available and i not in self.full)

    def _candidates(
        self, excluded: set[int], remote: bool | None, only: int | None = None
    ) -> list[int]:
        """Usable stores (available, not full, not draining) not in
        `excluded`, of class `remote` if given (just `only` if given)."""
        indices = self.runners if only is None else ([only] if only in self.runners else [])
        return [
            index
            for index in indices
            if self.runners[index].available
            and index not in excluded
            and index not in self.full
            and index not in self.draining
            and (remote is None or self.remote(index) == remote)
        ]

    def _space_known(self, store: int) -> bool:
        usage = self.usage.get(store)
        return usage is None or usage.known

    def _free_grains(self, store: int) -> int:
        usage = self.usage.get(store)
        return 0 if usage is None else usage.free_bytes // FREE_SPACE_GRAIN
