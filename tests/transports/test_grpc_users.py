"""gRPC users in presence: a user removed while one of its commands is under way."""

from __future__ import annotations

import asyncio

import pytest

from roomcast.adapters.memory import MemoryBroker, MemoryHistory, MemoryPresence
from roomcast.core.hub import Hub
from roomcast.core.models import NodeId, RoomId
from roomcast.core.service import ChatService
from roomcast.exceptions import ChatError, ErrorCode
from roomcast.transports.grpc.users import Users


class HeldPresence(MemoryPresence):
    """Presence whose writes to the held room wait until the test lets them through (as
    an engine on another machine takes a round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.room: RoomId | None = None
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def add(self, room, member):
        if room == self.room:
            self.waiting.set()
            await self.gate.wait()
        await super().add(room, member)


@pytest.fixture
async def users():
    history, presence = MemoryHistory(), HeldPresence()
    broker = MemoryBroker("grpc-users")
    hub = Hub(broker, history, unsubscribe_grace=0)
    service = ChatService(
        node=NodeId("n0"), history=history, broker=broker, presence=presence, hub=hub
    )
    await broker.start(NodeId("n0"), hub.on_frame, service.on_inbox, hub.resync)
    yield Users(service, ttl=10), presence, service
    await broker.close()


async def test_a_user_removed_while_it_joins_a_channel_is_not_left_in_it(users):
    users, presence, service = users
    user = await users.login()
    channel = await service.resolve("channel-1", create=True)
    presence.room = channel.id
    entering = asyncio.ensure_future(users.enter(user, channel))
    await asyncio.wait_for(presence.waiting.wait(), 5)
    assert await users.remove(user)  # its heartbeat stream closed meanwhile
    presence.gate.set()
    with pytest.raises(ChatError) as refused:
        await entering
    assert refused.value.code is ErrorCode.NOT_FOUND
    assert await users.find(user.index) is None  # not logged in
    assert await users.listing(channel.id) == []  # and not in the channel
    lobby = await users.lobby()
    assert await users.listing(None) == []
    assert await presence.reap() == []  # nothing left for a reaper either
    assert await service.presence.members(lobby.id) == []


async def test_a_user_removed_while_it_leaves_a_channel_does_not_look_logged_in(users):
    users, presence, service = users
    user = await users.enter(await users.login(), await service.resolve("c", create=True))
    presence.room = RoomId(-user.index)  # its record, written again by the move
    leaving = asyncio.ensure_future(users.leave(user))
    await asyncio.wait_for(presence.waiting.wait(), 5)
    assert await users.remove(user)
    presence.gate.set()
    with pytest.raises(ChatError) as refused:
        await leaving
    assert refused.value.code is ErrorCode.NOT_FOUND
    assert await users.find(user.index) is None
