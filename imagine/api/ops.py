"""Operator routes: `GET /v1/usage` (a tenant's cost and price, from the ledger) and `GET /metrics`
(Prometheus text, computed from the database at scrape time, so every ingress replica reports the
same numbers and nothing resets on a restart; totals across tenants, so behind `metrics` config)."""

from __future__ import annotations

import datetime as dt
import hmac
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from imagine.api.errors import ERROR_RESPONSES, ApiError, unauthorized
from imagine.config import METRICS_TOKEN_ENV, TIERS, AccountingConfig, MetricsConfig
from imagine.jobs.ledger import GROUP_BY, Ledger
from imagine.jobs.store import JobStatus, JobStore, jobs_table

DEFAULT_USAGE_WINDOW_S = 30 * 86_400
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_TIME_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
FINAL_STATUSES = tuple(s.value for s in JobStatus if s.terminal)


# timestamps `datetime` can show (0001-01-01 .. 9999-12-31 UTC); past them a bound is a typo, not a window
MIN_UNIX_S = dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp()
MAX_UNIX_S = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()


def parse_time(value: str, param: str, end_of_day: bool = False) -> float:
    """Unix seconds from `value`: a number, an ISO date (UTC midnight; the next midnight when
    `end_of_day`, so `end=2025-05-31` covers that day) or an ISO datetime (UTC when it has no zone).
    400 naming `param` for anything else, and for times outside years 1..9999 (nan and infinities included)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            if len(value) == 10:
                day = dt.date.fromisoformat(value) + dt.timedelta(days=1 if end_of_day else 0)
                seconds = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
            else:
                moment = dt.datetime.fromisoformat(value)
                seconds = (moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)).timestamp()
        except ValueError as e:
            raise ApiError(
                400, "invalid_parameter", f"'{param}' must be unix seconds or an ISO date/datetime, got {value!r}", param
            ) from e
        except OverflowError as e:  # the day after 9999-12-31, or a zone offset past the end of time
            raise ApiError(400, "invalid_parameter", f"'{param}' is past the year 9999, got {value!r}", param) from e
    if not (math.isfinite(seconds) and MIN_UNIX_S <= seconds <= MAX_UNIX_S):
        raise ApiError(
            400, "invalid_parameter", f"'{param}' must be a time between the years 1 and 9999, got {value!r}", param
        )
    return seconds


def check_metrics_access(enabled: bool, token: str | None, auth_enabled: bool, authorization: str | None) -> None:
    """Whether a scrape may read `/metrics`: 404 when it is off (`metrics.enabled` false, or auth on without a
    scrape token); with a token, 401 unless the request sends `Authorization: Bearer <token>`; open otherwise."""
    if not enabled:
        raise ApiError(404, "metrics_disabled", "/metrics is turned off on this server (metrics.enabled)", None)
    if token is None:
        if auth_enabled:
            raise ApiError(
                404, "metrics_disabled",
                f"/metrics is off: with auth enabled it needs a scrape token (metrics.token or ${METRICS_TOKEN_ENV})",
                None,
            )
        return
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise unauthorized("invalid_metrics_token", "/metrics needs 'Authorization: Bearer <scrape token>'")


def _histogram(
    conn: sa.Connection, name: str, doc: str, value: sa.ColumnElement, where: list, buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    """A histogram of `value` over the rows matching `where`; bucket counts are computed in SQL."""
    columns = [sa.func.count(), sa.func.coalesce(sa.func.sum(value), 0.0)]
    columns += [sa.func.coalesce(sa.func.sum(sa.case((value <= le, 1), else_=0)), 0) for le in buckets]
    count, total, *cumulative = conn.execute(sa.select(*columns).where(*where)).one()
    pairs = [(repr(le), int(n)) for le, n in zip(buckets, cumulative)] + [("+Inf", int(count))]
    return HistogramMetricFamily(name, doc, buckets=pairs, sum_value=float(total))


class DatabaseCollector(Collector):
    """Reads job and ledger state from the database on every scrape."""

    def __init__(self, store: JobStore, ledger: Ledger, accounting: AccountingConfig):
        self.store = store
        self.ledger = ledger
        self.accounting = accounting

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the database is read only when scraped

    def collect(self) -> Iterator[Metric]:
        c = jobs_table.c
        with self.store.engine.connect() as conn:
            queued, oldest = {}, {}
            for tier, n, first in conn.execute(
                sa.select(c.priority, sa.func.count(), sa.func.min(c.created_at))
                .where(c.status == JobStatus.QUEUED.value)
                .group_by(c.priority)
            ):
                queued[tier], oldest[tier] = n, first
            now = time.time()
            by_status = dict(conn.execute(sa.select(c.status, sa.func.count()).group_by(c.status)).all())
            queue_wait = _histogram(
                conn,
                "imagine_queue_wait_seconds",
                "Seconds from creation to start of started jobs (current attempt).",
                c.started_at - c.created_at,
                [c.started_at.is_not(None)],
                QUEUE_WAIT_BUCKETS,
            )
            run_time = _histogram(
                conn,
                "imagine_job_run_seconds",
                "Seconds from start to finish of finished jobs.",
                c.finished_at - c.started_at,
                [c.started_at.is_not(None), c.finished_at.is_not(None)],
                RUN_TIME_BUCKETS,
            )

        depth = GaugeMetricFamily("imagine_queue_depth", "Jobs waiting in the queue, by tier.", labels=["tier"])
        age = GaugeMetricFamily(
            "imagine_queue_oldest_age_seconds", "Age of the oldest queued job, by tier (0 when none waits).",
            labels=["tier"],
        )
        for tier in sorted(set(TIERS) | set(queued)):
            depth.add_metric([tier], int(queued.get(tier, 0)))
            age.add_metric([tier], max(0.0, now - oldest[tier]) if tier in oldest else 0.0)
        yield depth
        yield age

        running = GaugeMetricFamily("imagine_jobs_running", "Jobs being generated now.")
        running.add_metric([], int(by_status.get(JobStatus.RUNNING.value, 0)))
        yield running

        finished = GaugeMetricFamily(
            "imagine_jobs_finished",
            "Jobs that reached a final status (only grows while rows are kept).",
            labels=["status"],
        )
        for status in FINAL_STATUSES:
            finished.add_metric([status], int(by_status.get(status, 0)))
        yield finished

        yield queue_wait
        yield run_time

        device_seconds = CounterMetricFamily(
            "imagine_device_seconds",
            "Device-seconds spent on stages (wall x devices), by device type.",
            labels=["device_type"],
        )
        cost = CounterMetricFamily(
            "imagine_cost_usd", "What stage runs cost us, by device type.", labels=["device_type"]
        )
        totals = self.ledger.totals_by_device_type()
        for device_type in sorted(set(self.accounting.device_hour_usd) | set(totals)):
            ds, usd = totals.get(device_type, (0.0, 0.0))
            device_seconds.add_metric([device_type], ds)
            cost.add_metric([device_type], usd)
        yield device_seconds
        yield cost

        output = CounterMetricFamily(
            "imagine_billed_output_seconds", "Output seconds billed, by model.", labels=["model"]
        )
        price = CounterMetricFamily("imagine_billed_usd", "What done jobs were charged, by model.", labels=["model"])
        for model, (out, usd) in sorted(self.ledger.billed_totals_by_model().items()):
            output.add_metric([model], out)
            price.add_metric([model], usd)
        yield output
        yield price

        rate = GaugeMetricFamily("imagine_device_hour_usd", "Configured $ per device-hour.", labels=["device_type"])
        for device_type, usd in sorted(self.accounting.device_hour_usd.items()):
            rate.add_metric([device_type], usd)
        yield rate


def create_ops_router(
    store: JobStore,
    ledger: Ledger,
    accounting_config: AccountingConfig,
    principal_dependency: Callable[..., Any],
    metrics: MetricsConfig | None = None,
    auth_enabled: bool = False,
) -> APIRouter:
    """`GET /v1/usage` for the calling principal's tenant, and `GET /metrics` as `metrics` allows
    (`check_metrics_access`; default: open, as with auth off). Raises ApiError: the app must have
    `install_error_handlers` (the main app does)."""
    metrics = metrics or MetricsConfig()
    metrics_token = metrics.resolved_token()  # once, at start: a bad $IMAGINE_METRICS_TOKEN fails the replica
    router = APIRouter()
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(store, ledger, accounting_config))

    @router.get("/v1/usage", tags=["usage"], responses=ERROR_RESPONSES)
    def get_usage(
        principal: Any = Depends(principal_dependency),  # noqa: B008 - FastAPI's dependency idiom
        start: str | None = Query(None, description="Unix seconds or ISO date/datetime (default: end - 30 days)."),
        end: str | None = Query(None, description="Unix seconds or ISO date/datetime, exclusive (default: now)."),
        group_by: str = Query("day", description="day | model | tier"),
    ) -> dict[str, Any]:
        """The caller's tenant's usage per UTC day, model or tier: jobs, output seconds, device-seconds,
        cost and price (price only for done jobs)."""
        if group_by not in GROUP_BY:
            raise ApiError(
                422, "invalid_parameter", f"'group_by' must be one of {list(GROUP_BY)}, got {group_by!r}", "group_by"
            )
        end_ts = time.time() if end is None else parse_time(end, "end", end_of_day=True)
        start_ts = end_ts - DEFAULT_USAGE_WINDOW_S if start is None else parse_time(start, "start")
        if start_ts >= end_ts:
            raise ApiError(422, "invalid_parameter", f"'start' ({start_ts}) must be before 'end' ({end_ts})", "start")
        rows = ledger.usage(principal.tenant, start_ts, end_ts, group_by)  # type: ignore[arg-type]
        keys = ("output_seconds", "device_seconds", "cost_usd", "price_usd")
        total = {k: sum(r[k] for r in rows) for k in keys}
        return {
            "object": "usage",
            "tenant": principal.tenant,
            "start": start_ts,
            "end": end_ts,
            "group_by": group_by,
            "data": rows,
            "total": total,
        }

    @router.get("/metrics", tags=["ops"], include_in_schema=False)
    def get_metrics(request: Request) -> Response:
        check_metrics_access(metrics.enabled, metrics_token, auth_enabled, request.headers.get("authorization"))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
