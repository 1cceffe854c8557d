"""Artifact-key layout: where each job's inputs, outputs, checkpoints and work files live in the artifact store
(one place, so the ingress, the scheduler, the replicas and the retention sweeper agree).

Keys are `<kind>/<tenant>/<job id>/<file>`: the kind first, so a bucket lifecycle rule can expire `inputs/`,
`checkpoints/` and `work/` on their own schedule (a backstop behind the sweeper), then the tenant, so one tenant's
objects can be listed, exported or erased (and IAM-scoped) by prefix."""

from __future__ import annotations

import hashlib
import re

from imagine.storage.base import check_key

_SAFE_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def tenant_component(tenant: str) -> str:
    """The tenant as one key component: itself when it is a short plain name, else a stable digest (a tenant name
    with '/', '..', spaces or unicode never shapes the key)."""
    if _SAFE_TENANT.fullmatch(tenant):
        return tenant
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


def _key(kind: str, tenant: str, job_id: str, name: str) -> str:
    return check_key(f"{kind}/{tenant_component(tenant)}/{job_id}/{name}")


def input_image_key(tenant: str, job_id: str) -> str:
    return _key("inputs", tenant, job_id, "image.png")


def input_source_key(tenant: str, job_id: str) -> str:
    return _key("inputs", tenant, job_id, "source.mp4")


def input_mask_key(tenant: str, job_id: str) -> str:
    return _key("inputs", tenant, job_id, "mask.mp4")


def output_video_key(tenant: str, job_id: str) -> str:
    return _key("outputs", tenant, job_id, "video.mp4")


def checkpoint_key(tenant: str, job_id: str) -> str:
    """A preempted job's sampling-loop state (deleted once the job ends)."""
    return _key("checkpoints", tenant, job_id, "denoise_state.pt")


def grounded_masks_key(tenant: str, job_id: str) -> str:
    """An edit's grounded masks (kept across preemption and retries; deleted once the job ends)."""
    return _key("work", tenant, job_id, "masks.npz")


def scratch_keys(tenant: str, job_id: str) -> list[str]:
    """Every key of a job that is not its output: deleted when the job ends, whatever way it ends. Includes the
    layout before tenant prefixes (`inputs/<job id>/...`), whose jobs may still be in the store."""
    current = [f(tenant, job_id) for f in (input_image_key, input_source_key, input_mask_key, checkpoint_key,
                                          grounded_masks_key)]
    legacy = [f"inputs/{job_id}/image.png", f"inputs/{job_id}/source.mp4", f"inputs/{job_id}/mask.mp4",
              f"checkpoints/{job_id}/denoise_state.pt", f"work/{job_id}/masks.npz"]
    return current + legacy
