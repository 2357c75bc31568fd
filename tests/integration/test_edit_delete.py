"""Editing and deleting messages on real servers: a sender corrects or takes back its own
message, a moderator removes anyone's, every member on every node is told, and history
keeps the message's place with its new text, or without its text."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roomcast.core.auth import Authenticator
from roomcast.transports.schema import MessageReply
from tests.contract.engines import engine_url

from .clients import ChatClient, scrape
from .cluster import cluster, postgres_schema
from .servers import Server, run_server

SECRET = "the application's secret for deleting, 32+ characters"
tokens = Authenticator(SECRET)


@contextlib.asynccontextmanager
async def open_pair(
    tmp_path: Path, transports: list[str]
) -> AsyncIterator[tuple[Server, ChatClient, ChatClient, int, dict[str, Any]]]:
    """An open server, Ada and Bob connected on ``transports`` and in the room "open",
    and Ada's message "mine" there: (server, ada, bob, room id, the message)."""
    with run_server("--rate-limit", "0", log_dir=tmp_path) as server:
        ada = await ChatClient(server.url, "ada", transports=transports).connect()
        bob = await ChatClient(server.url, "bob", transports=transports).connect()
        try:
            room = (await ada.ok("join", {"room": "open"}))["room"]["id"]
            await bob.ok("join", {"room": "open"})
            mine = (await ada.ok("send", {"room": "open", "text": "mine"}))["message"]
            yield server, ada, bob, room, mine
        finally:
            await ada.close()
            await bob.close()


def deleted_count(url: str) -> float:
    return sum(v for k, v in scrape(url).items() if k.startswith("roomcast_messages_deleted_total"))


@pytest.mark.service
async def test_deletions_reach_every_member_on_every_node_and_history_keeps_the_place(tmp_path):
    async with engine_url("redis", tmp_path) as broker, postgres_schema() as store:
        with cluster(broker, store, tmp_path, "--auth-secret", SECRET) as c:
            one, two = c.start(2)
            ada = await ChatClient(one.url, "x", token=tokens.mint("ada", ttl=600)).connect()
            bob = await ChatClient(two.url, "x", token=tokens.mint("bob", ttl=600)).connect()
            try:
                joined = await ada.ok("join", {"room": "mod"})
                room = joined["room"]["id"]
                await bob.ok("join", {"room": "mod"})
                sent = []
                for text in ("ada: oops", "bob: spam", "ada: hello"):
                    client = ada if text.startswith("ada") else bob
                    sent.append((await client.ok("send", {"room": "mod", "text": text}))["message"])
                await bob.wait_messages(room, 3)
                # Cy has them all, and is away while they are deleted.
                cy_token = tokens.mint("cy", ttl=600)
                cy = await ChatClient(one.url, "x", token=cy_token).connect()
                await cy.ok("join", {"room": "mod", "since": {"epoch": joined["epoch"], "seq": 0}})
                await cy.close()

                # Bob may not delete Ada's message; nothing changes.
                refused = await bob.call("delete", {"room": room, "seq": sent[0]["seq"]})
                assert refused["ok"] is False and refused["error"]["code"] == "forbidden"

                # Ada deletes her own: both nodes' members are told, with who did it.
                reply = await ada.ok("delete", {"room": "mod", "seq": sent[0]["seq"]})
                gone = reply["message"]
                assert (gone["seq"], gone["id"], gone["text"], gone["deleted"]) == (
                    1,
                    sent[0]["id"],
                    "",
                    True,
                )
                expected = {"room": room, "seq": 1, "id": sent[0]["id"], "by": ada.user}
                for client in (ada, bob):
                    await client.wait_for(lambda c=client: c.of("deleted"))
                    assert client.of("deleted") == [expected]

                # A moderator removes Bob's message over REST, through the other node.
                moderator = tokens.mint("mod", ttl=600, name="Moderator", moderator=True)
                plain = tokens.mint("eve", ttl=600)
                async with httpx.AsyncClient(base_url=two.url) as http:
                    path = f"/api/rooms/{room}/messages/{sent[1]['seq']}"
                    eve = await http.delete(path, headers={"Authorization": f"Bearer {plain}"})
                    assert (eve.status_code, eve.json()["error"]["code"]) == (403, "forbidden")
                    nobody = await http.delete(path)
                    assert nobody.status_code == 401
                    mod = await http.delete(path, headers={"Authorization": f"Bearer {moderator}"})
                    assert mod.status_code == 200, mod.text
                    assert mod.json()["message"]["deleted"] is True
                    missing = await http.delete(
                        f"/api/rooms/{room}/messages/99",
                        headers={"Authorization": f"Bearer {moderator}"},
                    )
                    assert (missing.status_code, missing.json()["error"]["code"]) == (
                        404,
                        "not_found",
                    )
                for client in (ada, bob):
                    await client.wait_for(lambda c=client: len(c.of("deleted")) == 2)
                    assert client.of("deleted")[1]["by"]["name"] == "Moderator"

                # Both nodes answer history with the places kept and the texts gone.
                for node, client in ((one, ada), (two, bob)):
                    page = (await client.ok("history", {"room": "mod"}))["messages"]
                    assert [(m["seq"], m["text"], m.get("deleted")) for m in page] == [
                        (1, "", True),
                        (2, "", True),
                        (3, "ada: hello", None),
                    ]
                    async with httpx.AsyncClient(base_url=node.url) as http:
                        headers = {"Authorization": f"Bearer {moderator}"}
                        rest = await http.get(f"/api/rooms/{room}/messages", headers=headers)
                        assert [m["text"] for m in rest.json()["messages"]] == [
                            "",
                            "",
                            "ada: hello",
                        ]

                # A client coming back recovers the deleted messages as deleted; one that
                # had them is told which of those it holds were deleted meanwhile.
                back = await ChatClient(one.url, "x", token=tokens.mint("bob", ttl=600)).connect()
                cy = await ChatClient(two.url, "x", token=cy_token).connect()
                try:
                    since = {"epoch": joined["epoch"], "seq": 0}
                    again = await back.ok("join", {"room": "mod", "since": since})
                    assert [m["text"] for m in again["missed"]] == ["", "", "ada: hello"]
                    assert again["changed"] == []
                    since = {"epoch": joined["epoch"], "seq": 3}
                    returned = await cy.ok("join", {"room": "mod", "since": since})
                    assert (returned["recovered"], returned["missed"]) == (True, [])
                    assert [(m["seq"], m["text"], m["deleted"]) for m in returned["changed"]] == [
                        (1, "", True),
                        (2, "", True),
                    ]
                finally:
                    await back.close()
                    await cy.close()
                assert deleted_count(one.url) + deleted_count(two.url) == 2
            finally:
                await ada.close()
                await bob.close()


@pytest.mark.parametrize("transports", [["websocket"], ["polling"]])
async def test_an_open_server_lets_a_connection_delete_its_own_messages_only(tmp_path, transports):
    """On roomcast's own WebSocket path and on python-engineio's long-polling one."""
    async with open_pair(tmp_path, transports) as (server, ada, bob, room, mine):
        for payload, code in (
            ({"room": room, "seq": mine["seq"]}, "forbidden"),
            ({"room": room, "seq": 7}, "not_found"),
            ({"room": room, "seq": "1"}, "bad_request"),
            ({"room": room}, "bad_request"),
            ({"room": "nowhere", "seq": 1}, "not_found"),
        ):
            answer = await bob.call("delete", payload)
            assert answer["ok"] is False and answer["error"]["code"] == code, (payload, answer)
        assert [m["text"] for m in (await bob.ok("history", {"room": room}))["messages"]] == [
            "mine"
        ]
        await ada.ok("delete", {"room": room, "seq": mine["seq"]})
        await bob.wait_for(lambda: bob.of("deleted"))
        assert bob.of("deleted")[0]["by"] == ada.user
        # The REST API of an open server trusts its callers, as for sending.
        other = (await bob.ok("send", {"room": room, "text": "bob's"}))["message"]
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.delete(f"/api/rooms/open/messages/{other['seq']}")
            assert answer.status_code == 200 and answer.json()["message"]["deleted"]
            MessageReply.model_validate_json(answer.content, strict=True)
            spec = (await http.get("/openapi.json")).json()
            documented = spec["paths"]["/api/rooms/{room}/messages/{seq}"]["delete"]
            assert set(documented["responses"]) == {"200", "4XX", "503"}
            for path in ("/api/rooms/open/messages/0", "/api/rooms/open/messages/x"):
                bad = await http.delete(path)
                assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_request")
        await ada.wait_for(lambda: len(ada.of("deleted")) == 2)
        assert ada.of("deleted")[1]["by"] is None
        assert deleted_count(server.url) == 2


def edited_count(url: str) -> float:
    return sum(v for k, v in scrape(url).items() if k.startswith("roomcast_messages_edited_total"))


@pytest.mark.service
async def test_edits_reach_every_member_on_every_node_and_history_has_the_new_text(tmp_path):
    async with engine_url("nats", tmp_path) as broker, postgres_schema() as store:
        with cluster(broker, store, tmp_path, "--auth-secret", SECRET) as c:
            one, two = c.start(2)
            ada = await ChatClient(one.url, "x", token=tokens.mint("ada", ttl=600)).connect()
            bob = await ChatClient(two.url, "x", token=tokens.mint("bob", ttl=600)).connect()
            try:
                joined = await ada.ok("join", {"room": "edits"})
                room = joined["room"]["id"]
                await bob.ok("join", {"room": "edits"})
                first = (await ada.ok("send", {"room": "edits", "text": "helo"}))["message"]
                await ada.ok("send", {"room": "edits", "text": "world"})
                await bob.wait_messages(room, 2)

                refused = await bob.call("edit", {"room": room, "seq": 1, "text": "hijacked"})
                assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
                reply = await ada.ok("edit", {"room": "edits", "seq": 1, "text": "hello"})
                edited = reply["message"]
                assert (edited["seq"], edited["id"], edited["ts"], edited["text"]) == (
                    1,
                    first["id"],
                    first["ts"],
                    "hello",
                )
                assert edited["edited"] >= first["ts"]
                for client in (ada, bob):
                    await client.wait_for(lambda c=client: c.of("edited"))
                    assert client.of("edited") == [edited]

                # Over REST, with the sender's token; another user's is refused.
                async with httpx.AsyncClient(base_url=two.url) as http:
                    path = f"/api/rooms/{room}/messages/1"
                    as_bob = {"Authorization": f"Bearer {bob.token}"}
                    as_ada = {"Authorization": f"Bearer {ada.token}"}
                    theirs = await http.patch(path, json={"text": "mine now"}, headers=as_bob)
                    assert (theirs.status_code, theirs.json()["error"]["code"]) == (
                        403,
                        "forbidden",
                    )
                    empty = await http.patch(path, json={"text": " "}, headers=as_ada)
                    assert (empty.status_code, empty.json()["error"]["code"]) == (
                        400,
                        "invalid_text",
                    )
                    again = await http.patch(path, json={"text": "hello!"}, headers=as_ada)
                    assert again.status_code == 200, again.text
                    MessageReply.model_validate_json(again.content, strict=True)
                for client in (ada, bob):
                    await client.wait_for(lambda c=client: len(c.of("edited")) == 2)
                    assert client.of("edited")[1]["text"] == "hello!"

                for client in (ada, bob):
                    page = (await client.ok("history", {"room": "edits"}))["messages"]
                    assert [(m["text"], "edited" in m) for m in page] == [
                        ("hello!", True),
                        ("world", False),
                    ]
                back = await ChatClient(one.url, "x", token=tokens.mint("cy", ttl=600)).connect()
                try:
                    since = {"epoch": joined["epoch"], "seq": 0}
                    recovered = await back.ok("join", {"room": "edits", "since": since})
                    assert [m["text"] for m in recovered["missed"]] == ["hello!", "world"]
                finally:
                    await back.close()
                assert edited_count(one.url) + edited_count(two.url) == 2
            finally:
                await ada.close()
                await bob.close()


@pytest.mark.parametrize("transports", [["websocket"], ["polling"]])
async def test_an_open_server_lets_a_connection_edit_its_own_messages_only(tmp_path, transports):
    async with open_pair(tmp_path, transports) as (server, ada, bob, room, mine):
        for payload, code in (
            ({"room": room, "seq": mine["seq"], "text": "bob's now"}, "forbidden"),
            ({"room": room, "seq": 7, "text": "x"}, "not_found"),
            ({"room": room, "seq": mine["seq"]}, "bad_request"),
            ({"room": room, "seq": mine["seq"], "text": "\u0007"}, "invalid_text"),
            ({"room": room, "text": "x"}, "bad_request"),
        ):
            answer = await bob.call("edit", payload)
            assert answer["ok"] is False and answer["error"]["code"] == code, (payload, answer)
        await ada.ok("edit", {"room": room, "seq": mine["seq"], "text": "mine, edited"})
        await bob.wait_for(lambda: bob.of("edited"))
        assert bob.of("edited")[0]["text"] == "mine, edited"
        async with httpx.AsyncClient(base_url=server.url) as http:
            path = f"/api/rooms/open/messages/{mine['seq']}"
            answer = await http.patch(path, json={"text": "by the backend"})
            assert answer.status_code == 200 and answer.json()["message"]["edited"]
            for body in ({}, {"text": 5}, {"text": ""}):
                bad = await http.patch(path, json=body)
                assert bad.status_code == 400, (body, bad.text)
            await http.delete(path)
            gone = await http.patch(path, json={"text": "back"})
            assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
        await ada.wait_for(lambda: len(ada.of("edited")) == 2 and ada.of("deleted"))
        assert [m["text"] for m in (await ada.ok("history", {"room": room}))["messages"]] == [""]


async def test_a_moderator_is_told_so_and_deletes_over_its_connection(tmp_path):
    with run_server("--auth-secret", SECRET, log_dir=tmp_path) as server:
        ada = await ChatClient(server.url, "x", token=tokens.mint("ada", ttl=600)).connect()
        mod_token = tokens.mint("mod", ttl=600, name="Mod", moderator=True)
        mod = await ChatClient(server.url, "x", token=mod_token).connect()
        try:
            assert "moderator" not in ada.of("welcome")[0]
            assert mod.of("welcome")[0]["moderator"] is True
            room = (await ada.ok("join", {"room": "watched"}))["room"]["id"]
            spam = (await ada.ok("send", {"room": room, "text": "spam"}))["message"]
            refused = await mod.call("edit", {"room": room, "seq": spam["seq"], "text": "x"})
            assert refused["error"]["code"] == "forbidden"  # moderators delete, not edit
            await mod.ok("delete", {"room": room, "seq": spam["seq"]})
            await ada.wait_for(lambda: ada.of("deleted"))
            assert ada.of("deleted")[0]["by"] == mod.user
            # A newer token without the claim takes the moderator's rights away.
            renewed = await mod.ok("refresh", {"token": tokens.mint("mod", ttl=900)})
            assert "moderator" not in renewed
            again = (await ada.ok("send", {"room": room, "text": "spam again"}))["message"]
            refused = await mod.call("delete", {"room": room, "seq": again["seq"]})
            assert refused["error"]["code"] == "forbidden"
            regained = await mod.ok("refresh", {"token": mod_token})
            assert regained["moderator"] is True
        finally:
            await ada.close()
            await mod.close()
