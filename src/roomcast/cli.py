"""The ``roomcast`` command.

``roomcast serve`` takes one flag per :class:`~roomcast.config.Settings` field
(``--broker-url`` sets ``broker_url``); every flag can also be given as a ``ROOMCAST_*``
environment variable, and a flag wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError

from . import __version__
from .config import Settings
from .exceptions import ConfigError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags leave the field to the environment."""
    for name, field in Settings.model_fields.items():
        choices = None
        annotation = field.annotation
        args = get_args(annotation)
        if args and all(isinstance(a, str) for a in args):
            choices = list(args)
        elif annotation is bool:
            choices = ["true", "false"]
        default = field.default
        env = f"ROOMCAST_{name.upper()}"
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else name.split("_")[-1].upper(),
            help=f"{field.description} (default: {default}; env {env})",
        )


def settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import run

    settings = settings_from(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.workers > 1:
        from .workers import serve

        return serve(settings, settings.workers)
    run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roomcast", description="A real-time chat server that keeps working scaled out."
    )
    parser.add_argument("--version", action="version", version=f"roomcast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a roomcast node")
    add_settings_flags(serve)
    serve.set_defaults(run=_serve)
    token = commands.add_parser(
        "token",
        help="print a token for a user (with the auth secret of the servers)",
        description="Print a signed token that a server started with the same --auth-secret "
        "accepts. Your application's backend signs its users' tokens itself (any JWT "
        "library, HS256); this is for trying roomcast out, scripts and tests.",
    )
    token.add_argument("subject", help="the user's stable id in your application (the 'sub')")
    token.add_argument("--name", help="the name the others see (default: the subject)")
    token.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="ROOM",
        help="a room the user may enter, or a 'prefix*' (repeat it; default: every room)",
    )
    token.add_argument(
        "--moderator",
        action="store_true",
        help="the user may delete any message of the rooms it may enter (default: its own)",
    )
    token.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds the token is valid (default: 3600)"
    )
    for name in ("auth_secret", "auth_audience", "auth_issuer"):
        field = Settings.model_fields[name]
        token.add_argument(
            _flag(name),
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} (env ROOMCAST_{name.upper()})",
        )
    token.set_defaults(run=_token)
    chat = commands.add_parser("chat", help="chat from a terminal (Socket.IO, or --grpc)")
    try:
        from .chat import add_arguments
    except ImportError:  # the terminal client's optional dependencies are missing
        chat.set_defaults(run=_chat_unavailable)
    else:
        add_arguments(chat)
        chat.set_defaults(run=_chat)
    return parser


def _token(args: argparse.Namespace) -> int:
    from .exceptions import ChatError

    settings = settings_from(args)
    authenticator = settings.authenticator()
    if authenticator is None or settings.auth_secret is None:
        print("roomcast: --auth-secret (or ROOMCAST_AUTH_SECRET) is required", file=sys.stderr)
        return 2
    if not 0 < args.ttl <= 10 * 365 * 86400:
        print("roomcast: --ttl: between 0 and ten years of seconds", file=sys.stderr)
        return 2
    try:
        print(
            authenticator.mint(
                args.subject,
                ttl=args.ttl,
                name=args.name,
                rooms=args.rooms,
                moderator=args.moderator,
            )
        )
    except ChatError as exc:
        print(f"roomcast: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import run

    return run(args)


def _chat_unavailable(args: argparse.Namespace) -> int:
    print("roomcast chat needs: pip install 'roomcast[chat,grpc]'", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.run(args)
    except ValidationError as exc:
        for error in exc.errors():
            where = _flag(str(error["loc"][0])) if error["loc"] else "settings"
            print(f"roomcast: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"roomcast: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result)
