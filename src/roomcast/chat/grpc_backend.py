"""The terminal client over roomcast's gRPC door (``proto/client_to_agent.proto``).

The session, as the protocol lays it out::

    Agent.TryLogin                  -> our index, the Heartbeat and Lobby addresses
    Heartbeat.TryHeartbeat          a stream kept open: we are logged in while it is
    Lobby.TryChatReceive            the lobby's chat          (streams, kept open)
    Lobby.TryStatusRequest          the lobby's joins, leaves and our QUIT
    Lobby.TryChatSend               /all, and lines typed in the lobby
    Lobby.TryCommand                /list /make /join /leave /user
    Channel.TryChatReceive          on the address MAKE/JOIN_CHANNEL returned: its chat
    Channel.TryStatusRequest        its joins and leaves; opening it announces us
    Channel.TryChatSend             lines typed in the channel
    Lobby.TryUserExit               on the way out

Users are known by number (``user 7``) and channels too (``channel 3``): the protocol has
no names, no history and does not echo one's own chat, so the client shows what it sends
itself. When the session is lost (the heartbeat or a lobby stream ends, or the server says
QUIT) the client logs in again — under a new number, or with a token under the same one —
and goes back into its channel; messages sent meanwhile are not recovered, the protocol
having no positions.

With a token every call carries it, as ``authorization: Bearer TOKEN`` metadata (the
door checks it on each). A login again refused as UNAUTHENTICATED (the token expired
meanwhile) ends the client: no retry can succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from ..grpc import client_to_agent_pb2 as pb2
from ..grpc import client_to_agent_pb2_grpc as pb2_grpc
from . import view
from .backend import LOBBY, NO_TOKEN, RESEND_FOR, TIMEOUT, CommandFailed, Screen

Command = pb2.CommandRequest
SUCCESS = pb2.CommandReply.SUCCESS

RELOGIN_DELAY = 0.5
RELOGIN_DELAY_MAX = 5.0
_RESEND = frozenset(
    {"unavailable", "deadline_exceeded", "resource_exhausted", "not_found", "failed_precondition"}
)
"""Refusals of a chat that sending it again can cure: the server or its engines away, no
answer, the rate limit, or a session the server lost (an unknown user, not in the
channel) that the client is logging in again."""
EXIT_TIMEOUT = 2.0
"""Seconds the logout may take on the way out."""


def user_name(index: int) -> str:
    return f"user {index}"


def channel_name(number: int) -> str:
    return f"channel {number}"


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.name.lower()
"""The code of a call refused for want of a valid token, as a CommandFailed has it."""


def _failed(exc: grpc.aio.AioRpcError) -> CommandFailed:
    code = exc.code()
    name = code.name.lower() if isinstance(code, grpc.StatusCode) else "error"
    return CommandFailed(name, exc.details() or name)


def bearer(token: str) -> list[Any]:
    """Interceptors that put ``authorization: Bearer TOKEN`` on every call of a channel.

    One per kind of call: a ``grpc.aio`` channel files an interceptor under the first of
    the kinds it implements only, so one object for both would miss the streams.
    """
    pair = ("authorization", f"Bearer {token}")
    return [_BearerUnary(pair), _BearerStream(pair)]


def _with_metadata(details: Any, pair: tuple[str, str]) -> Any:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), pair))


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._pair), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._pair), request)


class GrpcBackend:
    """A chat user logged in through the gRPC door's Agent at ``agent`` (host:port)."""

    def __init__(
        self,
        screen: Screen,
        *,
        agent: str,
        name: str,
        room: str = LOBBY,
        token: str | None = None,
    ) -> None:
        self._screen = screen
        self._agent = agent
        self._name = name
        self._start_room = room
        self._token = token
        self._interceptors = bearer(token) if token is not None else None
        self._channels: dict[str, Any] = {}  # address -> grpc.aio.Channel
        self._index = 0
        self._lobby_address = ""
        self._channel: int | None = None
        self._channel_address = ""
        self._joined = asyncio.Event()  # our own JOIN_USER came back on the channel
        self._session: list[asyncio.Task[None]] = []  # heartbeat and lobby streams
        self._in_channel: list[asyncio.Task[None]] = []
        self._relogin: asyncio.Task[None] | None = None
        self._back = asyncio.Event()  # cleared while a lost session is being restored
        self._back.set()
        self._restoring: int | None = None  # the channel a lost session goes back into
        self._closing = False
        self._gone = asyncio.Event()  # the server will not take us back
        self._gone_because = CommandFailed(UNAUTHENTICATED, "refused by the server")

    # -- Backend ---------------------------------------------------------------------

    @property
    def nick(self) -> str:
        return user_name(self._index) if self._index else self._name

    @property
    def room(self) -> str:
        channel = self._where()
        return channel_name(channel) if channel else LOBBY

    def _where(self) -> int | None:
        """The channel the user is in — while a lost session is restored, the one it is
        going back into."""
        return self._channel if self._back.is_set() else self._restoring

    async def start(self) -> None:
        await self._login()
        self._screen.show(
            view.notice(f"logged in at {self._agent} as {self.nick} (gRPC users have numbers)")
        )
        if self._start_room != LOBBY:
            await self.join(self._start_room)

    async def close(self) -> None:
        self._closing = True
        if self._relogin is not None:
            await self._cancel([self._relogin])
        await self._cancel(self._in_channel)
        if self._index:
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                request = pb2.UserRequest(index=self._index)
                await self._lobby().TryUserExit(request, timeout=EXIT_TIMEOUT)
        await self._cancel(self._session)
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()

    async def ended(self) -> CommandFailed:
        await self._gone.wait()
        return self._gone_because

    async def say(self, text: str) -> None:
        channel = self._where()
        if channel is None:
            await self.say_all(text)
            return

        def send(chat: Any) -> Any:
            stub = _stub("Channel", self._dial(self._channel_address))
            return stub.TryChatSend(chat, timeout=TIMEOUT)

        await self._send(send, text, lambda: self._channel == channel)
        self._screen.show(view.message(channel_name(channel), self.nick, text))

    async def say_all(self, text: str) -> None:
        def send(chat: Any) -> Any:
            return self._lobby().TryChatSend(chat, timeout=TIMEOUT)

        await self._send(send, text, lambda: True)
        self._screen.show(view.message(LOBBY, self.nick, text))

    async def _send(
        self, send: Callable[[Any], Any], text: str, still_there: Callable[[], bool]
    ) -> None:
        """Send a chat under an id of its own; one that got no answer, or that the server
        could not take, is sent again under that id once the session is back (logged in
        again, back in its channel), for up to :data:`RESEND_FOR` seconds."""
        chat_id = secrets.token_hex(12)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESEND_FOR
        pause = 1.0
        tried = False
        while True:
            try:
                await self._call(send(pb2.Chat(index=self._index, text=text, id=chat_id)))
                return
            except CommandFailed as exc:
                if exc.code == "already_exists" and tried:
                    # The id is random: the message under it is this one, stored by an
                    # earlier try (under the number the session had before it was lost).
                    return
                if exc.code not in _RESEND or loop.time() + pause >= deadline:
                    raise
                tried = True
                self._screen.show(view.notice("not confirmed yet; sending it again..."))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 8.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._back.wait(), max(deadline - loop.time(), 0.0))
            if not still_there():
                raise CommandFailed("not_member", "not back in the channel; the line was not sent")

    async def make(self, name: str) -> None:
        if name:
            self._screen.show(view.notice("gRPC channels have numbers, not names"))
        reply = await self._command(Command.MAKE_CHANNEL)
        if reply.status != SUCCESS or not reply.channels:
            raise CommandFailed("failure", "the server made no channel")
        await self._enter(reply.channels[0], reply.address)

    async def list_rooms(self) -> None:
        rows = await self._rows()
        self._screen.show(view.rooms("channels with members:", rows, "no channels; /make"))

    async def rooms(self) -> None:
        everyone = await self._command(Command.LIST_USERS)
        lobby = view.RoomLine("-", LOBBY, len(set(everyone.users)), self._channel is None)
        self._screen.show(view.rooms("rooms:", [lobby, *await self._rows()], "no rooms"))

    async def join(self, target: str) -> None:
        if target == LOBBY:
            if self._channel is not None:
                await self.leave()
            return
        digits = target.removeprefix("#")
        if not digits.isdigit() or not 0 < int(digits) < 2**31:
            raise CommandFailed("bad_request", "over gRPC a channel is a number from /list")
        number = int(digits)
        if number == self._channel:
            self._screen.show(view.notice(f"already in [{channel_name(number)}]"))
            return
        reply = await self._command(Command.JOIN_CHANNEL, number)
        if reply.status != SUCCESS:
            raise CommandFailed("not_found", f"no channel {number} to join")
        await self._enter(number, reply.address)

    async def leave(self) -> None:
        channel = self._channel
        if channel is None:
            raise CommandFailed("not_member", "already in the lobby; /quit leaves roomcast")
        reply = await self._command(Command.LEAVE_CHANNEL, channel)
        await self._cancel(self._in_channel)
        self._channel = None
        if reply.status != SUCCESS:
            self._screen.show(view.notice(f"[{channel_name(channel)}] was left already"))
        self._screen.show(view.notice(f"left [{channel_name(channel)}]"))

    async def users(self) -> None:
        reply = await self._command(Command.LIST_USERS, self._channel)
        self._screen.show(view.members(self.room, [user_name(u) for u in reply.users]))

    async def history(self, count: int) -> None:
        raise CommandFailed("unsupported", "the gRPC protocol keeps no history")

    async def edit(self, seq: int, text: str) -> None:
        raise CommandFailed("unsupported", "the gRPC protocol cannot edit messages")

    async def delete(self, seq: int) -> None:
        raise CommandFailed("unsupported", "the gRPC protocol cannot delete messages")

    async def rename(self, name: str) -> None:
        raise CommandFailed("unsupported", "the gRPC protocol has no nicknames")

    # -- session ---------------------------------------------------------------------

    async def _login(self) -> None:
        stub = _stub("Agent", self._dial(self._agent))
        try:
            reply = await self._call(stub.TryLogin(pb2.LoginRequest(ip=""), timeout=TIMEOUT))
        except CommandFailed as exc:
            if exc.code == UNAUTHENTICATED and self._token is None:
                raise CommandFailed(exc.code, f"{exc.message}; {NO_TOKEN}") from None
            raise
        self._index = int(reply.index)
        heartbeat = reply.heartbeat_ip or self._agent
        self._lobby_address = reply.lobby_ip or self._agent
        beats = _stub("Heartbeat", self._dial(heartbeat))
        lobby = self._lobby()
        me = pb2.UserRequest(index=self._index)
        self._session = [
            self._follow(beats.TryHeartbeat(pb2.HeartbeatRequest(index=self._index)), _ignore),
            self._follow(lobby.TryChatReceive(pb2.Chat(index=self._index)), self._lobby_chat),
            self._follow(lobby.TryStatusRequest(me), self._lobby_status),
        ]

    def _follow(
        self, call: Any, handle: Callable[[Any], None], *, vital: bool = True
    ) -> asyncio.Task[None]:
        """Read a server stream in the background, handing each item to ``handle``.

        When a ``vital`` stream ends or breaks the session is lost and logged in again.
        """

        async def read() -> None:
            problem = "the server ended the session"
            try:
                async for item in call:
                    handle(item)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return
                problem = _failed(exc).message
                if not vital and not self._closing:
                    self._screen.show(view.error(_failed(exc).code, problem))
            if vital:
                self._lost(problem)

        return asyncio.create_task(read())

    def _lost(self, problem: str) -> None:
        if self._closing or self._relogin is not None:
            return
        self._screen.show(view.notice(f"connection lost ({problem}); logging in again..."))
        self._restoring = self._channel
        self._back.clear()
        self._relogin = asyncio.create_task(self._login_again())

    async def _login_again(self) -> None:
        channel = self._restoring
        await self._cancel(self._in_channel)
        await self._cancel(self._session)
        self._channel = None
        delay = RELOGIN_DELAY
        while not self._closing:
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                await self._login()
            except CommandFailed as exc:
                if exc.code == UNAUTHENTICATED:
                    self._gone_because = exc
                    self._gone.set()
                    return
                delay = min(delay * 2, RELOGIN_DELAY_MAX)
                continue
            self._relogin = None
            self._screen.show(view.notice(f"logged in again as {self.nick}"))
            if channel is not None:
                try:
                    await self.join(str(channel))
                except CommandFailed as exc:
                    self._screen.show(view.error(exc.code, exc.message))
            if self._relogin is None:  # not lost again meanwhile
                self._back.set()
            return

    # -- channels --------------------------------------------------------------------

    async def _enter(self, number: int, address: str) -> None:
        """Open the streams of the channel the server has just put us in."""
        await self._cancel(self._in_channel)
        self._channel = number
        self._channel_address = address or self._lobby_address
        self._joined.clear()
        stub = _stub("Channel", self._dial(self._channel_address))
        me = pb2.UserRequest(index=self._index)
        # The chat stream opens first: opening the status stream announces us, and our
        # own JOIN_USER coming back on it means the channel is ours.
        chats = stub.TryChatReceive(pb2.Chat(index=self._index))
        self._in_channel = [self._follow(chats, self._channel_chat(number), vital=False)]
        statuses = stub.TryStatusRequest(me)
        self._in_channel.append(self._follow(statuses, self._channel_status(number), vital=False))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._joined.wait(), TIMEOUT)
        members = await self._command(Command.LIST_USERS, number)
        names = [user_name(u) for u in members.users]
        self._screen.show(view.joined(channel_name(number), names))

    async def _rows(self) -> list[view.RoomLine]:
        listed = await self._command(Command.LIST_CHANNELS)
        numbers = sorted(set(listed.channels))
        replies = await asyncio.gather(*(self._command(Command.LIST_USERS, n) for n in numbers))
        return [
            view.RoomLine(f"#{n}", channel_name(n), len(set(r.users)), n == self._channel)
            for n, r in zip(numbers, replies, strict=True)
        ]

    # -- stream items ----------------------------------------------------------------

    def _lobby_chat(self, chat: Any) -> None:
        self._screen.show(view.message(LOBBY, user_name(chat.index), chat.text))

    def _lobby_status(self, status: Any) -> None:
        if status.status == pb2.StatusReply.QUIT:
            self._lost("the server logged us out")
        elif status.index != self._index:
            self._show_status(LOBBY, status)

    def _channel_chat(self, number: int) -> Callable[[Any], None]:
        def show(chat: Any) -> None:
            self._screen.show(view.message(channel_name(number), user_name(chat.index), chat.text))

        return show

    def _channel_status(self, number: int) -> Callable[[Any], None]:
        def show(status: Any) -> None:
            if status.index == self._index:
                if status.status == pb2.StatusReply.JOIN_USER:
                    self._joined.set()
                return
            self._show_status(channel_name(number), status)

        return show

    def _show_status(self, room: str, status: Any) -> None:
        event = {pb2.StatusReply.JOIN_USER: "join", pb2.StatusReply.LEAVE_USER: "leave"}
        if status.status in event:
            self._screen.show(view.presence(room, user_name(status.index), event[status.status]))

    # -- plumbing --------------------------------------------------------------------

    def _dial(self, address: str) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, interceptors=self._interceptors
            )
        return channel

    def _lobby(self) -> Any:
        return _stub("Lobby", self._dial(self._lobby_address))

    async def _command(self, status: Any, channel: int | None = None) -> Any:
        request = pb2.CommandRequest(status=status, index=self._index)
        if channel is not None:
            request.channel = channel
        return await self._call(self._lobby().TryCommand(request, timeout=TIMEOUT))

    @staticmethod
    async def _call(call: Any) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise _failed(exc) from None

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        tasks.clear()


def _stub(service: str, channel: Any) -> Any:
    """A client stub of ``service`` on ``channel`` (the generated module has no types)."""
    return getattr(pb2_grpc, f"{service}Stub")(channel)


def _ignore(item: Any) -> None:
    """Heartbeats carry nothing to show: the stream being open is the point."""
