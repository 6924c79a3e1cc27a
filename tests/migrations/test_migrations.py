"""Alembic migrations build exactly ``schema.metadata``, and go down and up again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tether.store import migrate, revision
from tether.store.schema import include_object, metadata

HEAD = migrate.history()[0][0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
    # Its own database: these tests drop every table, which the shared one must not see.
    create: Callable[[], str] = request.getfixturevalue("postgres_database")
    return create()


@pytest.fixture
async def engine(empty_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(empty_url)
    try:
        yield eng
    finally:
        await eng.dispose()


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(
        conn,
        opts={"compare_type": True, "include_object": include_object(conn.dialect.name)},
    )
    return list(compare_metadata(ctx, metadata))


async def schema_diff(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_diff)


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def index_names(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda c: sa.inspect(c).get_indexes(table))
    return {str(ix["name"]) for ix in indexes}


def test_history_is_linear() -> None:
    revisions = migrate.history()  # newest first
    assert [r[1] for r in revisions] == [r[0] for r in revisions[1:]] + [None]
    assert {"0001", "0002"} <= {r[0] for r in revisions}


async def test_upgrade_from_empty_matches_metadata(engine: AsyncEngine) -> None:
    assert await migrate.current(engine) is None
    await migrate.upgrade(engine)
    assert await migrate.current(engine) == HEAD
    assert await schema_diff(engine) == []
    assert set(metadata.tables) <= await table_names(engine)


async def test_downgrade_to_base_and_up_again(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    await migrate.downgrade(engine, "base")
    assert await migrate.current(engine) is None
    assert await table_names(engine) <= {"alembic_version"}
    await migrate.upgrade(engine)
    assert await migrate.current(engine) == HEAD
    assert await schema_diff(engine) == []


async def test_step_by_step(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine, "0001")
    assert await migrate.current(engine) == "0001"
    assert "ix_tasks_metadata" not in await index_names(engine, "tasks")
    await migrate.upgrade(engine, "0002")
    assert await migrate.current(engine) == "0002"
    postgres = engine.dialect.name == "postgresql"
    assert ("ix_tasks_metadata" in await index_names(engine, "tasks")) == postgres
    await migrate.downgrade(engine, "0001")
    assert "ix_tasks_metadata" not in await index_names(engine, "tasks")
    await migrate.upgrade(engine)
    assert await schema_diff(engine) == []


async def test_upgrade_twice_is_a_no_op(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    await migrate.upgrade(engine)
    assert await migrate.current(engine) == HEAD


@pytest.mark.postgres
async def test_gin_index_on_postgres(postgres_database: Callable[[], str]) -> None:
    eng = create_async_engine(postgres_database())
    try:
        await migrate.upgrade(eng)
        async with eng.connect() as conn:
            method = (
                await conn.execute(
                    sa.text(
                        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
                        "WHERE c.relname = 'ix_tasks_metadata'"
                    )
                )
            ).scalar_one()
        assert method == "gin"
    finally:
        await eng.dispose()


@pytest.mark.postgres
async def test_concurrent_upgrades_on_postgres(postgres_database: Callable[[], str]) -> None:
    """Processes that start together each migrate; the advisory lock makes them take turns."""
    url = postgres_database()
    engines = [create_async_engine(url) for _ in range(4)]
    try:
        await asyncio.wait_for(asyncio.gather(*(migrate.upgrade(e) for e in engines)), 60)
        assert await migrate.current(engines[0]) == HEAD
        assert await schema_diff(engines[0]) == []
    finally:
        for e in engines:
            await e.dispose()


def test_revision_head_is_alembics_head() -> None:
    # The store finds a database at head without Alembic by comparing with this.
    assert ScriptDirectory.from_config(migrate.config()).get_current_head() == revision.HEAD
