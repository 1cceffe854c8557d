"""Cold start of a denoiser pool that scaled to zero: how long the first job waits in the queue while its replica
starts (policy sees the queue -> Serve starts a replica -> it loads the model -> the scheduler dispatches), against
the queue wait of the same job sent to the warm pool right after, in one run on a local Serve (tiny preset).

    python benchmarks/cold_start.py --rounds 3

Each round: wait until the pool is at zero, submit a job (cold), wait for it, submit another (warm).
Last line: cold_over_warm=X cold_wait_s=Y warm_wait_s=Z (medians over the rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
from _local import local_service


def denoiser_replicas() -> int:
    from ray import serve

    states = serve.status().applications["imagine"].deployments["Denoiser"].replica_states
    return sum(states.values())


def wait_until(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.2)


def queue_wait(http: httpx.Client, body: dict) -> float:
    job_id = http.post("/v1/videos/generations", json=body).json()["request_id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = http.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled", "expired"):
            assert job["status"] == "done", job
            return job["started_at"] - job["created_at"]
        time.sleep(0.1)
    raise TimeoutError(job_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=20.0,
                        help="downscale_to_zero_delay_s of the pool (longer than a job's decode, or the warm job finds it gone)")
    args = parser.parse_args()
    small = {"num_cpus": 0.25, "max_ongoing_requests": 1}
    overrides = {
        "poll_interval_s": 0.2,
        "edit": {"enabled": False},
        "text_encoder": small, "decoder": small,
        "denoiser": {**small, "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
                                              "downscale_delay_s": args.idle_s,
                                              "downscale_to_zero_delay_s": args.idle_s}},
    }
    body = {"prompt": "a lighthouse at dusk", "duration": 1, "aspect_ratio": "1:1", "num_inference_steps": 3}
    cold, warm = [], []
    with local_service(overrides) as (url, _config):
        http = httpx.Client(base_url=url, timeout=60)
        for i in range(args.rounds):
            wait_until(lambda: denoiser_replicas() == 0, 120, "denoiser pool at zero")
            cold.append(queue_wait(http, {**body, "seed": 2 * i}))
            warm.append(queue_wait(http, {**body, "seed": 2 * i + 1}))
            print(f"round {i}: cold_wait_s={cold[-1]:.2f} warm_wait_s={warm[-1]:.2f}", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"cold_over_warm={c / max(w, 1e-3):.1f} cold_wait_s={c:.2f} warm_wait_s={w:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
