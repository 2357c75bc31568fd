"""An identity provider for tests: private keys that sign tokens, and a real HTTP server
(a thread, on a loopback port) that publishes their public halves as a JWKS."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.ports import free_port

Private = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(private: Private, kid: str, **extra: str) -> dict[str, Any]:
    """The public JWK of a private key, as a provider publishes it."""
    if isinstance(private, rsa.RSAPrivateKey):
        text = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key())
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        text = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key())
    else:
        text = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key())
    return {**json.loads(text), "kid": kid, "use": "sig", **extra}


def sign(
    private: Private, algorithm: str, kid: str | None, subject: str, ttl: float = 600, **claims: Any
) -> str:
    """A token of ``subject`` as the provider signs it."""
    now = int(time.time())
    body = {"sub": subject, "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid} if kid else None)


class Provider:
    """The published key set (change ``keys``, ``status`` or ``body`` at any time) and
    how often it was fetched."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.body: bytes | None = None
        """When set: sent as it is, in place of the key set."""
        self.fetches = 0
        """How many times the set was asked for."""
        self.url = ""


@contextmanager
def identity_provider() -> Iterator[Provider]:
    provider = Provider()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            provider.fetches += 1
            body = provider.body
            if body is None:
                body = json.dumps({"keys": provider.keys}).encode()
            self.send_response(provider.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    provider.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
