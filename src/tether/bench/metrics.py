"""What the kernel says about processes and the machine: CPU time, memory, load (``/proc``)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def proc_cpu(pid: int | str = "self") -> float:
    """utime + stime of one process, in seconds (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; (0, 0) for a process that is gone or has no memory map."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, hwm


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # already counted in user/nice, so it is left out of the total.
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total - idle, total


def cpu_count() -> int:
    return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "cpus": cpu_count(),
        "cpu_model": model,
        "mem_total_mib": round(mem_total / MIB),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


@dataclass
class Window:
    """The machine between ``start()`` and ``stop()``: wall time, load, CPU busy share."""

    t0: float = 0.0
    t1: float = 0.0
    busy0: int = 0
    total0: int = 0
    busy1: int = 0
    total1: int = 0
    load0: tuple[float, ...] = ()
    load1: tuple[float, ...] = ()
    self_cpu0: float = 0.0
    self_cpu1: float = 0.0

    def start(self) -> Window:
        self.t0 = time.monotonic()
        self.busy0, self.total0 = cpu_jiffies()
        self.load0 = tuple(loadavg())
        self.self_cpu0 = proc_cpu()
        return self

    def stop(self) -> Window:
        self.t1 = time.monotonic()
        self.busy1, self.total1 = cpu_jiffies()
        self.load1 = tuple(loadavg())
        self.self_cpu1 = proc_cpu()
        return self

    @property
    def wall(self) -> float:
        return self.t1 - self.t0

    @property
    def busy_core_seconds(self) -> float:
        return (self.busy1 - self.busy0) / CLK_TCK

    @property
    def busy_pct(self) -> float:
        total = self.total1 - self.total0
        return 100.0 * (self.busy1 - self.busy0) / total if total else 0.0

    def summary(self, accounted_cpu: float) -> dict[str, Any]:
        """``accounted_cpu``: CPU seconds of the servers and load generators in the window;
        the rest of the busy time is other work on the machine (other people's tests)."""
        own = accounted_cpu + (self.self_cpu1 - self.self_cpu0)
        capacity = self.wall * cpu_count()
        foreign = max(self.busy_core_seconds - own, 0.0)
        return {
            "wall_s": round(self.wall, 3),
            "loadavg_start": list(self.load0),
            "loadavg_end": list(self.load1),
            "busy_pct": round(self.busy_pct, 1),
            "bench_cpu_pct": round(100.0 * own / capacity, 1) if capacity else 0.0,
            "foreign_cpu_pct": round(100.0 * foreign / capacity, 1) if capacity else 0.0,
        }
