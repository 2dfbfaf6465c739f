"""Properties of ecfs.core.geometry: every mapping covers its range exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecfs.core.geometry import ChunkSpan, FragmentPiece, Layout


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    k = draw(st.integers(1, 12))
    m = draw(st.integers(1, 6))
    cell = draw(st.sampled_from([512, 1024, 4096]))
    cells = draw(st.integers(1, 8))
    return Layout(k, m, cell * cells, cell)


@given(layouts(), st.integers(0, 10**7), st.integers(0, 10**6))
def test_chunk_spans_cover_range_exactly(layout: Layout, offset: int, length: int) -> None:
    spans = layout.chunk_spans(offset, length)
    cs = layout.chunk_size
    if length == 0:
        assert spans == []
        return
    pos = offset
    for prev, span in zip([None, *spans], spans, strict=False):
        assert 0 <= span.start < span.end <= cs
        if prev is not None:
            assert span.chunk_index == prev.chunk_index + 1
        assert span.chunk_index * cs + span.start == pos
        pos = span.chunk_index * cs + span.end
    assert pos == offset + length
    assert spans[0].chunk_index == offset // cs
    assert spans[-1].chunk_index == (offset + length - 1) // cs


def test_chunk_spans_examples() -> None:
    layout = Layout(2, 1, 4096, 4096)  # chunk_size 8192
    assert layout.chunk_spans(0, 8192) == [ChunkSpan(0, 0, 8192)]
    assert layout.chunk_spans(8000, 400) == [ChunkSpan(0, 8000, 8192), ChunkSpan(1, 0, 208)]
    assert layout.chunk_spans(100, 20000) == [
        ChunkSpan(0, 100, 8192),
        ChunkSpan(1, 0, 8192),
        ChunkSpan(2, 0, 3716),
    ]
    with pytest.raises(ValueError):
        layout.chunk_spans(-1, 5)
    with pytest.raises(ValueError):
        layout.chunk_spans(0, -5)


@given(layouts(), st.data())
def test_data_pieces_reassemble(layout: Layout, data: st.DataObject) -> None:
    chunk_length = data.draw(st.integers(1, layout.chunk_size))
    start = data.draw(st.integers(0, chunk_length - 1))
    end = data.draw(st.integers(start + 1, chunk_length))
    p = layout.payload_length(chunk_length)
    chunk = bytes(i % 251 for i in range(chunk_length))
    padded = chunk + bytes(p * layout.k - chunk_length)
    fragments = [padded[d * p : (d + 1) * p] for d in range(layout.k)]
    pieces = layout.data_pieces(chunk_length, start, end)
    out = b""
    pos = start
    for piece in pieces:
        assert 0 <= piece.index < layout.k
        assert 0 <= piece.frag_start < piece.frag_end <= p
        assert piece.chunk_start == pos
        assert piece.length == piece.frag_end - piece.frag_start
        out += fragments[piece.index][piece.frag_start : piece.frag_end]
        pos += piece.length
    assert out == chunk[start:end]
    assert [q.index for q in pieces] == list(range(pieces[0].index, pieces[-1].index + 1))


def test_data_pieces_examples() -> None:
    layout = Layout(4, 2, 4096, 4096)
    # chunk of 10 bytes: P = 3; fragments hold [0,3) [3,6) [6,9) [9,10)+pad
    assert layout.payload_length(10) == 3
    assert layout.data_pieces(10, 2, 10) == [
        FragmentPiece(0, 2, 3, 2),
        FragmentPiece(1, 0, 3, 3),
        FragmentPiece(2, 0, 3, 6),
        FragmentPiece(3, 0, 1, 9),
    ]
    assert layout.data_pieces(10, 4, 5) == [FragmentPiece(1, 1, 2, 4)]
    for bad in [(0, 0), (5, 4), (-1, 3), (0, 11)]:
        with pytest.raises(ValueError):
            layout.data_pieces(10, *bad)


@given(layouts(), st.data())
def test_cell_range_contains_aligned_clipped(layout: Layout, data: st.DataObject) -> None:
    payload = data.draw(st.integers(1, layout.fragment_size))
    a = data.draw(st.integers(0, payload - 1))
    b = data.draw(st.integers(a + 1, payload))
    lo, hi = layout.cell_range(a, b, payload)
    c = layout.cell_size
    assert lo <= a < b <= hi <= payload
    assert lo % c == 0
    assert hi % c == 0 or hi == payload
    assert a - lo < c and (hi - b < c)
    assert layout.n_cells(payload) == -(-payload // c)


def test_cell_range_rejects_bad_ranges() -> None:
    layout = Layout(2, 1, 4096, 512)
    assert layout.cell_range(600, 700, 4096) == (512, 1024)
    assert layout.cell_range(600, 700, 650 + 50) == (512, 700)
    for bad in [(5, 5), (6, 5), (-1, 5), (0, 5000)]:
        with pytest.raises(ValueError):
            layout.cell_range(*bad, 4096)


def test_payload_length_bounds() -> None:
    layout = Layout(3, 2, 1024, 512)
    assert layout.chunk_size == 3072
    assert layout.n == 5
    assert layout.payload_length(1) == 1
    assert layout.payload_length(3) == 1
    assert layout.payload_length(4) == 2
    assert layout.payload_length(3072) == 1024
    for bad in [0, -1, 3073]:
        with pytest.raises(ValueError):
            layout.payload_length(bad)


def test_counts() -> None:
    layout = Layout(2, 1, 1024, 512)
    assert [layout.chunk_count(s) for s in (0, 1, 2048, 2049)] == [0, 1, 1, 2]
    assert [layout.n_cells(p) for p in (0, 1, 512, 513)] == [0, 1, 1, 2]
    with pytest.raises(ValueError):
        layout.chunk_count(-1)
    with pytest.raises(ValueError):
        layout.n_cells(-1)


@pytest.mark.parametrize(
    "args",
    [
        (0, 1, 4096, 4096),
        (129, 1, 4096, 4096),
        (1, 0, 4096, 4096),
        (1, 129, 4096, 4096),
        (4, 2, 4096, 256),
        (4, 2, 3 * 1024, 3 * 1024),
        (4, 2, 1 << 21, 1 << 21),
        (4, 2, 6000, 4096),
        (4, 2, 0, 4096),
        (4, 2, -4096, 4096),
        (4, 2, 2 << 30, 4096),
        (4.0, 2, 4096, 4096),
        (True, 2, 4096, 4096),
    ],
)
def test_invalid_layouts_rejected(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        Layout(*args)


def test_valid_layout_extremes() -> None:
    Layout(128, 128, 512, 512)
    Layout(1, 1, 1 << 30, 1 << 20)
    Layout(200 - 128, 128, 4096, 4096)
