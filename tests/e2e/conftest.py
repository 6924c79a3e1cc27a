"""End-to-end fixtures: ``tether serve`` as a real subprocess on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .server import REPO, TetherServer

ServerFactory = Callable[..., TetherServer]


def _factory(base: Path, started: list[TetherServer]) -> ServerFactory:
    def make(
        target: str = "tests.e2e.agents:agent",
        *,
        args: list[str] | None = None,
        db: Path | bool | None = True,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> TetherServer:
        n = len(started)
        db_path = base / f"tether-{n}.db" if db is True else (db or None)
        server = TetherServer(
            target,
            db=db_path if isinstance(db_path, Path) else None,
            marks=base / f"marks-{n}",
            log=base / f"server-{n}.log",
            args=args,
            cwd=cwd,
            env=env,
        )
        started.append(server)
        return server.start() if start else server

    return make


@pytest.fixture
def tether_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts ``tether serve`` processes for one test; stops them all afterwards."""
    started: list[TetherServer] = []
    yield _factory(tmp_path, started)
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    """The ``e2e`` agent on its own SQLite file, shared by every test that needs nothing else."""
    started: list[TetherServer] = []
    yield _factory(tmp_path_factory.mktemp("e2e-shared"), started)()
    for s in started:
        s.stop()
