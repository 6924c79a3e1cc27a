"""Fixtures of the streaming tests; the server itself is ``harness.serve`` (one per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from .harness import TIMEOUT


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        yield client
