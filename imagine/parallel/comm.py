"""Token sharding for sequence parallelism: how one token axis is split over N ranks (padded to a multiple of N),
the collectives that move token shards (through DeepSpeed's comm layer), a byte counter for benchmarks, and
Ulysses' theoretical all-to-all volume to compare it with. No model code here."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class CommCounter:
    """Bytes this rank sends to other ranks, counted from the tensors handed to each collective at run time.

    Logical volume, independent of the collective's algorithm: an all-to-all of a local tensor of `b` bytes sends
    `b * (N - 1) / N` (one of its N slices stays on the rank); an all-gather of a local `b`-byte shard sends
    `b * (N - 1)` (every peer needs a copy). Cumulative until `reset()`; `forwards` counts completed transformer
    forwards so a benchmark can report bytes per forward.
    """

    all_to_all_bytes: int = 0
    all_to_all_calls: int = 0
    all_gather_bytes: int = 0
    all_gather_calls: int = 0
    forwards: int = 0

    def record_all_to_all(self, tensor: torch.Tensor, world_size: int) -> None:
        self.all_to_all_bytes += _bytes(tensor) * (world_size - 1) // world_size
        self.all_to_all_calls += 1

    def record_all_gather(self, tensor: torch.Tensor, world_size: int) -> None:
        self.all_gather_bytes += _bytes(tensor) * (world_size - 1)
        self.all_gather_calls += 1

    @property
    def total_bytes(self) -> int:
        return self.all_to_all_bytes + self.all_gather_bytes

    def per_forward(self) -> dict[str, float]:
        """Bytes sent per completed forward, by collective (raises if no forward has completed yet)."""
        if self.forwards == 0:
            raise ValueError("forwards is 0: no transformer forward has completed since the last reset()")
        return {
            "all_to_all_bytes": self.all_to_all_bytes / self.forwards,
            "all_gather_bytes": self.all_gather_bytes / self.forwards,
            "total_bytes": self.total_bytes / self.forwards,
        }

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass(frozen=True)
class TokenSharding:
    """Contiguous split of `num_tokens` tokens over `world_size` ranks: rank r holds tokens
    `[r * local_tokens, (r + 1) * local_tokens)` of the sequence zero-padded to `padded_tokens`.

    Every rank holds the same number of tokens because the all-to-all and the all-gather need equal shards; the
    padding sits at the end of the sequence (so on the last rank(s)) and attention must mask it as keys.
    """

    num_tokens: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def local_tokens(self) -> int:
        return math.ceil(self.num_tokens / self.world_size)

    @property
    def padded_tokens(self) -> int:
        return self.local_tokens * self.world_size

    @property
    def start(self) -> int:
        return self.rank * self.local_tokens

    @property
    def has_padding(self) -> bool:
        return self.padded_tokens != self.num_tokens

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's `local_tokens` slice of `tensor` along `dim` (which must hold all `num_tokens`), zero-padded."""
        if tensor.shape[dim] != self.num_tokens:
            raise ValueError(
                f"tensor has {tensor.shape[dim]} entries on dim {dim}, expected the full {self.num_tokens} tokens"
            )
        start = min(self.start, self.num_tokens)
        stop = min(self.start + self.local_tokens, self.num_tokens)
        piece = tensor.narrow(dim, start, stop - start)
        missing = self.local_tokens - piece.shape[dim]
        if missing:
            pad_shape = list(piece.shape)
            pad_shape[dim] = missing
            piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=dim)
        return piece.contiguous()

    def key_mask(self, device: torch.device | str) -> torch.Tensor | None:
        """Bool [padded_tokens], True for real tokens, for attention over the whole (gathered) sequence; None when
        nothing is padded, so unpadded runs keep mask-free (fastest) attention kernels."""
        if not self.has_padding:
            return None
        return torch.arange(self.padded_tokens, device=device) < self.num_tokens

    def local_key_mask(self, device: torch.device | str) -> torch.Tensor:
        """Bool [local_tokens], True where this rank's shard holds a real token."""
        return torch.arange(self.start, self.start + self.local_tokens, device=device) < self.num_tokens


def gather_tokens(
    shard: torch.Tensor, dim: int, sharding: TokenSharding, group: Any = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """All-gather every rank's token shard along `dim` and drop the padding: the full `num_tokens` sequence.

    Inference only (no autograd through the gather)."""
    import deepspeed.comm as dist

    if shard.shape[dim] != sharding.local_tokens:
        raise ValueError(f"shard has {shard.shape[dim]} tokens on dim {dim}, expected {sharding.local_tokens}")
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(sharding.world_size)]
    dist.all_gather(parts, shard, group=group)
    if counter is not None:
        counter.record_all_gather(shard, sharding.world_size)
    return torch.cat(parts, dim=dim).narrow(dim, 0, sharding.num_tokens)


def ulysses_all_to_all_bytes(
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    num_layers: int,
    world_size: int,
    *,
    batch_size: int = 1,
    bytes_per_element: int = 2,
    attentions_per_layer: int = 1,
) -> int:
    """Bytes one rank sends in Ulysses all-to-alls during one transformer forward (same convention as CommCounter).

    Each sequence-parallel attention sends q, k and v to the head-sharded layout and its output back: 4 all-to-alls
    of a [batch, ceil(tokens / N), heads, head_dim] tensor, (N - 1) / N of which leaves the rank:
    `layers * attentions_per_layer * 4 * batch * ceil(tokens / N) * heads * head_dim * bytes * (N - 1) / N`.
    Padding (tokens % N != 0) is included because it is sent. `batch_size` is 2 under classifier-free guidance.
    `num_layers` counts the blocks with a Ulysses self-attention (`len(handle.ulysses_attentions)`): LTX-2's
    `num_layers`; Wan VACE's `num_layers + len(vace_layers)`.
    """
    values = {
        "num_tokens": num_tokens,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "num_layers": num_layers,
        "world_size": world_size,
        "batch_size": batch_size,
        "bytes_per_element": bytes_per_element,
        "attentions_per_layer": attentions_per_layer,
    }
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_heads % world_size:
        raise ValueError(f"sequence parallel degree {world_size} does not divide num_heads={num_heads}")
    local_tokens = math.ceil(num_tokens / world_size)
    per_tensor = batch_size * local_tokens * (num_heads // world_size) * head_dim * bytes_per_element
    return num_layers * attentions_per_layer * 4 * per_tensor * (world_size - 1)
