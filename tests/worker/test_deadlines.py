"""The hot path's deadline watch (worker/deadlines.py)."""

from __future__ import annotations

import threading
import time

from worker.deadlines import DeadlineWatch
from worker.supervision import Supervisor


def test_each_deadline_expires_once_in_order():
    expired: list[str] = []
    done = threading.Event()

    def on_expired(job_id: str) -> None:
        expired.append(job_id)
        if len(expired) == 2:
            done.set()

    watch = DeadlineWatch(on_expired, live={"a": 1, "b": 1}, supervisor=Supervisor())
    watch.start()
    now = time.monotonic()
    watch.add(now + 0.2, "b")
    watch.add(now + 0.05, "a")
    try:
        assert done.wait(5), expired
        assert expired == ["a", "b"]
    finally:
        watch.stop()
        watch.thread.join(5)
    assert not watch.thread.is_alive()
