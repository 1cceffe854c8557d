"""API dialects and deletion: which API a job was created through (`dialect`: imagine | openai | xai, which decides
how `GET /v1/videos/{id}` renders it), and when its owner deleted it (`deleted_at`: the job is then gone from the
API and the sweeper deletes its files; the row stays for the ledger).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dialect", sa.String(16), nullable=False, server_default="imagine"))
        batch.add_column(sa.Column("deleted_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("dialect")
