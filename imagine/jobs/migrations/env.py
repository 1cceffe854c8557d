"""Alembic environment of the job store. It is run only through `imagine.jobs.migrate` (or `imagine db upgrade`),
which hands it an open connection in `config.attributes["connection"]`; there is no alembic.ini and no URL here."""

from __future__ import annotations

from alembic import context

from imagine.jobs.migrate import target_metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy (`batch_alter_table`)
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
