"""How many job submissions per second does the ingress accept, and at what latency? Concurrent
clients POST generations for a fixed time against a local Serve (scheduler paused: jobs are accepted
and stored, not generated), then every accepted request id is looked up in the job store.

    python benchmarks/ingress_load.py --seconds 20 --concurrency 32

Last line: submissions_per_s=X p99_ms=Y lost=N (targets on 2 cores: >= 300/s, p99 < 100 ms, lost=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import httpx
from _local import local_service


async def load(url: str, seconds: float, concurrency: int) -> tuple[list[str], list[float], int]:
    accepted: list[str] = []
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    body = {"prompt": "a paper boat in a gutter stream", "duration": 2, "seed": 1}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    resp = await client.post("/v1/videos/generations", json=body)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if resp.status_code == 202:
                    accepted.append(resp.json()["request_id"])
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted, latencies, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--no-access-log", action="store_true", help="turn off Serve's per-request log lines")
    args = parser.parse_args()

    from imagine.jobs import JobNotFound, JobStore

    n = args.ingress_replicas
    overrides = {
        "scheduling": {"paused": True},
        "ingress": {
            "num_cpus": 0.1, "max_ongoing_requests": 256, "access_log": not args.no_access_log,
            "autoscaling": {"min_replicas": n, "max_replicas": n},
        },
    }
    with local_service(overrides) as (url, config):
        started = time.perf_counter()
        accepted, latencies, errors = asyncio.run(load(url, args.seconds, args.concurrency))
        elapsed = time.perf_counter() - started
    store = JobStore(config.resolved_database_url)
    lost = 0
    for job_id in accepted:
        try:
            store.get(job_id)
        except JobNotFound:
            lost += 1
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    print(f"concurrency={args.concurrency} ingress_replicas={n} haproxy={os.environ.get('RAY_SERVE_ENABLE_HA_PROXY', '0')} "
          f"access_log={not args.no_access_log} seconds={elapsed:.1f} accepted={len(accepted)} "
          f"errors={errors} p50_ms={p50:.1f}")
    print(f"submissions_per_s={len(accepted) / elapsed:.1f} p99_ms={p99:.1f} lost={lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
