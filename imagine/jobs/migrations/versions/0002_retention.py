"""Retention: when a done job's outputs expire (`expires_at`), and when the sweeper deleted its outputs
(`outputs_purged_at`) and its inputs and work files (`inputs_purged_at`).

Rows that were already terminal keep their files until the first sweep (their inputs are deleted then; their
outputs have no `expires_at`, so they are kept).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("outputs_purged_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("inputs_purged_at", sa.Float, nullable=True))
    op.create_index("ix_jobs_sweep_inputs", "jobs", ["inputs_purged_at", "status"])
    op.create_index("ix_jobs_sweep_outputs", "jobs", ["outputs_purged_at", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_sweep_outputs", "jobs")
    op.drop_index("ix_jobs_sweep_inputs", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("inputs_purged_at")
        batch.drop_column("outputs_purged_at")
        batch.drop_column("expires_at")
