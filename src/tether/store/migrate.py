"""Alembic, driven from code: the server applies migrations at start-up, ``tether db`` on demand.

SQLAlchemy and Alembic are loaded only here (and by ``schema``): the store's own
queries run on the drivers (``sql_exec``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tether.store import sqlite_inline
from tether.store.sql_exec import BadValue, DriverError, sqlite_pragmas

MIGRATIONS = Path(__file__).parent / "migrations"

# Any fixed 64-bit key will do; this one spells "tether" in ASCII.
_PG_MIGRATION_LOCK = 0x746574686572


def async_url(url: str) -> URL:
    """``url`` with the drivers the store runs on, whichever it named (or none: a plain
    ``sqlite:///``, ``postgresql://`` or ``postgres://`` URL is the same database)."""
    made = make_url(url)
    backend = made.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return made.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return made.set(drivername="sqlite+aiosqlite")
    return made


def engine(url: str, command_timeout: float) -> AsyncEngine:
    """A SQLAlchemy engine on the store's database, for migrations and operators' tools."""
    kwargs: dict[str, Any] = {
        "json_serializer": lambda v: orjson.dumps(v).decode(),
        "json_deserializer": orjson.loads,
    }
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        path = target.database or ""
        kwargs["async_creator"] = sqlite_inline.connector(path, command_timeout)
        made = create_async_engine(target, **kwargs)
        busy_ms = int(command_timeout * 1000)
        event.listen(made.sync_engine, "connect", lambda conn, _: sqlite_pragmas(conn, busy_ms))
        return made
    kwargs.update(pool_size=1, connect_args={"command_timeout": command_timeout})
    return create_async_engine(target, **kwargs)


async def upgrade_url(url: str, command_timeout: float) -> None:
    """``upgrade`` to head on a fresh engine; SQLAlchemy's errors as ``DriverError``."""
    made = engine(url, command_timeout)
    try:
        await upgrade(made)
    except sa_exc.DBAPIError as exc:
        cause = exc.orig if exc.orig is not None else exc
        code = getattr(cause, "sqlstate", None)
        code = code if isinstance(code, str) else None
        kind = BadValue if code is not None and code.startswith("22") else DriverError
        raise kind(cause, sqlstate=code, disconnected=exc.connection_invalidated) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise DriverError(exc) from exc
    finally:
        await made.dispose()


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
