"""The terminal client's gRPC backend and tokens, against a stand-in door on loopback.

The door records the ``authorization`` metadata of every call and refuses as the real
one does (UNAUTHENTICATED, PERMISSION_DENIED), so what is checked here is what the
client sends and what it makes of a refusal — not roomcast's door itself.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from roomcast.chat.backend import NO_TOKEN, CommandFailed
from roomcast.chat.grpc_backend import GrpcBackend
from roomcast.grpc import client_to_agent_pb2 as pb2
from roomcast.grpc import client_to_agent_pb2_grpc as pb2_grpc

WAIT = 10.0
CHANNEL = 3
Command = pb2.CommandRequest


class Screen:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def show(self, text: str) -> None:
        self.lines.append(text)


class Door:
    """Agent, Heartbeat, Lobby and Channel in one loopback server, for one user at a time.

    ``accepts`` says which ``authorization`` values get in; ``end_sessions()`` ends every
    open stream, as a server that lost the user's session does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.accepts: Callable[[str | None], bool] = lambda auth: True
        self.forbidden: set[int] = set()
        self.address = ""
        self._indexes = itertools.count(7)
        self._session_over = asyncio.Event()

    def end_sessions(self) -> None:
        self._session_over.set()

    async def check(self, rpc: str, context: Any) -> None:
        auth = dict(context.invocation_metadata()).get("authorization")
        self.calls.append((rpc, auth))
        if not self.accepts(auth):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token has expired")

    async def until_over(self) -> None:
        await self._session_over.wait()

    def index(self) -> int:
        return next(self._indexes)


class Agent(pb2_grpc.AgentServicer):  # type: ignore[misc]
    def __init__(self, door: Door) -> None:
        self.door = door

    async def TryLogin(self, request: Any, context: Any) -> Any:
        await self.door.check("Agent.TryLogin", context)
        self.door._session_over.clear()
        return pb2.LoginReply(index=self.door.index())


class Heartbeat(pb2_grpc.HeartbeatServicer):  # type: ignore[misc]
    def __init__(self, door: Door) -> None:
        self.door = door

    async def TryHeartbeat(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.door.check("Heartbeat.TryHeartbeat", context)
        yield pb2.HeartbeatReply(time=1)
        await self.door.until_over()


class Lobby(pb2_grpc.LobbyServicer):  # type: ignore[misc]
    def __init__(self, door: Door) -> None:
        self.door = door

    async def TryChatReceive(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.door.check("Lobby.TryChatReceive", context)
        await self.door.until_over()
        return
        yield

    async def TryStatusRequest(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.door.check("Lobby.TryStatusRequest", context)
        await self.door.until_over()
        return
        yield

    async def TryChatSend(self, request: Any, context: Any) -> Any:
        await self.door.check("Lobby.TryChatSend", context)
        return pb2.Empty()

    async def TryCommand(self, request: Any, context: Any) -> Any:
        await self.door.check("Lobby.TryCommand", context)
        if request.status == Command.MAKE_CHANNEL:
            return pb2.CommandReply(status=pb2.CommandReply.SUCCESS, channels=[CHANNEL])
        if request.status == Command.JOIN_CHANNEL and request.channel in self.door.forbidden:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"your token does not let you into 'channel-{request.channel}'",
            )
        if request.status == Command.LIST_USERS:
            return pb2.CommandReply(status=pb2.CommandReply.SUCCESS, users=[request.index])
        return pb2.CommandReply(status=pb2.CommandReply.SUCCESS)

    async def TryUserExit(self, request: Any, context: Any) -> Any:
        await self.door.check("Lobby.TryUserExit", context)
        return pb2.StatusReply()


class Channel(pb2_grpc.ChannelServicer):  # type: ignore[misc]
    def __init__(self, door: Door) -> None:
        self.door = door

    async def TryChatReceive(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.door.check("Channel.TryChatReceive", context)
        await self.door.until_over()
        return
        yield

    async def TryStatusRequest(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.door.check("Channel.TryStatusRequest", context)
        yield pb2.StatusReply(status=pb2.StatusReply.JOIN_USER, index=request.index)
        await self.door.until_over()

    async def TryChatSend(self, request: Any, context: Any) -> Any:
        await self.door.check("Channel.TryChatSend", context)
        return pb2.Empty()


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    door = Door()
    server = grpc.aio.server()
    pb2_grpc.add_AgentServicer_to_server(Agent(door), server)
    pb2_grpc.add_HeartbeatServicer_to_server(Heartbeat(door), server)
    pb2_grpc.add_LobbyServicer_to_server(Lobby(door), server)
    pb2_grpc.add_ChannelServicer_to_server(Channel(door), server)
    port = server.add_insecure_port("127.0.0.1:0")
    door.address = f"127.0.0.1:{port}"
    await server.start()
    try:
        yield door
    finally:
        door.end_sessions()
        await server.stop(grace=None)


def client(door: Door, screen: Screen, token: str | None) -> GrpcBackend:
    return GrpcBackend(screen, agent=door.address, name="ada", token=token)


async def test_every_call_carries_the_token(door: Door) -> None:
    screen = Screen()
    backend = client(door, screen, "t0ken")
    await backend.start()
    try:
        await backend.make("")
        await backend.say("in the channel")
        await backend.say_all("in the lobby")
        await backend.list_rooms()
    finally:
        await backend.close()
    assert "[channel 3] user 7: in the channel" in screen.lines
    assert "[lobby] user 7: in the lobby" in screen.lines
    rpcs = {rpc for rpc, _ in door.calls}
    assert rpcs == {
        "Agent.TryLogin",
        "Heartbeat.TryHeartbeat",
        "Lobby.TryChatReceive",
        "Lobby.TryStatusRequest",
        "Lobby.TryCommand",
        "Lobby.TryChatSend",
        "Lobby.TryUserExit",
        "Channel.TryChatReceive",
        "Channel.TryStatusRequest",
        "Channel.TryChatSend",
    }
    assert {auth for _, auth in door.calls} == {"Bearer t0ken"}


async def test_without_a_token_nothing_is_sent_and_a_refusal_says_how_to_give_one(
    door: Door,
) -> None:
    door.accepts = lambda auth: auth is not None
    backend = client(door, Screen(), None)
    try:
        with pytest.raises(CommandFailed) as refused:
            await backend.start()
    finally:
        await backend.close()
    assert refused.value.code == "unauthenticated"
    assert refused.value.message == f"the token has expired; {NO_TOKEN}"
    assert door.calls == [("Agent.TryLogin", None)]


async def test_a_refused_token_is_said_as_the_server_says_it(door: Door) -> None:
    door.accepts = lambda auth: auth == "Bearer good"
    backend = client(door, Screen(), "bad")
    try:
        with pytest.raises(CommandFailed) as refused:
            await backend.start()
    finally:
        await backend.close()
    assert (refused.value.code, refused.value.message) == (
        "unauthenticated",
        "the token has expired",
    )


async def test_a_channel_the_token_does_not_allow_is_refused_with_the_servers_message(
    door: Door,
) -> None:
    door.forbidden.add(5)
    backend = client(door, Screen(), "t0ken")
    await backend.start()
    try:
        with pytest.raises(CommandFailed) as refused:
            await backend.join("5")
    finally:
        await backend.close()
    assert (refused.value.code, refused.value.message) == (
        "permission_denied",
        "your token does not let you into 'channel-5'",
    )
    assert backend.room == "lobby"


async def test_a_session_lost_and_its_login_again_refused_ends_the_client(door: Door) -> None:
    """The token expired while the client was logged in; the session is then lost: logging
    in again cannot succeed, so the client ends instead of trying forever."""
    screen = Screen()
    backend = client(door, screen, "t0ken")
    await backend.start()
    try:
        door.accepts = lambda auth: False
        door.end_sessions()
        why = await asyncio.wait_for(backend.ended(), WAIT)
    finally:
        await backend.close()
    assert (why.code, why.message) == ("unauthenticated", "the token has expired")
    assert any("logging in again" in line for line in screen.lines), screen.lines
    logins = [auth for rpc, auth in door.calls if rpc == "Agent.TryLogin"]
    assert logins == ["Bearer t0ken", "Bearer t0ken"]  # tried again once, not forever


async def test_delete_and_edit_are_not_in_the_grpc_protocol(door: Door) -> None:
    backend = client(door, Screen(), "t0ken")
    await backend.start()
    try:
        with pytest.raises(CommandFailed) as refused:
            await backend.delete(1)
        with pytest.raises(CommandFailed) as not_edited:
            await backend.edit(1, "fixed")
    finally:
        await backend.close()
    assert (refused.value.code, refused.value.message) == (
        "unsupported",
        "the gRPC protocol cannot delete messages",
    )
    assert (not_edited.value.code, not_edited.value.message) == (
        "unsupported",
        "the gRPC protocol cannot edit messages",
    )
