"""``Context``: what a handler sees of its task, and how it reports progress."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from tether.core.states import TaskState
from tether.core.types import JSON, TaskRecord, new_id
from tether.runtime.outcome import Outcome
from tether.runtime.parts import agent_message, text_of, to_parts

if TYPE_CHECKING:
    from tether.runtime.worker import Runtime


class ArtifactStream:
    """Chunks of one artifact, sent as they are written (``append`` after the first)."""

    def __init__(self, ctx: Context, artifact_id: str, name: str | None) -> None:
        self._ctx = ctx
        self.artifact_id = artifact_id
        self._name = name
        self._sent = 0

    async def write(self, content: Any, *, last: bool = False) -> None:
        await self._ctx.artifact(
            content,
            artifact_id=self.artifact_id,
            name=self._name,
            append=self._sent > 0,
            last_chunk=last,
        )
        self._sent += 1


class Context:
    """One run of a handler on one task.

    ``history`` is this task's conversation so far (user messages and the
    agent's replies); ``message`` and ``text`` are the latest user message.
    """

    def __init__(self, runtime: Runtime, task: TaskRecord) -> None:
        self._rt = runtime
        self._task = task
        self.task_id = task.id
        self.context_id = task.context_id
        self.owner = task.owner
        self.attempt = task.attempts
        self.history: list[JSON] = task.history
        users = [m for m in task.history if m.get("role") == "ROLE_USER"]
        self.message: JSON = users[-1] if users else {}
        self.metadata: JSON = task.metadata or {}

    @property
    def text(self) -> str:
        return text_of(self.message)

    async def context_history(self) -> list[JSON]:
        """Every message of every task in this task's context, oldest first."""
        return await self._rt.store.context_history(self.owner, self.context_id)

    def _msg(self, content: Any) -> JSON:
        return agent_message(content, self.task_id, self.context_id)

    async def working(self, content: Any) -> None:
        """A status update (state stays working), streamed to subscribers."""
        event = await self._rt.store.update_status(
            self.task_id, self._msg(content), lease_owner=self._rt.worker_id
        )
        await self._rt.bus.publish(event)

    async def artifact(
        self,
        content: Any,
        *,
        name: str | None = None,
        artifact_id: str | None = None,
        description: str | None = None,
        append: bool = False,
        last_chunk: bool = False,
        metadata: JSON | None = None,
    ) -> str:
        """Add an artifact (or a chunk of one, with ``append``); returns its id."""
        art: JSON = {"artifactId": artifact_id or new_id(), "parts": to_parts(content)}
        if name is not None:
            art["name"] = name
        if description is not None:
            art["description"] = description
        if metadata is not None:
            art["metadata"] = metadata
        event = await self._rt.store.add_artifact(
            self.task_id,
            art,
            lease_owner=self._rt.worker_id,
            append=append,
            last_chunk=last_chunk,
        )
        await self._rt.bus.publish(event)
        return str(art["artifactId"])

    @asynccontextmanager
    async def stream_artifact(
        self, name: str | None = None, artifact_id: str | None = None
    ) -> AsyncIterator[ArtifactStream]:
        """``async with ctx.stream_artifact("report") as out: await out.write("...")``."""
        yield ArtifactStream(self, artifact_id or new_id(), name)

    def input_required(self, content: Any) -> Outcome:
        """``return ctx.input_required("question")``: pause until the user answers."""
        return Outcome(TaskState.INPUT_REQUIRED, self._msg(content))

    def auth_required(self, content: Any) -> Outcome:
        return Outcome(TaskState.AUTH_REQUIRED, self._msg(content))

    def reject(self, content: Any) -> Outcome:
        """``return ctx.reject("why")``: refuse the task."""
        return Outcome(TaskState.REJECTED, self._msg(content))
