"""What the user types, as values: ``parse(line)`` turns a line into a :class:`Command`.

No I/O here. A line without a leading slash is something to say in the current room;
``//text`` says ``/text``. Everything else is one of the commands listed in :data:`HELP`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..exceptions import RoomcastError

HISTORY_DEFAULT = 20
HISTORY_MAX = 100


class Verb(StrEnum):
    """Every action a line can ask for."""

    SAY = "say"
    ALL = "all"
    MAKE = "make"
    LIST = "list"
    JOIN = "join"
    LEAVE = "leave"
    USER = "user"
    HISTORY = "history"
    EDIT = "edit"
    DELETE = "delete"
    ROOMS = "rooms"
    NAME = "name"
    QUIT = "quit"
    HELP = "?"


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed line: the verb and its argument (text, room, name, count, seq, or seq and
    text)."""

    verb: Verb
    arg: str = ""

    @property
    def count(self) -> int:
        """The argument of ``/history`` as a number of messages."""
        return int(self.arg) if self.arg else HISTORY_DEFAULT

    @property
    def seq(self) -> int:
        """The number ``/edit`` and ``/delete`` take: a message's in the current room."""
        return int(self.arg.partition(" ")[0])

    @property
    def text(self) -> str:
        """The new text ``/edit`` takes, after the message's number."""
        return self.arg.partition(" ")[2].lstrip(" ")


class UsageError(RoomcastError):
    """A line that is not a valid command; the message says how to write it."""


_ALIASES = {"help": Verb.HELP, "exit": Verb.QUIT, "users": Verb.USER, "nick": Verb.NAME}
_BY_NAME = {verb.value: verb for verb in Verb if verb is not Verb.SAY} | _ALIASES

# verb -> (argument: "none" | "optional" | "required", usage)
_SHAPES: dict[Verb, tuple[str, str]] = {
    Verb.ALL: ("required", "/all TEXT"),
    Verb.MAKE: ("optional", "/make [NAME]"),
    Verb.LIST: ("none", "/list"),
    Verb.JOIN: ("required", "/join N|NAME"),
    Verb.LEAVE: ("none", "/leave"),
    Verb.USER: ("none", "/user"),
    Verb.HISTORY: ("optional", "/history [N]"),
    Verb.EDIT: ("required", "/edit N TEXT"),
    Verb.DELETE: ("required", "/delete N"),
    Verb.ROOMS: ("none", "/rooms"),
    Verb.NAME: ("required", "/name NEW"),
    Verb.QUIT: ("none", "/quit"),
    Verb.HELP: ("none", "/?"),
}

HELP = """\
commands:
  TEXT            say TEXT in the current room (the lobby when in no room)
  /all TEXT       say TEXT in the lobby
  /make [NAME]    create a room (a channel over gRPC) and go into it
  /list           rooms that have members, with their member counts
  /join N|NAME    go into room N (an id from /list) or NAME
  /leave          leave the current room, back to the lobby
  /user           members of the current room
  /history [N]    N older messages of the current room (default 20, at most 100)
  /edit N TEXT    replace the text of your message N of the current room with TEXT
  /delete N       delete message N of the current room (the number its line starts with)
  /rooms          every room, with its member count
  /name NEW       reconnect under the nickname NEW
  /quit           leave (also Ctrl-D or Ctrl-C)
  /?              this help
  //TEXT          say /TEXT"""


def parse(line: str) -> Command | None:
    """The command a line asks for; ``None`` for a blank line.

    Raises :class:`UsageError` for an unknown command or a missing or bad argument.
    """
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Command(Verb.SAY, line)
    if line.startswith("//"):
        return Command(Verb.SAY, line[1:])
    word, _, rest = line[1:].partition(" ")
    verb = _BY_NAME.get(word.lower())
    if verb is None:
        raise UsageError(f"unknown command /{word}; /? lists the commands")
    arg = rest.strip()
    need, usage = _SHAPES[verb]
    if need == "required" and not arg:
        raise UsageError(f"usage: {usage}")
    if need == "none" and arg:
        raise UsageError(f"usage: {usage}")
    if verb in (Verb.ALL, Verb.EDIT):
        arg = rest.lstrip(" ")  # said as typed: trailing spaces are part of the text
    if verb is Verb.HISTORY and arg:
        if not arg.isdigit() or not 1 <= int(arg) <= HISTORY_MAX:
            raise UsageError(f"usage: {usage} with N from 1 to {HISTORY_MAX}")
    if verb in (Verb.EDIT, Verb.DELETE):
        number, _, text = arg.partition(" ")
        if not _is_seq(number if verb is Verb.EDIT else arg):
            raise UsageError(f"usage: {usage}, N the number a message line starts with")
        if verb is Verb.EDIT and not text.strip():
            raise UsageError(f"usage: {usage}, TEXT the message's new text")
    return Command(verb, arg)


def _is_seq(word: str) -> bool:
    """Whether ``word`` is a message's number: 1, 2, 3... in ASCII digits."""
    return word.isascii() and word.isdigit() and int(word) >= 1
