"""Usage ledger (exactly-once cost and price rows), `/v1/usage` and `/metrics`, on SQLite and on a
real PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from job_helpers import generation_job
from prometheus_client.parser import text_string_to_metric_families

from imagine.api.errors import install_error_handlers
from imagine.api.ops import create_ops_router
from imagine.config import AccountingConfig
from imagine.jobs import JobRecord, JobStore
from imagine.jobs.ledger import Ledger
from imagine.jobs.store import jobs_table

ACCOUNTING = AccountingConfig(
    device_hour_usd={"cpu": 0.36, "cuda": 3.60},  # 0.0001 $ and 0.001 $ per device-second
    price_per_second_usd={"tiny": {"480p": 0.0, "720p": 0.0}, "ltx-2": {"480p": 0.05, "720p": 0.10}},
)
DAY1 = dt.datetime(2025, 5, 1, 12, tzinfo=dt.UTC).timestamp()
DAY2 = DAY1 + 86_400


@pytest.fixture()
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


@pytest.fixture()
def ledger(store):
    return Ledger(store.engine, ACCOUNTING)


def _running(
    store: JobStore, tenant: str = "acme", model: str = "ltx-2", tier: str = "standard", resolution: str = "720p"
) -> JobRecord:
    job = store.create(
        generation_job(model, {"resolution": resolution}, tenant=tenant, priority=tier)
    )
    claimed = store.claim(job.id)
    assert claimed is not None
    return claimed


def _done(store: JobStore, duration_s: float = 4.0, **kw) -> JobRecord:
    job = _running(store, **kw)
    assert store.complete(job.id, job.attempt, {"duration_s": duration_s})
    return store.get(job.id)


def test_record_is_exactly_once_per_stage_attempt(store, ledger):
    job = _running(store)
    assert ledger.record(job, "denoiser", wall_s=10.0, device="cuda:0") is True
    assert ledger.record(job, "denoiser", wall_s=10.0, device="cuda:0") is False  # duplicate report
    assert ledger.record(job, "denoiser", wall_s=99.0, device="cuda:0") is False  # first write wins
    assert ledger.record(job, "decoder", wall_s=2.0, device="cuda") is True
    # a retry is a new attempt: it used more device time, so it is a separate row
    store.requeue_running()
    retry = store.claim(job.id)
    assert retry.attempt == 2
    assert ledger.record(retry, "denoiser", wall_s=5.0, device="cuda") is True
    usage = ledger.job_usage(retry)
    assert usage["device_seconds"] == pytest.approx(17.0)
    assert usage["cost_usd"] == pytest.approx(0.017)
    assert usage["price_usd"] == 0.0 and usage["output_seconds"] == 0.0  # not done yet


def test_restart_replay_adds_nothing(store, ledger, db_url):
    job = _done(store)
    assert ledger.record(job, "denoiser", wall_s=3.0, device="cpu") and ledger.bill(job, 4.0)
    restarted_store = JobStore(db_url)  # a new process: new engine, new Ledger, same database
    try:
        restarted = Ledger(restarted_store.engine, ACCOUNTING)
        assert restarted.record(job, "denoiser", wall_s=3.0, device="cpu") is False
        assert restarted.bill(job, 4.0) is False
        assert restarted.bill_missing(restarted_store) == 0
        assert restarted.job_usage(job) == ledger.job_usage(job)
    finally:
        restarted_store.close()


def test_cost_math(store, ledger):
    job = _running(store)
    ledger.record(job, "denoiser", wall_s=10.0, device="cuda", devices=4)
    ledger.record(job, "text_encoder", wall_s=2.0, device="cpu")
    usage = ledger.job_usage(job)
    assert usage["device_seconds"] == pytest.approx(42.0)
    assert usage["cost_usd"] == pytest.approx(40 * 3.60 / 3600 + 2 * 0.36 / 3600)
    assert ledger.totals_by_device_type() == {
        "cuda": pytest.approx((40.0, 0.04)),
        "cpu": pytest.approx((2.0, 0.0002)),
    }


def test_record_rejects_bad_input(store, ledger):
    job = _running(store)
    with pytest.raises(ValueError, match="'tpu'"):
        ledger.record(job, "denoiser", wall_s=1.0, device="tpu")
    with pytest.raises(ValueError, match="devices"):
        ledger.record(job, "denoiser", wall_s=1.0, device="cpu", devices=0)
    queued = store.create(generation_job("ltx-2", {"resolution": "480p"}))
    with pytest.raises(ValueError, match="never claimed"):
        ledger.record(queued, "denoiser", wall_s=1.0, device="cpu")


def test_bill_once_and_only_done_jobs_carry_a_price(store, ledger):
    done = _done(store, duration_s=4.0)
    assert ledger.bill(done, 4.0) is True
    assert ledger.bill(done, 4.0) is False  # duplicate completion
    assert ledger.job_usage(done) == {
        "output_seconds": 4.0,
        "device_seconds": 0.0,
        "cost_usd": 0.0,
        "price_usd": pytest.approx(0.4),
    }

    failed = _running(store)
    ledger.record(failed, "denoiser", wall_s=10.0, device="cuda")
    store.fail(failed.id, failed.attempt, {"message": "boom"})
    cancelled = _running(store)
    store.request_cancel(cancelled.id)
    store.mark_cancelled(cancelled.id, cancelled.attempt)
    for job_id in (failed.id, cancelled.id):
        with pytest.raises(ValueError, match="only done jobs"):
            ledger.bill(store.get(job_id), 4.0)
    usage = ledger.job_usage(store.get(failed.id))
    assert usage["price_usd"] == 0.0 and usage["output_seconds"] == 0.0
    assert usage["cost_usd"] == pytest.approx(0.01)  # what a failed job cost us still counts


def test_bill_missing_catches_up_after_a_crash(store, ledger):
    crashed = _done(store, duration_s=2.0, resolution="480p")  # completed, died before bill()
    billed = _done(store, duration_s=3.0)
    ledger.bill(billed, 3.0)
    assert ledger.bill_missing(store) == 1 and ledger.bill_missing(store) == 0
    assert ledger.job_usage(crashed)["price_usd"] == pytest.approx(0.1)


def test_usage_groups_and_tenant_isolation(store, ledger):
    a1 = _done(store, tenant="acme", model="ltx-2", tier="realtime", resolution="720p")
    a2 = _done(store, tenant="acme", model="tiny", tier="batch", resolution="480p")
    a3 = _running(store, tenant="acme", model="ltx-2", tier="batch", resolution="480p")  # fails later
    other = _done(store, tenant="globex", model="ltx-2")
    ledger.record(a1, "denoiser", wall_s=10.0, device="cuda", at=DAY1)
    ledger.bill(a1, 4.0, at=DAY1 + 60)
    ledger.record(a2, "denoiser", wall_s=100.0, device="cpu", at=DAY2)
    ledger.bill(a2, 5.0, at=DAY2)
    ledger.record(a3, "denoiser", wall_s=20.0, device="cuda", at=DAY2)
    ledger.record(other, "denoiser", wall_s=1000.0, device="cuda", at=DAY1)
    ledger.bill(other, 8.0, at=DAY1)

    by_day = ledger.usage("acme", DAY1 - 86_400, DAY2 + 86_400, "day")
    assert [r["group"] for r in by_day] == ["2025-05-01", "2025-05-02"]
    assert by_day[0] == {
        "group": "2025-05-01",
        "jobs": 1,
        "output_seconds": 4.0,
        "device_seconds": 10.0,
        "cost_usd": pytest.approx(0.01),
        "price_usd": pytest.approx(0.4),
    }
    assert by_day[1]["jobs"] == 2 and by_day[1]["device_seconds"] == pytest.approx(120.0)
    assert by_day[1]["cost_usd"] == pytest.approx(0.01 + 0.02) and by_day[1]["price_usd"] == 0.0  # tiny is free

    by_model = {r["group"]: r for r in ledger.usage("acme", DAY1 - 86_400, DAY2 + 86_400, "model")}
    assert set(by_model) == {"ltx-2", "tiny"}
    assert by_model["ltx-2"]["jobs"] == 2 and by_model["ltx-2"]["device_seconds"] == pytest.approx(30.0)
    assert by_model["ltx-2"]["output_seconds"] == 4.0  # only the done job's seconds

    by_tier = {r["group"]: r for r in ledger.usage("acme", DAY1 - 86_400, DAY2 + 86_400, "tier")}
    assert set(by_tier) == {"realtime", "batch"} and by_tier["batch"]["jobs"] == 2

    assert [r["group"] for r in ledger.usage("acme", DAY1 - 86_400, DAY2, "day")] == ["2025-05-01"]  # end exclusive
    globex = ledger.usage("globex", 0, DAY2 + 86_400, "model")
    assert globex == [
        {
            "group": "ltx-2",
            "jobs": 1,
            "output_seconds": 8.0,
            "device_seconds": 1000.0,
            "cost_usd": pytest.approx(1.0),
            "price_usd": pytest.approx(0.8),
        }
    ]
    assert ledger.usage("nobody", 0, DAY2 + 86_400, "day") == []
    with pytest.raises(ValueError, match="group_by"):
        ledger.usage("acme", 0, DAY2, "week")  # type: ignore[arg-type]


# -- HTTP ------------------------------------------------------------------------------------------
def _principal(x_tenant: str = Header("acme")) -> SimpleNamespace:
    return SimpleNamespace(tenant=x_tenant)


@pytest.fixture()
def client(store, ledger):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_ops_router(store, ledger, ACCOUNTING, _principal))
    with TestClient(app) as c:
        yield c


def _set_times(store: JobStore, job_id: str, **times: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(**times))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_read_the_database(store, ledger, client):
    for tier in ("standard", "standard", "realtime"):
        store.create(generation_job("ltx-2", {"resolution": "480p"}, priority=tier))
    running = _running(store)
    _set_times(store, running.id, created_at=1000.0, started_at=1003.0)  # waited 3 s
    done = _done(store)
    _set_times(store, done.id, created_at=1000.0, started_at=1000.2, finished_at=1040.0)  # waited 0.2, ran 39.8
    failed = _running(store)
    store.fail(failed.id, failed.attempt, {"message": "boom"})
    _set_times(store, failed.id, created_at=1000.0, started_at=1000.0, finished_at=1000.5)
    ledger.record(done, "denoiser", wall_s=30.0, device="cuda", devices=2)
    ledger.record(done, "decoder", wall_s=5.0, device="cpu")
    ledger.bill(done, 4.0)

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m = _samples(resp.text)
    assert m[("imagine_queue_depth", (("tier", "standard"),))] == 2
    assert m[("imagine_queue_depth", (("tier", "realtime"),))] == 1
    assert m[("imagine_queue_depth", (("tier", "batch"),))] == 0
    assert m[("imagine_queue_oldest_age_seconds", (("tier", "batch"),))] == 0
    assert 0 <= m[("imagine_queue_oldest_age_seconds", (("tier", "standard"),))] < 60
    assert m[("imagine_jobs_running", ())] == 1
    assert m[("imagine_jobs_finished", (("status", "done"),))] == 1
    assert m[("imagine_jobs_finished", (("status", "failed"),))] == 1
    assert m[("imagine_jobs_finished", (("status", "cancelled"),))] == 0
    assert m[("imagine_queue_wait_seconds_count", ())] == 3
    assert m[("imagine_queue_wait_seconds_bucket", (("le", "0.1"),))] == 1  # the failed job: 0 s
    assert m[("imagine_queue_wait_seconds_bucket", (("le", "0.5"),))] == 2
    assert m[("imagine_queue_wait_seconds_bucket", (("le", "5.0"),))] == 3
    assert m[("imagine_queue_wait_seconds_sum", ())] == pytest.approx(3.2)
    assert m[("imagine_job_run_seconds_count", ())] == 2
    assert m[("imagine_job_run_seconds_bucket", (("le", "1.0"),))] == 1
    assert m[("imagine_job_run_seconds_bucket", (("le", "30.0"),))] == 1
    assert m[("imagine_job_run_seconds_bucket", (("le", "60.0"),))] == 2
    assert m[("imagine_job_run_seconds_bucket", (("le", "+Inf"),))] == 2
    assert m[("imagine_device_seconds_total", (("device_type", "cuda"),))] == pytest.approx(60.0)
    assert m[("imagine_device_seconds_total", (("device_type", "cpu"),))] == pytest.approx(5.0)
    assert m[("imagine_cost_usd_total", (("device_type", "cuda"),))] == pytest.approx(0.06)
    assert m[("imagine_billed_usd_total", (("model", "ltx-2"),))] == pytest.approx(0.4)

    # another "replica" (a second router on the same database) reports the same numbers
    app2 = FastAPI()
    app2.include_router(create_ops_router(store, Ledger(store.engine, ACCOUNTING), ACCOUNTING, _principal))
    with TestClient(app2) as c2:
        m2 = _samples(c2.get("/metrics").text)
    ages = {k for k in m if k[0] == "imagine_queue_oldest_age_seconds"}  # these grow between the two scrapes
    assert {k: v for k, v in m2.items() if k not in ages} == {k: v for k, v in m.items() if k not in ages}
    assert all(m[k] <= m2[k] <= m[k] + 30 for k in ages)


def test_usage_endpoint(store, ledger, client):
    a = _done(store, tenant="acme")
    ledger.record(a, "denoiser", wall_s=10.0, device="cuda", at=DAY1)
    ledger.bill(a, 4.0, at=DAY1)
    g = _done(store, tenant="globex")
    ledger.record(g, "denoiser", wall_s=50.0, device="cuda", at=DAY1)

    body = client.get("/v1/usage", params={"start": "2025-05-01", "end": "2025-05-01"}).json()  # a date end: whole day
    assert body["tenant"] == "acme" and body["group_by"] == "day"
    assert body["data"] == [
        {
            "group": "2025-05-01",
            "jobs": 1,
            "output_seconds": 4.0,
            "device_seconds": 10.0,
            "cost_usd": pytest.approx(0.01),
            "price_usd": pytest.approx(0.4),
        }
    ]
    assert body["total"]["price_usd"] == pytest.approx(0.4)
    body = client.get("/v1/usage", params={"start": int(DAY1 - 1), "end": f"{DAY1 + 1}", "group_by": "model"}).json()
    assert [r["group"] for r in body["data"]] == ["ltx-2"]
    body = client.get(
        "/v1/usage", params={"start": "2025-05-01T00:00:00+00:00", "group_by": "tier"}, headers={"X-Tenant": "globex"}
    ).json()
    assert body["data"][0]["group"] == "standard" and body["data"][0]["device_seconds"] == 50.0
    assert client.get("/v1/usage").json()["data"] == []  # default window: last 30 days, nothing then

    for params, status, param in (
        ({"start": "yesterday"}, 400, "start"),
        ({"end": "2025-13-01"}, 400, "end"),
        ({"group_by": "week"}, 422, "group_by"),
        ({"start": "2025-05-02", "end": "2025-05-01T00:00:00"}, 422, "start"),
    ):
        resp = client.get("/v1/usage", params=params)
        assert resp.status_code == status, params
        assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "params,param",
    [
        ({"end": "9999-12-31"}, "end"),  # the day after is past what a datetime holds: was a 500
        ({"start": "nan"}, "start"),  # was a 200 with "start": null
        ({"start": "-inf"}, "start"),
        ({"end": "1e400"}, "end"),
        ({"end": "9999-12-31T23:00:00-05:00"}, "end"),
        ({"start": str(-10**15)}, "start"),
    ],
)
def test_usage_times_out_of_range_are_400_naming_the_param(client, params, param):
    resp = client.get("/v1/usage", params=params)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_parameter", param)


def test_cli_usage_prints_a_table(store, ledger, client, monkeypatch, capsys):
    import httpx

    from imagine import cli

    a = _done(store, tenant="acme")
    ledger.record(a, "denoiser", wall_s=10.0, device="cuda", at=DAY1)
    ledger.bill(a, 4.0, at=DAY1)
    seen_headers = []

    def in_process_client(base_url: str, headers: dict, timeout: float) -> httpx.Client:
        seen_headers.append(dict(headers))
        return TestClient(client.app, headers=headers)  # an httpx.Client over the ops router, no socket

    monkeypatch.setattr(httpx, "Client", in_process_client)
    argv = ["usage", "--start", "2025-05-01", "--end", "2025-05-02", "--group-by", "model", "--api-key", "k1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tenant acme, 2025-05-01 00:00:00Z .. 2025-05-03 00:00:00Z"
    assert out[1].split() == ["model", "jobs", "output_seconds", "device_seconds", "cost_usd", "price_usd"]
    assert out[2].split() == ["ltx-2", "1", "4.0000", "10.0000", "0.0100", "0.4000"]
    assert out[3].split() == ["total", "4.0000", "10.0000", "0.0100", "0.4000"]
    assert seen_headers == [{"Authorization": "Bearer k1"}]
    assert cli.main(["usage", "--start", "soon"]) == 2  # the API's 4xx, reported
    assert "param: start" in capsys.readouterr().err
