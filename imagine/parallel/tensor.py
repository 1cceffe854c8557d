"""Tensor parallelism with DeepSpeed AutoTP: Hugging Face modules under AutoTP's automatic policy
(`apply_auto_tp`) and diffusers transformers under an explicit per-model plan (`apply_transformer_tp` with the
`TensorParallelPlan` the model registered in `imagine.parallel.registry`).

Every rank of the group holds 1/N of each sharded weight, gets the same inputs and returns the same (replicated)
outputs, so a stage runs unchanged on top of a parallelized module. The group is the whole default group
(`imagine.parallel.dist.init_distributed`): `tp_size` must equal the world size.

Why the pieces below exist (see FINDINGS "Tensor parallel"):

* AutoTP's automatic policy cannot parse every diffusers block ("Not able to determine model policy
  automatically"). A plan's explicit `injection_policy` names the row-parallel layers of a block and AutoTP shards
  every other linear of it column-wise, which is right for the FFNs and for Q/K/V/gate. Some models normalize Q and
  K with one RMSNorm across *all* heads: `_ShardedRMSNorm` all-reduces the sum of squares so each rank normalizes
  its heads by the full-width statistic. Anything else a rank's heads need (e.g. its slice of the rotary
  embeddings) is the plan's attention processor.
* DeepSpeed's CPU shared-memory all-reduce (`torch.ops.deepspeed.inference_all_reduce_`, used whenever
  `LOCAL_SIZE` == world size) silently does nothing to a non-contiguous tensor: its kernel reduces
  `self.contiguous()`, a *copy*, and returns the untouched input (deepspeed/ops/csrc/cpu/comm/shm_interface.cpp,
  `inference_all_reduce__cpu`). AutoTP's own `LinearAllreduce` only ever reduces fresh `matmul` outputs, which are
  contiguous, and its weight shards are contiguous copies; every collective of ours goes through `all_reduce_sum_`,
  which reduces a contiguous buffer and copies it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from imagine.parallel.registry import tensor_parallel_models, tensor_parallel_plan


@dataclass(frozen=True)
class TensorParallelPlan:
    """How one transformer class is split (registered with `imagine.parallel.registry.register_tensor_parallel`).

    AutoTP shards the linears of `row_parallel`'s block classes; then every `attention` module gets `heads` divided
    by `tp_size`, its `head_norms` replaced by `_ShardedRMSNorm` and the processor `make_processor(rank, tp_size)`.
    """

    row_parallel: dict[type, tuple[str, ...]]
    """AutoTP injection policy: block class -> names of its row-parallel linears (inputs split, outputs
    all-reduced); every other linear of those blocks is split column-wise."""
    attention: type
    """Attention module class whose heads are split across ranks."""
    processors: tuple[type, ...]
    """Processor classes (exact types) the tensor-parallel processor may replace; any other is refused."""
    make_processor: Callable[[int, int], Any]
    """(rank, tp_size) -> the attention processor that runs this rank's heads."""
    head_norms: tuple[str, ...] = ()
    """Attributes of `attention` holding a `torch.nn.RMSNorm` across all heads (e.g. QK norms)."""
    check: Callable[[torch.nn.Module, int], None] | None = None
    """Model-specific checks beyond the attention heads: (transformer, tp_size), raising ValueError naming the
    first part that cannot be split."""


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


# --- automatic policy (Hugging Face modules) -------------------------------------------------------------------


def apply_auto_tp(
    module: torch.nn.Module, tp_size: int, tp_grain_size: int = 64, *, name: str = "module"
) -> torch.nn.Module:
    """Shard a Hugging Face module over the group with AutoTP's automatic policy; return it (sharded in place).

    Attention is split by query and key/value heads, so the head counts of its config (or of `config.text_config`
    for a multimodal one) must be divisible by `tp_size`. `tp_grain_size` is AutoTP's split granularity for MLP
    widths (64 keeps GEMM shapes aligned); a rank whose share would be empty raises instead of silently running the
    whole layer on another rank. `name` is how errors call the module.
    """
    _validate_tp_size(tp_size)
    if not isinstance(tp_grain_size, int) or isinstance(tp_grain_size, bool) or tp_grain_size < 1:
        raise ValueError(f"tp_grain_size must be an int >= 1, got {tp_grain_size!r}")
    config = getattr(module, "config", None)
    text_config = getattr(config, "text_config", config)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text_config, field, None)
        if heads is not None and heads % tp_size != 0:
            raise ValueError(f"{name} config {field}={heads} is not divisible by tp_size={tp_size}")
    _group_rank(tp_size)
    if tp_size == 1:
        return module

    full = _linear_shapes(module)
    module = _init_inference(module, tp_size, tensor_parallel={"tp_grain_size": tp_grain_size})
    table = _gather_shard_table(module, tp_size)
    for i, layer in enumerate(table.names):
        widths = table.widths[:, i]
        if int(widths.min()) == 0:
            raise ValueError(
                f"{name} layer {layer!r} of shape {tuple(full[layer])} was split {widths.tolist()}: rank(s) "
                f"{widths.eq(0).nonzero().flatten().tolist()} hold nothing of it; lower tp_grain_size={tp_grain_size} "
                f"or tp_size={tp_size}"
            )
    return module


# --- explicit plans (diffusers transformers) --------------------------------------------------------------------


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


def _plan_for(transformer: torch.nn.Module) -> TensorParallelPlan:
    plan = tensor_parallel_plan(transformer)
    if plan is None:
        raise TypeError(
            f"transformer: tensor parallelism has no plan for {type(transformer).__name__}; "
            f"supported: {tensor_parallel_models()}"
        )
    return plan


def _check_transformer(transformer: torch.nn.Module, plan: TensorParallelPlan, tp_size: int) -> None:
    """Raise naming the first part of `transformer` that cannot be split `tp_size` ways."""
    for name, module in transformer.named_modules():
        if isinstance(module, plan.attention):
            if type(module.processor) not in plan.processors:
                supported = ", ".join(cls.__name__ for cls in plan.processors)
                raise ValueError(
                    f"transformer attention {name!r} runs {type(module.processor).__name__}; tensor parallelism "
                    f"adapts only {supported} (not a perturbed-attention, sequence-parallel or already "
                    f"tensor-parallel processor)"
                )
            if module.heads % tp_size:
                raise ValueError(
                    f"transformer attention {name!r} has {module.heads} heads, not divisible by tp_size={tp_size}"
                )
            for norm_name in plan.head_norms:
                if not isinstance(getattr(module, norm_name), torch.nn.RMSNorm):
                    raise TypeError(
                        f"transformer attention {name!r}.{norm_name} is a {type(getattr(module, norm_name)).__name__}; "
                        f"the plan's head norms must be torch.nn.RMSNorm"
                    )
    if plan.check is not None:
        plan.check(transformer, tp_size)


def apply_transformer_tp(transformer: torch.nn.Module, tp_size: int) -> TensorParallelInfo:
    """Shard a transformer in place over the group with the `TensorParallelPlan` registered for its class: the
    linears of its blocks column- or row-wise (DeepSpeed AutoTP with the plan's injection policy), attention heads
    split, across-heads RMSNorms exact (`_ShardedRMSNorm`), the plan's processor on every attention.

    What the plan's blocks do not hold (embeddings, modulation, output projections) stays replicated. Every rank
    must call it on identical weights and then run identical inputs; outputs are replicated. `tp_size=1` leaves the
    model untouched. Raises TypeError for a class without a plan, ValueError for a part `tp_size` cannot split.
    """
    _validate_tp_size(tp_size)
    plan = _plan_for(transformer)
    _check_transformer(transformer, plan, tp_size)
    rank = _group_rank(tp_size)
    before = _parameter_count(transformer)
    if tp_size == 1:
        return TensorParallelInfo(1, 0, 0, 0, before, before)

    full = _linear_shapes(transformer)
    _init_inference(transformer, tp_size, injection_policy=plan.row_parallel)
    table = _gather_shard_table(transformer, tp_size)
    for i, name in enumerate(table.names):
        expected = full[name][table.split_dims[i]] // tp_size
        if table.widths[:, i].ne(expected).any():
            # the sharded norms and the plan's processor assume rank r holds block r of equal width
            raise RuntimeError(
                f"AutoTP split transformer layer {name!r} as {table.widths[:, i].tolist()}, not {tp_size} x {expected}"
            )

    attentions = 0
    for module in transformer.modules():
        if isinstance(module, plan.attention):
            for norm_name in plan.head_norms:
                setattr(module, norm_name, _ShardedRMSNorm(getattr(module, norm_name), rank, tp_size))
            module.heads //= tp_size
            module.set_processor(plan.make_processor(rank, tp_size))
            attentions += 1
    return TensorParallelInfo(
        tp_size=tp_size,
        rank=rank,
        sharded_linears=len(table.names),
        sharded_attentions=attentions,
        parameters_before=before,
        parameters_after=_parameter_count(transformer),
    )
