"""Ray Serve deployments hosting the pipeline stages, and `build_app` that binds them."""


def build_app(args=None):  # noqa: ANN001, ANN201 - re-export without importing Ray at package import
    from imagine.serving.app import build_app as _build

    return _build(args)
