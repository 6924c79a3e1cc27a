"""The agent card at /.well-known/agent-card.json: 1.0 required fields, caching headers."""

from __future__ import annotations

import httpx
import pytest
from a2a.client import A2ACardResolver

from tether import Agent, Settings, create_app

from .helpers import HTTP_TIMEOUT
from .server import TetherServer

pytestmark = pytest.mark.timeout(60)

CARD = "/.well-known/agent-card.json"


async def test_card_has_the_required_fields(server: TetherServer) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        response = await http.get(server.url + CARD)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    card = response.json()
    # AgentCard's REQUIRED fields in a2a.proto.
    for key in (
        "name",
        "description",
        "supportedInterfaces",
        "version",
        "capabilities",
        "defaultInputModes",
        "defaultOutputModes",
        "skills",
    ):
        assert key in card, key
    assert card["name"] == "e2e"
    assert card["skills"], "at least one skill"
    for skill in card["skills"]:
        assert {"id", "name", "description", "tags"} <= skill.keys()
    bindings = {(i["protocolBinding"], i["protocolVersion"]) for i in card["supportedInterfaces"]}
    assert ("JSONRPC", "1.0") in bindings
    for interface in card["supportedInterfaces"]:
        assert interface["url"] == server.url
    assert card["capabilities"]["pushNotifications"] is False


async def test_the_sdk_resolves_the_card(server: TetherServer) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        card = await A2ACardResolver(http, server.url).get_agent_card()
    assert card.name == "e2e"
    assert any(i.protocol_binding == "JSONRPC" for i in card.supported_interfaces)


async def test_card_caching_headers_and_conditional_get(server: TetherServer) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        first = await http.get(server.url + CARD)
        etag = first.headers["etag"]
        cache_control = first.headers["cache-control"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
        assert "max-age=" in cache_control
        assert int(cache_control.split("max-age=")[1].split(",")[0]) > 0

        # Same card, same tag.
        second = await http.get(server.url + CARD)
        assert second.headers["etag"] == etag and second.content == first.content

        for if_none_match in (etag, f"W/{etag}", f'"something-else", {etag}', "*"):
            cached = await http.get(server.url + CARD, headers={"If-None-Match": if_none_match})
            assert cached.status_code == 304, if_none_match
            assert cached.content == b""
            assert cached.headers["etag"] == etag
            assert "max-age=" in cached.headers["cache-control"]

        stale = await http.get(server.url + CARD, headers={"If-None-Match": '"stale"'})
        assert stale.status_code == 200
        assert stale.json() == first.json()


async def test_a_server_bound_to_every_interface_names_a_reachable_url() -> None:
    """``--host 0.0.0.0`` without TETHER_PUBLIC_URL: the card names the address the client used.

    In process, through ASGI (the card needs no running store): the tests bind nothing but
    127.0.0.1, and this is about the bind address.
    """
    agent = Agent(name="wildcard", description="bound to every interface")
    agent.handler(lambda ctx: "unused")
    settings = Settings(database_url="memory://", host="0.0.0.0", port=8123, workers=0)
    settings.public_url = None
    app = create_app(agent, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, timeout=HTTP_TIMEOUT) as http:
        for base in ("http://10.1.2.3:8123", "http://agent.example:8123"):
            response = await http.get(base + CARD)
            card = response.json()
            assert card["url"] == base
            assert {i["url"] for i in card["supportedInterfaces"]} == {base}
            etag = response.headers["etag"]
            cached = await http.get(base + CARD, headers={"If-None-Match": etag})
            assert cached.status_code == 304
        # A public URL, when set, is what every client is told.
        settings.public_url = "https://agents.example/echo"
        fixed = create_app(agent, settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fixed), timeout=HTTP_TIMEOUT
    ) as http:
        card = (await http.get("http://10.1.2.3:8123" + CARD)).json()
    assert card["url"] == "https://agents.example/echo"
