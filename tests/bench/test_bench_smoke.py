"""``tether bench`` end to end on the embedded mode: it runs, reports, and cleans up.

Not a speed test: it checks the JSON has its fields, that tasks completed without
errors, and that no server process is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

LOADGENS = ["python"] + (["wrk"] if shutil.which("wrk") else [])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("loadgen", LOADGENS)
def test_bench_echo_embedded(tmp_path: Path, loadgen: str) -> None:
    out = tmp_path / "result.json"
    argv = [
        sys.executable, "-m", "tether.cli", "bench", "--scenario", "echo", "--mode", "embedded",
        "--duration", "2", "--warmup", "0", "--connections", "8", "--client-procs", "1",
        "--loadgen", loadgen, "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TETHER_API_KEYS", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["tether_bench"] == 1
    assert doc["machine"]["cpus"] >= 1
    assert {"started", "finished", "options", "results"} <= doc.keys()
    (result,) = doc["results"]
    assert result["scenario"] == "echo"
    assert result["mode"] == "embedded"
    assert result["status"] == "ok", result.get("reason")
    for key in (
        "completed", "errors", "not_completed", "tasks_per_s", "latency_ms", "duration_s",
        "server_cpu_s", "server_cpu_ms_per_task", "processes", "loadgen", "machine_load",
        "targets",
    ):  # fmt: skip
        assert key in result, key
    assert result["completed"] > 0
    assert result["errors"] == 0
    assert result["not_completed"] == 0
    assert result["tasks_per_s"] > 0
    assert {"p50", "p95", "p99"} <= result["latency_ms"].keys()
    assert result["loadgen"]["kind"] == loadgen
    assert {"busy_pct", "loadavg_start", "foreign_cpu_pct"} <= result["machine_load"].keys()
    (server,) = result["processes"]
    assert server["role"] == "server"
    assert server["vmhwm_mib"] > 0
    assert server["cpu_s"] > 0

    # Torn down: the server the bench started is gone.
    deadline = time.monotonic() + 5
    while _alive(server["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server["pid"])
