"""The python-socketio baseline: roomcast's chat protocol on a stock python-socketio server.

    python bench/baselines/psio_server.py --port 8001 [--manager redis|aiopika --url URL
                                                       --channel NAME] [--path /ws/socket.io]

An ``AsyncServer`` on uvicorn (ASGI), the way python-socketio's documentation sets it up;
with ``--manager`` one of its client managers (``AsyncRedisManager``,
``AsyncAioPikaManager``) shares rooms with the other processes. It speaks the subset of
roomcast's protocol the benchmarks use: connect with ``auth {name}`` (``welcome``),
``join {room}`` and ``send {room, text}`` answered by acks, and the ``message`` event with
roomcast's fields ``{room, seq, epoch, id, user, text, ts}`` to every member of the room, the
sender included. It stores nothing and orders nothing across processes (``seq`` counts per
process).

``GET /stats`` answers ``{"pubsub_messages", "pubsub_bytes", "queue"}``: what this process
received from its manager's broker, and the name of its RabbitMQ queue (for cleanup).
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
import zlib
from typing import Any

import socketio
import uvicorn

STATS: dict[str, Any] = {"pubsub_messages": 0, "pubsub_bytes": 0, "queue": None}


def _counting(manager_class: type) -> type:
    """The manager class with a count of the pub/sub messages it receives."""

    class Counting(manager_class):  # type: ignore[misc]
        async def _listen(self) -> Any:
            async for message in super()._listen():
                STATS["pubsub_messages"] += 1
                if isinstance(message, bytes | str):
                    STATS["pubsub_bytes"] += len(message)
                yield message

        async def _queue(self, channel: Any, exchange: Any) -> Any:  # aio-pika only
            queue = await super()._queue(channel, exchange)
            STATS["queue"] = queue.name
            return queue

    return Counting


def make_manager(kind: str, url: str, channel: str) -> Any:
    if kind == "none":
        return None
    if kind == "redis":
        return _counting(socketio.AsyncRedisManager)(url, channel=channel)
    if kind == "aiopika":
        return _counting(socketio.AsyncAioPikaManager)(url, channel=channel)
    raise SystemExit(f"unknown manager {kind!r}")


def build_app(manager: Any, path: str) -> Any:
    sio = socketio.AsyncServer(
        async_mode="asgi", client_manager=manager, cors_allowed_origins="*", logger=False
    )
    users: dict[str, dict[str, Any]] = {}
    seqs: dict[str, int] = {}
    epoch = secrets.token_hex(4)
    next_user = [0]

    def room_id(name: str) -> int:
        return zlib.crc32(name.encode()) & 0x7FFFFFFF

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        name = auth.get("name") if isinstance(auth, dict) else None
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 32:
            raise socketio.exceptions.ConnectionRefusedError(
                "invalid name", {"code": "invalid_name", "message": "invalid name"}
            )
        next_user[0] += 1
        user = {"id": next_user[0], "name": name.strip()}
        users[sid] = user
        await sio.emit("welcome", {"user": user}, to=sid)

    async def disconnect(sid: str, reason: Any = None) -> None:
        users.pop(sid, None)

    async def join(sid: str, data: Any) -> dict[str, Any]:
        room = data.get("room") if isinstance(data, dict) else None
        if not isinstance(room, str) or not room:
            return {"ok": False, "error": {"code": "invalid_room", "message": "bad room"}}
        await sio.enter_room(sid, room)
        members = [users[s] for s, _ in sio.manager.get_participants("/", room) if s in users]
        return {
            "ok": True,
            "room": {"id": room_id(room), "name": room},
            "epoch": epoch,
            "seq": seqs.get(room, 0),
            "members": members,
        }

    async def send(sid: str, data: Any) -> dict[str, Any]:
        room = data.get("room") if isinstance(data, dict) else None
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(room, str) or room not in sio.rooms(sid):
            return {"ok": False, "error": {"code": "not_member", "message": "join first"}}
        if not isinstance(text, str) or not 1 <= len(text) <= 4000:
            return {"ok": False, "error": {"code": "invalid_text", "message": "bad text"}}
        seq = seqs[room] = seqs.get(room, 0) + 1
        message = {
            "room": room_id(room),
            "seq": seq,
            "epoch": epoch,
            "id": secrets.token_hex(8),
            "user": users[sid],
            "text": text,
            "ts": int(time.time() * 1000),
        }
        await sio.emit("message", message, room=room)
        return {"ok": True, "message": message}

    for handler in (connect, disconnect, join, send):
        sio.on(handler.__name__, handler)

    async def stats_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.dumps(STATS).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return socketio.ASGIApp(sio, other_asgi_app=stats_app, socketio_path=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws/socket.io")
    parser.add_argument("--manager", choices=["none", "redis", "aiopika"], default="none")
    parser.add_argument("--url", default="")
    parser.add_argument("--channel", default="socketio")
    args = parser.parse_args()
    app = build_app(make_manager(args.manager, args.url, args.channel), args.path)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
