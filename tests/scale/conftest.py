"""Fixtures of the scale-out tests: the local Redis (own key prefix per test), PostgreSQL.

``TETHER_TEST_REDIS`` overrides the Redis URL. Every test gets a random key prefix
and removes its keys afterwards: other suites share this Redis. A test that
restarts Redis is marked ``redis_restart`` and runs after everything else.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from tether.store.sql import SqlStore

REDIS_URL = os.environ.get("TETHER_TEST_REDIS", "redis://127.0.0.1:6379/0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis_restart: restarts the shared Redis; runs last in the session"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Other suites share this Redis: the test that restarts it must be the last to touch it.
    last = [i for i in items if i.get_closest_marker("redis_restart")]
    if last:
        items[:] = [i for i in items if not i.get_closest_marker("redis_restart")] + last


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures see whether the test failed (the cluster then prints its logs).
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is not None and bool(report.failed)


def redis_ready(url: str = REDIS_URL) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def drop_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not redis_ready():
        pytest.fail(f"Redis at {REDIS_URL} is needed for the scale tests")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"tt{uuid.uuid4().hex[:10]}"
    yield prefix
    drop_prefix(prefix)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def scale_pg_database(postgres_database: Callable[[], str]) -> Callable[[], str]:
    """A fresh, migrated PostgreSQL database per call (``tether_test_<random>``)."""

    def create() -> str:
        url = postgres_database()

        async def migrate() -> None:
            store = SqlStore(url)
            try:
                await store.start()
            finally:
                await store.close()

        asyncio.run(migrate())
        return url

    return create
