"""Domain records shared by every layer below the server.

Messages, parts and artifacts are kept as A2A 1.0 ProtoJSON dicts: that is the
canonical shape on disk and on the wire, so nothing is converted twice.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from uuid_utils import uuid7

from tether.core.states import TaskState

JSON = dict[str, Any]

DEFAULT_OWNER = "anonymous"


def new_id() -> str:
    # Time-ordered (UUIDv7): new rows land at the right edge of every index keyed by
    # id, so a commit writes a few pages instead of one random page per index.
    return str(uuid7())


def instance_id() -> str:
    """Names this process among its peers: host, pid and a random part.

    Random, not a prefix of ``new_id()``: ids are time-ordered, so their first
    characters are the same for instances made close together.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def now() -> float:
    return time.time()


def iso(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, as the spec's timestamp rule asks."""
    secs, ms = divmod(round(ts * 1000), 1000)
    return f"{_iso_seconds(secs)}.{ms:03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_seconds(secs: int) -> str:
    # A task's timestamps fall within a few seconds of each other: formatting each
    # second once takes strftime off the hot path.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def text_message(role: str, text: str, **extra: Any) -> JSON:
    msg: JSON = {"messageId": new_id(), "role": role, "parts": [{"text": text}]}
    msg.update({k: v for k, v in extra.items() if v is not None})
    return msg


@dataclass(slots=True)
class TaskRecord:
    id: str
    context_id: str
    owner: str
    state: TaskState
    version: int = 0
    status_message: JSON | None = None
    status_ts: float = field(default_factory=now)
    created_at: float = field(default_factory=now)
    artifacts: list[JSON] = field(default_factory=list)
    history: list[JSON] = field(default_factory=list)
    metadata: JSON | None = None
    last_seq: int = 0
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires: float | None = None


@dataclass(slots=True, frozen=True)
class TaskEvent:
    """One entry of a task's event log; ``seq`` is gap-free from 1 per task."""

    task_id: str
    seq: int
    kind: str  # "status" | "artifact"
    payload: JSON
    final: bool = False
    # The whole task as this event left it, when its writer had it at hand (a worker's
    # final transition): a blocking send answers with it instead of reading the task
    # again. Never on the wire, never in the log; None means "read the store".
    task: TaskRecord | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True, frozen=True)
class TaskPage:
    tasks: list[TaskRecord]
    next_page_token: str
    total_size: int


@dataclass(slots=True, frozen=True)
class Feedback:
    task_id: str
    owner: str
    rating: int
    text: str
    metadata: JSON | None = None
