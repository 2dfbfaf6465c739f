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

Owns: the status record types of the volume level (stores, metadata, store
changes), the health rule (`assess`), and the JSON conversion. Must not:
do I/O or reach into services (it is given their records).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.model import NO_STORE
from ..data.garbage import GarbageStatistics
from ..data.reader import ReadStatistics
from ..data.repair import RepairStatistics
from ..data.restripe import RestripeStatistics
from ..data.scrub import ScrubStatistics
from ..data.smallwrites import WriteLogStatistics
from ..data.writer import WriteStatistics
from ..storage.lease import LeaseStatistics

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
    """What the chunk table and the repair queue say about redundancy."""

    tolerance: int
    fragments: dict[int, int]  # store index -> fragments on it
    fragment_bytes: dict[int, int]


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
    #: Pending `ecfs restripe` work and its progress (`ecfs.data.restripe`).
    restripe: RestripeStatistics | None = None


def assess(
    k: int,
    n: int,
    stores: Iterable[int],
    available: set[int],
    classes: Iterable[tuple[tuple[int, ...], int, int, int]],
    known_damage: Iterable[tuple[tuple[int, ...], int, int, int]],
) -> Assessment:
    """Tolerance and fragments per store. `classes`: (stores, chunk k,
    chunks, bytes) per redundancy class of the chunk table; `known_damage`:
    (stores, chunk k, bad fragment mask, chunks) of the queued repairs. A
    chunk k of 0 is the volume's `k`; a chunk of its own coding (a
    redundancy policy) counts with its own k' and n' = len(stores). A
    fragment counts as lost when it is known bad, has no store, or its
    store is not available."""
    fragments = dict.fromkeys(stores, 0)
    fragment_bytes = dict(fragments)
    tolerance = n - k
    for slots, chunk_k, count, size in classes:
        ck = chunk_k or k
        good = sum(1 for s in slots if s != NO_STORE and s in available)
        tolerance = min(tolerance, good - ck)
        for s in slots:
            if s in fragments:
                fragments[s] += count
                fragment_bytes[s] += size // ck
    for slots, chunk_k, bad, _count in known_damage:
        lost = sum(
            1 for i, s in enumerate(slots) if bad >> i & 1 or s == NO_STORE or s not in available
        )
        tolerance = min(tolerance, len(slots) - lost - (chunk_k or k))
    return Assessment(tolerance, fragments, fragment_bytes)


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
