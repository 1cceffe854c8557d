"""Wan's and Wan VACE's Ulysses sequence-parallel adapters (`SP_ADAPTER`, `VACE_SP_ADAPTER`), applied by
`imagine.parallel.ulysses`.

Importing this module registers them for `WanTransformer3DModel` and `WanVACETransformer3DModel` in
`imagine.parallel.registry` (`imagine.models.parallel_plans` imports it on the first lookup).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from torch import nn

from imagine.parallel.registry import register_sequence_parallel
from imagine.parallel.ulysses import (
    AttentionRole,
    OutputHook,
    SequenceParallelAdapter,
    SequenceParallelRuntime,
    gather_output,
)


def _num_tokens(model: nn.Module, kwargs: dict[str, Any]) -> int:
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p_t, p_h, p_w = model.config.patch_size
    return (frames // p_t) * (height // p_h) * (width // p_w)


def _shard_inputs(model: nn.Module, kwargs: dict[str, Any], runtime: SequenceParallelRuntime) -> None:
    """Wan embeds tokens with a conv (sharded at its output, see `_shard_patches`); only a per-token (B, S)
    timestep (Wan 2.2 TI2V) is sharded here."""
    if kwargs["timestep"].ndim == 2:
        kwargs["timestep"] = runtime.shard(kwargs["timestep"], dim=1)


def _vace_shard_inputs(model: nn.Module, kwargs: dict[str, Any], runtime: SequenceParallelRuntime) -> None:
    """Nothing to shard before the patch embeddings; the VACE forward only takes a per-batch timestep (a per-token
    one would fail deep inside the model, so say so here)."""
    if kwargs["timestep"].ndim != 1:
        raise ValueError(
            f"timestep must be 1-D (batch,) for WanVACETransformer3DModel, got {kwargs['timestep'].ndim}-D"
        )


def _shard_patches(output: torch.Tensor, runtime: SequenceParallelRuntime) -> torch.Tensor:
    """Conv patch embedding [B, C, F, H, W] -> this rank's tokens shaped [B, C, 1, 1, S_local], so the forward's own
    `.flatten(2).transpose(1, 2)` yields the [B, S_local, C] shard."""
    tokens = output.flatten(2)
    local = runtime.shard(tokens, dim=2)
    return local.view(*local.shape[:2], 1, 1, local.shape[2])


def _shard_control_patches(output: torch.Tensor, runtime: SequenceParallelRuntime) -> torch.Tensor:
    """VACE control tokens are zero-padded to the video token count by the forward; do that before sharding them
    with the same split as the video tokens (the forward's own padding then adds nothing)."""
    tokens = output.flatten(2)
    num_tokens = runtime.current().num_tokens
    if tokens.shape[2] > num_tokens:
        raise ValueError(
            f"control_hidden_states has {tokens.shape[2]} tokens after patch embedding, more than the {num_tokens} "
            "video tokens"
        )
    if tokens.shape[2] < num_tokens:
        tokens = torch.cat([tokens, tokens.new_zeros(*tokens.shape[:2], num_tokens - tokens.shape[2])], dim=2)
    local = runtime.shard(tokens, dim=2)
    return local.view(*local.shape[:2], 1, 1, local.shape[2])


def _shard_rope(
    output: tuple[torch.Tensor, torch.Tensor], runtime: SequenceParallelRuntime
) -> tuple[torch.Tensor, ...]:
    return tuple(runtime.shard(freqs, dim=1) for freqs in output)  # cos, sin: [1, S, 1, D]


_OUTPUT_HOOKS: dict[str, OutputHook] = {
    "rope": _shard_rope,
    "patch_embedding": _shard_patches,
    "proj_out": gather_output(1),
}

SP_ADAPTER = SequenceParallelAdapter(
    attention_roles={r"blocks\.\d+\.attn1": AttentionRole.ULYSSES},
    num_tokens=_num_tokens,
    shard_inputs=_shard_inputs,
    output_hooks=_OUTPUT_HOOKS,
)

# VACE blocks build the "hints" added to the main stream per token: same split as the video tokens.
VACE_SP_ADAPTER = SequenceParallelAdapter(
    attention_roles={r"(vace_)?blocks\.\d+\.attn1": AttentionRole.ULYSSES},
    num_tokens=_num_tokens,
    shard_inputs=_vace_shard_inputs,
    output_hooks={**_OUTPUT_HOOKS, "vace_patch_embedding": _shard_control_patches},
)

register_sequence_parallel(WanTransformer3DModel, SP_ADAPTER)
register_sequence_parallel(WanVACETransformer3DModel, VACE_SP_ADAPTER)
