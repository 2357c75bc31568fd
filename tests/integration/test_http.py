"""The REST API of a real server: its answers are what its OpenAPI document says they are,
and input it cannot take is refused with a code, never a server error."""

from __future__ import annotations

import itertools

import httpx
import pytest

from roomcast.transports.schema import (
    ErrorReply,
    HealthReply,
    MembersReply,
    MessagesReply,
    RoomsReply,
)

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
    assert {"RoomsReply", "MessagesReply", "MembersReply", "ErrorReply"} <= set(
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
