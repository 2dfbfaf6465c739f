"""The on-disk fragment file format: the only module that imports xxhash.

Owns: building a fragment file's header block, parsing and fully
validating it, and verifying payload cells against their checksums.

Must not: do I/O (callers read and write the bytes), erasure-code, or trust
any byte it is given: parsing raises only `FragmentCorrupt` on bad input
and never allocates more than the size of the buffer it was handed.

File layout (all integers little-endian)::

    offset  size  field
    ------  ----  -----------------------------------------------------------
         0     8  magic           b"ECFSFRAG"
         8     2  version         u16, format version, FORMAT_VERSION (1)
        10     2  k               u16, data fragments of the chunk, >= 1
        12     2  m               u16, parity fragments of the chunk, >= 1;
                                  k + m <= 256
        14     2  index           u16, this fragment's index, 0 <= index < k+m
                                  (0..k-1 data, k..k+m-1 parity)
        16     4  cell_size       u32, checksum cell size: a power of two in
                                  [512, 1 MiB]
        20     8  payload_length  u64, payload bytes, <= MAX_PAYLOAD (1 GiB)
        28    16  volume_id       raw 16 bytes of the volume's UUID
        44     8  chunk_id        u64, id of the chunk version
        52     4  n_cells         u32, number of cells, must equal
                                  ceil(payload_length / cell_size)
        56  8*n_cells             checksum table: xxh3_64 of each payload cell
                                  (u64 each; the last cell may be short)
         .     8  header_checksum xxh3_64 of bytes [0, 56 + 8 * n_cells)
         .     .  zero padding up to payload_offset
    payload_offset                payload (payload_length bytes)

``payload_offset`` is the smallest multiple of 4096 that holds the fixed
header, the table and the header checksum; the padding must be all zero, so
any changed byte in the header block is detected. The file ends right after
the payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from .errors import FragmentCorrupt
from .geometry import MAX_CELL_SIZE, MAX_FRAGMENT_SIZE, MAX_N, MIN_CELL_SIZE

MAGIC = b"ECFSFRAG"
FORMAT_VERSION = 1
#: Read this many bytes from the start of a fragment file first; enough for
#: the whole header block of any fragment with at most 505 cells.
HEADER_PROBE_SIZE = 4096
#: Largest payload a fragment may have; parse_header refuses larger ones.
MAX_PAYLOAD = MAX_FRAGMENT_SIZE
#: The header block (and so the payload offset) is a multiple of this.
HEADER_ALIGN = 4096

_FIXED = struct.Struct("<8sHHHHIQ16sQI")
#: Size of the fixed part of the header (the bytes header_size_needed needs).
FIXED_HEADER_SIZE = _FIXED.size
_U64 = struct.Struct("<Q")
_ZERO_BLOCK = memoryview(bytes(HEADER_ALIGN))
_U64_MAX = (1 << 64) - 1

Buffer = bytes | bytearray | memoryview


def checksum64(data: Buffer) -> int:
    """xxh3_64 of ``data`` as an unsigned int (for modules that must not import xxhash)."""
    return xxhash.xxh3_64_intdigest(data)


def checksum128(data: Buffer, seed: int = 0) -> int:
    """xxh3_128 of ``data`` with ``seed``, as an unsigned int (the metadata
    row digests of `ecfs.storage.metadb.digest`)."""
    return xxhash.xxh3_128_intdigest(data, seed)


def cell_checksums(payload: Buffer, cell_size: int) -> list[int]:
    """xxh3_64 of each ``cell_size`` cell of ``payload`` (the last cell may be short)."""
    view = _byte_view(payload)
    digest = xxhash.xxh3_64_intdigest
    return [digest(view[off : off + cell_size]) for off in range(0, view.nbytes, cell_size)]


def _byte_view(buf: Buffer) -> memoryview:
    """A flat byte-format view of ``buf`` (no copy)."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _payload_offset(n_cells: int) -> int:
    used = FIXED_HEADER_SIZE + 8 * n_cells + 8
    return -(-used // HEADER_ALIGN) * HEADER_ALIGN


@dataclass(frozen=True, slots=True)
class FragmentHeader:
    """The parsed, validated header of one fragment file.

    ``checksums[i]`` is the xxh3_64 of payload cell i.
    """

    volume_id: bytes
    chunk_id: int
    index: int
    k: int
    m: int
    cell_size: int
    payload_length: int
    checksums: tuple[int, ...]

    @property
    def n_cells(self) -> int:
        """Number of checksum cells of the payload."""
        return len(self.checksums)

    @property
    def payload_offset(self) -> int:
        """File offset of the payload (= size of the header block)."""
        return _payload_offset(len(self.checksums))

    @property
    def file_size(self) -> int:
        """Total size of the fragment file."""
        return self.payload_offset + self.payload_length


def _valid_shape(k: int, m: int, index: int, cell_size: int, payload_length: int) -> str | None:
    """Why these header fields are invalid, or None if they are fine."""
    if k < 1 or m < 1 or k + m > MAX_N:
        return f"bad k={k}, m={m} (need k >= 1, m >= 1, k + m <= {MAX_N})"
    if not 0 <= index < k + m:
        return f"index {index} out of range for k + m = {k + m}"
    if cell_size & (cell_size - 1) or not MIN_CELL_SIZE <= cell_size <= MAX_CELL_SIZE:
        return f"bad cell_size {cell_size}"
    if not 0 <= payload_length <= MAX_PAYLOAD:
        return f"payload_length {payload_length} above {MAX_PAYLOAD}"
    return None


def build_fragment(
    volume_id: bytes,
    chunk_id: int,
    index: int,
    k: int,
    m: int,
    cell_size: int,
    payload: Buffer,
) -> list[Buffer]:
    """Build a fragment file as ``[header_block, payload]``, ready for os.writev.

    ``header_block`` is exactly ``payload_offset`` bytes; ``payload`` is
    returned as given (not copied). Invalid arguments raise ValueError.
    """
    payload_length = memoryview(payload).nbytes
    if not isinstance(volume_id, bytes) or len(volume_id) != 16:
        raise ValueError("volume_id must be 16 raw bytes")
    if not 0 <= chunk_id <= _U64_MAX:
        raise ValueError(f"chunk_id {chunk_id} does not fit in a u64")
    problem = _valid_shape(k, m, index, cell_size, payload_length)
    if problem is not None:
        raise ValueError(problem)
    checksums = cell_checksums(payload, cell_size)
    n_cells = len(checksums)
    offset = _payload_offset(n_cells)
    block = bytearray(offset)
    _FIXED.pack_into(
        block, 0, MAGIC, FORMAT_VERSION, k, m, index, cell_size,
        payload_length, volume_id, chunk_id, n_cells,
    )  # fmt: skip
    table_end = FIXED_HEADER_SIZE + 8 * n_cells
    struct.pack_into(f"<{n_cells}Q", block, FIXED_HEADER_SIZE, *checksums)
    _U64.pack_into(block, table_end, xxhash.xxh3_64_intdigest(memoryview(block)[:table_end]))
    return [bytes(block), payload]


def _unpack_fixed(view: memoryview) -> tuple[int, int, int, int, int, bytes, int, int]:
    """Validate the fixed header; return (k, m, index, cell_size, payload_length,
    volume_id, chunk_id, n_cells)."""
    if view.nbytes < FIXED_HEADER_SIZE:
        raise FragmentCorrupt(
            f"fragment header truncated: {view.nbytes} bytes, need {FIXED_HEADER_SIZE}"
        )
    (magic, version, k, m, index, cell_size, payload_length, volume_id, chunk_id,
     n_cells) = _FIXED.unpack_from(view, 0)  # fmt: skip
    if magic != MAGIC:
        raise FragmentCorrupt("not an ecfs fragment (bad magic)")  # never echo the bytes
    if version != FORMAT_VERSION:
        raise FragmentCorrupt(f"unsupported fragment format version {version}")
    problem = _valid_shape(k, m, index, cell_size, payload_length)
    if problem is not None:
        raise FragmentCorrupt(f"fragment header: {problem}")
    if n_cells != -(-payload_length // cell_size):
        raise FragmentCorrupt(
            f"fragment header: n_cells {n_cells} does not match payload_length "
            f"{payload_length} / cell_size {cell_size}"
        )
    return k, m, index, cell_size, payload_length, volume_id, chunk_id, n_cells


def header_size_needed(prefix: Buffer) -> int:
    """Return ``payload_offset``: how many bytes from the file start parse_header needs.

    ``prefix`` is the first bytes of a fragment file, at least
    FIXED_HEADER_SIZE of them. The fixed header fields are validated
    (magic, version, bounds, n_cells); any problem raises FragmentCorrupt.
    """
    try:
        view = _byte_view(prefix)
    except (TypeError, ValueError) as exc:
        raise FragmentCorrupt(f"fragment header: unusable buffer ({exc})") from None
    n_cells = _unpack_fixed(view)[7]
    return _payload_offset(n_cells)


def parse_header(buf: Buffer) -> FragmentHeader:
    """Parse and fully validate a fragment's header block.

    ``buf`` holds at least the first ``payload_offset`` bytes of the file
    (extra bytes are ignored). Checks magic, version, every bound, n_cells,
    the header checksum and that the padding is zero. Any problem raises
    FragmentCorrupt, and nothing else; nothing larger than ``buf`` is
    allocated.
    """
    try:
        view = _byte_view(buf)
    except (TypeError, ValueError) as exc:
        raise FragmentCorrupt(f"fragment header: unusable buffer ({exc})") from None
    k, m, index, cell_size, payload_length, volume_id, chunk_id, n_cells = _unpack_fixed(view)
    offset = _payload_offset(n_cells)
    if view.nbytes < offset:
        raise FragmentCorrupt(f"fragment header truncated: {view.nbytes} bytes, need {offset}")
    table_end = FIXED_HEADER_SIZE + 8 * n_cells
    (stored,) = _U64.unpack_from(view, table_end)
    if xxhash.xxh3_64_intdigest(view[:table_end]) != stored:
        raise FragmentCorrupt("fragment header checksum mismatch")
    padding = view[table_end + 8 : offset]
    if padding != _ZERO_BLOCK[: padding.nbytes]:
        raise FragmentCorrupt("fragment header padding is not zero")
    checksums = struct.unpack_from(f"<{n_cells}Q", view, FIXED_HEADER_SIZE)
    return FragmentHeader(
        volume_id=bytes(volume_id),
        chunk_id=chunk_id,
        index=index,
        k=k,
        m=m,
        cell_size=cell_size,
        payload_length=payload_length,
        checksums=checksums,
    )


def bad_cells(header: FragmentHeader, frag_start: int, data: Buffer) -> list[int]:
    """Verify payload bytes ``[frag_start, frag_start + len(data))`` cell by cell.

    ``frag_start`` must be cell-aligned and ``data`` must cover whole cells
    (the payload's last cell may be short), within the payload; otherwise
    FragmentCorrupt. Returns the payload cell indices whose checksum does
    not match, ascending (empty: all good).
    """
    view = _byte_view(data)
    length = view.nbytes
    cell = header.cell_size
    end = frag_start + length
    if frag_start < 0 or frag_start % cell or end > header.payload_length:
        raise FragmentCorrupt(
            f"range [{frag_start}, {end}) is misaligned or outside the payload "
            f"({header.payload_length} bytes, cells of {cell})"
        )
    if end % cell and end != header.payload_length:
        raise FragmentCorrupt(f"range end {end} is not at a cell boundary or the payload end")
    digest = xxhash.xxh3_64_intdigest
    expected = header.checksums
    first = frag_start // cell
    return [
        first + i
        for i, off in enumerate(range(0, length, cell))
        if digest(view[off : off + cell]) != expected[first + i]
    ]
