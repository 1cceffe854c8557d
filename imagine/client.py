"""Python SDK for the Imagine HTTP API.

    from imagine.client import ImagineClient
    client = ImagineClient("http://127.0.0.1:8000")
    job_id = client.generate("a red fox in snow, wind howling", duration=2)
    job = client.wait(job_id)
    client.download(job_id, "fox.mp4")
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("done", "failed", "cancelled", "expired")


class ImagineError(RuntimeError):
    """An API error: HTTP status plus the server's `{type, code, message, param}`."""

    def __init__(self, status: int, error: dict[str, Any]):
        self.status = status
        self.error = error
        param = f" (param: {error.get('param')})" if error.get("param") else ""
        super().__init__(f"HTTP {status} {error.get('code')}: {error.get('message')}{param}")


class ImagineClient:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ImagineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                error = resp.json().get("error", {})
            except ValueError:
                error = {"code": "http_error", "message": resp.text[:500]}
            raise ImagineError(resp.status_code, error)
        return resp

    def wait_ready(self, timeout: float) -> None:
        """Block until `GET /healthz` answers 200 (a service still starting refuses connections)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout}s")
            time.sleep(0.5)

    def generate(self, prompt: str, **params: Any) -> str:
        """Queue a generation; returns its request id. `params` are the API's fields (duration, seed, ...)."""
        body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return self._check(self._http.post("/v1/videos/generations", json=body)).json()["request_id"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/videos/{job_id}")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.post(f"/v1/videos/{job_id}/cancel")).json()

    def models(self) -> list[dict[str, Any]]:
        return self._check(self._http.get("/v1/models")).json()["data"]

    def usage(
        self, start: str | float | None = None, end: str | float | None = None, group_by: str = "day"
    ) -> dict[str, Any]:
        """The caller's tenant's usage (`GET /v1/usage`): `start`/`end` as unix seconds or ISO dates
        (default: the last 30 days), grouped by `day`, `model` or `tier`."""
        params = {k: v for k, v in {"start": start, "end": end, "group_by": group_by}.items() if v is not None}
        return self._check(self._http.get("/v1/usage", params=params)).json()

    def events(self, job_id: str, timeout: float = 3600.0) -> Iterator[dict[str, Any]]:
        """The job's server-sent `status` events (each the job as `get` returns it) until it is terminal."""
        with self._http.stream(
            "GET", f"/v1/videos/{job_id}/events", params={"timeout": timeout}, timeout=httpx.Timeout(30.0, read=60.0)
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            data: list[str] = []
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def wait(
        self,
        job_id: str,
        timeout: float = 600.0,
        poll_s: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        stream: bool = True,
    ) -> dict[str, Any]:
        """Block until the job is terminal (or raise TimeoutError); `on_update` sees every update.
        `stream=True` listens to the job's event stream; `False` polls every `poll_s` seconds."""
        deadline = time.monotonic() + timeout
        if stream:
            # the server ends a stream that saw no change for a while (and any after its maximum lifetime):
            # reconnect until the job is terminal or our own deadline passes
            while (left := deadline - time.monotonic()) > 0:
                for job in self.events(job_id, timeout=left):
                    if on_update is not None:
                        on_update(job)
                    if job["status"] in TERMINAL:
                        return job
                job = self.get(job_id)
                if job["status"] in TERMINAL:
                    return job
                time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            raise TimeoutError(f"job {job_id} still {self.get(job_id)['status']} after {timeout}s")
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)

    def download(self, job_id: str, path: str | Path) -> Path:
        path = Path(path)
        with self._http.stream("GET", f"/v1/videos/{job_id}/content") as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            tmp = path.with_name(path.name + ".part")
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
            tmp.replace(path)
        return path
