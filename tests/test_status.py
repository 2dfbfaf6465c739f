"""The status record: tolerance and health on a volume opened in-process (no
mount), its JSON round trip, and the renderings of the record (terminal
text, Prometheus exposition checked with prometheus_client's own parser)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ecfs.core.model import ChunkRef
from ecfs.data.garbage import GarbageStatistics
from ecfs.data.reader import ReadStatistics
from ecfs.data.repair import RepairQueueEntry, RepairStatistics
from ecfs.data.restripe import RestripeStatistics
from ecfs.data.scrub import MetadataFinding, ScrubFinding, ScrubStatistics
from ecfs.data.smallwrites import WriteLogStatistics
from ecfs.data.writer import WriteStatistics
from ecfs.frontend.metrics import METRICS, StatusCollector, render_prometheus
from ecfs.frontend.render import render_scrub, render_status
from ecfs.storage.metadb.chunks import ChunkTable, RepairQueue
from ecfs.storage.offload import LATENCY_BUCKETS
from ecfs.volume.assembly import Volume
from ecfs.volume.status import (
    MetadataStatus,
    StatusFormatError,
    StoreChange,
    StoreStatus,
    VolumeStatus,
    from_json,
    iostat_from_json,
    iostat_to_json,
    to_json,
)
from tests.test_garbage import PAYLOAD, K, M, N, volume  # noqa: F401 (the fixture)


def test_tolerance_counts_known_bad_fragments_and_failed_stores(volume: Volume) -> None:  # noqa: F811
    with volume.db.transaction():
        ChunkTable(volume.db).put(2, 0, ChunkRef(2000, K * len(PAYLOAD), tuple(range(N))))
    s = volume.status()
    assert (s.tolerance, s.health) == (M, "healthy")
    assert [store.fragments for store in s.stores] == [1] * N
    with volume.db.transaction():
        RepairQueue(volume.db).add(2000, "degraded-read", 0, time.time_ns(), bad=1 << 0)
    s = volume.status()
    assert (s.tolerance, s.health) == (M - 1, "at-risk" if M == 1 else "degraded")
    assert s.repair.queue == {"degraded-read": RepairQueueEntry(1, K * len(PAYLOAD))}
    volume.runners[2].mark_failed("test: away")  # fragment 2 of the chunk is on store 2
    s = volume.status()
    assert (s.tolerance, s.health) == (M - 2, "data-loss")
    assert (s.stores[2].state, s.stores[2].reason) == ("failed", "test: away")
    volume.runners[2].mark_ok()
    with volume.db.transaction():
        RepairQueue(volume.db).remove(2000)
    s = volume.status()
    assert (s.tolerance, s.health) == (M, "healthy")


def test_the_iostat_snapshot_needs_no_query_over_the_chunks(
    volume: Volume, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """`Volume.iostat()` is counters and in-memory state only: it works with
    the chunk table and repair queue queries broken (`status()` does not)."""

    def no_query(*args: object) -> None:
        raise AssertionError("iostat ran a query over the chunk table")

    for cls, name in ((ChunkTable, "redundancy_classes"), (RepairQueue, "known_damage"),
                      (RepairQueue, "summary")):  # fmt: skip
        monkeypatch.setattr(cls, name, no_query)
    volume.runners[1].mark_failed("test: away")
    record = volume.iostat()
    assert [s.index for s in record.stores] == list(range(N))
    assert (record.stores[1].state, record.stores[1].reason) == ("failed", "test: away")
    assert iostat_from_json(json.loads(json.dumps(iostat_to_json(record)))) == record
    with pytest.raises(AssertionError, match="chunk table"):
        volume.status()


def test_a_live_record_survives_the_json_round_trip(volume: Volume) -> None:  # noqa: F811
    """What the daemon sends (json.dumps of to_json) is the record the CLI gets."""
    record = volume.status()
    assert isinstance(record, VolumeStatus)
    sent = json.dumps(to_json(record), sort_keys=True)
    assert from_json(json.loads(sent)) == record
    assert from_json(json.loads(json.dumps(to_json(example_status())))) == example_status()


def test_from_json_names_what_does_not_fit() -> None:
    document = to_json(example_status())
    del document["repair"]["busy"]
    with pytest.raises(StatusFormatError, match=r"status\.repair\.busy is missing"):
        from_json(document)
    document = to_json(example_status())
    document["stores"][0]["free_bytes"] = "lots"
    with pytest.raises(StatusFormatError, match=r"status\.stores\[0\]\.free_bytes"):
        from_json(document)
    document = to_json(example_status())
    document["tolerance"] = True  # a bool is no count
    with pytest.raises(StatusFormatError, match="tolerance"):
        from_json(document)


def test_the_json_document_keeps_its_shape() -> None:
    """The keys scripts and ecfs-status(8) rely on (an int-keyed map keeps
    string keys in JSON, a missing store change is null)."""
    document = json.loads(json.dumps(to_json(example_status())))
    assert document["repair"]["queue"] == {"degraded-read": {"chunks": 2, "bytes": 1000},
                                           "scrub": {"chunks": 1, "bytes": 10}}  # fmt: skip
    assert document["stores"][0]["latency_p95_ms"] == 20.0
    assert document["metadata"]["stale_replicas"] == {"3": "store failed"}
    assert document["scrub"]["findings"][0]["fragments"] == [1, 2]
    assert document["store_change"] is None
    assert set(document["garbage"]) == {"pending", "deleted_chunks", "leftovers"}


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Prometheus text parsed by prometheus_client: family -> samples."""
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_prometheus_text_of_a_degraded_record() -> None:
    text = render_prometheus(example_status())
    found = families(text)
    assert set(found) <= {m.name.removesuffix("_total") for m in METRICS}
    health = {labels["state"]: value for _, labels, value in found["ecfs_volume_health"]}
    assert health == {"healthy": 0, "degraded": 1, "at-risk": 0, "data-loss": 0}
    assert ("ecfs_store_state", {"store": "0", "state": "failed"}, 1.0) in found["ecfs_store_state"]
    assert found["ecfs_store_info"] == [
        ("ecfs_store_info", {"store": "0", "path": '/srv/a "quoted"\\dir'}, 1.0),
        ("ecfs_store_info", {"store": "1", "path": "/srv/b"}, 1.0),
    ]
    latency = found["ecfs_store_latency_seconds"]
    assert ("ecfs_store_latency_seconds", {"store": "0", "quantile": "0.95"}, 0.02) in latency
    free = found["ecfs_store_free_bytes"]
    assert free == [("ecfs_store_free_bytes", {"store": "1"}, 5e9)]  # unknown: no sample
    assert "ecfs_repair_eta_seconds" not in found
    assert "ecfs_metadata_durable_generation" not in found
    assert found["ecfs_repair_queue_chunks"] == [
        ("ecfs_repair_queue_chunks", {"reason": "degraded-read"}, 2.0),
        ("ecfs_repair_queue_chunks", {"reason": "scrub"}, 1.0),
    ]
    assert found["ecfs_degraded_reads"] == [("ecfs_degraded_reads_total", {}, 5.0)]
    assert found["ecfs_repair_fragments_rebuilt"] == [
        ("ecfs_repair_fragments_rebuilt_total", {}, 7.0)
    ]
    assert found["ecfs_garbage_pending_chunks"] == [("ecfs_garbage_pending_chunks", {}, 3.0)]
    assert "# TYPE ecfs_store_errors_total counter\n" in text
    assert "# TYPE ecfs_store_latency_seconds summary\n" in text
    assert text.endswith("\n")


def test_prometheus_restripe_progress() -> None:
    """The restripe's progress and skipped chunks are gauges; a record
    without restripe statistics has no such sample."""
    assert not any(name.startswith("ecfs_restripe") for name in families(render_prometheus(example_status())))
    restripe = RestripeStatistics(
        roots=1, files_total=12, files_done=5, chunks_total=40, chunks_done=17,
        bytes_total=40 << 20, bytes_done=17 << 20, rate_bytes_per_s=3 << 20, skipped=2,
        skipped_ranges=("/t/f1 bytes [0, 10): unreadable",),
    )  # fmt: skip
    text = render_prometheus(example_status(restripe=restripe))
    found = {name: samples for name, samples in families(text).items() if name.startswith("ecfs_restripe")}
    assert {name: samples[0][2] for name, samples in found.items()} == {
        "ecfs_restripe_pending": 1.0,
        "ecfs_restripe_files": 12.0,
        "ecfs_restripe_files_done": 5.0,
        "ecfs_restripe_chunks": 40.0,
        "ecfs_restripe_chunks_done": 17.0,
        "ecfs_restripe_bytes": float(40 << 20),
        "ecfs_restripe_bytes_done": float(17 << 20),
        "ecfs_restripe_rate_bytes_per_second": float(3 << 20),
        "ecfs_restripe_skipped_chunks": 2.0,
    }
    assert "# TYPE ecfs_restripe_chunks_done gauge\n" in text


def test_prometheus_latency_histogram_of_a_store() -> None:
    """The store's bucket counts become a cumulative Prometheus histogram
    (le = each bound, then +Inf) with its sum and count; p99 joins the
    summary's quantiles; a store without a histogram has no samples."""
    record = example_status()
    counts = (2, 1, *[0] * (len(LATENCY_BUCKETS) - 2), 3)
    store = dataclasses.replace(record.stores[1], latency_histogram=counts, latency_sum_s=91.5,
                                latency_p99_ms=40.0)  # fmt: skip
    found = families(render_prometheus(dataclasses.replace(record, stores=(record.stores[0], store))))
    samples = found["ecfs_store_op_latency_seconds"]
    assert {labels["store"] for _, labels, _ in samples} == {"1"}
    buckets = [(labels["le"], value) for name, labels, value in samples if name.endswith("_bucket")]
    assert buckets[:3] == [("0.0001", 2.0), ("0.00025", 3.0), ("0.0005", 3.0)]
    assert buckets[-1] == ("+Inf", 6.0)
    assert ("ecfs_store_op_latency_seconds_count", {"store": "1"}, 6.0) in samples
    assert ("ecfs_store_op_latency_seconds_sum", {"store": "1"}, 91.5) in samples
    quantiles = found["ecfs_store_latency_seconds"]
    assert ("ecfs_store_latency_seconds", {"store": "1", "quantile": "0.99"}, 0.04) in quantiles


def test_the_collector_serves_the_current_record() -> None:
    """A registry that keeps the collector asks for the record at each scrape."""
    from prometheus_client import CollectorRegistry, generate_latest

    records = [example_status(), example_status(tolerance=0, health="at-risk")]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: records.pop(0)))
    first = families(generate_latest(registry).decode())["ecfs_volume_tolerance"]
    second = families(generate_latest(registry).decode())["ecfs_volume_tolerance"]
    assert (first[0][2], second[0][2]) == (1.0, 0.0)


def test_terminal_text_of_a_degraded_record() -> None:
    text = render_status(example_status())
    lines = text.splitlines()
    assert lines[0] == f"volume {'ab' * 16}  k=4 m=2  health: degraded"
    assert lines[1] == "can lose 1 more store without losing data"
    header = next(line for line in lines if line.split()[:2] == ["store", "state"])
    assert header.split() == ["store", "state", "p50", "p95", "queue", "errors", "fragments",
                              "used", "free", "domain", "path"]  # fmt: skip
    row = next(line for line in lines if line.split()[:1] == ["0"])
    assert row.split()[:3] == ["0", "failed", "1.5"]
    assert row.endswith('/srv/a "quoted"\\dir')
    assert any(line.strip() == "failed: disk gone" for line in lines)
    assert "repair: 3 chunks queued" in text and "(urgent)" in text
    assert "small-write log: 1 records" in text and "; 2 segments, " in text
    assert "short of m+1 copies" not in text
    assert "UNRECOVERABLE: chunk 00ff: only 3 fragments" in text
    assert all(line == line.rstrip() for line in lines)
    scrub = render_scrub(example_status().scrub)
    assert "findings: 1 chunks with missing or corrupt fragments (queued for repair)" in scrub
    assert "00000000000003e8" in scrub
    assert "store 3: digest mismatch" in scrub


def test_terminal_text_shows_paths_as_they_are() -> None:
    """A store path is data: brackets and colons are not rich markup or emoji codes."""
    record = example_status()
    odd = dataclasses.replace(record.stores[1], path="/srv/[bold]x[/]:smile:", reason="[/]")
    text = render_status(dataclasses.replace(record, stores=(record.stores[0], odd)))
    row = next(line for line in text.splitlines() if line.split()[:1] == ["1"])
    assert row.endswith("   /srv/[bold]x[/]:smile:")
    long = "/srv/" + "d" * 300 + "/end"
    odd = dataclasses.replace(odd, path=long)
    lines = render_status(dataclasses.replace(record, stores=(record.stores[0], odd))).splitlines()
    header = next(line for line in lines if line.split()[:2] == ["store", "state"])
    assert header.split()[-1] == "path"  # no column squeezed away
    row = next(line for line in lines if line.split()[:1] == ["1"])
    assert row.split()[-1] == long  # whole, on one line


def example_status(**changes: object) -> VolumeStatus:
    """A degraded volume's record with one failed store and a busy repair."""
    store = StoreStatus(
        index=0, path='/srv/a "quoted"\\dir', state="failed", reason="disk gone", in_flight=0,
        errors=3, timeouts=0, latency_p50_ms=1.5, latency_p95_ms=20.0, bytes_read=10,
        bytes_written=0, free_bytes=None, total_bytes=None, fragments=4, fragment_bytes=4096,
        draining=False,
    )  # fmt: skip
    other = dataclasses.replace(
        store, index=1, path="/srv/b", state="ok", reason=None, errors=0, free_bytes=5 * 10**9,
        total_bytes=10**10,
    )  # fmt: skip
    status = VolumeStatus(
        volume="ab" * 16, k=4, m=2, health="degraded", tolerance=1, stores=(store, other),
        repair=RepairStatistics(
            chunks_repaired=1, chunks_checked_fine=0, fragments_rebuilt=7, bytes_read=100,
            bytes_written=200, unrecoverable=1, deferred=0, urgent=True, rate_bytes_per_s=0,
            rate_limit=0.0, busy=True,
            queue={"degraded-read": RepairQueueEntry(2, 1000), "scrub": RepairQueueEntry(1, 10)},
            chunks=3, bytes_left=1515, eta_seconds=None,
        ),
        scrub=ScrubStatistics(
            running=False, started_ns=1, finished_ns=2, chunks_total=10, chunks_done=10,
            fragments_verified=59, bytes_verified=1 << 20,
            findings=(ScrubFinding(1000, 5, 0, (1, 2), ("1: missing", "2: corrupt")),),
            finding_count=1, stopped_early=False, metadata_replicas_verified=2,
            metadata_findings=(MetadataFinding(3, "digest mismatch"),),
        ),
        reads=ReadStatistics(100, 150, 5, 40, 60, 0, 1, 2, 3, 0),
        writes=WriteStatistics(10, 15),
        write_log=WriteLogStatistics(1, 50, 1, 4, 200, 3, 0, 1 << 20, 2, 16 << 20, 8192, 0, 1),
        garbage=GarbageStatistics(pending=3, deleted_chunks=9, leftovers=0),
        metadata=MetadataStatus(
            generation=12, durable_generation=None, live_replicas=(1, 2),
            stale_replicas={3: "store failed"},
        ),
        unrecoverable=("chunk 00ff: only 3 fragments",),
        store_change=None,
    )  # fmt: skip
    return dataclasses.replace(status, **changes)  # type: ignore[arg-type]


def test_a_store_change_travels_too() -> None:
    record = example_status(store_change=StoreChange("add", None, "/srv/c", "done", "added"))
    assert from_json(json.loads(json.dumps(to_json(record)))) == record
