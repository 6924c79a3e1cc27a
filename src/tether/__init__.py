"""Tether: a durable A2A server for AI-agent tasks.

Write an agent as an async function, serve it with ``tether serve app:agent``.
"""

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
from tether.runtime.completions import publish_operation_complete
from tether.runtime.context import Context
from tether.runtime.outcome import Outcome
from tether.runtime.waits import OperationFailed, OperationTimedOut
from tether.server.app import create_app

__version__ = "0.1.0"

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
