"""results carry the DME head's finding: dme_present (indexed, for history filters) and dme_probability

Both nullable: results of DR-only models, ungradable captures and every row stored before DME existed keep NULL.
The finding is also in each row's payload (the ScreeningResult JSON); the columns make it filterable.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("results", sa.Column("dme_present", sa.Boolean, nullable=True))
    op.add_column("results", sa.Column("dme_probability", sa.Float, nullable=True))
    op.create_index("ix_results_dme_present", "results", ["dme_present"])


def downgrade() -> None:
    op.drop_index("ix_results_dme_present", table_name="results")
    op.drop_column("results", "dme_probability")
    op.drop_column("results", "dme_present")
