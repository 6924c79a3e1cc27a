"""The ASGI application: wires store, broker, events, runtime and the bindings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tether.broker.base import Broker
from tether.config import Settings
from tether.events.base import EventBus
from tether.runtime.agent import Agent
from tether.runtime.process import (
    completer,
    default_worker_id,
    make_runtime,
    open_broker,
    open_bus,
    uses_redis,
)
from tether.runtime.worker import Runtime
from tether.server.card import CardEndpoint, agent_card
from tether.server.jsonrpc import JsonRpcEndpoint
from tether.server.operations import OperationsEndpoint
from tether.server.rest import RestBinding
from tether.server.service import TaskService
from tether.store import TaskStore, open_store

log = logging.getLogger("tether.server")


@dataclass
class Components:
    store: TaskStore
    broker: Broker
    bus: EventBus
    service: TaskService
    runtime: Runtime | None


class TetherApp(Starlette):
    """Starlette, except that ``POST /`` (every JSON-RPC call) goes straight to ``rpc``.

    The JSON-RPC endpoint answers every error itself, so the router and the error
    middlewares have nothing to add there, and they were ~7 % of a blocking send's CPU
    (py-spy, embedded echo). Every other request, and ``POST /`` under a root path,
    takes Starlette's way.
    """

    def __init__(self, rpc: Callable[[Request], Awaitable[Response]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rpc = rpc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] == "POST":
            scope["app"] = self
            response = await self._rpc(Request(scope, receive))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build(agent: Agent, settings: Settings) -> Components:
    """Backends from ``settings.broker_url`` ("local" or redis://…); ``workers`` 0: API only."""
    store = open_store(settings.database_url)
    worker_id = default_worker_id()
    broker = open_broker(settings, worker_id)
    bus = open_bus(settings)
    if settings.workers <= 0 and not uses_redis(settings):
        log.warning(
            "no workers and a local broker: tasks are stored but nothing runs them "
            "(set TETHER_BROKER_URL=redis://… and start `tether worker`)"
        )
    runtime = (
        make_runtime(agent, settings, store, broker, bus, worker_id)
        if settings.workers > 0
        else None
    )
    service = TaskService(
        store,
        broker,
        bus,
        blocking_timeout=settings.blocking_timeout,
        keepalive=settings.sse_keepalive,
        event_retention=settings.event_retention,
        starter=runtime,
    )
    return Components(store, broker, bus, service, runtime)


def create_app(agent: Agent, settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    _ = agent.fn  # fail at start-up, not at the first task, when no handler is registered
    parts = build(agent, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await parts.store.start()
        await parts.bus.start()
        await parts.broker.start()
        if parts.runtime is not None:
            await parts.runtime.start()
        await parts.service.start()
        log.info(
            "tether serving %r on %s (store %s)", agent.name, settings.url, settings.database_url
        )
        try:
            yield
        finally:
            await parts.service.close()
            if parts.runtime is not None:
                await parts.runtime.stop(settings.shutdown_grace)
            await parts.broker.close()
            await parts.bus.close()
            await parts.store.close()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    rpc = JsonRpcEndpoint(parts.service, settings.api_keys).handle
    routes = [
        Route("/", rpc, methods=["POST"]),
        Route(
            "/.well-known/agent-card.json",
            CardEndpoint(agent_card(agent, settings.url)).handle,
            methods=["GET"],
        ),
        Route("/healthz", health, methods=["GET"]),
        Route(
            "/operations/{operation_id}:complete",
            OperationsEndpoint(
                completer(settings, parts.store, parts.broker),
                settings.secret,
                queued=uses_redis(settings),
            ).handle,
            methods=["POST"],
        ),
        *RestBinding(parts.service, settings.api_keys).routes(),
    ]
    app = TetherApp(rpc, routes=routes, lifespan=lifespan)
    app.state.tether = parts
    return app
