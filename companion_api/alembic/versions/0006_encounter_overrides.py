"""a clinician may decide a visit: the override, its reason, who and when, beside the automatic decision

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = (("override_decision", sa.String(16)), ("override_reason", sa.String(500)), ("override_by", sa.String(120)),
            ("override_at", sa.DateTime(timezone=True)))


def upgrade() -> None:
    for name, kind in _COLUMNS:
        op.add_column("encounters", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    for name, _ in _COLUMNS:
        op.drop_column("encounters", name)
