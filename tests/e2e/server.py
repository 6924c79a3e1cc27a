"""``tether serve`` as a real subprocess on 127.0.0.1, for every suite that needs one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
TETHER = Path(sys.executable).with_name("tether")
# Generous: two noisy cores, other test suites running, a cold interpreter.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TetherServer:
    """One ``tether serve`` process; ``start`` again after ``kill`` to restart on the same db."""

    def __init__(
        self,
        target: str,
        *,
        db: Path | None,
        marks: Path,
        log: Path,
        args: list[str] | None = None,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> None:
        self.target = target
        self.db = db
        self.marks = marks
        self.log = log
        self.args = args or []
        self.cwd = cwd
        self.extra_env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        marks.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        # The developer's own TETHER_* settings must not change what the test runs against.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env.update(TETHER_E2E_MARKS=str(self.marks), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        return env

    def launch(self) -> TetherServer:
        """Start the process without waiting for it to be ready (it may be meant to die)."""
        self.port = free_port()
        cmd = [str(TETHER), "serve", self.target, "--port", str(self.port)]
        if self.db is not None:
            cmd += ["--db", str(self.db)]
        cmd += self.args
        with self.log.open("ab") as out:
            out.write(f"\n$ {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=self._env(), stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def start(self) -> TetherServer:
        """Start the process and wait until /healthz answers."""
        for _ in range(3):
            if self.launch()._wait_ready():
                return self
            # Lost the race for the port to another process: try another one.
        raise AssertionError(f"tether serve never bound a port:\n{self.output()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if "address already in use" in self.output().lower():
                        return False
                    raise AssertionError(
                        f"tether serve exited with {self.proc.returncode}:\n{self.output()}"
                    )
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"tether serve not healthy after {START_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)
