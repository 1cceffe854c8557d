"""Ray Serve hosts of the edit path's stages around the `editor` denoiser pool (a `DenoiserServer` whose preset is
Wan VACE): `GrounderServer` (instruction -> per-frame masks, with GroundingDINO + SAM2, stored as a work artifact)
and `EditCodecServer` (prompt + masked-source conditioning before sampling; VAE decode, composite onto the source
and re-mux with the source's audio after). Plain classes; `build_app` applies `serve.deployment`. No model math."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagine.config import AppConfig
from imagine.editing.instructions import EditInstruction, Place
from imagine.jobs import JobRecord
from imagine.pipeline.masks import boxes_to_masks
from imagine.pipeline.media import read_video, remux_with_source_audio
from imagine.pipeline.stills import store_stills
from imagine.pipeline.vace import EditSpec, VaceConditioning, VaceDecoderStage, VaceEncoderStage, VaceLatents
from imagine.serving.samplers import component_config, served_edit_preset, served_grounding_preset
from imagine.serving.stages import StageHost, video_result
from imagine.storage import ArtifactNotFound
from imagine.storage.keys import grounded_masks_key

logger = logging.getLogger(__name__)


def needs_grounding(job: JobRecord) -> bool:
    """Whether the edit's masks come from its words (no explicit boxes or mask video)."""
    return job.params.mask is None and job.params.mask_key is None


def parsed_instruction(job: JobRecord) -> EditInstruction:
    """The instruction the ingress parsed, as grounding takes it (the stored typed copy; no second parse)."""
    stored = job.params.instruction
    if stored.op == "inpaint" or stored.target is None or stored.language is None or stored.text is None:
        raise ValueError(f"job {job.id} has no parsed instruction to ground (op {stored.op!r}): it needs a mask")
    place = None
    if stored.place is not None:
        place = Place(stored.place.phrase, stored.place.kind, tuple(stored.place.anchors))
    return EditInstruction(stored.op, stored.target, stored.language, stored.text, stored.replacement, place)


def save_masks(artifacts: Any, key: str, masks: torch.Tensor) -> None:
    """(F, H, W) bool masks as a bit-packed .npz work artifact (a 25 x 480 x 480 clip: ~0.7 MB before zlib)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, shape=np.array(masks.shape), bits=np.packbits(masks.cpu().numpy().astype(bool)))
    artifacts.put_bytes(key, buf.getvalue())


def load_masks(artifacts: Any, key: str) -> torch.Tensor:
    with np.load(io.BytesIO(artifacts.read_bytes(key))) as data:
        shape = tuple(int(n) for n in data["shape"])
        bits = np.unpackbits(data["bits"], count=int(np.prod(shape)))
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def _read_source(artifacts: Any, key: str, tmp: Path) -> Any:
    path = tmp / "source.mp4"
    path.write_bytes(artifacts.read_bytes(key))
    return read_video(path)


def job_masks(job: JobRecord, artifacts: Any, tmp: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An edit's masks as (F, H, W) bool for a source of decoded `shape` (F, H, W): the request's boxes (for every
    frame, or per frame), its mask video, or the grounder's masks (a work artifact of this job)."""
    params = job.params
    f, h, w = shape
    if params.mask is not None and params.mask.boxes is not None:
        return boxes_to_masks(params.mask.boxes, f, h, w)
    if params.mask is not None and params.mask.frames is not None:
        return boxes_to_masks([params.mask.frames.get(i, []) for i in range(f)], f, h, w)
    if params.mask_key is not None:
        path = tmp / "mask.mp4"
        path.write_bytes(artifacts.read_bytes(params.mask_key))
        return read_video(path).frames.float().mean(dim=-1) > 127.5
    masks = load_masks(artifacts, grounded_masks_key(job.tenant, job.id))
    if tuple(masks.shape) != shape:
        raise RuntimeError(f"job {job.id}'s grounded masks are {tuple(masks.shape)}, its source is {shape}")
    return masks


def has_grounded_masks(artifacts: Any, job: JobRecord) -> bool:
    try:
        artifacts.size(grounded_masks_key(job.tenant, job.id))
    except ArtifactNotFound:
        return False
    return True


class GrounderServer(StageHost):
    """Instruction -> masks: the target found on key frames by the detector, propagated by SAM2 video; for
    "add", the place phrase's region. The masks are stored as a work artifact of the job (read by the codec
    before and after sampling, and kept across a preemption), not passed around."""

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.grounding = self.on_torch_thread(self._load_grounding)

    def _load_grounding(self) -> Any:
        from imagine.editing.grounding import load_grounding_stage

        preset = served_grounding_preset(self.config)
        if preset is None:
            raise ValueError("GrounderServer needs edits enabled (edit.enabled)")
        return load_grounding_stage(
            preset, self.config.home, self.device, self.dtype, s3_endpoint_url=self.config.model.s3_endpoint_url
        )

    async def ground(self, job: JobRecord) -> float:
        """Ground `job`'s instruction, store its masks; returns the seconds it took."""
        return await self.run_on_torch_thread(self._ground, job)

    def _ground(self, job: JobRecord) -> float:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="imagine-ground-") as tmp:
                source = _read_source(self.artifacts, job.params.source_key, Path(tmp))
            # no dilation here: the codec grows every mask (grounded or explicit) by `edit.dilate_px` itself
            masks, info = self.grounding.masks_for(parsed_instruction(job), source.frames, dilate_px=0)
            save_masks(self.artifacts, grounded_masks_key(job.tenant, job.id), masks.bool())
        finally:
            elapsed = time.perf_counter() - started
            self.meter(job, "grounder", elapsed)  # a failed attempt used the device too
        logger.info("job %s grounded %r in %.2fs: %s", job.id, job.params.instruction.target, elapsed,
                    {k: v for k, v in info.items() if k in ("source", "phrase", "coverage")})
        return elapsed


class EditCodecServer(StageHost):
    """The edit pool's encode and decode stages in one replica (they share the VAE): `encode` conditions a
    repaint on the prompt and the masked source; `decode` turns the sampled latents into frames composited over
    the source, muxes them with the source's audio packets (copied, not re-encoded) and stores the MP4."""

    def __init__(self, config: AppConfig):
        preset = served_edit_preset(config)
        if preset is None:
            raise ValueError("EditCodecServer needs edits enabled (edit.enabled)")
        components = sorted(set(VaceEncoderStage.components) | set(VaceDecoderStage.components))
        super().__init__(config, preset, components)
        cfg = config.edit
        patch_size = component_config(config, preset, "transformer")["patch_size"]
        self.encoder = VaceEncoderStage(
            self.loaded, patch_size, self.device, self.dtype, dilation_px=cfg.dilate_px, max_pixels=cfg.max_work_pixels
        )
        self.decoder = VaceDecoderStage(
            self.loaded, self.device, self.dtype, dilation_px=cfg.dilate_px, feather_px=cfg.feather_px
        )

    def _source_and_masks(self, job: JobRecord, tmp: Path) -> tuple[Any, torch.Tensor]:
        """The decoded source (its file under `tmp`, for the audio remux) and the edit's masks at its size."""
        source = _read_source(self.artifacts, job.params.source_key, tmp)
        return source, job_masks(job, self.artifacts, tmp, tuple(source.frames.shape[:3]))

    async def encode(self, job: JobRecord, spec: EditSpec) -> VaceConditioning:
        return await self.run_on_torch_thread(self._encode, job, spec)

    def _encode(self, job: JobRecord, spec: EditSpec) -> VaceConditioning:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="imagine-edit-") as tmp_dir:
                source, masks = self._source_and_masks(job, Path(tmp_dir))
            # on the CPU: a parallel editor replica holds no GPU itself (its ranks do)
            return self.encoder(source.frames, masks, spec).to_cpu()
        finally:
            self.meter(job, "edit_encoder", time.perf_counter() - started)

    async def decode(self, job: JobRecord, sampled: VaceLatents, artifact_key: str) -> dict[str, Any]:
        return await self.run_on_torch_thread(self._decode, job, sampled, artifact_key)

    def _decode(self, job: JobRecord, sampled: VaceLatents, artifact_key: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="imagine-edit-") as tmp_dir:
                tmp = Path(tmp_dir)
                source, masks = self._source_and_masks(job, tmp)
                frames = self.decoder(sampled, source.frames, masks)
                decoded = time.perf_counter()
                out = tmp / "edited.mp4"
                info = remux_with_source_audio(
                    frames, source.frame_rate, source.source, out, crf=self.config.edit.mp4_crf,
                    preset=self.config.mp4_preset,
                )
                size = self.artifacts.put_file(artifact_key, out)
                stills = store_stills(self.artifacts, artifact_key, frames)
        finally:
            self.meter(job, "edit_decoder", time.perf_counter() - started)
        stage_seconds = {"decode": decoded - started, "mux_store": time.perf_counter() - decoded}
        return video_result(artifact_key, size, info, stage_seconds, artifact_keys=stills,
                            mask_fraction=float(masks.float().mean()))
