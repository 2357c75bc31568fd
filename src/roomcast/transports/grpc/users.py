"""gRPC users as the whole cluster sees them: kept in Presence, readable from any node.

A gRPC client dials three addresses and every call may land on another worker or host, so
nothing about a user lives in one process. Everything is a presence entry::

    room              conn            owner          what it says
    lobby             grpc:7          grpc:7         user 7 is in the lobby
    N (a channel)     grpc:7          grpc:7         user 7 is in channel N
    -7 (its record)   grpc:7@N        grpc:7         user 7 is logged in, in channel N (@0: none)

Every entry of a user is owned by the user itself (``grpc:7``) rather than by a node: the
owner is kept alive with ``Presence.heartbeat`` by whichever node holds the user's
heartbeat stream, and when the beats lapse the reaper every node runs removes the user's
entries and announces the leaves, exactly as for a dead node. Record rooms are negative,
so they never meet a room of the History store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import TypeVar

from ...core.models import ConnId, Member, NodeId, Room, RoomId, User, UserId
from ...core.service import ChatService
from ...exceptions import ChatError, ErrorCode, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

LOBBY = "lobby"
"""The name of the room every gRPC user is in from login to logout."""

INDEX_MAX = 2**31 - 1
"""User indexes are ``int32`` on the wire."""


@dataclass(frozen=True, slots=True)
class GrpcUser:
    """A logged-in gRPC user and the channel it is in (None: only the lobby)."""

    user: User
    channel: RoomId | None = None

    @property
    def index(self) -> UserId:
        return self.user.id

    @property
    def conn(self) -> ConnId:
        """The user's connection id in every room: one per user, cluster-wide."""
        return ConnId(f"grpc:{self.user.id}")

    @property
    def owner(self) -> NodeId:
        """The presence owner of the user's entries, kept alive by its heartbeat."""
        return NodeId(f"grpc:{self.user.id}")

    @property
    def member(self) -> Member:
        return Member(self.user, self.conn, self.owner)


def _record_room(index: int) -> RoomId:
    return RoomId(-index)


def _record(user: GrpcUser) -> Member:
    return Member(user.user, ConnId(f"{user.conn}@{user.channel or 0}"), user.owner)


def _channel_of(entry: Member) -> RoomId | None:
    _, _, channel = entry.conn.rpartition("@")
    try:
        number = int(channel)
    except ValueError:
        return None
    return RoomId(number) if number > 0 else None


def check_index(index: int) -> UserId:
    """A user index from a request: a positive int32 (0 is an unset field)."""
    if not 0 < index <= INDEX_MAX:
        raise ChatError(ErrorCode.BAD_REQUEST, "'index' must be the user index from TryLogin")
    return UserId(index)


class Users:
    """Login, lookup, channel moves, removal and listing of gRPC users, on Presence."""

    def __init__(self, service: ChatService, *, ttl: float) -> None:
        self.service = service
        self.ttl = ttl
        """Seconds a user stays alive after its last beat."""
        self._lobby: Room | None = None
        self._lobby_lock = asyncio.Lock()

    async def lobby(self) -> Room:
        """The lobby room (created on first use, then cached: room ids never change)."""
        async with self._lobby_lock:
            if self._lobby is None:
                self._lobby = await self.service.resolve(LOBBY, create=True)
            return self._lobby

    # -- lifecycle -----------------------------------------------------------------------

    async def login(self) -> GrpcUser:
        """A new user with a cluster-wide index, alive for ``ttl``, in the lobby."""
        index = await _guard(self.service.history.next_user_id())
        return await self._arrive(GrpcUser(User(index, f"grpc-{index}")))

    async def login_as(self, user: User) -> GrpcUser:
        """A token's user (its index its subject's user id), alive for ``ttl``, in the
        lobby. One logged in already stays as it is — its record, name and channel — and is
        kept alive: one subject is one user, however often it logs in."""
        found = await _guard(self.find(user.id)) if user.id <= INDEX_MAX else None
        if found is not None:
            if not await _guard(self.service.presence.heartbeat(found.owner, self.ttl)):
                return found
            # Its liveness had lapsed: a reaper may be taking its entries away. Finish
            # that (with the leaves) and log it in afresh.
            await self.remove(found)
        return await self._arrive(GrpcUser(user))

    async def _arrive(self, user: GrpcUser) -> GrpcUser:
        if user.index > INDEX_MAX:
            raise ChatError(ErrorCode.UNAVAILABLE, "user indexes are exhausted")
        lobby = await self.lobby()
        presence = self.service.presence
        await _guard(presence.heartbeat(user.owner, self.ttl))
        await _guard(presence.add(_record_room(user.index), _record(user)))
        await _guard(presence.add(lobby.id, user.member))
        await self.announce(lobby.id, "join", user.user)
        return user

    async def refresh(self, user: GrpcUser) -> None:
        """Keep the user alive for another ``ttl`` seconds."""
        await self.service.presence.heartbeat(user.owner, self.ttl)

    async def remove(self, user: GrpcUser) -> bool:
        """Take the user out of the lobby and its channel, with leave events; False when
        it was gone already."""
        removed = await _guard(self.service.presence.drop_node(user.owner))
        rooms = [(room, member) for room, member in removed if room > 0]
        await self.service.announce_departed(rooms)
        return bool(removed)

    # -- lookup --------------------------------------------------------------------------

    async def find(self, index: UserId) -> GrpcUser | None:
        """The logged-in user with this index, or None."""
        entries = await self.service.presence.members(_record_room(index))
        if not entries:
            return None
        # Two records exist only for a moment while the user moves; the newer one wins.
        latest = entries[-1]
        return GrpcUser(latest.user, _channel_of(latest))

    async def get(self, index: int) -> GrpcUser:
        """The logged-in user with this index; NOT_FOUND when there is none."""
        user = await _guard(self.find(check_index(index)))
        if user is None:
            raise ChatError(ErrorCode.NOT_FOUND, f"no user {index} is logged in")
        return user

    # -- channels ------------------------------------------------------------------------

    async def enter(self, user: GrpcUser, room: Room) -> GrpcUser:
        """Make ``room`` the user's channel, leaving the one it was in. The join is
        announced when the user opens its channel status stream."""
        if user.channel == room.id:
            return user
        if user.channel is not None:
            user = await self.leave(user)
        await _guard(self.service.presence.add(room.id, user.member))
        moved = await self._move(user, replace(user, channel=room.id))
        await self._confirm(moved)
        return moved

    async def leave(self, user: GrpcUser) -> GrpcUser:
        """Take the user out of its channel (back to the lobby only), with a leave event."""
        channel = user.channel
        if channel is None:
            return user
        await _guard(self.service.presence.remove(channel, user.conn))
        moved = await self._move(user, replace(user, channel=None))
        await self.announce(channel, "leave", user.user)
        await self._confirm(moved)
        return moved

    async def _move(self, old: GrpcUser, new: GrpcUser) -> GrpcUser:
        # The new record is written before the old one goes, so the user never looks
        # logged out to a concurrent reader.
        presence = self.service.presence
        await _guard(presence.add(_record_room(new.index), _record(new)))
        await _guard(presence.remove(_record_room(old.index), _record(old).conn))
        return new

    async def _confirm(self, user: GrpcUser) -> None:
        """After a channel move wrote entries of ``user``: if the user was removed
        meanwhile (its heartbeat stream closed while the command ran), take them out again
        and answer NOT_FOUND. Nothing else would: entries whose owner is off the registry
        are never reaped, and the new record would keep the user looking logged in."""
        if await _guard(self.service.presence.heartbeat(user.owner, self.ttl)):
            await self.remove(user)
            raise ChatError(ErrorCode.NOT_FOUND, f"no user {user.index} is logged in")

    # -- listing -------------------------------------------------------------------------

    async def listing(self, channel: RoomId | None) -> list[tuple[UserId, RoomId]]:
        """``(user, channel)`` pairs: the members of ``channel``, or with None every user
        in the lobby with the channel it is in (0: none). Socket.IO members of these rooms
        are users too."""
        presence = self.service.presence
        if channel is not None:
            members = await _guard(presence.members(channel))
            return [(user.id, channel) for user in _unique(members)]
        lobby = await self.lobby()
        members = await _guard(presence.members(lobby.id))
        users = _unique(members)
        grpc_users = {m.user.id for m in members if m.conn == GrpcUser(m.user).conn}
        found = await asyncio.gather(*(_guard(self.find(u)) for u in grpc_users))
        channels = {u.index: u.channel for u in found if u is not None}
        return [(user.id, channels.get(user.id) or RoomId(0)) for user in users]

    # -- events --------------------------------------------------------------------------

    async def announce(self, room: RoomId, event: str, user: User) -> None:
        """Publish a presence event to the room, as the service does for its sessions."""
        await self.service.announce(room, event, user)


async def _guard(awaitable: Awaitable[T]) -> T:
    """Await a presence or store call; an unreachable engine is an UNAVAILABLE refusal."""
    try:
        return await awaitable
    except UnavailableError as exc:
        raise ChatError(ErrorCode.UNAVAILABLE, "an engine is unavailable, try again") from exc


def _unique(members: list[Member]) -> list[User]:
    seen: dict[UserId, User] = {}
    for member in members:
        seen.setdefault(member.user.id, member.user)
    return list(seen.values())
