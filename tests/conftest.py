"""Suite-wide fixtures: a throw-away PostgreSQL database per test run.

``TETHER_TEST_PG`` overrides the server's admin URL (default: local trust auth).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin_async(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close(timeout=10)


def _admin(sql: str) -> None:
    """Runs on its own thread, so callers inside a running event loop may use it too."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _admin_async(sql)).result(timeout=90)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[Callable[[], str]]:
    """Creates empty ``tether_test_<random>`` databases on demand; drops them all at the end."""
    created: list[str] = []
    base = make_url(PG_ADMIN_URL).set(drivername="postgresql+asyncpg")

    def create() -> str:
        name = f"tether_test_{uuid.uuid4().hex[:12]}"
        try:
            _admin(f'CREATE DATABASE "{name}"')
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is needed for this test: {exc}")
        created.append(name)
        return base.set(database=name).render_as_string(hide_password=False)

    yield create
    for name in created:
        # FORCE: a test that failed half-way may have left a pool behind.
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_database: Callable[[], str]) -> str:
    """``postgresql+asyncpg://…/tether_test_<random>``: empty, shared by the whole run."""
    return postgres_database()
