"""KeptBytes (ecfs.data.kept): what is kept, what is served from it, and
its LRU bound. Pure: no stores, no reader."""

from __future__ import annotations

import tracemalloc

import pytest
import trio
import trio.testing

from ecfs.core.model import ChunkRef
from ecfs.data.kept import KeptBytes

REF = ChunkRef(chunk_id=1, length=4 * 8192, stores=(0, 1, 2, 3, 4, 5))
K = 4


def test_data_fragments_are_kept_and_served_parity_is_not() -> None:
    kept = KeptBytes()
    assert not kept
    kept.keep(REF, K, 0, 0, 4, b"lost", {1: b"src1", 4: b"par4"})
    dest = bytearray(2)
    assert kept.copy(REF, 0, 1, memoryview(dest)) and dest == b"os"
    assert kept.copy(REF, 1, 2, memoryview(dest)) and dest == b"c1"
    assert not kept.copy(REF, 4, 0, memoryview(dest))  # parity: not kept
    assert not kept.copy(REF, 0, 3, memoryview(dest))  # past the range
    assert kept.covers(REF, 0, 0, 4) and not kept.covers(REF, 0, 2, 6)


def test_a_view_is_the_kept_bytes_themselves_read_only() -> None:
    kept = KeptBytes(limit=8)
    lost = bytearray(b"lost")
    kept.keep(REF, K, 0, 4, 8, lost, {})
    view = kept.view(REF, 0, 5, 7)
    assert view is not None and view == b"os" and view.readonly
    assert view.obj is lost  # not a copy
    assert kept.view(REF, 0, 3, 6) is None and kept.view(REF, 1, 4, 8) is None
    kept.keep(REF, K, 1, 0, 8, b"12345678", {})  # drops fragment 0: the view stays good
    assert kept.view(REF, 0, 4, 8) is None and view == b"os"


def test_the_oldest_fragment_is_dropped_beyond_the_limit() -> None:
    kept = KeptBytes(limit=8)
    kept.keep(REF, K, 0, 0, 4, b"aaaa", {})
    kept.keep(REF, K, 1, 0, 4, b"bbbb", {})
    kept.keep(REF, K, 2, 0, 4, b"cccc", {})
    assert not kept.covers(REF, 0, 0, 4)
    assert kept.covers(REF, 1, 0, 4) and kept.covers(REF, 2, 0, 4)


def test_whole_payloads_join_ranges_kept_one_after_another() -> None:
    kept = KeptBytes()
    kept.keep(REF, K, 0, 4, 8, b"5678", {})
    kept.keep(REF, K, 0, 0, 4, b"1234", {1: b"xxxx"})
    whole = kept.whole_payloads(REF, K, 8)
    assert set(whole) == {0} and bytes(whole[0]) == b"12345678"


def test_one_whole_payload_is_that_fragment_alone_and_copies_no_other() -> None:
    """`whole_payload` of one index returns that fragment's bytes (a view
    of the range kept, not a copy) and joins none of the others' ranges:
    nothing near the size of fragment 0's out-of-order halves is
    allocated, which `whole_payloads` has to join."""
    half = 512 * 1024
    kept = KeptBytes()
    kept.keep(REF, K, 0, half, 2 * half, b"b" * half, {})
    kept.keep(REF, K, 0, 0, half, b"a" * half, {})  # fragment 0: two ranges to join
    source = b"s" * (2 * half)
    kept.keep(REF, K, 2, 0, 2 * half, b"l" * (2 * half), {1: source})
    tracemalloc.start()
    try:
        one = kept.whole_payload(REF, 1, 2 * half)
        _, one_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        every = kept.whole_payloads(REF, K, 2 * half)
        _, every_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert one is not None and one.obj is source and bytes(one) == source
    assert one_peak < 64 * 1024 <= 2 * half <= every_peak  # fragment 0 joined only for all
    assert set(every) == {0, 1, 2} and bytes(every[0]) == b"a" * half + b"b" * half
    assert bytes(kept.whole_payload(REF, 0, 2 * half) or b"") == bytes(every[0])
    assert kept.whole_payload(REF, 3, 2 * half) is None  # not kept
    assert kept.whole_payload(REF, 1, 2 * half + 1) is None  # shorter than the payload


def test_streaming_requests() -> None:
    kept = KeptBytes()
    assert kept.streaming(REF, 0, 0, 4096)  # the start of the fragment
    assert not kept.streaming(REF, 0, 8192, 12288)  # a small random read
    kept.keep(REF, K, 0, 0, 8192, bytes(8192), {})
    assert kept.streaming(REF, 0, 8192, 12288)  # where kept bytes end


@pytest.mark.trio
async def test_a_request_covered_by_a_decode_under_way_waits_for_it() -> None:
    kept = KeptBytes()
    assert not await kept.wait_for_decode(REF, 0, 0, 4)
    woken = []

    async def waiter() -> None:
        woken.append(await kept.wait_for_decode(REF, 0, 0, 4))

    async with trio.open_nursery() as nursery:
        with kept.decoding(REF, 0, 0, 8):
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woken
            kept.keep(REF, K, 0, 0, 8, b"12345678", {})
    assert woken == [True]
    assert not await kept.wait_for_decode(REF, 0, 0, 4)  # none under way now
