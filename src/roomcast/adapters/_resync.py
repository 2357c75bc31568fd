"""Running a node's reconnect handler for a broker adapter."""

from __future__ import annotations

import asyncio
import logging

from ..core.ports import ReconnectHandler

log = logging.getLogger(__name__)


class Resync:
    """Runs the node's ``on_reconnect`` handler in a task of its own, so a slow resync never
    blocks the client library's reconnect loop.

    A reconnect while a run is under way does not cancel it (that could cut a delivery in
    half); it asks for one more run when the current one is done.
    """

    def __init__(self, handler: ReconnectHandler, name: str) -> None:
        self._handler = handler
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._wanted = False
        self._closed = False

    def request(self) -> None:
        if self._closed:
            return
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while self._wanted and not self._closed:
            self._wanted = False
            try:
                await self._handler()
            except Exception:
                log.exception("the reconnect handler failed")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
