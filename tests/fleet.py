"""Real infrastructure for the tests: a redis-server on a free port and ``pipefleet worker`` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import tomli_w

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` process; ``stop()``/``start()`` keep the same port and data."""

    def __init__(self, *, appendonly: bool = False, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pipefleet-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (run .ci/run, which installs it)")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                   "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        if self.password:
            command += ["--requirepass", self.password]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, password=self.password).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, password=self.password)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def write_config(path: Path, *, broker_url: str, result_backend: str, deployments: list[dict[str, Any]],
                 **settings: Any) -> Path:
    """Write a fleet TOML file."""
    data = {"broker_url": broker_url, "result_backend": result_backend, **settings, "deployments": deployments}
    path.write_text(tomli_w.dumps(data))
    return path


@dataclass
class WorkerProcess:
    """One running ``pipefleet worker`` subprocess."""

    proc: subprocess.Popen
    name: str
    log_path: Path
    deployments: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout_s: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a worker subprocess: offline hub, the repo importable."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra or {})
    return env


def start_worker(config_path: Path, log_dir: Path, *, deployments: list[str] | None = None, gpu: str = "none",
                 args: list[str] | None = None, env: dict[str, str] | None = None, name: str | None = None,
                 wait: bool = True, redis_client: redis.Redis | None = None) -> WorkerProcess:
    """Start a worker; with ``wait``, return once it advertises every deployment it serves."""
    name = name or f"w{free_port()}"
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", "worker", "--config", str(config_path), "--gpu", gpu, "--name", name,
               "--loglevel", "INFO", *(args or [])]
    for deployment in deployments or []:
        command += ["--deployment", deployment]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=worker_env(env))
    worker = WorkerProcess(proc, name, log_path, list(deployments or []))
    if wait:
        wait_for_worker(worker, redis_client)
    return worker


def wait_for_worker(worker: WorkerProcess, redis_client: redis.Redis, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
    """Block until the worker advertises (it is consuming), or fail with its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker {worker.name} exited with {worker.proc.returncode}:\n{worker.log()[-4000:]}")
        keys = redis_client.keys(f"pipefleet:ad:*:{worker.name}")
        if keys and (not worker.deployments or len(keys) >= len(worker.deployments)):
            return
        time.sleep(0.1)
    worker.kill()
    raise RuntimeError(f"worker {worker.name} did not become ready:\n{worker.log()[-4000:]}")


def held_job_ids(redis_client: redis.Redis, worker_name: str) -> set[str]:
    """Ids of the jobs whose messages ``worker_name``'s lease holds right now (claimed, not acked)."""
    import json

    tags = list(redis_client.hkeys(f"pipefleet:claims:{worker_name}"))
    if not tags:
        return set()
    ids = set()
    for record in redis_client.hmget("unacked", tags):
        if record:
            ids.add(json.loads(record)[0]["headers"]["id"])
    return ids


def job_log_counts(workers: list[WorkerProcess]) -> tuple[dict[str, int], dict[str, int]]:
    """``(stored, duplicate)``: per job id, how many runs stored a SUCCESS, and how many ran again after it.

    Read from every worker's log (the per-job lines of ``pipefleet.jobs``).
    """
    import re

    stored: dict[str, int] = {}
    again: dict[str, int] = {}
    for worker in workers:
        text = worker.log()
        for job_id in re.findall(r"job ([0-9a-f-]{36}) on \S+: SUCCESS", text):
            stored[job_id] = stored.get(job_id, 0) + 1
        for job_id in re.findall(r"job ([0-9a-f-]{36}) on \S+: DUPLICATE-", text):
            again[job_id] = again.get(job_id, 0) + 1
    return stored, again


def wait_until(predicate: Any, timeout_s: float = 60.0, what: Any = "the condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned), or fail after ``timeout_s``.

    ``what`` names the awaited thing in the failure; a callable is asked at failure time.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")


def control_replies(celery_app: Any, command: str, pick: Any, timeout_s: float = 60.0,
                    destination: list[str] | None = None) -> Any:
    """The first truthy ``pick(answer)`` among the workers' (or ``destination``'s) replies to remote-control
    ``command``.

    Broadcasts again until one answers: a worker advertises once it consumes its job queues, and
    on a busy machine its remote-control subscription (a Redis pub/sub fan-out, which keeps no
    message for a late subscriber) can start a moment later, or its reply can miss a short window.
    """

    def ask() -> Any:
        for reply in celery_app.control.broadcast(command, reply=True, timeout=2, destination=destination):
            for answer in reply.values():
                picked = pick(answer)
                if picked:
                    return picked
        return None

    return wait_until(ask, timeout_s, what=f"a worker's reply to {command}")


def deployment_metrics(celery_app: Any, deployment: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """``deployment``'s metrics as its worker's ``pipefleet_metrics`` reply reports them."""
    return control_replies(celery_app, "pipefleet_metrics", lambda answer: answer.get(deployment), timeout_s)
