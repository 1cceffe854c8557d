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
import subprocess
import sys
import tempfile
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


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"prompt": "a paper boat in a gutter stream", "duration": 2, "seed": 1}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK requests=%d non2xx=%d sockerr=%d p50_us=%d p99_us=%d duration_us=%d\\n",
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


def load_with_wrk(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    """The same load from wrk (a C load generator: far less client CPU on the shared cores)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "--timeout", "30s", "-s", fh.name,
         f"{url}/v1/videos/generations"],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    ).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRK "))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--no-access-log", action="store_true", help="turn off Serve's per-request log lines")
    parser.add_argument("--client", choices=["httpx", "wrk"], default="httpx", help="load generator")
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
    settings = (
        f"client={args.client} concurrency={args.concurrency} ingress_replicas={n} "
        f"haproxy={os.environ.get('RAY_SERVE_ENABLE_HA_PROXY', '0')} access_log={not args.no_access_log}"
    )
    with local_service(overrides) as (url, config):
        if args.client == "wrk":
            stats = load_with_wrk(url, args.seconds, args.concurrency)
        else:
            started = time.perf_counter()
            accepted, latencies, errors = asyncio.run(load(url, args.seconds, args.concurrency))
            elapsed = time.perf_counter() - started
    store = JobStore(config.resolved_database_url)
    if args.client == "wrk":
        # wrk does not keep bodies: every 2xx it counted must be a row (rows may exceed it by requests
        # still in flight when wrk stopped, which it does not count)
        accepted_n = int(stats["requests"] - stats["non2xx"])
        rows = sum(store.count_by_status().values())
        lost, elapsed = max(0, accepted_n - rows), stats["duration_us"] / 1e6
        p50, p99, errors = stats["p50_us"] / 1000, stats["p99_us"] / 1000, int(stats["non2xx"] + stats["sockerr"])
    else:
        accepted_n, lost = len(accepted), 0
        for job_id in accepted:
            try:
                store.get(job_id)
            except JobNotFound:
                lost += 1
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    print(f"{settings} seconds={elapsed:.1f} accepted={accepted_n} errors={errors} p50_ms={p50:.1f}")
    print(f"submissions_per_s={accepted_n / elapsed:.1f} p99_ms={p99:.1f} lost={lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
