"""Alembic, driven from code: the server applies migrations at start-up, ``tether db`` on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"

# Any fixed 64-bit key will do; this one spells "tether" in ASCII.
_PG_MIGRATION_LOCK = 0x746574686572


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def _run(engine: AsyncEngine, fn: Any, *args: Any) -> Any:
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # API and worker processes start together and each migrates: one at a time,
            # the later ones then find the schema at head. Released at commit.
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        return await conn.run_sync(lambda sync_conn: fn(config(sync_conn), *args))


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _run(engine, command.downgrade, revision)


async def current(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


def history() -> list[tuple[str, str | None, str]]:
    script = ScriptDirectory.from_config(config())
    return [(r.revision, r.down_revision, r.doc or "") for r in script.walk_revisions()]  # type: ignore[misc]
