"""What waking another process or thread costs on this machine, back to back and after a pause.

    python -m benchmarks.wake_cost [--n 300] [--gap-ms 20]

An idle job crosses about ten wake-ups between processes and threads (client → redis-server → the worker's
watcher → its claim thread → redis-server → the inference thread → the commit thread → redis-server → the
client). In-process ``pipe(x)`` crosses none. This measures one of each kind, p50 over ``--n`` tries, both
back to back and after a ``--gap-ms`` pause (the idle rows of ``benchmarks.ceiling`` pause 20 ms):

- a Redis ``PING`` round trip (redis-py, one connection);
- the ``send`` of a command alone (its reply read later, untimed): what waking redis-server costs the sender;
- a hand-off between two threads of one process (``queue.SimpleQueue``), from ``put`` to the other thread
  running.

It also prints the kernel's cpuidle driver and governor, and the guest halt-polling window when the machine is a
KVM guest with ``haltpoll``: a vCPU that halts at once when idle must be woken by the host, which is what a
pause makes every one of these cost.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from pathlib import Path

from tests.fleet import RedisServer


def _p50_us(samples: list[float]) -> float:
    return round(1e6 * statistics.median(samples), 1)


def ping_round_trip(client, n: int, gap_s: float) -> float:
    """p50 µs of ``PING`` with ``gap_s`` before each."""
    samples = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - started)
    return _p50_us(samples)


def send_alone(client, n: int, gap_s: float) -> float:
    """p50 µs of sending a ``PING`` without waiting for its reply (read afterwards, untimed)."""
    connection = client.connection_pool.get_connection()
    samples = []
    try:
        for _ in range(n):
            if gap_s:
                time.sleep(gap_s)
            started = time.perf_counter()
            connection.send_command("PING")
            samples.append(time.perf_counter() - started)
            connection.read_response()
    finally:
        client.connection_pool.release(connection)
    return _p50_us(samples)


def thread_hand_off(n: int, gap_s: float) -> float:
    """p50 µs from ``put`` on one thread to the waiting thread running with the item."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    samples: list[float] = []

    def consume() -> None:
        while (sent := inbox.get()) is not None:
            samples.append(time.perf_counter() - sent)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for _ in range(n):
        time.sleep(gap_s or 0.0005)  # back to back still lets the consumer go back to waiting
        inbox.put(time.perf_counter())
    inbox.put(None)
    consumer.join()
    return _p50_us(samples)


def idle_settings() -> dict[str, str]:
    """The cpuidle driver and governor, and haltpoll's parameters where present."""
    found = {}
    for name in ("current_driver", "current_governor"):
        path = Path("/sys/devices/system/cpu/cpuidle") / name
        found[name] = path.read_text().strip() if path.exists() else "n/a"
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    if poll.exists():
        found["guest_halt_poll_ns"] = poll.read_text().strip()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    gap_s = args.gap_ms / 1000
    print("idle settings:", ", ".join(f"{key} {value}" for key, value in idle_settings().items()))
    server = RedisServer().start()
    try:
        client = server.client(0)
        client.ping()
        rows = [("Redis PING round trip", lambda gap: ping_round_trip(client, args.n, gap)),
                ("send of a command alone (wakes redis-server)", lambda gap: send_alone(client, args.n, gap)),
                ("hand-off between two threads", lambda gap: thread_hand_off(args.n, gap))]
        print(f"{'p50, microseconds':<46} {'back to back':>13} {f'after {args.gap_ms:g} ms':>13}")
        for label, measure in rows:
            print(f"{label:<46} {measure(0.0):>13} {measure(gap_s):>13}", flush=True)
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
