"""The GPU session: everything a lent device should measure, in order of value, in one command that fits the
device's 540 s command limit (`scripts/gpu_session.sh` installs the carried wheels and calls this).

    python benchmarks/gpu_session.py --out $OUT                   # lent GPU: bf16, full-size LTX-2, ~8 min
    python benchmarks/gpu_session.py --device cpu --smoke --out /tmp/s   # CI: the same code on the tiny preset

Stages (each writes one JSON line to `OUT/results.jsonl` as soon as it ends, so a killed run keeps what it did):
  gemm         bf16 8192^3 matmul ceiling of the card (TFLOP/s)
  transformer  full-size LTX-2 transformer (18.9 B, random bf16, built on meta, initialised on the GPU) at the 480p
               and 720p 5 s token counts, CFG batch 2: step time, TFLOP/s, MFU against the datasheet peak and the
               measured GEMM ceiling, peak memory
  profile      one 480p step under torch.profiler: which attention kernel ran, attention / GEMM / other split of
               device time, the top kernels (`OUT/profile.txt`)
  clip         a real-size 720p 5 s clip through the project's own stages on one GPU: TextEncoderStage (Gemma 3
               12B) -> DenoiserStage (a few steps) -> DecoderStage (tiled VAE decode + audio) -> mux_mp4
  vae          the real-size video VAE decoding 720p x 121 frames: tiled vs whole clip, time and peak memory
  pytest       tests/test_gpu.py (the tiny model on CUDA vs CPU; SP2 and TP2 on ONE GPU over gloo)

Stages run in three worker processes (model: gemm, transformer, profile; clip: clip, vae; tests: pytest), each under
its own timeout, and inside a worker each stage under an alarm: a stage that fails or runs out of time is recorded
as such and the rest go on. The last thing printed is a short table (also `OUT/summary.md`).

`--smoke` runs every stage on the tiny preset at small sizes (CPU, float32, seconds): the CI test
`tests/test_gpu_session.py` runs it so the script cannot rot between device loans.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = "results.jsonl"
# (stage, cap on a GPU, cap in a smoke run) in seconds; workers group the stages that share a built model
STAGE_CAPS: dict[str, tuple[float, float]] = {
    "gemm": (30, 30),
    "transformer": (150, 90),
    "profile": (60, 60),
    "clip": (150, 150),
    "vae": (90, 90),
    "pytest": (110, 150),
}
WORKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("gemm", "transformer", "profile")),
    ("clip", ("clip", "vae")),
    ("tests", ("pytest",)),
)
WORKER_STARTUP_S = 20.0  # python + torch + diffusers import and CUDA context, per worker


class StageTimeout(TimeoutError):
    pass


@dataclass
class Context:
    """What every stage sees: the device and dtype, smoke or full size, where results go, and what earlier
    stages of the same worker built (`cache`) or measured (`results`)."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    smoke: bool
    out: Path
    layers: int | None
    cache: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    @contextlib.contextmanager
    def timed(self, into: dict[str, Any], key: str) -> Iterator[None]:
        self.sync()
        begin = time.perf_counter()
        yield
        self.sync()
        into[key] = round(time.perf_counter() - begin, 4)


# -- stages -------------------------------------------------------------------------------------------------------


def stage_gemm(ctx: Context) -> dict[str, Any]:
    """The card's matmul ceiling in the session's dtype: mean of 10 products after 3 warm-ups."""
    import torch

    n = 512 if ctx.smoke else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    for _ in range(3):
        a @ b
    iters = 10
    out: dict[str, Any] = {}
    with ctx.timed(out, "seconds"):
        for _ in range(iters):
            a @ b
    seconds = out["seconds"] / iters
    return {"n": n, "dtype": str(ctx.dtype), "tflops": round(2 * n**3 / seconds / 1e12, 4)}


def _transformer(ctx: Context):
    """The transformer of this worker, built once: full size (random, on the device) or the tiny preset's."""
    if "transformer" not in ctx.cache:
        from diffusers import LTX2VideoTransformer3DModel

        from imagine.models.full_size import build_on_device, transformer_config

        if ctx.smoke:
            from imagine.models.tiny import TRANSFORMER_CONFIG

            config = dict(TRANSFORMER_CONFIG)
        else:
            config = transformer_config(ctx.layers)
        began = time.perf_counter()
        ctx.cache["transformer"] = build_on_device(LTX2VideoTransformer3DModel, config, ctx.device, ctx.dtype)
        ctx.sync()
        ctx.cache["transformer_build_s"] = round(time.perf_counter() - began, 2)
        ctx.cache["transformer_config"] = config
    return ctx.cache["transformer"], ctx.cache["transformer_config"]


def _full_layers() -> int:
    from imagine.models.full_size import transformer_config

    return transformer_config()["num_layers"]


def _resolutions(ctx: Context) -> list[tuple[str, float]]:
    return [("480p", 2.0)] if ctx.smoke else [("480p", 5.0), ("720p", 5.0)]


def stage_transformer(ctx: Context) -> dict[str, Any]:
    """One denoising step (a CFG-batch forward) at each resolution: median of `iters` after `warmup`."""
    import torch
    from gpu_denoiser import clip_tokens, make_inputs, peak_tflops, step_flops, time_step

    model, config = _transformer(ctx)
    full_depth = config["num_layers"] if ctx.smoke or ctx.layers is None else _full_layers()
    depth_scale = full_depth / config["num_layers"]
    params = sum(p.numel() for p in model.parameters())
    peak, device_name = peak_tflops(ctx.device, None)
    ceiling = ctx.results.get("gemm", {}).get("tflops")
    result: dict[str, Any] = {
        "device": device_name,
        "params_b": round(params / 1e9, 3),
        "layers_timed": config["num_layers"],
        "build_s": ctx.cache["transformer_build_s"],
        "datasheet_tflops": peak,
        "gemm_ceiling_tflops": ceiling,
    }
    text_tokens = 64 if ctx.smoke else 1024
    warmup, iters = (1, 2) if ctx.smoke else (2, 3)
    for resolution, duration in _resolutions(ctx):
        tokens = clip_tokens(resolution, duration, 24.0, "16:9", text_tokens)
        inputs = make_inputs(config, tokens, 2, ctx.device, ctx.dtype)
        ctx.reset_peak()
        times = time_step(model, inputs, warmup, iters, ctx.device)
        step_s = sorted(times)[len(times) // 2] * depth_scale
        flops = step_flops({**config, "num_layers": full_depth}, tokens, 2)
        achieved = flops / step_s / 1e12
        row = {
            "video_tokens": tokens.video,
            "step_s": round(step_s, 4),
            "tflop_per_step": round(flops / 1e12, 6),
            "tflops": round(achieved, 3),
            "mfu_datasheet": round(achieved / peak, 4) if peak else None,
            "mfu_gemm_ceiling": round(achieved / ceiling, 4) if ceiling else None,
            "peak_mem_gib": ctx.peak_gib(),
        }
        result[resolution] = row
        ctx.cache[f"inputs_{resolution}"] = inputs
        print(f"  transformer {resolution}: {row}", flush=True)
        del inputs
        if resolution != "480p":
            ctx.cache.pop(f"inputs_{resolution}", None)
    if ctx.cuda:
        torch.cuda.empty_cache()
    return result


ATTENTION_MARKERS = ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "attn", "softmax")
GEMM_MARKERS = ("gemm", "cutlass", "xmma", "cublas", "nvjet", "wgmma", "matmul", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::baddbmm", "sm90_", "sm80_")


def classify_kernel(name: str) -> str:
    """attention / gemm / other for a CUDA kernel or (on CPU) an aten op name."""
    lower = name.lower()
    if any(marker in lower for marker in ATTENTION_MARKERS):
        return "attention"
    if any(marker in lower for marker in GEMM_MARKERS):
        return "gemm"
    return "other"


def attention_backend(names: list[str]) -> str:
    """Which scaled-dot-product attention implementation ran, from the kernel (or op) names of a step."""
    lower = " ".join(names).lower()
    for marker, backend in (("for_cpu", "sdpa (cpu kernel)"), ("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "mem_efficient (cutlass fmha)"),
                            ("efficient_attention", "mem_efficient"), ("_scaled_dot_product_attention_math", "math")):
        if marker in lower:
            return backend
    return "unknown"


def stage_profile(ctx: Context) -> dict[str, Any]:
    """One 480p step under torch.profiler: device time by kind of kernel (self time, so nothing counts twice)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, config = _transformer(ctx)
    inputs = ctx.cache.get("inputs_480p")
    if inputs is None:
        from gpu_denoiser import clip_tokens, make_inputs

        tokens = clip_tokens("480p", _resolutions(ctx)[0][1], 24.0, "16:9", 64 if ctx.smoke else 1024)
        inputs = make_inputs(config, tokens, 2, ctx.device, ctx.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch.inference_mode():
        model(**inputs)  # warm
        ctx.sync()
        with profile(activities=activities) as prof:
            model(**inputs)
            ctx.sync()
    events = prof.key_averages()
    by_kind = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    rows = []
    for event in events:
        if ctx.cuda:
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = getattr(event, "self_cuda_time_total", 0.0)
            if getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
                continue  # CPU-side op records: their device time is the kernels'
        else:
            us = event.self_cpu_time_total
            if not event.key.startswith("aten::"):
                continue
        if us <= 0:
            continue
        kind = classify_kernel(event.key)
        by_kind[kind] += us
        rows.append((us, kind, event.key))
    total = sum(by_kind.values()) or 1.0
    rows.sort(reverse=True)
    (ctx.out / "profile.txt").write_text(
        "\n".join(f"{us / 1e3:10.2f} ms  {kind:9s}  {name}" for us, kind, name in rows[:60]) + "\n"
    )
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    return {
        "total_ms": round(total / 1e3, 2),
        "split": {kind: round(us / total, 4) for kind, us in by_kind.items()},
        "attention_kernel": attention_backend([name for _, kind, name in rows if kind == "attention"]),
        "attention_processors": processors,
        "top": [[round(us / 1e3, 2), kind, name[:120]] for us, kind, name in rows[:8]],
    }


def _components(ctx: Context) -> dict[str, Any]:
    """Every LTX-2 component: full size and random on the device, or the tiny preset through `load_components` (the
    path real weights take)."""
    if "components" not in ctx.cache:
        began = time.perf_counter()
        if ctx.smoke:
            from imagine.models.loading import load_components
            from imagine.models.tiny import ensure_tiny_ltx2

            home = Path(tempfile.mkdtemp(prefix="imagine-gpu-session-"))
            names = ["tokenizer", "text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder",
                     "scheduler"]
            ctx.cache["components"] = load_components(ensure_tiny_ltx2(home), names, str(ctx.device), ctx.dtype)
        else:
            from imagine.models.full_size import build_full_ltx2

            ctx.cache["components"] = build_full_ltx2(ctx.device, ctx.dtype, transformer_layers=ctx.layers)
        ctx.sync()
        ctx.cache["components_build_s"] = round(time.perf_counter() - began, 2)
    return ctx.cache["components"]


def stage_clip(ctx: Context) -> dict[str, Any]:
    """A whole clip through the served stage classes, one process, one device: per-stage times and peak memory."""
    from imagine.config import TilingConfig
    from imagine.pipeline.decode import DecoderStage
    from imagine.pipeline.denoise import DenoiserStage
    from imagine.pipeline.encode import TextEncoderStage
    from imagine.pipeline.sizing import plan_video
    from imagine.pipeline.types import GenerationSpec

    components = _components(ctx)
    resolution, duration = ("480p", 2.0) if ctx.smoke else ("720p", 5.0)
    steps = 2
    plan = plan_video(duration, resolution, "16:9", 24.0)
    result: dict[str, Any] = {
        "resolution": resolution,
        "size": f"{plan.width}x{plan.height}x{plan.num_frames}",
        "steps": steps,
        "build_s": ctx.cache["components_build_s"],
        "seconds": {},
        "peak_mem_gib": {},
    }
    seconds, peaks = result["seconds"], result["peak_mem_gib"]

    ctx.reset_peak()
    encoder = TextEncoderStage(components, ctx.device, ctx.dtype, max_sequence_length=64 if ctx.smoke else 1024)
    with ctx.timed(seconds, "encode"):
        embeddings = encoder("a lighthouse on a cliff at dusk, waves crashing, gulls calling", "", True)
    peaks["encode"] = ctx.peak_gib()

    ctx.reset_peak()
    spec = GenerationSpec(prompt="", width=plan.width, height=plan.height, num_frames=plan.num_frames,
                          num_inference_steps=steps, seed=0, fps=24.0, guidance_scale=3.0)
    with ctx.timed(seconds, "denoise"):
        latents = DenoiserStage(components, ctx.device, ctx.dtype)(spec, embeddings)
    seconds["denoise_per_step"] = round(seconds["denoise"] / steps, 4)
    peaks["denoise"] = ctx.peak_gib()

    ctx.reset_peak()
    decoder = DecoderStage(components, ctx.device, ctx.dtype, tiling=TilingConfig())
    result["decode_tiled"] = decoder.needs_tiling(latents.video.shape)
    with ctx.timed(seconds, "decode"):
        media = decoder(latents)
    peaks["decode"] = ctx.peak_gib()
    ctx.cache["latent_shape"] = tuple(latents.video.shape)

    try:
        from imagine.pipeline.media import mux_mp4
    except ImportError as e:  # PyAV not carried: everything before the mux is still measured
        result["mux"] = f"skipped: {e}"
        return result
    with tempfile.TemporaryDirectory(prefix="imagine-gpu-session-") as tmp:
        path = Path(tmp) / "clip.mp4"
        with ctx.timed(seconds, "mux"):
            info = mux_mp4(media, path, crf=18, preset="veryfast")
        result["mp4"] = {"bytes": path.stat().st_size, "width": info.width, "height": info.height,
                         "num_frames": info.num_frames, "has_audio": info.has_audio,
                         "video_codec": info.video_codec, "audio_codec": info.audio_codec}
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "denoise_per_step"), 4)
    return result


def stage_vae(ctx: Context) -> dict[str, Any]:
    """The video VAE on a 720p x 121-frame clip's latents: tiled (the decoder stage's default) vs the whole clip
    at once, side by side (the whole-clip decode may not fit: an out-of-memory is recorded, not raised)."""
    import torch

    from imagine.config import TilingConfig
    from imagine.pipeline.decode import decode_tiled
    from imagine.pipeline.sizing import plan_video

    vae = _components(ctx)["vae"]
    resolution, duration = ("480p", 2.0) if ctx.smoke else ("720p", 5.0)
    plan = plan_video(duration, resolution, "16:9", 24.0)
    spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    shape = (1, vae.config.latent_channels, (plan.num_frames - 1) // temporal + 1, plan.height // spatial,
             plan.width // spatial)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    latents = torch.randn(shape, generator=generator, device=ctx.device, dtype=ctx.dtype)
    result: dict[str, Any] = {"latents": list(shape), "frames": plan.num_frames, "size": f"{plan.width}x{plan.height}"}
    for mode in ("tiled", "whole"):
        ctx.reset_peak()
        row: dict[str, Any] = {}
        try:
            with torch.inference_mode(), ctx.timed(row, "seconds"):
                if mode == "tiled":
                    decode_tiled(vae, latents, None, TilingConfig())
                else:
                    vae.decode(latents, None, return_dict=False)
            row["peak_mem_gib"] = ctx.peak_gib()
        except torch.OutOfMemoryError as e:
            row = {"error": f"out of memory: {str(e).splitlines()[0][:200]}", "peak_mem_gib": ctx.peak_gib()}
        result[mode] = row
        if ctx.cuda:
            torch.cuda.empty_cache()
    if "seconds" in result["tiled"] and "seconds" in result["whole"]:
        result["tiled_over_whole_time"] = round(result["tiled"]["seconds"] / result["whole"]["seconds"], 3)
    return result


def stage_pytest(ctx: Context) -> dict[str, Any]:
    """tests/test_gpu.py in a subprocess (log: `OUT/pytest.log`); counts from pytest's JUnit report."""
    import xml.etree.ElementTree as ET

    budget = max(10, int(ctx.cache.get("stage_budget_s", 100)) - 5)
    junit = Path(tempfile.mkdtemp(prefix="imagine-gpu-session-")) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "addopts="]
    if ctx.smoke:  # the CPU variant already runs in the CI suite itself; here only collection + the skips count
        command += ["-k", "not cpu"]
    log = ctx.out / "pytest.log"
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=budget, check=False)
    result: dict[str, Any] = {"returncode": proc.returncode}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result.update(counts)
        result["cases"] = {
            case.get("name"): ("failed" if case.find("failure") is not None or case.find("error") is not None
                               else "skipped" if case.find("skipped") is not None else "passed")
            for case in suite.iter("testcase")
        }
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {proc.returncode}: {result.get('cases')}; see pytest.log")
    return result


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "gemm": stage_gemm,
    "transformer": stage_transformer,
    "profile": stage_profile,
    "clip": stage_clip,
    "vae": stage_vae,
    "pytest": stage_pytest,
}


# -- worker: stages in one process, each under an alarm -------------------------------------------------------------


def _alarm(signum, frame):  # noqa: ARG001
    raise StageTimeout("stage ran out of time")


def record(out: Path, row: dict[str, Any]) -> None:
    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_worker(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    ctx = Context(device, dtype, args.smoke, out, args.layers)
    deadline = time.monotonic() + args.worker_budget
    signal.signal(signal.SIGALRM, _alarm)
    for name in args.stages.split(","):
        cap = STAGE_CAPS[name][1 if args.smoke else 0]
        budget = min(cap, deadline - time.monotonic())
        row: dict[str, Any] = {"stage": name, "device": str(device), "dtype": args.dtype, "smoke": args.smoke}
        if budget < 5:
            row.update(ok=False, error="no time left in this worker's budget")
            record(out, row)
            continue
        ctx.cache["stage_budget_s"] = budget
        print(f"[{name}] up to {budget:.0f}s", flush=True)
        began = time.perf_counter()
        signal.alarm(max(1, int(budget)))
        try:
            result = STAGES[name](ctx)
            row.update(ok=True, result=result)
            ctx.results[name] = result
        except BaseException as e:  # noqa: BLE001 -- record every failure, go on with the next stage
            if isinstance(e, KeyboardInterrupt):
                raise
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - began, 2)
        record(out, row)
        print(f"[{name}] {'ok' if row['ok'] else 'FAILED: ' + row['error']} in {row['seconds']}s", flush=True)
    return 0


# -- orchestrator -----------------------------------------------------------------------------------------------------


def read_results(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figures(row: dict[str, Any]) -> str:
    """The one line of a stage's result worth reading first."""
    if not row.get("ok"):
        return row.get("error", "failed")[:140]
    r = row["result"]
    stage = row["stage"]
    if stage == "gemm":
        return f"{r['tflops']} TFLOP/s ({r['n']}^3 {r['dtype']})"
    if stage == "transformer":
        parts = []
        for resolution in ("480p", "720p"):
            if resolution in r:
                x = r[resolution]
                mfu = f", MFU {x['mfu_datasheet']:.1%}" if x.get("mfu_datasheet") else ""
                ceil = f" ({x['mfu_gemm_ceiling']:.1%} of GEMM)" if x.get("mfu_gemm_ceiling") else ""
                mem = f", {x['peak_mem_gib']} GiB" if x.get("peak_mem_gib") is not None else ""
                parts.append(f"{resolution} {x['step_s']}s/step {x['tflops']} TFLOP/s{mfu}{ceil}{mem}")
        return "; ".join(parts)
    if stage == "profile":
        split = ", ".join(f"{k} {v:.0%}" for k, v in r["split"].items())
        return f"{r['attention_kernel']}; {split}"
    if stage == "clip":
        s = r["seconds"]
        return f"{r['size']}: " + ", ".join(f"{k} {v}s" for k, v in s.items())
    if stage == "vae":
        return "; ".join(
            f"{mode} " + (f"{r[mode]['seconds']}s" + (f", {r[mode]['peak_mem_gib']} GiB" if r[mode].get("peak_mem_gib")
                                                       is not None else "") if "seconds" in r[mode]
                          else r[mode]["error"][:60])
            for mode in ("tiled", "whole")
        )
    if stage == "pytest":
        return f"{r.get('passed', '?')} passed, {r.get('failures', 0) + r.get('errors', 0)} failed, " \
               f"{r.get('skipped', '?')} skipped"
    return ""


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | ok | s | figures |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['stage']} | {'yes' if row.get('ok') else 'NO'} | {row.get('seconds', '')} | "
                     f"{_figures(row)} |")
    return "\n".join(lines)


def run_session(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)
    began = time.monotonic()
    deadline = began + args.budget
    cap_index = 1 if args.smoke else 0
    for worker, stages in WORKERS:
        stages = tuple(s for s in stages if s in args.only)
        if not stages:
            continue
        remaining = deadline - time.monotonic()
        wanted = WORKER_STARTUP_S + sum(STAGE_CAPS[s][cap_index] for s in stages)
        budget = min(wanted, remaining)
        if budget < WORKER_STARTUP_S + 5:
            for stage in stages:
                record(out, {"stage": stage, "ok": False, "error": "session budget spent before this stage"})
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--stages", ",".join(stages),
                   "--worker-budget", str(budget - WORKER_STARTUP_S / 2), "--out", str(out),
                   "--device", args.device, "--dtype", args.dtype]
        if args.smoke:
            command.append("--smoke")
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        print(f"== worker {worker}: {', '.join(stages)} (up to {budget:.0f}s)", flush=True)
        try:
            proc = subprocess.run(command, cwd=ROOT, timeout=budget, check=False)
            failed = f"worker exited with {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            failed = f"worker killed at its {budget:.0f}s timeout"
        done = {row["stage"] for row in read_results(out)}
        for stage in stages:
            if stage not in done:  # the stage in flight when the worker died, and any after it
                record(out, {"stage": stage, "ok": False, "error": failed or "no result recorded"})
    rows = read_results(out)
    table = summary_table(rows)
    took = time.monotonic() - began
    text = f"# GPU session ({args.device}, {args.dtype}{', smoke' if args.smoke else ''}): {took:.0f}s\n\n{table}\n"
    (out / "summary.md").write_text(text)
    print("\n" + text, flush=True)
    return 0 if rows and all(row.get("ok") for row in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-session-out", help="results folder ($OUT)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, small sizes: checks the code, not the card")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for the whole session")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks to build (default all 48)")
    parser.add_argument("--only", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    unknown = set(args.only.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--only: unknown stages {sorted(unknown)}; stages are {list(STAGES)}")
    args.only = tuple(args.only.split(","))
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if not args.worker and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_worker(args) if args.worker else run_session(args)


if __name__ == "__main__":
    sys.exit(main())
