"""Model presets: a name -> where the weights come from and the generation defaults that suit them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BUILTIN_TINY_SOURCE = "builtin:tiny"


class UnknownModelError(KeyError):
    """A preset name that is not registered."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown model preset {name!r}; known presets: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError's default str() wraps the message in quotes
        return self.args[0]


class ModelPreset(BaseModel):
    """A named model: its family, where its diffusers-layout weights come from, and its generation defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Preset name used in requests and config, e.g. 'ltx-2'.", min_length=1)
    family: Literal["ltx2"] = Field(
        description="Model family; selects the pipeline stages. Only 'ltx2' (joint video + audio) for now."
    )
    source: str = Field(
        description=(
            "Where the weights come from: 'builtin:tiny' (random-init tiny model built in code), a local directory "
            "in diffusers pipeline layout (with model_index.json; '~' is expanded), or 's3://bucket/prefix'."
        ),
        min_length=1,
    )
    description: str = Field(default="", description="Human-readable description shown by listings.")
    default_fps: float = Field(default=24.0, gt=0, le=120, description="Frames per second when a request gives none.")
    default_steps: int = Field(default=30, ge=1, le=200, description="Denoising steps when a request gives none.")
    default_guidance_scale: float = Field(
        default=3.0, ge=1.0, le=20.0, description="Classifier-free guidance scale when a request gives none (1 = off)."
    )
    max_duration_s: float = Field(default=15.0, gt=0, le=60, description="Longest clip this preset may generate.")

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if value.startswith("builtin:") and value != BUILTIN_TINY_SOURCE:
            raise ValueError(f"source: unknown builtin model {value!r}; the only builtin is {BUILTIN_TINY_SOURCE!r}")
        if value.startswith("s3://") and len(value[len("s3://") :].strip("/")) == 0:
            raise ValueError(f"source: S3 URI {value!r} has no bucket")
        return value

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="tiny",
            family="ltx2",
            source=BUILTIN_TINY_SOURCE,
            description="Random-init LTX-2-shaped model built in code: real sizes and ratios, noise content. "
            "For tests, CI and laptops.",
            default_steps=8,
            default_guidance_scale=3.0,
        ),
        ModelPreset(
            name="ltx-2",
            family="ltx2",
            source="~/models/ltx-2",
            description="Lightricks LTX-2 (diffusers layout). Override `source` with the local directory or "
            "s3:// URI holding the weights.",
            default_steps=40,
            default_guidance_scale=4.0,
        ),
    )
}


def list_presets() -> list[ModelPreset]:
    """All registered presets, in registration order."""
    return list(PRESETS.values())


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; raises `UnknownModelError` (a `KeyError`) listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(name, list(PRESETS)) from None
