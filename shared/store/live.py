"""The gateway's fan-in on a Redis Cluster: announcements on sharded pub/sub, then reads.

On one Redis, a gateway reader blocks in one XREAD over every stream it follows. A cluster refuses
that across slots (CROSSSLOT), and every job has a slot of its own. So on a cluster, each script that
appends to a job's stream also announces the entry's id on the job's live channel (SPUBLISH, in the
job's slot: ``shared.store.streams``), and each gateway reader

- holds one connection per primary, subscribed (SSUBSCRIBE) to the live channels of the streams it
  follows whose slots that primary owns: its connections grow with the nodes, not with jobs or
  subscribers;
- marks a stream *due* when its channel announces an entry, and when its subscription is confirmed
  (so what was appended before it is read too);
- reads its due streams from their cursors, one XREAD each, packed by hand into one write per node
  per round (redis-py's cluster pipeline spent ~85 µs of CPU per XREAD: ``bench/fanin.py``).

An announcement only says *when* to read: every read starts from the stream's cursor, where its
subscribers are, so a lost announcement costs a delay, never an entry. A connection that fails (its
primary died) loses its subscriptions: they are made again on the node that owns each slot then, and
each confirmation marks its stream due, so what was appended meanwhile is read. A slot that moves
(resharding) unsubscribes its channels (the server's ``sunsubscribe``): the same, after learning the
slot map again. A node that keeps failing is tried again after a doubling delay (up to 2 s). A node
that says nothing for ``PING_S`` is pinged; one that does not answer within another ``PING_S`` is
dropped.

Sharded pub/sub needs Redis or Valkey 7 or later on the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from . import keys
from .calls import resp, send_packed
from .codec import RawEntry
from .connect import SLOT_MOVING, node_client
from .streams import Wake

logger = logging.getLogger(__name__)

PING_S = 5.0


class Live(Wake):
    """One gateway reader's subscriptions and due streams on a cluster; also its wake-up (``wake``).

    :param cluster: the cluster client; its slot map says which node owns a channel.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        super().__init__(key="")
        self._cluster = cluster
        self._nodes: dict[str, _NodeListener] = {}  # node name -> this reader's connection to it
        self._on: dict[str, _NodeListener] = {}  # stream key -> the connection its channel is subscribed on
        self._readers: dict[str, Redis] = {}  # node name -> this reader's client for reads on it
        self._failures: dict[str, int] = {}  # node name -> its connections lost in a row
        self.due: set[str] = set()
        """Streams to read: something was announced, a subscription was just confirmed, or a follow
        was just made (which may not be subscribed anew: its stream's last one went, and came back)."""
        self.news = asyncio.Event()
        self.woken = False
        """A follow was made since the current read began (see ``ClusterStreamStore.follow``)."""
        self.stale = False
        """A slot moved, or a node refused a subscription: learn the slot map again before subscribing."""

    def wake(self, stream: str) -> None:
        """A follow of ``stream`` was just made: read it, from its cursor, in the next round."""
        self.due.add(stream)
        self.woken = True
        self.news.set()

    def take_due(self, followed: Collection[str]) -> list[str]:
        due = [stream for stream in self.due if stream in followed]
        self.due.clear()
        return due

    async def wait(self, timeout: float) -> None:
        """Until something is due or the reader is woken, at most ``timeout`` seconds."""
        if not self.due:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.news.wait(), timeout)

    async def track(self, followed: Collection[str]) -> None:
        """Subscribe to the live channels of the followed streams that have none yet, on the node that
        owns each, and unsubscribe from those no longer followed. A node that cannot be reached raises
        (the reader waits and tries again)."""
        gone: dict[_NodeListener, list[str]] = {}
        for stream in [stream for stream in self._on if stream not in followed]:
            gone.setdefault(self._on.pop(stream), []).append(stream)
        for listener, streams in gone.items():
            await listener.unsubscribe(streams)
        new = [stream for stream in followed if stream not in self._on]
        if not new:
            return
        await self._cluster.initialize()  # the slot map (learnt again after a failover)
        if self.stale:
            self.stale = False
            await self._cluster.nodes_manager.initialize()
        by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
        for stream in new:
            node = self._cluster.get_node_from_key(keys.live_channel(stream))
            assert node is not None
            by_node.setdefault(node.name, (node, []))[1].append(stream)
        for name, (node, streams) in by_node.items():
            listener = self._nodes.get(name) or _NodeListener(self, node)
            if self._nodes.get(name) is not listener:
                await listener.connect()
                self._nodes[name] = listener
            await listener.subscribe(streams)
            for stream in streams:
                self._on[stream] = listener

    async def read(self, cursors: dict[str, str], streams: list[str], count: int) -> list[tuple[str, list[RawEntry]]]:
        """``(job id, entries)`` of the streams with entries after their cursors: one XREAD each, one
        write per node. A stream that returned ``count`` entries stays due (there may be more)."""
        by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
        for stream in streams:
            node = self._cluster.get_node_from_key(stream)
            assert node is not None
            by_node.setdefault(node.name, (node, []))[1].append(stream)
        found: list[tuple[str, list[RawEntry]]] = []
        for replies in await asyncio.gather(
            *(self._read_node(node, group, cursors, count) for node, group in by_node.values())
        ):
            for stream, entries in replies:
                found.append((keys.job_of(stream), entries))
                if len(entries) >= count:
                    self.due.add(stream)
        return found

    async def _read_node(
        self, node: ClusterNode, streams: list[str], cursors: dict[str, str], count: int
    ) -> list[tuple[str, list[RawEntry]]]:
        client = self._readers.get(node.name)
        if client is None:
            client = self._readers[node.name] = node_client(node)
        limit = b"%d" % count
        payload = b"".join(
            resp([b"XREAD", b"COUNT", limit, b"STREAMS", stream.encode(), cursors[stream].encode()])
            for stream in streams
        )
        try:
            replies = await send_packed(client, payload, len(streams))
        except Exception:
            del self._readers[node.name]
            await client.aclose()
            raise
        read: list[tuple[str, list[RawEntry]]] = []
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, SLOT_MOVING):  # wait, learn the slot map again, read again
                raise RedisConnectionError(f"reading {stream} on {node.name}: {type(reply).__name__} {reply}")
            if isinstance(reply, ResponseError):  # this stream's own (the reader isolates it)
                raise reply
            if reply:
                entries = reply[0][1]
                read.append(
                    (
                        stream,
                        [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in entries],
                    )
                )
        return read

    def announced(self, stream: str) -> None:
        self.due.add(stream)
        self.news.set()

    def backoff(self, node: str) -> float:
        """How long to wait before subscribing again on ``node``: doubling while it keeps failing (a
        node that refuses SSUBSCRIBE, say) up to 2 s, so a reader never spins on it."""
        failures = self._failures[node] = self._failures.get(node, 0) + 1
        return float(min(0.05 * 2 ** (failures - 1), 2.0))

    def subscribed(self, node: str) -> None:
        self._failures.pop(node, None)

    def lost(self, listener: _NodeListener, stream: str | None = None) -> None:
        """A subscription ended without our asking (``stream``: its slot moved), or a whole connection:
        subscribe again, wherever the slot is now, at the next round."""
        self.stale = True
        streams = [stream] if stream is not None else list(listener.streams)
        for lost in streams:
            listener.streams.discard(lost)
            if self._on.get(lost) is listener:
                del self._on[lost]
        if stream is None and self._nodes.get(listener.name) is listener:
            del self._nodes[listener.name]
        self.news.set()

    async def aclose(self) -> None:
        for listener in list(self._nodes.values()):
            await listener.aclose()
        for client in self._readers.values():
            await client.aclose()
        self._nodes.clear()
        self._on.clear()
        self._readers.clear()


class _NodeListener:
    """One reader's connection to one node, in subscribe mode: what it hears marks streams due."""

    def __init__(self, live: Live, node: ClusterNode) -> None:
        self._live = live
        self.name = node.name
        self.streams: set[str] = set()
        """The streams whose channels are subscribed here, or being subscribed."""
        self._leaving: set[str] = set()
        self._connection: AbstractConnection = node.connection_class(**node.connection_kwargs)
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self._connection.connect()  # type: ignore[no-untyped-call]
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def subscribe(self, streams: list[str]) -> None:
        self.streams.update(streams)
        self._leaving.difference_update(streams)
        await self._send("SSUBSCRIBE", streams)

    async def unsubscribe(self, streams: list[str]) -> None:
        self.streams.difference_update(streams)
        self._leaving.update(streams)
        await self._send("SUNSUBSCRIBE", streams)

    async def _send(self, command: str, streams: list[str]) -> None:
        """One command per channel (a cluster refuses channels of several slots in one), one write."""
        commands = [(command, keys.live_channel(stream)) for stream in streams]
        await self._connection.send_packed_command(self._connection.pack_commands(commands), check_health=False)

    async def _listen(self) -> None:
        live, pinged = self._live, False
        try:
            while True:
                # An error reply (MOVED: a subscription sent to a node that no longer owns the slot)
                # raises here: the connection is dropped and its streams subscribed again, anew.
                reply: Any = await self._connection.read_response(timeout=PING_S, disconnect_on_error=False)
                if reply is None:  # nothing for PING_S: is the node still there?
                    if pinged:
                        raise ConnectionError(f"node {self.name} did not answer a ping for {PING_S:g} s")
                    await self._connection.send_command("PING")
                    pinged = True
                    continue
                pinged = False
                kind = reply[0]
                if kind in (b"smessage", b"ssubscribe"):  # an entry; or subscribed: read what came before
                    if kind == b"ssubscribe":
                        live.subscribed(self.name)
                    stream = keys.stream_of_channel(reply[1].decode())
                    if stream in self.streams:
                        live.announced(stream)
                elif kind == b"sunsubscribe":
                    stream = keys.stream_of_channel(reply[1].decode())
                    if stream in self._leaving:
                        self._leaving.discard(stream)
                    elif stream in self.streams:  # its slot moved to another node
                        logger.info("live channel of %s left %s (its slot moved); subscribing again", stream, self.name)
                        live.lost(self, stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = live.backoff(self.name)
            logger.warning("live channels on %s lost (%s); subscribing again in %.2fs", self.name, exc, delay)
            await self._connection.disconnect(nowait=True)
            await asyncio.sleep(delay)  # its streams count as subscribed until then: nothing tries sooner
            live.lost(self)
        finally:
            await self._connection.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._connection.disconnect(nowait=True)
