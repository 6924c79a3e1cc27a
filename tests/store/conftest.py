"""The ``store`` fixture: the same contract tests against every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from storekit import truncate

from tether.store.base import TaskStore
from tether.store.memory import MemoryStore
from tether.store.sql import SqlStore


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_url: str) -> Iterator[str]:
    """The run's PostgreSQL database with the schema at head (migrated once)."""

    async def migrate() -> None:
        store = SqlStore(postgres_url)
        try:
            await store.start()
        finally:
            await store.close()

    asyncio.run(migrate())
    yield postgres_url


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Resolved in a plain fixture: only the postgres runs need (and start) the database."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}"
    return str(request.getfixturevalue("migrated_postgres_url"))


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[TaskStore]:
    s: TaskStore
    if backend_url == "memory://":
        s = MemoryStore()
    else:
        s = SqlStore(backend_url, run_migrations=backend_url.startswith("sqlite"))
    await s.start()
    if isinstance(s, SqlStore) and s.dialect == "postgresql":
        await truncate(s.engine)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def pg_store(migrated_postgres_url: str) -> AsyncIterator[SqlStore]:
    """A PostgreSQL store on emptied tables, for the PostgreSQL-only tests."""
    s = SqlStore(migrated_postgres_url, run_migrations=False)
    await s.start()
    await truncate(s.engine)
    try:
        yield s
    finally:
        await s.close()
