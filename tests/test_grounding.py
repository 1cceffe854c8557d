"""Grounding stage with tiny random-init GroundingDINO + SAM2 video models on CPU (loaded through the
`tiny-grounding` preset), and the routes that run no model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagine.editing.grounding import GroundingError, GroundingStage, default_key_frames, load_grounding_stage
from imagine.editing.instructions import parse_instruction, place_to_region
from imagine.models.loading import ModelSourceError
from imagine.models.presets import get_preset
from imagine.models.tiny_grounding import (
    GROUNDING_COMPONENTS,
    build_tiny_grounding_components,
    ensure_tiny_grounding,
    tiny_grounding_config_hash,
)
from imagine.pipeline.masks import boxes_to_masks

F_, H_, W_ = 6, 96, 160  # small clip: every model call stays well under a second


@pytest.fixture(scope="module")
def grounding_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grounding-home")


@pytest.fixture(scope="module")
def loaded(grounding_home: Path) -> GroundingStage:
    return load_grounding_stage(get_preset("tiny-grounding"), grounding_home)


@pytest.fixture(scope="module")
def components(loaded: GroundingStage) -> dict[str, Any]:
    return loaded.components


@pytest.fixture(scope="module")
def stage(components: dict[str, Any]) -> GroundingStage:
    """Random weights detect nothing meaningful: keep each key frame's best box so the SAM2 path runs."""
    return GroundingStage(components, top1_fallback=True, max_objects=1)


class _NotToBeRun:
    """Stands in for a model on the routes that must not run one: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a model was used ({name!r}) on a route that needs none")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was run on a route that needs none")


@pytest.fixture(scope="module")
def model_free(components: dict[str, Any]) -> GroundingStage:
    """A stage whose detector and SAM2 fail the test when used."""
    return GroundingStage({**components, "detector": _NotToBeRun(), "sam2": _NotToBeRun()})


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (F_, H_, W_, 3), dtype=np.uint8)


def test_tiny_models_build_once_and_reload_bit_identical(grounding_home: Path, components: dict[str, Any]) -> None:
    model_dir = ensure_tiny_grounding(grounding_home)
    assert model_dir == grounding_home / "models" / f"tiny-grounding-{tiny_grounding_config_hash()}"
    assert ensure_tiny_grounding(grounding_home) == model_dir  # second call: already there
    assert {p.name for p in model_dir.iterdir()} >= {"model_index.json", "detector", "sam2"}
    assert type(components["detector"]).__name__ == "GroundingDinoForObjectDetection"
    assert type(components["sam2"]).__name__ == "Sam2VideoModel"
    fresh = build_tiny_grounding_components()  # seeded: the same weights as the saved ones
    for name in ("detector", "sam2"):
        loaded, built = components[name].state_dict(), fresh[name].state_dict()
        assert loaded.keys() == built.keys()
        assert all(torch.equal(loaded[k], built[k]) for k in built), name
    assert components["detector_tokenizer"]("a dog.")["input_ids"] == fresh["detector_tokenizer"]("a dog.")["input_ids"]


def test_the_preset_loads_through_the_one_loader(grounding_home: Path, loaded: GroundingStage) -> None:
    assert sorted(loaded.components) == sorted(GROUNDING_COMPONENTS)
    assert loaded.top1_fallback  # builtin random-init weights: keep each key frame's best box
    local = get_preset("grounding").model_copy(update={"source": str(ensure_tiny_grounding(grounding_home))})
    assert not load_grounding_stage(local, grounding_home).top1_fallback  # real weights use the thresholds


def test_load_rejects_a_directory_without_models_and_other_families(tmp_path: Path) -> None:
    empty = get_preset("grounding").model_copy(update={"source": str(tmp_path)})
    with pytest.raises(ModelSourceError, match="model_index.json"):
        load_grounding_stage(empty, tmp_path)
    with pytest.raises(ValueError, match="grounding preset"):
        load_grounding_stage(get_preset("tiny-vace"), tmp_path)


def test_detect_returns_pixel_boxes_inside_the_frame(stage: GroundingStage, frames: np.ndarray) -> None:
    detections = stage.detect(frames, "a dog")
    assert sorted(detections) == default_key_frames(F_, 3) == [0, 2, 5]  # first, middle, last
    for boxes in detections.values():
        assert len(boxes) == 1  # top-1 fallback, max_objects=1
        x0, y0, x1, y1 = boxes[0]
        assert 0 <= x0 < x1 <= W_ and 0 <= y0 < y1 <= H_
    assert stage.detect(frames, "a dog", key_frames=[4]).keys() == {4}


def test_detect_without_fallback_respects_thresholds(stage: GroundingStage, frames: np.ndarray) -> None:
    assert stage.detect(frames, "a dog", box_threshold=1.0, top1_fallback=False) == {0: [], 2: [], 5: []}
    loose = stage.detect(frames, "a dog", box_threshold=0.0, text_threshold=0.0, top1_fallback=False)
    assert all(len(boxes) == 1 for boxes in loose.values())  # capped at max_objects
    with pytest.raises(ValueError, match="key_frames"):
        stage.detect(frames, "a dog", key_frames=[F_])
    with pytest.raises(ValueError, match="box_threshold"):
        stage.detect(frames, "a dog", box_threshold=1.5)


def test_propagate_returns_frame_sized_bool_masks(stage: GroundingStage, frames: np.ndarray) -> None:
    masks = stage.propagate(frames, {2: [(40.0, 20.0, 100.0, 70.0)], 5: [(45.0, 25.0, 105.0, 75.0)]})
    assert masks.shape == (F_, H_, W_) and masks.dtype == torch.bool
    # the tiny SAM2 always reports the prompted object visible, so its masks are not blank; frames 0-1 come
    # from the backward pass that starts at the first prompted frame
    assert masks.flatten(1).any(dim=1).all()
    assert torch.equal(
        masks, stage.propagate(torch.from_numpy(frames), {2: [(40, 20, 100, 70)], 5: [(45, 25, 105, 75)]})
    )


@pytest.mark.parametrize(
    ("boxes_by_frame", "match"),
    [
        ({0: [(10, 10, 5, 20)]}, r"boxes_by_frame\[0\]\[0\]"),
        ({1: [(0, 0, 10, 10), (0, 0, W_ + 1, 10)]}, r"boxes_by_frame\[1\]\[1\]"),
        ({F_: [(0, 0, 10, 10)]}, "not a frame index"),
        ({0: []}, "no boxes"),
    ],
)
def test_propagate_rejects_bad_boxes(
    stage: GroundingStage, frames: np.ndarray, boxes_by_frame: dict[int, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stage.propagate(frames, boxes_by_frame)


@pytest.mark.parametrize("text", ["add a blooming tree on the left", "在画面左侧添加一棵开花的树"])
def test_masks_for_add_paints_the_place_region(model_free: GroundingStage, frames: np.ndarray, text: str) -> None:
    masks, info = model_free.masks_for(text, frames, dilate_px=0, smooth=1)
    assert info["source"] == "place_region"
    assert info["region"] == place_to_region(parse_instruction(text).place, W_, H_)
    expected = torch.zeros((F_, H_, W_), dtype=torch.bool)
    expected[:, :, : -(-W_ // 3)] = True  # left third, full height (x1 = 53.33 -> column 53 included)
    assert torch.equal(masks, expected)
    # float frames in [0, 1] are the same frames (one contract with the repaint stages)
    as_float, _ = model_free.masks_for(text, frames.astype(np.float32) / 255, dilate_px=0, smooth=1)
    assert torch.equal(as_float, expected)


def test_masks_for_add_next_to_an_anchor_detects_the_anchor(stage: GroundingStage, frames: np.ndarray) -> None:
    instruction = parse_instruction("put a cat next to the sofa")
    masks, info = stage.masks_for(instruction, frames, dilate_px=0, smooth=1)
    anchor = info["anchor_boxes"]["sofa"]
    assert info["region"] == place_to_region(instruction.place, W_, H_, [anchor])
    assert torch.equal(masks, boxes_to_masks([info["region"]], F_, H_, W_))


def test_masks_for_remove_detects_then_propagates(stage: GroundingStage, frames: np.ndarray) -> None:
    masks, info = stage.masks_for("把狗去掉", frames, dilate_px=1, smooth=3)
    assert info["source"] == "detector+sam2" and info["phrase"] == "dog"
    assert sorted(info["boxes"]) == [0, 2, 5]
    assert masks.shape == (F_, H_, W_) and masks.dtype == torch.bool and masks.any()
    assert set(info["timings"]) == {"detect_s", "propagate_s", "total_s"}
    assert info["coverage"] == pytest.approx(float(masks.float().mean()))


def test_masks_for_reports_what_it_cannot_find(components: dict[str, Any], frames: np.ndarray) -> None:
    strict = GroundingStage(components, box_threshold=1.0)
    with pytest.raises(GroundingError, match="could not find 'dog' in the video"):
        strict.masks_for("remove the dog", frames)
    with pytest.raises(GroundingError, match="no English gloss"):
        strict.masks_for("删除那个东西", frames)


def test_stage_rejects_bad_inputs(components: dict[str, Any], model_free: GroundingStage, frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="missing"):
        GroundingStage({"sam2": components["sam2"]})
    with pytest.raises(ValueError, match="box_threshold"):
        GroundingStage(components, box_threshold=-0.1)
    with pytest.raises(ValueError, match=r"uint8 \(F, H, W, 3\)"):
        model_free.masks_for("add a tree", frames.astype(np.float32))  # 0..255 floats
