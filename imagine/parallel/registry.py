"""Which parallel plan a model class has: model modules register their plans here when imported, the generic
mechanisms of `ulysses` and `tensor` look them up by the model's class (nearest in its MRO).

The plans themselves are data about one model (module names, shard functions) and live with the model in
`imagine.models`; `PLAN_MODULES` names the model-side module that imports them all, so a lookup loads the plans on
first use and callers of `imagine.parallel.enable_parallel` need not import any model module themselves.
No torch at import time: the serving and routing paths import this package without it.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from imagine.parallel.tensor import TensorParallelPlan
    from imagine.parallel.ulysses import SequenceParallelAdapter

PLAN_MODULES: tuple[str, ...] = ("imagine.models.parallel_plans",)
"""Modules imported before the first lookup; importing them registers every model's plans."""

_Plan = TypeVar("_Plan")

_sequence: dict[type, SequenceParallelAdapter] = {}
_tensor: dict[type, TensorParallelPlan] = {}


def _register(table: dict[type, Any], kind: str, model_cls: type, plan: Any) -> None:
    if not isinstance(model_cls, type):
        raise TypeError(f"{kind} plans are registered for a model class, got {model_cls!r}")
    existing = table.get(model_cls)
    if existing is not None and existing is not plan:
        raise ValueError(f"{model_cls.__qualname__} already has a {kind} plan registered; one plan per class")
    table[model_cls] = plan


def register_sequence_parallel(model_cls: type, adapter: SequenceParallelAdapter) -> None:
    """Make `adapter` the sequence-parallel (Ulysses) plan of `model_cls` and its subclasses without their own."""
    _register(_sequence, "sequence-parallel", model_cls, adapter)


def register_tensor_parallel(model_cls: type, plan: TensorParallelPlan) -> None:
    """Make `plan` the tensor-parallel (AutoTP) plan of `model_cls` and its subclasses without their own."""
    _register(_tensor, "tensor-parallel", model_cls, plan)


@cache
def _load_plans() -> None:
    for name in PLAN_MODULES:  # an import that raises is not cached: the next lookup raises again
        importlib.import_module(name)


def _lookup(table: dict[type, _Plan], model: object) -> _Plan | None:
    _load_plans()
    for cls in type(model).__mro__:
        if cls in table:
            return table[cls]
    return None


def sequence_parallel_adapter(model: object) -> SequenceParallelAdapter | None:
    """The sequence-parallel plan registered for `model`'s class (or the nearest base class), else None."""
    return _lookup(_sequence, model)


def tensor_parallel_plan(model: object) -> TensorParallelPlan | None:
    """The tensor-parallel plan registered for `model`'s class (or the nearest base class), else None."""
    return _lookup(_tensor, model)


def sequence_parallel_models() -> list[str]:
    """Class names with a sequence-parallel plan."""
    _load_plans()
    return sorted(cls.__name__ for cls in _sequence)


def tensor_parallel_models() -> list[str]:
    """Class names with a tensor-parallel plan."""
    _load_plans()
    return sorted(cls.__name__ for cls in _tensor)
