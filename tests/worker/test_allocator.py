"""glibc malloc thresholds (worker.allocator): tensors that grow step by step stop page-faulting in afresh.

Each case runs in its own Python process, since the thresholds are process-wide. The allocation pattern is a
continuous batching step's: a thread allocates a tensor a little larger than the last one, step after step (a
KV gather grows by one token per request), which glibc's dynamic mmap threshold serves with a fresh ``mmap`` every
time. Measured on the 2-core VM: 122,011 minor page faults with glibc's defaults, 2,437 tuned; in a worker serving
``benchmarks.generation``'s 4-layer model, 0.88-0.92 million faults and 1.5 s of system time per pass before,
under 1,200 faults after.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.fleet import REPO_ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

GROWING_TENSORS = """
import resource, sys, threading
import torch
from worker.allocator import keep_large_allocations
tuned = keep_large_allocations() if sys.argv[1] == "tuned" else None

def steps():
    for step in range(300):
        tensor = torch.empty(262_144 + 1024 * step).fill_(1.0)  # 1 MiB, 4 KiB more each step
        del tensor

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(mode: str, **env: str) -> tuple[str, int]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    completed = subprocess.run([sys.executable, "-c", GROWING_TENSORS, mode], cwd=REPO_ROOT, env={**clean, **env},
                               capture_output=True, text=True, timeout=120, check=True)
    tuned, faults = completed.stdout.split()
    return tuned, int(faults)


def test_tensors_growing_step_by_step_fault_in_once_with_the_worker_thresholds():
    _, default_faults = run("default")
    tuned, tuned_faults = run("tuned")
    assert tuned == "True"
    # 300 steps of 1 to 2.2 MiB touch about 120,000 fresh pages when each one is a new mapping.
    assert default_faults > 50_000, f"glibc's defaults did not fault as expected here ({default_faults})"
    assert tuned_faults * 10 < default_faults, (tuned_faults, default_faults)


def test_a_glibc_variable_the_user_set_is_left_alone():
    tuned, _ = run("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False"
