"""Crash safety through a real mount: SIGKILL of the daemon at many points
of a write workload, simulated power loss, and unmounting while files are
being written.

How the kill loop works (`test_kill_loop`): a workload process (this
module run as a script, see `workload_main`) writes through the mount and
journals every operation BEFORE making the call (and every fsync AFTER it
returned) to a local file. The test kills the daemon at a seeded random
moment, then the workload. From the journal it rebuilds every state each
file went through, and after recovery checks:

* the namespace equals the namespace after some operation at or after the
  last fsync that returned (a fsync makes every earlier transaction
  durable, see `Volume._wait_durable`);
* every file's size and content lie between its state at its last fsync
  (or its creation) and its newest state: each unit of the file equals
  that unit in one of those states. The unit is one chunk for files
  written with O_DIRECT (the daemon then receives every write in one
  piece: a chunk must be one version, never a mix) and one 4 KiB page for
  files written through the page cache (the kernel's writeback may send
  the pages of one write() in any order, so only pages are atomic);
  a file fsync'd and not changed since must be exact;
* fsck of the killed volume (before the remount) finds only replicas at
  different generations, orphan fragments and inodes unlinked while open:
  never a chunk whose fragments are missing, which would mean metadata
  became durable before the fragments it refers to;
* every few kills: a clean unmount, then fsck with verify_data finds at
  most orphan fragments, and fsck --repair leaves the volume clean (no
  fragment is leaked forever).

Power loss (`--power-loss` kills in the loop): the daemon runs with a
trace of every fragment write and every store sync (a sitecustomize hook
written by the test, see `SYNC_TRACE_HOOK`). After the kill, every fragment
file not covered by a completed sync is deleted, as a machine crash may
lose it; the replica databases commit with synchronous=FULL, so what they
hold is durable. The checks above must still hold.

The workload profiles aim at kill points: `bigseq` (chunk encode and
fragment writes of long sequential writes), `rewrite` (copy-on-write of
existing chunks and the deletion of the replaced versions), `storm`
(rename/unlink/create storms of small and inline files), `commits`,
`overwrite` (fsync'd 4 KiB overwrites: small-write log records and their
folds) and `mixed`.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mounting import (
    REPO_ROOT,
    TEST_FRAGMENT_SIZE,
    MountedVolume,
    mounted_volume,
    requires_fuse,
)

K, M = 4, 2
FRAGMENT = TEST_FRAGMENT_SIZE
CHUNK = K * FRAGMENT
PAGE = 4096
INLINE_MAX = 64 * 1024

pytestmark = [requires_fuse, pytest.mark.mount]

# Log entries a killed or power-cut volume may legitimately cause.
CRASH_LOG = (
    r"metadata replica .* is stale",
    r"resynced metadata replica",
    r"freeing inode",
    r"write-back .*failed",  # the workload's writes after the kill
    r"reduced redundancy",
    r"cannot place chunk",
    r"fewer than|unrecoverable|Unrecoverable",
)


# --------------------------------------------------------------------------
# The workload (runs in its own process, writes through the mount)


class Workload:
    """Seeded operations on files in one directory of the mount, journalled."""

    def __init__(self, root: Path, journal: Path, seed: int, profile: str) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.profile = profile
        self.journal = open(journal, "a", buffering=1)  # noqa: SIM115 - lives as long as we do
        self.names: dict[str, int] = {}  # name -> fid
        self.kinds: dict[int, str] = {}  # fid -> "dio" | "buf"
        self.sizes: dict[int, int] = {}
        self.next_fid = 0
        self.next_seed = seed * 1_000_003
        self.buffer = mmap.mmap(-1, 4 * CHUNK)

    def log(self, **record: object) -> None:
        self.journal.write(json.dumps(record) + "\n")

    def path(self, name: str) -> Path:
        return self.root / name

    # -- operations, each journalled before the call (fsync after) --

    def create(self, kind: str | None = None) -> int:
        fid = self.next_fid
        self.next_fid += 1
        name = self.rng.choice(["", "sub/"]) + f"f{fid}"
        kind = kind or self.rng.choice(["dio", "dio", "buf"])
        self.log(op="create", name=name, fid=fid, kind=kind)
        os.close(os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        self.names[name] = fid
        self.kinds[fid] = kind
        self.sizes[fid] = 0
        return fid

    def name_of(self, fid: int) -> str:
        return next(n for n, f in self.names.items() if f == fid)

    def write(self, fid: int, offset: int, length: int, fsync: bool = False) -> None:
        seed = self.next_seed
        self.next_seed += 1
        data = random.Random(seed).randbytes(length)
        self.log(op="write", fid=fid, off=offset, len=length, seed=seed)
        dio = self.kinds[fid] == "dio"
        flags = os.O_WRONLY | (os.O_DIRECT if dio else 0)
        fd = os.open(self.path(self.name_of(fid)), flags)
        try:
            pos = 0
            while pos < length:
                # At most one chunk per call: O_DIRECT sends each call to the
                # daemon as one request.
                step = min(length - pos, CHUNK - (offset + pos) % CHUNK)
                if dio:
                    self.buffer[:step] = data[pos : pos + step]
                    done = os.pwrite(fd, memoryview(self.buffer)[:step], offset + pos)
                else:
                    done = os.pwrite(fd, data[pos : pos + step], offset + pos)
                assert done == step
                pos += step
            if fsync:
                os.fsync(fd)
                self.log(op="fsynced", fid=fid)
        finally:
            os.close(fd)
        self.sizes[fid] = max(self.sizes[fid], offset + length)

    def fsync(self, fid: int) -> None:
        fd = os.open(self.path(self.name_of(fid)), os.O_RDONLY)
        try:
            os.fsync(fd)
            self.log(op="fsynced", fid=fid)
        finally:
            os.close(fd)

    def truncate(self, fid: int, size: int) -> None:
        self.log(op="truncate", fid=fid, size=size)
        os.truncate(self.path(self.name_of(fid)), size)
        self.sizes[fid] = size

    def rename(self, src: str, dst: str) -> None:
        self.log(op="rename", src=src, dst=dst)
        os.rename(self.path(src), self.path(dst))
        self.names[dst] = self.names.pop(src)

    def unlink(self, name: str) -> None:
        self.log(op="unlink", name=name)
        os.unlink(self.path(name))
        del self.names[name]

    # -- profiles --

    def run(self) -> None:
        self.log(op="mkdir", name="sub")
        os.mkdir(self.root / "sub")
        self.log(op="ready")
        step = getattr(self, f"step_{self.profile}")
        while True:
            step()

    def random_fid(self) -> int | None:
        return self.names[self.rng.choice(sorted(self.names))] if self.names else None

    def small_size(self) -> int:
        return self.rng.choice([1, 100, 4096, 5000, 40_000, INLINE_MAX])

    def step_mixed(self) -> None:
        rng = self.rng
        fid = self.random_fid()
        action = rng.choice(
            ["create_small", "create_big", "append", "patch", "rewrite", "truncate", "rename",
             "unlink", "fsync"]
        )  # fmt: skip
        if fid is None or action.startswith("create") or len(self.names) < 4:
            new = self.create()
            size = (
                self.small_size() if action == "create_small" else rng.randrange(CHUNK, 3 * CHUNK)
            )
            self.write(new, 0, size, fsync=rng.random() < 0.3)
        elif action == "append":
            self.write(fid, self.sizes[fid], rng.randrange(1, CHUNK), fsync=rng.random() < 0.3)
        elif action == "patch" and self.sizes[fid]:
            offset = rng.randrange(self.sizes[fid]) // PAGE * PAGE
            self.write(fid, offset, rng.choice([PAGE, 3 * PAGE, 100]), fsync=rng.random() < 0.3)
        elif action == "rewrite" and self.sizes[fid] >= CHUNK:
            index = rng.randrange(self.sizes[fid] // CHUNK)
            self.write(fid, index * CHUNK, CHUNK, fsync=rng.random() < 0.3)
        elif action == "truncate":
            self.truncate(fid, rng.randrange(self.sizes[fid] + CHUNK))
        elif action == "rename":
            src = rng.choice(sorted(self.names))
            dst = rng.choice(sorted(self.names) + [f"r{rng.randrange(10**6)}"])
            if src != dst:
                self.rename(src, dst)
        elif action == "unlink":
            self.unlink(rng.choice(sorted(self.names)))
        else:
            self.fsync(fid)

    def step_bigseq(self) -> None:
        fid = self.create("dio")
        size = self.rng.randrange(8, 16) * CHUNK + self.rng.randrange(CHUNK)
        offset = 0
        while offset < size:
            length = min(size - offset, 2 * CHUNK)
            self.write(fid, offset, length, fsync=self.rng.random() < 0.2)
            offset += length

    def step_rewrite(self) -> None:
        if not self.names:
            fid = self.create("dio")
            self.write(fid, 0, 6 * CHUNK + 1000, fsync=True)
        fid = self.random_fid()
        assert fid is not None
        index = self.rng.randrange(6)
        if self.rng.random() < 0.8:
            self.write(fid, index * CHUNK, CHUNK, fsync=self.rng.random() < 0.25)
        else:
            self.write(fid, index * CHUNK + PAGE, PAGE, fsync=self.rng.random() < 0.25)

    def step_storm(self) -> None:
        rng = self.rng
        action = rng.random()
        if action < 0.35 or len(self.names) < 6:
            fid = self.create(rng.choice(["dio", "buf"]))
            size = rng.choice([10, 3000, 20_000, CHUNK + 5])
            self.write(fid, 0, size, fsync=rng.random() < 0.15)
        elif action < 0.75:
            src = rng.choice(sorted(self.names))
            dst = rng.choice(
                sorted(self.names) + [f"sub/m{rng.randrange(10**6)}", f"m{rng.randrange(10**6)}"]
            )
            if src != dst:
                self.rename(src, dst)
        elif action < 0.95:
            self.unlink(rng.choice(sorted(self.names)))
        else:
            fid = self.random_fid()
            assert fid is not None
            self.fsync(fid)

    def step_commits(self) -> None:
        """Many tiny fsync'd transactions: the replicator applies batches all
        the time, so a kill may land between the commits of two replicas."""
        rng = self.rng
        if len(self.names) < 5 or rng.random() < 0.5:
            fid = self.create("buf")
            self.write(fid, 0, rng.choice([10, 300, 5000]), fsync=True)
        else:
            src = rng.choice(sorted(self.names))
            dst = f"c{rng.randrange(10**6)}"
            self.rename(src, dst)
            self.fsync(self.names[dst])

    def step_overwrite(self) -> None:
        """Small fsync'd overwrites of existing chunks (the small-write log,
        ecfs.data.smallwrites): records, folds of them, and now and then a
        truncate into a logged chunk."""
        rng = self.rng
        if not self.names:
            fid = self.create(rng.choice(["dio", "buf"]))
            self.write(fid, 0, 3 * CHUNK + 5000, fsync=True)
        fid = self.random_fid()
        assert fid is not None
        if rng.random() < 0.05 and self.sizes[fid] > PAGE:
            self.truncate(fid, rng.randrange(self.sizes[fid] // 2, self.sizes[fid]))
            return
        offset = rng.randrange(max(1, self.sizes[fid]) // PAGE + 1) * PAGE
        self.write(fid, offset, rng.choice([PAGE, PAGE, 2 * PAGE]), fsync=rng.random() < 0.9)


def workload_main(argv: list[str]) -> int:
    root, journal, seed, profile = Path(argv[0]), Path(argv[1]), int(argv[2]), argv[3]
    try:
        Workload(root, journal, seed, profile).run()
    except OSError as exc:  # the daemon was killed under us
        print(f"workload stopped: {exc}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# Rebuilding what the workload did, and checking a recovered directory


@dataclass
class FileHistory:
    kind: str
    created: int  # journal line of the create
    ops: list[tuple[int, dict]] = field(default_factory=list)  # (line, record)
    fsynced: int = -1  # journal line of the last fsync that returned


@dataclass
class Journal:
    files: dict[int, FileHistory]
    namespaces: list[tuple[int, dict[str, int]]]  # (line, names -> fid) after each op
    last_fsync: int  # journal line of the last fsync that returned (-1: none)

    @classmethod
    def read(cls, path: Path) -> Journal:
        files: dict[int, FileHistory] = {}
        names: dict[str, int] = {}
        namespaces: list[tuple[int, dict[str, int]]] = [(-1, {})]
        last_fsync = -1
        lines = path.read_text().splitlines()
        for line_no, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a torn last line
            op = rec["op"]
            if op == "create":
                files[rec["fid"]] = FileHistory(rec["kind"], line_no)
                names[rec["name"]] = rec["fid"]
            elif op == "mkdir":
                names[rec["name"]] = -1
            elif op == "rename":
                names[rec["dst"]] = names.pop(rec["src"])
            elif op == "unlink":
                del names[rec["name"]]
            elif op in ("write", "truncate"):
                files[rec["fid"]].ops.append((line_no, rec))
                continue
            elif op == "fsynced":
                files[rec["fid"]].fsynced = line_no
                last_fsync = line_no
                continue
            else:
                continue
            namespaces.append((line_no, dict(names)))
        return cls(files, namespaces, last_fsync)

    def candidate_namespaces(self) -> list[dict[str, int]]:
        """Namespaces the recovered directory may show: the one in effect at
        the last fsync, and every later one."""
        start = (
            max(i for i, (line, _) in enumerate(self.namespaces) if line < self.last_fsync)
            if self.last_fsync >= 0
            else 0
        )
        return [ns for _, ns in self.namespaces[start:]]


def _apply(content: bytearray, rec: dict) -> tuple[int, int]:
    """Apply a write or truncate record; return the byte range it changed."""
    if rec["op"] == "write":
        off, length = rec["off"], rec["len"]
        if len(content) < off:
            content.extend(bytes(off - len(content)))
        content[off : off + length] = random.Random(rec["seed"]).randbytes(length)
        return off, off + length
    size = rec["size"]
    old = len(content)
    if size < old:
        del content[size:]
    else:
        content.extend(bytes(size - old))
    return min(size, old), max(size, old)


def check_file(history: FileHistory, actual: bytes) -> str | None:
    """None if `actual` is a plausible recovered content of the file, else why not."""
    unit = CHUNK if history.kind == "dio" else PAGE
    content = bytearray()
    # Replay to the file's state at its last fsync (the lower bound).
    ops = history.ops
    first = 0
    while first < len(ops) and ops[first][0] < history.fsynced:
        _apply(content, ops[first][1])
        first += 1
    size = len(actual)
    n_units = -(-size // unit)
    matched = [False] * n_units
    sizes = {len(content)}

    def compare(lo: int, hi: int) -> None:
        for u in range(lo // unit, min(n_units, -(-hi // unit))):
            if matched[u]:
                continue
            a, b = u * unit, min((u + 1) * unit, size)
            have = content[a:b]
            if len(have) < b - a:
                have = have + bytes(b - a - len(have))
            if actual[a:b] == have:
                matched[u] = True

    compare(0, size)
    for _, rec in ops[first:]:
        lo, hi = _apply(content, rec)
        sizes.add(len(content))
        compare(lo, max(hi, size))
    exact = first == len(ops) and history.fsynced >= 0
    if history.kind == "dio" or exact:
        if size not in sizes:
            return (
                f"size {size} is not one of the sizes it had since its last fsync {sorted(sizes)}"
            )
    elif not min(sizes) <= size <= max(sizes):
        return f"size {size} outside [{min(sizes)}, {max(sizes)}]"
    bad = [u for u, ok in enumerate(matched) if not ok]
    if bad:
        what = "chunk" if unit == CHUNK else "page"
        return f"{what}s {bad[:8]} match no version written since the last fsync"
    return None


def read_tree(root: Path) -> dict[str, bytes | None]:
    """name -> content (None for directories), relative to root."""
    found: dict[str, bytes | None] = {}
    for directory, dirnames, filenames in os.walk(root):
        rel = Path(directory).relative_to(root)
        for d in dirnames:
            found[(rel / d).as_posix()] = None
        for f in filenames:
            found[(rel / f).as_posix()] = (Path(directory) / f).read_bytes()
    return found


def check_recovered(journal: Journal, root: Path) -> tuple[int, int]:
    """Assert the recovered directory is plausible; return (files checked,
    of which exact-after-fsync)."""
    tree = read_tree(root) if root.exists() else {}
    candidates = [ns for ns in journal.candidate_namespaces() if set(ns) == set(tree)]
    assert candidates, (
        f"recovered names {sorted(tree)} match no namespace since the last fsync;"
        f" newest: {sorted(journal.namespaces[-1][1])}"
    )
    problems: list[str] = []
    for ns in reversed(candidates):
        problems = []
        exact = 0
        for name, fid in ns.items():
            content = tree[name]
            if fid < 0:
                continue
            history = journal.files[fid]
            why = check_file(history, content or b"")
            if why:
                problems.append(f"{name} (fid {fid}, {history.kind}): {why}")
            elif history.fsynced >= 0 and all(line < history.fsynced for line, _ in history.ops):
                exact += 1
        if not problems:
            return sum(1 for f in ns.values() if f >= 0), exact
    raise AssertionError("recovered files are not plausible:\n" + "\n".join(problems))


# --------------------------------------------------------------------------
# Power loss: a trace of fragment writes and store syncs inside the daemon

SYNC_TRACE_HOOK = '''
"""Test hook (tests/test_crash.py): trace fragment writes and store syncs."""
import os
import threading

_path = os.environ.get("ECFS_TEST_SYNC_TRACE")
if _path:
    from ecfs import store as _store

    _fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _write, _sync = _store.DirectoryStore.write_fragment, _store.DirectoryStore.sync

    def _log(text):
        os.write(_fd, (text + "\\n").encode())

    def write_fragment(self, chunk_id, index, parts):
        written = _write(self, chunk_id, index, parts)
        _log(f"W {os.path.join(self.path, self.fragment_relpath(chunk_id, index))}")
        return written

    def sync(self):
        me = threading.get_ident()
        _log(f"S+ {me}")
        _sync(self)
        _log(f"S- {me}")

    _store.DirectoryStore.write_fragment = write_fragment
    _store.DirectoryStore.sync = sync
'''


def unsynced_fragments(trace: Path) -> list[Path]:
    """Fragment files written after the start of the last completed sync
    (all stores of the tests share one filesystem: syncfs of one syncs all)."""
    lines = trace.read_text().splitlines() if trace.exists() else []
    open_syncs: dict[str, int] = {}
    cutoff = 0
    for pos, line in enumerate(lines):
        kind, _, arg = line.partition(" ")
        if kind == "S+":
            open_syncs[arg] = pos
        elif kind == "S-" and arg in open_syncs:
            cutoff = max(cutoff, open_syncs.pop(arg))
    return [Path(line[2:]) for line in lines[cutoff:] if line.startswith("W ")]


# --------------------------------------------------------------------------
# Helpers on the stores


def durable_chunk_counter(stores: list[Path]) -> int:
    """The chunk id counter in the freshest readable replica."""
    best = (-1, 0)
    for store in stores:
        path = store / "meta" / "ecfs-meta.sqlite"
        if not path.exists():
            continue
        try:
            conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
            try:
                generation = conn.execute("SELECT generation FROM replica_state").fetchone()[0]
                counter = conn.execute(
                    "SELECT value FROM counters WHERE name = 'chunk'"
                ).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            continue
        best = max(best, (generation, counter))
    return best[1]


def fragment_paths(stores: list[Path]) -> Iterator[tuple[int, Path]]:
    for store in stores:
        for path in (store / "frags").rglob("*.*"):
            yield int(path.name.partition(".")[0], 16), path


def remove_reusable_orphans(stores: list[Path]) -> int:
    """Delete fragment files whose chunk id the durable metadata has not
    handed out yet: orphans of the killed daemon that the next mount would
    collide with (see test_chunk_ids_are_not_reused_after_a_crash). fsck
    would delete them as orphans too. Returns how many."""
    counter = durable_chunk_counter(stores)
    doomed = [p for chunk_id, p in fragment_paths(stores) if chunk_id >= counter]
    for path in doomed:
        path.unlink()
    return len(doomed)


def fsck(stores: list[Path], repair: bool = False, verify_data: bool = True):  # type: ignore[no-untyped-def]
    from ecfs.volume.fsck import run_fsck

    return run_fsck([str(s) for s in stores], repair=repair, verify_data=verify_data)


ALLOWED_AFTER_KILL = ("replicas_agree", "no_orphan_fragments")


def classify_killed_volume(stores: list[Path]) -> Counter[str]:
    """fsck (read-only) of a killed volume: what the kill left behind.
    Fails on anything a crash must never leave."""
    report = fsck(stores, verify_data=False)
    found: Counter[str] = Counter()
    bad = []
    for finding in report.findings:
        if finding.check in ALLOWED_AFTER_KILL:
            found[finding.check] += 1
        elif finding.check == "namespace_consistent" and "has no links" in finding.message:
            found["unlinked-open inode"] += 1
        elif finding.check == "write_log_valid" and re.search(
            r"has [1-9]\d* of \d+ copies", finding.message
        ):
            # A small-write log append cut by the kill: some of its copies
            # were written, its fsync never returned; the mount writes the
            # missing copies (WriteLog.upkeep), as fsck --repair does.
            found["log record short of copies"] += 1
        else:
            bad.append(f"{finding.check}: {finding.message}")
    assert not bad, "the crash left damage:\n" + "\n".join(bad)
    # Incomplete fragment sets among the orphans: killed during fragment
    # writes or during the deletion of a replaced version.
    per_chunk: Counter[int] = Counter(chunk_id for chunk_id, _ in fragment_paths(stores))
    found["orphan fragments"] = report.counts.get("orphan_fragments", 0)
    found["chunks with a partial fragment set"] = sum(1 for n in per_chunk.values() if n < K + M)
    return found


def assert_clean_after_unmount(volume: MountedVolume) -> int:
    """fsck with verify_data: only orphans; --repair makes it clean. Returns
    the number of orphan fragments deleted."""
    report = fsck(volume.stores)
    others = [f for f in report.findings if f.check != "no_orphan_fragments"]
    assert not others, [f.to_json() for f in others]
    if report.clean:
        return 0
    repaired = fsck(volume.stores, repair=True)
    assert fsck(volume.stores).clean, repaired.to_json()
    return repaired.counts.get("orphans_deleted", 0)


def start_workload(root: Path, journal: Path, seed: int, profile: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECFS_TEST")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("PYTHONSTARTUP", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.test_crash",
            "workload",
            str(root),
            str(journal),
            str(seed),
            profile,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_ready(journal: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while '"ready"' not in (journal.read_text() if journal.exists() else ""):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "workload did not start"
        time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture
def traced_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Daemons started by this test trace fragment writes and syncs to the
    returned file; TMPDIR is private, to see what killed daemons leave there."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(SYNC_TRACE_HOOK))
    monkeypatch.setenv("PYTHONPATH", str(hook_dir))
    trace = tmp_path / "sync-trace"
    monkeypatch.setenv("ECFS_TEST_SYNC_TRACE", str(trace))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    return trace


# --------------------------------------------------------------------------
# The tests

KILL_POINTS = int(os.environ.get("ECFS_CRASH_KILLS", "30"))
PROFILES = ("mixed", "bigseq", "rewrite", "storm", "commits", "overwrite")
FULL_CHECK_EVERY = 3


@pytest.mark.allow_log(*CRASH_LOG)
def test_kill_loop(tmp_path: Path, traced_env: Path, request: pytest.FixtureRequest) -> None:
    rng = random.Random(20261122)
    summary: list[str] = []
    totals: Counter[str] = Counter()
    with mounted_volume(tmp_path / "vol") as volume:
        for n in range(KILL_POINTS):
            profile = PROFILES[n % len(PROFILES)]
            # (every third kill; with six profiles, overwrite's every other)
            power_loss = n % 3 == 1 or (profile == "overwrite" and n % 12 == 11)
            root = volume.mountpoint / f"c{n}"
            root.mkdir()
            journal = tmp_path / f"journal-{n}"
            proc = start_workload(root, journal, rng.randrange(1 << 30), profile)
            try:
                wait_ready(journal, proc)
                delay = rng.uniform(0.1, 1.2)
                time.sleep(delay)
                volume.kill()
            finally:
                stop(proc)
            dropped = 0
            if power_loss:
                for path in unsynced_fragments(traced_env):
                    if path.exists():
                        path.unlink()
                        dropped += 1
            found = classify_killed_volume(volume.stores)
            reused = remove_reusable_orphans(volume.stores)
            volume.mount()
            files, exact = check_recovered(Journal.read(journal), root)
            ops = len(Journal.read(journal).namespaces)
            line = (
                f"kill {n:2d} {profile:7s} {'power' if power_loss else 'kill '} at {delay:.2f}s:"
                f" {files} files ({exact} exact after fsync), {ops} namespace ops;"
                f" {dict(found)}; unsynced fragments dropped: {dropped};"
                f" orphans with reusable ids: {reused}"
            )
            summary.append(line)
            totals.update(found)
            totals["files checked"] += files
            totals["exact after fsync"] += exact
            totals["unsynced dropped"] += dropped
            if n % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1:
                volume.unmount()
                totals["orphans deleted by fsck"] += assert_clean_after_unmount(volume)
                volume.mount()
            # Deleting the checked files makes the next workload run while
            # their chunks are being deleted.
            subprocess.run(["rm", "-rf", str(root)], check=True, timeout=60)
        volume.unmount()
        assert_clean_after_unmount(volume)
        volume.mount()
        leftovers = list((tmp_path / "tmp").glob("ecfs-*"))
    report = (
        "\n".join(summary)
        + f"\ntotals: {dict(totals)}; working copies left in TMPDIR: {len(leftovers)}"
    )
    print(report)
    (tmp_path / "kill-report.txt").write_text(report)
    volume.check_log_clean([*CRASH_LOG, r"store \d+ .* failed", r"is back"])


if __name__ == "__main__" and sys.argv[1:2] == ["workload"]:
    sys.exit(workload_main(sys.argv[2:]))


# --------------------------------------------------------------------------
# Unmounting while files are open and being written

WRITER = r"""
import os, random, sys, time
root = sys.argv[1]
def data(seed, n):
    return random.Random(seed).randbytes(n)
# Closed before the unmount.
for i in range(3):
    with open(os.path.join(root, f"closed{i}"), "wb") as f:
        f.write(data(i, 700_000 * (i + 1)))
# fsync'd and kept open.
synced = open(os.path.join(root, "synced"), "wb")
synced.write(data(10, 1_500_000)); synced.flush(); os.fsync(synced.fileno())
# Open and being written when the unmount comes.
busy = [open(os.path.join(root, f"busy{i}"), "wb") for i in range(2)]
dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
print("ready", flush=True)
sys.stdin.readline()  # the test unmounts, then tells us to go on
for round_ in range(8):
    for i, f in enumerate(busy):
        f.write(data(100 + 10 * i + round_, 300_000))
    time.sleep(0.05)
synced.write(data(11, 200_000))
# A file created after the lazy unmount, through a directory fd.
fd = os.open("late", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
os.write(fd, data(20, 50_000)); os.close(fd); os.close(dir_fd)
for f in busy:
    f.close()
synced.close()
print("done", flush=True)
"""


def expected_after_writer() -> dict[str, bytes]:
    def data(seed: int, n: int) -> bytes:
        return random.Random(seed).randbytes(n)

    files = {f"closed{i}": data(i, 700_000 * (i + 1)) for i in range(3)}
    files["synced"] = data(10, 1_500_000) + data(11, 200_000)
    for i in range(2):
        files[f"busy{i}"] = b"".join(data(100 + 10 * i + r, 300_000) for r in range(8))
    files["late"] = data(20, 50_000)
    return files


@pytest.mark.parametrize("how", ["umount -l", "fusermount3 -uz"])
def test_lazy_unmount_while_files_are_written(tmp_path: Path, how: str) -> None:
    with mounted_volume(tmp_path) as volume:
        root = volume.mountpoint / "w"
        root.mkdir()
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            try:
                assert writer.stdout is not None and writer.stdin is not None
                assert writer.stdout.readline().strip() == "ready"
                # A plain unmount is refused while files are open.
                busy = subprocess.run(
                    ["fusermount3", "-u", str(volume.mountpoint)], capture_output=True, text=True
                )
                assert busy.returncode != 0 and "busy" in busy.stderr.lower(), busy
                assert volume.is_mounted
                subprocess.run([*how.split(), str(volume.mountpoint)], check=True, timeout=30)
                assert not volume.is_mounted
                writer.stdin.write("go\n")
                writer.stdin.flush()
                assert writer.stdout.readline().strip() == "done"
                assert writer.wait(60) == 0
            finally:
                if writer.poll() is None:
                    writer.kill()
        # The daemon served the detached mount until the last file closed,
        # then wrote everything back and exited cleanly.
        assert volume.proc is not None
        volume.proc.wait(30)
        volume.unmount()
        assert "cleanly" in volume.log_text()
        assert_clean_after_unmount(volume)
        volume.mount()
        for name, content in expected_after_writer().items():
            assert (root / name).read_bytes() == content, name
    volume.check_log_clean()


# --------------------------------------------------------------------------
# Bugs found by the kill loop, each shown by the smallest test


def test_chunk_ids_are_not_reused_after_a_crash(tmp_path: Path) -> None:
    with mounted_volume(tmp_path) as volume:
        with open(volume.mountpoint / "lost", "wb") as f:
            f.write(random.Random(1).randbytes(4 * CHUNK))
        volume.kill()  # within the commit interval: the reservation is lost
        volume.mount()
        data = random.Random(2).randbytes(4 * CHUNK)
        with open(volume.mountpoint / "new", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        volume.remount()
        assert (volume.mountpoint / "new").read_bytes() == data
    text = volume.log_text()
    assert "File exists" not in text and "failed" not in text


def test_a_killed_daemon_leaves_no_working_copy_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "tmp"
    runtime.mkdir()
    monkeypatch.setenv("TMPDIR", str(runtime))
    with mounted_volume(tmp_path / "vol") as volume:
        volume.kill()
        volume.mount()
    assert list(runtime.glob("ecfs-*")) == []


def replica_modes(stores: list[Path], ino: int, scratch: Path) -> set[int]:
    """The mode of inode `ino` in every readable replica on `stores`, as
    on the disk. A mounted volume holds its replicas in exclusive locking
    mode (no SQLite connection can open them): their files (database and
    WAL) are copied to `scratch` and read there; a copy taken in the middle
    of a checkpoint may miss rows (the caller polls)."""
    modes = set()
    for store in stores:
        live = store / "meta" / "ecfs-meta.sqlite"
        if not live.exists():
            continue
        path = scratch / f"{store.name}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        try:
            for suffix in ("", "-wal"):
                if Path(f"{live}{suffix}").exists():
                    shutil.copyfile(f"{live}{suffix}", f"{path}{suffix}")
        except FileNotFoundError:  # the WAL was deleted meanwhile
            continue
        conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT mode FROM inodes WHERE id = ?", (ino,)).fetchone()
        except sqlite3.Error:
            continue
        finally:
            conn.close()
        if row is not None:
            modes.add(row[0])
    return modes


def test_fsynced_attribute_changes_survive_a_kill(tmp_path: Path) -> None:
    """chown/chmod/utimens are written back lazily (Namespace.setattr with
    defer): fsync of the file, or of the directory, must still make them
    durable before it returns."""
    with mounted_volume(tmp_path) as volume:
        f = volume.mountpoint / "f"
        f.write_bytes(b"x")
        d = volume.mountpoint / "d"
        d.mkdir()
        os.chown(f, 12, 34)
        os.chmod(f, 0o600)
        os.utime(f, ns=(1_000_000_000, 2_000_000_000))
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(d, 0o701)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        volume.kill()
        volume.mount()
        st = os.stat(f)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 12, 34)
        assert st.st_mtime_ns == 2_000_000_000
        assert os.stat(d).st_mode & 0o7777 == 0o701


def test_attribute_changes_reach_the_replicas_without_fsync(tmp_path: Path) -> None:
    """A deferred chmod of a closed file is written back by the background
    write-back, then shipped by the replicator: no fsync, no close needed."""
    with mounted_volume(tmp_path) as volume:
        f = volume.mountpoint / "f"
        f.write_bytes(b"x")
        ino = os.stat(f).st_ino
        os.chmod(f, 0o640)
        deadline = time.monotonic() + 60
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        while replica_modes(volume.stores, ino, scratch) != {0o100640}:
            assert time.monotonic() < deadline, replica_modes(volume.stores, ino, scratch)
            time.sleep(0.1)
        volume.kill()
        volume.mount()
        assert os.stat(f).st_mode == 0o100640
