"""``roomcast chat`` in real pseudo-terminals against a real ``roomcast serve``.

Each client is the real command in its own pty (pexpect); a test types into it and reads
its screen. Every read is an ``expect`` with a bounded timeout.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import socketio

from roomcast.chat.commands import Command, UsageError, Verb, parse
from roomcast.core.auth import Authenticator

from .servers import Server, free_port, run_server, start_server

WAIT = 15.0
"""The longest any screen is waited for."""

SECRET = "the chat tests' auth secret, 32 characters or more"
OTHER_SECRET = "another auth secret, 32 characters or more, too"

_rooms = itertools.count()


def room_name(label: str) -> str:
    return f"{label}-{next(_rooms)}"


class Terminal:
    """One ``roomcast chat`` process in a 40x120 pseudo-terminal."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        env = {
            **{k: v for k, v in os.environ.items() if k != "ROOMCAST_TOKEN"},
            "TERM": "xterm-256color",
            # Nothing answers cursor position requests in a bare pty.
            "PROMPT_TOOLKIT_NO_CPR": "1",
            **(env or {}),
        }
        command = ["-m", "roomcast", "chat", "--name", name, *args]
        self.child = pexpect.spawn(
            sys.executable,
            command,
            env=env,
            dimensions=(40, 120),
            encoding="utf-8",
            codec_errors="replace",
            timeout=WAIT,
        )
        self.screen: list[str] = []
        self.child.logfile_read = _Recorder(self.screen)

    def ready(self) -> None:
        self.sees("/? lists the commands")

    def type(self, text: str) -> None:
        """Type ``text`` and press Enter."""
        self.child.send(text + "\r")

    def sees(self, text: str) -> None:
        """Wait until ``text`` appears on the screen."""
        self.sees_re(re.escape(text))

    def sees_re(self, pattern: str) -> re.Match[str]:
        try:
            self.child.expect(pattern, timeout=WAIT)
        except (pexpect.TIMEOUT, pexpect.EOF):
            pytest.fail(f"{self.name} did not show {pattern!r}; the screen:\n{self.text()}")
        match = self.child.match
        assert isinstance(match, re.Match)
        return match

    def since_last(self) -> str:
        """What appeared before the text the last ``sees`` waited for."""
        return str(self.child.before)

    def exits(self) -> int | None:
        """Wait for the process to end; its exit code."""
        try:
            self.child.expect(pexpect.EOF, timeout=WAIT)
        except pexpect.TIMEOUT:
            pytest.fail(f"{self.name} did not exit; the screen:\n{self.text()}")
        self.child.close()
        assert "Traceback" not in self.text(), self.text()
        return self.child.exitstatus

    def text(self) -> str:
        # Without escape sequences, for failure messages.
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", "".join(self.screen))

    def close(self) -> None:
        if self.child.isalive():
            os.kill(self.child.pid, signal.SIGCONT)
            self.child.terminate(force=True)


class _Recorder:
    """A pexpect log that keeps everything the terminal showed."""

    def __init__(self, out: list[str]) -> None:
        self.out = out

    def write(self, data: str) -> None:
        self.out.append(data)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(log_dir=tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """Terminals started by a test; any still running afterwards are killed."""
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.close()


def chat(
    terminals: list[Terminal], name: str, *args: str, env: dict[str, str] | None = None
) -> Terminal:
    terminal = Terminal(name, *args, env=env)
    terminals.append(terminal)
    terminal.ready()
    return terminal


def test_two_users_chat_in_a_room(server: Server, terminals: list[Terminal]) -> None:
    room = room_name("kitchen")
    alice = chat(terminals, "alice", "--url", server.url)
    bob = chat(terminals, "bob", "--url", server.url)

    alice.type(f"/make {room}")
    alice.sees(f"you are in [{room}], 1 member: alice")
    bob.type("/list")
    room_id = bob.sees_re(rf"#(\d+)\s+{room}\s+\(1 member\)").group(1)
    bob.type(f"/join {room_id}")
    bob.sees(f"you are in [{room}], 2 members: alice, bob")
    alice.sees(f"* bob joined [{room}]")

    alice.type("hello bob")
    bob.sees(f"[{room}] alice: hello bob")
    bob.type("hi alice")
    alice.sees(f"[{room}] bob: hi alice")

    # A message arriving while a line is half typed leaves the line intact.
    alice.child.send("half")
    bob.type("interrupting")
    alice.sees(f"[{room}] bob: interrupting")
    alice.type(" done")
    bob.sees(f"[{room}] alice: half done")

    alice.type("/user")
    alice.sees(f"[{room}] has 2 members: alice, bob")
    bob.type("/all in the lobby")
    alice.sees("[lobby] bob: in the lobby")

    bob.type("/leave")
    bob.sees(f"left [{room}]")
    alice.sees(f"* bob left [{room}]")
    alice.type("/user")
    alice.sees(f"[{room}] has 1 member: alice")

    alice.type("/quit")
    bob.type("/quit")
    assert alice.exits() == 0
    assert bob.exits() == 0


def test_history_rooms_and_a_new_name(server: Server, terminals: list[Terminal]) -> None:
    room = room_name("archive")
    alice = chat(terminals, "alice", "--url", server.url, "--room", room)
    for i in range(1, 6):
        alice.type(f"note {i}")
    alice.sees(f"[{room}] alice: note 5")
    bob = Terminal("bob", "--url", server.url, "--room", room)
    terminals.append(bob)
    bob.sees(f"you are in [{room}], 2 members: alice, bob; 5 earlier messages (/history)")
    bob.ready()
    bob.type("/history 3")
    bob.sees_re(rf"\[{room}\] alice: note 3.*\[{room}\] alice: note 4.*\[{room}\] alice: note 5")
    bob.type("/history")
    bob.sees_re(rf"\[{room}\] alice: note 1.*\[{room}\] alice: note 2")
    bob.type("/history")
    bob.sees(f"no older messages in [{room}]")

    bob.type("/rooms")
    bob.sees_re(rf"#\d+\s+{room}\s+\(2 members\)")
    bob.type("/name robert")
    bob.sees("you are now robert")
    alice.sees(f"* robert joined [{room}]")
    bob.type("still here")
    alice.sees(f"[{room}] robert: still here")
    bob.type("/nonsense")
    bob.sees("! usage: unknown command /nonsense")
    bob.type(f"/make {room}")
    bob.sees(f"! exists: room '{room}' exists")

    alice.child.sendcontrol("d")
    assert alice.exits() == 0
    bob.child.sendcontrol("c")
    assert bob.exits() == 0


def test_a_sender_deletes_a_message_and_everyone_sees_it_deleted(
    server: Server, terminals: list[Terminal]
) -> None:
    room = room_name("oops")
    alice = chat(terminals, "alice", "--url", server.url, "--room", room)
    bob = chat(terminals, "bob", "--url", server.url, "--room", room)
    alice.sees(f"* bob joined [{room}]")

    alice.type("the password is hunter2")
    bob.sees(f"1 [{room}] alice: the password is hunter2")  # a line starts with its number
    bob.type("saw nothing")
    alice.sees(f"2 [{room}] bob: saw nothing")

    bob.type("/delete 1")  # not his
    bob.sees("! forbidden: only the sender of a message")
    alice.type("/delete 1")
    for terminal in (alice, bob):
        terminal.sees(f"1 [{room}] alice: (message deleted)")
    alice.type("/delete x")
    alice.sees("usage: /delete N, N the number a message line starts with")
    alice.type("/delete 99")
    alice.sees(f"! not_found: room '{room}' holds no message 99")

    # A client that comes afterwards reads it deleted in the history.
    carol = Terminal("carol", "--url", server.url, "--room", room)
    terminals.append(carol)
    carol.sees(f"you are in [{room}], 3 members: alice, bob, carol; 2 earlier messages")
    carol.ready()
    carol.type("/history")
    carol.sees_re(rf"1 \d\d:\d\d \[{room}\] alice: \(message deleted\)")
    carol.sees_re(rf"2 \d\d:\d\d \[{room}\] bob: saw nothing")
    assert "hunter2" not in carol.text()

    for terminal in (alice, bob, carol):
        terminal.type("/quit")
        assert terminal.exits() == 0


def test_a_sender_edits_a_message_and_everyone_sees_the_new_text(
    server: Server, terminals: list[Terminal]
) -> None:
    room = room_name("typo")
    alice = chat(terminals, "alice", "--url", server.url, "--room", room)
    bob = chat(terminals, "bob", "--url", server.url, "--room", room)
    alice.sees(f"* bob joined [{room}]")

    alice.type("meet at 5pn")
    bob.sees(f"1 [{room}] alice: meet at 5pn")
    bob.type("ok")
    alice.sees(f"2 [{room}] bob: ok")

    bob.type("/edit 1 meet never")  # not his
    bob.sees("! forbidden: only the sender of a message may edit it")
    alice.type("/edit 1 meet at 5pm")
    for terminal in (alice, bob):
        terminal.sees(f"1 [{room}] alice: meet at 5pm (edited)")
    alice.type("/edit 1")
    alice.sees("usage: /edit N TEXT, TEXT the message's new text")
    alice.type("/edit x hi")
    alice.sees("usage: /edit N TEXT, N the number a message line starts with")
    alice.type("/edit 99 hi")
    alice.sees(f"! not_found: room '{room}' holds no message 99")

    # A client that comes afterwards reads it edited in the history, and is shown the
    # next edit of what it read.
    carol = Terminal("carol", "--url", server.url, "--room", room)
    terminals.append(carol)
    carol.sees(f"you are in [{room}], 3 members: alice, bob, carol; 2 earlier messages")
    carol.ready()
    carol.type("/history")
    carol.sees_re(rf"1 \d\d:\d\d \[{room}\] alice: meet at 5pm \(edited\)")
    carol.sees_re(rf"2 \d\d:\d\d \[{room}\] bob: ok")
    assert "5pn" not in carol.text()
    alice.type("/edit 1 meet at 6pm")
    for terminal in (alice, bob, carol):
        terminal.sees(f"1 [{room}] alice: meet at 6pm (edited)")
    for terminal in (alice, bob):  # the answer and the room's event: shown once
        assert terminal.text().count("alice: meet at 5pm (edited)") == 1, terminal.text()

    # A deleted message cannot be edited.
    alice.type("/delete 1")
    carol.sees(f"1 [{room}] alice: (message deleted)")
    alice.type("/edit 1 back again")
    alice.sees(f"! not_found: message 1 of '{room}' was deleted")

    for terminal in (alice, bob, carol):
        terminal.type("/quit")
        assert terminal.exits() == 0


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_reconnect_recovers_what_was_missed_once(
    how: str, terminals: list[Terminal], tmp_path: Path
) -> None:
    """A node restarts while alice's client is frozen; bob talks in between.

    ``stop``: the server ends the session; ``kill``: the connection just drops.
    """
    port, store = free_port(), f"sqlite:///{tmp_path}/chat.db"
    server = start_server(port=port, store_url=store, log_dir=tmp_path)
    try:
        alice = chat(terminals, "alice", "--url", server.url, "--room", "den")
        alice.type("before")
        alice.sees("[den] alice: before")

        # Frozen, alice notices nothing until the new node has bob's message stored.
        os.kill(alice.child.pid, signal.SIGSTOP)
        server.stop() if how == "stop" else server.kill()
        server = start_server(port=port, store_url=store, log_dir=tmp_path)
        with socketio.SimpleClient() as bob:
            bob.connect(server.url, socketio_path="/ws/socket.io", auth={"name": "bob"})
            assert bob.call("join", {"room": "den"}, timeout=WAIT)["ok"]
            assert bob.call("send", {"room": "den", "text": "while away"}, timeout=WAIT)["ok"]
            os.kill(alice.child.pid, signal.SIGCONT)
            alice.sees("connection lost")
            alice.sees("[den] bob: while away")
            assert bob.call("send", {"room": "den", "text": "marker"}, timeout=WAIT)["ok"]
            alice.sees("[den] bob: marker")
            assert "while away" not in alice.since_last()

        alice.type("after")
        alice.sees("[den] alice: after")
        alice.type("/quit")
        assert alice.exits() == 0
    finally:
        server.stop()


def test_a_line_typed_while_the_server_is_down_is_sent_once_it_is_back(
    terminals: list[Terminal], tmp_path: Path
) -> None:
    port, store = free_port(), f"sqlite:///{tmp_path}/chat.db"
    server = start_server(port=port, store_url=store, log_dir=tmp_path)
    try:
        alice = chat(terminals, "alice", "--url", server.url, "--room", "den")
        alice.type("before")
        alice.sees("[den] alice: before")
        server.kill()
        alice.sees("connection lost")
        alice.type("while down")
        alice.sees("not confirmed yet; sending it again")
        server = start_server(port=port, store_url=store, log_dir=tmp_path)
        alice.sees("[den] alice: while down")
        alice.type("after")
        alice.sees("[den] alice: after")
        with socketio.SimpleClient() as bob:
            bob.connect(server.url, socketio_path="/ws/socket.io", auth={"name": "bob"})
            reply = bob.call("history", {"room": "den"}, timeout=WAIT)
            assert [m["text"] for m in reply["messages"]] == ["before", "while down", "after"]
        alice.type("/quit")
        assert alice.exits() == 0
    finally:
        server.stop()


def test_a_line_typed_over_grpc_while_the_server_is_down_is_sent_once_it_is_back(
    terminals: list[Terminal], tmp_path: Path
) -> None:
    """The session is lost with the server: the client logs in again (a new number), goes
    back into its channel and sends the line typed meanwhile."""
    port, grpc_port = free_port(), free_port()
    store = f"sqlite:///{tmp_path}/chat.db"
    args = ("--grpc-port", str(grpc_port))
    server = start_server(*args, port=port, store_url=store, log_dir=tmp_path)
    try:
        alice = chat(terminals, "alice", "--grpc", "--agent", f"127.0.0.1:{grpc_port}")
        alice.type("/make")
        channel = alice.sees_re(r"you are in \[channel (\d+)\]").group(1)
        alice.type("before")
        alice.sees_re(rf"\[channel {channel}\] user \d+: before")
        server.kill()
        alice.sees("connection lost")
        alice.type("while down")
        alice.sees("not confirmed yet; sending it again")
        server = start_server(*args, port=port, store_url=store, log_dir=tmp_path)
        alice.sees("logged in again")
        alice.sees_re(rf"\[channel {channel}\] user \d+: while down")
        with socketio.SimpleClient() as bob:
            bob.connect(server.url, socketio_path="/ws/socket.io", auth={"name": "bob"})
            reply = bob.call("history", {"room": int(channel)}, timeout=WAIT)
            assert [m["text"] for m in reply["messages"]] == ["before", "while down"]
        alice.type("/quit")
        assert alice.exits() == 0
    finally:
        server.stop()


def test_two_users_chat_over_grpc(tmp_path: Path, terminals: list[Terminal]) -> None:
    grpc_port = free_port()
    with run_server("--grpc-port", str(grpc_port), log_dir=tmp_path) as server:
        agent = ["--grpc", "--agent", f"127.0.0.1:{grpc_port}"]
        users: dict[str, str] = {}
        for name in ("alice", "bob"):
            terminal = Terminal(name, *agent)
            terminals.append(terminal)
            users[name] = terminal.sees_re(r"logged in at \S+ as user (\d+)").group(1)
            terminal.ready()
        alice, bob = terminals
        a, b = users["alice"], users["bob"]

        alice.type("/make")
        channel = alice.sees_re(rf"you are in \[channel (\d+)\], 1 member: user {a}").group(1)
        room = f"channel {channel}"
        bob.type("/list")
        bob.sees_re(rf"#{channel}\s+{room}\s+\(1 member\)")
        bob.type(f"/join {channel}")
        bob.sees(f"you are in [{room}], 2 members: user {a}, user {b}")
        alice.sees(f"* user {b} joined [{room}]")

        alice.type("hello bob")
        bob.sees(f"[{room}] user {a}: hello bob")
        bob.type("hi alice")
        alice.sees(f"[{room}] user {b}: hi alice")
        alice.type("/user")
        alice.sees(f"[{room}] has 2 members: user {a}, user {b}")

        # The same room through the Socket.IO door: a channel is a room, its number the id.
        carol = chat(terminals, "carol", "--url", server.url)
        carol.type(f"/join {channel}")
        carol.sees_re(rf"you are in \[channel-\w+\], 3 members: carol, grpc-{a}, grpc-{b}")
        alice.sees_re(rf"\* user \d+ joined \[{room}\]")
        carol.type("from the web door")
        alice.sees_re(rf"\[{room}\] user \d+: from the web door")
        bob.sees_re(rf"\[{room}\] user \d+: from the web door")
        alice.type("seen")
        carol.sees_re(rf"\[channel-\w+\] grpc-{a}: seen")
        carol.type("/quit")
        assert carol.exits() == 0
        bob.type("/all in the lobby")
        alice.sees(f"[lobby] user {b}: in the lobby")

        bob.type("/leave")
        bob.sees(f"left [{room}]")
        alice.sees(f"* user {b} left [{room}]")

        alice.type("/quit")
        bob.type("/quit")
        assert alice.exits() == 0
        assert bob.exits() == 0


def test_unreachable_server_fails_cleanly(terminals: list[Terminal]) -> None:
    terminal = Terminal("alice", "--url", f"http://127.0.0.1:{free_port()}")
    terminals.append(terminal)
    terminal.sees("! unavailable: cannot connect")
    assert terminal.exits() == 1


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that checks tokens signed with SECRET."""
    env = {"ROOMCAST_AUTH_SECRET": SECRET}
    with run_server(env=env, log_dir=tmp_path_factory.mktemp("auth-server")) as srv:
        yield srv


def test_with_a_token_the_name_and_the_rooms_are_the_tokens(
    auth_server: Server, terminals: list[Terminal]
) -> None:
    room = room_name("team")
    tokens = Authenticator(SECRET)
    ada_token = tokens.mint("u-ada", ttl=600, name="Ada", rooms=["team-*"])
    # The token in the environment (argv is visible to other users); --name is not used.
    ada = Terminal(
        "nickname", "--url", auth_server.url, "--room", room, env={"ROOMCAST_TOKEN": ada_token}
    )
    terminals.append(ada)
    ada.sees(f"connected to {auth_server.url} as Ada")
    # Not let into the lobby, she goes on in the room her token allows.
    ada.sees("! forbidden: your token does not let you into 'lobby'")
    ada.sees(f"you are in [{room}], 1 member: Ada")
    ada.ready()
    bob_token = tokens.mint("u-bob", ttl=600, name="Bob")
    bob = chat(terminals, "bob", "--url", auth_server.url, "--token", bob_token, "--room", room)
    ada.sees(f"* Bob joined [{room}]")

    ada.type("hello Bob")
    bob.sees(f"[{room}] Ada: hello Bob")
    bob.type("hi Ada")
    ada.sees(f"[{room}] Bob: hi Ada")

    ada.type("/join secret-plans")
    ada.sees("! forbidden: your token does not let you into 'secret-plans'")
    ada.type("/name eve")
    ada.sees("! unsupported: with a token, your name is the token's")
    ada.type("/leave")
    ada.sees("! not_member: not in the lobby to go back to; /join another room")
    ada.type("still me")
    bob.sees(f"[{room}] Ada: still me")

    ada.type("/quit")
    bob.type("/quit")
    assert ada.exits() == 0
    assert bob.exits() == 0


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (None, "! unauthorized: a token is required; give one with --token or ROOMCAST_TOKEN"),
        (
            Authenticator(OTHER_SECRET).mint("eve", ttl=600),
            "! unauthorized: the token is not valid",
        ),
        (
            Authenticator(SECRET).mint("eve", ttl=60, now=time.time() - 3600),
            "! unauthorized: the token has expired",
        ),
    ],
    ids=["none", "forged", "expired"],
)
def test_a_server_that_checks_tokens_refuses_the_client_and_it_exits(
    token: str | None, says: str, auth_server: Server, terminals: list[Terminal]
) -> None:
    args = ("--token", token) if token else ()
    eve = Terminal("eve", "--url", auth_server.url, *args)
    terminals.append(eve)
    eve.sees(says)
    assert eve.exits() == 1


def test_a_client_whose_token_expires_is_told_and_exits(
    auth_server: Server, terminals: list[Terminal]
) -> None:
    # Accepted at connect (its exp 7 s past, within the 10 s leeway), ended 2-3 s later.
    lapsing = Authenticator(SECRET).mint("u-lapse", ttl=1, now=int(time.time()) - 8, name="Lapse")
    eve = Terminal("eve", "--url", auth_server.url, "--token", lapsing)
    terminals.append(eve)
    eve.sees(f"connected to {auth_server.url} as Lapse")
    eve.sees("! unauthorized: the token has expired")
    assert eve.exits() == 1


def test_over_grpc_a_token_gets_in_and_no_token_does_not(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    """Every call carries the token (the door checks each): a session with one chats in a
    channel; without one the login is refused."""
    grpc_port = free_port()
    env = {"ROOMCAST_AUTH_SECRET": SECRET}
    with run_server("--grpc-port", str(grpc_port), env=env, log_dir=tmp_path) as server:
        agent = ("--grpc", "--agent", f"127.0.0.1:{grpc_port}")
        eve = Terminal("eve", *agent)
        terminals.append(eve)
        eve.sees("! unauthenticated: an 'authorization: Bearer TOKEN' metadata entry is required")
        assert eve.exits() == 1

        token = Authenticator(SECRET).mint("u-ada", ttl=600, name="Ada")
        ada = chat(terminals, "ada", *agent, env={"ROOMCAST_TOKEN": token})
        ada.type("/make")
        channel = ada.sees_re(r"you are in \[channel (\d+)\]").group(1)
        ada.type("hello")
        ada.sees_re(rf"\[channel {channel}\] user \d+: hello")
        # The same room through the Socket.IO door, under the token's name.
        bob_token = Authenticator(SECRET).mint("u-bob", ttl=600, name="Bob")
        bob = chat(terminals, "bob", "--url", server.url, "--token", bob_token)
        bob.type(f"/join {channel}")
        bob.sees_re(r"you are in \[channel-\w+\], 2 members: Ada, Bob")
        ada.type("seen by Bob")
        bob.sees_re(r"\[channel-\w+\] Ada: seen by Bob")
        for terminal in (ada, bob):
            terminal.type("/quit")
            assert terminal.exits() == 0


@pytest.mark.parametrize("how", ["stop", "kill", "grpc"])
def test_a_reconnect_the_server_refuses_ends_the_client(
    how: str, terminals: list[Terminal], tmp_path: Path
) -> None:
    """The node comes back with another secret (as when the token expired meanwhile): the
    token cannot get in again, so the client says why and ends, not reconnecting forever.

    ``stop``: the server ends the session; ``kill``: the connection just drops; ``grpc``:
    killed under a gRPC client, whose login again is refused."""
    port, grpc_port, store = free_port(), free_port(), f"sqlite:///{tmp_path}/chat.db"

    def serve(secret: str) -> Server:
        env = {"ROOMCAST_AUTH_SECRET": secret}
        args = ("--grpc-port", str(grpc_port))
        return start_server(*args, port=port, store_url=store, log_dir=tmp_path, env=env)

    server = serve(SECRET)
    try:
        token = Authenticator(SECRET).mint("u-ada", ttl=600, name="Ada")
        if how == "grpc":
            door = ("--grpc", "--agent", f"127.0.0.1:{grpc_port}")
            refused = "! unauthenticated: the token is not valid"
        else:
            door = ("--url", server.url)
            refused = "! unauthorized: the token is not valid"
        ada = chat(terminals, "ada", *door, env={"ROOMCAST_TOKEN": token})
        ada.type("before")
        ada.sees_re(r"\[lobby\] (Ada|user \d+): before")
        server.stop() if how == "stop" else server.kill()
        ada.sees("connection lost")
        server = serve(OTHER_SECRET)
        ada.sees(refused)
        assert ada.exits() == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello", Command(Verb.SAY, "hello")),
        ("//not a command", Command(Verb.SAY, "/not a command")),
        ("   ", None),
        ("/all  hi there ", Command(Verb.ALL, "hi there ")),
        ("/join 12", Command(Verb.JOIN, "12")),
        ("/JOIN lobby", Command(Verb.JOIN, "lobby")),
        ("/make", Command(Verb.MAKE, "")),
        ("/history 5", Command(Verb.HISTORY, "5")),
        ("/delete 12", Command(Verb.DELETE, "12")),
        ("/edit 12 new text ", Command(Verb.EDIT, "12 new text ")),
        ("/help", Command(Verb.HELP)),
        ("/exit", Command(Verb.QUIT)),
    ],
)
def test_typed_lines_become_commands(line: str, command: Command | None) -> None:
    assert parse(line) == command


@pytest.mark.parametrize(
    "line",
    [
        "/all",
        "/join",
        "/name",
        "/leave now",
        "/history 0",
        "/nope",
        "/delete",
        "/delete 0",
        "/delete -1",
        "/delete x",
        "/delete \u00b2",
        "/delete 1 2",
        "/edit",
        "/edit 1",
        "/edit 1   ",
        "/edit 0 hi",
        "/edit x hi",
        "/edit \u00b2 hi",
        "/edit hi 1",
    ],
)
def test_bad_commands_say_how_to_write_them(line: str) -> None:
    with pytest.raises(UsageError):
        parse(line)


def test_rooms_shows_the_first_rooms_of_very_many(
    terminals: list[Terminal], tmp_path: Path
) -> None:
    """A deployment of thousands of rooms is not listed whole in a terminal."""
    from roomcast.chat.socketio_backend import ROOMS_SHOWN

    with run_server("--request-rate-limit", "0", log_dir=tmp_path) as server:
        with socketio.SimpleClient() as maker:
            maker.connect(server.url, socketio_path="/ws/socket.io", auth={"name": "maker"})
            for i in range(ROOMS_SHOWN + 5):
                assert maker.call("join", {"room": f"many-{i:03d}"}, timeout=WAIT)["ok"]
            ada = Terminal("ada", "--url", server.url)
            terminals.append(ada)
            ada.ready()  # in the lobby: room ROOMS_SHOWN + 6
            ada.type("/rooms")
            ada.sees(f"the first {ROOMS_SHOWN} rooms (/list: those with members):")
            ada.sees_re(r"#1\s+many-000\s+\(1 member\)")
            ada.sees_re(rf"#{ROOMS_SHOWN}\s+many-{ROOMS_SHOWN - 1:03d}\s+\(1 member\)")
            ada.type("/list")
            ada.sees(f"the {ROOMS_SHOWN} rooms with most members:")
            ada.sees_re(r"many-\d{3}\s+\(1 member\)")
        screen = ada.text()
        listing = screen.split(f"the first {ROOMS_SHOWN} rooms", 1)[1].split(
            f"the {ROOMS_SHOWN} rooms with"
        )[0]
        assert sorted(set(re.findall(r"many-\d{3}", listing))) == [
            f"many-{i:03d}" for i in range(ROOMS_SHOWN)
        ], screen[-2000:]
