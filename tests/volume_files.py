"""Helpers for mount tests: deterministic file contents, hashes, and a look
at what a volume holds on its stores (read as plain files, not via ecfs)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from pathlib import Path

from ecfs.core import host
from tests.mounting import MountedVolume

MiB = 1 << 20


def pattern(seed: int, size: int) -> bytes:
    """`size` pseudo-random bytes determined by `seed`."""
    return random.Random(seed).randbytes(size)


def sha256_file(path: Path, block: int = MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_pattern_file(path: Path, seed: int, size: int, block: int = 3 * MiB + 17) -> str:
    """Write `size` deterministic bytes in odd-sized writes; return sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = rng.randbytes(min(block, left))
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def fsynced_overwrites(path: Path, expected: bytearray, count: int, block: int, seed: int) -> None:
    """`count` overwrites of one random `block`-aligned block of `path`, each
    fsync'd (after one fsync of what is there), applied to `expected` too."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        for _ in range(count):
            offset = rng.randrange(len(expected) // block) * block
            data = rng.randbytes(block)
            os.pwrite(fd, data, offset)
            os.fsync(fd)
            expected[offset : offset + block] = data
    finally:
        os.close(fd)


def drop_caches() -> None:
    """Make the next reads go to the daemon (best effort; needs root)."""
    host.drop_caches()


def fragment_files(store: Path) -> dict[tuple[int, int], Path]:
    """(chunk id, fragment index) -> path, for every fragment on a store."""
    found = {}
    for path in (store / "frags").rglob("*.*"):
        stem, _, index = path.name.partition(".")
        found[(int(stem, 16), int(index))] = path
    return found


def fragments_by_chunk(stores: list[Path]) -> dict[int, dict[int, int]]:
    """chunk id -> {fragment index: store number} over all stores."""
    chunks: dict[int, dict[int, int]] = defaultdict(dict)
    for number, store in enumerate(stores):
        if (store / "frags").exists():
            for chunk_id, index in fragment_files(store):
                chunks[chunk_id][index] = number
    return chunks


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in fragment_files(store).values())


def status(vol: MountedVolume) -> dict:
    return json.loads(os.getxattr(vol.mountpoint, "user.ecfs.status"))


#: Where a fragment's payload starts (the header block of a 128 KiB fragment).
PAYLOAD_OFFSET = 4096


def flip_payload_bytes(path: Path, rng: random.Random, count: int, mask: int = 0xFF) -> None:
    """Corrupt `count` random payload bytes of a fragment file in place."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(PAYLOAD_OFFSET, size))
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ mask]))


def own_domains(stores: list[Path]) -> dict[str, str]:
    """A failure domain label per store (for `create_volume`): test stores
    share one disk but stand for independent ones (see
    `tests.mounting.labelled_mkfs_args`)."""
    return {str(store): f"test-domain-{i}" for i, store in enumerate(stores)}
