"""A server started with an auth secret: tokens over Socket.IO and HTTP, on one node and
across nodes and workers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from roomcast.core.auth import Authenticator
from tests.contract.engines import engine_url
from tests.identity_provider import identity_provider, jwk_of, rsa_key, sign

from .clients import WAIT, ChatClient
from .cluster import cluster, postgres_schema
from .servers import Server, run_server

SECRET = "a-secret-only-the-application-and-roomcast-know"
tokens = Authenticator(SECRET)


def token(subject: str, **claims: object) -> str:
    return tokens.mint(subject, ttl=600, **claims)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        "--rate-limit", "0", env={"ROOMCAST_AUTH_SECRET": SECRET},
        log_dir=tmp_path_factory.mktemp("auth"),
    ) as srv:  # fmt: skip
        yield srv


async def refusal(url: str, auth: object, transport: str) -> object:
    """The data of the connect_error a client with this connect payload gets (what a
    Socket.IO client's connect_error carries as ``data``: ``{code, message}``)."""
    if transport == "polling":
        # Spoken by hand: python-socketio's client, refused over polling, returns from
        # connect() only when a long-poll ends (~30 s).
        return await _polling_refusal(url, auth)
    connected, answer = await connect_answer(url, auth, transport)
    assert not connected, answer
    assert isinstance(answer, dict), answer
    return answer["data"]


async def connect_answer(url: str, auth: object, transport: str) -> tuple[bool, object]:
    """One connect with this payload: (True, the name it is welcomed as) or (False, the
    connect_error's argument, whose ``data`` is ``{code, message}``)."""
    client = socketio.AsyncClient(reconnection=False)
    answer: asyncio.Future[tuple[bool, object]] = asyncio.get_running_loop().create_future()

    @client.event
    def connect_error(data: object) -> None:
        if not answer.done():
            answer.set_result((False, data))

    @client.on("welcome")
    def welcome(data: dict[str, Any]) -> None:
        if not answer.done():
            answer.set_result((True, data["user"]["name"]))

    try:
        await client.connect(
            url, socketio_path="/ws/socket.io", auth=auth, transports=[transport], wait_timeout=WAIT
        )
    except socketio.exceptions.ConnectionError:
        pass
    try:
        return await asyncio.wait_for(answer, WAIT)
    finally:
        await client.disconnect()


async def _polling_refusal(url: str, auth: object) -> object:
    endpoint = f"{url}/ws/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient(timeout=WAIT) as http:
        opened = await http.get(endpoint)
        assert opened.text.startswith("0"), opened.text
        sid = json.loads(opened.text[1:])["sid"]
        sent = await http.post(f"{endpoint}&sid={sid}", content="40" + json.dumps(auth))
        assert sent.status_code == 200, sent.text
        answer = await http.get(f"{endpoint}&sid={sid}")
    packets = answer.text.split("\x1e")
    refused = [p for p in packets if p.startswith("44")]
    assert refused and not any(p.startswith("40") for p in packets), packets
    return json.loads(refused[0][2:])["data"]


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_a_client_without_a_valid_token_is_refused_with_the_reason(
    server: Server, transport: str
) -> None:
    expired = tokens.mint("bob", ttl=1, now=1_000_000)
    forged = Authenticator("an-attacker-guessing-the-secret-key-000").mint("bob", ttl=600)
    cases = [
        ({"name": "bob"}, "a token is required"),
        ({"token": "garbage"}, "the token is not valid"),
        ({"token": expired}, "the token has expired"),
        ({"token": forged}, "the token is not valid"),
    ]
    for auth, reason in cases:
        data = await refusal(server.url, auth, transport)
        assert isinstance(data, dict) and data["code"] == "unauthorized", data
        assert data["message"].startswith(reason)
    assert httpx.get(f"{server.url}/api/rooms/lobby/members").status_code == 401
    metrics = httpx.get(f"{server.url}/metrics").text
    refused = re.search(
        r'roomcast_socketio_refused_total\{code="unauthorized",node="[^"]+"\} (\S+)', metrics
    )
    assert refused is not None and float(refused.group(1)) >= len(cases), metrics


async def test_a_token_is_one_user_with_its_name_on_every_connection(connect_token) -> None:
    ada_token = token("user-ada", name="Ada")
    ada = await connect_token(ada_token, name="Mallory", transports=["polling"])
    again = await connect_token(ada_token, transports=["websocket"])
    bob = await connect_token(token("user-bob"))
    assert ada.user == again.user
    assert ada.user["name"] == "Ada"
    assert bob.user == {"id": bob.user["id"], "name": "user-bob"}
    assert bob.user["id"] != ada.user["id"]

    for client in (ada, again, bob):
        await client.ok("join", {"room": "tour"})
    reply = await bob.ok("members", {"room": "tour"})
    assert reply["members"] == [ada.user, bob.user]  # each user once
    await ada.ok("send", {"room": "tour", "text": "hi"})
    seen = await bob.wait_for(lambda: bob.messages())
    assert seen[0]["user"] == ada.user and seen[0]["text"] == "hi"
    dm = await bob.ok("dm", {"to": ada.user["id"], "text": "psst"})
    assert dm["dm"]["from"] == bob.user and dm["dm"]["to"] == ada.user["id"]
    for client in (ada, again):  # every connection of the user gets it
        await client.wait_for(lambda c=client: c.of("dm"))


async def test_rooms_outside_the_token_are_closed_to_sockets_and_http(
    server: Server, connect_token
) -> None:
    admin_token = token("admin")
    admin = await connect_token(admin_token)
    await admin.ok("join", {"room": "staff"})
    await admin.ok("send", {"room": "staff", "text": "salaries"})
    guest_token = token("guest", rooms=["public-*"])
    guest = await connect_token(guest_token)

    for event, data in [
        ("join", {"room": "staff"}),
        ("join", {"room": "unmade"}),
        ("history", {"room": "staff"}),
        ("members", {"room": "staff"}),
    ]:
        reply = await guest.call(event, data)
        assert reply["error"]["code"] == "forbidden", (event, reply)
    await guest.ok("join", {"room": "public-1"})
    listed = await guest.ok("rooms")
    assert [r["name"] for r in listed["rooms"]] == ["public-1"]

    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
        anonymous = await http.get("/api/rooms/staff/messages")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert anonymous.json()["error"]["code"] == "unauthorized"
        bad = await http.get("/api/rooms", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        as_guest = {"Authorization": f"Bearer {guest_token}"}
        forbidden = await http.get("/api/rooms/staff/messages", headers=as_guest)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "forbidden"
        assert (await http.get("/api/rooms/staff/members", headers=as_guest)).status_code == 403
        rooms = (await http.get("/api/rooms", headers=as_guest)).json()["rooms"]
        assert [r["name"] for r in rooms] == ["public-1"]
        as_admin = {"Authorization": f"Bearer {admin_token}"}
        history = (await http.get("/api/rooms/staff/messages", headers=as_admin)).json()
        assert [m["text"] for m in history["messages"]] == ["salaries"]
        every = (await http.get("/api/rooms", headers=as_admin)).json()["rooms"]
        assert "unmade" not in [r["name"] for r in every]  # a refused join made nothing
        assert (await http.get("/healthz")).status_code == 200  # health stays open
        spec = (await http.get("/openapi.json")).json()
    # The document of a server that checks tokens names the bearer scheme on each API route.
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/api/rooms", "/api/rooms/{room}/messages", "/api/rooms/{room}/members"):
        assert spec["paths"][path]["get"]["security"] == [{"HTTPBearer": []}], path
    assert "security" not in spec["paths"]["/healthz"]["get"]


async def test_a_message_posted_over_http_is_sent_by_the_tokens_user(
    server: Server, connect_token
) -> None:
    bot_token = token("deploy-bot", name="Deploys", rooms=["ops-*"])
    bot = await connect_token(bot_token)  # the same user, also connected
    reader = await connect_token(token("reader"))
    await reader.ok("join", {"room": "ops-1"})
    await reader.ok("join", {"room": "general"})
    post = {"text": "v2.3 is out", "name": "someone else"}
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
        anonymous = await http.post("/api/rooms/ops-1/messages", json=post)
        assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "unauthorized")
        as_bot = {"Authorization": f"Bearer {bot_token}"}
        closed = await http.post("/api/rooms/general/messages", json=post, headers=as_bot)
        assert (closed.status_code, closed.json()["error"]["code"]) == (403, "forbidden")
        sent = await http.post("/api/rooms/ops-1/messages", json=post, headers=as_bot)
        assert sent.status_code == 200, sent.text
    # The token's user, as on its socket: its id and its name, not the body's.
    assert sent.json()["message"]["user"] == bot.user == {"id": bot.user["id"], "name": "Deploys"}
    await reader.wait_for(lambda: [m["text"] for m in reader.messages()] == ["v2.3 is out"])
    assert reader.messages()[0]["user"] == bot.user


def expiring(subject: str, **claims: object) -> str:
    """A token that is accepted now but expires within a few seconds: its ``exp`` is 7 s
    past, within the 10 s clocks may differ by (accepted for 2-3 s more)."""
    return tokens.mint(subject, ttl=1, now=int(time.time()) - 8, **claims)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_a_connection_ends_when_its_token_expires_unless_refreshed(
    server: Server, connect_token, transport: str
) -> None:
    watcher = await connect_token(token("watcher"))
    room = (await watcher.ok("join", {"room": "expiry"}))["room"]["id"]
    lapsing = await connect_token(expiring("lapsing"), transports=[transport])
    kept = await connect_token(expiring("kept", rooms=["expiry", "other"]), transports=[transport])
    assert lapsing.of("welcome")[0]["expires"] < time.time()
    for client in (lapsing, kept):
        await client.ok("join", {"room": "expiry"})
        await client.ok("join", {"room": "other"})

    # Refusals change nothing: another user's token, a forged one.
    other = await kept.call("refresh", {"token": token("watcher")})
    assert other["error"]["code"] == "forbidden"
    forged = await kept.call("refresh", {"token": "junk"})
    assert forged["error"]["code"] == "unauthorized"
    fresh = token("kept", rooms=["expiry"])  # a longer life, one room fewer
    refreshed = await kept.ok("refresh", {"token": fresh})
    assert refreshed["expires"] > time.time() + 500
    assert [room["name"] for room in refreshed["left"]] == ["other"]

    await lapsing.wait_for(lambda: lapsing.of("expired"))
    assert lapsing.of("expired") == [{"code": "unauthorized", "message": "the token has expired"}]
    # The server has ended its session: the others are told it left. (python-socketio's
    # client itself, disconnected by the server on a WebSocket, says so ~10 s later.)
    await watcher.wait_for(
        lambda: {"room": room, "event": "leave", "user": lapsing.user} in watcher.of("presence")
    )
    # The refreshed connection lives on, in the room its new token names.
    assert kept.sio.connected and not kept.of("expired")
    await kept.ok("send", {"room": "expiry", "text": "still here"})
    await watcher.wait_for(lambda: [m["text"] for m in watcher.messages()][-1:] == ["still here"])
    members = await watcher.ok("members", {"room": "other"})
    assert kept.user not in members["members"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r"roomcast_socketio_expired_total\{[^}]*\} [1-9]", metrics), metrics


async def test_a_long_polling_session_whose_token_expired_is_closed_not_left_open(
    server: Server,
) -> None:
    """The server ends the whole Engine.IO session of an expired client: its pending poll
    gets the close, and a poll after it is refused at once, not held open until the next
    ping (which would also hold up the node's shutdown)."""
    endpoint = f"{server.url}/ws/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient(timeout=WAIT) as http:
        opened = await http.get(endpoint)
        sid = json.loads(opened.text[1:])["sid"]
        await http.post(
            f"{endpoint}&sid={sid}", content="40" + json.dumps({"token": expiring("x")})
        )
        seen: list[str] = []
        deadline = time.monotonic() + WAIT
        while "1" not in seen:  # polls until the Engine.IO close, each answered in < WAIT
            assert time.monotonic() < deadline, seen
            answer = await http.get(f"{endpoint}&sid={sid}")
            assert answer.status_code == 200, answer.text
            seen += answer.text.split("\x1e")
        assert any(p.startswith('42["expired"') for p in seen), seen
        assert seen.index("41") < seen.index("1")  # Socket.IO's disconnect, then the close
        after = await http.get(f"{endpoint}&sid={sid}")
    assert after.status_code == 400


async def test_a_server_rotated_to_a_new_secret_takes_tokens_of_both(tmp_path: Path) -> None:
    new = Authenticator("the secret after the rotation, 32+ characters")
    env = {"ROOMCAST_AUTH_SECRET": "the secret after the rotation, 32+ characters"}
    with run_server(
        "--auth-previous-secret", SECRET, store_url=f"sqlite:///{tmp_path}/r.db",
        log_dir=tmp_path, env=env,
    ) as rotated:  # fmt: skip
        old_client = ChatClient(rotated.url, "x", token=token("user-old"))
        new_client = ChatClient(rotated.url, "x", token=new.mint("user-new", ttl=600))
        try:
            for client in (old_client, new_client):
                await client.connect()
            assert [old_client.user["name"], new_client.user["name"]] == ["user-old", "user-new"]
            stranger = Authenticator("a secret neither side ever had, 32+ chars").mint(
                "eve", ttl=60
            )
            refused = await refusal(rotated.url, {"token": stranger}, "websocket")
            assert isinstance(refused, dict) and refused["code"] == "unauthorized"
        finally:
            for client in (old_client, new_client):
                await client.close()


async def test_a_user_has_one_id_on_every_node_and_worker(tmp_path: Path) -> None:
    ada = token("user-ada", name="Ada")
    async with engine_url("redis", tmp_path) as broker, postgres_schema() as store:
        with cluster(broker, store, tmp_path, "--auth-secret", SECRET, "--rate-limit", "0") as c:
            one, two = c.start(2)
            with run_server(
                "--broker-url", broker, "--workers", "2", store_url=store, log_dir=tmp_path,
                env={"ROOMCAST_AUTH_SECRET": SECRET},
            ) as workers:  # fmt: skip
                clients = [
                    ChatClient(url, "x", token=ada) for url in (one.url, two.url, workers.url)
                ]
                clients += [ChatClient(workers.url, "x", token=ada) for _ in range(3)]
                bob = ChatClient(two.url, "x", token=token("user-bob"))
                try:
                    for client in [*clients, bob]:
                        await client.connect()
                    assert {c.user["id"] for c in clients} == {clients[0].user["id"]}
                    assert {c.user["name"] for c in clients} == {"Ada"}
                    await bob.ok("dm", {"to": clients[0].user["id"], "text": "everywhere"})
                    for client in clients:
                        await client.wait_for(lambda c=client: c.of("dm"))
                    refused = await refusal(one.url, {"name": "ada"}, "websocket")
                    assert isinstance(refused, dict) and refused["code"] == "unauthorized"
                finally:
                    for client in [*clients, bob]:
                        await client.close()


@pytest.fixture
async def connect_token(server: Server):
    """Connect python-socketio clients with a token to ``server``; closed after the test."""
    clients: list[ChatClient] = []

    async def _connect(
        signed: str, *, name: str = "ignored", transports: list[str] | None = None
    ) -> ChatClient:
        client = ChatClient(server.url, name, token=signed, transports=transports)
        clients.append(client)
        return await client.connect()

    yield _connect
    for client in clients:
        await client.close()


async def test_tokens_of_an_identity_provider_are_checked_with_its_published_keys(
    tmp_path: Path,
) -> None:
    signing, rotated = rsa_key(), rsa_key()
    with identity_provider() as provider:
        provider.keys = [jwk_of(signing, "2026-12")]
        with run_server(
            "--auth-jwks-url", provider.url, "--auth-issuer", "https://id.example",
            store_url=f"sqlite:///{tmp_path}/p.db", log_dir=tmp_path,
        ) as srv:  # fmt: skip
            assert provider.fetches == 1  # fetched before the node took clients

            def issued(private: object, kid: str, subject: str, **claims: object) -> str:
                return sign(private, "RS256", kid, subject, iss="https://id.example", **claims)  # type: ignore[arg-type]

            ada = ChatClient(srv.url, "x", token=issued(signing, "2026-12", "ada", name="Ada"))
            await ada.connect()
            try:
                assert ada.user["name"] == "Ada"
                await ada.ok("join", {"room": "provided"})
                # The same token works on the HTTP API; one of another issuer nowhere.
                async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
                    as_ada = {"Authorization": f"Bearer {ada.token}"}
                    assert (await http.get("/api/rooms", headers=as_ada)).status_code == 200
                    foreign = sign(signing, "RS256", "2026-12", "eve", iss="https://evil")
                    as_eve = {"Authorization": f"Bearer {foreign}"}
                    assert (await http.get("/api/rooms", headers=as_eve)).status_code == 401
                # An HMAC token signed with anything is not taken by a server with no secret.
                hmac = Authenticator("a secret the server was never given, 32+").mint("eve", ttl=60)
                refused = await refusal(srv.url, {"token": hmac}, "websocket")
                assert isinstance(refused, dict) and "'HS256' is not accepted" in refused["message"]

                # The provider rotates its key: the first client with a token of the new
                # key has the node fetch the set again, waits for it, and is let in.
                provider.keys = [jwk_of(signing, "2026-12"), jwk_of(rotated, "2027-01")]
                bob_token = issued(rotated, "2027-01", "bob", name="Bob")
                assert await refusal_or_user(srv.url, bob_token) == "Bob"
                assert provider.fetches == 2
                # Over HTTP too, with a token of the new key.
                as_cy = {"Authorization": f"Bearer {issued(rotated, '2027-01', 'cy')}"}
                assert httpx.get(f"{srv.url}/api/rooms", headers=as_cy).status_code == 200
                # A made-up key just after: no fetch to wait for, refused at once.
                made_up = await refusal_or_user(srv.url, issued(rotated, "made-up", "eve"))
                assert "does not know (kid 'made-up'" in str(made_up), made_up
                assert provider.fetches == 2
                metrics = httpx.get(f"{srv.url}/metrics").text
                assert re.search(r"^roomcast_auth_public_keys\{[^}]*\} 2\.0$", metrics, re.M)
                failing = r"^roomcast_auth_key_set_fetch_failures\{[^}]*\} 0\.0$"
                assert re.search(failing, metrics, re.M)
            finally:
                await ada.close()


async def refusal_or_user(url: str, token: str) -> object:
    """The name a client with this token is welcomed as, or the ``{code, message}`` of
    its refusal: one connect either way."""
    connected, answer = await connect_answer(url, {"token": token}, "websocket")
    return answer if connected else answer["data"]  # type: ignore[index]
