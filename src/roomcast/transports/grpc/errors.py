"""Refusals as gRPC statuses: every error a servicer meets ends the call with a status and a
message, never with a traceback on the client's side or a crash in the server."""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc

from ...exceptions import ChatError, ErrorCode, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

Context = Any
"""``grpc.aio.ServicerContext`` (grpc ships no type information)."""

_STATUS = {
    ErrorCode.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_EVENT: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.INVALID_ROOM: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_TEXT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_NAME: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_MEMBER: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def chosen_id(chat: Any) -> str | None:
    """The id a ``Chat`` sent to TryChatSend carries, if its sender chose one."""
    return str(chat.id) if chat.HasField("id") else None


def status_of(code: ErrorCode) -> Any:
    """The gRPC status code for a roomcast error code."""
    return _STATUS.get(code, grpc.StatusCode.FAILED_PRECONDITION)


async def answer(
    context: Context, call: Awaitable[T], refused: collections.Counter[str] | None = None
) -> T:
    """Await ``call``; end the gRPC call with a status for what it raises (each counted in
    ``refused`` by the status's name, when given):

    ==============================  =====================================================
    ChatError                       its code mapped (INVALID_ARGUMENT, NOT_FOUND,
                                    UNAUTHENTICATED, PERMISSION_DENIED, ...)
    UnavailableError                UNAVAILABLE
    anything else                   INTERNAL, logged here
    ==============================  =====================================================
    """
    try:
        return await call
    except grpc.aio.AbortError:
        raise
    except ChatError as exc:
        await abort(context, status_of(exc.code), exc.message, refused)
    except UnavailableError:
        await abort(
            context, grpc.StatusCode.UNAVAILABLE, "an engine is unavailable, try again", refused
        )
    except Exception:
        log.exception("a gRPC call failed")
        await abort(context, grpc.StatusCode.INTERNAL, "internal error, try again", refused)


async def abort(
    context: Context, code: Any, message: str, refused: collections.Counter[str] | None = None
) -> NoReturn:
    """End the call with ``code`` and ``message`` (raises grpc.aio.AbortError), counted in
    ``refused`` by the code's name when given."""
    if refused is not None:
        refused[code.name] += 1
    await context.abort(code, message)
    raise AssertionError("context.abort() returned")
