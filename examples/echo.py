"""The example agent: repeats what you say, and asks for a name when you say hello.

    tether serve examples/echo.py:agent
"""

from tether import Agent, Context

agent = Agent(name="echo", description="Repeats what you say")


@agent.handler
async def echo(ctx: Context) -> object:
    await ctx.working("thinking")
    if ctx.text.strip().lower() == "hello" and len(ctx.history) == 1:
        return ctx.input_required("Hello! What is your name?")
    await ctx.artifact(ctx.text, name="echo")
    return f"echo: {ctx.text}"
