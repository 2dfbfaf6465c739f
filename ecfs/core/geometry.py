"""All offset arithmetic: file range -> chunks -> data fragments -> cells.

Owns: the `Layout` of a volume (k, m, fragment size F, cell size) and the
pure functions that map byte ranges between the file, a chunk, its data
fragments and their checksum cells.

Must not: do I/O, import zfec or xxhash, or know anything about stores,
metadata or the on-disk fragment format. Everything here is integer
arithmetic on validated arguments; bad arguments raise ValueError.

Coordinates:

* A file is cut into chunks of ``chunk_size = k * F`` bytes; chunk ``i``
  holds file bytes ``[i * chunk_size, (i + 1) * chunk_size)``.
* A chunk holding ``L`` bytes (``0 < L <= chunk_size``; only a file's last
  chunk may be short) is split into k data fragments of
  ``P = ceil(L / k)`` bytes each (the "payload length"): data fragment ``d``
  holds chunk bytes ``[d * P, (d + 1) * P)``; bytes at or past ``L`` are
  zero padding. Parity fragments ``k..k+m-1`` are also P bytes long.
* A fragment payload is checksummed in cells of ``cell_size`` bytes; the
  last cell of a payload may be short.

Per-chunk coding (redundancy policies, issue 18). The volume's chunk size
``k * F`` stays THE unit that maps file bytes to chunks, whatever the
coding of a chunk, so the file -> chunk arithmetic (chunk maps, the
small-write log, truncate, read-ahead windows) never depends on policy.
A chunk may carry its own coding (k', m'): `Layout.coded` gives the
layout of such a chunk, with the same ``chunk_size`` and cell size, k'
and m', and a fragment size F' = ceil(chunk_size / k') rounded up to a
whole cell (so P = ceil(L / k') <= F' for every chunk length L).
`Layout.of(ref)` gives the layout of a stored chunk. Keeping the chunk
size fixed (rather than k' * F) means a file's chunks can be re-encoded
one by one (restripe) without moving bytes between chunks, and a file
may mix codings; the price is that a 1+2 chunk has one fragment of a
whole chunk size, which is what "three copies" means anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import ChunkRef

#: Bounds on k and m (zfec itself allows k + m <= 256).
MAX_K = 128
MAX_M = 128
MAX_N = 256
#: Bounds on the checksum cell size (a power of two).
MIN_CELL_SIZE = 512
MAX_CELL_SIZE = 1 << 20
#: Largest fragment payload (and so largest fragment size F) ever allowed.
MAX_FRAGMENT_SIZE = 1 << 30


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Chunk bytes ``[start, end)`` of chunk ``chunk_index`` (chunk-relative)."""

    chunk_index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class FragmentPiece:
    """Data fragment ``index`` bytes ``[frag_start, frag_end)``.

    They hold chunk bytes ``[chunk_start, chunk_start + frag_end - frag_start)``.
    """

    index: int
    frag_start: int
    frag_end: int
    chunk_start: int

    @property
    def length(self) -> int:
        """Number of bytes in the piece."""
        return self.frag_end - self.frag_start


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, start: int, end: int, limit: int) -> None:
    """Require ``0 <= start < end <= limit``."""
    if not (_is_int(start) and _is_int(end) and 0 <= start < end <= limit):
        raise ValueError(f"{name}: need 0 <= start < end <= {limit}, got [{start}, {end})")


@dataclass(frozen=True, slots=True)
class Layout:
    """The coding geometry of a volume. Immutable and validated on creation."""

    k: int
    m: int
    fragment_size: int
    cell_size: int
    #: File bytes per chunk when not k * fragment_size (a `coded` layout
    #: keeps its volume's chunk size); 0: k * fragment_size.
    span: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "m", "fragment_size", "cell_size", "span"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {self.k}")
        if not 1 <= self.m <= MAX_M:
            raise ValueError(f"m must be in 1..{MAX_M}, got {self.m}")
        if self.k + self.m > MAX_N:
            raise ValueError(f"k + m must be at most {MAX_N}, got {self.k + self.m}")
        c = self.cell_size
        if c & (c - 1) or not MIN_CELL_SIZE <= c <= MAX_CELL_SIZE:
            raise ValueError(
                f"cell_size must be a power of two in {MIN_CELL_SIZE}..{MAX_CELL_SIZE}, got {c}"
            )
        f = self.fragment_size
        if f <= 0 or f % c or f > MAX_FRAGMENT_SIZE:
            raise ValueError(
                f"fragment_size must be a positive multiple of cell_size ({c}) "
                f"and at most {MAX_FRAGMENT_SIZE}, got {f}"
            )
        if self.span and not 0 < self.span <= self.k * f:
            raise ValueError(f"span must be in 1..k * fragment_size, got {self.span}")

    def coded(self, k: int, m: int) -> Layout:
        """The layout of a chunk of this volume coded as k data + m parity
        fragments: the same chunk size and cell size (see the module
        docstring). Itself when (k, m) is its own coding. Cached."""
        if k == self.k and m == self.m:
            return self
        return _coded(self, k, m)

    def of(self, ref: ChunkRef) -> Layout:
        """The layout of stored chunk `ref` (its own coding, or this one)."""
        k = ref.k
        if not k:
            return self
        return self.coded(k, len(ref.stores) - k)

    @property
    def n(self) -> int:
        """Total fragments per chunk, k + m."""
        return self.k + self.m

    @property
    def chunk_size(self) -> int:
        """File bytes per (full) chunk, k * F (or `span`)."""
        return self.span or self.k * self.fragment_size

    def chunk_spans(self, offset: int, length: int) -> list[ChunkSpan]:
        """Split file bytes ``[offset, offset + length)`` by chunk.

        Returns one span per chunk touched, in file order, with chunk-relative
        ``0 <= start < end <= chunk_size``; the spans are contiguous and cover
        the range exactly. ``length == 0`` gives ``[]``.
        """
        if not (_is_int(offset) and _is_int(length) and offset >= 0 and length >= 0):
            raise ValueError(f"need offset >= 0 and length >= 0, got {offset}, {length}")
        if length == 0:
            return []
        cs = self.chunk_size
        end = offset + length
        first = offset // cs
        last = (end - 1) // cs
        if first == last:
            return [ChunkSpan(first, offset - first * cs, end - first * cs)]
        spans = [ChunkSpan(first, offset - first * cs, cs)]
        spans.extend(ChunkSpan(i, 0, cs) for i in range(first + 1, last))
        spans.append(ChunkSpan(last, 0, end - last * cs))
        return spans

    def payload_length(self, chunk_length: int) -> int:
        """Fragment payload length P = ceil(chunk_length / k) of a chunk.

        Requires ``0 < chunk_length <= chunk_size``; then ``1 <= P <= F``.
        """
        if not (_is_int(chunk_length) and 0 < chunk_length <= self.chunk_size):
            raise ValueError(f"chunk_length must be in 1..{self.chunk_size}, got {chunk_length}")
        return -(-chunk_length // self.k)

    def data_pieces(self, chunk_length: int, start: int, end: int) -> list[FragmentPiece]:
        """Map chunk bytes ``[start, end)`` to the data-fragment pieces holding them.

        Requires ``0 <= start < end <= chunk_length``. Pieces come in chunk
        order, are non-empty and together hold exactly ``[start, end)``.
        """
        p = self.payload_length(chunk_length)
        _check_range("data_pieces", start, end, chunk_length)
        first = start // p
        last = (end - 1) // p
        pieces = []
        for d in range(first, last + 1):
            base = d * p
            lo = start if start > base else base
            hi = end if end < base + p else base + p
            pieces.append(FragmentPiece(d, lo - base, hi - base, lo))
        return pieces

    def cell_range(self, frag_start: int, frag_end: int, payload_length: int) -> tuple[int, int]:
        """Widen fragment bytes ``[frag_start, frag_end)`` to whole cells.

        Requires ``0 <= frag_start < frag_end <= payload_length``. The result
        ``(a, b)`` has ``a`` cell-aligned, ``a <= frag_start``,
        ``frag_end <= b`` and ``b`` either cell-aligned or equal to
        ``payload_length`` (the last cell of a payload may be short).
        """
        _check_range("cell_range", frag_start, frag_end, payload_length)
        mask = self.cell_size - 1
        a = frag_start & ~mask
        b = (frag_end + mask) & ~mask
        return a, (b if b < payload_length else payload_length)

    def n_cells(self, payload_length: int) -> int:
        """Number of checksum cells of a payload: ceil(payload_length / cell_size)."""
        if not (_is_int(payload_length) and payload_length >= 0):
            raise ValueError(f"payload_length must be >= 0, got {payload_length}")
        return -(-payload_length // self.cell_size)

    def chunk_count(self, file_size: int) -> int:
        """Number of chunk indices covering file bytes ``[0, file_size)``."""
        if not (_is_int(file_size) and file_size >= 0):
            raise ValueError(f"file_size must be >= 0, got {file_size}")
        return -(-file_size // self.chunk_size)


@functools.lru_cache(maxsize=256)
def _coded(base: Layout, k: int, m: int) -> Layout:
    size = base.chunk_size
    cell = base.cell_size
    payload = -(-size // k)
    fragment_size = -(-payload // cell) * cell
    span = size if size != k * fragment_size else 0
    return Layout(k, m, fragment_size, cell, span)
