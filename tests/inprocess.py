"""An ecfs volume assembled in-process on fake stores (no FUSE, no disks).

`make_rig` builds a real `ecfs.volume.assembly.Volume` (reader, writer, filedata,
repair, scrub, garbage: the services the mount uses) over
`FaultyStore(MemoryStore)` stores, with its metadata database in a temp
directory and no metadata replicas (the volume then counts every
committed transaction as durable). The services run in the test's own
trio run: tests drive them directly and switch faults at run time.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ecfs.core import fragment
from ecfs.core.model import ChunkRef
from ecfs.data.placement import POLICY_KEY
from ecfs.storage.fakestores import FaultyStore, MemoryStore
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import ROOT_INODE, create_database
from ecfs.storage.store import STORE_FORMAT, StoreMarker
from ecfs.volume.assembly import Volume

K, M = 3, 2
CELL = 4096
FRAGMENT = 4 * CELL
CHUNK = K * FRAGMENT


@dataclass
class Rig:
    volume: Volume
    stores: list[FaultyStore]
    memory: list[MemoryStore]

    def store_of(self, ref: ChunkRef, index: int) -> FaultyStore:
        return self.stores[ref.stores[index]]

    def learn_headers(self, ref: ChunkRef) -> None:
        """Put the verified headers of `ref`'s fragments in the reader's
        cache (as read-ahead would), so that reads of healthy stores are
        served on the loop, without worker threads."""
        for index, store in enumerate(ref.stores):
            data = self.memory[store].fragment(ref.chunk_id, index)
            assert data is not None
            self.volume.handles.insert((store, ref.chunk_id, index), fragment.parse_header(data))

    def new_file(self, name: bytes = b"f") -> int:
        inode = self.volume.namespace.create(
            ROOT_INODE, name, stat.S_IFREG | 0o644, os.getuid(), os.getgid()
        )
        return inode.id

    async def store_file(self, data: bytes, name: bytes = b"f") -> ChunkRef:
        """Write `data` (one chunk at most) as a new file through filedata
        and flush it; the chunk's ref (in the chunk table, as the mount
        would have it)."""
        ino = self.new_file(name)
        await self.volume.filedata.write(ino, 0, data)
        await self.volume.filedata.flush(ino)
        ref = self.volume.filedata.chunks.get(ino, 0)
        assert ref is not None
        return ref

    def put_chunk(self, data: bytes, chunk_id: int = 1 << 20) -> ChunkRef:
        """Encode `data` as chunk `chunk_id` straight into the memory stores
        0..n-1 (no writer, no worker thread: for tests on the mock clock).
        Not in the chunk table."""
        volume = self.volume
        volume_id = uuid.UUID(volume.volume_id).bytes
        for index, payload in enumerate(volume.codec.encode(data)):
            parts = fragment.build_fragment(volume_id, chunk_id, index, K, M, CELL, payload)
            self.memory[index].write_fragment(chunk_id, index, parts)
        return ChunkRef(chunk_id, len(data), tuple(range(K + M)))

    async def stored_files(self, count: int) -> tuple[list[ChunkRef], list[bytes]]:
        """`count` one-chunk files of `pattern` bytes (seeds 0..count-1),
        every header known (as after a first read): (refs, contents)."""
        datas = [pattern(CHUNK, seed=s) for s in range(count)]
        refs = [await self.store_file(d, name=b"f%d" % s) for s, d in enumerate(datas)]
        for ref in refs:
            self.learn_headers(ref)
        return refs, datas

    async def strided_small_reads(
        self, refs: list[ChunkRef], datas: list[bytes], count: int, store: int
    ) -> int:
        """`count` 4 KiB reads through the volume's reader, of the chunks
        `refs` in turn (contents `datas`) at offsets striding by 7 pages,
        every byte checked; how many lay on a data fragment of `store`."""
        on_store = 0
        for n in range(count):
            ref, data = refs[n % len(refs)], datas[n % len(refs)]
            start = (n * 7 * 4096) % CHUNK
            on_store += ref.stores[start // FRAGMENT] == store
            got = await self.volume.reader.read(ref, start, start + 4096)
            assert bytes(got) == data[start : start + 4096]
        return on_store

    def heal(self) -> None:
        for store in self.stores:
            store.heal()


def pattern(n: int, seed: int = 1) -> bytes:
    """`n` bytes of a pattern that differs by `seed`."""
    return bytes((i * 7 + seed) % 251 for i in range(n))


def make_rig(
    tmp_path: Path,
    *,
    spare: int = 1,
    cached: bool = True,
    inline_max: int = 0,
    remote: int = 0,
    placement: str | None = None,
    concurrency: int | None = None,
) -> Rig:
    """A volume of K+M+`spare` in-memory stores (fragments of FRAGMENT bytes),
    the last `remote` of them remote (`Store.remote`, space unknown), with
    placement policy `placement` (None: the default, as an older volume)."""
    volume_id = uuid.uuid4().hex
    store_ids = [uuid.uuid4().hex for _ in range(K + M + spare)]
    memory = [
        MemoryStore(
            StoreMarker(volume_id, store_id, STORE_FORMAT, K, M, FRAGMENT, CELL, inline_max),
            name=f"s{i}",
            cached=cached,
            remote=i >= K + M + spare - remote,
        )
        for i, store_id in enumerate(store_ids)
    ]
    if concurrency is not None:  # calls each store serves at once (a disk: few)
        for store in memory:
            store.concurrency = concurrency
    stores = [FaultyStore(store) for store in memory]
    for store in stores:
        store.pin_identity()
    params: dict[str, str | int] = {
        "uuid": volume_id,
        "k": K,
        "m": M,
        "fragment_size": FRAGMENT,
        "cell_size": CELL,
        "inline_max": inline_max,
    }
    if placement is not None:
        params[POLICY_KEY] = placement
    path = tmp_path / "metadata.sqlite"
    create_database(
        path, params, store_ids, root_uid=os.getuid(), root_gid=os.getgid(), now_ns=time.time_ns()
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    volume = Volume(Database(path), dict(enumerate(stores)), workdir)
    return Rig(volume, stores, memory)
