"""Settings and the CLI: one flag per field, ROOMCAST_* variables, the embedded defaults."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from roomcast.cli import build_parser, settings_from
from roomcast.config import Settings


def test_the_defaults_are_the_embedded_single_process_server(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"ROOMCAST_{name.upper()}", raising=False)
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.broker_url == "memory://"
    assert settings.store_url == "sqlite:///./roomcast.db"
    assert settings.socketio_path == "/ws/socket.io"
    assert settings.workers == 1


def test_every_setting_is_a_serve_flag():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest for a in serve._actions if a.option_strings and a.dest != "help"}
    assert flags == set(Settings.model_fields)


def test_environment_sets_and_a_flag_wins(monkeypatch):
    monkeypatch.setenv("ROOMCAST_PORT", "9100")
    monkeypatch.setenv("ROOMCAST_BROKER_URL", "redis://example:6379/0")
    args = build_parser().parse_args(["serve", "--port", "9200"])
    settings = settings_from(args)
    assert settings.port == 9200
    assert settings.broker_url == "redis://example:6379/0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port"),
        (["--socketio-path", "/"], "--socketio-path"),
        (["--node-id", "has.dots"], "--node-id"),
        (["--broker-url", "kafka://x"], "unknown broker URL scheme"),
        (["--workers", "2"], "--workers > 1 needs a broker"),
        (
            ["--workers", "2", "--broker-url", "redis://127.0.0.1:1/0", "--node-id", "n" * 62],
            "is too long for 2 workers",
        ),
    ],
)
def test_bad_settings_exit_2_with_a_message(flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "roomcast", "serve", "--grpc-port", "0", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_workers_on_a_port_another_process_listens_on_exit_2_with_a_message():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable, "-m", "roomcast", "serve", "--grpc-port", "0",
                "--port", str(port), "--workers", "2", "--broker-url", "redis://127.0.0.1:1/0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_roomcast_token_prints_a_token_the_servers_of_its_secret_accept(monkeypatch):
    from roomcast.core.auth import Authenticator

    secret = "the secret of every node, 32+ characters"
    monkeypatch.setenv("ROOMCAST_AUTH_SECRET", secret)
    printed = []
    for extra in ([], ["--moderator", "--room", "general", "--name", "Mod"]):
        result = subprocess.run(
            [sys.executable, "-m", "roomcast", "token", "ada", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        printed.append(Authenticator(secret).verify(result.stdout.strip()))
    plain, moderator = printed
    assert (plain.subject, plain.name, plain.rooms, plain.moderator) == ("ada", "ada", None, False)
    assert (moderator.name, moderator.rooms, moderator.moderator) == ("Mod", ("general",), True)
