"""``wrk`` as the load generator for request/response scenarios.

wrk (C, epoll) costs far less CPU per request than any Python client, so it is the
first choice where the scenario is plain request/response. Its own CPU comes from
``os.wait4``'s rusage; the report flags it when it nears a full core per thread.
Install: ``apt-get install wrk`` (Debian/Ubuntu), ``brew install wrk`` (macOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson

from tether.bench.procs import _preexec

INSTALL_HINT = (
    "wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or `brew install wrk` "
    "(macOS); using the Python load generator instead"
)


def wrk_path() -> str | None:
    return shutil.which("wrk")


@dataclass
class WrkResult:
    completed: int
    not_completed: int
    requests: int
    duration_s: float
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_s: float
    maxrss: int
    threads: int
    bad_samples: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        e = self.socket_errors
        return e["connect"] + e["read"] + e["write"] + e["timeout"]


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches the bench, which stops wrk itself
        preexec_fn=_preexec,  # a prctl call: takes no lock between fork and exec
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, 0)


def _outputs(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    texts = []
    for stream in (proc.stdout, proc.stderr):
        texts.append(stream.read().decode(errors="replace") if stream is not None else "")
        if stream is not None:
            stream.close()
    return texts[0], texts[1]


async def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    nonce: str,
    immediate: bool = False,
    request_timeout: float = 10.0,
) -> WrkResult:
    """Run wrk with ``send.lua``; its CPU and peak memory come from ``os.wait4``."""
    exe = wrk_path()
    if exe is None:
        raise FileNotFoundError(INSTALL_HINT)
    threads = max(1, min(threads, connections))
    script = resources.files("tether.bench").joinpath("send.lua")
    with resources.as_file(script) as path:
        argv = [
            exe, "-t", str(threads), "-c", str(connections), "-d", f"{max(duration, 1):.0f}s",
            "--timeout", f"{request_timeout:.0f}s", "-s", str(path), url, "--", nonce,
            "immediate" if immediate else "blocking",
        ]  # fmt: skip
        proc = _spawn(argv)
        reaped = False
        try:
            t0 = time.monotonic()
            _, status, usage = await asyncio.to_thread(os.wait4, proc.pid, 0)
            reaped = True
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - t0
            out, err = _outputs(proc)
        finally:
            if not reaped:
                _kill(proc)
    line = next((ln for ln in out.splitlines() if ln.startswith("TETHER_BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {err.strip() or out.strip()}")
    data: dict[str, Any] = orjson.loads(line.split(" ", 1)[1])
    lat = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    bad = [ln[len("TETHER_BENCH_BAD ") :] for ln in err.splitlines() if "TETHER_BENCH_BAD" in ln]
    return WrkResult(
        completed=int(data["completed"]),
        not_completed=int(data["not_completed"]),
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6 or wall,
        socket_errors={k: int(v) for k, v in data["socket_errors"].items()},
        latency_ms=lat,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss=usage.ru_maxrss * 1024,
        threads=threads,
        bad_samples=bad[:3],
    )
