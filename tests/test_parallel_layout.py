"""`imagine/parallel/` holds only generic mechanisms (DESIGN section 2): no module there names a model class, and
none imports model code at module top; per-model plans live in `imagine/models/` and register by class.
Pure Python: reads the source files (one short subprocess checks what importing the light modules pulls in)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PARALLEL = Path(__file__).resolve().parent.parent / "imagine" / "parallel"
SOURCES = sorted(PARALLEL.glob("*.py"))

# Model class names and the per-model helper names they used to come with (`_ltx2_shard_inputs`, `_wan_...`).
MODEL_NAMES = re.compile(
    r"LTX2|ltx2|Wan[A-Z]|_wan_|\bwan_|Gemma|gemma|Llama|llama|UMT5|umt5|T5Encoder|CLIPText|Flux[A-Z]|Hunyuan|CogVideo|Mochi"
)
# Packages whose import means model code (diffusers' model modules come with `diffusers` itself).
MODEL_PACKAGES = ("diffusers", "transformers", "imagine.models")


def test_parallel_sources_are_found():
    names = {path.name for path in SOURCES}
    assert {"__init__.py", "registry.py", "ulysses.py", "tensor.py", "routing.py"} <= names, names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_model_class_is_named(path: Path):
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if MODEL_NAMES.search(line)
    ]
    assert not hits, "parallel/ names a model; move it to the model's plan in imagine/models/:\n" + "\n".join(hits)


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run when the module is imported: at top level and inside top-level if/try/with blocks (an
    `if TYPE_CHECKING:` block counts too: model types are not needed there either), not inside functions."""
    found: list[tuple[int, str]] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_model_code_is_imported_at_module_top(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [
        f"{path.name}:{line}: import {module}"
        for line, module in _module_level_imports(tree)
        if any(module == package or module.startswith(package + ".") for package in MODEL_PACKAGES)
    ]
    assert not bad, "import model code inside the function that needs it, or move it to imagine/models/:\n" + "\n".join(
        bad
    )


def test_importing_the_light_modules_pulls_in_no_model_code():
    """`imagine.parallel`, its registry and the routing rule are imported by serving and the API (which never imports
    torch): they must stay free of torch and of any model module until a plan is looked up."""
    code = (
        "import sys; import imagine.parallel, imagine.parallel.registry, imagine.parallel.routing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'deepspeed')"
        " or m.startswith('imagine.models')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
