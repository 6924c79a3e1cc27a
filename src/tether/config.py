"""Settings, from arguments first, then ``TETHER_*`` environment variables, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


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
    database_url: str = field(
        default_factory=lambda: os.environ.get("TETHER_DATABASE_URL", "tether.db")
    )
    broker_url: str = field(default_factory=lambda: os.environ.get("TETHER_BROKER_URL", "local"))
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = field(default_factory=lambda: os.environ.get("TETHER_PUBLIC_URL"))
    workers: int = field(default_factory=lambda: int(os.environ.get("TETHER_CONCURRENCY", "64")))
    lease_seconds: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_LEASE_SECONDS", "30"))
    )
    blocking_timeout: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_BLOCKING_TIMEOUT", "300"))
    )
    shutdown_grace: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_SHUTDOWN_GRACE", "10"))
    )
    api_keys: dict[str, str] = field(default_factory=_api_keys)
    # Streams: seconds between keep-alive comments on an idle stream; undelivered events a
    # subscriber may hold before it is cut off as too slow; seconds a finished task's event
    # log is kept for Last-Event-ID replay (0: forever). See docs/streaming.md.
    sse_keepalive: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_SSE_KEEPALIVE", "15"))
    )
    sse_buffer: int = field(
        default_factory=lambda: int(os.environ.get("TETHER_SSE_BUFFER", "1000"))
    )
    event_retention: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_EVENT_RETENTION", "0"))
    )
    # Scale-out on Redis (docs/production.md): the key prefix; how many events a task's
    # stream keeps, and for how many seconds after its last one; how often a queue entry
    # (and a completion) may be handed out unacknowledged before it is dead-lettered;
    # seconds a completion may stay unacknowledged before another consumer takes it; the
    # HMAC key of operation completion tokens (the same on API and worker processes).
    redis_prefix: str = field(
        default_factory=lambda: os.environ.get("TETHER_REDIS_PREFIX", "tether")
    )
    events_maxlen: int = field(
        default_factory=lambda: int(os.environ.get("TETHER_EVENTS_MAXLEN", "1000"))
    )
    events_ttl: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_EVENTS_TTL", "3600"))
    )
    max_deliveries: int = field(
        default_factory=lambda: int(os.environ.get("TETHER_MAX_DELIVERIES", "10"))
    )
    completion_max_deliveries: int = field(
        default_factory=lambda: int(os.environ.get("TETHER_COMPLETION_MAX_DELIVERIES", "5"))
    )
    completion_claim_idle: float = field(
        default_factory=lambda: float(os.environ.get("TETHER_COMPLETION_CLAIM_IDLE", "30"))
    )
    secret: str | None = field(default_factory=lambda: os.environ.get("TETHER_SECRET") or None)

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
