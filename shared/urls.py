"""Redis URLs the settings accept beyond redis-py's own: a queue behind Sentinels, and job streams on
a Redis Cluster.

``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]``
names the Sentinels (26379 when a port is left out) and the name they monitor the primary by;
``rediss+sentinel://`` speaks TLS to the primary. The password is the primary's; Sentinels that ask
for their own take ``sentinel_password``. Clients ask the Sentinels for the primary on every new
connection, so after a failover the next connection goes to the promoted replica.

``redis+cluster://[[user]:password@]host:port[,host:port...]`` names seed nodes of a Redis Cluster
(``rediss+cluster://`` for TLS); the client learns the rest of the cluster from them. Only the
stream store may live on a cluster: the queue needs transactions over many keys, on one primary.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    tls: bool


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] in SENTINEL_SCHEMES


def sentinel_url(url: str) -> SentinelURL:
    """Parse a Sentinel URL; ``ValueError`` saying what is wrong with it."""
    parts = urlsplit(url)
    username, password, hosts = _netloc(parts.netloc)
    sentinels = [_host_port(host, SENTINEL_PORT) for host in hosts]
    path = [part for part in parts.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends with /<service name> or /<service name>/<db>")
    query = parse_qs(parts.query)
    return SentinelURL(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query["sentinel_password"][0] if "sentinel_password" in query else None,
        tls=parts.scheme == "rediss+sentinel",
    )


class ClusterURL(NamedTuple):
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    tls: bool


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_url(url: str) -> ClusterURL:
    """Parse a cluster URL; ``ValueError`` saying what is wrong with it."""
    parts = urlsplit(url)
    username, password, hosts = _netloc(parts.netloc)
    nodes = [_host_port(host, None) for host in hosts]
    if parts.path.strip("/"):
        raise ValueError("a cluster URL has no path: a Redis Cluster has only database 0")
    return ClusterURL(nodes, username, password, parts.scheme == "rediss+cluster")


def _netloc(netloc: str) -> tuple[str | None, str | None, list[str]]:
    """``[[user]:password@]host[,host...]``: the user, the password (unquoted; ``None`` when empty) and
    the hosts."""
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    return unquote(username) or None, unquote(password) or None, hosts.split(",")


def _host_port(host: str, default: int | None) -> tuple[str, int]:
    if host.startswith("["):  # [IPv6]:port
        name, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = host.partition(":")
    if not name or (port and not port.isdigit()) or (not port and default is None):
        raise ValueError(f"a node is host:port, not {host!r}")
    return name, int(port) if port else default  # type: ignore[return-value]
