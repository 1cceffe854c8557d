"""Grounding for the edit path: turns an `EditInstruction` and a clip into per-frame boolean masks of what to
repaint (white = regenerate), for the masked video model.

Two routes (explicit user boxes or mask videos need no grounding: `imagine.pipeline.masks.boxes_to_masks` in the
edit codec): "add" edits, whose mask is the place's region (no models unless the place is relative to other
objects); "remove"/"replace" edits, which run a text-conditioned
detector (GroundingDINO) on a few key frames and track the detected boxes through the clip with SAM2's video
model. Masks are then dilated (inpainting needs a margin around the object) and smoothed in time (a mask that
drops out for one frame leaves a one-frame ghost), with `imagine.pipeline.masks`. Plain Python/torch, no Ray.

The models are a `ModelPreset` of family ``grounding`` (``tiny-grounding``: random-init, built in code), resolved
and loaded by `imagine.models.loading` like every other model: `load_grounding_stage` does both.

Frames are ``(F, H, W, 3)`` arrays/tensors, uint8 as decoded (`read_video`) or float in [0, 1] (the contract of
`imagine.pipeline.masks.check_frames`); the models see them resized internally (the detector by its image
processor, SAM2 squashed to its square input), and every box and mask is returned in the original frame's pixels.
SAM2's own processors need torchvision, which this project cannot install, so its resize + ImageNet normalisation
is done here and `Sam2VideoInferenceSession` is driven directly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_transforms import center_to_corners_format
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from imagine.editing.instructions import (
    Box,
    EditInstruction,
    Place,
    detector_phrase,
    parse_instruction,
    place_to_region,
)
from imagine.models.loading import load_components, resolve_model_dir
from imagine.models.presets import ModelPreset
from imagine.models.tiny_grounding import GROUNDING_COMPONENTS
from imagine.pipeline.masks import boxes_to_masks, check_box, check_frames, dilate, temporal_smooth
from imagine.pipeline.types import require_components

# Absolute places that say where in the frame a remove/replace target is, so they can pick among detections.
# (background/foreground are depth, not frame position; relative places would need the anchors detected too.)
_FILTERING_KINDS = frozenset(
    {"left", "right", "top", "bottom", "center", "top-left", "top-right", "bottom-left", "bottom-right"}
)


class GroundingError(ValueError):
    """The instruction's object could not be found in the video."""


def load_grounding_stage(
    preset: ModelPreset,
    home: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    s3_endpoint_url: str | None = None,
) -> GroundingStage:
    """The `GroundingStage` of a ``grounding`` preset: its weights resolved (builtin: built once under `home`;
    local dir; ``s3://``: downloaded once, from `s3_endpoint_url` when given) and loaded onto `device` in `dtype`
    through `imagine.models.loading`, like every other model.

    Builtin presets are random-init: their detector scores nothing above a threshold, so their stage keeps each key
    frame's best box (`top1_fallback`) and the word path runs end to end (its masks are as meaningless as the tiny
    models' video); real weights use the thresholds.
    """
    if preset.family != "grounding":
        raise ValueError(f"preset {preset.name!r} is a {preset.family} model; grounding needs a grounding preset")
    model_dir = resolve_model_dir(preset, Path(home), endpoint_url=s3_endpoint_url)
    components = load_components(model_dir, GROUNDING_COMPONENTS, str(device), dtype)
    return GroundingStage(components, device, dtype, top1_fallback=preset.is_builtin)


class GroundingStage:
    """Masks for an edit instruction: detector on key frames + SAM2 video propagation, or boxes / place regions.

    `components` are the detector, its tokenizer and image processor, and the SAM2 video model
    (`GROUNDING_COMPONENTS`, as `load_grounding_stage` loads them). `top1_fallback` keeps each key frame's best box
    when nothing passes the thresholds: for random-init models, and for callers who know the object is there.
    """

    def __init__(
        self,
        components: Mapping[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        top1_fallback: bool = False,
        num_key_frames: int = 3,
        max_objects: int = 4,
    ) -> None:
        require_components("GroundingStage", dict(components), GROUNDING_COMPONENTS)
        _check_threshold("box_threshold", box_threshold)
        _check_threshold("text_threshold", text_threshold)
        for name, value in (("num_key_frames", num_key_frames), ("max_objects", max_objects)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.components = dict(components)
        self.device = torch.device(device)
        self.dtype = dtype
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.top1_fallback = top1_fallback
        self.num_key_frames = num_key_frames
        self.max_objects = max_objects

    # -- detection -------------------------------------------------------------------------------------------

    def detect(
        self,
        frames: np.ndarray | torch.Tensor,
        phrase: str,
        key_frames: Sequence[int] | None = None,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        top1_fallback: bool | None = None,
    ) -> dict[int, list[Box]]:
        """Boxes of `phrase` (English) on each key frame, best first, at most `max_objects` per frame, in the
        frame's pixels. A query box is kept when its best phrase-token probability exceeds `box_threshold` (it
        matches some word of the phrase) and its mean phrase-token probability exceeds `text_threshold` (it matches
        the phrase as a whole). Key frames default to `num_key_frames` evenly spaced frames, first and last
        included. Frames with no box map to an empty list."""
        video = check_frames(frames)
        num_frames, height, width = video.shape[:3]
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"phrase must be a non-empty string, got {phrase!r}")
        keys = self._key_frames(key_frames, num_frames)
        box_threshold = self.box_threshold if box_threshold is None else box_threshold
        text_threshold = self.text_threshold if text_threshold is None else text_threshold
        top1_fallback = self.top1_fallback if top1_fallback is None else top1_fallback
        _check_threshold("box_threshold", box_threshold)
        _check_threshold("text_threshold", text_threshold)

        detector = self.components["detector"]
        tokenizer = self.components["detector_tokenizer"]
        # GroundingDINO was trained on lowercase captions whose phrases end with a period.
        caption = " ".join(phrase.lower().split()).rstrip(".") + "."
        text = tokenizer(
            [caption] * len(keys),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=detector.config.max_text_len,
        )
        images = self.components["detector_image_processor"](
            images=[video[k].numpy() for k in keys], return_tensors="pt"
        )
        with torch.inference_mode():
            outputs = detector(
                pixel_values=images["pixel_values"].to(self.device, self.dtype),
                pixel_mask=images["pixel_mask"].to(self.device),
                **{name: value.to(self.device) for name, value in text.items()},  # ids, attention, token types
            )
        probs = outputs.logits.float().sigmoid().cpu()  # (K, queries, max_text_len)
        phrase_tokens = self._phrase_token_mask(text["input_ids"], probs.shape[-1])  # (K, max_text_len)
        token_probs = probs * phrase_tokens[:, None, :]
        best = token_probs.amax(dim=-1)
        mean = token_probs.sum(dim=-1) / phrase_tokens.sum(dim=-1, keepdim=True).clamp(min=1)
        keep = (best > box_threshold) & (mean > text_threshold)
        boxes = center_to_corners_format(outputs.pred_boxes.float().cpu()) * torch.tensor(
            [width, height, width, height]
        )
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
        non_empty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

        detections: dict[int, list[Box]] = {}
        for row, frame_index in enumerate(keys):
            candidates = torch.nonzero(keep[row] & non_empty[row]).flatten()
            if len(candidates) == 0 and top1_fallback and non_empty[row].any():
                candidates = torch.nonzero(non_empty[row]).flatten()
                candidates = candidates[best[row, candidates].argmax()].reshape(1)
            order = candidates[best[row, candidates].argsort(descending=True)][: self.max_objects]
            detections[frame_index] = [tuple(float(v) for v in boxes[row, q]) for q in order.tolist()]
        return detections

    def _phrase_token_mask(self, input_ids: torch.Tensor, width: int) -> torch.Tensor:
        """1.0 where a token belongs to the phrase (not [CLS]/[SEP]/[PAD] nor the closing period), padded to
        the detector's text width."""
        tokenizer = self.components["detector_tokenizer"]
        ignored = torch.tensor(sorted(set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(".")}))
        mask = (~torch.isin(input_ids, ignored)).float()
        return F.pad(mask, (0, width - mask.shape[-1]))[:, :width]

    def _key_frames(self, key_frames: Sequence[int] | None, num_frames: int) -> list[int]:
        if key_frames is None:
            return default_key_frames(num_frames, self.num_key_frames)
        keys = list(key_frames)
        if not keys:
            raise ValueError("key_frames must name at least one frame")
        for k in keys:
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < num_frames:
                raise ValueError(f"key_frames: {k!r} is not a frame index in [0, {num_frames})")
        return sorted({int(k) for k in keys})

    # -- propagation -----------------------------------------------------------------------------------------

    def propagate(self, frames: np.ndarray | torch.Tensor, boxes_by_frame: Mapping[int, Sequence[Box]]) -> torch.Tensor:
        """Track the objects in `boxes_by_frame` (frame index -> pixel boxes) through the whole clip with SAM2;
        return their union as a bool ``(F, H, W)`` CPU tensor.

        Each box becomes a box prompt on its frame. Boxes on different frames are the same object when their IoU
        is >= 0.3 with that object's previous box (so a second key frame corrects the track instead of starting a
        duplicate). Propagation runs forward from the first prompted frame, then backward to frame 0.
        """
        video = check_frames(frames)
        num_frames, height, width = video.shape[:3]
        prompts = _check_boxes_by_frame(boxes_by_frame, num_frames, height, width)
        sam2 = self.components["sam2"]
        size_h, size_w = _pair(sam2.config.image_size)

        from transformers import Sam2VideoInferenceSession

        session = Sam2VideoInferenceSession(
            video=_sam2_pixels(video, size_h, size_w),
            video_height=height,
            video_width=width,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device="cpu",
            dtype=self.dtype,
        )
        scale = torch.tensor([size_w / width, size_h / height] * 2)
        masks = torch.zeros((num_frames, height, width), dtype=torch.bool)
        with torch.inference_mode():
            for frame_index, objects in _assign_object_ids(prompts).items():
                for obj_id, box in objects:
                    corners = (torch.tensor(box) * scale).reshape(1, 1, 2, 2)  # top-left, bottom-right points
                    session.add_point_inputs(
                        session.obj_id_to_idx(obj_id),
                        frame_index,
                        {"point_coords": corners, "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)},
                    )
                session.obj_with_new_inputs = [obj_id for obj_id, _ in objects]
                sam2(inference_session=session, frame_idx=frame_index)
            first = min(prompts)
            passes = [sam2.propagate_in_video_iterator(session, start_frame_idx=first)]
            if first > 0:
                passes.append(sam2.propagate_in_video_iterator(session, start_frame_idx=first, reverse=True))
            for outputs in passes:
                for output in outputs:
                    logits = F.interpolate(
                        output.pred_masks.float(), size=(height, width), mode="bilinear", align_corners=False
                    )
                    masks[output.frame_idx] |= (logits > 0).any(dim=0)[0].cpu()
        return masks

    # -- the whole route -------------------------------------------------------------------------------------

    def masks_for(
        self,
        instruction: EditInstruction | str,
        frames: np.ndarray | torch.Tensor,
        dilate_px: int = 8,
        smooth: int = 3,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Bool ``(F, H, W)`` masks (True = repaint) for `instruction` on `frames`, and an info dict saying how
        they were made (`source`, detector `phrase`, `boxes` per key frame, `region`, `coverage`, `timings`).

        - "add": the place's region (`place_to_region`); a relative place ("next to the sofa") detects its
          anchors first (best box on the earliest key frame that has one).
        - "remove"/"replace": detect the target (Chinese targets are glossed to English for the detector), keep
          boxes inside an absolute place ("on the left") if one is given, and propagate them with SAM2. Raises
          `GroundingError` when nothing is found.
        Then `dilate(masks, dilate_px)` and `temporal_smooth(masks, smooth)`.
        """
        if isinstance(instruction, str):
            instruction = parse_instruction(instruction)
        if not isinstance(instruction, EditInstruction):
            raise TypeError(f"instruction must be an EditInstruction or a string, got {type(instruction).__name__}")
        video = check_frames(frames)
        num_frames, height, width = video.shape[:3]
        info: dict[str, Any] = {"op": instruction.op, "target": instruction.target, "timings": {}}
        started = time.perf_counter()
        if instruction.op == "add":
            info["source"] = "place_region"
            anchor_boxes = self._anchor_boxes(video, instruction.place, info)
            region = place_to_region(instruction.place, width, height, anchor_boxes)
            info["region"] = region
            masks = boxes_to_masks([region], num_frames, height, width)
        else:
            info["source"] = "detector+sam2"
            phrase = self._english_phrase(instruction.target, "target")
            info["phrase"] = phrase
            detect_started = time.perf_counter()
            detections = self.detect(video, phrase)
            info["timings"]["detect_s"] = time.perf_counter() - detect_started
            detections = _filter_by_place(detections, instruction.place, width, height)
            info["boxes"] = detections
            if not any(detections.values()):
                where = f" {instruction.place.phrase}" if instruction.place is not None else ""
                raise GroundingError(
                    f"could not find {instruction.target!r}{where} in the video (detector phrase {phrase!r} on "
                    f"key frames {sorted(detections)}); name the object differently or give explicit boxes"
                )
            propagate_started = time.perf_counter()
            masks = self.propagate(video, {k: v for k, v in detections.items() if v})
            info["timings"]["propagate_s"] = time.perf_counter() - propagate_started
        masks = temporal_smooth(dilate(masks, dilate_px), smooth)
        info["coverage"] = float(masks.float().mean())
        info["timings"]["total_s"] = time.perf_counter() - started
        return masks, info

    def _anchor_boxes(self, video: torch.Tensor, place: Place | None, info: dict[str, Any]) -> list[Box] | None:
        """For a relative "add" place, each anchor's best box on the earliest key frame that shows it."""
        if place is None or not place.is_relative:
            return None
        boxes: list[Box] = []
        for anchor in place.anchors:
            phrase = self._english_phrase(anchor, "anchor")
            detections = self.detect(video, phrase)
            found = [frame_boxes[0] for _, frame_boxes in sorted(detections.items()) if frame_boxes]
            if not found:
                raise GroundingError(
                    f"could not find {anchor!r} (of {place.phrase!r}) in the video; give an absolute place "
                    f"(e.g. 'on the left') or explicit boxes"
                )
            boxes.append(found[0])
        info["anchor_boxes"] = dict(zip(place.anchors, boxes))
        return boxes

    @staticmethod
    def _english_phrase(phrase: str, role: str) -> str:
        english = detector_phrase(phrase)
        if english is None:
            raise GroundingError(
                f"the {role} {phrase!r} has no English gloss for the detector (it reads English); rephrase it, "
                f"configure an instruction rewriter, or give explicit boxes"
            )
        return english


# -- key frames -----------------------------------------------------------------------------------------------


def default_key_frames(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices including the first and the last (fewer if the clip is shorter)."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"num_frames and count must be >= 1, got {num_frames!r} and {count!r}")
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


# -- helpers --------------------------------------------------------------------------------------------------


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_boxes_by_frame(
    boxes_by_frame: Mapping[int, Sequence[Any]], num_frames: int, height: int, width: int
) -> dict[int, list[Box]]:
    """Validated {frame index: boxes}, frames without boxes dropped; ValueError if no box is left."""
    if not isinstance(boxes_by_frame, Mapping):
        raise TypeError(f"boxes_by_frame must map frame index -> boxes, got {type(boxes_by_frame).__name__}")
    prompts: dict[int, list[Box]] = {}
    for frame_index, frame_boxes in boxes_by_frame.items():
        if not isinstance(frame_index, (int, np.integer)) or not 0 <= frame_index < num_frames:
            raise ValueError(f"boxes_by_frame: {frame_index!r} is not a frame index in [0, {num_frames})")
        checked = [
            check_box(box, f"boxes_by_frame[{frame_index}][{i}]", width, height) for i, box in enumerate(frame_boxes)
        ]
        if checked:
            prompts[int(frame_index)] = checked
    if not prompts:
        raise ValueError("boxes_by_frame has no boxes to track")
    return prompts


def _iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _assign_object_ids(prompts: Mapping[int, Sequence[Box]], min_iou: float = 0.3) -> dict[int, list[tuple[int, Box]]]:
    """{frame: [(object id, box)]} in frame order: a box continues the object whose latest box overlaps it most
    (IoU >= `min_iou`, each object at most once per frame), else starts a new object."""
    latest: list[Box] = []
    assigned: dict[int, list[tuple[int, Box]]] = {}
    for frame_index in sorted(prompts):
        used: set[int] = set()
        objects: list[tuple[int, Box]] = []
        for box in prompts[frame_index]:
            scores = [(_iou(box, prev), obj_id) for obj_id, prev in enumerate(latest) if obj_id not in used]
            best_iou, best_id = max(scores, default=(0.0, -1))
            if best_iou < min_iou:
                best_id = len(latest)
                latest.append(box)
            latest[best_id] = box
            used.add(best_id)
            objects.append((best_id, box))
        assigned[frame_index] = objects
    return assigned


def _filter_by_place(
    detections: dict[int, list[Box]], place: Place | None, width: int, height: int
) -> dict[int, list[Box]]:
    """Keep the boxes whose centre lies in an absolute frame place ("the car on the left")."""
    if place is None or place.kind not in _FILTERING_KINDS:
        return detections
    x0, y0, x1, y1 = place_to_region(place, width, height)
    return {
        frame_index: [b for b in boxes if x0 <= (b[0] + b[2]) / 2 <= x1 and y0 <= (b[1] + b[3]) / 2 <= y1]
        for frame_index, boxes in detections.items()
    }


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _sam2_pixels(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What SAM2's video processor would produce without torchvision: frames squashed to the model's square
    input (bilinear, antialiased), scaled to [0, 1] and ImageNet-normalised; float32 ``(F, 3, height, width)``."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    pixels = torch.empty((video.shape[0], 3, height, width), dtype=torch.float32)
    for start in range(0, video.shape[0], 8):  # bounded float memory for long, large clips
        chunk = video[start : start + 8].permute(0, 3, 1, 2).float() / 255.0
        chunk = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        pixels[start : start + 8] = (chunk - mean) / std
    return pixels
