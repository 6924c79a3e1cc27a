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

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
