"""The sampling runner: one job's `begin -> step* -> finish` over any resumable sampler (LTX-2 generation, Wan VACE
edit, ...), with progress, cancel, preemption and checkpoints. No Ray here: a denoiser deployment constructs a
runner from config and runs it on its torch thread; tests drive it directly.

Two loop implementations share one protocol (`Loop`), chosen by the pool's parallel degree: `LocalLoop` runs the
sampler in this process; `serving.ranks.RankedLoop` runs it on every rank of a `RankGroup` (sequence/tensor
parallel), rank 0's answers being the loop's.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from imagine.jobs import StepSignal

logger = logging.getLogger(__name__)

# share of job progress the sampling loop covers; decode + mux + store take the rest
SAMPLING_PROGRESS_SHARE = 0.95


class Sampler(Protocol):
    """A resumable sampling loop over a picklable state with `step_index`, `num_inference_steps`, `done` and
    `to_cpu()`: `DenoiserStage` (LTX-2) and `VaceSampler` (Wan VACE) are samplers."""

    components: list[str]

    def prepare(self, request: Any, conditioning: Any) -> Any: ...

    def step(self, state: Any, conditioning: Any) -> Any: ...

    def finish(self, state: Any) -> Any: ...


class Loop(Protocol):
    """One sampling loop at a time, driven step by step: `begin` returns (steps done, steps in total)."""

    def begin(self, request: Any, conditioning: Any, resume: Any | None) -> tuple[int, int]: ...

    def step(self) -> int: ...

    def snapshot(self) -> Any: ...

    def finish(self) -> Any: ...


class ArtifactBytes(Protocol):
    """Where checkpoints go: an artifact store (local directory, S3, ...)."""

    def put_bytes(self, key: str, data: bytes) -> Any: ...

    def read_bytes(self, key: str) -> bytes: ...


class LocalLoop:
    """The loop on this process's device, over one sampler."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.state: Any = None
        self.conditioning: Any = None

    def begin(self, request: Any, conditioning: Any, resume: Any | None) -> tuple[int, int]:
        """Start (or resume from a checkpointed state) a loop; returns (steps done, steps in total)."""
        self.conditioning = conditioning
        self.state = resume if resume is not None else self.sampler.prepare(request, conditioning)
        return self.state.step_index, self.state.num_inference_steps

    def step(self) -> int:
        self.state = self.sampler.step(self.state, self.conditioning)
        return self.state.step_index

    def snapshot(self) -> Any:
        """The loop state on the CPU (a checkpoint)."""
        return self.state.to_cpu()

    def finish(self) -> Any:
        output = self.sampler.finish(self.state)
        self.state = self.conditioning = None
        return output.to_cpu()


@dataclass
class SampleOutcome:
    """A sampling attempt's answer: the sampler's output; or cancelled (or stale); or preempted with the key of
    its checkpoint."""

    output: Any | None
    status: Literal["done", "cancelled", "preempted"]
    steps_run: int  # steps executed by this call
    seconds: float
    checkpoint_key: str | None = None


# the loop states a checkpoint may hold, and the dataclasses inside them: a checkpoint names its types, and only these
# are rebuilt (anything else in the artifact store is refused, never imported or called)
CHECKPOINT_TYPES = frozenset({
    "imagine.pipeline.types:DenoiseState",
    "imagine.pipeline.types:GenerationSpec",
    "imagine.pipeline.vace:VaceState",
    "imagine.pipeline.vace:EditSpec",
    "imagine.pipeline.vace:EditGeometry",
})
_TYPE_TAG = "__checkpoint_type__"


class CheckpointError(ValueError):
    """A checkpoint holds something other than a known loop state of plain values and tensors."""


def _pack(value: Any) -> Any:
    """Dataclasses -> tagged dicts of their fields, recursively: what is left is tensors and plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = f"{type(value).__module__}:{type(value).__qualname__}"
        if name not in CHECKPOINT_TYPES:
            raise CheckpointError(f"{name} is not a checkpoint type")
        return {_TYPE_TAG: name, "fields": {f.name: _pack(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v) for v in value)
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        name = value.get(_TYPE_TAG)
        if name is None:
            return {k: _unpack(v) for k, v in value.items()}
        if name not in CHECKPOINT_TYPES:
            raise CheckpointError(f"checkpoint names type {name!r}, which is not a checkpoint type")
        module, _, qualname = name.partition(":")
        cls = getattr(importlib.import_module(module), qualname)
        return cls(**{k: _unpack(v) for k, v in value["fields"].items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v) for v in value)
    return value


def save_checkpoint(store: ArtifactBytes, key: str, state: Any) -> None:
    buf = io.BytesIO()
    torch.save(_pack(state), buf)  # tensors and plain data only: loadable with weights_only
    store.put_bytes(key, buf.getvalue())


def load_checkpoint(store: ArtifactBytes, key: str) -> Any:
    """A loop state saved by `save_checkpoint`. `weights_only=True`: unpickling runs no code a checkpoint names
    (anyone who can write the artifact store must not get code execution in a replica); only the allow-listed
    dataclasses are rebuilt from their fields."""
    try:
        data = torch.load(io.BytesIO(store.read_bytes(key)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {key!r} holds more than tensors and plain data: {e}") from e
    return _unpack(data)


class SamplingRunner:
    """Runs one job's loop to an outcome. After every `progress_every`-th step (and the last) it reports progress
    through `report(fraction) -> StepSignal` (the job store's `report_progress`, which also fences stale attempts),
    then stops on CANCEL, or checkpoints the loop state to `checkpoints` and returns on PREEMPT."""

    def __init__(
        self,
        loop: Loop,
        checkpoints: ArtifactBytes,
        *,
        progress_every: int = 1,
        progress_share: float = SAMPLING_PROGRESS_SHARE,
    ):
        if progress_every < 1:
            raise ValueError(f"progress_every must be >= 1, got {progress_every}")
        self.loop = loop
        self.checkpoints = checkpoints
        self.progress_every = progress_every
        self.progress_share = progress_share

    def run(
        self,
        request: Any,
        conditioning: Any,
        report: Callable[[float], StepSignal],
        *,
        checkpoint_key: str,
        resume_from: str | None = None,
        label: str = "job",
    ) -> SampleOutcome:
        """Sample `request` (resuming from the checkpoint at `resume_from`, if given); a preemption writes the
        loop state to `checkpoint_key`."""
        started = time.perf_counter()
        resume = load_checkpoint(self.checkpoints, resume_from) if resume_from else None
        step_index, total = self.loop.begin(request, conditioning, resume)
        first_step = step_index

        def outcome(status: str, output: Any = None, key: str | None = None) -> SampleOutcome:
            return SampleOutcome(output, status, step_index - first_step, time.perf_counter() - started, key)

        if report(self.progress_share * step_index / total) == StepSignal.CANCEL:  # cancelled while it waited
            return outcome("cancelled")
        while step_index < total:
            step_index = self.loop.step()
            if step_index % self.progress_every and step_index < total:
                continue
            signal = report(self.progress_share * step_index / total)
            if signal == StepSignal.CANCEL:
                logger.info("%s cancelled after step %d", label, step_index)
                return outcome("cancelled")
            if signal == StepSignal.PREEMPT and step_index < total:
                save_checkpoint(self.checkpoints, checkpoint_key, self.loop.snapshot())
                logger.info("%s preempted after step %d", label, step_index)
                return outcome("preempted", key=checkpoint_key)
        return outcome("done", output=self.loop.finish())
