"""Ray Serve deployments hosting the pipeline stages, and `build_app` that binds them."""


def build_app(args=None):
    from imagine.serving.app import build_app as _build

    return _build(args)
