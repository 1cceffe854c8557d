"""Parallel denoising on N local gloo ranks (CPU): parity of sequence parallel (Ulysses) and tensor parallel with
the single-rank loop on the tiny preset, and the bytes Ulysses moves per step against its theoretical volume.

    python benchmarks/parallel.py --ranks 2

Every rank runs the whole sampling loop (same spec, seed and prompt embeddings) over its shard; rank 0's final
video and audio latents are compared with one unsharded run in this process (relative error = max|a-b| / max|b|).
Comm bytes are counted per rank from the tensors handed to each collective (`imagine.parallel.comm.CommCounter`);
the theory is `ulysses_all_to_all_bytes` (4 all-to-alls of the rank's q/k/v/out shard per attention layer, each
sending (N-1)/N of it). Timings on a 2-core CPU say nothing about GPU speed-ups (see gpu_denoiser.py); they are
printed so a regression in the parallel path's overhead shows.
Last line: `sp_max_rel_err=X tp_max_rel_err=Y comm_bytes_per_step=B comm_over_theory=R`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagine.parallel.dist import run_ranks  # noqa: E402


def _spec(seconds: float, resolution: str, steps: int):
    from imagine.pipeline.sizing import plan_video
    from imagine.pipeline.types import GenerationSpec

    plan = plan_video(seconds, resolution, "16:9", 24)
    return GenerationSpec(
        prompt="a lighthouse in a storm, waves crashing",
        negative_prompt="",
        width=plan.width,
        height=plan.height,
        num_frames=plan.num_frames,
        fps=plan.fps,
        num_inference_steps=steps,
        seed=7,
        guidance_scale=3.0,
    )


def _embeddings(spec):
    from imagine.models.tiny import build_tiny_components
    from imagine.pipeline.encode import TextEncoderStage

    return TextEncoderStage(build_tiny_components())(spec.prompt, spec.negative_prompt, True)


def _loop(stage, spec, embeddings):
    started = time.perf_counter()
    latents = stage(spec, embeddings)
    return latents, time.perf_counter() - started


def _rank_body(rank: int, world_size: int, mode: str, spec, embeddings) -> dict:
    from imagine.models.tiny import build_tiny_components
    from imagine.pipeline.denoise import DenoiserStage

    torch.set_num_threads(1)
    stage = DenoiserStage(build_tiny_components())
    out: dict = {}
    if mode == "sp":
        from imagine.parallel.ulysses import enable_sequence_parallel

        handle = enable_sequence_parallel(stage.transformer)
        handle.comm.reset()
        latents, seconds = _loop(stage, spec, embeddings)
        out.update(
            a2a_bytes=handle.comm.all_to_all_bytes,
            gather_bytes=handle.comm.all_gather_bytes,
            forwards=handle.comm.forwards,
            ulysses_layers=len(handle.ulysses_attentions),
        )
    else:
        from imagine.parallel.tensor import apply_transformer_tp

        apply_transformer_tp(stage.transformer, world_size)
        latents, seconds = _loop(stage, spec, embeddings)
    out.update(video=latents.video.numpy(), audio=latents.audio.numpy(), seconds=seconds)
    return out


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="parallel degree (must divide the tiny model's 2 heads)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--resolution", default="480p", choices=["480p", "720p"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from imagine.models.tiny import TRANSFORMER_CONFIG, build_tiny_components
    from imagine.parallel.comm import ulysses_all_to_all_bytes
    from imagine.pipeline.denoise import DenoiserStage

    torch.set_num_threads(1)
    spec = _spec(args.seconds, args.resolution, args.steps)
    embeddings = _embeddings(spec)
    reference, ref_s = _loop(DenoiserStage(build_tiny_components()), spec, embeddings)
    latent_frames = (spec.num_frames - 1) // 8 + 1
    tokens = latent_frames * (spec.height // 32) * (spec.width // 32)
    print(
        f"tiny LTX-2, {spec.width}x{spec.height} {spec.num_frames} frames ({tokens} video tokens), "
        f"{args.steps} steps, CFG batch 2, {args.ranks} gloo ranks, 1 torch thread per rank"
    )
    print(f"single rank: {ref_s:.2f} s")

    results = {}
    for mode in ("sp", "tp"):
        started = time.perf_counter()
        per_rank = run_ranks(_rank_body, args.ranks, mode, spec, embeddings, timeout_s=1800)
        wall = time.perf_counter() - started
        errs = [
            max(rel_err(r["video"], reference.video), rel_err(r["audio"], reference.audio)) for r in per_rank
        ]
        results[mode] = (max(errs), per_rank)
        print(f"{mode}{args.ranks}: loop {per_rank[0]['seconds']:.2f} s (launch+load+loop {wall:.1f} s), "
              f"max rel err over ranks {max(errs):.2e}")

    sp_rank0 = results["sp"][1][0]
    steps = args.steps
    per_step = sp_rank0["a2a_bytes"] / steps
    theory = ulysses_all_to_all_bytes(
        tokens,
        TRANSFORMER_CONFIG["num_attention_heads"],
        TRANSFORMER_CONFIG["attention_head_dim"],
        sp_rank0["ulysses_layers"],
        args.ranks,
        batch_size=2,
        bytes_per_element=4,
    )
    print(
        f"Ulysses all-to-all per step per rank: {per_step:.0f} B measured, {theory} B theory "
        f"({sp_rank0['ulysses_layers']} layers); video->audio all-gather {sp_rank0['gather_bytes'] / steps:.0f} B/step"
    )
    print(
        f"sp_max_rel_err={results['sp'][0]:.3e} tp_max_rel_err={results['tp'][0]:.3e} "
        f"comm_bytes_per_step={per_step:.0f} comm_over_theory={per_step / theory:.3f}"
    )


if __name__ == "__main__":
    main()
