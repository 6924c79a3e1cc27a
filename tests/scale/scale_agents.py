"""The agent the scale-out tests run in ``tether worker`` processes.

The first word of the task's message picks the behaviour. Handlers report what
they saw through files in ``TETHER_SCALE_MARKS`` (the test reads them) and
through their answer, which names the worker process that gave it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from tether import Agent, Context

MARKS = Path(os.environ.get("TETHER_SCALE_MARKS", "."))
# Upper bound on any wait inside a handler, so no test can hang on an agent.
MAX_WAIT = 120.0

agent = Agent(name="scale", description="Does what the first word says", max_attempts=5)


def append(name: str, line: str) -> None:
    with (MARKS / name).open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


@agent.handler
async def handle(ctx: Context) -> Any:
    command, _, rest = ctx.text.strip().partition(" ")
    args = rest.split()
    me = os.getpid()
    if command == "quick":
        return f"quick by {me}"
    if command == "hold":
        # The first run holds on until its worker is killed; a run after that is quick.
        append(f"started-{ctx.task_id}", f"{me} {ctx.attempt}")
        await asyncio.sleep(MAX_WAIT if ctx.attempt <= 1 else 0.05)
        return f"done by {me} on attempt {ctx.attempt}"
    if command == "tick":
        count, every = int(args[0]), float(args[1])
        for i in range(count):
            await ctx.working(f"tick {i}")
            await asyncio.sleep(every)
        return f"ticked by {me}"
    if command == "block":
        append(f"started-{ctx.task_id}", f"{me} {time.time()}")
        try:
            await asyncio.sleep(MAX_WAIT)
        except asyncio.CancelledError:
            append(f"stopped-{ctx.task_id}", f"{me} {time.time()}")
            raise
        return "never"
    if command == "wait":
        timeout = float(args[0]) if args else None
        append(f"started-{ctx.task_id}", f"{me} {time.time()}")
        op = ctx.operation("approval")
        result = await ctx.wait_for(op.id, timeout=timeout)
        return f"approved: {result} by {me}"
    return f"unknown command {command!r}"
