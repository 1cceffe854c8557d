"""API keys and tenants without Ray: FastAPI TestClient over a real SQLite store, auth on (`ApiEnv` and
`make_env` in conftest.py)."""

from __future__ import annotations

import hashlib

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from imagine.api.auth import authenticate, principal_dependency
from imagine.api.errors import ApiError
from imagine.api.principal import Principal
from imagine.api.routes import create_api
from imagine.cli import main
from imagine.jobs import JobStatus


@pytest.fixture()
def env(tmp_path, make_env):
    return make_env(tmp_path)


def _finish(env, job_id: str) -> None:
    job = env.store.claim(job_id)
    env.service.artifacts.put_bytes(f"outputs/{job_id}/video.mp4", b"\0\0\0\x18ftypmp42" + b"x" * 100)
    env.store.complete(job_id, job.attempt, {
        "artifact_key": f"outputs/{job_id}/video.mp4", "duration_s": 2.0, "width": 864, "height": 480, "fps": 24.0,
    })


@pytest.mark.parametrize(
    "authorization,code",
    [(None, "missing_api_key"), ("Bearer", "invalid_authorization"), ("Basic dXNlcjpwdw==", "invalid_authorization"),
     ("Bearer im_not-a-key", "invalid_api_key"), ("im_no-scheme", "invalid_authorization")],
)
def test_missing_or_garbage_key_is_401(env, authorization, code):
    headers = {"Authorization": authorization} if authorization else {}
    before = env.snapshot()
    for method, path in [("POST", "/v1/videos/generations"), ("GET", "/v1/videos/x"), ("GET", "/v1/models"),
                         ("DELETE", "/v1/videos/x"), ("GET", "/v1/videos/x/events")]:
        resp = env.client.request(method, path, json={"prompt": "p"}, headers=headers)
        assert resp.status_code == 401, (path, resp.text)
        err = resp.json()["error"]
        assert err["param"] == "Authorization" and err["code"] == code and err["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert env.snapshot() == before
    assert env.client.get("/healthz").status_code == 200  # liveness needs no key


def test_revoked_key_is_401(env):
    headers = env.key()
    rid = env.create(headers).json()["request_id"]
    prefix = headers["Authorization"].split()[1][:9]
    assert env.service.keys.revoke(prefix).revoked
    for resp in (env.create(headers), env.client.get(f"/v1/videos/{rid}", headers=headers)):
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "revoked_api_key"
    assert env.store.get(rid).status == JobStatus.QUEUED  # the job is still there, for a valid key of the tenant
    assert env.client.get(f"/v1/videos/{rid}", headers=env.key("acme")).status_code == 200


def test_other_tenant_gets_404_on_every_job_route(env):
    mine, theirs, my_other_key = env.key("acme"), env.key("globex"), env.key("acme")
    queued = env.create(mine).json()["request_id"]
    done = env.create(mine).json()["request_id"]
    _finish(env, done)
    before = env.snapshot()
    routes = [("GET", "/v1/videos/{}"), ("GET", "/v1/videos/{}/content"), ("GET", "/v1/videos/{}/events"),
              ("POST", "/v1/videos/{}/cancel"), ("DELETE", "/v1/videos/{}")]
    for job_id in (queued, done):
        for method, path in routes:
            other = env.client.request(method, path.format(job_id), headers=theirs)
            unknown = env.client.request(method, path.format("no-such-id"), headers=theirs)
            assert other.status_code == unknown.status_code == 404, (method, path, other.text)
            for resp in (other, unknown):
                err = {k: v for k, v in resp.json()["error"].items() if k != "message"}
                assert err == {"type": "invalid_request_error", "code": "not_found", "param": "id"}
    assert env.snapshot() == before  # nothing was cancelled
    # the owning tenant sees them through any of its keys
    assert env.client.get(f"/v1/videos/{done}/content", headers=my_other_key).status_code == 200
    assert env.client.get(f"/v1/videos/{queued}", headers=mine).json()["state"] == "queued"


def test_delete_cancels_a_live_job_and_removes_it_for_its_tenant_only(env):
    headers, other = env.key(), env.key(tenant="other-tenant")
    rid = env.create(headers).json()["request_id"]
    assert env.client.delete(f"/v1/videos/{rid}", headers=other).status_code == 404  # not theirs
    resp = env.client.delete(f"/v1/videos/{rid}", headers=headers)
    assert resp.status_code == 200 and resp.json() == {"id": rid, "object": "video.deleted", "deleted": True}
    assert env.client.get(f"/v1/videos/{rid}", headers=headers).status_code == 404
    assert env.client.delete(f"/v1/videos/{rid}", headers=headers).status_code == 404
    assert env.client.post(f"/v1/videos/{rid}/cancel", headers=headers).status_code == 404
    record = env.store.get(rid)  # the row stays (usage), cancelled and marked deleted
    assert record.status.value == "cancelled" and record.deleted_at is not None


@pytest.mark.parametrize(
    "key_tier,asked,effective",
    [("standard", "realtime", "standard"), ("standard", "batch", "batch"), ("standard", None, "standard"),
     ("batch", "realtime", "batch"), ("realtime", "realtime", "realtime"), ("realtime", "Batch", "batch")],
)
def test_priority_is_capped_at_the_key_tier(env, key_tier, asked, effective):
    headers = env.key(tier=key_tier)
    extra = {"X-Priority": asked} if asked else {}
    rid = env.create({**headers, **extra}).json()["request_id"]
    assert env.store.get(rid).priority == effective
    assert env.client.get(f"/v1/videos/{rid}", headers=headers).json()["priority"] == effective


def test_unknown_priority_is_400(env):
    before = env.snapshot()
    resp = env.create({**env.key(), "X-Priority": "urgent"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "X-Priority"
    assert env.snapshot() == before


def test_auth_off_is_the_default_tenant_at_realtime(tmp_path, make_env):
    env = make_env(tmp_path, auth={"enabled": False})
    rid = env.create({"X-Priority": "realtime", "Authorization": "Bearer whatever"}).json()["request_id"]
    job = env.store.get(rid)
    assert (job.tenant, job.priority, job.api_key_id) == ("default", "realtime", None)


def test_authenticate_needs_only_the_key_store_and_auth_config(env):
    keys, auth = env.service.keys, env.service.config.auth
    headers = env.key("acme", "batch", max_queued_jobs=2)
    principal = authenticate(keys, auth, headers["Authorization"])
    assert (principal.tenant, principal.tier, principal.limits.max_queued_jobs) == ("acme", "batch", 2)
    with pytest.raises(ApiError) as e:
        authenticate(keys, auth, None)
    assert (e.value.status, e.value.code) == (401, "missing_api_key")


def test_principal_dependency_serves_other_routers(env):
    router = APIRouter()
    caller = Depends(principal_dependency(env.service.keys, env.service.config.auth))

    @router.get("/v1/whoami")
    def whoami(principal: Principal = caller) -> dict:
        return {"tenant": principal.tenant, "tier": principal.tier}

    app = create_api(env.service)
    app.include_router(router)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/whoami", headers=env.key("acme", "batch")).json() == {"tenant": "acme", "tier": "batch"}
    assert client.get("/v1/whoami").status_code == 401


def test_keys_cli_create_list_revoke(tmp_path, capsys, make_env):
    url = f"sqlite:///{tmp_path / 'imagine.db'}"
    assert main(["keys", "create", "--tenant", "acme", "--tier", "standard", "--max-queued", "3", "--database-url", url]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("im_") and len(key) > 40 and "\n" not in key
    prefix = key[:9]
    assert prefix in out.err and "acme" in out.err

    # the database holds the SHA-256 of the key and its prefix, never the key
    db_bytes = (tmp_path / "imagine.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("imagine.db-*"))
    assert key.encode() not in db_bytes
    env = make_env(tmp_path, database_url=url)
    with env.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT prefix, hash, tenant, tier, limits FROM api_keys").all()
    assert rows == [(prefix, hashlib.sha256(key.encode()).hexdigest(), "acme", "standard", '{"max_queued_jobs":3}')]

    # the key works against a service on that database
    headers = {"Authorization": f"Bearer {key}"}
    assert env.create(headers).status_code == 202

    assert main(["keys", "list", "--database-url", url]) == 0
    listing = capsys.readouterr().out
    assert prefix in listing and "acme" in listing and "standard" in listing and key not in listing

    assert main(["keys", "revoke", prefix, "--database-url", url]) == 0
    assert "revoked" in capsys.readouterr().out
    assert env.create(headers).status_code == 401
    assert env.service.keys.get(prefix).revoked
    assert main(["keys", "revoke", "im_nothing", "--database-url", url]) == 2
    with pytest.raises(SystemExit):
        main(["keys", "create", "--tenant", "acme", "--tier", "gold", "--database-url", url])


def test_cli_client_commands_take_an_api_key(monkeypatch):
    from imagine.cli import build_parser

    monkeypatch.setenv("IMAGINE_API_KEY", "im_from_env")
    for argv in (["status", "x"], ["cancel", "x"], ["generate", "p"], ["models"]):
        assert build_parser().parse_args(argv).api_key == "im_from_env"
        assert build_parser().parse_args([*argv, "--api-key", "im_flag"]).api_key == "im_flag"


def test_up_refuses_a_public_host_with_auth_off(capsys):
    assert main(["up", "--host", "0.0.0.0"]) == 2  # returns before starting Ray
    assert "auth off" in capsys.readouterr().err
