"""``Context``: what a handler sees of its task, and how it reports progress."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from tether.core.errors import InvalidInput
from tether.core.states import TaskState
from tether.core.types import JSON, TaskRecord, new_id
from tether.runtime.outcome import Outcome
from tether.runtime.parts import agent_message, text_of, to_parts
from tether.runtime.waits import OperationHandle, handle, require_secret, wait_for

if TYPE_CHECKING:
    from tether.runtime.worker import Runtime


class ArtifactStream:
    """Chunks of one artifact, each stored and streamed as it is written.

    The first chunk creates the artifact, the next ones carry ``append``; the one
    written with ``last=True`` carries ``lastChunk``. Leaving ``stream_artifact``'s
    block without one sends it: a chunk of one empty text part (an artifact chunk
    needs a part), which adds nothing to a text.
    """

    def __init__(self, ctx: Context, artifact_id: str, name: str | None) -> None:
        self._ctx = ctx
        self.artifact_id = artifact_id
        self._name = name
        self._sent = 0
        self.closed = False

    async def write(self, content: Any, *, last: bool = False) -> None:
        if self.closed:
            raise InvalidInput(f"artifact {self.artifact_id} already had its last chunk")
        await self._ctx.artifact(
            content,
            artifact_id=self.artifact_id,
            name=self._name,
            append=self._sent > 0,
            last_chunk=last,
        )
        self._sent += 1
        self.closed = last

    async def close(self) -> None:
        """Mark the artifact complete, unless nothing was written or it already is."""
        if self._sent and not self.closed:
            await self.write("", last=True)


class Context:
    """One run of a handler on one task.

    ``history`` is this task's conversation so far (user messages and the
    agent's replies); ``message`` and ``text`` are the latest user message.
    ``cancel_requested`` turns true when the task is canceled or this worker
    lost it: async handlers are interrupted, but a sync handler's thread cannot
    be, so a long sync handler should check it and return.
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
        self.cancel_requested = False
        self._operations = 0

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
        """``async with ctx.stream_artifact("report") as out: await out.write("...")``.

        Subscribers see each ``write`` at once; the block's end marks the last chunk
        (not when it raises: the task then fails, and the artifact stays open).
        """
        out = ArtifactStream(self, artifact_id or new_id(), name)
        yield out
        await out.close()

    def input_required(self, content: Any) -> Outcome:
        """``return ctx.input_required("question")``: pause until the user answers."""
        return Outcome(TaskState.INPUT_REQUIRED, self._msg(content))

    def auth_required(self, content: Any) -> Outcome:
        return Outcome(TaskState.AUTH_REQUIRED, self._msg(content))

    def reject(self, content: Any) -> Outcome:
        """``return ctx.reject("why")``: refuse the task."""
        return Outcome(TaskState.REJECTED, self._msg(content))

    def operation(self, name: str | None = None) -> OperationHandle:
        """An operation an external system completes: its id, token and callback URL.

        The id is ``<task id>:<name>``; without ``name``, ``op1``, ``op2``… in the
        order this run asks, so a replayed handler (see ``wait_for``) gets the same
        ids again. Hand ``token`` and ``url`` to the system that will call back
        (``POST /operations/{id}:complete``), or have it call
        ``tether.publish_operation_complete(id, result)``.
        """
        if name is None:
            self._operations += 1
            name = f"op{self._operations}"
        return handle(
            f"{self.task_id}:{name}", secret=self._rt.secret, public_url=self._rt.public_url
        )

    def operation_token(self, operation_id: str) -> str:
        """The token that authorizes completing ``operation_id`` over HTTP (needs TETHER_SECRET)."""
        require_secret(self._rt.secret)
        token = handle(operation_id, secret=self._rt.secret, public_url=None).token
        assert token is not None
        return token

    # A durable deadline, stored with the wait: not an in-process timeout.
    async def wait_for(self, operation_id: str, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait, durably, until ``operation_id`` completes; return its result.

        The task is parked and this worker's slot freed; a completion (from any
        process) queues it again and the handler runs again from the start, on any
        worker, this time getting the stored result here at once. So the code before
        ``wait_for`` runs again on resume and must be safe to repeat. Raises
        ``OperationFailed`` when the operation completed with an error and
        ``OperationTimedOut`` when ``timeout`` seconds (from the first wait) passed
        first; uncaught, either fails the task with its message.
        """
        return await wait_for(self, operation_id, timeout)
