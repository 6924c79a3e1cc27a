"""Durable waits: ``await ctx.wait_for(operation_id, timeout=…)``.

A handler that waits for an external operation does not hold a worker slot
while it waits. ``wait_for`` asks the store to park the task: the task row's
lease passes from this worker to the wait (until the deadline), and the
handler is unwound with ``Parked``, which the runtime takes as "nothing more to
do here". A completion (``publish_operation_complete`` or the HTTP callback)
stores the outcome and releases the task, which is queued again; the handler
then runs again from the top, on whichever worker claims it, and this time
``wait_for`` returns the stored result at once (or raises ``OperationFailed`` /
``OperationTimedOut``).

Replay semantics: everything the handler does before ``wait_for`` runs again on
resume, status updates and artifacts included, so it must be idempotent (or
cheap and harmless to repeat). Keep the work before a wait short, give each
operation an id derived from the task (``ctx.operation()`` does), and do the
expensive or one-off work after the wait, or in the external system itself.
A handler that waits several times replays each earlier wait instantly, since
their results are stored. ``Parked`` derives from ``BaseException`` so that an
``except Exception`` in the handler cannot swallow it; a bare ``except:`` would.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from tether.core.errors import HandlerError, UnsupportedOperation
from tether.core.types import now
from tether.store.base import OperationState
from tether.store.common import check_operation_id

if TYPE_CHECKING:
    from tether.runtime.context import Context


class Parked(BaseException):
    """The task now waits for ``operation_id``; its handler stops here, to run again later."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(operation_id)
        self.operation_id = operation_id


class OperationFailed(HandlerError):
    """The operation completed with an error; uncaught, it fails the task with that message."""

    def __init__(self, operation_id: str, error: str) -> None:
        super().__init__(f"Operation {operation_id} failed: {error}")
        self.operation_id = operation_id
        self.error = error


class OperationTimedOut(HandlerError):
    """No completion came before the deadline; uncaught, it fails the task."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(f"Operation {operation_id} timed out")
        self.operation_id = operation_id


@dataclass(frozen=True, slots=True)
class OperationHandle:
    """What to hand an external system so it can complete an operation.

    ``token`` authorizes ``POST {url}`` (header ``X-Tether-Token``, or ``?token=``);
    ``url`` is set when the worker knows the API's public address (TETHER_PUBLIC_URL).
    """

    id: str
    token: str | None
    url: str | None


def sign(secret: str, operation_id: str) -> str:
    return hmac.new(
        secret.encode(), b"tether-operation:" + operation_id.encode(), hashlib.sha256
    ).hexdigest()


def verify(secret: str | None, operation_id: str, token: str | None) -> bool:
    if not secret or not token:
        return False
    return hmac.compare_digest(sign(secret, operation_id).encode(), token.encode())


def handle(operation_id: str, *, secret: str | None, public_url: str | None) -> OperationHandle:
    check_operation_id(operation_id)
    token = sign(secret, operation_id) if secret else None
    url = None
    if public_url and token:
        url = f"{public_url.rstrip('/')}/operations/{quote(operation_id, safe='')}:complete"
    return OperationHandle(operation_id, token, url)


def require_secret(secret: str | None) -> str:
    if not secret:
        raise UnsupportedOperation(
            "completion tokens need TETHER_SECRET (the same value on the API and the workers)"
        )
    return secret


# The timeout is a durable deadline stored with the wait, not an in-process one.
async def wait_for(ctx: Context, operation_id: str, timeout: float | None) -> Any:  # noqa: ASYNC109
    """The result of ``operation_id``, once completed; parks the task until then."""
    rt = ctx._rt
    deadline = None if timeout is None else now() + max(0.0, timeout)
    rt.parking.add(ctx.task_id)
    try:
        op = await rt.store.wait_operation(
            ctx.task_id, operation_id, lease_owner=rt.worker_id, deadline=deadline
        )
    except BaseException:
        rt.parking.discard(ctx.task_id)
        raise
    if op.state is not OperationState.PENDING:
        rt.parking.discard(ctx.task_id)
    if op.state is OperationState.COMPLETED:
        return op.result
    if op.state is OperationState.FAILED:
        raise OperationFailed(operation_id, op.error or "failed")
    if op.state is OperationState.TIMED_OUT:
        raise OperationTimedOut(operation_id)
    raise Parked(operation_id)
