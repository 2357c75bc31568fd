"""The shapes of the REST API's answers, as its OpenAPI document describes them.

The routes answer with the same dicts the Socket.IO events do (built once, by the service's
``*_wire`` helpers); these models document them for ``/docs`` and for clients generated from
``/openapi.json``, and tests check real answers against them. They are not used to build or
validate answers at run time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..exceptions import ErrorCode


class UserOut(BaseModel):
    """A user: its id, unique across the cluster, and its nickname."""

    id: int
    name: str


class RoomOut(BaseModel):
    """A room: its id, which never changes, and its name."""

    id: int
    name: str


class RoomCount(RoomOut):
    """A room with its members (connections) across the cluster."""

    members: int = Field(ge=0)


class MessageOut(BaseModel):
    """A stored message: ``seq`` is 1, 2, 3, ... per room and ``epoch``, with no gaps."""

    room: int
    seq: int = Field(ge=1)
    epoch: str
    id: str
    user: UserOut
    text: str = Field(description="empty once the message was deleted")
    ts: int = Field(description="milliseconds since the Unix epoch, set by the server")
    deleted: bool | None = Field(
        None, description="true on a deleted message (which keeps its place, without text)"
    )
    edited: int | None = Field(
        None, description="on an edited message: when its sender last edited it (ms)"
    )


class RoomsReply(BaseModel):
    ok: Literal[True]
    rooms: list[RoomCount]
    next: int | None = Field(
        None, description="present when more rooms follow: the `after` of the next page"
    )


class MessagesReply(BaseModel):
    ok: Literal[True]
    messages: list[MessageOut] = Field(description="ascending by seq")


class MessageIn(BaseModel):
    """A message sent over the REST API (what the ``send`` event carries, less ``room``)."""

    # The limits are documented here and checked by the service, which refuses with the
    # codes the Socket.IO events use (invalid_text, invalid_name), not pydantic's.
    text: str = Field(
        description="1-4000 characters, not only white space, no control characters but "
        "tab and line breaks",
        json_schema_extra={"minLength": 1, "maxLength": 4000, "pattern": r"\S"},
    )
    id: str | None = Field(
        None,
        description="the message's id, chosen by the sender (1-64 of `A-Z a-z 0-9 _ . : -`): "
        "sending again with the same id stores the message once",
        json_schema_extra={"pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
    )
    name: str | None = Field(
        None,
        description="on an open server: the sender's name (1-32 printable characters, "
        "required); on a server that checks tokens the token's name is the sender's and this "
        "is not read",
        json_schema_extra={"minLength": 1, "maxLength": 32},
    )


class MessageEdit(BaseModel):
    """A message's new text (what the ``edit`` event carries, less ``room`` and ``seq``)."""

    text: str = Field(
        description="1-4000 characters, not only white space, no control characters but "
        "tab and line breaks",
        json_schema_extra={"minLength": 1, "maxLength": 4000, "pattern": r"\S"},
    )


class MessageReply(BaseModel):
    ok: Literal[True]
    message: MessageOut


class MembersReply(BaseModel):
    ok: Literal[True]
    room: RoomOut
    members: list[UserOut]
    next: int | None = Field(
        None, description="present when more members follow: the `after` of the next page"
    )


class HealthReply(BaseModel):
    ok: bool = Field(description="the node runs and its broker is reachable")
    node: str
    broker: bool
    node_id_shared: bool = Field(
        description="another process runs with this node id (a misconfiguration, logged "
        "as an error): node ids must be unique"
    )


class ErrorOut(BaseModel):
    code: ErrorCode
    message: str


class ErrorReply(BaseModel):
    """What every refused request answers, with the status that goes with its code."""

    ok: Literal[False]
    error: ErrorOut


ERRORS: dict[int | str, dict[str, object]] = {
    "4XX": {
        "model": ErrorReply,
        "description": "Refused, nothing done: 400 `bad_request` (a parameter out of range or "
        "of the wrong type), `invalid_room`, `invalid_text`, `invalid_name`; 404 `not_found` "
        "(no such room); 409 `conflict` (a message `id` the room holds with another text or "
        "sender); 411 and 413 `bad_request` (a request body without a length, or larger than "
        "64 KiB); 429 `rate_limited`; on a server that checks tokens 401 `unauthorized` (no "
        "valid `Authorization: Bearer` token) and 403 `forbidden` (the token does not let "
        "its user into the room)",
    },
    503: {
        "model": ErrorReply,
        "description": "`unavailable`: an engine the request needs (store, presence) cannot "
        "be reached; try again",
    },
}
"""The error answers of every API route (declaring ``4XX`` also keeps FastAPI from
documenting a 422 that roomcast never sends: validation errors are 400s)."""
