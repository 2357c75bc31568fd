"""The objects of the chat: users, rooms, messages, and positions in a room's history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NewType

UserId = NewType("UserId", int)
RoomId = NewType("RoomId", int)
NodeId = NewType("NodeId", str)
ConnId = NewType("ConnId", str)
"""A connection, unique across the cluster (node id + local id)."""


@dataclass(frozen=True, slots=True)
class User:
    """A person behind one connection: a cluster-wide numeric id and a nickname."""

    id: UserId
    name: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class Room:
    """A room: a stable numeric id, its name, and the epoch of its history.

    ``epoch`` changes whenever the room's history is reset; positions from another epoch
    cannot be recovered.
    """

    id: RoomId
    name: str
    epoch: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class Position:
    """A point in a room's history: the last ``seq`` seen in ``epoch``."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Draft:
    """A message accepted by the service but not yet sequenced."""

    room: RoomId
    id: str
    user: User
    text: str
    ts: int
    """Milliseconds since the Unix epoch, set by the server."""
    chosen: bool = False
    """``id`` was chosen by the sender, so this may be a retry of a message already stored:
    the store stores it once (see :meth:`~roomcast.core.ports.History.append`)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A sequenced message: ``seq`` is 1, 2, 3, ... per room with no gaps.

    A deleted message keeps its place (``seq``, ``id``, sender, ``ts``) and loses its
    text: ``text`` is empty, which no message sent can be (see :attr:`deleted`). An edited
    one keeps its place too, with its sender's new text and when it was last edited.
    ``edited`` is when either last happened: what a client recovering after it asks for.
    """

    room: RoomId
    seq: int
    epoch: str
    id: str
    user: User
    text: str
    ts: int
    edited: int | None = None
    """When it was last edited or deleted (ms since the Unix epoch); None: never. The wire
    shows it as ``edited`` on an edited message, not on a deleted one."""

    @classmethod
    def from_draft(cls, draft: Draft, seq: int, epoch: str) -> Message:
        return cls(draft.room, seq, epoch, draft.id, draft.user, draft.text, draft.ts)

    @property
    def deleted(self) -> bool:
        """Whether the message was deleted (its text is gone)."""
        return not self.text

    def erased(self, when: int) -> Message:
        """The message as it is once deleted at ``when``: the same place, no text."""
        return Message(self.room, self.seq, self.epoch, self.id, self.user, "", self.ts, when)

    def revised(self, text: str, when: int) -> Message:
        """The message as it is once its sender has edited it: the same place, this text."""
        return Message(self.room, self.seq, self.epoch, self.id, self.user, text, self.ts, when)

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "room": self.room,
            "seq": self.seq,
            "epoch": self.epoch,
            "id": self.id,
            "user": self.user.to_wire(),
            "text": self.text,
            "ts": self.ts,
        }
        if not self.text:
            wire["deleted"] = True
        elif self.edited is not None:
            wire["edited"] = self.edited
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Message:
        user = data["user"]
        return cls(
            RoomId(data["room"]),
            data["seq"],
            data["epoch"],
            data["id"],
            User(UserId(user["id"]), user["name"]),
            data["text"],
            data["ts"],
            data.get("edited"),  # a deleted message's is not on the wire
        )


@dataclass(frozen=True, slots=True)
class Member:
    """One connection's presence in a room, as the cluster sees it."""

    user: User
    conn: ConnId
    node: NodeId
