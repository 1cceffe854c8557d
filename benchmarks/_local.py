"""Shared by the benchmarks: a throwaway local Ray + Serve running the Imagine app on the tiny preset."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_service(overrides: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield (base URL, AppConfig) of the app deployed with AppConfig fields `overrides` (auth off,
    a fresh home with the tiny model built), and tear it all down afterwards."""
    import ray
    from ray import serve

    from imagine.config import AppConfig
    from imagine.models.tiny import ensure_tiny_ltx2
    from imagine.serving.app import build_app

    home = tempfile.mkdtemp(prefix="imagine-bench-")
    ensure_tiny_ltx2(home)
    config = AppConfig.model_validate({"home": home, "auth": {"enabled": False}, **overrides})
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="imagine", route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        ray.shutdown()
