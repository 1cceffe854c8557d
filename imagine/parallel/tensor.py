"""Tensor parallelism with DeepSpeed AutoTP: the Gemma-3 text encoder (automatic policy) and the LTX-2 transformer
(explicit injection policy + an attention adapter that keeps the across-heads QK RMSNorm and RoPE exact).

Every rank of the group holds 1/N of each sharded weight, gets the same inputs and returns the same (replicated)
outputs, so a stage runs unchanged on top of a parallelized module. The group is the whole default group
(`imagine.parallel.dist.init_distributed`): `tp_size` must equal the world size.

Why the pieces below exist (see FINDINGS "Tensor parallel"):

* AutoTP's automatic policy cannot parse the LTX-2 blocks ("Not able to determine model policy automatically").
  An explicit `injection_policy` naming the row-parallel layers (`to_out.0`, `net.2`) shards every other linear
  of a block column-wise, which is right for the FFNs and for Q/K/V/gate, but LTX-2 normalizes Q and K with one
  RMSNorm across *all* heads and gives each head its own RoPE slice. `_ShardedRMSNorm` all-reduces the sum of
  squares so each rank normalizes its heads by the full-width statistic, and `TensorParallelLTX2AttnProcessor`
  hands each rank the RoPE slice of its own heads. With those, TP2 equals TP1 to float rounding.
* DeepSpeed's CPU shared-memory all-reduce (`torch.ops.deepspeed.inference_all_reduce_`, used whenever
  `LOCAL_SIZE` == world size) silently does nothing to a non-contiguous tensor: its kernel reduces
  `self.contiguous()`, a *copy*, and returns the untouched input (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp,
  `inference_all_reduce__cpu`). AutoTP's own `LinearAllreduce` only ever reduces fresh `matmul` outputs, which are
  contiguous, and its weight shards are contiguous copies; every collective of ours goes through `all_reduce_sum_`,
  which reduces a contiguous buffer and copies it back.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# LTX-2 names the parallel layer knows (the "small adapter table" of DESIGN section 2): the block class whose linears
# AutoTP shards, the linears that are row-parallel (all-reduced outputs), and the attention module it adapts.
_LTX2_ROW_PARALLEL = ("to_out.0", "net.2")


@dataclass(frozen=True)
class TensorParallelInfo:
    """What `apply_transformer_tp` did on this rank."""

    tp_size: int
    rank: int
    sharded_linears: int
    """Linear layers split across ranks (column- or row-parallel)."""
    sharded_attentions: int
    """Attention modules whose heads are split (each rank runs `heads / tp_size` heads)."""
    parameters_before: int
    parameters_after: int
    """This rank's parameter count once sharded (replicated parts included)."""


def _dist():
    import deepspeed.comm as dist

    return dist


def _validate_tp_size(tp_size: int) -> None:
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")


def _group_rank(tp_size: int) -> int:
    """This process's rank in the group tensor parallelism runs on; raise if `tp_size` does not match the group."""
    if tp_size == 1:
        return 0
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            f"tp_size={tp_size} needs an initialized process group (imagine.parallel.dist.init_distributed)"
        )
    world = torch.distributed.get_world_size()
    if world != tp_size:
        raise ValueError(
            f"tp_size={tp_size} must equal the process group's world size ({world}); tensor parallelism spans the "
            f"whole group"
        )
    return torch.distributed.get_rank()


def all_reduce_sum_(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `tensor` in place across the group with DeepSpeed's inference all-reduce (shared memory on CPU when all
    ranks are local, NCCL on CUDA) and return it. Safe for non-contiguous tensors, which the shm kernel would
    silently leave unreduced (module docstring)."""
    dist = _dist()
    if tensor.is_contiguous():
        dist.inference_all_reduce(tensor, group=group)
        return tensor
    buffer = tensor.contiguous()
    dist.inference_all_reduce(buffer, group=group)
    return tensor.copy_(buffer)


@dataclass(frozen=True)
class _ShardTable:
    """Every rank's local width of each AutoTP-sharded linear, gathered once so all ranks check the same table."""

    names: list[str]
    split_dims: list[int]
    """1 for row-parallel (input features split, output all-reduced), 0 for column-parallel."""
    widths: torch.Tensor
    """[tp_size, len(names)] local widths of the split dimension."""


def _gather_shard_table(module: torch.nn.Module, tp_size: int) -> _ShardTable:
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    names, split_dims, local = [], [], []
    for name, layer in module.named_modules():
        if isinstance(layer, (LinearAllreduce, LinearLayer)):
            split_dim = 1 if isinstance(layer, LinearAllreduce) else 0
            names.append(name)
            split_dims.append(split_dim)
            local.append(int(layer.weight.shape[split_dim]))
    # NCCL only moves CUDA tensors: gather on this rank's GPU there, on the CPU under gloo
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    local_widths = torch.tensor(local, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local_widths) for _ in range(tp_size)]
    torch.distributed.all_gather(gathered, local_widths)
    return _ShardTable(names, split_dims, torch.stack(gathered).cpu())


def _linear_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: layer.weight.shape for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)}


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _init_inference(module: torch.nn.Module, tp_size: int, **extra: Any) -> torch.nn.Module:
    """`deepspeed.init_inference` without kernel injection; returns the (in-place) sharded module."""
    import deepspeed

    dtype = next(module.parameters()).dtype
    tensor_parallel = {"tp_size": tp_size, **extra.pop("tensor_parallel", {})}
    engine = deepspeed.init_inference(
        module, tensor_parallel=tensor_parallel, replace_with_kernel_inject=False, dtype=dtype, **extra
    )
    if engine.module is not module:  # DeepSpeed shards in place; the stages keep their references
        raise RuntimeError("deepspeed.init_inference returned a different module; expected in-place sharding")
    return engine.module


# --- text encoder ----------------------------------------------------------------------------------------------


def apply_text_encoder_tp(text_encoder: torch.nn.Module, tp_size: int, tp_grain_size: int = 64) -> torch.nn.Module:
    """Shard a Hugging Face text encoder (LTX-2's Gemma-3) over the group with DeepSpeed AutoTP; return the module
    to put in place of `components["text_encoder"]` for `TextEncoderStage` (the same object, sharded in place).

    Attention is split by key/value heads, so both head counts must be divisible by `tp_size`. `tp_grain_size` is
    AutoTP's split granularity for MLP widths (64 keeps GEMM shapes aligned; real Gemma-3 widths are multiples of
    it); a rank whose share would be empty raises instead of silently running the whole layer on another rank.
    """
    _validate_tp_size(tp_size)
    if not isinstance(tp_grain_size, int) or tp_grain_size < 1:
        raise ValueError(f"tp_grain_size must be an int >= 1, got {tp_grain_size!r}")
    config = getattr(text_encoder, "config", None)
    text_config = getattr(config, "text_config", config)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text_config, field, None)
        if heads is not None and heads % tp_size != 0:
            raise ValueError(f"text_encoder config {field}={heads} is not divisible by tp_size={tp_size}")
    _group_rank(tp_size)
    if tp_size == 1:
        return text_encoder

    full = _linear_shapes(text_encoder)
    module = _init_inference(text_encoder, tp_size, tensor_parallel={"tp_grain_size": tp_grain_size})
    table = _gather_shard_table(module, tp_size)
    for i, name in enumerate(table.names):
        widths = table.widths[:, i]
        if int(widths.min()) == 0:
            raise ValueError(
                f"text_encoder layer {name!r} of shape {tuple(full[name])} was split {widths.tolist()}: rank(s) "
                f"{widths.eq(0).nonzero().flatten().tolist()} hold nothing of it; lower tp_grain_size={tp_grain_size} "
                f"or tp_size={tp_size}"
            )
    return module


# --- LTX-2 transformer -----------------------------------------------------------------------------------------


class _ShardedRMSNorm(torch.nn.Module):
    """`torch.nn.RMSNorm` over a feature dimension split across ranks: the sum of squares is all-reduced so each rank
    scales its slice by the full-width root mean square, as the unsharded norm does."""

    def __init__(self, norm: torch.nn.RMSNorm, rank: int, tp_size: int):
        super().__init__()
        (self.full_dim,) = norm.normalized_shape
        if self.full_dim % tp_size:
            raise ValueError(f"RMSNorm width {self.full_dim} is not divisible by tp_size={tp_size}")
        self.eps = norm.eps
        width = self.full_dim // tp_size
        weight = None if norm.weight is None else norm.weight.detach()[rank * width : (rank + 1) * width].clone()
        self.weight = None if weight is None else torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same arithmetic as torch's rms_norm: statistics and scaling in float32, one cast back at the end
        x32 = x.float()
        sum_sq = all_reduce_sum_(x32.square().sum(-1, keepdim=True))
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = x32 * torch.rsqrt(sum_sq / self.full_dim + eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"full_dim={self.full_dim}, eps={self.eps}"


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
    (and gate) projections, a row-parallel output projection, `_ShardedRMSNorm` Q/K norms and `heads` set to the
    local head count; this processor only narrows the rotary embeddings to those heads."""

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


def _check_transformer(transformer: torch.nn.Module, tp_size: int) -> None:
    """Raise naming the first part of `transformer` that cannot be split `tp_size` ways."""
    if not isinstance(transformer, LTX2VideoTransformer3DModel):
        raise TypeError(
            f"transformer must be an LTX2VideoTransformer3DModel for tensor parallelism, got {type(transformer).__name__}"
        )
    for name, module in transformer.named_modules():
        if isinstance(module, LTX2Attention):
            if type(module.processor) is not LTX2AudioVideoAttnProcessor:
                raise ValueError(
                    f"transformer attention {name!r} runs {type(module.processor).__name__}; tensor parallelism adapts "
                    f"only diffusers' LTX2AudioVideoAttnProcessor (no STG/perturbed attention, no sequence-parallel "
                    f"or already-parallel processor)"
                )
            if module.heads % tp_size:
                raise ValueError(
                    f"transformer attention {name!r} has {module.heads} heads, not divisible by tp_size={tp_size}"
                )
        elif isinstance(module, LTX2AudioVideoRotaryPosEmbed) and module.rope_type == "split":
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


def apply_transformer_tp(transformer: torch.nn.Module, tp_size: int) -> TensorParallelInfo:
    """Shard an LTX-2 `LTX2VideoTransformer3DModel` in place over the group: every block's Q/K/V/gate and first FFN
    projections column-wise, its attention output and second FFN projections row-wise (DeepSpeed AutoTP with an
    explicit injection policy), attention heads split with exact across-heads QK RMSNorm and per-head RoPE.

    Embeddings, adaLN/timestep modulation, RoPE tables and the output projections stay replicated (small). Every
    rank must call it on identical weights and then run identical inputs; outputs are replicated. `tp_size=1` leaves
    the model untouched.
    """
    _validate_tp_size(tp_size)
    _check_transformer(transformer, tp_size)
    rank = _group_rank(tp_size)
    before = _parameter_count(transformer)
    if tp_size == 1:
        return TensorParallelInfo(1, 0, 0, 0, before, before)

    full = _linear_shapes(transformer)
    _init_inference(transformer, tp_size, injection_policy={LTX2VideoTransformerBlock: _LTX2_ROW_PARALLEL})
    table = _gather_shard_table(transformer, tp_size)
    for i, name in enumerate(table.names):
        expected = full[name][table.split_dims[i]] // tp_size
        if table.widths[:, i].ne(expected).any():
            # the sharded norms and RoPE slices assume rank r holds block r of equal width
            raise RuntimeError(
                f"AutoTP split transformer layer {name!r} as {table.widths[:, i].tolist()}, not {tp_size} x {expected}"
            )

    attentions = 0
    for module in transformer.modules():
        if isinstance(module, LTX2Attention):
            module.norm_q = _ShardedRMSNorm(module.norm_q, rank, tp_size)
            module.norm_k = _ShardedRMSNorm(module.norm_k, rank, tp_size)
            module.heads //= tp_size
            module.set_processor(TensorParallelLTX2AttnProcessor(rank, tp_size))
            attentions += 1
    return TensorParallelInfo(
        tp_size=tp_size,
        rank=rank,
        sharded_linears=len(table.names),
        sharded_attentions=attentions,
        parameters_before=before,
        parameters_after=_parameter_count(transformer),
    )
