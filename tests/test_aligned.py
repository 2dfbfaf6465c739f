"""ecfs.core.aligned: buffers for direct I/O are aligned, and nothing else passes for one."""

from __future__ import annotations

import pytest

from ecfs.core.aligned import (
    BLOCK,
    BufferPool,
    address_of,
    aligned_buffer,
    aligned_copy,
    is_aligned,
)


@pytest.mark.parametrize("size", [BLOCK, 3 * BLOCK, 1 << 20])
def test_aligned_buffers_are_aligned_zeroed_and_writable(size: int) -> None:
    buf = aligned_buffer(size)
    assert buf.nbytes == size and not buf.readonly
    assert address_of(buf) % BLOCK == 0
    assert bytes(buf) == bytes(size)
    assert is_aligned(buf) and is_aligned(buf[BLOCK:]) == (size > BLOCK)


def test_what_is_not_aligned() -> None:
    buf = aligned_buffer(4 * BLOCK)
    assert not is_aligned(buf[1 : 1 + BLOCK])  # address
    assert not is_aligned(buf[: BLOCK + 1])  # length
    assert not is_aligned(bytes(BLOCK))  # read-only
    assert not is_aligned(buf[:0])


def test_aligned_copy_keeps_the_bytes() -> None:
    data = bytes(range(256)) * 32
    copy = aligned_copy(data)
    assert bytes(copy) == data and is_aligned(copy)


def test_the_pool_reuses_buffers_of_the_same_size_only() -> None:
    pool = BufferPool(limit=1)
    first = pool.take(2 * BLOCK)
    assert is_aligned(first)
    pool.give(first)
    pool.give(pool.take(3 * BLOCK))  # over the limit: not kept
    assert pool.take(3 * BLOCK) is not first
    assert pool.take(2 * BLOCK) is first
    assert pool.take(2 * BLOCK) is not first  # handed out once only
