"""Requests that are not protobuf messages of their method's type end with INVALID_ARGUMENT.

grpc.aio parses a request before the servicer sees it, and a parse that fails ends the
call with UNKNOWN ("Unexpected <class 'DecodeError'>") and an ERROR with a traceback in
the node's log — one per call, so a client sending garbage in a loop floods the log. The
handlers registered here parse without raising; a request that did not parse reaches a
thin wrapper of the servicer's method, which ends the call with INVALID_ARGUMENT and a
message naming the expected type, counted with the door's other refusals.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import Context


class Malformed:
    """What a request that did not parse is handed to the servicer as."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _parser(parse: Callable[[bytes], Any], expected: str) -> Callable[[bytes], Any]:
    def parse_or_mark(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (DecodeError, ValueError) as exc:
            return Malformed(f"the request is not a valid {expected} ({exc})")

    return parse_or_mark


def _checked(behavior: Callable[..., Any], refused: collections.Counter[str]) -> Callable[..., Any]:
    async def refuse(request: Malformed, context: Context) -> None:
        refused[grpc.StatusCode.INVALID_ARGUMENT.name] += 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            await refuse(request, context)
        return await behavior(request, context)

    return unary


class _Taken:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` runs, and
    keeps the method handlers it registers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services[service] = handlers


def add_checked(
    server: Any,
    add: Callable[[Any, Any], None],
    servicer: object,
    refused: collections.Counter[str],
) -> None:
    """Register ``servicer`` as the generated ``add`` would, with requests that do not
    parse refused with INVALID_ARGUMENT (counted in ``refused``)."""
    taken = _Taken()
    add(servicer, taken)
    for service, handlers in taken.services.items():
        checked = {}
        for name, handler in handlers.items():
            kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
            behavior = getattr(handler, kind)
            message_type = getattr(handler.request_deserializer, "__self__", None)
            expected = getattr(message_type, "__name__", "request message")
            checked[name] = handler._replace(
                request_deserializer=_parser(handler.request_deserializer, expected),
                **{kind: _checked(behavior, refused)},
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        server.add_registered_method_handlers(service, checked)
