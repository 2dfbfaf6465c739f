"""Creating a new volume on a set of empty directories and object stores.

Owns: validating the store list and the geometry, writing each store's
marker and the initial metadata replicas. Must not: mount or open the
volume (see `ecfs.volume.assembly`).

Every check runs before anything is written, so a refused mkfs leaves the
directories as they were.

Stores are local directories or ``s3://`` locations (`ecfs.storage.s3store`). The
m+1 metadata copies go where `ecfs.storage.metaobjects.copy_stores` says
(in distinct failure domains while the stores allow it): on
local directories (as files) when there are at least m+1 of them,
otherwise on local ones first and then object stores (as objects: a
snapshot at epoch 0, see `ecfs.storage.metaobjects`). A volume of directories
only is unchanged.

The placement policy (`VolumeSpec.placement`, ``--placement``) is checked
against the stores given (`ecfs.data.placement.policy_problem`: hybrid
needs k local and m remote ones, by `Store.remote`) and kept in the
volume parameters (`ecfs.data.placement.POLICY_KEY`).

Failure domains (`ecfs.storage.domains`, `check_domains`): each store's is
its label (``--domain PATH=LABEL``, kept as the volume parameter
``domain.<store id>``) or resolved from where it is (its disk; an object
store's endpoint). A layout with fewer distinct domains than k+m (some chunk
would need two fragments in one domain) is refused, naming the stores that
share one, unless ``allow_shared_domains`` (``--allow-shared-domains``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EcfsError, StoreError, VolumeError
from ..core.geometry import (
    MAX_CELL_SIZE,
    MAX_FRAGMENT_SIZE,
    MAX_K,
    MAX_M,
    MAX_N,
    MIN_CELL_SIZE,
    Layout,
)
from ..data.placement import POLICY_KEY, SPREAD, policy_problem
from ..storage.domains import (
    assign,
    check_label,
    label_key,
    resolve_stores,
    shared,
)
from ..storage.metadb.schema import create_database
from ..storage.metaobjects import ObjectCopy, copy_stores, keeps_meta_objects
from ..storage.replicas import copy_database, read_generation, replica_path
from ..storage.s3store import S3Location, forget_new_store, is_s3_location, location_path
from ..storage.store import MARKER_NAME, STORE_FORMAT, Store, StoreMarker
from ..storage.storefactory import initialise_store, open_store

DEFAULT_DATA = 4
DEFAULT_PARITY = 2
#: Measured default (scripts/bench.py): per-fragment costs (a file open, a
#: header, a pread, a thread round trip) dominate a Python filesystem, so
#: large fragments are what makes sequential I/O fast: 1 MiB fragments read
#: ~3x and write ~2.5x faster than 128 KiB ones on the benchmark machine.
#: The price: a small rewrite inside a large file is logged (see
#: ecfs.data.smallwrites) but later folded by re-encoding one whole chunk
#: (k x F = 4 MiB with k=4); volumes for databases or VM images that rewrite
#: in place may prefer --fragment-size 128K. Files smaller than a chunk are
#: one short chunk whatever F is, and reads verify only the cells they touch.
DEFAULT_FRAGMENT_SIZE = 1024 * 1024
DEFAULT_CELL_SIZE = 4096
DEFAULT_INLINE_MAX = 64 * 1024


@dataclass(frozen=True)
class VolumeSpec:
    k: int = DEFAULT_DATA
    m: int = DEFAULT_PARITY
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    cell_size: int = DEFAULT_CELL_SIZE
    inline_max: int = DEFAULT_INLINE_MAX
    #: The placement policy (`ecfs.data.placement.POLICIES`).
    placement: str = SPREAD


#: "scheme://...": a URL (s3://bucket, http://host/...), not a directory.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def check_store_arg(arg: str) -> str:
    """`arg` if it can name a store: a directory or a well-formed ``s3://``
    location (`ecfs.storage.s3store.S3Location`); VolumeError (a usage error) for
    an empty one, a malformed s3:// one, and any other URL (``Path("http://h")``
    would silently be the relative directory ``http:/h``)."""
    if not arg:
        raise VolumeError("a store argument is empty")
    if is_s3_location(arg):
        S3Location.parse(arg)
        return arg
    if _URL.match(arg):
        raise VolumeError(
            f"store {arg!r} looks like a URL; stores are local directories or s3:// locations"
            " (mount a remote filesystem and give its directory instead)"
        )
    return arg


def check_store_paths(paths: Sequence[Path]) -> list[Path]:
    """Resolved paths (an s3:// location in its canonical form);
    VolumeError for duplicates or nesting."""
    resolved = [
        location_path(p) if is_s3_location(p) else Path(os.path.realpath(p))
        for p in paths
    ]
    seen: dict[str, Path] = {}
    for given, real in zip(paths, resolved, strict=True):
        key = _nesting_key(real)
        if key in seen:
            raise VolumeError(f"store {given} is given twice (same store as {seen[key]})")
        seen[key] = given
    for a in resolved:
        for b in resolved:
            if a != b and (_nesting_key(b) + "/").startswith(_nesting_key(a) + "/"):
                raise VolumeError(f"store {b} is inside store {a}")
    return resolved


def _nesting_key(path: Path) -> str:
    """What tells stores apart and nested: the real directory, or the
    endpoint, bucket and prefix of an s3:// location."""
    if not is_s3_location(path):
        return str(path)
    loc = S3Location.parse(path)
    return f"s3 {loc.endpoint or 'aws'} {loc.bucket}/{loc.prefix}".rstrip("/")


def local_stores(paths: Sequence[Path]) -> list[Path]:
    """The local directories among store locations (not s3://)."""
    return [p for p in paths if not is_s3_location(p)]


def check_spec(spec: VolumeSpec) -> Layout:
    """The layout of `spec`; VolumeError naming the option for a bad value."""
    if not 1 <= spec.k <= MAX_K:
        raise VolumeError(f"--data (k) must be between 1 and {MAX_K}, got {spec.k}")
    if not 1 <= spec.m <= MAX_M:
        raise VolumeError(f"--parity (m) must be between 1 and {MAX_M}, got {spec.m}")
    if spec.k + spec.m > MAX_N:
        raise VolumeError(f"--data + --parity must be at most {MAX_N}, got {spec.k + spec.m}")
    c = spec.cell_size
    if c & (c - 1) or not MIN_CELL_SIZE <= c <= MAX_CELL_SIZE:
        raise VolumeError(
            f"--cell-size must be a power of two between {MIN_CELL_SIZE} and"
            f" {MAX_CELL_SIZE}, got {c}"
        )
    f = spec.fragment_size
    if f <= 0 or f > MAX_FRAGMENT_SIZE:
        raise VolumeError(f"--fragment-size must be between {c} and {MAX_FRAGMENT_SIZE}, got {f}")
    if f % c:
        raise VolumeError(f"--fragment-size ({f}) must be a multiple of --cell-size ({c})")
    if not 0 <= spec.inline_max <= f * spec.k:
        raise VolumeError(
            f"--inline-max must be between 0 and one chunk ({f * spec.k}), got {spec.inline_max}"
        )
    try:
        return Layout(spec.k, spec.m, spec.fragment_size, spec.cell_size)
    except ValueError as exc:
        raise VolumeError(str(exc)) from None


def check_domains(
    given: Sequence[Path],
    resolved: Sequence[Path],
    n: int,
    labels: Mapping[str, str],
    allow_shared: bool,
) -> dict[int, str]:
    """Store position -> failure domain label for the stores `resolved`
    (as `given`) with `labels` (a store as given or resolved -> label);
    VolumeError for a label naming no store, or for fewer distinct domains
    than `n` unless `allow_shared` (see the module docstring)."""
    by_name = {}
    for i, (g, r) in enumerate(zip(given, resolved, strict=True)):
        by_name[str(g)] = by_name[str(r)] = i
    chosen: dict[int, str] = {}
    for name, label in labels.items():
        key = str(location_path(name)) if is_s3_location(name) else os.path.realpath(name)
        index = by_name.get(name, by_name.get(key))
        if index is None:
            raise VolumeError(f"--domain {name}={label}: {name} is not one of the stores given")
        chosen[index] = check_label(label)
    atoms = {}
    for i, path in enumerate(resolved):
        if i in chosen:
            continue
        try:
            atoms[i] = open_store(path).domain_atoms()
        except OSError as exc:
            raise VolumeError(f"cannot find the disk of {given[i]}: {exc.strerror}") from None
    domains = assign(atoms, chosen)
    distinct = len(set(domains.values()))
    if distinct < n and not allow_shared:
        groups = "; ".join(
            f"{', '.join(str(given[i]) for i in members)} share {name}"
            for name, members in sorted(shared(domains).items())
        )
        raise VolumeError(
            f"the stores are in {distinct} failure domain(s) but a chunk has k+m={n} fragments:"
            f" some chunk would need two fragments in one domain, and losing it could lose"
            f" data ({groups}). Put the stores on independent disks, name the domains of"
            " stores that are in fact independent with --domain PATH=LABEL, or accept it"
            " with --allow-shared-domains (demos and tests)"
        )
    return chosen


def create_volume(
    paths: Sequence[Path],
    spec: VolumeSpec,
    *,
    domains: Mapping[str, str] | None = None,
    allow_shared_domains: bool = False,
) -> str:
    """Create a volume over `paths`; returns its UUID (hex). `domains`: a
    store (as given) -> its failure domain label; `allow_shared_domains`:
    accept fewer distinct domains than k+m (`check_domains`).

    All checks run first. If creating a store or a metadata replica fails
    half-way, what was created is removed again (the directories were
    checked to be absent or empty; an object store's marker is deleted, as
    far as its server answers), so a failed mkfs can simply be rerun.
    """
    check_spec(spec)
    if len(paths) < spec.k + spec.m:
        raise VolumeError(
            f"{len(paths)} stores given; --data {spec.k} + --parity {spec.m} needs"
            f" at least {spec.k + spec.m}"
        )
    resolved = check_store_paths(paths)
    remote = sum(1 for p in resolved if open_store(p).remote)
    problem = policy_problem(spec.placement, spec.k, spec.m, len(resolved) - remote, remote)
    if problem is not None:
        raise VolumeError(problem)
    for given, path in zip(paths, resolved, strict=True):
        if is_s3_location(path):
            continue  # S3Store.initialise checks that its prefix is unused
        _check_not_inside_a_store(given, path)
        _check_empty(given, path)
    labels = check_domains(
        paths, resolved, spec.k + spec.m, domains or {}, allow_shared_domains
    )
    volume_id = uuid.uuid4().hex
    store_ids = [uuid.uuid4().hex for _ in resolved]
    created: list[tuple[Path, bool]] = []  # (path, existed before)
    created_remote: list[Store] = []  # object stores: their marker is removed again
    try:
        stores = []
        for path, store_id in zip(resolved, store_ids, strict=True):
            marker = StoreMarker(
                volume_id=volume_id,
                store_id=store_id,
                format=STORE_FORMAT,
                k=spec.k,
                m=spec.m,
                fragment_size=spec.fragment_size,
                cell_size=spec.cell_size,
                inline_max=spec.inline_max,
            )
            remote = is_s3_location(path)
            existed = not remote and path.exists()
            try:
                stores.append(initialise_store(path, marker))
            except StoreError as exc:
                raise VolumeError(f"cannot create store {path}: {_reason(exc)}") from None
            finally:
                if not remote and path.exists():
                    created.append((path, existed))
            if remote:
                created_remote.append(stores[-1])
        params: dict[str, str | int] = {
            "uuid": volume_id,
            "k": spec.k,
            "m": spec.m,
            "fragment_size": spec.fragment_size,
            "cell_size": spec.cell_size,
            "inline_max": spec.inline_max,
            POLICY_KEY: spec.placement,
        }
        params.update({label_key(store_ids[i]): label for i, label in labels.items()})
        # One timestamp for every replica: they must be identical copies.
        now_ns = time.time_ns()
        store_domains = resolve_stores(dict(enumerate(stores)), labels)
        holders = copy_stores(
            {i: keeps_meta_objects(s) for i, s in enumerate(stores)},
            spec.m,
            store_domains.__getitem__,
        )[: spec.m + 1]
        with tempfile.TemporaryDirectory(prefix="ecfs-mkfs-") as scratch:
            for store in [stores[i] for i in holders]:
                try:
                    if keeps_meta_objects(store):
                        _create_object_copy(store, Path(scratch), params, store_ids, now_ns)
                        continue
                    create_database(
                        replica_path(store.meta_dir),
                        params,
                        store_ids,
                        root_uid=os.getuid(),
                        root_gid=os.getgid(),
                        now_ns=now_ns,
                    )
                except (OSError, EcfsError) as exc:
                    raise VolumeError(
                        f"cannot create the metadata on store {store.path}: {_reason(exc)}"
                    ) from None
    except BaseException:
        for path, existed in reversed(created):
            _remove_created(path, existed)
        for store in created_remote:
            with contextlib.suppress(EcfsError):
                if keeps_meta_objects(store):
                    ObjectCopy(store, uuid.UUID(volume_id).bytes).remove()  # type: ignore[arg-type]
                forget_new_store(store)
        raise
    return volume_id


def _create_object_copy(
    store: Store,
    scratch: Path,
    params: dict[str, str | int],
    store_ids: list[str],
    now_ns: int,
) -> None:
    """The initial metadata as objects on `store` (a snapshot at epoch 0)."""
    made = scratch / f"new-{uuid.uuid4().hex}.sqlite"
    create_database(
        made, params, store_ids, root_uid=os.getuid(), root_gid=os.getgid(), now_ns=now_ns
    )
    image = scratch / f"image-{uuid.uuid4().hex}.sqlite"
    copy_database(made, image)  # one file, journal_mode=DELETE
    generation = read_generation(image)
    if generation is None:
        raise VolumeError(f"the new metadata for {store.path} cannot be read back")
    volume = uuid.UUID(str(params["uuid"])).bytes
    ObjectCopy(store, volume).install(image, generation, 0)  # type: ignore[arg-type]


def _reason(exc: BaseException) -> str:
    """The innermost OS reason of `exc` (without repeating the path)."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _remove_created(path: Path, existed: bool) -> None:
    """Undo `initialise_store` of `path` (which was absent or empty)."""
    if existed:
        for entry in os.listdir(path):
            target = path / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _check_not_inside_a_store(given: Path, path: Path) -> None:
    """VolumeError if a directory above `path` (resolved) is a store: a
    store nested in another would be lost, or swept as stray files, with it."""
    for parent in path.parents:
        if (parent / MARKER_NAME).exists():
            raise VolumeError(f"{given} is inside the existing store {parent}")


def _check_empty(given: Path, path: Path) -> None:
    """VolumeError unless `path` is absent or an empty directory."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        if os.path.lexists(path):  # a dangling symlink
            raise VolumeError(f"{given} is a dangling symbolic link") from None
        return
    except NotADirectoryError:
        raise VolumeError(f"{given} is not a directory") from None
    except OSError as exc:
        raise VolumeError(f"cannot read {given}: {exc.strerror}") from None
    if MARKER_NAME in entries:
        try:
            marker = open_store(path).read_marker()
        except StoreError:
            raise VolumeError(
                f"{given} holds an ecfs store marker (refusing to overwrite it)"
            ) from None
        raise VolumeError(
            f"{given} already holds a store of volume {marker.volume_id} (refusing to overwrite it)"
        )
    if entries:
        raise VolumeError(f"{given} is not empty ({len(entries)} entries); give an empty directory")
