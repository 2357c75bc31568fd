"""The Agent service: login."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ...grpc import client_to_agent_pb2 as pb2
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .errors import Context

if TYPE_CHECKING:
    from .door import GrpcDoor

log = logging.getLogger(__name__)


class AgentService(pb2_grpc.AgentServicer):
    def __init__(self, door: GrpcDoor) -> None:
        self._door = door

    async def TryLogin(self, request: pb2.LoginRequest, context: Context) -> pb2.LoginReply:
        """A new user: its index, unique across the cluster, and the address of the
        Heartbeat and Lobby services (one address: roomcast serves all four on it).

        The user is in the lobby from now on and stays logged in while it beats; it has
        the liveness timeout to open its heartbeat stream.
        """
        user = await self._door.answer(context, self._door.users.login())
        log.debug("gRPC user %s logged in from %r", user.index, request.ip)
        address = self._door.address
        return pb2.LoginReply(index=user.index, heartbeat_ip=address, lobby_ip=address)
