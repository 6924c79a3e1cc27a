"""Tether: a durable A2A server for AI-agent tasks.

Write an agent as an async function, serve it with ``tether serve app:agent``.
"""

from typing import TYPE_CHECKING, Any

from tether.config import Settings
from tether.core.errors import (
    HandlerError,
    InvalidTransition,
    LeaseLost,
    StoreUnavailable,
    TaskNotFound,
    TetherError,
)
from tether.core.states import TaskState
from tether.runtime.agent import Agent, Skill
from tether.runtime.context import Context
from tether.runtime.outcome import Outcome
from tether.runtime.waits import OperationFailed, OperationTimedOut
from tether.server.app import create_app

if TYPE_CHECKING:
    from tether.runtime.completions import publish_operation_complete

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use: it brings in redis, which an embedded server never needs.
    if name == "publish_operation_complete":
        from tether.runtime.completions import publish_operation_complete

        return publish_operation_complete
    raise AttributeError(f"module 'tether' has no attribute {name!r}")


__all__ = [
    "Agent",
    "Context",
    "HandlerError",
    "InvalidTransition",
    "LeaseLost",
    "OperationFailed",
    "OperationTimedOut",
    "Outcome",
    "Settings",
    "Skill",
    "StoreUnavailable",
    "TaskNotFound",
    "TaskState",
    "TetherError",
    "create_app",
    "publish_operation_complete",
]
