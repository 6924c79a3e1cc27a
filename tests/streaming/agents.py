"""The agent the streaming tests serve: in-process, or with ``tether serve
tests/streaming/agents.py:agent``.

The first word of the task's first user message picks the behaviour, the rest are
its arguments:

    count N [DELAY]     N numbered events: odd numbers as status messages, even ones as
                        chunks of one artifact (the last chunk marked), DELAY s apart
    blob N SIZE         N artifact chunks of SIZE bytes, as fast as the store takes them
    gate KEY            waits until the test opens ``GATES[KEY]`` (in-process only)
    ask                 asks for a name, then answers with the history it saw
    recall              answers with the context's history (a new task in an old context)
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from tether import Agent, Context
from tether.runtime.parts import text_of

# Bound on any wait inside a handler, so no test can hang on the agent.
MAX_WAIT = 60.0

GATES: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

agent = Agent(name="streams", description="Streams numbered events, waits, asks for input")


def _first_text(ctx: Context) -> str:
    for message in ctx.history:
        if message.get("role") == "ROLE_USER":
            return text_of(message)
    return ctx.text


def _turns(messages: list[dict[str, Any]]) -> list[str]:
    return [f"{m.get('role')}: {text_of(m)}" for m in messages]


async def _count(ctx: Context, n: int, delay: float) -> str:
    async with ctx.stream_artifact(name="evens") as out:
        for i in range(1, n + 1):
            if i % 2:
                await ctx.working(str(i))
            else:
                await out.write(str(i), last=i in (n, n - 1))
            if delay:
                await asyncio.sleep(delay)
    return "done"


@agent.handler
async def handle(ctx: Context) -> Any:
    command, _, rest = _first_text(ctx).strip().partition(" ")
    args = rest.split()
    if command == "count":
        return await _count(ctx, int(args[0]), float(args[1]) if len(args) > 1 else 0.0)
    if command == "blob":
        n, size = int(args[0]), int(args[1])
        async with ctx.stream_artifact(name="blob") as out:
            for _ in range(n):
                await out.write("x" * size)
        return "blob done"
    if command == "gate":
        async with asyncio.timeout(MAX_WAIT):
            await GATES[args[0]].wait()
        return "opened"
    if command == "ask":
        if len(ctx.history) == 1:
            return ctx.input_required("What is your name?")
        await ctx.artifact({"history": _turns(ctx.history)}, name="seen")
        return f"Hello, {ctx.text}!"
    if command == "recall":
        await ctx.artifact({"context": _turns(await ctx.context_history())}, name="seen")
        return "recalled"
    return f"unknown command {command!r}"
