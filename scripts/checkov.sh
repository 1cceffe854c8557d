#!/usr/bin/env bash
# checkov in its own venv (.venv-checkov: it pins old boto3/packaging/networkx, which must not enter the project's
# .venv); created once, reused after. Usage: scripts/checkov.sh <checkov args...>
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-checkov"
exec 9>"$root/.venv-checkov.lock"
flock 9                      # two callers at once: one installs, the other waits and reuses it
if [ ! -x "$venv/bin/checkov" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "checkov==3.3.30" >&2
fi
flock -u 9
exec "$venv/bin/checkov" "$@"
