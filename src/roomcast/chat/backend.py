"""What the terminal needs from a connection to roomcast, whichever door it goes through.

A :class:`Backend` carries out commands and writes what happens, its own results and
everything the server pushes, to a :class:`Screen` as finished lines (see :mod:`.view`).
Two implementations: :mod:`.socketio_backend` and :mod:`.grpc_backend`.
"""

from __future__ import annotations

from typing import Protocol

from ..exceptions import RoomcastError

LOBBY = "lobby"
"""The room every client is in and ``/all`` speaks to."""

TIMEOUT = 10.0
"""Seconds to wait for any one answer from the server."""
RESEND_FOR = 60.0
"""Seconds a line that got no answer, or that the server could not take or confirm, is
sent again (under the id it was first sent with: the room stores it once)."""

TOKEN_ENV = "ROOMCAST_TOKEN"
"""Where ``roomcast chat`` finds a token when ``--token`` is not given."""
NO_TOKEN = f"give one with --token or {TOKEN_ENV}"
"""Said after a refusal for want of a token, when none was given."""


class Screen(Protocol):
    """Where lines go: above the prompt, never through the line being typed."""

    def show(self, text: str) -> None: ...


class CommandFailed(RoomcastError):
    """A command the server (or the client) refused: shown as ``! code: message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Backend(Protocol):
    """A connected chat user: one method per command, output to its screen."""

    @property
    def nick(self) -> str:
        """The nickname the server knows us by."""
        ...

    @property
    def room(self) -> str:
        """The name of the current room (the lobby when in no other)."""
        ...

    async def start(self) -> None:
        """Connect and enter the lobby (and the starting room); raises CommandFailed."""

    async def close(self) -> None:
        """Leave and disconnect; never raises."""

    async def ended(self) -> CommandFailed:
        """Return once the server will not take this client back — its token refused when it
        reconnects (expired meanwhile): why. The client then ends."""

    async def say(self, text: str) -> None:
        """Send ``text`` to the current room."""

    async def say_all(self, text: str) -> None:
        """Send ``text`` to the lobby."""

    async def make(self, name: str) -> None:
        """Create a room (named ``name`` if given) and go into it."""

    async def list_rooms(self) -> None:
        """Show the rooms that have members."""

    async def rooms(self) -> None:
        """Show every room."""

    async def join(self, target: str) -> None:
        """Go into room ``target``: an id from the list, or a name."""

    async def leave(self) -> None:
        """Leave the current room for the lobby."""

    async def users(self) -> None:
        """Show the members of the current room."""

    async def history(self, count: int) -> None:
        """Show up to ``count`` messages older than the oldest shown in the current room."""

    async def edit(self, seq: int, text: str) -> None:
        """Replace the text of one's own message ``seq`` of the current room with ``text``."""

    async def delete(self, seq: int) -> None:
        """Delete message ``seq`` of the current room: one's own, or any on a moderator's
        token."""

    async def rename(self, name: str) -> None:
        """Reconnect under nickname ``name``, staying in the same rooms."""
