"""What does serving cost? The same tiny generation (default: 2 s, 480p 16:9, 8 steps, CFG) run
in-process (encode -> denoise -> decode -> mux, one Python process) and through the whole service
(HTTP -> ingress -> job store -> scheduler -> three Serve deployments -> artifact store -> HTTP
download), interleaved run by run so drift hits both sides alike. Same seed, same torch threads.

    python benchmarks/serving_overhead.py --runs 5

Last line: overhead_ratio=X inprocess_s=Y served_s=Z (medians; target ratio <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _local import local_service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--aspect-ratio", default="16:9")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides")
    args = parser.parse_args()

    from imagine.client import ImagineClient
    from imagine.models.tiny import ensure_tiny_ltx2
    from imagine.pipeline.generate import LocalGenerator
    from imagine.pipeline.media import mux_mp4
    from imagine.pipeline.sizing import plan_video
    from imagine.pipeline.types import GenerationSpec

    home = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    model_dir = ensure_tiny_ltx2(home)
    torch.set_num_threads(args.threads)
    plan = plan_video(args.duration, args.resolution, args.aspect_ratio, 24)
    body = {
        "prompt": "waves on a pebble beach, gulls calling",
        "duration": args.duration,
        "resolution": args.resolution,
        "aspect_ratio": args.aspect_ratio,
        "num_inference_steps": args.steps,
        "guidance_scale": 3.0,
        "seed": 1234,
    }
    spec = GenerationSpec(
        prompt=body["prompt"], width=plan.width, height=plan.height, num_frames=plan.num_frames,
        num_inference_steps=args.steps, seed=body["seed"], fps=plan.fps, guidance_scale=body["guidance_scale"],
    )
    local = LocalGenerator(model_dir)

    def run_inprocess() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            media = local.generate(spec)
        with tempfile.TemporaryDirectory() as tmp:
            mux_mp4(media, Path(tmp) / "v.mp4")
        return time.perf_counter() - start

    overrides = {"poll_interval_s": 0.5, "model": {"torch_threads": args.threads}}
    with local_service(overrides) as (url, _config), ImagineClient(url) as client:

        def run_served() -> float:
            start = time.perf_counter()
            rid = client.generate(**body)
            job = client.wait(rid)  # the job's SSE stream: no client polling load on the shared cores
            if job["status"] != "done":
                raise RuntimeError(f"served job ended {job['status']}: {job.get('error')}")
            with tempfile.TemporaryDirectory() as tmp:
                client.download(rid, Path(tmp) / "v.mp4")
            return time.perf_counter() - start

        run_inprocess(), run_served()  # warm-up both paths (first calls allocate, JIT, import)
        inproc, served = [], []
        for i in range(args.runs):
            inproc.append(run_inprocess())
            served.append(run_served())
            print(f"run {i + 1}/{args.runs}: inprocess_s={inproc[-1]:.3f} served_s={served[-1]:.3f}", flush=True)
    y, z = statistics.median(inproc), statistics.median(served)
    print(
        f"clip: {plan.width}x{plan.height}, {plan.num_frames} frames, {args.steps} steps, CFG, threads={args.threads}, "
        f"runs={args.runs}"
    )
    print(f"overhead_ratio={z / y:.3f} inprocess_s={y:.3f} served_s={z:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
