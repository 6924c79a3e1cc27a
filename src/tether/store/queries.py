"""The store's SQL, by name: one text for SQLite and PostgreSQL, ``:name`` parameters.

Run through ``sql_exec``. State names are inlined from the enum (never user input),
so each guard is one prepared statement. The ``PG_`` statements do in one round
trip what the portable ones do in several (data-modifying CTEs, JSON aggregates),
where PostgreSQL's per-statement cost shows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tether.core.states import ACTIVE, TERMINAL, TaskState, allowed_from
from tether.store.base import OperationState

_ACTIVE = [s.value for s in ACTIVE]
_TERMINAL = [s.value for s in TERMINAL]


TASK_COLUMN_NAMES = (
    "id",
    "context_id",
    "owner",
    "state",
    "version",
    "status_message",
    "status_ts",
    "created_at",
    "metadata",
    "last_seq",
    "attempts",
    "lease_owner",
    "lease_expires",
)
TASK_COLUMNS = ", ".join(TASK_COLUMN_NAMES)


def _states(states: Sequence[str]) -> str:
    # Enum values, never user input: safe to inline, and one prepared statement each.
    return ", ".join(f"'{s}'" for s in states)


ALLOWED_FROM = {to: tuple(sorted(s.value for s in allowed_from(to))) for to in TaskState}
WORKING = (TaskState.WORKING.value,)
STATE_SETS = (
    "state = :state",
    "version = version + 1",
    "status_ts = :ts",
    "status_message = :status_message",
)
LEASE_CLEARED = ("lease_owner = NULL", "lease_expires = NULL")


@functools.cache
def bump(
    sets: tuple[str, ...],
    states: tuple[str, ...],
    owner: bool,
    lease: bool,
    whole: bool = False,
    children: str = "",
) -> str:
    """The guarded update. It returns ``last_seq, context_id, owner``, or with ``whole``
    the task's columns (``TASK_COLUMNS``) followed by ``children``."""
    where = f"id = :id AND state IN ({_states(states)})"
    if owner:
        where += " AND owner = :owner"
    if lease:
        where += " AND lease_owner = :lease_owner"
    assign = ", ".join(("last_seq = last_seq + 1", *sets))
    returned = f"{TASK_COLUMNS}{children}" if whole else "last_seq, context_id, owner"
    return f"UPDATE tasks SET {assign} WHERE {where} RETURNING {returned}"


FIND_STATE = "SELECT state, lease_owner FROM tasks WHERE id = :id"
FIND_STATE_OF_OWNER = FIND_STATE + " AND owner = :owner"
SEEN = "SELECT task_id FROM messages WHERE owner = :owner AND message_id = :message_id"
EVENTS_AFTER = (
    "SELECT seq, kind, payload, final FROM events WHERE task_id = :id AND seq > :after ORDER BY seq"
)
EVENTS_AFTER_FIRST = EVENTS_AFTER + " LIMIT :n"
INSERT_CONTEXT = "INSERT INTO contexts (id, owner, created_at) VALUES (:id, :owner, :ts)"
ADD_CONTEXT = INSERT_CONTEXT + " ON CONFLICT (id) DO NOTHING RETURNING id"
CONTEXT_OWNER = "SELECT owner FROM contexts WHERE id = :id"
_NEW_TASK = (
    "INSERT INTO tasks (id, context_id, owner, state, version, status_ts, created_at, "
    "metadata, last_seq, attempts, lease_owner, lease_expires) VALUES (:id, :context_id, "
    ":owner, :state, :version, :ts, :ts, {metadata}, :last_seq, :attempts, :lease_owner, "
    ":lease_expires)"
)
INSERT_TASK = _NEW_TASK.format(metadata=":metadata")
INSERT_MESSAGE = (
    "INSERT INTO messages (owner, message_id, task_id, context_id, role, body, created_at) "
    "VALUES (:owner, :message_id, :task_id, :context_id, :role, :body, :created_at)"
)
INSERT_EVENT = (
    "INSERT INTO events (task_id, seq, kind, final, payload, created_at) "
    "VALUES (:task_id, :seq, :kind, :final, :payload, :created_at)"
)
# A new task's events, in one statement: submitted, and when its submit started it,
# working (``:payload`` and ``:working``, both stamped ``:ts``).
_SUBMIT_EVENTS = "(:id, 1, 'status', {false}, {payload}, :ts)"
_STARTED_EVENT = ", (:id, 2, 'status', {false}, {working}, :ts)"


@functools.cache
def submit_events(started: bool, dialect: str) -> str:
    rows = _SUBMIT_EVENTS + (_STARTED_EVENT if started else "")
    if dialect == "postgresql":
        rows = rows.format(
            false="false", payload="CAST(:payload AS jsonb)", working="CAST(:working AS jsonb)"
        )
    else:
        rows = rows.format(false="0", payload=":payload", working=":working")
    return f"INSERT INTO events (task_id, seq, kind, final, payload, created_at) VALUES {rows}"


assert TaskState.SUBMITTED in allowed_from(TaskState.WORKING)
CLAIM_FRESH = (
    "UPDATE tasks SET lease_owner = :worker, lease_expires = :expires, "
    f"attempts = attempts + 1, state = '{TaskState.WORKING.value}', version = version + 1, "
    "status_ts = :now, status_message = NULL, last_seq = last_seq + 1 "
    f"WHERE id = :id AND state = '{TaskState.SUBMITTED.value}' AND attempts < :max_attempts "
    "AND (lease_owner IS NULL OR lease_expires <= :now) "
    f"RETURNING {TASK_COLUMNS}"
)
# SQLite: a task with its artifacts and its last :n messages (all when :n is -1), in one
# statement. SQLite before 3.44 cannot order an aggregate, so each child comes back as
# "[ordinal,body]" (the bodies are JSON text already), joined by commas: one JSON
# array that ``sql.children`` parses and puts in order.
_SQLITE_CHILDREN = (
    "(SELECT group_concat('[' || position || ',' || body || ']') FROM artifacts "
    "WHERE task_id = :id), "
    "(SELECT group_concat('[' || seq || ',' || body || ']') FROM (SELECT seq, body "
    "FROM messages WHERE task_id = :id ORDER BY seq DESC LIMIT :n))"
)
# What a claim or a final transition returns after the task's columns (``:n`` -1: the
# whole history), as it was before the statement (a message it adds is not among them).
SQLITE_WHOLE = f", {_SQLITE_CHILDREN}"
SQLITE_LOAD = f"SELECT {TASK_COLUMNS}{SQLITE_WHOLE} FROM tasks WHERE id = :id"
SQLITE_LOAD_OF_OWNER = SQLITE_LOAD + " AND owner = :owner"
SQLITE_CLAIM_FRESH = f"{CLAIM_FRESH}{SQLITE_WHOLE}"
CLAIM = (
    "UPDATE tasks SET lease_owner = :worker, lease_expires = :expires, "
    "attempts = attempts + 1 "
    f"WHERE id = :id AND state IN ({_states(sorted(_ACTIVE))}) "
    "AND (lease_owner IS NULL OR lease_expires <= :now) "
    "RETURNING state, attempts, context_id"
)
EVENT_AT = "SELECT kind, payload FROM events WHERE task_id = :id AND seq = :seq"
CONTEXT_OF_TASK = "SELECT context_id FROM tasks WHERE id = :id AND owner = :owner"
TASK_OF_OWNER = "SELECT id FROM tasks WHERE id = :id AND owner = :owner"
CONTEXT_HISTORY = (
    "SELECT m.body FROM messages m JOIN tasks t ON t.id = m.task_id "
    "WHERE m.context_id = :context_id AND t.owner = :owner ORDER BY m.seq"
)
ARTIFACT = "SELECT body FROM artifacts WHERE task_id = :task_id AND artifact_id = :artifact_id"
INSERT_ARTIFACT = (
    # :of_task repeats :task_id: PostgreSQL deduces one type per parameter.
    "INSERT INTO artifacts (task_id, artifact_id, position, body) VALUES (:task_id, "
    ":artifact_id, (SELECT count(*) FROM artifacts WHERE task_id = :of_task), :body)"
)
UPDATE_ARTIFACT = (
    "UPDATE artifacts SET body = :body WHERE task_id = :task_id AND artifact_id = :artifact_id"
)
FINISHED_WITH_EVENTS = (
    f"SELECT id FROM tasks WHERE state IN ({_states(sorted(_TERMINAL))}) "
    "AND status_ts < :before AND EXISTS (SELECT 1 FROM events WHERE events.task_id = tasks.id) "
    "LIMIT :n"
)
LEASE = "SELECT lease_owner, lease_expires FROM tasks WHERE id = :id"
RELEASE_LEASES = (
    "UPDATE tasks SET lease_owner = NULL, lease_expires = NULL "
    "WHERE lease_owner IS NOT NULL AND lease_owner NOT LIKE :waiting"
)
RELEASE_LEASES_OF = RELEASE_LEASES + " AND lease_owner = :worker"
RUNNABLE = (
    f"SELECT id FROM tasks WHERE state IN ({_states(sorted(_ACTIVE))}) "
    "AND (lease_owner IS NULL OR lease_expires <= :now) ORDER BY created_at LIMIT :n"
)
INSERT_FEEDBACK = (
    "INSERT INTO feedback (task_id, owner, rating, text, metadata, created_at) "
    "VALUES (:task_id, :owner, :rating, :text, :metadata, :ts)"
)
FEEDBACK_AT = (
    "SELECT id FROM feedback WHERE task_id = :task_id AND owner = :owner AND created_at = :ts"
)
OPERATION_COLUMNS = "id, task_id, state, result, error, deadline"
OPERATION = f"SELECT {OPERATION_COLUMNS} FROM operations WHERE id = :id"
ADD_OPERATION = (
    "INSERT INTO operations (id, task_id, state, deadline, created_at) "
    "VALUES (:id, :task_id, :state, :deadline, :ts) ON CONFLICT (id) DO NOTHING"
)
AWAIT_OPERATION = (
    "UPDATE operations SET task_id = :task_id, deadline = :deadline, state = :state, "
    f"completed_at = COALESCE(completed_at, :ts) WHERE id = :id RETURNING {OPERATION_COLUMNS}"
)
PARK = (
    "UPDATE tasks SET lease_owner = :waiter, lease_expires = :until, attempts = 0 "
    f"WHERE id = :id AND state = '{TaskState.WORKING.value}' AND lease_owner = :lease_owner "
    "RETURNING id"
)
ADD_ENDED_OPERATION = (
    "INSERT INTO operations (id, state, result, error, created_at, completed_at) "
    "VALUES (:id, :state, :result, :error, :ts, :ts) ON CONFLICT (id) DO NOTHING RETURNING id"
)
END_OPERATION = (
    "UPDATE operations SET state = :state, result = :result, error = :error, completed_at = :ts "
    f"WHERE id = :id AND state = '{OperationState.PENDING.value}' "
    f"RETURNING {OPERATION_COLUMNS}"
)
RELEASE_WAITER = (
    "UPDATE tasks SET lease_owner = NULL, lease_expires = NULL "
    f"WHERE id = :id AND state IN ({_states(sorted(_ACTIVE))}) AND lease_owner = :waiter "
    "RETURNING id"
)


# -- PostgreSQL: one round trip where the portable form takes several ---------------
# Parameters inside INSERT ... SELECT lists carry casts: PostgreSQL deduces one type per
# parameter and cannot deduce one there.

_ARTIFACTS_OF = "(SELECT json_agg(body ORDER BY position) FROM artifacts WHERE task_id = {})"
_HISTORY_OF = (
    "(SELECT json_agg(h.body ORDER BY h.seq) FROM (SELECT body, seq FROM messages "
    "WHERE task_id = {} ORDER BY seq DESC LIMIT {}) h)"
)
# The task, its artifacts and its last :n messages (all when :n is NULL), one snapshot.
PG_LOAD = (
    f"SELECT {TASK_COLUMNS}, {_ARTIFACTS_OF.format('tasks.id')}, "
    f"{_HISTORY_OF.format('tasks.id', ':n')} FROM tasks WHERE id = :id"
)
PG_LOAD_OF_OWNER = PG_LOAD + " AND owner = :owner"

# The hot writes take their rows as one JSON array (``:rows``), so that the writes a
# group commit gathers (``pg_batch``) run as one statement: PostgreSQL's cost per
# statement, and the driver's, is most of such a write's (measured: 16 submits as one
# statement took 0.07-0.09 ms of the server's CPU each, one by one 0.18). Alone, a write
# is a batch of one. Each returns ``r.i``, the number of its row, first: a row that the
# statement's guard refused returns nothing.


def _pg_rows(columns: str) -> str:
    """``r``: a batch's rows, the objects of ``:rows`` with ``columns`` ("name type,
    ..."), numbered from 1 as ``r.i``."""
    names = ", ".join(column.split()[0] for column in columns.split(", "))
    return (
        "r AS (SELECT * FROM ROWS FROM (jsonb_to_recordset(CAST(:rows AS jsonb)) "
        f"AS ({columns})) WITH ORDINALITY AS r({names}, i))"
    )


_OF_TASKS = ", ".join(f"tasks.{c}" for c in TASK_COLUMN_NAMES)
_TASK_OF_ROW = "tasks.id = r.id"
# ``SQLITE_WHOLE`` on PostgreSQL, for the task updated by a statement's ``u``.
_PG_WHOLE = f", {_ARTIFACTS_OF.format('u.id')}, {_HISTORY_OF.format('u.id', 'NULL')}"
_STATUS_EVENT = (
    "e AS (INSERT INTO events (task_id, seq, kind, final, payload, created_at) "
    "SELECT r.id, u.last_seq, 'status', {final}, jsonb_build_object('taskId', r.id, "
    "'contextId', u.context_id, 'status', r.status), r.{ts} FROM u JOIN r USING (i))"
)
PG_CLAIM_FRESH = (
    f"WITH {_pg_rows('id text, worker text, now float8, expires float8, max_attempts int, status jsonb')}, "  # noqa: E501
    "u AS (UPDATE tasks SET lease_owner = r.worker, lease_expires = r.expires, "
    f"attempts = tasks.attempts + 1, state = '{TaskState.WORKING.value}', "
    "version = tasks.version + 1, status_ts = r.now, status_message = NULL, "
    f"last_seq = tasks.last_seq + 1 FROM r WHERE {_TASK_OF_ROW} "
    f"AND tasks.state = '{TaskState.SUBMITTED.value}' AND tasks.attempts < r.max_attempts "
    "AND (tasks.lease_owner IS NULL OR tasks.lease_expires <= r.now) "
    f"RETURNING r.i, {_OF_TASKS}), "
    f"{_STATUS_EVENT.format(final='false', ts='now')} "
    f"SELECT u.*{_PG_WHOLE} FROM u"
)
_SUBMIT_ROWS = (
    "id text, context_id text, owner text, state text, version int, ts float8, "
    "metadata jsonb, last_seq int, attempts int, lease_owner text, lease_expires float8, "
    "message_id text, role text, body jsonb, payload jsonb"
)


@functools.cache
def pg_submit(started: bool) -> str:
    """New tasks in new contexts, their first messages and first events (and with
    ``started`` the claim's working events)."""
    working = " UNION ALL SELECT id, 2, 'status', false, working, ts FROM r" if started else ""
    return (
        f"WITH {_pg_rows(_SUBMIT_ROWS + (', working jsonb' if started else ''))}, "
        "c AS (INSERT INTO contexts (id, owner, created_at) SELECT context_id, owner, ts FROM r), "
        "t AS (INSERT INTO tasks (id, context_id, owner, state, version, status_ts, created_at, "
        "metadata, last_seq, attempts, lease_owner, lease_expires) SELECT id, context_id, owner, "
        "state, version, ts, ts, metadata, last_seq, attempts, lease_owner, lease_expires "
        "FROM r), "
        "m AS (INSERT INTO messages (owner, message_id, task_id, context_id, role, body, "
        "created_at) SELECT owner, message_id, id, context_id, role, body, ts FROM r), "
        "e AS (INSERT INTO events (task_id, seq, kind, final, payload, created_at) "
        f"SELECT id, 1, 'status', false, payload, ts FROM r{working}) "
        "SELECT i FROM r"
    )


@functools.cache
def pg_set_state(
    states: tuple[str, ...],
    owner: bool,
    lease: bool,
    ends_lease: bool,
    new_turn: bool,
    message: bool,
    whole: bool,
) -> str:
    """``bump`` of ``STATE_SETS`` (and ``LEASE_CLEARED``, ``attempts = 0``) with its
    message and its status event; it returns ``r.i`` and ``last_seq, context_id,
    owner``, or with ``whole`` the task as ``SQLITE_WHOLE`` says."""
    columns = "id text, state text, ts float8, status_message jsonb, final boolean, status jsonb"
    where = f"{_TASK_OF_ROW} AND tasks.state IN ({_states(states)})"
    if owner:
        columns += ", owner text"
        where += " AND tasks.owner = r.owner"
    if lease:
        columns += ", lease_owner text"
        where += " AND tasks.lease_owner = r.lease_owner"
    if message:
        columns += ", message_id text, message_context text, role text, body jsonb"
    sets = [
        "last_seq = tasks.last_seq + 1",
        "state = r.state",
        "version = tasks.version + 1",
        "status_ts = r.ts",
        "status_message = r.status_message",
    ]
    if ends_lease:
        sets += LEASE_CLEARED
    if new_turn:
        sets.append("attempts = 0")
    returned = _OF_TASKS if whole else "tasks.last_seq, tasks.context_id, tasks.owner"
    parts = [
        f"WITH {_pg_rows(columns)}",
        f"u AS (UPDATE tasks SET {', '.join(sets)} FROM r WHERE {where} RETURNING r.i, {returned})",
    ]
    if message:
        parts.append(
            "m AS (INSERT INTO messages (owner, message_id, task_id, context_id, role, body, "
            "created_at) SELECT u.owner, r.message_id, r.id, r.message_context, r.role, r.body, "
            "r.ts FROM u JOIN r USING (i))"
        )
    parts.append(_STATUS_EVENT.format(final="r.final", ts="ts"))
    return ", ".join(parts) + f" SELECT u.*{_PG_WHOLE if whole else ''} FROM u"


EVENT_WRITTEN_AT = (
    "SELECT seq, kind, payload, final FROM events WHERE task_id = :id AND created_at = :ts"
)
