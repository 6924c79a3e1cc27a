"""``tether serve MODULE:ATTR``: how the agent is found, and where the database goes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tether.store import revision

from .conftest import ServerFactory
from .helpers import HTTP_TIMEOUT, send, text_of
from .server import REPO, TETHER, free_port

pytestmark = pytest.mark.timeout(180)

AGENTS = REPO / "tests" / "e2e" / "agents.py"


async def _works(url: str) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, url, "echo via the cli")
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert text_of(task["status"]["message"]) == "echo: via the cli"


async def test_module_on_pythonpath_and_default_database(
    tether_server: ServerFactory, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    server = tether_server(
        "tests.e2e.agents:agent",
        db=False,
        cwd=workdir,
        env={"PYTHONPATH": pythonpath},
        args=["--host", "127.0.0.1", "--concurrency", "4"],
    )
    await _works(server.url)
    # No --db: ./tether.db in the working directory.
    assert (workdir / "tether.db").is_file()


async def test_module_in_the_working_directory(
    tether_server: ServerFactory, tmp_path: Path
) -> None:
    shutil.copy(AGENTS, tmp_path / "myapp.py")
    server = tether_server("myapp:agent", cwd=tmp_path)
    await _works(server.url)


@pytest.mark.parametrize("filename", ["app.py", "types.py", "logging.py"])
async def test_path_to_a_python_file(
    tether_server: ServerFactory, tmp_path: Path, filename: str
) -> None:
    # types.py, logging.py: a file named like a module the server uses must not replace it.
    app_dir = tmp_path / "apps"
    app_dir.mkdir()
    shutil.copy(AGENTS, app_dir / filename)
    relative = tether_server(f"apps/{filename}:agent", cwd=tmp_path)
    await _works(relative.url)
    absolute = tether_server(f"{app_dir / filename}:agent", cwd=REPO)
    await _works(absolute.url)


@pytest.mark.parametrize(
    ("target", "complaint"),
    [
        ("no_such_module_for_tether:agent", "cannot import"),
        ("tests.e2e.agents:MARKS", "is not a tether.Agent"),
        ("tests.e2e.agents:nothing_here", "is not a tether.Agent"),
        ("missing/app.py:agent", "no such file"),
    ],
)
def test_bad_target_is_a_clear_usage_error(target: str, complaint: str) -> None:
    done = subprocess.run(
        [str(TETHER), "serve", target, "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2, done
    # Rich draws the message in a box, wrapped: compare the words only.
    output = " ".join((done.stdout + done.stderr).replace("│", " ").split())
    assert complaint in output, output
    assert "Traceback" not in output


async def test_tasks_ls_reads_the_store_of_a_running_server(
    tether_server: ServerFactory,
) -> None:
    server = tether_server("tests.e2e.agents:agent")
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, "echo listed")
    assert server.db is not None
    done = await asyncio.to_thread(
        subprocess.run,
        [str(TETHER), "tasks", "ls", "--db", str(server.db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert task["id"] in done.stdout
    assert "1 task(s)" in done.stdout


def _tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TETHER), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.postgres
def test_db_commands_take_every_form_of_a_database_url(
    postgres_database: Callable[[], str], tmp_path: Path
) -> None:
    # The same database whether the URL names the driver or not.
    url = postgres_database()
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    upgraded = _tether("db", "upgrade", "--db", plain)
    assert upgraded.returncode == 0, upgraded
    for form in (url, plain, url.replace("postgresql+asyncpg://", "postgres://")):
        current = _tether("db", "current", "--db", form)
        assert current.returncode == 0, current
        assert current.stdout.strip() == revision.HEAD
    sqlite = _tether("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'plain.db'}")
    assert sqlite.returncode == 0, sqlite
    assert (tmp_path / "plain.db").is_file()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("db", "upgrade", "--db", "mysql://x@127.0.0.1/y"), "not a sqlite:/// or postgresql://"),
        (("db", "current", "--db", "postgresql://postgres@127.0.0.1:1/nope"), "127.0.0.1"),
    ],
)
def test_db_command_failures_are_one_line(args: tuple[str, ...], complaint: str) -> None:
    done = _tether(*args)
    assert done.returncode == 2, done
    output = " ".join((done.stdout + done.stderr).split())
    assert output.startswith(f"tether {args[0]} {args[1]}: ") and complaint in output, output
    assert "Traceback" not in output
