"""The S3 store (ecfs.storage.s3store) against real local S3 endpoints: one
moto_server process per store (tests/s3servers.py), stopped by PID.

Covers the location form, credentials from the standard AWS places (and
never in a message), bucket creation, retries of throttling and 5xx
answers (against a tiny local HTTP server that answers 503 SlowDown and
429 first), and the faults at store level: a hung server (SIGSTOP: the
call times out and is abandoned), a killed one (gone), a corrupted object
(the fragment checksum catches it). Then a whole in-process volume
(reader, writer, filedata, scrub, repair, garbage: tests/inprocess.py's
way, without FUSE) over S3 stores: degraded reads with a server killed,
routing around a hung one, scrub finding bit rot.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
import trio

from ecfs.core import fragment
from ecfs.core.errors import FragmentMissing, NoSpace, StoreError, StoreTimeout, VolumeError
from ecfs.storage.handles import Expected, read_header
from ecfs.storage.metadb.chunks import RepairEntry, RepairQueue
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import create_database
from ecfs.storage.offload import StoreRunner, StoreState
from ecfs.storage.s3store import S3Location, S3Store, find_credentials, is_s3_location
from ecfs.storage.store import STORE_FORMAT, StoreMarker
from ecfs.storage.storefactory import open_store
from ecfs.volume.assembly import Volume

from .s3servers import ACCESS_KEY, SECRET_KEY, MotoServer, moto_servers, s3_environment

K, M = 3, 2
CELL = 4096
FRAGMENT = 4 * CELL
CHUNK = K * FRAGMENT
ENV = s3_environment()


def _marker(volume_id: str | None = None) -> StoreMarker:
    return StoreMarker(
        volume_id or uuid.uuid4().hex, uuid.uuid4().hex, STORE_FORMAT, K, M, FRAGMENT, CELL, 0
    )


def _data(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def _new_store(server: MotoServer, **kwargs: object) -> S3Store:
    location = server.location(bucket="unit", prefix=f"s/{uuid.uuid4().hex}")
    return S3Store.initialise(location, _marker(), environ=ENV, **kwargs)  # type: ignore[arg-type]


# ---- location


def test_location_forms_and_their_path_round_trip() -> None:
    text = "s3://photos-a/ecfs/one?endpoint=https://nas2.example:9000&profile=nas"
    loc = S3Location.parse(text)
    assert loc == S3Location("photos-a", "ecfs/one", "https://nas2.example:9000", "nas")
    assert str(loc) == text
    # Locations travel as paths, which collapse "//": still the same store.
    assert S3Location.parse(Path(text)) == loc
    assert isinstance(open_store(Path(text)), S3Store)
    assert S3Location.parse("s3://bucket") == S3Location("bucket")
    assert S3Location.parse("s3://b-1/p/?region=eu-west-3").region == "eu-west-3"
    assert is_s3_location("s3://x") and not is_s3_location("/srv/s3:/x")
    for bad in (
        "s3://UPPER/x",
        "s3://b/../x",
        "s3://bb/x?endpoint=ftp://h",
        "s3://bb/x?endpoint=http://user:pw@h",
        "s3://bb/x?secret_access_key=abc",  # credentials never in a location
        "s3://bb/x?profile=a&profile=b",
    ):
        with pytest.raises(VolumeError):
            S3Location.parse(bad)


# ---- credentials


def test_credentials_from_the_standard_places_only(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n"
        "[nas]\naws_access_key_id = NASKEY\naws_secret_access_key = nassecret\n"
        "aws_session_token = nastoken\n"
    )
    config = tmp_path / "config"
    config.write_text(
        "[profile cfg]\naws_access_key_id = CFGKEY\naws_secret_access_key = cfgsecret\n"
        "region = eu-north-1\n"
    )
    files = {
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_CONFIG_FILE": str(config),
        "HOME": str(tmp_path),
    }
    env = {**files, "AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    assert find_credentials(None, env).access_key_id == "ENVKEY"
    assert find_credentials("nas", env).access_key_id == "NASKEY"  # profile= wins
    assert find_credentials("nas", env).session_token == "nastoken"
    assert find_credentials(None, files).access_key_id == "DEFKEY"
    assert find_credentials(None, {**files, "AWS_PROFILE": "nas"}).access_key_id == "NASKEY"
    cfg = find_credentials("cfg", files)
    assert (cfg.access_key_id, cfg.region) == ("CFGKEY", "eu-north-1")
    assert "secret" not in repr(cfg) and "CFGKEY" not in repr(cfg)
    with pytest.raises(StoreError, match="no AWS credentials") as info:
        find_credentials("missing", files)
    assert "secret" not in str(info.value)


def test_the_secret_is_in_no_message_or_repr(moto: MotoServer) -> None:
    store = _new_store(moto)
    messages = [repr(store), str(store.path), repr(store.credentials())]
    with pytest.raises(FragmentMissing) as missing:
        store.read_fragment(1, 0, 0, memoryview(bytearray(10)))
    messages.append(str(missing.value))
    no_bucket = S3Store(f"s3://nobucket/x?endpoint={moto.endpoint}", environ=ENV)
    dead = S3Store("s3://unit/x?endpoint=http://127.0.0.1:9", environ=ENV, max_retries=0)
    for other in (no_bucket, dead):
        with pytest.raises(StoreError) as info:
            other.read_marker()
        messages.append(str(info.value))
    for text in messages:
        assert SECRET_KEY not in text and ACCESS_KEY not in text, text


# ---- creation


def test_initialise_creates_the_bucket_and_refuses_a_used_prefix(moto: MotoServer) -> None:
    bucket = f"new-{uuid.uuid4().hex[:12]}"
    location = f"s3://{bucket}/vol/a?endpoint={moto.endpoint}"
    store = S3Store.initialise(location, _marker(), environ=ENV)
    assert store.read_marker().k == K
    with pytest.raises(VolumeError, match="belongs to volume"):
        S3Store.initialise(location, _marker(), environ=ENV)
    store.write_fragment(9, 1, [b"x"])
    store.retire()
    with pytest.raises(VolumeError, match="not empty"):
        S3Store.initialise(location, _marker(), environ=ENV)
    # Another prefix of the same bucket is another store.
    S3Store.initialise(f"s3://{bucket}/vol/b?endpoint={moto.endpoint}", _marker(), environ=ENV)


# ---- retries


class _Throttling(http.server.BaseHTTPRequestHandler):
    """Answers 503 SlowDown, then 429, then 500, then the object."""

    answers: list[int] = []
    body = b"0123456789"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status = self.answers.pop(0) if self.answers else 206
        if status == 206:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 2-5/{len(self.body)}")
            self.send_header("Content-Length", "4")
            self.send_header("ETag", '"e"')
            self.send_header("Last-Modified", "Thu, 03 Dec 2026 10:00:00 GMT")
            self.end_headers()
            self.wfile.write(self.body[2:6])
            return
        code = {503: "SlowDown", 429: "TooManyRequests", 500: "InternalError"}[status]
        payload = f"<Error><Code>{code}</Code></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, code = self.put_answers.pop(0)
        payload = f"<Error><Code>{code}</Code></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    put_answers: list[tuple[int, str]] = []

    def log_message(self, *args: object) -> None:
        pass


def test_throttling_and_5xx_are_retried_with_backoff() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Throttling.answers = [503, 429, 500]
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        store = S3Store(f"s3://bkt/p?endpoint={endpoint}", environ=ENV)
        dest = memoryview(bytearray(4))
        start = time.monotonic()
        assert store.read_fragment(1, 0, 2, dest) == 4 and bytes(dest) == b"2345"
        assert _Throttling.answers == []  # three failures, then success
        assert time.monotonic() - start >= 0.1  # backed off
        _Throttling.answers = [503] * 10
        fails = S3Store(f"s3://bkt/p?endpoint={endpoint}", environ=ENV, max_retries=2)
        with pytest.raises(StoreError, match="503"):
            fails.read_fragment(1, 0, 2, dest)
    finally:
        server.shutdown()
        server.server_close()


def test_a_full_server_is_no_space_not_a_sick_store() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        store = S3Store(f"s3://bkt/p?endpoint={endpoint}", environ=ENV, max_retries=0)
        _Throttling.put_answers = [(403, "QuotaExceeded"), (507, "InsufficientStorage")]
        for _ in range(2):
            with pytest.raises(NoSpace):
                store.write_fragment(1, 0, [b"x"])
        _Throttling.put_answers = [(403, "AccessDenied")]
        with pytest.raises(StoreError, match="AccessDenied") as info:
            store.write_fragment(1, 0, [b"x"])
        assert not isinstance(info.value, NoSpace)
    finally:
        server.shutdown()
        server.server_close()


# ---- faults at store level


@pytest.mark.trio
async def test_a_hung_server_times_out_and_the_call_is_abandoned() -> None:
    with MotoServer() as server:
        store = _new_store(server, request_timeout=2.0, max_retries=0)
        store.write_fragment(3, 0, [b"abc"])
        runner = StoreRunner(0, store, timeout=0.5)
        server.pause()
        try:
            with pytest.raises(StoreTimeout):
                await runner.call(store.read_fragment, 3, 0, 0, memoryview(bytearray(3)))
            assert runner.state is StoreState.FAILED
            assert runner.statistics().abandoned == 1
            # The abandoned request ends within the client's request timeout.
            for _ in range(400):
                if not runner.statistics().abandoned:
                    break
                await trio.sleep(0.05)
            assert runner.statistics().abandoned == 0
        finally:
            server.resume()
        assert await runner.probe() is True


def test_a_killed_server_is_a_store_error_not_a_missing_fragment() -> None:
    with MotoServer() as server:
        store = _new_store(server, request_timeout=2.0, max_retries=0)
        store.write_fragment(3, 0, [b"abc"])
        server.kill()
        dest = memoryview(bytearray(3))
        for call in (
            lambda: store.read_fragment(3, 0, 0, dest),
            store.probe,
            store.list_fragments,
            lambda: store.write_fragment(3, 1, [b"x"]),
            lambda: store.delete_fragment(3, 0),
        ):
            with pytest.raises(StoreError) as info:
                call()
            assert not isinstance(info.value, FragmentMissing)


def test_prefetched_bytes_are_read_without_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with MotoServer() as server:
        store = _new_store(server, request_timeout=2.0, max_retries=0)
        data = _data(3 * CELL)
        store.write_fragment(5, 0, [data])
        store.write_fragment(5, 1, [data])
        store.prefetch(5, 0, 0, len(data))
        dest = memoryview(bytearray(CELL))
        for _ in range(400):  # the background GET lands
            if store.read_fragment_cached(5, 0, CELL, dest):
                break
            time.sleep(0.01)
        assert bytes(dest) == data[CELL : 2 * CELL]
        server.kill()
        assert store.read_fragment(5, 0, 2 * CELL, dest) == CELL  # no server needed
        assert bytes(dest) == data[2 * CELL :]
        with pytest.raises(StoreError):
            store.read_fragment(5, 1, 0, dest)  # not prefetched: a request, which fails
        # At most PREFETCH_BYTES are kept: the oldest prefetch goes first.
        monkeypatch.setattr("ecfs.storage.s3store.PREFETCH_BYTES", 2 * len(data))
        store.prefetch(5, 1, 0, len(data))
        store.prefetch(5, 2, 0, len(data))
        assert set(store._prefetches) == {(5, 1), (5, 2)}
        store.close()  # drops them, never blocks
        assert not store._prefetches


def test_a_corrupted_object_is_caught_by_the_fragment_checksums(moto: MotoServer) -> None:
    store = _new_store(moto)
    volume_id = uuid.UUID(store.read_marker().volume_id).bytes
    payload = _data(FRAGMENT)
    parts = fragment.build_fragment(volume_id, 77, 1, K, M, CELL, payload)
    store.write_fragment(77, 1, parts)
    expected = Expected(volume_id, K, M, CELL)
    header, _ = read_header(store, 77, 1, expected)
    cell = memoryview(bytearray(CELL))
    store.read_fragment(77, 1, header.payload_offset + CELL, cell)
    assert fragment.bad_cells(header, CELL, cell) == []
    # Bit rot on the server: the object's bytes change under the same key.
    stored = bytearray(b"".join(bytes(p) for p in parts))
    stored[header.payload_offset + CELL + 100] ^= 0x01
    obstore.put(store._store(), store.fragment_relpath(77, 1), bytes(stored))
    store.read_fragment(77, 1, header.payload_offset + CELL, cell)  # a cell-aligned ranged GET
    assert fragment.bad_cells(header, CELL, cell) == [1]


# ---- a whole volume over S3 stores, in-process


def _s3_volume(tmp_path: Path, servers: list[MotoServer]) -> tuple[Volume, list[S3Store]]:
    volume_id = uuid.uuid4().hex
    stores = []
    for server in servers:
        store = S3Store.initialise(
            server.location(bucket="vol"),
            _marker(volume_id),
            environ=ENV,
            request_timeout=3.0,
            max_retries=1,
        )
        stores.append(store)
    params: dict[str, str | int] = {
        "uuid": volume_id,
        "k": K,
        "m": M,
        "fragment_size": FRAGMENT,
        "cell_size": CELL,
        "inline_max": 0,
    }
    path = tmp_path / "metadata.sqlite"
    store_ids = [s.read_marker().store_id for s in stores]
    create_database(
        path, params, store_ids, root_uid=os.getuid(), root_gid=os.getgid(), now_ns=time.time_ns()
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Volume(Database(path), dict(enumerate(stores)), workdir), stores


@pytest.mark.trio
async def test_volume_over_s3_stores_reads_degraded_and_scrubs(tmp_path: Path) -> None:
    import stat

    from ecfs.storage.metadb.schema import ROOT_INODE

    with moto_servers(K + M + 1) as servers:
        volume, stores = _s3_volume(tmp_path, servers)
        await volume.refresh_usage()
        ino = volume.namespace.create(
            ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.getuid(), os.getgid()
        ).id
        data = os.urandom(2 * CHUNK + 777)
        await volume.filedata.write(ino, 0, data)
        await volume.filedata.flush(ino)
        assert bytes(await volume.filedata.read(ino, 0, len(data))) == data
        ref = volume.filedata.chunks.get(ino, 0)
        assert ref is not None
        held = {i: stores[i].list_fragments() for i in range(len(stores))}
        assert sum(len(v) for v in held.values()) == 3 * (K + M)

        # Bit rot in a data fragment: the read verifies cells and decodes around it.
        victim = stores[ref.stores[1]]
        name = victim.fragment_relpath(ref.chunk_id, 1)
        blob = bytearray(bytes(obstore.get(victim._store(), name).bytes()))
        blob[-10] ^= 0xFF
        obstore.put(victim._store(), name, bytes(blob))
        volume.handles.close_all()
        assert bytes(await volume.reader.read(ref, 0, CHUNK)) == data[:CHUNK]
        assert RepairQueue(volume.db).bad_mask(ref.chunk_id) == 1 << 1
        progress = await volume.scrubber.run()
        assert [f.chunk_id for f in progress.findings] == [ref.chunk_id]
        await volume.repairer.repair_chunk(RepairEntry(ref.chunk_id, "scrub", 0, 0, 1 << 1))
        assert volume.repairer.counters.fragments_rebuilt == 1

        # One server hung (SIGSTOP): the reader routes around it.
        hung = servers[ref.stores[0]]
        hung.pause()
        try:
            volume.handles.close_all()
            # The repair above read its sources whole through prefetches,
            # which the store keeps (objects never change): drop them, so
            # that the read asks the hung server.
            stores[ref.stores[0]].close()
            hedged = volume.reader.counters.hedged_reads
            with trio.fail_after(30):
                assert bytes(await volume.reader.read(ref, 0, CHUNK)) == data[:CHUNK]
            # Read around it (hedged) and the request to it abandoned.
            assert volume.reader.counters.hedged_reads > hedged
            assert volume.runners[ref.stores[0]].statistics().abandoned >= 1
        finally:
            hung.resume()

        # Two servers killed (m of them): every byte still reads.
        servers[ref.stores[0]].kill()
        servers[ref.stores[1]].kill()
        volume.handles.close_all()
        with trio.fail_after(60):
            assert bytes(await volume.filedata.read(ino, 0, len(data))) == data
        assert volume.reader.counters.degraded_reads >= 1
