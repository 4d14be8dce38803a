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

    def __init__(self, directory: Path, name: str, *, port: int | None = None,
                 tls: "TlsCertificates | None" = None) -> None:
        self.port = port or free_port()
        self.directory = directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.tls = tls
        """With certificates, the process listens on ``port`` over TLS only, and its clients here use them."""
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> "RedisProcess":
        log = open(self.directory / "log.txt", "ab")
        self.proc = subprocess.Popen([_binary(), *args], cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self.log()[-2000:]}")

    def log(self) -> str:
        path = self.directory / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, db: int = 0) -> redis.Redis:
        tls = {"ssl": True, **self.tls.client_kwargs()} if self.tls else {}
        return redis.Redis(port=self.port, db=db, socket_connect_timeout=2, **tls)

    def listen_args(self) -> list[str]:
        """redis-server's arguments for this process's port: plain, or TLS only (``port 0``)."""
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]

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


def _server_args(process: RedisProcess, *extra: str) -> list[str]:
    return [*process.listen_args(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]


class SentinelCluster:
    """A master, one replica and three Sentinels on free ports; with ``tls``, every one of them TLS only."""

    def __init__(self, directory: Path, *, master_name: str = MASTER_NAME,
                 tls: "TlsCertificates | None" = None) -> None:
        self.directory = directory
        self.master_name = master_name
        self.tls = tls
        self.servers = [RedisProcess(directory, "redis-a", tls=tls), RedisProcess(directory, "redis-b", tls=tls)]
        self.sentinels = [RedisProcess(directory, f"sentinel-{i}", tls=tls) for i in range(3)]
        self.first_master = self.servers[0]

    def start(self) -> "SentinelCluster":
        master, replica = self.servers
        master.start(*_server_args(master))
        replica.start(*_server_args(replica, "--replicaof", "127.0.0.1", str(master.port)))
        self.wait_for_replication(master, replica)
        for sentinel in self.sentinels:
            conf = sentinel.directory / "sentinel.conf"
            listen = sentinel.listen_args()
            conf.write_text("\n".join([
                *(f"{listen[i][2:]} {listen[i + 1]}" for i in range(0, len(listen), 2)),
                "bind 127.0.0.1", f"dir {sentinel.directory}",
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
        old.start(*_server_args(old))
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


ACL_CATEGORIES = ("+@connection +@read +@write +@keyspace +@list +@hash +@string +@set +@sortedset +@stream "
                  "+@pubsub +@scripting +@transaction -@dangerous +wait +info +time")
"""The commands pipefleet needs: data commands, pub/sub, scripts and transactions, WAIT; nothing @dangerous."""

ACL_KEY_PATTERNS = "~pipefleet* ~celery* ~unacked* ~_kombu.* ~*.celery.pidbox*"
"""The keys pipefleet, Celery and kombu write: queues, results, claims, bindings, control replies."""


def pipefleet_acl_line(user: str, password: str) -> str:
    """The ACL rule of a user limited to what pipefleet needs (docs/production.md shows the same line)."""
    return f"user {user} on >{password} resetkeys {ACL_KEY_PATTERNS} resetchannels &* -@all {ACL_CATEGORIES}"


class TlsCertificates:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, written as PEM files."""

    def __init__(self, directory: Path) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(common: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        def write_key(key, path: Path) -> Path:
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            return path

        def write_cert(cert, path: Path) -> Path:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("pipefleet test CA")).issuer_name(name("pipefleet test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca_file = write_cert(ca, directory / "ca.pem")

        def issue(common: str, usage, san=None):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(minutes=5))
                       .not_valid_after(now + datetime.timedelta(days=1))
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        server_key, server = issue("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.server_cert = write_cert(server, directory / "server.pem")
        self.server_key = write_key(server_key, directory / "server.key")
        client_key, client = issue("pipefleet client", ExtendedKeyUsageOID.CLIENT_AUTH)
        self.client_cert = write_cert(client, directory / "client.pem")
        self.client_key = write_key(client_key, directory / "client.key")

    def client_kwargs(self) -> dict[str, str]:
        """redis-py's TLS files for a client that verifies the server and shows its own certificate."""
        return {"ssl_ca_certs": str(self.ca_file), "ssl_certfile": str(self.client_cert),
                "ssl_keyfile": str(self.client_key)}

    def server_args(self) -> list[str]:
        """redis-server's TLS arguments: clients must show a certificate, and replication and Sentinel's own
        connections to the servers use TLS with the client certificate."""
        return ["--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
                "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "yes", "--tls-replication", "yes",
                "--tls-client-cert-file", str(self.client_cert), "--tls-client-key-file", str(self.client_key)]


class TlsAclRedis:
    """A redis-server reachable only over TLS (client certificates required), with the default user off.

    ``user``/``password`` is the least-privilege pipefleet user (:func:`pipefleet_acl_line`);
    ``admin`` may do anything (the tests use it to look inside).
    """

    def __init__(self, directory: Path, *, user: str = "pipefleet", password: str = "pipefleet-secret-1") -> None:
        self.certs = TlsCertificates(directory / "tls")
        self.user, self.password = user, password
        self.admin_password = "admin-secret-1"
        self.process = RedisProcess(directory, "redis-tls")
        self.port = self.process.port
        self.acl_line = pipefleet_acl_line(user, password)

    def start(self) -> "TlsAclRedis":
        conf = self.process.directory / "redis.conf"
        conf.write_text("\n".join([
            "port 0", f"tls-port {self.port}", "bind 127.0.0.1", 'save ""', "appendonly no",
            f"tls-cert-file {self.certs.server_cert}", f"tls-key-file {self.certs.server_key}",
            f"tls-ca-cert-file {self.certs.ca_file}", "tls-auth-clients yes",
            "user default off", f"user admin on >{self.admin_password} ~* &* +@all", self.acl_line, ""]))
        log = open(self.process.directory / "log.txt", "ab")
        self.process.proc = subprocess.Popen([_binary(), str(conf)], cwd=self.process.directory, stdout=log,
                                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.admin().ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"TLS redis-server did not start:\n{self.process.log()[-2000:]}")

    def ssl_kwargs(self) -> dict[str, str]:
        return self.certs.client_kwargs()

    def url(self, db: int) -> str:
        """``rediss://pipefleet:…@127.0.0.1:port/db``: the least-privilege user."""
        return f"rediss://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def admin(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, username="admin", password=self.admin_password, ssl=True,
                           socket_connect_timeout=2, **self.ssl_kwargs())

    def stop(self) -> None:
        self.process.stop()
