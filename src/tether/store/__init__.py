"""Task storage: the ``TaskStore`` contract and its backends."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from tether.core.errors import InvalidInput
from tether.store.base import Claim, ListQuery, Submitted, TaskStore

N = TypeVar("N", int, float)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Start-up and connection knobs of the SQL backends; the memory store ignores them.

    The pool settings apply to PostgreSQL; SQLite uses ``command_timeout`` as its
    busy timeout and serialises writers in-process, so a pool size means nothing there.
    """

    pool_size: int = 10
    pool_timeout: float = 10.0
    command_timeout: float = 30.0
    run_migrations: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        """``TETHER_DB_POOL_SIZE``, ``TETHER_DB_POOL_TIMEOUT``, ``TETHER_DB_COMMAND_TIMEOUT``
        and ``TETHER_RUN_MIGRATIONS_ON_STARTUP``; unset or empty keeps the default."""
        env = os.environ if env is None else env
        default = cls()
        return cls(
            pool_size=_number(env, "TETHER_DB_POOL_SIZE", int, default.pool_size),
            pool_timeout=_number(env, "TETHER_DB_POOL_TIMEOUT", float, default.pool_timeout),
            command_timeout=_number(
                env, "TETHER_DB_COMMAND_TIMEOUT", float, default.command_timeout
            ),
            run_migrations=_flag(env, "TETHER_RUN_MIGRATIONS_ON_STARTUP", default.run_migrations),
        )


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value <= 0:
        raise InvalidInput(f"{name}={raw!r} must be positive")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidInput(f"{name}={raw!r} is not a boolean (true/false)")


def open_store(
    url: str,
    settings: StoreSettings | None = None,
    *,
    run_migrations: bool | None = None,
) -> TaskStore:
    """``memory://``, a SQLite path or ``sqlite+aiosqlite:///…``, or ``postgresql+asyncpg://…``.

    ``settings`` defaults to ``StoreSettings.from_env()``; ``run_migrations``, when given,
    overrides it (the server's own settings may already have decided).
    """
    if url in ("memory", "memory://"):
        from tether.store.memory import MemoryStore

        return MemoryStore()
    from tether.store.sql import SqlStore

    settings = settings if settings is not None else StoreSettings.from_env()
    if run_migrations is not None:
        settings = replace(settings, run_migrations=run_migrations)
    if "://" not in url:
        url = f"sqlite+aiosqlite:///{url}"
    return SqlStore(
        url,
        pool_size=settings.pool_size,
        pool_timeout=settings.pool_timeout,
        command_timeout=settings.command_timeout,
        run_migrations=settings.run_migrations,
    )


__all__ = ["Claim", "ListQuery", "StoreSettings", "Submitted", "TaskStore", "open_store"]
