"""Sequence/tensor-parallel denoising (the parallel issue); process groups live here, no model code."""
