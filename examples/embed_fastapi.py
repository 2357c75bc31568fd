"""Mount roomcast into an existing FastAPI application.

Run it::

    uvicorn examples.embed_fastapi:app --port 8000

Your own routes keep working (``GET /hello``); the chat lives under ``/chat``: the page at
``/chat/``, the REST API at ``/chat/api/...``, and Socket.IO clients connect with
``socketio_path="/chat/ws/socket.io"``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from roomcast import Settings, create_app

chat = create_app(
    Settings(
        store_url=os.environ.get("CHAT_STORE_URL", "sqlite:///./chat.db"),
        grpc_port=0,  # this application serves HTTP only; set a port to add the gRPC door
    )
)

# The host application runs roomcast's startup and shutdown with its own.
app = FastAPI(title="my product", lifespan=chat.lifespan)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from the host application"}


app.mount("/chat", chat)
