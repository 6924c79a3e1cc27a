"""The agents the benchmark serves (``tether serve tether.bench.agents:echo``).

- ``echo``: answers at once; what a task costs when the handler costs nothing.
- ``slow``: sleeps ``metadata.sleep`` seconds (default 1) without holding the CPU.
- ``ticker``: stays working, silent, until the file ``metadata.start_file`` exists
  (the bench runs on the same machine as the server: a file is a trigger that works
  in every mode), so any number of subscribers can attach first; then emits
  ``metadata.ticks`` status updates ``metadata.interval`` seconds apart and completes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tether import Agent, Context

echo = Agent(name="bench-echo", description="Benchmark: repeats the text at once")
slow = Agent(name="bench-slow", description="Benchmark: sleeps, then answers")
ticker = Agent(name="bench-ticker", description="Benchmark: status updates on demand")


def _meta(ctx: Context, key: str, default: float) -> float:
    value: Any = (ctx.message.get("metadata") or {}).get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _exists(path: str) -> bool:
    return os.path.exists(path)  # a stat(2): microseconds, fine on the loop


async def _wait_for_file(path: str, limit_s: float) -> None:
    """Every 2 ms (one task polls, not each subscriber): start within 2 ms of the trigger."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        if _exists(path):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{path} did not appear in {limit_s:.0f}s")
        await asyncio.sleep(0.002)


@echo.handler
async def _echo(ctx: Context) -> str:
    return ctx.text


@slow.handler
async def _slow(ctx: Context) -> str:
    await asyncio.sleep(_meta(ctx, "sleep", 1.0))
    return ctx.text


@ticker.handler
async def _ticker(ctx: Context) -> object:
    start_file = (ctx.message.get("metadata") or {}).get("start_file")
    if start_file:
        await _wait_for_file(str(start_file), _meta(ctx, "max_wait", 900.0))
    ticks = int(_meta(ctx, "ticks", 10))
    interval = _meta(ctx, "interval", 0.0)
    for i in range(ticks):
        await ctx.working(f"tick {i}")
        if interval > 0:
            await asyncio.sleep(interval)
    return "done"
