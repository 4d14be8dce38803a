"""The engine alone while another process takes a small share of the CPU: what co-located work costs it.

    python -m benchmarks.engine_contention [--size tiny] [--rounds 6]

``benchmarks.generation`` compares the fleet with transformers' engine alone in one process. The fleet's
worker runs the same engine, plus its own threads (claim, commit, collector, event writer), beside the
benchmark's client and redis-server, all on the same cores; the engine alone runs with the machine to itself.
This script measures what that difference in company costs the engine by itself, with no fleet at all: the
same 64 throughput requests through :class:`benchmarks.generation.EngineAlone`, with and without a side
process that spins for ``on`` ms of every ``period`` ms (short bursts, as the worker's threads and a client
take the CPU), its loads alternating within each round. torch's OpenMP threads meet at a barrier every
operation, so a burst that takes a core from one of them stalls the other as well.

Prints, per side load, the median tokens/s over ``--rounds`` and its ratio to the engine with no side load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks.generation import EngineAlone, build_model

SIDE_LOADS = ((0.0, 0.0), (0.5, 5.0), (1.0, 10.0), (1.0, 5.0))
"""``(on_ms, period_ms)``: the side process spins ``on_ms`` of every ``period_ms`` (none, then 0.1, 0.1, 0.2 core)."""

BURNER = """import time
on, period = {on} / 1000, {period} / 1000
while True:
    started = time.perf_counter()
    while time.perf_counter() - started < on:
        pass
    time.sleep(period - on)
"""


def side_process(on_ms: float, period_ms: float) -> subprocess.Popen | None:
    """A process that spins ``on_ms`` of every ``period_ms``; None for no side load."""
    if not on_ms:
        return None
    return subprocess.Popen([sys.executable, "-c", BURNER.format(on=on_ms, period=period_ms)])


def label(on_ms: float, period_ms: float) -> str:
    """How a side load reads in the table."""
    if not on_ms:
        return "none"
    return f"{on_ms:g} ms of every {period_ms:g} ms ({on_ms / period_ms:.2f} core)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="a model size of benchmarks.generation (default tiny)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    passes: dict[tuple[float, float], list[float]] = {load: [] for load in SIDE_LOADS}
    with EngineAlone(build_model(args.size), args.device) as engine:
        engine.measure()  # first-time costs
        for round_index in range(args.rounds):
            for load in SIDE_LOADS:
                side = side_process(*load)
                try:
                    time.sleep(0.2)
                    passes[load].append(engine.measure())
                finally:
                    if side is not None:
                        side.kill()
                        side.wait()
            print("round", round_index, json.dumps({label(*load): runs[-1] for load, runs in passes.items()}),
                  flush=True)
    alone = statistics.median(passes[SIDE_LOADS[0]])
    print(f"{'side load':<40} {'tokens/s (median)':>18} {'vs none':>8}")
    for load, runs in passes.items():
        median = statistics.median(runs)
        print(f"{label(*load):<40} {median:>18.1f} {median / alone:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
