"""Imagine: self-hosted video + native-audio generation on Ray Serve.

Users import `imagine.client.ImagineClient` (HTTP SDK) and, to run a server, `imagine.serving.build_app`.
"""

__version__ = "0.1.0"
