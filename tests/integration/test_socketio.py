"""The Socket.IO protocol against a real server, with the python-socketio client."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest

from .clients import ChatClient
from .servers import run_server

_rooms = itertools.count()


def room_name(label: str) -> str:
    """A room name of its own per test, so tests sharing a server never meet."""
    return f"{label}-{next(_rooms)}"


async def test_welcome_gives_a_user_id(connect):
    alice = await connect("alice")
    bob = await connect("bob")
    assert alice.user["name"] == "alice" and isinstance(alice.user["id"], int)
    assert alice.user["id"] != bob.user["id"]


async def test_two_members_see_every_message_in_one_order(connect):
    name = room_name("order")
    alice, bob = await connect("alice"), await connect("bob")
    joined = await alice.ok("join", {"room": name})
    await bob.ok("join", {"room": name})
    room = joined["room"]["id"]
    assert joined["seq"] == 0 and joined["room"]["name"] == name

    async def burst(client, n):
        for i in range(n):
            await client.ok("send", {"room": name, "text": f"{client.name} {i}"})

    await asyncio.gather(burst(alice, 25), burst(bob, 25))
    await alice.wait_messages(room, 50)
    await bob.wait_messages(room, 50)
    assert alice.messages(room) == bob.messages(room)
    assert [m["seq"] for m in alice.messages(room)] == list(range(1, 51))
    assert all(m["epoch"] == joined["epoch"] for m in alice.messages(room))
    # Each sender sees its own messages too, in its own sending order.
    assert [t for t in alice.texts(room) if t.startswith("alice")] == [
        f"alice {i}" for i in range(25)
    ]


async def test_send_ack_carries_the_message(connect):
    name = room_name("ack")
    alice = await connect("alice")
    await alice.ok("join", {"room": name})
    reply = await alice.ok("send", {"room": name, "text": "héllo 👋"})
    msg = reply["message"]
    assert msg["text"] == "héllo 👋" and msg["seq"] == 1
    assert msg["user"] == alice.user
    assert isinstance(msg["id"], str) and isinstance(msg["ts"], int)


async def test_a_send_sent_again_with_its_id_is_stored_and_delivered_once(connect):
    name = room_name("retry")
    alice, bob = await connect("alice"), await connect("bob")
    room = (await alice.ok("join", {"room": name}))["room"]["id"]
    await bob.ok("join", {"room": name})
    send = {"room": name, "text": "once", "id": "0f9c1e2a-retry"}
    first = (await alice.ok("send", send))["message"]
    assert first["id"] == "0f9c1e2a-retry" and first["seq"] == 1
    assert (await alice.ok("send", send))["message"] == first
    taken = await bob.call("send", {**send, "text": "mine now"})
    assert taken["ok"] is False and taken["error"]["code"] == "conflict"
    await alice.ok("send", {"room": name, "text": "next"})
    await bob.wait_messages(room, 2)
    assert [(m["seq"], m["text"]) for m in bob.messages(room)] == [(1, "once"), (2, "next")]
    history = (await bob.ok("history", {"room": name}))["messages"]
    assert [m["text"] for m in history] == ["once", "next"]


async def test_other_rooms_and_left_rooms_receive_nothing(connect):
    x, y, sentinel = room_name("x"), room_name("y"), room_name("sentinel")
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    rx = (await alice.ok("join", {"room": x}))["room"]["id"]
    await bob.ok("join", {"room": x})
    await carol.ok("join", {"room": y})
    rs = (await carol.ok("join", {"room": sentinel}))["room"]["id"]
    await bob.ok("join", {"room": sentinel})
    await bob.ok("leave", {"room": x})
    await alice.ok("send", {"room": x, "text": "only for x"})
    await alice.wait_messages(rx, 1)
    # A later message in a room bob and carol share arrives after anything sent before it.
    await alice.ok("join", {"room": sentinel})
    await alice.ok("send", {"room": sentinel, "text": "barrier"})
    await bob.wait_messages(rs, 1)
    await carol.wait_messages(rs, 1)
    assert bob.texts(rx) == [] and carol.texts(rx) == []
    assert "only for x" not in bob.texts() + carol.texts()


async def test_presence_join_and_leave_events(connect):
    name = room_name("presence")
    alice, bob = await connect("alice"), await connect("bob")
    room = (await alice.ok("join", {"room": name}))["room"]["id"]
    reply = await bob.ok("join", {"room": name})
    assert {m["name"] for m in reply["members"]} == {"alice", "bob"}
    await alice.wait_for(
        lambda: {"room": room, "event": "join", "user": bob.user} in alice.of("presence")
    )
    members = await alice.ok("members", {"room": name})
    assert {m["id"] for m in members["members"]} == {alice.user["id"], bob.user["id"]}
    await bob.ok("leave", {"room": name})
    await alice.wait_for(
        lambda: {"room": room, "event": "leave", "user": bob.user} in alice.of("presence")
    )
    await bob.close()  # a disconnect is a leave too
    carol = await connect("carol")
    await carol.ok("join", {"room": name})
    await alice.ok("leave", {"room": name})
    await carol.wait_for(
        lambda: {"room": room, "event": "leave", "user": alice.user} in carol.of("presence")
    )
    members = await carol.ok("members", {"room": room})
    assert [m["name"] for m in members["members"]] == ["carol"]


async def test_rooms_lists_member_counts(connect):
    name = room_name("counted")
    alice, bob = await connect("alice"), await connect("bob")
    await alice.ok("join", {"room": name})
    await bob.ok("join", {"room": name})
    rooms = {r["name"]: r for r in (await alice.ok("rooms"))["rooms"]}
    assert rooms[name]["members"] == 2 and isinstance(rooms[name]["id"], int)


async def test_occupied_rooms_are_those_with_members_most_first(connect, server):
    busy, quiet, emptied = room_name("busy"), room_name("quiet"), room_name("emptied")
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    for client in (alice, bob, carol):
        await client.ok("join", {"room": busy})
    await alice.ok("join", {"room": quiet})
    await bob.ok("join", {"room": emptied})
    await bob.ok("leave", {"room": emptied})
    listed = (await carol.ok("rooms", {"occupied": True}))["rooms"]
    ours = [(r["name"], r["members"]) for r in listed if r["name"] in (busy, quiet, emptied)]
    assert ours == [(busy, 3), (quiet, 1)]
    assert [r["members"] for r in listed] == sorted((r["members"] for r in listed), reverse=True)
    everything = {r["name"]: r["members"] for r in (await carol.ok("rooms"))["rooms"]}
    assert everything[emptied] == 0 and everything[busy] == 3
    async with httpx.AsyncClient(base_url=server.url) as http:
        reply = (await http.get("/api/rooms", params={"occupied": "true"})).json()
    mine = [(r["name"], r["members"]) for r in reply["rooms"] if r["name"] in everything]
    assert [(name, n) for name, n in mine if name in (busy, quiet, emptied)] == ours


async def test_every_room_pages_through_by_id(connect, server):
    alice = await connect("alice")
    names = [room_name("paged") for _ in range(5)]
    for name in names:
        await alice.ok("join", {"room": name})
    everything = (await alice.ok("rooms"))["rooms"]
    assert len(everything) >= 5 and "next" not in (await alice.ok("rooms"))
    pages, after = [], 0
    for _ in range(len(everything)):  # bounded: a page holds at least one room
        page = await alice.ok("rooms", {"after": after, "limit": 2})
        pages.extend(page["rooms"])
        if "next" not in page:
            break
        assert page["next"] == page["rooms"][-1]["id"]
        after = page["next"]
    # Other tests' members may still be leaving: ids and names, and the counts of ours.
    assert [(r["id"], r["name"]) for r in pages] == [(r["id"], r["name"]) for r in everything]
    assert {r["name"]: r["members"] for r in pages if r["name"] in names} == dict.fromkeys(names, 1)
    last = await alice.ok("rooms", {"after": everything[-3]["id"], "limit": 2})
    assert [r["id"] for r in last["rooms"]] == [r["id"] for r in everything[-2:]]
    assert "next" not in last  # full, and the last: nothing follows
    top = (await alice.ok("rooms", {"occupied": True, "limit": 2}))["rooms"]
    assert len(top) == 2
    assert top[0]["members"] >= top[1]["members"] >= 1
    async with httpx.AsyncClient(base_url=server.url) as http:
        first = (await http.get("/api/rooms", params={"limit": 2})).json()
        assert [r["id"] for r in first["rooms"]] == [r["id"] for r in everything[:2]]
        assert first["next"] == everything[1]["id"]
        bad = await http.get("/api/rooms", params={"occupied": "true", "after": 1})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
        too_many = await http.get("/api/rooms", params={"limit": 1001})
        assert too_many.status_code == 400


async def test_a_join_can_count_the_members_instead_of_listing_them(connect):
    """What a client of a room of thousands asks for: the count, not every member."""
    name = room_name("big")
    alice, bob = await connect("alice"), await connect("bob")
    listed = await alice.ok("join", {"room": name, "members": True})
    assert [m["name"] for m in listed["members"]] == ["alice"] and "count" not in listed
    counted = await bob.ok("join", {"room": name, "members": False})
    assert counted["count"] == 2 and "members" not in counted
    assert counted["room"] == listed["room"] and counted["seq"] == 0
    # A join like any other: announced, and live from its reply on.
    await alice.wait_for(
        lambda: any(
            p["event"] == "join" and p["user"]["id"] == bob.user["id"] for p in alice.of("presence")
        )
    )
    await alice.ok("send", {"room": name, "text": "hi"})
    assert await bob.wait_messages(counted["room"]["id"], 1) == ["hi"]


async def test_members_page_through_by_user_id(connect, server):
    """What a client of a big room asks for on demand: its members a page at a time."""
    name = room_name("crowd")
    clients = [await connect(f"u{i}") for i in range(5)]
    for client in reversed(clients):  # joined in the reverse of their ids
        await client.ok("join", {"room": name})
    ids = sorted(client.user["id"] for client in clients)
    everyone = await clients[0].ok("members", {"room": name})
    assert [m["id"] for m in everyone["members"]] == ids[::-1]  # in join order
    assert "next" not in everyone
    pages, after = [], 0
    for _ in range(len(ids)):  # bounded: a page holds at least one member
        page = await clients[0].ok("members", {"room": name, "after": after, "limit": 2})
        assert page["room"] == everyone["room"]
        pages.extend(page["members"])
        if "next" not in page:
            break
        assert page["next"] == page["members"][-1]["id"]
        after = page["next"]
    assert [m["id"] for m in pages] == ids
    assert {m["id"]: m["name"] for m in pages} == {m["id"]: m["name"] for m in everyone["members"]}
    last = await clients[0].ok("members", {"room": name, "after": ids[2], "limit": 2})
    assert [m["id"] for m in last["members"]] == ids[3:] and "next" not in last
    rest = await clients[0].ok("members", {"room": name, "after": ids[3]})
    assert [m["id"] for m in rest["members"]] == ids[4:] and "next" not in rest
    async with httpx.AsyncClient(base_url=server.url) as http:
        url = f"/api/rooms/{everyone['room']['id']}/members"
        first = (await http.get(url, params={"limit": 3})).json()
        assert [m["id"] for m in first["members"]] == ids[:3] and first["next"] == ids[2]
        whole = (await http.get(url)).json()
        assert whole["members"] == everyone["members"] and "next" not in whole
        bad = await http.get(url, params={"limit": 0})
        assert bad.status_code == 400


async def test_history_pages_backwards(connect):
    name = room_name("history")
    alice = await connect("alice")
    await alice.ok("join", {"room": name})
    for i in range(1, 26):
        await alice.ok("send", {"room": name, "text": f"m{i}"})
    newest = (await alice.ok("history", {"room": name, "limit": 10}))["messages"]
    assert [m["seq"] for m in newest] == list(range(16, 26))
    older = (await alice.ok("history", {"room": name, "before": 16, "limit": 10}))["messages"]
    assert [m["seq"] for m in older] == list(range(6, 16))
    oldest = (await alice.ok("history", {"room": name, "before": 6, "limit": 10}))["messages"]
    assert [m["text"] for m in oldest] == ["m1", "m2", "m3", "m4", "m5"]
    assert (await alice.ok("history", {"room": name, "before": 1}))["messages"] == []
    default = (await alice.ok("history", {"room": name}))["messages"]
    assert len(default) == 25


async def test_reconnect_with_since_recovers_exactly_the_missed(connect, server):
    name = room_name("recover")
    alice, bob = await connect("alice"), await connect("bob")
    room = (await alice.ok("join", {"room": name}))["room"]["id"]
    joined = await bob.ok("join", {"room": name})
    await alice.ok("send", {"room": name, "text": "before"})
    await bob.wait_messages(room, 1)
    last = bob.messages(room)[-1]
    await bob.close()
    for i in range(5):
        await alice.ok("send", {"room": name, "text": f"missed {i}"})
    bob2 = await connect("bob")
    reply = await bob2.ok(
        "join", {"room": name, "since": {"epoch": joined["epoch"], "seq": last["seq"]}}
    )
    assert reply["recovered"] is True
    assert [m["text"] for m in reply["missed"]] == [f"missed {i}" for i in range(5)]
    assert [m["seq"] for m in reply["missed"]] == [2, 3, 4, 5, 6]
    assert reply["seq"] == 6
    await alice.ok("send", {"room": name, "text": "live again"})
    await bob2.wait_messages(room, 1)
    assert bob2.texts(room) == ["live again"]  # the missed ones are not also sent live
    stale = await bob2.ok("join", {"room": name, "since": {"epoch": "not-this-one", "seq": 1}})
    assert stale["recovered"] is False and stale["missed"] == []


async def test_history_survives_a_restart(tmp_path):
    store = f"sqlite:///{tmp_path}/restart.db"
    with run_server(store_url=store, log_dir=tmp_path) as server:
        alice = await ChatClient(server.url, "alice").connect()
        first = await alice.ok("join", {"room": "durable"})
        for i in range(30):
            await alice.ok("send", {"room": "durable", "text": f"kept {i}"})
        await alice.close()
    with run_server(store_url=store, log_dir=tmp_path) as server:
        bob = await ChatClient(server.url, "bob").connect()
        try:
            again = await bob.ok("join", {"room": "durable"})
            assert again["room"] == first["room"] and again["epoch"] == first["epoch"]
            assert again["seq"] == 30
            history = (await bob.ok("history", {"room": "durable", "limit": 100}))["messages"]
            assert [m["text"] for m in history] == [f"kept {i}" for i in range(30)]
            sent = await bob.ok("send", {"room": "durable", "text": "after restart"})
            assert sent["message"]["seq"] == 31
            assert bob.user["id"] != alice.user["id"]  # user ids are never handed out twice
        finally:
            await bob.close()


@pytest.mark.parametrize(
    ("event", "payload", "code"),
    [
        ("join", None, "bad_request"),
        ("join", "lobby", "bad_request"),
        ("join", {"room": 3.5}, "bad_request"),
        ("join", {"room": ""}, "invalid_room"),
        ("join", {"room": "x" * 65}, "invalid_room"),
        ("join", {"room": "bad\x00name"}, "invalid_room"),
        ("join", {"room": "new\nline"}, "invalid_room"),
        ("join", {"room": 999999}, "not_found"),
        ("join", {"room": "ok", "since": {"epoch": 5}}, "bad_request"),
        ("send", {"room": "VALID", "text": "x" * 4001}, "invalid_text"),
        ("send", {"room": "VALID", "text": ""}, "invalid_text"),
        ("send", {"room": "VALID", "text": 42}, "invalid_text"),
        ("send", {"room": "VALID", "text": b"binary attachment"}, "invalid_text"),
        ("send", b"a binary payload", "bad_request"),
        ("send", {"room": "VALID"}, "bad_request"),
        ("send", {"room": "VALID", "text": "hi", "id": "not an id"}, "bad_request"),
        ("send", {"room": "VALID", "text": "hi", "id": 12}, "bad_request"),
        ("send", {"room": "VALID", "text": "hi", "id": "x" * 65}, "bad_request"),
        ("send", {"text": "no room"}, "bad_request"),
        ("send", {"room": "NOT_JOINED", "text": "hi"}, "not_member"),
        ("send", {"room": "never-created-room", "text": "hi"}, "not_found"),
        ("rooms", {"occupied": "yes"}, "bad_request"),
        ("join", {"room": "VALID", "members": "no"}, "bad_request"),
        ("rooms", {"limit": 0}, "bad_request"),
        ("rooms", {"limit": 1001}, "bad_request"),
        ("rooms", {"after": -1, "limit": 5}, "bad_request"),
        ("rooms", {"after": "r1"}, "bad_request"),
        ("rooms", {"occupied": True, "after": 3}, "bad_request"),
        ("history", {"room": "VALID", "limit": 101}, "bad_request"),
        ("history", {"room": "VALID", "limit": 0}, "bad_request"),
        ("history", {"room": "VALID", "before": "x"}, "bad_request"),
        ("leave", {"room": "NOT_JOINED"}, "not_member"),
        ("members", {"room": "never-created-room"}, "not_found"),
        ("members", {"room": "VALID", "limit": 0}, "bad_request"),
        ("members", {"room": "VALID", "limit": 1001}, "bad_request"),
        ("members", {"room": "VALID", "after": -1}, "bad_request"),
        ("members", {"room": "VALID", "after": "alice"}, "bad_request"),
        ("typing", {"room": "NOT_JOINED"}, "not_member"),
        ("no_such_event", {"room": "VALID"}, "unknown_event"),
        ("message", {"room": "VALID", "text": "events are not client events"}, "unknown_event"),
    ],
)
async def test_bad_input_gets_an_error_ack_and_changes_nothing(connect, event, payload, code):
    valid, not_joined = room_name("valid"), room_name("notjoined")
    alice, bob = await connect("alice"), await connect("bob")
    room = (await alice.ok("join", {"room": valid}))["room"]["id"]
    await bob.ok("join", {"room": not_joined})
    await alice.ok("send", {"room": valid, "text": "first"})
    rooms_before = (await alice.ok("rooms"))["rooms"]

    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return (
            {"VALID": valid, "NOT_JOINED": not_joined}.get(value, value)
            if isinstance(value, str)
            else value
        )

    reply = await alice.call(event, fill(payload))
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    # Nothing changed: same rooms, same history, and the connection still works.
    assert (await alice.ok("rooms"))["rooms"] == rooms_before
    history = (await alice.ok("history", {"room": valid}))["messages"]
    assert [m["text"] for m in history] == ["first"]
    await alice.ok("send", {"room": valid, "text": "still works"})
    await alice.wait_messages(room, 2)


async def test_connect_without_a_valid_name_is_refused(server):
    import socketio

    for auth in (None, {}, {"name": ""}, {"name": "x" * 33}, {"name": 7}):
        client = socketio.AsyncClient(reconnection=False)
        errors = []
        client.on("connect_error", errors.append)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(
                server.url, socketio_path="/ws/socket.io", auth=auth, wait_timeout=5
            )
        # The Socket.IO connect_error: a message, and data with the error code.
        assert errors and errors[0]["data"]["code"] == "invalid_name", errors
        assert errors[0]["message"] == errors[0]["data"]["message"] != ""


async def test_direct_message(connect):
    alice, bob = await connect("alice"), await connect("bob")
    reply = await alice.ok("dm", {"to": bob.user["id"], "text": "just you"})
    got = await bob.wait_for(lambda: bob.of("dm"))
    assert got == [reply["dm"]]
    assert got[0]["from"] == alice.user and got[0]["text"] == "just you"
    missing = await alice.call("dm", {"to": 10**9, "text": "anyone?"})
    assert missing["ok"] is False and missing["error"]["code"] == "not_found"
    bad = await alice.call("dm", {"to": "bob", "text": "x"})
    assert bad["error"]["code"] == "bad_request"


async def test_flooding_is_rate_limited_and_changes_nothing(tmp_path):
    with run_server("--rate-limit", "1", "--rate-burst", "3", log_dir=tmp_path) as server:
        alice = await ChatClient(server.url, "alice").connect()
        try:
            await alice.ok("join", {"room": "calm"})
            replies = [await alice.call("send", {"room": "calm", "text": f"{i}"}) for i in range(6)]
            assert [r["ok"] for r in replies[:3]] == [True, True, True]
            refused = [r for r in replies[3:] if not r["ok"]]
            assert refused and all(r["error"]["code"] == "rate_limited" for r in refused)
            stored = (await alice.ok("history", {"room": "calm"}))["messages"]
            assert len(stored) == sum(r["ok"] for r in replies)
        finally:
            await alice.close()


async def test_a_loop_of_joins_and_listings_is_rate_limited_and_changes_nothing(tmp_path):
    """A client stuck in a loop (a page joining on every render) is slowed down by its
    request rate; its messages have a rate of their own."""
    # One request every 10 s past a burst of 4: none comes back during the test.
    args = ("--request-rate-limit", "0.1", "--request-rate-burst", "4")
    with run_server(*args, log_dir=tmp_path) as server:
        alice = await ChatClient(server.url, "alice").connect()
        bob = await ChatClient(server.url, "bob").connect()
        try:
            await alice.ok("join", {"room": "calm"})
            replies = [await alice.call("history", {"room": "calm"}) for _ in range(5)]
            assert [r["ok"] for r in replies[:3]] == [True, True, True]
            refused = [r for r in replies[3:] if not r["ok"]]
            assert refused and all(r["error"]["code"] == "rate_limited" for r in refused)
            # A join past the rate changes nothing: not a member, nobody told.
            joins = [await alice.call("join", {"room": "busy"}) for _ in range(3)]
            assert [r["error"]["code"] for r in joins] == ["rate_limited"] * 3
            members = (await bob.ok("members", {"room": "calm"}))["members"]
            assert [m["name"] for m in members] == ["alice"]
            missing = await bob.call("members", {"room": "busy"})
            assert missing["ok"] is False and missing["error"]["code"] == "not_found"
            # Messages are not requests: the room still hears alice.
            sent = await alice.ok("send", {"room": "calm", "text": "still here"})
            assert sent["message"]["seq"] == 1
            # Another connection has its own rate.
            assert (await bob.ok("rooms", {}))["rooms"]
        finally:
            await alice.close()
            await bob.close()


async def test_one_connection_s_messages_keep_its_sending_order(connect):
    """Events are handled concurrently; a connection's sends still get seqs in send order."""
    name = room_name("pipelined")
    alice = await connect("alice")
    room = (await alice.ok("join", {"room": name}))["room"]["id"]
    replies = await asyncio.gather(
        *(alice.call("send", {"room": name, "text": f"{i}"}) for i in range(30))
    )
    assert [r["message"]["text"] for r in sorted(replies, key=lambda r: r["message"]["seq"])] == [
        f"{i}" for i in range(30)
    ]
    assert await alice.wait_messages(room, 30) == [f"{i}" for i in range(30)]
