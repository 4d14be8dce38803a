"""CPU time of each thread of a running process, by its Python thread name (Linux).

``/proc/<pid>/task/<tid>/stat`` gives every thread's CPU time; the names come
from one ``py-spy dump`` (Python 3.11 does not pass thread names to the OS).
Threads py-spy does not list (torch's OpenMP pool and other native threads)
are summed as ``NATIVE``. Unlike a sampling profile this stops nothing, so
the run it measures keeps its speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

NATIVE = "native threads (torch's OpenMP pool, …)"
"""The name under which threads without a Python name are summed."""

_TICK = os.sysconf("SC_CLK_TCK")


def python_thread_names(pid: int) -> dict[str, str]:
    """``{tid: Python thread name}`` of ``pid`` from ``py-spy dump``; empty without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {tid: name for tid, name in re.findall(r'Thread (\d+) \([^)]*\): "([^"]*)"', dump)}


def cpu_seconds(pid: int, names: dict[str, str]) -> Counter:
    """CPU seconds (user + system) each named thread of ``pid`` has used so far; unnamed ones under NATIVE."""
    used: Counter = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        used[names.get(tid, NATIVE)] += (int(fields[11]) + int(fields[12])) / _TICK
    return used


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def subtract(after: Counter, before: Counter) -> Counter:
    """CPU seconds each thread used between two readings."""
    return Counter({name: after[name] - before.get(name, 0.0) for name in after})


def share_of_wall(before: Counter, after: Counter, wall_s: float) -> dict[str, float]:
    """Each thread's CPU between two readings as a share of ``wall_s`` (1.0 = one core all along), largest first."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    return {name: round(seconds / wall_s, 3) for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])
            if seconds > 0}
