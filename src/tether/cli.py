"""``tether``: serve an agent, manage the database, look at tasks."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvloop
from rich.console import Console
from rich.table import Table

from tether.bench.cli import bench_app
from tether.config import Settings
from tether.runtime.agent import Agent

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations (Alembic).")
tasks_app = typer.Typer(no_args_is_help=True, help="Inspect and cancel tasks.")
app.add_typer(db_app, name="db")
app.add_typer(tasks_app, name="tasks")
app.add_typer(bench_app, name="bench")
console = Console()
T = TypeVar("T")

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="SQLite path or database URL [env TETHER_DATABASE_URL; ./tether.db]"),
]


def load_agent(target: str) -> Agent:
    """``MODULE:ATTR`` where MODULE is importable (cwd is searched) or a ``.py`` path."""
    module_ref, _, attr = target.partition(":")
    attr = attr or "agent"
    if module_ref.endswith(".py") or os.sep in module_ref:
        path = Path(module_ref).resolve()
        if not path.exists():
            raise typer.BadParameter(f"no such file: {path}")
        # A file named like a module already loaded (json.py, typing.py) must not
        # replace that module for everything else in the process.
        name = path.stem if path.stem not in sys.modules else f"_tether_app_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise typer.BadParameter(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_ref)
        except ModuleNotFoundError as exc:
            raise typer.BadParameter(f"cannot import {module_ref!r}: {exc}") from None
    agent = getattr(module, attr, None)
    if not isinstance(agent, Agent):
        raise typer.BadParameter(f"{target}: {attr!r} is not a tether.Agent")
    return agent


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _settings(db: str | None, **overrides: Any) -> Settings:
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # a malformed TETHER_* variable: say which, no traceback
        raise typer.BadParameter(str(exc)) from None
    if db is not None:
        settings.database_url = db
    return settings


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="MODULE:ATTR or path/to/file.py:ATTR")],
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    db: DbOption = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Tasks run at once by this process [env TETHER_CONCURRENCY; 64]"),
    ] = None,
    lease_seconds: Annotated[
        float | None,
        typer.Option(help="Worker lease on a running task [env TETHER_LEASE_SECONDS; 30]"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="In-process worker slots (as --concurrency); 0 serves the API only, "
            "for `tether worker` processes to run the tasks"
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="'local' or redis://host:port/db [env TETHER_BROKER_URL; local]"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve an agent over A2A (JSON-RPC and REST) with its workers, in one process."""
    import uvicorn

    from tether.runtime.process import tune_gc
    from tether.server.app import create_app
    from tether.server.transport import HttpProtocol

    _configure_logging(log_level)
    agent = load_agent(target)
    settings = _settings(
        db,
        host=host,
        port=port,
        workers=workers if workers is not None else concurrency,
        lease_seconds=lease_seconds,
        broker_url=broker,
    )
    asgi = create_app(agent, settings)
    tune_gc()
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=HttpProtocol,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="MODULE:ATTR or path/to/file.py:ATTR")],
    concurrency: Annotated[
        int | None,
        typer.Option(help="Tasks run at once by this process [env TETHER_CONCURRENCY; 64]"),
    ] = None,
    db: DbOption = None,
    broker: Annotated[
        str | None,
        typer.Option(help="redis://host:port/db [env TETHER_BROKER_URL]"),
    ] = None,
    lease_seconds: Annotated[
        float | None,
        typer.Option(help="Worker lease on a running task [env TETHER_LEASE_SECONDS; 30]"),
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            help="On SIGTERM, seconds running tasks get to finish before they are handed "
            "back [env TETHER_SHUTDOWN_GRACE; 10]"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run an agent's tasks only, taking them from Redis; start as many as you need."""
    from tether.core.errors import TetherError
    from tether.runtime.process import run_worker, tune_gc

    _configure_logging(log_level)
    agent = load_agent(target)
    settings = _settings(
        db,
        workers=concurrency,
        lease_seconds=lease_seconds,
        broker_url=broker,
        shutdown_grace=shutdown_grace,
    )
    tune_gc()
    try:
        # uvloop, as `serve` gets through uvicorn: its socket writes cost a fraction of
        # the default loop's, and a worker is mostly socket writes.
        uvloop.run(run_worker(agent, settings))
    except TetherError as exc:
        console.print(f"[red]tether worker: {exc.message}[/red]")
        raise typer.Exit(2) from None


def _engine(db: str | None) -> Any:
    from tether.store import open_store

    store = open_store(_settings(db).database_url)
    return store


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", db: DbOption = None) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from tether.store.migrate import upgrade

    _run("db upgrade", _with_engine(db, lambda e: upgrade(e, revision)))
    console.print(f"upgraded to {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str, db: DbOption = None) -> None:
    """Revert migrations down to REVISION (``base`` empties the schema)."""
    from tether.store.migrate import downgrade

    _run("db downgrade", _with_engine(db, lambda e: downgrade(e, revision)))
    console.print(f"downgraded to {revision}")


@db_app.command("current")
def db_current(db: DbOption = None) -> None:
    """Print the schema revision the database is at."""
    from tether.store.migrate import current

    rev = _run("db current", _with_engine(db, current))
    console.print(rev or "(empty: no migration applied)")


@db_app.command("history")
def db_history() -> None:
    """List the migrations, newest first."""
    from tether.store.migrate import history

    for rev, down, doc in history():
        console.print(f"{down or 'base'} -> {rev}: {doc.splitlines()[0] if doc else ''}")


def _run(command: str, work: Coroutine[Any, Any, T]) -> T:
    """``work`` to its end; a failure the user can act on (a bad URL, a database that is
    down or refuses) is one line and exit status 2, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from tether.core.errors import TetherError

    try:
        return asyncio.run(work)
    except TetherError as exc:
        message = exc.message
    except SQLAlchemyError as exc:  # from a migration, which runs on SQLAlchemy
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    except OSError as exc:
        message = str(exc) or type(exc).__name__
    console.print(f"[red]tether {command}: {message}[/red]")
    raise typer.Exit(2)


async def _with_engine(db: str | None, fn: Any) -> Any:
    from tether.store.sql import SqlStore

    store = _engine(db)
    if not isinstance(store, SqlStore):
        raise typer.BadParameter("migrations apply to SQLite and PostgreSQL stores only")
    try:
        return await fn(store.engine)
    finally:
        await store.engine.dispose()


@tasks_app.command("ls")
def tasks_ls(
    db: DbOption = None,
    owner: str = "anonymous",
    state: str | None = None,
    limit: int = 20,
) -> None:
    """List the most recently updated tasks."""
    from tether.core.states import TaskState
    from tether.core.types import iso
    from tether.store.base import ListQuery

    async def run() -> None:
        store = _engine(db)
        try:
            page = await store.list_tasks(
                ListQuery(
                    owner=owner,
                    state=TaskState.from_wire(state) if state else None,
                    page_size=limit,
                )
            )
        finally:
            await store.close()
        table = Table("id", "context", "state", "updated")
        for t in page.tasks:
            table.add_row(t.id, t.context_id, t.state.value, iso(t.status_ts))
        console.print(table)
        console.print(f"{page.total_size} task(s)")

    _run("tasks ls", run())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
