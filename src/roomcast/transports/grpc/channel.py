"""The Channel service: chat and status events of the channel a user made or joined.

Requests carry only the user's index; the channel is the one the user is in when the call
starts, and a stream stays tied to it: when the user leaves that channel (or is removed)
its streams of it end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from ...core.auth import Identity
from ...core.models import RoomId
from ...exceptions import ChatError, ErrorCode
from ...grpc import client_to_agent_pb2 as pb2
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .errors import Context, chosen_id
from .users import GrpcUser

if TYPE_CHECKING:
    from .door import GrpcDoor


class ChannelService(pb2_grpc.ChannelServicer):
    def __init__(self, door: GrpcDoor) -> None:
        self._door = door

    async def _member(self, identity: Identity | None, index: int) -> tuple[GrpcUser, RoomId]:
        """The user a call acts as (with a token, the token's own user) and its channel."""
        user = await self._door.callers.user(identity, index)
        if user.channel is None:
            raise ChatError(ErrorCode.NOT_MEMBER, f"user {index} is not in a channel")
        return user, user.channel

    async def _in_channel(self, context: Context, index: int) -> tuple[GrpcUser, RoomId]:
        """As :meth:`_member`, for a call that reads or writes the channel: with a token,
        one that still lets its user in (the token of a call may name fewer rooms than
        the one the user joined with)."""
        callers = self._door.callers
        identity = await callers.identity(context)
        user, channel = await self._member(identity, index)
        await callers.check_entry(identity, channel)
        return user, channel

    async def TryChatSend(self, request: pb2.Chat, context: Context) -> pb2.Empty:
        """Chat to the other members of the user's channel; an empty text is dropped."""
        await self._door.answer(context, self._chat(request, context))
        return pb2.Empty()

    async def _chat(self, request: pb2.Chat, context: Context) -> None:
        user, channel = await self._in_channel(context, request.index)
        if request.text.strip():
            await self._door.send(user, channel, request.text, chosen_id(request))

    async def TryChatReceive(self, request: pb2.Chat, context: Context) -> AsyncIterator[pb2.Chat]:
        """The channel's chat from the other members (Socket.IO users of the room too)."""
        user, channel = await self._door.answer(context, self._in_channel(context, request.index))
        transport = self._door.transport
        stream = await self._door.answer(
            context, transport.open_chat(channel, user.index, lobby=False)
        )
        try:
            while (chat := await stream.next()) is not None:
                yield chat
            if stream.error:
                await self._door.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, stream.error)
        finally:
            transport.release(channel, user.index, stream)

    async def TryStatusRequest(
        self, request: pb2.UserRequest, context: Context
    ) -> AsyncIterator[pb2.StatusReply]:
        """Opening it announces the user: JOIN_USER {index, channel} goes to every member,
        the user included. Then the channel's joins and leaves."""
        user, channel = await self._door.answer(context, self._in_channel(context, request.index))
        transport = self._door.transport
        stream = await self._door.answer(
            context, transport.open_status(channel, user.index, lobby=False)
        )
        try:
            await self._door.users.announce(channel, "join", user.user)
            while (status := await stream.next()) is not None:
                yield status
            if stream.error:
                await self._door.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, stream.error)
        finally:
            transport.release(channel, user.index, stream)

    async def TryUserRemove(self, request: pb2.UserRequest, context: Context) -> pb2.Empty:
        """Take the user out of its channel (it stays in the lobby), with LEAVE_USER."""
        await self._door.answer(context, self._remove(request.index, context))
        return pb2.Empty()

    async def _remove(self, index: int, context: Context) -> None:
        user, _ = await self._member(await self._door.callers.identity(context), index)
        await self._door.users.leave(user)
