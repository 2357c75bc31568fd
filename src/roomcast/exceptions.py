"""Exceptions raised by roomcast.

The tree::

    RoomcastError                  root of everything roomcast raises on purpose
    ├── ChatError                  a request was refused; carries an ErrorCode and a message
    │                              that transports put on the wire unchanged
    ├── ConfigError                settings that cannot work (bad URL scheme, missing extra)
    └── UnavailableError           an engine (broker, store) cannot be reached right now
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The closed set of error codes a client can receive (see docs/protocol.md)."""

    BAD_REQUEST = "bad_request"
    """The payload has the wrong shape: not an object, a missing field, a wrong type."""
    UNKNOWN_EVENT = "unknown_event"
    """The event name is not one the server knows."""
    INVALID_ROOM = "invalid_room"
    """A room name is empty, too long or holds control characters."""
    INVALID_TEXT = "invalid_text"
    """A text is empty, too long or not a string."""
    INVALID_NAME = "invalid_name"
    """A nickname is empty, too long or holds control characters."""
    NOT_MEMBER = "not_member"
    """The request needs membership of a room the connection has not joined."""
    NOT_FOUND = "not_found"
    """The room or user does not exist."""
    RATE_LIMITED = "rate_limited"
    """Too many requests in a short time."""
    CONFLICT = "conflict"
    """A message id chosen by the sender is the id of another message in the room."""
    UNAUTHORIZED = "unauthorized"
    """The server checks tokens and the client's is missing, badly signed, expired or
    malformed (see docs/protocol.md, "Authentication")."""
    FORBIDDEN = "forbidden"
    """The client's token does not let it into this room."""
    UNAVAILABLE = "unavailable"
    """An engine the request needs (broker, store) cannot be reached; nothing was done."""


class RoomcastError(Exception):
    """Root of every exception roomcast raises on purpose."""


class ChatError(RoomcastError):
    """A request was refused. ``code`` and ``message`` go to the client as they are."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class ConfigError(RoomcastError):
    """The settings cannot work: an unknown URL scheme, a missing optional dependency."""


class UnavailableError(RoomcastError):
    """An engine (broker, store) cannot be reached right now."""
