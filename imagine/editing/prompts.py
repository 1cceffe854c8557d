"""Repaint prompts for an edit instruction: what to paint into the masked region and what to steer away from.
Pure text (no torch): the ingress, the scheduler and the stages share it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EditOp = Literal["remove", "add", "replace"]

# Generic artefacts to steer away from; a removal also names the removed object here (see `prompt_for`).
BASE_NEGATIVE_PROMPT = "blurry, distorted, deformed, low quality, artifacts, flicker, watermark, text, subtitles"


class EditInputError(ValueError):
    """An edit input the edit stages cannot take: prompts, frames, masks or sampling parameters."""


@dataclass(frozen=True)
class EditPrompt:
    """Text conditioning for one edit: what to paint into the masked region, and what to steer away from."""

    prompt: str
    negative_prompt: str


def prompt_for(op: EditOp, target: str, replacement: str | None = None) -> EditPrompt:
    """Prompts for an edit instruction that a parser has split into (op, target, replacement).

    - ``remove``: the masked region becomes background continuing the scene; `target` goes into the negative
      prompt so the model is pushed away from repainting the object it is removing.
    - ``add``: `target` is the object to paint into the masked region.
    - ``replace``: `replacement` is painted where `target` was; `target` is steered away from.
    """
    if op not in ("remove", "add", "replace"):
        raise EditInputError(f"op must be 'remove', 'add' or 'replace', got {op!r}")
    if not isinstance(target, str) or not target.strip():
        raise EditInputError(f"target must be a non-empty string, got {target!r}")
    target = target.strip()
    if op == "replace":
        if not isinstance(replacement, str) or not replacement.strip():
            raise EditInputError(f"replacement must be a non-empty string for op 'replace', got {replacement!r}")
        replacement = replacement.strip()
    elif replacement is not None:
        raise EditInputError(f"replacement is only used by op 'replace', got {replacement!r} for op {op!r}")

    integrate = "naturally integrated into the scene, matching its lighting, perspective, colours and motion"
    if op == "remove":
        return EditPrompt(
            prompt="empty background that seamlessly continues the surrounding scene, with consistent lighting, "
            "texture and motion",
            negative_prompt=f"{target}, {BASE_NEGATIVE_PROMPT}",
        )
    if op == "add":
        return EditPrompt(prompt=f"{target}, {integrate}", negative_prompt=BASE_NEGATIVE_PROMPT)
    return EditPrompt(prompt=f"{replacement}, {integrate}", negative_prompt=f"{target}, {BASE_NEGATIVE_PROMPT}")


def edit_prompt(instruction: Any, text: str, negative_prompt: str = "") -> EditPrompt:
    """Prompts for a stored edit: a parsed instruction (an object with `op`, `target`, `replacement`: the job's
    typed `EditInstruction`) goes through `prompt_for`; op ``inpaint`` (an explicit mask with free text that is not
    an instruction) paints `text` itself. The request's own `negative_prompt` is prepended to the derived one."""
    if instruction.op == "inpaint":
        derived = EditPrompt(prompt=text, negative_prompt=BASE_NEGATIVE_PROMPT)
    else:
        derived = prompt_for(instruction.op, instruction.target, instruction.replacement)
    negative = ", ".join(part for part in (negative_prompt.strip(), derived.negative_prompt) if part)
    return EditPrompt(prompt=derived.prompt, negative_prompt=negative)
