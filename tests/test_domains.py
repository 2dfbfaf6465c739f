"""Failure domains without a mount: resolving a store's disk through a fake
sysfs tree (ECFS_SYSFS_ROOT: partitions, device-mapper with slaves, loop
devices with backing files, independent disks), the domain arithmetic,
placement over domains, the tolerance `assess` counts in domains, mkfs's
refusal and labels, and the control commands that carry labels."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from ecfs.core.errors import FsError, VolumeError
from ecfs.core.model import NO_STORE
from ecfs.data.placement import HYBRID, Placement
from ecfs.storage import domains
from ecfs.storage.domains import (
    assign,
    check_label,
    device_atoms,
    even_layout,
    label_key,
    layout_tolerance,
    path_atoms,
    spread,
    tolerance,
)
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.stores import StoreTable
from ecfs.storage.replicas import replica_path
from ecfs.storage.storefactory import open_store
from ecfs.volume.control import parse_command
from ecfs.volume.mkfs import VolumeSpec, create_volume
from ecfs.volume.status import assess, redundancy_warning
from tests.mounting import cli


class FakeSysfs:
    """A directory laid out like sysfs: devices/... and dev/block/MAJ:MIN links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "dev" / "block").mkdir(parents=True)

    def device(self, dev: tuple[int, int], where: str) -> Path:
        """A device directory devices/`where` reachable as dev/block/MAJ:MIN."""
        node = self.root / "devices" / where
        node.mkdir(parents=True, exist_ok=True)
        link = self.root / "dev" / "block" / f"{dev[0]}:{dev[1]}"
        link.symlink_to(os.path.relpath(node, link.parent))
        return node

    def disk(self, dev: tuple[int, int], name: str) -> Path:
        return self.device(dev, f"pci0/block/{name}")

    def partition(self, dev: tuple[int, int], disk: str, name: str) -> Path:
        node = self.device(dev, f"pci0/block/{disk}/{name}")
        (node / "partition").write_text("1\n")
        return node

    def virtual(self, dev: tuple[int, int], name: str, slaves: list[Path] = ()) -> Path:
        node = self.device(dev, f"virtual/block/{name}")
        (node / "slaves").mkdir()
        for slave in slaves:
            (node / "slaves" / slave.name).symlink_to(os.path.relpath(slave, node / "slaves"))
        return node

    def loop(self, dev: tuple[int, int], name: str, backing: Path) -> Path:
        node = self.virtual(dev, name)
        (node / "loop").mkdir()
        (node / "loop" / "backing_file").write_text(f"{backing}\n")
        return node


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    root = tmp_path / "sys"
    root.mkdir()
    monkeypatch.setenv(domains.SYSFS_ENV, str(root))
    return FakeSysfs(root)


def dev(major: int, minor: int) -> int:
    return os.makedev(major, minor)


# --- resolution through sysfs ----------------------------------------------------


def test_partitions_of_one_disk_are_one_domain(sysfs: FakeSysfs) -> None:
    sysfs.disk((8, 0), "sda")
    sysfs.partition((8, 1), "sda", "sda1")
    sysfs.partition((8, 2), "sda", "sda2")
    sysfs.disk((8, 16), "sdb")
    sysfs.partition((8, 17), "sdb", "sdb1")
    assert device_atoms(dev(8, 1)) == device_atoms(dev(8, 2)) == {"disk:sda"}
    assert device_atoms(dev(8, 17)) == {"disk:sdb"}
    assert device_atoms(dev(8, 0)) == {"disk:sda"}


def test_device_mapper_counts_as_the_disks_under_its_slaves(sysfs: FakeSysfs) -> None:
    sysfs.disk((8, 0), "sda")
    sda2 = sysfs.partition((8, 2), "sda", "sda2")
    sysfs.disk((8, 16), "sdb")
    sdb1 = sysfs.partition((8, 17), "sdb", "sdb1")
    sysfs.disk((8, 32), "sdc")
    sdc1 = sysfs.partition((8, 33), "sdc", "sdc1")
    pv = sysfs.virtual((9, 0), "md0", [sdb1, sdc1])  # a mirror over two disks
    sysfs.virtual((253, 0), "dm-0", [sda2])  # LVM on sda
    sysfs.virtual((253, 1), "dm-1", [sda2])  # another LV of the same PV
    sysfs.virtual((253, 2), "dm-2", [pv])  # LVM on the mirror
    assert device_atoms(dev(253, 0)) == device_atoms(dev(253, 1)) == {"disk:sda"}
    assert device_atoms(dev(253, 2)) == {"disk:sdb", "disk:sdc"}
    atoms = {
        "lv0": device_atoms(dev(253, 0)),
        "lv1": device_atoms(dev(253, 1)),
        "on-mirror": device_atoms(dev(253, 2)),
        "sdc1": device_atoms(dev(8, 33)),
    }
    # The mirror shares sdc with a plain partition of sdc: one domain.
    assert assign(atoms, {}) == {
        "lv0": "disk:sda", "lv1": "disk:sda",
        "on-mirror": "disk:sdb+disk:sdc", "sdc1": "disk:sdb+disk:sdc",
    }  # fmt: skip


def test_a_loop_device_is_the_disk_its_backing_file_lives_on(
    sysfs: FakeSysfs, tmp_path: Path
) -> None:
    """Two loop devices whose files are on one disk (here: the test's own
    disk, made sda2 of the fake tree) are one domain; a loop device over a
    file on a loop device is followed recursively."""
    here = os.stat(tmp_path).st_dev
    sysfs.disk((8, 0), "sda")
    sysfs.partition((os.major(here), os.minor(here)), "sda", "sda2")
    first, second = tmp_path / "one.img", tmp_path / "two.img"
    first.write_bytes(b"")
    second.write_bytes(b"")
    sysfs.loop((7, 0), "loop0", first)
    sysfs.loop((7, 1), "loop1", second)
    assert device_atoms(dev(7, 0)) == device_atoms(dev(7, 1)) == {"disk:sda"}
    # A backing file that is gone: the loop device is a domain of its own.
    sysfs.loop((7, 2), "loop2", tmp_path / "deleted.img")
    assert device_atoms(dev(7, 2)) == {"disk:loop2"}


def test_independent_disks_and_devices_unknown_to_sysfs(sysfs: FakeSysfs) -> None:
    sysfs.disk((8, 0), "sda")
    sysfs.disk((8, 16), "sdb")
    assert device_atoms(dev(8, 0)) != device_atoms(dev(8, 16))
    # tmpfs, overlay...: no block device, the device number itself.
    assert device_atoms(dev(0, 4242)) == {"dev:0:4242"}


def test_a_store_that_does_not_exist_yet_is_on_its_parent(
    sysfs: FakeSysfs, tmp_path: Path
) -> None:
    here = os.stat(tmp_path).st_dev
    sysfs.disk((os.major(here), os.minor(here)), "vdz")
    assert path_atoms(tmp_path / "new" / "store") == {"disk:vdz"}


def test_stores_of_the_real_machine_resolve(tmp_path: Path) -> None:
    """Without the seam, two directories of one filesystem are one domain."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert path_atoms(tmp_path / "a") == path_atoms(tmp_path / "b")


# --- arithmetic ------------------------------------------------------------------------


def test_tolerance_counts_domains_holding_most_fragments_first() -> None:
    assert tolerance(["a", "b", "c", "d", "e", "f"], 4) == 2
    assert tolerance(["a", "a", "b", "c", "d", "e"], 4) == 1  # losing a takes two
    assert tolerance(["a", "a", "a", "b", "b", "b"], 4) == 0
    assert tolerance(["a"] * 6, 4) == 0
    assert tolerance(["a", "b", "c"], 4) == -1
    assert layout_tolerance({0: "a", 1: "a", 2: "b", 3: "c"}, 2, 3) == 1
    assert layout_tolerance({0: "a", 1: "a", 2: "a"}, 2, 3) == 0
    assert Counter(even_layout({0: "a", 1: "a", 2: "a", 3: "b"}, 3)) == {"a": 2, "b": 1}


def test_labels_must_be_names() -> None:
    assert check_label("rack-1.psu:a") == "rack-1.psu:a"
    for bad in ("", "two words", "a/b", "a=b", "x" * 65, "tab\there"):
        with pytest.raises(VolumeError):
            check_label(bad)


def test_spread_takes_distinct_domains_first_then_evens_out() -> None:
    domain = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}.__getitem__
    assert spread([0, 1, 2, 3, 4], 3, domain) == [0, 2, 4]
    assert sorted(Counter(map(domain, spread([0, 1, 2, 3, 4], 5, domain))).values()) == [1, 2, 2]
    assert spread([0, 1, 2, 3, 4], 1, domain, taken=["a", "b"]) == [4]


# --- placement ---------------------------------------------------------------------


class Up:
    available = True


def placement(domains_of: dict[int, str], policy: str = "spread", **kw: object) -> Placement:
    return Placement(
        {i: Up() for i in domains_of}, policy=policy, domain=domains_of.__getitem__, **kw
    )


def test_placement_never_shares_a_domain_while_a_layout_avoids_it() -> None:
    """7 stores in 4 domains (two stores each on disks a, b, c): every chunk
    of a 2+2 code gets 4 distinct domains, whatever the round-robin turn and
    free space say."""
    doms = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c", 6: "d"}
    place = placement(doms)
    for turn in range(20):
        targets = place.targets(4)
        assert None not in targets
        assert len({doms[t] for t in targets if t is not None}) == 4, (turn, targets)
    # Any number of fragments (another redundancy policy): 3 and 2.
    assert len({doms[t] for t in place.targets(3) if t is not None}) == 3
    assert len({doms[t] for t in place.targets(2) if t is not None}) == 2


def test_placement_degrades_gracefully_when_domains_are_short() -> None:
    doms = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "b"}
    place = placement(doms)
    targets = place.targets(4)
    assert sorted(Counter(doms[t] for t in targets if t is not None).values()) == [2, 2]
    assert len(set(targets)) == 4  # still distinct stores


def test_replacement_and_rebuild_avoid_domains_the_chunk_uses() -> None:
    doms = {0: "a", 1: "a", 2: "b", 3: "c", 4: "d"}
    place = placement(doms)
    # Another store for fragment 3 of a chunk that uses 0, 2 and 4: not 1 (domain a).
    assert place.replacement(3, {0, 2, 4}) == 3  # 1 is in domain a, like store 0
    # Rebuild of fragment 2 whose store 3 is gone; candidates 1 (a, shared) and 4 (d).
    stores = (0, 2, 3, NO_STORE)
    assert place.rebuild_target(stores, 3) == 4
    # A fragment whose own store shares a domain with another fragment moves
    # when a free domain has a candidate, and stays when none has.
    assert place.rebuild_target((0, 1, 2, 3), 1) == 4
    assert place.rebuild_target((0, 2, 3, 4), 0) == 0


def test_hybrid_placement_spreads_domains_within_each_class() -> None:
    doms = {0: "disk1", 1: "disk1", 2: "disk2", 3: "s3:h:1", 4: "s3:h:2"}
    remote = {3, 4}
    place = Placement(
        {i: Up() for i in doms}, remote=remote.__contains__, policy=HYBRID, k=2,
        domain=doms.__getitem__,
    )  # fmt: skip
    targets = place.targets(4)
    assert {doms[t] for t in targets[:2] if t is not None} == {"disk1", "disk2"}
    assert set(targets[2:]) == {3, 4}


# --- status ------------------------------------------------------------------------


def test_assess_counts_domains_and_new_chunks() -> None:
    doms = {0: "a", 1: "a", 2: "b", 3: "c"}
    classes = [((0, 2, 3), 0, 5, 5 * 8192), ((0, 1, 2), 0, 1, 8192)]
    found = assess(2, 3, doms, set(doms), classes, [], doms.__getitem__)
    assert found.tolerance == 0  # the chunk on 0, 1, 2 loses two fragments with a
    found = assess(2, 3, doms, set(doms), classes[:1], [], doms.__getitem__)
    assert found.tolerance == 1
    # Each store its own domain (the default): as before domains existed.
    found = assess(2, 3, doms, set(doms), classes, [], str)
    assert found.tolerance == 1
    # An empty volume on one disk: 0, and the warning says it plainly.
    one = dict.fromkeys(range(4), "disk:vda")
    assert assess(2, 3, one, set(one), [], [], one.__getitem__).tolerance == 0
    warning = redundancy_warning(2, 1, one)
    assert warning is not None and "illusory" in warning and "0, 1, 2, 3 share disk:vda" in warning
    assert redundancy_warning(2, 1, {0: "a", 1: "b", 2: "c"}) is None
    partial = redundancy_warning(2, 2, {0: "a", 1: "a", 2: "b", 3: "c"})
    assert partial is not None and "1 failure domain(s), not 2" in partial
    # Two stores share a domain but four others remain for 2+2: no warning.
    assert redundancy_warning(2, 2, {0: "a", 1: "a", 2: "b", 3: "c", 4: "d"}) is None


# --- mkfs and the control channel -----------------------------------------------------


def test_mkfs_refuses_stores_on_one_disk_and_names_them(tmp_path: Path) -> None:
    stores = [tmp_path / f"s{i}" for i in range(3)]
    refused = cli("mkfs", "-k", 2, "-m", 1, *stores, check=False, test_domains=False)
    assert refused.returncode == 2
    message = refused.stderr
    assert "1 failure domain(s)" in message and "k+m=3" in message
    assert all(str(s) in message for s in stores)
    assert "--allow-shared-domains" in message and "--domain" in message
    assert not any(s.exists() for s in stores)  # nothing was created
    cli("mkfs", "-k", 2, "-m", 1, "--allow-shared-domains", *stores)


def test_mkfs_keeps_labels_in_the_volume_table(tmp_path: Path) -> None:
    stores = [tmp_path / f"s{i}" for i in range(4)]
    labels = {stores[0]: "rack1", stores[1]: "rack1", stores[2]: "rack2", stores[3]: "rack3"}
    refused = cli(
        "mkfs", "-k", 2, "-m", 2, *[f"--domain={s}={d}" for s, d in labels.items()], *stores,
        check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and f"{stores[0]}, {stores[1]} share rack1" in refused.stderr
    create_volume(
        stores, VolumeSpec(k=2, m=1), domains={str(s): d for s, d in labels.items()}
    )
    db = Database(replica_path(stores[0] / "meta"))
    try:
        table = StoreTable(db)
        params, ids = table.params(), dict(table.all())
    finally:
        db.close()
    assert [params[label_key(ids[i])] for i in range(4)] == ["rack1", "rack1", "rack2", "rack3"]
    with pytest.raises(VolumeError, match="not one of the stores"):
        create_volume(
            [tmp_path / "x", tmp_path / "y"], VolumeSpec(k=1, m=1), domains={"/elsewhere": "a"}
        )


def test_control_commands_carry_domain_labels() -> None:
    command = parse_command("store-add /srv/new --domain=rack2 --allow-shared-domains")
    assert (command.new, command.domain, command.allow_shared) == ("/srv/new", "rack2", True)
    command = parse_command("store-replace 3 /srv/new")
    assert (command.old, command.domain, command.allow_shared) == ("3", None, False)
    assert parse_command("store-domain 2 rack9").domain == "rack9"
    assert parse_command("store-domain 2").domain is None
    for bad in ("store-domain 2 'a b'", "store-add /srv/x --domain=a/b", "store-add /x --bogus"):
        with pytest.raises(FsError):
            parse_command(bad)


def test_an_object_store_is_the_domain_of_its_endpoint() -> None:
    """Two buckets of one server fail together; AWS without an endpoint is one domain."""
    one = open_store("s3://bucket-a/x?endpoint=http://nas.example:9000").domain_atoms()
    assert one == open_store("s3://bucket-b/y?endpoint=http://nas.example:9000").domain_atoms()
    assert one == {"s3:nas.example:9000"}
    assert open_store("s3://bucket-c?endpoint=https://other.example").domain_atoms() == {
        "s3:other.example:443"
    }
    assert open_store("s3://bucket-d").domain_atoms() == {"s3:aws"}


# --- copies of the metadata and of small-write log records over domains ----------------


def test_metadata_copies_go_to_distinct_domains() -> None:
    """Stores 0 and 1 share rack1: the old rule (local stores by index) put
    both m+1 = 2 copies there; now the second copy goes to rack2."""
    from ecfs.storage.domains import copy_helps, surplus_copies
    from ecfs.storage.metaobjects import copy_stores

    racks = {0: "rack1", 1: "rack1", 2: "rack2", 3: "rack3"}
    local = {i: False for i in racks}
    assert copy_stores(local, 1)[:2] == [0, 1]  # every store its own domain: as before
    assert copy_stores(local, 1, racks.__getitem__)[:2] == [0, 2]
    assert copy_stores(local, 2, racks.__getitem__) == [0, 2, 3, 1]
    # Local stores all on one disk, object stores elsewhere: a copy goes off the disk.
    disk = {0: "disk:sda", 1: "disk:sda", 2: "s3:a:80", 3: "s3:b:80"}
    mixed = {0: False, 1: False, 2: True, 3: True}
    assert copy_stores(mixed, 1, disk.__getitem__)[:2] == [0, 2]
    assert copy_stores(mixed, 1)[:2] == [0, 1]
    # A copy in a new domain helps two copies in one; one in a used domain does not.
    assert copy_helps([0, 1], 2, 2, 3, racks.__getitem__)
    assert not copy_helps([0, 1], 1, 2, 3, racks.__getitem__)
    assert not copy_helps([0, 2], 3, 2, 3, racks.__getitem__)
    assert copy_helps([0], 1, 2, 3, racks.__getitem__)  # too few: any store helps
    assert not copy_helps([0, 1], 2, 2, 1, {0: "a", 1: "a", 2: "a"}.__getitem__)
    assert surplus_copies([0, 1, 2], 2, racks.__getitem__) == [1]
    assert surplus_copies([0, 2, 3], 2, racks.__getitem__) == []


def test_small_write_log_copies_go_to_distinct_domains() -> None:
    """Stores 0, 1 in domain a and 2, 3 in domain b: every record's m+1 = 2
    copies are in both domains (the rotation alone put some in one), also
    when a record is copied again next to a store that holds it."""
    import trio

    from ecfs.data.logfiles import LogFiles
    from ecfs.data.smallwrites import Record
    from ecfs.storage.fakestores import MemoryStore
    from ecfs.storage.offload import StoreRunner

    racks = {0: "a", 1: "a", 2: "b", 3: "b"}
    runners = {i: StoreRunner(i, MemoryStore()) for i in racks}
    files = LogFiles(runners, 2, b"k" * 16, lambda: 0, domain=racks.__getitem__)
    records = [Record(i, 2, 0, 9, 0, bytes([i]) * 100, 5, 6) for i in range(1, 9)]

    async def main() -> tuple[dict[int, list[tuple[int, int, int]]], dict]:
        placed = {}
        for record in records:  # one append each: the rotation moves on
            placed.update(await files.write([record]))
        again = await files.write(records[:1], {1: {1}}, want=1)
        return placed, again

    placed, again = trio.run(main)
    for places in placed.values():
        assert sorted(racks[p[0]] for p in places) == ["a", "b"]
    assert [racks[p[0]] for p in again[1]] == ["b"]


def test_fragments_in_a_shared_domain_are_misplaced_while_a_domain_is_free() -> None:
    racks = {0: "a", 1: "a", 2: "b", 3: "c", 4: "d"}

    class Up:
        available = True

    runners = {i: Up() for i in racks}
    placement = Placement(runners, domain=racks.__getitem__)
    assert placement.shared_domain([0, 1, 2]) == [1]  # d and c are free
    assert placement.misplaced([0, 1, 2]) == [1]
    assert placement.misplaced_reason([0, 1, 2]) == "shared-domain"
    assert placement.movable([0, 1, 2]) == [1]
    assert placement.rebuild_target([0, 1, 2], 1) in (3, 4)
    assert placement.shared_domain([0, 2, 3]) == []
    assert placement.shared_domain([0, 1, 2, 3, 4]) == []  # every domain used: unavoidable
    assert placement.shared_domain([0, NO_STORE, 1]) == [2]
    runners[3].available = runners[4].available = False  # domains c and d are down
    assert placement.shared_domain([0, 1, 2]) == [1]  # a layout exists: wait for it
    assert placement.movable([0, 1, 2]) == []
