"""history pages by key: one index per view in its sort order, and an encounters table (newest visit first)

Every history and review view pages with a cursor (captured_at, device, result_id) instead of OFFSET and COUNT:
each page is an index range read, whatever the table's size. The single-column indexes on grade, referable,
dme_present, captured_at and device are replaced by composite ones that also hold the sort order. The visit list
reads ``encounters`` (one row per device + encounter_id, its last capture time and capture count), kept by sync,
instead of grouping every result; it is filled here from the results already stored.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_PAGES = {
    "ix_results_page": ["captured_at", "device", "result_id"],
    "ix_results_device_page": ["device", "captured_at", "result_id"],
    "ix_results_grade_page": ["grade", "captured_at", "device", "result_id"],
    "ix_results_referable_page": ["referable", "captured_at", "device", "result_id"],
    "ix_results_dme_page": ["dme_present", "captured_at", "device", "result_id"],
}
_REPLACED = ("ix_results_grade", "ix_results_referable", "ix_results_dme_present", "ix_results_captured_at",
             "ix_results_device")


def upgrade() -> None:
    for name, columns in _PAGES.items():
        op.create_index(name, "results", columns)
    for name in _REPLACED:
        op.drop_index(name, table_name="results")
    op.create_table(
        "encounters",
        sa.Column("device", sa.String(120), sa.ForeignKey("principals.name"), nullable=False),
        sa.Column("encounter_id", sa.String(64), nullable=False),
        sa.Column("last_captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("captures", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("device", "encounter_id", name="pk_encounters"),
    )
    op.execute("INSERT INTO encounters (device, encounter_id, last_captured_at, captures) "
               "SELECT device, encounter_id, MAX(captured_at), COUNT(*) FROM results "
               "WHERE encounter_id IS NOT NULL GROUP BY device, encounter_id")
    op.create_index("ix_encounters_page", "encounters", ["last_captured_at", "device", "encounter_id"])
    op.create_index("ix_encounters_device_page", "encounters", ["device", "last_captured_at", "encounter_id"])


def downgrade() -> None:
    op.drop_table("encounters")
    for column in ("grade", "referable", "dme_present", "captured_at", "device"):
        op.create_index(f"ix_results_{column}" if column != "dme_present" else "ix_results_dme_present", "results",
                        [column])
    for name in _PAGES:
        op.drop_index(name, table_name="results")
