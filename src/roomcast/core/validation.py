"""Checks on everything a client sends. Each failure is a :class:`ChatError` with its code.

Lengths count Unicode code points (Python ``len``), not bytes.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from ..exceptions import ChatError, ErrorCode
from .models import Position, RoomId, UserId

ROOM_NAME_MAX = 64
NICKNAME_MAX = 32
TEXT_MAX = 4000
HISTORY_LIMIT_MAX = 100
HISTORY_LIMIT_DEFAULT = 50
ROOMS_LIMIT_MAX = 1000
"""Most rooms one page of ``rooms`` holds (without a ``limit``, the reply holds all)."""
MEMBERS_LIMIT_MAX = 1000
"""Most members one page of ``members`` holds (without a ``limit``, the reply holds all)."""

# Categories never allowed in names: controls, surrogates, private use, unassigned, and
# line/paragraph separators.
_FORBIDDEN = frozenset({"Cc", "Cs", "Co", "Cn", "Zl", "Zp"})
# Bidirectional overrides and isolates let a name display as something it is not.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# What a message text must not contain: the control characters (category Cc: C0, DEL,
# C1) but tab, line feed and carriage return, and lone surrogates (Cs). Both categories
# are fixed ranges in every Unicode version; one regular-expression search checks a text
# at C speed, where asking unicodedata about each character cost ~3 % of a busy node's CPU.
_TEXT_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# In ASCII the only forbidden category is Cc (C0 and DEL), and there is no bidi control.
_ASCII_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_INT_MAX = 2**31 - 1
MESSAGE_ID_MAX = 64
_MESSAGE_ID = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MESSAGE_ID_MAX}}}", re.ASCII)


def _printable(value: str) -> bool:
    if value.isascii():
        # Most names, checked on every event that names a room: one search at C speed.
        return _ASCII_FORBIDDEN.search(value) is None
    return not any(unicodedata.category(ch) in _FORBIDDEN or ch in _BIDI_CONTROLS for ch in value)


def payload(data: Any) -> dict[str, Any]:
    """The event's argument as an object; a missing argument is an empty object."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ChatError(ErrorCode.BAD_REQUEST, "the payload must be an object")
    return data


def _name(value: Any, *, what: str, code: ErrorCode, limit: int) -> str:
    if not isinstance(value, str):
        raise ChatError(code, f"{what} must be a string")
    name = value.strip()
    if not name:
        raise ChatError(code, f"{what} must not be empty")
    if len(name) > limit:
        raise ChatError(code, f"{what} must be at most {limit} characters")
    if not _printable(name):
        raise ChatError(code, f"{what} must not contain control characters")
    return name


def room_name(value: Any) -> str:
    """A room name: 1-64 printable characters after trimming, any script."""
    return _name(value, what="room name", code=ErrorCode.INVALID_ROOM, limit=ROOM_NAME_MAX)


def nickname(value: Any) -> str:
    """A nickname: 1-32 printable characters after trimming, any script."""
    return _name(value, what="name", code=ErrorCode.INVALID_NAME, limit=NICKNAME_MAX)


def room_ref(data: dict[str, Any]) -> RoomId | str:
    """The ``room`` field: a numeric id, or a room name."""
    if "room" not in data:
        raise ChatError(ErrorCode.BAD_REQUEST, "'room' is required")
    value = data["room"]
    if isinstance(value, bool):
        raise ChatError(ErrorCode.BAD_REQUEST, "'room' must be a room id or a room name")
    if isinstance(value, int):
        if not 0 < value <= _INT_MAX:
            raise ChatError(ErrorCode.INVALID_ROOM, "a room id is a positive integer")
        return RoomId(value)
    if isinstance(value, str):
        return room_name(value)
    raise ChatError(ErrorCode.BAD_REQUEST, "'room' must be a room id or a room name")


def text(data: dict[str, Any]) -> str:
    """The ``text`` field: 1-4000 characters, not only white space."""
    if "text" not in data:
        raise ChatError(ErrorCode.BAD_REQUEST, "'text' is required")
    value = data["text"]
    if not isinstance(value, str):
        raise ChatError(ErrorCode.INVALID_TEXT, "'text' must be a string")
    if not value.strip():
        raise ChatError(ErrorCode.INVALID_TEXT, "'text' must not be empty")
    if len(value) > TEXT_MAX:
        raise ChatError(ErrorCode.INVALID_TEXT, f"'text' must be at most {TEXT_MAX} characters")
    if _TEXT_FORBIDDEN.search(value) is not None:
        raise ChatError(ErrorCode.INVALID_TEXT, "'text' must not contain control characters")
    return value


def message_id(data: dict[str, Any]) -> str | None:
    """The optional ``id`` of a ``send``: 1-64 ASCII letters, digits and ``-_.:``."""
    value = data.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or _MESSAGE_ID.fullmatch(value) is None:
        raise ChatError(
            ErrorCode.BAD_REQUEST,
            f"'id' must be 1-{MESSAGE_ID_MAX} ASCII letters, digits, '-', '_', '.' or ':'",
        )
    return value


def flag(data: dict[str, Any], key: str, default: bool = False) -> bool:
    """An optional boolean field (absent: ``default``)."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ChatError(ErrorCode.BAD_REQUEST, f"'{key}' must be true or false")
    return value


def _optional_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChatError(ErrorCode.BAD_REQUEST, f"'{key}' must be an integer")
    return value


def history_args(data: dict[str, Any]) -> tuple[int | None, int]:
    """``before`` (exclusive, optional) and ``limit`` (1-100, default 50, never clamped)."""
    before = _optional_int(data, "before")
    if before is not None and not 0 < before <= 2**53:
        raise ChatError(ErrorCode.BAD_REQUEST, "'before' must be a positive integer")
    limit = _optional_int(data, "limit")
    if limit is None:
        limit = HISTORY_LIMIT_DEFAULT
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise ChatError(ErrorCode.BAD_REQUEST, f"'limit' must be between 1 and {HISTORY_LIMIT_MAX}")
    return before, limit


def rooms_args(data: dict[str, Any]) -> tuple[bool, RoomId | None, int | None]:
    """``occupied`` (absent: False), ``after`` (a room id, >= 0; not with ``occupied``) and
    ``limit`` (1-1000, absent: every room) of a ``rooms`` request."""
    occupied = flag(data, "occupied")
    after = _optional_int(data, "after")
    if after is not None:
        if occupied:
            raise ChatError(ErrorCode.BAD_REQUEST, "'after' pages every room, not 'occupied'")
        if not 0 <= after <= 2**53:
            raise ChatError(ErrorCode.BAD_REQUEST, "'after' must be a room id (or 0)")
    limit = _optional_int(data, "limit")
    if limit is not None and not 1 <= limit <= ROOMS_LIMIT_MAX:
        raise ChatError(ErrorCode.BAD_REQUEST, f"'limit' must be between 1 and {ROOMS_LIMIT_MAX}")
    return occupied, None if after is None else RoomId(after), limit


def members_args(data: dict[str, Any]) -> tuple[UserId | None, int | None]:
    """``after`` (a user id, >= 0) and ``limit`` (1-1000) of a ``members`` request; either
    asks for members by user id (absent both: every member, in join order)."""
    after = _optional_int(data, "after")
    if after is not None and not 0 <= after <= 2**53:
        raise ChatError(ErrorCode.BAD_REQUEST, "'after' must be a user id (or 0)")
    limit = _optional_int(data, "limit")
    if limit is not None and not 1 <= limit <= MEMBERS_LIMIT_MAX:
        raise ChatError(ErrorCode.BAD_REQUEST, f"'limit' must be between 1 and {MEMBERS_LIMIT_MAX}")
    return None if after is None else UserId(after), limit


def since(data: dict[str, Any]) -> Position | None:
    """The optional ``since`` of a join: ``{epoch: str, seq: int >= 0}``."""
    value = data.get("since")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ChatError(ErrorCode.BAD_REQUEST, "'since' must be an object {epoch, seq}")
    epoch, seq = value.get("epoch"), value.get("seq")
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise ChatError(ErrorCode.BAD_REQUEST, "'since.epoch' must be a string")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 2**53:
        raise ChatError(ErrorCode.BAD_REQUEST, "'since.seq' must be a non-negative integer")
    return Position(epoch, seq)


def user_id(data: dict[str, Any], key: str = "to") -> int:
    """A user id field: a positive integer."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**53:
        raise ChatError(ErrorCode.BAD_REQUEST, f"'{key}' must be a user id (positive integer)")
    return value


def seq(data: dict[str, Any], key: str = "seq") -> int:
    """A message's ``seq`` field: a positive integer."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**53:
        raise ChatError(ErrorCode.BAD_REQUEST, f"'{key}' must be a message's seq (an integer > 0)")
    return value
