"""Frames: what travels between nodes, encoded once by the node that produces it.

A frame is a short ASCII header and the JSON body of the client event, so a receiving node
can route it (room, seq) without decoding the body, and each transport wraps the same body
bytes once per message, not once per recipient::

    M 12 345\\n{"room":12,"seq":345,...}
    ^ ^  ^
    | |  seq (0 for frames that are not history messages)
    | room id (0 for frames that are not room frames)
    kind: M message, P presence, T typing, D direct message
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from .models import Message, RoomId, User


class Kind(Enum):
    """The kinds of frames, with the client event name each becomes."""

    MESSAGE = ("M", "message")
    PRESENCE = ("P", "presence")
    TYPING = ("T", "typing")
    DM = ("D", "dm")

    def __init__(self, code: str, event: str) -> None:
        self.code = code
        self.event = event


_BY_CODE = {kind.code.encode(): kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded header with the body left as bytes."""

    kind: Kind
    room: RoomId
    seq: int
    body: bytes

    def encode(self) -> bytes:
        return b"%s %d %d\n%s" % (self.kind.code.encode(), self.room, self.seq, self.body)

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        """Parse the header only. Raises ValueError on a malformed frame."""
        head, sep, body = data.partition(b"\n")
        if not sep:
            raise ValueError("frame without header")
        code, room, seq = head.split(b" ")
        return cls(_BY_CODE[code], RoomId(int(room)), int(seq), body)

    def data(self) -> Any:
        """The decoded body (for transports that need objects, not bytes)."""
        return orjson.loads(self.body)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def message_frame(message: Message) -> Frame:
    return Frame(Kind.MESSAGE, message.room, message.seq, dumps(message.to_wire()))


def presence_frame(room: RoomId, event: str, user: User) -> Frame:
    body = dumps({"room": room, "event": event, "user": user.to_wire()})
    return Frame(Kind.PRESENCE, room, 0, body)


def typing_frame(room: RoomId, user: User) -> Frame:
    return Frame(Kind.TYPING, room, 0, dumps({"room": room, "user": user.to_wire()}))
