"""LTX-2's parallel plans, applied by the generic code of `imagine.parallel`: the Ulysses sequence-parallel adapter
(`SP_ADAPTER`), the AutoTP tensor-parallel plan (`TP_PLAN`, with `TensorParallelLTX2AttnProcessor`) and tensor
parallelism for its Gemma-3 text encoder (`apply_text_encoder_tp`).

Importing this module registers both plans for `LTX2VideoTransformer3DModel` in `imagine.parallel.registry`
(`imagine.models.parallel_plans` imports it on the first lookup).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2Attention,
    LTX2AudioVideoAttnProcessor,
    LTX2AudioVideoRotaryPosEmbed,
    LTX2VideoTransformer3DModel,
    LTX2VideoTransformerBlock,
)
from torch import nn

from imagine.parallel.registry import register_sequence_parallel, register_tensor_parallel
from imagine.parallel.tensor import TensorParallelPlan, apply_auto_tp
from imagine.parallel.ulysses import AttentionRole, SequenceParallelAdapter, SequenceParallelRuntime, gather_output

# --- sequence parallel ------------------------------------------------------------------------------------------


def _num_tokens(model: nn.Module, kwargs: dict[str, Any]) -> int:
    return kwargs["hidden_states"].shape[1]


def _shard_inputs(model: nn.Module, kwargs: dict[str, Any], runtime: SequenceParallelRuntime) -> None:
    """Shard LTX-2's video tokens before `proj_in`, their RoPE coordinates (so `rope` and `cross_attn_rope` give each
    rank its own cos/sin, split or interleaved alike) and a per-token (B, S) timestep (image-to-video: per-token
    modulation). Audio stays replicated on every rank: it has ~25 tokens per second against thousands of video
    tokens, so replicating it costs little compute, needs no audio head divisibility, and leaves audio self- and
    text attention untouched; only video-to-audio attention (audio queries, video keys) needs a merge."""
    if kwargs.get("video_self_attention_mask") is not None:
        raise NotImplementedError("video_self_attention_mask is not supported with sequence parallelism")
    hidden_states = kwargs["hidden_states"]
    if kwargs.get("video_coords") is None:
        missing = [name for name in ("num_frames", "height", "width") if kwargs.get(name) is None]
        if missing:
            raise ValueError(f"video_coords is None, so {missing} must be given to place the video tokens")
        kwargs["video_coords"] = model.rope.prepare_video_coords(
            hidden_states.shape[0],
            kwargs["num_frames"],
            kwargs["height"],
            kwargs["width"],
            hidden_states.device,
            fps=kwargs["fps"],
        )
    kwargs["video_coords"] = runtime.shard(kwargs["video_coords"], dim=2)  # [B, 3, S, 2]
    kwargs["hidden_states"] = runtime.shard(hidden_states, dim=1)
    timestep = kwargs["timestep"]
    if timestep.ndim == 2:
        if kwargs.get("audio_timestep") is None:
            kwargs["audio_timestep"] = timestep  # the model's default, taken before the video copy is sharded
        kwargs["timestep"] = runtime.shard(timestep, dim=1)
    if kwargs.get("video_keyframes_mask") is not None:
        kwargs["video_keyframes_mask"] = runtime.shard(kwargs["video_keyframes_mask"], dim=1)


SP_ADAPTER = SequenceParallelAdapter(
    attention_roles={
        r"transformer_blocks\.\d+\.attn1": AttentionRole.ULYSSES,
        r"transformer_blocks\.\d+\.video_to_audio_attn": AttentionRole.SHARDED_KV,
    },
    num_tokens=_num_tokens,
    shard_inputs=_shard_inputs,
    output_hooks={"proj_out": gather_output(1)},
)


# --- tensor parallel --------------------------------------------------------------------------------------------


def _rope_slice(
    emb: tuple[torch.Tensor, torch.Tensor] | None, rank: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's part of a RoPE (cos, sin) pair. "split" RoPE is per head, (B, heads, T, d/2): take this rank's
    heads; "interleaved" RoPE is per feature, (B, T, features): take this rank's features."""
    if emb is None:
        return None
    dim = 1 if emb[0].ndim == 4 else -1
    width = emb[0].shape[dim] // tp_size
    return tuple(t.narrow(dim, rank * width, width) for t in emb)  # type: ignore[return-value]


class TensorParallelLTX2AttnProcessor(LTX2AudioVideoAttnProcessor):
    """diffusers' LTX-2 attention processor on this rank's heads: the module it runs on holds column-sharded Q/K/V
    (and gate) projections, a row-parallel output projection, sharded Q/K RMSNorms (LTX-2 normalizes across all
    heads) and `heads` set to the local head count; this processor only narrows the rotary embeddings (each head
    has its own RoPE slice) to those heads."""

    def __init__(self, rank: int, tp_size: int):
        super().__init__()
        self.rank = rank
        self.tp_size = tp_size

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return super().__call__(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            _rope_slice(query_rotary_emb, self.rank, self.tp_size),
            _rope_slice(key_rotary_emb, self.rank, self.tp_size),
        )


def _check_tp(transformer: nn.Module, tp_size: int) -> None:
    """What besides the attention heads must split `tp_size` ways: per-head RoPE tables and the FFN widths."""
    for name, module in transformer.named_modules():
        if isinstance(module, LTX2AudioVideoRotaryPosEmbed) and module.rope_type == "split":
            if module.num_attention_heads % tp_size:
                raise ValueError(
                    f"transformer rope {name!r} has {module.num_attention_heads} heads, not divisible by tp_size={tp_size}"
                )
        elif isinstance(module, FeedForward):
            width = module.net[2].in_features
            if width % tp_size:
                raise ValueError(
                    f"transformer feed-forward {name!r} width {width} is not divisible by tp_size={tp_size}"
                )


# AutoTP's automatic policy cannot parse the LTX-2 blocks ("Not able to determine model policy automatically"):
# name the row-parallel linears (attention output, second FFN projection); the rest of a block goes column-wise.
TP_PLAN = TensorParallelPlan(
    row_parallel={LTX2VideoTransformerBlock: ("to_out.0", "net.2")},
    attention=LTX2Attention,
    processors=(LTX2AudioVideoAttnProcessor,),  # no STG/perturbed attention
    make_processor=TensorParallelLTX2AttnProcessor,
    head_norms=("norm_q", "norm_k"),
    check=_check_tp,
)


def apply_text_encoder_tp(text_encoder: nn.Module, tp_size: int, tp_grain_size: int = 64) -> nn.Module:
    """Shard LTX-2's Gemma-3 text encoder over the group with DeepSpeed AutoTP (automatic policy); return the module
    to put in place of `components["text_encoder"]` for `TextEncoderStage` (the same object, sharded in place).

    Its query and key/value head counts must be divisible by `tp_size` (Gemma-3 12B has 8 key/value heads); real
    Gemma-3 MLP widths are multiples of the default `tp_grain_size` (see `imagine.parallel.tensor.apply_auto_tp`).
    """
    return apply_auto_tp(text_encoder, tp_size, tp_grain_size, name="text_encoder")


register_sequence_parallel(LTX2VideoTransformer3DModel, SP_ADAPTER)
register_tensor_parallel(LTX2VideoTransformer3DModel, TP_PLAN)
