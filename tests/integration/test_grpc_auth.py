"""The gRPC door of a server that checks tokens (``--auth-secret``): every call carries
``authorization: Bearer TOKEN`` metadata; a token is one user (the same index on every
login, the same id on Socket.IO); a call may act only as its token's user, and enter only
the rooms its token names."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest

from roomcast.chat.grpc_backend import bearer as with_token
from roomcast.core.auth import Authenticator
from roomcast.grpc import client_to_agent_pb2 as pb2
from roomcast.grpc import client_to_agent_pb2_grpc as pb2_grpc

from .clients import WAIT, ChatClient
from .servers import Server, free_port, run_server
from .test_grpc import FAILURE, LIVENESS, SUCCESS, Command, GrpcClient, _error, mark

SECRET = "a test secret of the gRPC door, 32+ characters"

tokens = Authenticator(SECRET)


def token_of(
    subject: str | None = None, *, name: str | None = None, rooms: Sequence[str] | None = None
) -> str:
    """A valid token for ``subject`` (a new one when None)."""
    return tokens.mint(subject or f"user-{uuid.uuid4().hex[:12]}", ttl=3600, name=name, rooms=rooms)


def metadata_of(token: str) -> tuple[tuple[str, str]]:
    """The metadata of a call carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class TokenClient(GrpcClient):
    """A :class:`GrpcClient` whose every call carries ``token``, as the chat CLI's do."""

    def __init__(self, agent_address: str, token: str, **kwargs: Any) -> None:
        super().__init__(agent_address, **kwargs)
        self.token = token

    def dial(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(
                address, interceptors=with_token(self.token)
            )
        return self._channels[address]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grpc_port: int) -> Iterator[Server]:
    """One server that checks tokens, with the gRPC door on, for this module."""
    with run_server(
        "--grpc-port", str(grpc_port), "--liveness-timeout", str(LIVENESS),
        "--auth-secret", SECRET,
        log_dir=tmp_path_factory.mktemp("grpc-auth"),
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture
def address(server: Server, grpc_port: int) -> str:
    return f"127.0.0.1:{grpc_port}"


Login = Callable[..., Any]


@pytest.fixture
async def login(address: str) -> AsyncIterator[Login]:
    """Log gRPC users in with a token (a new user's when none is given); all are closed
    after the test."""
    clients: list[TokenClient] = []

    async def _login(token: str | None = None, **kwargs: bool) -> TokenClient:
        client = TokenClient(address, token or token_of())
        clients.append(client)
        return await client.login(**kwargs)

    yield _login
    for client in clients:
        await client.close()


@pytest.fixture
async def anonymous(address: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the door whose calls carry no token of their own."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield channel


Connect = Callable[[str], Any]


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[Connect]:
    """Connect Socket.IO clients with a token; all are closed after the test."""
    clients: list[ChatClient] = []

    async def _connect(token: str) -> ChatClient:
        client = ChatClient(server.url, "by token", token=token)
        clients.append(client)
        return await client.connect()

    yield _connect
    for client in clients:
        await client.close()


# -- who calls -------------------------------------------------------------------------


async def test_a_call_without_a_valid_token_is_unauthenticated(anonymous, login):
    alice = await login()
    agent, lobby = pb2_grpc.AgentStub(anonymous), pb2_grpc.LobbyStub(anonymous)
    heartbeat, channel = pb2_grpc.HeartbeatStub(anonymous), pb2_grpc.ChannelStub(anonymous)
    index = alice.index
    # Every service, none of them with a token.
    for call in (
        agent.TryLogin(pb2.LoginRequest(ip="127.0.0.1"), timeout=WAIT),
        heartbeat.TryUserLives(pb2.UserRequest(index=index), timeout=WAIT),
        lobby.TryChatSend(pb2.Chat(index=index, text="no token"), timeout=WAIT),
        lobby.TryCommand(Command(status=Command.LIST_USERS, index=index), timeout=WAIT),
        lobby.TryUserExit(pb2.UserRequest(index=index), timeout=WAIT),
        channel.TryUserRemove(pb2.UserRequest(index=index), timeout=WAIT),
    ):
        error = await _error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert "authorization" in error.details()
    for stream in (
        heartbeat.TryHeartbeat(pb2.HeartbeatRequest(index=index)),
        lobby.TryChatReceive(pb2.Chat(index=index)),
        lobby.TryStatusRequest(pb2.UserRequest(index=index)),
        channel.TryChatReceive(pb2.Chat(index=index)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stream.read(), WAIT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    other_secret = Authenticator("another secret, also 32 characters long")
    refused = {
        "not bearer": (("authorization", "Basic YWxpY2U6c2VjcmV0"),),
        "no token": (("authorization", "Bearer "),),
        "garbage": metadata_of("not.a.token"),
        "badly signed": metadata_of(other_secret.mint("alice", ttl=3600)),
        "expired": metadata_of(tokens.mint("alice", ttl=60, now=time.time() - 3600)),
    }
    for what, metadata in refused.items():
        error = await _error(agent.TryLogin(pb2.LoginRequest(), metadata=metadata, timeout=WAIT))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, what
        assert error.details(), what
    assert "expired" in error.details()

    # Nothing was done as alice: the refused TryUserExit left her logged in.
    live = await alice.heartbeat.TryUserLives(pb2.UserRequest(index=index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.LIVE
    assert "heartbeat" not in alice.ended


async def test_a_token_is_one_user_on_every_login_and_on_socketio(login, connect):
    subject = f"alice-{uuid.uuid4().hex[:8]}"
    token = token_of(subject, name="Alice")
    watcher = await login()
    alice = await login(token)
    await watcher.wait_for(lambda: ("JOIN_USER", alice.index, None) in watcher.lobby_status)
    channel = await alice.make_channel()

    # Logging in again, with another token of the same subject, while logged in: the
    # same user, as it was (still in its channel), with no second join.
    again = await login(token_of(subject, name="Alice"), lobby=False)
    assert again.index == alice.index
    users = await watcher.users()
    assert users[alice.index] == channel
    hello = mark("hello from again")
    await again.say(hello)
    await watcher.wait_for(lambda: (alice.index, hello) in watcher.lobby_chats)
    # Ordered after a second join of alice's on the watcher's status stream: a later login.
    bob = await login()
    await watcher.wait_for(lambda: ("JOIN_USER", bob.index, None) in watcher.lobby_status)
    assert watcher.lobby_status.count(("JOIN_USER", alice.index, None)) == 1
    assert "heartbeat" not in alice.ended

    # The same token on Socket.IO: the same user id, the token's name.
    sam = await connect(token)
    assert sam.user == {"id": alice.index, "name": "Alice"}
    members = await sam.ok("members", {"room": channel})
    assert {"id": alice.index, "name": "Alice"} in members["members"]


async def test_a_login_after_logging_out_gets_the_same_index(login):
    token = token_of()
    first = await login(token)
    await first.lobby.TryUserExit(pb2.UserRequest(index=first.index), timeout=WAIT)
    await first.wait_for(lambda: "heartbeat" in first.ended)
    second = await login(token)
    assert second.index == first.index
    live = await second.heartbeat.TryUserLives(pb2.UserRequest(index=second.index))
    assert live.status == pb2.UserLivesReply.LIVE


async def test_another_users_index_is_permission_denied_and_changes_nothing(login):
    alice, bob = await login(), await login()
    channel = await bob.make_channel()
    await bob.wait_for(lambda: ("JOIN_USER", bob.index, channel) in bob.channel_status)
    lobby, heartbeat = alice.lobby, alice.heartbeat  # alice's token on every call
    channel_stub = pb2_grpc.ChannelStub(alice.dial(alice.login_reply.lobby_ip))
    spoofed = mark("spoofed")
    nobody = 2_000_000_000

    for index in (bob.index, nobody):  # no telling who is logged in, either
        for call in (
            lobby.TryChatSend(pb2.Chat(index=index, text=spoofed), timeout=WAIT),
            lobby.TryCommand(Command(status=Command.LEAVE_CHANNEL, index=index), timeout=WAIT),
            lobby.TryCommand(Command(status=Command.MAKE_CHANNEL, index=index), timeout=WAIT),
            lobby.TryUserRemove(pb2.UserRequest(index=index), timeout=WAIT),
            lobby.TryUserExit(pb2.UserRequest(index=index), timeout=WAIT),
            channel_stub.TryChatSend(pb2.Chat(index=index, text=spoofed), timeout=WAIT),
            channel_stub.TryUserRemove(pb2.UserRequest(index=index), timeout=WAIT),
        ):
            error = await _error(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
            assert str(index) in error.details()
        for stream in (
            heartbeat.TryHeartbeat(pb2.HeartbeatRequest(index=index)),
            lobby.TryChatReceive(pb2.Chat(index=index)),
            lobby.TryStatusRequest(pb2.UserRequest(index=index)),
            channel_stub.TryChatReceive(pb2.Chat(index=index)),
            channel_stub.TryStatusRequest(pb2.UserRequest(index=index)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(stream.read(), WAIT)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Asking whether another user lives is allowed.
    live = await heartbeat.TryUserLives(pb2.UserRequest(index=bob.index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.LIVE
    # Bob is where he was, and heard nothing spoofed: alice's own chat, sent after the
    # refusals, is the first he hears from anyone.
    assert (await alice.users())[bob.index] == channel
    assert not bob.ended
    after = mark("after")
    await alice.say(after)
    await bob.wait_for(lambda: (alice.index, after) in bob.lobby_chats)
    assert bob.lobby_chats == [(alice.index, after)]
    assert not [chat for chat in bob.channel_chats if chat[1] == spoofed]


# -- rooms -----------------------------------------------------------------------------


async def test_channels_are_those_the_token_names(login, connect):
    everywhere = await login()
    elsewhere = await everywhere.make_channel()  # channel-<random>
    team = f"team-{uuid.uuid4().hex[:8]}"
    sam = await connect(token_of(name="sam"))
    joined = await sam.ok("join", {"room": team})
    team_room = joined["room"]["id"]

    carol_is = f"carol-{uuid.uuid4().hex[:8]}"
    carol = await login(token_of(carol_is, name="carol", rooms=["lobby", "team-*"]))
    listed = await carol.command(Command.LIST_CHANNELS)
    assert listed.status == SUCCESS
    assert team_room in listed.channels and elsewhere not in listed.channels
    assert elsewhere in (await everywhere.command(Command.LIST_CHANNELS)).channels

    for call in (
        carol.command(Command.JOIN_CHANNEL, elsewhere),
        carol.command(Command.LIST_USERS, elsewhere),
        carol.command(Command.MAKE_CHANNEL),  # its name would be channel-<random>
    ):
        error = await _error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert (await carol.command(Command.JOIN_CHANNEL, 2_000_000_000)).status == FAILURE
    assert carol.index not in await everywhere.users(elsewhere)
    assert (await everywhere.users())[carol.index] == 0  # still in the lobby only

    reply = await carol.join_channel(team_room)
    assert reply.status == SUCCESS
    await carol.wait_for(lambda: ("JOIN_USER", carol.index, team_room) in carol.channel_status)
    await sam.wait_for(
        lambda: any(p["user"] == {"id": carol.index, "name": "carol"} for p in sam.of("presence"))
    )
    hi = mark("hi team")
    await carol.say_in_channel(hi)
    assert await sam.wait_messages(team_room, 1) == [hi]
    back = mark("hi carol")
    await sam.ok("send", {"room": team_room, "text": back})
    await carol.wait_for(lambda: (sam.user["id"], back) in carol.channel_chats)
    assert (await carol.users(team_room)).keys() == {carol.index, sam.user["id"]}

    # Each call is checked with its own token: one of carol's that names fewer rooms
    # does not reach the channel she joined with the other.
    narrower = TokenClient(carol.agent_address, token_of(carol_is, rooms=["lobby"]))
    try:
        again = await narrower.login(heartbeat=False, lobby=False)
        assert again.index == carol.index
        channel = pb2_grpc.ChannelStub(narrower.dial(narrower.login_reply.lobby_ip))
        error = await _error(channel.TryChatSend(pb2.Chat(index=carol.index, text="x")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await narrower.close()


async def test_a_token_that_does_not_name_the_lobby_cannot_log_in(address):
    client = TokenClient(address, token_of(rooms=["team-*"]))
    try:
        error = await _error(client.login())
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "lobby" in error.details()
    finally:
        await client.close()


async def test_the_users_socketio_connection_leaving_the_lobby_keeps_its_grpc_login(login, connect):
    token = token_of()
    alice, watcher = await login(token), await login()
    tab = await connect(token)  # the same user, in a browser
    await tab.ok("join", {"room": "lobby"})
    await tab.ok("leave", {"room": "lobby"})
    await tab.close()
    # Ordered after the tab's leave on the lobby status streams: a later login.
    bob = await login()
    for client in (alice, watcher):
        await client.wait_for(lambda c=client: ("JOIN_USER", bob.index, None) in c.lobby_status)
    assert ("QUIT", alice.index, None) not in alice.lobby_status
    # Alice is still in the lobby through her gRPC login: nobody is told she left.
    assert ("LEAVE_USER", alice.index, None) not in watcher.lobby_status
    assert not alice.ended
    live = await bob.heartbeat.TryUserLives(pb2.UserRequest(index=alice.index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.LIVE
    hello = mark("still here")
    await bob.say(hello)
    await alice.wait_for(lambda: (bob.index, hello) in alice.lobby_chats)


async def test_logging_out_is_told_while_the_users_socketio_connection_stays(login, connect):
    token = token_of()
    alice, bob = await login(token), await login()
    tab = await connect(token)  # the same user, in a browser, in the lobby
    await tab.ok("join", {"room": "lobby"})
    exit_reply = await alice.lobby.TryUserExit(pb2.UserRequest(index=alice.index), timeout=WAIT)
    assert exit_reply.status == pb2.StatusReply.QUIT
    # Alice is still in the lobby, through the tab: nobody is told she left. Her gRPC
    # login is over all the same: QUIT, and her streams end, at once.
    await alice.wait_for(lambda: ("QUIT", alice.index, None) in alice.lobby_status, timeout=1)
    await alice.wait_for(lambda: {"heartbeat", "lobby chat", "lobby status"} <= set(alice.ended))
    live = await bob.heartbeat.TryUserLives(pb2.UserRequest(index=alice.index), timeout=WAIT)
    assert live.status == pb2.UserLivesReply.UNKNOWN
    members = await tab.ok("members", {"room": "lobby"})
    assert alice.index in {m["id"] for m in members["members"]}


# -- expiry ----------------------------------------------------------------------------


def expiring_token(subject: str | None = None) -> tuple[str, int]:
    """A token accepted now that expires within a few seconds (its ``exp`` 7 s past, within
    the 10 s clocks may differ by: accepted for 2-3 s more), and its ``exp``."""
    subject = subject or f"user-{uuid.uuid4().hex[:12]}"
    issued = int(time.time()) - 8
    return tokens.mint(subject, ttl=1, now=issued), issued + 1


async def test_a_login_ends_when_its_newest_token_expires(login):
    watcher = await login()
    lapsing = await login(expiring_token()[0])
    subject = f"user-{uuid.uuid4().hex[:12]}"
    first, expires = expiring_token(subject)
    kept = await login(first)
    # A call of kept's with a newer token keeps its login alive past the first's expiry.
    renewed = TokenClient(kept.agent_address, token_of(subject))
    try:
        lobby = pb2_grpc.LobbyStub(renewed.dial(kept.login_reply.lobby_ip))
        await lobby.TryChatSend(pb2.Chat(index=kept.index, text=mark("renewed")), timeout=WAIT)

        await lapsing.wait_for(lambda: "heartbeat" in lapsing.ended)
        assert lapsing.ended["heartbeat"] == grpc.StatusCode.UNAUTHENTICATED
        await watcher.wait_for(lambda: ("LEAVE_USER", lapsing.index, None) in watcher.lobby_status)
        lives = await watcher.heartbeat.TryUserLives(
            pb2.UserRequest(index=lapsing.index), timeout=WAIT
        )
        assert lives.status == pb2.UserLivesReply.UNKNOWN
        # A beat the server sent (its time in it) well after kept's first token expired:
        # the login was still alive then. The leeway is 10 s.
        await kept.wait_for(lambda: kept.beats and kept.beats[-1] >= expires + 12, timeout=15)
        assert "heartbeat" not in kept.ended
        lives = await watcher.heartbeat.TryUserLives(
            pb2.UserRequest(index=kept.index), timeout=WAIT
        )
        assert lives.status == pb2.UserLivesReply.LIVE
    finally:
        await renewed.close()


async def test_a_login_with_a_token_of_a_key_the_provider_just_published_is_let_in(tmp_path):
    """After an identity provider rotates its key, the first gRPC call with a token of the
    new key waits for the node's fetch of the set it asked for, and is let in."""
    from tests.identity_provider import identity_provider, jwk_of, rsa_key, sign

    signing, rotated = rsa_key(), rsa_key()
    grpc_port = free_port()
    with identity_provider() as provider:
        provider.keys = [jwk_of(signing, "old")]
        with run_server(
            "--auth-jwks-url", provider.url, "--grpc-port", str(grpc_port),
            log_dir=tmp_path,
        ):  # fmt: skip
            assert provider.fetches == 1
            provider.keys = [jwk_of(signing, "old"), jwk_of(rotated, "new")]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                agent = pb2_grpc.AgentStub(channel)
                fresh = metadata_of(sign(rotated, "RS256", "new", "bob"))
                reply = await agent.TryLogin(pb2.LoginRequest(), metadata=fresh, timeout=WAIT)
                assert reply.index > 0
                assert provider.fetches == 2
                made_up = metadata_of(sign(rotated, "RS256", "made-up", "eve"))
                error = await _error(agent.TryLogin(pb2.LoginRequest(), metadata=made_up))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "kid 'made-up'" in error.details()
                assert provider.fetches == 2
