"""A2A error codes, and the single mapping from Tether's errors to them."""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.core import errors as e
from tether.core.types import JSON

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
PUSH_NOT_SUPPORTED = -32003
UNSUPPORTED_OPERATION = -32004
CONTENT_TYPE_NOT_SUPPORTED = -32005
VERSION_NOT_SUPPORTED = -32009
# Not an A2A code: the server is up but its database or queue is not (retry later).
UNAVAILABLE = -32050

# code -> (reason for google.rpc.ErrorInfo, HTTP status for the REST binding)
_META: dict[int, tuple[str, int]] = {
    PARSE_ERROR: ("PARSE_ERROR", 400),
    INVALID_REQUEST: ("INVALID_REQUEST", 400),
    METHOD_NOT_FOUND: ("METHOD_NOT_FOUND", 404),
    INVALID_PARAMS: ("INVALID_PARAMS", 400),
    INTERNAL_ERROR: ("INTERNAL_ERROR", 500),
    TASK_NOT_FOUND: ("TASK_NOT_FOUND", 404),
    TASK_NOT_CANCELABLE: ("TASK_NOT_CANCELABLE", 400),
    PUSH_NOT_SUPPORTED: ("PUSH_NOTIFICATION_NOT_SUPPORTED", 400),
    UNSUPPORTED_OPERATION: ("UNSUPPORTED_OPERATION", 400),
    CONTENT_TYPE_NOT_SUPPORTED: ("CONTENT_TYPE_NOT_SUPPORTED", 400),
    VERSION_NOT_SUPPORTED: ("VERSION_NOT_SUPPORTED", 400),
    UNAVAILABLE: ("UNAVAILABLE", 503),
}


@dataclass
class A2AError(Exception):
    """An error as it goes on the wire: one code, one message, optional details."""

    code: int
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return _META.get(self.code, ("UNKNOWN", 500))[0]

    @property
    def http_status(self) -> int:
        return _META.get(self.code, ("UNKNOWN", 500))[1]

    def details(self) -> list[JSON]:
        out: list[JSON] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": self.reason,
                "domain": "a2a-protocol.org",
                "metadata": self.metadata,
            }
        ]
        if self.violations:
            out.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": f, "description": d} for f, d in self.violations],
                }
            )
        return out

    def rpc(self) -> JSON:
        return {"code": self.code, "message": self.message, "data": self.details()}


def invalid_params(message: str, violations: list[tuple[str, str]] | None = None) -> A2AError:
    return A2AError(INVALID_PARAMS, message, violations=violations or [])


def from_exception(exc: BaseException) -> A2AError:
    """Map any exception to its wire error; unknown ones become a bare -32603."""
    if isinstance(exc, A2AError):
        return exc
    if isinstance(exc, e.TaskNotFound):
        return A2AError(TASK_NOT_FOUND, exc.message, {"taskId": exc.task_id})
    if isinstance(exc, e.TaskNotCancelable):
        return A2AError(
            TASK_NOT_CANCELABLE, exc.message, {"taskId": exc.task_id, "state": exc.current.wire}
        )
    if isinstance(exc, e.TaskTerminal):
        return A2AError(
            UNSUPPORTED_OPERATION, exc.message, {"taskId": exc.task_id, "state": exc.current.wire}
        )
    if isinstance(exc, e.InvalidTransition):
        return A2AError(
            UNSUPPORTED_OPERATION, exc.message, {"taskId": exc.task_id, "state": exc.current.wire}
        )
    if isinstance(exc, e.UnsupportedOperation):
        return A2AError(UNSUPPORTED_OPERATION, exc.message)
    if isinstance(exc, e.InvalidInput | e.ContextMismatch):
        return invalid_params(exc.message)
    if isinstance(exc, e.StoreUnavailable | e.BrokerUnavailable):
        return A2AError(
            UNAVAILABLE, f"Temporarily unavailable, retry: {exc.message}", {"retryable": "true"}
        )
    return A2AError(INTERNAL_ERROR, "Internal error")
