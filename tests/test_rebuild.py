"""ecfs.data.rebuild: the one fragment rebuild of background repair and
`fsck --repair`, in process (a real metadata database, the stores faked
behind `FragmentIO`), and the rule that nothing else rebuilds fragments or
chooses their stores."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from ecfs.core import fragment
from ecfs.core.codec import Codec
from ecfs.core.errors import FragmentCorrupt
from ecfs.core.geometry import Layout
from ecfs.core.model import NO_STORE, REPAIR_REASONS, ChunkRef, repair_priority
from ecfs.data.placement import Placement
from ecfs.data.rebuild import rebuild_fragments
from ecfs.storage.metadb.chunks import ChunkTable, RepairQueue
from ecfs.storage.metadb.database import Database
from ecfs.storage.metadb.schema import create_database

K, M = 2, 2
LAYOUT = Layout(K, M, 4 * 4096, 4096)
VOLUME_ID = bytes(range(16))
CHUNK_ID = 0x77
LENGTH = 2 * K * 4096
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ecfs"


@dataclass
class Candidate:
    available: bool = True


class FakeStores:
    """Fragment files in a dict; `corrupt` stores flip a payload byte of
    what they are given; `on_write` runs after each write."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.files: dict[tuple[int, int, int], bytes] = {}
        self.corrupt: set[int] = set()
        self.unsynced: set[int] = set()
        self.remembered: list[tuple[int, int, int]] = []
        self.discarded: list[tuple[ChunkRef, ChunkRef | None]] = []
        self.on_write = lambda: None

    async def write_verified(self, store: int, ref: ChunkRef, index: int, parts: list) -> int:
        key = (store, ref.chunk_id, index)
        self.files.pop(key, None)
        data = bytearray(b"".join(bytes(p) for p in parts))
        if store in self.corrupt:
            data[-1] ^= 0xFF
        self.files[key] = bytes(data)
        self.on_write()
        header = fragment.parse_header(self.files[key])
        payload = self.files[key][header.payload_offset :]
        if len(payload) != LAYOUT.payload_length(ref.length) or fragment.bad_cells(header, 0, payload):
            raise FragmentCorrupt("bad cells")
        return len(data)

    def note_unsynced(self, store: int) -> None:
        self.unsynced.add(store)

    def remember(self, fragments: list[tuple[int, int, int]]) -> None:
        self.remembered.extend(fragments)

    def discard(self, refs: list[ChunkRef]) -> None:
        # What the metadata says when the old fragments are let go.
        found = ChunkTable(self.db).by_id(CHUNK_ID)
        self.discarded.extend((ref, found[2] if found else None) for ref in refs)


def setup(tmp_path: Path, stores: tuple[int, ...] = (0, 1, 2, 3)):
    path = tmp_path / "db.sqlite"
    create_database(
        path, {"uuid": "x", "k": K, "m": M}, [f"s{i}" for i in range(5)],
        root_uid=0, root_gid=0, now_ns=1,
    )  # fmt: skip
    db = Database(path)
    ref = ChunkRef(CHUNK_ID, LENGTH, stores)
    with db.transaction():
        ChunkTable(db).put(2, 0, ref)
        RepairQueue(db).add(CHUNK_ID, "scrub", 100, 1)
    payloads = Codec(K, M).encode(bytes(range(256)) * (LENGTH // 256))
    candidates = {i: Candidate() for i in range(5)}
    return db, ref, payloads, candidates, FakeStores(db)


def expected_file(payloads: list[bytes], index: int) -> bytes:
    parts = fragment.build_fragment(
        VOLUME_ID, CHUNK_ID, index, K, M, LAYOUT.cell_size, payloads[index]
    )
    return b"".join(bytes(p) for p in parts)


def rebuild(db, placement, io, ref, payloads, broken, reason="scrub", **kw):
    sources = {i: payloads[i] for i in range(K + M) if i not in broken}
    return trio.run(
        lambda: rebuild_fragments(
            db, LAYOUT, Codec(K, M), VOLUME_ID, placement, io, ref, sources, broken,
            reason=reason, **kw,
        )  # fmt: skip
    )


def test_a_bad_fragment_is_rebuilt_on_its_own_store_and_leaves_the_queue(
    tmp_path: Path,
) -> None:
    db, ref, payloads, candidates, io = setup(tmp_path)
    done = rebuild(db, Placement(candidates), io, ref, payloads, [1])
    assert done.rebuilt == (1,) and not done.failed and done.committed
    assert io.files == {(1, CHUNK_ID, 1): expected_file(payloads, 1)}
    assert io.unsynced == {1}
    assert ChunkTable(db).by_id(CHUNK_ID)[2].stores == (0, 1, 2, 3)
    assert not RepairQueue(db).contains(CHUNK_ID)
    assert not io.discarded and not io.remembered


def test_a_fragment_of_a_failed_store_goes_where_placement_says(tmp_path: Path) -> None:
    """Its store unusable, the fragment goes to `Placement.rebuild_target`'s
    store; the old fragment is let go only once the metadata names the new
    one."""
    db, ref, payloads, candidates, io = setup(tmp_path)
    candidates[1].available = False
    placement = Placement(candidates)
    assert placement.rebuild_target(ref.stores, 1) == 4  # the only store without a fragment
    done = rebuild(db, placement, io, ref, payloads, [1])
    assert done.stores == (0, 4, 2, 3) and done.rebuilt == (1,)
    assert set(io.files) == {(4, CHUNK_ID, 1)}
    assert ChunkTable(db).by_id(CHUNK_ID)[2].stores == (0, 4, 2, 3)
    [(old, metadata_then)] = io.discarded
    assert old.stores == (NO_STORE, 1, NO_STORE, NO_STORE)
    assert metadata_then is not None and metadata_then.stores == (0, 4, 2, 3)


def test_two_slots_on_one_store_are_split(tmp_path: Path) -> None:
    """A bad fragment recorded on a store that holds another fragment of
    the chunk is not rebuilt there (losing that store would lose two)."""
    db, ref, payloads, candidates, io = setup(tmp_path, (0, 0, 2, 3))
    done = rebuild(db, Placement(candidates), io, ref, payloads, [1])
    assert done.stores[1] not in (0, 2, 3) and len(set(done.stores)) == K + M


def test_a_fragment_that_does_not_read_back_is_not_recorded_and_is_queued(
    tmp_path: Path,
) -> None:
    db, ref, payloads, candidates, io = setup(tmp_path, (0, NO_STORE, 2, 3))
    with db.transaction():
        RepairQueue(db).remove(CHUNK_ID)
    io.corrupt.add(1)
    # Both other candidates hold fragments; store 1 and 4 are free.
    done = rebuild(db, Placement(candidates), io, ref, payloads, [1], reason="fsck")
    assert not done.rebuilt and set(done.failed) == {1}
    target = next(s for (s, _, _) in io.files)
    assert io.remembered == [(target, CHUNK_ID, 1)]
    assert ChunkTable(db).by_id(CHUNK_ID)[2].stores == (0, NO_STORE, 2, 3)
    [entry] = RepairQueue(db).next_batch()
    assert entry.reason == "fsck" and entry.reason in REPAIR_REASONS
    assert entry.priority == repair_priority(K + M - 1 - K, "fsck")
    assert entry.bad == 0b10


def test_nowhere_to_put_it_is_a_failure_not_an_error(tmp_path: Path) -> None:
    db, ref, payloads, candidates, io = setup(tmp_path)
    candidates[1].available = candidates[4].available = False
    done = rebuild(db, Placement(candidates), io, ref, payloads, [1], unchecked=1)
    assert not io.files and set(done.failed) == {1}
    [entry] = RepairQueue(db).next_batch()
    assert entry.priority == repair_priority(K + M - 2 - K, "scrub")  # merged: more urgent


def test_a_chunk_rewritten_meanwhile_records_nothing(tmp_path: Path) -> None:
    db, ref, payloads, candidates, io = setup(tmp_path)

    def rewrite() -> None:
        with db.transaction():
            ChunkTable(db).put(2, 0, ChunkRef(CHUNK_ID + 1, LENGTH, (0, 1, 2, 3)))

    io.on_write = rewrite
    done = rebuild(db, Placement(candidates), io, ref, payloads, [1])
    assert not done.committed and not done.rebuilt
    [(orphan, _)] = io.discarded
    assert orphan == ChunkRef(CHUNK_ID, LENGTH, (NO_STORE, 1, NO_STORE, NO_STORE))
    assert ChunkTable(db).by_id(CHUNK_ID) is None


def test_an_unknown_reason_is_refused(tmp_path: Path) -> None:
    db, ref, payloads, candidates, io = setup(tmp_path)
    with pytest.raises(ValueError, match="reason"):
        rebuild(db, Placement(candidates), io, ref, payloads, [1], reason="fsck-found-it")


# --- one path ---------------------------------------------------------------------


def calls(path: Path) -> set[str]:
    """Names of the functions and methods `path` calls."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def codec_decodes(path: Path) -> list[int]:
    """Lines of `path` that call ``codec.decode`` / ``self.codec.decode``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr == "decode"
        and (
            (isinstance(n.value, ast.Name) and n.value.id == "codec")
            or (isinstance(n.value, ast.Attribute) and n.value.attr == "codec")
        )
    ]


def names_used(path: Path) -> set[str]:
    """Every name `path` reads (a function passed on counts as used)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def test_repair_and_fsck_rebuild_through_one_function() -> None:
    """Background repair and fsck --repair both call rebuild_fragments; no
    module but the rebuild and the writer builds fragment files or decodes
    to rebuild, and neither chooses stores itself (placement does)."""
    for module in ("data/repair.py", "volume/fsck_checks.py"):
        assert "rebuild_fragments" in names_used(PACKAGE_DIR / module), module
        assert not {"build_fragment", "choose"} & calls(PACKAGE_DIR / module), module
        assert not codec_decodes(PACKAGE_DIR / module), module
    builders = sorted(
        p.name for p in PACKAGE_DIR.rglob("*.py") if "build_fragment" in calls(p)
    )
    assert builders == ["rebuild.py", "writer.py"]
