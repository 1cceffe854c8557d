"""Turn a `ModelPreset` into a local diffusers-layout directory, and load pipeline components from one.

Every source ends up as a local directory with a `model_index.json` (builtin tiny models: built once; S3: downloaded
once), and components are loaded from it with each class's own `from_pretrained(dir, subfolder=name)` -- the same
path for the tiny model and for real weights.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imagine.models.cache import MODEL_INDEX, build_dir_once
from imagine.models.presets import (
    BUILTIN_SOURCES,
    BUILTIN_TINY_GROUNDING_SOURCE,
    BUILTIN_TINY_SOURCE,
    BUILTIN_TINY_VACE_SOURCE,
    ModelPreset,
)
from imagine.models.tiny import ensure_tiny_ltx2
from imagine.models.tiny_grounding import ensure_tiny_grounding
from imagine.models.tiny_vace import ensure_tiny_vace
from imagine.storage import s3

# builtin source -> `ensure_*(home) -> model dir` that builds it under home/models once
BUILTIN_BUILDERS: dict[str, Callable[[Path], Path]] = {
    BUILTIN_TINY_SOURCE: ensure_tiny_ltx2,
    BUILTIN_TINY_VACE_SOURCE: ensure_tiny_vace,
    BUILTIN_TINY_GROUNDING_SOURCE: ensure_tiny_grounding,
}


class ModelSourceError(ValueError):
    """A preset's weights cannot be found or fetched."""


def resolve_model_dir(preset: ModelPreset, home: Path, endpoint_url: str | None = None) -> Path:
    """Local directory (diffusers pipeline layout) holding `preset`'s weights, building/downloading it if needed.

    - ``builtin:tiny`` / ``builtin:tiny-vace`` / ``builtin:tiny-grounding``: built once under
      ``home/models/tiny-<config-hash>`` / ``tiny-vace-<config-hash>`` / ``tiny-grounding-<config-hash>``;
    - a local directory: must exist and contain ``model_index.json``;
    - ``s3://bucket/prefix``: downloaded once to ``home/models/s3/<bucket>/<prefix>`` (``endpoint_url`` selects an
      S3-compatible server; credentials come from boto3's usual chain).
    """
    home = Path(home).expanduser()
    if preset.is_builtin:
        return BUILTIN_BUILDERS[preset.source](home)
    if preset.is_s3:
        return download_s3_model(preset.source, home, endpoint_url=endpoint_url)
    model_dir = Path(preset.source).expanduser()
    _check_model_dir(model_dir, preset)
    return model_dir


def _check_model_dir(model_dir: Path, preset: ModelPreset) -> None:
    if not model_dir.is_dir():
        raise ModelSourceError(
            f"model preset {preset.name!r}: source directory {str(model_dir)!r} does not exist; point the preset's "
            f"`source` at a diffusers pipeline directory, an s3:// URI, or a builtin "
            f"({', '.join(sorted(BUILTIN_SOURCES))})"
        )
    if not (model_dir / MODEL_INDEX).is_file():
        raise ModelSourceError(
            f"model preset {preset.name!r}: source directory {str(model_dir)!r} has no {MODEL_INDEX}; it must be a "
            f"diffusers pipeline directory (as written by `save_pretrained`)"
        )


# model sources parse with the artifact store's one s3:// parser; their errors name the preset's `source` field
parse_s3_uri = functools.partial(s3.parse_s3_uri, field="source")


def _inside(root: Path, relative: str, uri: str) -> Path:
    """`root / relative` for an object key below the model's prefix, refusing any key that would land outside `root`
    (`../`, an absolute path, a backslash or NUL): a bucket writable by others must not write anywhere else."""
    parts = relative.split("/")
    if relative.startswith("/") or "\\" in relative or "\0" in relative or any(p in ("", ".", "..") for p in parts):
        raise ModelSourceError(f"source {uri!r}: refusing object key {relative!r} (it would leave the model directory)")
    destination = root.joinpath(*parts)
    if not destination.resolve().is_relative_to(root.resolve()):
        raise ModelSourceError(f"source {uri!r}: refusing object key {relative!r} (it resolves outside the model directory)")
    return destination


def download_s3_model(uri: str, home: Path, endpoint_url: str | None = None) -> Path:
    """Download every object under ``s3://bucket/prefix`` to ``home/models/s3/<bucket>/<prefix>`` once.

    Concurrent callers serialise on a lock file; the download goes to a temporary sibling directory that is renamed
    into place only once complete, so a partial download is never mistaken for a model.
    """
    import boto3

    bucket, prefix = parse_s3_uri(uri)
    target = Path(home).expanduser() / "models" / "s3" / bucket / prefix
    if (target / MODEL_INDEX).is_file():
        return target
    key_prefix = f"{prefix}/" if prefix else ""

    def download(tmp_dir: Path) -> None:
        client = boto3.client("s3", endpoint_url=endpoint_url)
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(key_prefix) :]
                if not relative or relative.endswith("/"):
                    continue
                destination = _inside(tmp_dir, relative, uri)
                destination.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(destination))
                count += 1
        if not (tmp_dir / MODEL_INDEX).is_file():
            raise ModelSourceError(
                f"source {uri!r}: found {count} objects but no {MODEL_INDEX} directly under the prefix; "
                f"it must hold a diffusers pipeline directory"
            )

    return build_dir_once(target, download, lock_name=target.name or bucket)


def _component_class(library: str, class_name: str) -> type:
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    else:  # pipeline-local modules are recorded by pipeline name, e.g. "ltx2" -> diffusers.pipelines.ltx2
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    try:
        return getattr(module, class_name)
    except AttributeError as e:
        raise ModelSourceError(f"{MODEL_INDEX}: class {class_name!r} not found in {module.__name__}") from e


def device_map(device: str | torch.device) -> torch.device | None:
    """`from_pretrained`'s `device_map` for a module loaded onto `device`: None on the CPU (load, then `.to`), else
    the device, so the weights are read straight onto it instead of through a full host copy.

    Both libraries take a device string or a `torch.device` (diffusers 0.42 and transformers 5 turn either into
    `{"": device}`; accelerate's dispatch then only calls `.to(device)` on the already-placed module, no hooks).
    A `torch.device` rather than the string because transformers rewrites the string "cuda" into
    "cuda:$LOCAL_RANK", which a rank whose Ray-narrowed CUDA_VISIBLE_DEVICES shows one GPU does not have."""
    placed = torch.device(device)
    return None if placed.type == "cpu" else placed


def load_components(
    model_dir: Path, names: list[str], device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Load the named pipeline components from `model_dir` (classes as recorded in its model_index.json).

    Modules are loaded in `dtype` onto `device` (off the CPU: straight onto it, see `device_map`) and put in eval
    mode; tokenizers, schedulers and image processors are returned as loaded.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / MODEL_INDEX
    if not index_path.is_file():
        raise ModelSourceError(f"model_dir: {str(model_dir)!r} has no {MODEL_INDEX}")
    index = json.loads(index_path.read_text())
    placement = device_map(device)
    components: dict[str, Any] = {}
    for name in names:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise ValueError(f"names: component {name!r} is not in {index_path} (has: {sorted(index)})")
        library, class_name = entry
        cls = _component_class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            # dtype at load time (not `.to(dtype)` afterwards) so modules a class keeps in fp32 stay in fp32
            dtype_kwarg = {"dtype": dtype} if library == "transformers" else {"torch_dtype": dtype}
            if placement is None:
                component = cls.from_pretrained(str(model_dir), subfolder=name, **dtype_kwarg).to(device)
            else:
                component = cls.from_pretrained(str(model_dir), subfolder=name, device_map=placement, **dtype_kwarg)
            component = component.eval()
        else:  # tokenizer, scheduler
            component = cls.from_pretrained(str(model_dir), subfolder=name)
        components[name] = component
    return components


def move_components(components: dict[str, Any], device: str | torch.device) -> None:
    """Move every module of `components` (as `load_components` returns them) to `device`, in place."""
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device)
