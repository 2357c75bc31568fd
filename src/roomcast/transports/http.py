"""The HTTP door (FastAPI): the REST API, health, metrics and the chat page.

OpenAPI is served at ``/docs``. Errors have the same shape as Socket.IO acks:
``{"ok": false, "error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core import validation
from ..core.auth import Identity
from ..core.models import RoomId, UserId
from ..core.service import ChatService, members_wire, rooms_wire
from ..core.validation import HISTORY_LIMIT_MAX, MEMBERS_LIMIT_MAX, ROOMS_LIMIT_MAX
from ..exceptions import ChatError, ErrorCode, UnavailableError
from ..node import Node
from .schema import (
    ERRORS,
    HealthReply,
    MembersReply,
    MessageEdit,
    MessageIn,
    MessageReply,
    MessagesReply,
    RoomsReply,
)

WEB_DIR = pathlib.Path(__file__).resolve().parent.parent / "web"

log = logging.getLogger(__name__)

_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CONFLICT: 409,
}

BODY_MAX = 64 * 1024
"""The largest request body the API reads: a message of 4000 characters, each escaped in
JSON as ``\\uXXXX``, with its other fields."""


class _BodyLimit:
    """Reads no request body past :data:`BODY_MAX`: one without a ``Content-Length`` is a
    411, a longer one a 413 (the server reading the body stops at its length)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            status, why = 0, ""
            if length is None:
                status, why = 411, "a 'Content-Length' header is required"
            elif not length.isdigit() or int(length) > BODY_MAX:
                status, why = 413, f"a request body is at most {BODY_MAX} bytes"
            if status:
                error = ChatError(ErrorCode.BAD_REQUEST, why)
                response = JSONResponse({"ok": False, "error": error.to_dict()}, status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_bearer = HTTPBearer(
    auto_error=False,
    description="On a server started with an auth secret: a token its application signed "
    "(see docs/protocol.md, Authentication). An open server reads none.",
)


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Identity | None:
    """Who calls: on a server that checks tokens the bearer token's user (else
    ``unauthorized``); None on an open server."""
    service: ChatService = request.app.state.service
    if service.auth is None:
        return None
    if credentials is None:
        raise ChatError(
            ErrorCode.UNAUTHORIZED, "an 'Authorization: Bearer TOKEN' header is required"
        )
    return await service.auth.check(credentials.credentials)


def _anyone() -> None:
    """Who calls an open server: nobody in particular (its schema then names no token)."""
    return None


ROOM = Path(
    description="a room id (1 to 2147483647) or a room name (1 to 64 printable characters "
    "after trimming)",
    examples=["lobby", "42"],
)


def _room_ref(room: str) -> RoomId | str:
    """A ``{room}`` of a path: a room id (digits) or a name, checked as the Socket.IO
    events check theirs (an id out of range or a name that cannot be one: ``invalid_room``)."""
    if not (room.isascii() and room.isdigit()):
        return validation.room_ref({"room": room})
    if len(room) > 16:  # past any room id, and past what int() takes (4,300 digits)
        raise ChatError(ErrorCode.INVALID_ROOM, "a room id is a positive integer")
    return validation.room_ref({"room": int(room)})


def create_http_app(node: Node) -> FastAPI:
    """The FastAPI application of one node."""
    app = FastAPI(
        title="roomcast",
        summary="Rooms, presence and history for real-time chat",
        version=_version(),
    )
    service = node.service

    app.state.service = service
    app.add_middleware(_BodyLimit)
    # The bearer scheme is in the OpenAPI document only where a token is read: a client
    # generated from an open server's document must not ask for one.
    caller = Depends(_caller if service.auth is not None else _anyone)

    def source(request: Request, identity: Identity | None) -> str:
        """Who calls, for the rate limits: the token's user, else the client's address
        (the ``X-Forwarded-For`` one behind a proxy uvicorn trusts)."""
        if identity is not None:
            return f"user {identity.subject}"
        return f"address {request.client.host if request.client else ''}"

    async def reading(request: Request, identity: Identity | None = caller) -> Identity | None:
        """The caller of a read, counted against its ``request_rate_limit`` (429 past it)."""
        service.spend_read(source(request, identity))
        return identity

    reader = Depends(reading)

    @app.exception_handler(ChatError)
    async def chat_error(request: Request, exc: ChatError) -> JSONResponse:
        status = _STATUS.get(exc.code, 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"ok": False, "error": exc.to_dict()}, status, headers=headers)

    @app.exception_handler(UnavailableError)
    async def unavailable(request: Request, exc: UnavailableError) -> JSONResponse:
        # An engine the request needs (presence, the store) is out of reach: a 503 with
        # the protocol's code, as a Socket.IO event gets, not a 500 and a traceback.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        error = ChatError(ErrorCode.UNAVAILABLE, "the service is unavailable, try again")
        return JSONResponse({"ok": False, "error": error.to_dict()}, 503)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing's own refusals (no such path, a method the path does not take), in the
        # shape of every other error, with every method the path takes in Allow.
        if exc.status_code == 405:
            allowed = sorted(
                {
                    method
                    for route in app.routes
                    if isinstance(route, APIRoute)
                    and route.matches(request.scope)[0] is not Match.NONE
                    for method in route.methods or ()
                }
            )
            error = ChatError(
                ErrorCode.BAD_REQUEST,
                f"{request.method} is not a method of this path ({', '.join(allowed)} are)",
            )
            return JSONResponse(
                {"ok": False, "error": error.to_dict()}, 405, {"Allow": ", ".join(allowed)}
            )
        if exc.status_code == 404:
            error = ChatError(ErrorCode.NOT_FOUND, f"no such path: {request.url.path}")
        else:
            error = ChatError(ErrorCode.BAD_REQUEST, str(exc.detail))
        return JSONResponse({"ok": False, "error": error.to_dict()}, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        error = ChatError(ErrorCode.BAD_REQUEST, where or "bad request")
        return JSONResponse({"ok": False, "error": error.to_dict()}, 400)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(
        "/healthz",
        summary="Liveness and engine health",
        response_model=None,
        responses={
            200: {"model": HealthReply},
            503: {
                "model": HealthReply,
                "description": "the node is not running or its broker is out of reach",
            },
        },
    )
    async def healthz() -> JSONResponse:
        healthy = node.started and node.broker.healthy
        body = {
            "ok": healthy,
            "node": node.id,
            "broker": node.broker.healthy,
            "node_id_shared": bool(node.service.shared_id),
        }
        return JSONResponse(body, 200 if healthy else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/api/rooms",
        summary="Every room with its member count across the cluster",
        response_model=None,
        responses={200: {"model": RoomsReply}, **ERRORS},
    )
    async def rooms(
        identity: Identity | None = reader,
        occupied: bool = Query(False, description="only the rooms with members, most first"),
        after: int | None = Query(
            None, ge=0, le=2**53, description="a page of every room: ids above this one"
        ),
        limit: int | None = Query(
            None, ge=1, le=ROOMS_LIMIT_MAX, description="at most this many rooms"
        ),
    ) -> dict[str, Any]:
        """Every room by id, or with ``occupied=true`` only the rooms with members, most
        members first. ``limit`` (and ``after`` for every room) pages through them: a
        page of every room that more rooms follow says in ``next`` the ``after`` of the
        next one. A token that names its rooms sees only those."""
        if occupied and after is not None:
            raise ChatError(ErrorCode.BAD_REQUEST, "'after' pages every room, not 'occupied'")
        first = None if after is None else RoomId(after)
        if limit is not None and not occupied:
            return {"ok": True, **rooms_wire(*await service.rooms_page(first, limit, identity))}
        infos = await service.rooms(occupied=occupied, after=first, limit=limit, identity=identity)
        return {"ok": True, **rooms_wire(infos)}

    @app.get(
        "/api/rooms/{room}/messages",
        summary="A page of a room's history, ascending",
        response_model=None,
        responses={200: {"model": MessagesReply}, **ERRORS},
    )
    async def messages(
        room: str = ROOM,
        identity: Identity | None = reader,
        before: int | None = Query(
            None, gt=0, le=2**53, description="only messages with a lower seq"
        ),
        limit: int = Query(50, ge=1, le=HISTORY_LIMIT_MAX),
    ) -> dict[str, Any]:
        page = await service.history_page(_room_ref(room), before, limit, identity)
        return {"ok": True, "messages": [m.to_wire() for m in page]}

    @app.post(
        "/api/rooms/{room}/messages",
        summary="Send a message into a room",
        response_model=None,
        responses={200: {"model": MessageReply}, **ERRORS},
    )
    async def post_message(
        request: Request,
        body: MessageIn,
        room: str = ROOM,
        identity: Identity | None = caller,
    ) -> dict[str, Any]:
        """Store a message in the room and deliver it to every member, as a member's
        ``send`` does: for an application's backend, a bot or a script. The room must
        exist; the sender need not be in it. On a server that checks tokens the sender
        is the token's user; on an open server it names itself (``name``). The answer is
        the stored message, with its ``seq``, once it is durable; a retry with the same
        ``id`` stores nothing and answers with the message stored before. Rate: the
        server's ``rate_limit`` per sender (per token user; on an open server per client
        address)."""
        message = await service.post(
            _room_ref(room),
            body.text,
            body.id,
            identity=identity,
            name=body.name,
            source=source(request, identity),
        )
        return {"ok": True, "message": message.to_wire()}

    @app.patch(
        "/api/rooms/{room}/messages/{seq}",
        summary="Edit a message of a room",
        response_model=None,
        responses={200: {"model": MessageReply}, **ERRORS},
    )
    async def edit_message(
        request: Request,
        body: MessageEdit,
        room: str = ROOM,
        seq: int = Path(gt=0, le=2**53, description="the message's seq"),
        identity: Identity | None = caller,
    ) -> dict[str, Any]:
        """Replace a message's text: it keeps its place in the room's history (seq, id,
        sender, time) and says when it was edited (``edited``); every member of the room
        gets an ``edited`` event with the message as it is now. On a server that checks
        tokens only the message's sender may (the token's user); an open server trusts its
        callers. A deleted message cannot be edited (404). The answer is the edited
        message. Rate: as for sending."""
        message = await service.revise(
            _room_ref(room),
            seq,
            body.text,
            identity=identity,
            source=source(request, identity),
        )
        return {"ok": True, "message": message.to_wire()}

    @app.delete(
        "/api/rooms/{room}/messages/{seq}",
        summary="Delete a message of a room",
        response_model=None,
        responses={200: {"model": MessageReply}, **ERRORS},
    )
    async def delete_message(
        request: Request,
        room: str = ROOM,
        seq: int = Path(gt=0, le=2**53, description="the message's seq"),
        identity: Identity | None = caller,
    ) -> dict[str, Any]:
        """Delete a message: it keeps its place in the room's history (seq, id, sender,
        time) and its text is gone for good; every member of the room gets a ``deleted``
        event. On a server that checks tokens, the token's user may delete its own
        messages, and a moderator's token (``moderator: true``) any message, in the rooms
        the token lets its user into; an open server trusts its callers and deletes any
        message. The answer is the deleted message. Rate: as for sending."""
        message = await service.remove(
            _room_ref(room), seq, identity=identity, source=source(request, identity)
        )
        return {"ok": True, "message": message.to_wire()}

    @app.get(
        "/api/rooms/{room}/members",
        summary="A room's members across the cluster",
        response_model=None,
        responses={200: {"model": MembersReply}, **ERRORS},
    )
    async def members(
        room: str = ROOM,
        identity: Identity | None = reader,
        after: int | None = Query(
            None, ge=0, le=2**53, description="by user id: members with ids above this one"
        ),
        limit: int | None = Query(
            None, ge=1, le=MEMBERS_LIMIT_MAX, description="by user id: at most this many"
        ),
    ) -> dict[str, Any]:
        """Every member in join order, or with ``after`` / ``limit`` a page of them by user
        id; a page that more members follow says in ``next`` the ``after`` of the next."""
        found, users, following = await service.members(
            _room_ref(room),
            after=None if after is None else UserId(after),
            limit=limit,
            identity=identity,
        )
        return {"ok": True, "room": found.to_wire(), **members_wire(users, following)}

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _version() -> str:
    from .. import __version__

    return __version__
