"""The `imagine` command: `up` runs a local Ray + the app in the foreground; `keys` manages API keys in
the service's database; `db` migrates its schema; `generate`, `status`, `cancel` and `models` talk to a running service over HTTP."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from imagine.client import DEFAULT_URL, ImagineClient, ImagineError


def _load_config(path: str | None, overrides: dict[str, Any]):  # noqa: ANN202 - AppConfig, imported lazily
    import yaml

    from imagine.config import AppConfig

    data: dict[str, Any] = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        # accept either bare AppConfig fields or a Serve config file (applications[0].args)
        if "applications" in raw:
            raw = raw["applications"][0].get("args", {})
        data.update(raw)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return AppConfig.model_validate(data)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _ray_on_loopback():  # noqa: ANN202
    """Start a local Ray whose own services (GCS, raylet, object manager, workers, agents) listen on 127.0.0.1 only.

    Ray replaces a loopback node address by the machine's address (`services.resolve_ip_for_localhost`) so that other
    machines could join, and its servers then listen on every interface (measured with Ray 2.60: GCS and raylet on
    `::`, the agents on 0.0.0.0 and the machine's address; ../shared/FINDINGS.md). `imagine up` is one machine: while
    it starts Ray, loopback stays loopback, and every Ray server binds 127.0.0.1."""
    from ray._private import services

    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if services.is_localhost(host) else resolve(host)
    try:
        yield "127.0.0.1"
    finally:
        services.resolve_ip_for_localhost = resolve


def cmd_up(args: argparse.Namespace) -> int:
    config = _load_config(args.config, {"model.preset": args.preset, "home": args.home})
    if "enabled" not in config.auth.model_fields_set:
        config.auth.enabled = False  # a local development server, unless the config asks for keys
    if not config.auth.enabled and not _is_loopback(args.host):
        print(
            f"imagine: refusing to bind {args.host} with auth off; bind 127.0.0.1, or pass a --config with "
            "`auth: {enabled: true}` and create keys with `imagine keys create`",
            file=sys.stderr,
        )
        return 2

    import ray
    from ray import serve

    from imagine.serving.app import build_app

    if config.model.torch_threads is None:
        # Ray pins fractional-CPU replicas to 1 thread; on a laptop the stages may use every core
        config.model.torch_threads = args.num_cpus or os.cpu_count() or 1
    url = f"http://{args.host}:{args.port}"
    print(f"imagine: starting Ray + Serve (model {config.model.preset!r}, state in {config.home}) ...", flush=True)
    with _ray_on_loopback() as node_ip:  # the API is the one thing `--host` exposes; Ray's control plane never
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING", _node_ip_address=node_ip,
            runtime_env={"worker_process_setup_hook": "imagine.serving.loopback.bind_serve_replicas_to_loopback"},
        )
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name="imagine", route_prefix="/", blocking=False)
        print(f"imagine: ready at {url}  (OpenAPI docs: {url}/docs)")
        print("try:")
        print(
            f"  curl -s -X POST {url}/v1/videos/generations -H 'Content-Type: application/json' "
            "-d '{\"prompt\": \"a lighthouse at dusk, waves crashing\", \"duration\": 2}'"
        )
        print(f"  curl -s {url}/v1/videos/<request_id>        # then .../content -o out.mp4")
        print(f"  imagine generate 'a lighthouse at dusk' --duration 2 -o out.mp4 --url {url}")
        if config.auth.enabled:
            print(
                "auth: on (send 'Authorization: Bearer <key>'; create one with "
                f"`imagine keys create --tenant NAME --tier standard --database-url {config.resolved_database_url}`); "
                "Ctrl-C stops.",
                flush=True,
            )
        else:
            print("auth: off (local development server); Ctrl-C stops.", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("imagine: stopping ...", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("imagine: stopped", flush=True)
    return 0


def _print_job(job: dict[str, Any]) -> None:
    print(json.dumps(job, indent=2))


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = {
        "duration": args.duration,
        "resolution": args.resolution,
        "aspect_ratio": args.aspect_ratio,
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "fps": args.fps,
        "model": args.model,
    }
    if args.image:
        import base64
        import mimetypes

        mime = mimetypes.guess_type(args.image)[0] or "image/png"
        params["image_url"] = f"data:{mime};base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    with ImagineClient(args.url, api_key=args.api_key) as client:
        if args.wait_ready:
            client.wait_ready(args.wait_ready)
        job_id = client.generate(args.prompt, **params)
        print(f"request_id: {job_id}", file=sys.stderr)
        with tqdm(total=100, unit="%", desc="generating", file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/100 [{elapsed}]") as bar:

            def update(job: dict[str, Any]) -> None:
                bar.set_postfix_str(job["state"])
                bar.update(round(job["progress"] * 100, 1) - bar.n)

            job = client.wait(job_id, timeout=args.timeout, on_update=update)
        if job["status"] != "done":
            print(f"job {job_id} ended {job['status']}: {job.get('error')}", file=sys.stderr)
            return 1
        out = client.download(job_id, args.output)
        v = job["video"]
        print(f"wrote {out} ({v['width']}x{v['height']}, {v['duration']:.2f}s at {v['fps']:g} fps, with audio)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with ImagineClient(args.url, api_key=args.api_key) as client:
        _print_job(client.get(args.id))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with ImagineClient(args.url, api_key=args.api_key) as client:
        _print_job(client.cancel(args.id))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with ImagineClient(args.url, api_key=args.api_key) as client:
        for m in client.models():
            print(f"{m['id']}{' (default)' if m['default'] else ''}: {m['description']}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with ImagineClient(args.url, api_key=args.api_key) as client:
        body = client.usage(args.start, args.end, args.group_by)
    columns = ("jobs", "output_seconds", "device_seconds", "cost_usd", "price_usd")
    rows = [[str(r["group"]), str(r["jobs"])] + [f"{r[c]:.4f}" for c in columns[1:]] for r in body["data"]]
    rows.append(["total", ""] + [f"{body['total'][c]:.4f}" for c in columns[1:]])
    header = [args.group_by, *columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    import datetime as dt

    def utc(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    print(f"tenant {body['tenant']}, {utc(body['start'])} .. {utc(body['end'])}")
    for line in (header, *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    return 0


def _key_store(args: argparse.Namespace):  # -> KeyStore, imported lazily
    from imagine.jobs.keys import KeyStore
    from imagine.jobs.store import make_engine

    return KeyStore(make_engine(_database_url(args)))


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts is not None else "-"


def cmd_keys_create(args: argparse.Namespace) -> int:
    from imagine.config import KeyLimits

    limits = KeyLimits(
        max_concurrent_jobs=args.max_concurrent,
        max_queued_jobs=args.max_queued,
        max_video_seconds_per_day=args.max_video_seconds_per_day,
    )
    store = _key_store(args)
    try:
        key, record = store.create(args.tenant, args.tier, limits)
    finally:
        store.engine.dispose()
    print(key)  # the only time the key is shown: stdout alone, so `KEY=$(imagine keys create ...)` works
    print(
        f"created API key {record.prefix} (id {record.id}) for tenant {record.tenant!r}, tier {record.tier}, "
        f"limits {record.limits.model_dump(exclude_none=True) or 'server defaults'}; store it now: it cannot be shown again",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    store = _key_store(args)
    try:
        records = store.list()
    finally:
        store.engine.dispose()
    rows = [("PREFIX", "ID", "TENANT", "TIER", "CREATED", "REVOKED", "LIMITS")]
    rows += [
        (r.prefix, r.id, r.tenant, r.tier, _when(r.created_at), _when(r.revoked_at),
         json.dumps(r.limits.model_dump(exclude_none=True)))
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from imagine.jobs.keys import ApiKeyNotFound

    store = _key_store(args)
    try:
        record = store.revoke(args.key)
    except ApiKeyNotFound:
        print(f"imagine: no API key with prefix or id {args.key!r}", file=sys.stderr)
        return 2
    finally:
        store.engine.dispose()
    print(f"revoked {record.prefix} (id {record.id}, tenant {record.tenant!r}) at {_when(record.revoked_at)}")
    return 0


def _database_url(args: argparse.Namespace) -> str:
    return args.database_url or _load_config(args.config, {}).resolved_database_url


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from imagine.jobs.migrate import SchemaError, upgrade
    from imagine.jobs.store import make_engine

    engine = make_engine(_database_url(args))
    try:
        before, after = upgrade(engine, args.revision)
    except SchemaError as e:
        print(f"imagine: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(f"job store schema: {before or 'empty'} -> {after}" if before != after else f"job store schema: {after} (up to date)")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from imagine.jobs.migrate import current_revision, head_revision
    from imagine.jobs.store import make_engine

    engine = make_engine(_database_url(args))
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if revision == head else f"this Imagine's head is {head}"
    print(f"{revision or 'empty (no schema)'} ({state})")
    return 0


def _add_db_parser(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="job store schema migrations (Alembic)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate the job store to this Imagine's schema (locked: safe to race)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_db_upgrade)
    current = db_sub.add_parser("current", help="print the job store's schema revision")
    current.set_defaults(func=cmd_db_current)
    for p in (up, current):
        _add_database_options(p)


def _add_database_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the service's YAML config (AppConfig fields, or a Serve config file)")
    where.add_argument(
        "--database-url", help="SQLAlchemy URL of the job store (default: $IMAGINE_DATABASE_URL, else SQLite under "
        "$IMAGINE_HOME)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:
    from imagine.config import TIERS

    keys = sub.add_parser("keys", help="create, list and revoke API keys (in the service's database)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (once; only its hash is stored)")
    create.add_argument("--tenant", required=True, help="tenant the key acts for (its jobs are only visible to it)")
    create.add_argument("--tier", required=True, choices=TIERS, help="highest priority the key may use")
    create.add_argument("--max-concurrent", type=_positive_int, help="jobs of this key running at once")
    create.add_argument("--max-queued", type=_positive_int, help="jobs of this key waiting in the queue")
    create.add_argument("--max-video-seconds-per-day", type=_positive_float, help="requested output seconds per UTC day")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (prefix, tenant, tier, created, revoked; never the key)")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its prefix (im_...) or id")
    revoke.add_argument("key", metavar="PREFIX_OR_ID")
    revoke.set_defaults(func=cmd_keys_revoke)
    for p in (create, listing, revoke):
        _add_database_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagine", description="Self-hosted video + audio generation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local Ray + the Imagine app in the foreground")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    up.add_argument("--config", help="YAML with AppConfig fields, or a Serve config file")
    up.add_argument("--preset", help="model preset (default: tiny)")
    up.add_argument("--home", help="state directory (default: $IMAGINE_HOME or ~/.cache/imagine)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="generate a video and download it")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4")
    gen.add_argument("--duration", type=float, default=5.0)
    gen.add_argument("--resolution", default="480p")
    gen.add_argument("--aspect-ratio", default="16:9")
    gen.add_argument("--image", help="first frame (png/jpeg file)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--fps", type=int)
    gen.add_argument("--model")
    gen.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    gen.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for a starting service")
    gen.set_defaults(func=cmd_generate)

    for name, func, text in (("status", cmd_status, "show a job"), ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.set_defaults(func=func)
    models = sub.add_parser("models", help="list served models")
    models.set_defaults(func=cmd_models)
    for p in sub.choices.values():
        if p is not up:
            p.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
            p.add_argument(
                "--api-key", default=os.environ.get("IMAGINE_API_KEY"), help="API key (default: $IMAGINE_API_KEY)"
            )
    usage = sub.add_parser("usage", help="your tenant's usage: jobs, output seconds, device-seconds, cost, price")
    usage.add_argument("--start", help="unix seconds or ISO date (default: 30 days before --end)")
    usage.add_argument("--end", help="unix seconds or ISO date, a date includes that day (default: now)")
    usage.add_argument("--group-by", choices=("day", "model", "tier"), default="day")
    usage.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
    usage.add_argument("--api-key", help="API key (Authorization: Bearer)")
    usage.set_defaults(func=cmd_usage)
    _add_keys_parser(sub)
    _add_db_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImagineError as e:
        print(f"imagine: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError, httpx.TransportError) as e:
        print(f"imagine: cannot reach the service: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(f"imagine: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
