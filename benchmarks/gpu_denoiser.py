"""One LTX-2 denoising step on a GPU: full-size transformer (diffusers' default `LTX2VideoTransformer3DModel`
config, 18.9 B parameters) with random weights, at the token counts of a ~5 s 480p and 720p clip; achieved TFLOP/s,
MFU, and a model of sequence-parallel (Ulysses) scaling to 2/4/8 GPUs.

    python benchmarks/gpu_denoiser.py                          # lent GPU: bf16, 480p + 720p, 5 s, CFG batch 2
    python benchmarks/gpu_denoiser.py --layers 12              # a device too small for all 48 blocks: scale by 48/12
    python benchmarks/gpu_denoiser.py --dry-run --check-flops  # no weights: token counts, FLOPs (formula checked
                                                               # against torch's counter on the meta device), SP traffic
    python benchmarks/gpu_denoiser.py --device cpu --model tiny --dtype fp32   # smoke test of the timed path

Tokens: `plan_video` sizes the clip (480p 16:9 -> 864x480, 720p -> 1280x704, 121 frames at 24 fps); the video VAE
compresses 32x in space and 8x in time, so the transformer sees (F - 1) / 8 + 1 latent frames of (H / 32) x (W / 32)
tokens (patch size 1): 6480 tokens at 480p, 14080 at 720p. Audio: 25 latent frames per second (16 kHz, hop 160,
4x) -> 126 tokens. Text: the connectors' output, padded to 1024 tokens. A step is one transformer forward on the
CFG batch (2: negative + positive prompt), as `DenoiserStage.step` runs it.

FLOPs per step, counted analytically (2 per multiply-add; `--check-flops` compares with torch's FlopCounterMode on
the meta device: 0.99999 for the full model at 480p and 720p, the rest being the timestep-embedding MLPs):
    B x L x (linear + attention) + B x (in/out projections + caption projections), per block with
    Dv = video heads x head dim, Da = audio heads x head dim (also the width of the audio<->video attentions),
    Cv / Ca = text widths seen by the video / audio cross-attention, Fv = 4 Dv, Fa = 4 Da, Nv / Na / S tokens:
    linear    = 2 x [ Nv (4 Dv^2 + 2 Dv^2 + 4 Dv Da + 2 Dv Fv) + 2 S (Cv Dv + Ca Da)
                    + Na (4 Da^2 + 2 Da^2 + 4 Da^2 + 2 Da Fa) ]
                (self-attention q/k/v/out; text cross-attention q/out on the queries, k/v on the text; a2v + v2a
                 q/out on one side and k/v on the other; FFN up/down)
    attention = 4 x [ Nv^2 Dv + Na^2 Da + S (Nv Dv + Na Da) + 2 Nv Na Da ]   (QK^T and PV of the six attentions)
Elementwise work (norms, RoPE, GELU, softmax) is not counted, as usual for MFU.

MFU = achieved / dense bf16 peak (H100 SXM and H200: 989 TFLOP/s, A100: 312; `--peak-tflops` for others).

SP model: Ulysses splits the video tokens over N ranks; each video self-attention does 4 all-to-alls (q, k, v in,
output back). Each rank holds Nv / N tokens of the batch and sends (N - 1) / N of them in each all-to-all:
B x (Nv / N) x Dv x 2 bytes x (N - 1) / N per rank. Text and audio (126 tokens) stay replicated, so the other
attentions need no exchange. Predicted step on N GPUs = step_1 / N + L x 4 x that / bandwidth (no compute/comm
overlap: an upper bound; `--nvlink-gbps` is the achieved all-to-all bandwidth per GPU and direction, default
450 GB/s, half of H100 NVLink's 900 GB/s bidirectional).

Last line: key=value pairs (per resolution: tokens, step seconds, TFLOP per step, TFLOP/s, MFU, SP predictions).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagine.pipeline.sizing import plan_video  # noqa: E402

SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION = 32, 8
AUDIO_LATENTS_PER_SECOND = 16000 / 160 / 4
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts
SP_DEGREES = (2, 4, 8)


@dataclass(frozen=True)
class Tokens:
    resolution: str
    video: int
    audio: int
    text: int
    latent_frames: int
    latent_height: int
    latent_width: int


def clip_tokens(resolution: str, duration_s: float, fps: float, aspect_ratio: str, text_tokens: int) -> Tokens:
    plan = plan_video(duration_s, resolution, aspect_ratio, fps)
    frames = (plan.num_frames - 1) // TEMPORAL_COMPRESSION + 1
    height, width = plan.height // SPATIAL_COMPRESSION, plan.width // SPATIAL_COMPRESSION
    audio = round(plan.duration_s * AUDIO_LATENTS_PER_SECOND)  # as DenoiserStage.prepare
    return Tokens(resolution, frames * height * width, audio, text_tokens, frames, height, width)


def transformer_config(model: str, layers: int | None) -> dict[str, Any]:
    if model == "tiny":
        from imagine.models.tiny import TRANSFORMER_CONFIG

        config = dict(TRANSFORMER_CONFIG)
        if layers is not None:
            config["num_layers"] = layers
        return config
    from imagine.models.full_size import transformer_config as full_config  # diffusers' defaults: the real sizes

    return full_config(layers)


def step_flops(config: dict[str, Any], tokens: Tokens, batch: int) -> float:
    """FLOPs of one transformer forward (module docstring formula)."""
    dv = config["num_attention_heads"] * config["attention_head_dim"]
    da = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    cv, ca = config["cross_attention_dim"], config["audio_cross_attention_dim"]
    fv, fa = 4 * dv, 4 * da
    nv, na, s = tokens.video, tokens.audio, tokens.text
    macs = nv * (4 * dv * dv + 2 * dv * dv + 4 * dv * da + 2 * dv * fv)
    macs += s * (2 * cv * dv + 2 * ca * da)
    macs += na * (4 * da * da + 2 * da * da + 4 * da * da + 2 * da * fa)
    attention = 4 * (nv * nv * dv + na * na * da + s * (nv * dv + na * da) + 2 * nv * na * da)
    per_block = 2 * macs + attention
    caption = config["caption_channels"]
    outer = 2 * (
        nv * (config["in_channels"] + config["out_channels"]) * dv
        + na * (config["audio_in_channels"] + config["audio_out_channels"]) * da
        + s * (caption * dv + dv * dv + caption * da + da * da)
    )
    return float(batch * (config["num_layers"] * per_block + outer))


def ulysses_bytes_per_rank(
    config: dict[str, Any], tokens: Tokens, batch: int, ranks: int, bytes_per_value: int
) -> float:
    dv = config["num_attention_heads"] * config["attention_head_dim"]
    per_all_to_all = batch * (tokens.video / ranks) * dv * bytes_per_value * (ranks - 1) / ranks
    return float(config["num_layers"] * 4 * per_all_to_all)


def parameter_count(config: dict[str, Any]) -> int:
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**config)
    return sum(p.numel() for p in model.parameters())


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights straight on `device` in `dtype` (built on the meta device: no fp32 copy, no CPU init)."""
    from diffusers import LTX2VideoTransformer3DModel

    from imagine.models.full_size import build_on_device

    return build_on_device(LTX2VideoTransformer3DModel, config, device, dtype)


def make_inputs(config: dict[str, Any], tokens: Tokens, batch: int, device: torch.device, dtype) -> dict[str, Any]:
    """The transformer's inputs for one CFG step (random; shapes only on the meta device)."""
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        if generator is None:
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    return {
        "hidden_states": randn(batch, tokens.video, config["in_channels"]),
        "audio_hidden_states": randn(batch, tokens.audio, config["audio_in_channels"]),
        # the text connectors' outputs; the transformer projects them to Cv / Ca itself
        "encoder_hidden_states": randn(batch, tokens.text, config["caption_channels"]),
        "audio_encoder_hidden_states": randn(batch, tokens.text, config["caption_channels"]),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_attention_mask": torch.ones(batch, tokens.text, device=device, dtype=dtype),
        "audio_encoder_attention_mask": torch.ones(batch, tokens.text, device=device, dtype=dtype),
        "num_frames": tokens.latent_frames,
        "height": tokens.latent_height,
        "width": tokens.latent_width,
        "fps": 24.0,
        "audio_num_frames": tokens.audio,
        "return_dict": False,
    }


def time_step(
    model: torch.nn.Module, inputs: dict[str, Any], warmup: int, iters: int, device: torch.device
) -> list[float]:
    """Seconds per forward, after `warmup` untimed forwards (CUDA events on GPU, perf_counter on CPU)."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**inputs)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                begin = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - begin)
    return times


def counted_flops(config: dict[str, Any], tokens: Tokens, batch: int, dtype: torch.dtype) -> float:
    """FLOPs of one forward as torch's FlopCounterMode counts them, run on the meta device (no memory, no math), so
    even the full 48-block model is checked on a laptop in seconds."""
    from diffusers import LTX2VideoTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        model = LTX2VideoTransformer3DModel(**config).to(dtype).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**make_inputs(config, tokens, batch, meta, dtype))
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name and "PCIe" not in name:
            return value, name
    return None, name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("full", "tiny"), default="full", help="diffusers' default config or tiny")
    parser.add_argument("--layers", type=int, default=None, help="time this many blocks and scale to the full depth")
    parser.add_argument("--resolutions", default="480p,720p", help="comma-separated resolution classes")
    parser.add_argument("--duration", type=float, default=5.0, help="clip seconds")
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--aspect-ratio", default="16:9")
    parser.add_argument("--text-tokens", type=int, default=1024, help="prompt length after padding")
    parser.add_argument("--no-cfg", action="store_true", help="batch 1 instead of the CFG batch of 2")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device's dense peak for this dtype")
    parser.add_argument("--nvlink-gbps", type=float, default=450.0, help="achieved all-to-all GB/s per GPU")
    parser.add_argument("--check-flops", action="store_true", help="compare the formula with FlopCounterMode")
    parser.add_argument("--dry-run", action="store_true", help="no model: sizes, FLOPs and SP traffic only")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.warmup < 0 or args.iters < 1:
        parser.error(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
    if args.nvlink_gbps <= 0:
        parser.error(f"--nvlink-gbps must be > 0, got {args.nvlink_gbps}")
    if not args.dry_run and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --dry-run or --device cpu --model tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # its "keep modules in float32" note on `.to(dtype)` of random weights
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bytes_per_value = torch.finfo(dtype).bits // 8
    batch = 1 if args.no_cfg else 2
    full_config = transformer_config(args.model, None)
    config = transformer_config(args.model, args.layers)
    depth_scale = full_config["num_layers"] / config["num_layers"]
    params = parameter_count(full_config)
    device = torch.device(args.device)
    peak, device_name = (None, "none (dry run)") if args.dry_run else peak_tflops(device, args.peak_tflops)
    print(
        f"model={args.model} params={params / 1e9:.2f}B layers_timed={config['num_layers']}/{full_config['num_layers']} "
        f"dtype={args.dtype} weights={params * bytes_per_value / 2**30:.1f}GiB batch={batch} device={device_name}"
    )

    results: dict[str, Any] = {"model": args.model, "params_b": round(params / 1e9, 3), "batch": batch}
    model = None
    if not args.dry_run:
        model = build_model(config, device, dtype)
    for resolution in args.resolutions.split(","):
        tokens = clip_tokens(resolution, args.duration, args.fps, args.aspect_ratio, args.text_tokens)
        flops = step_flops(full_config, tokens, batch)
        key = resolution
        results[f"{key}_video_tokens"] = tokens.video
        results[f"{key}_tflop_per_step"] = round(flops / 1e12, 2)
        line = (
            f"{resolution}: {tokens.video} video + {tokens.audio} audio + {tokens.text} text tokens "
            f"({tokens.latent_frames}x{tokens.latent_height}x{tokens.latent_width} latents), "
            f"{flops / 1e12:.1f} TFLOP/step"
        )
        if args.check_flops:
            ratio = flops / counted_flops(full_config, tokens, batch, dtype)
            results[f"{key}_flops_formula_over_counted"] = round(ratio, 5)
            line += f" (formula / FlopCounterMode = {ratio:.5f})"
        step_s = None
        if model is not None:
            inputs = make_inputs(config, tokens, batch, device, dtype)
            times = time_step(model, inputs, args.warmup, args.iters, device)
            step_s = sorted(times)[len(times) // 2] * depth_scale
            achieved = flops / step_s / 1e12
            mfu = achieved / peak if peak else float("nan")
            results[f"{key}_step_s"] = round(step_s, 4)
            results[f"{key}_tflops"] = round(achieved, 1)
            results[f"{key}_mfu"] = round(mfu, 4)
            line += f", step {step_s:.3f}s, {achieved:.1f} TFLOP/s, MFU {mfu:.1%}"
            del inputs
        print(line)
        for ranks in SP_DEGREES:
            traffic = ulysses_bytes_per_rank(full_config, tokens, batch, ranks, bytes_per_value)
            comm_s = traffic / (args.nvlink_gbps * 1e9)
            results[f"{key}_sp{ranks}_a2a_gb"] = round(traffic / 1e9, 2)
            text = f"  SP{ranks}: all-to-all {traffic / 1e9:.2f} GB/rank/step = {comm_s * 1e3:.1f} ms at {args.nvlink_gbps:g} GB/s"
            if step_s is not None:
                predicted = step_s / ranks + comm_s
                results[f"{key}_sp{ranks}_step_s"] = round(predicted, 4)
                results[f"{key}_sp{ranks}_speedup"] = round(step_s / predicted, 2)
                text += f"; step {predicted:.3f}s, speedup {step_s / predicted:.2f}x ({step_s / predicted / ranks:.0%})"
            print(text)
    print(" ".join(f"{k}={v}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
