"""With API keys on, each principal sees only its own tasks; idempotency is per owner."""

from __future__ import annotations

import httpx
import pytest

from .conftest import ServerFactory
from .helpers import HTTP_TIMEOUT, error_code, message, new_id, result, rpc

pytestmark = pytest.mark.timeout(120)


async def test_idempotency_and_visibility_are_per_owner(tether_server: ServerFactory) -> None:
    server = tether_server(env={"TETHER_API_KEYS": "alice-key:alice,bob-key:bob"})
    message_id = new_id()
    params = {"message": message("echo mine", message_id=message_id)}
    async with (
        httpx.AsyncClient(
            timeout=HTTP_TIMEOUT, headers={"Authorization": "Bearer alice-key"}
        ) as alice,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers={"Authorization": "Bearer bob-key"}) as bob,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as nobody,
    ):
        a1 = result(await rpc(alice, server.url, "SendMessage", params))["task"]
        a2 = result(await rpc(alice, server.url, "SendMessage", params))["task"]
        b1 = result(await rpc(bob, server.url, "SendMessage", params))["task"]
        assert a1["id"] == a2["id"]
        assert b1["id"] != a1["id"]  # the same messageId from another owner is a new task

        assert error_code(await rpc(bob, server.url, "GetTask", {"id": a1["id"]})) == -32001
        assert error_code(await rpc(bob, server.url, "CancelTask", {"id": a1["id"]})) == -32001
        listed = result(await rpc(bob, server.url, "ListTasks", {}))
        assert [t["id"] for t in listed["tasks"]] == [b1["id"]]

        response = await nobody.post(
            server.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": a1["id"]}},
            headers={"A2A-Version": "1.0"},
        )
        assert response.status_code == 401
        assert "error" in response.json()
