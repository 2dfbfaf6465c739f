"""The volume lease: one writing mount at a time, across hosts.

Owns: the lease object on each S3 store of a volume, taking it (`Lease.take`),
renewing it (`Lease.renew`, `Lease.keep_renewed` in a trio task,
`held_lease` in a thread for blocking users such as fsck), releasing it,
and the answer to "may this process still write?" (`Lease.holds`). Must
not: decide what a write is, or touch anything else in a store (the mount
asks `holds` before it acknowledges a write, see `ecfs.volume.assembly`).

Why: a local store is locked with flock (`ecfs.storage.lock`), which only
keeps out processes of the same host. An S3 store can be reached by any
host with the credentials, so a volume with S3 stores also takes this
lease, on its S3 stores; a volume without any takes none.

On each S3 store, the object ``PREFIX/lease`` (UTF-8 JSON, at most
LEASE_MAX_BYTES)::

    {"format": 1,                      LEASE_FORMAT
     "volume": "<uuid>",               the volume's id
     "host": "nas1",                   the holder: host name (or $ECFS_HOST_ID),
     "pid": 1234,                        process id,
     "space": "<boot id>:<pid ns>",      the boot and pid namespace the pid is of,
     "mount": "<32 hex digits>",         a random id of this mount (or fsck run)
     "epoch": 7,                       fencing epoch: 1 + the largest seen
     "taken_at": "2026-12-03T21:00:00.000Z",    UTC, when this epoch was taken
     "expires_at": "2026-12-03T21:00:30.000Z",  UTC, taken_at or last renewal + ttl
     "ttl": 30.0,                      seconds
     "released": false}                true after a clean unmount

Majority: every store of the volume is one vote, and the lease is held
with a majority of them (floor(n/2) + 1 of its n stores): an S3 store
votes for the holder whose record it keeps, a local store for the process
that holds its flock (`ecfs.storage.lock`: the mount locks every local
store it opens, before taking the lease). Two holders can never both have
a majority, and losing a minority of the servers blocks nobody. On an
all-S3 volume that is a majority of its S3 stores; a hybrid volume whose
local stores are a majority (4 local disks, 2 S3 parity stores) mounts
whatever its servers do, since no other host can have its local stores.
`epoch` is 1 + the largest epoch on any S3 store read. On a volume of S3
stores only, a majority of them is read, which includes one of the stores
of every earlier holder: the epoch is above every epoch ever held, and
only grows. (A hybrid volume that takes the lease with its local votes
while servers are away may reuse a lower epoch; no other host can mount
it anyway.) Other code that writes
to shared stores may tag what it writes with `Lease.epoch` (a plain
attribute, fixed once taken) and refuse what carries a lower one.

Taking (`take`): read every store's lease (enough must answer to make a
majority with the local votes: `s3_needed`);
refuse (VolumeError) if any record of another holder is live (not
released, expires_at in the future): the message names its host, pid and
expiry. A record of another holder that expired without release (a mount
that died or lost the servers) is taken over only when asked
(`takeover`, `ecfs mount --takeover`, `ecfs fsck --takeover`); the refusal
says so. Without being asked, a record whose holder is a process of this
host (same host name, boot and pid namespace) that no longer exists is
taken at once, live or not: a dead process writes nothing (a mount killed
with kill -9 can be mounted again on its host at once). Then write our
record on every store that answered, with If-Match on the ETag read (or
If-None-Match: * where there was none), and VERIFY: some servers have
ignored conditional writes, so after a settle time every lease is read
again and `s3_needed` of them must hold exactly our record (mount id and
epoch);
otherwise what we wrote is released and the take refused ("another host
took it at the same time"). The settle time is the take window: a take
gives up unless its reads and enough writes finished within TAKE_WINDOW
(half of it for the reads: a hung server is not waited for longer; tried
again up to TAKE_ATTEMPTS times), and reads back TAKE_WINDOW after its
writes, so two racing takers read back after both wrote and see the same
records: at most one finds a majority. Not covered, with servers that
ignore conditions: a write that was not acknowledged in time and lands
later, and the release of a failed take landing over the winner's record.

Renewing (`renew`, every ttl/3; every ttl/6 after a failure): read every
lease, write our record with a new expires_at (If-Match on the ETag read)
where the store holds ours, or holds nothing, a released record or one of
a lower epoch (a store that was away or replaced joins again). Renewed
when `s3_needed` acknowledged. Records of another holder with a higher
epoch on enough S3 stores for a majority (with the votes of the stores
this mount does not have) mean the lease was taken over: lost for good
(logged as an error).

Fencing on our side (`holds`): the holder may write only until
FENCE_MARGIN x ttl before the expiry it last wrote, measured on its
monotonic clock from before the write was sent. A mount that cannot
renew on enough S3 stores therefore stops acknowledging writes (see
`ecfs.volume.assembly`: fragment writes, fsync and write(2) fail with EIO)
before another host may take over, and resumes if a renewal succeeds
again in time. Expiry is compared between hosts on their UTC clocks: they
must agree within FENCE_MARGIN x ttl (6 s with the default ttl; NTP does
much better).

Releasing (`release`, at a clean unmount): our record is replaced
(If-Match) by the same record marked released and expired now, so that the
next mount, from any host, needs no takeover. A mount that could not make
its metadata durable keeps its lease until it expires (then a takeover is
explicit).

Concurrency: every request runs in a daemon thread of its own, one per
store, and each phase waits at most a deadline for them (a hung server
costs a thread, never the caller: a late answer is ignored). `take`,
`renew` and `release` are blocking and are called one at a time (the mount
calls `renew` through `ecfs.storage.offload.run_in_thread`); `holds` and
`statistics` are cheap and may be called from anywhere.

Credentials never appear in a message: stores are named by their location
(which holds none) and errors by the store's one-line reason.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ..core.errors import EcfsError, FsError, StoreError, VolumeError
from .offload import run_in_thread
from .s3store import ConditionFailed, S3Store, is_s3_location
from .store import StoreMarker
from .storefactory import open_store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Name of the lease object under a store's prefix.
LEASE_NAME = "lease"
LEASE_FORMAT = 1
LEASE_MAX_BYTES = 4096
#: Environment variable naming this host for the lease instead of its host
#: name: for containers that share a host name, and for tests that play
#: two hosts on one machine.
HOST_ID_ENV = "ECFS_HOST_ID"
#: Default lifetime of the lease (seconds; renewed every third of it).
DEFAULT_TTL = 30.0
#: Shortest lifetime allowed (`-o lease_seconds=`).
MIN_TTL = 2.0
#: Part of the ttl before expiry at which the holder stops writing (the
#: clock difference between hosts it tolerates).
FENCE_MARGIN = 0.2
#: Seconds within which a take must read and write a majority, and the
#: settle time before reading back (see the module docstring).
TAKE_WINDOW = 2.0

#: What `LeaseStatistics.state` may be.
LEASE_STATES = ("held", "fenced", "lost", "released")
#: Takes tried when one is too slow (the first opens the connections).
TAKE_ATTEMPTS = 3

_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


class _TooSlow(Exception):
    """A take did not read and write a majority within its window."""


class LeaseStore(Protocol):
    """What the lease needs of a store (`ecfs.storage.s3store.S3Store` has it)."""

    path: Path

    def read_marker(self) -> StoreMarker: ...

    def get_small_object(self, name: str) -> tuple[bytes, str] | None: ...

    def put_small_object(
        self, name: str, data: bytes, *, if_match: str | None = None, create: bool = False
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds (or held) a lease."""

    host: str
    pid: int
    space: str  # "<boot id>:<pid namespace>": where `pid` means something
    mount: str  # random id of one mount or fsck run

    def __str__(self) -> str:
        return f"host {self.host} (pid {self.pid})"


def host_id() -> str:
    """This host as volumes record it (the lease holder, who paused the
    background work): $ECFS_HOST_ID, else the host name."""
    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


def this_holder() -> Holder:
    """A new holder identity for this process (a fresh mount id)."""
    return Holder(
        host_id(),
        os.getpid(),
        _process_space(),
        secrets.token_hex(16),
    )


def _process_space() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "?"
    return f"{boot}:{ns}"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The content of one lease object (see the module docstring)."""

    volume: str
    holder: Holder
    epoch: int
    taken_at: float  # seconds since the epoch, UTC
    expires_at: float
    ttl: float
    released: bool = False

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": LEASE_FORMAT,
                "volume": self.volume,
                "host": self.holder.host,
                "pid": self.holder.pid,
                "space": self.holder.space,
                "mount": self.holder.mount,
                "epoch": self.epoch,
                "taken_at": utc_text(self.taken_at),
                "expires_at": utc_text(self.expires_at),
                "ttl": self.ttl,
                "released": self.released,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        """Parse a lease object; ValueError (one line) if it is not one."""
        if len(data) > LEASE_MAX_BYTES:
            raise ValueError(f"larger than {LEASE_MAX_BYTES} bytes")
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc["format"] != LEASE_FORMAT:
                raise ValueError(f"unknown lease format {doc['format']!r:.20}")
            holder = Holder(str(doc["host"]), int(doc["pid"]), str(doc["space"]), str(doc["mount"]))
            record = cls(
                str(doc["volume"]),
                holder,
                int(doc["epoch"]),
                _parse_utc(doc["taken_at"]),
                _parse_utc(doc["expires_at"]),
                float(doc["ttl"]),
                bool(doc["released"]),
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a lease object ({type(exc).__name__})") from None
        if record.epoch < 0:
            raise ValueError("negative epoch")
        return record

    def is_live(self, now: float) -> bool:
        return not self.released and self.expires_at > now


def utc_text(seconds: float) -> str:
    """``2026-12-03T21:00:30.000Z`` (milliseconds)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime(_ISO)[:-4] + "Z"


def _parse_utc(text: object) -> float:
    if not isinstance(text, str):
        raise TypeError("time is not a string")
    try:
        moment = datetime.datetime.strptime(text, _ISO).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise TypeError("bad time") from None
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class LeaseStatistics:
    """The lease of a mount, for `ecfs status` (times in UTC text)."""

    state: str  # "held", "fenced" (not renewed in time), "lost", "released"
    host: str
    pid: int
    epoch: int
    taken_at: str
    expires_at: str  # of the last record written
    ttl: float
    stores_held: int  # S3 stores that acknowledged the last renewal
    stores: int  # S3 stores it is kept on
    local_stores: int  # local stores locked by this mount, counted in the majority
    last_error: str | None


@dataclass(slots=True)
class _Seen:
    """What one store's lease object was on a read."""

    record: LeaseRecord | None = None  # None: no object (or unreadable: see problem)
    etag: str | None = None  # None: no object
    error: str | None = None  # the store did not answer
    problem: str | None = None  # an object that is not a lease


class Lease:
    """The lease of one volume over its S3 stores (see the module docstring)."""

    def __init__(
        self,
        stores: Sequence[LeaseStore],
        volume_id: str,
        *,
        ttl: float = DEFAULT_TTL,
        take_window: float = TAKE_WINDOW,
        holder: Holder | None = None,
        volume_stores: int | None = None,
        local_votes: int = 0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`stores`: the S3 stores given; `local_votes`: the volume's local
        stores this process holds locked (`ecfs.storage.lock`); `volume_stores`:
        how many stores the volume has in all (default: those two; see
        `set_volume_stores`)."""
        if ttl < MIN_TTL:
            raise VolumeError(f"the lease must last at least {MIN_TTL:g} s")
        self.stores = list(stores)
        self.volume_id = volume_id
        self.ttl = float(ttl)
        self.take_window = take_window
        self.holder = holder or this_holder()
        self.local_votes = local_votes
        self.volume_stores = max(volume_stores or 0, len(self.stores) + local_votes)
        #: The fencing epoch of this holder (0 until taken; then fixed).
        self.epoch = 0
        self._clock = clock
        self._monotonic = monotonic
        self._taken_at = 0.0
        self._expires_at = 0.0
        self._valid_until = -1.0  # monotonic
        self._held: dict[int, str] = {}  # store -> ETag of our record on it
        self._state = "released"
        self._lost = False
        self._last_error: str | None = None
        self._errors: list[str] = []  # of the last phase, for messages
        self._fenced_logged = False
        #: Held by take, renew and release: one at a time (a renewal
        #: abandoned at unmount must not overwrite the release).
        self._busy = threading.Lock()

    @classmethod
    def for_locations(
        cls,
        paths: Sequence[Path],
        volume_id: str,
        *,
        ttl: float = DEFAULT_TTL,
        take_window: float = TAKE_WINDOW,
        holder: Holder | None = None,
        local_votes: int = 0,
    ) -> Lease | None:
        """The lease over the S3 stores among `paths` (own clients with
        short timeouts, separate from the volume's), or None if there is none."""
        locations = [p for p in paths if is_s3_location(p)]
        if not locations:
            return None
        timeout = max(1.0, ttl / 6)
        stores = [S3Store(p, request_timeout=timeout, max_retries=1) for p in locations]
        return cls(
            stores,
            volume_id,
            ttl=ttl,
            take_window=take_window,
            holder=holder,
            local_votes=local_votes,
        )

    @property
    def quorum(self) -> int:
        """Stores (votes) that make a majority of the volume's."""
        return self.volume_stores // 2 + 1

    @property
    def s3_needed(self) -> int:
        """S3 stores that must hold our record, besides the local votes."""
        return max(0, self.quorum - self.local_votes)

    def set_volume_stores(self, count: int, local_votes: int) -> None:
        """The volume has `count` stores, `local_votes` of them local and
        locked here (learnt once the volume is opened): the majority is of
        those. VolumeError if we hold too few (too few stores were given)."""
        self.local_votes = local_votes
        self.volume_stores = max(count, len(self.stores) + local_votes)
        if len(self._held) < self.s3_needed:
            raise VolumeError(
                "cannot take the volume's lease: "
                + self._short(len(self._held), "given hold it")
                + "; give more of its stores"
            )

    def _short(self, count: int, what: str) -> str:
        # "only 1 of 3 S3 stores answered (2 needed: ...)"
        text = (
            f"only {count} of {len(self.stores)} S3 stores {what} ({self.s3_needed} needed:"
            f" the lease needs a majority of the volume's {self.volume_stores} stores"
        )
        if self.local_votes:
            text += f", {self.local_votes} of them local stores locked here"
        return text + ")"

    # -- asking ----------------------------------------------------------------------

    def holds(self) -> bool:
        """Whether this holder may still write (cheap: a clock read)."""
        return self._monotonic() < self._valid_until

    def check(self) -> None:
        """FsError (EIO) unless `holds`: the reason, for a refused write
        (logged once, by the first refused write or `renew`)."""
        if not self.holds():
            error = FsError(self.why_not())
            if not self._fenced_logged:  # the first refused write, if before `renew` logged it
                self._fenced_logged = True
                log.error("%s", error)
            error.already_logged = True
            raise error

    def why_not(self) -> str:
        if self._lost:
            return "the volume's lease was taken over by another host: unmount and mount again"
        return (
            "the volume's lease could not be renewed on a majority of its S3 stores in time:"
            f" writes are refused until it is ({self._last_error or 'no answer'})"
        )

    def statistics(self) -> LeaseStatistics:
        state = self._state
        if state == "held" and not self.holds():
            state = "fenced"
        return LeaseStatistics(
            state=state,
            host=self.holder.host,
            pid=self.holder.pid,
            epoch=self.epoch,
            taken_at=utc_text(self._taken_at),
            expires_at=utc_text(self._expires_at),
            ttl=self.ttl,
            stores_held=len(self._held),
            stores=len(self.stores),
            local_stores=self.local_votes,
            last_error=self._last_error,
        )

    # -- taking ----------------------------------------------------------------------

    def take(self, *, takeover: bool = False) -> None:
        """Take the lease (see the module docstring) or raise VolumeError
        saying who holds it and until when."""
        with self._busy:
            for attempt in range(TAKE_ATTEMPTS):
                try:
                    return self._take(takeover)
                except _TooSlow:
                    if attempt + 1 == TAKE_ATTEMPTS:
                        raise VolumeError(
                            "cannot take the volume's lease: the S3 stores took more than"
                            f" {self.take_window:g} s to answer, {TAKE_ATTEMPTS} times; try"
                            " again"
                        ) from None
                    log.info("taking the volume's lease took too long; again")

    def _take(self, takeover: bool) -> None:
        start = self._monotonic()
        seen = self._read_all(self.take_window / 2)  # the writes get the rest
        now = self._clock()
        for index, found in seen.items():
            self._may_take(index, found, now, takeover)
        self._require_majority(seen, "read the volume's lease")
        epoch = 1 + max((s.record.epoch for s in seen.values() if s.record), default=0)
        sent = self._monotonic()
        now = self._clock()
        record = LeaseRecord(self.volume_id, self.holder, epoch, now, now + self.ttl, self.ttl)
        written = self._write_all(record, seen, max(0.0, start + self.take_window - sent))
        if self._monotonic() - start > self.take_window or len(written) < self.s3_needed:
            self._undo(record, written)
            if len(written) < self.s3_needed:
                raise VolumeError(
                    "cannot take the volume's lease: "
                    + self._short(len(written), "took it")
                    + self._errors_text()
                )
            raise _TooSlow
        if self.s3_needed:  # else the local votes alone are a majority: no rival can win
            time.sleep(self.take_window)  # settle: a rival's writes have landed
            check = self._read_all(self.take_window)
            ours = {
                i: s.etag
                for i, s in check.items()
                if s.etag is not None and s.record is not None and self._is_ours(s.record, epoch)
            }
        else:
            check, ours = seen, written
        if len(ours) < self.s3_needed:
            self._undo(record, ours)
            holders = {
                str(s.record.holder)
                for s in check.values()
                if s.record is not None
                and not self._is_ours(s.record, epoch)
                and not s.record.released
            }
            raise VolumeError(
                "cannot take the volume's lease: another mount took it at the same time"
                + (f" ({', '.join(sorted(holders))})" if holders else "")
                + f"; {self._short(len(ours), 'hold ours after writing')} (or a server"
                " ignored a conditional write); try again"
            )
        self.epoch = epoch
        self._taken_at = record.taken_at
        self._expires_at = record.expires_at
        self._valid_until = sent + self.ttl * (1 - FENCE_MARGIN)
        self._held = ours
        self._state = "held"
        self._last_error = None
        log.info(
            "took the volume's lease (epoch %d) on %d of %d S3 stores, until %s UTC",
            epoch,
            len(self._held),
            len(self.stores),
            utc_text(record.expires_at),
        )

    def _is_ours(self, record: LeaseRecord, epoch: int) -> bool:
        return (
            record.holder.mount == self.holder.mount
            and record.epoch == epoch
            and not record.released
        )

    def _may_take(self, index: int, found: _Seen, now: float, takeover: bool) -> None:
        """VolumeError if the lease on store `index` keeps us from taking."""
        where = self.stores[index].path
        if found.problem is not None:
            if not takeover:
                raise VolumeError(
                    f"the lease object on {where} cannot be read ({found.problem}); if no other"
                    " host uses the volume, mount with --takeover to replace it"
                )
            log.warning("replacing the unreadable lease object on %s", where)
            return
        record = found.record
        if record is None or record.released:
            return
        holder = record.holder
        if record.volume != self.volume_id:
            if not takeover:
                raise VolumeError(
                    f"the lease object on {where} is of volume {record.volume}, not this one;"
                    " if no other host uses the volume, mount with --takeover to replace it"
                )
            return
        if self._is_dead_process_here(holder):
            log.warning(
                "taking the volume's lease from %s: that process of this host no longer exists",
                holder,
            )
            return
        until = utc_text(record.expires_at)
        if record.is_live(now):
            raise VolumeError(
                f"volume {self.volume_id} is in use: its lease is held by {holder} until"
                f" {until} UTC ({record.expires_at - now:.0f} s from now, renewed while it"
                " runs); unmount it there first (if that host died, the lease expires then,"
                " and mounting with --takeover takes it over)"
            )
        if not takeover:
            raise VolumeError(
                f"volume {self.volume_id} was not unmounted cleanly: its lease, held by"
                f" {holder}, expired at {until} UTC ({now - record.expires_at:.0f} s ago);"
                " that mount died or lost its S3 stores. If it is no longer running, mount"
                " with --takeover"
            )
        log.warning("taking over the volume's lease from %s (expired at %s UTC)", holder, until)

    def _is_dead_process_here(self, holder: Holder) -> bool:
        """Whether `holder` is a process of this host (same name, boot and
        pid namespace) that no longer exists (a reused pid counts as alive)."""
        if holder.host != self.holder.host or holder.space != self.holder.space:
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _undo(self, record: LeaseRecord, written: dict[int, str]) -> None:
        """Mark released what we wrote of `record` (a failed take)."""
        self._replace_all(_released(record, self._clock()), written, self.take_window)

    # -- renewing ------------------------------------------------------------------

    def renew(self) -> bool:
        """One renewal (see the module docstring); whether a majority has
        our record with the new expiry. Logs what changed."""
        with self._busy:
            return self._renew()

    def _renew(self) -> bool:
        if self._lost or self._state != "held":
            return False
        phase = max(1.0, self.ttl / 6)
        sent = self._monotonic()
        seen = self._read_all(phase)
        rivals = [
            s.record for s in seen.values()
            if s.record is not None and s.record.holder.mount != self.holder.mount
            and not s.record.released and s.record.epoch > self.epoch
        ]  # fmt: skip
        # A rival has none of our local votes: it needs a majority elsewhere.
        free_votes = self.volume_stores - len(self.stores) - self.local_votes
        if rivals and len(rivals) + free_votes >= self.quorum:
            self._lose(rivals[0])
            return False
        now = self._clock()
        record = LeaseRecord(
            self.volume_id, self.holder, self.epoch, self._taken_at, now + self.ttl, self.ttl
        )
        targets = {i: s for i, s in seen.items() if s.error is None and self._may_renew_on(s)}
        written = self._write_all(record, targets, phase)
        if len(written) >= self.s3_needed:
            was_valid = self.holds()
            self._held = written
            self._expires_at = record.expires_at
            self._valid_until = sent + self.ttl * (1 - FENCE_MARGIN)
            self._last_error = None
            if not was_valid or self._fenced_logged:
                log.warning("the volume's lease is renewed again: writes resume")
            self._fenced_logged = False
            return True
        self._last_error = self._short(len(written), "renewed it") + self._errors_text()
        self._held = written
        if self.holds():
            log.warning(
                "cannot renew the volume's lease: %s; writes stop in %.0f s unless renewed",
                self._last_error,
                self._valid_until - self._monotonic(),
            )
        elif not self._fenced_logged:
            self._fenced_logged = True
            log.error(
                "the volume's lease was not renewed in time (%s): writes fail with EIO until it is",
                self._last_error,
            )
        return False

    def _may_renew_on(self, found: _Seen) -> bool:
        record = found.record
        if found.problem is not None:
            return False
        if record is None:
            return True
        if record.holder.mount == self.holder.mount:
            return record.epoch == self.epoch
        return record.released or record.epoch < self.epoch

    def _lose(self, rival: LeaseRecord) -> None:
        self._lost = True
        self._state = "lost"
        self._valid_until = -1.0
        self._held = {}
        self._last_error = f"taken over by {rival.holder} (epoch {rival.epoch})"
        log.error(
            "the volume's lease was taken over by %s (epoch %d, ours %d): writes fail with"
            " EIO; unmount",
            rival.holder,
            rival.epoch,
            self.epoch,
        )

    def renew_interval(self) -> float:
        """Seconds until the next renewal: a third of the ttl, a sixth
        after a failed one."""
        return self.ttl / 3 if self._last_error is None else self.ttl / 6

    async def keep_renewed(self) -> None:
        """Renew until cancelled (or lost): the mount's background task."""
        while not self._lost and self._state == "held":
            await trio.sleep(self.renew_interval())
            await run_in_thread(self.renew, abandon_on_cancel=True)

    # -- releasing -----------------------------------------------------------------

    def release(self) -> None:
        """Mark our record released on every store that holds it (best
        effort: a store that does not answer keeps it until it expires)."""
        with self._busy:
            self._release()

    def _release(self) -> None:
        if self._state != "held":
            return
        self._state = "released"
        self._valid_until = -1.0
        seen = self._read_all(max(1.0, self.ttl / 6))
        now = self._clock()
        mine = {
            i: s.etag
            for i, s in seen.items()
            if s.record is not None and s.etag is not None and self._is_ours(s.record, self.epoch)
        }
        if not mine:
            return
        released = _released(
            LeaseRecord(self.volume_id, self.holder, self.epoch, self._taken_at, now, self.ttl), now
        )
        done = self._replace_all(released, mine, max(1.0, self.ttl / 6))
        failed = [str(self.stores[i].path) for i, r in done.items() if isinstance(r, Exception)]
        failed += [str(self.stores[i].path) for i in mine if i not in done]
        if failed:
            log.warning("the lease stays on %s until it expires", ", ".join(failed))
        else:
            log.info("released the volume's lease (epoch %d)", self.epoch)

    # -- requests --------------------------------------------------------------------

    def _read_all(self, timeout: float) -> dict[int, _Seen]:
        """Every store's lease (a store that did not answer in time: error)."""
        results = self._call_all(
            {
                i: functools.partial(s.get_small_object, LEASE_NAME)
                for i, s in enumerate(self.stores)
            },
            timeout,
        )
        seen: dict[int, _Seen] = {}
        for index in range(len(self.stores)):
            result = results.get(index)
            if index not in results:
                seen[index] = _Seen(error=f"{self.stores[index].path}: no answer in {timeout:g} s")
            elif isinstance(result, Exception):
                seen[index] = _Seen(error=str(result))
            elif result is None:
                seen[index] = _Seen()
            else:
                data, etag = result
                try:
                    seen[index] = _Seen(LeaseRecord.from_json(data), etag)
                except ValueError as exc:
                    seen[index] = _Seen(etag=etag, problem=str(exc))
        self._errors = [s.error for s in seen.values() if s.error]
        return seen

    def _write_all(
        self, record: LeaseRecord, seen: dict[int, _Seen], timeout: float
    ) -> dict[int, str]:
        """Write `record` where the stores answered the read, conditionally
        on what was read; store -> new ETag of those that took it."""
        data = record.to_json()
        calls: dict[int, Callable[[], str]] = {}
        for index, found in seen.items():
            if found.error is not None:
                continue
            put = self.stores[index].put_small_object
            if found.etag is None:
                calls[index] = functools.partial(put, LEASE_NAME, data, create=True)
            else:
                calls[index] = functools.partial(put, LEASE_NAME, data, if_match=found.etag)
        results = self._call_all(calls, timeout)
        written = {i: r for i, r in results.items() if isinstance(r, str)}
        self._errors = [str(r) for r in results.values() if isinstance(r, Exception)]
        self._errors += [
            f"{self.stores[i].path}: no answer in {timeout:g} s" for i in calls if i not in results
        ]
        return written

    def _replace_all(
        self, record: LeaseRecord, etags: dict[int, str], timeout: float
    ) -> dict[int, str | Exception]:
        """Write `record` over the version `etags` names on each store."""
        data = record.to_json()
        return self._call_all(
            {
                i: functools.partial(
                    self.stores[i].put_small_object, LEASE_NAME, data, if_match=etag
                )
                for i, etag in etags.items()
            },
            timeout,
        )

    def _require_majority(self, seen: dict[int, _Seen], what: str) -> None:
        answered = sum(1 for s in seen.values() if s.error is None)
        if answered < self.s3_needed:
            raise VolumeError(
                f"cannot {what}: {self._short(answered, 'answered')}{self._errors_text()}"
            )

    def _errors_text(self) -> str:
        return f": {'; '.join(self._errors[:3])}" if self._errors else ""

    @staticmethod
    def _call_all(calls: dict[int, Callable[[], T]], timeout: float) -> dict[int, T | Exception]:
        """Run each call in a daemon thread of its own; the results (or
        EcfsErrors) of those done within `timeout` seconds."""
        results: dict[int, T | Exception] = {}
        done = threading.Condition()

        def run(index: int, call: Callable[[], T]) -> None:
            try:
                result: T | Exception = call()
            except ConditionFailed as exc:
                result = exc
            except EcfsError as exc:
                result = exc
            except Exception as exc:  # a bug: reported as this store's failure
                log.exception("lease request failed")
                result = StoreError(f"{type(exc).__name__}: {exc}")
            with done:
                results[index] = result
                done.notify_all()

        for index, call in calls.items():
            threading.Thread(target=run, args=(index, call), name="ecfs lease", daemon=True).start()
        deadline = time.monotonic() + timeout
        with done:
            while len(results) < len(calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                done.wait(left)
            return dict(results)


def _released(record: LeaseRecord, now: float) -> LeaseRecord:
    return LeaseRecord(
        record.volume, record.holder, record.epoch, record.taken_at, now, record.ttl, True
    )


def lease_for_stores(
    paths: Sequence[Path],
    locked: Collection[Path],
    *,
    ttl: float = DEFAULT_TTL,
    holder: Holder | None = None,
) -> Lease | None:
    """The lease of the volume whose stores are `paths` (its id from the
    markers most of them carry), over the S3 stores among them, counting
    the local stores of the volume in `locked` (held locked by the caller)
    as votes; None if there is no S3 store. Unreadable markers are skipped
    quietly (opening the volume reports them)."""
    lease = Lease.for_locations(paths, "unknown", ttl=ttl, holder=holder)
    if lease is None:
        return None
    found: dict[Path, str] = {}
    for path in paths:
        if not is_s3_location(path):
            try:
                found[path] = open_store(path).read_marker().volume_id
            except StoreError:
                continue
    # The S3 stores' markers, with the lease's short timeouts (in parallel).
    markers = lease._call_all(
        {i: store.read_marker for i, store in enumerate(lease.stores)}, max(1.0, ttl / 6)
    )
    for index, marker in markers.items():
        if not isinstance(marker, Exception):
            found[lease.stores[index].path] = marker.volume_id
    volumes = Counter(found.values())
    if volumes:
        lease.volume_id = volumes.most_common(1)[0][0]
    # Never a lease object in another volume's store given by mistake (one
    # whose marker cannot be read is kept: it may be ours, and away).
    lease.stores = [
        s for s in lease.stores if found.get(s.path, lease.volume_id) == lease.volume_id
    ]
    if not lease.stores:
        return None
    lease.local_votes = sum(1 for p in locked if found.get(p) == lease.volume_id)
    lease.volume_stores = len(lease.stores) + lease.local_votes
    return lease


@contextlib.contextmanager
def held_lease(lease: Lease | None, *, takeover: bool = False) -> Iterator[Lease | None]:
    """For blocking users (fsck): take `lease` (if any), renew it from a
    thread while inside, release it on the way out."""
    if lease is None:
        yield None
        return
    lease.take(takeover=takeover)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease.renew_interval()):
            lease.renew()

    thread = threading.Thread(target=renew, name="ecfs lease renewal", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(lease.ttl)
        lease.release()
