"""Metered usage: one row per run and per server session, the datasets each is attributed
to, and the data providers bound to the datasets they supplied.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("server", sa.String(length=255), nullable=True),
        sa.Column("template", sa.String(length=255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("cpu_s", sa.Float(), nullable=True),
        sa.Column("mem_peak_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gpu_s", sa.Float(), nullable=True),
        sa.Column("gpu_mem_peak_bytes", sa.BigInteger(), nullable=True),
        sa.Column("energy_j", sa.Float(), nullable=True),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('run', 'session')", name=op.f("ck_usage_kind")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_usage_run_id_runs")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_usage_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage")),
        sa.UniqueConstraint("ref", name=op.f("uq_usage_ref")),
    )
    op.create_index(op.f("ix_usage_user_id"), "usage", ["user_id"])
    op.create_index(op.f("ix_usage_run_id"), "usage", ["run_id"])
    op.create_index(op.f("ix_usage_template"), "usage", ["template"])
    op.create_index(op.f("ix_usage_started_at"), "usage", ["started_at"])
    op.create_table(
        "usage_datasets",
        sa.Column("usage_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["usage_id"], ["usage.id"],
                                name=op.f("fk_usage_datasets_usage_id_usage")),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"],
                                name=op.f("fk_usage_datasets_dataset_id_datasets")),
        sa.PrimaryKeyConstraint("usage_id", "dataset_id", name=op.f("pk_usage_datasets")),
    )
    op.create_index(op.f("ix_usage_datasets_dataset_id"), "usage_datasets", ["dataset_id"])
    op.create_table(
        "dataset_providers",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"],
                                name=op.f("fk_dataset_providers_dataset_id_datasets")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_dataset_providers_user_id_users")),
        sa.PrimaryKeyConstraint("dataset_id", "user_id", name=op.f("pk_dataset_providers")),
    )
    op.create_index(op.f("ix_dataset_providers_user_id"), "dataset_providers", ["user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dataset_providers_user_id"), table_name="dataset_providers")
    op.drop_table("dataset_providers")
    op.drop_index(op.f("ix_usage_datasets_dataset_id"), table_name="usage_datasets")
    op.drop_table("usage_datasets")
    op.drop_index(op.f("ix_usage_started_at"), table_name="usage")
    op.drop_index(op.f("ix_usage_template"), table_name="usage")
    op.drop_index(op.f("ix_usage_run_id"), table_name="usage")
    op.drop_index(op.f("ix_usage_user_id"), table_name="usage")
    op.drop_table("usage")
