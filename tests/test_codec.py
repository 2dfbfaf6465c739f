"""Properties of ecfs.core.codec: any k of n fragments rebuild any range, and guards."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecfs.core.codec import Codec
from ecfs.core.errors import CodecError
from ecfs.core.geometry import Layout


@st.composite
def coded(draw: st.DrawFn) -> tuple[Codec, bytes, list[bytes]]:
    k = draw(st.integers(1, 6))
    m = draw(st.integers(1, 4))
    chunk = draw(st.binary(min_size=1, max_size=300))
    codec = Codec(k, m)
    return codec, chunk, codec.encode(chunk)


@given(coded())
def test_encode_shape(args: tuple[Codec, bytes, list[bytes]]) -> None:
    codec, chunk, frags = args
    p = -(-len(chunk) // codec.k)
    assert len(frags) == codec.n
    assert all(type(f) is bytes and len(f) == p for f in frags)
    data = b"".join(frags[: codec.k])
    assert data[: len(chunk)] == chunk
    assert data[len(chunk) :] == bytes(len(data) - len(chunk))


@given(coded(), st.data())
def test_any_k_rebuild_chunk(args: tuple[Codec, bytes, list[bytes]], data: st.DataObject) -> None:
    codec, chunk, frags = args
    survivors = data.draw(st.permutations(range(codec.n)))[: codec.k]
    extra = data.draw(st.integers(0, codec.n - codec.k))
    rest = [i for i in range(codec.n) if i not in survivors][:extra]
    pieces = {i: frags[i] for i in survivors + rest}
    out = codec.decode(pieces, range(codec.k))
    assert b"".join(out[d] for d in range(codec.k))[: len(chunk)] == chunk


@given(coded(), st.data())
def test_range_decode_equals_slice(
    args: tuple[Codec, bytes, list[bytes]], data: st.DataObject
) -> None:
    codec, _chunk, frags = args
    p = len(frags[0])
    a = data.draw(st.integers(0, p - 1))
    b = data.draw(st.integers(a + 1, p))
    survivors = data.draw(st.permutations(range(codec.n)))[: codec.k]
    wanted = data.draw(st.lists(st.integers(0, codec.n - 1), min_size=1, max_size=codec.n))
    as_view = data.draw(st.booleans())
    pieces = {i: (memoryview(frags[i])[a:b] if as_view else frags[i][a:b]) for i in survivors}
    out = codec.decode(pieces, wanted)
    assert set(out) == set(wanted)
    for i in wanted:
        assert type(out[i]) is bytes
        assert out[i] == frags[i][a:b]


def test_decode_does_not_mutate_inputs() -> None:
    codec = Codec(3, 2)
    frags = codec.encode(bytes(range(200)))
    pieces = {4: bytearray(frags[4]), 1: bytearray(frags[1]), 3: bytearray(frags[3])}
    snapshot = {i: bytes(v) for i, v in pieces.items()}
    order = list(pieces)
    wanted = [0, 2]
    out = codec.decode(pieces, wanted)
    assert list(pieces) == order
    assert {i: bytes(v) for i, v in pieces.items()} == snapshot
    assert wanted == [0, 2]
    assert out == {0: frags[0], 2: frags[2]}
    # results do not alias the caller's buffers
    out2 = codec.decode(pieces, [1])
    pieces[1][0] ^= 0xFF
    assert out2[1] == frags[1]


def test_present_pieces_returned_without_decoding() -> None:
    codec = Codec(2, 2)
    frags = codec.encode(b"hello world")
    out = codec.decode({0: frags[0], 3: frags[3]}, [3, 0])
    assert out == {3: frags[3], 0: frags[0]}
    # more than k pieces: data preferred, parity wanted
    out = codec.decode(dict(enumerate(frags[:3])), [3])
    assert out == {3: frags[3]}


def test_zero_length_pieces() -> None:
    codec = Codec(3, 2)
    assert codec.decode({0: b"", 3: b"", 4: b""}, [1, 2, 4]) == {1: b"", 2: b"", 4: b""}


def test_encode_rejects_empty() -> None:
    with pytest.raises(CodecError):
        Codec(2, 1).encode(b"")


@pytest.mark.parametrize("k,m", [(0, 1), (1, 0), (200, 57), (-1, 2)])
def test_bad_parameters(k: int, m: int) -> None:
    with pytest.raises(CodecError):
        Codec(k, m)


def test_large_geometry() -> None:
    codec = Codec(128, 128)
    frags = codec.encode(bytes(range(256)) * 10)
    pieces = {i: frags[i] for i in range(128, 256)}
    out = codec.decode(pieces, [0, 127])
    assert out == {0: frags[0], 127: frags[127]}


def _guarded(codec: Codec, pieces: object, wanted: object) -> None:
    """Run decode in a daemon thread so a zfec hang cannot hang the test run."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            codec.decode(pieces, wanted)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)
        else:
            result.append(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert result, "decode hung"
    if result[0] is not None:
        raise result[0]


class _DuplicateKeys(dict):  # type: ignore[type-arg]
    """A mapping whose items() repeats a key (a buggy caller's container)."""

    def items(self):  # type: ignore[no-untyped-def,override]
        return [(0, b"ab"), (0, b"ab"), (3, b"ab")]

    def __len__(self) -> int:
        return 3


@pytest.mark.parametrize(
    "pieces,wanted",
    [
        ({0: b"ab", 1: b"ab"}, [2]),  # too few
        ({0: b"ab", 1: b"ab", 5: b"ab"}, [2]),  # index >= n
        ({0: b"ab", 1: b"ab", 255: b"ab"}, [2]),  # index >= n
        ({0: b"ab", 1: b"ab", -1: b"ab"}, [2]),  # negative
        ({0: b"ab", 1: b"ab", 2.0: b"ab"}, [3]),  # not an int
        ({0: b"ab", True: b"ab", 3: b"ab"}, [2]),  # bool
        ({0: b"ab", 1: b"abc", 3: b"ab"}, [2]),  # unequal lengths
        ({0: b"ab", 1: b"ab", 3: "ab"}, [2]),  # not a buffer
        ({0: b"ab", 1: b"ab", 3: b"ab"}, [5]),  # wanted >= n
        ({0: b"ab", 1: b"ab", 3: b"ab"}, [-1]),  # wanted negative
        ({0: b"ab", 1: b"ab", 3: b"ab"}, ["2"]),  # wanted not an int
        ({0: b"ab", 1: b"ab", 3: b"ab"}, 2),  # wanted not iterable
        (_DuplicateKeys(), [1]),  # duplicate indices
    ],
)
def test_guards_raise_codec_error(pieces: object, wanted: object) -> None:
    codec = Codec(3, 2)
    with pytest.raises(CodecError):
        _guarded(codec, pieces, wanted)


@settings(max_examples=30)
@given(st.integers(1, 5), st.integers(1, 3), st.binary(min_size=1, max_size=64))
def test_decode_reusable_after_many_calls(k: int, m: int, chunk: bytes) -> None:
    codec = Codec(k, m)
    frags = codec.encode(chunk)
    for _ in range(3):
        pieces = {i: frags[i] for i in range(m, m + k)}
        assert codec.decode(pieces, range(codec.n)) == dict(enumerate(frags))


@given(
    k=st.integers(1, 6),
    m=st.integers(1, 3),
    data=st.binary(min_size=1, max_size=3000),
    slack=st.integers(0, 9),
)
def test_encode_into_lays_out_what_encode_returns(k: int, m: int, data: bytes, slack: int) -> None:
    codec = Codec(k, m)
    expected = codec.encode(data)
    p = len(expected[0])
    out = memoryview(bytearray(b"\xaa" * ((k + m) * p + slack)))
    views = codec.encode_into(data, out)
    assert [bytes(v) for v in views] == expected
    assert [v.nbytes for v in views] == [p] * (k + m)
    assert bytes(out[: (k + m) * p]) == b"".join(expected)


def test_encode_into_refuses_a_small_or_read_only_buffer() -> None:
    codec = Codec(4, 2)
    with pytest.raises(CodecError):
        codec.encode_into(b"x" * 400, memoryview(bytearray(599)))
    with pytest.raises(CodecError):
        codec.encode_into(b"x" * 400, memoryview(bytes(600)))


def test_for_layout_is_this_codec_for_its_coding_else_the_shared_one() -> None:
    """The one choice of a chunk's codec (reader, writer, repair, rebuild,
    fsck): the volume's own codec, whichever it was given, for the
    volume's coding; the shared codec of a chunk's own coding otherwise."""
    volume = Layout(4, 2, 128 * 1024, 4096)
    codec = Codec(4, 2)  # not the shared one: as a volume (or a test) may be given
    assert codec.for_layout(volume) is codec
    assert codec.for_layout(volume.coded(4, 2)) is codec
    own = codec.for_layout(volume.coded(3, 3))
    assert own is Codec.of(3, 3) and (own.k, own.m) == (3, 3)
