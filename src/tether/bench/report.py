"""Targets, ratios to the ceiling, the terminal tables (rich) and the JSON file."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

FORMAT_VERSION = 1
FOREIGN_WARN_PCT = 15.0  # other work on the machine above this share: figures are lower bounds


def _get(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _max_rss(result: dict[str, Any]) -> float | None:
    procs = result.get("processes") or []
    return max((p["vmrss_mib"] for p in procs), default=None)


@dataclass(frozen=True)
class Target:
    scenario: str
    modes: tuple[str, ...] | None  # None: any mode
    label: str
    metric: str
    get: Callable[[dict[str, Any]], Any]
    at_most: bool
    bound: float
    applies: Callable[[dict[str, Any]], bool] = lambda r: True

    def check(self, result: dict[str, Any]) -> dict[str, Any] | None:
        if result.get("scenario") != self.scenario or result.get("status") != "ok":
            return None
        if self.modes is not None and result.get("mode") not in self.modes:
            return None
        if not self.applies(result):
            return None
        value = self.get(result)
        met = (
            None
            if value is None
            else (value <= self.bound if self.at_most else value >= self.bound)
        )
        return {"target": self.label, "metric": self.metric, "value": value, "met": met}


def _path(p: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: _get(r, p)


TARGETS: list[Target] = [
    Target("echo", ("embedded",), "≥ 3,000 tasks/s", "tasks_per_s",
           _path("tasks_per_s"), False, 3000),
    Target("echo", ("embedded",), "≤ 0.5 ms server CPU/task", "server_cpu_ms_per_task",
           _path("server_cpu_ms_per_task"), True, 0.5),
    Target("echo", ("redis",), "≥ 1,500 tasks/s (1 API + 1 worker)", "tasks_per_s",
           _path("tasks_per_s"), False, 1500),
    Target("stream", ("redis",), "p99 submit→first SSE event ≤ 20 ms at 100/s",
           "extra.first_frame_ms.p99", _path("extra.first_frame_ms.p99"), True, 20),
    Target("stream", ("redis",), "p99 submit→first worker event ≤ 20 ms at 100/s",
           "extra.first_worker_event_ms.p99", _path("extra.first_worker_event_ms.p99"), True, 20),
    Target("submit", None, "≤ 100 MiB RSS/process after 100,000 tasks", "max vmrss_mib",
           _max_rss, True, 100, lambda r: (_get(r, "extra.tasks") or 0) >= 100_000),
    Target("idle-sse", None, "10,000 idle SSE streams in ≤ 500 MiB",
           "extra.server_rss_with_streams_mib", _path("extra.server_rss_with_streams_mib"),
           True, 500, lambda r: (_get(r, "extra.streams") or 0) >= 10_000),
]  # fmt: skip

REFERENCE_CEILING_RPS = 15_000  # ARCHITECTURE.md, this machine class, under wrk


def annotate(results: list[dict[str, Any]], ceiling: dict[str, Any] | None) -> None:
    """Targets and ratios to the ceiling, in place."""
    rps = ceiling.get("tasks_per_s") if ceiling else None
    cpu = ceiling.get("server_cpu_ms_per_task") if ceiling else None
    for r in results:
        r["targets"] = [t for t in (tg.check(r) for tg in TARGETS) if t is not None]
        if r.get("status") != "ok":
            continue
        head = r.get("headline") or {}
        if rps and head.get("name") in ("tasks/s", "events/s") and head.get("value"):
            r["ratio_to_ceiling"] = round(float(head["value"]) / float(rps), 4)
        else:
            r["ratio_to_ceiling"] = None
        mine = r.get("server_cpu_ms_per_task")
        r["cpu_ratio_to_ceiling"] = round(mine / cpu, 2) if mine and cpu else None


def find_ceiling(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any] | None:
    """This run's ceiling, else the newest one saved in ``out_dir``."""
    for r in results:
        if r["scenario"] == "ceiling" and r["status"] == "ok":
            return {**r, "source": "this run"}
    if not out_dir.is_dir():
        return None
    for path in sorted(out_dir.glob("*.json"), reverse=True):
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        for r in data.get("results", []):
            if r.get("scenario") == "ceiling" and r.get("status") == "ok":
                return {**r, "source": str(path)}
    return None


def document(
    results: list[dict[str, Any]],
    *,
    machine: dict[str, Any],
    options: dict[str, Any],
    ceiling: dict[str, Any] | None,
    started: dt.datetime,
    load_before: list[float],
) -> dict[str, Any]:
    return {
        "tether_bench": FORMAT_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["tether", *sys.argv[1:]]),
        "machine": {**machine, "loadavg_before": load_before},
        "options": options,
        "ceiling": None
        if ceiling is None
        else {
            "tasks_per_s": ceiling.get("tasks_per_s"),
            "server_cpu_ms_per_task": ceiling.get("server_cpu_ms_per_task"),
            "source": ceiling.get("source"),
            "reference_rps": REFERENCE_CEILING_RPS,
        },
        "results": results,
    }


def save(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path


def _n(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def render(doc: dict[str, Any], console: Console) -> None:
    m = doc["machine"]
    title = (
        f"tether bench — {doc['started']} — {m['cpus']} CPU {m['cpu_model']}, "
        f"{m['mem_total_mib']:,} MiB — load before {' '.join(map(str, m['loadavg_before']))}"
    )
    main = Table(title=title, title_justify="left")
    for col in (
        "scenario",
        "mode",
        "headline",
        "tasks/s",
        "p50/p95/p99 ms",
        "srv CPU ms/task",
        "x ceiling",
        "done/err/not",
        "loadgen %core",
        "busy% (others)",
        "load1",
    ):
        main.add_column(col, justify="left" if col in ("scenario", "mode") else "right")
    notes: list[str] = []
    for r in doc["results"]:
        if r["status"] != "ok":
            main.add_row(r["scenario"], r["mode"], f"[yellow]{r['status']}[/]", *[""] * 8)
            notes.append(f"{r['scenario']}/{r['mode']}: {r['status']}: {r.get('reason', '')}")
            continue
        lat = r.get("latency_ms") or {}
        head = r.get("headline") or {}
        lg = r.get("loadgen") or {}
        ml = r.get("machine_load") or {}
        cpu_task = r.get("server_cpu_ms_per_task", r.get("server_cpu_ms_per_event"))
        ratio = r.get("ratio_to_ceiling")
        lg_txt = f"{lg.get('kind', '')} {_n(lg.get('max_cpu_pct_of_core'))}"
        if lg.get("saturated"):
            lg_txt = f"[red]{lg_txt} SAT[/]"
            notes.append(
                f"{r['scenario']}/{r['mode']}: the load generator saturated a core "
                f"({lg.get('max_cpu_pct_of_core')}%): the server may be faster than shown"
            )
        if (ml.get("foreign_cpu_pct") or 0) >= FOREIGN_WARN_PCT:
            notes.append(
                f"{r['scenario']}/{r['mode']}: other work used {ml['foreign_cpu_pct']}% of the "
                "machine during the run: figures are lower bounds"
            )
        errs = r.get("errors") or 0
        main.add_row(
            r["scenario"],
            r["mode"],
            f"{_n(head.get('value'))} {head.get('name', '')}",
            _n(r.get("tasks_per_s")),
            "/".join(_n(lat.get(k), 1) for k in ("p50", "p95", "p99")) if lat else "—",
            _n(cpu_task, 3),
            "—" if ratio is None else f"{ratio:.3f}",
            f"{_n(r.get('completed'))}/{f'[red]{errs:,}[/]' if errs else '0'}/"
            f"{_n(r.get('not_completed'))}",
            lg_txt,
            f"{_n(ml.get('busy_pct'))} ({_n(ml.get('foreign_cpu_pct'))})",
            " ".join(_n(x, 2) for x in ml.get("loadavg_end", [])[:1]),
        )
    console.print(main)

    ceiling = doc.get("ceiling")
    if ceiling:
        console.print(
            f"ceiling: {_n(ceiling['tasks_per_s'])} req/s, "
            f"{_n(ceiling['server_cpu_ms_per_task'], 3)} ms CPU/req ({ceiling['source']}); "
            f"ARCHITECTURE.md reference ~{REFERENCE_CEILING_RPS:,} req/s"
        )
    else:
        console.print("ceiling: not measured (add --scenario ceiling for ratios)")

    targets = Table(title="targets (shown, not enforced)", title_justify="left")
    for col in ("scenario", "mode", "target", "value", "met"):
        targets.add_column(col)
    for r in doc["results"]:
        for t in r.get("targets", []):
            met = t["met"]
            targets.add_row(
                r["scenario"], r["mode"], t["target"], _n(t["value"], 3),
                "—" if met is None else ("[green]yes[/]" if met else "[red]no[/]"),
            )  # fmt: skip
    if targets.row_count:
        console.print(targets)

    procs = Table(title="processes (server CPU over the measured window; memory at its end)",
                  title_justify="left")  # fmt: skip
    for col in ("scenario", "mode", "role", "pid", "CPU s", "VmRSS MiB", "VmHWM MiB"):
        procs.add_column(col, justify="left" if col in ("scenario", "mode", "role") else "right")
    for r in doc["results"]:
        for p in r.get("processes", []):
            procs.add_row(r["scenario"], r["mode"], p["role"], str(p["pid"]), _n(p["cpu_s"], 2),
                          _n(p["vmrss_mib"]), _n(p["vmhwm_mib"]))  # fmt: skip
        for role, svc in (r.get("services_cpu") or {}).items():
            label = f"{role} x{svc['processes']}" + (" (shared)" if role == "redis" else "")
            per = svc.get("cpu_ms_per_task")
            procs.add_row(r["scenario"], r["mode"], label, "",
                          f"{_n(svc['cpu_s'], 2)} ({_n(per, 3)} ms/task)", "", "")  # fmt: skip
        lg = r.get("loadgen")
        if lg:
            procs.add_row(r["scenario"], r["mode"], f"loadgen {lg['kind']} x{lg['procs']}", "",
                          _n(lg["cpu_s"], 2), "", _n(lg.get("vmhwm_mib")))  # fmt: skip
    if procs.row_count:
        console.print(procs)

    for r in doc["results"]:
        extra = r.get("extra")
        if extra:
            shown = {k: v for k, v in extra.items() if k != "progress"}
            console.print(f"[bold]{r['scenario']}/{r['mode']}[/]: " + ", ".join(
                f"{k}={_fmt_extra(v)}" for k, v in shown.items()))  # fmt: skip
        for s in r.get("samples") or []:
            console.print(f"  [dim]sample error: {s}[/]")
    for note in notes:
        console.print(f"[yellow]! {note}[/]")


def _fmt_extra(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}:{_n(x, 2)}" for k, x in v.items()) + "}"
    return _n(v, 2)
