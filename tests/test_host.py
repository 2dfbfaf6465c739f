"""ecfs.core.host: the one mount-table reader and drop_caches, shared by ecfs,
the tests and the scripts."""

from __future__ import annotations

from pathlib import Path

from ecfs.core import host

TABLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "40 22 0:35 / /mnt/with\\040space rw,nosuid,nodev - fuse.ecfs ecfs rw,user_id=0,group_id=0\n"
    "41 22 0:36 / /srv/back\\134slash rw - tmpfs tmp\\040fs rw\n"
    "42 40 0:37 / /mnt/with\\040space rw shared:7 master:2 - fuse.faultfs faultfs rw\n"
    "not a mountinfo line\n"
)


def test_mounts_parses_every_field_and_unescapes(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(TABLE)
    found = host.mounts(str(tmp_path / "mountinfo"))
    assert [m.mountpoint for m in found] == [
        Path("/"), Path("/mnt/with space"), Path("/srv/back\\slash"), Path("/mnt/with space"),
    ]  # fmt: skip
    ecfs = found[1]
    assert (ecfs.device, ecfs.fstype, ecfs.source) == ("0:35", "fuse.ecfs", "ecfs")
    assert (ecfs.options, ecfs.super_options) == ("rw,nosuid,nodev", "rw,user_id=0,group_id=0")
    assert found[2].source == "tmp fs"
    assert found[3].fstype == "fuse.faultfs"  # optional fields before "-" skipped


def test_mount_at_finds_the_visible_mount(tmp_path: Path) -> None:
    root = host.mount_at("/")
    assert root is not None and root.mountpoint == Path("/")
    assert host.mount_at(tmp_path) is None or host.mount_at(tmp_path).mountpoint == tmp_path  # type: ignore[union-attr]
    assert host.mount_at(tmp_path / "not-there", resolve=False) is None


def test_drop_caches_writes_3_or_says_it_could_not(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    knob = tmp_path / "drop_caches"
    monkeypatch.setattr(host, "DROP_CACHES", str(knob))
    assert host.drop_caches(sync=False) is True
    assert knob.read_text() == "3\n"
    monkeypatch.setattr(host, "DROP_CACHES", str(tmp_path / "missing" / "drop_caches"))
    assert host.drop_caches(sync=False) is False
