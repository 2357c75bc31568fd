"""The terminal client's Socket.IO backend against a stand-in server on loopback.

The stand-in (python-socketio's own server) answers as roomcast does and sends the
events a test tells it to, in the order the test chooses — the order two nodes can
produce and one real node hardly does. What is checked is what the client shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import socketio
from aiohttp import web

from roomcast.chat import view
from roomcast.chat.backend import CommandFailed
from roomcast.chat.socketio_backend import KEPT, Joined, SocketIOBackend

WAIT = 10.0
ROOM = 5
EPOCH = "e1"
TS = 1_700_000_000_000
NAMES = {1: "ada", 2: "bob"}


class Screen:
    """The lines a backend shows; a test waits for the ones it expects."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def show(self, text: str) -> None:
        self.lines.append(text)
        self._changed.set()

    async def shows(self, line: str) -> None:
        """Wait until ``line`` is shown (bounded)."""
        await self.until(lambda: line in self.lines, f"{line!r} was not shown")

    async def until(self, condition: Callable[[], bool], why: str) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), WAIT)
        except TimeoutError:
            pytest.fail(f"{why}; the screen: {self.lines}")


def message(
    seq: int, text: str, *, user: int = 2, deleted: bool = False, edited: int | None = None
) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "room": ROOM,
        "seq": seq,
        "epoch": EPOCH,
        "id": f"m{seq}",
        "user": {"id": user, "name": NAMES[user]},
        "text": "" if deleted else text,
        "ts": TS,
    }
    if deleted:
        wire["deleted"] = True
    elif edited is not None:
        wire["edited"] = edited
    return wire


class StandIn:
    """A Socket.IO server that welcomes ``ada`` (user 1) into room 5, its history
    ``history``, and answers ``delete`` with ``deletes`` and ``edit`` with ``edits``; a
    join with ``since`` (a client back after a lost connection) is answered as recovered,
    with ``changed``."""

    def __init__(self) -> None:
        # always_connect: the connect is answered before the welcome goes, as roomcast does.
        self.sio = socketio.AsyncServer(async_mode="aiohttp", always_connect=True)
        self.url = ""
        self.sid = ""
        self.history: list[dict[str, Any]] = []
        self.requests: list[tuple[str, Any]] = []
        self.deletes: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: {
            "ok": True,
            "message": message(data["seq"], "", user=1, deleted=True),
        }
        self.edits: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: {
            "ok": True,
            "message": message(data["seq"], data["text"], user=1, edited=TS + 60_000),
        }
        self.changed: list[dict[str, Any]] = []
        self.sio.on("connect", self._connect)
        for event in ("join", "history", "delete", "edit", "leave"):
            self.sio.on(event, self._answerer(event))

    async def _connect(self, sid: str, environ: Any, auth: Any) -> None:
        self.sid = sid
        await self.sio.emit("welcome", {"user": {"id": 1, "name": "ada"}}, to=sid)

    def _answerer(self, event: str) -> Callable[[str, Any], Any]:
        async def answer(sid: str, data: Any) -> dict[str, Any]:
            self.requests.append((event, data))
            if event == "join":
                name = str(data["room"])
                room_id = ROOM if name == "den" else 1
                since = data.get("since")
                reply = {
                    "ok": True,
                    "room": {"id": room_id, "name": name},
                    "epoch": EPOCH,
                    "seq": since["seq"] if since else 0 if room_id == 1 else len(self.history),
                    "members": [{"id": 1, "name": "ada"}],
                }
                if since:
                    changed = self.changed if room_id == ROOM else []
                    reply |= {"recovered": True, "missed": [], "changed": changed}
                return reply
            if event == "history":
                return {"ok": True, "messages": self.history}
            if event == "delete":
                return self.deletes(data)
            if event == "edit":
                return self.edits(data)
            return {"ok": True, "room": {"id": data["room"], "name": "den"}}

        return answer

    async def send(self, event: str, data: Any) -> None:
        await self.sio.emit(event, data, to=self.sid)


@pytest.fixture
async def server() -> AsyncIterator[StandIn]:
    stand_in = StandIn()
    app = web.Application()
    stand_in.sio.attach(app, socketio_path="/ws/socket.io")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stand_in.url = f"http://127.0.0.1:{port}"
    try:
        yield stand_in
    finally:
        await runner.cleanup()


@pytest.fixture
async def ada(server: StandIn) -> AsyncIterator[tuple[SocketIOBackend, Screen]]:
    """ada's client, in the lobby and room ``den`` (id 5)."""
    screen = Screen()
    backend = SocketIOBackend(screen, url=server.url, name="ada", room="den")
    await backend.start()
    try:
        yield backend, screen
    finally:
        await backend.close()


def line(seq: int, text: str, user: int = 2, ts: int | None = None) -> str:
    return view.message("den", NAMES[user], text, ts, seq=seq)


def gone(seq: int, user: int = 2, ts: int | None = None) -> str:
    return view.message("den", NAMES[user], "", ts, seq=seq, deleted=True)


def fixed(seq: int, text: str, user: int = 2, ts: int | None = None) -> str:
    return view.message("den", NAMES[user], text, ts, seq=seq, edited=True)


async def test_a_message_shown_and_then_deleted_is_shown_again_deleted_once(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    await server.send("message", message(1, "oops"))
    await server.send("message", message(2, "fine"))
    await screen.shows("1 [den] bob: oops")
    told = {"room": ROOM, "seq": 1, "id": "m1", "by": {"id": 2, "name": "bob"}}
    await server.send("deleted", told)
    await server.send("deleted", told)  # deleted again: the room is told again
    await server.send("message", message(3, "marker"))
    await screen.shows(line(3, "marker"))
    shown = screen.lines[screen.lines.index(line(1, "oops")) :]
    assert shown == [
        "1 [den] bob: oops",
        "2 [den] bob: fine",
        "1 [den] bob: (message deleted)",
        "3 [den] bob: marker",
    ]


async def test_a_deletion_told_before_its_message_shows_the_message_deleted(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    await server.send("deleted", {"room": ROOM, "seq": 1, "id": "m1", "by": None})
    await server.send("message", message(1, "soon gone"))
    await server.send("message", message(2, "after"))
    await screen.shows(line(2, "after"))
    assert gone(1) in screen.lines
    assert not any("soon gone" in shown for shown in screen.lines), screen.lines
    assert screen.lines.index(gone(1)) == screen.lines.index(line(2, "after")) - 1


async def test_history_shows_deleted_messages_in_their_place(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    server.history = [message(1, "kept"), message(2, "", deleted=True), message(3, "also kept")]
    backend, screen = ada
    await backend.leave()
    await backend.join("den")  # joined anew: three earlier messages
    await backend.history(20)
    older = screen.lines[-1].split("\n")
    assert older == [
        "* older messages of [den]:",
        line(1, "kept", ts=TS),
        gone(2, ts=TS),
        line(3, "also kept", ts=TS),
    ]
    assert "(message deleted)" in older[2] and older[2].startswith("2 ")
    # Deleted again now: it was shown deleted already, nothing more to show.
    count = len(screen.lines)
    await server.send("deleted", {"room": ROOM, "seq": 2, "id": "m2", "by": None})
    await server.send("deleted", {"room": ROOM, "seq": 3, "id": "m3", "by": None})
    await screen.shows(gone(3))
    assert screen.lines[count:] == [gone(3)]


async def test_delete_asks_for_the_current_rooms_message_and_shows_it_deleted_once(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    backend, screen = ada
    await server.send("message", message(1, "typo", user=1))
    await screen.shows(line(1, "typo", user=1))
    await backend.delete(1)
    assert server.requests[-1] == ("delete", {"room": ROOM, "seq": 1})
    # The room's deleted event follows the answer: the line is not shown a third time.
    await server.send("deleted", {"room": ROOM, "seq": 1, "id": "m1", "by": {"id": 1}})
    await server.send("message", message(2, "marker"))
    await screen.shows(line(2, "marker"))
    assert screen.lines.count(gone(1, user=1)) == 1
    assert screen.lines.index(gone(1, user=1)) < screen.lines.index(line(2, "marker"))


async def test_a_refused_delete_is_raised_as_the_server_says_it(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    backend, screen = ada
    await server.send("message", message(1, "bob's"))
    await screen.shows(line(1, "bob's"))
    refusal = {"code": "forbidden", "message": "only the sender of a message may delete it"}
    server.deletes = lambda data: {"ok": False, "error": refusal}
    with pytest.raises(CommandFailed) as refused:
        await backend.delete(1)
    assert (refused.value.code, refused.value.message) == ("forbidden", refusal["message"])
    assert gone(1) not in screen.lines


def test_a_room_remembers_the_newest_senders_and_deletions_only() -> None:
    joined = Joined(ROOM, "den", EPOCH, 0, 1)
    for seq in range(1, KEPT + 11):
        assert joined.shown(seq, "bob", deleted=False) is False
        assert joined.mark(seq) is True
    assert len(joined.senders) == len(joined.deleted) == KEPT
    assert min(joined.senders) == min(joined.deleted) == 11
    assert joined.mark(KEPT + 10) is False  # known already: shown deleted once
    # A reset history starts over: its seqs are other messages.
    assert joined.accept("e2", 1)
    assert joined.senders == {} and joined.deleted == set()


async def test_a_message_shown_and_then_edited_is_shown_again_once_per_edit(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    await server.send("message", message(1, "teh plan"))
    await server.send("message", message(2, "fine"))
    await screen.shows(line(2, "fine"))
    await server.send("edited", message(1, "the plan", edited=TS + 2000))
    await server.send("edited", message(1, "the plan", edited=TS + 2000))  # told again
    # An earlier edit, through another node, comes after the later one: not shown.
    await server.send("edited", message(1, "teh plann", edited=TS + 1000))
    await server.send("edited", message(1, "the plan, v2", edited=TS + 3000))
    await server.send("message", message(3, "marker"))
    await screen.shows(line(3, "marker"))
    shown = screen.lines[screen.lines.index(line(1, "teh plan")) :]
    assert shown == [
        "1 [den] bob: teh plan",
        "2 [den] bob: fine",
        "1 [den] bob: the plan (edited)",
        "1 [den] bob: the plan, v2 (edited)",
        "3 [den] bob: marker",
    ]


async def test_an_edit_told_before_its_message_shows_the_message_edited(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    await server.send("edited", message(1, "second thought", edited=TS + 2000))
    await server.send("edited", message(1, "first thought", edited=TS + 1000))  # older
    await server.send("message", message(1, "draft"))
    # Edited, then deleted, both before the message: it comes deleted.
    await server.send("edited", message(2, "better", edited=TS + 1000))
    await server.send("deleted", {"room": ROOM, "seq": 2, "id": "m2", "by": None})
    await server.send("message", message(2, "worse"))
    await server.send("message", message(3, "after"))
    await screen.shows(line(3, "after"))
    assert screen.lines[-3:] == [fixed(1, "second thought"), gone(2), line(3, "after")]
    assert not any(t in "\n".join(screen.lines) for t in ("draft", "first", "better", "worse"))


async def test_an_edit_does_not_bring_back_a_deleted_message(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    await server.send("message", message(1, "oops"))
    await server.send("deleted", {"room": ROOM, "seq": 1, "id": "m1", "by": None})
    await screen.shows(gone(1))
    # Made before the deletion, through another node, and told after it.
    await server.send("edited", message(1, "oops, fixed", edited=TS + 1000))
    await server.send("message", message(2, "marker"))
    await screen.shows(line(2, "marker"))
    assert screen.lines[screen.lines.index(line(1, "oops")) :] == [
        line(1, "oops"),
        gone(1),
        line(2, "marker"),
    ]


async def test_history_shows_edited_messages_marked_and_only_newer_edits_again(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    server.history = [message(1, "kept"), message(2, "rewritten", edited=TS + 1000)]
    backend, screen = ada
    await backend.leave()
    await backend.join("den")  # joined anew: two earlier messages
    await backend.history(20)
    assert screen.lines[-1].split("\n") == [
        "* older messages of [den]:",
        line(1, "kept", ts=TS),
        fixed(2, "rewritten", ts=TS),
    ]
    count = len(screen.lines)
    await server.send("edited", message(2, "rewritten", edited=TS + 1000))  # read already
    await server.send("edited", message(1, "kept, edited", edited=TS + 2000))
    await screen.shows(fixed(1, "kept, edited"))
    assert screen.lines[count:] == [fixed(1, "kept, edited")]


async def test_edit_asks_for_the_current_rooms_message_and_shows_it_edited_once(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    backend, screen = ada
    await server.send("message", message(1, "tpyo", user=1))
    await screen.shows(line(1, "tpyo", user=1))
    await backend.edit(1, "typo  ")
    assert server.requests[-1] == ("edit", {"room": ROOM, "seq": 1, "text": "typo  "})
    assert screen.lines[-1] == fixed(1, "typo  ", user=1)
    # The room's edited event follows the answer: the line is not shown a third time.
    await server.send("edited", message(1, "typo  ", user=1, edited=TS + 60_000))
    await server.send("message", message(2, "marker"))
    await screen.shows(line(2, "marker"))
    assert screen.lines.count(fixed(1, "typo  ", user=1)) == 1
    assert screen.lines.index(fixed(1, "typo  ", user=1)) < screen.lines.index(line(2, "marker"))


async def test_a_refused_edit_is_raised_as_the_server_says_it(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    backend, screen = ada
    await server.send("message", message(1, "bob's"))
    await screen.shows(line(1, "bob's"))
    refusal = {"code": "forbidden", "message": "only the sender of a message may edit it"}
    server.edits = lambda data: {"ok": False, "error": refusal}
    count = len(screen.lines)
    with pytest.raises(CommandFailed) as refused:
        await backend.edit(1, "mine now")
    assert (refused.value.code, refused.value.message) == ("forbidden", refusal["message"])
    assert screen.lines[count:] == []


async def test_a_client_back_after_a_lost_connection_shows_what_changed_meanwhile(
    server: StandIn, ada: tuple[SocketIOBackend, Screen]
) -> None:
    _, screen = ada
    for seq, text in enumerate(["one", "two", "three", "four"], start=1):
        await server.send("message", message(seq, text))
    await server.send("edited", message(3, "three!", edited=TS + 1000))
    await screen.shows(fixed(3, "three!"))
    # While away: 1 edited, 2 deleted; 3 is told again as it was seen live.
    server.changed = [
        message(1, "one!", edited=TS + 2000),
        message(2, "", deleted=True),
        message(3, "three!", edited=TS + 1000),
    ]
    count = len(screen.lines)
    await server.sio.disconnect(server.sid)
    await screen.shows(gone(2))  # shown by the join's answer: the room is joined again
    assert ("join", {"room": "den", "since": {"epoch": EPOCH, "seq": 4}}) in server.requests
    await server.send("message", message(5, "five"))
    await screen.shows(line(5, "five"))
    shown = [s for s in screen.lines[count:] if not s.startswith("* ")]
    assert shown == [fixed(1, "one!"), gone(2), line(5, "five")]


def test_a_room_remembers_the_newest_edits_only() -> None:
    joined = Joined(ROOM, "den", EPOCH, 0, 1)
    for seq in range(1, KEPT + 11):
        assert joined.revise(seq, TS, f"text {seq}") is True
    assert len(joined.edits) == KEPT and min(joined.edits) == 11
    assert joined.revise(KEPT + 10, TS, "again") is False  # known already: shown once
    assert joined.revise(KEPT + 10, TS - 1, "older") is False
    assert joined.revise(KEPT + 10, TS + 1, "newer") is True
    assert joined.mark(KEPT + 9) is True
    assert joined.revise(KEPT + 9, TS + 1, "back?") is False  # deleted stays deleted
    assert joined.accept("e2", 1)
    assert joined.edits == {}
