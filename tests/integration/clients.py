"""A python-socketio client for tests that records every server event it receives."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import socketio

WAIT = 10.0
"""The longest any test waits for an event to arrive."""

EVENTS = ("welcome", "message", "presence", "typing", "edited", "deleted", "dm", "expired")


class ChatClient:
    """A connected Socket.IO client and everything it has received, in arrival order."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        transports: list[str] | None = None,
        token: str | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.token = token
        self.transports = transports
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        for event in EVENTS:
            self.sio.on(event, self._recorder(event))

    def _recorder(self, event: str) -> Callable[[Any], None]:
        def record(data: Any) -> None:
            self.events.append((event, data))
            self._changed.set()

        return record

    async def connect(self) -> ChatClient:
        await self.sio.connect(
            self.url,
            socketio_path="/ws/socket.io",
            auth={"name": self.name, **({} if self.token is None else {"token": self.token})},
            transports=self.transports,
            wait_timeout=WAIT,
        )
        await self.wait_for(lambda: self.of("welcome"))
        return self

    @property
    def user(self) -> dict[str, Any]:
        return self.of("welcome")[0]["user"]

    async def call(self, event: str, data: Any = None) -> Any:
        if data is None:
            return await self.sio.call(event, timeout=WAIT)
        return await self.sio.call(event, data, timeout=WAIT)

    async def ok(self, event: str, data: Any = None) -> dict[str, Any]:
        reply = await self.call(event, data)
        assert reply["ok"] is True, reply
        return reply

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def messages(self, room: int | None = None) -> list[dict[str, Any]]:
        return [m for m in self.of("message") if room is None or m["room"] == room]

    def texts(self, room: int | None = None) -> list[str]:
        return [m["text"] for m in self.messages(room)]

    async def wait_for(self, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Wait until ``condition()`` is truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.name}: condition not met within {timeout}s; got {self.events[-5:]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_messages(self, room: int, count: int, timeout: float = WAIT) -> list[str]:
        await self.wait_for(lambda: len(self.messages(room)) >= count, timeout)
        return self.texts(room)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


async def eventually(condition: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Wait until ``condition()`` is truthy, checking every 10 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return result


def scrape(url: str) -> dict[str, float]:
    """Every sample of a server's /metrics, keyed by its name and labels as written."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = re.findall(r"^(roomcast_\S+) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in samples}


def told(client: ChatClient, joined: dict[str, Any]) -> list[str]:
    """The names of the members a client knows of in a room: its join reply's, then the
    room's presence events since (as a client keeps its member list)."""
    names = {m["id"]: m["name"] for m in joined["members"]}
    for event in client.of("presence"):
        if event["room"] == joined["room"]["id"]:
            if event["event"] == "join":
                names[event["user"]["id"]] = event["user"]["name"]
            else:
                names.pop(event["user"]["id"], None)
    return sorted(names.values())
