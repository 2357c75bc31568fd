"""roomcast mounted into a team's own FastAPI application, as examples/embed_fastapi.py does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .clients import ChatClient
from .servers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host_app(tmp_path):
    port = free_port()
    log = tmp_path / "host.log"
    env = {
        **os.environ,
        "CHAT_STORE_URL": f"sqlite:///{tmp_path}/chat.db",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.embed_fastapi:app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/chat", process, log, 20)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


async def test_mounted_roomcast_chats_beside_the_host_routes(host_app):
    assert get_json(host_app + "/hello") == {"hello": "from the host application"}
    url = host_app
    alice = ChatClient(url, "alice")
    bob = ChatClient(url, "bob")
    try:
        for client in (alice, bob):
            await client.sio.connect(
                url, socketio_path="/chat/ws/socket.io", auth={"name": client.name}, wait_timeout=10
            )
        room = (await alice.ok("join", {"room": "my_room"}))["room"]["id"]
        await bob.ok("join", {"room": "my_room"})
        await bob.ok("send", {"room": "my_room", "text": 'I\'m in "my_room"!'})
        assert await alice.wait_messages(room, 1) == ['I\'m in "my_room"!']
        rooms = get_json(host_app + "/chat/api/rooms")["rooms"]
        assert [(r["name"], r["members"]) for r in rooms] == [("my_room", 2)]
        with urllib.request.urlopen(host_app + "/chat/", timeout=5) as page:
            assert b"<html" in page.read().lower()
    finally:
        await alice.close()
        await bob.close()


async def test_the_mount_point_without_slash_redirects_to_the_page(host_app):
    import httpx

    async with httpx.AsyncClient() as http:
        response = await http.get(host_app + "/chat")
        assert response.status_code in (307, 308)
        assert response.headers["location"].endswith("/chat/")
