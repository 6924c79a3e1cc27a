"""Validation of incoming A2A 1.0 payloads.

Models check shape and required fields; handlers get back plain ProtoJSON
dicts (camelCase, unset fields omitted), the canonical form Tether stores.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from tether.core.types import JSON
from tether.protocol.errors import A2AError, invalid_params


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class Part(_Wire):
    text: str | None = None
    raw: str | None = None  # base64, as ProtoJSON encodes bytes
    url: str | None = None
    data: Any = None
    metadata: dict[str, Any] | None = None
    filename: str | None = None
    media_type: str | None = None

    @model_validator(mode="after")
    def _one_content(self) -> Part:
        present = [k for k in ("text", "raw", "url", "data") if getattr(self, k) is not None]
        if len(present) != 1:
            raise ValueError("a part holds exactly one of text, raw, url, data")
        return self


class Message(_Wire):
    message_id: str = Field(min_length=1, max_length=255)
    context_id: str | None = Field(default=None, min_length=1, max_length=64)
    task_id: str | None = Field(default=None, min_length=1, max_length=64)
    role: Literal["ROLE_USER", "ROLE_AGENT"]
    parts: list[Part] = Field(min_length=1)
    metadata: dict[str, Any] | None = None
    extensions: list[str] | None = None
    reference_task_ids: list[str] | None = None


class SendConfiguration(_Wire):
    accepted_output_modes: list[str] | None = None
    history_length: int | None = Field(default=None, ge=0)
    return_immediately: bool = False


class SendMessageParams(_Wire):
    message: Message
    configuration: SendConfiguration | None = None
    metadata: dict[str, Any] | None = None


class TaskIdParams(_Wire):
    id: str = Field(min_length=1)
    history_length: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None


class ListTasksParams(_Wire):
    context_id: str | None = None
    status: str | None = None
    page_size: int = Field(default=50, ge=1, le=100)
    page_token: str = ""
    history_length: int | None = Field(default=None, ge=0)
    status_timestamp_after: str | None = None
    include_artifacts: bool = False


class FeedbackParams(_Wire):
    task_id: str = Field(min_length=1)
    rating: int = Field(ge=1, le=5)
    feedback: str = Field(max_length=10_000)
    metadata: dict[str, Any] | None = None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], params: Any) -> M:
    if not isinstance(params, dict):
        raise invalid_params("params must be an object")
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        violations = [
            (".".join(str(p) for p in err["loc"]) or "params", err["msg"]) for err in exc.errors()
        ]
        first = violations[0]
        raise invalid_params(f"Invalid parameters: {first[0]}: {first[1]}", violations) from None


def message_dict(message: Message) -> JSON:
    return message.model_dump(by_alias=True, exclude_none=True)


__all__ = [
    "A2AError",
    "FeedbackParams",
    "ListTasksParams",
    "Message",
    "SendMessageParams",
    "TaskIdParams",
    "message_dict",
    "parse",
]
