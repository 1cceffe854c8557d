"""`SamplingRunner` driven directly, without Ray or Serve, over both samplers of the one protocol (LTX-2
generation, Wan VACE edit): progress after every step, cancel at step k, preempt at step k then resume in a fresh
runner == uninterrupted (bit for bit), a stale attempt fenced by the job store."""

from __future__ import annotations

import pytest
import torch

from imagine.jobs import JobStore, NewJob, StepSignal
from imagine.models.tiny import build_tiny_components
from imagine.models.tiny_vace import build_tiny_vace_components
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.types import GenerationSpec
from imagine.pipeline.vace import EditSpec, VaceEncoderStage, VaceSampler
from imagine.serving.runner import SAMPLING_PROGRESS_SHARE, LocalLoop, SamplingRunner
from imagine.storage.local import LocalArtifactStore

STEPS = 5
KEY = "checkpoints/job/denoise_state.pt"


class Case:
    """A sampler kind: its components, one request and its conditioning, and how to compare outputs."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "ltx2":
            components = build_tiny_components()
            self.request = GenerationSpec(prompt="rain", width=64, height=64, num_frames=9, num_inference_steps=STEPS, seed=3)
            self.conditioning = TextEncoderStage(components)("rain", "", True)
            self.new_sampler = lambda: DenoiserStage(components)
        else:
            components = build_tiny_vace_components()
            self.request = EditSpec("a red tree", "blurry", seed=3, num_inference_steps=STEPS, guidance_scale=4.0)
            generator = torch.Generator().manual_seed(0)
            frames = torch.randint(0, 256, (9, 32, 32, 3), dtype=torch.uint8, generator=generator)
            masks = torch.zeros(9, 32, 32)
            masks[:, 8:24, 8:24] = 1.0
            encoder = VaceEncoderStage(components, components["transformer"].config.patch_size)
            self.conditioning = encoder(frames, masks, self.request)
            self.new_sampler = lambda: VaceSampler(components)

    def tensors(self, output) -> list[torch.Tensor]:
        return [output.video, output.audio] if self.kind == "ltx2" else [output.latents]


@pytest.fixture(scope="module", params=["ltx2", "wan_vace"])
def case(request) -> Case:
    return Case(request.param)


class Script:
    """A controller answering `signals[k]` after step k (CONTINUE otherwise), recording what it was told."""

    def __init__(self, signals: dict[int, StepSignal] | None = None):
        self.signals = signals or {}
        self.reports: list[float] = []

    def __call__(self, progress: float) -> StepSignal:
        self.reports.append(progress)
        step = round(progress / SAMPLING_PROGRESS_SHARE * STEPS)
        return self.signals.get(step, StepSignal.CONTINUE) if len(self.reports) > 1 else StepSignal.CONTINUE


def run(case: Case, store: LocalArtifactStore, report, **kwargs):
    runner = SamplingRunner(LocalLoop(case.new_sampler()), store, **{k: kwargs.pop(k) for k in ("progress_every",) if k in kwargs})
    return runner.run(case.request, case.conditioning, report, checkpoint_key=KEY, **kwargs)


def test_runs_to_done_reporting_every_step(case, tmp_path):
    script = Script()
    outcome = run(case, LocalArtifactStore(tmp_path), script)
    assert outcome.status == "done" and outcome.steps_run == STEPS and outcome.checkpoint_key is None
    expected = [SAMPLING_PROGRESS_SHARE * k / STEPS for k in range(STEPS + 1)]
    assert script.reports == pytest.approx(expected)
    assert all(t.device.type == "cpu" for t in case.tensors(outcome.output))


def test_progress_every_n_steps_and_the_last(case, tmp_path):
    script = Script()
    run(case, LocalArtifactStore(tmp_path), script, progress_every=2)
    assert script.reports == pytest.approx([SAMPLING_PROGRESS_SHARE * k / STEPS for k in (0, 2, 4, 5)])


def test_cancel_at_step_k_stops_there_without_a_checkpoint(case, tmp_path):
    store = LocalArtifactStore(tmp_path)
    script = Script({2: StepSignal.CANCEL})
    outcome = run(case, store, script)
    assert outcome.status == "cancelled" and outcome.steps_run == 2 and outcome.output is None
    assert len(script.reports) == 3  # before the loop, after steps 1 and 2: not one step more
    assert not list(tmp_path.rglob("*.pt"))


def test_preempt_at_step_k_then_resume_equals_uninterrupted(case, tmp_path):
    store = LocalArtifactStore(tmp_path)
    uninterrupted = run(case, store, Script())
    paused = run(case, store, Script({2: StepSignal.PREEMPT}))
    assert paused.status == "preempted" and paused.steps_run == 2 and paused.checkpoint_key == KEY
    # a fresh sampler and runner (as on another replica) resumes from the checkpoint alone
    script = Script()
    resumed = run(case, store, script, resume_from=KEY)
    assert resumed.status == "done" and resumed.steps_run == STEPS - 2
    assert script.reports[0] == pytest.approx(SAMPLING_PROGRESS_SHARE * 2 / STEPS)
    for a, b in zip(case.tensors(resumed.output), case.tensors(uninterrupted.output)):
        assert torch.equal(a, b)
    # a preemption request at the very last step finishes instead of checkpointing a done loop
    assert run(case, store, Script({STEPS: StepSignal.PREEMPT})).status == "done"


def test_a_stale_attempt_is_fenced_by_the_job_store(case, tmp_path):
    """Attempt 1 is re-queued and claimed again (attempt 2) while it still runs: its next report stops it, and it
    writes no progress over attempt 2's."""
    from imagine.jobs.params import GenerationParams

    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    params = GenerationParams(
        prompt="rain", negative_prompt="", duration=1.0, resolution="480p", aspect_ratio="1:1", seed=3,
        num_inference_steps=STEPS, guidance_scale=3.0, fps=24.0, width=64, height=64, num_frames=9, image_key=None,
    )
    job_id = jobs.create(NewJob(kind="generation", model="tiny", params=params)).id
    first = jobs.claim(job_id)
    assert first is not None and first.attempt == 1
    seen: list[StepSignal] = []

    def report(progress: float) -> StepSignal:
        signal = jobs.report_progress(job_id, first.attempt, progress)
        seen.append(signal)
        if len(seen) == 2:  # after step 1: the job is re-queued and claimed again elsewhere
            assert jobs.requeue_running() == 1
            assert jobs.claim(job_id).attempt == 2
        return signal

    outcome = run(case, LocalArtifactStore(tmp_path), report)
    assert outcome.status == "cancelled" and outcome.steps_run == 2
    assert seen == [StepSignal.CONTINUE, StepSignal.CONTINUE, StepSignal.CANCEL]
    job = jobs.get(job_id)
    assert job.attempt == 2 and job.progress == 0.0


def test_a_checkpoint_unpickles_without_importing_diffusers(case, tmp_path):
    """A parallel pool's replica holds no model (its ranks do): unpickling a checkpoint there must not import
    diffusers (a measured ~3 s stall in the first preemption of a VACE edit, when the state held the scheduler
    object), so states are plain tensors, numbers and our dataclasses."""
    import subprocess
    import sys

    store = LocalArtifactStore(tmp_path)
    assert run(case, store, Script({2: StepSignal.PREEMPT})).status == "preempted"
    code = (
        "import sys; from imagine.serving.runner import load_checkpoint; from imagine.storage.local import "
        f"LocalArtifactStore; s = load_checkpoint(LocalArtifactStore({str(tmp_path)!r}), {KEY!r}); "
        "assert s.step_index == 2, s.step_index; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'diffusers'], 'diffusers was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


class _Exploit:
    """What an attacker with write access to the artifact store would plant: unpickling it runs a command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    """A checkpoint is loaded with weights_only: a planted pickle that would run code is refused without running it,
    and a checkpoint naming a type outside the loop states is refused too."""
    import io

    from imagine.serving.runner import CheckpointError, load_checkpoint

    store = LocalArtifactStore(tmp_path / "artifacts")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"latents": torch.zeros(2), "payload": _Exploit(str(marker))}, buf)
    store.put_bytes("checkpoints/t/j/denoise_state.pt", buf.getvalue())
    with pytest.raises(CheckpointError, match="more than tensors and plain data"):
        load_checkpoint(store, "checkpoints/t/j/denoise_state.pt")
    assert not marker.exists()

    buf = io.BytesIO()
    torch.save({"__checkpoint_type__": "subprocess:Popen", "fields": {"args": ["true"]}}, buf)
    store.put_bytes("checkpoints/t/k/denoise_state.pt", buf.getvalue())
    with pytest.raises(CheckpointError, match="not a checkpoint type"):
        load_checkpoint(store, "checkpoints/t/k/denoise_state.pt")
