"""model artifacts carry their signed release sequence and their size; results record a device's clock skew

/v1/models/latest serves the highest release sequence of a format (not the newest upload), and publishes the file's
size so devices cap their download. Rows uploaded before keep NULL (they predate signed releases).
A result whose device clock was implausible is stored with the server's receive time as captured_at and the
difference in clock_skew_s (before, it was rejected); rows stored before keep NULL.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_artifacts", sa.Column("sequence", sa.BigInteger, nullable=True))
    op.add_column("model_artifacts", sa.Column("size_bytes", sa.BigInteger, nullable=True))
    op.create_index("ix_model_artifacts_release", "model_artifacts", ["format", "sequence"])
    op.add_column("results", sa.Column("clock_skew_s", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("results", "clock_skew_s")
    op.drop_index("ix_model_artifacts_release", table_name="model_artifacts")
    op.drop_column("model_artifacts", "size_bytes")
    op.drop_column("model_artifacts", "sequence")
