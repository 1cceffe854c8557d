"""Artifact-key layout: where each job's inputs, outputs, checkpoints and work files live in the artifact store
(one place, so the ingress, the scheduler and the replicas agree)."""

from __future__ import annotations


def input_image_key(job_id: str) -> str:
    return f"inputs/{job_id}/image.png"


def input_source_key(job_id: str) -> str:
    return f"inputs/{job_id}/source.mp4"


def input_mask_key(job_id: str) -> str:
    return f"inputs/{job_id}/mask.mp4"


def output_video_key(job_id: str) -> str:
    return f"outputs/{job_id}/video.mp4"


def checkpoint_key(job_id: str) -> str:
    """A preempted job's sampling-loop state (deleted once the job finishes)."""
    return f"checkpoints/{job_id}/denoise_state.pt"


def grounded_masks_key(job_id: str) -> str:
    """An edit's grounded masks (kept across preemption and retries; deleted once the job finishes)."""
    return f"work/{job_id}/masks.npz"
