"""Ray Serve hosts of the edit path: `GrounderServer` (instruction -> per-frame masks, with GroundingDINO + SAM2)
and `EditorServer` (masked repaint with Wan VACE, composite onto the source, re-mux with the source's audio,
store). Plain classes; `build_app` applies `serve.deployment`. No model math here."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from imagine.config import AppConfig
from imagine.jobs import JobRecord, StepSignal
from imagine.models.loading import load_components, resolve_model_dir
from imagine.serving.stages import _StageHost, served_edit_preset
from imagine.storage import open_artifact_store

logger = logging.getLogger(__name__)


class _EditCancelled(Exception):
    """Raised from the repaint loop's step hook when the job was cancelled (or its attempt is stale)."""


def _read_source(artifacts: Any, key: str, tmp: Path) -> Any:
    from imagine.pipeline.media import read_video

    path = tmp / "source.mp4"
    path.write_bytes(artifacts.read_bytes(key))
    return read_video(path), path


def explicit_masks(job: JobRecord, artifacts: Any, tmp: Path, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The request's own mask as (F, H, W) bool for a source of decoded `shape` (F, H, W): boxes for every frame,
    per-frame boxes, or a mask video."""
    from imagine.pipeline.grounding import boxes_to_masks
    from imagine.pipeline.media import read_video

    p = job.params
    f, h, w = shape
    mask = p.get("mask") or {}
    if "boxes" in mask:
        return boxes_to_masks(mask["boxes"], f, h, w)
    if "frames" in mask:
        per_frame = [mask["frames"].get(str(i), []) for i in range(f)]
        return boxes_to_masks(per_frame, f, h, w)
    if p.get("mask_key"):
        path = tmp / "mask.mp4"
        path.write_bytes(artifacts.read_bytes(p["mask_key"]))
        video = read_video(path)
        return video.frames.float().mean(dim=-1) > 127.5
    return None


class GrounderServer(_StageHost):
    """Instruction -> masks: the target found on key frames by the detector, propagated by SAM2 video; for
    "add", the place phrase's region. Returns (masks (F, H, W) bool, seconds)."""

    def __init__(self, config: AppConfig):
        self.components = []  # grounding models load below from their own source, not the generation preset
        super().__init__(config)
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))
        self.grounding = self._torch_thread.submit(self._load_grounding).result()

    def _load_grounding(self) -> Any:
        from imagine.models.tiny_grounding import ensure_tiny_grounding
        from imagine.pipeline.grounding import GroundingStage, load_grounding_components

        source = self.config.edit.grounding_source
        builtin = source == "builtin:tiny-grounding"
        model_dir = ensure_tiny_grounding(self.config.home) if builtin else Path(source).expanduser()
        components = load_grounding_components(model_dir, self.device, self.dtype)
        # random-init detectors score nothing above a threshold: the builtin tiny models take their best box, so
        # the word path runs end to end on the embedded default (its masks are as meaningless as its video)
        return GroundingStage(components, self.device, self.dtype, top1_fallback=builtin)

    async def ground(self, job: JobRecord) -> dict[str, Any]:
        """{"masks": (F, H, W) bool on the CPU, "seconds": wall time}; the scheduler hands the response to the
        editor unawaited, so the masks travel grounder -> editor only."""
        return await self.run_on_torch_thread(self._ground, job)

    def _ground(self, job: JobRecord) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="imagine-ground-") as tmp:
                source, _ = _read_source(self.artifacts, job.params["source_key"], Path(tmp))
            # the ingress parsed the same text already (422 otherwise); parsing again is cheap and exact
            # no dilation here: the editor grows every mask (grounded or explicit) by `edit.dilate_px` itself
            masks, info = self.grounding.masks_for(job.params["prompt"], source.frames, dilate_px=0)
        finally:
            elapsed = time.perf_counter() - started
            self.meter(job, "grounder", elapsed)  # a failed attempt used the device too
        logger.info("job %s grounded %r in %.2fs: %s", job.id, job.params["instruction"].get("target"), elapsed,
                    {k: v for k, v in info.items() if k in ("source", "phrase", "coverage")})
        return {"masks": masks.bool().cpu(), "seconds": elapsed}


class EditorServer(_StageHost):
    """Masked video diffusion (Wan VACE) over the source, composited so unmasked pixels are the source's, muxed
    with the source's audio packets (copied, not re-encoded) and stored. Cancellation is checked every step."""

    def __init__(self, config: AppConfig):
        self.components = []
        super().__init__(config)
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))
        self.stage = self._torch_thread.submit(self._load_inpaint).result()

    def _load_inpaint(self) -> Any:
        from imagine.pipeline.edit import InpaintStage

        preset = served_edit_preset(self.config)
        model_dir = resolve_model_dir(preset, self.config.home, endpoint_url=self.config.model.s3_endpoint_url)
        loaded = load_components(model_dir, InpaintStage.components, self.device, self.dtype)
        cfg = self.config.edit
        return InpaintStage(
            loaded, self.device, self.dtype, dilation_px=cfg.dilate_px, feather_px=cfg.feather_px,
            max_pixels=cfg.max_work_pixels,
        )

    async def edit(self, job: JobRecord, grounded: dict[str, Any] | None, artifact_key: str) -> dict[str, Any]:
        """Repaint `grounded["masks"]` (the grounder's answer), or the request's explicit mask when None."""
        return await self.run_on_torch_thread(self._edit, job, grounded, artifact_key)

    def _edit(self, job: JobRecord, grounded: dict[str, Any] | None, artifact_key: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return self._repaint(job, grounded, artifact_key, started)
        finally:
            self.meter(job, "editor", time.perf_counter() - started)  # done, cancelled or failed: metered once

    def _repaint(self, job: JobRecord, grounded: dict[str, Any] | None, artifact_key: str, started: float) -> dict[str, Any]:
        from imagine.pipeline.edit import edit_prompt
        from imagine.pipeline.media import remux_with_source_audio

        p = job.params
        with tempfile.TemporaryDirectory(prefix="imagine-edit-") as tmp_dir:
            tmp = Path(tmp_dir)
            source, source_path = _read_source(self.artifacts, p["source_key"], tmp)
            decoded = time.perf_counter()
            if grounded is None:
                masks = explicit_masks(job, self.artifacts, tmp, tuple(source.frames.shape[:3]))
            else:
                masks = grounded["masks"]
            text = edit_prompt(p["instruction"], p["prompt"], p.get("negative_prompt") or "")

            def step_hook(done: int, steps: int) -> None:
                signal = self.store.report_progress(job.id, job.attempt, 0.95 * done / steps)
                if signal == StepSignal.CANCEL:
                    raise _EditCancelled()

            if self.store.report_progress(job.id, job.attempt, 0.0) == StepSignal.CANCEL:
                return {"status": "cancelled"}
            try:
                frames = self.stage(
                    source.frames, masks, text.prompt, text.negative_prompt, p["seed"], p["num_inference_steps"],
                    p["guidance_scale"], step_hook=step_hook,
                )
            except _EditCancelled:
                return {"status": "cancelled"}
            inpainted = time.perf_counter()
            out = tmp / "edited.mp4"
            info = remux_with_source_audio(
                frames, source.frame_rate, source_path, out, crf=self.config.edit.mp4_crf, preset=self.config.mp4_preset
            )
            size = self.artifacts.put_file(artifact_key, out)
        return {
            "status": "done",
            "stage_seconds": {
                "grounding": grounded["seconds"] if grounded is not None else 0.0,
                "decode_source": decoded - started,
                "inpaint": inpainted - decoded,
                "mux_store": time.perf_counter() - inpainted,
            },
            "artifact_key": artifact_key,
            "bytes": size,
            "duration_s": info.duration_s,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "num_frames": info.num_frames,
            "has_audio": info.has_audio,
            "mask_fraction": float(masks.float().mean()),
        }
