"""Agents the end-to-end tests serve with ``tether serve tests.e2e.agents:NAME``.

They run in the server process, so they report what they saw through files in
the directory named by ``TETHER_E2E_MARKS`` (the test reads them) or through
the answer they return. The first word of the task's first user message picks
the behaviour; the rest are its arguments.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tether import Agent, Context, HandlerError

MARKS = Path(os.environ.get("TETHER_E2E_MARKS", "."))
# Upper bound on any wait inside a handler, so no test can hang on an agent.
MAX_WAIT = 60.0


def mark(name: str, text: str = "") -> None:
    # Written to a temporary name and renamed, so a reader never sees half a file.
    tmp = MARKS / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(MARKS / name)


def append(name: str, line: str) -> None:
    with (MARKS / name).open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _first_text(ctx: Context) -> str:
    for message in ctx.history:
        if message.get("role") == "ROLE_USER":
            return "\n".join(p["text"] for p in message.get("parts", []) if "text" in p)
    return ctx.text


agent = Agent(name="e2e", description="Does what the first word of the message says")

# Handlers of ``agent`` running in this process now, and the most seen at once.
_active = 0
_peak = 0


@agent.handler
async def handle(ctx: Context) -> Any:
    global _active, _peak
    command, _, rest = _first_text(ctx).strip().partition(" ")
    args = rest.split()
    if command == "echo":
        return f"echo: {rest}"
    if command == "parts":
        return [{"text": "first part"}, {"data": {"answer": 42}}]
    if command == "message":
        return {
            "role": "ROLE_AGENT",
            "parts": [{"text": "a whole message"}],
            "metadata": {"source": "e2e"},
        }
    if command == "artifact":
        await ctx.artifact("the report body", name="report", description="a text artifact")
        await ctx.artifact({"rows": 3}, name="table")
        return "two artifacts attached"
    if command == "progress":
        # Reports progress, then holds the task in working until the test says go.
        # The test is another process, so a file is the signal: nothing to await.
        await ctx.working("halfway there")
        go = MARKS / f"{args[0]}.go"
        deadline = time.monotonic() + MAX_WAIT
        while not go.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return "finished"
    if command == "fail":
        raise ValueError("the answer was 41, not 42")
    if command == "retry":
        if ctx.attempt < int(args[0]):
            raise HandlerError(f"flaky on attempt {ctx.attempt}", non_retryable=False)
        return f"ok on attempt {ctx.attempt}"
    if command == "bad-result":
        return 42  # not a string, part or message
    if command == "fixed-id":
        # Every task answers with the same messageId: the store refuses the second.
        return {"messageId": "fixed-answer-id", "role": "ROLE_AGENT", "parts": [{"text": "hi"}]}
    if command == "own-timeout":
        raise TimeoutError("the upstream service took too long")
    if command == "ask":
        if len(ctx.history) == 1:
            return ctx.input_required("What is your name?")
        return f"Hello, {ctx.text}"
    if command == "reject":
        return ctx.reject("I do not do that")
    if command == "block":
        # Runs until canceled (or MAX_WAIT), and says in its finally block how it ended.
        name = args[0]
        mark(f"{name}.started")
        outcome = "returned"
        try:
            await asyncio.sleep(MAX_WAIT)
        except asyncio.CancelledError:
            outcome = "canceled"
            raise
        finally:
            mark(f"{name}.stopped", outcome)
        return "unblocked"
    if command == "sleep":
        seconds, name = float(args[0]), args[1]
        append(f"{name}.runs", str(ctx.attempt))
        await asyncio.sleep(seconds)
        return f"slept {seconds}"
    if command == "peak":
        _active += 1
        _peak = max(_peak, _active)
        try:
            await asyncio.sleep(float(args[0]))
            return f"peak {_peak}"
        finally:
            _active -= 1
    return f"unknown command {command!r}"


# The same behaviours with a deadline on every handler run.
timed = Agent(name="e2e-timed", description="Handlers get half a second", timeout=0.5)
timed.handler(handle)


sync_agent = Agent(name="e2e-sync", description="A blocking, synchronous handler")


@sync_agent.handler
def handle_sync(ctx: Context) -> str:
    command, _, rest = ctx.text.strip().partition(" ")
    if command == "sleep":
        seconds, name = rest.split()
        mark(f"{name}.started", threading.current_thread().name)
        time.sleep(float(seconds))
        mark(f"{name}.ended")
    if command == "spin":
        # A thread cannot be interrupted: a long sync handler watches ctx.cancel_requested.
        name = rest.strip()
        mark(f"{name}.started")
        deadline = time.monotonic() + MAX_WAIT
        while not ctx.cancel_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        mark(f"{name}.stopped", "canceled" if ctx.cancel_requested else "returned")
        return "spun"
    return f"thread {threading.current_thread().name} main={threading.main_thread().name}"


crasher = Agent(
    name="e2e-crasher", description="Kills its own process on every attempt", max_attempts=2
)


@crasher.handler
async def crash(ctx: Context) -> str:
    if ctx.text.startswith("crash"):
        append("crash.attempts", str(ctx.attempt))
        os.kill(os.getpid(), signal.SIGKILL)
    return f"echo: {ctx.text}"


class _Greeter:
    """An async handler that ``inspect`` does not see as a coroutine function."""

    async def __call__(self, ctx: Context) -> str:
        return f"hello from an object: {ctx.text}"


callable_agent = Agent(name="e2e-callable", description="Its handler is a callable object")
callable_agent.handler(_Greeter())
