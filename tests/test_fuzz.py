"""Property-based fuzz of the whole OpenAPI (issue 11): schemathesis generates requests for every documented operation
from the app's own `/openapi.json` (valid ones and invalid ones: wrong types, missing fields, out-of-range numbers,
odd headers) and drives the FastAPI app in process over ASGI (no network, no Ray), once with auth off and once with
auth on and a real API key. For every generated request:

- no 5xx (`not_a_server_error`);
- the response conforms to the documented schema where schemathesis can check it: its status code is documented,
  its content type is the documented one, its body matches the documented schema, its headers too; with auth on,
  the key is needed (`ignored_auth`: the same request without a key, or with a wrong one, is refused);
- a rejected request (any non-2xx) changes no stored job, idempotency record, ledger row or artifact; an accepted
  create (202) adds exactly the one job it names (none when replayed); an accepted cancel changes only its own job;
  another tenant's job is never found.

Generated cases are steered (`_prepare`) past the first refusal they would all meet: generated path ids and edit
`video_id`s are random strings, which only ever reach "unknown id" (404), so most are pointed at one of the jobs seeded
before each test (queued, done with a real video file so Range requests are served, failed, cancelled, and a queued
one of another tenant); optional fields and headers that are nearly always invalid are dropped from some cases; and
so on. Each choice is a hash of the generated case, so it is as deterministic as the generation.

Nothing documented is excluded. `GET /v1/videos/{job_id}/events` (an SSE stream, which for a live job does not end
by itself) is fuzzed too: schemathesis' ASGI client keeps the first `MAX_STREAM_EVENTS` events and cancels the app,
and `request-timeout` bounds a silent one. `GET /metrics` is left out of the OpenAPI by the app
(`include_in_schema=False`), so schemathesis cannot see it: `test_metrics_never_fails` fuzzes its headers.

Bounded and deterministic: per operation and mode, schemathesis' deterministic coverage cases (boundary values,
missing and wrongly typed fields, unexpected methods) plus `MAX_EXAMPLES` fuzzed ones (`CONFORMANCE_EXAMPLES` for the
documentation check); `derandomize=True`, no example database, no deadline. A fresh service per test, so one
operation's run never depends on another's."""

from __future__ import annotations

import base64
import copy
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig, KeyLimits
from imagine.jobs import JobStore, NewJob
from imagine.jobs.idempotency import idempotency_table
from imagine.jobs.keys import api_keys_table
from imagine.jobs.ledger import billing_table, usage_table
from imagine.jobs.store import jobs_table
from imagine.models.presets import get_preset
from imagine.storage import open_artifact_store, output_video_key

MODES = ("auth-off", "auth-on")
MAX_EXAMPLES = 40  # fuzzed cases per operation and mode, on top of the coverage phase's
CONFORMANCE_EXAMPLES = 15  # the documentation check needs fewer: the coverage phase already hits each status
MAX_STREAM_EVENTS = 1  # an event stream: keep its first event (the job as it is), then hang up
REQUEST_TIMEOUT_S = 5.0  # an event stream that sends nothing for this long is cut (nothing else takes this long)
TARGETS = ("generated", "queued", "done", "failed", "cancelled", "foreign")
# where only a done job gets past the first check (a download, an edit's source): mostly the done one
DONE_TARGETS = ("done", "done", "done", "done", *TARGETS)
DATA_URI_FIELDS = {"image_url": "image/png", "video_url": "video/mp4"}
CREATE_HEADERS = ("X-Priority", "X-Start-Deadline", "Idempotency-Key")
VIDEO = bytes(range(256)) * 40  # the done job's "MP4": 10240 bytes, served with Range
OTHER_TABLES = (idempotency_table, usage_table, billing_table, api_keys_table)

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
CONFORMANCE_SETTINGS = settings(FUZZ_SETTINGS, max_examples=CONFORMANCE_EXAMPLES)
CONFORMANCE_CHECKS = ("status_code_conformance", "content_type_conformance", "response_schema_conformance",
                      "response_headers_conformance")


@dataclass
class FuzzEnv:
    mode: str
    service: JobService
    store: JobStore
    app: Any
    artifacts_dir: Path
    api_key: str | None
    ids: dict[str, str] = field(default_factory=dict)  # each of TARGETS but "generated" -> its seeded job id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def state(self) -> dict[str, Any]:
        """Every stored row a request could change (jobs by id; the other tables as sorted rows) and every artifact."""
        with self.store.engine.connect() as conn:
            jobs = {row.id: tuple(row) for row in conn.execute(sa.select(jobs_table))}
            others = {t.name: sorted((tuple(r) for r in conn.execute(sa.select(t))), key=repr) for t in OTHER_TABLES}
        files = sorted(str(p.relative_to(self.artifacts_dir)) for p in self.artifacts_dir.rglob("*") if p.is_file())
        return {"jobs": jobs, **others, "artifacts": files}


def _build(mode: str, home: Path, seed: bool = True) -> FuzzEnv:
    auth_on = mode == "auth-on"
    config = AppConfig.model_validate({"home": str(home), "auth": {"enabled": auth_on}})
    store = JobStore(config.resolved_database_url)
    service = JobService(
        config, store, open_artifact_store(config), {"tiny": get_preset("tiny")}, "tiny",
        edit_presets={"tiny-vace": get_preset("tiny-vace")},
    )
    api_key = None
    if auth_on:
        api_key, _ = service.keys.create("acme", "realtime", KeyLimits())
    env = FuzzEnv(mode, service, store, create_api(service), config.resolved_artifacts_dir, api_key)
    if seed:
        _seed_jobs(env)
    return env


def _seed_jobs(env: FuzzEnv) -> None:
    """One job of each end state for the fuzzed ids, made through the API (so each has its caller's tenant), then
    moved on in the store as the scheduler would; and one queued job of another tenant."""
    from fastapi.testclient import TestClient

    client = TestClient(env.app, raise_server_exceptions=False)

    def create(headers: dict[str, str]) -> str:
        body = {"prompt": "a fox", "duration": 2, "seed": 1}
        resp = client.post("/v1/videos/generations", json=body, headers=headers)
        assert resp.status_code == 202, resp.text
        return resp.json()["request_id"]

    store, artifacts = env.store, env.service.artifacts
    tenant = "acme" if env.api_key else "default"
    env.ids = {name: create(env.headers) for name in ("queued", "done", "failed", "cancelled")}
    done = store.claim(env.ids["done"])
    key = output_video_key(tenant, done.id)
    artifacts.put_bytes(key, VIDEO)
    store.complete(done.id, done.attempt, {
        "artifact_key": key, "bytes": len(VIDEO), "duration_s": 2.0, "width": 864, "height": 480, "fps": 24.0,
        "num_frames": 49, "audio_duration_s": 2.0, "has_audio": True, "stage_seconds": {},
    })
    failed = store.claim(env.ids["failed"])
    store.fail(failed.id, failed.attempt, {"type": "server_error", "code": "generation_failed", "message": "x"})
    store.request_cancel(env.ids["cancelled"])
    queued = store.get(env.ids["queued"])
    foreign = NewJob(kind="generation", model="tiny", params=queued.params, tenant="globex")
    env.ids["foreign"] = store.create(foreign).id  # another tenant's: never found, whatever the request


class _AppUnderTest:
    """The ASGI app schemathesis calls: forwards to the current test's app (`fuzz_env` sets it). The schema is loaded
    at import time, once, for every mode; each test builds a fresh service of its own mode behind it."""

    target: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.target(scope, receive, send)


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document (the same for every mode: `fuzz_env` checks that its app serves this one)."""
    with tempfile.TemporaryDirectory(prefix="imagine-fuzz-") as home:
        env = _build("auth-off", Path(home), seed=False)
        try:
            return env.app.openapi()
        finally:
            env.store.close()


APP = _AppUnderTest()
OPENAPI = _openapi_document()
schema = schemathesis.openapi.from_dict(
    copy.deepcopy(OPENAPI),
    config=SchemathesisConfig.from_dict({
        "max-stream-events": MAX_STREAM_EVENTS,
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {"mode": "all"},  # valid and invalid requests
        "auth": {"auto-signup": False},
    }),
)
schema.app, schema.location = APP, "/openapi.json"


@pytest.fixture(params=MODES)
def fuzz_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FuzzEnv]:
    """A fresh service of this mode (seeded jobs included) behind `APP`."""
    env = _build(request.param, tmp_path)
    assert env.app.openapi() == OPENAPI, "the OpenAPI document differs between modes: load one schema per mode"
    APP.target = env.app
    yield env
    APP.target = None
    env.store.close()


def _choose(seed: str, what: str, options: tuple[str, ...]) -> str:
    """One of `options` for `what`, chosen by `seed` (the generated case, as `_prepare` first saw it): as
    deterministic as the generation, and no extra drawn value (schemathesis turns its coverage phase off for tests
    that draw more with `given`)."""
    return options[zlib.crc32(f"{what}\0{seed}".encode("utf-8", "surrogatepass")) % len(options)]


def _prepare(generated: Any, env: FuzzEnv) -> tuple[Any, dict[str, str]]:
    """A copy of a generated case, steered to where the bugs would be, and the headers to send with it. A copy: the
    coverage phase's cases are made once and handed to every test of their operation (both modes).

    - a generated `job_id` (path) or `video_id` (edit body) is mostly pointed at a seeded job (`TARGETS`; the done
      one more often where only it gets further): a random one only ever reaches "unknown id";
    - a generated `model` is nearly always unknown (400): two in three are dropped (it is optional);
    - an edit body names exactly one source (`video_id` | `video_url`) and a mask exactly one region kind, or it is
      answered 422 before the source is read: one with none gets a seeded `video_id`, one with several keeps one;
      half the edit prompts get an edit verb ("remove ..."), or the instruction parser refuses nearly all of them;
    - half the generated `image_url` / `video_url` strings are wrapped as base64 data URIs of their own bytes, so the
      image and video decoders get arbitrary payloads, not just strings that are no data URI at all;
    - a generated `Range` is nearly always malformed (served as a whole body): three in four are replaced by a
      well-formed `bytes=` range around the seeded video's size (partial, to the end, suffix, unsatisfiable);
    - the create headers (`X-Priority`, `X-Start-Deadline`, `Idempotency-Key`) are plain strings in the OpenAPI, so
      generated ones are nearly always invalid and answered 400 before the body is looked at: two in three are
      dropped (they are optional), so the body's own validation and the service behind it are reached too;
    - with auth on, the case gets the API key (as an explicit header, so `ignored_auth` knows it is the real one and
      probes without it), except one in four cases with a generated `Authorization`, which keep it: the header parser
      is fuzzed too, and a 2xx for one of those fails `ignored_auth`."""
    # every choice hashes the case as generated (before a seeded job id, which is random, is put in; a missing body
    # as None, not as its sentinel's repr, which has an address)
    body = generated.body if isinstance(generated.body, (dict, list, str, int, float, bool, bytes)) else None
    seed = repr((generated.path_parameters, generated.query, body, sorted((generated.headers or {}).items())))
    case = generated.derive()
    if isinstance(generated.body, (dict, list)):
        case.body = copy.deepcopy(generated.body)
    if case.path_parameters and isinstance(case.path_parameters.get("job_id"), str):
        target = _choose(seed, "job_id", DONE_TARGETS if case.operation.path.endswith("/content") else TARGETS)
        if target != "generated":
            case.path_parameters["job_id"] = env.ids[target]
    if isinstance(case.body, dict) and isinstance(case.body.get("video_id"), str):
        target = _choose(seed, "video_id", DONE_TARGETS)
        if target != "generated":
            case.body["video_id"] = env.ids[target]
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str) and _choose(seed, "model", ("keep", "drop", "drop")) == "drop":
            del case.body["model"]
        for name, media in DATA_URI_FIELDS.items():
            value = case.body.get(name)
            if isinstance(value, str) and _choose(seed, name, ("keep", "wrap")) == "wrap":
                payload = value.encode("utf-8", "surrogatepass")
                case.body[name] = f"data:{media};base64,{base64.b64encode(payload).decode()}"
    if isinstance(case.body, dict) and case.operation.path == "/v1/videos/edits":
        prompt = case.body.get("prompt")
        if isinstance(prompt, str) and _choose(seed, "verb", ("keep", "verb")) == "verb":
            case.body["prompt"] = f"remove {prompt}"
        if case.body.get("video_id") is None and case.body.get("video_url") is None:
            seeded = tuple(target for target in DONE_TARGETS if target != "generated")
            case.body["video_id"] = env.ids[_choose(seed, "source", seeded)]
        _one_of(seed, case.body, "source", ("video_id", "video_url"))
        if isinstance(case.body.get("mask"), dict):
            _one_of(seed, case.body["mask"], "mask", ("boxes", "frames", "video_url"))
    if case.headers and isinstance(case.headers.get("Range"), str):
        form = _choose(seed, "Range", ("keep", "bytes=N-M", "bytes=N-", "bytes=-N"))
        if form != "keep":  # positions around the seeded video's size: inside, at the end, past it
            positions = (zlib.crc32(f"{form}{i}{seed}".encode("utf-8", "surrogatepass")) for i in (0, 1))
            n, m = sorted(p % (2 * len(VIDEO)) for p in positions)
            case.headers["Range"] = form.replace("N", str(n)).replace("M", str(m))
    if case.headers:
        for name in CREATE_HEADERS:
            if name in case.headers and _choose(seed, name, ("keep", "drop", "drop")) == "drop":
                del case.headers[name]
    if env.api_key is None:
        return case, {}
    authorization = (case.headers or {}).get("Authorization")
    if authorization is not None and _choose(seed, "Authorization", ("keep", "key", "key", "key")) == "keep":
        return case, {}
    return case, dict(env.headers)


def _one_of(seed: str, fields: dict[str, Any], what: str, names: tuple[str, ...]) -> None:
    present = tuple(name for name in names if fields.get(name) is not None)
    if len(present) > 1:
        keep = _choose(seed, what, present)
        for name in present:
            if name != keep:
                del fields[name]


CREATES = {"POST /v1/videos", "POST /v1/videos/generations", "POST /v1/videos/edits", "POST /v1/videos/{job_id}/remix"}


def _header(response: Any, name: str) -> str | None:
    """A header of a schemathesis response (its headers: lower-case name -> list of values)."""
    values = {key.lower(): value for key, value in response.headers.items()}.get(name.lower())
    return values[0] if isinstance(values, list) and values else values


def _body(response: Any) -> str:
    return response.content[:300].decode("utf-8", "replace")


def _check_store(env: FuzzEnv, case: Any, response: Any, before: dict, after: dict) -> None:
    label, status = case.operation.label, response.status_code
    where = f"{label} answered {status}: {_body(response)!r}"
    if not 200 <= status < 300:
        assert after == before, f"a rejected request changed the stored state; {where}"
        return
    jobs_before, jobs_after = before["jobs"], after["jobs"]
    added = set(jobs_after) - set(jobs_before)
    assert set(jobs_before) <= set(jobs_after), f"jobs disappeared; {where}"
    changed = {i for i in jobs_before if jobs_before[i] != jobs_after[i]}
    if label in CREATES:  # a create: its one job (Imagine's answer names `request_id`, OpenAI's `id`), or none
        replayed = _header(response, "Idempotent-Replayed") == "true"
        body = response.json()
        assert added == (set() if replayed else {body.get("request_id") or body["id"]}), where
        assert not changed, f"a create changed existing jobs {changed}; {where}"
    else:
        assert not added, f"{label} added jobs {added}; {where}"
        cancels = case.method.upper() == "DELETE" or label.endswith("/cancel")
        allowed = {case.path_parameters["job_id"]} if cancels else set()
        assert changed <= allowed, f"{label} changed jobs {changed - allowed}; {where}"
    assert env.ids["foreign"] not in changed, f"another tenant's job was changed; {where}"


@FUZZ_SETTINGS
@schema.parametrize()
def test_no_server_error_and_no_stray_writes(case: Any, fuzz_env: FuzzEnv) -> None:
    """No 5xx; with auth on, no route answers without the key or with a wrong one; a rejected request writes nothing,
    an accepted one only what it says; another tenant's job is never found."""
    case, headers = _prepare(case, fuzz_env)
    before = fuzz_env.state()
    response = case.call(headers=headers)
    after = fuzz_env.state()
    checks = [schemathesis.checks.not_a_server_error]
    if fuzz_env.api_key:
        checks.append(schemathesis.checks.ignored_auth)
    case.validate_response(response, checks=checks, headers=headers)
    _check_store(fuzz_env, case, response, before, after)
    if (case.path_parameters or {}).get("job_id") == fuzz_env.ids["foreign"]:
        assert not 200 <= response.status_code < 300, f"another tenant's job answered {response.status_code}"


@CONFORMANCE_SETTINGS
@schema.parametrize()
def test_responses_match_the_documented_schema(case: Any, fuzz_env: FuzzEnv) -> None:
    """Every response's status code, content type, headers and body are the ones the OpenAPI documents. A separate
    test, so that a documentation gap (which stops an operation's run at its first example) never hides a 5xx."""
    case, headers = _prepare(case, fuzz_env)
    response = case.call(headers=headers)
    checks = [getattr(schemathesis.checks, name) for name in CONFORMANCE_CHECKS]
    case.validate_response(response, checks=checks, headers=headers)


@FUZZ_SETTINGS
@given(authorization=st.one_of(
    st.none(),
    st.just("key"),  # replaced by the API key
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),  # what the HTTP client can send
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80).map(lambda t: f"Bearer {t}"),
))
def test_metrics_never_fails(fuzz_env: FuzzEnv, authorization: str | None) -> None:
    """`GET /metrics` is not in the OpenAPI (`include_in_schema=False`), so schemathesis never sees it: its one input,
    the `Authorization` header, fuzzed here. Whatever it is: no 5xx, Prometheus text when served, nothing written."""
    from fastapi.testclient import TestClient

    if authorization == "key":
        authorization = fuzz_env.headers.get("Authorization")
    headers = {} if authorization is None else {"Authorization": authorization}
    before = fuzz_env.state()
    response = TestClient(fuzz_env.app, raise_server_exceptions=False).get("/metrics", headers=headers)
    assert response.status_code < 500, f"GET /metrics with {headers} answered {response.status_code}: {_body(response)}"
    if response.status_code == 200:
        assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]
    assert fuzz_env.state() == before, f"GET /metrics with {headers} changed the stored state"
