"""The Prometheus endpoint of a mount (`-o metrics=`) and the Grafana
dashboard that ships with ecfs.

* the option's address forms, and the endpoint in-process (records built
  on the trio loop, an error before it runs, the port closed by `close`);
* a real mount with `-o metrics=127.0.0.1:PORT` scraped with a real HTTP
  client (urllib) while files are written and read, parsed with
  prometheus_client's parser: per-store families and latency histograms;
  the port is closed after the unmount;
* ecfs/share/grafana/ecfs-dashboard.json against Grafana's dashboard model
  (the Grafana Foundation SDK's types, generated from Grafana's schemas: a
  key Grafana does not know is dropped by its decoder, so the document must
  survive a decode/encode round trip unchanged), plus what the model leaves
  open (panel types known to Grafana, a grid of 24 columns without
  overlaps, every query on the dashboard's Prometheus data source), and
  every PromQL expression parsed: each metric it names is exported.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ecfs.core.errors import VolumeError
from ecfs.frontend.metrics import (
    METRICS,
    MetricsEndpoint,
    MetricsUnavailable,
    parse_metrics_address,
)
from ecfs.frontend.mount import parse_options
from ecfs.storage.offload import LATENCY_BUCKETS, run_in_thread
from tests.mounting import (
    FUSE_MISSING_REASON,
    TEST_MKFS_ARGS,
    MountedVolume,
    MountError,
    cli,
    mounted_volume,
)
from tests.test_iostat import busy
from tests.test_status import example_status
from tests.volume_files import MiB

DASHBOARD = Path(__file__).resolve().parent.parent / "ecfs/share/grafana/ecfs-dashboard.json"


# -- the option and the endpoint in-process --------------------------------------------


def test_the_metrics_option() -> None:
    assert parse_options(["metrics=9100"]).metrics == ("127.0.0.1", 9100)  # loopback only
    assert parse_options(["ro,metrics=0.0.0.0:9100"]).metrics == ("0.0.0.0", 9100)
    assert parse_options(["metrics=[::1]:9100"]).metrics == ("::1", 9100)
    assert parse_options([]).metrics is None  # off by default
    for bad in ("metrics=0", "metrics=host:", "metrics=::1:80", "metrics=a:b"):
        with pytest.raises(VolumeError, match="mount option"):
            parse_options([bad])
    with pytest.raises(ValueError, match="1 to 65535"):
        parse_metrics_address("70000")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return answer.read().decode()


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_the_endpoint_asks_the_loop_for_records() -> None:
    built_on: list[object] = []

    def status():  # type: ignore[no-untyped-def]
        built_on.append(trio.lowlevel.current_trio_token())  # raises off the loop
        return example_status()

    endpoint = MetricsEndpoint("127.0.0.1", 0, status)
    endpoint.start()
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(url)  # no loop attached yet: an error, not stale or empty numbers
        assert refused.value.code == 503
        refused.value.close()

        async def main() -> str:
            endpoint.attach(trio.lowlevel.current_trio_token())
            return await run_in_thread(scrape, url)

        found = families(trio.run(main))
        assert found["ecfs_volume_tolerance"] == [("ecfs_volume_tolerance", {}, 1.0)]
        assert len(built_on) == 1
    finally:
        endpoint.close()
    assert port_closed(endpoint.port)
    endpoint.close()  # idempotent
    with pytest.raises(MetricsUnavailable):
        endpoint._from_loop()


# -- a real mount --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The text of a scrape of a busy mount (and the port closed after it)."""
    port = free_port()
    base = tmp_path_factory.mktemp("metrics")
    with mounted_volume(base, mount_args=["-o", f"metrics=127.0.0.1:{port}"]) as vol:
        with busy(vol.mountpoint, size=4 * MiB):
            time.sleep(1.0)
            text = scrape(f"http://127.0.0.1:{port}/metrics")
        log = vol.log_path.read_text()
    vol.check_log_clean()  # no warning, error or traceback from the server threads
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in log
    assert port_closed(port)  # the daemon has exited: nothing listens any more
    yield text


def test_a_mount_serves_its_metrics(scraped: str) -> None:
    found = families(scraped)
    assert set(found) <= {m.name.removesuffix("_total") for m in METRICS}
    stores = [str(i) for i in range(6)]
    read = {labels["store"]: value for _, labels, value in found["ecfs_store_bytes_read"]}
    written = {labels["store"]: value for _, labels, value in found["ecfs_store_bytes_written"]}
    assert sorted(read) == stores and sorted(written) == stores
    assert all(value > 0 for value in written.values())
    assert sum(value > 0 for value in read.values()) >= 4
    ops = {labels["store"]: value for _, labels, value in found["ecfs_store_write_ops"]}
    assert all(ops[s] > 0 for s in stores)
    states = [(labels["store"], labels["state"]) for _, labels, v in found["ecfs_store_state"] if v]
    assert [store for store, _ in states] == stores  # one state each
    assert {state for _, state in states} <= {"ok", "slow"}  # slow: a busy CPU
    health = {labels["state"]: value for _, labels, value in found["ecfs_volume_health"]}
    assert health["healthy"] == 1.0
    assert "# TYPE ecfs_store_op_latency_seconds histogram" in scraped


def test_the_latency_histograms(scraped: str) -> None:
    samples = families(scraped)["ecfs_store_op_latency_seconds"]
    for store in map(str, range(6)):
        buckets = [(labels["le"], value) for name, labels, value in samples
                   if name.endswith("_bucket") and labels["store"] == store]  # fmt: skip
        bounds = [float(le) for le, _ in buckets]
        assert bounds == [*LATENCY_BUCKETS, float("inf")]
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
        (count,) = [v for n, labels, v in samples if n.endswith("_count") and labels["store"] == store]
        (total,) = [v for n, labels, v in samples if n.endswith("_sum") and labels["store"] == store]
        assert count == counts[-1] > 0 and total > 0


@pytest.mark.mount
def test_a_port_in_use_fails_the_mount(tmp_path: Path) -> None:
    if FUSE_MISSING_REASON is not None:
        pytest.skip(FUSE_MISSING_REASON)
    stores = [tmp_path / f"s{i}" for i in range(3)]
    cli("mkfs", "--data", 2, "--parity", 1, *TEST_MKFS_ARGS, *stores)
    (tmp_path / "mnt").mkdir()
    vol = MountedVolume(stores, tmp_path / "mnt", tmp_path / "ecfs.log")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(MountError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                vol.mount("-o", f"metrics={port}")
        finally:
            vol.unmount(check=False)
    assert not vol.is_mounted


# -- the Grafana dashboard ----------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_grafanas_model(dashboard: dict) -> None:
    """Decoded into the Grafana Foundation SDK's types (generated from
    Grafana's schemas) and encoded again, nothing is lost: every key is one
    Grafana's dashboard, panel, query and panel-option models know."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

    plugins.register_default_plugins()
    model = Dashboard.from_json(dashboard)
    again = json.loads(JSONEncoder().encode(model))
    assert lost_keys(dashboard, again) == []
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert all(isinstance(p, Panel | RowPanel) for p in model.panels or ())
    from grafana_foundation_sdk.cog.plugins import cogruntime

    for panel in dashboard["panels"]:
        if panel["type"] != "row":  # a known panel plugin: its options were checked too
            assert cogruntime.panelcfg_config(panel["type"]) is not None, panel["type"]


def lost_keys(sent: object, back: object, path: str = "") -> list[str]:
    """Where `back` lacks a key of `sent` or differs from it."""
    if isinstance(sent, dict) and isinstance(back, dict):
        return [p for k, v in sent.items()
                for p in ([f"{path}.{k}"] if k not in back else lost_keys(v, back[k], f"{path}.{k}"))]  # fmt: skip
    if isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        return [p for i, (a, b) in enumerate(zip(sent, back, strict=True)) for p in lost_keys(a, b, f"{path}[{i}]")]
    return [] if sent == back else [f"{path}: {sent!r} != {back!r}"]


def test_the_dashboard_layout_and_queries(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    taken: set[tuple[int, int]] = set()
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"]
            assert 'instance=~"$instance"' in t["expr"]


def expressions(dashboard: dict) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for t in panel.get("targets", ()):
            yield t["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            yield re.fullmatch(r"label_values\((.*), \w+\)", query).group(1)  # type: ignore[union-attr]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (parsed, with Grafana's
    variables put in)."""
    import promql_parser

    concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        for attr in ("args", "expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            for item in child if isinstance(child, list) else [child]:
                if item is not None and not isinstance(item, str | int | float):
                    walk(item)

    walk(promql_parser.parse(concrete))
    return names


def exported_names() -> set[str]:
    """Every sample name the collector can export (METRICS: a histogram's
    samples are NAME_bucket, _sum and _count)."""
    names = set()
    for metric in METRICS:
        if metric.type == "histogram":
            names |= {f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(metric.name)
    return names


def test_every_metric_the_dashboard_asks_for_is_exported(dashboard: dict, scraped: str) -> None:
    """Each expression parses as PromQL and names only metrics the collector
    exports; all but the ones that exist only in some states (an ETA while
    repairing, the queue by reason) were in the scrape of a real mount."""
    asked = set()
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, expr
        asked |= names
    assert asked <= exported_names(), asked - exported_names()
    scraped_names = {s.name for family in text_string_to_metric_families(scraped) for s in family.samples}
    assert asked - scraped_names <= {"ecfs_repair_queue_chunks", "ecfs_store_free_bytes",
                                     "ecfs_store_size_bytes"}  # fmt: skip
    needed = {"ecfs_store_op_latency_seconds_bucket", "ecfs_store_bytes_read_total",
              "ecfs_store_errors_total", "ecfs_store_state", "ecfs_volume_health",
              "ecfs_volume_tolerance", "ecfs_repair_queue_chunks", "ecfs_degraded_reads_total"}  # fmt: skip
    assert needed <= asked


def test_the_dashboard_ships_in_the_package() -> None:
    from importlib.resources import files

    shipped = files("ecfs") / "share" / "grafana" / "ecfs-dashboard.json"
    assert json.loads(shipped.read_text())["uid"] == "ecfs-volume"
