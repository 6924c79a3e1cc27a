"""The agent card at ``/.well-known/agent-card.json``."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

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


# Addresses a server binds to but no client can be sent to.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
# Cards kept for the addresses clients used to reach a wildcard-bound server.
_MAX_BASES = 64


class _Rendered:
    def __init__(self, card: JSON, max_age: int) -> None:
        self.body = orjson.dumps(card)
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        self.headers = {"ETag": self.etag, "Cache-Control": f"public, max-age={max_age}"}

    def matches(self, header: str | None) -> bool:
        """RFC 9110 13.1.2: a list of tags or ``*``, compared weakly (a ``W/`` prefix matches)."""
        if not header:
            return False
        tags = [t.strip().removeprefix("W/") for t in header.split(",")]
        return "*" in tags or self.etag in tags


class CardEndpoint:
    """Serves the card with ``ETag`` and ``Cache-Control`` (spec 8.6), 304 on a match.

    A server bound to every interface (``--host 0.0.0.0``) with no public URL
    set would send clients to 0.0.0.0; its card names the address the client
    reached it by instead.
    """

    def __init__(self, card: JSON, max_age: int = 300) -> None:
        self._card = card
        self._max_age = max_age
        url = urlsplit(str(card.get("url", "")))
        self._path = url.path
        self._fixed = None if url.hostname in _WILDCARD_HOSTS else _Rendered(card, max_age)
        self._by_base: dict[str, _Rendered] = {}

    async def handle(self, request: Request) -> Response:
        rendered = self._fixed or self._for(request)
        if rendered.matches(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=rendered.headers)
        return Response(rendered.body, media_type="application/json", headers=rendered.headers)

    def _for(self, request: Request) -> _Rendered:
        base = f"{request.url.scheme}://{request.url.netloc}"
        rendered = self._by_base.get(base)
        if rendered is None:
            if len(self._by_base) >= _MAX_BASES:
                self._by_base.clear()  # the Host header is the client's: keep this bounded
            url, bound = base + self._path, self._card.get("url")
            card = {
                **self._card,
                "url": url,
                "supportedInterfaces": [
                    {**i, "url": url} if i.get("url") == bound else i
                    for i in self._card.get("supportedInterfaces", [])
                ],
            }
            rendered = self._by_base[base] = _Rendered(card, self._max_age)
        return rendered
