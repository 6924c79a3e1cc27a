"""Task storage: the ``TaskStore`` contract and its backends."""

from __future__ import annotations

from tether.store.base import Claim, ListQuery, Submitted, TaskStore


def open_store(url: str) -> TaskStore:
    """``memory://``, a SQLite path or ``sqlite+aiosqlite:///…``, or ``postgresql+asyncpg://…``."""
    if url in ("memory", "memory://"):
        from tether.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("postgresql"):
        from tether.store.sql import SqlStore

        return SqlStore(url)
    from tether.store.sql import SqlStore

    if "://" not in url:
        url = f"sqlite+aiosqlite:///{url}"
    return SqlStore(url)


__all__ = ["Claim", "ListQuery", "Submitted", "TaskStore", "open_store"]
