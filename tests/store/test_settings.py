"""Store settings from the environment, and what they change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from storekit import OWNER, PG_ADMIN_URL, S, new_task, truncate

from tether.core.errors import InvalidInput, StoreUnavailable
from tether.store import StoreSettings, open_store
from tether.store.memory import MemoryStore
from tether.store.sql import SqlStore


def test_defaults_without_environment() -> None:
    assert StoreSettings.from_env({}) == StoreSettings()
    assert StoreSettings.from_env({"TETHER_DB_POOL_SIZE": " "}) == StoreSettings()


def test_values_from_environment() -> None:
    settings = StoreSettings.from_env(
        {
            "TETHER_DB_POOL_SIZE": "3",
            "TETHER_DB_POOL_TIMEOUT": "2.5",
            "TETHER_DB_COMMAND_TIMEOUT": "7",
            "TETHER_RUN_MIGRATIONS_ON_STARTUP": "false",
        }
    )
    assert settings == StoreSettings(
        pool_size=3, pool_timeout=2.5, command_timeout=7.0, run_migrations=False
    )
    for word, value in [("0", False), ("off", False), ("True", True), ("yes", True)]:
        env = {"TETHER_RUN_MIGRATIONS_ON_STARTUP": word}
        assert StoreSettings.from_env(env).run_migrations is value


@pytest.mark.parametrize(
    "env",
    [
        {"TETHER_DB_POOL_SIZE": "many"},
        {"TETHER_DB_POOL_SIZE": "0"},
        {"TETHER_DB_POOL_SIZE": "2.5"},
        {"TETHER_DB_POOL_TIMEOUT": "-1"},
        {"TETHER_DB_COMMAND_TIMEOUT": "soon"},
        {"TETHER_RUN_MIGRATIONS_ON_STARTUP": "maybe"},
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match=next(iter(env))):
        StoreSettings.from_env(env)


def test_open_store_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_DB_POOL_SIZE", "3")
    monkeypatch.setenv("TETHER_DB_POOL_TIMEOUT", "4")
    store = open_store("postgresql+asyncpg://postgres@127.0.0.1:5432/unused")
    assert isinstance(store, SqlStore)
    # The connection pool is made on first use; these are what it is made with.
    assert store._pool_size == 3
    assert store._pool_timeout == 4
    assert isinstance(open_store("memory://"), MemoryStore)


async def test_migrations_can_be_left_to_the_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_RUN_MIGRATIONS_ON_STARTUP", "false")
    path = tmp_path / "bare.db"
    store = open_store(str(path))
    await store.start()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get_task(OWNER, "x")
        assert not info.value.retryable  # no table: waiting will not help
    finally:
        await store.close()
    # The same file, migrated on start when the server is told to.
    store = open_store(str(path), run_migrations=True)
    await store.start()
    try:
        await new_task(store)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_command_timeout_gives_store_unavailable(migrated_postgres_url: str) -> None:
    store = open_store(migrated_postgres_url, StoreSettings(command_timeout=0.5))
    assert isinstance(store, SqlStore)
    await store.start()
    await truncate(store.engine)
    task = await new_task(store)
    database = make_url(migrated_postgres_url).database
    same_db = make_url(PG_ADMIN_URL).set(database=database)
    blocker = await asyncpg.connect(same_db.render_as_string(hide_password=False), timeout=10)
    try:
        # Another session holds the task's row lock, so the store's UPDATE must wait.
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task.id)
        async with asyncio.timeout(30):
            with pytest.raises(StoreUnavailable) as info:
                await store.transition(task.id, S.WORKING)
        assert info.value.retryable
        await lock.rollback()
        # The pool recovers: the next call runs normally.
        await store.transition(task.id, S.WORKING)
        assert (await store.get_task(OWNER, task.id)).state is S.WORKING
    finally:
        await blocker.close(timeout=10)
        await store.close()
