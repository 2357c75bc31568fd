"""The gRPC door against a real server, with stubs generated from proto/client_to_agent.proto.

gRPC users and Socket.IO users meet in the same rooms: the lobby is the room ``lobby``,
channel N is the room with id N.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest

from roomcast.grpc import client_to_agent_pb2 as pb2
from roomcast.grpc import client_to_agent_pb2_grpc as pb2_grpc

from .clients import ChatClient, scrape
from .servers import Server, free_port, run_server

WAIT = 10.0
"""The longest any test waits for something to arrive."""

LIVENESS = 3.0
"""The liveness timeout of the test server, in seconds."""

Command = pb2.CommandRequest
SUCCESS = pb2.CommandReply.SUCCESS
FAILURE = pb2.CommandReply.FAILURE

Status = tuple[str, int, int | None]
"""A StatusReply as ``(status name, index, channel or None)``."""


class GrpcClient:
    """A gRPC user, as a client written against the proto would be one: login on the
    agent, then the heartbeat and lobby streams on the addresses the login returned.
    Everything streamed to it is recorded in arrival order.

    ``heartbeat_at`` / ``lobby_at`` / ``channel_at`` dial another address than the one the
    server returned, as a load balancer in front of several nodes would."""

    def __init__(
        self,
        agent_address: str,
        *,
        heartbeat_at: str | None = None,
        lobby_at: str | None = None,
        channel_at: str | None = None,
    ) -> None:
        self.agent_address = agent_address
        self.heartbeat_at = heartbeat_at
        self.lobby_at = lobby_at
        self.channel_at = channel_at
        self.index = 0
        self.login_reply = pb2.LoginReply()
        self.beats: list[int] = []
        self.lobby_chats: list[tuple[int, str]] = []
        self.lobby_status: list[Status] = []
        self.channel_chats: list[tuple[int, str]] = []
        self.channel_status: list[Status] = []
        self.ended: dict[str, Any] = {}
        """Stream name -> the status code it ended with."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    def dial(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    async def login(self, *, heartbeat: bool = True, lobby: bool = True) -> GrpcClient:
        agent = pb2_grpc.AgentStub(self.dial(self.agent_address))
        self.login_reply = await agent.TryLogin(pb2.LoginRequest(ip="127.0.0.1"), timeout=WAIT)
        self.index = self.login_reply.index
        heartbeat_at = self.heartbeat_at or self.login_reply.heartbeat_ip
        self.heartbeat = pb2_grpc.HeartbeatStub(self.dial(heartbeat_at))
        self.lobby = pb2_grpc.LobbyStub(self.dial(self.lobby_at or self.login_reply.lobby_ip))
        if heartbeat:
            request = pb2.HeartbeatRequest(index=self.index)
            self._follow("heartbeat", self.heartbeat.TryHeartbeat(request), self._beat)
        if lobby:
            self._follow(
                "lobby chat",
                self.lobby.TryChatReceive(pb2.Chat(index=self.index)),
                _chat_into(self.lobby_chats),
            )
            self._follow(
                "lobby status",
                self.lobby.TryStatusRequest(pb2.UserRequest(index=self.index)),
                _status_into(self.lobby_status),
            )
            # Streams are open once the server has answered on them; a beat proves the
            # connection, a command round trip orders us after the stream setup.
            await self.command(Command.LIST_CHANNELS)
        return self

    def _beat(self, reply: pb2.HeartbeatReply) -> None:
        self.beats.append(reply.time)

    def open_channel(self, address: str) -> None:
        self.channel = pb2_grpc.ChannelStub(self.dial(self.channel_at or address))
        self._follow(
            "channel chat",
            self.channel.TryChatReceive(pb2.Chat(index=self.index)),
            _chat_into(self.channel_chats),
        )
        self._follow(
            "channel status",
            self.channel.TryStatusRequest(pb2.UserRequest(index=self.index)),
            _status_into(self.channel_status),
        )

    def _follow(self, name: str, call: Any, record: Callable[[Any], None]) -> None:
        async def follow() -> None:
            try:
                async for item in call:
                    record(item)
                    self._changed.set()
                self.ended[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                self.ended[name] = exc.code()
            self._changed.set()

        self.ended.pop(name, None)
        self._tasks.append(asyncio.create_task(follow()))

    async def command(self, status: int, channel: int | None = None) -> pb2.CommandReply:
        request = pb2.CommandRequest(status=status, index=self.index)
        if channel is not None:
            request.channel = channel
        return await self.lobby.TryCommand(request, timeout=WAIT)

    async def make_channel(self) -> int:
        reply = await self.command(Command.MAKE_CHANNEL)
        assert reply.status == SUCCESS and len(reply.channels) == 1, reply
        self.open_channel(reply.address)
        return reply.channels[0]

    async def join_channel(self, channel: int) -> pb2.CommandReply:
        reply = await self.command(Command.JOIN_CHANNEL, channel)
        if reply.status == SUCCESS:
            self.open_channel(reply.address)
        return reply

    async def users(self, channel: int | None = None) -> dict[int, int]:
        """LIST_USERS as ``{user: channel}``."""
        reply = await self.command(Command.LIST_USERS, channel)
        assert reply.status == SUCCESS and len(reply.users) == len(reply.channels), reply
        return dict(zip(reply.users, reply.channels, strict=True))

    async def say(self, text: str) -> None:
        await self.lobby.TryChatSend(pb2.Chat(index=self.index, text=text), timeout=WAIT)

    async def say_in_channel(self, text: str) -> None:
        await self.channel.TryChatSend(pb2.Chat(index=self.index, text=text), timeout=WAIT)

    async def wait_for(self, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Wait until ``condition()`` is truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"user {self.index}: condition not met within {timeout}s; "
                    f"lobby {self.lobby_chats[-3:]} {self.lobby_status[-3:]}, "
                    f"channel {self.channel_chats[-3:]} {self.channel_status[-3:]}, "
                    f"ended {self.ended}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return result

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()


def _chat_into(chats: list[tuple[int, str]]) -> Callable[[pb2.Chat], None]:
    return lambda chat: chats.append((chat.index, chat.text))


def _status_into(statuses: list[Status]) -> Callable[[pb2.StatusReply], None]:
    def record(reply: pb2.StatusReply) -> None:
        channel = reply.channel if reply.HasField("channel") else None
        statuses.append((pb2.StatusReply.Status.Name(reply.status), reply.index, channel))

    return record


async def _error(call: Any) -> grpc.aio.AioRpcError:
    """The error a unary call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grpc_port: int) -> Iterator[Server]:
    """One server with the gRPC door on, for this module (Socket.IO clients use it too)."""
    with run_server(
        "--grpc-port", str(grpc_port), "--liveness-timeout", str(LIVENESS),
        log_dir=tmp_path_factory.mktemp("grpc"),
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture
def address(server: Server, grpc_port: int) -> str:
    return f"127.0.0.1:{grpc_port}"


Login = Callable[..., Any]


@pytest.fixture
async def login(address: str) -> AsyncIterator[Login]:
    """Log gRPC users in; all are closed after the test."""
    clients: list[GrpcClient] = []

    async def _login(**kwargs: bool) -> GrpcClient:
        client = GrpcClient(address)
        clients.append(client)
        return await client.login(**kwargs)

    yield _login
    for client in clients:
        await client.close()


_marks = itertools.count()


def mark(label: str) -> str:
    """A text no other test sends."""
    return f"{label} #{next(_marks)}"


# -- login and lobby -------------------------------------------------------------------


async def test_login_gives_distinct_indexes_and_one_dialable_address(login, address):
    alice, bob = await login(), await login()
    assert 0 < alice.index != bob.index > 0
    reply = alice.login_reply
    assert reply.heartbeat_ip == reply.lobby_ip == address
    await alice.wait_for(lambda: alice.beats)
    assert abs(alice.beats[0] - time.time()) < 5
    live = await alice.heartbeat.TryUserLives(pb2.UserRequest(index=bob.index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.LIVE


async def test_lobby_chat_reaches_everyone_else_also_socketio(login, connect):
    alice, bob = await login(), await login()
    sam: ChatClient = await connect("sam")
    lobby = (await sam.ok("join", {"room": "lobby"}))["room"]["id"]
    hello, empty_marker = mark("hello"), mark("after empty")

    await alice.say(hello)
    await alice.say("")
    await alice.say("   ")
    await alice.say(empty_marker)
    await bob.wait_for(lambda: (alice.index, empty_marker) in bob.lobby_chats)
    assert [c for c in bob.lobby_chats if c[0] == alice.index] == [
        (alice.index, hello),
        (alice.index, empty_marker),
    ]
    await sam.wait_for(lambda: empty_marker in sam.texts(lobby))
    said = [m for m in sam.messages(lobby) if m["user"]["id"] == alice.index]
    assert [m["text"] for m in said] == [hello, empty_marker]
    assert said[0]["user"]["name"] == f"grpc-{alice.index}"

    from_sam = mark("from sam")
    await sam.ok("send", {"room": "lobby", "text": from_sam})
    for client in (alice, bob):
        await client.wait_for(lambda c=client: (sam.user["id"], from_sam) in c.lobby_chats)
    # Not echoed to its sender.
    assert not [c for c in alice.lobby_chats if c[0] == alice.index]


async def test_a_chat_sent_again_with_its_id_is_in_the_room_once(login, connect):
    alice = await login()
    sam: ChatClient = await connect("sam")
    lobby = (await sam.ok("join", {"room": "lobby"}))["room"]["id"]
    text, chat_id = mark("sent twice"), f"grpc-{uuid.uuid4().hex}"
    for _ in range(2):  # a client that got no answer sends it again, same id
        await alice.lobby.TryChatSend(pb2.Chat(index=alice.index, text=text, id=chat_id))
    taken = await _error(
        alice.lobby.TryChatSend(pb2.Chat(index=alice.index, text=mark("other"), id=chat_id))
    )
    assert taken.code() is grpc.StatusCode.ALREADY_EXISTS and chat_id in taken.details()
    after = mark("after")
    await alice.say(after)
    await sam.wait_for(lambda: after in sam.texts(lobby))
    said = [m for m in sam.messages(lobby) if m["user"]["id"] == alice.index]
    assert [(m["text"], m["id"]) for m in said][:1] == [(text, chat_id)]
    assert [m["text"] for m in said] == [text, after]
    stored = (await sam.ok("history", {"room": "lobby", "limit": 100}))["messages"]
    assert [m["id"] for m in stored].count(chat_id) == 1


async def test_lobby_status_tells_of_logins_and_leaves(login):
    alice = await login()
    bob = await login()
    await alice.wait_for(lambda: ("JOIN_USER", bob.index, None) in alice.lobby_status)
    exit_reply = await bob.lobby.TryUserExit(pb2.UserRequest(index=bob.index), timeout=WAIT)
    assert exit_reply.status == pb2.StatusReply.QUIT and exit_reply.index == bob.index
    await alice.wait_for(lambda: ("LEAVE_USER", bob.index, None) in alice.lobby_status)
    # The user that left is told it is out, and its streams end.
    await bob.wait_for(lambda: ("QUIT", bob.index, None) in bob.lobby_status)
    await bob.wait_for(lambda: {"heartbeat", "lobby chat", "lobby status"} <= set(bob.ended))
    live = await alice.heartbeat.TryUserLives(pb2.UserRequest(index=bob.index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.UNKNOWN
    assert bob.index not in await alice.users()


# -- channels --------------------------------------------------------------------------


async def test_channels_with_grpc_and_socketio_users(login, connect):
    alice, bob = await login(), await login()
    sam: ChatClient = await connect("sam")

    channel = await alice.make_channel()
    await alice.wait_for(lambda: ("JOIN_USER", alice.index, channel) in alice.channel_status)
    listed = await bob.command(Command.LIST_CHANNELS)
    assert listed.status == SUCCESS and channel in listed.channels

    # The channel is the room with that id: a Socket.IO user joins it by number.
    joined = await sam.ok("join", {"room": channel})
    assert alice.index in {m["id"] for m in joined["members"]}

    reply = await bob.join_channel(channel)
    assert reply.status == SUCCESS and reply.address == alice.login_reply.lobby_ip
    for client in (alice, bob):
        await client.wait_for(
            lambda c=client: ("JOIN_USER", bob.index, channel) in c.channel_status
        )
    await sam.wait_for(
        lambda: any(
            p["event"] == "join" and p["user"]["id"] == bob.index for p in sam.of("presence")
        )
    )

    hi = mark("hi channel")
    await alice.say_in_channel(hi)
    await bob.wait_for(lambda: (alice.index, hi) in bob.channel_chats)
    assert await sam.wait_messages(channel, 1) == [hi]
    assert sam.messages(channel)[0]["user"]["id"] == alice.index
    from_sam = mark("sam in channel")
    await sam.ok("send", {"room": channel, "text": from_sam})
    for client in (alice, bob):
        await client.wait_for(lambda c=client: (sam.user["id"], from_sam) in c.channel_chats)
    # Channel chat is not echoed, and stays out of the lobby.
    assert (alice.index, hi) not in alice.channel_chats
    assert (alice.index, hi) not in bob.lobby_chats

    everyone = await alice.users()
    assert everyone[alice.index] == channel and everyone[bob.index] == channel
    assert await alice.users(channel) == {alice.index: channel, bob.index: channel,
                                          sam.user["id"]: channel}  # fmt: skip
    members = await sam.ok("members", {"room": channel})
    assert {alice.index, bob.index} <= {m["id"] for m in members["members"]}

    left = await bob.command(Command.LEAVE_CHANNEL, channel)
    assert left.status == SUCCESS
    await alice.wait_for(lambda: ("LEAVE_USER", bob.index, channel) in alice.channel_status)
    await sam.wait_for(
        lambda: any(
            p["event"] == "leave" and p["user"]["id"] == bob.index for p in sam.of("presence")
        )
    )
    # Bob's channel streams were tied to the channel he left: they end.
    await bob.wait_for(lambda: {"channel chat", "channel status"} <= set(bob.ended))
    assert bob.ended["channel chat"] == grpc.StatusCode.OK
    error = await _error(bob.channel.TryChatSend(pb2.Chat(index=bob.index, text="x")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await alice.users())[bob.index] == 0
    assert (await bob.command(Command.LEAVE_CHANNEL)).status == FAILURE


async def test_make_channel_moves_the_maker_out_of_its_channel(login):
    alice, bob = await login(), await login()
    first = await alice.make_channel()
    assert (await bob.join_channel(first)).status == SUCCESS
    await bob.wait_for(lambda: ("JOIN_USER", bob.index, first) in bob.channel_status)
    second = await alice.make_channel()
    assert second != first
    await bob.wait_for(lambda: ("LEAVE_USER", alice.index, first) in bob.channel_status)
    assert (await bob.users())[alice.index] == second
    listed = await bob.command(Command.LIST_CHANNELS)
    assert {first, second} <= set(listed.channels)


async def test_channel_remove_keeps_the_user_in_the_lobby(login):
    alice, bob = await login(), await login()
    channel = await alice.make_channel()
    await bob.join_channel(channel)
    await alice.wait_for(lambda: ("JOIN_USER", bob.index, channel) in alice.channel_status)
    await bob.channel.TryUserRemove(pb2.UserRequest(index=bob.index), timeout=WAIT)
    await alice.wait_for(lambda: ("LEAVE_USER", bob.index, channel) in alice.channel_status)
    assert (await alice.users())[bob.index] == 0
    hello = mark("still here")
    await alice.say(hello)
    await bob.wait_for(lambda: (alice.index, hello) in bob.lobby_chats)


# -- refusals --------------------------------------------------------------------------


async def test_unknown_users_and_bad_requests_get_statuses(login):
    alice = await login()
    lobby, heartbeat = alice.lobby, alice.heartbeat
    channel = pb2_grpc.ChannelStub(alice.dial(alice.login_reply.lobby_ip))
    unknown = 2_000_000_000

    cases = [
        (lobby.TryCommand(Command(status=Command.LIST_USERS, index=unknown)), "NOT_FOUND"),
        (lobby.TryCommand(Command(status=Command.LIST_USERS)), "INVALID_ARGUMENT"),
        (lobby.TryCommand(Command(status=Command.LIST_USERS, index=-4)), "INVALID_ARGUMENT"),
        (lobby.TryCommand(Command(status=42, index=alice.index)), "INVALID_ARGUMENT"),
        (lobby.TryCommand(Command(status=Command.JOIN_CHANNEL, index=alice.index)),
         "INVALID_ARGUMENT"),
        (lobby.TryChatSend(pb2.Chat(index=unknown, text="x")), "NOT_FOUND"),
        (lobby.TryChatSend(pb2.Chat(index=alice.index, text="x" * 5000)), "INVALID_ARGUMENT"),
        (lobby.TryChatSend(pb2.Chat(index=alice.index, text="x", id="no spaces")),
         "INVALID_ARGUMENT"),
        (lobby.TryUserRemove(pb2.UserRequest(index=unknown)), "NOT_FOUND"),
        (lobby.TryUserExit(pb2.UserRequest(index=unknown)), "NOT_FOUND"),
        (channel.TryChatSend(pb2.Chat(index=alice.index, text="x")), "FAILED_PRECONDITION"),
        (channel.TryUserRemove(pb2.UserRequest(index=alice.index)), "FAILED_PRECONDITION"),
        (heartbeat.TryUserLives(pb2.UserRequest(index=0)), "INVALID_ARGUMENT"),
    ]  # fmt: skip
    for call, code in cases:
        error = await _error(call)
        assert error.code().name == code, (code, error)
        assert error.details()

    for stream in (
        lobby.TryChatReceive(pb2.Chat(index=unknown)),
        lobby.TryStatusRequest(pb2.UserRequest(index=unknown)),
        heartbeat.TryHeartbeat(pb2.HeartbeatRequest(index=unknown)),
        channel.TryChatReceive(pb2.Chat(index=alice.index)),
        channel.TryStatusRequest(pb2.UserRequest(index=alice.index)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stream.read(), WAIT)
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)

    joined = await alice.command(Command.JOIN_CHANNEL, 2_000_000_000)
    assert joined.status == FAILURE
    lives = await heartbeat.TryUserLives(pb2.UserRequest(index=unknown), timeout=WAIT)
    assert lives.status == pb2.UserLivesReply.UNKNOWN
    # The door still serves.
    assert alice.index in await alice.users()


async def test_requests_that_are_not_protobuf_messages_get_invalid_argument(login, server):
    """Bytes that do not parse as the method's request type are a bad request, said so,
    and leave no error in the node's log (a client looping on garbage must not flood it)."""
    alice = await login()
    channel = alice.dial(alice.login_reply.lobby_ip)
    garbage = [b"\xff\xff", b"\x0a\x05ab"]  # not protobuf; a field cut short
    # A string field that is not UTF-8: `text` (2) of a Chat, `ip` (1) of a LoginRequest.
    methods = [
        ("/Lobby/TryCommand", "CommandRequest", channel.unary_unary, []),
        ("/Lobby/TryChatSend", "Chat", channel.unary_unary, [b"\x12\x02\xc3\x28"]),
        ("/Agent/TryLogin", "LoginRequest", channel.unary_unary, [b"\x0a\x02\xc3\x28"]),
        ("/Heartbeat/TryHeartbeat", "HeartbeatRequest", channel.unary_stream, []),
        ("/Lobby/TryChatReceive", "Chat", channel.unary_stream, [b"\x12\x01\xff"]),
    ]
    for path, expected, kind, not_utf8 in methods:
        call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for raw in garbage + not_utf8:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                answer = call(raw, timeout=WAIT)
                await (answer.read() if kind == channel.unary_stream else answer)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, raw)
            assert f"not a valid {expected}" in info.value.details(), info.value.details()
    assert alice.index in await alice.users()  # the door still serves
    assert "Unexpected [DecodeError]" not in server.output()


async def test_commands_past_the_request_rate_are_refused_and_change_nothing(tmp_path):
    port = free_port()
    args = ("--grpc-port", str(port), "--request-rate-limit", "0.1", "--request-rate-burst", "3")
    with run_server(*args, log_dir=tmp_path) as server:
        alice = await GrpcClient(f"127.0.0.1:{port}").login()  # its first command: a listing
        bob = await GrpcClient(f"127.0.0.1:{port}").login()
        sam = await ChatClient(server.url, "sam").connect()
        try:
            made = await alice.make_channel()
            assert made in (await alice.command(Command.LIST_CHANNELS)).channels
            # One request every 10 s past a burst of 3: none comes back during the test.
            refused = await _error(
                alice.lobby.TryCommand(Command(status=Command.LEAVE_CHANNEL, index=alice.index))
            )
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.details()
            # Still in its channel: bob (a budget of his own) sees it there, and so does the
            # room; and its chats, not requests, still go.
            assert (await bob.users())[alice.index] == made
            joined = await sam.ok("join", {"room": made})
            assert alice.index in {m["id"] for m in joined["members"]}
            await alice.say_in_channel("still heard")
            assert await sam.wait_messages(made, 1) == ["still heard"]
            # What an operator sees: the refusal, by its status.
            refusals = {
                re.search(r'status="([^"]+)"', k).group(1): v
                for k, v in scrape(server.url).items()
                if k.startswith("roomcast_grpc_refused_total{")
            }
            assert refusals == {"RESOURCE_EXHAUSTED": 1}
        finally:
            await alice.close()
            await bob.close()
            await sam.close()


# -- liveness --------------------------------------------------------------------------


async def test_a_user_that_never_beats_is_removed_an_idle_beating_one_stays(login):
    watcher = await login()
    silent = await login(heartbeat=False)
    idle = await login()
    await watcher.wait_for(
        lambda: ("LEAVE_USER", silent.index, None) in watcher.lobby_status, timeout=LIVENESS + 2
    )
    users = await watcher.users()
    assert silent.index not in users and idle.index in users
    await asyncio.sleep(LIVENESS - 1)
    # Idle for longer than the liveness timeout, but beating: still there.
    assert idle.index in await watcher.users()
    assert ("LEAVE_USER", idle.index, None) not in watcher.lobby_status


CLIENT = """
import asyncio, sys
import grpc
from roomcast.grpc import client_to_agent_pb2 as pb2, client_to_agent_pb2_grpc as pb2_grpc

async def main(address, channel):
    async with grpc.aio.insecure_channel(address) as dialed:
        reply = await pb2_grpc.AgentStub(dialed).TryLogin(pb2.LoginRequest(ip="127.0.0.1"))
        index = reply.index
        beats = pb2_grpc.HeartbeatStub(dialed).TryHeartbeat(pb2.HeartbeatRequest(index=index))
        lobby = pb2_grpc.LobbyStub(dialed)
        chats = lobby.TryChatReceive(pb2.Chat(index=index))
        status = pb2.CommandRequest.JOIN_CHANNEL
        await lobby.TryCommand(pb2.CommandRequest(status=status, index=index, channel=channel))
        events = pb2_grpc.ChannelStub(dialed).TryStatusRequest(pb2.UserRequest(index=index))
        await beats.read()
        await events.read()
        print(index, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _spawn_client(address: str, channel: int) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, address, str(channel), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), WAIT)
    return process, int(line)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
async def test_a_vanished_client_is_removed_within_the_liveness_timeout(
    how, login, connect, address
):
    """SIGKILL closes the client's connection; SIGSTOP leaves it open and silent (a host
    that froze or fell off the network)."""
    alice = await login()
    channel = await alice.make_channel()
    sam: ChatClient = await connect("sam")
    await sam.ok("join", {"room": channel})
    process, gone = await _spawn_client(address, channel)
    try:
        await alice.wait_for(lambda: ("JOIN_USER", gone, channel) in alice.channel_status)
        members = await sam.ok("members", {"room": channel})
        assert gone in {m["id"] for m in members["members"]}
        assert (await alice.users())[gone] == channel

        process.send_signal(getattr(signal, how))
        vanished = time.monotonic()
        await alice.wait_for(
            lambda: ("LEAVE_USER", gone, channel) in alice.channel_status, timeout=LIVENESS + 1
        )
        await alice.wait_for(lambda: ("LEAVE_USER", gone, None) in alice.lobby_status)
        await sam.wait_for(
            lambda: any(
                p["event"] == "leave" and p["user"]["id"] == gone for p in sam.of("presence")
            )
        )
        assert time.monotonic() - vanished <= LIVENESS + 0.5
        assert gone not in await alice.users()
        members = await sam.ok("members", {"room": channel})
        assert gone not in {m["id"] for m in members["members"]}
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
