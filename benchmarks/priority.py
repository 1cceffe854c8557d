"""Does a realtime request wait behind batch work? Queue many batch jobs on a local Serve (one
denoiser slot), let one start, then submit one realtime job and measure how long it waited to
start, in units of one denoising step of the batch job it displaced.

    python benchmarks/priority.py --batch-jobs 200

Last line: realtime_wait_over_step=X realtime_wait_s=Y step_s=Z (target X <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import httpx
from _local import local_service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-jobs", type=int, default=200)
    parser.add_argument("--trials", type=int, default=3, help="realtime jobs, one after another")
    parser.add_argument("--duration", type=float, default=5.0, help="batch clip seconds")
    parser.add_argument("--resolution", default="720p", help="batch clip resolution (sets the step time)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    from imagine.jobs import JobStore

    overrides = {
        "max_inflight_jobs": 1,
        "scheduling": {"max_preemptions_per_job": 100},
        "model": {"torch_threads": os.cpu_count()},
    }
    with local_service(overrides) as (url, config):
        waits, steps = run_trials(args, url, JobStore(config.resolved_database_url))
    wait, step = statistics.median(waits), statistics.median(steps)
    print(f"realtime_wait_over_step={wait / step:.3f} realtime_wait_s={wait:.3f} step_s={step:.3f}")
    return 0


def run_trials(args: argparse.Namespace, url: str, store) -> tuple[list[float], list[float]]:  # noqa: ANN001
    http = httpx.Client(base_url=url, timeout=60)
    batch = {
        "prompt": "timelapse of clouds over mountains", "duration": args.duration,
        "resolution": args.resolution, "num_inference_steps": args.steps,
    }
    urgent = {"prompt": "a doorbell rings", "duration": 1, "aspect_ratio": "1:1", "num_inference_steps": 2}

    def submit(body: dict, tier: str) -> str:
        resp = http.post("/v1/videos/generations", json=body, headers={"X-Priority": tier})
        resp.raise_for_status()
        return resp.json()["request_id"]

    waits: list[float] = []
    steps: list[float] = []
    try:
        batch_ids = [submit({**batch, "seed": i}, "batch") for i in range(args.batch_jobs)]
        print(f"queued {len(batch_ids)} batch jobs ({args.resolution}, {args.duration}s, {args.steps} steps)", flush=True)
        for trial in range(args.trials):
            # wait until a batch job is denoising and has made a few steps
            while True:
                running = [j for j in store.list_by_status(store_status("running")) if j.priority == "batch"]
                if running and running[0].progress > 0.1:
                    victim = running[0]
                    break
                time.sleep(0.05)
            p0, t0 = victim.progress, time.time()
            time.sleep(4.0)  # several steps, so the per-step time is not quantised by progress updates
            v = store.get(victim.id)
            if v.status.value != "running":
                continue
            step_s = (time.time() - t0) / max(1e-9, (v.progress - p0) / 0.95 * args.steps)
            rid = submit(urgent, "realtime")
            while (job := store.get(rid)).started_at is None:
                time.sleep(0.005)
            wait = job.started_at - job.created_at
            waits.append(wait)
            steps.append(step_s)
            print(f"trial {trial + 1}: realtime_wait_s={wait:.3f} step_s={step_s:.3f}", flush=True)
            while store.get(rid).status.value not in ("done", "failed", "cancelled"):
                time.sleep(0.05)
        for job_id in batch_ids:
            http.post(f"/v1/videos/{job_id}/cancel")
    finally:
        http.close()
    return waits, steps


def store_status(name: str):  # noqa: ANN201 - JobStatus, imported lazily with the rest
    from imagine.jobs import JobStatus

    return JobStatus(name)


if __name__ == "__main__":
    sys.exit(main())
