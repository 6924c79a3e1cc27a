"""Pieces every backend shares: event payloads, cursors, validation of writes."""

from __future__ import annotations

import base64
import binascii

import orjson

from tether.core.errors import InvalidInput
from tether.core.states import TaskState
from tether.core.types import JSON, iso, text_message
from tether.store.base import MAX_OPERATION_ID, MAX_PAGE_SIZE


def status_payload(
    task_id: str, context_id: str, state: TaskState, message: JSON | None, ts: float
) -> JSON:
    return {"taskId": task_id, "contextId": context_id, "status": status(state, message, ts)}


def status(state: TaskState, message: JSON | None, ts: float) -> JSON:
    """A TaskStatus: the ``status`` of a status event's payload."""
    part: JSON = {"state": state.wire, "timestamp": iso(ts)}
    if message is not None:
        part["message"] = message
    return part


def artifact_payload(
    task_id: str, context_id: str, artifact: JSON, append: bool, last_chunk: bool
) -> JSON:
    payload: JSON = {"taskId": task_id, "contextId": context_id, "artifact": artifact}
    if append:
        payload["append"] = True
    if last_chunk:
        payload["lastChunk"] = True
    return payload


def stamp(message: JSON, task_id: str, context_id: str) -> JSON:
    """The stored copy of a message names its task and context."""
    return {**message, "taskId": task_id, "contextId": context_id}


def merge_artifact(existing: JSON | None, chunk: JSON, append: bool) -> JSON:
    if existing is None or not append:
        return chunk
    merged = {**existing, **{k: v for k, v in chunk.items() if k != "parts"}}
    merged["parts"] = [*existing.get("parts", []), *chunk.get("parts", [])]
    return merged


def page_size(requested: int) -> int:
    if requested < 1 or requested > MAX_PAGE_SIZE:
        raise InvalidInput(f"pageSize must be between 1 and {MAX_PAGE_SIZE}")
    return requested


def encode_cursor(status_ts: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([status_ts, task_id])).decode()


def decode_cursor(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        ts, task_id = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        return float(ts), str(task_id)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise InvalidInput("pageToken is not a token this server issued") from exc


def trim_history(history: list[JSON], length: int | None) -> list[JSON]:
    if length is None:
        return history
    if length <= 0:
        return []
    return history[-length:]


def gave_up_message(max_attempts: int) -> JSON:
    return text_message(
        "ROLE_AGENT", f"Gave up after {max_attempts} attempts: the handler never finished"
    )


# Column widths of ``schema``: checked up front so every backend refuses the same
# input the same way, instead of PostgreSQL alone failing on a too-long value.
MAX_ID = 64
MAX_NAME = 255
MAX_ROLE = 16


def check_message(message: JSON) -> None:
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise InvalidInput("message.messageId is required")
    if len(message_id) > MAX_NAME:
        raise InvalidInput(f"message.messageId is longer than {MAX_NAME} characters")
    role = message.get("role", "ROLE_USER")
    if not isinstance(role, str) or len(role) > MAX_ROLE:
        raise InvalidInput("message.role is not a valid role")


def check_submit(owner: str, message: JSON, context_id: str | None) -> None:
    if len(owner) > MAX_NAME:
        raise InvalidInput(f"owner is longer than {MAX_NAME} characters")
    if context_id is not None and (not context_id or len(context_id) > MAX_ID):
        raise InvalidInput(f"contextId must be 1 to {MAX_ID} characters")
    check_message(message)


def check_artifact(artifact: JSON) -> None:
    artifact_id = artifact.get("artifactId")
    if not isinstance(artifact_id, str) or not artifact_id or len(artifact_id) > MAX_NAME:
        raise InvalidInput(f"artifact.artifactId must be 1 to {MAX_NAME} characters")


def check_rating(rating: int) -> None:
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise InvalidInput("rating must be an integer from 1 to 5")


def check_operation_id(operation_id: str) -> None:
    if not isinstance(operation_id, str) or not 0 < len(operation_id) <= MAX_OPERATION_ID:
        raise InvalidInput(f"an operation id must be 1 to {MAX_OPERATION_ID} characters")
