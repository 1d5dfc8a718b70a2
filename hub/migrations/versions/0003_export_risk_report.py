"""Export requests name the file that is their disclosure-risk report (model weights need one).

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01 00:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot drop a column in place on downgrade.
    with op.batch_alter_table("export_requests") as batch:
        batch.add_column(sa.Column("risk_report_path", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("export_requests") as batch:
        batch.drop_column("risk_report_path")
