"""The task lifecycle: A2A's states and the one table of allowed transitions.

Every backend enforces this table with a single compare-and-set
(``... WHERE id = :id AND state IN (:allowed_from)``); nothing else in the
code base decides whether a transition is legal.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    SUBMITTED = "submitted"
    WORKING = "working"
    INPUT_REQUIRED = "input-required"
    AUTH_REQUIRED = "auth-required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def interrupted(self) -> bool:
        return self in INTERRUPTED

    @property
    def wire(self) -> str:
        """The A2A 1.0 ProtoJSON enum name, e.g. ``TASK_STATE_INPUT_REQUIRED``."""
        return "TASK_STATE_" + self.name

    @classmethod
    def from_wire(cls, value: str) -> TaskState:
        """Accept 1.0 enum names and 0.3 kebab-case values alike."""
        if value.startswith("TASK_STATE_"):
            return cls[value.removeprefix("TASK_STATE_")]
        return cls(value)


TERMINAL = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED}
)
INTERRUPTED = frozenset({TaskState.INPUT_REQUIRED, TaskState.AUTH_REQUIRED})
ACTIVE = frozenset({TaskState.SUBMITTED, TaskState.WORKING})

_S = TaskState

# to-state -> the states it may be reached from.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _S.WORKING: frozenset({_S.SUBMITTED, _S.INPUT_REQUIRED, _S.AUTH_REQUIRED}),
    # A follow-up message re-queues an interrupted task.
    _S.SUBMITTED: frozenset({_S.INPUT_REQUIRED, _S.AUTH_REQUIRED}),
    _S.INPUT_REQUIRED: frozenset({_S.WORKING}),
    _S.AUTH_REQUIRED: frozenset({_S.WORKING}),
    _S.COMPLETED: frozenset({_S.WORKING}),
    _S.FAILED: frozenset({_S.SUBMITTED, _S.WORKING}),
    _S.REJECTED: frozenset({_S.SUBMITTED, _S.WORKING}),
    _S.CANCELED: frozenset({_S.SUBMITTED, _S.WORKING, _S.INPUT_REQUIRED, _S.AUTH_REQUIRED}),
}

CANCELABLE = TRANSITIONS[_S.CANCELED]


def allowed_from(to: TaskState) -> frozenset[TaskState]:
    return TRANSITIONS[to]


def can_transition(current: TaskState, to: TaskState) -> bool:
    return current in TRANSITIONS[to]
