"""Frames: what travels between nodes, encoded once by the node that produces it.

A frame is a short ASCII header and the JSON body of the client event, so a receiving node
can route it (room, seq) without decoding the body, and each transport wraps the same body
bytes once per message, not once per recipient::

    M 12 345\\n{"room":12,"seq":345,...}
    ^ ^  ^
    | |  seq (0 for frames that are not history messages)
    | room id (0 for frames that are not room frames)
    kind: M message, P presence, T typing, E edited, X deleted, D direct message
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
    EDITED = ("E", "edited")
    DELETED = ("X", "deleted")
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


def edited_frame(message: Message) -> Frame:
    """The news that a message was edited, for its room's members: the message as it is
    now. Not a history message's frame (its seq is taken): the header's seq is 0."""
    return Frame(Kind.EDITED, message.room, 0, dumps(message.to_wire()))


def deleted_frame(message: Message, by: User | None) -> Frame:
    """The news that a message was deleted, for its room's members; ``by``: who deleted
    it (None: a request of an open server's REST API, which names no one)."""
    body: dict[str, Any] = {"room": message.room, "seq": message.seq, "id": message.id}
    body["by"] = None if by is None else by.to_wire()
    return Frame(Kind.DELETED, message.room, 0, dumps(body))


def dm_frame(body: dict[str, Any]) -> Frame:
    return Frame(Kind.DM, RoomId(0), 0, dumps(body))


# -- node-to-node envelopes (a node's inbox) ---------------------------------------------
#
#   Q <request id> <reply node> <user id>\n<frame>   deliver the frame to a user's connections
#   A <request id> <delivered count>\n                the answer, to the requesting node's inbox
#   R <run>\n                                       a node's beacon to its own inbox (see RunBeacon)


@dataclass(frozen=True, slots=True)
class DeliverRequest:
    request: int
    reply_to: str
    user: int
    frame: bytes

    def encode(self) -> bytes:
        return b"Q %d %s %d\n%s" % (self.request, self.reply_to.encode(), self.user, self.frame)


@dataclass(frozen=True, slots=True)
class DeliverAnswer:
    request: int
    delivered: int

    def encode(self) -> bytes:
        return b"A %d %d\n" % (self.request, self.delivered)


@dataclass(frozen=True, slots=True)
class RunBeacon:
    """What a node sends its own inbox now and then: the token of its process (its run).
    Only processes with that node id receive it, so a beacon of another run means two
    processes were given one node id."""

    run: str

    def encode(self) -> bytes:
        return b"R %s\n" % self.run.encode()


def decode_envelope(data: bytes) -> DeliverRequest | DeliverAnswer | RunBeacon:
    """Parse an inbox envelope. Raises ValueError on anything malformed."""
    head, sep, rest = data.partition(b"\n")
    if not sep:
        raise ValueError("envelope without header")
    parts = head.split(b" ")
    if parts[0] == b"R" and len(parts) == 2:
        return RunBeacon(parts[1].decode())
    if parts[0] == b"Q" and len(parts) == 4:
        return DeliverRequest(int(parts[1]), parts[2].decode(), int(parts[3]), rest)
    if parts[0] == b"A" and len(parts) == 3:
        return DeliverAnswer(int(parts[1]), int(parts[2]))
    raise ValueError("unknown envelope")
