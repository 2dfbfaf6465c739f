"""The volume lease (ecfs.storage.lease) against real S3 endpoints (moto
servers, one per store): take, refusal naming the holder and expiry,
expiry and explicit takeover, renewal, release, a majority with a server
gone, concurrent takers, and the read-back that catches a server ignoring
conditional writes. Mount-level tests are in test_lease_mount.py."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecfs.core.errors import FsError, VolumeError
from ecfs.storage.lease import LEASE_NAME, Holder, Lease, LeaseRecord, this_holder
from ecfs.storage.s3store import S3Store
from ecfs.storage.store import StoreMarker

from .s3servers import ACCESS_KEY, SECRET_KEY, MotoServer, moto_servers

TTL = 3.0
WINDOW = 0.5
VOLUME = "0b7e5c8e4a434b5e9d553c2a1f0e9a01"

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture(scope="module")
def servers() -> Iterator[list[MotoServer]]:
    with moto_servers(3) as running:
        yield running


_prefixes = iter(range(10**6))


def _stores(servers: list[MotoServer], prefix: str | None = None) -> list[S3Store]:
    """One S3 store per server, under a prefix no other test uses."""
    prefix = prefix or f"t{next(_prefixes)}"
    stores = [
        S3Store(s.location(prefix=prefix), request_timeout=2.0, max_retries=1) for s in servers
    ]
    for store in stores:
        store._create_bucket_if_missing()
    return stores


def _holder(host: str) -> Holder:
    return Holder(host, 4242, "space", this_holder().mount)


def _lease(stores: list[S3Store], host: str, ttl: float = TTL, **kw: object) -> Lease:
    return Lease(stores, VOLUME, ttl=ttl, take_window=WINDOW, holder=_holder(host), **kw)  # type: ignore[arg-type]


def _records(stores: list[S3Store]) -> list[LeaseRecord | None]:
    found = []
    for store in stores:
        got = store.get_small_object(LEASE_NAME)
        found.append(None if got is None else LeaseRecord.from_json(got[0]))
    return found


def _no_secret(text: str) -> None:
    assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_take_writes_the_record_on_every_store_and_a_second_host_is_refused(
    servers: list[MotoServer],
) -> None:
    stores = _stores(servers)
    first = _lease(stores, "host-a")
    first.take()
    assert first.holds() and first.epoch == 1
    records = _records(stores)
    assert all(r is not None and r.holder == first.holder and r.epoch == 1 for r in records)
    second = _lease(stores, "host-b")
    with pytest.raises(VolumeError) as refused:
        second.take(takeover=True)  # a live lease is never taken over
    message = str(refused.value)
    assert "held by host host-a (pid 4242) until" in message
    assert re.search(r"until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z UTC \(\d+ s from now", message)
    _no_secret(message)
    assert not second.holds()
    assert _records(stores) == records  # the refused taker wrote nothing


def test_an_expired_lease_needs_an_explicit_takeover_and_the_epoch_grows(
    servers: list[MotoServer],
) -> None:
    stores = _stores(servers)
    first = _lease(stores, "host-a", ttl=2.0)
    first.take()
    time.sleep(2.2)  # never renewed: expired
    assert not first.holds()  # it stopped itself before the expiry
    second = _lease(stores, "host-b")
    with pytest.raises(VolumeError) as refused:
        second.take()
    message = str(refused.value)
    assert "not unmounted cleanly" in message and "host host-a (pid 4242)" in message
    assert "expired at" in message and "--takeover" in message
    second.take(takeover=True)
    assert second.holds() and second.epoch == first.epoch + 1
    # The old holder finds out at its next renewal: lost for good.
    assert not first.renew()
    assert first.statistics().state == "lost"
    with pytest.raises(FsError, match="taken over by another host"):
        first.check()
    assert all(r is not None and r.holder == second.holder for r in _records(stores))


def test_renewal_extends_the_lease_and_release_frees_it_for_any_host(
    servers: list[MotoServer],
) -> None:
    stores = _stores(servers)
    first = _lease(stores, "host-a", ttl=2.0)
    first.take()
    before = first.statistics().expires_at
    for _ in range(3):  # 3 s in all: past the first expiry
        time.sleep(1.0)
        assert first.renew()
        assert first.holds()
    stats = first.statistics()
    assert stats.expires_at > before and stats.state == "held" and stats.stores_held == 3
    with pytest.raises(VolumeError, match="in use"):
        _lease(stores, "host-b").take()
    first.release()
    assert not first.holds() and first.statistics().state == "released"
    assert all(r is not None and r.released for r in _records(stores))
    second = _lease(stores, "host-b")
    second.take()  # no takeover needed after a clean release
    assert second.epoch == 2


def test_a_majority_suffices_and_a_minority_refuses() -> None:
    with moto_servers(3) as servers:
        stores = _stores(servers)
        servers[2].kill()
        first = _lease(stores, "host-a")
        first.take()  # 2 of 3
        assert first.statistics().stores_held == 2
        assert first.renew()
        servers[1].kill()
        second = _lease(stores, "host-b")
        with pytest.raises(VolumeError, match="held by host host-a"):
            second.take()  # the one store that answers names the holder
        assert not first.renew()  # 1 of 3: not renewed ...
        assert first.holds()  # ... but still valid until its fence time
        assert "only 1 of 3" in (first.statistics().last_error or "")
        first.release()
        with pytest.raises(VolumeError) as refused:
            second.take()
        message = str(refused.value)
        assert "only 1 of 3 S3 stores answered (2 needed: the lease needs a majority" in message
        _no_secret(message)


def test_a_store_that_comes_back_gets_the_lease_at_the_next_renewal() -> None:
    with moto_servers(3) as servers:
        stores = _stores(servers, "back")
        servers[2].pause()
        try:
            first = _lease(stores, "host-a")
            first.take()
        finally:
            servers[2].resume()
        assert first.statistics().stores_held == 2
        assert first.renew()
        assert first.statistics().stores_held == 3
        assert all(r is not None and r.holder == first.holder for r in _records(stores))


def test_a_dead_process_of_this_host_is_taken_over_at_once(servers: list[MotoServer]) -> None:
    stores = _stores(servers)
    me = this_holder()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    crashed = Lease(stores, VOLUME, ttl=30.0, take_window=WINDOW,
                    holder=Holder(me.host, int(dead.stdout), me.space, "crashed-mount"))  # fmt: skip
    crashed.take()  # live for 30 s, but its process is gone
    again = Lease(stores, VOLUME, ttl=TTL, take_window=WINDOW, holder=me)
    again.take()
    assert again.epoch == 2
    # A live process of this host is not.
    alive = Lease(stores, VOLUME, ttl=TTL, take_window=WINDOW, holder=this_holder())
    with pytest.raises(VolumeError, match=f"held by host {re.escape(me.host)}"):
        alive.take()


class IgnoresConditions:
    """An S3 store behind a server that ignores If-Match and If-None-Match
    (some have), and that lets both racing takers read before either
    writes (`barrier`)."""

    def __init__(self, store: S3Store, barrier: threading.Barrier) -> None:
        self.store = store
        self.path = store.path
        self.barrier = barrier
        self.reads = 0

    def read_marker(self) -> StoreMarker:
        return self.store.read_marker()

    def get_small_object(self, name: str) -> tuple[bytes, str] | None:
        got = self.store.get_small_object(name)
        self.reads += 1
        if self.reads <= 2:  # each taker's first read: wait for the other's
            self.barrier.wait(10)
        return got

    def put_small_object(
        self, name: str, data: bytes, *, if_match: str | None = None, create: bool = False
    ) -> str:
        return self.store.put_small_object(name, data)


def _race(stores_of: list[list[object]]) -> list[Lease | VolumeError]:
    outcomes: list[Lease | VolumeError] = []
    lock = threading.Lock()

    def take(index: int, stores: list[object]) -> None:
        lease = _lease(stores, f"host-{index}")  # type: ignore[arg-type]
        try:
            lease.take()
            result: Lease | VolumeError = lease
        except VolumeError as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=take, args=(i, s)) for i, s in enumerate(stores_of)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_verify_catches_servers_that_ignore_conditional_writes(servers: list[MotoServer]) -> None:
    """Both takers read an empty volume, then both write (the servers
    accept both writes): only the read-back tells, and exactly one wins."""
    stores = _stores(servers)
    barrier = threading.Barrier(2 * len(stores))
    shared = [IgnoresConditions(s, barrier) for s in stores]
    outcomes = _race([list(shared), list(shared)])
    winners = [o for o in outcomes if isinstance(o, Lease)]
    losers = [o for o in outcomes if isinstance(o, VolumeError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "at the same time" in str(losers[0])
    records = _records(stores)
    assert sum(1 for r in records if r and r.holder == winners[0].holder and not r.released) >= 2
    assert winners[0].renew()  # and it keeps it


def test_two_concurrent_takers_one_wins(servers: list[MotoServer]) -> None:
    for _ in range(3):
        stores = _stores(servers)
        outcomes = _race([stores, [S3Store(s.path) for s in stores]])
        assert sum(isinstance(o, Lease) for o in outcomes) == 1, outcomes


def test_for_locations_takes_only_s3_stores(servers: list[MotoServer], tmp_path: object) -> None:
    from pathlib import Path

    assert Lease.for_locations([Path("/srv/d1")], VOLUME) is None
    stores = _stores(servers)
    lease = Lease.for_locations([Path("/srv/d1"), *(s.path for s in stores)], VOLUME, ttl=TTL,
                                take_window=WINDOW)  # fmt: skip
    assert lease is not None and len(lease.stores) == 3
    lease.take()
    with pytest.raises(VolumeError, match="needs a majority"):
        lease.set_volume_stores(7, 0)  # 3 given of 7: not a majority
    lease.set_volume_stores(7, 1)  # 3 and a local store locked here: 4 of 7
    assert lease.quorum == 4 and lease.s3_needed == 3
    lease.release()


def test_local_stores_locked_here_count_in_the_majority() -> None:
    """A hybrid volume (4 local stores, 2 S3 parity stores): the local
    stores are a majority, so the mount holds the lease with both servers
    gone, and a host without the local stores can never take it."""
    with moto_servers(2) as servers:
        stores = _stores(servers)
        first = _lease(stores, "host-a", local_votes=4)
        first.take()
        assert first.statistics().stores_held == 2
        other = _lease(stores, "host-b", volume_stores=6)
        with pytest.raises(VolumeError, match="held by host host-a"):
            other.take(takeover=True)
        first.release()
        with pytest.raises(VolumeError, match=r"only 2 of 2 S3 stores answered \(4 needed"):
            other.take()  # 2 of 6 stores: never a majority
        assert all(r is not None and r.released for r in _records(stores))  # untouched
        for server in servers:
            server.kill()
        alone = _lease(stores, "host-a", local_votes=4)
        alone.take()  # no server answers: the 4 local stores are a majority of 6
        assert alone.holds() and alone.renew()


def test_the_lease_of_an_s3_only_volume_finds_its_id_on_the_servers(
    servers: list[MotoServer],
) -> None:
    """Without a local store, the volume id comes from the S3 stores'
    markers, read with the lease's short timeouts (a hung server is not
    waited for)."""
    import uuid

    from ecfs.storage.lease import lease_for_stores
    from ecfs.storage.store import STORE_FORMAT

    prefix = f"t{next(_prefixes)}"
    paths = []
    for server in servers:
        marker = StoreMarker(VOLUME, uuid.uuid4().hex, STORE_FORMAT, 2, 1, 1 << 20, 4096, 65536)
        paths.append(S3Store.initialise(server.location(prefix=prefix), marker).path)
    other = "f" * 32  # a store of another volume, given by mistake
    marker = StoreMarker(other, uuid.uuid4().hex, STORE_FORMAT, 2, 1, 1 << 20, 4096, 65536)
    stray = S3Store.initialise(servers[0].location(prefix=prefix + "x"), marker)
    servers[2].pause()
    try:
        lease = lease_for_stores([*paths, stray.path], [], ttl=TTL)
        assert lease is not None
        assert lease.volume_id == VOLUME and lease.local_votes == 0 and lease.quorum == 2
        assert [s.path for s in lease.stores] == paths  # the paused one kept, the stray not
    finally:
        servers[2].resume()
    assert lease_for_stores([Path("/srv/d1")], [Path("/srv/d1")]) is None
