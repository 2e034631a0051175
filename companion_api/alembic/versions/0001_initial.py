"""initial schema

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "results",
        sa.Column("result_id", sa.String(36), primary_key=True),
        sa.Column("device", sa.String(120), sa.ForeignKey("principals.name"), nullable=False, index=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False, index=True),
        sa.Column("grade", sa.Integer, nullable=True, index=True),
        sa.Column("referable", sa.Boolean, nullable=True, index=True),
        sa.Column("confidence", sa.Float, nullable=True),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("overlay_png", sa.LargeBinary, nullable=True),
        sa.Column("image", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "insights",
        sa.Column("result_id", sa.String(36), sa.ForeignKey("results.result_id"), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("format", sa.String(16), nullable=False, index=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("uploaded_by", sa.String(120), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("principal", sa.String(120), nullable=False, index=True),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("detail", sa.String(500), nullable=True),
    )


def downgrade() -> None:
    for table in ("audit_events", "model_artifacts", "insights", "results", "principals"):
        op.drop_table(table)
