"""The Lobby service: lobby chat, status events, commands, logout.

The lobby is the room named ``lobby``: every logged-in gRPC user is a member from login to
logout (also while inside a channel), and Socket.IO clients that join ``lobby`` chat with
them. Channels are rooms too; a channel's number is its room id.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ...core.auth import Identity
from ...core.models import Room, RoomId
from ...exceptions import ChatError, ErrorCode
from ...grpc import client_to_agent_pb2 as pb2
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .errors import Context, chosen_id
from .users import INDEX_MAX, GrpcUser

if TYPE_CHECKING:
    from .door import GrpcDoor

Command = pb2.CommandRequest
SUCCESS = pb2.CommandReply.SUCCESS
FAILURE = pb2.CommandReply.FAILURE


class LobbyService(pb2_grpc.LobbyServicer):
    def __init__(self, door: GrpcDoor) -> None:
        self._door = door
        self._commands = {
            Command.LIST_CHANNELS: self._list_channels,
            Command.MAKE_CHANNEL: self._make_channel,
            Command.JOIN_CHANNEL: self._join_channel,
            Command.LEAVE_CHANNEL: self._leave_channel,
            Command.LIST_USERS: self._list_users,
        }

    # -- chat ----------------------------------------------------------------------------

    async def _in_lobby(self, context: Context, index: int) -> tuple[GrpcUser, Room]:
        """The user a call acts as, and the lobby; with a token, the token's own user, and
        a token that lets it into the lobby."""
        callers = self._door.callers
        identity = await callers.identity(context)
        user = await callers.user(identity, index)
        lobby = await self._door.users.lobby()
        await callers.check_entry(identity, lobby)
        return user, lobby

    async def TryChatSend(self, request: pb2.Chat, context: Context) -> pb2.Empty:
        """Chat to every other logged-in user; an empty text is dropped."""
        await self._door.answer(context, self._chat(request, context))
        return pb2.Empty()

    async def _chat(self, request: pb2.Chat, context: Context) -> None:
        user, lobby = await self._in_lobby(context, request.index)
        if request.text.strip():
            await self._door.send(user, lobby.id, request.text, chosen_id(request))

    async def TryChatReceive(self, request: pb2.Chat, context: Context) -> AsyncIterator[pb2.Chat]:
        """The lobby chat of the other users, until the client cancels or logs out."""
        user, lobby = await self._door.answer(context, self._in_lobby(context, request.index))
        transport = self._door.transport
        stream = await self._door.answer(
            context, transport.open_chat(lobby.id, user.index, lobby=True)
        )
        try:
            while (chat := await stream.next()) is not None:
                yield chat
            if stream.error:
                await self._door.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, stream.error)
        finally:
            transport.release(lobby.id, user.index, stream)

    async def TryStatusRequest(
        self, request: pb2.UserRequest, context: Context
    ) -> AsyncIterator[pb2.StatusReply]:
        """JOIN_USER / LEAVE_USER of the lobby's users (``channel`` unset), and QUIT once
        the user itself has been removed."""
        user, lobby = await self._door.answer(context, self._in_lobby(context, request.index))
        transport = self._door.transport
        stream = await self._door.answer(
            context, transport.open_status(lobby.id, user.index, lobby=True)
        )
        try:
            while (status := await stream.next()) is not None:
                yield status
            if stream.error:
                await self._door.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, stream.error)
        finally:
            transport.release(lobby.id, user.index, stream)

    # -- leaving -------------------------------------------------------------------------

    async def TryUserRemove(self, request: pb2.UserRequest, context: Context) -> pb2.Empty:
        """Remove the user from the lobby and its channel, with LEAVE_USER to the others."""
        await self._door.answer(context, self._remove(request.index, context))
        return pb2.Empty()

    async def TryUserExit(self, request: pb2.UserRequest, context: Context) -> pb2.StatusReply:
        """Log the user out (as TryUserRemove); the reply is QUIT."""
        user = await self._door.answer(context, self._remove(request.index, context))
        return pb2.StatusReply(status=pb2.StatusReply.QUIT, index=user.index)

    async def _remove(self, index: int, context: Context) -> GrpcUser:
        callers = self._door.callers
        user = await callers.user(await callers.identity(context), index)
        await self._door.remove(user)
        return user

    # -- commands ------------------------------------------------------------------------

    async def TryCommand(self, request: pb2.CommandRequest, context: Context) -> pb2.CommandReply:
        """LIST_CHANNELS, MAKE_CHANNEL, JOIN_CHANNEL, LEAVE_CHANNEL, LIST_USERS."""
        return await self._door.answer(context, self._command(request, context))

    async def _command(self, request: pb2.CommandRequest, context: Context) -> pb2.CommandReply:
        callers = self._door.callers
        identity = await callers.identity(context)
        command = self._commands.get(request.status)
        if command is None:
            raise ChatError(ErrorCode.BAD_REQUEST, f"unknown command {request.status}")
        user = await callers.user(identity, request.index)
        self._door.spend_request(user.index)
        channel = _channel_field(request)
        return await command(_Caller(user, identity), channel)

    async def _list_channels(self, caller: _Caller, channel: RoomId | None) -> pb2.CommandReply:
        """Every room with members, but the lobby (with a token that names its rooms, of
        those only)."""
        lobby = await self._door.users.lobby()
        rooms = await self._door.service.rooms(occupied=True, identity=caller.identity)
        numbers = sorted(info.room.id for info in rooms if info.room.id != lobby.id)
        return pb2.CommandReply(status=SUCCESS, channels=numbers)

    async def _make_channel(self, caller: _Caller, channel: RoomId | None) -> pb2.CommandReply:
        """A new channel with the user in it; ``channels[0]`` is its number."""
        name = f"channel-{secrets.token_hex(4)}"
        await self._door.callers.check_entry(caller.identity, name)
        self._door.spend(caller.user)
        room = await self._door.service.resolve(name, create=True)
        await self._door.users.enter(caller.user, room)
        return self._joined(room.id)

    async def _join_channel(self, caller: _Caller, channel: RoomId | None) -> pb2.CommandReply:
        """Enter channel ``channel`` (any room but the lobby), leaving the current one."""
        if channel is None:
            raise ChatError(ErrorCode.BAD_REQUEST, "JOIN_CHANNEL needs 'channel'")
        room = await self._door.service.history.room_by_id(channel)
        if room is None or room.id == (await self._door.users.lobby()).id:
            return pb2.CommandReply(status=FAILURE)
        await self._door.callers.check_entry(caller.identity, room)
        await self._door.users.enter(caller.user, room)
        return self._joined(room.id)

    def _joined(self, channel: RoomId) -> pb2.CommandReply:
        return pb2.CommandReply(status=SUCCESS, address=self._door.address, channels=[channel])

    async def _leave_channel(self, caller: _Caller, channel: RoomId | None) -> pb2.CommandReply:
        """Back to the lobby only. FAILURE when the user is not in (that) channel."""
        left = caller.user.channel
        if left is None or channel not in (None, left):
            return pb2.CommandReply(status=FAILURE)
        await self._door.users.leave(caller.user)
        return pb2.CommandReply(status=SUCCESS, channels=[left])

    async def _list_users(self, caller: _Caller, channel: RoomId | None) -> pb2.CommandReply:
        """The users of ``channel``, or (unset, 0, or no such room) every user of the lobby;
        ``channels[i]`` is where ``users[i]`` is, 0 for the lobby. A token must let its
        user into the room listed."""
        lobby = await self._door.users.lobby()
        room = None
        if channel is not None and channel != lobby.id:
            room = await self._door.service.history.room_by_id(channel)
        await self._door.callers.check_entry(caller.identity, room or lobby)
        pairs = await self._door.users.listing(None if room is None else room.id)
        return pb2.CommandReply(
            status=SUCCESS, users=[u for u, _ in pairs], channels=[c for _, c in pairs]
        )


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who a command is for: the user, and its token's identity (None: an open server)."""

    user: GrpcUser
    identity: Identity | None


def _channel_field(request: pb2.CommandRequest) -> RoomId | None:
    """The request's channel; unset and 0 mean none."""
    if not request.HasField("channel") or request.channel == 0:
        return None
    if not 0 < request.channel <= INDEX_MAX:
        raise ChatError(ErrorCode.BAD_REQUEST, "'channel' must be a channel number")
    return RoomId(request.channel)
