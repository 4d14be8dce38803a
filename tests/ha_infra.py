"""Highly available Redis for the tests: a master, a replica and three Sentinels, all real redis-server processes.

    cluster = SentinelCluster(tmp_path).start()
    config = write_config(..., broker_url=cluster.url(0), result_backend=cluster.url(1),
                          sentinel_master_name=cluster.master_name)
    cluster.kill_master()          # SIGKILL; the Sentinels promote the replica
    cluster.restart_old_master()   # comes back empty; the Sentinels turn it into a replica
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.fleet import free_port

MASTER_NAME = "pipefleet-ha"
"""The name the Sentinels monitor the master under (``sentinel_master_name``)."""

DOWN_AFTER_MS = 1000
"""How long the master may be silent before a Sentinel calls it down."""

FAILOVER_TIMEOUT_MS = 4000
"""Sentinel's failover timeout (also the pause before a second failover attempt)."""


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (run .ci/run, which installs it)")
    return binary


class RedisProcess:
    """One redis-server (or Sentinel) process on a fixed port; ``start()`` again after a kill reuses the port."""

    def __init__(self, directory: Path, name: str, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> "RedisProcess":
        log = open(self.directory / "log.txt", "ab")
        self.proc = subprocess.Popen([_binary(), *args], cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self.log()[-2000:]}")

    def log(self) -> str:
        path = self.directory / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_connect_timeout=2)

    def kill(self) -> int:
        """SIGKILL the process; returns its exit status (``-9``)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _server_args(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]


class SentinelCluster:
    """A master, one replica and three Sentinels on free ports."""

    def __init__(self, directory: Path, *, master_name: str = MASTER_NAME) -> None:
        self.directory = directory
        self.master_name = master_name
        self.servers = [RedisProcess(directory, "redis-a"), RedisProcess(directory, "redis-b")]
        self.sentinels = [RedisProcess(directory, f"sentinel-{i}") for i in range(3)]
        self.first_master = self.servers[0]

    def start(self) -> "SentinelCluster":
        master, replica = self.servers
        master.start(*_server_args(master.port))
        replica.start(*_server_args(replica.port, "--replicaof", "127.0.0.1", str(master.port)))
        self.wait_for_replication(master, replica)
        for sentinel in self.sentinels:
            conf = sentinel.directory / "sentinel.conf"
            conf.write_text("\n".join([
                f"port {sentinel.port}", "bind 127.0.0.1", f"dir {sentinel.directory}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {self.master_name} 1", ""]))
            sentinel.start(str(conf), "--sentinel")
        self.wait_for_sentinels()
        return self

    def url(self, db: int) -> str:
        """The ``sentinel://h1:p1/db;sentinel://h2:p2/db;…`` URL of database ``db``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def master_port(self) -> int:
        """The port the Sentinels name as master now."""
        host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.master_name)
        return int(port)

    def master(self) -> RedisProcess:
        """The server the Sentinels name as master now."""
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def kill_master(self) -> RedisProcess:
        """SIGKILL the current master; returns it (its ``proc.returncode`` is ``-9``)."""
        victim = self.master()
        victim.kill()
        return victim

    def wait_for_failover(self, old: RedisProcess, timeout_s: float = 30.0) -> RedisProcess:
        """Block until every Sentinel names another master than ``old``; returns the new master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ports = {int(s.client().sentinel_get_master_addr_by_name(self.master_name)[1])
                         for s in self.sentinels}
            except redis.RedisError:
                ports = set()
            if len(ports) == 1 and old.port not in ports:
                new = next(server for server in self.servers if server.port in ports)
                if new.client().info("replication")["role"] == "master":
                    return new
            time.sleep(0.1)
        raise RuntimeError("the Sentinels did not fail over:\n" + self.sentinels[0].log()[-3000:])

    def restart_old_master(self, old: RedisProcess, timeout_s: float = 60.0) -> None:
        """Start ``old`` again, empty, and wait until the Sentinels made it a replica that caught up."""
        old.start(*_server_args(old.port))
        new = self.master()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = old.client().info("replication")
            if info["role"] == "slave" and int(info.get("master_port", 0)) == new.port \
                    and info.get("master_link_status") == "up":
                return
            time.sleep(0.1)
        raise RuntimeError(f"{old.name} did not become a replica:\n{self.sentinels[0].log()[-3000:]}")

    @staticmethod
    def wait_for_replication(master: RedisProcess, replica: RedisProcess, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if replica.client().info("replication").get("master_link_status") == "up":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{replica.name} did not sync with {master.name}:\n{replica.log()[-2000:]}")

    def wait_for_sentinels(self, timeout_s: float = 20.0) -> None:
        """Block until every Sentinel sees the replica and the two other Sentinels."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = all(int(s.client().sentinel_master(self.master_name)["num-other-sentinels"]) == 2
                            and int(s.client().sentinel_master(self.master_name)["num-slaves"]) == 1
                            for s in self.sentinels)
            except (redis.RedisError, KeyError):
                ready = False
            if ready:
                return
            time.sleep(0.1)
        raise RuntimeError("the Sentinels did not find each other:\n" + self.sentinels[0].log()[-3000:])

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
