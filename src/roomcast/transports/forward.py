"""Forwarding an Engine.IO request to the worker that owns its session (see workers.py).

Plain HTTP (long-polling GET/POST) goes through an httpx client over the owner's Unix
socket; a WebSocket upgrade is bridged frame by frame to a WebSocket opened on the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
from websockets.asyncio.client import unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

log = logging.getLogger(__name__)

Scope = dict[str, Any]

# Longer than Engine.IO's ping interval + timeout: a polling GET waits that long for data.
POLL_TIMEOUT = 60.0
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"content-length"}
_UNKNOWN_SESSION = b'{"code":1,"message":"Session ID unknown"}'


class Forwarder:
    """Forwards requests to sibling workers; one connection pool per sibling."""

    def __init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}

    def _client(self, uds: str) -> httpx.AsyncClient:
        client = self._clients.get(uds)
        if client is None:
            client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=uds),
                timeout=httpx.Timeout(POLL_TIMEOUT, connect=5.0),
            )
            self._clients[uds] = client
        return client

    async def http(self, scope: Scope, receive: Any, send: Any, uds: str) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope.get("root_path", "") + scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://worker{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        try:
            response = await self._client(uds).request(
                scope["method"], url, headers=headers, content=bytes(body)
            )
        except httpx.HTTPError:
            log.info("owner worker at %s did not answer", uds)
            await _respond(send, 400, [(b"content-type", b"application/json")], _UNKNOWN_SESSION)
            return
        out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
        await _respond(send, response.status_code, out, response.content)

    async def websocket(self, scope: Scope, receive: Any, send: Any, uds: str) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = scope.get("root_path", "") + scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        uri = f"ws://worker{path}" + (f"?{query}" if query else "")
        try:
            upstream = await unix_connect(uds, uri, open_timeout=5, max_size=1 << 20)
        except (OSError, InvalidHandshake, TimeoutError):
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept"})

        async def client_to_owner() -> None:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    await upstream.close()
                    return
                data = event.get("text") if event.get("text") is not None else event.get("bytes")
                if data is not None:
                    await upstream.send(data)

        async def owner_to_client() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for data in upstream:
                    if isinstance(data, str):
                        await send({"type": "websocket.send", "text": data})
                    else:
                        await send({"type": "websocket.send", "bytes": data})
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1000})

        tasks = [asyncio.create_task(client_to_owner()), asyncio.create_task(owner_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
