"""Model presets, the builtin tiny LTX-2 model, and loading weights from local dirs or S3."""

from imagine.models.loading import ModelSourceError, load_components, resolve_model_dir
from imagine.models.presets import (
    PRESETS,
    ModelPreset,
    UnknownModelError,
    get_preset,
    list_presets,
)
from imagine.models.tiny import build_tiny_ltx2, ensure_tiny_ltx2

__all__ = [
    "PRESETS",
    "ModelPreset",
    "ModelSourceError",
    "UnknownModelError",
    "build_tiny_ltx2",
    "ensure_tiny_ltx2",
    "get_preset",
    "list_presets",
    "load_components",
    "resolve_model_dir",
]
