"""What the gRPC door writes into a user's chat stream of a room."""

from __future__ import annotations

import asyncio

from roomcast.core.events import deleted_frame, edited_frame, message_frame, typing_frame
from roomcast.core.models import ConnId, Message, RoomId, User, UserId
from roomcast.transports.grpc.streams import Attachment, GrpcTransport, Stream

ADA = User(UserId(1), "ada")
BOB = User(UserId(2), "bob")


async def _never(user: UserId, room: RoomId) -> bool:
    return False


async def test_a_chat_stream_gets_others_messages_and_nothing_of_edits_and_deletions() -> None:
    transport = GrpcTransport(None, _never)  # type: ignore[arg-type]  # delivery only
    loop = asyncio.get_running_loop()
    attachment = Attachment(
        ConnId("n.1"), transport, BOB.id, RoomId(5), False, loop.create_future()
    )
    chats: Stream = Stream()
    attachment.chats.add(chats)
    kept = Message(RoomId(5), 1, "e", "m1", ADA, "hello", 1)
    gone = Message(RoomId(5), 2, "e", "m2", ADA, "regretted", 2).erased(5)
    own = Message(RoomId(5), 3, "e", "m3", BOB, "mine", 3)
    frames = [
        message_frame(kept),
        message_frame(gone),  # deleted before this node had it
        deleted_frame(gone, ADA),
        edited_frame(kept.revised("hello, edited", 9)),  # not taken back either
        typing_frame(RoomId(5), ADA),
        message_frame(own),
    ]
    await transport.deliver_many(frames, [attachment])
    chats.close()
    got = []
    while (chat := await chats.next()) is not None:
        got.append((chat.index, chat.text))
    assert got == [(ADA.id, "hello")]
