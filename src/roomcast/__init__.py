"""roomcast: a real-time chat server that keeps working when it is scaled out.

Rooms, presence and history over Socket.IO (and gRPC); one process with an in-memory broker
and SQLite by default, many workers and hosts through Redis, RabbitMQ or NATS.

Embedding::

    from fastapi import FastAPI
    from roomcast import Settings, create_app

    chat = create_app(Settings(store_url="sqlite:///./chat.db"))
    app = FastAPI(lifespan=chat.lifespan)
    app.mount("/chat", chat)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RoomcastApp", "Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from .app import RoomcastApp, create_app
    from .config import Settings


def __getattr__(name: str) -> Any:
    # Imported on first use so `import roomcast` stays cheap for the CLI and the tools.
    if name in ("RoomcastApp", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "Settings":
        from .config import Settings

        return Settings
    raise AttributeError(name)
