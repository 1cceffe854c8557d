"""Model presets: a name -> where the weights come from and the generation defaults that suit them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelFamily = Literal["ltx2", "wan_vace", "grounding"]
"""`ltx2`: joint video + audio generation (LTX2Pipeline layout). `wan_vace`: masked video editing
(WanVACEPipeline layout); it cannot generate from text alone, so generation endpoints serve only `ltx2`.
`grounding`: the edit path's text-conditioned detector + SAM2 video segmenter (the layout of
`imagine.models.tiny_grounding`), which finds what an instruction names; it generates nothing."""
MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)

BUILTIN_TINY_SOURCE = "builtin:tiny"
BUILTIN_TINY_VACE_SOURCE = "builtin:tiny-vace"
BUILTIN_TINY_GROUNDING_SOURCE = "builtin:tiny-grounding"
# Random-init models built in code (see imagine.models.tiny / tiny_vace / tiny_grounding), and the family each one
# belongs to.
BUILTIN_SOURCES: dict[str, str] = {
    BUILTIN_TINY_SOURCE: "ltx2",
    BUILTIN_TINY_VACE_SOURCE: "wan_vace",
    BUILTIN_TINY_GROUNDING_SOURCE: "grounding",
}


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
    family: ModelFamily = Field(
        description="Model family; selects the pipeline stages: 'ltx2' (text/image -> video + audio generation), "
        "'wan_vace' (masked video editing) or 'grounding' (detector + SAM2: the masks of an edit instruction)."
    )
    source: str = Field(
        description=(
            "Where the weights come from: a builtin random-init tiny model built in code ('builtin:tiny' for ltx2, "
            "'builtin:tiny-vace' for wan_vace, 'builtin:tiny-grounding' for grounding), a local directory in "
            "diffusers pipeline layout (with "
            "model_index.json; '~' is expanded), or 's3://bucket/prefix'."
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
        if value.startswith("builtin:") and value not in BUILTIN_SOURCES:
            raise ValueError(f"source: unknown builtin model {value!r}; builtins are {sorted(BUILTIN_SOURCES)}")
        if value.startswith("s3://") and len(value[len("s3://") :].strip("/")) == 0:
            raise ValueError(f"source: S3 URI {value!r} has no bucket")
        return value

    @model_validator(mode="after")
    def _check_builtin_family(self) -> ModelPreset:
        builtin_family = BUILTIN_SOURCES.get(self.source)
        if builtin_family is not None and builtin_family != self.family:
            raise ValueError(
                f"source: builtin model {self.source!r} is a {builtin_family!r} model, but the preset's family is "
                f"{self.family!r}"
            )
        return self

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
        ModelPreset(
            name="tiny-vace",
            family="wan_vace",
            source=BUILTIN_TINY_VACE_SOURCE,
            description="Random-init Wan VACE-shaped editing model built in code: real VAE ratios and patch size, "
            "noise content inside the edited region. For tests, CI and laptops.",
            default_fps=16.0,
            default_steps=8,
            default_guidance_scale=5.0,
        ),
        ModelPreset(
            name="wan-vace",
            family="wan_vace",
            source="~/models/wan2.1-vace-1.3b",
            description="Wan 2.1 VACE 1.3B masked video editing (diffusers layout, e.g. Wan-AI/Wan2.1-VACE-1.3B-"
            "diffusers; trained at 480p, 16 fps, 81 frames). Override `source` with the local directory or s3:// URI "
            "holding the weights.",
            default_fps=16.0,
            default_steps=30,
            default_guidance_scale=5.0,
            max_duration_s=10.0,
        ),
        ModelPreset(
            name="tiny-grounding",
            family="grounding",
            source=BUILTIN_TINY_GROUNDING_SOURCE,
            description="Random-init GroundingDINO + SAM2 video models built in code: they detect and segment "
            "noise (their stage keeps each key frame's best box). For tests, CI and laptops.",
        ),
        ModelPreset(
            name="grounding",
            family="grounding",
            source="~/models/grounding",
            description="GroundingDINO (e.g. IDEA-Research/grounding-dino-tiny) + SAM2.1 video (e.g. "
            "facebook/sam2.1-hiera-small), saved in the layout of imagine.models.tiny_grounding (detector/, "
            "detector_tokenizer/, detector_image_processor/, sam2/ and a model_index.json naming their classes). "
            "Override `source` with the local directory or s3:// URI holding them.",
        ),
    )
}


def list_presets(family: str | None = None) -> list[ModelPreset]:
    """Registered presets in registration order; only those of `family` when given (e.g. the generation
    endpoints list 'ltx2', the edit endpoint 'wan_vace', grounding 'grounding')."""
    if family is not None and family not in MODEL_FAMILIES:
        raise ValueError(f"family must be one of {list(MODEL_FAMILIES)}, got {family!r}")
    return [preset for preset in PRESETS.values() if family is None or preset.family == family]


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; raises `UnknownModelError` (a `KeyError`) listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(name, list(PRESETS)) from None
