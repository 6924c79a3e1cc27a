"""The ASGI application: wires store, broker, events, runtime and the bindings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tether.broker.base import Broker
from tether.broker.local import LocalBroker
from tether.config import Settings
from tether.events.base import EventBus
from tether.events.local import LocalEventBus
from tether.runtime.agent import Agent
from tether.runtime.worker import Runtime
from tether.server.card import CardEndpoint, agent_card
from tether.server.jsonrpc import JsonRpcEndpoint
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


def build(agent: Agent, settings: Settings) -> Components:
    store = open_store(settings.database_url)
    broker = LocalBroker()
    bus = LocalEventBus()
    runtime = (
        Runtime(
            agent,
            store,
            broker,
            bus,
            concurrency=settings.workers,
            lease_seconds=settings.lease_seconds,
        )
        if settings.workers > 0
        else None
    )
    service = TaskService(store, broker, bus, blocking_timeout=settings.blocking_timeout)
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
        log.info(
            "tether serving %r on %s (store %s)", agent.name, settings.url, settings.database_url
        )
        try:
            yield
        finally:
            if parts.runtime is not None:
                await parts.runtime.stop(settings.shutdown_grace)
            await parts.broker.close()
            await parts.bus.close()
            await parts.store.close()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/", JsonRpcEndpoint(parts.service, settings.api_keys).handle, methods=["POST"]),
        Route(
            "/.well-known/agent-card.json",
            CardEndpoint(agent_card(agent, settings.url)).handle,
            methods=["GET"],
        ),
        Route("/healthz", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.tether = parts
    return app
