"""Turns user-facing video sizes (duration, resolution class, aspect ratio, fps) into the exact
width / height / frame count the LTX-2 family accepts.

LTX-2's video VAE compresses 32x in space and 8x in time (causal first frame), so the model takes
width and height that are multiples of 32 and ``8k + 1`` frames. The rules, documented in the README:

* the resolution class names the short side: ``480p`` -> 480, ``720p`` -> 720;
* the long side is ``short * ratio``; both sides are rounded to the nearest multiple of 32
  (ties round down), so ``480p 16:9`` is 864x480 and ``720p 16:9`` is 1280x704;
* the frame count is the ``8k + 1`` nearest to ``duration * fps`` (ties round up), at least 9;
  the clip's real duration is ``num_frames / fps`` and is what the job reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

RESOLUTIONS: dict[str, int] = {"480p": 480, "720p": 720}
ASPECT_RATIOS: dict[str, Fraction] = {
    "16:9": Fraction(16, 9),
    "9:16": Fraction(9, 16),
    "1:1": Fraction(1, 1),
    "4:3": Fraction(4, 3),
    "3:4": Fraction(3, 4),
    "3:2": Fraction(3, 2),
    "2:3": Fraction(2, 3),
}


@dataclass(frozen=True)
class VideoPlan:
    """The exact size of a clip the model will generate."""

    width: int
    height: int
    num_frames: int
    fps: float

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def _round_to_multiple(value: float, multiple: int) -> int:
    lower = int(value // multiple) * multiple
    upper = lower + multiple
    # ties go down so a size never grows past the requested class
    rounded = upper if (value - lower) > (upper - value) else lower
    return max(multiple, rounded)


def frames_for(duration_s: float, fps: float, temporal_multiple: int = 8) -> int:
    """The ``k * temporal_multiple + 1`` frame count nearest to ``duration_s * fps``."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    target = duration_s * fps
    k = max(1, int((target - 1) / temporal_multiple + 0.5))
    return k * temporal_multiple + 1


def plan_video(
    duration_s: float,
    resolution: str,
    aspect_ratio: str,
    fps: float,
    spatial_multiple: int = 32,
    temporal_multiple: int = 8,
) -> VideoPlan:
    """Resolve a request's size fields into model-legal dimensions (see the module docstring)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {resolution!r}")
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect_ratio must be one of {list(ASPECT_RATIOS)}, got {aspect_ratio!r}")
    short = RESOLUTIONS[resolution]
    ratio = ASPECT_RATIOS[aspect_ratio]
    if ratio >= 1:
        width, height = float(short * ratio), float(short)
    else:
        width, height = float(short), float(short / ratio)
    return VideoPlan(
        width=_round_to_multiple(width, spatial_multiple),
        height=_round_to_multiple(height, spatial_multiple),
        num_frames=frames_for(duration_s, fps, temporal_multiple),
        fps=float(fps),
    )
