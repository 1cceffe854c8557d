"""Sequence/tensor-parallel denoising (DeepSpeed), process groups and the routing rule: generic mechanisms only.
Models are known as data: each model module in `imagine.models` registers its plans in `registry`, by class.

- `dist`: join a torch.distributed group through DeepSpeed's comm layer; run a function on N local ranks.
- `registry`: model class -> sequence-parallel adapter / tensor-parallel plan (plan modules load on first lookup).
- `ulysses`: DeepSpeed-Ulysses sequence parallel for unmodified diffusers transformers, by their registered adapter.
- `tensor`: DeepSpeed AutoTP: automatic policy for Hugging Face modules, registered plans for transformers.
- `comm`: the token split (`TokenSharding`), token gathers and comm byte counts.
- `routing`: which denoiser deployment (parallel degree) a request's token count needs.
"""

from __future__ import annotations

from typing import Any


def enable_parallel(transformer: Any, sequence: int = 1, tensor: int = 1) -> Any:
    """Shard `transformer` over the default process group (this rank's group, already joined): Ulysses sequence
    parallel when `sequence` > 1, tensor parallel when `tensor` > 1. Returns the handle/info (None for 1 x 1).
    Both at once would need a 2-D device mesh, which neither adapter supports yet."""
    import torch.distributed as dist

    if sequence > 1 and tensor > 1:
        raise ValueError(f"parallel: sequence={sequence} and tensor={tensor} together are not supported; use one")
    degree = sequence * tensor
    if degree > 1 and (not dist.is_initialized() or dist.get_world_size() != degree):
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise RuntimeError(f"parallel degree {degree} needs a process group of {degree} ranks; this one has {world}")
    if sequence > 1:
        from imagine.parallel.ulysses import enable_sequence_parallel

        return enable_sequence_parallel(transformer)
    if tensor > 1:
        from imagine.parallel.tensor import apply_transformer_tp

        return apply_transformer_tp(transformer, tensor)
    return None
