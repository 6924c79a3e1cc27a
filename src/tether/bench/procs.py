"""Child processes that never outlive the bench: own process group, parent-death signal,
SIGTERM then SIGKILL of the whole group on teardown, even on Ctrl-C or an error."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from tether.bench.metrics import proc_cpu, proc_memory

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _preexec() -> None:  # runs in the child between fork and exec: nothing that locks
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def raise_nofile(want: int | None = None) -> tuple[int, int]:
    """Raise this process's (and so its children's) open-file soft limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(max(want, soft), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Interrupted(BaseException):
    """SIGTERM/SIGHUP while benchmarking: unwinds like Ctrl-C so every teardown runs."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s in old:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Proc:
    """One child: a server, a worker or a load generator."""

    role: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    log_file: IO[bytes] | None = None
    cpu_mark: float = 0.0
    last_cpu: float = 0.0
    last_rss: int = 0
    last_hwm: int = 0
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def sample(self) -> None:
        """Read CPU and memory now (they are gone once the process is reaped)."""
        if not self.alive():
            return
        with contextlib.suppress(OSError, ValueError):
            self.last_cpu = proc_cpu(self.pid)
            rss, hwm = proc_memory(self.pid)
            if hwm:
                self.last_rss, self.last_hwm = rss, hwm

    def mark(self) -> None:
        """Start of a measured window: CPU is counted from here."""
        self.sample()
        self.cpu_mark = self.last_cpu

    @property
    def cpu_since_mark(self) -> float:
        return max(self.last_cpu - self.cpu_mark, 0.0)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class ProcGroup:
    """Every child started for one deployment; ``close()`` ends them all."""

    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        role: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: str | Path | None = None,
        stdout: int | None = None,
    ) -> Proc:
        log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        out: int | IO[bytes] = subprocess.DEVNULL
        if stdout is not None:
            out = stdout
        elif log_file is not None:
            out = log_file
        popen = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=log_file if log_file is not None else subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the bench only; it tears down in order
            preexec_fn=_preexec,  # a prctl call: takes no lock between fork and exec
        )
        proc = Proc(role, list(argv), popen, log_path, log_file)
        self.procs.append(proc)
        return proc

    def sample(self) -> None:
        for p in self.procs:
            p.sample()

    def mark(self) -> None:
        for p in self.procs:
            p.mark()

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        _terminate(proc, grace)

    def close(self, grace: float = 10.0) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.sample()
        # Ask all at once, then wait: shutdowns overlap instead of adding up.
        for p in reversed(self.procs):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            _terminate(p, max(deadline - time.monotonic(), 0.1))


def _signal_group(proc: Proc, sig: int) -> None:
    if proc.popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _terminate(proc: Proc, grace: float) -> None:
    if proc.popen.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
    proc.exit_code = proc.popen.returncode
    if proc.log_file is not None:
        proc.log_file.close()
        proc.log_file = None


def python_argv(*args: str) -> list[str]:
    """This interpreter, so children run the same venv as the bench."""
    return [sys.executable, *args]


def tether_argv(*args: str) -> list[str]:
    """``tether …`` through this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "tether.cli", *args]


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
