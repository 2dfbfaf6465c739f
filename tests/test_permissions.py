"""Who may read what: the stores are private to the mounting user, the
mount follows POSIX permission rules for other users, and the control
channel answers only root and the mounting user.

Other users are played by uid 65534 (nobody) in a child process running
the system python (the venv's interpreter lives under /root). POSIX rules
that tests/test_mount_posix.py already checks (EACCES on others' files,
sticky unlink/rename of another's file, setgid directory inheritance,
setuid+setgid cleared on a write by a non-owner and on chown by root) are
not repeated here.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.as_user import CHILD_PYTHON, NOBODY, run_as_user
from tests.mounting import REPO_ROOT, MountedVolume, mounted_volume, requires_fuse

OTHER_GROUP = 4242

pytestmark = [
    requires_fuse,
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, a child as another user)"),
]

def run_as(cwd: Path, code: str, uid: int = NOBODY, gid: int = NOBODY) -> list[str]:
    """Run python `code` as `uid` in `cwd`; return its output lines."""
    return run_as_user(uid, gid, cwd, code).splitlines()


# --------------------------------------------------------------------------
# The stores


def _modes(stores: list[Path]) -> list[str]:
    """Everything in the stores that is not a 0700 directory or a 0600
    regular file owned by us."""
    wrong = []
    for store in stores:
        for path in [store, *store.rglob("*")]:
            st = path.lstat()
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if (
                stat.S_IMODE(st.st_mode) != want
                or st.st_uid != os.getuid()
                or stat.S_ISLNK(st.st_mode)
            ):
                wrong.append(f"{path}: {stat.filemode(st.st_mode)} uid {st.st_uid}")
    return wrong


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0 for this test and the daemons it starts: modes must not
    depend on the umask of whoever mounts."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def searchable_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, with every directory above it searchable by others for
    the test (pytest makes its base directory 0700), so that only the
    stores' own modes keep another user out."""
    changed = []
    for directory in [tmp_path, *tmp_path.parents]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & 0o001:
            os.chmod(directory, mode | 0o001)
            changed.append((directory, mode))
    try:
        yield tmp_path
    finally:
        for directory, mode in changed:
            os.chmod(directory, mode)


def test_stores_are_private_to_the_mounting_user(
    searchable_tmp_path: Path, open_umask: None
) -> None:
    tmp_path = searchable_tmp_path
    with mounted_volume(tmp_path) as volume:
        with open(volume.mountpoint / "data", "wb") as f:
            f.write(os.urandom(3 << 20))
            os.fsync(f.fileno())
        (volume.mountpoint / "small").write_bytes(b"inline")
        assert _modes(volume.stores) == []  # incl. the replicas' -wal/-shm files
        out = run_as(
            tmp_path,
            """
            for i in range(6):
                store = f"stores/s{i}"
                print(attempt(os.listdir, store), attempt(open, store + "/ecfs-store.json"),
                      attempt(open, store + "/meta/ecfs-meta.sqlite"))
            print(attempt(os.listdir, "stores"))
            """,
        )
        assert out == ["EACCES EACCES EACCES"] * 6 + ["ok"]
    assert _modes(volume.stores) == []


def test_a_resynced_replica_is_private_too(tmp_path: Path, open_umask: None) -> None:
    with mounted_volume(tmp_path) as volume:
        (volume.mountpoint / "data").write_bytes(os.urandom(1 << 20))
        volume.unmount()
        replica = volume.stores[1] / "meta" / "ecfs-meta.sqlite"
        for path in replica.parent.iterdir():
            path.unlink()
        volume.mount()  # resyncs the replica of store 1
        volume.unmount()
        assert replica.exists()
        assert _modes(volume.stores) == []
        volume.mount()


# --------------------------------------------------------------------------
# Inside the mount


@pytest.fixture(scope="module")
def perm_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    with mounted_volume(tmp_path_factory.mktemp("perm")) as vol:
        os.chmod(vol.mountpoint, 0o755)
        yield vol
    vol.check_log_clean()


@pytest.fixture
def d(perm_volume: MountedVolume, request: pytest.FixtureRequest) -> Path:
    path = perm_volume.mountpoint / request.node.name.replace("[", "-").rstrip("]")
    path.mkdir()
    os.chmod(path, 0o777)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_suid_and_sgid_are_cleared_by_truncate_and_writes_of_the_owner(d: Path) -> None:
    for name in ("by-truncate", "by-write", "owner-write"):
        (d / name).write_bytes(b"#!/bin/sh\n")
        os.chown(d / name, NOBODY if name == "owner-write" else 0, 0)
        os.chmod(d / name, 0o6777 if name != "owner-write" else 0o6775)
    (d / "root-write").write_bytes(b"x")
    os.chmod(d / "root-write", 0o6777)
    out = run_as(
        d,
        """
        os.truncate("by-truncate", 3)
        fd = os.open("by-write", os.O_WRONLY)
        os.pwrite(fd, b"y", 0)
        os.fsync(fd)
        os.close(fd)
        with open("owner-write", "ab") as f:
            f.write(b"more")
        print("ok")
        """,
    )
    assert out == ["ok"]
    with open(d / "root-write", "ab") as f:  # CAP_FSETID: root keeps the bits
        f.write(b"y")
    for name in ("by-truncate", "by-write"):
        assert _mode(d / name) == 0o777, name
    assert _mode(d / "owner-write") == 0o775
    assert _mode(d / "root-write") == 0o6777
    assert (d / "by-truncate").read_bytes() == b"#!/"
    assert (d / "by-write").read_bytes() == b"y!/bin/sh\n"


def test_open_with_o_trunc_by_a_non_owner_clears_suid(d: Path) -> None:
    (d / "f").write_bytes(b"#!/bin/sh\n")
    os.chmod(d / "f", 0o6777)
    assert run_as(
        d,
        """
        os.close(os.open("f", os.O_WRONLY | os.O_TRUNC))
        print(oct(stat.S_IMODE(os.stat("f").st_mode)))
    """,
    ) == ["0o777"]


def test_setgid_is_dropped_for_a_group_the_owner_is_not_in(d: Path) -> None:
    for name in ("foreign-group", "own-group"):
        (d / name).write_bytes(b"")
        os.chown(d / name, NOBODY, OTHER_GROUP if name == "foreign-group" else NOBODY)
    out = run_as(
        d,
        """
        os.chmod("foreign-group", 0o2755)
        os.chmod("own-group", 0o2755)
        print(oct(stat.S_IMODE(os.stat("foreign-group").st_mode)),
              oct(stat.S_IMODE(os.stat("own-group").st_mode)))
        os.chmod("own-group", 0o4755)
        os.chown("own-group", -1, os.getgid())  # the owner's chgrp clears suid
        print(oct(stat.S_IMODE(os.stat("own-group").st_mode)))
        print(attempt(os.chown, "own-group", -1, 4242))
        """,
    )
    assert out == ["0o755 0o2755", "0o755", "EPERM"]
    assert _mode(d / "foreign-group") == 0o755


def test_sticky_directory_rules_for_rename_over_and_the_directory_owner(d: Path) -> None:
    tmp = d / "tmp"
    tmp.mkdir()
    os.chown(tmp, NOBODY, NOBODY)
    os.chmod(tmp, 0o1777)
    for name in ("roots", "roots2"):
        (tmp / name).write_bytes(b"root's")
        os.chmod(tmp / name, 0o666)
    out = run_as(
        tmp,
        """
        open("mine", "wb").close()
        print(attempt(os.rename, "mine", "roots"))       # over another's file
        print(attempt(os.unlink, "roots2"))              # owner of the directory may
        print(attempt(os.rename, "roots", "renamed"))    # owner of the directory may
        """,
    )
    assert out == ["ok", "ok", "ok"]
    other = d / "other-sticky"
    other.mkdir()
    os.chmod(other, 0o1777)
    (other / "roots").write_bytes(b"x")
    os.chmod(other / "roots", 0o666)
    out = run_as(
        other,
        """
        open("mine", "wb").close()
        print(attempt(os.rename, "mine", "roots"))
        print(attempt(os.rename, "roots", "mine"))
        print(open("roots", "rb").read().decode())
        """,
    )
    assert out == ["EPERM", "EPERM", "x"]
    os.unlink(other / "mine")  # root may


def test_access_follows_search_permission_and_modes(d: Path) -> None:
    os.mkdir(d / "closed", 0o700)
    (d / "closed" / "inside").write_bytes(b"x")
    os.chmod(d / "closed" / "inside", 0o666)
    os.mkdir(d / "readonly-dir", 0o555)
    (d / "readonly-dir" / "writable").write_bytes(b"")
    os.chmod(d / "readonly-dir" / "writable", 0o666)
    (d / "root-only").write_bytes(b"secret")
    os.chmod(d / "root-only", 0o600)
    (d / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(d / "exec", 0o711)
    out = run_as(
        d,
        """
        print(os.access("closed/inside", os.R_OK), attempt(open, "closed/inside"))
        print(os.access("readonly-dir", os.W_OK), os.access("readonly-dir", os.X_OK))
        print(os.access("readonly-dir/writable", os.W_OK),
              attempt(os.open, "readonly-dir/new", os.O_CREAT | os.O_WRONLY, 0o644))
        print(os.access("root-only", os.F_OK), os.access("root-only", os.R_OK),
              attempt(open, "root-only"))
        print(os.access("exec", os.X_OK), os.access("exec", os.R_OK))
        """,
    )
    assert out == [
        "False EACCES",
        "False True",
        "True EACCES",
        "True False EACCES",
        "True False",
    ]


# --------------------------------------------------------------------------
# The control channel


def test_control_channel_is_for_root_and_the_mounting_user_only(perm_volume: MountedVolume) -> None:
    mnt = perm_volume.mountpoint
    document = json.loads(os.getxattr(mnt, "user.ecfs.status"))
    assert document["health"] == "healthy"
    os.chmod(mnt, 0o777)  # so that the kernel lets nobody's setxattr through to us
    try:
        out = run_as(
            mnt,
            """
            print(attempt(os.getxattr, ".", "user.ecfs.status"))
            print(attempt(os.getxattr, ".", "user.ecfs.pid"))
            print(attempt(os.getxattr, ".", "user.ecfs.iostat"))
            print(attempt(os.setxattr, ".", "user.ecfs.control", b"scrub"))
            print(attempt(os.setxattr, ".", "user.ecfs.control", b"repair urgent"))
            print(attempt(os.setxattr, ".", "user.ecfs.status", b"x"))
            """,
        )
    finally:
        os.chmod(mnt, 0o755)
    assert out[:5] == ["EACCES"] * 5
    assert out[5] in ("EACCES", "EPERM")
    assert not json.loads(os.getxattr(mnt, "user.ecfs.status"))["scrub"]["running"]


def test_ecfs_status_as_another_user_is_refused(perm_volume: MountedVolume) -> None:
    site = next((REPO_ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    env = {"PYTHONPATH": f"{REPO_ROOT}:{site}", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    argv = [CHILD_PYTHON, "-m", "ecfs", "status", "--json", str(perm_volume.mountpoint)]
    mine = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if "ModuleNotFoundError" in mine.stderr or "ImportError" in mine.stderr:
        pytest.skip(f"the system python cannot run ecfs: {mine.stderr.splitlines()[-1]}")
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout)["health"] == "healthy"
    theirs = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=60, cwd="/",
        user=NOBODY, group=NOBODY, extra_groups=[],
    )  # fmt: skip
    assert theirs.returncode != 0
    message = (theirs.stderr + theirs.stdout).lower()
    assert "only root and the user who mounted" in message, message
    assert "Traceback" not in theirs.stderr
