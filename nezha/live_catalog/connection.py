"""Redis connections by URL for the live catalog: one server, Sentinel, or Cluster.

    redis://[[user]:password@]host[:port][/db][?options]                one server (rediss:// for TLS, unix://)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[?db=N&sentinel_password=...]
    redis+cluster://[[user]:password@]host:port[,host:port...][?options]
    rediss+sentinel://, rediss+cluster://                                TLS to every node (and every Sentinel)

The user and password are the data nodes'; Sentinels that have their own take `sentinel_username` /
`sentinel_password`. TLS options as redis-py names them: `ssl_ca_certs`, `ssl_cert_reqs`, `ssl_certfile`,
`ssl_keyfile`, `ssl_check_hostname`. Two options are nezha's, read here and not passed to redis-py:
`min_replicas` (replicas an admin write must reach before it is answered; default 1 when the primary has
a replica online, 0 for a lone server) and `wait_timeout_ms` (how long a write waits for them, 1000).

Each deployment gives one stable `redis.Redis` whose connections reach the current primary of the
catalog's keys: the server; the master Sentinel names now (redis-py's SentinelConnectionPool asks on every
new connection, and a demoted master's READONLY drops the connection); in a Cluster the primary of the
hash slot of the catalog's hash tag (the slot map is read again after a connection error, MOVED or
CLUSTERDOWN). All keys of one catalog share the tag, so its scripts, pipelines and WAIT run on one node
exactly as on a single server.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool, SSLConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    TryAgainError,
)
from redis.retry import Retry

from nezha.config import ConfigError

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
SECRET_OPTIONS = ("password", "sentinel_password")
DEFAULT_WAIT_TIMEOUT_MS = 1000

# What a failover looks like to a client: the connection drops or is refused, no master is known yet, the
# server we reach was demoted (READONLY, MASTERDOWN), or the cluster is re-electing (CLUSTERDOWN, TRYAGAIN,
# MOVED). A write that meets one of these may or may not have been applied; it is worth retrying.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, ReadOnlyError, MasterDownError, ClusterDownError, TryAgainError,
    AskError, ClusterError)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed catalog URL: which kind of deployment, where, and with which credentials and options."""

    kind: str  # single | sentinel | cluster
    url: str  # single: the URL for redis-py (nezha's options removed)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # TLS and sentinel_* options
    min_replicas: int | None = None
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS


def redact_url(url: str) -> str:
    """The URL with any password (in the authority or a `password=`/`sentinel_password=` option) replaced by ***."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = urlencode([(k, "***" if k in SECRET_OPTIONS else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _int_option(options: dict[str, str], name: str, shown: str) -> int | None:
    value = options.pop(name, None)
    if value is None:
        return None
    if not value.isdigit():
        raise ConfigError(f"Redis URL {shown}: {name}={value!r} is not a non-negative integer")
    return int(value)


def _hosts(hostlist: str, default_port: int, shown: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for part in (p.strip() for p in hostlist.split(",")):
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else str(default_port)
        else:
            host, colon, port = part.rpartition(":")
            host, port = (host, port) if colon else (part, str(default_port))
        if not host or not port.isdigit():
            raise ConfigError(f"Redis URL {shown}: {part!r} is not host:port (give host:port[,host:port...])")
        hosts.append((host, int(port)))
    return tuple(hosts)


def parse_redis_url(url: str) -> RedisTarget:
    """The deployment a catalog URL names; ConfigError (one line, password hidden) when it is malformed."""
    shown = redact_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ConfigError(f"Redis URL {shown}: scheme {parts.scheme!r} is not one of redis://, rediss://, unix://, "
                          "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    min_replicas = _int_option(options, "min_replicas", shown)
    wait_ms = _int_option(options, "wait_timeout_ms", shown)
    wait_timeout_ms = DEFAULT_WAIT_TIMEOUT_MS if wait_ms is None else wait_ms
    if scheme in SINGLE_SCHEMES:
        if scheme != "unix" and not parts.netloc.rpartition("@")[2]:
            raise ConfigError(f"Redis URL {shown}: no host (redis://host:port/db)")
        plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(options), parts.fragment))
        return RedisTarget("single", plain, min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
    kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if not hostlist:
        raise ConfigError(f"Redis URL {shown}: no host (give host:port[,host:port...])")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    hosts = _hosts(hostlist, DEFAULT_PORTS[kind], shown)
    path = unquote(parts.path.strip("/"))
    db = _int_option(options, "db", shown) or 0
    if kind == "sentinel":
        if not path or "/" in path:
            raise ConfigError(f"Redis URL {shown}: name the Sentinel service as the path "
                              "(redis+sentinel://host:26379[,host:port...]/mymaster)")
    elif path or db:
        raise ConfigError(f"Redis URL {shown}: a Redis Cluster has only database 0 and takes no path")
    unknown = sorted(set(options) - set(TLS_OPTIONS) - {"password", "username", "sentinel_password",
                                                         "sentinel_username"})
    if unknown:
        raise ConfigError(f"Redis URL {shown}: unknown option(s) {unknown}; known: db, min_replicas, "
                          f"wait_timeout_ms, password, username, sentinel_password, sentinel_username, "
                          f"{', '.join(TLS_OPTIONS)}")
    return RedisTarget(kind, "", hosts, path, db, unquote(username) or options.pop("username", None),
                       unquote(password) or options.pop("password", None), scheme.startswith("rediss"), options,
                       min_replicas, wait_timeout_ms)


class _SlotRouter:
    """The current primary of one hash slot in a Redis Cluster, from redis-py's slot map (read lazily, and again
    after an error)."""

    def __init__(self, target: RedisTarget, slot: int, kwargs: dict[str, Any]) -> None:
        self.target, self.slot, self.kwargs = target, slot, kwargs
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()

    def primary(self) -> tuple[str, int]:
        with self._lock:
            try:
                if self._cluster is None:
                    nodes = [ClusterNode(h, p) for h, p in self.target.hosts]
                    self._cluster = RedisCluster(startup_nodes=nodes, require_full_coverage=False,
                                                       **self.kwargs)
                node = self._cluster.nodes_manager.get_node_from_slot(self.slot)
            except redis.RedisError as exc:
                raise redis.ConnectionError(f"no primary known for slot {self.slot}: {exc}") from None
        return node.host, node.port

    def refresh(self) -> None:
        with self._lock:
            if self._cluster is not None:
                try:
                    self._cluster.nodes_manager.initialize()
                except redis.RedisError:
                    self._cluster.close()
                    self._cluster = None  # rebuilt from the startup nodes on the next connection

    def close(self) -> None:
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None


class SlotPrimaryConnection(Connection):
    """A connection to the primary of the catalog's slot, resolved each time it (re)connects."""

    def __init__(self, **kwargs: Any) -> None:
        self.router: _SlotRouter = kwargs.pop("router")
        super().__init__(**kwargs)

    def connect(self) -> None:
        if self._sock:
            return
        self.host, self.port = self.router.primary()
        try:
            self.connect_check_health(check_health=True, retry_socket_connect=False)
        except redis.ConnectionError:
            self.router.refresh()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (AskError, ClusterDownError, TryAgainError, ReadOnlyError) as exc:
            # The slot moved or its primary is being replaced: drop this connection, read the slot map again.
            self.disconnect()
            self.router.refresh()
            raise redis.ConnectionError(f"the catalog's slot is moving ({type(exc).__name__}: {exc})") from None


class SlotPrimarySSLConnection(SlotPrimaryConnection, SSLConnection):
    pass


class RedisDeployment:
    """Clients of the deployment a URL names, each reaching the current primary of the keys tagged `tag`."""

    def __init__(self, url: str, tag: str, socket_timeout: float, connect_timeout: float = 2.0) -> None:
        self.target = parse_redis_url(url)
        self.tag = tag
        # Writes are never retried by the client: a retried script whose first attempt ran would report a false
        # conflict, so errors reach the caller, which says so.
        self._common: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout,
                                        "retry": Retry(NoBackoff(), 0)}
        self._sentinel: redis.sentinel.Sentinel | None = None
        self._router: _SlotRouter | None = None

    @property
    def kind(self) -> str:
        return self.target.kind

    def _tls(self) -> dict[str, Any]:
        tls = {k: v for k, v in self.target.options.items() if k in TLS_OPTIONS}
        if "ssl_check_hostname" in tls:
            tls["ssl_check_hostname"] = tls["ssl_check_hostname"].lower() in ("1", "true", "yes")
        return tls

    def client(self, decode_responses: bool) -> redis.Redis:
        t = self.target
        if t.kind == "single":
            return redis.Redis.from_url(t.url, decode_responses=decode_responses, **self._common)
        auth = {"username": t.username, "password": t.password}
        if t.kind == "sentinel":
            if self._sentinel is None:
                sentinel_kwargs = {"socket_connect_timeout": self._common["socket_connect_timeout"],
                                   "socket_timeout": self._common["socket_timeout"],
                                   "username": t.options.get("sentinel_username"),
                                   "password": t.options.get("sentinel_password"),
                                   **({"ssl": True, **self._tls()} if t.tls else {})}
                self._sentinel = redis.sentinel.Sentinel(list(t.hosts), sentinel_kwargs=sentinel_kwargs)
            return self._sentinel.master_for(t.service, redis_class=redis.Redis, db=t.db,
                                             decode_responses=decode_responses, **auth, **self._common,
                                             **({"ssl": True, **self._tls()} if t.tls else {}))
        if self._router is None:
            topology = {**auth, "socket_connect_timeout": self._common["socket_connect_timeout"],
                        "socket_timeout": self._common["socket_timeout"], **({"ssl": True, **self._tls()} if t.tls
                                                                            else {})}
            self._router = _SlotRouter(t, key_slot(self.tag.encode()), topology)
        pool = ConnectionPool(connection_class=SlotPrimarySSLConnection if t.tls else SlotPrimaryConnection,
                              router=self._router, decode_responses=decode_responses, **auth, **self._common,
                              **self._tls())
        return redis.Redis(connection_pool=pool)

    def close(self) -> None:
        if self._router is not None:
            self._router.close()


def describe_error(exc: Exception) -> str:
    """A redis-py error in one short line (a Sentinel's "no master found" carries the whole client's repr)."""
    text = str(exc).split(" : <redis.")[0].replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"


def online_replicas(info: dict[str, Any]) -> int:
    """Replicas online of the primary whose `INFO replication` this is."""
    return sum(1 for key, value in info.items()
               if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")
