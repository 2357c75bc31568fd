"""Local delivery to gRPC streams: the hub's Transport for the gRPC door.

A user's open streams for one room on this node (its chat stream, its status stream, or
several of each) hang off one :class:`Attachment`, which the hub sees as one connection of
the room. Rooms reach a node only while it has local members, so a node holding a user's
channel streams subscribes to that channel and no other node needs to.

:meth:`GrpcTransport.deliver` translates a frame once — ``MESSAGE`` into ``Chat``,
``PRESENCE`` join/leave into ``StatusReply`` — and hands the same message object to every
stream of the room. A stream is a bounded buffer: a client that does not read is cut off
with RESOURCE_EXHAUSTED instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ...core.events import Frame, Kind
from ...core.hub import Connection
from ...core.models import ConnId, RoomId, UserId
from ...core.service import ChatService
from ...exceptions import ChatError, ErrorCode, UnavailableError
from ...grpc import client_to_agent_pb2 as pb2

log = logging.getLogger(__name__)

STREAM_LIMIT = 1000
"""Messages a stream may hold for a client that does not read before it is cut off."""

T = TypeVar("T")


class Stream(Generic[T]):
    """The items waiting for one server-streaming call, bounded."""

    def __init__(self, limit: int = STREAM_LIMIT) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._wake = asyncio.Event()
        self._closed = False
        self.error: str | None = None
        """Set when the stream was cut off because its client fell behind."""

    def put(self, item: T) -> None:
        if self._closed:
            return
        if len(self._items) >= self._limit:
            self._items.clear()
            self.error = f"the client fell more than {self._limit} messages behind"
            self.close()
            return
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        """End the stream once the items already waiting have been read."""
        self._closed = True
        self._wake.set()

    async def next(self) -> T | None:
        """The next item; None once the stream is closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()


@dataclass(eq=False)
class Attachment:
    """One user's streams for one room on this node: a connection of the hub."""

    id: ConnId
    transport: GrpcTransport
    user: UserId
    room: RoomId
    lobby: bool
    ready: asyncio.Future[None]
    chats: set[Stream[pb2.Chat]] = field(default_factory=set)
    statuses: set[Stream[pb2.StatusReply]] = field(default_factory=set)

    def empty(self) -> bool:
        return not self.chats and not self.statuses

    def close(self) -> None:
        for chat in self.chats:
            chat.close()
        for status in self.statuses:
            status.close()


AnyStream = Stream[pb2.Chat] | Stream[pb2.StatusReply]

Verify = Callable[[UserId, RoomId], Awaitable[bool]]
"""Asked after a user's own leave event: is the user still a member of the room?"""


class GrpcTransport:
    """Attaches gRPC streams to the hub's rooms and writes frames into them."""

    def __init__(self, service: ChatService, verify: Verify) -> None:
        self._service = service
        self._verify = verify
        self._attachments: dict[tuple[RoomId, UserId], Attachment] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- streams -------------------------------------------------------------------------

    async def open_chat(self, room: RoomId, user: UserId, *, lobby: bool) -> Stream[pb2.Chat]:
        """A stream of the room's chat for ``user`` (its own messages excluded)."""
        stream: Stream[pb2.Chat] = Stream()
        await self._attach(room, user, lobby, lambda a: a.chats.add(stream))
        return stream

    async def open_status(
        self, room: RoomId, user: UserId, *, lobby: bool
    ) -> Stream[pb2.StatusReply]:
        """A stream of the room's join / leave events for ``user``."""
        stream: Stream[pb2.StatusReply] = Stream()
        await self._attach(room, user, lobby, lambda a: a.statuses.add(stream))
        return stream

    def release(self, room: RoomId, user: UserId, stream: AnyStream) -> None:
        """Forget a finished stream; the last one of an attachment leaves the hub room."""
        stream.close()
        attachment = self._attachments.get((room, user))
        if attachment is None:
            return
        attachment.chats.discard(stream)
        attachment.statuses.discard(stream)
        if attachment.ready.done():
            self._drop_if_empty(attachment)

    def close_user(self, user: UserId, room: RoomId | None = None) -> None:
        """End the streams of a user on this node (of one room, or of all)."""
        for (at_room, at_user), attachment in list(self._attachments.items()):
            if at_user == user and room in (None, at_room):
                attachment.close()

    def quit_user(self, user: UserId) -> None:
        """Tell a user's streams on this node that it is logged out (QUIT, on its lobby
        status streams) and end them, without waiting for its leave events."""
        told = pb2.StatusReply(status=pb2.StatusReply.QUIT, index=user)
        for (_, at_user), attachment in list(self._attachments.items()):
            if at_user == user:
                if attachment.lobby:
                    self._tell(attachment, told)
                attachment.close()

    def close_all(self) -> None:
        for attachment in list(self._attachments.values()):
            attachment.close()

    async def _attach(
        self, room: RoomId, user: UserId, lobby: bool, add: Callable[[Attachment], None]
    ) -> None:
        key = (room, user)
        while (attachment := self._attachments.get(key)) is not None:
            await asyncio.shield(attachment.ready)
            # It may have been dropped meanwhile (its streams all ended): then start over.
            if self._attachments.get(key) is attachment:
                add(attachment)
                return
        loop = asyncio.get_running_loop()
        attachment = Attachment(
            ConnId(f"grpc:{user}"), self, user, room, lobby, loop.create_future()
        )
        add(attachment)
        self._attachments[key] = attachment
        try:
            held = await self._service.watch(room, attachment)
        except BaseException as exc:
            del self._attachments[key]
            refusal = _refusal(exc)
            attachment.ready.set_exception(refusal)
            attachment.ready.exception()  # retrieved here; concurrent openers re-raise it
            raise
        attachment.ready.set_result(None)
        for frame in held:
            await self.deliver_one(frame, attachment)
        # Every stream may have been released while the room was being joined.
        self._drop_if_empty(attachment)

    def _drop_if_empty(self, attachment: Attachment) -> None:
        key = (attachment.room, attachment.user)
        if attachment.empty() and self._attachments.get(key) is attachment:
            del self._attachments[key]
            self._service.unwatch(attachment.room, attachment)

    # -- delivery (the hub calls these) --------------------------------------------------

    async def deliver(self, frame: Frame, conns: Collection[Connection]) -> None:
        if frame.kind is Kind.MESSAGE:
            self._deliver_chat(frame, conns)
        elif frame.kind is Kind.PRESENCE:
            self._deliver_status(frame, conns)

    async def deliver_many(self, frames: Sequence[Frame], conns: Collection[Connection]) -> None:
        # Streams are buffers of messages, not sockets: nothing to gain from joining them.
        for frame in frames:
            await self.deliver(frame, conns)

    async def deliver_one(self, frame: Frame, conn: Connection) -> None:
        await self.deliver(frame, (conn,))

    def _deliver_chat(self, frame: Frame, conns: Collection[Connection]) -> None:
        body = frame.data()
        if body.get("deleted"):
            return  # deleted before this node had it: the protocol has no deletions to tell
        sender = body["user"]["id"]
        chat = pb2.Chat(index=sender, text=body["text"])
        for conn in conns:
            assert isinstance(conn, Attachment)
            if conn.user == sender:
                continue  # the lobby and channels do not echo a user's own chat
            for stream in conn.chats:
                stream.put(chat)

    def _deliver_status(self, frame: Frame, conns: Collection[Connection]) -> None:
        body = frame.data()
        event = body["event"]
        if event not in ("join", "leave") or not conns:
            return
        subject = body["user"]["id"]
        status = pb2.StatusReply.JOIN_USER if event == "join" else pb2.StatusReply.LEAVE_USER
        # The hub hands over one room's connections at a time: one reply serves them all.
        first = next(iter(conns))
        assert isinstance(first, Attachment)
        reply = pb2.StatusReply(status=status, index=subject)
        if not first.lobby:
            reply.channel = first.room  # the lobby is "no channel": the field stays unset
        for conn in conns:
            assert isinstance(conn, Attachment)
            if event == "leave" and conn.user == subject:
                self._own_leave(conn, reply)
                continue
            for stream in conn.statuses:
                stream.put(reply)

    def _own_leave(self, attachment: Attachment, reply: pb2.StatusReply) -> None:
        """A leave of the streams' own user: told to it once it is known to be out. It may
        not be: on a server that checks tokens a user's Socket.IO connections have its id
        too, and one of them leaving the room leaves the gRPC user where it is."""
        if attachment.lobby:
            # Out of the lobby means removed: the user is told QUIT.
            reply = pb2.StatusReply(status=pb2.StatusReply.QUIT, index=attachment.user)
        self._spawn(self._end_if_gone(attachment, reply))

    async def sweep(self) -> None:
        """End the streams of users that are no longer in their room: the backstop for a
        leave event this node missed (a broker outage)."""
        for attachment in list(self._attachments.values()):
            if self._attachments.get((attachment.room, attachment.user)) is attachment:
                await self._end_if_gone(attachment)

    async def _end_if_gone(
        self, attachment: Attachment, told: pb2.StatusReply | None = None
    ) -> None:
        """After a user's own leave: if it really is out (it may have come back already,
        or the leave was of another door's connection of it), tell it ``told`` and end its
        streams of that room."""
        try:
            still_member = await self._verify(attachment.user, attachment.room)
        except Exception:
            log.warning("checking user %s in room %s failed", attachment.user, attachment.room)
            self._tell(attachment, told)  # most likely true; the sweep ends the streams later
            return
        if not still_member:
            self._tell(attachment, told)
            if attachment.lobby:
                self.close_user(attachment.user)
            else:
                attachment.close()

    @staticmethod
    def _tell(attachment: Attachment, reply: pb2.StatusReply | None) -> None:
        if reply is not None:
            for stream in attachment.statuses:
                stream.put(reply)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _refusal(exc: BaseException) -> Exception:
    """What the openers of an attachment that could not join its room are told."""
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, UnavailableError):
        return ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
    return ChatError(ErrorCode.UNAVAILABLE, "the stream could not be opened, try again")
