"""results keyed by (device, result_id); encounter_id and eye per result

Result ids are chosen by devices: a global key let one device squat another's ids and told it whose id it had
hit. The new key scopes ids to the device. Encounters (one patient visit, both eyes) are stored per result.
Tables are rebuilt and copied (SQLite cannot change a primary key in place).

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_RESULT_COLUMNS = ("result_id", "device", "content_hash", "payload", "outcome", "grade", "referable", "confidence",
                   "captured_at", "received_at", "overlay_png", "image")


def upgrade() -> None:
    op.create_table(
        "results_new",
        sa.Column("device", sa.String(120), sa.ForeignKey("principals.name"), nullable=False),
        sa.Column("result_id", sa.String(36), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("grade", sa.Integer, nullable=True),
        sa.Column("referable", sa.Boolean, nullable=True),
        sa.Column("confidence", sa.Float, nullable=True),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("overlay_png", sa.LargeBinary, nullable=True),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("encounter_id", sa.String(64), nullable=True),
        sa.Column("eye", sa.String(5), nullable=True),
        sa.PrimaryKeyConstraint("device", "result_id", name="pk_results_device_result"),
    )
    columns = ", ".join(_RESULT_COLUMNS)
    op.execute(f"INSERT INTO results_new ({columns}) SELECT {columns} FROM results")
    op.create_table(
        "insights_new",
        sa.Column("device", sa.String(120), nullable=False),
        sa.Column("result_id", sa.String(36), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device", "result_id", name="pk_insights_device_result"),
        sa.ForeignKeyConstraint(["device", "result_id"], ["results_new.device", "results_new.result_id"],
                                name="fk_insights_result"),
    )
    op.execute("INSERT INTO insights_new (device, result_id, source, body, created_at) "
               "SELECT r.device, i.result_id, i.source, i.body, i.created_at FROM insights i "
               "JOIN results r ON r.result_id = i.result_id")
    op.drop_table("insights")
    op.drop_table("results")
    op.rename_table("results_new", "results")
    op.rename_table("insights_new", "insights")
    for column in ("device", "outcome", "grade", "referable", "captured_at"):
        op.create_index(f"ix_results_{column}", "results", [column])
    op.create_index("ix_results_encounter", "results", ["device", "encounter_id"])


def downgrade() -> None:
    raise NotImplementedError("0002 cannot be undone without losing results that share an id across devices")
