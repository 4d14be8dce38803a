"""What a pause before a forward pass costs: the same one-item call, back to back and after other work.

    python -m benchmarks.cold_forward [--n 300]

The tiny text classifier of ``benchmarks.ceiling``, called in-process as the worker calls it
(``pipe([text], batch_size=1)``), with the thread's CPU time and the wall time of each call, p50:

- back to back (the in-process loop ``benchmarks.ceiling`` compares with);
- after a 5 ms sleep (an idle worker between two jobs);
- after 20 Redis round trips on the same thread (a worker's claim and commit between two forward passes);
- after 5 ms of Python on the same thread (no sleep: only the caches change).

Each row twice: through transformers' list path (a ``DataLoader`` for the one item), and as the worker runs
a one-item batch (:func:`worker.transformers_internals.run_one_item_lists_directly`: ``run_single``).

On the 2-core VM the call costs about twice as much after any of them: a job that finds the worker idle pays
for cold caches, in-process or on the fleet, which is why ``benchmarks.ceiling`` measures idle latency with a
pause on both sides.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from benchmarks.ceiling import ensure_tiny_model, texts
from tests.fleet import RedisServer
from worker.transformers_internals import run_one_item_lists_directly


def p50_ms(pipe, inputs: list[str], before: Callable[[], None]) -> tuple[float, float]:
    """p50 (thread CPU, wall) in ms of ``pipe([x], batch_size=1)``, each call after ``before()``."""
    for text in inputs[:20]:
        pipe([text], batch_size=1)
    cpu, wall = [], []
    for text in inputs:
        before()
        started, cpu_started = time.perf_counter(), time.thread_time()
        pipe([text], batch_size=1)
        cpu.append(time.thread_time() - cpu_started)
        wall.append(time.perf_counter() - started)
    cpu.sort()
    wall.sort()
    return 1000 * cpu[len(cpu) // 2], 1000 * wall[len(wall) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    import torch
    from transformers import pipeline

    torch.set_num_threads(1)  # as benchmarks.ceiling runs the worker and the in-process rows (OMP_NUM_THREADS=1)
    pipe = pipeline("text-classification", model=str(ensure_tiny_model()), device=-1)
    direct = pipeline("text-classification", model=str(ensure_tiny_model()), device=-1)
    run_one_item_lists_directly(direct)
    inputs = texts(args.n)
    server = RedisServer().start()
    try:
        client = server.client(0)

        def round_trips() -> None:
            for _ in range(20):
                client.ping()

        def spin() -> None:
            until = time.perf_counter() + 0.005
            while time.perf_counter() < until:
                pass

        for label, before in (("back to back", lambda: None), ("after a 5 ms sleep", lambda: time.sleep(0.005)),
                              ("after 20 Redis round trips", round_trips), ("after 5 ms of Python", spin)):
            for path, called in (("list path", pipe), ("run_single", direct)):
                cpu, wall = p50_ms(called, inputs, before)
                print(f"  {label:<28} {path:<11} cpu {cpu:6.3f} ms   wall {wall:6.3f} ms", flush=True)
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
