"""One contract for every Broker: memory, Redis, RabbitMQ, NATS.

Two broker instances on one URL are two nodes of one cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from roomcast.adapters import open_broker
from roomcast.core.models import NodeId, RoomId
from roomcast.exceptions import UnavailableError

from .engines import BROKERS, engine_url, unique

WAIT = 10.0


class Node:
    """A broker started as a node, recording what it receives."""

    def __init__(self, url: str) -> None:
        self.id = NodeId(unique("n"))
        self.broker = open_broker(url)
        self.room_frames: list[bytes] = []
        self.inbox: list[bytes] = []
        self.changed = asyncio.Event()

    async def start(self) -> Node:
        async def on_room(data: bytes) -> None:
            self.room_frames.append(data)
            self.changed.set()

        async def on_inbox(data: bytes) -> None:
            self.inbox.append(data)
            self.changed.set()

        async def on_reconnect() -> None:
            return None

        await self.broker.start(self.id, on_room, on_inbox, on_reconnect)
        return self

    async def wait(self, condition, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not met within {timeout}s: {self.room_frames[-3:]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


@pytest.fixture(params=BROKERS)
async def cluster(request, tmp_path):
    async with engine_url(request.param, tmp_path) as url:
        nodes: list[Node] = []

        async def node() -> Node:
            n = await Node(url).start()
            nodes.append(n)
            return n

        yield node
        for n in nodes:
            await n.broker.close()


def frame(room: int, i: int) -> bytes:
    return b'M %d %d\n{"text":"%d"}' % (room, i, i)


async def test_frames_reach_every_subscribed_node_in_publish_order(cluster):
    a, b, c = await cluster(), await cluster(), await cluster()
    await a.broker.subscribe(RoomId(1))
    await b.broker.subscribe(RoomId(1))
    sent = [frame(1, i) for i in range(200)]
    for data in sent:
        await c.broker.publish(RoomId(1), data)
    await a.wait(lambda: len(a.room_frames) >= 200)
    await b.wait(lambda: len(b.room_frames) >= 200)
    assert a.room_frames == sent
    assert b.room_frames == sent
    assert c.room_frames == []
    assert a.broker.healthy and b.broker.healthy and c.broker.healthy


async def test_a_batch_of_frames_for_several_rooms_arrives_in_order(cluster):
    """publish_many, as a node publishes a stored batch: each subscriber gets its rooms'
    frames, each room's in batch order, and nothing of the rooms it did not subscribe to."""
    a, b, c = await cluster(), await cluster(), await cluster()
    await a.broker.subscribe(RoomId(1))
    await a.broker.subscribe(RoomId(2))
    await b.broker.subscribe(RoomId(2))
    batch = [(RoomId(1 + i % 3), frame(1 + i % 3, i)) for i in range(300)]
    for start in range(0, 300, 100):
        await c.broker.publish_many(batch[start : start + 100])
    await c.broker.publish_many([(RoomId(2), frame(2, 999))])  # a batch of one
    room1 = [data for room, data in batch if room == 1]
    room2 = [data for room, data in batch if room == 2] + [frame(2, 999)]
    await a.wait(lambda: len(a.room_frames) >= len(room1) + len(room2))
    await b.wait(lambda: len(b.room_frames) >= len(room2))
    assert [f for f in a.room_frames if f.startswith(b"M 1 ")] == room1
    assert [f for f in a.room_frames if f.startswith(b"M 2 ")] == room2
    assert len(a.room_frames) == len(room1) + len(room2)
    assert b.room_frames == room2
    assert c.room_frames == []


async def test_a_node_keeps_receiving_far_past_a_flow_control_window(cluster):
    """Thousands of frames, more than any prefetch window (RabbitMQ: 256 unacknowledged,
    acknowledged in batches): a thousand published one by one, each its own delivery, then
    a thousand in one batch (RabbitMQ: several bundles of one room's frames); every one
    arrives, in order."""
    a, c = await cluster(), await cluster()
    await a.broker.subscribe(RoomId(1))
    sent = [frame(1, i) for i in range(2000)]
    for data in sent[:1000]:
        await c.broker.publish(RoomId(1), data)
    await c.broker.publish_many([(RoomId(1), data) for data in sent[1000:]])
    await a.wait(lambda: len(a.room_frames) >= len(sent))
    assert a.room_frames == sent


async def test_the_publisher_receives_its_own_frames_when_subscribed(cluster):
    a = await cluster()
    await a.broker.subscribe(RoomId(5))
    await a.broker.publish(RoomId(5), frame(5, 1))
    await a.wait(lambda: a.room_frames)
    assert a.room_frames == [frame(5, 1)]


async def test_a_node_receives_only_rooms_it_subscribed_to(cluster):
    a, b = await cluster(), await cluster()
    await a.broker.subscribe(RoomId(1))
    await b.broker.subscribe(RoomId(2))
    for i in range(20):
        await a.broker.publish(RoomId(1), frame(1, i))
    await b.broker.publish(RoomId(2), frame(2, 0))  # a barrier for b
    await a.wait(lambda: len(a.room_frames) == 20)
    await b.wait(lambda: b.room_frames)
    assert b.room_frames == [frame(2, 0)]


async def test_unsubscribe_stops_delivery(cluster):
    a, b = await cluster(), await cluster()
    await a.broker.subscribe(RoomId(1))
    await a.broker.subscribe(RoomId(2))
    await b.broker.publish(RoomId(1), frame(1, 1))
    await a.wait(lambda: len(a.room_frames) == 1)
    await a.broker.unsubscribe(RoomId(1))
    await b.broker.publish(RoomId(1), frame(1, 2))
    await b.broker.publish(RoomId(2), frame(2, 3))  # the barrier: a still has room 2
    await a.wait(lambda: frame(2, 3) in a.room_frames)
    assert a.room_frames == [frame(1, 1), frame(2, 3)]


async def test_inbox_reaches_one_node_only(cluster):
    a, b, c = await cluster(), await cluster(), await cluster()
    await c.broker.send(a.id, b"hello a")
    await c.broker.send(b.id, b"hello b")
    await a.wait(lambda: a.inbox)
    await b.wait(lambda: b.inbox)
    assert a.inbox == [b"hello a"] and b.inbox == [b"hello b"] and c.inbox == []


async def test_payloads_are_opaque_bytes(cluster):
    a, b = await cluster(), await cluster()
    await a.broker.subscribe(RoomId(9))
    payloads = [b"\x00\xff\n\r binary", "한국어 😀".encode(), b"x" * 200_000, b""]
    for data in payloads:
        await b.broker.publish(RoomId(9), data)
    await a.wait(lambda: len(a.room_frames) == len(payloads))
    assert a.room_frames == payloads


async def test_a_closed_broker_refuses_to_publish(cluster):
    a = await cluster()
    await a.broker.close()
    assert not a.broker.healthy
    with pytest.raises(UnavailableError):
        await a.broker.publish(RoomId(1), frame(1, 1))
    with pytest.raises(UnavailableError):
        await a.broker.publish_many([(RoomId(1), frame(1, 1)), (RoomId(2), frame(2, 2))])


@pytest.mark.parametrize("kind", BROKERS)
async def test_frames_that_arrive_together_are_handed_over_together_in_order(kind, tmp_path):
    """A node that takes batches (``hand_batches_to``) gets another node's pipelined batch
    of 200 frames in a few hand-overs instead of 200, every frame once and in publish
    order, and an inbox frame sent after them after them (NATS keeps order within a subject
    only, and a Redis Cluster within a shard: there, the inbox frame is only checked to
    arrive)."""
    async with engine_url(kind, tmp_path) as url:
        events: list[tuple[str, bytes]] = []
        handovers: list[int] = []
        changed = asyncio.Event()

        async def on_room(data: bytes) -> None:
            events.append(("room", data))
            handovers.append(1)
            changed.set()

        async def on_rooms(frames: list[bytes]) -> None:
            events.extend(("room", data) for data in frames)
            handovers.append(len(frames))
            changed.set()

        async def on_inbox(data: bytes) -> None:
            events.append(("inbox", data))
            changed.set()

        async def on_reconnect() -> None:
            return None

        b_id = NodeId(unique("n"))
        b = open_broker(url)
        a = await Node(url).start()
        try:
            await b.start(b_id, on_room, on_inbox, on_reconnect)
            b.hand_batches_to(on_rooms)  # type: ignore[attr-defined]
            await b.subscribe(RoomId(7))
            frames = [frame(7, i) for i in range(200)]
            await a.broker.publish_many([(RoomId(7), data) for data in frames])
            await a.broker.send(b_id, b"after the batch")

            deadline = time.monotonic() + WAIT
            while len(events) < 201 and time.monotonic() < deadline:
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
            if kind in ("nats", "redis-cluster"):
                assert [e for e in events if e[0] == "room"] == [("room", d) for d in frames]
                assert ("inbox", b"after the batch") in events
            else:
                expected = [("room", data) for data in frames] + [("inbox", b"after the batch")]
                assert events == expected
            assert sum(handovers) == 200
            assert len(handovers) <= 20, handovers
            assert b.received == 200
        finally:
            await a.broker.close()
            await b.close()


async def test_a_malformed_bundle_on_rabbitmq_is_dropped_and_what_follows_arrives(tmp_path):
    """A message that claims to be a bundle of frames but is cut short (or that some other
    client put on the exchange) is dropped whole, with a warning; the node goes on."""
    import aio_pika

    from roomcast.adapters.rabbitmq.broker import BUNDLE_TYPE, bundle, parse_url

    async with engine_url("amqp", tmp_path) as url:
        a, c = await Node(url).start(), await Node(url).start()
        amqp_url, prefix = parse_url(url)
        connection = await aio_pika.connect(amqp_url)
        try:
            await a.broker.subscribe(RoomId(3))
            channel = await connection.channel()
            exchange = await channel.get_exchange(prefix, ensure=False)
            whole = bundle([(RoomId(3), frame(3, 1)), (RoomId(3), frame(3, 2))])
            for body in (whole[:-5], whole[:2]):
                await exchange.publish(aio_pika.Message(body, type=BUNDLE_TYPE), "room.3")
            await c.broker.publish_many([(RoomId(3), frame(3, 3)), (RoomId(3), frame(3, 4))])
            await a.wait(lambda: len(a.room_frames) >= 2)
            assert a.room_frames == [frame(3, 3), frame(3, 4)]
            assert a.broker.healthy
        finally:
            await connection.close()
            await a.broker.close()
            await c.broker.close()


async def test_a_second_rabbitmq_node_with_a_node_id_in_use_is_refused_with_the_reason(
    tmp_path,
):
    """Two running servers given one node id: on RabbitMQ the second cannot take the
    node's exclusive queue, and its start says why instead of RabbitMQ's RESOURCE_LOCKED."""
    async with engine_url("amqp", tmp_path) as url:
        first = await Node(url).start()
        second = Node(url)
        second.id = first.id
        try:
            with pytest.raises(UnavailableError, match="another running server has this node"):
                await second.start()
            assert first.broker.healthy
        finally:
            await first.broker.close()
            await second.broker.close()
