"""A store in an S3-compatible object store (MinIO, Garage, SeaweedFS, Ceph
RGW, a cloud): one bucket and key prefix per store.

Owns: the location form ``s3://BUCKET[/PREFIX]?endpoint=URL[&profile=NAME]
[&region=NAME]`` (`S3Location`), the credentials (`find_credentials`), the
object layout under the prefix, and every request to the server
(`S3Store`, which implements `ecfs.storage.store.Store`).
Must not: run on the event loop (every method but `read_fragment_cached`,
`prefetch` and `close` makes requests; callers go through
`ecfs.storage.offload.StoreRunner.call`), interpret fragment contents (the same
fragment format as a directory store: `ecfs.core.fragment` builds it and
checks its header and per-cell checksums on every read), or let a secret
out: no credential is ever in a location, a message, a repr or a log line.

Layout (keys under ``PREFIX/``, the same names as in a directory store)::

    ecfs-store.json           the marker (JSON, see ecfs.storage.store.StoreMarker)
    ecfs-store.json.retired   the marker of a store that left its volume
    frags/XX/YY/<chunk>.<i>   fragment i of chunk <chunk>, one object

Fragments are immutable objects: written once with a conditional PUT
(``If-None-Match: *``: never overwritten), read by cell-aligned ranged GETs
copied into the caller's buffer (the reader asks for whole cells),
deleted by garbage collection with DELETE, listed with ListObjectsV2
pages, sized with HEAD. `prefetch` starts ranged GETs in the background
(PREFETCH_THREADS per store, at most PREFETCH_BYTES kept, oldest dropped
first): read-ahead and the k reads of a degraded decode then overlap, and
`read_fragment_cached` serves what has arrived on the event loop, as the
page cache does for a directory store. Objects never change, so a
prefetched range is never stale; deleting a fragment drops it. A PUT is durable when it is acknowledged, so
`sync` has nothing to do.

A metadata copy is kept here as objects when the volume has fewer than
m+1 local stores (``meta/snap-*`` and ``meta/log-*``, conditional PUTs
only; the format, rebuilding and compaction are
`ecfs.storage.metaobjects`'s; `holds_meta_objects`, and `list_meta`,
`put_meta`, `get_meta`, `delete_meta`, `set_aside_meta` which keeps a
refused copy's snapshot as ``meta-refused/<name>``). `meta_dir` names no
usable directory.

The small-write log is not kept here (`holds_log_segments` is False; the
six log-segment methods raise StoreError): its segments are preallocated
files overwritten in place, which immutable objects do not map onto. A
volume with fewer than m+1 stores that hold segments logs nothing: its
small overwrites are whole-chunk writes (why: see `ecfs.data.logfiles`).

Space: object stores have no statvfs and rarely tell a quota. `usage`
reports a nominal NOMINAL_CAPACITY, all of it free, marked unknown
(`StoreUsage.known` False): placement and health never take the store for
full, yet neither prefer it for that size nor count it as real space (`df`
counts the stores whose space is known, see
`ecfs.volume.assembly.Volume.capacity`); a server that refuses a write for
lack of room (HTTP 507, QuotaExceeded) raises NoSpace.

Identity: `pin_identity` remembers the marker object (and its ETag);
`probe` GETs the marker and fails (StoreSwapped) if it is another store's.

Small mutable objects (the volume's lease, `ecfs.storage.lease`):
`get_small_object` returns an object's bytes and ETag, `put_small_object`
writes one conditionally (``If-None-Match: *`` to create, ``If-Match:
ETAG`` to replace exactly the version read); a condition that fails raises
ConditionFailed. Some servers have ignored these conditions: callers that
rely on them read back what they wrote (see `ecfs.storage.lease`).

Client library: obstore (the Rust object_store crate), its sync API run
in the store's worker threads like every store call. Chosen by
measurement (scripts/bench_s3_clients.py: 200 requests per operation, 8
at once, against a local moto server on a shared 2-core machine). Client
CPU per MiB moved, the number that tells clients apart when the server
is the bottleneck, then p50 latency and MiB/s:

    client                   64 KiB GET          1 MiB GET           1.5 MiB PUT
                             CPU    p50  MiB/s   CPU    p50  MiB/s   CPU      p50  MiB/s
    obstore, threads          8.4 ms 25 ms  19    1.2 ms 30 ms 226    1.0 ms   60 ms 191
    boto3, threads           23.2 ms 33 ms  14    2.4 ms 67 ms 113    2.2 ms   83 ms 138
    aiobotocore+httpx, trio  37.4 ms 42 ms   9    3.6 ms 65 ms  96    129 ms 2360 ms   5

(a first run of 120 requests ranked them the same way: obstore 11.7 /
1.6 / 1.1 ms of CPU per MiB, boto3 40.6 / 2.7 / 2.8, aiobotocore 59.2 /
5.0 / 139). aiobotocore 3.10 does run on trio through anyio with its
httpx session, but it would be the one async store in an interface
whose calls run in worker threads, and its PUT through httpx was 40x
slower. boto3 fits the worker threads as well as obstore, at 2-3x the
CPU and higher latency. What obstore lacks is small and done here:
bucket creation (one request signed with SigV4, `_signed_request`) and
the AWS profile files (`find_credentials`; they are handed to obstore
through a credential provider, never put in its configuration).

A hedged or timed-out read is abandoned the way every store call is (`StoreRunner`: the caller goes on at once; the
worker thread ends when the request does, each attempt within the
client's `request_timeout`, no retry later than RETRY_TIMEOUT, and is
counted as abandoned until then). The Rust client cannot be interrupted
from Python; its sync calls release the GIL, so an abandoned one costs a
thread and a connection, nothing on the loop.

Requests: one obstore client per store keeps its connections (reuse);
`ecfs.storage.offload.StoreRunner` limits the calls in flight per store and gives
up after its timeout; hedging uses the latencies it measures. The client
retries 5xx answers (503 SlowDown included), 429, dropped connections and
timeouts of safe requests, up to MAX_RETRIES times with exponential
backoff and full jitter (object_store's retry policy, BACKOFF_FIRST up
to BACKOFF_MAX), each attempt within `request_timeout`; TLS
certificates are always verified. The timeouts here are fixed bounds;
what adapts to the store's measured latency is above, in `StoreRunner`
(read timeouts, hedge deadlines, the slow state; REMOTE_CONCURRENCY
calls in flight, see `ecfs.storage.offload`).

Credentials: see `find_credentials` (the standard AWS places only).

Concurrency: thread-safe; the client is made once under a lock and then
shared by the worker threads (obstore clients are thread-safe); the
prefetch table is guarded by the same lock, held only for dict updates
(`read_fragment_cached` and `close` take it on the event loop).
"""

from __future__ import annotations

import concurrent.futures
import configparser
import datetime
import hashlib
import hmac
import os
import re
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from ..core.errors import (
    FragmentMissing,
    NoSpace,
    StoreError,
    StoreSwapped,
    VolumeError,
)
from .store import (
    FRAGS_DIR,
    MARKER_MAX_BYTES,
    MARKER_NAME,
    REMOTE_CONCURRENCY,
    FragmentParts,
    StoreMarker,
    StoreUsage,
    fragment_relpath,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config, S3Credential

T = TypeVar("T")

SCHEME = "s3://"
#: What `usage` reports: object stores have no statvfs (see the docstring).
NOMINAL_CAPACITY = 1 << 50
#: Retries of a failed request (5xx, 429, dropped connection, timeout).
MAX_RETRIES = 4
#: First and largest backoff between retries (seconds; full jitter).
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: Default per-request and connect timeouts (seconds): one request of a
#: 1 MiB fragment over a slow link fits; a hung server holds a worker
#: thread at most RETRY_TIMEOUT (the caller gave up long before: the
#: StoreRunner's timeout, or a hedge after the store's measured latency).
REQUEST_TIMEOUT = 20.0
CONNECT_TIMEOUT = 5.0
#: No retry starts later than this after the first attempt (seconds).
RETRY_TIMEOUT = 60.0
RETIRED_NAME = MARKER_NAME + ".retired"
#: Prefetched bytes kept per store at most, and requests for them at once.
PREFETCH_BYTES = 64 << 20
PREFETCH_THREADS = 8

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PROFILE = re.compile(r"[A-Za-z0-9_.+=,@-]{1,64}")
_REGION = re.compile(r"[a-z0-9-]{1,32}")
_FRAGMENT_KEY = re.compile(
    rf"{FRAGS_DIR}/([0-9a-f]{{2}})/([0-9a-f]{{2}})/([0-9a-f]{{16}})\.(0|[1-9][0-9]{{0,2}})"
)
_QUERY_KEYS = ("endpoint", "profile", "region")
#: Where the metadata copy's objects are (`ecfs.storage.metaobjects`), and
#: what their names may be.
META_OBJECTS = "meta"
_META_NAME = re.compile(r"[a-z]{1,8}(-[0-9]{1,20}){1,3}")
#: S3 error codes that mean "no room for this".
_NO_SPACE_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "EntityTooLarge"})


class ConditionFailed(StoreError):
    """A conditional PUT found the object changed (or present, or gone):
    HTTP 412 or 409, or 404 for an If-Match on a missing object."""


# --------------------------------------------------------------------------
# Location


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where an S3 store is: bucket, key prefix (no leading or trailing
    slash, may be empty), endpoint URL (None: AWS), credentials profile and
    region (None: from the profile or the environment). Holds no secret."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    profile: str | None = None
    region: str | None = None

    def __str__(self) -> str:
        query = {key: value for key in _QUERY_KEYS if (value := getattr(self, key)) is not None}
        text = SCHEME + self.bucket + (f"/{self.prefix}" if self.prefix else "")
        if query:
            text += "?" + "&".join(
                f"{k}={urllib.parse.quote(v, safe=':/')}" for k, v in query.items()
            )
        return text

    def key(self, name: str) -> str:
        """The object key of `name` (relative to the prefix)."""
        return f"{self.prefix}/{name}" if self.prefix else name

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> S3Location:
        """Parse ``s3://BUCKET[/PREFIX][?endpoint=URL][&profile=NAME][&region=NAME]``.

        Also takes the form a `pathlib.Path` leaves of it (``s3:/BUCKET``,
        ``endpoint=http:/host``: repeated slashes collapsed), since store
        locations travel as paths. VolumeError with the reason if malformed.
        """
        text = os.fspath(text)
        if not is_s3_location(text):
            raise VolumeError(f"{text}: not an s3:// location")
        rest = text.split(":", 1)[1].lstrip("/")
        path, _, query = rest.partition("?")
        bucket, _, prefix = path.partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise VolumeError(
                f"{text}: bad bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')"
            )
        parts = prefix.split("/") if prefix else []
        if any(p in ("", ".", "..") for p in parts) or any(c in prefix for c in "\\#\0"):
            raise VolumeError(f"{text}: bad key prefix {prefix!r}")
        values: dict[str, str] = {}
        for item in query.split("&") if query else []:
            key, eq, value = item.partition("=")
            value = urllib.parse.unquote(value)
            if key not in _QUERY_KEYS or not eq or not value:
                raise VolumeError(
                    f"{text}: bad query item {key!r} (known: endpoint=URL, profile=NAME,"
                    " region=NAME; credentials never go in a location)"
                )
            if key in values:
                raise VolumeError(f"{text}: {key} given twice")
            values[key] = value
        endpoint = values.get("endpoint")
        if endpoint is not None:
            endpoint = re.sub(r"^(https?):/+", r"\1://", endpoint).rstrip("/")
            parsed = urllib.parse.urlsplit(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise VolumeError(f"{text}: endpoint must be an http:// or https:// URL")
            if parsed.username or parsed.password or parsed.query or parsed.fragment:
                raise VolumeError(f"{text}: endpoint must be scheme://host[:port][/path] only")
        profile = values.get("profile")
        if profile is not None and not _PROFILE.fullmatch(profile):
            raise VolumeError(f"{text}: bad profile name")
        region = values.get("region")
        if region is not None and not _REGION.fullmatch(region):
            raise VolumeError(f"{text}: bad region name")
        return cls(bucket, prefix, endpoint, profile, region)


class LocationPath(PosixPath):
    """An s3:// location where ecfs keeps store locations: a `Path`, since
    they travel as paths (equal to, and hashed like, the path its text
    makes), whose str() and os.fspath() are the location itself and not
    what a Path makes of it (``s3:/bucket``, repeated slashes collapsed)."""

    _text: str

    def __new__(cls, location: S3Location) -> LocationPath:
        self = super().__new__(cls, str(location))
        self._text = str(location)
        return self

    def __str__(self) -> str:
        # Paths derived from this one (parent, joinpath) are plain paths.
        return getattr(self, "_text", None) or super().__str__()

    def __fspath__(self) -> str:
        return str(self)


def location_path(text: str | os.PathLike[str]) -> Path:
    """The canonical `LocationPath` of an s3:// location (VolumeError if
    malformed)."""
    return LocationPath(S3Location.parse(text))


def is_s3_location(text: str | os.PathLike[str]) -> bool:
    """Whether a store location names an S3 store (``s3://...``, or what a
    Path leaves of it, ``s3:/...``)."""
    return os.fspath(text).startswith("s3:/")


# --------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """AWS credentials and where they came from. The secret parts are left
    out of the repr, so that no log or message can show them."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = ""
    region: str | None = None


def find_credentials(
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Credentials from the standard AWS places only, never from a command
    line:

    1. with `profile` (the location's ``profile=``): that profile of
       ``~/.aws/credentials`` (or $AWS_SHARED_CREDENTIALS_FILE), else of
       ``~/.aws/config`` (or $AWS_CONFIG_FILE, section ``[profile NAME]``);
    2. else $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY (and
       $AWS_SESSION_TOKEN) if set;
    3. else the profile $AWS_PROFILE (or ``default``) of those files.

    The region comes from the profile's ``region``, else $AWS_REGION or
    $AWS_DEFAULT_REGION. StoreError (naming the places looked at, never a
    value) if none is found.
    """
    env = os.environ if environ is None else environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if profile is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            env.get("AWS_SESSION_TOKEN") or None,
            "environment",
            region,
        )
    name = profile or env.get("AWS_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    files = (
        (Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws/credentials"), name),
        (
            Path(env.get("AWS_CONFIG_FILE") or home / ".aws/config"),
            name if name == "default" else f"profile {name}",
        ),
    )
    found: dict[str, str] = {}
    sources = []
    for path, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read AWS settings {path}: {type(exc).__name__}") from None
        if parser.has_section(section):
            for key, value in parser.items(section):
                found.setdefault(key, value.strip())
            sources.append(str(path))
    key_id = found.get("aws_access_key_id")
    secret = found.get("aws_secret_access_key")
    if not (key_id and secret):
        raise StoreError(
            f"no AWS credentials for profile {name!r}: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY, or put the profile in ~/.aws/credentials"
            " (credentials are never taken from the command line)"
        )
    return Credentials(
        key_id,
        secret,
        found.get("aws_session_token") or None,
        f"profile {name} ({', '.join(sources)})",
        found.get("region") or region,
    )


# --------------------------------------------------------------------------
# The store


@dataclass(frozen=True, slots=True)
class _Prefetch:
    """A background ranged GET of bytes [offset, end) of one fragment."""

    offset: int
    end: int
    future: concurrent.futures.Future[memoryview]


class S3Store:
    """A store kept as objects under one bucket and prefix. Implements
    `ecfs.storage.store.Store` (see the module docstring); holds no
    small-write log segments, and may hold a metadata copy as objects."""

    holds_log_segments = False
    #: Keeps a metadata copy as objects under ``meta/``.
    holds_meta_objects = True
    #: On another machine (`ecfs.storage.store.Store.remote`).
    remote = True
    concurrency = REMOTE_CONCURRENCY

    def __init__(
        self,
        location: S3Location | str | os.PathLike[str],
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_retries: int = MAX_RETRIES,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Refer to the store at `location`; does no I/O (credentials are
        looked up at the first request)."""
        self.location = location if isinstance(location, S3Location) else S3Location.parse(location)
        #: The location as a path (how store locations travel in ecfs);
        #: `S3Location.parse` reads it back.
        self.path: Path = LocationPath(self.location)
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._max_retries = max_retries
        self._environ = environ
        self._lock = threading.Lock()
        self._client: Any = None
        self._credentials: Credentials | None = None
        self._pinned: StoreMarker | None = None
        #: Prefetched ranges by (chunk id, index), oldest first.
        self._prefetches: OrderedDict[tuple[int, int], _Prefetch] = OrderedDict()
        self._prefetch_bytes = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def domain_atoms(self) -> frozenset[str]:
        from .domains import endpoint_atoms

        return endpoint_atoms(self.location.endpoint)

    def __repr__(self) -> str:
        return f"S3Store({str(self.location)!r})"

    @property
    def meta_dir(self) -> Path:
        """No directory: a metadata copy is kept here as objects (see
        `list_meta`); a path that never exists, so no file replica is found here."""
        return Path("/nonexistent/ecfs-s3-store-has-no-meta-dir") / self.location.bucket

    # ---- the client

    def credentials(self) -> Credentials:
        """The credentials this store signs with (found once)."""
        with self._lock:
            if self._credentials is None:
                self._credentials = find_credentials(self.location.profile, self._environ)
            return self._credentials

    def region(self) -> str:
        return self.location.region or self.credentials().region or "us-east-1"

    def _store(self) -> Any:
        """The obstore client (made once; it keeps the connections)."""
        client = self._client
        if client is not None:
            return client
        credentials = self.credentials()
        region = self.region()
        with self._lock:
            if self._client is None:
                options: ClientConfig = {
                    "timeout": datetime.timedelta(seconds=self._request_timeout),
                    "connect_timeout": datetime.timedelta(seconds=self._connect_timeout),
                    "allow_http": bool(
                        self.location.endpoint and self.location.endpoint.startswith("http://")
                    ),
                    # Explicit, so that no environment variable turns it on.
                    "allow_invalid_certificates": False,
                }
                config: S3Config = {"region": region}
                if self.location.endpoint is not None:
                    config["endpoint"] = self.location.endpoint
                    config["virtual_hosted_style_request"] = False

                def provide() -> S3Credential:
                    return {
                        "access_key_id": credentials.access_key_id,
                        "secret_access_key": credentials.secret_access_key,
                        "token": credentials.session_token,
                        "expires_at": None,
                    }

                self._client = obstore.store.S3Store(
                    self.location.bucket,
                    prefix=self.location.prefix or None,
                    config=config,
                    client_options=options,
                    retry_config={
                        "max_retries": self._max_retries,
                        "backoff": {
                            "init_backoff": datetime.timedelta(seconds=BACKOFF_FIRST),
                            "max_backoff": datetime.timedelta(seconds=BACKOFF_MAX),
                            "base": 2,
                        },
                        "retry_timeout": datetime.timedelta(
                            seconds=min(RETRY_TIMEOUT, self._request_timeout * self._max_retries)
                        ),
                    },
                    credential_provider=provide,
                )
            return self._client

    def _request(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`, translating obstore's errors into StoreErrors
        whose message names this store and the reason in one line (never
        a credential: requests are signed in headers, which errors omit)."""
        client = self._store()
        try:
            return fn(client)
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StoreError(f"{self.location}: {what}: the bucket does not exist") from None
            raise FragmentMissing(f"{what} missing: {self.location}") from None
        except AlreadyExistsError:
            raise ConditionFailed(f"{self.location}: {what}: already exists") from None
        except PreconditionError:
            raise ConditionFailed(f"{self.location}: {what}: changed meanwhile") from None
        except (BaseError, OSError) as exc:
            reason = _reason(exc)
            if _status(exc) == 507 or _code(exc) in _NO_SPACE_CODES:
                raise NoSpace(f"{self.location}: {what}: {reason}") from None
            if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
                raise StoreError(f"{self.location}: {what}: access denied ({reason})") from None
            raise StoreError(f"{self.location}: {what}: {reason}") from None

    # ---- identity and health

    def read_marker(self) -> StoreMarker:
        data = self._get_small(MARKER_NAME)
        try:
            return StoreMarker.from_json(data)
        except StoreError as exc:
            raise StoreError(f"{self.location}: {exc}") from None

    def _get_small(self, name: str) -> bytes:
        def get(client: Any) -> bytes:
            result = obstore.get(client, name)
            if result.meta["size"] > MARKER_MAX_BYTES:
                raise StoreError(f"{self.location}: {name}: larger than {MARKER_MAX_BYTES} bytes")
            return bytes(result.bytes())

        try:
            return self._request(name, get)
        except FragmentMissing:
            raise StoreError(f"{self.location}: no ecfs store marker (not a store?)") from None

    def get_small_object(self, name: str) -> tuple[bytes, str] | None:
        """The bytes and ETag of the object `name` (at most MARKER_MAX_BYTES),
        None if there is none."""

        def get(client: Any) -> tuple[bytes, str]:
            result = obstore.get(client, name)
            if result.meta["size"] > MARKER_MAX_BYTES:
                raise StoreError(f"{self.location}: {name}: larger than {MARKER_MAX_BYTES} bytes")
            return bytes(result.bytes()), str(result.meta["e_tag"] or "")

        try:
            return self._request(name, get)
        except FragmentMissing:
            return None

    def put_small_object(
        self, name: str, data: bytes, *, if_match: str | None = None, create: bool = False
    ) -> str:
        """PUT the object `name`: only if it does not exist (`create`,
        If-None-Match: *), only if its ETag is still `if_match` (If-Match),
        or unconditionally (neither). The new ETag; ConditionFailed if the
        condition did not hold."""
        mode: Any = "create" if create else {"e_tag": if_match} if if_match else "overwrite"
        result = self._request(
            name, lambda c: obstore.put(c, name, data, mode=mode, use_multipart=False)
        )
        return str(result["e_tag"] or "")

    def pin_identity(self, marker: StoreMarker | None = None) -> StoreMarker:
        if marker is None:
            marker = self.read_marker()
        self._pinned = marker
        return marker

    def probe(self, *, accept_moved: bool = False) -> StoreMarker:
        """GET the marker; StoreSwapped if it is not the pinned one (another
        store, or another volume, now answers at this location)."""
        marker = self.read_marker()
        pinned = self._pinned
        if pinned is not None and marker != pinned:
            self.close()
            raise StoreSwapped(
                f"{self.location}: another store is here now (volume {marker.volume_id}, store"
                f" {marker.store_id}; it was volume {pinned.volume_id}, store {pinned.store_id})"
            )
        return marker

    def device(self) -> int:
        """A number of this location alone (`sync` is a no-op anyway)."""
        return (1 << 48) + zlib.crc32(str(self.location).encode())

    def usage(self) -> StoreUsage:
        """Nominal and marked unknown: see "Space" in the module docstring."""
        return StoreUsage(NOMINAL_CAPACITY, NOMINAL_CAPACITY, known=False)

    def sync(self) -> None:
        """Nothing to do: an acknowledged PUT or DELETE is durable."""

    def retire(self) -> None:
        """Copy the marker to ecfs-store.json.retired, then delete it."""
        self.read_marker()

        def retire(client: Any) -> None:
            obstore.copy(client, MARKER_NAME, RETIRED_NAME, overwrite=True)
            obstore.delete(client, MARKER_NAME)

        self._request("retire", retire)

    def close(self) -> None:
        """Drop the client and its connections (calls in flight keep theirs)
        and what was prefetched; the next request makes a new client. Never
        blocks (prefetches under way end on their own)."""
        with self._lock:
            self._client = None
            self._prefetches.clear()
            self._prefetch_bytes = 0
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- creation

    @classmethod
    def initialise(
        cls, location: S3Location | str | os.PathLike[str], marker: StoreMarker, **kwargs: Any
    ) -> S3Store:
        """Create a new store at `location` for `marker` (mkfs, store add):
        the bucket is created if missing (when the credentials allow it);
        the prefix must hold no object yet (VolumeError otherwise). The
        marker is written last, with a conditional PUT."""
        store = cls(location, **kwargs)
        store._create_bucket_if_missing()
        try:
            first = next(iter(store._list_keys("")), None)
        except StoreError as exc:
            raise VolumeError(f"{store.location}: cannot list: {exc}") from None
        if first is not None:
            try:
                existing = store.read_marker()
            except StoreError:
                raise VolumeError(f"{store.location}: not empty (holds {first})") from None
            raise VolumeError(
                f"{store.location}: not empty, belongs to volume {existing.volume_id}"
            )
        data = marker.to_json()
        store._request(MARKER_NAME, lambda c: obstore.put(c, MARKER_NAME, data, mode="create"))
        store.pin_identity(marker)
        return store

    def _create_bucket_if_missing(self) -> None:
        """CreateBucket unless the bucket exists (HEAD bucket first)."""
        status, body = _signed_request(self, "HEAD", b"")
        if status == 200:
            return
        if status != 404:
            raise StoreError(f"{self.location}: cannot look at the bucket: HTTP {status} {body}")
        payload = b""
        if self.region() != "us-east-1":
            payload = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region()}</LocationConstraint>"
                "</CreateBucketConfiguration>"
            ).encode()
        status, body = _signed_request(self, "PUT", payload)
        if status not in (200, 409):  # 409: someone else made it meanwhile
            raise StoreError(f"{self.location}: cannot create the bucket: HTTP {status} {body}")

    # ---- fragments

    def fragment_relpath(self, chunk_id: int, index: int) -> str:
        return fragment_relpath(chunk_id, index)

    def write_fragment(self, chunk_id: int, index: int, parts: FragmentParts) -> int:
        """One conditional PUT (If-None-Match: *): never overwrites."""
        name = fragment_relpath(chunk_id, index)
        data = b"".join(parts)
        self._request(
            name, lambda c: obstore.put(c, name, data, mode="create", use_multipart=False)
        )
        return len(data)

    def read_fragment(self, chunk_id: int, index: int, offset: int, dest: memoryview) -> int:
        """Bytes [offset, offset + len(dest)) into `dest`: from a prefetch
        that holds them (waiting for it if it is under way), else one
        ranged GET; the count (fewer only at the end of the object; 0
        past it)."""
        fetched = self._prefetched_range(chunk_id, index, offset, len(dest), wait=True)
        if fetched is not None:
            dest[: len(fetched)] = fetched
            return len(fetched)
        got = self._get_range(chunk_id, index, offset, len(dest))
        dest[: len(got)] = got
        return len(got)

    def _get_range(self, chunk_id: int, index: int, offset: int, length: int) -> memoryview:
        """One ranged GET: the bytes (fewer at the end of the object)."""
        name = fragment_relpath(chunk_id, index)
        if not length:
            self.fragment_size_on_disk(chunk_id, index)
            return memoryview(b"")

        def get(client: Any) -> memoryview:
            try:
                got = obstore.get_range(client, name, start=offset, length=length)
            except BaseError as exc:
                if _status(exc) == 416:  # the range starts at or past the end
                    return memoryview(b"")
                raise
            return memoryview(got).cast("B")[:length]

        try:
            return self._request(name, get)
        except FragmentMissing:
            raise FragmentMissing(f"fragment missing: {self.location}/{name}") from None

    def read_fragment_cached(
        self, chunk_id: int, index: int, offset: int, dest: memoryview
    ) -> bool:
        """Served only from a finished prefetch holding all of the range
        (read-ahead fetched it); never waits, never makes a request."""
        fetched = self._prefetched_range(chunk_id, index, offset, len(dest), wait=False)
        if fetched is None or len(fetched) != len(dest):
            return False
        dest[:] = fetched
        return True

    def prefetch(self, chunk_id: int, index: int, offset: int, length: int) -> None:
        """Start a ranged GET of the bytes in the background (PREFETCH_THREADS
        per store) and return at once: `read_fragment` then takes them
        (waiting if needed), `read_fragment_cached` once they are here. At
        most PREFETCH_BYTES per store are kept, oldest dropped first;
        errors are left for the real read to meet and report."""
        fragment_relpath(chunk_id, index)
        if length <= 0 or length > PREFETCH_BYTES:
            return
        key = (chunk_id, index)
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    PREFETCH_THREADS, thread_name_prefix="ecfs s3 prefetch"
                )
            pool = self._pool
            held = self._prefetches.get(key)
            if held is not None and held.offset <= offset and offset + length <= held.end:
                self._prefetches.move_to_end(key)
                return
            future = pool.submit(self._get_range, chunk_id, index, offset, length)
            self._prefetch_put(key, _Prefetch(offset, offset + length, future))

    def _prefetch_put(self, key: tuple[int, int], entry: _Prefetch) -> None:
        """Keep `entry` (under the lock), dropping the oldest over the budget."""
        old = self._prefetches.pop(key, None)
        if old is not None:
            self._prefetch_bytes -= old.end - old.offset
        self._prefetches[key] = entry
        self._prefetch_bytes += entry.end - entry.offset
        while self._prefetch_bytes > PREFETCH_BYTES and len(self._prefetches) > 1:
            _, dropped = self._prefetches.popitem(last=False)
            self._prefetch_bytes -= dropped.end - dropped.offset

    def _prefetched_range(
        self, chunk_id: int, index: int, offset: int, length: int, *, wait: bool
    ) -> memoryview | None:
        """The bytes [offset, offset + length) from a prefetch holding the
        range (fewer at the end of the object), or None: none does, it is
        not finished and not `wait`, or it failed (then it is dropped)."""
        key = (chunk_id, index)
        with self._lock:
            entry = self._prefetches.get(key)
        if entry is None or not (entry.offset <= offset and offset + length <= entry.end):
            return None
        if not wait and not entry.future.done():
            return None
        try:
            got = entry.future.result()
        except (StoreError, concurrent.futures.CancelledError):
            with self._lock:
                if self._prefetches.get(key) is entry:
                    del self._prefetches[key]
                    self._prefetch_bytes -= entry.end - entry.offset
            return None
        start = offset - entry.offset
        return got[start : start + length]

    def _forget_prefetched(self, chunk_id: int, index: int) -> None:
        with self._lock:
            entry = self._prefetches.pop((chunk_id, index), None)
            if entry is not None:
                self._prefetch_bytes -= entry.end - entry.offset

    def fragment_size_on_disk(self, chunk_id: int, index: int) -> int:
        name = fragment_relpath(chunk_id, index)
        try:
            meta = self._request(name, lambda c: obstore.head(c, name))
        except FragmentMissing:
            raise FragmentMissing(f"fragment missing: {self.location}/{name}") from None
        return int(meta["size"])

    def delete_fragment(self, chunk_id: int, index: int) -> None:
        """DELETE (a missing object is fine; a missing bucket is not)."""
        name = fragment_relpath(chunk_id, index)
        self._forget_prefetched(chunk_id, index)
        try:
            self._request(name, lambda c: obstore.delete(c, name))
        except FragmentMissing:
            pass

    def _list_keys(self, under: str) -> Iterator[str]:
        """Keys (relative to the prefix) under `under`, by ListObjectsV2 pages."""
        client = self._store()
        try:
            for page in obstore.list(client, prefix=under or None, chunk_size=1000):
                for meta in page:
                    yield meta["path"]
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StoreError(f"{self.location}: list: the bucket does not exist") from None
            return
        except (BaseError, OSError) as exc:
            raise StoreError(f"{self.location}: list: {_reason(exc)}") from None

    def iter_fragments(self) -> Iterator[tuple[int, int]]:
        for key in self._list_keys(FRAGS_DIR + "/"):
            name = _fragment_name(key)
            if name is not None:
                yield name

    def list_fragments(self) -> list[tuple[int, int]]:
        return list(self.iter_fragments())

    def stray_entries(self, fragments: list[tuple[int, int]]) -> list[str]:
        known = {fragment_relpath(c, i) for c, i in fragments}
        return sorted(k for k in self._list_keys(FRAGS_DIR + "/") if k not in known)

    # -- the metadata copy's objects (see ecfs.storage.metaobjects)

    def list_meta(self) -> list[str]:
        """Names of the objects under ``meta/`` (ListObjectsV2 pages)."""
        start = META_OBJECTS + "/"
        return [k[len(start) :] for k in self._list_keys(start) if "/" not in k[len(start) :]]

    def put_meta(self, name: str, data: bytes) -> bool:
        """One conditional PUT of ``meta/<name>`` (If-None-Match: *): False,
        and nothing written, if the object exists already."""
        key = _meta_key(name)
        try:
            self._request(
                key, lambda c: obstore.put(c, key, data, mode="create", use_multipart=False)
            )
        except StoreError as exc:
            if str(exc).endswith("already exists"):
                return False
            raise
        return True

    def get_meta(self, name: str) -> bytes:
        """The object ``meta/<name>`` (FragmentMissing if there is none)."""
        key = _meta_key(name)
        return self._request(key, lambda c: bytes(obstore.get(c, key).bytes()))

    def delete_meta(self, name: str) -> None:
        """DELETE ``meta/<name>`` (a missing object is fine)."""
        key = _meta_key(name)
        try:
            self._request(key, lambda c: obstore.delete(c, key))
        except FragmentMissing:
            pass

    def set_aside_meta(self, name: str) -> None:
        """Copy ``meta/<name>`` to ``meta-refused/<name>`` (replacing an
        older one): a refused copy kept for a look, never read by ecfs."""
        key = _meta_key(name)
        aside = f"{META_OBJECTS}-refused/{name}"
        self._request(key, lambda c: obstore.copy(c, key, aside, overwrite=True))

    # -- small-write log segments: none here (see the module docstring)

    def _no_log_segments(self) -> StoreError:
        return StoreError(f"{self.location}: object stores hold no small-write log segments")

    def log_segments(self) -> list[int]:
        raise self._no_log_segments()

    def create_log_segment(self, number: int, size: int) -> None:
        raise self._no_log_segments()

    def write_log_segment(self, number: int, offset: int, data: bytes | bytearray) -> None:
        raise self._no_log_segments()

    def read_log_segment(self, number: int) -> bytes:
        raise self._no_log_segments()

    def read_log_range(self, number: int, offset: int, length: int) -> bytes:
        raise self._no_log_segments()

    def delete_log_segment(self, number: int) -> None:
        raise self._no_log_segments()


def _meta_key(name: str) -> str:
    if not _META_NAME.fullmatch(name):
        raise ValueError(f"not a metadata object name: {name!r}")
    return f"{META_OBJECTS}/{name}"


def forget_new_store(store: object) -> None:
    """Undo `S3Store.initialise` of `store` (a failed mkfs): delete its
    marker, so that the prefix is unused again. Best effort: StoreError if
    the server does not answer; a store of another kind is left alone."""
    if isinstance(store, S3Store):
        store._request(MARKER_NAME, lambda c: obstore.delete(c, MARKER_NAME))


def _fragment_name(key: str) -> tuple[int, int] | None:
    """(chunk id, index) of a well-named fragment key in its fan-out place."""
    match = _FRAGMENT_KEY.fullmatch(key)
    if match is None:
        return None
    chunk_id, index = int(match[3], 16), int(match[4])
    if index >= 256 or fragment_relpath(chunk_id, index) != key:
        return None
    return chunk_id, index


def _status(exc: BaseException) -> int | None:
    """The HTTP status an obstore error reports, if any."""
    match = re.search(r"status code: (\d{3})\b", str(exc))
    return int(match[1]) if match else None


def _code(exc: BaseException) -> str | None:
    """The S3 error code (``<Code>`` of the answer) in an obstore error."""
    match = re.search(r"<Code>([^<]{1,64})</Code>", str(exc))
    return match[1] if match else None


def _reason(exc: BaseException) -> str:
    """An obstore error in one line: its first line up to the XML body,
    with the S3 error code."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    text = text.split("<?xml", 1)[0].split("<Error>", 1)[0].rstrip(" :")
    code = _code(exc)
    if code and code not in text:
        text += f" ({code})"
    return text[:300]


# --------------------------------------------------------------------------
# One signed request (bucket creation; obstore has no bucket calls)


def _signed_request(store: S3Store, method: str, payload: bytes) -> tuple[int, str]:
    """`method` on the bucket itself, signed with AWS Signature V4; the
    HTTP status and the error code of the answer. TLS verified."""
    location = store.location
    credentials = store.credentials()
    region = store.region()
    if location.endpoint is not None:
        base = urllib.parse.urlsplit(location.endpoint)
        host = base.netloc
        path = f"{base.path.rstrip('/')}/{location.bucket}"
        url = f"{base.scheme}://{host}{path}"
    else:
        host = f"{location.bucket}.s3.{region}.amazonaws.com"
        path = "/"
        url = f"https://{host}/"
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    payload_hash = hashlib.sha256(payload).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
    if credentials.session_token:
        headers["x-amz-security-token"] = credentials.session_token
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(path, safe="/-_.~"),
            "",
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope},"
        f" SignedHeaders={signed}, Signature={signature}"
    )
    del headers["host"]
    request = urllib.request.Request(url, data=payload or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(
            request, timeout=store._request_timeout, context=ssl.create_default_context()
        ) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace")
        exc.close()
        code = re.search(r"<Code>([^<]{1,64})</Code>", body)
        return exc.code, code[1] if code else ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"{location}: {method} bucket: {reason}") from None
