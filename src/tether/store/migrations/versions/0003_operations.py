"""Operations tasks wait on (durable waits): their outcome, stored once.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "operations",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", Json, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("deadline", Ts, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("completed_at", Ts, nullable=True),
    )
    op.create_index("ix_operations_task", "operations", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_operations_task", table_name="operations")
    op.drop_table("operations")
