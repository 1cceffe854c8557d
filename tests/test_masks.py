"""Masks shared by grounding and the repaint stages: the frame/mask checks (one contract), boxes -> masks and the
morphology. Pure torch, milliseconds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from imagine.pipeline.masks import MaskError, boxes_to_masks, check_frames, check_masks, dilate, temporal_smooth

# --- checks --------------------------------------------------------------------------------------------------------


def test_check_frames_takes_uint8_as_is_and_scales_float() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    checked = check_frames(frames)
    assert checked.dtype == torch.uint8 and tuple(checked.shape) == (3, 4, 6, 3)
    assert np.shares_memory(checked.numpy(), frames)  # no copy
    assert torch.equal(check_frames(torch.from_numpy(frames).double() / 255), checked)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((1, 3, 4, 6, 3), np.uint8), r"frames must be \(F, H, W, 3\).*batch dimension"),
        (np.zeros((3, 3, 4, 6), np.uint8), "channels must be last"),
        (np.zeros((3, 4, 6, 2), np.uint8), r"frames must be \(F, H, W, 3\)"),
        (np.zeros((0, 4, 6, 3), np.uint8), "at least one frame"),
        (np.full((3, 4, 6, 3), 255.0, np.float32), r"\[0, 1\].*uint8 \(F, H, W, 3\)"),  # 0..255 floats
        (np.full((3, 4, 6, 3), np.nan, np.float32), "finite"),
        (np.zeros((3, 4, 6, 3), np.int32), "uint8 or float"),
        ([[0]], "torch.Tensor or numpy array"),
    ],
)
def test_check_frames_says_what_is_wrong(frames: Any, match: str) -> None:
    with pytest.raises(MaskError, match=match) as info:
        check_frames(frames)
    assert isinstance(info.value, ValueError)  # the API maps ValueErrors to 4xx


def test_check_masks_takes_bool_or_unit_floats_matching_the_frames() -> None:
    masks = torch.zeros((3, 4, 6), dtype=torch.bool)
    masks[1, 2, 3] = True
    checked = check_masks(masks, (3, 4, 6, 3))
    assert checked.dtype == torch.float32 and torch.equal(checked, masks.float())
    soft = np.where(masks.numpy(), 0.8, 0.1).astype(np.float32)
    assert torch.equal(check_masks(soft, (3, 4, 6)), torch.from_numpy(soft))


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (torch.ones((2, 4, 6)), r"masks must be \(F, H, W\) = \(3, 4, 6\)"),
        (torch.ones((3, 1, 4, 6)), "singleton batch/channel"),
        (torch.ones((3, 4, 6)) * 255, r"masks must be in \[0, 1\].*1/255"),
        (-torch.ones((3, 4, 6)), r"masks must be in \[0, 1\]"),
        (torch.full((3, 4, 6), float("nan")), "finite"),
        (torch.zeros((3, 4, 6), dtype=torch.bool), "nothing to regenerate"),
    ],
)
def test_check_masks_says_what_is_wrong(masks: torch.Tensor, match: str) -> None:
    with pytest.raises(MaskError, match=match):
        check_masks(masks, (3, 4, 6, 3))


# --- boxes and morphology ------------------------------------------------------------------------------------------


def test_boxes_to_masks_geometry_is_exact() -> None:
    masks = boxes_to_masks([(2, 3, 5, 7), (1.5, 0.2, 2.1, 1.0)], 4, 10, 12)
    expected = torch.zeros((10, 12), dtype=torch.bool)
    expected[3:7, 2:5] = True  # rows y0..y1-1, columns x0..x1-1
    expected[0:1, 1:3] = True  # fractional box: floor(x0)=1 .. ceil(x1)=3, floor(y0)=0 .. ceil(y1)=1
    assert masks.shape == (4, 10, 12)
    assert all(torch.equal(frame, expected) for frame in masks)

    per_frame = boxes_to_masks(
        [[(0, 0, 12, 10)], [], np.array([[4, 4, 6, 6]]), torch.tensor([[0, 0, 1, 1]])], 4, 10, 12
    )
    assert per_frame.sum(dim=(1, 2)).tolist() == [120, 0, 4, 1]


@pytest.mark.parametrize(
    ("boxes", "match"),
    [
        ([(0, 0, 13, 5)], r"boxes\[0\] \(0, 0, 13, 5\) must satisfy 0 <= x0 < x1 <= 12"),
        ([(0, 0, 5, 5), (-1, 0, 5, 5)], r"boxes\[1\]"),
        ([(5, 0, 5, 5)], r"boxes\[0\]"),  # x0 == x1
        ([(0, 6, 5, 2)], r"boxes\[0\]"),  # y0 > y1
        ([(0, 0, 5)], r"boxes\[0\] must be a box \(x0, y0, x1, y1\), got \(0, 0, 5\)"),
        ([[(0, 0, 5, 5)], [(0, 0, 5, 11)], [], []], r"boxes\[1\]\[0\]"),
        ([[(0, 0, 5, 5)]], "1 per-frame box lists for 4 frames"),
        ([[(0, 0, 5, 5)], (0, 0, 5, 5), [], []], "not a mix"),
        ([], "non-empty"),
        ([("a", 0, 5, 5)], r"boxes\[0\] must be a box"),
        ([(0, 0, 5, 5), [(0, 0, 5, 5)]], "not a mix"),
    ],
)
def test_boxes_to_masks_rejects_bad_boxes(boxes: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        boxes_to_masks(boxes, 4, 10, 12)


def test_dilate_grows_by_the_radius() -> None:
    masks = torch.zeros((2, 11, 13), dtype=torch.bool)
    masks[0, 5, 6] = True
    masks[1, 0, 0] = True
    grown = dilate(masks, 2)
    expected = torch.zeros_like(masks)
    expected[0, 3:8, 4:9] = True  # the 5x5 square around (5, 6)
    expected[1, 0:3, 0:3] = True  # clipped at the corner
    assert torch.equal(grown, expected)
    assert torch.equal(dilate(masks, 0), masks)
    assert not dilate(masks, 0) is masks
    with pytest.raises(ValueError, match="radius_px"):
        dilate(masks, -1)
    with pytest.raises(ValueError, match="bool"):
        dilate(masks.float(), 1)  # type: ignore[arg-type]


def test_temporal_smooth_fills_a_one_frame_hole() -> None:
    present = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    masks = torch.tensor(present, dtype=torch.bool)[:, None, None].expand(10, 4, 4).clone()
    assert temporal_smooth(masks, 3)[:, 0, 0].int().tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert temporal_smooth(masks, 5)[:, 0, 0].int().tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert torch.equal(temporal_smooth(masks, 1), masks)
    with pytest.raises(ValueError, match="odd"):
        temporal_smooth(masks, 2)
