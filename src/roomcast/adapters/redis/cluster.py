"""The Redis broker on a Redis Cluster: ``redis://HOST:PORT?cluster=true``.

The channels are those of :class:`~.broker.RedisBroker` (``P:room:{r<room>}``,
``P:inbox:{n<node>}``); their hash tags put each on one slot, so one shard. Publishing goes
through redis-py's ``RedisCluster``, which sends each ``SPUBLISH`` to the primary that owns
its slot and follows the cluster when slots move or a replica takes over. Subscribing is
roomcast's own: one subscriber connection per primary that owns a wanted channel (a
:meth:`~.broker.RedisBroker.shard_subscriber` each, with the reader, watchdog and reconnect
of the single-server broker), and every wanted channel on the subscriber of its slot's
primary.

The layout can change under a running node: a primary dies and a replica takes its slots
over, or slots are moved to another shard. A subscriber then loses its connection, has a
subscription refused (``MOVED``) or ended by the server (``SUNSUBSCRIBE`` of a slot moved
away); each of these wakes the layout check, which also runs every
:data:`TOPOLOGY_CHECK` seconds while something is amiss and every :data:`TOPOLOGY_IDLE`
seconds otherwise. The check reads the slot map again, moves every channel (the inbox
included) whose slot has a new primary to that primary's subscriber, closes the subscribers
of nodes that are no longer primaries, and then — if anything moved, or the primaries
changed at all — awaits ``on_reconnect`` so the node fetches from history what it may have
missed meanwhile and makes again presence writes a failover may have lost, as after a lost
connection to a single Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import SlotNotCoveredError

from ...core.models import NodeId, RoomId
from ...core.ports import BatchHandler, FrameHandler, ReconnectHandler
from ...exceptions import ConfigError, UnavailableError
from .broker import (
    POOL_SIZE,
    UNREACHABLE,
    Gate,
    RedisBroker,
    connection_options,
    is_cluster,
    open_cluster,
    spublish,
)

log = logging.getLogger(__name__)

TOPOLOGY_CHECK = 1.0
"""Seconds between checks of the slot layout while a subscriber is down or a channel has
no subscriber on its slot's primary (a failover takes the cluster a few seconds)."""
TOPOLOGY_IDLE = 30.0
"""Seconds between checks of the slot layout while all is well."""


class RedisClusterBroker:
    """A node's broker on the sharded pub/sub of a Redis Cluster."""

    def __init__(self, url: str) -> None:
        if not is_cluster(url):
            raise ConfigError("RedisClusterBroker needs a Redis URL with ?cluster=true")
        options, prefix = connection_options(url)
        self._prefix = prefix
        self._client = open_cluster(options)
        self._gate = Gate(int(options.get("max_connections", POOL_SIZE)))
        # A subscriber's own connection: the node's address, the rest as for the commands.
        self._sub_options = {
            k: v for k, v in options.items() if k not in ("host", "port", "db", "max_connections")
        }
        self._node = NodeId("")
        self._on_room: FrameHandler | None = None
        self._on_rooms: BatchHandler | None = None
        self._on_inbox: FrameHandler | None = None
        self._on_reconnect: ReconnectHandler | None = None
        self._shards: dict[str, RedisBroker] = {}
        """Subscribers by cluster node (``host:port``)."""
        self._rooms: dict[bytes, RoomId] = {}
        """The rooms the node wants, by channel."""
        self._homes: dict[bytes, str] = {}
        """The node whose subscriber each wanted channel was given to."""
        self._inbox = b""
        self._inbox_home = ""
        self._misplaced = False
        """The last layout check left a channel without a subscriber on its primary."""
        self._check: asyncio.Event | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._retired_received = 0
        self._primaries: set[str] = set()
        """The cluster's primaries at the last look: a change (a failover) may have lost
        presence writes anywhere, even on shards this node subscribes nothing on."""

    def _room_channel(self, room: RoomId) -> bytes:
        return b"%s:room:{r%d}" % (self._prefix.encode(), room)

    def _inbox_channel(self, node: NodeId) -> bytes:
        return b"%s:inbox:{n%s}" % (self._prefix.encode(), node.encode())

    @property
    def received(self) -> int:
        """Room frames this node received (the per-node counter the metrics export)."""
        return self._retired_received + sum(shard.received for shard in self._shards.values())

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self,
        node: NodeId,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        if self._closed or self._started:
            raise UnavailableError("the Redis Cluster broker is closed or already started")
        self._node = node
        self._on_room, self._on_inbox, self._on_reconnect = on_room, on_inbox, on_reconnect
        self._inbox = self._inbox_channel(node)
        self._check = asyncio.Event()
        try:
            await self._client.initialize()
            self._inbox_home = self._owner(self._inbox)
            shard = await self._shard(self._inbox_home)
            await shard.take_inbox(self._inbox)
        except UNREACHABLE as exc:
            await self.close()
            raise UnavailableError(f"the Redis Cluster is unreachable: {exc}") from exc
        except UnavailableError:
            await self.close()
            raise
        self._primaries = {node.name for node in self._client.get_primaries()}
        self._started = True
        self._monitor = asyncio.get_running_loop().create_task(
            self._watch_layout(), name=f"roomcast-redis-cluster-layout-{node}"
        )

    @property
    def healthy(self) -> bool:
        if not self._started or self._closed or self._misplaced:
            return False
        return all(shard.healthy for shard in self._shards.values() if shard.rooms or shard.inbox)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None and monitor is not asyncio.current_task():
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()
        self._rooms.clear()
        self._homes.clear()
        await self._client.aclose()

    def hand_batches_to(self, on_rooms: BatchHandler) -> None:
        """As :meth:`RedisBroker.hand_batches_to`, per shard subscriber."""
        self._on_rooms = on_rooms
        for shard in self._shards.values():
            shard.hand_batches_to(on_rooms)

    # -- subscriptions -----------------------------------------------------------------

    async def subscribe(self, room: RoomId) -> None:
        if self._closed:
            raise UnavailableError("the Redis Cluster broker is closed")
        channel = self._room_channel(room)
        self._rooms[channel] = room
        try:
            home = self._owner(channel)
            shard = await self._shard(home)
            self._homes[channel] = home
            await shard.subscribe(room)
        except UnavailableError:
            # The caller treats the room as not subscribed; so does this broker.
            if self._rooms.get(channel) == room:
                del self._rooms[channel]
                self._homes.pop(channel, None)
            self._wake()  # the layout may have changed
            raise

    async def unsubscribe(self, room: RoomId) -> None:
        channel = self._room_channel(room)
        if self._rooms.pop(channel, None) is None:
            return
        home = self._homes.pop(channel, None)
        shard = self._shards.get(home) if home is not None else None
        if shard is not None:
            await shard.unsubscribe(room)

    def _owner(self, channel: bytes) -> str:
        """The cluster node (``host:port``) that owns ``channel``'s slot, as last known."""
        try:
            node = self._client.nodes_manager.get_node_from_slot(key_slot(channel))
        except SlotNotCoveredError as exc:
            raise UnavailableError(f"the Redis Cluster has no primary for it: {exc}") from exc
        return str(node.name)

    async def _shard(self, name: str) -> RedisBroker:
        """The subscriber of cluster node ``name``, connected first if new."""
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        host, _, port = name.rpartition(":")
        options: dict[str, Any] = {**self._sub_options, "host": host, "port": int(port)}
        shard = RedisBroker.shard_subscriber(options, self._prefix, self._wake)
        if self._on_rooms is not None:
            shard.hand_batches_to(self._on_rooms)
        self._shards[name] = shard
        assert self._on_room is not None and self._on_inbox is not None
        try:
            await shard.start_shard(
                f"{self._node}-{name}", self._on_room, self._on_inbox, self._shard_reconnected
            )
        except UnavailableError:
            if self._shards.get(name) is shard:
                del self._shards[name]
            self._retired_received += shard.received
            await shard.close()
            raise
        return shard

    async def _shard_reconnected(self) -> None:
        assert self._on_reconnect is not None
        await self._on_reconnect()

    # -- publishing --------------------------------------------------------------------

    async def publish(self, room: RoomId, frame: bytes) -> None:
        await self._publish(self._room_channel(room), frame)

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        self._check_running()
        async with self._gate:
            await spublish(self._client, [(self._room_channel(r), data) for r, data in frames])

    async def send(self, node: NodeId, frame: bytes) -> None:
        await self._publish(self._inbox_channel(node), frame)

    async def _publish(self, channel: bytes, frame: bytes) -> None:
        self._check_running()
        async with self._gate:
            await spublish(self._client, ((channel, frame),))

    def _check_running(self) -> None:
        if self._closed or not self._started:
            raise UnavailableError("the Redis Cluster broker is not running")

    # -- the layout --------------------------------------------------------------------

    def _wake(self) -> None:
        if self._check is not None:
            self._check.set()

    async def _watch_layout(self) -> None:
        assert self._check is not None
        while True:
            pause = TOPOLOGY_IDLE if self.healthy else TOPOLOGY_CHECK
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._check.wait()
            self._check.clear()
            try:
                await self._place()
            except Exception:  # the next check tries again
                log.exception("checking the Redis Cluster's layout failed")

    async def _place(self) -> None:
        """Read the slot map again and put every wanted channel on its primary's
        subscriber; then, if anything moved, await ``on_reconnect``."""
        try:
            await self._client.nodes_manager.initialize()
        except UNREACHABLE as exc:
            self._misplaced = True
            log.warning("cannot read the Redis Cluster's layout: %s", exc)
            return
        primaries = {node.name for node in self._client.get_primaries()}
        failover, self._primaries = primaries != self._primaries, primaries
        moved = await self._place_inbox()
        moves: list[tuple[str, RoomId]] = []
        for channel, room in list(self._rooms.items()):
            try:
                owner = self._owner(channel)
            except UnavailableError:
                moves.append(("", room))
                continue
            home = self._homes.get(channel)
            shard = self._shards.get(home) if home is not None else None
            if owner == home and shard is not None and channel in shard.rooms:
                continue
            if shard is not None and owner != home:
                await shard.unsubscribe(room)
            self._homes[channel] = owner
            moves.append((owner, room))
        results = await asyncio.gather(
            *(self._subscribe_on(owner, room) for owner, room in moves), return_exceptions=True
        )
        placed = sum(1 for result in results if result is None)
        self._misplaced = placed < len(moves) or self._inbox_misplaced()
        for name in [name for name in self._shards if name not in primaries]:
            shard = self._shards[name]
            if not shard.rooms and not shard.inbox:
                del self._shards[name]
                self._retired_received += shard.received
                await shard.close()
        if moves or moved or failover:
            log.info(
                "Redis Cluster layout changed: %d of %d rooms moved to their new primary",
                placed,
                len(moves),
            )
            assert self._on_reconnect is not None
            try:
                await self._on_reconnect()
            except Exception:
                log.exception("the broker reconnect handler failed")

    def _inbox_misplaced(self) -> bool:
        shard = self._shards.get(self._inbox_home)
        return shard is None or shard.inbox != self._inbox

    async def _place_inbox(self) -> bool:
        """Move the inbox to its slot's primary if it is not there; True if it moved."""
        try:
            owner = self._owner(self._inbox)
        except UnavailableError:
            return False
        if owner == self._inbox_home and not self._inbox_misplaced():
            return False
        old = self._shards.get(self._inbox_home)
        if old is not None and old.inbox:
            await old.drop_inbox()
        self._inbox_home = owner
        try:
            shard = await self._shard(owner)
            await shard.take_inbox(self._inbox)
        except UnavailableError as exc:
            log.warning("cannot subscribe the inbox on %s: %s", owner, exc)
            return False
        return True

    async def _subscribe_on(self, owner: str, room: RoomId) -> None:
        if not owner:
            raise UnavailableError("no primary owns the room's slot")
        shard = await self._shard(owner)
        if self._rooms.get(self._room_channel(room)) != room:
            return  # left meanwhile
        await shard.subscribe(room)
