"""A local Redis Cluster from the embedded binary, for the tests: primaries and their replicas on
loopback, slots assigned with CLUSTER ADDSLOTSRANGE, nodes joined with CLUSTER MEET, replicas
attached with CLUSTER REPLICATE. No other tool; ``cluster_state:ok`` in about a second."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from shared.embedded import server_command
from shared.ports import free_port, port_open
from tests.conftest import stop_process, wait_until

SLOTS = 16384


@dataclass
class LocalCluster:
    primaries: list[int]
    """Ports of the primaries, in slot order (the first holds the lowest slots)."""
    replicas: list[int]
    """Ports of the replicas; the i-th replicates primary i % len(primaries)."""
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    bus_ports: dict[int, int] = field(default_factory=dict)
    """Each node's cluster bus port (not port + 10000, which can pass 65535 for a free port)."""

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def owner(self, key: str) -> int:
        """The port of the primary that was given ``key``'s slot (before any failover)."""
        slot = key_slot(key.encode())
        return self.primaries[min(slot * len(self.primaries) // SLOTS, len(self.primaries) - 1)]

    def ok(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            return all(
                "cluster_state:ok" in self.client(port).execute_command("CLUSTER", "INFO")
                for port in self.primaries + self.replicas
            )
        return False


def _distinct_ports(count: int) -> list[int]:
    """Free ports, no two alike: ``free_port`` may return a port it returned before (a probed port is
    free again), and a node whose bus took another node's client port resets that node's commands."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


@contextlib.contextmanager
def local_cluster(directory: Path, *, primaries: int = 3, replicas_each: int = 1) -> Iterator[LocalCluster]:
    nodes = primaries * (1 + replicas_each)
    ports = _distinct_ports(2 * nodes)  # each node's client port, then each node's bus port
    cluster = LocalCluster(
        ports[:primaries], ports[primaries:nodes], bus_ports=dict(zip(ports[:nodes], ports[nodes:], strict=True))
    )
    try:
        for port in cluster.primaries + cluster.replicas:
            node = directory / f"node-{port}"
            node.mkdir()
            command = [
                *server_command(port, node),
                *("--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf")),
                *("--logfile", str(node / "valkey.log"), "--repl-diskless-sync-delay", "0"),
                *(
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(cluster.bus_ports[port]),
                ),
            ]
            cluster.processes[port] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ports = cluster.primaries + cluster.replicas
        wait_until(lambda: all(port_open(port) for port in ports), what="the cluster's nodes")
        share = SLOTS // primaries
        for i, port in enumerate(cluster.primaries):
            last = SLOTS - 1 if i == primaries - 1 else (i + 1) * share - 1
            cluster.client(port).execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for port in ports[1:]:
            first = cluster.primaries[0]
            cluster.client(port).execute_command("CLUSTER", "MEET", "127.0.0.1", first, cluster.bus_ports[first])
        known = lambda: all(  # noqa: E731
            len(cluster.client(port).execute_command("CLUSTER", "NODES").splitlines()) == len(ports) for port in ports
        )
        wait_until(known, what="the nodes to know each other")
        for i, port in enumerate(cluster.replicas):
            primary = cluster.client(cluster.primaries[i % primaries]).execute_command("CLUSTER", "MYID")
            cluster.client(port).execute_command("CLUSTER", "REPLICATE", primary)
        wait_until(cluster.ok, timeout=20, what="cluster_state:ok")
        # A replica that never synced may not take over (its data is "too old"): wait for every link.
        synced = lambda: all(  # noqa: E731
            cluster.client(port).info("replication").get("master_link_status") == "up" for port in cluster.replicas
        )
        wait_until(synced, timeout=20, what="every replica to sync")
        yield cluster
    finally:
        for process in cluster.processes.values():
            stop_process(process)
