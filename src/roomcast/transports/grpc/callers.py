"""Who calls the gRPC door, on a server that checks tokens (``--auth-secret``).

Every call carries its token in the metadata ``authorization: Bearer TOKEN`` and is checked
on its own — a client dials three addresses and its calls may land on any node. What a
call may do follows from the token::

    no token, or not a valid one            UNAUTHORIZED (every call)
    an index that is not the token's user   FORBIDDEN    (calls acting as a user)
    a room the token does not let it into   FORBIDDEN    (entering or reading a room)

A token's user index is its subject's user id (``History.user_id_for``): the same on every
node and for its Socket.IO connections. On an open server nothing here checks anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TypeVar

from ...core.auth import Identity, past
from ...core.models import Room, RoomId, UserId
from ...core.service import ChatService
from ...exceptions import ChatError, ErrorCode, UnavailableError
from .errors import Context
from .users import GrpcUser, Users, check_index

K = TypeVar("K")
V = TypeVar("V")

METADATA_KEY = "authorization"
"""The metadata entry that carries a call's token (gRPC keys are lower case)."""

CACHE_MAX = 10_000
"""Subjects (and room names) whose user ids this node keeps, the most recently used."""


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of a call's ``authorization: Bearer TOKEN`` metadata; ``unauthorized``
    when there is none or it has another shape."""
    value = next((v for k, v in metadata or () if k == METADATA_KEY), None)
    if value is None:
        raise ChatError(
            ErrorCode.UNAUTHORIZED, "an 'authorization: Bearer TOKEN' metadata entry is required"
        )
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ChatError(
            ErrorCode.UNAUTHORIZED, "the 'authorization' metadata must be 'Bearer TOKEN'"
        )
    return token.strip()


class Callers:
    """Checks each call's token, and what its user may do."""

    def __init__(self, service: ChatService, users: Users) -> None:
        self.service = service
        self.users = users
        # A subject's user id and a room's name never change: once read, kept.
        self._ids: OrderedDict[str, UserId] = OrderedDict()
        self._names: OrderedDict[RoomId, str] = OrderedDict()
        self._expiry: OrderedDict[UserId, float] = OrderedDict()
        """The latest ``exp`` of the tokens this node's calls acting as a user carried: a
        user's heartbeat stream here ends when it passes (see :meth:`lapsed`)."""

    async def identity(self, context: Context) -> Identity | None:
        """Who calls: the identity the call's token proves (else ``unauthorized``); None on
        an open server. A token of a key the node has not fetched yet waits for the fetch
        it asks for, as a Socket.IO connect does (see
        :meth:`roomcast.core.auth.Authenticator.check`)."""
        if self.service.auth is None:
            return None
        return await self.service.auth.check(bearer_token(context.invocation_metadata()))

    def lapsed(self, index: UserId) -> bool:
        """Whether every token seen here for the user has expired (False on an open
        server, and for a user whose calls carried none here)."""
        expires = self._expiry.get(index)
        return expires is not None and past(expires)

    def _note(self, identity: Identity, index: UserId) -> None:
        if identity.expires > self._expiry.get(index, 0.0):
            _keep(self._expiry, index, identity.expires)

    async def index_of(self, identity: Identity) -> UserId:
        """The user index of the token's subject (made the first time it is seen); a
        call of it that proves its user keeps the user's login alive until its ``exp``."""
        found = _recall(self._ids, identity.subject)
        if found is None:
            try:
                found = await self.service.history.user_id_for(identity.subject)
            except UnavailableError as exc:
                raise ChatError(ErrorCode.UNAVAILABLE, "the store is unavailable") from exc
            _keep(self._ids, identity.subject, found)
        self._note(identity, found)
        return found

    async def user(self, identity: Identity | None, index: int) -> GrpcUser:
        """The logged-in user a call acts as: with a token, only the token's own user
        (``forbidden`` for another, whether it is logged in or not); ``not_found`` when
        the user is not logged in."""
        checked = check_index(index)
        if identity is not None and await self.index_of(identity) != checked:
            raise ChatError(ErrorCode.FORBIDDEN, f"this token is not user {checked}'s")
        return await self.users.get(checked)

    async def check_entry(self, identity: Identity | None, room: Room | RoomId | str) -> None:
        """``forbidden`` unless the token lets its user into the room (a room, its id or
        its name); a room id is looked up only for a token that names its rooms."""
        if identity is None or identity.rooms is None:
            return
        if isinstance(room, Room):
            name = room.name
        elif isinstance(room, str):
            name = room
        else:
            name = await self._name(room)
        if not identity.may_enter(name):
            raise ChatError(ErrorCode.FORBIDDEN, f"your token does not let you into {name!r}")

    async def _name(self, room: RoomId) -> str:
        name = _recall(self._names, room)
        if name is None:
            name = (await self.service.resolve(room)).name
            _keep(self._names, room, name)
        return name


def _recall(cache: OrderedDict[K, V], key: K) -> V | None:
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
    return found


def _keep(cache: OrderedDict[K, V], key: K, value: V) -> None:
    cache[key] = value
    while len(cache) > CACHE_MAX:
        cache.popitem(last=False)
