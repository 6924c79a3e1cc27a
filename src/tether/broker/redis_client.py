"""What the Redis backends share: the client, key names, error translation, backoff.

redis-py's errors stop here: every backend turns them into ``BrokerUnavailable``
(through ``unavailable``) or handles them in a loop that keeps retrying; nothing
above ``broker/``, ``events/`` and the completion consumer sees them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from tether.core.errors import BrokerUnavailable

# What a lost or refused connection raises: redis-py's errors and a bare OSError from the socket.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


def connect(url: str, *, read_timeout: float = 10.0) -> aioredis.Redis:
    """A client for ``redis://…``; RESP2 so replies keep one shape across server versions.

    One quick retry reconnects a pooled connection the server dropped (a restart);
    anything longer is the caller's loop's business, with its own backoff.
    """
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        socket_connect_timeout=2.0,
        # Longer than any BLOCK we ask for, so a blocking read never times out by itself.
        socket_timeout=read_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=15,
    )


def database(client: aioredis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs.get("db", 0) or 0)


def is_nogroup(exc: BaseException) -> bool:
    """The stream or its consumer group is gone (a restart without persistence, a FLUSH)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


def is_busygroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSYGROUP")


def reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def unavailable(what: str, exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"Redis unavailable ({what}): {reason(exc)}")


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists.

    From id 0: entries queued after a restart, before any consumer came back to
    create the group, are read too.
    """
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if not is_busygroup(exc):
            raise


Entry = tuple[str, dict[bytes, bytes], int]  # entry id, fields, times delivered


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def autoclaim(
    client: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle: float,
    cursor: str,
    want: int,
) -> tuple[str, list[Entry]]:
    """Take over up to ``want`` entries idle past ``min_idle`` seconds, following XAUTOCLAIM's
    cursor until it wraps to 0-0 (the whole pending list was scanned) or ``want`` are found.

    Returns the cursor to start from next time, and the entries with their delivery
    counts (XAUTOCLAIM counts this delivery; XPENDING tells the total).
    """
    claimed: list[tuple[str, dict[bytes, bytes]]] = []
    while len(claimed) < want:
        reply: Any = await client.xautoclaim(
            stream,
            group,
            consumer,
            min_idle_time=max(0, int(min_idle * 1000)),
            start_id=cursor,
            count=want - len(claimed),
        )
        cursor = text(reply[0])
        # Entries deleted while pending come back empty (and leave the pending list).
        claimed.extend((text(e[0]), e[1]) for e in reply[1] if e is not None and e[1] is not None)
        if cursor == "0-0":
            break
    if not claimed:
        return cursor, []
    async with client.pipeline(transaction=False) as pipe:
        for entry_id, _ in claimed:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1)
        pending: list[Any] = await pipe.execute()
    return cursor, [
        (entry_id, fields, int(rows[0]["times_delivered"]) if rows else 1)
        for (entry_id, fields), rows in zip(claimed, pending, strict=True)
    ]


@dataclass
class Backoff:
    """Jittered exponential backoff for loops that must outlive any outage."""

    first: float = 0.05
    cap: float = 2.0
    _delay: float = 0.0
    _since: float | None = None

    def reset(self) -> float | None:
        """Back to healthy; returns how long the outage lasted, if there was one."""
        since, self._since, self._delay = self._since, None, 0.0
        return None if since is None else time.monotonic() - since

    @property
    def failing(self) -> bool:
        return self._since is not None

    async def wait(self) -> None:
        if self._since is None:
            self._since = time.monotonic()
        self._delay = min(self.cap, max(self.first, self._delay * 2))
        await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))


def log_outage(log: logging.Logger, backoff: Backoff, what: str, exc: BaseException) -> None:
    """One warning when an outage starts, not one per retry."""
    if not backoff.failing:
        log.warning("%s: Redis unavailable, retrying until it is back: %s", what, reason(exc))
    else:
        log.debug("%s: still unavailable: %s", what, reason(exc))


def log_recovery(log: logging.Logger, backoff: Backoff, what: str) -> None:
    lasted = backoff.reset()
    if lasted is not None:
        log.warning("%s: Redis is back after %.1fs", what, lasted)
