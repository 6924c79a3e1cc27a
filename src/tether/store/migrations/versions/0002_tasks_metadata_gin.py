"""GIN index on tasks.metadata (PostgreSQL only).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    # SQLite has no GIN and no JSONB operators to serve, so it gets nothing.
    if _postgresql():
        op.create_index("ix_tasks_metadata", "tasks", ["metadata"], postgresql_using="gin")


def downgrade() -> None:
    if _postgresql():
        op.drop_index("ix_tasks_metadata", table_name="tasks")
