from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from .clients import ChatClient
from .servers import Server, run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One roomcast server on the embedded default (memory broker, SQLite) per module."""
    with run_server(log_dir=tmp_path_factory.mktemp("server")) as srv:
        yield srv


Connect = Callable[..., Awaitable[ChatClient]]


@pytest.fixture
async def connect(server: Server) -> AsyncIterator[Connect]:
    """Connect python-socketio clients to ``server``; all are closed after the test."""
    clients: list[ChatClient] = []

    async def _connect(name: str, url: str | None = None, **kwargs: object) -> ChatClient:
        client = ChatClient(url or server.url, name, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return await client.connect()

    yield _connect
    for client in clients:
        await client.close()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
