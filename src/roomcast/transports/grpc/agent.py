"""The Agent service: login."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ...core.models import User
from ...grpc import client_to_agent_pb2 as pb2
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .errors import Context
from .users import GrpcUser

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

        On a server that checks tokens, the token's user: its index is its subject's user
        id, its name the token's, and a token that does not let it into the lobby is
        refused. Logging in again while logged in is the same user, as it is.
        """
        user = await self._door.answer(context, self._login(context))
        log.debug("gRPC user %s logged in from %r", user.index, request.ip)
        address = self._door.address
        return pb2.LoginReply(index=user.index, heartbeat_ip=address, lobby_ip=address)

    async def _login(self, context: Context) -> GrpcUser:
        callers, users = self._door.callers, self._door.users
        identity = await callers.identity(context)
        if identity is None:
            return await users.login()
        await callers.check_entry(identity, await users.lobby())
        index = await callers.index_of(identity)
        return await users.login_as(User(index, identity.name))
