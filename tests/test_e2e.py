"""End to end through the commands users run: `imagine up` / `imagine generate` / `imagine status`
(with a restart of `imagine up` in the middle of work), and `ray start --head` + `serve deploy
serve_config.yaml`. Each test owns its Ray cluster, in subprocesses, on loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from imagine.models.tiny import ensure_tiny_ltx2
from imagine.parallel.dist import free_port
from imagine.pipeline.media import probe

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "IMAGINE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout}s")


def _wait_status(
    url: str, job_id: str, statuses: tuple[str, ...], timeout: float = 240, headers: dict | None = None
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/videos/{job_id}", timeout=5, headers=headers).json()
        if job["state"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {job}")


def _start_up(home: Path, port: int, log: Path) -> subprocess.Popen:
    # the edit deployments (Grounder, Editor) have their own Serve tests, and CI's demo starts the default
    # `imagine up` with them: here they would only double each start's import and load time on 2 cores
    config = home.parent / "up-config.yaml"
    config.write_text("edit: {enabled: false}\n")
    return subprocess.Popen(
        [str(BIN / "imagine"), "up", "--port", str(port), "--num-cpus", "2", "--config", str(config)],
        env=_env(home), stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen, timeout: float = 90) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError("`imagine up` did not stop on Ctrl-C")


def _assert_listens_on_loopback_only(proc: subprocess.Popen) -> None:
    """`imagine up` and every process it started (GCS, raylet, Serve's controller and proxy, replicas, agents)
    listen on loopback addresses only: nothing of Ray's control plane or the API is reachable from the network."""
    import ipaddress

    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = set()
    for p in tree:
        try:
            listening |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)

    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check sees Ray's own servers
    exposed = sorted(entry for entry in listening if not loopback(entry[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_imagine_up_generate_status_and_restart(tmp_path):
    home = tmp_path / "home"
    ensure_tiny_ltx2(home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    proc = _start_up(home, port, log)
    try:
        _wait_healthy(url, proc)
        _assert_listens_on_loopback_only(proc)
        out = tmp_path / "clip.mp4"
        gen = subprocess.run(
            [str(BIN / "imagine"), "generate", "a cat playing piano", "--duration", "1", "--steps", "3",
             "--seed", "5", "-o", str(out), "--url", url],
            env=_env(home), capture_output=True, text=True, timeout=300,
        )
        assert gen.returncode == 0, gen.stderr
        assert "wrote" in gen.stdout and "100/100" in gen.stderr  # the progress bar reached the end
        info = probe(out)
        assert info.video_codec == "h264" and info.audio_codec == "aac"
        assert (info.width, info.height) == (864, 480)
        assert abs(info.num_frames - 24) <= 1
        assert abs(info.audio_duration_s - info.duration_s) <= 0.1

        job_id = gen.stderr.split("request_id:")[1].split()[0]
        status = subprocess.run(
            [str(BIN / "imagine"), "status", job_id, "--url", url], env=_env(home), capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "done"

        # queue work, stop the server mid-job, start it again: everything finishes
        body = {"prompt": "rain on a tin roof", "duration": 1, "aspect_ratio": "1:1", "num_inference_steps": 30}
        ids = [httpx.post(f"{url}/v1/videos/generations", json={**body, "seed": s}).json()["request_id"] for s in range(2)]
        _wait_status(url, ids[0], ("running",))
        assert _stop(proc) == 0
        assert "stopped" in log.read_text()
        proc = _start_up(home, port, log)
        _wait_healthy(url, proc)
        for job_id in ids:
            assert _wait_status(url, job_id, ("done", "failed", "cancelled"))["status"] == "done"
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_ray_start_and_serve_deploy_config(tmp_path):
    home = tmp_path / "home"
    ensure_tiny_ltx2(home)
    http_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["home"] = str(home)
    # edit path off, as in `_start_up`: its deployments' options from this file are checked in test_app_config.py
    config["applications"][0]["args"]["edit"] = {"enabled": False}
    deploy_file = tmp_path / "serve_config.yaml"
    deploy_file.write_text(yaml.safe_dump(config))
    # one auth mode for every command (Ray 2.60 defaults to tokens once a token file exists)
    env = _env(home, RAY_AUTH_MODE="disabled")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # AF_UNIX socket paths must stay < 108 bytes
    # --block keeps the head in the foreground: stopping it stops only this cluster (not `ray stop`,
    # which would kill every Ray on the machine)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs_port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
         "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                if httpx.get(f"http://127.0.0.1:{dash_port}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ray dashboard did not come up"
            time.sleep(0.5)
        deploy = subprocess.run(
            [str(BIN / "serve"), "deploy", str(deploy_file), "-a", f"http://127.0.0.1:{dash_port}"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert deploy.returncode == 0, deploy.stderr
        url = f"http://127.0.0.1:{http_port}"
        _wait_healthy(url, timeout=300)
        body = {"prompt": "a bell ringing", "duration": 1, "aspect_ratio": "1:1", "num_inference_steps": 2}
        # serve_config.yaml runs with auth on: no key, no job
        assert httpx.post(f"{url}/v1/videos/generations", json=body).status_code == 401
        key = subprocess.run(
            [str(BIN / "imagine"), "keys", "create", "--tenant", "e2e", "--tier", "realtime", "--config", str(deploy_file)],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}
        rid = httpx.post(f"{url}/v1/videos/generations", json=body, headers=headers).json()["request_id"]
        job = _wait_status(url, rid, ("done", "failed", "cancelled"), headers=headers)
        assert job["status"] == "done", job
        resp = httpx.get(job["video"]["url"], timeout=30, headers=headers)
        assert resp.status_code == 200 and resp.content[4:8] == b"ftyp"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
