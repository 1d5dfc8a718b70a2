"""The export airlock: requests, their quarantined files, reviews; per-dataset settings.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "export_policies",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("review_approvals", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "review_approvals >= 1", name=op.f("ck_export_policies_review_approvals")
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_export_policies_dataset_id_datasets")
        ),
        sa.PrimaryKeyConstraint("dataset_id", name=op.f("pk_export_policies")),
    )
    op.create_table(
        "export_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("dataset_ids", sa.JSON(), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("screen_report", sa.Text(), nullable=False),
        sa.Column("screen_report_sha256", sa.String(length=64), nullable=False),
        sa.Column("screen_settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'blocked', 'approved', 'rejected', 'released')",
            name=op.f("ck_export_requests_state"),
        ),
        sa.CheckConstraint(
            "verdict IN ('pass', 'review', 'block')", name=op.f("ck_export_requests_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_export_requests_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_requests")),
    )
    op.create_index(op.f("ix_export_requests_user_id"), "export_requests", ["user_id"])
    op.create_index(op.f("ix_export_requests_state"), "export_requests", ["state"])
    op.create_table(
        "export_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "verdict IN ('pass', 'review', 'block')", name=op.f("ck_export_files_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["export_requests.id"],
            name=op.f("fk_export_files_request_id_export_requests"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_files")),
        sa.UniqueConstraint("request_id", "path", name=op.f("uq_export_files_request_id")),
    )
    op.create_index(op.f("ix_export_files_request_id"), "export_files", ["request_id"])
    op.create_table(
        "export_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), nullable=False),
        sa.Column("approve", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["export_requests.id"],
            name=op.f("fk_export_reviews_request_id_export_requests"),
        ),
        sa.ForeignKeyConstraint(
            ["reviewer_id"], ["users.id"], name=op.f("fk_export_reviews_reviewer_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_reviews")),
        sa.UniqueConstraint(
            "request_id", "reviewer_id", name=op.f("uq_export_reviews_request_id")
        ),
    )
    op.create_index(op.f("ix_export_reviews_request_id"), "export_reviews", ["request_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_export_reviews_request_id"), table_name="export_reviews")
    op.drop_table("export_reviews")
    op.drop_index(op.f("ix_export_files_request_id"), table_name="export_files")
    op.drop_table("export_files")
    op.drop_index(op.f("ix_export_requests_state"), table_name="export_requests")
    op.drop_index(op.f("ix_export_requests_user_id"), table_name="export_requests")
    op.drop_table("export_requests")
    op.drop_table("export_policies")
