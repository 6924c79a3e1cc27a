"""Tables shared by the SQLite and PostgreSQL backends (and their migrations).

JSON columns are JSONB on PostgreSQL. Timestamps are epoch seconds as doubles:
one representation on both engines, and cheap to compare for leases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")

contexts = sa.Table(
    "contexts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("created_at", Ts, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
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
    sa.Index("ix_tasks_owner_status", "owner", "status_ts", "id"),
    sa.Index("ix_tasks_owner_context_status", "owner", "context_id", "status_ts", "id"),
    sa.Index("ix_tasks_owner_state_status", "owner", "state", "status_ts", "id"),
    sa.Index("ix_tasks_runnable", "state", "lease_expires"),
)

# JSONB containment and key lookups on task metadata; GIN exists on PostgreSQL only.
sa.Index("ix_tasks_metadata", tasks.c.metadata, postgresql_using="gin").ddl_if(dialect="postgresql")

# Schema objects created on PostgreSQL alone (by ``ddl_if`` here and by the migrations).
POSTGRESQL_ONLY = frozenset({"ix_tasks_metadata"})

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("seq", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("context_id", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("body", Json, nullable=False),
    sa.Column("created_at", Ts, nullable=False),
    sa.UniqueConstraint("owner", "message_id", name="uq_messages_owner_message_id"),
    sa.Index("ix_messages_task", "task_id", "seq"),
    sa.Index("ix_messages_context", "context_id", "seq"),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("artifact_id", sa.String(255), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("body", Json, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("payload", Json, nullable=False),
    sa.Column("created_at", Ts, nullable=False),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("metadata", Json, nullable=True),
    sa.Column("created_at", Ts, nullable=False),
    sa.CheckConstraint("rating BETWEEN 1 AND 5", name="ck_feedback_rating"),
    sa.Index("ix_feedback_task", "task_id"),
)


# Outcomes of external operations tasks wait on (``ctx.wait_for``), each stored once.
# No foreign key to tasks: a completion may arrive before the wait that names its task.
operations = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("task_id", sa.String(64), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("result", Json, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("deadline", Ts, nullable=True),
    sa.Column("created_at", Ts, nullable=False),
    sa.Column("completed_at", Ts, nullable=True),
    sa.Index("ix_operations_task", "task_id"),
)


def include_object(dialect: str) -> Callable[..., bool]:
    """Alembic's ``include_object`` hook: compare only what this dialect is meant to have."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        return dialect == "postgresql" or name not in POSTGRESQL_ONLY

    return include
