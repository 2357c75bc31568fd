"""``roomcast chat``: chat from a terminal, over Socket.IO or (``--grpc``) the gRPC door.

The modules::

    commands          what a typed line asks for (pure)
    view              how things look on the terminal (pure)
    backend           the Backend and Screen protocols, CommandFailed
    app               the prompt_toolkit prompt that drives a Backend
    socketio_backend  a Backend over Socket.IO
    grpc_backend      a Backend over the gRPC door (Agent, Heartbeat, Lobby, Channel)

Importing this package is cheap: the client's modules load when :func:`run` is called.
It fails with ImportError when prompt_toolkit, the ``chat`` extra, is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib.util
import os
import sys

from .backend import TOKEN_ENV

if importlib.util.find_spec("prompt_toolkit") is None:
    raise ImportError("roomcast chat needs prompt_toolkit: pip install 'roomcast[chat]'")

__all__ = ["add_arguments", "run"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_AGENT = "127.0.0.1:50050"
GRPC_HINT = (
    "the gRPC client needs grpcio and the generated stubs: "
    "pip install 'roomcast[grpc]' and make proto (bash scripts/build-proto.sh)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``roomcast chat``."""
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"roomcast server to connect to (default: {DEFAULT_URL})"
    )
    parser.add_argument("--name", help="your nickname (default: your login name)")
    parser.add_argument(
        "--token",
        help="a token, for a server that checks them (your name is then the token's); "
        f"better in the environment, {TOKEN_ENV}: a command line is visible to other users",
    )
    parser.add_argument(
        "--socketio-path",
        default="/ws/socket.io",
        metavar="PATH",
        help="path of the server's Socket.IO endpoint (default: /ws/socket.io)",
    )
    parser.add_argument("--room", default="lobby", help="room to go into at start (default: lobby)")
    parser.add_argument(
        "--grpc", action="store_true", help="connect through the gRPC door instead of Socket.IO"
    )
    parser.add_argument(
        "--agent",
        default=DEFAULT_AGENT,
        metavar="HOST:PORT",
        help=f"the gRPC door's Agent service, with --grpc (default: {DEFAULT_AGENT})",
    )


def _default_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "guest"


def run(args: argparse.Namespace) -> int:
    """Run the client until the user leaves; the exit code."""
    from .app import TerminalScreen, main
    from .backend import Backend

    screen = TerminalScreen()
    name = args.name or _default_name()
    token = args.token or os.environ.get(TOKEN_ENV) or None
    backend: Backend
    if args.grpc:
        try:
            from .grpc_backend import GrpcBackend
        except (ImportError, RuntimeError) as exc:  # no grpcio, no stubs, stale stubs
            print(f"roomcast chat --grpc: {exc}", file=sys.stderr)
            print(GRPC_HINT, file=sys.stderr)
            return 2
        backend = GrpcBackend(screen, agent=args.agent, name=name, room=args.room, token=token)
    else:
        from .socketio_backend import SocketIOBackend

        backend = SocketIOBackend(
            screen, url=args.url, name=name, path=args.socketio_path, room=args.room, token=token
        )
    try:
        return asyncio.run(main(backend, screen))
    except KeyboardInterrupt:
        # Ctrl-C before the prompt was up (while connecting): main() has closed up.
        return 0
