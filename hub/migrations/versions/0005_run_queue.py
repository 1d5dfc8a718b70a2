"""Runs are queued: which executor runs each one, its job there, and what the run needs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 16:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("executor", sa.String(length=32), nullable=False,
                                   server_default="local"))
        batch.add_column(sa.Column("executor_job", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("needs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("queued_at")
        batch.drop_column("needs")
        batch.drop_column("executor_job")
        batch.drop_column("executor")
