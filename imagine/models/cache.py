"""Build a model directory exactly once, safely across processes: an `fcntl` lock serialises builders,
the build writes into a temporary sibling that is renamed into place only when complete, so readers
never see a half-written model and a crashed build leaves nothing behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MODEL_INDEX = "model_index.json"


def build_dir_once(target: Path, build: Callable[[Path], None], lock_name: str | None = None) -> Path:
    """Return `target`, first running `build(tmp_dir)` and renaming it to `target` if `target` has no
    model_index.json yet. `build` must leave a model_index.json in the directory it is given."""
    target = Path(target)
    if (target / MODEL_INDEX).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{lock_name or target.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if (target / MODEL_INDEX).is_file():  # another builder won while we waited
                return target
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                build(tmp_dir)
                if not (tmp_dir / MODEL_INDEX).is_file():
                    raise RuntimeError(f"building {target} produced no {MODEL_INDEX}")
                if target.exists():  # stale leftover without model_index.json
                    shutil.rmtree(target)
                os.replace(tmp_dir, target)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target
