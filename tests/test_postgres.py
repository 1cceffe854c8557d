"""PostgreSQL specifics. The store, dispatcher, preemption, ledger, idempotency and admission tests
run on both databases through the `db_url` fixture; this file checks the driver and server."""

from __future__ import annotations

from imagine.jobs.store import make_engine


def test_engine_uses_psycopg3_on_postgresql_15(postgresql_url):
    engine = make_engine(postgresql_url)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW server_version").scalar().startswith("15")
    finally:
        engine.dispose()
