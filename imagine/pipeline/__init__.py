"""Plain, Ray-free stages: LTX-2 generation (`encode` -> `denoise` (resumable) -> `decode`), Wan VACE repainting
(`vace`), masks (`masks`) and video files (`media`: probe, read, mux, remux); `sizing` maps user-facing sizes to
model-legal ones and `types` holds the picklable values passed between stages.

This package imports nothing itself: import the submodule you need, so that the torch-free ones (`sizing`) stay
light for the HTTP ingress.
"""
