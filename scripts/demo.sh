#!/usr/bin/env bash
# Fresh machine -> a generated MP4: install into .venv, start `imagine up` (tiny preset, SQLite,
# local artifacts, localhost only) in the background, generate a 2 s clip with audio.
# The server keeps running afterwards (log: imagine-up.log); stop it with `kill $(cat imagine-up.pid)`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0          # CPU wheel first: an unpinned torch pulls GBs of CUDA wheels
pip install -q -e .
imagine up --port "${IMAGINE_PORT:-8000}" > imagine-up.log 2>&1 &
echo $! > imagine-up.pid
imagine generate "a lighthouse at dusk, waves crashing on the rocks" --duration 2 \
  --url "http://127.0.0.1:${IMAGINE_PORT:-8000}" --wait-ready 600 -o lighthouse.mp4
