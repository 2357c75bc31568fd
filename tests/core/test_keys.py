"""Tokens signed by an identity provider: public keys from a PEM file, and key sets
fetched from a real HTTP server as a provider publishes and rotates them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from roomcast.config import Settings
from roomcast.core.auth import Authenticator
from roomcast.core.keys import JWKS_MAX_BYTES, PublicKey, PublicKeys
from roomcast.exceptions import ChatError, ErrorCode
from tests.identity_provider import Provider, identity_provider, jwk_of, rsa_key, sign

RSA = rsa_key()
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def refusal(auth: Authenticator, token: str) -> str:
    with pytest.raises(ChatError) as raised:
        auth.verify(token)
    assert raised.value.code is ErrorCode.UNAUTHORIZED
    return raised.value.message


def fixed(*keys: Any) -> Authenticator:
    return Authenticator(public_keys=PublicKeys([PublicKey.from_pem(pem(k)) for k in keys]))


def test_tokens_signed_with_the_private_half_of_a_public_key_are_accepted() -> None:
    auth = fixed(RSA, EC, ED)
    for private, algorithm in [
        (RSA, "RS256"), (RSA, "RS512"), (RSA, "PS256"), (EC, "ES256"), (ED, "EdDSA"),
    ]:  # fmt: skip
        token = sign(private, algorithm, None, "ada", name="Ada", rooms=["team-*"])
        identity = auth.verify(token)
        assert (identity.subject, identity.name, identity.rooms) == ("ada", "Ada", ("team-*",))
    # Claims are checked as on a shared secret's tokens.
    assert refusal(auth, sign(RSA, "RS256", None, "ada", ttl=-60)) == "the token has expired"
    assert "sub" in refusal(auth, sign(RSA, "RS256", None, "", ttl=60))


def test_a_token_cannot_choose_how_its_key_is_read() -> None:
    auth = fixed(RSA)
    other = rsa_key()
    assert "not valid" in refusal(auth, sign(other, "RS256", None, "eve"))
    # The public key, known to all, used as an HMAC secret: refused by its algorithm, not
    # checked against the key.
    forged = jwt.api_jws.PyJWS().encode(
        b'{"sub":"eve","exp":9999999999}', key=b"x" * 32, algorithm="HS256"
    )
    assert "algorithm 'HS256' is not accepted here" in refusal(auth, forged)
    unsigned = jwt.encode({"sub": "eve", "exp": 9999999999}, None, algorithm="none")
    assert "algorithm 'none' is not accepted" in refusal(auth, unsigned)
    # An RSA key checks no EC signature, an EC key of P-256 no ES384 one.
    assert "does not know" in refusal(auth, sign(EC, "ES256", None, "eve"))
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert "does not know" in refusal(fixed(EC), sign(p384, "ES384", None, "eve"))
    # A server with a secret and a key takes both kinds, each by its own.
    both = Authenticator("a-secret-of-32-characters-or-more!!", public_keys=fixed(RSA).public_keys)
    assert both.verify(sign(RSA, "RS256", None, "ada")).subject == "ada"
    assert both.verify(both.mint("bob", ttl=60)).subject == "bob"
    assert both.algorithms[0] == "HS256" and "EdDSA" in both.algorithms


def test_keys_that_check_nothing_are_refused_at_start(tmp_path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="1024 bits is too short"):
        PublicKey.from_pem(pem(weak))
    private_pem = RSA.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not a PEM public key"):
        PublicKey.from_pem(private_pem)
    path = tmp_path / "provider.pem"
    path.write_bytes(pem(EC))
    auth = Settings(auth_public_key=str(path)).authenticator()
    assert auth is not None and auth.verify(sign(EC, "ES256", None, "ada")).subject == "ada"
    with pytest.raises(ValueError, match="cannot read the public key"):
        Settings(auth_public_key=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="https://"):
        Settings(auth_jwks_url="file:///etc/jwks.json")
    with pytest.raises(ValueError, match="only a server with an auth secret signs"):
        auth.mint("ada", ttl=60)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    with identity_provider() as published:
        yield published


@pytest.fixture
async def keyed(provider: Provider) -> AsyncIterator[Callable[[], Authenticator]]:
    started: list[Authenticator] = []

    def start() -> Authenticator:
        auth = Authenticator(public_keys=PublicKeys(jwks_url=provider.url))
        started.append(auth)
        return auth

    yield start
    for auth in started:
        await auth.close()


async def until(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.02)


async def test_a_key_set_is_fetched_at_start_and_again_for_a_new_key(provider, keyed) -> None:
    provider.keys = [jwk_of(RSA, "k1"), jwk_of(EC, "k-ec")]
    auth = keyed()
    await auth.start()
    assert provider.fetches == 1
    assert auth.verify(sign(RSA, "RS256", "k1", "ada")).subject == "ada"
    assert auth.verify(sign(EC, "ES256", "k-ec", "bob")).subject == "bob"
    # A key of the set checks only tokens that name it.
    assert "does not know (kid 'k-ec', RS256)" in refusal(auth, sign(RSA, "RS256", "k-ec", "x"))

    # The provider rotates: it publishes k2, then signs with it. The first token naming it
    # is refused and has the set fetched again; the ones after are accepted.
    new = rsa_key()
    provider.keys = [jwk_of(RSA, "k1"), jwk_of(new, "k2")]
    fresh = sign(new, "RS256", "k2", "cy")
    assert "does not know (kid 'k2'" in refusal(auth, fresh)
    public_keys = auth.public_keys
    assert public_keys is not None
    await until(lambda: provider.fetches == 2 and public_keys.candidates("k2", "RS256") != [])
    assert auth.verify(fresh).subject == "cy"
    # More unknown keys within the next 30 s ask for no more fetches (a stream of made-up
    # key ids must not become a stream of requests to the provider).
    for i in range(20):
        refusal(auth, sign(RSA, "RS256", f"made-up-{i}", "eve"))
    await asyncio.sleep(0.5)  # a fetch asked for would have reached the provider by now
    assert provider.fetches == 2


async def test_a_token_of_a_new_key_waits_for_the_fetch_it_asked_for(provider, keyed) -> None:
    provider.keys = [jwk_of(RSA, "k1")]
    auth = keyed()
    await auth.start()
    new = rsa_key()
    provider.keys = [jwk_of(RSA, "k1"), jwk_of(new, "k2")]
    # Two clients at once with tokens of the new key: both wait for the one fetch.
    first, second = await asyncio.gather(
        auth.check(sign(new, "RS256", "k2", "ada")), auth.check(sign(new, "RS256", "k2", "bob"))
    )
    assert (first.subject, second.subject) == ("ada", "bob")
    assert provider.fetches == 2
    # A key the set does not have either: the fetch it would ask for was just made, so
    # there is nothing to wait for, and it is refused.
    with pytest.raises(ChatError, match="does not know"):
        await auth.check(sign(new, "RS256", "k3", "eve"))
    assert provider.fetches == 2
    # Refusals of other kinds never wait either.
    with pytest.raises(ChatError, match="expired"):
        await auth.check(sign(new, "RS256", "k2", "old", ttl=-3600))


async def test_a_key_taken_out_of_the_set_stops_checking_tokens(provider, keyed) -> None:
    old, new = rsa_key(), rsa_key()
    provider.keys = [jwk_of(old, "old"), jwk_of(new, "new", alg="RS256")]
    auth = keyed()
    await auth.start()
    by_old = sign(old, "RS256", "old", "ada")
    assert auth.verify(by_old).subject == "ada"
    # A JWK that names its algorithm checks only that one.
    assert "does not know" in refusal(auth, sign(new, "PS256", "new", "ada"))
    provider.keys = [jwk_of(new, "new", alg="RS256")]
    public_keys = auth.public_keys
    assert public_keys is not None
    public_keys.unknown("another")  # what a token naming a key not in the set does
    await until(lambda: public_keys.candidates("old", "RS256") == [])
    assert "does not know (kid 'old'" in refusal(auth, by_old)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, None),
        (200, b"<html>maintenance</html>"),
        (200, b'{"keys": []}'),
        (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}'),
        (200, b'{"keys": [{"kty": "RSA", "kid": "k1", "use": "enc", "n": "AQAB", "e": "AQAB"}]}'),
        (200, b'{"keys": "' + b"x" * JWKS_MAX_BYTES + b'"}'),
    ],
    ids=["error", "not-json", "empty", "secret-only", "encryption-only", "too-large"],
)
async def test_a_failed_fetch_keeps_the_keys_it_had(provider, keyed, status, body) -> None:
    provider.keys = [jwk_of(RSA, "k1")]
    auth = keyed()
    await auth.start()
    token = sign(RSA, "RS256", "k1", "ada")
    assert auth.verify(token).subject == "ada"
    provider.status, provider.body = status, body
    public_keys = auth.public_keys
    assert public_keys is not None
    public_keys.unknown("k9")
    await until(lambda: public_keys.failures == 1)
    assert provider.fetches == 2
    assert auth.verify(token).subject == "ada"


async def test_a_provider_out_of_reach_at_start_is_asked_again(provider, keyed) -> None:
    provider.status = 503
    auth = keyed()
    await auth.start()  # does not fail: the node starts, tokens wait for the keys
    public_keys = auth.public_keys
    assert public_keys is not None and public_keys.failures == 1
    token = sign(RSA, "RS256", "k1", "ada")
    assert "does not know" in refusal(auth, token)
    provider.status, provider.keys = 200, [jwk_of(RSA, "k1")]
    # Asked again by that token, or by the retry 2 s after the failure.
    await until(lambda: public_keys.fetched_at is not None)
    assert auth.verify(token).subject == "ada"
    assert public_keys.failures == 0
