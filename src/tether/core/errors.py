"""Tether's errors: one root, each carrying whether a retry may help.

    TetherError
    ├── TaskNotFound                 the task does not exist or is not the caller's
    ├── InvalidTransition            a compare-and-set lost; carries the current state
    │   └── TaskNotCancelable
    ├── TaskTerminal                 a message was sent to a finished task
    ├── ContextMismatch              contextId differs from the referenced task's
    ├── InvalidInput                 a request or parameter is malformed
    ├── UnsupportedOperation
    ├── LeaseLost                    a worker's lease was taken over: stop writing
    ├── StoreUnavailable             the database cannot be reached (retryable)
    ├── BrokerUnavailable            the queue cannot be reached (retryable)
    └── HandlerError                 raised by agents; ``non_retryable`` decides re-runs

Backend exceptions (SQLAlchemy, asyncpg, redis) are translated into these once,
at the backend's edge; nothing above ``store/`` or ``broker/`` sees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.core.states import TaskState


class TetherError(Exception):
    """Root of every error Tether raises."""

    retryable: bool = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__


class TaskNotFound(TetherError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"Task not found: {task_id}")
        self.task_id = task_id


class InvalidTransition(TetherError):
    def __init__(self, task_id: str, current: TaskState, wanted: TaskState) -> None:
        super().__init__(f"Task {task_id} is {current.value}; cannot become {wanted.value}")
        self.task_id = task_id
        self.current = current
        self.wanted = wanted


class TaskNotCancelable(InvalidTransition):
    pass


class TaskTerminal(TetherError):
    def __init__(self, task_id: str, current: TaskState) -> None:
        super().__init__(f"Task {task_id} is {current.value} and accepts no further messages")
        self.task_id = task_id
        self.current = current


class ContextMismatch(TetherError):
    pass


class InvalidInput(TetherError):
    pass


class UnsupportedOperation(TetherError):
    pass


class LeaseLost(TetherError):
    pass


class StoreUnavailable(TetherError):
    retryable = True


class BrokerUnavailable(TetherError):
    retryable = True


class HandlerError(TetherError):
    """Raise from a handler to fail the task with a clear message.

    ``non_retryable=True`` (the default) fails the task at once; ``False`` lets
    the runtime run the handler again, up to the agent's ``max_attempts``.
    """

    def __init__(self, message: str, *, non_retryable: bool = True) -> None:
        super().__init__(message)
        self.non_retryable = non_retryable
        self.retryable = not non_retryable
