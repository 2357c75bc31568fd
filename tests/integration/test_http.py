"""The REST API of a real server: its answers are what its OpenAPI document says they are,
and input it cannot take is refused with a code, never a server error."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import httpx
import pytest

from roomcast.transports.schema import (
    ErrorReply,
    HealthReply,
    MembersReply,
    MessageReply,
    MessagesReply,
    RoomsReply,
)

from .clients import ChatClient
from .servers import run_server

_rooms = itertools.count()


async def test_answers_match_the_documented_schemas(connect, server):
    name = f"rest-{next(_rooms)}"
    alice, bob = await connect("alice"), await connect("bob")
    room = (await alice.ok("join", {"room": name}))["room"]
    await bob.ok("join", {"room": name})
    for i in range(3):
        await alice.ok(
            "send", {"room": name, "text": f"m{i}", **({"id": f"chosen-{i}"} if i else {})}
        )
    async with httpx.AsyncClient(base_url=server.url) as http:
        spec = (await http.get("/openapi.json")).json()
        answers = {
            "/healthz": HealthReply,
            "/api/rooms": RoomsReply,
            "/api/rooms?limit=1": RoomsReply,
            "/api/rooms?occupied=true": RoomsReply,
            f"/api/rooms/{room['id']}/messages": MessagesReply,
            f"/api/rooms/{name}/messages?limit=1&before=3": MessagesReply,
            f"/api/rooms/{name}/members": MembersReply,
            f"/api/rooms/{room['id']}/members?limit=1": MembersReply,
        }
        read = {path: await http.get(path) for path in answers}
    for path, model in answers.items():
        assert read[path].status_code == 200, (path, read[path].text)
        model.model_validate_json(read[path].content, strict=True)
    messages = read[f"/api/rooms/{room['id']}/messages"].json()["messages"]
    assert [(m["seq"], m["text"]) for m in messages] == [(1, "m0"), (2, "m1"), (3, "m2")]
    assert read[f"/api/rooms/{room['id']}/members?limit=1"].json()["next"] == alice.user["id"]
    # The document names these shapes, and the errors roomcast answers with (never a 422).
    for path in ("/api/rooms", "/api/rooms/{room}/messages", "/api/rooms/{room}/members"):
        responses = spec["paths"][path]["get"]["responses"]
        assert set(responses) == {"200", "4XX", "503"}, (path, set(responses))
        assert responses["4XX"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorReply"
        }
    posting = spec["paths"]["/api/rooms/{room}/messages"]["post"]
    assert set(posting["responses"]) == {"200", "4XX", "503"}
    assert posting["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MessageIn"
    }
    assert {"RoomsReply", "MessagesReply", "MembersReply", "ErrorReply", "MessageReply"} <= set(
        spec["components"]["schemas"]
    )
    # An open server reads no token, so its document asks for none: a client generated
    # from it must not require one.
    assert "securitySchemes" not in spec["components"]
    assert not any("security" in op for ops in spec["paths"].values() for op in ops.values())
    for ops in spec["paths"].values():
        names = {p["name"].lower() for op in ops.values() for p in op.get("parameters", [])}
        assert "authorization" not in names


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/rooms/{room}/messages?before=14692161189557670657161382854656", 400, "bad_request"),
        ("/api/rooms/{room}/messages?before=0", 400, "bad_request"),
        ("/api/rooms/{room}/messages?limit=101", 400, "bad_request"),
        ("/api/rooms/99999999999999999999999/messages", 400, "invalid_room"),
        ("/api/rooms/99999999999999999999999/members", 400, "invalid_room"),
        ("/api/rooms/" + "9" * 5000 + "/members", 400, "invalid_room"),
        ("/api/rooms/0/members", 400, "invalid_room"),
        ("/api/rooms/2147483647/members", 404, "not_found"),
        ("/api/rooms/no-such-room-anywhere/messages", 404, "not_found"),
        ("/api/rooms/" + "x" * 65 + "/members", 400, "invalid_room"),
        ("/api/rooms/bad%00name/members", 400, "invalid_room"),
        ("/api/rooms/{room}/members?after=-1", 400, "bad_request"),
        ("/api/rooms/{room}/members?limit=1001", 400, "bad_request"),
        ("/api/rooms?after=9007199254740993", 400, "bad_request"),
        ("/api/rooms?occupied=maybe", 400, "bad_request"),
    ],
)
async def test_bad_input_is_refused_with_its_code(connect, server, path, status, code):
    name = f"refusing-{next(_rooms)}"
    alice = await connect("alice")
    await alice.ok("join", {"room": name})
    await alice.ok("send", {"room": name, "text": "kept"})
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get(path.replace("{room}", name))
        after = (await http.get(f"/api/rooms/{name}/messages")).json()
    assert answer.status_code == status, answer.text
    refused = ErrorReply.model_validate_json(answer.content)
    assert refused.error.code == code and refused.error.message
    assert [m["text"] for m in after["messages"]] == ["kept"]


async def test_a_message_posted_over_http_reaches_the_members_and_history(connect, server):
    name = f"posted-{next(_rooms)}"
    alice = await connect("alice")
    room = (await alice.ok("join", {"room": name}))["room"]
    await alice.ok("send", {"room": name, "text": "before"})
    post = {"text": "deploy finished", "name": "ci-bot", "id": "deploy-42"}
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post(f"/api/rooms/{name}/messages", json=post)
        assert answer.status_code == 200, answer.text
        message = MessageReply.model_validate_json(answer.content, strict=True).message
        assert (message.seq, message.id, message.text) == (2, "deploy-42", "deploy finished")
        assert message.user.name == "ci-bot" and message.user.id != alice.user["id"]
        # The member gets it live, as any member's message, in seq order.
        await alice.wait_for(lambda: [m["text"] for m in alice.messages()][-1:] == [post["text"]])
        live = alice.messages()[-1]
        assert (live["seq"], live["room"], live["user"]) == (
            2,
            room["id"],
            message.user.model_dump(),
        )
        # A retry with the same id stores nothing and answers with the stored message; the
        # same id with another text is a conflict; by room id works as by name.
        again = await http.post(f"/api/rooms/{room['id']}/messages", json=post)
        assert again.json()["message"] == answer.json()["message"]
        other = await http.post(f"/api/rooms/{name}/messages", json={**post, "text": "other"})
        assert (other.status_code, other.json()["error"]["code"]) == (409, "conflict")
        history = (await http.get(f"/api/rooms/{name}/messages")).json()["messages"]
    assert [(m["seq"], m["text"]) for m in history] == [(1, "before"), (2, "deploy finished")]
    assert [m["text"] for m in alice.messages()] == ["before", "deploy finished"]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("{room}", {"text": "x"}, 400, "invalid_name"),
        ("{room}", {"text": "x", "name": " "}, 400, "invalid_name"),
        ("{room}", {"text": " ", "name": "bot"}, 400, "invalid_text"),
        ("{room}", {"text": "x" * 4001, "name": "bot"}, 400, "invalid_text"),
        ("{room}", {"text": "a\x00b", "name": "bot"}, 400, "invalid_text"),
        ("{room}", {"text": 7, "name": "bot"}, 400, "bad_request"),
        ("{room}", {"name": "bot"}, 400, "bad_request"),
        ("{room}", {"text": "x", "name": "bot", "id": "no spaces"}, 400, "bad_request"),
        ("{room}", b"{not json", 400, "bad_request"),
        ("{room}", b'{"text": "' + b"x" * 70_000 + b'", "name": "bot"}', 413, "bad_request"),
        ("no-such-room-anywhere", {"text": "x", "name": "bot"}, 404, "not_found"),
        ("0", {"text": "x", "name": "bot"}, 400, "invalid_room"),
    ],
)
async def test_a_bad_post_is_refused_with_its_code_and_stores_nothing(
    connect, server, path, body, status, code
):
    name = f"refused-post-{next(_rooms)}"
    alice = await connect("alice")
    await alice.ok("join", {"room": name})
    await alice.ok("send", {"room": name, "text": "kept"})
    async with httpx.AsyncClient(base_url=server.url) as http:
        url = f"/api/rooms/{path.replace('{room}', name)}/messages"
        if isinstance(body, bytes):
            answer = await http.post(
                url, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            answer = await http.post(url, json=body)
        after = (await http.get(f"/api/rooms/{name}/messages")).json()
    assert answer.status_code == status, answer.text
    refused = ErrorReply.model_validate_json(answer.content)
    assert refused.error.code == code and refused.error.message
    assert [m["text"] for m in after["messages"]] == ["kept"]


async def test_a_post_without_a_length_is_refused(server):
    async def body() -> AsyncIterator[bytes]:  # sent chunked: no Content-Length
        yield b'{"text": "streamed", "name": "bot"}'

    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.post("/api/rooms/anything/messages", content=body())
    assert answer.status_code == 411
    assert answer.json()["error"]["code"] == "bad_request"


async def test_posts_past_the_rate_are_refused(tmp_path):
    with run_server("--rate-limit", "0.1", "--rate-burst", "3", log_dir=tmp_path) as srv:
        client = ChatClient(srv.url, "alice")
        await client.connect()
        try:
            await client.ok("join", {"room": "rated"})
            async with httpx.AsyncClient(base_url=srv.url) as http:
                answers = [
                    await http.post(
                        "/api/rooms/rated/messages", json={"text": f"m{i}", "name": "bot"}
                    )
                    for i in range(6)
                ]
                history = (await http.get("/api/rooms/rated/messages")).json()["messages"]
        finally:
            await client.close()
    statuses = [a.status_code for a in answers]
    assert statuses == [200, 200, 200, 429, 429, 429], statuses
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"rate_limited"}
    stored = [a.json()["message"]["text"] for a in answers if a.status_code == 200]
    assert [m["text"] for m in history] == stored


async def test_reads_past_the_rate_are_refused_per_caller(tmp_path):
    """Each REST read counts against its caller's rate, whichever route it asks: a
    script polling in a tight loop is held back as a connection would be."""
    args = ("--request-rate-limit", "0.1", "--request-rate-burst", "4")
    with run_server(*args, log_dir=tmp_path) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            paths = ["/api/rooms", "/api/rooms/1/messages", "/api/rooms/1/members"]
            answers = [await http.get(paths[i % 3]) for i in range(7)]
            # Another caller (a proxy uvicorn trusts names it): a rate of its own.
            other = await http.get("/api/rooms", headers={"X-Forwarded-For": "10.1.2.3"})
    statuses = [a.status_code for a in answers]
    # The room does not exist: 404 is an answer, and it counted like the others.
    assert statuses == [200, 404, 404, 200, 429, 429, 429], statuses
    assert {a.json()["error"]["code"] for a in answers[4:]} == {"rate_limited"}
    assert other.status_code == 200


async def test_paths_and_methods_that_do_not_exist_get_the_error_shape(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        wrong_method = await http.delete("/api/rooms/lobby/messages")
        no_path = await http.get("/api/no/such/path")
        no_file = await http.get("/static/no-such-file.js")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET, POST"  # every method the path takes
    for answer, code in [(wrong_method, "bad_request"), (no_path, "not_found")]:
        assert ErrorReply.model_validate_json(answer.content).error.code == code
    assert (no_file.status_code, no_file.json()["error"]["code"]) == (404, "not_found")
