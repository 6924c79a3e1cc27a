"""How a handler ends a task other than by returning its answer."""

from __future__ import annotations

from dataclasses import dataclass

from tether.core.states import TaskState
from tether.core.types import JSON


@dataclass(frozen=True, slots=True)
class Outcome:
    """Returned by ``ctx.input_required(...)``, ``ctx.auth_required(...)``, ``ctx.reject(...)``."""

    state: TaskState
    message: JSON
