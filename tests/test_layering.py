"""The ingress stays light (DESIGN.md section 2): importing the HTTP app, the job store or the scheduling policy
loads neither torch nor PyAV. Each check runs in a fresh interpreter, so what this test process imported does not
count."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["imagine.api.routes", "imagine.jobs", "imagine.scheduling"])
def test_import_loads_neither_torch_nor_av(module):
    code = f"import {module}, sys; heavy = sorted({{'torch', 'av'}} & set(sys.modules)); assert not heavy, heavy"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"import {module} loaded {proc.stderr.strip().splitlines()[-1:]}"
