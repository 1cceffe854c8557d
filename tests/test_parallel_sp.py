"""Sequence parallel (DeepSpeed-Ulysses) on 2 gloo ranks equals the unsharded model: the attention cores, the LTX-2
transformer forward (padding, CFG batch 2, per-token timestep, both audio<->video cross-attention directions, split
and interleaved RoPE), the whole LTX-2 sampling loop (t2v and i2v), and the Wan VACE transformer with control
hidden states. References run unsharded in the test process on identically seeded models and inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from imagine.parallel.comm import CommCounter, TokenSharding, ulysses_all_to_all_bytes
from imagine.parallel.dist import run_ranks

if TYPE_CHECKING:
    from imagine.pipeline.types import GenerationSpec, PromptEmbeddings

WORLD = 2
# Rank bodies return numpy arrays, not tensors: run_ranks' queue would share tensor storage with a process that has
# exited.


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """max|a - b| / max|b|."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max())


# -- pure sharding logic (no ranks) ------------------------------------------------------------------------------


def test_token_sharding_pads_the_tail_and_masks_it():
    x = torch.arange(5.0).view(1, 5, 1)
    shards = [TokenSharding(5, 2, r) for r in range(2)]
    assert [s.local_tokens for s in shards] == [3, 3]
    assert shards[0].shard(x, 1).flatten().tolist() == [0.0, 1.0, 2.0]
    assert shards[1].shard(x, 1).flatten().tolist() == [3.0, 4.0, 0.0]
    assert shards[1].local_key_mask("cpu").tolist() == [True, True, False]
    assert shards[0].key_mask("cpu").tolist() == [True] * 5 + [False]
    assert TokenSharding(6, 2, 0).key_mask("cpu") is None
    with pytest.raises(ValueError, match="expected the full 5 tokens"):
        shards[0].shard(torch.zeros(1, 4, 1), 1)


def test_ulysses_theory_formula_and_errors():
    # per layer: q, k, v, out, each [B=2, ceil(9 / 2)=5 tokens, 4 heads, 8] fp32; half of each leaves the rank
    per_tensor = 2 * 5 * 4 * 8 * 4
    assert ulysses_all_to_all_bytes(9, 4, 8, 3, 2, batch_size=2, bytes_per_element=4) == 3 * 4 * per_tensor // 2
    assert ulysses_all_to_all_bytes(9, 4, 8, 3, 1) == 0
    with pytest.raises(ValueError, match="degree 2 does not divide num_heads=3"):
        ulysses_all_to_all_bytes(9, 3, 8, 3, 2)
    with pytest.raises(ValueError, match="num_tokens"):
        ulysses_all_to_all_bytes(0, 4, 8, 3, 2)


def test_enable_without_a_group_is_an_error():
    from diffusers import LTX2VideoTransformer3DModel

    from imagine.models.tiny import TRANSFORMER_CONFIG
    from imagine.parallel.ulysses import enable_sequence_parallel

    with pytest.raises(RuntimeError, match="no distributed group is initialized"):
        enable_sequence_parallel(LTX2VideoTransformer3DModel(**TRANSFORMER_CONFIG))
    with pytest.raises(TypeError, match="no adapter for Linear"):
        enable_sequence_parallel(torch.nn.Linear(2, 2))


# -- attention cores ----------------------------------------------------------------------------------------------


ATTENTION_TOKEN_COUNTS = [8, 7, 1]  # divisible; padded; fewer tokens than ranks (rank 1 holds only padding)


def _attention_cores(rank: int, world_size: int, token_counts: list[int]) -> dict[str, Any]:
    """Each rank feeds its token shard of the same q/k/v through the Ulysses core (DistributedAttention) and the
    sharded-KV core; returns the gathered outputs and the bytes counted."""
    from imagine.parallel.comm import gather_tokens
    from imagine.parallel.ulysses import SequenceParallelRuntime as _Runtime
    from imagine.parallel.ulysses import _ShardedKVCore, _UlyssesCore

    results: dict[str, Any] = {}
    for num_tokens in token_counts:
        q, k, v, audio_q = _attention_inputs(num_tokens)
        runtime = _Runtime(None, world_size, rank, CommCounter())
        runtime.sharding = sharding = TokenSharding(num_tokens, world_size, rank)
        local = _UlyssesCore(runtime)(sharding.shard(q, 1), sharding.shard(k, 1), sharding.shard(v, 1))
        ulysses_bytes = runtime.counter.all_to_all_bytes
        cross = _ShardedKVCore(runtime)(audio_q, sharding.shard(k, 1), sharding.shard(v, 1))
        results[num_tokens] = {
            "self": gather_tokens(local, 1, sharding).numpy(),
            "cross": cross.numpy(),
            "ulysses_bytes": ulysses_bytes,
            "kv_gather_bytes": runtime.counter.all_gather_bytes,
        }
    return results


def _attention_inputs(num_tokens: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(num_tokens)
    q, k, v = (torch.randn(2, num_tokens, 4, 8, generator=g) for _ in range(3))
    return q, k, v, torch.randn(2, 5, 4, 8, generator=g)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def test_attention_cores_match_local_attention_with_and_without_padding(sp_results):
    per_rank = [result["attention"] for result in sp_results]
    for num_tokens in ATTENTION_TOKEN_COUNTS:
        q, k, v, audio_q = _attention_inputs(num_tokens)
        for rank_result in per_rank:
            result = rank_result[num_tokens]
            assert rel_err(result["self"], _sdpa(q, k, v)) < 1e-5, num_tokens
            assert rel_err(result["cross"], _sdpa(audio_q, k, v)) < 1e-5, num_tokens
            expected = ulysses_all_to_all_bytes(num_tokens, 4, 8, 1, WORLD, batch_size=2, bytes_per_element=4)
            assert result["ulysses_bytes"] == expected
            assert result["kv_gather_bytes"] == 2 * 4 * 5 * (8 + 1) * 4 * (WORLD - 1)  # [B, H, Lq, D + 1] fp32
    # the Ulysses output on both ranks is the same full tensor
    assert np.array_equal(per_rank[0][7]["self"], per_rank[1][7]["self"])


# -- LTX-2 transformer forward -------------------------------------------------------------------------------------

# (latent frames, height, width, per-token timestep, precomputed coords, use_cross_timestep)
LTX2_CASES = {
    "t2v-9-tokens-padded": (3, 1, 3, False, True, True),
    "t2v-8-tokens": (2, 2, 2, False, False, False),
    "i2v-per-token-timestep-padded": (3, 1, 3, True, True, False),
    "i2v-per-token-timestep-cross": (1, 3, 5, True, False, True),
}
AUDIO_TOKENS, TEXT_TOKENS = 5, 6


def _ltx2_transformer(rope_type: str, num_attention_heads: int | None = None):
    from diffusers import LTX2VideoTransformer3DModel

    from imagine.models.tiny import TRANSFORMER_CONFIG

    config = {**TRANSFORMER_CONFIG, "rope_type": rope_type}
    if num_attention_heads is not None:
        config["num_attention_heads"] = num_attention_heads
    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(**config).eval()


def _ltx2_inputs(model, case: str) -> dict[str, Any]:
    frames, height, width, per_token, precomputed_coords, cross_timestep = LTX2_CASES[case]
    config = model.config
    g = torch.Generator().manual_seed(1)
    batch, num_tokens = 2, frames * height * width  # batch 2: CFG's (uncond, cond)
    t = torch.tensor([700.0, 700.0])
    timestep = t
    if per_token:  # image-to-video: the first latent frame is clean, timestep 0 on its tokens
        mask = torch.zeros(batch, num_tokens)
        mask[:, : height * width] = 1.0
        timestep = t.unsqueeze(-1) * (1 - mask)
    text_mask = torch.ones(batch, TEXT_TOKENS)
    text_mask[0, :2] = 0  # left-padded negative prompt
    inputs = {
        "hidden_states": torch.randn(batch, num_tokens, config.in_channels, generator=g),
        "audio_hidden_states": torch.randn(batch, AUDIO_TOKENS, config.audio_in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.caption_channels, generator=g),
        "audio_encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.caption_channels, generator=g),
        "timestep": timestep,
        "audio_timestep": t if per_token else None,
        "sigma": t / 1000,
        "encoder_attention_mask": text_mask,
        "audio_encoder_attention_mask": text_mask,
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": 24.0,
        "audio_num_frames": AUDIO_TOKENS,
        "use_cross_timestep": cross_timestep,
        "return_dict": False,
    }
    if precomputed_coords:
        inputs["video_coords"] = model.rope.prepare_video_coords(batch, frames, height, width, "cpu", fps=24.0)
        inputs["audio_coords"] = model.audio_rope.prepare_audio_coords(batch, AUDIO_TOKENS, "cpu")
    return inputs


@torch.no_grad()
def _ltx2_forward(rank: int, world_size: int, cases: list[str]) -> dict[str, Any]:
    from imagine.parallel.ulysses import enable_sequence_parallel

    results: dict[str, Any] = {}
    for rope_type in ("split", "interleaved"):
        model = _ltx2_transformer(rope_type)
        originals = dict(model.attn_processors)
        handle = enable_sequence_parallel(model)
        for case in cases:
            handle.comm.reset()
            video, audio = model(**_ltx2_inputs(model, case))
            results[rope_type, case] = (video.numpy(), audio.numpy(), handle.comm.per_forward())
        swapped = {name for name, p in model.attn_processors.items() if p is not originals[name]}
        results[rope_type, "swapped"] = sorted(swapped)
        handle.disable()
        results[rope_type, "restored"] = all(p is originals[n] for n, p in model.attn_processors.items())
        results[rope_type, "after-disable"] = model(**_ltx2_inputs(model, cases[0]))[0].numpy()
    results["heads-error"] = results["mask-error"] = None
    try:
        enable_sequence_parallel(_ltx2_transformer("split", num_attention_heads=1))
    except ValueError as e:
        results["heads-error"] = str(e)
    with enable_sequence_parallel(model):
        inputs = _ltx2_inputs(model, cases[0])
        num_tokens = inputs["hidden_states"].shape[1]
        try:
            model(**inputs, video_self_attention_mask=torch.ones(2, num_tokens, num_tokens))
        except NotImplementedError as e:
            results["mask-error"] = str(e)
    return results


@pytest.fixture(scope="module")
def ltx2_results(sp_results) -> list[dict[str, Any]]:
    return [result["ltx2"] for result in sp_results]


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
@pytest.mark.parametrize("case", list(LTX2_CASES))
def test_ltx2_forward_sp2_equals_unsharded(ltx2_results, case, rope_type):
    model = _ltx2_transformer(rope_type)
    with torch.no_grad():
        ref_video, ref_audio = model(**_ltx2_inputs(model, case))
    for rank_result in ltx2_results:
        video, audio, _ = rank_result[rope_type, case]
        assert rel_err(video, ref_video) < 1e-5
        # audio is replicated; video-to-audio attention over the sharded video tokens is merged exactly
        assert rel_err(audio, ref_audio) < 1e-5
    assert np.array_equal(ltx2_results[0][rope_type, case][1], ltx2_results[1][rope_type, case][1])


@pytest.mark.parametrize("case", ["t2v-9-tokens-padded", "t2v-8-tokens"])
def test_ltx2_comm_bytes_match_ulysses_theory(ltx2_results, case):
    from imagine.models.tiny import TRANSFORMER_CONFIG as C

    frames, height, width = LTX2_CASES[case][:3]
    num_tokens = frames * height * width
    per_forward = ltx2_results[0]["split", case][2]
    theory = ulysses_all_to_all_bytes(
        num_tokens,
        C["num_attention_heads"],
        C["attention_head_dim"],
        C["num_layers"],
        WORLD,
        batch_size=2,
        bytes_per_element=4,
    )
    assert per_forward["all_to_all_bytes"] == theory
    local = -(-num_tokens // WORLD)
    output_gather = 2 * local * C["out_channels"] * 4
    v2a_merge = (
        C["num_layers"] * 2 * C["audio_num_attention_heads"] * AUDIO_TOKENS * (C["audio_attention_head_dim"] + 1) * 4
    )
    assert per_forward["all_gather_bytes"] == output_gather + v2a_merge


def test_ltx2_sp_swaps_only_sharded_attentions_and_disable_restores(ltx2_results):
    from imagine.models.tiny import TRANSFORMER_CONFIG as C

    expected = sorted(
        f"transformer_blocks.{i}.{name}.processor"
        for i in range(C["num_layers"])
        for name in ("attn1", "video_to_audio_attn")
    )
    model = _ltx2_transformer("split")
    with torch.no_grad():
        reference = model(**_ltx2_inputs(model, "t2v-9-tokens-padded"))[0]
    for rank_result in ltx2_results:
        assert rank_result["split", "swapped"] == expected
        assert rank_result["split", "restored"]
        assert rel_err(rank_result["split", "after-disable"], reference) < 1e-5
        assert rank_result["mask-error"] == "video_self_attention_mask is not supported with sequence parallelism"
        assert rank_result["heads-error"] == (
            "sequence parallel degree 2 must divide the attention head count, but transformer_blocks.0.attn1 has "
            "1 heads"
        )


# -- the whole LTX-2 sampling loop ------------------------------------------------------------------------------------


def _denoise_spec(image: bool) -> GenerationSpec:
    from imagine.pipeline.types import GenerationSpec

    width, height = 96, 32  # latent 3 x 1, 17 frames -> 3 latent frames: 9 video tokens, padded on 2 ranks
    first_frame = torch.rand(3, height, width, generator=torch.Generator().manual_seed(3)) if image else None
    return GenerationSpec(
        prompt="p",
        negative_prompt="n",
        width=width,
        height=height,
        num_frames=17,
        num_inference_steps=2,
        seed=11,
        guidance_scale=3.0,
        guidance_rescale=0.7,
        image=first_frame,
    )


def _denoise_embeddings() -> PromptEmbeddings:
    from imagine.pipeline.types import PromptEmbeddings

    g = torch.Generator().manual_seed(5)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    mask[0, :3] = 0
    return PromptEmbeddings(
        video_embeds=torch.randn(2, TEXT_TOKENS, 32, generator=g),
        audio_embeds=torch.randn(2, TEXT_TOKENS, 32, generator=g),
        attention_mask=mask,
        classifier_free_guidance=True,
    )


def _denoise(images: list[bool]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from imagine.models.tiny import build_tiny_components
    from imagine.pipeline.denoise import DenoiserStage

    stage = DenoiserStage(build_tiny_components())
    out = []
    for image in images:
        latents = stage(_denoise_spec(image), _denoise_embeddings())
        out.append((latents.video, latents.audio))
    return out


DENOISE_IMAGES = [False, True]  # t2v, i2v (per-token timestep)


def _denoise_sp(rank: int, world_size: int, images: list[bool]) -> list[tuple[np.ndarray, np.ndarray]]:
    from imagine.models.tiny import build_tiny_components
    from imagine.parallel.ulysses import enable_sequence_parallel
    from imagine.pipeline.denoise import DenoiserStage

    stage = DenoiserStage(build_tiny_components())
    enable_sequence_parallel(stage.transformer)
    return [
        (latents.video.numpy(), latents.audio.numpy())
        for latents in (stage(_denoise_spec(image), _denoise_embeddings()) for image in images)
    ]


def test_denoiser_sampling_loop_sp2_equals_single_rank(sp_results):
    per_rank = [result["denoise"] for result in sp_results]
    reference = _denoise(DENOISE_IMAGES)
    for (ref_video, ref_audio), *ranks in zip(reference, *per_rank):
        for video, audio in ranks:
            assert rel_err(video, ref_video) < 1e-3
            assert rel_err(audio, ref_audio) < 1e-3
    assert (reference[0][0] - reference[1][0]).abs().max() > 1e-3  # the image really conditions the i2v run


# -- Wan VACE ------------------------------------------------------------------------------------------------------


def _wan_models():
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    common = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    }
    torch.manual_seed(0)
    vace = WanVACETransformer3DModel(**common, num_layers=3, vace_layers=[0, 2], vace_in_channels=96).eval()
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**common, num_layers=2).eval()
    return vace, wan


def _wan_inputs() -> tuple[dict[str, Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(2)
    batch, frames, height, width = 2, 3, 6, 6  # 3 x 3 x 3 = 27 tokens: padded on 2 ranks
    hidden = torch.randn(batch, 16, frames, height, width, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    vace = {
        "hidden_states": hidden,
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": text,
        "control_hidden_states": torch.randn(batch, 96, frames, height, width, generator=g),
        "control_hidden_states_scale": torch.tensor([1.0, 0.5]),
        "return_dict": False,
    }
    num_tokens = frames * (height // 2) * (width // 2)
    per_token = torch.full((batch, num_tokens), 500.0)
    per_token[:, :9] = 0.0  # Wan 2.2 TI2V style: first latent frame clean
    wan = {"hidden_states": hidden, "timestep": per_token, "encoder_hidden_states": text, "return_dict": False}
    return vace, wan


def _short_control(vace_inputs: dict[str, Any]) -> dict[str, Any]:
    """Control latents with fewer frames than the video: the model zero-pads the missing control tokens."""
    return {**vace_inputs, "control_hidden_states": vace_inputs["control_hidden_states"][:, :, :2]}


@torch.no_grad()
def _wan_forward(rank: int, world_size: int) -> dict[str, Any]:
    from imagine.parallel.ulysses import enable_sequence_parallel

    vace, wan = _wan_models()
    vace_inputs, wan_inputs = _wan_inputs()
    results = {}
    with enable_sequence_parallel(vace) as handle:
        results["vace"] = vace(**vace_inputs)[0].numpy()
        results["vace-bytes"] = handle.comm.per_forward()["all_to_all_bytes"]
        results["vace-short-control"] = vace(**_short_control(vace_inputs))[0].numpy()
    with enable_sequence_parallel(wan):
        results["wan"] = wan(**wan_inputs)[0].numpy()
    return results


def test_wan_vace_forward_sp2_equals_unsharded(sp_results):
    per_rank = [result["wan"] for result in sp_results]
    vace, wan = _wan_models()
    vace_inputs, wan_inputs = _wan_inputs()
    with torch.no_grad():
        ref_vace = vace(**vace_inputs)[0]
        ref_wan = wan(**wan_inputs)[0]
        ref_short_control = vace(**_short_control(vace_inputs))[0]
    # the control branch really contributes, so parity covers the sharded VACE hints
    with torch.no_grad():
        no_control = vace(**{**vace_inputs, "control_hidden_states_scale": torch.zeros(2)})[0]
    assert (no_control - ref_vace).abs().max() > 1e-3
    theory = ulysses_all_to_all_bytes(27, 2, 12, 3 + 2, WORLD, batch_size=2, bytes_per_element=4)  # 3 + 2 VACE blocks
    for result in per_rank:
        assert rel_err(result["vace"], ref_vace) < 1e-5
        assert rel_err(result["vace-short-control"], ref_short_control) < 1e-5
        assert rel_err(result["wan"], ref_wan) < 1e-5
        assert result["vace-bytes"] == theory


# -- one 2-rank launch for the whole file (each launch costs seconds of imports on a busy machine) -------------------


def _rank_body(rank: int, world_size: int) -> dict[str, Any]:
    return {
        "attention": _attention_cores(rank, world_size, ATTENTION_TOKEN_COUNTS),
        "ltx2": _ltx2_forward(rank, world_size, list(LTX2_CASES)),
        "denoise": _denoise_sp(rank, world_size, DENOISE_IMAGES),
        "wan": _wan_forward(rank, world_size),
    }


@pytest.fixture(scope="module")
def sp_results() -> list[dict[str, Any]]:
    return run_ranks(_rank_body, WORLD)
