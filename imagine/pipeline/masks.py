"""Per-frame masks of what an edit repaints (True / > 0.5 = regenerate), shared by grounding and the repaint stages:
frame and mask checks with one contract, boxes -> masks, and the morphology (dilation in space, smoothing in time).

Frames are ``(F, H, W, 3)`` RGB, uint8 or float in [0, 1]; masks are ``(F, H, W)``. Boxes are pixel
``(x0, y0, x1, y1)`` in the frame's coordinates. Every bad input raises `MaskError` (a `ValueError`, so the API maps
it to a 4xx) saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagine.editing.instructions import Box, validate_box


class MaskError(ValueError):
    """Frames, masks or boxes that a mask operation cannot take."""


# -- checks ---------------------------------------------------------------------------------------------------


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach()
    raise MaskError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_frames(frames: Any) -> torch.Tensor:
    """`frames` as a uint8 ``(F, H, W, 3)`` CPU tensor (no copy for uint8 input): uint8 frames as they are, float
    frames in [0, 1] scaled by 255 and rounded; `MaskError` saying what is wrong otherwise."""
    frames = _as_tensor("frames", frames)
    shape = tuple(frames.shape)
    if frames.ndim != 4 or shape[-1] != 3:
        hint = ""
        if frames.ndim == 5:
            hint = "; pass one clip without a batch dimension"
        elif frames.ndim == 4 and shape[1] == 3:
            hint = "; channels must be last (F, H, W, 3), not (F, 3, H, W)"
        raise MaskError(f"frames must be (F, H, W, 3), got shape {shape}{hint}")
    if min(shape[:3]) < 1:
        raise MaskError(f"frames must hold at least one frame of at least 1x1 pixels, got shape {shape}")
    if frames.dtype == torch.uint8:
        return frames.cpu()
    if not frames.is_floating_point():
        raise MaskError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    frames = frames.float().cpu()
    if not torch.isfinite(frames).all():
        raise MaskError("float frames must be finite and in [0, 1], got NaN or infinite values")
    low, high = float(frames.min()), float(frames.max())
    if low < 0.0 or high > 1.0:
        raise MaskError(
            f"float frames must be in [0, 1], got values in [{low:g}, {high:g}]; pass 0..255 pixels as uint8 "
            "(F, H, W, 3) frames"
        )
    return (frames * 255.0).round_().to(torch.uint8)


def check_masks(masks: Any, frames_shape: Sequence[int]) -> torch.Tensor:
    """Repaint masks as a float ``(F, H, W)`` CPU tensor in [0, 1] matching frames of shape `frames_shape`
    (``(F, H, W, ...)``): bool masks or float masks in [0, 1] that select at least one pixel (> 0.5)."""
    masks = _as_tensor("masks", masks)
    expected = tuple(frames_shape[:3])
    shape = tuple(masks.shape)
    if shape != expected:
        hint = ""
        if masks.ndim == 4 and 1 in (shape[0], shape[1], shape[-1]):
            hint = "; drop the singleton batch/channel dimension"
        raise MaskError(f"masks must be (F, H, W) = {expected} to match the frames, got shape {shape}{hint}")
    soft = masks.dtype != torch.bool
    masks = masks.float().cpu()
    if soft:
        if not torch.isfinite(masks).all():
            raise MaskError("masks must be finite")
        low, high = float(masks.min()), float(masks.max())
        if low < 0.0 or high > 1.0:
            raise MaskError(
                f"masks must be in [0, 1] (1 = regenerate), got values in [{low:g}, {high:g}]"
                + ("; scale 0/255 masks by 1/255" if high > 1.0 else "")
            )
    if not (masks > 0.5).any():
        raise MaskError("masks select no pixel (all <= 0.5): there is nothing to regenerate")
    return masks


def _check_bool_masks(masks: Any) -> None:
    """The morphology works on bool ``(F, H, W)`` tensors only (threshold soft masks first: ``masks > 0.5``)."""
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.ndim != 3:
        shape = tuple(masks.shape) if hasattr(masks, "shape") else type(masks).__name__
        raise MaskError(f"masks must be a bool (F, H, W) tensor, got {getattr(masks, 'dtype', None)} {shape}")


# -- boxes ----------------------------------------------------------------------------------------------------


def check_box(value: Any, name: str, width: int, height: int) -> Box:
    """`value` (four numbers: a list/tuple, or a 1-D array/tensor of 4) as a float box inside a `width` x `height`
    frame with x0 < x1 and y0 < y1; `MaskError` naming `name` otherwise."""
    if not _is_box(value):
        raise MaskError(f"{name} must be a box (x0, y0, x1, y1), got {value!r}")
    box = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else list(value)
    try:
        validate_box(box, width, height, name)
    except ValueError as e:
        raise MaskError(str(e)) from e
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0, y0, x1, y1)


def boxes_to_masks(boxes: Sequence[Any], num_frames: int, height: int, width: int) -> torch.Tensor:
    """Bool ``(num_frames, height, width)`` masks, True inside the given pixel boxes (x0, y0, x1, y1).

    `boxes` is either one list of boxes used on every frame (``[(x0, y0, x1, y1), ...]``) or one list of boxes
    per frame (``[[box, ...], [], ...]``, exactly `num_frames` lists; a frame may have none). A box covers pixel
    columns ``floor(x0) .. ceil(x1) - 1`` and rows ``floor(y0) .. ceil(y1) - 1``; it must lie inside the frame
    with x0 < x1 and y0 < y1, else `MaskError` naming it.
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise MaskError(f"{name} must be a positive int, got {value!r}")
    per_frame = _boxes_per_frame(boxes, num_frames, height, width)
    masks = torch.zeros((num_frames, height, width), dtype=torch.bool)
    for frame_index, frame_boxes in enumerate(per_frame):
        for x0, y0, x1, y1 in frame_boxes:
            masks[frame_index, math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = True
    return masks


def _is_box(value: Any) -> bool:
    """Four numbers (a list/tuple, or a 1-D array/tensor of 4)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 1 and value.shape[0] == 4
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 4
        and all(not isinstance(v, (Sequence, torch.Tensor, np.ndarray)) for v in value)
    )


def _is_box_list(value: Any) -> bool:
    """A (possibly empty) list of boxes, i.e. one frame's entry in per-frame boxes (not a box itself)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 2
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(
            isinstance(v, (torch.Tensor, np.ndarray)) or (isinstance(v, Sequence) and not isinstance(v, str))
            for v in value
        )
    )


def _boxes_per_frame(boxes: Any, num_frames: int, height: int, width: int) -> list[list[Box]]:
    """Validate `boxes_to_masks`' `boxes` (shared list or per-frame lists) into one box list per frame."""
    if isinstance(boxes, (torch.Tensor, np.ndarray)):
        boxes = boxes.tolist()
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or len(boxes) == 0:
        raise MaskError(f"boxes must be a non-empty list of boxes, or one list of boxes per frame, got {boxes!r}")
    per_frame = [_is_box_list(item) for item in boxes]
    if not any(per_frame):
        shared = [check_box(box, f"boxes[{i}]", width, height) for i, box in enumerate(boxes)]
        return [shared] * num_frames
    if all(per_frame):
        if len(boxes) != num_frames:
            raise MaskError(f"boxes: got {len(boxes)} per-frame box lists for {num_frames} frames")
        return [
            [check_box(box, f"boxes[{f}][{i}]", width, height) for i, box in enumerate(frame_boxes)]
            for f, frame_boxes in enumerate(boxes)
        ]
    raise MaskError("boxes must be either boxes (x0, y0, x1, y1) for all frames or per-frame lists, not a mix")


# -- morphology -----------------------------------------------------------------------------------------------


def dilate(masks: torch.Tensor, radius_px: int) -> torch.Tensor:
    """Grow each frame of bool ``(F, H, W)`` masks by `radius_px` pixels in every direction (a square structuring
    element: a pixel turns on when any pixel within Chebyshev distance `radius_px` is on); a new bool tensor.
    Inpainting needs this margin: object edges, shadows and motion blur lie just outside a tight mask."""
    _check_bool_masks(masks)
    if not isinstance(radius_px, int) or isinstance(radius_px, bool) or radius_px < 0:
        raise MaskError(f"radius_px must be an int >= 0, got {radius_px!r}")
    if radius_px == 0 or masks.numel() == 0:
        return masks.clone()
    kernel = 2 * radius_px + 1
    out = torch.empty_like(masks)
    for start in range(0, masks.shape[0], 16):  # bounded float memory for long, large clips
        chunk = masks[start : start + 16, None].float()
        chunk = F.max_pool2d(chunk, (1, kernel), stride=1, padding=(0, radius_px))  # separable: rows, then columns
        chunk = F.max_pool2d(chunk, (kernel, 1), stride=1, padding=(radius_px, 0))
        out[start : start + 16] = chunk[:, 0] > 0
    return out


def temporal_smooth(masks: torch.Tensor, window: int) -> torch.Tensor:
    """Max of bool ``(F, H, W)`` masks over a centred window of `window` frames (odd): a pixel masked in any frame
    within ``window // 2`` frames is masked, so a mask never drops out for fewer than `window` frames and a removed
    object cannot flash back for a frame. Errs on covering more (a mask starts/ends ``window // 2`` frames
    early/late)."""
    _check_bool_masks(masks)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise MaskError(f"window must be an odd int >= 1, got {window!r}")
    out = masks.clone()
    for shift in range(1, min(window // 2, masks.shape[0] - 1) + 1):
        out[shift:] |= masks[:-shift]
        out[:-shift] |= masks[shift:]
    return out
