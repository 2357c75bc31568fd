"""The terminal client over Socket.IO (python-socketio's AsyncClient).

Every request is an event answered by an ack, ``{ok: true, ...}`` or ``{ok: false, error:
{code, message}}``. The client is always in the lobby, and in at most one other room, the
current one; joining another room leaves it.

Each joined room remembers its epoch and the last seq shown. A message is shown only if
its seq is newer, so nothing appears twice; after a reconnect every room is joined again
with ``since = {epoch, seq}`` and the missed messages in the reply are shown, so nothing is
lost. Join replies are handled inside the ack callback, before any frame that follows them
on the wire is dispatched.

A message line starts with its seq, the number ``/edit`` and ``/delete`` take. A line on
the terminal cannot be changed: when a message shown is deleted, its line is shown again,
as deleted; when it is edited, its line is shown again with the new text, once per edit
(of a message's edits, the one with the highest ``edited`` wins: an older or repeated one
shows nothing, and none brings back a deleted message). A room also remembers the seqs it
was told were deleted and the newest edit of each, since a ``deleted`` or ``edited`` event
can come before its message (two nodes): that message is then shown deleted, or edited. A
recovering join's ``changed`` (what was edited or deleted while the client was away) is
shown as those events are.

python-socketio reconnects by itself after a transport error; when the server ends the
session (a node shutting down) the client reconnects by itself too, with backoff.

On a server that checks tokens the client connects with ``auth: {token}`` instead of a
name, and the name it shows is the one the welcome brings. A reconnect the server refuses
as ``unauthorized`` (the token expired meanwhile) ends the client: no retry can succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import socketio

from . import view
from .backend import LOBBY, NO_TOKEN, RESEND_FOR, TIMEOUT, CommandFailed, Screen

Reply = dict[str, Any]

_RESEND = frozenset({"offline", "timeout", "unavailable", "rate_limited"})
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 5.0
ROOMS_SHOWN = 200
"""Most rooms ``/rooms`` and ``/list`` show (a terminal has no use for ten thousand)."""
KEPT = 1000
"""Most senders, deleted seqs and edits a room remembers (the newest)."""


@dataclass(slots=True)
class Joined:
    """A room the client is in, and how far it has been shown."""

    id: int
    name: str
    epoch: str
    seq: int
    """The newest seq shown (or current at the join)."""
    oldest: int
    """``/history`` shows messages before this seq."""
    senders: dict[int, str] = field(default_factory=dict)
    """The sender of each message shown, by seq: to show its line again once deleted."""
    deleted: set[int] = field(default_factory=set)
    """The seqs deleted: shown so, or to be shown so when their message comes."""
    edits: dict[int, tuple[int, str]] = field(default_factory=dict)
    """The newest edit known of a message, by seq: when (ms) and its text; shown so, or to
    be shown so when its message comes."""

    def accept(self, epoch: str, seq: int) -> bool:
        """Whether the message at (epoch, seq) is new here; if so it counts as shown."""
        if epoch != self.epoch:
            # The room's history was reset: its seqs start over.
            self.epoch, self.seq, self.oldest = epoch, seq, seq
            self.senders.clear()
            self.deleted.clear()
            self.edits.clear()
            return True
        if seq <= self.seq:
            return False
        self.seq = seq
        return True

    def shown(self, seq: int, sender: str, deleted: bool) -> bool:
        """Note message ``seq`` of ``sender`` as shown; whether to show it deleted."""
        self.senders[seq] = sender
        if len(self.senders) > KEPT:
            del self.senders[min(self.senders)]
        if deleted:
            self.mark(seq)
        return seq in self.deleted

    def revise(self, seq: int, edited: int, text: str) -> bool:
        """Note that message ``seq`` was edited at ``edited`` (ms) to ``text``; False if
        that is known already (this edit or a later one) or the message was deleted."""
        known = self.edits.get(seq)
        if seq in self.deleted or (known is not None and known[0] >= edited):
            return False
        self.edits[seq] = (edited, text)
        if len(self.edits) > KEPT:
            del self.edits[min(self.edits)]
        return True

    def mark(self, seq: int) -> bool:
        """Note message ``seq`` as deleted; False if it was already."""
        if seq in self.deleted:
            return False
        self.deleted.add(seq)
        if len(self.deleted) > KEPT:
            self.deleted.discard(min(self.deleted))
        return True


def _error(reply: Any) -> CommandFailed:
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(error, dict):
        return CommandFailed(str(error.get("code", "error")), str(error.get("message", "")))
    return CommandFailed("bad_reply", f"unexpected reply {reply!r}")


class SocketIOBackend:
    """A chat user connected to ``url`` over Socket.IO."""

    def __init__(
        self,
        screen: Screen,
        *,
        url: str,
        name: str,
        path: str = "/ws/socket.io",
        room: str = LOBBY,
        token: str | None = None,
    ) -> None:
        self._screen = screen
        self._url = url
        self._path = path
        self._name = name
        self._token = token
        self._start_room = room
        self._sessions: list[aiohttp.ClientSession] = []
        self._sio = socketio.AsyncClient(
            reconnection=True,
            reconnection_delay=RECONNECT_DELAY,
            reconnection_delay_max=RECONNECT_DELAY_MAX,
            logger=False,
            engineio_logger=False,
            # Ctrl-C is the application's: it closes the client like /quit does.
            handle_sigint=False,
            http_session=self._http_session,
        )
        self._user: dict[str, Any] = {}
        self._welcome = asyncio.Event()
        self._refused: Any = None
        self._gone = asyncio.Event()  # the server will not take us back
        self._gone_because = CommandFailed("unauthorized", "refused by the server")
        self._joined: dict[int, Joined] = {}
        self._lobby: int | None = None
        self._current: int | None = None
        self._started = False
        self._closing = False
        self._by_hand = False  # a connect or disconnect this class asked for itself
        self._resync: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Future[Reply]] = set()  # requests without their ack yet
        self._tasks: set[asyncio.Task[None]] = set()
        on = self._sio.on
        on("connect", self._on_connect)
        on("connect_error", self._on_connect_error)
        on("disconnect", self._on_disconnect)
        on("welcome", self._on_welcome)
        on("message", self._on_message)
        on("edited", self._on_edited)
        on("deleted", self._on_deleted)
        on("presence", self._on_presence)
        on("expired", self._on_expired)

    # -- Backend ---------------------------------------------------------------------

    @property
    def nick(self) -> str:
        return str(self._user.get("name", self._name))

    @property
    def room(self) -> str:
        joined = self._joined.get(self._current or -1)
        return joined.name if joined else self._start_room

    async def start(self) -> None:
        await self._connect()
        self._screen.show(view.notice(f"connected to {self._url} as {self.nick}"))
        try:
            self._lobby = (await self._join(LOBBY)).id
        except CommandFailed as exc:
            # A token may name rooms without the lobby: then only those, from --room.
            if exc.code != "forbidden" or self._start_room == LOBBY:
                raise
            self._screen.show(view.error(exc.code, exc.message))
        self._current = self._lobby
        if self._start_room != LOBBY:
            self._current = (await self._join(self._start_room)).id
        self._started = True

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._sio.shutdown(), TIMEOUT)
        # A connection attempt cut short leaves its HTTP session open.
        for session in self._sessions:
            await session.close()

    async def ended(self) -> CommandFailed:
        await self._gone.wait()
        return self._gone_because

    async def say(self, text: str) -> None:
        await self._send(self._current_room().id, text)

    async def say_all(self, text: str) -> None:
        if self._lobby is None or self._lobby not in self._joined:
            raise CommandFailed("not_member", "not in the lobby; /join lobby")
        await self._send(self._lobby, text)

    async def _send(self, room: int, text: str) -> None:
        """Send a message under an id of its own; one that got no answer, or that the
        server could not take or confirm, is sent again under that id once the connection
        and the room are back, for up to :data:`RESEND_FOR` seconds."""
        data = {"room": room, "text": text, "id": secrets.token_hex(12)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESEND_FOR
        pause = 1.0
        while True:
            try:
                await self._call("send", data)
                return
            except CommandFailed as exc:
                if exc.code not in _RESEND or loop.time() + pause >= deadline:
                    raise
                self._screen.show(view.notice("not confirmed yet; sending it again..."))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 8.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._back(), max(deadline - loop.time(), 0.0))

    async def _back(self) -> None:
        """Return once connected (welcomed) and every room is joined again."""
        await self._welcome.wait()
        if self._resync is not None:
            with contextlib.suppress(Exception):  # a room it could not join is said there
                await asyncio.shield(self._resync)

    async def make(self, name: str) -> None:
        name = name or f"room-{secrets.token_hex(3)}"
        try:
            await self._call("members", {"room": name})  # one room, not the list of all
        except CommandFailed as exc:
            if exc.code != "not_found":
                raise
        else:
            raise CommandFailed("exists", f"room {name!r} exists; /join {name}")
        await self._enter(name)

    async def list_rooms(self) -> None:
        rooms, more = await self._room_list(occupied=True)
        title = f"the {ROOMS_SHOWN} rooms with most members:" if more else "rooms with members:"
        self._screen.show(view.rooms(title, self._rows(rooms), "no room has members"))

    async def rooms(self) -> None:
        rooms, more = await self._room_list()
        title = f"the first {ROOMS_SHOWN} rooms (/list: those with members):" if more else "rooms:"
        self._screen.show(view.rooms(title, self._rows(rooms), "no rooms yet; /make NAME"))

    async def join(self, target: str) -> None:
        ref: int | str = target
        digits = target.removeprefix("#")
        if digits.isdigit():
            ref = int(digits)
        await self._enter(ref)

    async def leave(self) -> None:
        current = self._current_room()
        if current.id == self._lobby:
            raise CommandFailed("not_member", "already in the lobby; /quit leaves roomcast")
        if self._lobby is None:
            raise CommandFailed("not_member", "not in the lobby to go back to; /join another room")
        await self._call("leave", {"room": current.id})
        self._joined.pop(current.id, None)
        self._current = self._lobby
        self._screen.show(view.notice(f"left [{view.clean(current.name)}]"))

    async def users(self) -> None:
        current = self._current_room()
        reply = await self._call("members", {"room": current.id})
        names = [str(u["name"]) for u in reply["members"]]
        self._screen.show(view.members(current.name, names))

    async def history(self, count: int) -> None:
        current = self._current_room()
        if current.oldest <= 1:
            self._screen.show(view.notice(f"no older messages in [{view.clean(current.name)}]"))
            return
        reply = await self._call(
            "history", {"room": current.id, "before": current.oldest, "limit": count}
        )
        messages = [m for m in reply["messages"] if m.get("epoch") == current.epoch]
        if not messages:
            current.oldest = 1
            self._screen.show(view.notice(f"no older messages in [{view.clean(current.name)}]"))
            return
        current.oldest = min(int(m["seq"]) for m in messages)
        lines = [view.notice(f"older messages of [{view.clean(current.name)}]:")]
        lines += [self._line(current, m, m["ts"]) for m in messages]
        self._screen.show("\n".join(lines))

    async def edit(self, seq: int, text: str) -> None:
        current = self._current_room()
        reply = await self._call("edit", {"room": current.id, "seq": seq, "text": text})
        # Shown once, by this answer or by the room's edited event, whichever comes first.
        self._edited(current, reply["message"], asked=True)

    async def delete(self, seq: int) -> None:
        current = self._current_room()
        reply = await self._call("delete", {"room": current.id, "seq": seq})
        # Shown once, by this answer or by the room's deleted event, whichever comes first.
        self._deleted(current, seq, str(reply["message"]["user"]["name"]))

    async def rename(self, name: str) -> None:
        if self._token is not None:
            raise CommandFailed("unsupported", "with a token, your name is the token's")
        if name == self.nick:
            return
        old = self._name
        self._by_hand = True
        try:
            await self._sio.disconnect()
        finally:
            self._by_hand = False
        self._name = name
        try:
            await self._connect()
        except CommandFailed:
            self._name = old
            await self._connect()
            raise
        finally:
            # The welcome started joining every room again; the prompt waits for it.
            if self._resync is not None:
                await self._resync
        self._screen.show(view.notice(f"you are now {self.nick}"))

    # -- requests --------------------------------------------------------------------

    def _http_session(self) -> aiohttp.ClientSession:
        """A new HTTP session for python-socketio; those still open are closed at the end."""
        self._sessions = [s for s in self._sessions if not s.closed]
        session = aiohttp.ClientSession()
        self._sessions.append(session)
        return session

    async def _call(
        self, event: str, data: Reply, on_reply: Callable[[Reply], None] | None = None
    ) -> Reply:
        """Emit ``event`` and wait for its ack; ``on_reply`` runs as soon as it arrives."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Reply] = loop.create_future()

        def callback(reply: Any = None) -> None:
            if answer.done():
                return
            if isinstance(reply, dict) and reply.get("ok") is True:
                try:
                    if on_reply is not None:
                        on_reply(reply)
                except Exception as exc:
                    answer.set_exception(exc)
                    return
                answer.set_result(reply)
            else:
                answer.set_exception(_error(reply))

        try:
            await self._sio.emit(event, data, callback=callback)
        except socketio.exceptions.SocketIOError:
            raise CommandFailed("offline", "not connected, reconnecting; try again") from None
        self._waiting.add(answer)
        try:
            return await asyncio.wait_for(answer, TIMEOUT)
        except TimeoutError:
            raise CommandFailed("timeout", f"no answer to {event!r} in {TIMEOUT:g}s") from None
        finally:
            self._waiting.discard(answer)

    async def _connect(self) -> None:
        self._welcome.clear()
        self._refused = None
        self._by_hand = True
        try:
            await self._sio.connect(
                self._url,
                auth=self._auth,
                socketio_path=self._path,
                wait_timeout=TIMEOUT,
            )
        except (socketio.exceptions.ConnectionError, ValueError, OSError) as exc:
            raise self._connect_failure(exc) from None
        finally:
            self._by_hand = False
        try:
            await asyncio.wait_for(self._welcome.wait(), TIMEOUT)
        except TimeoutError:
            raise CommandFailed("timeout", "the server sent no welcome") from None

    def _auth(self) -> Reply:
        """The connect payload, read on every (re)connect: the token, else the name."""
        return {"name": self._name} if self._token is None else {"token": self._token}

    def _connect_failure(self, exc: BaseException) -> CommandFailed:
        refused = self._refusal(self._refused)
        if refused is not None:
            return refused
        return CommandFailed("unavailable", f"cannot connect to {self._url}: {exc}")

    def _refusal(self, data: Any) -> CommandFailed | None:
        """Why the server refused a connect, from its ``connect_error`` data; None if it
        did not (the connection failed)."""
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            refused = _error({"error": data["data"]})
        elif isinstance(data, dict) and data.get("message"):
            refused = CommandFailed("refused", str(data["message"]))
        else:
            return None
        if refused.code == "unauthorized" and self._token is None:
            refused = CommandFailed(refused.code, f"{refused.message}; {NO_TOKEN}")
        return refused

    async def _join(self, ref: int | str, since: Joined | None = None) -> Joined:
        data: Reply = {"room": ref}
        if since is not None:
            data["since"] = {"epoch": since.epoch, "seq": since.seq}
        result: list[Joined] = []
        reply = await self._call("join", data, lambda r: result.append(self._joined_room(r, since)))
        joined = result[0]
        if since is None:
            names = [str(u["name"]) for u in reply.get("members", [])]
            self._screen.show(view.joined(joined.name, names, joined.seq))
        return joined

    def _joined_room(self, reply: Reply, since: Joined | None) -> Joined:
        # Runs in the ack callback: before any frame that came after the reply.
        room, epoch, seq = reply["room"], str(reply["epoch"]), int(reply["seq"])
        fresh = Joined(int(room["id"]), str(room["name"]), epoch, seq, seq + 1)
        if since is not None and since.id == fresh.id and reply.get("recovered") is True:
            since.name = fresh.name
            self._joined[since.id] = since
            for message in reply.get("changed", []):
                self._changed(since, message)
            for message in reply.get("missed", []):
                self._show_message(since, message)
            return since
        if since is not None:
            self._joined.pop(since.id, None)
            if since.epoch == epoch and since.id == fresh.id and seq > since.seq:
                lost = f"{seq - since.seq} messages"
                self._screen.show(
                    view.error("gap", f"{lost} in [{fresh.name}] could not be recovered")
                )
            elif since.epoch != epoch or since.id != fresh.id:
                self._screen.show(view.notice(f"the history of [{fresh.name}] was reset"))
            if since.epoch == epoch and since.id == fresh.id:
                fresh.oldest = since.oldest
                fresh.senders, fresh.deleted = since.senders, since.deleted
                fresh.edits = since.edits
        self._joined[fresh.id] = fresh
        return fresh

    async def _enter(self, ref: int | str) -> None:
        """Make ``ref`` the current room, leaving the previous one unless it is the lobby."""
        for joined in self._joined.values():
            if ref == joined.id or (isinstance(ref, str) and ref == joined.name):
                await self._switch(joined)
                return
        joined = await self._join(ref)
        await self._switch(joined)

    async def _switch(self, joined: Joined) -> None:
        previous = self._current
        self._current = joined.id
        if previous is not None and previous not in (joined.id, self._lobby):
            left = self._joined.pop(previous, None)
            with contextlib.suppress(CommandFailed):
                await self._call("leave", {"room": previous})
            if left is not None:
                self._screen.show(view.notice(f"left [{view.clean(left.name)}]"))

    async def _rejoin(self) -> None:
        """Join every room again from where it was, after a new connection."""
        for joined in list(self._joined.values()):
            try:
                fresh = await self._join(joined.name, since=joined)
            except CommandFailed as exc:
                self._joined.pop(joined.id, None)
                self._screen.show(view.error(exc.code, f"[{joined.name}] {exc.message}"))
                continue
            if self._current == joined.id:
                self._current = fresh.id
            if self._lobby == joined.id:
                self._lobby = fresh.id
        if self._current not in self._joined:
            self._current = self._lobby

    async def _room_list(self, *, occupied: bool = False) -> tuple[list[Reply], bool]:
        """At most ``ROOMS_SHOWN`` rooms, and whether there may be more."""
        reply = await self._call("rooms", {"occupied": occupied, "limit": ROOMS_SHOWN})
        rooms = list(reply["rooms"])
        return rooms, "next" in reply or (occupied and len(rooms) == ROOMS_SHOWN)

    def _rows(self, rooms: list[Reply]) -> list[view.RoomLine]:
        rows = []
        for r in sorted(rooms, key=lambda r: int(r["id"])):
            current = r["id"] == self._current
            rows.append(view.RoomLine(f"#{r['id']}", str(r["name"]), int(r["members"]), current))
        return rows

    def _current_room(self) -> Joined:
        joined = self._joined.get(self._current or -1) or self._joined.get(self._lobby or -1)
        if joined is None:
            raise CommandFailed("not_member", "in no room; /join NAME")
        return joined

    # -- server events ---------------------------------------------------------------

    def _on_connect(self) -> None:
        if not self._by_hand and self._started and not self._closing:
            self._screen.show(view.notice("reconnected"))

    def _on_connect_error(self, data: Any = None) -> None:
        self._refused = data
        refused = self._refusal(data)
        if refused is not None and refused.code == "unauthorized" and self._started:
            # A reconnect refused: python-socketio would try again forever, in vain.
            self._gone_because = refused
            self._gone.set()

    def _on_expired(self, data: Any = None) -> None:
        # The server ends the connection: its token expired. The same token would be
        # refused on a reconnect, so the client ends with the reason now.
        message = data.get("message") if isinstance(data, dict) else None
        self._gone_because = CommandFailed("unauthorized", str(message or "the token expired"))
        self._gone.set()

    def _on_disconnect(self, reason: Any = None) -> None:
        self._welcome.clear()  # until the next connection's welcome
        # Acks cannot come over a closed connection: fail the requests now, not at timeout.
        for answer in self._waiting:
            if not answer.done():
                answer.set_exception(CommandFailed("offline", "the connection was lost"))
        if self._closing or self._by_hand or reason == self._sio.reason.CLIENT_DISCONNECT:
            return
        self._screen.show(view.notice("connection lost; reconnecting..."))
        if reason == self._sio.reason.SERVER_DISCONNECT:
            # The node is going away; python-socketio does not retry in this case.
            self._spawn(self._reconnect())

    def _on_welcome(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("user"), dict):
            self._user = data["user"]
        self._welcome.set()
        if self._started and not self._closing:
            # A new connection is in no room: join them all again from where they were.
            self._resync = self._spawn(self._rejoin())

    def _on_message(self, data: Any) -> None:
        joined = self._joined.get(data.get("room", 0)) if isinstance(data, dict) else None
        if joined is not None:
            self._show_message(joined, data)

    def _show_message(self, joined: Joined, message: Reply) -> None:
        if joined.accept(str(message["epoch"]), int(message["seq"])):
            self._screen.show(self._line(joined, message))

    @staticmethod
    def _line(joined: Joined, message: Reply, ts: int | None = None) -> str:
        seq, sender = int(message["seq"]), str(message["user"]["name"])
        deleted = joined.shown(seq, sender, message.get("deleted") is True)
        stamp = message.get("edited")
        if not deleted and isinstance(stamp, int):
            joined.revise(seq, stamp, str(message["text"]))
        # An edit told before the message, or one later than the message read, wins.
        edit = None if deleted else joined.edits.get(seq)
        text = str(message["text"]) if edit is None else edit[1]
        return view.message(
            joined.name, sender, text, ts, seq=seq, deleted=deleted, edited=edit is not None
        )

    def _on_edited(self, data: Any) -> None:
        joined = self._joined.get(data.get("room", 0)) if isinstance(data, dict) else None
        if joined is None or data.get("epoch") != joined.epoch:
            return  # of another epoch of the room's history: not of the messages shown
        if isinstance(data.get("seq"), int) and isinstance(data.get("edited"), int):
            self._edited(joined, data)

    def _edited(self, joined: Joined, message: Reply, *, asked: bool = False) -> None:
        """Message ``seq`` of the room was edited: its line again, with the new text, if it
        was shown and this is its newest edit; if it has not come yet, it will be shown
        edited when it does. ``asked``: the answer to this client's ``/edit``, shown even
        for a message it did not show."""
        seq = int(message["seq"])
        if not asked and seq < joined.oldest and seq not in joined.senders:
            return  # from before what this client showed
        if not joined.revise(seq, int(message["edited"]), str(message["text"])):
            return
        if seq > joined.seq:
            return
        sender, text = str(message["user"]["name"]), str(message["text"])
        self._screen.show(view.message(joined.name, sender, text, seq=seq, edited=True))

    def _changed(self, joined: Joined, message: Reply) -> None:
        """A message of the room as it is now, edited or deleted while the client was away
        (or seen so already: shown again only if it is news)."""
        if message.get("deleted") is True:
            self._deleted(joined, int(message["seq"]))
        elif isinstance(message.get("edited"), int):
            self._edited(joined, message)

    def _on_deleted(self, data: Any) -> None:
        joined = self._joined.get(data.get("room", 0)) if isinstance(data, dict) else None
        seq = data.get("seq") if isinstance(data, dict) else None
        if joined is not None and isinstance(seq, int):
            self._deleted(joined, seq)

    def _deleted(self, joined: Joined, seq: int, sender: str | None = None) -> None:
        """Message ``seq`` of the room was deleted: its line again, as deleted, if it was
        shown; if it has not come yet, it will be shown deleted when it does."""
        if seq > joined.seq:
            joined.mark(seq)
            return
        sender = joined.senders.get(seq, sender)
        if sender is None and seq < joined.oldest:
            return  # from before what this client showed
        if not joined.mark(seq):
            return
        if sender is None:
            self._screen.show(view.deleted(joined.name, seq))
        else:
            self._screen.show(view.message(joined.name, sender, "", seq=seq, deleted=True))

    def _on_presence(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        joined = self._joined.get(data.get("room", 0))
        user = data.get("user") or {}
        if joined is None or user.get("id") == self._user.get("id"):
            return
        self._screen.show(view.presence(joined.name, str(user.get("name")), str(data.get("event"))))

    async def _reconnect(self) -> None:
        delay = RECONNECT_DELAY
        while not self._closing and not self._gone.is_set():
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                await self._connect()
            except CommandFailed:
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            self._screen.show(view.notice("reconnected"))
            return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
