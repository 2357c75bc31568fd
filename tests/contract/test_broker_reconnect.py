"""Brokers survive losing their server: while it is gone ``healthy`` is False and publishing
raises ``UnavailableError`` at once; when it is back every subscription still wanted is in
effect again, ``on_reconnect`` has been awaited, and frames flow.

- NATS: a private ``nats-server`` on a free port, killed with SIGKILL and started again.
- RabbitMQ: the machine's broker cannot be restarted, so one node reaches it through a TCP
  relay that the test cuts (every connection dropped, new ones refused) and restores: the
  node sees what it sees when the network or the broker goes away. A second test has
  RabbitMQ itself close the node's connection (``rabbitmqctl close_connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable

import pytest

from roomcast.adapters import open_broker
from roomcast.core.models import NodeId, RoomId
from roomcast.exceptions import UnavailableError
from tests import services
from tests.ports import free_port
from tests.relay import TcpRelay

from .engines import unique

pytestmark = pytest.mark.service

WAIT = 15.0
POLL = 0.02


async def until(
    condition: Callable[[], object],
    what: str,
    state: Callable[[], str] | None = None,
    timeout: float = WAIT,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds, saying ``state()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            seen = f" ({state()})" if state is not None else ""
            raise AssertionError(f"not within {timeout}s: {what}{seen}")
        await asyncio.sleep(POLL)


class Node:
    """A broker started as a node, recording frames and reconnects."""

    def __init__(self, url: str) -> None:
        self.id = NodeId(unique("n"))
        self.broker = open_broker(url)
        self.room_frames: list[bytes] = []
        self.inbox: list[bytes] = []
        self.reconnects = 0

    async def start(self) -> Node:
        async def on_room(data: bytes) -> None:
            self.room_frames.append(data)

        async def on_inbox(data: bytes) -> None:
            self.inbox.append(data)

        async def on_reconnect() -> None:
            self.reconnects += 1

        await self.broker.start(self.id, on_room, on_inbox, on_reconnect)
        return self


@contextlib.asynccontextmanager
async def nodes(*urls: str) -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    try:
        for url in urls:
            started.append(await Node(url).start())
        yield started
    finally:
        for node in started:
            await node.broker.close()


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def wait_port(port: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await port_open(port):
        if loop.time() > deadline:
            raise AssertionError(f"nothing listens on port {port} after {WAIT}s")
        await asyncio.sleep(POLL)


async def expect_outage(node: Node, room: RoomId) -> None:
    """``node`` knows its broker is gone and refuses to pretend otherwise."""
    await until(lambda: not node.broker.healthy, f"{node.id} notices the outage")
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(node.broker.publish(room, b"lost"), 1.0)
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(node.broker.send(node.id, b"lost"), 1.0)
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(node.broker.subscribe(RoomId(99)), 1.0)


async def expect_flowing(receiver: Node, sender: Node) -> None:
    """After the reconnect: room 1 is subscribed again, room 2 (dropped during the outage) is
    not, and the inbox works."""
    await until(
        lambda: receiver.reconnects >= 1 and receiver.broker.healthy,
        f"{receiver.id} reconnects and awaits on_reconnect",
    )
    before = len(receiver.room_frames)
    await sender.broker.publish(RoomId(2), b"room 2 after")
    await sender.broker.publish(RoomId(1), b"room 1 after")  # the barrier for room 2
    await until(lambda: b"room 1 after" in receiver.room_frames, "room 1 flows again")
    assert receiver.room_frames[before:] == [b"room 1 after"]
    await sender.broker.send(receiver.id, b"inbox after")
    await until(lambda: receiver.inbox == [b"inbox after"], "the inbox flows again")
    await receiver.broker.publish(RoomId(1), b"own after")
    await until(lambda: b"own after" in receiver.room_frames, "the node's own frames flow")


async def subscribe_and_check(receiver: Node, sender: Node) -> None:
    await receiver.broker.subscribe(RoomId(1))
    await receiver.broker.subscribe(RoomId(2))
    await sender.broker.publish(RoomId(1), b"room 1 before")
    await until(lambda: receiver.room_frames == [b"room 1 before"], "room 1 flows")


# -- NATS ------------------------------------------------------------------------------


def nats_server_path() -> str:
    path = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if path is None:
        reason = "nats-server is not installed (looked in PATH and /usr/sbin)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class NatsServer:
    """A private nats-server that the test can kill and start again on the same port."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.path,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_port(self.port)

    async def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), WAIT)


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    server = NatsServer(nats_server_path())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_nats_reconnects_after_the_server_is_killed_and_restarted(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?prefix={unique()}"
    async with nodes(url, url) as (a, b):
        await subscribe_and_check(a, b)

        await nats_server.kill()
        await expect_outage(a, RoomId(1))
        await until(lambda: not b.broker.healthy, "the publisher notices too")
        with pytest.raises(UnavailableError):
            await b.broker.publish(RoomId(1), b"lost")
        await a.broker.unsubscribe(RoomId(2))

        await nats_server.start()
        await until(lambda: b.reconnects >= 1 and b.broker.healthy, "the publisher reconnects")
        await expect_flowing(a, b)


async def test_a_nats_node_that_drops_frames_as_a_slow_consumer_reads_them_from_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nats-py drops what a subscription cannot queue: the node is told to read what its
    rooms missed from history, its connection still up."""
    from roomcast.adapters.nats import broker as nats_broker

    services.require("NATS", services.NATS_HOST, services.NATS_PORT)
    monkeypatch.setattr(nats_broker, "PENDING_MSGS_LIMIT", 4)
    monkeypatch.setattr(nats_broker, "SLOW_RESYNC_DELAY", 0.2)
    url = f"{services.NATS_URL}?prefix={unique()}"
    stalled = asyncio.Event()
    handled: list[bytes] = []
    resyncs = 0

    async def on_room(data: bytes) -> None:  # a node too busy to take its frames
        await stalled.wait()
        handled.append(data)

    async def on_inbox(data: bytes) -> None:
        return None

    async def on_reconnect() -> None:
        nonlocal resyncs
        resyncs += 1

    slow = open_broker(url)
    async with nodes(url) as (sender,):
        await slow.start(NodeId(unique("n")), on_room, on_inbox, on_reconnect)
        try:
            await slow.subscribe(RoomId(1))
            client = slow._nc
            assert client is not None
            sent = 0

            def seen() -> str:
                return (
                    f"{sent} frames sent, {client.stats['in_msgs']} reached the node,"
                    f" {resyncs} resyncs"
                )

            # One frame taken, four queued, the rest dropped by nats-py: the node reads
            # from history. A burst at a time until it does, should one not get through.
            deadline = asyncio.get_running_loop().time() + WAIT
            while resyncs == 0:
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"no resync after the dropped frames ({seen()})")
                for _ in range(40):
                    await sender.broker.publish(RoomId(1), f"f{sent}".encode())
                    sent += 1
                with contextlib.suppress(AssertionError):
                    await until(lambda: resyncs >= 1, "a resync", seen, timeout=1.0)
            assert slow.healthy  # not a reconnect: the connection never went away
            stalled.set()
            await until(lambda: len(handled) >= 4, "the frames it could queue", seen)
            assert len(handled) < sent  # the rest were dropped
        finally:
            stalled.set()
            await slow.close()


# -- RabbitMQ --------------------------------------------------------------------------


@pytest.fixture
async def rabbitmq_relay() -> AsyncIterator[TcpRelay]:
    services.require("RabbitMQ", services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    relay = TcpRelay(services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.cut()


async def test_rabbitmq_reconnects_after_the_network_goes_away_and_back(
    rabbitmq_relay: TcpRelay,
) -> None:
    prefix = unique()
    relayed = f"amqp://guest:guest@127.0.0.1:{rabbitmq_relay.port}/?prefix={prefix}"
    direct = f"{services.RABBITMQ_URL}?prefix={prefix}"
    async with nodes(relayed, direct) as (a, b):
        await subscribe_and_check(a, b)

        await rabbitmq_relay.cut()
        await expect_outage(a, RoomId(1))
        await b.broker.publish(RoomId(1), b"lost")  # a's queue went with its connection
        await a.broker.unsubscribe(RoomId(2))

        await rabbitmq_relay.start()
        await expect_flowing(a, b)
        assert b"lost" not in a.room_frames


async def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl; skip the test when it cannot talk to the local broker."""
    path = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin")
    if path is None:
        pytest.skip("rabbitmqctl is not installed (the relay test covers reconnection)")
    process = await asyncio.create_subprocess_exec(
        path,
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot manage the local broker: {err.decode().strip()}")
    return out.decode()


async def test_rabbitmq_reconnects_after_the_server_closes_the_connection() -> None:
    services.require("RabbitMQ", services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    prefix = unique()
    url = f"{services.RABBITMQ_URL}?prefix={prefix}"
    async with nodes(url, url) as (a, b):
        await subscribe_and_check(a, b)
        name = f'{{"connection_name","roomcast {prefix} {a.id}"}}'
        listing = await rabbitmqctl("list_connections", "pid", "client_properties")
        pids = [line.split("\t", 1)[0] for line in listing.splitlines() if name in line]
        assert len(pids) == 1, listing
        # An unsubscribe just before the close must not come back with the reconnect.
        await a.broker.unsubscribe(RoomId(2))
        await rabbitmqctl("close_connection", pids[0], "roomcast reconnect test")
        await expect_flowing(a, b)
