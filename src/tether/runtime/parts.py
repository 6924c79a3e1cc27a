"""Turning what a handler returns or emits into A2A parts and messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tether.core.errors import InvalidInput
from tether.core.types import JSON, new_id

_PART_KEYS = ("text", "raw", "url", "data")


def to_parts(value: Any) -> list[JSON]:
    """A string, a part dict, or an iterable of either."""
    if isinstance(value, str):
        return [{"text": value}]
    if isinstance(value, dict):
        if any(k in value for k in _PART_KEYS):
            return [value]
        return [{"data": value}]
    if isinstance(value, Iterable):
        out: list[JSON] = []
        for item in value:
            out.extend(to_parts(item))
        return out
    raise InvalidInput(f"cannot turn {type(value).__name__} into message parts")


def agent_message(value: Any, task_id: str, context_id: str) -> JSON:
    """A handler's answer as an agent message; a full message dict is kept as it is."""
    if isinstance(value, dict) and "parts" in value and "role" in value:
        msg = dict(value)
        msg.setdefault("messageId", new_id())
    else:
        msg = {"messageId": new_id(), "role": "ROLE_AGENT", "parts": to_parts(value)}
    msg["taskId"] = task_id
    msg["contextId"] = context_id
    return msg


def text_of(message: JSON | None) -> str:
    if not message:
        return ""
    return "\n".join(p["text"] for p in message.get("parts", []) if "text" in p)
