"""The tiny Wan VACE preset and the inpainting stage: built once, loaded through from_pretrained, checked against
diffusers' own WanVACEPipeline, and composited so that pixels outside the mask survive the edit (and re-encoding)."""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imagine.config import EditConfig
from imagine.editing.prompts import EditInputError, EditPrompt, prompt_for
from imagine.models import tiny_vace
from imagine.models.loading import BUILTIN_BUILDERS, load_components, resolve_model_dir
from imagine.models.presets import BUILTIN_SOURCES, ModelPreset, get_preset, list_presets
from imagine.pipeline.masks import MaskError, dilate
from imagine.pipeline.media import mux_mp4, read_video, remux_with_source_audio
from imagine.pipeline.types import DecodedMedia
from imagine.pipeline.vace import EDIT_COMPONENTS, InpaintStage

MODULES = ["text_encoder", "transformer", "vae"]
EDIT_CRF = EditConfig().mp4_crf  # what edit outputs are encoded at


@pytest.fixture(scope="module")
def tiny_vace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vace.build_tiny_vace(tmp_path_factory.mktemp("tiny-vace") / "tiny-vace")


@pytest.fixture(scope="module")
def components(tiny_vace_dir: Path) -> dict:
    return load_components(tiny_vace_dir, EDIT_COMPONENTS, "cpu", torch.float32)


@pytest.fixture(scope="module")
def stage(components: dict) -> InpaintStage:
    return InpaintStage(components, "cpu", torch.float32)


def random_clip(num_frames: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames and a float mask with a box in the middle third of every frame."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(num_frames, height, width)
    masks[:, height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 1.0
    return frames, masks


# --- presets and the tiny model ------------------------------------------------------------------------------------


def test_vace_presets_are_their_own_family():
    assert get_preset("tiny-vace").family == "wan_vace"
    assert get_preset("tiny-vace").source == "builtin:tiny-vace"
    assert get_preset("wan-vace").family == "wan_vace" and not get_preset("wan-vace").is_builtin
    assert [p.name for p in list_presets("wan_vace")] == ["tiny-vace", "wan-vace"]
    assert all(p.family == "ltx2" for p in list_presets("ltx2"))
    assert {"tiny", "ltx-2"} <= {p.name for p in list_presets("ltx2")}
    assert len(list_presets()) == sum(len(list_presets(f)) for f in ("ltx2", "wan_vace", "grounding"))
    with pytest.raises(ValueError, match="family"):
        list_presets("sd")
    # a builtin model belongs to one family
    with pytest.raises(ValueError, match="wan_vace"):
        ModelPreset(name="x", family="ltx2", source="builtin:tiny-vace")
    with pytest.raises(ValueError, match="builtin:tiny-vace"):
        ModelPreset(name="x", family="wan_vace", source="builtin:nope")
    assert BUILTIN_BUILDERS.keys() == BUILTIN_SOURCES.keys()  # every builtin can be built


def test_resolve_builtin_tiny_vace_uses_hashed_home_dir(tmp_path, tiny_vace_dir):
    expected = tmp_path / "models" / f"tiny-vace-{tiny_vace.tiny_vace_config_hash()}"
    shutil.copytree(tiny_vace_dir, expected)  # pre-seeded: resolving must reuse it, not rebuild
    assert resolve_model_dir(get_preset("tiny-vace"), tmp_path) == expected


def test_tiny_vace_is_seeded_keeps_wan_ratios_and_round_trips(components, tiny_vace_dir):
    import json

    index = json.loads((tiny_vace_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["transformer"] == ["diffusers", "WanVACETransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    fresh = tiny_vace.build_tiny_vace_components()  # a second, independent build
    for name in MODULES:
        saved, reloaded = fresh[name].state_dict(), components[name].state_dict()
        assert saved.keys() == reloaded.keys(), name
        for key in saved:
            assert torch.equal(saved[key], reloaded[key]), f"{name}.{key}"
    assert fresh["tokenizer"]("a tree").input_ids == components["tokenizer"]("a tree").input_ids
    vae = components["vae"]
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 9, 32, 48)).latent_dist.mode()
    assert tuple(latents.shape) == (1, 16, 3, 4, 6)  # Wan 2.1: 8x space, 4x time (+1 causal first frame)
    assert tuple(components["transformer"].config.patch_size) == (1, 2, 2)


# --- the stage ------------------------------------------------------------------------------------------------------


def test_stage_matches_diffusers_wan_vace_pipeline(components):
    """At a model-legal size with no dilation, the repainted pixels are exactly what diffusers' own
    WanVACEPipeline.__call__ produces for the same inputs and seed; the rest is the source."""
    from diffusers import WanVACEPipeline

    frames, masks = random_clip(9, 32, 48, seed=1)
    stage = InpaintStage(components, dilation_px=0, feather_px=0)
    ours = stage(frames, masks, "a red tree", "blurry", seed=7, num_inference_steps=3, guidance_scale=4.0)

    pipe = WanVACEPipeline(**{**components, "scheduler": copy.deepcopy(components["scheduler"])})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt="a red tree",
        negative_prompt="blurry",
        video=(frames.float() / 255.0).permute(0, 3, 1, 2).unsqueeze(0),  # (1, F, 3, H, W) in [0, 1]
        mask=masks[None, :, None],  # (1, F, 1, H, W)
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).frames[0]
    reference = (reference * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    inside = masks.bool()
    assert torch.equal(ours[inside], reference[inside])
    assert torch.equal(ours[~inside], frames[~inside])
    assert not torch.equal(ours[inside], frames[inside])


def test_any_size_and_length_in_same_shape_out_source_kept_outside_mask(stage):
    frames, masks = random_clip(26, 72, 100)  # neither 4k + 1 frames nor multiples of 16
    assert stage.working_size(72, 100) == (80, 96)
    assert stage.padded_num_frames(26) == 29
    out = stage(frames, masks, "a red tree", seed=0, num_inference_steps=2)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (26, 72, 100, 3)
    outside = ~dilate(masks > 0.5, stage.dilation_px)
    assert outside.any() and torch.equal(out[outside], frames[outside])  # bit for bit, before any encoding
    inside = masks.bool()
    assert (out[inside] != frames[inside]).float().mean() > 0.5  # the masked region was repainted

    # float frames in [0, 1] are the same request as uint8 ones; the seed fixes the result
    again = stage(frames.float() / 255.0, masks.numpy(), "a red tree", seed=0, num_inference_steps=2)
    assert torch.equal(again, out)


def test_max_pixels_caps_the_working_size(components):
    stage = InpaintStage(components, max_pixels=64 * 64)
    assert stage.working_size(480, 864) == (48, 80)
    assert stage.working_size(40, 40) == (48, 48)  # small sources are not scaled up, only snapped
    frames, masks = random_clip(5, 96, 160)
    out = stage(frames, masks, "a red tree", num_inference_steps=1, guidance_scale=1.0)
    assert tuple(out.shape) == (5, 96, 160, 3)
    outside = ~dilate(masks > 0.5, stage.dilation_px)
    assert torch.equal(out[outside], frames[outside])


def test_step_hook_runs_after_every_step_and_can_stop_the_loop(stage):
    frames, masks = random_clip(5, 32, 32)
    calls: list[tuple[int, int]] = []
    stage(frames, masks, "a tree", num_inference_steps=3, step_hook=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    class Cancelled(Exception):
        pass

    seen: list[int] = []

    def cancel_at_two(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        stage(frames, masks, "a tree", num_inference_steps=5, step_hook=cancel_at_two)
    assert seen == [1, 2]


_F, _M = random_clip(5, 16, 16)


@pytest.mark.parametrize(
    "frames, masks, params, message",
    [
        (_F[None], _M, {}, r"frames must be \(F, H, W, 3\).*batch dimension"),
        (_F.permute(0, 3, 1, 2), _M, {}, r"channels must be last"),
        (_F[..., :2], _M, {}, r"frames must be \(F, H, W, 3\)"),
        (_F.float(), _M, {}, r"\[0, 1\]"),  # float frames in 0..255
        (_F.to(torch.int32), _M, {}, r"uint8 or float"),
        ([[0]], _M, {}, "torch.Tensor or numpy array"),
        (_F, _M[:4], {}, r"masks must be \(F, H, W\) = \(5, 16, 16\)"),
        (_F, _M[:, None], {}, r"singleton batch/channel"),  # (F, 1, H, W)
        (_F, _M[None], {}, r"singleton batch/channel"),  # (1, F, H, W)
        (_F, _M[..., None], {}, r"singleton batch/channel"),  # (F, H, W, 1)
        (_F, _M * 255, {}, r"masks must be in \[0, 1\].*1/255"),
        (_F, _M - 1, {}, r"masks must be in \[0, 1\]"),
        (_F, torch.zeros_like(_M), {}, "nothing to regenerate"),
        (_F, _M, {"prompt": "  "}, "prompt"),
        (_F, _M, {"negative_prompt": None}, "negative_prompt"),
        (_F, _M, {"seed": -1}, "seed"),
        (_F, _M, {"num_inference_steps": 0}, "num_inference_steps"),
        (_F, _M, {"guidance_scale": 0.5}, "guidance_scale"),
        (_F, _M, {"conditioning_scale": float("nan")}, "conditioning_scale"),
    ],
)
def test_bad_inputs_raise_clear_errors_before_any_model_work(stage, frames, masks, params, message):
    called = []
    kwargs = {"prompt": "a tree", **params, "step_hook": lambda *a: called.append(a)}
    with pytest.raises((EditInputError, MaskError), match=message) as info:
        stage(frames, masks, **kwargs)
    assert isinstance(info.value, ValueError)
    assert not called


def test_stage_config_is_checked(components):
    with pytest.raises(ValueError, match="feather_px"):
        InpaintStage(components, dilation_px=4, feather_px=3)  # would leave masked pixels partly the source
    with pytest.raises(ValueError, match="max_pixels"):
        InpaintStage(components, max_pixels=0)
    with pytest.raises(ValueError, match="missing"):
        InpaintStage({k: v for k, v in components.items() if k != "vae"})


def test_prompt_for_each_op():
    removal = prompt_for("remove", "the man walking in the background")
    assert isinstance(removal, EditPrompt)
    assert "background" in removal.prompt and "man" not in removal.prompt
    assert removal.negative_prompt.startswith("the man walking in the background, ")
    addition = prompt_for("add", "a blooming tree")
    assert addition.prompt.startswith("a blooming tree, ") and "tree" not in addition.negative_prompt
    swap = prompt_for("replace", "the red car", "a blue bicycle")
    assert swap.prompt.startswith("a blue bicycle, ") and swap.negative_prompt.startswith("the red car, ")
    with pytest.raises(EditInputError, match="op"):
        prompt_for("paint", "x")  # type: ignore[arg-type]
    with pytest.raises(EditInputError, match="replacement"):
        prompt_for("replace", "the red car")
    with pytest.raises(EditInputError, match="replacement"):
        prompt_for("add", "a tree", "a bush")
    with pytest.raises(EditInputError, match="target"):
        prompt_for("remove", " ")


# --- item 4: unedited pixels survive re-encoding ---------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    error = (a.double() - b.double())[where]
    return float(10 * torch.log10(255.0**2 / (error**2).mean()))


def test_outside_mask_quality_after_remux_matches_a_plain_reencode(stage):
    """Encode the edited frames at EDIT_CRF and compare, outside the mask, with the source's decoded pixels: within
    1 dB of re-encoding the unedited source at the same CRF (the edit costs the untouched pixels nothing)."""
    num_frames, height, width, fps = 26, 72, 100, 24.0
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    scene = np.stack(
        [
            128 + 60 * np.sin(x / 9.0 + t / 5.0) + 30 * np.cos(y / 7.0),
            128 + 50 * np.cos((x + y) / 13.0 - t / 7.0),
            110 + 40 * np.sin(y / 5.0 + t / 9.0) + 20 * np.sin(x / 3.0),
        ],
        axis=-1,
    )
    masks = np.zeros((num_frames, height, width), dtype=bool)
    for i in range(num_frames):  # a red box moving right: the object to remove
        scene[i, 20:44, 10 + 2 * i : 30 + 2 * i] = (230, 40, 40)
        masks[i, 20:44, 10 + 2 * i : 30 + 2 * i] = True
    scene = np.clip(scene, 0, 255).astype(np.uint8)
    audio = (0.4 * np.sin(2 * np.pi * 440 * np.arange(round(num_frames / fps * 16000)) / 16000)).astype(np.float32)
    encoded = io.BytesIO()
    mux_mp4(DecodedMedia(scene, np.stack([audio, audio]), 16000, fps), encoded, crf=18)
    source = read_video(encoded.getvalue())

    prompts = prompt_for("remove", "the red box")
    edited = stage(
        source.frames, torch.from_numpy(masks), prompts.prompt, prompts.negative_prompt, num_inference_steps=2
    )
    outside = ~dilate(torch.from_numpy(masks), stage.dilation_px)
    assert torch.equal(edited[outside], source.frames[outside])

    def reencoded(frames: torch.Tensor) -> torch.Tensor:
        buf = io.BytesIO()
        remux_with_source_audio(frames, source.frame_rate, source, buf, crf=EDIT_CRF)
        return read_video(buf.getvalue()).frames

    edited_psnr = psnr(reencoded(edited), source.frames, outside)
    plain_psnr = psnr(reencoded(source.frames), source.frames, outside)
    print(f"outside-mask PSNR at crf {EDIT_CRF}: edited {edited_psnr:.2f} dB, plain re-encode {plain_psnr:.2f} dB")
    assert plain_psnr > 38.0  # the CRF itself keeps re-encoded pixels close
    assert abs(plain_psnr - edited_psnr) <= 1.0
