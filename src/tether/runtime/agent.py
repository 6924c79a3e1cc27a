"""``Agent``: what a user declares, and the handler they register on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Handler = Callable[..., Any]


@dataclass
class Skill:
    id: str
    name: str
    description: str
    tags: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


@dataclass
class Agent:
    """An A2A agent: a name, a description and one handler.

    ``max_attempts`` bounds how often a task is started again after its worker
    died or its handler raised a retryable error; ``timeout`` (seconds) fails a
    handler that runs longer.
    """

    name: str
    description: str
    version: str = "0.1.0"
    skills: list[Skill] = field(default_factory=list)
    input_modes: list[str] = field(default_factory=lambda: ["text/plain"])
    output_modes: list[str] = field(default_factory=lambda: ["text/plain"])
    max_attempts: int = 3
    timeout: float | None = None
    provider: dict[str, str] | None = None
    _handler: Handler | None = field(default=None, repr=False)

    def handler(self, fn: Handler) -> Handler:
        """Decorator: register ``fn(ctx)`` (async, sync or async generator) as the handler."""
        self._handler = fn
        return fn

    @property
    def fn(self) -> Handler:
        if self._handler is None:
            raise RuntimeError(
                f"agent {self.name!r} has no handler: decorate one with @agent.handler"
            )
        return self._handler
