"""The chat page in headless Chromium against a real ``roomcast serve`` process.

Uses the system Chromium (/usr/bin/chromium, Debian's package); no browser is downloaded.
Without it the tests are skipped, except on CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import (
    Browser,
    Dialog,
    Locator,
    Page,
    Route,
    WebSocketRoute,
    async_playwright,
    expect,
)

from roomcast.core.auth import Authenticator
from tests import services

from .clients import ChatClient
from .servers import Server, every_workers_metrics, metric_total, run_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "img" / "chat.png"
"""Written by the chat test when ROOMCAST_SCREENSHOT=1; a plain run leaves the docs alone."""
VENDOR_JS = ROOT / "src" / "roomcast" / "web" / "vendor" / "socket.io.min.js"
SOCKETIO_URL = re.compile(r".*/ws/socket\.io/.*")
SECRET = "the browser tests' auth secret, 32 characters or more"


def _require_browser() -> None:
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    if not VENDOR_JS.exists():
        problems.append(f"{VENDOR_JS.relative_to(ROOT)} is missing (bash scripts/build-web.sh)")
    if problems:
        reason = "browser test needs: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[Server]:
    """A fresh server per test, its history in tmp_path.

    Its log is printed at teardown; pytest shows that output only when the test failed.
    """
    _require_browser()
    with run_server(store_url=f"sqlite:///{tmp_path}/t.db", log_dir=tmp_path) as server:
        yield server
        print(f"---- roomcast server log ({server.log}) ----\n{server.output()}")


@dataclass
class Chat:
    """One user's chat page, with everything it reported that a test must not ignore."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    """URLs of the WebSockets the page opened."""


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[Server]:
    """As chat_server, checking tokens signed with SECRET."""
    _require_browser()
    with run_server(
        store_url=f"sqlite:///{tmp_path}/t.db",
        log_dir=tmp_path,
        env={"ROOMCAST_AUTH_SECRET": SECRET},
    ) as server:
        yield server
        print(f"---- roomcast server log ({server.log}) ----\n{server.output()}")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    _require_browser()
    expect.set_options(timeout=TIMEOUT_MS)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_chat(browser: Browser) -> Chat:
    """A page in a new browser context (own storage, own connection), not yet loaded."""
    context = await browser.new_context(viewport={"width": 1200, "height": 720})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    chat = Chat(page)

    async def on_dialog(dialog: Dialog) -> None:
        chat.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: chat.errors.append(str(exc)))
    page.on("websocket", lambda ws: chat.sockets.append(ws.url))
    return chat


async def open_chat(
    browser: Browser,
    url: str,
    name: str,
    *,
    before_load: Callable[[Page], Awaitable[None]] | None = None,
) -> Chat:
    """A new page connected as name."""
    chat = await new_chat(browser)
    page = chat.page
    if before_load is not None:
        await before_load(page)
    await page.goto(url + "/")
    await page.locator("#nickname").fill(name)
    await page.locator("#connect").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    return chat


async def open_with_token(browser: Browser, url: str, token: str) -> Chat:
    """A new page opened as an application links to it: /#token=TOKEN."""
    chat = await new_chat(browser)
    await chat.page.goto(f"{url}/#token={token}")
    return chat


async def join(chat: Chat, room: str) -> None:
    page = chat.page
    await page.locator("#room-name").fill(room)
    await page.locator("#room-name").press("Enter")
    tab = page.locator(f'#joined .joined-room[data-room-name="{room}"]')
    await expect(tab).to_have_class(re.compile(r"\bactive\b"))
    await expect(page.locator("#room-title")).to_have_text(room)
    await expect(page.locator("#text")).to_be_enabled()


async def say(chat: Chat, text: str) -> None:
    """Type text and press Enter; the input is cleared and keeps the focus."""
    box = chat.page.locator("#text")
    await box.fill(text)
    await box.press("Enter")
    await expect(box).to_have_value("")
    await expect(box).to_be_focused()


async def seqs(chat: Chat) -> list[int]:
    values = await chat.page.locator("#messages .message").evaluate_all(
        "nodes => nodes.map(n => Number(n.dataset.seq))"
    )
    return [int(v) for v in values]


async def test_a_room_typed_while_the_last_one_loads_its_history_is_joined(
    browser: Browser, chat_server: Server
) -> None:
    # alice's history requests are held back until the test lets them through.
    held: list[str | bytes] = []
    holding = {"on": True}
    to_server: list[WebSocketRoute] = []
    both_held = asyncio.Event()

    async def route_websocket(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        to_server.append(server)

        def from_page(message: str | bytes) -> None:
            if holding["on"] and isinstance(message, str) and '"history"' in message:
                held.append(message)
                if len(held) == 2:
                    both_held.set()
            else:
                server.send(message)

        ws.on_message(from_page)

    async def intercept(page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, route_websocket)

    alice = await open_chat(browser, chat_server.url, "alice", before_load=intercept)
    await join(alice, "random")
    edge = alice.page.locator("#messages .history-edge")
    await expect(edge).to_have_text("Loading…")  # random's history is on its way

    # The next room, typed and submitted meanwhile, is joined, and what was typed stays
    # until it is.
    await join(alice, "lobby")
    await expect(alice.page.locator("#room-name")).to_have_value("")
    # The route sees lobby's history request a moment after the page sends it.
    await asyncio.wait_for(both_held.wait(), TIMEOUT_MS / 1000)
    assert len(held) == 2, held  # the history of random, then of lobby

    holding["on"] = False
    for message in held:
        to_server[-1].send(message)
    await expect(edge).to_have_text("No messages in lobby yet. Say hello!")
    await alice.page.locator('#joined .joined-room[data-room-name="random"]').click()
    await expect(edge).to_have_text("No messages in random yet. Say hello!")
    assert alice.dialogs == [], alice.dialogs
    assert alice.errors == [], alice.errors


async def test_two_users_chat_in_a_room(browser: Browser, chat_server: Server) -> None:
    url = chat_server.url
    alice = await open_chat(browser, url, "alice")
    bob = await open_chat(browser, url, "bob")

    # alice is in two rooms, lobby active; bob joins lobby.
    await join(alice, "random")
    await join(alice, "lobby")
    await join(bob, "lobby")

    # Members: each sees the other (bob from the join reply, alice from a presence event).
    await expect(bob.page.locator("#members .member", has_text="alice")).to_have_count(1)
    await expect(bob.page.locator("#members .member")).to_have_count(2)
    await expect(alice.page.locator("#members .member", has_text="bob")).to_have_count(1)

    # Messages, in the same order on both pages.
    await say(alice, "hello bob")
    await expect(bob.page.locator("#messages .message .text")).to_have_text(["hello bob"])
    await say(bob, "hi alice")
    for chat in (alice, bob):
        await expect(chat.page.locator("#messages .message .text")).to_have_text(
            ["hello bob", "hi alice"]
        )
        await expect(chat.page.locator("#messages .message .author")).to_have_text(["alice", "bob"])
    assert await seqs(alice) == await seqs(bob)
    assert await seqs(bob) == sorted(set(await seqs(bob)))

    # Shift+Enter is a newline, Enter sends.
    box = bob.page.locator("#text")
    await box.press_sequentially("two")
    await box.press("Shift+Enter")
    await box.press_sequentially("lines")
    await expect(box).to_have_value("two\nlines")
    await box.press("Enter")
    await expect(alice.page.locator("#messages .message .text").last).to_have_text("two\nlines")

    # Typing indicator: bob sees alice typing (and alice does not see herself).
    await alice.page.locator("#text").press_sequentially("typ")
    await expect(bob.page.locator("#typing")).to_have_text("alice is typing…")
    await expect(alice.page.locator("#typing")).to_have_text("")
    await alice.page.locator("#text").fill("")

    # User text is text, never markup.
    payload = "<img src=x onerror=alert(1)>"
    await say(alice, payload)
    last = bob.page.locator("#messages .message .text").last
    await expect(last).to_have_text(payload)
    assert await last.text_content() == payload
    await expect(bob.page.locator("#messages img")).to_have_count(0)
    await expect(alice.page.locator("#messages img")).to_have_count(0)
    await expect(bob.page.locator("#typing")).to_have_text("")  # her message ended her typing

    # The room list shows both rooms with their member counts (refreshed by itself).
    lobby = bob.page.locator('#rooms .room[data-room-name="lobby"]')
    await expect(lobby).to_have_attribute("data-members", "2")
    await expect(lobby.locator(".count")).to_have_text("2")
    await expect(bob.page.locator('#rooms .room[data-room-name="random"]')).to_have_attribute(
        "data-members", "1"
    )

    await expect(bob.page.locator("#status")).to_have_text("connected")
    if os.environ.get("ROOMCAST_SCREENSHOT") == "1":  # refreshes the picture in the docs
        await bob.page.screenshot(path=str(SCREENSHOT))

    for chat in (alice, bob):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors
        # The page starts its session on a WebSocket (no long-polling first, no upgrade).
        assert len(chat.sockets) == 1, chat.sockets
        assert "transport=websocket" in chat.sockets[0] and "sid=" not in chat.sockets[0]


async def test_reconnect_recovers_missed_messages(browser: Browser, chat_server: Server) -> None:
    """bob's connection drops; alice talks meanwhile; bob reconnects and has every message once."""
    url = chat_server.url
    outage = {"on": False}
    # bob's WebSocket connections: (page side, server side)
    sockets: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    async def route_websocket(ws: WebSocketRoute) -> None:
        if outage["on"]:
            await ws.close()
            return
        sockets.append((ws, ws.connect_to_server()))

    async def block_polling(route: Route) -> None:
        if outage["on"]:
            await route.abort()
        else:
            await route.continue_()

    async def intercept(page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, route_websocket)
        await page.route(SOCKETIO_URL, block_polling)

    alice = await open_chat(browser, url, "alice")
    bob = await open_chat(browser, url, "bob", before_load=intercept)
    await join(alice, "lobby")
    await join(bob, "lobby")
    for i in range(3):
        await say(alice, f"before {i}")
    await expect(bob.page.locator("#messages .message")).to_have_count(3)

    # The connection drops: both ends of bob's WebSocket close, new attempts fail.
    outage["on"] = True
    for page_side, server_side in sockets:
        await server_side.close()
        await page_side.close()
    await expect(bob.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    await expect(alice.page.locator("#members .member", has_text="bob")).to_have_count(0)

    for i in range(4):
        await say(alice, f"missed {i}")
    await expect(alice.page.locator("#messages .message")).to_have_count(7)

    # The network is back: bob re-joins with since={epoch, seq} and gets exactly what he missed.
    outage["on"] = False
    await expect(bob.page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=20_000
    )
    await expect(alice.page.locator("#members .member", has_text="bob")).to_have_count(1)
    expected = [f"before {i}" for i in range(3)] + [f"missed {i}" for i in range(4)]
    await expect(bob.page.locator("#messages .message .text")).to_have_text(expected)

    await say(alice, "after")
    await expect(bob.page.locator("#messages .message .text")).to_have_text([*expected, "after"])
    bob_seqs = await seqs(bob)
    assert bob_seqs == await seqs(alice)
    assert bob_seqs == list(range(bob_seqs[0], bob_seqs[0] + len(bob_seqs))), bob_seqs

    for chat in (alice, bob):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


class SendTap:
    """Routes a page's Socket.IO WebSocket through the test: records every ``send`` the
    page makes and, while ``answers`` says so, keeps the answers to them from the page —
    ``"lose"``: the next one is dropped with its connection; ``"hold"``: none arrives."""

    def __init__(self) -> None:
        self.sends: list[str] = []
        self.sockets = 0
        self.answers: str | None = None

    async def install(self, page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, self._route)

    async def _route(self, ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        self.sockets += 1

        def to_server(message: str | bytes) -> None:
            if isinstance(message, str) and '["send",' in message:
                self.sends.append(message)
            server.send(message)

        async def to_page(message: str | bytes) -> None:
            # A Socket.IO answer over Engine.IO ("43" + ack id) to a send.
            answer = isinstance(message, str) and message.startswith("43")
            if self.answers and answer and '"message":' in str(message):
                if self.answers == "lose":
                    self.answers = None
                    await server.close()
                    await ws.close()
                return
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    async def sent_again(self) -> None:
        """Wait for the page's second try of its send; it carries the first's payload."""
        for _ in range(200):
            if len(self.sends) == 2:
                break
            await asyncio.sleep(0.05)
        sends = self.sends
        assert len(sends) == 2 and sends[0].split(",", 1)[1] == sends[1].split(",", 1)[1], sends
        assert '"id":"' in sends[0]


async def lobby_with_a_tap(browser: Browser, url: str, tap: SendTap) -> tuple[Chat, Chat]:
    """alice, and bob whose page goes through ``tap``, in the lobby with one message."""
    alice = await open_chat(browser, url, "alice")
    bob = await open_chat(browser, url, "bob", before_load=tap.install)
    await join(alice, "lobby")
    await join(bob, "lobby")
    await say(alice, "before")
    await expect(bob.page.locator("#messages .message")).to_have_count(1)
    return alice, bob


async def shown_and_stored_once(url: str, alice: Chat, bob: Chat) -> None:
    """alice says "after": both pages and the room's history hold bob's message once."""
    await say(alice, "after")
    expected = ["before", "did this go?", "after"]
    for chat in (alice, bob):
        await expect(chat.page.locator("#messages .message .text")).to_have_text(expected)
    client = await ChatClient(url, "carol").connect()
    try:
        history = (await client.ok("history", {"room": "lobby"}))["messages"]
    finally:
        await client.close()
    assert [m["text"] for m in history] == expected
    for chat in (alice, bob):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


async def test_a_send_whose_answer_was_lost_is_sent_again_and_shown_once(
    browser: Browser, chat_server: Server
) -> None:
    """bob's connection drops after the server stored his message and before its answer
    reached him: the page sends it again, with the same id, once it is back; the room has
    it once, and his text is not handed back to him as unsent."""
    tap = SendTap()
    alice, bob = await lobby_with_a_tap(browser, chat_server.url, tap)
    tap.answers = "lose"
    await say(bob, "did this go?")
    await expect(bob.page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=20_000
    )
    await expect(bob.page.locator("#notice")).to_have_text(re.compile("sending the message again"))
    await tap.sent_again()  # a second after the answer was lost
    assert tap.sockets == 2  # the answer was lost with the first connection
    await shown_and_stored_once(chat_server.url, alice, bob)
    await expect(bob.page.locator("#text")).to_have_value("")  # not handed back as unsent
    assert await seqs(alice) == await seqs(bob) == [1, 2, 3]


async def test_a_send_not_confirmed_before_a_reload_is_sent_again_once(
    browser: Browser, chat_server: Server
) -> None:
    """bob's message is stored but its answer never comes, and he reloads the page: the
    reloaded page sends it again with the same id once it is back in the room; the room
    has it once."""
    tap = SendTap()
    alice, bob = await lobby_with_a_tap(browser, chat_server.url, tap)
    tap.answers = "hold"
    await say(bob, "did this go?")
    await expect(alice.page.locator("#messages .message .text")).to_have_text(
        ["before", "did this go?"]
    )  # stored and delivered; bob's page has no answer
    assert len(tap.sends) == 1
    kept = await bob.page.evaluate("sessionStorage.getItem('roomcast.unsent')")
    assert "did this go?" in kept
    tap.answers = None
    await bob.page.reload()
    await expect(bob.page.locator("#status")).to_have_attribute("data-state", "connected")
    await tap.sent_again()  # once the reloaded page is back in the room
    await shown_and_stored_once(chat_server.url, alice, bob)
    assert await bob.page.evaluate("sessionStorage.getItem('roomcast.unsent')") == "[]"


async def test_a_page_opened_with_a_token_chats_under_the_tokens_name(
    browser: Browser, auth_server: Server
) -> None:
    tokens = Authenticator(SECRET)
    ada_token = tokens.mint("u-ada", ttl=600, name="Ada Lovelace")
    ada = await open_with_token(browser, auth_server.url, ada_token)
    bob = await open_with_token(browser, auth_server.url, tokens.mint("u-bob", ttl=600, name="Bob"))
    for chat, name in ((ada, "Ada Lovelace"), (bob, "Bob")):
        page = chat.page
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#whoami")).to_have_text(name)  # the server's, not asked for
        await expect(page.locator("#nickname")).to_be_hidden()
    # The token is out of the address bar (and the tab's history entry) once read.
    href = await ada.page.evaluate("location.href")
    assert ada_token not in href and "token" not in href, href

    await join(ada, "salon")
    await join(bob, "salon")
    await say(ada, "hello from the page")
    for chat in (ada, bob):
        await expect(chat.page.locator("#messages .message .author")).to_have_text(["Ada Lovelace"])
        await expect(chat.page.locator("#messages .message .text")).to_have_text(
            ["hello from the page"]
        )
    await expect(bob.page.locator("#members .member")).to_have_text(["Ada Lovelace", "Bob"])

    # A reload (no token in the address any more) signs in again with this tab's token.
    await ada.page.reload()
    await expect(ada.page.locator("#whoami")).to_have_text("Ada Lovelace")
    await expect(ada.page.locator("#messages .message .author")).to_have_text(["Ada Lovelace"])
    await say(ada, "back")
    await expect(bob.page.locator("#messages .message .text")).to_have_text(
        ["hello from the page", "back"]
    )
    assert "token" not in await ada.page.evaluate("location.href")
    for chat in (ada, bob):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


@pytest.mark.parametrize("how", ["expired token", "nickname"])
async def test_a_page_the_server_does_not_let_in_says_so_and_stops(
    how: str, browser: Browser, auth_server: Server
) -> None:
    """Refused as unauthorized, the page says why where it stays in view, and does not try
    again (socket.io does not retry a refused connect)."""
    if how == "nickname":
        chat = await new_chat(browser)
        await chat.page.goto(auth_server.url + "/")
        await chat.page.locator("#nickname").fill("eve")
        await chat.page.locator("#connect").click()
        why = "a token is required"
    else:
        expired = Authenticator(SECRET).mint("u-eve", ttl=60, now=time.time() - 3600)
        chat = await open_with_token(browser, auth_server.url, expired)
        why = "the token has expired"
    page = chat.page
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    await expect(page.locator("#status")).to_have_text("not signed in")
    await expect(page.locator("#notice")).to_be_visible()
    await expect(page.locator("#notice")).to_contain_text(f"Not signed in: {why}.")
    await expect(page.locator("#messages .placeholder")).to_contain_text(f"Not signed in: {why}.")
    await expect(page.locator("#text")).to_be_disabled()
    assert len(chat.sockets) == 1, chat.sockets
    assert chat.errors == [], chat.errors


def message_row(chat: Chat, text: str) -> Locator:
    """The row of the message whose text is ``text``."""
    return chat.page.locator("#messages .message").filter(
        has=chat.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$"))
    )


async def test_a_sender_deletes_a_message_and_every_page_shows_it_deleted(
    browser: Browser, chat_server: Server
) -> None:
    url = chat_server.url
    alice = await open_chat(browser, url, "alice")
    bob = await open_chat(browser, url, "bob")
    await join(alice, "lobby")
    await join(bob, "lobby")
    await say(alice, "oops, wrong room")
    await say(bob, "hi alice")
    for chat in (alice, bob):
        await expect(chat.page.locator("#messages .message .text")).to_have_text(
            ["oops, wrong room", "hi alice"]
        )

    # A control on one's own messages only, out of sight until the pointer is over them.
    control = message_row(alice, "oops, wrong room").get_by_role("button", name="Delete message")
    await expect(message_row(alice, "hi alice").get_by_role("button")).to_have_count(0)
    await expect(message_row(bob, "oops, wrong room").get_by_role("button")).to_have_count(0)
    await expect(control).to_have_css("opacity", "0")
    await message_row(alice, "oops, wrong room").hover()
    await expect(control).to_have_css("opacity", "1")
    await control.click()

    # On both pages: in its place, with its sender, without its text and without the control.
    for chat in (alice, bob):
        rows = chat.page.locator("#messages .message")
        await expect(rows.locator(".text")).to_have_text(["message deleted", "hi alice"])
        await expect(rows.locator(".author")).to_have_text(["alice", "bob"])
        await expect(rows.first).to_have_class(re.compile(r"\bdeleted\b"))
        await expect(rows.first.get_by_role("button")).to_have_count(0)
        await expect(chat.page.locator("#messages")).not_to_contain_text("oops")
    assert await seqs(alice) == await seqs(bob) == [1, 2]

    # The control is reached with the keyboard too: from the message log, Tab (past the
    # message's Edit control), Enter.
    await say(alice, "second thought")
    await expect(bob.page.locator("#messages .message .text").last).to_have_text("second thought")
    second = message_row(alice, "second thought").get_by_role("button", name="Delete message")
    await alice.page.locator("#messages").focus()
    await alice.page.keyboard.press("Tab")
    await expect(
        message_row(alice, "second thought").get_by_role("button", name="Edit message")
    ).to_be_focused()
    await alice.page.keyboard.press("Tab")
    await expect(second).to_be_focused()
    await expect(second).to_have_css("opacity", "1")
    await alice.page.keyboard.press("Enter")
    expected = ["message deleted", "hi alice", "message deleted"]
    for chat in (alice, bob):
        await expect(chat.page.locator("#messages .message .text")).to_have_text(expected)
    await expect(alice.page.locator("#text")).to_be_focused()  # the keyboard stays in the chat

    # A page that comes afterwards reads them deleted in the room's history.
    carol = await open_chat(browser, url, "carol")
    await join(carol, "lobby")
    rows = carol.page.locator("#messages .message")
    await expect(rows.locator(".text")).to_have_text(expected)
    await expect(rows.locator(".author")).to_have_text(["alice", "bob", "alice"])
    await expect(carol.page.locator("#messages .message.deleted")).to_have_count(2)
    await expect(carol.page.locator("#messages")).not_to_contain_text("oops")
    await expect(carol.page.locator("#messages")).not_to_contain_text("second thought")
    await expect(carol.page.locator("#messages .message button")).to_have_count(0)

    for chat in (alice, bob, carol):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


async def test_a_delete_the_server_refuses_is_said_and_the_message_stays(
    browser: Browser, tmp_path: Path
) -> None:
    """The room keeps only its newest message: the older one, still on alice's page, is
    no longer stored, and deleting it is answered not_found."""
    args = ("--history-max-messages", "1", "--history-trim-interval", "0.2")
    with run_server(*args, store_url=f"sqlite:///{tmp_path}/t.db", log_dir=tmp_path) as server:
        alice = await open_chat(browser, server.url, "alice")
        await join(alice, "lobby")
        await say(alice, "first")
        await say(alice, "second")
        await expect(alice.page.locator("#messages .message .text")).to_have_text(
            ["first", "second"]
        )
        reader = await ChatClient(server.url, "reader").connect()
        try:
            for _ in range(100):  # the retention pass runs every 0.2 s
                history = (await reader.ok("history", {"room": "lobby"}))["messages"]
                if [m["text"] for m in history] == ["second"]:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the first message was never trimmed: {history}")
        finally:
            await reader.close()

        row = message_row(alice, "first")
        await row.hover()
        control = row.get_by_role("button", name="Delete message")
        await control.click()
        notice = alice.page.locator("#notice")
        await expect(notice).to_be_visible()
        await expect(notice).to_have_text(
            "Could not delete the message: room 'lobby' holds no message 1 (any more)"
        )
        await expect(alice.page.locator("#messages .message .text")).to_have_text(
            ["first", "second"]
        )
        await expect(control).to_be_enabled()  # to try again
        assert alice.dialogs == [], alice.dialogs
        assert alice.errors == [], alice.errors


async def test_a_deletion_told_before_its_message_shows_the_message_deleted(
    browser: Browser, chat_server: Server
) -> None:
    """Two nodes can tell a page of a deletion before the message itself: bob's page gets
    alice's deleted event first (the test holds her message back), then the message."""
    held: list[str] = []
    passed: list[str] = []
    told = asyncio.Event()

    async def route_websocket(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and message.startswith('42["message"'):
                if "soon gone" in message and not passed:
                    held.append(message)
                    told.set()
                    return
            ws.send(message)
            if isinstance(message, str) and message.startswith('42["deleted"'):
                passed.append(message)
                for late in held:
                    ws.send(late)

        server.on_message(to_page)

    async def intercept(page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, route_websocket)

    bob = await open_chat(browser, chat_server.url, "bob", before_load=intercept)
    await join(bob, "lobby")
    alice = await ChatClient(chat_server.url, "alice").connect()
    try:
        await alice.ok("join", {"room": "lobby"})
        await alice.ok("send", {"room": "lobby", "text": "before"})
        sent = (await alice.ok("send", {"room": "lobby", "text": "soon gone"}))["message"]
        await asyncio.wait_for(told.wait(), TIMEOUT_MS / 1000)
        await alice.ok("delete", {"room": "lobby", "seq": sent["seq"]})
        rows = bob.page.locator("#messages .message")
        await expect(rows.locator(".text")).to_have_text(["before", "message deleted"])
        await expect(rows.locator(".author")).to_have_text(["alice", "alice"])
        await expect(bob.page.locator("#messages")).not_to_contain_text("soon gone")
        assert len(held) == 1 and len(passed) == 1, (held, passed)
    finally:
        await alice.close()
    assert bob.dialogs == [], bob.dialogs
    assert bob.errors == [], bob.errors


def row_of(chat: Chat, seq: int) -> Locator:
    """The row of the message numbered ``seq`` (whatever its text is now)."""
    return chat.page.locator(f'#messages .message[data-seq="{seq}"]')


def texts_of(chat: Chat) -> Locator:
    return chat.page.locator("#messages .message .text")


async def edit_with_the_control(chat: Chat, seq: int, text: str) -> None:
    """Point at message ``seq``, click its Edit control, type ``text`` and press Enter."""
    row = row_of(chat, seq)
    await row.hover()
    await row.get_by_role("button", name="Edit message").click()
    box = row.get_by_role("textbox", name="Edit message")
    await box.fill(text)
    await box.press("Enter")


class EventTap:
    """Routes a page's Socket.IO WebSocket through the test: records the frames the page
    sends, keeps from the page the frames ``hold`` matches until ``release``, and sends
    the page frames of the test's own (``tell``)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.passed: list[str] = []
        self.held: list[str] = []
        self.hold: Callable[[str], bool] = lambda frame: False
        self._page: WebSocketRoute | None = None

    async def install(self, page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, self._route)

    async def _route(self, ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        self._page = ws

        def to_server(frame: str | bytes) -> None:
            if isinstance(frame, str):
                self.sent.append(frame)
            server.send(frame)

        def to_page(frame: str | bytes) -> None:
            if isinstance(frame, str) and self.hold(frame):
                self.held.append(frame)
                return
            if isinstance(frame, str):
                self.passed.append(frame)
            ws.send(frame)

        ws.on_message(to_server)
        server.on_message(to_page)

    def emitted(self, event: str) -> list[dict[str, Any]]:
        """The payloads of the ``event`` requests the page sent, in order."""
        frames = [f for f in self.sent if re.match(rf'42\d*\["{event}",', f)]
        return [json.loads(f[f.index("[") :])[1] for f in frames]

    def answers(self, frame: str, event: str) -> bool:
        """Whether ``frame`` is the server's answer to one of the page's ``event`` requests."""
        asked = (re.match(rf'42(\d+)\["{event}",', f) for f in self.sent)
        return any(frame.startswith(f"43{m.group(1)}[") for m in asked if m)

    async def until(self, condition: Callable[[], bool], why: str) -> None:
        """Wait (bounded) until ``condition`` holds of the frames seen."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{why}; held {self.held}, passed {self.passed[-5:]}")
            await asyncio.sleep(0.02)

    def release(self, which: Callable[[str], bool] = lambda frame: True) -> None:
        """Let the held frames ``which`` matches through, in the order they came, and
        hold no more of those."""
        assert self._page is not None
        holding = self.hold
        self.hold = lambda frame: holding(frame) and not which(frame)
        through = [frame for frame in self.held if which(frame)]
        self.held = [frame for frame in self.held if not which(frame)]
        for frame in through:
            self._page.send(frame)

    def tell(self, event: str, data: dict[str, Any]) -> None:
        """Send the page a server event of the test's making."""
        assert self._page is not None
        self._page.send("42" + json.dumps([event, data]))


async def test_a_sender_edits_a_message_and_every_page_shows_the_new_text(
    browser: Browser, chat_server: Server
) -> None:
    url = chat_server.url
    tap = EventTap()
    alice = await open_chat(browser, url, "alice", before_load=tap.install)
    bob = await open_chat(browser, url, "bob")
    await join(alice, "lobby")
    await join(bob, "lobby")
    await say(alice, "meet at 5pn")
    await say(bob, "ok")
    for chat in (alice, bob):
        await expect(texts_of(chat)).to_have_text(["meet at 5pn", "ok"])

    # On one's own messages only, next to Delete, out of sight until the pointer is over it.
    row = row_of(alice, 1)
    control = row.get_by_role("button", name="Edit message")
    await expect(row.get_by_role("button")).to_have_text(["Edit", "Delete"])
    await expect(row_of(alice, 2).get_by_role("button")).to_have_count(0)
    await expect(row_of(bob, 1).get_by_role("button")).to_have_count(0)
    await expect(control).to_have_css("opacity", "0")
    await row.hover()
    await expect(control).to_have_css("opacity", "1")

    # The text turns into a box holding it; Escape puts the text back, asking nothing.
    await control.click()
    box = row.get_by_role("textbox", name="Edit message")
    await expect(box).to_be_focused()
    await expect(box).to_have_value("meet at 5pn")
    await expect(row.locator(".text")).to_be_hidden()
    await box.fill("meet never")
    await box.press("Escape")
    await expect(box).to_have_count(0)
    await expect(row.locator(".text")).to_be_visible()
    await expect(texts_of(alice)).to_have_text(["meet at 5pn", "ok"])
    await expect(alice.page.locator("#messages .edited")).to_have_count(0)
    await expect(alice.page.locator("#text")).to_be_focused()

    # Enter saves: on both pages, the new text in its place, marked edited.
    await edit_with_the_control(alice, 1, "meet at 5pm")
    for chat in (alice, bob):
        await expect(texts_of(chat)).to_have_text(["meet at 5pm", "ok"])
        mark = row_of(chat, 1).locator(".edited")
        await expect(mark).to_have_text("(edited)")
        await expect(mark).to_be_visible()
        await expect(mark).to_have_attribute("title", re.compile(r"^Edited \S"))
        await expect(row_of(chat, 2).locator(".edited")).to_have_count(0)
        await expect(row_of(chat, 1).locator(".author")).to_have_text("alice")
    await expect(row.get_by_role("textbox")).to_have_count(0)
    await expect(alice.page.locator("#text")).to_be_focused()  # the keyboard stays in the chat
    await expect(row_of(bob, 1).get_by_role("button")).to_have_count(0)
    assert await seqs(alice) == await seqs(bob) == [1, 2]

    # With the keyboard: from the message log, Tab to the control, Enter, type, Enter.
    await alice.page.locator("#messages").focus()
    await alice.page.keyboard.press("Tab")
    await expect(control).to_be_focused()
    await expect(control).to_have_css("opacity", "1")
    await alice.page.keyboard.press("Enter")
    await expect(box).to_be_focused()
    await alice.page.keyboard.type(", room 2")  # after the text it holds
    await alice.page.keyboard.press("Enter")
    for chat in (alice, bob):
        await expect(texts_of(chat)).to_have_text(["meet at 5pm, room 2", "ok"])
    await expect(row_of(bob, 1).locator(".edited")).to_have_count(1)

    # A page that comes afterwards reads it edited in the room's history.
    carol = await open_chat(browser, url, "carol")
    await join(carol, "lobby")
    await expect(texts_of(carol)).to_have_text(["meet at 5pm, room 2", "ok"])
    await expect(row_of(carol, 1).locator(".edited")).to_have_text("(edited)")
    await expect(row_of(carol, 2).locator(".edited")).to_have_count(0)
    await expect(carol.page.locator("#messages button")).to_have_count(0)
    await expect(carol.page.locator("#messages")).not_to_contain_text("5pn")

    # Escape asked nothing of the server: two edits were sent, the two saved.
    sent = [(e["seq"], e["text"]) for e in tap.emitted("edit")]
    assert sent == [(1, "meet at 5pm"), (1, "meet at 5pm, room 2")], sent
    for chat in (alice, bob, carol):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


async def test_an_edit_the_server_refuses_is_said_and_the_text_stays(
    browser: Browser, chat_server: Server
) -> None:
    """alice's message is deleted through the REST API while she edits it; the deletion
    reaches her page late (the test holds it back, as a slow node would), so she saves
    an edit of a deleted message."""
    tap = EventTap()
    alice = await open_chat(browser, chat_server.url, "alice", before_load=tap.install)
    await join(alice, "lobby")
    await say(alice, "original")
    await expect(texts_of(alice)).to_have_text(["original"])

    tap.hold = lambda frame: frame.startswith('42["deleted"')
    async with httpx.AsyncClient(base_url=chat_server.url, timeout=TIMEOUT_MS / 1000) as http:
        answer = await http.delete("/api/rooms/lobby/messages/1")
    assert answer.status_code == 200, answer.text
    await tap.until(lambda: len(tap.held) == 1, "the page was not told of the deletion")

    row = row_of(alice, 1)
    await row.hover()
    control = row.get_by_role("button", name="Edit message")
    await control.click()
    box = row.get_by_role("textbox", name="Edit message")
    await box.fill("changed")
    # The answer is held too: meanwhile the control is disabled, the box not editable.
    tap.hold = lambda frame: frame.startswith('42["deleted"') or tap.answers(frame, "edit")
    await box.press("Enter")
    await tap.until(lambda: any(tap.answers(f, "edit") for f in tap.held), "no answer came")
    await expect(control).to_be_disabled()
    await expect(box).not_to_be_editable()
    tap.release(lambda frame: tap.answers(frame, "edit"))

    notice = alice.page.locator("#notice")
    await expect(notice).to_be_visible()
    refusal = "Could not edit the message: message 1 of 'lobby' was deleted"
    await expect(notice).to_have_text(refusal)
    await expect(texts_of(alice)).to_have_text(["original"])
    await expect(row.get_by_role("textbox")).to_have_count(0)
    await expect(row.locator(".edited")).to_have_count(0)
    await expect(control).to_be_enabled()

    # The deletion comes: the message shows deleted, without its controls.
    tap.release()
    await expect(texts_of(alice)).to_have_text(["message deleted"])
    await expect(row.get_by_role("button")).to_have_count(0)
    assert [e["text"] for e in tap.emitted("edit")] == ["changed"]
    assert alice.dialogs == [], alice.dialogs
    assert alice.errors == [], alice.errors


async def test_edits_told_early_or_out_of_order_show_the_newest_text(
    browser: Browser, chat_server: Server
) -> None:
    """Two nodes can tell a page of an edit before the message itself, and of two edits
    in the other order: bob's page gets alice's edit before her message (the test holds
    the message back), then an older edit (made up by the test) after the newer one, then
    an edit of a message deleted since."""
    tap = EventTap()
    bob = await open_chat(browser, chat_server.url, "bob", before_load=tap.install)
    await join(bob, "lobby")
    alice = await ChatClient(chat_server.url, "alice").connect()
    try:
        await alice.ok("join", {"room": "lobby"})
        before = (await alice.ok("send", {"room": "lobby", "text": "before"}))["message"]
        await expect(texts_of(bob)).to_have_text(["before"])
        tap.hold = lambda frame: frame.startswith('42["message"') and "draft" in frame
        sent = (await alice.ok("send", {"room": "lobby", "text": "draft"}))["message"]
        await tap.until(lambda: len(tap.held) == 1, "the message did not come")
        edit = {"room": "lobby", "seq": sent["seq"], "text": "second draft"}
        newer = (await alice.ok("edit", edit))["message"]
        await tap.until(
            lambda: any(f.startswith('42["edited"') for f in tap.passed), "no edit came"
        )
        tap.release()
        await expect(texts_of(bob)).to_have_text(["before", "second draft"])
        await expect(row_of(bob, sent["seq"]).locator(".edited")).to_have_text("(edited)")

        # An earlier edit told after the later one changes nothing.
        tap.tell("edited", {**newer, "text": "first draft", "edited": newer["edited"] - 1})
        # Nor does an edit of a message deleted since.
        await alice.ok("delete", {"room": "lobby", "seq": before["seq"]})
        await expect(texts_of(bob)).to_have_text(["message deleted", "second draft"])
        tap.tell("edited", {**before, "text": "back", "edited": newer["edited"] + 1})
        await alice.ok("send", {"room": "lobby", "text": "marker"})
        await expect(texts_of(bob)).to_have_text(["message deleted", "second draft", "marker"])
        await expect(bob.page.locator("#messages .edited")).to_have_count(1)
        for gone in ("first draft", "back"):
            await expect(bob.page.locator("#messages")).not_to_contain_text(gone)
    finally:
        await alice.close()
    assert bob.dialogs == [], bob.dialogs
    assert bob.errors == [], bob.errors


async def test_a_page_back_after_a_lost_connection_shows_what_was_edited_meanwhile(
    browser: Browser, chat_server: Server
) -> None:
    """bob's connection drops; alice edits one of the messages he has and deletes
    another; bob's page, back, shows them as they are now (its join's ``changed``)."""
    url = chat_server.url
    outage = {"on": False}
    sockets: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    async def route_websocket(ws: WebSocketRoute) -> None:
        if outage["on"]:
            await ws.close()
            return
        sockets.append((ws, ws.connect_to_server()))

    async def block_polling(route: Route) -> None:
        if outage["on"]:
            await route.abort()
        else:
            await route.continue_()

    async def intercept(page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, route_websocket)
        await page.route(SOCKETIO_URL, block_polling)

    alice = await open_chat(browser, url, "alice")
    bob = await open_chat(browser, url, "bob", before_load=intercept)
    await join(alice, "lobby")
    await join(bob, "lobby")
    for text in ("one", "two", "three"):
        await say(alice, text)
    await expect(texts_of(bob)).to_have_text(["one", "two", "three"])

    outage["on"] = True
    for page_side, server_side in sockets:
        await server_side.close()
        await page_side.close()
    await expect(bob.page.locator("#status")).to_have_attribute("data-state", "reconnecting")

    await edit_with_the_control(alice, 1, "one, edited")
    await row_of(alice, 2).hover()
    await row_of(alice, 2).get_by_role("button", name="Delete message").click()
    await expect(texts_of(alice)).to_have_text(["one, edited", "message deleted", "three"])

    outage["on"] = False
    await expect(bob.page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=20_000
    )
    await expect(texts_of(bob)).to_have_text(["one, edited", "message deleted", "three"])
    await expect(row_of(bob, 1).locator(".edited")).to_have_text("(edited)")
    assert await seqs(bob) == [1, 2, 3]
    for chat in (alice, bob):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


async def test_a_moderator_deletes_another_users_message_and_every_page_shows_it_deleted(
    browser: Browser, auth_server: Server
) -> None:
    """A page whose welcome says moderator: true offers Delete (never Edit) on everyone's
    messages, read from history or come live; a plain user's page only on its own."""
    tokens = Authenticator(SECRET)
    url = auth_server.url
    ada = await open_with_token(browser, url, tokens.mint("u-ada", ttl=600, name="Ada"))
    bob = await open_with_token(browser, url, tokens.mint("u-bob", ttl=600, name="Bob"))
    await join(ada, "lobby")
    await join(bob, "lobby")
    await say(ada, "cheap watches here")
    await say(bob, "hi all")
    mod_token = tokens.mint("u-mo", ttl=600, name="Mo", moderator=True)
    mo = await open_with_token(browser, url, mod_token)
    await join(mo, "lobby")
    await say(ada, "more cheap watches")  # live, after the moderator's history
    for chat in (ada, bob, mo):
        await expect(texts_of(chat)).to_have_text(
            ["cheap watches here", "hi all", "more cheap watches"]
        )

    # The moderator: Delete on every message, Edit on none of others'.
    for seq in (1, 2, 3):
        await expect(row_of(mo, seq).get_by_role("button")).to_have_text(["Delete"])
    # A plain user: controls on its own messages only.
    for seq in (1, 3):
        await expect(row_of(bob, seq).get_by_role("button")).to_have_count(0)
        await expect(row_of(ada, seq).get_by_role("button")).to_have_text(["Edit", "Delete"])
    await expect(row_of(bob, 2).get_by_role("button")).to_have_text(["Edit", "Delete"])
    await expect(row_of(ada, 2).get_by_role("button")).to_have_count(0)

    # The moderator's own message: Edit and Delete, as anyone's own.
    await say(mo, "please stay on topic")
    await expect(row_of(mo, 4).get_by_role("button")).to_have_text(["Edit", "Delete"])
    for chat in (ada, bob):
        await expect(row_of(chat, 4).locator(".text")).to_have_text("please stay on topic")
        await expect(row_of(chat, 4).get_by_role("button")).to_have_count(0)

    await row_of(mo, 1).hover()
    await row_of(mo, 1).get_by_role("button", name="Delete message").click()
    expected = ["message deleted", "hi all", "more cheap watches", "please stay on topic"]
    for chat in (ada, bob, mo):
        await expect(texts_of(chat)).to_have_text(expected)
        await expect(row_of(chat, 1)).to_have_class(re.compile(r"\bdeleted\b"))
        await expect(row_of(chat, 1).locator(".author")).to_have_text("Ada")
        await expect(row_of(chat, 1).get_by_role("button")).to_have_count(0)
        await expect(chat.page.locator("#messages")).not_to_contain_text("cheap watches here")
    await expect(row_of(mo, 3).get_by_role("button")).to_have_text(["Delete"])

    # A reload signs in again with the tab's token: its welcome says moderator again.
    await mo.page.reload()
    await expect(texts_of(mo)).to_have_text(expected)
    await expect(row_of(mo, 1).get_by_role("button")).to_have_count(0)
    for seq in (2, 3):
        await expect(row_of(mo, seq).get_by_role("button")).to_have_text(["Delete"])
    for chat in (ada, bob, mo):
        assert chat.dialogs == [], chat.dialogs
        assert chat.errors == [], chat.errors


async def test_room_counts_follow_joins_and_leaves_without_asking_the_server(
    browser: Browser, chat_server: Server
) -> None:
    """Joins and leaves in a room the page is in move its count in the room list from the
    presence events alone: a busy room must not make every member's page ask for the list
    of rooms each time someone comes or goes."""
    asked: list[float] = []

    async def route_websocket(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            if isinstance(message, str) and '["rooms"' in message:
                asked.append(asyncio.get_running_loop().time())
            server.send(message)

        ws.on_message(to_server)

    async def intercept(page: Page) -> None:
        await page.route_web_socket(SOCKETIO_URL, route_websocket)

    bob = await open_chat(browser, chat_server.url, "bob", before_load=intercept)
    await join(bob, "lobby")
    lobby = bob.page.locator('#rooms .room[data-room-name="lobby"]')
    await expect(lobby).to_have_attribute("data-members", "1")
    visitor = await ChatClient(chat_server.url, "visitor").connect()
    try:
        loop = asyncio.get_running_loop()
        started, before = loop.time(), len(asked)
        for _ in range(6):
            await visitor.ok("join", {"room": "lobby"})
            await expect(lobby).to_have_attribute("data-members", "2")
            await visitor.ok("leave", {"room": "lobby"})
            await expect(lobby).to_have_attribute("data-members", "1")
        elapsed = loop.time() - started
    finally:
        await visitor.close()
    # Only the list's own refresh, every 5 s while the page is visible.
    assert len(asked) - before <= int(elapsed / 5) + 1, (len(asked) - before, elapsed)
    assert bob.errors == [], bob.errors


BURST_OVER_POLLING = """async ({room, n}) => {
    const s = io({path: "/ws/socket.io", transports: ["polling"], auth: {name: "poller"},
                  reconnection: false});
    await new Promise((ok, fail) => { s.once("connect", ok); s.once("connect_error", fail); });
    const call = (event, data) => s.timeout(10000).emitWithAck(event, data);
    await call("join", {room});
    // Emitted at once: the client sends what it emitted while a POST was under way in the
    // next POST, many packets in one payload.
    const replies = await Promise.all(
        Array.from({length: n}, (_, i) => call("send", {room, text: `b${i}`})));
    const history = await call("history", {room, limit: 100});
    const transport = s.io.engine.transport.name;
    s.disconnect();
    return {replies, texts: history.messages.map(m => m.text), transport};
}"""


async def test_a_burst_sent_over_long_polling_is_stored_whole(
    browser: Browser, chat_server: Server
) -> None:
    """The browser's Socket.IO client on long-polling (as behind a proxy that refuses
    WebSockets) emits 30 messages at once: it packs them into a few POSTs, most packets
    in one. Every one is acknowledged and stored, in the order it was emitted."""
    page = await (await browser.new_context()).new_page()
    await page.goto(chat_server.url + "/")
    n = 30
    result = await page.evaluate(BURST_OVER_POLLING, {"room": "poll-burst", "n": n})
    assert result["transport"] == "polling"
    assert [r["ok"] for r in result["replies"]] == [True] * n, result["replies"]
    assert [r["message"]["text"] for r in result["replies"]] == [f"b{i}" for i in range(n)]
    assert result["texts"] == [f"b{i}" for i in range(n)]


UPGRADING_CLIENT = """async ({room}) => {
    // socket.io-client's defaults: long-polling first, then the upgrade to a WebSocket.
    const s = io({path: "/ws/socket.io", auth: {name: "upgrader"}, reconnection: false});
    await new Promise((ok, fail) => { s.once("connect", ok); s.once("connect_error", fail); });
    if (s.io.engine.transport.name !== "websocket") {
        await new Promise((ok, fail) => {
            s.io.engine.once("upgrade", ok);
            setTimeout(() => fail(new Error("no upgrade within 10 s")), 10000);
        });
    }
    window.upgrader = {socket: s, received: []};
    s.on("message", m => window.upgrader.received.push(m.text));
    const call = (event, data) => s.timeout(10000).emitWithAck(event, data);
    const joined = await call("join", {room});
    const sent = await call("send", {room, text: "from the browser"});
    return {transport: s.io.engine.transport.name, joined: joined.ok, sent: sent.ok};
}"""


async def test_the_browser_clients_default_upgrade_is_served_by_roomcasts_path(
    browser: Browser, chat_server: Server
) -> None:
    """socket.io-client with its default transports connects over long-polling and
    upgrades; the upgraded session is served by roomcast's own WebSocket path, and chat
    works both ways through it until the page disconnects."""
    watcher = ChatClient(chat_server.url, "upgrade-watcher", transports=["websocket"])
    await watcher.connect()
    try:
        room = (await watcher.ok("join", {"room": "browser-upgrade"}))["room"]["id"]
        page = await (await browser.new_context()).new_page()
        await page.goto(chat_server.url + "/")
        result = await page.evaluate(UPGRADING_CLIENT, {"room": "browser-upgrade"})
        assert result == {"transport": "websocket", "joined": True, "sent": True}
        assert await watcher.wait_messages(room, 1) == ["from the browser"]
        assert _metric(chat_server.url, "roomcast_socketio_upgrades_total") == 1
        await watcher.ok("send", {"room": room, "text": "to the browser"})
        await page.wait_for_function(
            "window.upgrader.received.includes('to the browser')", timeout=10_000
        )
        await page.evaluate("window.upgrader.socket.disconnect()")
        await watcher.wait_for(
            lambda: any(
                p["event"] == "leave" and p["user"]["name"] == "upgrader"
                for p in watcher.of("presence")
            )
        )
    finally:
        await watcher.close()


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


async def test_browsers_upgrading_on_any_worker_are_served_by_their_sessions_owner(
    tmp_path: Path,
) -> None:
    """Two workers on one port, pages on the default transports: a page's polling
    requests and its WebSocket each reach either worker. Every page upgrades and chats,
    and every upgrade is served by roomcast's own path at the session's owner, whether
    the worker that accepted the WebSocket handed its connection over or not."""
    _require_browser()
    services.require("Redis", services.REDIS_HOST, services.REDIS_PORT)
    redis_url = f"{services.REDIS_URL}/0?prefix=b{uuid.uuid4().hex[:10]}"
    pages = 8
    with run_server(
        "--workers",
        "2",
        "--broker-url",
        redis_url,
        store_url=f"sqlite:///{tmp_path}/t.db",
        log_dir=tmp_path,
    ) as srv:
        watcher = ChatClient(srv.url, "workers-watcher", transports=["websocket"])
        await watcher.connect()
        try:
            room = (await watcher.ok("join", {"room": "across-workers"}))["room"]["id"]
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                try:
                    for _ in range(pages):
                        page = await (await browser.new_context()).new_page()
                        await page.goto(srv.url + "/")
                        result = await page.evaluate(UPGRADING_CLIENT, {"room": "across-workers"})
                        assert result == {"transport": "websocket", "joined": True, "sent": True}
                    texts = await watcher.wait_messages(room, pages)
                    assert texts == ["from the browser"] * pages
                finally:
                    await browser.close()
        finally:
            await watcher.close()
        metrics = every_workers_metrics(srv.url, 2)
        assert metric_total(metrics, "roomcast_socketio_upgrades_total") == pages
        sent = metric_total(metrics, "roomcast_worker_handoffs_total", direction="sent")
        assert sent == metric_total(metrics, "roomcast_worker_handoffs_total", direction="taken")
