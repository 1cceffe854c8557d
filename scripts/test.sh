#!/usr/bin/env bash
# Fresh machine -> the whole test suite (CPU): install into .venv with the dev extra, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0          # CPU wheel first: an unpinned torch pulls GBs of CUDA wheels
pip install -q -e ".[dev]"
python -m pytest "$@"
