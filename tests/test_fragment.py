"""The fragment file format: round trip, corruption detection, hostile input."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ecfs.core import fragment as fr
from ecfs.core.errors import FragmentCorrupt
from ecfs.core.geometry import MAX_FRAGMENT_SIZE

VOLUME = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes


def _build(payload: bytes, cell_size: int = 512, index: int = 1) -> tuple[bytes, bytes]:
    header, body = fr.build_fragment(VOLUME, 77, index, 4, 2, cell_size, payload)
    return bytes(header), bytes(body)


def test_constants() -> None:
    assert fr.MAGIC == b"ECFSFRAG"
    assert fr.FORMAT_VERSION == 1
    assert fr.MAX_PAYLOAD == MAX_FRAGMENT_SIZE == 1 << 30
    assert fr.FIXED_HEADER_SIZE == 56
    assert fr.checksum64(b"abc") == xxhash.xxh3_64_intdigest(b"abc")


@given(
    payload=st.binary(min_size=0, max_size=5000),
    cell_size=st.sampled_from([512, 1024, 4096]),
    index=st.integers(0, 5),
    chunk_id=st.integers(0, (1 << 64) - 1),
)
def test_round_trip(payload: bytes, cell_size: int, index: int, chunk_id: int) -> None:
    header, body = fr.build_fragment(VOLUME, chunk_id, index, 4, 2, cell_size, payload)
    assert body is payload
    assert len(header) % 4096 == 0
    assert fr.header_size_needed(header[: fr.FIXED_HEADER_SIZE]) == len(header)
    parsed = fr.parse_header(bytes(header) + payload)
    assert parsed == fr.FragmentHeader(
        volume_id=VOLUME,
        chunk_id=chunk_id,
        index=index,
        k=4,
        m=2,
        cell_size=cell_size,
        payload_length=len(payload),
        checksums=tuple(fr.cell_checksums(payload, cell_size)),
    )
    assert parsed.payload_offset == len(header)
    assert parsed.file_size == len(header) + len(payload)
    assert parsed.n_cells == -(-len(payload) // cell_size)
    assert fr.bad_cells(parsed, 0, payload) == []


def test_large_table_spans_several_blocks() -> None:
    payload = os.urandom(512 * 1100)  # 1100 cells: 8800-byte table
    header, _ = _build(payload)
    assert len(header) == 12288
    assert fr.header_size_needed(header[: fr.HEADER_PROBE_SIZE]) == 12288
    with pytest.raises(FragmentCorrupt, match="truncated"):
        fr.parse_header(header[: fr.HEADER_PROBE_SIZE])
    assert fr.parse_header(memoryview(header)).n_cells == 1100


def test_every_header_byte_flip_detected() -> None:
    payload = os.urandom(3000)
    header, _ = _build(payload)
    buf = bytearray(header)
    for pos in range(len(buf)):
        for bit in (0x01, 0x80):
            buf[pos] ^= bit
            with pytest.raises(FragmentCorrupt):
                fr.parse_header(buf)
            buf[pos] ^= bit
    fr.parse_header(buf)


@settings(max_examples=50)
@given(st.data())
def test_payload_flip_reported_in_its_cell(data: st.DataObject) -> None:
    cell = data.draw(st.sampled_from([512, 1024]))
    payload = data.draw(st.binary(min_size=1, max_size=4000))
    header, _ = _build(payload, cell)
    parsed = fr.parse_header(header)
    pos = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(payload)
    bad[pos] ^= flip
    assert fr.bad_cells(parsed, 0, bad) == [pos // cell]
    # a cell-aligned sub-range that contains the flip
    first = pos // cell
    start = first * cell
    end = min(len(payload), (first + 1) * cell)
    assert fr.bad_cells(parsed, start, memoryview(bad)[start:end]) == [first]
    # a sub-range that excludes it is clean
    if end < len(payload):
        assert fr.bad_cells(parsed, end, memoryview(bad)[end:]) == []


def test_bad_cells_range_checks() -> None:
    payload = os.urandom(512 * 3 + 100)
    header, _ = _build(payload)
    parsed = fr.parse_header(header)
    assert fr.bad_cells(parsed, 512, payload[512:1536]) == []
    assert fr.bad_cells(parsed, 1536, payload[1536:]) == []  # short last cell
    assert fr.bad_cells(parsed, 1024, b"") == []
    for start, data in [
        (1, payload[1:513]),  # misaligned start
        (0, payload[:100]),  # partial cell
        (512, payload[512:1000]),  # partial cell
        (1536, payload[1536:] + b"x"),  # past the payload
        (2048, payload[:512]),  # outside
        (-512, payload[:512]),  # negative
    ]:
        with pytest.raises(FragmentCorrupt):
            fr.bad_cells(parsed, start, data)


def test_header_size_needed_rejects() -> None:
    header, _ = _build(b"x" * 600)
    with pytest.raises(FragmentCorrupt):
        fr.header_size_needed(header[:10])
    with pytest.raises(FragmentCorrupt):
        fr.header_size_needed(b"NOTFRAG!" + header[8:])
    with pytest.raises(FragmentCorrupt):
        fr.header_size_needed(bytes(4096))


def _crafted(**fields: int | bytes) -> bytes:
    """A header with a VALID checksum but chosen fixed-field values."""
    values: dict[str, int | bytes] = dict(
        magic=fr.MAGIC, version=1, k=4, m=2, index=0, cell_size=512,
        payload_length=1000, volume_id=VOLUME, chunk_id=5, n_cells=2,
    )  # fmt: skip
    values.update(fields)
    n_cells = int(values["n_cells"])  # type: ignore[arg-type]
    fixed = struct.pack("<8sHHHHIQ16sQI", *values.values())
    body = fixed + bytes(8 * min(n_cells, 10))
    body += struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    return body + bytes(-len(body) % 4096)


@pytest.mark.parametrize(
    "fields",
    [
        dict(version=2),
        dict(version=0),
        dict(k=0),
        dict(m=0),
        dict(k=200, m=57),
        dict(index=6),
        dict(cell_size=0),
        dict(cell_size=256),
        dict(cell_size=1000),
        dict(cell_size=2 << 20),
        dict(payload_length=(1 << 30) + 1, n_cells=((1 << 30) + 1 + 511) // 512),
        dict(payload_length=(1 << 64) - 1, n_cells=(1 << 32) - 1),
        dict(n_cells=3),
        dict(n_cells=(1 << 32) - 1),
        dict(n_cells=0),
    ],
)
def test_crafted_headers_rejected(fields: dict[str, int]) -> None:
    with pytest.raises(FragmentCorrupt):
        fr.parse_header(_crafted(**fields))


def test_crafted_valid_header_accepted() -> None:
    fr.parse_header(_crafted())
    fr.parse_header(_crafted(k=128, m=128, index=255))
    fr.parse_header(_crafted(payload_length=0, n_cells=0))


@given(st.binary(max_size=9000))
def test_random_buffers_raise_only_fragment_corrupt(buf: bytes) -> None:
    for attempt in (buf, fr.MAGIC + buf, fr.MAGIC + b"\x01\x00" + buf):
        try:
            fr.parse_header(attempt)
        except FragmentCorrupt:
            pass
        try:
            fr.header_size_needed(attempt)
        except FragmentCorrupt:
            pass


@given(st.data())
def test_mutated_headers_raise_only_fragment_corrupt(data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=0, max_size=3000))
    header = bytearray(_build(payload)[0])
    cut = data.draw(st.integers(0, len(header)))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8))
    for pos, value in edits:
        header[pos] = value
    buf = bytes(header[:cut])
    try:
        parsed = fr.parse_header(buf)
    except FragmentCorrupt:
        return
    # Only an unchanged, complete header may parse.
    assert cut == len(header) and parsed.payload_length == len(payload)


def test_zeroed_and_truncated() -> None:
    header, _ = _build(os.urandom(2000))
    for buf in (b"", bytes(4096), bytes(100), header[:55], header[:56], header[:4095]):
        with pytest.raises(FragmentCorrupt):
            fr.parse_header(buf)


def test_build_rejects_bad_arguments() -> None:
    good = dict(volume_id=VOLUME, chunk_id=1, index=0, k=4, m=2, cell_size=512, payload=b"x")
    fr.build_fragment(**good)  # type: ignore[arg-type]
    for change in [
        dict(volume_id=b"short"),
        dict(chunk_id=-1),
        dict(chunk_id=1 << 64),
        dict(index=6),
        dict(k=0),
        dict(cell_size=1000),
    ]:
        with pytest.raises(ValueError):
            fr.build_fragment(**{**good, **change})  # type: ignore[arg-type]


def test_cell_checksums() -> None:
    payload = os.urandom(1300)
    sums = fr.cell_checksums(memoryview(payload), 512)
    assert sums == [
        xxhash.xxh3_64_intdigest(payload[0:512]),
        xxhash.xxh3_64_intdigest(payload[512:1024]),
        xxhash.xxh3_64_intdigest(payload[1024:]),
    ]
    assert fr.cell_checksums(b"", 512) == []
