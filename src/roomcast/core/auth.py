"""Who a client is, when the server is told to check: signed tokens.

With an auth secret set (``roomcast serve --auth-secret``), every client proves who it is
with a JSON Web Token the application's own backend signs with that secret (HS256; HS384
or HS512 with a secret as long as their hash) — on Socket.IO in the connect payload
(``auth: {token}``), on gRPC and HTTP in an ``Authorization: Bearer`` header. roomcast
never sees passwords: the application logs its users in and hands each a token. Tokens an
identity provider signs with a private key are checked with its public keys instead (see
:mod:`roomcast.core.keys`).
The claims it reads::

    sub    required  the user: a stable id of the application's (a string, 1-128 chars);
                     the same sub is the same roomcast user id on every node, always
    exp    required  when the token stops being accepted (seconds since the Unix epoch)
    name   optional  the name the others see (default: sub, its first 32 characters);
                     the client cannot choose another
    rooms  optional  the rooms the user may join, read the history and members of: exact
                     names, or a prefix ending in ``*`` ("team-*"); absent: every room
    moderator  optional  true: the user may delete any message of the rooms it may enter
                     (default false: only its own)
    nbf, iat, aud, iss  checked when present (aud and iss when the server is told them)

A token is checked when a client connects (and on gRPC and HTTP at every call). A
Socket.IO connection is ended when its token expires, unless the client has sent a newer
token of the same user (the ``refresh`` event) before; a gRPC login ends when the newest
token its calls carried expires. Without a secret the server is open: a client names
itself and gets a new user id on every connect (for one application on a trusted network,
or trying roomcast out).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from ..exceptions import ChatError, ErrorCode
from . import validation
from .keys import PUBLIC_ALGORITHMS, PublicKeys

ALGORITHMS = ("HS256", "HS384", "HS512")
"""The shared-secret signatures accepted: HMAC with the secret (never ``none``); HS384 and
HS512 only with a secret of at least 48 and 64 bytes. Public-key signatures: see
:mod:`roomcast.core.keys`."""

SECRET_MIN = 32
"""Characters an auth secret has at least (RFC 7518 wants a key as long as the hash)."""

SUBJECT_MAX = 128
"""Characters of a ``sub`` at most."""

ROOMS_MAX = 1000
"""Entries of a ``rooms`` claim at most."""

LEEWAY = 10.0
"""Seconds of clock difference allowed between the token's issuer and the server."""

VERIFIED_MAX = 10_000
"""Tokens a node remembers having checked: a gRPC client or an HTTP caller brings the same
token on every call, and checking it again each time costs 150-300 µs (HMAC to
EdDSA, PyJWT on a 2-core AMD EPYC) where a look-up costs under one."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A client whose token was checked: who it is, and where it may go."""

    subject: str
    """The application's id of the user (the token's ``sub``)."""
    name: str
    """The name the others see."""
    rooms: tuple[str, ...] | None = None
    """Room names and ``prefix*`` patterns the user may enter; None: every room."""
    expires: float = math.inf
    """When the token stops being accepted (its ``exp``, seconds since the Unix epoch)."""
    moderator: bool = False
    """The user may delete other users' messages (the token's ``moderator``)."""

    def expired(self, now: float | None = None) -> bool:
        """Whether the token has expired (see :func:`past`): a connection it opened is
        then ended, unless a newer token refreshed it."""
        return past(self.expires, now)

    def may_enter(self, room: str) -> bool:
        """Whether the token lets its user join the room of this name (and read it)."""
        if self.rooms is None:
            return True
        for allowed in self.rooms:
            if allowed.endswith("*"):
                if room.startswith(allowed[:-1]):
                    return True
            elif room == allowed:
                return True
        return False


def past(expires: float, now: float | None = None, *, leeway: float = LEEWAY) -> bool:
    """Whether a token's ``exp`` has passed, by more than :data:`LEEWAY`."""
    return (time.time() if now is None else now) > expires + leeway


class UnknownKeyError(ChatError):
    """A token refused because it names a key the server does not hold (yet)."""


class Authenticator:
    """Checks tokens signed with a shared secret (HMAC), with public keys (see
    :mod:`roomcast.core.keys`), or either."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        previous: str | None = None,
        public_keys: PublicKeys | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = LEEWAY,
    ) -> None:
        """``previous``: the secret tokens were signed with before a rotation, accepted as
        well while it is given (tokens are signed with ``secret``). ``public_keys``: the
        keys that check tokens signed by an identity provider."""
        if secret is None and public_keys is None:
            raise ValueError("tokens are checked with a secret, public keys, or both")
        if previous is not None and secret is None:
            raise ValueError("a previous secret needs the new secret")
        for key in (secret, previous):
            if key is not None and len(key) < SECRET_MIN:
                raise ValueError(f"an auth secret has at least {SECRET_MIN} characters")
        self._secret = secret
        # A secret shorter than a hash's size is refused for that hash (RFC 7518 3.2).
        self._keys = [
            (key, [a for a in ALGORITHMS if len(key.encode()) * 8 >= int(a[2:])])
            for key in (secret, previous)
            if key is not None
        ]
        self.public_keys = public_keys
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._options = {"require": ["sub", "exp"], "verify_aud": audience is not None}
        self._verified: OrderedDict[str, Identity] = OrderedDict()
        """Tokens checked lately, oldest first; emptied when the public keys change."""
        self._keys_version = None if public_keys is None else public_keys.version

    async def start(self) -> None:
        """Fetch what the checks need (a key set from its URL) and keep it fresh."""
        if self.public_keys is not None:
            await self.public_keys.start()

    async def close(self) -> None:
        if self.public_keys is not None:
            await self.public_keys.close()

    def verify(self, token: object) -> Identity:
        """The identity a token proves; ``unauthorized`` if it proves none (missing,
        malformed, badly signed, expired, or claims of the wrong shape)."""
        if not isinstance(token, str) or not token:
            raise ChatError(ErrorCode.UNAUTHORIZED, "a token is required")
        if self.public_keys is not None and self.public_keys.version != self._keys_version:
            # A key may have been taken out: what it checked is checked again.
            self._verified.clear()
            self._keys_version = self.public_keys.version
        known = self._verified.get(token)
        if known is not None:
            if not past(known.expires, leeway=self._leeway):
                return known
            del self._verified[token]
            raise ChatError(ErrorCode.UNAUTHORIZED, "the token has expired")
        identity = self._check(token)
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.popitem(last=False)
        self._verified[token] = identity
        return identity

    async def check(self, token: object) -> Identity:
        """:meth:`verify`, but a token naming a key this server does not hold yet waits (at
        most :data:`~roomcast.core.keys.JWKS_WAIT` seconds) for the key set it had fetched
        again, and is checked once more: after an identity provider rotates its keys,
        the first clients with tokens of the new key get in, not a refusal."""
        try:
            return self.verify(token)
        except UnknownKeyError:
            if self.public_keys is None or not await self.public_keys.refetched():
                raise
        return self.verify(token)

    def _check(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise ChatError(ErrorCode.UNAUTHORIZED, f"the token is not valid: {exc}") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm in ALGORITHMS and self._keys:
            keys = self._keys
        elif algorithm in PUBLIC_ALGORITHMS and self.public_keys is not None:
            if kid is not None and not isinstance(kid, str):
                raise ChatError(ErrorCode.UNAUTHORIZED, "the token's 'kid' must be a string")
            found = self.public_keys.candidates(kid, algorithm)
            if not found:
                self.public_keys.unknown(kid)
                raise UnknownKeyError(
                    ErrorCode.UNAUTHORIZED,
                    f"the token is signed with a key this server does not know "
                    f"(kid {kid!r}, {algorithm})",
                )
            keys = [(k.key, [algorithm]) for k in found]
        else:
            raise ChatError(
                ErrorCode.UNAUTHORIZED,
                f"the token's algorithm {algorithm!r} is not accepted here "
                f"(accepted: {', '.join(self.algorithms)})",
            )
        refused: jwt.InvalidTokenError | None = None
        for key, algorithms in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.ExpiredSignatureError:  # checked after the signature
                raise ChatError(ErrorCode.UNAUTHORIZED, "the token has expired") from None
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as exc:
                refused = refused or exc  # perhaps signed with the other secret or key
            except jwt.InvalidTokenError as exc:
                refused = exc
                break
            else:
                return _identity(claims)
        raise ChatError(ErrorCode.UNAUTHORIZED, f"the token is not valid: {refused}")

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The signature algorithms this server takes."""
        shared = tuple(a for a in ALGORITHMS if any(a in algs for _, algs in self._keys))
        return shared + (PUBLIC_ALGORITHMS if self.public_keys is not None else ())

    def mint(
        self,
        subject: str,
        *,
        ttl: float,
        name: str | None = None,
        rooms: Sequence[str] | None = None,
        moderator: bool = False,
        now: float | None = None,
    ) -> str:
        """A token for ``subject``, valid for ``ttl`` seconds: what an application's backend
        signs (``roomcast token`` prints one, for trying things out and for tests)."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, object] = {"sub": subject, "iat": issued, "exp": issued + int(ttl)}
        if name is not None:
            claims["name"] = name
        if rooms is not None:
            claims["rooms"] = list(rooms)
        if moderator:
            claims["moderator"] = True
        if self._audience is not None:
            claims["aud"] = self._audience
        if self._issuer is not None:
            claims["iss"] = self._issuer
        _identity(claims)  # refuse to sign what verify() would refuse
        if self._secret is None:
            raise ValueError("only a server with an auth secret signs tokens")
        return jwt.encode(claims, self._secret, algorithm="HS256")


def _identity(claims: dict[str, object]) -> Identity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= SUBJECT_MAX:
        raise ChatError(
            ErrorCode.UNAUTHORIZED, f"'sub' must be a string of 1-{SUBJECT_MAX} characters"
        )
    if not subject.isprintable():
        raise ChatError(ErrorCode.UNAUTHORIZED, "'sub' must not hold control characters")
    try:
        name = validation.nickname(claims.get("name", subject[: validation.NICKNAME_MAX]))
    except ChatError as exc:
        raise ChatError(ErrorCode.UNAUTHORIZED, f"the token's name: {exc.message}") from None
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise ChatError(ErrorCode.UNAUTHORIZED, "'exp' must be a number of seconds")
    moderator = claims.get("moderator", False)
    if not isinstance(moderator, bool):
        raise ChatError(ErrorCode.UNAUTHORIZED, "'moderator' must be true or false")
    rooms = claims.get("rooms")
    if rooms is None:
        return Identity(subject, name, expires=float(expires), moderator=moderator)
    if (
        not isinstance(rooms, list)
        or len(rooms) > ROOMS_MAX
        or not all(isinstance(r, str) and r for r in rooms)
    ):
        raise ChatError(
            ErrorCode.UNAUTHORIZED,
            f"'rooms' must be a list of at most {ROOMS_MAX} room names or 'prefix*' patterns",
        )
    return Identity(subject, name, tuple(rooms), float(expires), moderator)
