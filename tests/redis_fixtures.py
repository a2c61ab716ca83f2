"""A real redis-server on a free loopback port, which tests may kill and restart (never the machine's own Redis);
a primary + replica + three Sentinels (`SentinelSet`), and a three-master Redis Cluster (`RedisClusterSet`), each
also TLS only (`tls=True`: every node, Sentinel, replication link and cluster bus on TLS, one CA for all).

It runs with an append-only file in a temp dir and `appendfsync always`, the durability the service
documents: an acknowledged catalog write survives a kill -9 and restart. Optionally with a password and/or
TLS only (a throwaway CA and server certificate for 127.0.0.1, made with `cryptography`).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("nezha test CA")).issuer_name(name("nezha test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


class RedisServer:
    def __init__(self, data_dir: Path, persistent: bool = True, password: str | None = None,
                 tls: bool = False, extra_args: Sequence[str] = (),
                 tls_files: tuple[Path, Path, Path] | None = None) -> None:
        """`tls_files` (ca, cert, key) shared by servers that talk TLS to each other (replication, cluster bus);
        `tls=True` alone makes this server its own CA."""
        self.port = free_port()
        self.password = password
        self.extra_args = list(extra_args)  # e.g. --replicaof, --cluster-enabled
        self.tls_files = tls_files or (write_tls_files(data_dir / "tls") if tls else None)
        self.dir = data_dir
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_files is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_files[0]}&ssl_cert_reqs=required"

    def _client_options(self) -> dict[str, Any]:
        tls = {} if self.tls_files is None else {"ssl": True, "ssl_ca_certs": str(self.tls_files[0])}
        return {"host": "127.0.0.1", "port": self.port, "password": self.password, **tls}

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
             *(["--requirepass", self.password] if self.password else []), *self._tls_args(), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(**self._client_options(), socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.dir}/redis.log") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """kill -9: no shutdown save, the harshest restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(**self._client_options(), decode_responses=True)

    def _tls_args(self) -> list[str]:
        """TLS only: the plain port is closed, clients need no certificate of their own."""
        if self.tls_files is None:
            return []
        ca, cert, key = (str(p) for p in self.tls_files)
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class SentinelSet:
    """A primary, a replica and three Sentinels (quorum 2) monitoring them as service `name`, all on loopback.

    Sentinel marks a primary down after `down_after_ms` without an answer and promotes the replica; the test
    kills the primary with `kill_primary` (kill -9) and reads who is primary now with `primary_port`.
    With `tls=True` the servers and the Sentinels listen on TLS only, replicate over TLS, and the Sentinels reach
    the servers and each other over TLS.
    """

    def __init__(self, data_dir: Path, name: str = "nezha", down_after_ms: int = 500,
                 failover_timeout_ms: int = 2000, tls: bool = False) -> None:
        self.name, self.dir = name, data_dir
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.tls_files = write_tls_files(data_dir / "tls") if tls else None
        # No wait before a full sync (Redis waits 5 s for more replicas by default): a replica syncs at once.
        self.server_args = ["--repl-diskless-sync-delay", "0", *(["--tls-replication", "yes"] if tls else [])]
        self.primary = RedisServer(data_dir / "primary", extra_args=self.server_args, tls_files=self.tls_files)
        self.replica: RedisServer | None = None
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.servers: list[RedisServer] = [self.primary]

    @property
    def url(self) -> str:
        """The URL as docs/operations.md writes it: `rediss+sentinel://...?ssl_ca_certs=` with TLS."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        if self.tls_files is None:
            return f"redis+sentinel://{hosts}/{self.name}"
        return f"rediss+sentinel://{hosts}/{self.name}?ssl_ca_certs={self.tls_files[0]}"

    def sentinel_client(self, port: int) -> redis.Redis:
        tls = {} if self.tls_files is None else {"ssl": True, "ssl_ca_certs": str(self.tls_files[0])}
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True, **tls)

    def _sentinel_listen(self, port: int) -> str:
        """sentinel.conf lines: where it listens, and (TLS) over what it reaches the servers and the other Sentinels."""
        if self.tls_files is None:
            return f"port {port}\n"
        ca, cert, key = self.tls_files
        return (f"port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n"
                "tls-auth-clients no\ntls-replication yes\n")

    def start(self, timeout: float = 20.0) -> None:
        self.primary.start()
        self.replica = RedisServer(self.dir / "replica", tls_files=self.tls_files,
                                   extra_args=["--replicaof", "127.0.0.1", str(self.primary.port), *self.server_args])
        self.replica.start()
        self.servers.append(self.replica)
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(f"{self._sentinel_listen(port)}bind 127.0.0.1\ndir {conf.parent}\n"
                            f"logfile {conf.parent}/sentinel.log\n"
                            f"sentinel monitor {self.name} 127.0.0.1 {self.primary.port} 2\n"
                            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
                            f"sentinel parallel-syncs {self.name} 1\n")
            self.sentinels.append(subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels did not see the primary and its replica; see {self.dir}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        """Every Sentinel knows the primary, the replica and the other two Sentinels; the replica is in sync."""
        try:
            for port in self.sentinel_ports:
                with self.sentinel_client(port) as s:
                    master = s.sentinel_master(self.name)
                    if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                        return False
            assert self.replica is not None
            return self.replica.client().info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels names it now (None: no majority)."""
        seen = []
        for port in self.sentinel_ports:
            try:
                with self.sentinel_client(port) as s:
                    seen.append(int(s.sentinel_get_master_addr_by_name(self.name)[1]))
            except (redis.RedisError, TypeError):
                continue
        best = max(set(seen), key=seen.count, default=None)
        return best if best is not None and seen.count(best) >= 2 else None

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def kill_primary(self) -> RedisServer:
        """kill -9 the current primary; returns it."""
        port = self.primary_port()
        assert port is not None
        victim = self.server_on(port)
        victim.kill()
        return victim

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for server in self.servers:
            server.kill()


def running(deployment: Any) -> Iterator[Any]:
    """Start a deployment (SentinelSet, RedisClusterSet), yield it, stop it whatever happened."""
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    yield from running(SentinelSet(tmp_path / "sentinel"))


@pytest.fixture
def tls_sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    yield from running(SentinelSet(tmp_path / "sentinel", tls=True))


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisClusterSet:
    """A Redis Cluster of `masters` primaries, each with `replicas` replicas, on loopback, created with
    `redis-cli --cluster create`; with `tls=True` TLS only (clients, cluster bus, replication)."""

    def __init__(self, data_dir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000,
                 tls: bool = False) -> None:
        self.replicas = replicas
        self.tls_files = write_tls_files(data_dir / "tls") if tls else None
        tls_args = ["--tls-cluster", "yes", "--tls-replication", "yes"] if tls else []
        self.nodes = [RedisServer(data_dir / f"node-{i}", persistent=False, tls_files=self.tls_files,
                                  extra_args=["--cluster-enabled", "yes", "--cluster-config-file",
                                              str(data_dir / f"node-{i}" / "nodes.conf"),
                                              "--cluster-node-timeout", str(node_timeout_ms),
                                              "--repl-diskless-sync-delay", "0",
                                              # the bus port is port + 10000 unless given: free ports run past that
                                              "--cluster-port", str(free_port()), *tls_args])
                      for i in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        """The URL as docs/operations.md writes it: `rediss+cluster://...?ssl_ca_certs=` with TLS."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        if self.tls_files is None:
            return f"redis+cluster://{hosts}"
        return f"rediss+cluster://{hosts}?ssl_ca_certs={self.tls_files[0]}"

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        tls = [] if self.tls_files is None else ["--tls", "--cacert", str(self.tls_files[0])]
        subprocess.run([REDIS_CLI, *tls, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=timeout)
        deadline = time.monotonic() + timeout
        while any(n.client().cluster("info").get("cluster_state") != "ok" for n in self.live_nodes()) or \
                not self._replicas_in_sync():
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    def _replicas_in_sync(self) -> bool:
        infos = [n.client().info("replication") for n in self.live_nodes()]
        return all(i.get("master_link_status") == "up" for i in infos if i.get("role") == "slave") and \
            sum(i.get("role") == "slave" for i in infos) == self.replicas * len(self.nodes) // (1 + self.replicas)

    def primary_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot now, as the live nodes' slot maps say."""
        for node in self.live_nodes():
            try:
                port = _slot_owner(node.client(), key)
            except redis.RedisError:
                continue
            return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no live node knows who serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _slot_owner(client: redis.Redis, key: str) -> int:
    """The port of the primary that `client`'s node says serves `key`'s slot (CLUSTER SLOTS)."""
    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if int(start) <= slot <= int(end):
            return int(primary[1])
    raise RuntimeError(f"slot {slot} has no primary")


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    yield from running(RedisClusterSet(tmp_path / "cluster"))


@pytest.fixture
def tls_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    yield from running(RedisClusterSet(tmp_path / "cluster", tls=True))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` every 20 ms until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
