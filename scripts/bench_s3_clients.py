"""Measure S3 client libraries against a local moto server, the way
ecfs.storage.s3store would use them: ranged GETs of 64 KiB and 1 MiB, PUTs of
1.5 MiB, 8 requests at once.

Candidates:

- ``boto3``/botocore, sync, each call in a worker thread (as
  `ecfs.storage.offload.StoreRunner` runs every store call);
- ``obstore`` (Rust object_store), its sync API in worker threads, the same;
- ``aiobotocore`` with its httpx session, on trio (anyio backend), 8 tasks.

For each, per operation: latency p50/p99, MiB/s with 8 concurrent requests,
and the CPU seconds this (client) process spent per MiB moved (the server
runs in its own process and is not counted). The moto server is Python and
is usually the bottleneck of MiB/s, so CPU per MiB is what tells the
clients apart; run it on an idle machine for throughput.

Usage: python scripts/bench_s3_clients.py [--requests N] [--clients a,b,c]
Prints a table and, with --json PATH, writes the raw numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
OBJECT_SIZE = 8 * MiB
OBJECTS = 4
CONCURRENCY = 8
KEY = "bench-access-key"
SECRET = "bench-secret-key"
BUCKET = "bench"
OPERATIONS = (("get_64k", 64 * 1024), ("get_1m", MiB), ("put_1_5m", 3 * MiB // 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def summarise(name: str, op: str, size: int, lat: list[float], wall: float, cpu_s: float) -> dict:
    lat.sort()
    moved = size * len(lat) / MiB
    return {
        "client": name,
        "op": op,
        "requests": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mib_s": moved / wall,
        "cpu_ms_per_mib": 1000 * cpu_s / moved,
    }


def run_threaded(name: str, ops: dict[str, Callable[[int], None]], n: int) -> list[dict]:
    out = []
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        for op, size in OPERATIONS:
            fn = ops[op]
            list(pool.map(fn, range(CONCURRENCY)))  # warm connections

            def timed(i: int, fn: Callable[[int], None] = fn) -> float:
                t = time.perf_counter()
                fn(i)
                return time.perf_counter() - t

            c0, t0 = cpu(), time.perf_counter()
            lat = list(pool.map(timed, range(n)))
            out.append(summarise(name, op, size, lat, time.perf_counter() - t0, cpu() - c0))
    return out


def offsets(i: int, size: int) -> int:
    rnd = random.Random(i)
    return rnd.randrange(0, OBJECT_SIZE - size + 1, 4096)


def bench_boto3(url: str, n: int) -> list[dict]:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(max_pool_connections=CONCURRENCY, retries={"mode": "standard"}),
    )
    body = os.urandom(3 * MiB // 2)

    def get(size: int) -> Callable[[int], None]:
        def fn(i: int) -> None:
            start = offsets(i, size)
            r = client.get_object(
                Bucket=BUCKET, Key=f"obj{i % OBJECTS}", Range=f"bytes={start}-{start + size - 1}"
            )
            buf = bytearray(size)
            got = r["Body"].read()
            buf[: len(got)] = got

        return fn

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"put/boto3/{i}", Body=body)

    return run_threaded(
        "boto3 (threads)", {"get_64k": get(64 * 1024), "get_1m": get(MiB), "put_1_5m": put}, n
    )


def bench_obstore(url: str, n: int) -> list[dict]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=url,
        region="us-east-1",
        access_key_id=KEY,
        secret_access_key=SECRET,
        client_options={"allow_http": True},
    )
    body = os.urandom(3 * MiB // 2)

    def get(size: int) -> Callable[[int], None]:
        def fn(i: int) -> None:
            start = offsets(i, size)
            got = obstore.get_range(store, f"obj{i % OBJECTS}", start=start, length=size)
            buf = bytearray(size)
            mv = memoryview(got)
            buf[: len(mv)] = mv

        return fn

    def put(i: int) -> None:
        obstore.put(store, f"put/obstore/{i}", body, use_multipart=False)

    return run_threaded(
        "obstore (threads)", {"get_64k": get(64 * 1024), "get_1m": get(MiB), "put_1_5m": put}, n
    )


def bench_aiobotocore(url: str, n: int) -> list[dict]:
    import trio
    from aiobotocore.config import AioConfig
    from aiobotocore.httpxsession import HttpxSession
    from aiobotocore.session import get_session

    body = os.urandom(3 * MiB // 2)
    out: list[dict] = []

    async def main() -> None:
        session = get_session()
        config = AioConfig(max_pool_connections=CONCURRENCY, http_session_cls=HttpxSession)
        async with session.create_client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=config,
        ) as client:

            def get(size: int):
                async def fn(i: int) -> None:
                    start = offsets(i, size)
                    r = await client.get_object(
                        Bucket=BUCKET,
                        Key=f"obj{i % OBJECTS}",
                        Range=f"bytes={start}-{start + size - 1}",
                    )
                    async with r["Body"] as stream:
                        got = await stream.read()
                    buf = bytearray(size)
                    buf[: len(got)] = got

                return fn

            async def put(i: int) -> None:
                await client.put_object(Bucket=BUCKET, Key=f"put/aio/{i}", Body=body)

            ops = {"get_64k": get(64 * 1024), "get_1m": get(MiB), "put_1_5m": put}
            for op, size in OPERATIONS:
                fn = ops[op]
                limiter = trio.CapacityLimiter(CONCURRENCY)
                lat: list[float] = []

                async def one(i: int, fn=fn, limiter=limiter, lat=lat) -> None:
                    async with limiter:
                        t = time.perf_counter()
                        await fn(i)
                        lat.append(time.perf_counter() - t)

                async with trio.open_nursery() as nursery:  # warm
                    for i in range(CONCURRENCY):
                        nursery.start_soon(one, i)
                lat.clear()
                c0, t0 = cpu(), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(one, i)
                out.append(
                    summarise(
                        "aiobotocore (httpx, trio)",
                        op,
                        size,
                        lat,
                        time.perf_counter() - t0,
                        cpu() - c0,
                    )
                )

    trio.run(main)
    return out


CLIENTS = {"boto3": bench_boto3, "obstore": bench_obstore, "aiobotocore": bench_aiobotocore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per operation")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    proc, url = start_moto()
    try:
        import boto3

        setup = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        setup.create_bucket(Bucket=BUCKET)
        for i in range(OBJECTS):
            setup.put_object(Bucket=BUCKET, Key=f"obj{i}", Body=os.urandom(OBJECT_SIZE))
        rows: list[dict] = []
        for name in args.clients.split(","):
            rows += CLIENTS[name](url, args.requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"{'client':28} {'op':9} {'p50 ms':>8} {'p99 ms':>8} {'MiB/s':>8} {'CPU ms/MiB':>11}")
    for r in rows:
        print(
            f"{r['client']:28} {r['op']:9} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}"
            f" {r['mib_s']:8.1f} {r['cpu_ms_per_mib']:11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
