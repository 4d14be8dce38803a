"""Supervision: a stalled or dead thread makes the worker unhealthy (advertisement, ``--check``), then exit non-zero."""

from __future__ import annotations

import threading
import time

from config import FleetConfig
from producers.schemas import DeploymentAd
from worker.health import check
from worker.supervision import EXIT_STALLED, EXIT_THREAD_DIED, Supervisor, guarded


def _thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_loop_that_stops_ticking_is_stalled_and_the_worker_exits_after_the_grace():
    exits: list[int] = []
    supervisor = Supervisor(stall_after_s=0.2, exit_after_s=0.3, exit=exits.append)
    release = threading.Event()
    supervisor.watch("ticking", _thread(lambda: release.wait(5)))
    supervisor.watch("busy-runner", _thread(lambda: release.wait(5)), ticks=False)
    assert supervisor.healthy() and supervisor.stalled() == []
    time.sleep(0.3)
    assert supervisor.stalled() == ["ticking"], "a thread that does not tick by design was called stalled"
    assert not supervisor.healthy() and not exits
    supervisor.tick("ticking")
    assert supervisor.healthy(), "a loop that went round again is healthy again"
    time.sleep(0.3)
    assert not supervisor.healthy()
    time.sleep(0.4)
    assert not supervisor.healthy()
    assert exits == [EXIT_STALLED]
    assert supervisor.liveness()["busy-runner"] == 0.0 and supervisor.liveness()["ticking"] > 0.2
    release.set()


def test_a_thread_that_died_is_stalled_unless_the_worker_is_stopping():
    supervisor = Supervisor(exit=lambda code: None)
    thread = _thread(lambda: None)
    thread.join()
    supervisor.watch("gone", thread)
    assert supervisor.stalled() == ["gone"] and supervisor.liveness()["gone"] == -1.0
    supervisor.stop()
    assert supervisor.stalled() == []


def test_a_guarded_thread_that_raises_exits_the_worker_non_zero(monkeypatch):
    import os

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)

    def boom() -> None:
        raise RuntimeError("a bug no loop caught")

    thread = threading.Thread(target=guarded("boom", boom))
    thread.start()
    thread.join()
    assert exits == [EXIT_THREAD_DIED]


def test_check_reports_a_stalled_thread_from_the_advertisement(redis_server, capsys):
    import socket

    client = redis_server.client(9)
    client.flushdb()
    config = FleetConfig(broker_url=f"{redis_server.url}/9", result_backend=f"{redis_server.url}/10")
    worker = f"pipefleet-{socket.gethostname()}-1"
    ad = DeploymentAd(name="sv", task="text-classification", model="m", worker=worker, device="cpu",
                      queue="pipefleet.sv", max_batch_size=1, healthy=True)
    client.set(f"pipefleet:ad:sv:{worker}", ad.model_dump_json(), ex=30)
    assert check(config, ["sv"]) == 0
    ad.healthy, ad.stalled = False, ["claim"]
    client.set(f"pipefleet:ad:sv:{worker}", ad.model_dump_json(), ex=30)
    capsys.readouterr()
    assert check(config, ["sv"]) == 1
    err = capsys.readouterr().err
    assert "stalled threads" in err and f"{worker}: claim" in err
    client.flushdb()
