"""Where an instruction edit spends its time, on the tiny presets (CPU): decode the source MP4, ground the
instruction (GroundingDINO on key frames + SAM2 video propagation), repaint with Wan VACE, mux the edited frames
with the source's audio packets.

    python benchmarks/edit_latency.py --seconds 2 --resolution 480p --steps 8

The source is a real clip of ours: the tiny LTX-2 preset generates it in this process first (not timed). Each
stage is the same object the Serve editor / grounder replicas call (`read_video`, `GroundingStage.masks_for`,
`InpaintStage`, `remux_with_source_audio`), run `--runs` times after one warm-up; the medians are printed.
`--work-pixels` is the inpainting model's working area (the service's `edit.max_work_pixels`, 832x480 by default).
The random-init detector finds nothing meaningful, so its best box is taken (as the service does for the builtin
tiny grounding model): the time is the real model work for the clip's size, the mask is arbitrary.
Last line: `grounding_s=.. inpaint_s=.. mux_s=.. total_s=..` (total includes decode_s).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _source_mp4(home: Path, seconds: float, resolution: str) -> bytes:
    from imagine.models.tiny import ensure_tiny_ltx2
    from imagine.pipeline.generate import LocalGenerator
    from imagine.pipeline.media import mux_mp4
    from imagine.pipeline.sizing import plan_video
    from imagine.pipeline.types import GenerationSpec

    plan = plan_video(seconds, resolution, "16:9", 24)
    spec = GenerationSpec(
        prompt="a man walking past a lighthouse", negative_prompt="", width=plan.width, height=plan.height,
        num_frames=plan.num_frames, fps=plan.fps, num_inference_steps=4, seed=7, guidance_scale=3.0,
    )
    media = LocalGenerator(ensure_tiny_ltx2(home)).generate(spec)
    buf = io.BytesIO()
    mux_mp4(media, buf, crf=18)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--resolution", default="480p", choices=["480p", "720p"])
    parser.add_argument("--steps", type=int, default=8, help="inpainting denoising steps")
    parser.add_argument("--work-pixels", type=int, default=832 * 480, help="inpainting working area (pixels)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from imagine.config import EditConfig
    from imagine.editing.grounding import load_grounding_stage
    from imagine.editing.instructions import parse_instruction
    from imagine.editing.prompts import prompt_for
    from imagine.models.loading import load_components
    from imagine.models.presets import get_preset
    from imagine.models.tiny_vace import ensure_tiny_vace
    from imagine.pipeline.media import read_video, remux_with_source_audio
    from imagine.pipeline.vace import EDIT_COMPONENTS, InpaintStage

    instruction = "remove the man walking in the background"
    with tempfile.TemporaryDirectory(prefix="imagine-edit-bench-") as tmp:
        home = Path(tmp)
        source_mp4 = _source_mp4(home, args.seconds, args.resolution)
        grounding = load_grounding_stage(get_preset(EditConfig().grounding_preset), home)
        inpaint = InpaintStage(
            load_components(ensure_tiny_vace(home), EDIT_COMPONENTS, "cpu", torch.float32), max_pixels=args.work_pixels
        )
        parsed = parse_instruction(instruction)
        prompts = prompt_for(parsed.op, parsed.target, parsed.replacement)

        def run() -> dict[str, float]:
            t0 = time.perf_counter()
            source = read_video(source_mp4)
            t1 = time.perf_counter()
            masks, _ = grounding.masks_for(parsed, source.frames, dilate_px=0)
            t2 = time.perf_counter()
            frames = inpaint(source.frames, masks, prompts.prompt, prompts.negative_prompt, 1, args.steps)
            t3 = time.perf_counter()
            remux_with_source_audio(frames, source.frame_rate, source, io.BytesIO(), crf=EditConfig().mp4_crf)
            t4 = time.perf_counter()
            return {"decode_s": t1 - t0, "grounding_s": t2 - t1, "inpaint_s": t3 - t2, "mux_s": t4 - t3, "total_s": t4 - t0}

        source = read_video(source_mp4)
        print(
            f"source: {source.width}x{source.height}, {source.num_frames} frames at {source.fps:g} fps "
            f"({source.duration_s:.2f} s), audio={source.has_audio}; inpaint at "
            f"{'x'.join(map(str, inpaint.working_size(source.height, source.width)))}, {args.steps} steps; "
            f"torch threads {args.threads}"
        )
        run()  # warm-up
        runs = [run() for _ in range(args.runs)]
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for key, value in medians.items():
            print(f"{key:12s} {value:8.3f}  (runs: {', '.join(f'{r[key]:.3f}' for r in runs)})")
        print(" ".join(f"{key}={medians[key]:.3f}" for key in ("grounding_s", "inpaint_s", "mux_s", "total_s")))


if __name__ == "__main__":
    main()
