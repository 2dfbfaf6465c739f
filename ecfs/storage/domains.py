"""Failure domains: which stores fail together.

Owns: resolving a store's default failure domain (the disk it lives on, or
the machine of an object store), the explicit labels kept in the metadata,
and the arithmetic of domains (how many a chunk survives losing, how n
fragments spread over them). Must not: choose stores (see
`ecfs.data.placement`, which uses `spread`) or run SQL (labels are rows of
the metadata's key/value `volume` table, read and written by the caller
through `ecfs.storage.metadb.stores.StoreTable` params).

A failure domain is a name; stores with the same name fail together.

* Explicit: a label given by the user (`ecfs mkfs --domain PATH=LABEL`,
  `ecfs store add --domain LABEL`, `ecfs store set-domain`), e.g. a host,
  an enclosure or a power circuit. Kept in the `volume` table under
  ``domain.<store id>`` (LABEL_PREFIX); it overrides the default.
* Default, local directory: the disk(s) below the filesystem the directory
  is on, named ``disk:NAME`` (``disk:sda``; several disks joined by ``+``).
  The device number `st_dev` of the directory (of its nearest existing
  parent, for a store mkfs is about to create) is resolved through sysfs:
  ``SYSFS/dev/block/MAJ:MIN`` leads to the device; a partition counts as its
  whole disk (the parent of a directory with a ``partition`` file); a
  device-mapper, md or LVM device as the disks under its ``slaves/``
  (recursively); a loop device as the device its backing file
  (``loop/backing_file``) lives on, recursively. So partitions of one disk,
  and LVM or loop devices over one disk, are one domain. A filesystem with
  no block device in sysfs (tmpfs, overlay, btrfs's anonymous devices...)
  is looked up in /proc/self/mountinfo: a source that is a block device
  (``/dev/sdb2``) is resolved as above; otherwise the domain is the device
  number itself, ``dev:MAJ:MIN``.
* Default, object store (`Store.remote`): the endpoint's host and port,
  ``s3:HOST:PORT`` (``s3:aws`` without an endpoint): it is on another
  machine; two buckets of one server are one domain.
* Default stores whose disk sets overlap (an md mirror over sda and sdb,
  and a partition of sda) are merged into one domain (`assign`).

Test seam: the environment variable ECFS_SYSFS_ROOT (default ``/sys``)
points the resolution at another directory tree laid out like sysfs
(``dev/block/MAJ:MIN`` symlinks into ``devices/...``), so that tests can
fake independent disks on a machine that has one. Documented in ecfs(8).

Tolerance (`tolerance`): a chunk with good fragments in domains holding
c1 >= c2 >= ... of them survives losing the first t domains while the rest
hold at least k; a chunk with fewer than k good fragments has tolerance
(good - k), negative, as before domains existed.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from ..core import host
from ..core.errors import VolumeError

#: Environment variable naming the sysfs root (the test seam).
SYSFS_ENV = "ECFS_SYSFS_ROOT"
#: `volume` table key prefix of an explicit label: ``domain.<store id>``.
LABEL_PREFIX = "domain."
#: Longest label accepted.
MAX_LABEL = 64
#: Loop and slave chains followed at most (a loop device backed by a file
#: on itself would otherwise recurse forever).
MAX_DEPTH = 16

_LABEL = re.compile(r"[^\s/=\x00-\x1f\x7f]+")

K = TypeVar("K", bound=Hashable)


def sysfs_root() -> Path:
    return Path(os.environ.get(SYSFS_ENV) or "/sys")


def label_key(store_id: str) -> str:
    return f"{LABEL_PREFIX}{store_id}"


def check_label(label: str) -> str:
    """`label` if it can name a domain (1..MAX_LABEL printable characters,
    no space, slash or '='); VolumeError otherwise."""
    if not 1 <= len(label) <= MAX_LABEL or not _LABEL.fullmatch(label):
        raise VolumeError(
            f"bad failure domain label {label!r}: 1 to {MAX_LABEL} printable characters,"
            " no spaces, slashes or '='"
        )
    return label


def labels_of(params: Mapping[str, object], store_ids: Mapping[int, str]) -> dict[int, str]:
    """Store index -> explicit label, from the volume parameters."""
    labels = {}
    for index, store_id in store_ids.items():
        value = params.get(label_key(store_id))
        if value:
            labels[index] = str(value)
    return labels


# -- default domains ------------------------------------------------------------------


def device_disks(dev: int, root: Path | None = None, depth: int = 0) -> frozenset[str]:
    """The disks (sysfs names) under device number `dev`; empty if sysfs
    does not know it as a block device."""
    root = sysfs_root() if root is None else root
    node = root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
    if depth > MAX_DEPTH or not node.exists():
        return frozenset()
    return _node_disks(Path(os.path.realpath(node)), root, depth)


def _node_disks(node: Path, root: Path, depth: int) -> frozenset[str]:
    if (node / "partition").exists():
        node = node.parent
    backing = node / "loop" / "backing_file"
    if backing.exists():
        try:
            name = backing.read_text(errors="replace").strip().removesuffix(" (deleted)")
            found = device_disks(os.stat(name).st_dev, root, depth + 1)
        except OSError:
            found = frozenset()
        return found or frozenset([node.name])
    slaves = node / "slaves"
    try:
        entries = sorted(os.listdir(slaves)) if depth < MAX_DEPTH else []
    except OSError:
        entries = []
    disks: set[str] = set()
    for entry in entries:
        disks |= _node_disks(Path(os.path.realpath(slaves / entry)), root, depth + 1)
    return frozenset(disks) if disks else frozenset([node.name])


def _mount_source_device(dev: int) -> int | None:
    """The block device (st_rdev) given as source of the mount whose device
    number is `dev` (btrfs, for instance, reports an anonymous st_dev)."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    for mount in host.mounts():
        if mount.device == wanted and mount.source.startswith("/dev/"):
            try:
                return os.stat(mount.source).st_rdev or None
            except OSError:
                return None
    return None


def device_atoms(dev: int) -> frozenset[str]:
    """The default domain atoms of a filesystem with device number `dev`:
    ``disk:NAME`` per disk below it, else ``dev:MAJ:MIN``."""
    disks = device_disks(dev)
    if not disks:
        try:
            source = _mount_source_device(dev)
        except OSError:
            source = None
        if source is not None:
            disks = device_disks(source)
    if disks:
        return frozenset(f"disk:{name}" for name in disks)
    return frozenset([f"dev:{os.major(dev)}:{os.minor(dev)}"])


def path_atoms(path: os.PathLike[str] | str) -> frozenset[str]:
    """The default domain atoms of a directory (its nearest existing parent
    if it does not exist yet); OSError if none can be stat()ed."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return device_atoms(os.stat(existing).st_dev)


def endpoint_atoms(endpoint: str | None) -> frozenset[str]:
    """The domain of an object store at `endpoint` (None: AWS)."""
    if endpoint is None:
        return frozenset(["s3:aws"])
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return frozenset([f"s3:{parts.hostname}:{port}"])


class Located(Protocol):
    """What `resolve_stores` needs of a store: its default domain atoms
    (`ecfs.storage.store.Store.domain_atoms`; every store kind has it)."""

    def domain_atoms(self) -> frozenset[str]: ...


def assign(atoms: Mapping[K, frozenset[str]], labels: Mapping[K, str]) -> dict[K, str]:
    """The domain name of every store: its label if it has one, else its
    atoms joined by '+', stores whose atoms overlap merged into one."""
    groups: list[set[str]] = []
    for found in atoms.values():
        merged = set(found)
        for group in [g for g in groups if g & merged]:
            merged |= group
            groups.remove(group)
        groups.append(merged)
    names = {}
    for key, found in atoms.items():
        group = next(g for g in groups if g & found) if found else {"unknown"}
        names[key] = labels.get(key) or "+".join(sorted(group))
    for key, label in labels.items():
        names[key] = label
    return names


def resolve_stores(stores: Mapping[K, Located], labels: Mapping[K, str]) -> dict[K, str]:
    """Domain names of open stores (blocking: stat and sysfs reads); a store
    that cannot be reached and has no label is ``unknown:KEY``."""
    atoms = {}
    for key, store in stores.items():
        if key in labels:
            continue
        try:
            atoms[key] = store.domain_atoms()
        except OSError:
            atoms[key] = frozenset([f"unknown:{key}"])
    return assign(atoms, labels)


# -- arithmetic -----------------------------------------------------------------------


def tolerance(domains: Iterable[str], k: int) -> int:
    """How many domains a chunk whose good fragments are in `domains` (one
    entry per fragment) can lose while k fragments remain (negative: it is
    already short by that many)."""
    counts = sorted(Counter(domains).values(), reverse=True)
    left = sum(counts)
    if left < k:
        return left - k
    lost = 0
    for count in counts:
        if left - count < k:
            break
        left -= count
        lost += 1
    return lost


def even_layout(domains: Mapping[K, str], n: int) -> list[str]:
    """The domain of each of n fragments spread as evenly as the stores
    (`domains`: store -> domain) allow, one fragment per store."""
    capacity = Counter(domains.values())
    used: Counter[str] = Counter()
    layout = []
    for _ in range(min(n, len(domains))):
        domain = min((d for d in capacity if used[d] < capacity[d]), key=lambda d: (used[d], d))
        used[domain] += 1
        layout.append(domain)
    return layout


def layout_tolerance(domains: Mapping[K, str], k: int, n: int) -> int:
    """How many domains a chunk placed as evenly as possible over the
    stores `domains` (store -> domain) survives losing."""
    return tolerance(even_layout(domains, n), k)


def shared(domains: Mapping[K, str]) -> dict[str, list[K]]:
    """The domains holding more than one store: domain -> its stores."""
    members: dict[str, list[K]] = {}
    for key, domain in domains.items():
        members.setdefault(domain, []).append(key)
    return {d: keys for d, keys in members.items() if len(keys) > 1}


def spread(
    ordered: Sequence[int], count: int, domain: Callable[[int], str], taken: Iterable[str] = ()
) -> list[int]:
    """Up to `count` of the stores `ordered` (best first), each next one
    from a domain holding the fewest fragments so far (`taken`: one entry
    per fragment of the chunk already placed), best first among equals:
    distinct domains while there are enough, as even as possible after."""
    load = Counter(taken)
    left = list(ordered)
    chosen: list[int] = []
    while left and len(chosen) < count:
        best = min(range(len(left)), key=lambda i: (load[domain(left[i])], i))
        store = left.pop(best)
        load[domain(store)] += 1
        chosen.append(store)
    return chosen


# -- copies (metadata, small-write log records) ----------------------------------------


def copy_helps(
    have: Iterable[K], store: K, wanted: int, reachable: int, domain: Callable[[K], str]
) -> bool:
    """Whether one more copy on `store` helps copies on `have`: they are
    fewer than `wanted`, or they span fewer than min(wanted, `reachable`)
    distinct domains (`reachable`: how many domains hold a store that
    could take a copy) and `store` is in a domain holding none of them.
    So m+1 copies end up in m+1 domains while the stores allow it, and
    losing one domain never takes them all while two domains are left."""
    held = list(have)
    if len(held) < wanted:
        return True
    domains = {domain(s) for s in held}
    return len(domains) < min(wanted, reachable) and domain(store) not in domains


def surplus_copies(have: Sequence[K], wanted: int, domain: Callable[[K], str]) -> list[K]:
    """The copies of `have` (best first) that can go while at least
    `wanted` remain in as many distinct domains as before: from the domain
    holding the most copies, the last first."""
    kept = list(have)
    dropped: list[K] = []
    while len(kept) > wanted:
        load = Counter(domain(s) for s in kept)
        crowded = [s for s in kept if load[domain(s)] > 1]
        if not crowded:
            break
        worst = max(crowded, key=lambda s: (load[domain(s)], kept.index(s)))
        kept.remove(worst)
        dropped.append(worst)
    return dropped
