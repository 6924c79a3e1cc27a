"""Deployment modes: start Tether (or the ceiling) the way it runs in production, tear it down.

- ``embedded``: ``tether serve`` on a fresh SQLite file, one process.
- ``postgres``: ``tether serve`` on a fresh PostgreSQL database (created and dropped
  here), local broker, one process.
- ``redis``: PostgreSQL + Redis, ``tether serve --workers 0`` (API) and
  ``tether worker`` processes (TETHER_BROKER_URL=redis://…), on an empty Redis database.
- ``ceiling``: the bare Starlette endpoint of ``tether.bench.ceiling``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tether.bench.procs import Proc, ProcGroup, python_argv, tether_argv

MODES = ("embedded", "postgres", "redis")
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379"


class ModeUnavailable(Exception):
    """This deployment cannot run here (missing service or command); the reason says which."""


class DeployError(Exception):
    """A server did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class DeployOptions:
    concurrency: int = 64
    worker_procs: int = 1
    pg_admin_url: str = DEFAULT_PG_ADMIN
    redis_url: str = DEFAULT_REDIS
    ready_timeout: float = 60.0
    log_level: str = "warning"


@dataclass
class Deployment:
    mode: str
    host: str
    port: int
    group: ProcGroup
    workdir: Path
    notes: list[str] = field(default_factory=list)
    pg_database: str | None = None  # the fresh database's name, on the server of pg_admin
    pg_admin: str | None = None
    redis_url: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def servers(self) -> list[Proc]:
        return list(self.group.procs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeployError(
                f"{proc.role} exited with code {proc.popen.returncode} during start-up:\n"
                + proc.log_tail()
            )
        if _http_ok(url):
            return
        time.sleep(0.1)
    raise DeployError(f"{proc.role} not ready after {timeout:.0f}s:\n" + proc.log_tail())


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["TETHER_API_KEYS"] = ""  # auth off: the load generators send no token
    for key in ("TETHER_DATABASE_URL", "TETHER_BROKER_URL", "TETHER_PUBLIC_URL"):
        env.pop(key, None)
    env.update(extra)
    return env


@functools.cache
def _help(*command: str) -> tuple[int, str]:
    """Exit code and text of ``tether COMMAND --help`` (whether a command/flag exists yet)."""
    try:
        done = subprocess.run(
            tether_argv(*command, "--help"),
            capture_output=True,
            text=True,
            timeout=60,
            env=_child_env(COLUMNS="200", NO_COLOR="1", TERM="dumb"),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, done.stdout + done.stderr


def redis_mode_missing() -> str | None:
    """Why the PostgreSQL + Redis split mode cannot run with this Tether, or None."""
    code, text = _help("worker")
    if code != 0:
        return "`tether worker` does not exist yet (the API/worker split is not merged)"
    code, text = _help("serve")
    if "--workers" not in text:
        return "`tether serve --workers 0` is not supported yet"
    return None


# -- PostgreSQL ---------------------------------------------------------------


def _pg_urls(admin_url: str, name: str) -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    db = admin.set(drivername="postgresql+asyncpg", database=name)
    plain = admin.set(drivername="postgresql")
    return (
        plain.render_as_string(hide_password=False),
        db.render_as_string(hide_password=False),
    )


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(sql, timeout=120)
    finally:
        await conn.close(timeout=10)


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new, empty database for this run (``tether_bench_<hex>``); dropped afterwards."""
    import asyncpg

    name = f"tether_bench_{uuid.uuid4().hex[:10]}"
    admin, url = _pg_urls(admin_url, name)
    try:
        asyncio.run(_pg_admin(admin, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ModeUnavailable(f"PostgreSQL at {admin_url} is not reachable: {exc}") from None
    try:
        yield url
    finally:
        # FORCE: a server killed mid-run may have left connections behind.
        with contextlib.suppress(Exception):
            asyncio.run(_pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- Redis --------------------------------------------------------------------


@contextlib.contextmanager
def fresh_redis(base_url: str) -> Iterator[str]:
    """An empty Redis database (the highest-numbered empty one, so tests that use 0 and
    up are left alone); every key the run created there is deleted afterwards."""
    import redis

    base = base_url.rstrip("/")
    # A database number given in the URL is used as it is.
    numbered = base.count("/") > 2
    candidates = [base] if numbered else [f"{base}/{n}" for n in range(15, 0, -1)]
    chosen: str | None = None
    try:
        for url in candidates:
            client = redis.Redis.from_url(url, socket_timeout=5)
            try:
                if len(candidates) == 1 or client.dbsize() == 0:
                    chosen = url
                    before = set(client.scan_iter(count=1000))
                    break
            finally:
                client.close()
    except (redis.RedisError, OSError) as exc:
        raise ModeUnavailable(f"Redis at {base_url} is not reachable: {exc}") from None
    if chosen is None:
        raise ModeUnavailable(f"Redis at {base_url}: no empty database among 1-15")
    try:
        yield chosen
    finally:
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(chosen, socket_timeout=5)
            try:
                created = [k for k in client.scan_iter(count=1000) if k not in before]
                for i in range(0, len(created), 500):
                    client.unlink(*created[i : i + 500])
            finally:
                client.close()


# -- the services' own processes ----------------------------------------------------


async def service_pids(dep: Deployment) -> dict[str, list[int]]:
    """PostgreSQL backends serving the bench database, and the Redis server process:
    their CPU is the deployment's too (Redis may be shared with other users)."""
    out: dict[str, list[int]] = {}
    if dep.pg_admin and dep.pg_database:
        import asyncpg

        with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
            admin, _ = _pg_urls(dep.pg_admin, dep.pg_database)
            conn = await asyncpg.connect(admin, timeout=5)
            try:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1", dep.pg_database
                )
                out["postgres"] = [int(r["pid"]) for r in rows]
            finally:
                await conn.close(timeout=5)
    if dep.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(dep.redis_url, socket_timeout=5)
        with contextlib.suppress(OSError, aioredis.RedisError):
            info = await client.info("server")
            out["redis"] = [int(info["process_id"])]
        await client.aclose()
    return out


# -- deployments ---------------------------------------------------------------


def _serve(
    group: ProcGroup,
    role: str,
    target: str,
    port: int,
    workdir: Path,
    env: dict[str, str],
    opts: DeployOptions,
    *extra: str,
) -> Proc:
    argv = tether_argv(
        "serve", target, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", opts.log_level, *extra,
    )  # fmt: skip
    return group.start(role, argv, env=env, log_path=workdir / f"{role}.log", cwd=workdir)


def _migrate(db: str, env: dict[str, str], opts: DeployOptions) -> None:
    """Apply the schema first, as a deployment does: the servers then find it at head and
    never load Alembic, so their memory is what serving costs."""
    argv = tether_argv("db", "upgrade", "--db", db)
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=opts.ready_timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError(f"`tether db upgrade` failed: {exc}") from exc
    if done.returncode != 0:
        raise DeployError(f"`tether db upgrade` failed:\n{done.stderr[-2000:]}")


@contextlib.contextmanager
def deploy(mode: str, target: str, opts: DeployOptions) -> Iterator[Deployment]:
    """Start ``target`` (an agent ``MODULE:ATTR``) in ``mode``; everything stops on exit."""
    if mode == "redis" and (why := redis_mode_missing()):
        raise ModeUnavailable(why)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tether-bench-")))
        # Exit order (last in, first out): processes stop, then the database is dropped
        # and the Redis keys deleted (nothing recreates them), then the files go.
        services = stack.enter_context(contextlib.ExitStack())
        group = ProcGroup()
        stack.callback(group.close)
        port = free_port()
        dep = Deployment(mode, "127.0.0.1", port, group, workdir)
        conc = str(opts.concurrency)
        if mode == "ceiling":
            argv = python_argv(
                "-m", "uvicorn", "tether.bench.ceiling:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", opts.log_level, "--no-access-log",
            )  # fmt: skip
            api = group.start("ceiling", argv, env=_child_env(), log_path=workdir / "ceiling.log")
        elif mode == "embedded":
            env = _child_env(TETHER_CONCURRENCY=conc)
            db = str(workdir / "bench.db")
            _migrate(db, env, opts)
            api = _serve(group, "server", target, port, workdir, env, opts, "--db", db)
            dep.notes.append(f"SQLite {db}")
        elif mode == "postgres":
            url = services.enter_context(fresh_postgres(opts.pg_admin_url))
            dep.pg_admin, dep.pg_database = opts.pg_admin_url, url.rsplit("/", 1)[-1]
            env = _child_env(TETHER_CONCURRENCY=conc, TETHER_BROKER_URL="local")
            _migrate(url, env, opts)
            api = _serve(group, "server", target, port, workdir, env, opts, "--db", url)
            dep.notes.append(f"PostgreSQL database {url.rsplit('/', 1)[-1]}, local broker")
        elif mode == "redis":
            url = services.enter_context(fresh_postgres(opts.pg_admin_url))
            broker = services.enter_context(fresh_redis(opts.redis_url))
            dep.pg_admin, dep.pg_database = opts.pg_admin_url, url.rsplit("/", 1)[-1]
            dep.redis_url = broker
            env = _child_env(
                TETHER_CONCURRENCY=conc,
                TETHER_DATABASE_URL=url,
                TETHER_BROKER_URL=broker,
                # Own keys even on a shared Redis database (the database is empty anyway).
                TETHER_REDIS_PREFIX=f"tether-bench-{uuid.uuid4().hex[:8]}",
            )
            _migrate(url, env, opts)
            api = _serve(group, "api", target, port, workdir, env, opts, "--workers", "0")
            wait_ready(api, f"{dep.url}/healthz", opts.ready_timeout)
            _, worker_help = _help("worker")
            for i in range(opts.worker_procs):
                argv = tether_argv("worker", target)
                if "--log-level" in worker_help:
                    argv += ["--log-level", opts.log_level]
                if "--concurrency" in worker_help:
                    argv += ["--concurrency", conc]
                group.start(f"worker{i + 1}", argv, env=env, log_path=workdir / f"worker{i}.log")
            dep.notes.append(
                f"PostgreSQL database {url.rsplit('/', 1)[-1]}, Redis {broker}, "
                f"{opts.worker_procs} worker process(es)"
            )
        else:
            raise ValueError(f"unknown mode {mode!r}")
        wait_ready(api, f"{dep.url}/healthz", opts.ready_timeout)
        for p in group.procs:
            if not p.alive():
                raise DeployError(f"{p.role} exited during start-up:\n{p.log_tail()}")
        yield dep
