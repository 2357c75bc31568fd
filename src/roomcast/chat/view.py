"""How things look on the terminal: pure functions from values to lines of text.

Everything a server sends is untrusted: :func:`clean` replaces control characters, so a
message cannot move the cursor, clear the screen or retitle the terminal.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_CONTROL = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Joiners are format characters that emoji and several scripts need.
_JOINERS = frozenset("\u200c\u200d")


@dataclass(frozen=True, slots=True)
class RoomLine:
    """One row of ``/list`` or ``/rooms``."""

    ref: str
    name: str
    members: int
    current: bool = False


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control and format characters shown as ``?`` (tabs become spaces)."""
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        elif unicodedata.category(ch) in _CONTROL and ch not in _JOINERS:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


DELETED = "(message deleted)"
"""What a deleted message shows instead of its text."""
EDITED = " (edited)"
"""What follows the text of an edited message."""


def message(
    room: str,
    user: str,
    text: str,
    ts: int | None = None,
    *,
    seq: int | None = None,
    deleted: bool = False,
    edited: bool = False,
) -> str:
    """``[room] user: text``; later lines of a multi-line text are indented under it.

    ``ts`` (milliseconds) prefixes the local time, for messages from history; ``seq``
    prefixes the message's number in its room (what ``/edit`` and ``/delete`` take). A
    ``deleted`` message shows :data:`DELETED` instead of its text; an ``edited`` one has
    :data:`EDITED` after it.
    """
    head = f"[{clean(room)}] {clean(user)}: "
    if ts is not None:
        head = time.strftime("%H:%M ", time.localtime(ts / 1000)) + head
    if seq is not None:
        head = f"{seq} {head}"
    if deleted:
        return head + DELETED
    lines = clean(text.replace("\r\n", "\n").replace("\r", "\n"), keep_newlines=True).split("\n")
    pad = " " * len(head)
    return head + ("\n" + pad).join(lines) + (EDITED if edited else "")


def deleted(room: str, seq: int) -> str:
    """``* message 12 of [room] was deleted``: for one whose sender is not known here."""
    return f"* message {seq} of [{clean(room)}] was deleted"


def presence(room: str, user: str, event: str) -> str:
    """``* bob joined [room]`` or ``* bob left [room]``."""
    verb = {"join": "joined", "leave": "left"}.get(event, clean(event))
    return f"* {clean(user)} {verb} [{clean(room)}]"


def notice(text: str) -> str:
    """A line from the client itself."""
    return f"* {text}"


def error(code: str, text: str) -> str:
    """``! code: message``."""
    return f"! {clean(code)}: {clean(text)}"


NAMES_SHOWN = 50
"""Most names a line of members shows; a bigger room's line says how many more there are."""


def _members(names: Iterable[str]) -> str:
    unique = sorted({clean(n) for n in names}, key=str.casefold)
    count = f"{len(unique)} member" + ("" if len(unique) == 1 else "s")
    shown = ", ".join(unique[:NAMES_SHOWN]) or "nobody"
    if len(unique) > NAMES_SHOWN:
        shown += f" and {len(unique) - NAMES_SHOWN} more"
    return f"{count}: {shown}"


def members(room: str, names: Iterable[str]) -> str:
    """``* [room] has 2 members: alice, bob``."""
    return f"* [{clean(room)}] has {_members(names)}"


def joined(room: str, names: Iterable[str], earlier: int = 0) -> str:
    """The line shown on going into a room."""
    more = f"; {earlier} earlier message{'' if earlier == 1 else 's'} (/history)" if earlier else ""
    return f"* you are in [{clean(room)}], {_members(names)}{more}"


def rooms(title: str, rows: list[RoomLine], empty: str) -> str:
    """A table of rooms: ``  #id  name  N members``, ``>`` marking the current one."""
    if not rows:
        return notice(empty)
    width = max(len(r.ref) for r in rows)
    lines = [notice(title)]
    for row in rows:
        mark = ">" if row.current else " "
        count = f"{row.members} member" + ("" if row.members == 1 else "s")
        lines.append(f" {mark} {row.ref:<{width}}  {clean(row.name)}  ({count})")
    return "\n".join(lines)
