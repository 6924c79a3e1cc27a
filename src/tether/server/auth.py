"""Who is calling: the owner every task and context row carries."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from tether.core.types import DEFAULT_OWNER


class Unauthenticated(Exception):
    pass


def principal(conn: HTTPConnection, api_keys: dict[str, str]) -> str:
    """With no keys configured every caller is the default principal."""
    if not api_keys:
        return DEFAULT_OWNER
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else conn.headers.get("x-api-key", "")
    owner = api_keys.get(key)
    if owner is None:
        raise Unauthenticated("a valid bearer token is required")
    return owner
