"""What the Redis backends share: the client, key names, error translation, backoff,
and ``Link``, the lean connection the hot paths use.

redis-py's errors stop here: every backend turns them into ``BrokerUnavailable``
(through ``unavailable``) or handles them in a loop that keeps retrying; nothing
above ``broker/``, ``events/`` and the completion consumer sees them.

Why ``Link`` and not redis-py for the per-task commands: redis-py's asyncio client
costs about 60-100 us of CPU per awaited command (pool checkout, a timeout context
per read, retry wrappers), and a task takes several. A ``Link`` is one connection
whose commands are pipelined on their own: every command issued during one turn of
the event loop goes out in one write, replies are parsed by hiredis as they arrive
and matched to their callers in order, so concurrent enqueues, acks and publishes
share round trips and system calls. redis-py stays for the rare commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


# -- Link: one pipelined connection of our own -------------------------------------------

Arg = str | bytes | int | float
Reply = Any  # what hiredis parses: bytes, int, None, a list of those, or a ResponseError


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, taken from a redis-py client (so every URL form it
    accepts, TLS, unix sockets and credentials included, works here too)."""

    host: str | None
    port: int
    path: str | None
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None
    username: str | None
    password: str | None
    credential_provider: Any
    db: int
    connect_timeout: float
    read_timeout: float
    keepalive: bool

    @classmethod
    def of(cls, client: aioredis.Redis) -> Endpoint:
        pool = client.connection_pool
        kw = pool.connection_kwargs
        ctx: ssl.SSLContext | None = None
        if issubclass(pool.connection_class, SSLConnection):
            # redis-py builds the TLS context from the URL's ssl_* options: the same one.
            ctx = pool.connection_class(**kw).ssl_context.get()
        host = kw.get("host")
        return cls(
            host=None if kw.get("path") else (host or "localhost"),
            port=int(kw.get("port") or 6379),
            path=kw.get("path"),
            ssl_context=ctx,
            server_hostname=host if ctx is not None else None,
            username=kw.get("username"),
            password=kw.get("password"),
            credential_provider=kw.get("credential_provider"),
            db=int(kw.get("db") or 0),
            connect_timeout=float(kw.get("socket_connect_timeout") or 2.0),
            read_timeout=float(kw.get("socket_timeout") or 10.0),
            keepalive=bool(kw.get("socket_keepalive", True)),
        )

    def describe(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    async def credentials(self) -> tuple[str | None, str | None]:
        if self.credential_provider is not None:
            got = await self.credential_provider.get_credentials_async()
            return (None, got[0]) if len(got) == 1 else (got[0], got[1])
        return self.username, self.password


def pack(command: Sequence[Arg]) -> bytes:
    """One command in RESP, packed by hiredis (in C)."""
    # The stub types the argument as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
    return packed


class _Pending:
    __slots__ = ("deadline", "future", "replies", "want")

    def __init__(self, future: asyncio.Future[list[Reply]], want: int, deadline: float) -> None:
        self.future = future
        self.want = want
        self.deadline = deadline
        self.replies: list[Reply] = []


class Wire(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in order.

    Replies that answer no request (pub/sub messages) go to ``on_push``. Every request
    is bounded: the oldest one unanswered past its deadline closes the connection,
    failing everything in flight (the caller's loop or retry reconnects).
    """

    def __init__(
        self,
        on_push: Callable[[Reply], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[_Pending] = deque()
        self._out: list[bytes] = []
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None
        self._on_push = on_push
        self._on_lost = on_lost
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        self.where = ""
        self.timeout = 10.0  # the endpoint's read timeout, once connected

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RedisConnectionError(f"Protocol error from {self.where}: {exc}"))
                return
            if reply is False:
                return
            if self._pending:
                head = self._pending[0]
                head.replies.append(reply)
                if len(head.replies) == head.want:
                    self._pending.popleft()
                    if not head.future.done():
                        head.future.set_result(head.replies)
            elif self._on_push is not None:
                try:
                    self._on_push(reply)
                except Exception:
                    logging.getLogger("tether.redis").exception("pub/sub message handler failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            self.error
            or RedisConnectionError(
                f"Connection to {self.where} lost" + (f": {exc}" if exc else "")
            )
        )

    # -- requests

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self.closed.is_set()

    def write(self, packed: bytes) -> None:
        """Send without waiting for a reply (pub/sub commands); goes out with this turn's batch."""
        if not self.alive:
            raise RedisConnectionError(f"Connection to {self.where} closed")
        self._out.append(packed)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def request(self, packed: bytes, count: int, timeout: float) -> asyncio.Future[list[Reply]]:
        """``count`` commands packed in ``packed``: a future of their ``count`` replies."""
        future: asyncio.Future[list[Reply]] = self._loop.create_future()
        self.write(packed)
        self._pending.append(_Pending(future, count, self._loop.time() + timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._pending[0].deadline, self._expire)
        return future

    def _flush(self) -> None:
        self._flushing = False
        if self._out and self._transport is not None and not self.closed.is_set():
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._transport.write(data)

    def _expire(self) -> None:
        self._timer = None
        if not self._pending:
            return
        head = self._pending[0]
        if self._loop.time() >= head.deadline:
            self.abort(RedisTimeoutError(f"Timeout reading from {self.where}"))
        else:
            self._timer = self._loop.call_at(head.deadline, self._expire)

    def abort(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self._transport is not None:
            self._transport.abort()
        self._fail(error)

    def close(self) -> None:
        if self._transport is not None and not self.closed.is_set():
            self._transport.close()
        self._fail(RedisConnectionError(f"Connection to {self.where} closed"))

    def _fail(self, error: BaseException) -> None:
        if not self.closed.is_set() and self._on_lost is not None:
            self._loop.call_soon(self._on_lost)
        self.closed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = []
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(error)


async def open_wire(
    endpoint: Endpoint,
    on_push: Callable[[Reply], None] | None = None,
    on_lost: Callable[[], None] | None = None,
) -> Wire:
    """Connect, authenticate and select the database; bounded by the endpoint's timeouts."""
    loop = asyncio.get_running_loop()

    def make() -> Wire:
        return Wire(on_push, on_lost)

    try:
        async with asyncio.timeout(endpoint.connect_timeout):
            if endpoint.path:
                transport, wire = await loop.create_unix_connection(make, endpoint.path)
            else:
                transport, wire = await loop.create_connection(
                    make,
                    endpoint.host or "localhost",
                    endpoint.port,
                    ssl=endpoint.ssl_context,
                    server_hostname=endpoint.server_hostname,
                )
    except TimeoutError:
        raise RedisTimeoutError(f"Timeout connecting to {endpoint.describe()}") from None
    except OSError as exc:
        raise RedisConnectionError(f"Error connecting to {endpoint.describe()}: {exc}") from None
    wire.where = endpoint.describe()
    wire.timeout = endpoint.read_timeout
    sock = transport.get_extra_info("socket")
    if sock is not None and not endpoint.path:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        hello: list[tuple[Arg, ...]] = []
        username, password = await endpoint.credentials()
        if password:
            hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if endpoint.db:
            hello.append(("SELECT", endpoint.db))
        if hello:
            packed = b"".join(pack(c) for c in hello)
            for reply in await wire.request(packed, len(hello), endpoint.read_timeout):
                if isinstance(reply, ResponseError):
                    raise reply
    except BaseException:
        wire.close()
        raise
    return wire


class _Slot:
    """A command connection, opened on demand, and how many links use it."""

    __slots__ = ("connecting", "endpoint", "registry", "users", "wire")

    def __init__(self, endpoint: Endpoint, registry: dict[Endpoint, _Slot] | None) -> None:
        self.endpoint = endpoint
        self.registry = registry
        self.users = 0
        self.wire: Wire | None = None
        self.connecting: asyncio.Future[Wire] | None = None

    async def ready(self) -> Wire:
        wire = self.wire
        if wire is not None and wire.alive:
            return wire
        if self.connecting is None:
            # One connect for every caller that finds the connection down.
            self.connecting = asyncio.ensure_future(open_wire(self.endpoint))
            self.connecting.add_done_callback(self._connected)
        return await asyncio.shield(self.connecting)

    def _connected(self, attempt: asyncio.Future[Wire]) -> None:
        self.connecting = None
        if attempt.cancelled() or attempt.exception() is not None:
            return
        if self.users <= 0:
            attempt.result().close()
        else:
            self.wire = attempt.result()

    def leave(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self.registry is not None and self.registry.get(self.endpoint) is self:
            del self.registry[self.endpoint]
        if self.connecting is not None:
            self.connecting.cancel()
        if self.wire is not None:
            self.wire.close()
            self.wire = None


# The shared command connections of each event loop, one per endpoint.
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Endpoint, _Slot]] = (
    weakref.WeakKeyDictionary()
)


class Link:
    """Commands to one Redis, pipelined on one connection.

    Callers never wait for each other: a command goes out with whatever else was
    issued in the same turn of the event loop, without waiting for the replies of
    earlier ones. A caller cancelled while it waits loses only its reply: the
    connection stays in step. After a lost connection the next command reconnects;
    one that failed on the connection is tried ``retries`` more times on a new one
    (the commands sent here are idempotent, as with redis-py's one retry).

    ``shared`` links to the same endpoint in one event loop use one connection (the
    broker's acks and the bus's events of a process then go out in the same writes,
    and Redis applies them in the order they were issued); a link for blocking
    commands has a connection of its own.
    """

    def __init__(self, endpoint: Endpoint, *, retries: int = 1, shared: bool = True) -> None:
        self.endpoint = endpoint
        self.retries = retries
        self._shared = shared
        self._slot: _Slot | None = None
        self._closed = False

    @classmethod
    def of(cls, client: aioredis.Redis, *, retries: int = 1, shared: bool = True) -> Link:
        return cls(Endpoint.of(client), retries=retries, shared=shared)

    async def _ready(self) -> Wire:
        if self._closed:
            raise RedisConnectionError("Redis link closed")
        slot = self._slot
        if slot is None:
            if self._shared:
                registry = _SHARED.setdefault(asyncio.get_running_loop(), {})
                slot = registry.get(self.endpoint)
                if slot is None:
                    slot = registry[self.endpoint] = _Slot(self.endpoint, registry)
            else:
                slot = _Slot(self.endpoint, None)
            slot.users += 1
            self._slot = slot
        return await slot.ready()

    async def execute(
        self, packed: bytes, count: int, reply_within: float | None = None
    ) -> list[Reply]:
        """Replies to ``count`` packed commands, in order; error replies are returned as
        ``ResponseError`` values, a lost connection or no reply ``reply_within`` seconds
        (the endpoint's read timeout by default) raises."""
        limit = self.endpoint.read_timeout if reply_within is None else reply_within
        attempt = 0
        while True:
            try:
                slot = self._slot
                wire = slot.wire if slot is not None else None
                if wire is None or not wire.alive or self._closed:
                    wire = await self._ready()
                return await wire.request(packed, count, limit)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt >= self.retries or self._closed:
                    raise
                attempt += 1

    async def call(self, *args: Arg, reply_within: float | None = None) -> Reply:
        """One command's reply; an error reply raises ``ResponseError``."""
        (reply,) = await self.execute(pack(args), 1, reply_within)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def calls(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Several commands, sent together; error replies are returned, not raised."""
        if not commands:
            return []
        packed = b"".join([pack(c) for c in commands])
        return await self.execute(packed, len(commands))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._slot is not None:
                self._slot.leave()
                self._slot = None


class Script:
    """A Lua script run by its SHA, loaded on first use or after a restart flushed it."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> tuple[Arg, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, link: Link, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        (reply,) = await run_scripts(link, [(self, keys, args)])
        if isinstance(reply, ResponseError):
            raise reply
        return reply


async def run_scripts(
    link: Link, calls: Sequence[tuple[Script, Sequence[Arg], Sequence[Arg]]]
) -> list[Reply]:
    """Several script calls in one round trip; error replies are returned, not raised."""
    replies = await link.calls([script.command(keys, args) for script, keys, args in calls])
    missing = [i for i, r in enumerate(replies) if _noscript(r)]
    if missing:
        # EVAL caches the script too: the next EVALSHA finds it.
        again = await link.calls(
            [
                ("EVAL", calls[i][0].body, len(calls[i][1]), *calls[i][1], *calls[i][2])
                for i in missing
            ]
        )
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


def _noscript(reply: Reply) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
