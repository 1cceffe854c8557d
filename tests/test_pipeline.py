"""Generation stages on the tiny LTX-2 model: golden parity with diffusers, determinism, resumable steps, muxing."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from imagine.models.loading import load_components
from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.generate import LocalGenerator
from imagine.pipeline.media import mux_mp4, probe
from imagine.pipeline.types import DecodedMedia, GenerationSpec, prepare_image

WIDTH, HEIGHT, FRAMES, STEPS, FPS = 128, 64, 17, 3, 24.0


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> LocalGenerator:
    return LocalGenerator(tiny_model_dir)


def make_spec(**overrides) -> GenerationSpec:
    values = dict(
        prompt="a robot dancing in the rain",
        negative_prompt="blurry",
        width=WIDTH,
        height=HEIGHT,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        guidance_rescale=0.7,
        seed=42,
        fps=FPS,
    )
    values.update(overrides)
    return GenerationSpec(**values)


def test_image() -> PIL.Image.Image:
    pixels = (np.random.RandomState(0).rand(HEIGHT, WIDTH, 3) * 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


def run_stages(generator: LocalGenerator, spec: GenerationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=spec.do_classifier_free_guidance)
    latents = generator.denoiser(spec, embeddings)
    return generator.decoder.decode_video(latents), generator.decoder.decode_audio(latents)


def diffusers_reference(pipeline_cls, model_dir: Path, spec: GenerationSpec, **extra):
    pipe = pipeline_cls.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        num_frames=spec.num_frames,
        frame_rate=spec.fps,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        guidance_rescale=spec.guidance_rescale,
        audio_guidance_scale=spec.effective_audio_guidance_scale,
        audio_guidance_rescale=spec.guidance_rescale,
        stg_scale=0.0,
        audio_stg_scale=0.0,
        modality_scale=1.0,
        audio_modality_scale=1.0,
        generator=torch.Generator().manual_seed(spec.seed),
        output_type="pt",
        **extra,
    )
    return out.frames[0], out.audio[0]


# --- golden parity with diffusers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_text_to_video_matches_diffusers(generator, tiny_model_dir, guidance_scale):
    from diffusers import LTX2Pipeline

    spec = make_spec(guidance_scale=guidance_scale)
    video, audio = run_stages(generator, spec)
    ref_video, ref_audio = diffusers_reference(LTX2Pipeline, tiny_model_dir, spec)
    assert video.shape == ref_video.shape == (FRAMES, 3, HEIGHT, WIDTH)
    assert audio.shape == ref_audio.shape
    assert (video - ref_video).abs().max() < 1e-4
    assert (audio - ref_audio).abs().max() < 1e-4


def test_image_to_video_matches_diffusers(generator, tiny_model_dir):
    from diffusers import LTX2ImageToVideoPipeline

    image = test_image()
    spec = make_spec(image=prepare_image(image, WIDTH, HEIGHT))
    video, audio = run_stages(generator, spec)
    ref_video, ref_audio = diffusers_reference(LTX2ImageToVideoPipeline, tiny_model_dir, spec, image=image, image_crf=0)
    assert (video - ref_video).abs().max() < 1e-4
    assert (audio - ref_audio).abs().max() < 1e-4
    t2v_video, _ = run_stages(generator, make_spec())
    assert (video - t2v_video).abs().max() > 1e-3  # the image really conditions the clip


# --- determinism ---------------------------------------------------------------------------------------------------


def test_seed_determinism(generator):
    first = generator.generate(make_spec(seed=7))
    again = generator.generate(make_spec(seed=7))
    other = generator.generate(make_spec(seed=8))
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.audio, again.audio)
    assert not np.array_equal(first.frames, other.frames)
    assert not np.array_equal(first.audio, other.audio)
    assert first.frames.dtype == np.uint8 and first.frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert first.audio.dtype == np.float32 and first.audio.shape[0] == 2
    assert first.sample_rate == 16000 and first.fps == FPS


# --- resumable stepping --------------------------------------------------------------------------------------------


def test_stepwise_equals_call_and_resumes_in_a_fresh_stage(generator, tiny_model_dir):
    spec = make_spec(image=prepare_image(test_image(), WIDTH, HEIGHT))
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=True)
    whole = generator.denoiser(spec, embeddings)

    state = generator.denoiser.prepare(spec, embeddings)
    state = generator.denoiser.step(state, embeddings)
    # checkpoint after one step, resume in a stage built from freshly loaded components
    checkpoint = pickle.dumps((state.to_cpu(), embeddings.to_cpu()))
    components = load_components(tiny_model_dir, DenoiserStage.components, "cpu", torch.float32)
    other = DenoiserStage(components, "cpu", torch.float32)
    state, embeddings = pickle.loads(checkpoint)
    assert state.step_index == 1
    while not state.done:
        state = other.step(state, embeddings)
    resumed = other.finish(state)
    assert torch.equal(resumed.video, whole.video)
    assert torch.equal(resumed.audio, whole.audio)
    with pytest.raises(ValueError, match="step_index"):
        other.step(state, embeddings)


def test_step_hook_called_after_each_step_and_can_stop(generator):
    spec = make_spec()
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=True)
    calls = []
    generator.denoiser(spec, embeddings, step_hook=lambda done, total: calls.append((done, total)))
    assert calls == [(1, STEPS), (2, STEPS), (3, STEPS)]

    class Cancelled(Exception):
        pass

    seen = []

    def cancel_after_first(done: int, total: int) -> None:
        seen.append(done)
        raise Cancelled

    with pytest.raises(Cancelled):
        generator.denoiser(spec, embeddings, step_hook=cancel_after_first)
    assert seen == [1]


def test_finish_before_done_is_an_error(generator):
    spec = make_spec()
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=True)
    state = generator.denoiser.prepare(spec, embeddings)
    with pytest.raises(ValueError, match="still to run"):
        generator.denoiser.finish(state)


# --- input validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 48}, "height"),
        ({"num_frames": 16}, "num_frames"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"image": torch.zeros(3, 32, 32)}, "image"),
        ({"image": torch.zeros(HEIGHT, WIDTH, 3)}, "image"),
    ],
)
def test_bad_inputs_name_the_field(generator, overrides, field):
    spec = make_spec(**overrides)
    with pytest.raises(ValueError, match=field):
        generator.generate(spec)


def test_guidance_mismatch_is_rejected(generator):
    spec = make_spec(guidance_scale=3.0)
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=False)
    with pytest.raises(ValueError, match="classifier_free_guidance"):
        generator.denoiser.prepare(spec, embeddings)


def test_decoder_rejects_wrong_latents(generator):
    spec = make_spec()
    embeddings = generator.encoder(spec.prompt, spec.negative_prompt, guidance=True)
    latents = generator.denoiser(spec, embeddings)
    with pytest.raises(ValueError, match="latents.video"):
        generator.decoder(replace(latents, video=latents.video[:, :2]))
    assert isinstance(generator.decoder, DecoderStage)


def test_prepare_image_covers_and_center_crops():
    wide = PIL.Image.new("RGB", (400, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 100, 100))  # blue left quarter is cropped away by a square center crop
    tensor = prepare_image(wide, 64, 64)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert float(tensor[0].mean()) > 0.99 and float(tensor[2].mean()) < 0.01
    assert prepare_image(PIL.Image.new("L", (10, 30)), 96, 32).shape == (3, 32, 96)


# --- mux -----------------------------------------------------------------------------------------------------------


def test_mux_mp4_has_h264_aac_right_size_and_durations(generator, tmp_path):
    media = generator.generate(make_spec(num_frames=25, num_inference_steps=2))
    path = tmp_path / "clip.mp4"
    info = mux_mp4(media, path)
    probed = probe(path)
    assert probed.video_codec == "h264" and probed.audio_codec == "aac"
    assert probed.pix_fmt == "yuv420p"
    assert (probed.width, probed.height) == (WIDTH, HEIGHT) == (info.width, info.height)
    assert probed.num_frames == 25 == info.num_frames
    assert probed.fps == pytest.approx(FPS)
    assert probed.sample_rate == media.sample_rate == info.sample_rate and probed.audio_channels == 2
    assert abs(probed.audio_duration_s - probed.duration_s) < 0.1
    assert info.duration_s == pytest.approx(25 / FPS)
    assert abs(info.audio_duration_s - info.duration_s) < 0.1
    assert info.bytes == path.stat().st_size == probed.bytes > 0

    buffer = io.BytesIO()
    assert mux_mp4(media, buffer).bytes == len(buffer.getvalue()) > 0
    assert probe(buffer.getvalue()).num_frames == 25


def test_mux_rejects_odd_size(tmp_path):
    media = DecodedMedia(
        frames=np.zeros((3, 33, 32, 3), np.uint8), audio=np.zeros((2, 100), np.float32), sample_rate=16000, fps=24.0
    )
    with pytest.raises(ValueError, match="even"):
        mux_mp4(media, tmp_path / "x.mp4")
