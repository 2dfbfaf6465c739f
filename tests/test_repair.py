"""Background repair, scrub and store replacement through a real mount,
driven through the control attributes the CLI uses."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from tests.mounting import MountedVolume
from tests.volume_files import (
    MiB,
    drop_caches,
    flip_payload_bytes,
    fragment_files,
    fragments_by_chunk,
    sha256_file,
    status,
    store_bytes,
    write_pattern_file,
)

K, M = 4, 2


def command(volume: MountedVolume, text: str) -> None:
    os.setxattr(volume.mountpoint, "user.ecfs.control", text.encode())


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = predicate()
        if current:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_repaired(volume: MountedVolume, timeout: float = 120.0) -> dict:
    def done() -> dict | None:
        s = status(volume)
        repair = s["repair"]
        return s if repair["chunks"] == 0 and not repair["busy"] else None

    return wait_for(done, timeout, "the repair queue to drain")


def run_scrub(volume: MountedVolume) -> dict:
    command(volume, "scrub")

    def finished() -> dict | None:
        scrub = status(volume)["scrub"]
        return scrub if scrub["finished_ns"] and not scrub["running"] else None

    return wait_for(finished, 120.0, "scrub to finish")


def populate(volume: MountedVolume, count: int, size: int = 3 * MiB + 77) -> dict[Path, str]:
    return {
        volume.mountpoint / f"f{i}": write_pattern_file(volume.mountpoint / f"f{i}", i, size + i)
        for i in range(count)
    }


def check(hashes: dict[Path, str]) -> None:
    drop_caches()
    for path, digest in hashes.items():
        assert sha256_file(path) == digest, path


def assert_fully_placed(stores: list[Path]) -> None:
    for chunk_id, placed in fragments_by_chunk(stores).items():
        assert sorted(placed) == list(range(K + M)), f"chunk {chunk_id:x}: {placed}"
        assert len(set(placed.values())) == K + M, f"chunk {chunk_id:x} shares a store"


def test_lost_store_contents_are_rebuilt_read_first(volume: MountedVolume) -> None:
    hashes = populate(volume, 6)
    volume.unmount()
    expected = set(fragment_files(volume.stores[3]))
    shutil.rmtree(volume.stores[3] / "frags")
    volume.mount()
    command(volume, "repair urgent")
    first = next(iter(hashes))
    assert sha256_file(first) == hashes[first]  # served degraded, queued by demand
    s = status(volume)
    assert s["reads"]["degraded_reads"] > 0
    scrub = run_scrub(volume)  # finds every other missing fragment
    assert scrub["finding_count"] > 0
    s = wait_repaired(volume)
    assert s["repair"]["fragments_rebuilt"] == len(expected)
    volume.unmount()
    assert set(fragment_files(volume.stores[3])) == expected
    assert_fully_placed(volume.stores)
    total = sum(store_bytes(s) for s in volume.stores)
    assert abs(store_bytes(volume.stores[3]) / total - 1 / (K + M)) < 0.03
    # Read through the rebuilt fragments: take two other stores away.
    volume.mount(stores=[s for i, s in enumerate(volume.stores) if i not in (0, 1)])
    check(hashes)


def test_scrub_finds_exactly_the_rotten_fragments_and_repair_fixes_them(volume: MountedVolume) -> None:
    hashes = populate(volume, 4)
    volume.unmount()
    rng = random.Random(3)
    rotten: set[tuple[int, int]] = set()
    for store_no in (1, 4):
        frags = sorted(fragment_files(volume.stores[store_no]).items())
        for (chunk_id, index), path in rng.sample(frags, 3):
            flip_payload_bytes(path, rng, 1, mask=0x55)
            rotten.add((chunk_id, index))
    volume.mount()
    scrub = run_scrub(volume)
    found = {(f["chunk_id"], i) for f in scrub["findings"] for i in f["fragments"]}
    assert found == rotten
    command(volume, "repair urgent")
    wait_repaired(volume)
    scrub = run_scrub(volume)
    assert scrub["finding_count"] == 0
    check(hashes)
    volume.unmount()
    assert_fully_placed(volume.stores)
    fsck = _fsck(volume)
    if fsck is not None:
        assert fsck.clean, fsck.to_json()
    volume.mount()


def test_temporary_absence_repairs_only_chunks_written_meanwhile(volume: MountedVolume) -> None:
    hashes = populate(volume, 3)
    volume.unmount()
    away = 5
    volume.mount(stores=[s for i, s in enumerate(volume.stores) if i != away])
    check(hashes)  # degraded reads queue chunks that are in fact fine
    new = volume.mountpoint / "while-away"
    hashes[new] = write_pattern_file(new, 77, 4 * 512 * 1024)  # exactly 4 chunks
    volume.unmount()
    volume.mount()
    command(volume, "repair urgent")
    s = wait_repaired(volume)
    assert s["repair"]["chunks_repaired"] == 4
    assert s["repair"]["fragments_rebuilt"] == 4
    check(hashes)
    volume.unmount()
    assert_fully_placed(volume.stores)
    volume.mount()


def test_kill_during_repair_then_resume(volume: MountedVolume) -> None:
    hashes = populate(volume, 8, size=6 * MiB)
    volume.unmount()
    shutil.rmtree(volume.stores[2] / "frags")
    volume.mount("-o", "repair_rate=4M")
    run_scrub(volume)  # queues every chunk; repair crawls at 4 MB/s
    time.sleep(1.0)
    assert status(volume)["repair"]["chunks"] > 0
    volume.kill()
    volume.mount()
    command(volume, "repair urgent")
    wait_repaired(volume)
    s = status(volume)
    assert s["repair"]["chunks"] == 0
    check(hashes)
    volume.unmount()
    assert_fully_placed(volume.stores)
    fsck = _fsck(volume, repair=True)
    if fsck is not None:  # orphans of the killed repair may be cleaned up
        assert not [f for f in fsck.findings if f.check != "no_orphan_fragments"], fsck.to_json()
        assert _fsck(volume).clean
    volume.mount()


def test_replace_a_dead_store(volume: MountedVolume, tmp_path: Path) -> None:
    hashes = populate(volume, 5)
    volume.unmount()
    dead = volume.stores[4]
    shutil.rmtree(dead)
    survivors = [s for s in volume.stores if s != dead]
    volume.mount(stores=survivors)
    new = tmp_path / "new-disk" / "ecfs"
    command(volume, f"store-replace {dead} {new}")
    wait_for(lambda: status(volume)["store_change"].get("state") == "done", 60, "replace")
    command(volume, "repair urgent")
    wait_repaired(volume)
    check(hashes)
    volume.unmount()
    volume.stores = [*survivors, new]
    assert_fully_placed(volume.stores)
    assert len(fragment_files(new)) == len(fragments_by_chunk(volume.stores))
    volume.mount()
    check(hashes)


def _fsck(volume: MountedVolume, repair: bool = False):
    try:
        from ecfs.volume.fsck import run_fsck
    except ImportError:
        return None
    return run_fsck([str(s) for s in volume.stores], repair=repair, verify_data=True)


def test_add_a_store_and_drain_one_through_the_cli(tmp_path: Path) -> None:
    from tests.mounting import cli, mounted_volume

    with mounted_volume(tmp_path) as volume:
        hashes = populate(volume, 2)
        extra = tmp_path / "disk7" / "ecfs"
        result = cli("store", "add", str(volume.mountpoint), str(extra))
        assert "added" in result.stdout
        hashes.update(
            {volume.mountpoint / "after-add": write_pattern_file(volume.mountpoint / "after-add", 9, 8 * MiB)}
        )
        assert fragment_files(extra), "new chunks should use the new store"
        leaving = volume.stores[0]
        result = cli("store", "remove", str(volume.mountpoint), str(leaving))
        assert "drained" in result.stdout
        check(hashes)
        assert not (leaving / "ecfs-store.json").exists()  # retired: globs skip it now
        volume.unmount()
        volume.stores = [*volume.stores[1:], extra]
        assert_fully_placed(volume.stores)
        volume.mount()
        check(hashes)
        status_run = cli("status", str(volume.mountpoint), check=False)
        assert status_run.returncode == 0, status_run.stdout
        assert "can lose 2 more stores" in status_run.stdout


def test_scrub_and_repair_commands(volume: MountedVolume) -> None:
    from tests.mounting import cli

    hashes = populate(volume, 2)
    volume.unmount()
    victim = next(iter(fragment_files(volume.stores[2]).values()))
    victim.unlink()
    volume.mount()
    scrub = cli("scrub", "--json", str(volume.mountpoint), check=False)
    assert scrub.returncode == 1  # findings
    assert '"finding_count": 1' in scrub.stdout
    repair = cli("repair", "--wait", str(volume.mountpoint))  # may have started already
    assert "1 fragments rebuilt" in repair.stdout
    assert cli("status", str(volume.mountpoint), check=False).returncode == 0
    check(hashes)


def test_repair_with_nowhere_to_rebuild_reads_nothing(volume: MountedVolume) -> None:
    """k + m stores and one away: every other store already holds a fragment
    of each chunk, so there is no target; repair must not read k fragments
    and decode them (competing with the readers) only to give up."""
    hashes = populate(volume, 2)
    volume.unmount()
    volume.mount(stores=volume.stores[:-1])
    check(hashes)  # degraded reads queue the chunks with a fragment on the last store
    assert status(volume)["repair"]["chunks"] > 0
    command(volume, "repair urgent")

    def deferred() -> dict | None:
        current = status(volume)
        return current if current["repair"]["deferred"] > 0 else None

    s = wait_for(deferred, 60.0, "repair to defer the chunks")
    assert s["repair"]["bytes_read"] == 0, s["repair"]
    assert s["repair"]["chunks_repaired"] == 0
    volume.unmount()
    volume.mount()


def test_known_bad_fragments_count_against_tolerance(volume: MountedVolume) -> None:
    """A chunk waiting in the repair queue with a corrupt fragment can lose
    one store fewer: status says tolerance m - 1 (health degraded) until it
    is repaired, then m again."""
    hashes = populate(volume, 1, size=3 * MiB + 77)
    volume.unmount()
    rng = random.Random(12)
    corrupted = set()
    for store in volume.stores:
        for (chunk_id, index), path in sorted(fragment_files(store).items()):
            if index == 0 and chunk_id not in corrupted and len(corrupted) < 2:
                flip_payload_bytes(path, rng, 64)
                corrupted.add(chunk_id)
    assert len(corrupted) == 2
    # Rate-limited: after the first chunk, repair pauses (for days), so the
    # second stays queued.
    volume.mount("-o", "repair_rate=1")
    assert status(volume)["tolerance"] == M
    check(hashes)  # degraded reads queue both chunks

    def one_left() -> dict | None:
        s = status(volume)
        return s if s["repair"]["chunks_repaired"] == 1 and s["repair"]["chunks"] == 1 else None

    s = wait_for(one_left, 60.0, "one chunk repaired, one queued")
    assert s["tolerance"] == M - 1, s["repair"]
    assert s["health"] == "degraded"
    volume.unmount()
    volume.mount()
    command(volume, "repair urgent")
    s = wait_repaired(volume)
    assert s["tolerance"] == M
    assert s["health"] == "healthy"
    check(hashes)
