"""A real ``pipefleet gateway`` subprocess (uvicorn) on a free port."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.fleet import REPO_ROOT, free_port, worker_env

GATEWAY_START_TIMEOUT_S = 60.0


@dataclass
class GatewayProcess:
    """One running gateway; ``url`` is its base URL."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_gateway(config_path: Path, log_dir: Path, *, args: list[str] | None = None,
                  wait: bool = True) -> GatewayProcess:
    """Start ``pipefleet gateway --config ...``; with ``wait``, return once it answers ``/metrics``."""
    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    command = [sys.executable, "-m", "producers.cli", "gateway", "--config", str(config_path), "--port", str(port),
               "--log-level", "warning", *(args or [])]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env=worker_env())
    gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}", log_path)
    if not wait:
        return gateway
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gateway.log()[-4000:]}")
        try:
            if httpx.get(f"{gateway.url}/metrics", timeout=2).status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"gateway did not start:\n{gateway.log()[-4000:]}")
