"""``tether bench``: start Tether in a deployment mode, load it, report, tear it all down."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from tether.bench.scenarios import Options

bench_app = typer.Typer(add_completion=False, help=__doc__)

SCENARIO_ORDER = ("ceiling", "echo", "submit", "stream", "fanout", "slow", "idle-sse")
MODE_ORDER = ("embedded", "postgres", "redis")


def _expand(values: list[str], known: tuple[str, ...], what: str) -> list[str]:
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "all":
                out.extend(known)
            elif item in known:
                out.append(item)
            else:
                raise typer.BadParameter(f"unknown {what} {item!r}; one of {', '.join(known)}, all")
    return list(dict.fromkeys(out))


@bench_app.callback(invoke_without_command=True)
def bench(
    scenario: Annotated[
        list[str],
        typer.Option("--scenario", "-s", help=f"{', '.join(SCENARIO_ORDER)} or all (repeatable)"),
    ] = ["echo"],  # noqa: B006 - typer reads the default, nothing mutates it
    mode: Annotated[
        list[str],
        typer.Option("--mode", "-m", help="embedded, postgres, redis or all (repeatable)"),
    ] = ["embedded"],  # noqa: B006
    duration: Annotated[float, typer.Option(help="Seconds of load (echo, ceiling, stream)")] = 10,
    connections: Annotated[int, typer.Option(help="Client connections (closed loop)")] = 64,
    concurrency: Annotated[int, typer.Option(help="Tasks a server/worker runs at once")] = 64,
    tasks: Annotated[
        int | None,
        typer.Option(help="Tasks for submit (5,000; 100,000 = the memory soak) and slow (1,000)"),
    ] = None,
    rate: Annotated[float, typer.Option(help="stream: tasks submitted per second")] = 100,
    subscribers: Annotated[int, typer.Option(help="fanout: subscribers of one task")] = 1000,
    ticks: Annotated[int, typer.Option(help="fanout: status updates the task emits")] = 100,
    streams: Annotated[int, typer.Option(help="idle-sse: idle SSE streams")] = 10_000,
    hold: Annotated[float, typer.Option(help="idle-sse: seconds the streams stay idle")] = 5,
    sleep: Annotated[float, typer.Option(help="slow: seconds each task sleeps")] = 1.0,
    client_procs: Annotated[int, typer.Option(help="Python load-generator processes")] = 2,
    loadgen: Annotated[
        str, typer.Option(help="auto (wrk if installed), wrk or python (request/response)")
    ] = "auto",
    threads: Annotated[int, typer.Option(help="wrk threads")] = 1,
    warmup: Annotated[float, typer.Option(help="Seconds of unmeasured load first")] = 1.0,
    worker_procs: Annotated[int, typer.Option(help="redis mode: `tether worker` processes")] = 1,
    deadline: Annotated[float, typer.Option(help="Give up waiting for tasks after (s)")] = 900,
    pg_admin_url: Annotated[
        str, typer.Option(help="PostgreSQL to create the bench database on")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    redis_url: Annotated[
        str, typer.Option(help="Redis server (an empty database number is chosen)")
    ] = "redis://127.0.0.1:6379",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSON file [bench-results/<time>.json]")
    ] = None,
) -> None:
    """Measure Tether: tasks/s, latency, server CPU per task, memory, on each mode.

    Each scenario starts its own server (fresh SQLite file, fresh PostgreSQL database,
    empty Redis database), runs the load, and stops everything, also on Ctrl-C.
    """
    from rich.console import Console

    from tether.bench import metrics
    from tether.bench.modes import DeployOptions
    from tether.bench.procs import Interrupted, raise_nofile, signals_unwind
    from tether.bench.scenarios import Options, run_one
    from tether.bench.wrk import INSTALL_HINT, wrk_path

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))  # a log file: keep the tables whole
    scenarios = _expand(scenario, SCENARIO_ORDER, "scenario")
    modes = _expand(mode, MODE_ORDER, "mode")
    if loadgen not in ("auto", "wrk", "python"):
        raise typer.BadParameter("--loadgen: auto, wrk or python")
    if loadgen != "python" and wrk_path() is None:
        console.print(f"[yellow]{INSTALL_HINT}[/]")
    soft, hard = raise_nofile()
    if "idle-sse" in scenarios and streams + 1000 > soft:
        console.print(
            f"[yellow]open-file limit {soft} (hard {hard}) is low for {streams} streams: "
            "raise it (ulimit -Hn) or lower --streams[/]"
        )
    opts = Options(
        duration=duration, connections=connections, concurrency=concurrency, tasks=tasks,
        rate=rate, subscribers=subscribers, ticks=ticks, streams=streams, hold=hold,
        sleep=sleep, client_procs=client_procs, loadgen=loadgen, threads=threads,
        warmup=warmup, worker_procs=worker_procs, deadline=deadline,
        deploy=DeployOptions(
            concurrency=concurrency, worker_procs=worker_procs, pg_admin_url=pg_admin_url,
            redis_url=redis_url,
        ),
    )  # fmt: skip
    started = dt.datetime.now(dt.UTC)
    load_before = metrics.loadavg()
    out = output or Path("bench-results") / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    results: list[dict[str, Any]] = []
    plan = [(s, "ceiling") for s in scenarios if s == "ceiling"] + [
        (s, m) for m in modes for s in scenarios if s != "ceiling"
    ]
    stopped_by: BaseException | None = None
    with signals_unwind():
        for name, where in plan:
            console.print(f"[bold]> {name}[/] on {where} ...")
            try:
                result = run_one(name, where, opts)
            except (KeyboardInterrupt, Interrupted) as exc:
                # run_one's teardown has run: every server and client is stopped.
                reason = str(exc) or "Ctrl-C"
                results.append({"scenario": name, "mode": where, "status": "interrupted",
                                "reason": reason})  # fmt: skip
                console.print(f"[red]interrupted ({reason}): everything stopped[/]")
                stopped_by = exc
                break
            results.append(result)
            if result["status"] != "ok":
                console.print(f"  [yellow]{result['status']}: {result.get('reason')}[/]")
    _finish(results, out, opts, started, load_before, console)
    if stopped_by is not None:
        raise typer.Exit(130 if isinstance(stopped_by, KeyboardInterrupt) else 143)
    if any(r["status"] == "error" for r in results):
        raise typer.Exit(1)


def _finish(
    results: list[dict[str, Any]],
    out: Path,
    opts: Options,
    started: dt.datetime,
    load_before: list[float],
    console: Console,
) -> None:
    from dataclasses import asdict

    from tether.bench import metrics, report

    ceiling = report.find_ceiling(results, out.parent)
    report.annotate(results, ceiling)
    doc = report.document(
        results,
        machine=metrics.machine(),
        options=asdict(opts),
        ceiling=ceiling,
        started=started,
        load_before=load_before,
    )
    path = report.save(doc, out)
    report.render(doc, console)
    console.print(f"saved {path}")
