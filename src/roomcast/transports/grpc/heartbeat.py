"""The Heartbeat service: a user is alive while its heartbeat stream is open."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from ...core.models import UserId
from ...grpc import client_to_agent_pb2 as pb2
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .errors import Context
from .users import GrpcUser, check_index

if TYPE_CHECKING:
    from .door import GrpcDoor

log = logging.getLogger(__name__)


class HeartbeatService(pb2_grpc.HeartbeatServicer):
    def __init__(self, door: GrpcDoor) -> None:
        self._door = door
        self._beating: Counter[UserId] = Counter()
        """Open heartbeat streams on this node, per user."""

    async def TryHeartbeat(
        self, request: pb2.HeartbeatRequest, context: Context
    ) -> AsyncIterator[pb2.HeartbeatReply]:
        """The server's time every second while the user is logged in; each beat keeps
        the user alive for another liveness timeout.

        When the client closes the stream (or its connection breaks) the user is removed
        at once. The stream ends by itself when the user was removed elsewhere.
        """
        user = await self._door.answer(context, self._user(context, request.index))
        self._beating[user.index] += 1
        try:
            while not self._door.stopping:
                if self._door.callers.lapsed(user.index):
                    # Ends the login: the client logs in again with a newer token.
                    await self._door.abort(
                        context, grpc.StatusCode.UNAUTHENTICATED, "the token has expired"
                    )
                if not await self._beat(user):
                    return
                yield pb2.HeartbeatReply(time=int(time.time()))
                await self._door.pause(self._door.beat)
        finally:
            self._beating[user.index] -= 1
            if self._beating[user.index] <= 0:
                del self._beating[user.index]
                if not self._door.stopping:
                    self._door.spawn(self._door.remove(user), f"removing user {user.index}")

    async def _beat(self, user: GrpcUser) -> bool:
        """Refresh the user's liveness; False once it is logged out."""
        try:
            if await self._door.users.find(user.index) is None:
                self._door.quit_here(user.index)
                return False
            await self._door.users.refresh(user)
        except Exception:
            # Presence is unreachable for now: keep the stream, the next beat retries.
            log.warning("heartbeat of user %s failed", user.index, exc_info=True)
        return True

    async def _user(self, context: Context, index: int) -> GrpcUser:
        callers = self._door.callers
        return await callers.user(await callers.identity(context), index)

    async def TryUserLives(self, request: pb2.UserRequest, context: Context) -> pb2.UserLivesReply:
        """LIVE while the user is logged in and beating, else UNKNOWN. Any user may ask
        about any other (with a valid token, on a server that checks them): LIST_USERS
        tells as much."""
        found = await self._door.answer(context, self._find(context, request.index))
        live = pb2.UserLivesReply.LIVE if found else pb2.UserLivesReply.UNKNOWN
        return pb2.UserLivesReply(status=live)

    async def _find(self, context: Context, index: int) -> GrpcUser | None:
        await self._door.callers.identity(context)  # a valid token, whoever's
        return await self._door.users.find(check_index(index))
