"""The erasure codec: the only module that imports zfec.

Owns: splitting a chunk into k data fragment payloads plus m parity
payloads (`Codec.encode`), and rebuilding any fragment's bytes ``[a, b)``
from the same range of any k others (`Codec.decode`). zfec is systematic
and works byte position by byte position, so a range decode is exact.

Must not: do I/O, checksum, or know about files, chunks ids or stores.

Guards. zfec misbehaves badly on some bad input (measured with zfec 1.6):
duplicate block numbers make it loop forever in C holding the GIL, and a
block number >= n is silently accepted and gives wrong output. Every
argument is therefore validated here and a `CodecError` raised *before*
zfec is called. zfec's ``decode()`` also reorders the lists passed to it in
place, so fresh lists are built for every call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import zfec

from .errors import CodecError

if TYPE_CHECKING:
    from .geometry import Layout

Buffer = bytes | bytearray | memoryview


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _byte_view(buf: object) -> memoryview:
    """A flat, contiguous, byte-format view of ``buf`` (no copy)."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise CodecError(f"not a bytes-like buffer: {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise CodecError("buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _to_bytes(buf: Buffer) -> bytes:
    """``buf`` as bytes: itself if it is bytes, else a copy (a view of bytes: no copy)."""
    if type(buf) is bytes:
        return buf
    if isinstance(buf, memoryview) and type(buf.obj) is bytes and buf.nbytes == len(buf.obj):
        return buf.obj
    return bytes(buf)


class Codec:
    """A systematic Reed-Solomon code with k data and m parity fragments.

    Stateless apart from zfec's tables, so one instance may be shared by
    threads (zfec releases the GIL while it works).
    """

    __slots__ = ("k", "m", "n", "_encoder", "_decoder")

    def __init__(self, k: int, m: int) -> None:
        if not (_is_int(k) and _is_int(m) and k >= 1 and m >= 1 and k + m <= 256):
            raise CodecError(f"need k >= 1, m >= 1, k + m <= 256; got k={k}, m={m}")
        self.k = k
        self.m = m
        self.n = k + m
        # zfec's second argument is the TOTAL number of blocks.
        self._encoder = zfec.Encoder(k, self.n)
        self._decoder = zfec.Decoder(k, self.n)

    def __repr__(self) -> str:
        return f"Codec(k={self.k}, m={self.m})"

    @staticmethod
    def of(k: int, m: int) -> Codec:
        """A shared Codec for k + m (one per coding, cached: chunks of
        several codings are read and written at once)."""
        return _shared_codec(k, m)

    def for_layout(self, layout: Layout) -> Codec:
        """The codec of a chunk laid out as `layout` (its own coding,
        `Layout.of(ref)`): this one when `layout` is coded as it is (the
        volume's codec for the volume's chunks: whichever codec the volume
        was given, a test's included), else the shared one of the layout's
        coding (`Codec.of`)."""
        if layout.k == self.k and layout.m == self.m:
            return self
        return Codec.of(layout.k, layout.m)

    def encode(self, chunk: Buffer) -> list[bytes]:
        """Encode a chunk into its n fragment payloads.

        ``len(chunk) >= 1``. With ``P = ceil(len(chunk) / k)``, returns n
        ``bytes`` objects of exactly P bytes: data fragment d is chunk bytes
        ``[d * P, (d + 1) * P)`` zero-padded at the end of the chunk, then
        the m parity fragments. The caller's buffer is not kept or modified.
        """
        view = _byte_view(chunk)
        length = view.nbytes
        if length == 0:
            raise CodecError("cannot encode an empty chunk")
        k = self.k
        p = -(-length // k)
        zeros: bytes | None = None
        data: list[bytes] = []
        for d in range(k):
            lo = d * p
            if lo + p <= length:
                data.append(view[lo : lo + p].tobytes())
            elif lo < length:
                data.append(view[lo:length].tobytes() + bytes(lo + p - length))
            else:
                if zeros is None:
                    zeros = bytes(p)
                data.append(zeros)
        parity = self._encoder.encode(tuple(data), tuple(range(k, self.n)))
        return data + [_to_bytes(b) for b in parity]

    def encode_into(self, chunk: Buffer, out: memoryview) -> list[memoryview]:
        """Like `encode`, but the n payloads are laid out in `out`, payload i
        at ``out[i * P : (i + 1) * P]``, and returned as those views (one
        copy of the chunk, no other allocation that outlives the call; used
        to build fragments in aligned memory for direct I/O). `out` must be
        writable and hold at least n x P bytes.
        """
        view = _byte_view(chunk)
        length = view.nbytes
        if length == 0:
            raise CodecError("cannot encode an empty chunk")
        k, n = self.k, self.n
        p = -(-length // k)
        if out.readonly or out.nbytes < n * p:
            raise CodecError(f"output buffer must be writable and hold {n} x {p} bytes")
        slots = [out[i * p : (i + 1) * p] for i in range(n)]
        out[:length] = view  # the data slots are the chunk, zero-padded
        out[length : k * p] = bytes(k * p - length)
        parity = self._encoder.encode(tuple(slots[:k]), tuple(range(k, n)))
        for slot, block in zip(slots[k:], parity, strict=True):
            slot[:] = block
        return slots

    def decode(self, pieces: Mapping[int, Buffer], wanted: Iterable[int]) -> dict[int, bytes]:
        """Rebuild fragments' bytes ``[a, b)`` from the same range of others.

        ``pieces`` maps fragment index (0..n-1) to that fragment's bytes
        ``[a, b)``; all must have the same length and there must be at least
        k of them. Returns ``{index: bytes}`` for every index in ``wanted``
        (data or parity). Exactly k pieces are used, data indices first (the
        cheapest). If every wanted index is in ``pieces`` zfec is not called.
        Neither ``pieces`` nor its buffers are modified. Any invalid argument
        raises `CodecError` before zfec runs.
        """
        views, length = self._checked_pieces(pieces)
        want = self._checked_wanted(wanted)
        if length == 0:
            return {i: b"" for i in want}
        if all(i in views for i in want):
            return {i: _to_bytes(views[i]) for i in want}
        data = self._data_blocks(views)
        result: dict[int, bytes] = {}
        parity_wanted = []
        for i in want:
            if i in views:
                result[i] = _to_bytes(views[i])
            elif i < self.k:
                result[i] = _to_bytes(data[i])
            else:
                parity_wanted.append(i)
        if parity_wanted:
            parity = self._encoder.encode(tuple(data), tuple(parity_wanted))
            for i, block in zip(parity_wanted, parity, strict=True):
                result[i] = _to_bytes(block)
        return result

    def _checked_pieces(self, pieces: Mapping[int, Buffer]) -> tuple[dict[int, memoryview], int]:
        """Validate ``pieces``; return fresh byte views of them and their common length."""
        views: dict[int, memoryview] = {}
        length = -1
        for index, buf in pieces.items():
            if not _is_int(index):
                raise CodecError(f"fragment index must be an int, got {index!r}")
            if not 0 <= index < self.n:
                raise CodecError(f"fragment index {index} out of range 0..{self.n - 1}")
            if index in views:
                raise CodecError(f"duplicate fragment index {index}")
            view = _byte_view(buf)
            if length < 0:
                length = view.nbytes
            elif view.nbytes != length:
                raise CodecError(
                    f"pieces differ in length: {view.nbytes} for index {index}, expected {length}"
                )
            views[index] = view
        if len(views) < self.k:
            raise CodecError(f"need at least k={self.k} pieces, got {len(views)}")
        return views, length

    def _checked_wanted(self, wanted: Iterable[int]) -> list[int]:
        """Validate ``wanted``; return it as a list without duplicates, in order."""
        if isinstance(wanted, int):
            raise CodecError("wanted must be an iterable of fragment indices")
        want: list[int] = []
        for i in wanted:
            if not _is_int(i):
                raise CodecError(f"wanted index must be an int, got {i!r}")
            if not 0 <= i < self.n:
                raise CodecError(f"wanted index {i} out of range 0..{self.n - 1}")
            if i not in want:
                want.append(i)
        return want

    def _data_blocks(self, views: dict[int, memoryview]) -> list[Buffer]:
        """The k data blocks, decoded from exactly k of ``views`` (data preferred)."""
        k = self.k
        chosen = [i for i in range(k) if i in views]
        if len(chosen) == k:
            return [views[i] for i in chosen]
        chosen.extend(sorted(i for i in views if i >= k)[: k - len(chosen)])
        # Defence in depth: zfec loops forever on duplicates and is wrong on >= n.
        if len(set(chosen)) != k or not all(0 <= i < self.n for i in chosen):
            raise CodecError(f"internal: bad block choice {chosen}")
        # Fresh lists: zfec reorders them in place.
        blocks = [views[i] for i in chosen]
        return list(self._decoder.decode(blocks, list(chosen)))


@functools.lru_cache(maxsize=64)
def _shared_codec(k: int, m: int) -> Codec:
    return Codec(k, m)
