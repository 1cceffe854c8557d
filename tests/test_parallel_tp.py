"""Tensor parallelism (DeepSpeed AutoTP) on 2 gloo ranks equals the single-process result: the text encoder through
`TextEncoderStage`, the LTX-2 transformer through the whole `DenoiserStage` sampling loop."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from imagine.models.ltx2.parallel import apply_text_encoder_tp
from imagine.parallel.dist import run_ranks
from imagine.parallel.tensor import all_reduce_sum_, apply_transformer_tp
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.types import GenerationSpec

PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry"
TOLERANCE = 1e-3  # relative: max|tp - single| / max|single|


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def components_with_tp_text_encoder() -> dict[str, Any]:
    """Tiny components whose Gemma has 2 key/value heads (the tiny preset has 1, which 2 ranks cannot split;
    the real Gemma-3 12B has 8). Seeded: every process builds the same weights."""
    from transformers import Gemma3ForConditionalGeneration

    from imagine.models.tiny import build_tiny_components

    components = build_tiny_components()
    config = components["text_encoder"].config
    config.text_config.num_key_value_heads = 2
    torch.manual_seed(0)
    components["text_encoder"] = Gemma3ForConditionalGeneration(config).eval()
    return components


def spec() -> GenerationSpec:
    return GenerationSpec(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=128, height=64, num_frames=17, num_inference_steps=3, seed=3
    )


# --- rank bodies (module level: run_ranks spawns) ---------------------------------------------------------------


def _text_encoder_rank(rank: int, world_size: int) -> dict[str, Any]:
    components = components_with_tp_text_encoder()
    # Default grain (64) on the tiny MLP width (64) would give rank 1 nothing: must be refused, not run silently.
    try:
        apply_text_encoder_tp(copy.deepcopy(components["text_encoder"]), world_size)
        coarse_error = None
    except ValueError as e:
        coarse_error = str(e)

    # a second init_inference in the same process
    module = apply_text_encoder_tp(components["text_encoder"], world_size, tp_grain_size=8)
    layer = module.model.language_model.layers[0]
    components["text_encoder"] = module
    embeddings = TextEncoderStage(components)(PROMPT, NEGATIVE)
    return {
        "coarse_error": coarse_error,
        "q_proj": tuple(layer.self_attn.q_proj.weight.shape),
        "down_proj": tuple(layer.mlp.down_proj.weight.shape),
        # numpy, not tensors: run_ranks' queue would share tensor storage with a process that has exited
        "video_embeds": embeddings.video_embeds.numpy(),
        "audio_embeds": embeddings.audio_embeds.numpy(),
        "attention_mask": embeddings.attention_mask.numpy(),
    }


def _transformer_loop_rank(rank: int, world_size: int, embeddings) -> dict[str, Any]:
    from imagine.models.tiny import build_tiny_components

    components = build_tiny_components()
    info = apply_transformer_tp(components["transformer"], world_size)
    block = components["transformer"].transformer_blocks[0]
    latents = DenoiserStage(components)(spec(), embeddings)
    return {
        "info": info,
        "to_q": tuple(block.attn1.to_q.weight.shape),
        "heads": block.attn1.heads,
        "video": latents.video.numpy(),
        "audio": latents.audio.numpy(),
    }


def _variant_forward_rank(rank: int, world_size: int) -> list[tuple[float, float]]:
    """Interleaved RoPE and gated attention (LTX-2.3-style options the tiny preset does not use), one forward."""
    from diffusers import LTX2VideoTransformer3DModel

    from imagine.models.tiny import TRANSFORMER_CONFIG

    errors = []
    for rope_type in ("interleaved", "split"):
        torch.manual_seed(0)
        config = {**TRANSFORMER_CONFIG, "rope_type": rope_type, "gated_attn": True, "audio_gated_attn": True}
        transformer = LTX2VideoTransformer3DModel(**config).eval()
        inputs = _forward_inputs()
        with torch.no_grad():
            expected = transformer(**inputs)
            apply_transformer_tp(transformer, world_size)
            actual = transformer(**inputs)
        errors.append((rel_err(actual[0], expected[0]), rel_err(actual[1], expected[1])))
    return errors


def _forward_inputs() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    batch, frames, height, width, audio_frames, text = 2, 2, 3, 4, 5, 7
    mask = torch.ones(batch, text)
    mask[0, :3] = 0  # left padding on one row: the mask reaches the split heads
    return {
        "hidden_states": torch.randn(batch, frames * height * width, 4, generator=generator),
        "audio_hidden_states": torch.randn(batch, audio_frames, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=generator),
        "audio_encoder_hidden_states": torch.randn(batch, text, 32, generator=generator),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_attention_mask": mask,
        "audio_encoder_attention_mask": mask,
        "num_frames": frames,
        "height": height,
        "width": width,
        "audio_num_frames": audio_frames,
        "return_dict": False,
    }


def _all_reduce_rank(rank: int, world_size: int) -> list[list[float]]:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
    transposed = base.clone().t()  # non-contiguous view: the shm kernel alone would leave it unreduced
    return [all_reduce_sum_(base.clone()).tolist(), all_reduce_sum_(transposed).t().tolist()]


def _all_parts_rank(rank: int, world_size: int, embeddings) -> dict[str, Any]:
    """Every rank body above in one process pair (each spawn re-imports torch, diffusers and DeepSpeed: ~10 s on
    2 cores). A part that raises is reported as its traceback, so one failure does not hide the others."""
    import traceback

    parts = {
        "text_encoder": lambda: _text_encoder_rank(rank, world_size),
        "transformer_loop": lambda: _transformer_loop_rank(rank, world_size, embeddings),
        "variant_forward": lambda: _variant_forward_rank(rank, world_size),
        "all_reduce": lambda: _all_reduce_rank(rank, world_size),
    }
    out: dict[str, Any] = {}
    for name, part in parts.items():
        try:
            out[name] = part()
        except Exception:  # noqa: BLE001 - the test of that part fails with this text
            out[name] = RuntimeError(traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def tp_results() -> dict[str, Any]:
    from imagine.models.tiny import build_tiny_components

    components = build_tiny_components()
    embeddings = TextEncoderStage(components)(PROMPT, NEGATIVE)
    per_rank = run_ranks(_all_parts_rank, 2, embeddings)
    return {"components": components, "embeddings": embeddings, "per_rank": per_rank}


def _part(tp_results: dict[str, Any], name: str) -> list[Any]:
    out = [r[name] for r in tp_results["per_rank"]]
    for rank, value in enumerate(out):
        if isinstance(value, RuntimeError):
            pytest.fail(f"rank {rank} failed in {name}:\n{value}")
    return out


# --- tests ------------------------------------------------------------------------------------------------------


def test_text_encoder_tp2_matches_single_process(tp_results):
    expected = TextEncoderStage(components_with_tp_text_encoder())(PROMPT, NEGATIVE)
    results = _part(tp_results, "text_encoder")
    for result in results:
        assert result["coarse_error"] is not None and "tp_grain_size" in result["coarse_error"]
        assert result["q_proj"] == (16, 32)  # 2 heads x 16 of 32 input features: half the heads per rank
        assert result["down_proj"] == (32, 32)  # half of the 64-wide MLP
        assert rel_err(torch.from_numpy(result["video_embeds"]), expected.video_embeds) < TOLERANCE
        assert rel_err(torch.from_numpy(result["audio_embeds"]), expected.audio_embeds) < TOLERANCE
        assert torch.equal(torch.from_numpy(result["attention_mask"]), expected.attention_mask)


def test_transformer_tp2_sampling_loop_matches_single_process(tp_results):
    expected = DenoiserStage(tp_results["components"])(spec(), tp_results["embeddings"])
    results = _part(tp_results, "transformer_loop")
    for rank, result in enumerate(results):
        info = result["info"]
        assert (info.tp_size, info.rank) == (2, rank)
        assert info.sharded_attentions == 6 * 2  # six attentions per block, two blocks
        assert info.sharded_linears == (6 * 4 + 2 * 2) * 2  # q, k, v, out per attention; two per FFN
        assert info.parameters_after < info.parameters_before
        assert result["to_q"] == (8, 16) and result["heads"] == 1
        video, audio = torch.from_numpy(result["video"]), torch.from_numpy(result["audio"])
        assert video.shape == expected.video.shape and audio.shape == expected.audio.shape
        assert rel_err(video, expected.video) < TOLERANCE
        assert rel_err(audio, expected.audio) < TOLERANCE


def test_transformer_tp2_interleaved_rope_and_gated_attention(tp_results):
    for per_rank in _part(tp_results, "variant_forward"):
        for video_err, audio_err in per_rank:
            assert video_err < TOLERANCE and audio_err < TOLERANCE


def test_all_reduce_sum_reduces_non_contiguous_tensors(tp_results):
    expected = (torch.arange(6, dtype=torch.float32).reshape(2, 3) * 3).tolist()
    for contiguous, non_contiguous in _part(tp_results, "all_reduce"):
        assert contiguous == expected
        assert non_contiguous == expected


def test_tp_arguments_are_checked_before_any_collective():
    from imagine.models.tiny import build_tiny_components

    components = build_tiny_components()
    transformer, text_encoder = components["transformer"], components["text_encoder"]
    with pytest.raises(ValueError, match="num_key_value_heads=1"):
        apply_text_encoder_tp(text_encoder, 2)
    with pytest.raises(ValueError, match="tp_size"):
        apply_transformer_tp(transformer, 0)
    with pytest.raises(ValueError, match="heads, not divisible by tp_size=3"):
        apply_transformer_tp(transformer, 3)
    with pytest.raises(TypeError, match="LTX2VideoTransformer3DModel"):
        apply_transformer_tp(text_encoder, 2)
    with pytest.raises(ValueError, match="process group"):  # no group in this process
        apply_transformer_tp(transformer, 2)
    info = apply_transformer_tp(transformer, 1)
    assert info.sharded_linears == 0 and info.parameters_after == info.parameters_before
    assert apply_text_encoder_tp(text_encoder, 1) is text_encoder
