"""The agent card at ``/.well-known/agent-card.json``."""

from __future__ import annotations

import hashlib

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tether.core.types import JSON
from tether.runtime.agent import Agent


def agent_card(agent: Agent, url: str) -> JSON:
    skills = [
        {
            "id": s.id,
            "name": s.name,
            "description": s.description,
            "tags": s.tags,
            **({"examples": s.examples} if s.examples else {}),
        }
        for s in agent.skills
    ] or [{"id": agent.name, "name": agent.name, "description": agent.description, "tags": []}]
    card: JSON = {
        "name": agent.name,
        "description": agent.description,
        "version": agent.version,
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": url, "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
        ],
        "capabilities": {"streaming": True, "pushNotifications": False, "extendedAgentCard": False},
        "defaultInputModes": agent.input_modes,
        "defaultOutputModes": agent.output_modes,
        "skills": skills,
        # 0.3 clients read these; 1.0 clients ignore them.
        "url": url,
        "preferredTransport": "JSONRPC",
        "protocolVersion": "0.3.0",
    }
    if agent.provider:
        card["provider"] = agent.provider
    return card


class CardEndpoint:
    """Serves the card with ``ETag`` and ``Cache-Control`` (spec 8.6), 304 on a match."""

    def __init__(self, card: JSON, max_age: int = 300) -> None:
        self.body = orjson.dumps(card)
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        self.headers = {"ETag": self.etag, "Cache-Control": f"public, max-age={max_age}"}

    async def handle(self, request: Request) -> Response:
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=self.headers)
        return Response(self.body, media_type="application/json", headers=self.headers)
