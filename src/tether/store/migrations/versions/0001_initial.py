"""Initial schema: contexts, tasks, messages, artifacts, events, feedback.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "contexts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("context_id", sa.String(64), sa.ForeignKey("contexts.id"), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status_message", Json, nullable=True),
        sa.Column("status_ts", Ts, nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires", Ts, nullable=True),
    )
    op.create_index("ix_tasks_owner_status", "tasks", ["owner", "status_ts", "id"])
    op.create_index(
        "ix_tasks_owner_context_status", "tasks", ["owner", "context_id", "status_ts", "id"]
    )
    op.create_index("ix_tasks_owner_state_status", "tasks", ["owner", "state", "status_ts", "id"])
    op.create_index("ix_tasks_runnable", "tasks", ["state", "lease_expires"])
    op.create_table(
        "messages",
        sa.Column("seq", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("context_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("body", Json, nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.UniqueConstraint("owner", "message_id", name="uq_messages_owner_message_id"),
    )
    op.create_index("ix_messages_task", "messages", ["task_id", "seq"])
    op.create_index("ix_messages_context", "messages", ["context_id", "seq"])
    op.create_table(
        "artifacts",
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), primary_key=True),
        sa.Column("artifact_id", sa.String(255), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("body", Json, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("payload", Json, nullable=False),
        sa.Column("created_at", Ts, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.CheckConstraint("rating BETWEEN 1 AND 5", name="ck_feedback_rating"),
    )
    op.create_index("ix_feedback_task", "feedback", ["task_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("events")
    op.drop_table("artifacts")
    op.drop_table("messages")
    op.drop_table("tasks")
    op.drop_table("contexts")
