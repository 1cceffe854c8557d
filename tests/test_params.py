"""Typed job params (`imagine.jobs.params`): built once, stored as JSON, loaded back typed and equal, on SQLite and on
a real PostgreSQL; the `duration_s` column admission sums, and its backfill when an older table gains it."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
from job_helpers import generation_job, generation_params
from pydantic import ValidationError

from imagine.jobs import (
    EditInstruction,
    EditMask,
    EditParams,
    EditPlace,
    GenerationParams,
    JobStore,
    NewJob,
    params_for,
)
from imagine.jobs.store import jobs_table


def _edit_params(**overrides) -> EditParams:
    fields = {
        "prompt": "add a cat next to the sofa",
        "instruction": EditInstruction(
            op="add", target="cat", place=EditPlace(phrase="next to the sofa", kind="near", anchors=("sofa",)),
            language="en", text="add a cat next to the sofa",
        ),
        "negative_prompt": "", "seed": 5, "num_inference_steps": 4, "guidance_scale": 5.0, "source_job_id": None,
        "source_key": "inputs/j/source.mp4", "width": 64, "height": 48, "num_frames": 25, "fps": 24.0,
        "duration": 25 / 24, "resolution": "480p", "source_has_audio": True,
        "mask": EditMask(frames={0: [[0.0, 0.0, 8.0, 8.0]], 12: []}), "mask_key": None,
    }
    return EditParams(**{**fields, **overrides})


@pytest.fixture()
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def test_params_round_trip_typed(store):
    generation = generation_params(prompt="a fox", image_key="inputs/x/image.png", aspect_ratio="9:16")
    edit = _edit_params()
    video_mask = _edit_params(mask=EditMask(video=True), mask_key="inputs/y/mask.mp4", instruction=EditInstruction(
        op="inpaint", replacement="make it glow"))
    for kind, params in (("generation", generation), ("edit", edit), ("edit", video_mask)):
        job = store.create(NewJob(kind=kind, model="m", params=params))
        loaded = store.get(job.id).params
        assert type(loaded) is type(params) and loaded == params
        assert params_for(kind, json.loads(params.model_dump_json())) == params
    loaded = store.list_by_status(store.get(job.id).status)
    assert {type(j.params) for j in loaded} == {GenerationParams, EditParams}
    assert store.get(job.id).params.mask.video and store.get(job.id).params.instruction.op == "inpaint"


def test_params_are_frozen_and_strict():
    params = generation_params()
    with pytest.raises(ValidationError):
        params.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        generation_params(image_url="data:...")
    with pytest.raises(ValidationError):
        generation_params(resolution="1080p")
    with pytest.raises(ValidationError, match="exactly one"):
        EditMask(boxes=[[0, 0, 1, 1]], video=True)
    with pytest.raises(ValidationError, match="exactly one"):
        EditMask()
    with pytest.raises(ValidationError, match="mask_key"):
        _edit_params(mask=EditMask(video=True))  # a mask video must be stored
    with pytest.raises(ValidationError, match="mask_key"):
        _edit_params(mask_key="inputs/j/mask.mp4")  # and only then
    with pytest.raises(ValidationError, match="extra"):
        params_for("edit", {**_edit_params().model_dump(), "image_key": None})  # not an edit field


def test_kind_chooses_the_model():
    with pytest.raises(ValueError, match="unknown job kind 'extension'"):
        params_for("extension", {})
    with pytest.raises(ValidationError):
        params_for("edit", generation_params().model_dump())
    with pytest.raises(TypeError, match="EditParams"):
        NewJob(kind="edit", model="m", params=generation_params())
    with pytest.raises(ValueError, match="unknown job kind"):
        NewJob(kind="extension", model="m", params=generation_params())


def test_an_older_edit_row_still_loads(store):
    """An older version stored `image_key: null` in edit params; its rows load (the key is dropped)."""
    job = store.create(NewJob(kind="edit", model="m", params=_edit_params()))
    legacy = {**json.loads(_edit_params().model_dump_json()), "image_key": None}
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job.id).values(params=json.dumps(legacy)))
    assert store.get(job.id).params == _edit_params()


def test_duration_s_column_and_its_backfill(db_url):
    """The daily sum reads `duration_s`; a table from before that column gets it backfilled from the params of the
    last day's rows (older rows are outside every daily window and keep 0)."""
    store = JobStore(db_url)
    recent = [store.create(generation_job(params={"duration": d}, tenant="acme")).id for d in (2.0, 3.5)]
    old = store.create(generation_job(params={"duration": 7.0}, tenant="acme")).id
    edit = store.create(NewJob(kind="edit", model="m", params=_edit_params(), tenant="acme")).id
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs_table).where(jobs_table.c.id == old).values(created_at=now - 3 * 86_400))
        assert store.requested_seconds_since(conn, "acme", None, now - 3600, "none") == pytest.approx(5.5 + 25 / 24)
        assert store.requested_seconds_since(conn, "acme", None, now - 3600, recent[0]) == pytest.approx(3.5 + 25 / 24)
        # a table from before migrations: no alembic_version, no duration_s, none of the later revisions' columns
        for index in ("ix_jobs_sweep_inputs", "ix_jobs_sweep_outputs"):
            conn.exec_driver_sql(f"DROP INDEX {index}")
        for column in ("duration_s", "expires_at", "outputs_purged_at", "inputs_purged_at", "dialect", "deleted_at"):
            conn.exec_driver_sql(f"ALTER TABLE jobs DROP COLUMN {column}")
        conn.exec_driver_sql("DROP TABLE alembic_version")
    store.close()

    store = JobStore(db_url)  # an older table: the column is added and backfilled, then it is migrated to head
    with store.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(jobs_table.c.id, jobs_table.c.duration_s)).all())
        assert rows == {recent[0]: 2.0, recent[1]: 3.5, old: 0.0, edit: pytest.approx(25 / 24)}
        assert store.requested_seconds_since(conn, "acme", None, now - 3600, "none") == pytest.approx(5.5 + 25 / 24)
    store.close()
