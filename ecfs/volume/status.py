"""The status of a volume as one typed, frozen record, and its JSON form.

`Volume.status()` builds a `VolumeStatus` from its services' `statistics()`
records (repairer, scrubber, reader, writer, small-write log, garbage
collector, replicator, store runners); the daemon sends it to the CLI as
JSON over the control channel (`to_json`, see `control`), and the CLI turns
it back into the same record (`from_json`). `ecfs status --json` prints
`to_json`; the terminal rendering (`render`) and the Prometheus collector
(`metrics`) are functions of the record, in the daemon and in the CLI alike.

The JSON document is the record with every field under its own name
(`dataclasses.asdict`), nested records as objects, tuples as lists, None
as null; its keys are documented in ecfs-status(8) and stable.

`IoStatus` is the cheap snapshot of the same counters for a live view
(`Volume.iostat()`, `ecfs iostat`, the virtual attribute user.ecfs.iostat):
counters and in-memory state only, no query over the chunk table, so it can
be asked for every second on a big volume. Its counters are monotonic for
the life of a mount (rates are deltas between two snapshots over
`monotonic_ns`); `iostat_to_json`/`iostat_from_json` convert it the same way.

Tolerance counts failure domains (`ecfs.storage.domains`), not stores: for
a chunk, how many domains can fail while k of its good fragments remain
(the domains holding most of its fragments go first); the volume's
tolerance is the least over its chunks, and over a chunk the stores would
get now (`layout_tolerance`: n fragments spread as evenly as the active
stores' domains allow), so an empty volume on one disk says 0 too.
`redundancy_warning` says in words when the redundancy is (partly)
illusory: stores sharing a domain, and what losing it costs.

Owns: the status record types of the volume level (stores, metadata, store
changes, events and hook runs, the iostat snapshot), the health rule
(`assess`), and the JSON conversion. Must not:
do I/O or reach into services (it is given their records).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.events import EventStatistics
from ..core.model import NO_STORE
from ..data.background import BackgroundStatistics
from ..data.garbage import GarbageStatistics
from ..data.reader import ReadStatistics
from ..data.repair import RepairStatistics
from ..data.restripe import RestripeStatistics
from ..data.scrub import ScrubStatistics
from ..data.smallwrites import WriteLogStatistics
from ..data.writer import WriteStatistics
from ..storage.domains import layout_tolerance, shared, tolerance
from ..storage.lease import LeaseStatistics
from .hooks import HookStatistics

HEALTH_STATES = ("healthy", "degraded", "at-risk", "data-loss")
STORE_STATES = ("ok", "slow", "failed", "missing")


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """One store of the volume: present (a runner's statistics, its space)
    or missing (state "missing", zero counters, unknown space)."""

    index: int
    path: str
    state: str  # one of STORE_STATES
    reason: str | None  # why it is failed or missing
    in_flight: int
    errors: int
    timeouts: int
    latency_p50_ms: float
    latency_p95_ms: float
    bytes_read: int
    bytes_written: int
    free_bytes: int | None
    total_bytes: int | None
    fragments: int  # fragments the chunk table places on it
    fragment_bytes: int
    draining: bool
    #: On another machine (`ecfs.storage.store.Store.remote`; False if missing).
    remote: bool = False
    #: Successful operations that read / wrote bytes (monotonic).
    read_ops: int = 0
    write_ops: int = 0
    latency_p99_ms: float = 0.0
    #: Latency samples per bucket of `ecfs.storage.offload.LATENCY_BUCKETS`
    #: (not cumulative; the last entry counts those above the last bound;
    #: empty for a missing store) and their sum in seconds.
    latency_histogram: tuple[int, ...] = ()
    latency_sum_s: float = 0.0
    #: Its failure domain (`ecfs.storage.domains`): a label, ``disk:NAME``,
    #: ``dev:MAJ:MIN``, ``s3:HOST:PORT``; ``unknown:INDEX`` if missing and
    #: not labelled.
    domain: str = ""


@dataclass(frozen=True, slots=True)
class MetadataStatus:
    """The metadata working copy and its replicas (durable_generation None:
    offline, no replicator)."""

    generation: int
    durable_generation: int | None
    live_replicas: tuple[int, ...]
    stale_replicas: dict[int, str]  # store index -> why it is out of date
    #: Where the live copies are: store index -> "file" (a database file
    #: in the store's meta/) or "objects" (snapshots and logs, see
    #: ecfs.storage.metaobjects).
    copies: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreChange:
    """The last store replace/add/remove of this mount."""

    op: str  # "replace" | "add" | "remove"
    old: str | None
    new: str | None
    state: str  # "running" | "done" | "failed"
    message: str


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the chunk table and the repair queue say about redundancy
    (`tolerance` in failure domains)."""

    tolerance: int
    fragments: dict[int, int]  # store index -> fragments on it
    fragment_bytes: dict[int, int]


@dataclass(frozen=True, slots=True)
class EventsStatus:
    """Events since mount (`ecfs.core.events`) and runs of the event hook
    (`ecfs.volume.hooks`). `hook`: its path ("" without -o event_hook:
    events are only logged). `emitted`: events reported; `hook_runs`:
    hook runs started; `hook_failures`: runs that could not start or
    exited non-zero; `hook_timeouts`: runs killed after the hook timeout;
    `dropped`: events whose hook run was dropped (the queue was full)."""

    emitted: int = 0
    hook: str = ""
    hook_runs: int = 0
    hook_failures: int = 0
    hook_timeouts: int = 0
    dropped: int = 0


def events_status(
    events: EventStatistics, hook: str = "", hooks: HookStatistics | None = None
) -> EventsStatus:
    """The record of the sink's and the hook runner's statistics."""
    if hooks is None:
        return EventsStatus(events.emitted, dropped=events.dropped)
    return EventsStatus(
        events.emitted, hook, hooks.run, hooks.failed, hooks.killed, events.dropped
    )


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    """A snapshot of a mounted (or opened) volume. `tolerance`: how many
    more stores the worst chunk can lose (may be negative); `health` one of
    HEALTH_STATES (see `health_of`); `store_change` None until a store
    change ran in this mount; `lease` None without S3 stores (no lease)."""

    volume: str
    k: int
    m: int
    health: str
    tolerance: int
    stores: tuple[StoreStatus, ...]
    repair: RepairStatistics
    scrub: ScrubStatistics
    reads: ReadStatistics
    writes: WriteStatistics
    write_log: WriteLogStatistics
    garbage: GarbageStatistics
    metadata: MetadataStatus
    unrecoverable: tuple[str, ...]
    store_change: StoreChange | None
    lease: LeaseStatistics | None = None
    #: The placement policy (`ecfs.data.placement`: "spread" or "hybrid").
    placement: str = "spread"
    #: Background work paused on purpose (`ecfs repair --pause`), since when, by whom.
    background: BackgroundStatistics = dataclasses.field(default_factory=BackgroundStatistics)
    #: Distinct failure domains among the active stores.
    domains: int = 0
    #: Why the redundancy is less than it looks (stores sharing a failure
    #: domain), in words; None when every store is its own domain.
    redundancy_warning: str | None = None
    #: Events and event hook runs since mount.
    events: EventsStatus = dataclasses.field(default_factory=EventsStatus)
    #: Pending `ecfs restripe` work and its progress (`ecfs.data.restripe`).
    restripe: RestripeStatistics | None = None


@dataclass(frozen=True, slots=True)
class StoreIo:
    """One store in the iostat snapshot: monotonic counters (operations,
    bytes, errors, timeouts) and current values (state, calls in threads
    and queued for one, latency percentiles of the recent window)."""

    index: int
    path: str
    state: str  # one of STORE_STATES
    reason: str | None
    in_flight: int
    waiting: int
    read_ops: int
    write_ops: int
    bytes_read: int
    bytes_written: int
    errors: int
    timeouts: int
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass(frozen=True, slots=True)
class RepairActivity:
    """The repairer's counters (no queue: that is a query)."""

    busy: bool
    urgent: bool
    chunks_repaired: int
    fragments_rebuilt: int
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True, slots=True)
class IoStatus:
    """The cheap snapshot `ecfs iostat` polls. `time_ns`: the daemon's
    wall clock; `monotonic_ns`: its monotonic clock, what rates divide by."""

    volume: str
    time_ns: int
    monotonic_ns: int
    stores: tuple[StoreIo, ...]
    reads: ReadStatistics
    writes: WriteStatistics
    write_log: WriteLogStatistics
    repair: RepairActivity


def assess(
    k: int,
    n: int,
    stores: Iterable[int],
    available: set[int],
    classes: Iterable[tuple[tuple[int, ...], int, int, int]],
    known_damage: Iterable[tuple[tuple[int, ...], int, int, int]],
    domain: Callable[[int], str] = str,
) -> Assessment:
    """Tolerance (in failure domains, `domain(store)`: each store its own
    by default) and fragments per store. `classes`: (stores, chunk k,
    chunks, bytes) per redundancy class of the chunk table; `known_damage`:
    (stores, chunk k, bad fragment mask, chunks) of the queued repairs. A
    chunk k of 0 is the volume's `k`; a chunk of its own coding (a
    redundancy policy) counts with its own k' and n' = len(stores). A
    fragment counts as lost when it is known bad, has no store, or its
    store is not available. The tolerance also holds for a chunk placed on
    `stores` as evenly as their domains allow (`layout_tolerance`), failed
    or not: a volume whose stores share domains says so before it holds
    data."""
    fragments = dict.fromkeys(stores, 0)
    fragment_bytes = dict(fragments)
    worst = n - k
    if len(fragments) >= n:
        worst = min(worst, layout_tolerance({s: domain(s) for s in fragments}, k, n))
    for slots, chunk_k, count, size in classes:
        ck = chunk_k or k
        good = [domain(s) for s in slots if s != NO_STORE and s in available]
        worst = min(worst, tolerance(good, ck))
        for s in slots:
            if s in fragments:
                fragments[s] += count
                fragment_bytes[s] += size // ck
    for slots, chunk_k, bad, _count in known_damage:
        good = [
            domain(s)
            for i, s in enumerate(slots)
            if not bad >> i & 1 and s != NO_STORE and s in available
        ]
        worst = min(worst, tolerance(good, chunk_k or k))
    return Assessment(worst, fragments, fragment_bytes)


def redundancy_warning(k: int, m: int, domains: Mapping[int, str]) -> str | None:
    """In words, why the active stores (`domains`: store -> failure domain)
    give less redundancy than m: the domains holding several stores, and
    how many domains a chunk survives losing; None if a chunk spread over
    them survives losing any m (each store its own domain, or enough
    others)."""
    together = shared(domains)
    can_lose = layout_tolerance(domains, k, k + m)
    if not together or can_lose >= m:
        return None
    groups = "; ".join(
        f"stores {', '.join(map(str, sorted(members)))} share {name}"
        for name, members in sorted(together.items())
    )
    if can_lose <= 0:
        verdict = (
            f"the redundancy is illusory: k+{m} fragments but losing one failure domain"
            " can lose data"
        )
    else:
        verdict = f"a chunk survives the loss of {can_lose} failure domain(s), not {m}"
    return f"{verdict} ({groups})"


def health_of(tolerance: int, unrecoverable: bool, stores_away: bool, repairs_queued: bool) -> str:
    """data-loss (something unreadable), at-risk (one more store lost
    loses data), degraded (a store away or repairs queued), else healthy."""
    if tolerance < 0 or unrecoverable:
        return "data-loss"
    if tolerance == 0:
        return "at-risk"
    if stores_away or repairs_queued:
        return "degraded"
    return "healthy"


def to_json(status: VolumeStatus) -> dict[str, Any]:
    """The JSON document (json.dumps-able: int keys become strings)."""
    return dataclasses.asdict(status)


class StatusFormatError(ValueError):
    """A status document that does not match the record (another version)."""


def from_json(document: object) -> VolumeStatus:
    """The record a JSON document (parsed) holds; StatusFormatError naming
    the first key that is missing or of the wrong type."""
    return typing.cast(VolumeStatus, _decode(VolumeStatus, document, "status"))


def iostat_to_json(snapshot: IoStatus) -> dict[str, Any]:
    """The iostat snapshot's JSON document (every field under its name)."""
    return dataclasses.asdict(snapshot)


def iostat_from_json(document: object) -> IoStatus:
    """The iostat snapshot a parsed JSON document holds (StatusFormatError
    as `from_json`)."""
    return typing.cast(IoStatus, _decode(IoStatus, document, "iostat"))


def _decode(kind: Any, value: object, where: str) -> object:
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise StatusFormatError(f"{where}: an object expected, not {value!r:.80}")
        hints = _hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            if f.name not in value:
                raise StatusFormatError(f"{where}.{f.name} is missing")
            values[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        return kind(**values)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _decode(inner, value, where)
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(_decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict and isinstance(value, Mapping):
        key_kind, value_kind = args
        try:
            return {
                key_kind(key): _decode(value_kind, item, f"{where}.{key}")
                for key, item in value.items()
            }
        except ValueError:
            raise StatusFormatError(f"{where}: a key is not a {key_kind.__name__}") from None
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise StatusFormatError(f"{where}: {value!r:.80} is not a {kind}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(kind: type) -> dict[str, Any]:
    if kind not in _HINTS:
        _HINTS[kind] = typing.get_type_hints(kind)
    return _HINTS[kind]
