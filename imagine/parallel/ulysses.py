"""DeepSpeed-Ulysses sequence parallelism for unmodified diffusers video transformers.

`enable_sequence_parallel(transformer, group)` makes N ranks that each call the transformer's full forward with the
same full inputs return the same full outputs as the unsharded model, while each rank carries only its 1/N share of
the video tokens through the blocks (projections, norms, per-token modulation, FFN). It installs:

- a forward pre-hook on the transformer that fixes the token split for this call (`TokenSharding`, padded when
  tokens % N != 0) and shards per-token inputs the model has not embedded yet (tokens, RoPE coordinates, per-token
  timesteps);
- forward hooks that shard tokens where the model creates them (e.g. a patch-embedding conv) and all-gather the
  output projection's tokens back into the full sequence;
- a swapped attention core in the processors of the attentions that see sharded keys: self-attention over video
  tokens runs through `deepspeed.sequence.layer.DistributedAttention` (all-to-all to head shards, full-sequence
  attention with padded keys masked, all-to-all back); attention of replicated queries over sharded keys merges
  per-rank partial results with their log-sum-exp. Attentions whose queries are sharded but whose keys are
  replicated (text cross-attention, LTX-2's audio-to-video) need nothing: each query only needs all keys.

The attention core is swapped without copying diffusers' processor code: the processor's own `__call__` (its
projections, qk-norm, RoPE, gating and output projection) is re-created with `dispatch_attention_fn` bound to our
core. Models are known only as data: each model module (`imagine.models`) registers a `SequenceParallelAdapter`
for its transformer class in `imagine.parallel.registry` (which attentions are Ulysses or sharded-KV, how to count
and shard its per-token inputs, which module outputs to shard or gather); this module applies it.
Inference only: the token gathers are not differentiable. One forward at a time per transformer.
"""

from __future__ import annotations

import copy
import enum
import inspect
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import nn
from torch.distributed import ProcessGroup

from imagine.parallel.comm import CommCounter, TokenSharding, gather_tokens
from imagine.parallel.registry import sequence_parallel_adapter, sequence_parallel_models

_HANDLE_ATTR = "_imagine_sequence_parallel"


class AttentionRole(enum.Enum):
    """How an attention module's core runs under sequence parallelism."""

    ULYSSES = "ulysses"
    """Self-attention over sharded tokens: q, k, v all local shards (DistributedAttention)."""
    SHARDED_KV = "sharded_kv"
    """Replicated queries over sharded keys/values: partial attention per rank, merged by log-sum-exp."""


class SequenceParallelRuntime:
    """State shared by one handle's hooks and attention cores: the group and the current forward's token split.
    Adapters get it to shard their inputs (`shard`) and gather outputs (`gather`) with the current split."""

    def __init__(self, group: ProcessGroup | None, world_size: int, rank: int, counter: CommCounter):
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.counter = counter
        self.sharding: TokenSharding | None = None

    def current(self) -> TokenSharding:
        if self.sharding is None:
            raise RuntimeError(
                "sequence-parallel attention ran outside the transformer's forward: call the whole transformer, "
                "not one of its blocks, while sequence parallelism is enabled"
            )
        return self.sharding

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return self.current().shard(tensor, dim)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_tokens(tensor, dim, self.current(), self.group, self.counter)


def _check_core_call(
    role: AttentionRole, attn_mask: Any, dropout_p: float, is_causal: bool, parallel_config: Any
) -> None:
    if attn_mask is not None:
        raise NotImplementedError(
            f"{role.value} sequence-parallel attention got an attn_mask; only key padding is supported there "
            "(a model's own attention masks cannot be used with sequence parallelism)"
        )
    if is_causal:
        raise NotImplementedError(f"{role.value} sequence-parallel attention does not support is_causal=True")
    if dropout_p:
        raise NotImplementedError(f"{role.value} sequence-parallel attention is for inference: dropout_p must be 0")
    if parallel_config is not None:
        raise ValueError(
            "the attention processor carries a diffusers parallel_config: diffusers' own context parallelism and "
            "imagine's sequence parallelism cannot both be enabled on one model"
        )


class _LocalAttention(nn.Module):
    """What DistributedAttention runs between its all-to-alls, on [B, S_padded, H/N, D]: diffusers' dispatcher
    (so the model's chosen attention backend is kept), padded keys masked."""

    def __init__(self, runtime: SequenceParallelRuntime):
        super().__init__()
        self.runtime = runtime

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        key_mask: torch.Tensor | None,
        scale: float | None,
        backend: Any,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        attn_mask = None if key_mask is None else key_mask.view(1, 1, 1, -1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attn_mask, scale=scale, backend=backend)
        self.runtime.counter.record_all_to_all(out, self.runtime.world_size)  # DistributedAttention sends it back
        return out


class _UlyssesCore:
    """Drop-in for `dispatch_attention_fn` inside a processor whose q, k, v are all this rank's token shard."""

    def __init__(self, runtime: SequenceParallelRuntime):
        from deepspeed.sequence.layer import DistributedAttention

        self.runtime = runtime
        # [B, S/N, H, D] in; scatter heads (dim 2), gather tokens (dim 1): the local module sees [B, S, H/N, D].
        self.attention = DistributedAttention(_LocalAttention(runtime), runtime.group, scatter_idx=2, gather_idx=1)

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        _check_core_call(AttentionRole.ULYSSES, attn_mask, dropout_p, is_causal, parallel_config)
        sharding = self.runtime.current()
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if tensor.shape[1] != sharding.local_tokens:
                raise ValueError(
                    f"Ulysses attention: {name} has {tensor.shape[1]} tokens, expected this rank's "
                    f"{sharding.local_tokens} of {sharding.num_tokens}"
                )
        for tensor in (query, key, value):
            self.runtime.counter.record_all_to_all(tensor, self.runtime.world_size)
        return self.attention(
            query,
            key,
            value,
            0,
            None,
            key_mask=sharding.key_mask(query.device),
            scale=scale,
            backend=backend,
        )


class _ShardedKVCore:
    """Drop-in for `dispatch_attention_fn` where the queries are replicated and keys/values are token shards.

    Each rank attends its queries to its own keys, keeping the log-sum-exp of the scores; an all-gather of
    (partial output, lse) lets every rank merge the exact softmax over all keys. This sends
    B * Lq * H * (D + 1) elements per peer instead of gathering the sharded keys and values (2 * B * S/N * H * D),
    which is much less when the queries are few (LTX-2: audio tokens querying video tokens).
    """

    def __init__(self, runtime: SequenceParallelRuntime):
        self.runtime = runtime

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        import deepspeed.comm as dist

        _check_core_call(AttentionRole.SHARDED_KV, attn_mask, dropout_p, is_causal, parallel_config)
        sharding = self.runtime.current()
        if key.shape[1] != sharding.local_tokens or value.shape[1] != sharding.local_tokens:
            raise ValueError(
                f"sharded-KV attention: key/value have {key.shape[1]}/{value.shape[1]} tokens, expected this rank's "
                f"{sharding.local_tokens} of {sharding.num_tokens}"
            )
        if key.shape[2] != query.shape[2]:
            raise NotImplementedError(
                f"sharded-KV attention needs as many key heads as query heads, got {key.shape[2]} and {query.shape[2]}"
            )
        head_dim = query.shape[-1]
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        # [B, H, Lq, D] x [B, H, S_local, D] in float32: the merge below needs the scores' log-sum-exp.
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~sharding.local_key_mask(query.device), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf where this rank holds only padding
        finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - finite_lse)
        partial = torch.cat([torch.matmul(probs, v), lse], dim=-1).contiguous()  # [B, H, Lq, D + 1]

        parts = [torch.empty_like(partial) for _ in range(sharding.world_size)]
        dist.all_gather(parts, partial, group=self.runtime.group)
        self.runtime.counter.record_all_gather(partial, sharding.world_size)
        stacked = torch.stack(parts)  # [N, B, H, Lq, D + 1]
        outputs, lses = stacked[..., :head_dim], stacked[..., head_dim:]
        weights = torch.exp(lses - torch.logsumexp(lses, dim=0, keepdim=True))
        merged = (weights * outputs).sum(dim=0)
        return merged.transpose(1, 2).to(query.dtype)  # [B, Lq, H, D], the dispatcher's layout


def _with_attention_core(processor: Any, core: Callable[..., torch.Tensor], cache: dict[type, type]) -> Any:
    """A copy of `processor` whose `__call__` is the processor's own code with `dispatch_attention_fn` bound to
    `core`: the projections, qk-norm, RoPE, gating and output projection stay diffusers' code, only the attention
    core changes. The copy keeps the processor's exact call signature (LTX-2's attention filters kwargs by it)."""
    cls = type(processor)
    swapped_cls = cache.get(cls)
    if swapped_cls is None:
        call = cls.__call__
        code = getattr(call, "__code__", None)
        if code is None or "dispatch_attention_fn" not in code.co_names:
            raise TypeError(
                f"{cls.__qualname__}.__call__ does not call dispatch_attention_fn, so its attention core cannot be "
                "swapped for sequence parallelism"
            )
        namespace = dict(call.__globals__, dispatch_attention_fn=core)
        swapped_call = types.FunctionType(code, namespace, call.__name__, call.__defaults__, call.__closure__)
        swapped_call.__kwdefaults__ = call.__kwdefaults__
        swapped_call.__qualname__ = f"SequenceParallel{cls.__name__}.__call__"
        swapped_cls = type(f"SequenceParallel{cls.__name__}", (cls,), {"__call__": swapped_call})
        cache[cls] = swapped_cls
    swapped = copy.copy(processor)
    swapped.__class__ = swapped_cls
    return swapped


# -- the adapter (one per transformer class, registered by the model's module) ----------------------------------

OutputHook = Callable[[Any, SequenceParallelRuntime], Any]


@dataclass(frozen=True)
class SequenceParallelAdapter:
    """How one transformer class is split. Names are module paths in `named_modules()`; patterns are full-match
    regular expressions."""

    attention_roles: dict[str, AttentionRole]
    """Attention module name pattern -> role. Attentions not listed keep their processor unchanged."""
    num_tokens: Callable[[nn.Module, dict[str, Any]], int]
    """Video token count of a call, from the forward's bound arguments."""
    shard_inputs: Callable[[nn.Module, dict[str, Any], SequenceParallelRuntime], None]
    """Shards per-token forward arguments in place (bound arguments, defaults applied)."""
    output_hooks: dict[str, OutputHook] = field(default_factory=dict)
    """Module name -> function of (module output, runtime) returning the replacement output."""


def gather_output(dim: int) -> OutputHook:
    """An output hook that all-gathers a module's token-sharded output along `dim` (e.g. the output projection)."""

    def hook(output: torch.Tensor, runtime: SequenceParallelRuntime) -> torch.Tensor:
        return runtime.gather(output, dim)

    return hook


def supported_transformers() -> list[str]:
    """Class names of the transformers `enable_sequence_parallel` can split (those with a registered adapter)."""
    return sequence_parallel_models()


def _adapter_for(transformer: nn.Module) -> SequenceParallelAdapter:
    adapter = sequence_parallel_adapter(transformer)
    if adapter is None:
        raise TypeError(
            f"transformer: sequence parallelism has no adapter for {type(transformer).__name__}; "
            f"supported: {supported_transformers()}"
        )
    return adapter


# -- public API -------------------------------------------------------------------------------------------------


class SequenceParallelHandle:
    """What `enable_sequence_parallel` installed on one transformer. `comm` counts the bytes this rank sends;
    `disable()` (or leaving a `with` block) removes every hook and restores the original processors."""

    def __init__(self, transformer: nn.Module, runtime: SequenceParallelRuntime):
        self.transformer = transformer
        self._runtime = runtime
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._original_processors: dict[str, Any] = {}
        self.ulysses_attentions: list[str] = []
        """Names of the attention modules that run through DistributedAttention."""
        self.sharded_kv_attentions: list[str] = []
        """Names of the attention modules whose keys/values are token shards (log-sum-exp merge)."""

    @property
    def world_size(self) -> int:
        return self._runtime.world_size

    @property
    def rank(self) -> int:
        return self._runtime.rank

    @property
    def group(self) -> ProcessGroup | None:
        return self._runtime.group

    @property
    def comm(self) -> CommCounter:
        return self._runtime.counter

    @property
    def enabled(self) -> bool:
        return getattr(self.transformer, _HANDLE_ATTR, None) is self

    def disable(self) -> None:
        """Remove the hooks and restore the original attention processors (idempotent)."""
        if not self.enabled:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, processor in self._original_processors.items():
            self.transformer.get_submodule(name).set_processor(processor)
        self._original_processors.clear()
        self._runtime.sharding = None
        delattr(self.transformer, _HANDLE_ATTR)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disable()


def enable_sequence_parallel(transformer: nn.Module, group: ProcessGroup | None = None) -> SequenceParallelHandle:
    """Split `transformer`'s video tokens over the ranks of `group` (default: the whole world) with DeepSpeed-Ulysses.

    Every rank of `group` must then call the transformer's full forward with the same full inputs; each returns the
    full outputs of the unsharded model (up to float rounding). The group must have been joined through DeepSpeed's
    comm layer (`imagine.parallel.dist.init_distributed`). Raises TypeError for an unsupported transformer class,
    ValueError when the degree does not divide a Ulysses attention's head count, RuntimeError when it is already
    enabled on this transformer or no group is initialized.
    """
    import deepspeed.comm as dist

    adapter = _adapter_for(transformer)
    if not dist.is_initialized():
        raise RuntimeError(
            "no distributed group is initialized: join one through imagine.parallel.dist.init_distributed "
            "(deepspeed.init_distributed) before enable_sequence_parallel"
        )
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise RuntimeError(f"sequence parallelism is already enabled on this {type(transformer).__name__}")

    world_size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    runtime = SequenceParallelRuntime(group, world_size, rank, CommCounter())
    handle = SequenceParallelHandle(transformer, runtime)

    patterns = {re.compile(pattern): role for pattern, role in adapter.attention_roles.items()}
    assigned: dict[str, tuple[nn.Module, AttentionRole]] = {}
    for name, module in transformer.named_modules():
        for pattern, role in patterns.items():
            if pattern.fullmatch(name):
                assigned[name] = (module, role)
    ulysses = {name: module for name, (module, role) in assigned.items() if role is AttentionRole.ULYSSES}
    if not ulysses:
        raise TypeError(
            f"transformer: no self-attention of {type(transformer).__name__} matched its adapter's attention_roles"
        )
    for name, module in ulysses.items():
        if module.heads % runtime.world_size:
            raise ValueError(
                f"sequence parallel degree {runtime.world_size} must divide the attention head count, but {name} "
                f"has {module.heads} heads"
            )

    cores = {AttentionRole.ULYSSES: _UlyssesCore(runtime), AttentionRole.SHARDED_KV: _ShardedKVCore(runtime)}
    class_cache: dict[AttentionRole, dict[type, type]] = {role: {} for role in AttentionRole}
    swapped = {
        name: _with_attention_core(module.processor, cores[role], class_cache[role])
        for name, (module, role) in assigned.items()
    }  # built before any change, so a processor we cannot swap leaves the model untouched
    for name, processor in swapped.items():
        module, role = assigned[name]
        handle._original_processors[name] = module.processor
        module.set_processor(processor)
        (handle.ulysses_attentions if role is AttentionRole.ULYSSES else handle.sharded_kv_attentions).append(name)

    signature = inspect.signature(transformer.forward)

    def split_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        runtime.sharding = TokenSharding(adapter.num_tokens(module, arguments), runtime.world_size, runtime.rank)
        adapter.shard_inputs(module, arguments, runtime)
        return (), arguments

    def end_forward(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        runtime.sharding = None
        if output is not None:
            runtime.counter.forwards += 1

    def output_hook(fn: OutputHook) -> Callable[[nn.Module, tuple, Any], Any]:
        return lambda module, args, output: fn(output, runtime)

    handle._hooks.append(transformer.register_forward_pre_hook(split_inputs, with_kwargs=True))
    handle._hooks.append(transformer.register_forward_hook(end_forward, with_kwargs=True, always_call=True))
    for name, fn in adapter.output_hooks.items():
        handle._hooks.append(transformer.get_submodule(name).register_forward_hook(output_hook(fn)))
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle
