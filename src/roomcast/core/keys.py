"""Public keys that tokens may be signed with, for a server that cannot sign them itself.

An identity provider (Auth0, Okta, Keycloak, Cognito, Firebase, an application's own
login service...) signs its tokens with a private key and publishes the public half as a
JSON Web Key Set (JWKS) at a URL. Given that URL (``roomcast serve --auth-jwks-url``),
each node fetches the set at start, again every :data:`JWKS_REFRESH` seconds, and soon
after a token names a key id (``kid``) it does not know yet (a provider rotating its keys
publishes the new key before signing with it, so that is rare). A fetch that fails keeps
the keys it has. A PEM file (``--auth-public-key``) holds one key that never changes.

Accepted: RSA (RS256/384/512, PS256/384/512), EC on P-256/P-384/P-521 (ES256/384/512)
and Ed25519 (EdDSA). A key only checks the algorithms of its own kind, and the one its
JWK names in ``alg`` if it names one, so a token cannot pick how its key is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

log = logging.getLogger(__name__)

PUBLIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
"""The public-key signatures accepted."""

JWKS_REFRESH = 300.0
"""Seconds between two fetches of a key set."""

JWKS_UNKNOWN_REFETCH = 30.0
"""Seconds at least between two fetches asked for by tokens naming an unknown key (a
stream of forged key ids must not become a stream of fetches)."""

JWKS_TIMEOUT = 10.0
"""Seconds a fetch of the key set may take."""

JWKS_WAIT = 5.0
"""Seconds a token naming a key not held yet waits, at most, for the key set fetched again
for it (see :meth:`PublicKeys.refetched`)."""

JWKS_MAX_BYTES = 1 << 20
"""The largest key set read."""

_RETRY_MAX = 60.0

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_ES_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_RSA = frozenset(a for a in PUBLIC_ALGORITHMS if a[:2] in ("RS", "PS"))


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One verification key: what it is, and the algorithms it checks."""

    key: Any
    """The key itself (a ``cryptography`` public key)."""
    algorithms: frozenset[str]
    """The token algorithms this key checks."""
    kid: str | None = None
    """Its key id, which tokens name in their header (``kid``)."""

    @classmethod
    def from_pem(cls, pem: bytes, kid: str | None = None) -> PublicKey:
        """A key from a PEM public key (``-----BEGIN PUBLIC KEY-----``); ValueError if
        it is none, or of a kind no accepted algorithm uses."""
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a PEM public key: {exc}") from None
        return cls(key, _algorithms_of(key), kid)

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> PublicKey | None:
        """A key from one JWK of a set; None for one that checks no token (an encryption
        key, a shared secret, a kind or curve not accepted, or a malformed one)."""
        if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            return None
        try:
            key = jwt.PyJWK(jwk).key
            algorithms = _algorithms_of(key)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            return None
        declared = jwk.get("alg")
        if declared is not None:
            if declared not in algorithms:
                return None
            algorithms = frozenset({declared})
        kid = jwk.get("kid")
        return cls(key, algorithms, kid if isinstance(kid, str) else None)


def _algorithms_of(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short (2048 at least)")
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            raise ValueError(f"the curve {key.curve.name} is not accepted")
        return frozenset({_ES_BY_CURVE[curve]})
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    raise ValueError(f"a {type(key).__name__} checks no accepted algorithm")


def parse_jwks(data: Any) -> list[PublicKey]:
    """The usable keys of a JWKS document (``{"keys": [...]}``); ValueError if it is not
    one."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a key set is an object with a 'keys' list")
    found = (PublicKey.from_jwk(k) for k in data["keys"] if isinstance(k, dict))
    return [k for k in found if k is not None]


class PublicKeys:
    """The public keys a server checks tokens with: fixed ones, and those of a JWKS URL."""

    def __init__(self, fixed: Iterable[PublicKey] = (), *, jwks_url: str | None = None) -> None:
        self._fixed = list(fixed)
        self._fetched: list[PublicKey] = []
        self.jwks_url = jwks_url
        self.fetched_at: float | None = None
        """When the key set was last fetched (``time.monotonic()``); None: never."""
        self.failures = 0
        """Fetches that failed in a row (the keys of the last good one are kept)."""
        self.version = 0
        """Counts the changes of the keys held (a fetch that brought other keys)."""
        self._wake = asyncio.Event()
        self._asked_at = -JWKS_UNKNOWN_REFETCH
        self._task: asyncio.Task[None] | None = None
        self._asked: list[asyncio.Future[None]] = []
        """Who waits for the fetch an unknown key asked for (see :meth:`refetched`)."""
        self._coming = False
        """Whether a fetch asked for by an unknown key is yet to end."""

    def __len__(self) -> int:
        """The keys held now."""
        return len(self._fixed) + len(self._fetched)

    def candidates(self, kid: str | None, algorithm: str) -> list[PublicKey]:
        """The keys that may have signed a token with this header: of its algorithm, and
        of its ``kid`` when it names one."""
        return [
            k
            for k in (*self._fixed, *self._fetched)
            if algorithm in k.algorithms and (kid is None or k.kid is None or k.kid == kid)
        ]

    def unknown(self, kid: str | None) -> None:
        """A token named a key that is not here: fetch the set again soon (at most once
        per :data:`JWKS_UNKNOWN_REFETCH` seconds)."""
        if self.jwks_url is None or self._task is None:
            return
        now = time.monotonic()
        if now - self._asked_at >= JWKS_UNKNOWN_REFETCH:
            self._asked_at = now
            self._coming = True
            log.info("a token names key %r, not in the key set: fetching it again", kid)
            self._wake.set()

    async def refetched(self, within: float = JWKS_WAIT) -> bool:
        """Wait, at most ``within`` seconds, for the end of the fetch that a token naming
        an unknown key asked for; whether there was one and it ended in time (whatever
        it brought). False at once when no such fetch is coming (one was made less than
        :data:`JWKS_UNKNOWN_REFETCH` seconds ago)."""
        if not self._coming:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asked.append(done)
        try:
            async with asyncio.timeout(within):
                await done
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._asked.remove(done)
        return True

    async def start(self) -> None:
        """Fetch the key set once (a failure is logged; the fetches go on in the
        background), then keep it fresh until :meth:`close`."""
        if self.jwks_url is None or self._task is not None:
            return
        async with httpx.AsyncClient(timeout=JWKS_TIMEOUT) as client:
            await self._fetch(client)
        self._task = asyncio.create_task(self._keep(), name="roomcast-jwks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _keep(self) -> None:
        async with httpx.AsyncClient(timeout=JWKS_TIMEOUT) as client:
            while True:
                failed = self.failures
                wait = JWKS_REFRESH if failed == 0 else min(2.0**failed, _RETRY_MAX)
                # Not wait_for: on Python 3.11 it can swallow a cancel that comes as the
                # event is set, and close() would then wait for the next fetch.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                self._wake.clear()
                await self._fetch(client)
                if self._coming:  # asked for before or during this fetch: it answers
                    self._coming = False
                    for done in self._asked:
                        if not done.done():
                            done.set_result(None)

    async def _fetch(self, client: httpx.AsyncClient) -> bool:
        """Fetch the key set and take its keys; False (and the keys kept) if it failed."""
        assert self.jwks_url is not None
        try:
            async with client.stream(
                "GET", self.jwks_url, headers={"Accept": "application/json"}
            ) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"the key set is larger than {JWKS_MAX_BYTES} bytes")
            keys = parse_jwks(orjson.loads(body))
            if not keys:
                raise ValueError("the key set holds no key that checks an accepted algorithm")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("fetching the key set %s failed: %s", self.jwks_url, exc)
            self.failures += 1
            return False
        if [(k.kid, k.algorithms, k.key) for k in keys] != [
            (k.kid, k.algorithms, k.key) for k in self._fetched
        ]:
            self.version += 1
        self._fetched = keys
        self.fetched_at = time.monotonic()
        self.failures = 0
        log.info("key set %s: %d keys", self.jwks_url, len(keys))
        return True
