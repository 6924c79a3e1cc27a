"""Settings, from arguments first, then ``TETHER_*`` environment variables, then defaults."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _env(name: str, cast: Callable[[str], T], default: str) -> Any:
    """A field read from ``name`` when a ``Settings`` is made; a bad value names the variable."""

    def read() -> T:
        raw = os.environ.get(name, default)
        try:
            return cast(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None

    return field(default_factory=read)


def _api_keys() -> dict[str, str]:
    """``TETHER_API_KEYS=key1:alice,key2:bob``: bearer token -> principal."""
    out: dict[str, str] = {}
    for item in os.environ.get("TETHER_API_KEYS", "").split(","):
        if item.strip():
            key, _, principal = item.strip().partition(":")
            out[key] = principal or key
    return out


@dataclass
class Settings:
    database_url: str = _env("TETHER_DATABASE_URL", str, "tether.db")
    broker_url: str = _env("TETHER_BROKER_URL", str, "local")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = field(default_factory=lambda: os.environ.get("TETHER_PUBLIC_URL"))
    workers: int = _env("TETHER_CONCURRENCY", int, "64")
    lease_seconds: float = _env("TETHER_LEASE_SECONDS", float, "30")
    blocking_timeout: float = _env("TETHER_BLOCKING_TIMEOUT", float, "300")
    shutdown_grace: float = _env("TETHER_SHUTDOWN_GRACE", float, "10")
    api_keys: dict[str, str] = field(default_factory=_api_keys)
    # Streams: seconds between keep-alive comments on an idle stream; undelivered events a
    # subscriber may hold before it is cut off as too slow; seconds a finished task's event
    # log is kept for Last-Event-ID replay (0: forever). See docs/streaming.md.
    sse_keepalive: float = _env("TETHER_SSE_KEEPALIVE", float, "15")
    sse_buffer: int = _env("TETHER_SSE_BUFFER", int, "1000")
    event_retention: float = _env("TETHER_EVENT_RETENTION", float, "0")
    # Scale-out on Redis (docs/production.md): the key prefix; how many events a task's
    # stream keeps, and for how many seconds after its last one; how often a queue entry
    # (and a completion) may be handed out unacknowledged before it is dead-lettered;
    # seconds a completion may stay unacknowledged before another consumer takes it; the
    # HMAC key of operation completion tokens (the same on API and worker processes).
    redis_prefix: str = _env("TETHER_REDIS_PREFIX", str, "tether")
    events_maxlen: int = _env("TETHER_EVENTS_MAXLEN", int, "1000")
    events_ttl: float = _env("TETHER_EVENTS_TTL", float, "3600")
    max_deliveries: int = _env("TETHER_MAX_DELIVERIES", int, "10")
    completion_max_deliveries: int = _env("TETHER_COMPLETION_MAX_DELIVERIES", int, "5")
    completion_claim_idle: float = _env("TETHER_COMPLETION_CLAIM_IDLE", float, "30")
    secret: str | None = field(default_factory=lambda: os.environ.get("TETHER_SECRET") or None)

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
