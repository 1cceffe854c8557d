"""Write Ray's own Grafana dashboards, as the pinned Ray generates them, into cluster/monitoring/dashboards/.

    python cluster/monitoring/generate_dashboards.py           # rewrite the JSON files
    python cluster/monitoring/generate_dashboards.py --check   # exit 1 if a committed file differs (a Ray bump)

The dashboards come from `ray.dashboard.modules.metrics.grafana_dashboard_factory`, the same code Ray's head uses
for its own /tmp/ray/session_latest/metrics/grafana. The `RAY_GRAFANA_*` variables that change them (uid, global
filters, log links) are cleared first, so the output depends on the Ray version alone. imagine.json (the service's
own dashboard) is written by hand and is not touched here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"

# file name -> the factory function that makes it; `(content, uid)` each
RAY_DASHBOARDS: dict[str, str] = {
    "ray-default.json": "generate_default_grafana_dashboard",
    "ray-serve.json": "generate_serve_grafana_dashboard",
    "ray-serve-deployment.json": "generate_serve_deployment_grafana_dashboard",
}


def generate() -> dict[str, str]:
    """File name -> dashboard JSON text (2-space indent, newline-terminated) as the installed Ray makes it."""
    for name in [k for k in os.environ if k.startswith("RAY_GRAFANA_")]:
        del os.environ[name]
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    out = {}
    for file_name, function_name in RAY_DASHBOARDS.items():
        make: Callable[[], tuple[str, str]] = getattr(factory, function_name)
        content, uid = make()
        dashboard = json.loads(content)
        if dashboard.get("uid") != uid:
            raise ValueError(f"{function_name}: dashboard uid {dashboard.get('uid')!r} != returned uid {uid!r}")
        out[file_name] = json.dumps(dashboard, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for file_name, text in generate().items():
        path = DASHBOARDS_DIR / file_name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(file_name)
        else:
            path.write_text(text)
            print(f"wrote {path} ({len(text)} bytes)")
    if stale:
        print(f"stale: {', '.join(stale)}; run python {Path(__file__).name} to regenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
