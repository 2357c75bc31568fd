"""Settings: one object, one field per ``roomcast serve`` flag, ``ROOMCAST_*`` variables.

``roomcast serve --broker-url redis://...`` and ``ROOMCAST_BROKER_URL=redis://...`` set the
same field; a flag wins over the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .core.auth import SECRET_MIN, Authenticator
from .core.keys import PublicKey, PublicKeys

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything a roomcast node can be told. Every field is a ``roomcast serve`` flag."""

    model_config = SettingsConfigDict(env_prefix="ROOMCAST_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP / Socket.IO port (0: any free)")
    socketio_path: str = Field("/ws/socket.io", description="path of the Socket.IO endpoint")
    broker_url: str = Field(
        "memory://",
        description="broker: memory://, redis:// (?cluster=true: a Redis Cluster), "
        "redis+sentinel://SENTINELS/SERVICE, amqp:// or nats://",
    )
    store_url: str = Field(
        "sqlite:///./roomcast.db",
        description="durable history: sqlite:///PATH or postgresql://...",
    )
    presence_url: str | None = Field(
        None,
        description="presence engine; default: the broker (memory, redis), else the store",
    )
    workers: int = Field(
        1, ge=1, le=256, description="worker processes on the one port (>1 needs a shared broker)"
    )
    rate_limit: float = Field(
        20.0,
        ge=0,
        description="send/typing/dm requests a second per connection, and messages a second "
        "per sender of the REST API; 0: no limit",
    )
    rate_burst: int = Field(40, ge=1, description="requests a connection may burst above the rate")
    request_rate_limit: float = Field(
        50.0,
        ge=0,
        description="join/leave/history/rooms/members requests a second per connection, "
        "and REST API reads a second per caller; 0: off",
    )
    request_rate_burst: int = Field(
        200, ge=1, description="such requests a connection may burst above their rate"
    )
    ping_interval: float = Field(
        25.0, gt=0, le=3600, description="seconds between Engine.IO pings to a client"
    )
    ping_timeout: float = Field(
        20.0, gt=0, le=3600, description="seconds to answer a ping before the client is dropped"
    )
    log_level: LogLevel = Field("info", description="log level")
    cors_origins: str = Field(
        "", description="comma-separated origins allowed to connect; empty: same origin, *: any"
    )
    node_id: str | None = Field(None, description="this node's id in the cluster; default: random")
    heartbeat_interval: float = Field(
        1.0, gt=0, le=60, description="seconds between node heartbeats into the registry"
    )
    node_ttl: float = Field(
        5.0, gt=0, le=600, description="seconds after its last heartbeat that a node is dead"
    )
    unsubscribe_grace: float = Field(
        2.0, ge=0, le=600, description="seconds a room stays subscribed after its last local member"
    )
    history_max_messages: int | None = Field(
        None,
        ge=1,
        description="keep at most this many messages per room, its newest (older ones are "
        "deleted by the retention passes); unset: every message",
    )
    history_max_days: float | None = Field(
        None,
        gt=0,
        description="delete messages older than this many days (by the retention passes); "
        "unset: keep them",
    )
    history_trim_interval: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="seconds between a node's retention passes (with --history-max-messages "
        "or --history-max-days)",
    )
    metrics_rooms: bool = Field(
        False,
        description="also list in /metrics the frames received per subscribed room (one series "
        "per room: to look into a few rooms, not for a node serving thousands)",
    )

    auth_secret: SecretStr | None = Field(
        None,
        description="check every client's token (a JWT signed with this secret, HS256, "
        "32+ characters); unset: clients name themselves",
    )
    auth_previous_secret: SecretStr | None = Field(
        None,
        description="with --auth-secret: the secret before a rotation, whose tokens are "
        "still accepted while it is set",
    )
    auth_jwks_url: str | None = Field(
        None,
        description="check every client's token signed by an identity provider with the "
        "public keys it publishes at this URL (a JWKS: RS/PS/ES/EdDSA), fetched again "
        "every 5 minutes and when a token names a key not in it",
    )
    auth_public_key: str | None = Field(
        None,
        description="check every client's token signed with the private half of the public "
        "key in this PEM file (RSA 2048+, EC P-256/384/521, Ed25519)",
    )
    auth_audience: str | None = Field(
        None, description="with token checks: the 'aud' tokens must carry"
    )
    auth_issuer: str | None = Field(
        None, description="with token checks: the 'iss' tokens must carry"
    )

    grpc_port: int = Field(
        50050,
        ge=0,
        le=65535,
        description="port of the gRPC door (Agent/Heartbeat/Lobby/Channel); 0: off",
    )
    grpc_public_address: str | None = Field(
        None,
        description="host:port that gRPC clients dial (behind NAT); default: host:grpc-port",
    )
    liveness_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds after which a silent gRPC user is removed"
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        # Node ids become parts of subjects, routing keys and channel names.
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("a node id is 1-64 letters, digits, '_' or '-'")
        return value

    @field_validator("auth_secret", "auth_previous_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < SECRET_MIN:
            raise ValueError(f"an auth secret has at least {SECRET_MIN} characters")
        return value

    @field_validator("auth_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme.lower() not in ("https", "http"):
            raise ValueError("a key set's URL is https:// (or http:// on a trusted network)")
        return value

    @field_validator("auth_public_key")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value is not None:
            _read_public_key(value)  # at start, not at a client's first connect
        return value

    @model_validator(mode="after")
    def _rotation(self) -> Settings:
        if self.auth_previous_secret is not None and self.auth_secret is None:
            raise ValueError("--auth-previous-secret needs --auth-secret (the new secret)")
        return self

    def authenticator(self) -> Authenticator | None:
        """What checks the clients' tokens: None when no secret or key is set."""
        public_keys = None
        if self.auth_jwks_url is not None or self.auth_public_key is not None:
            fixed = [] if self.auth_public_key is None else [_read_public_key(self.auth_public_key)]
            public_keys = PublicKeys(fixed, jwks_url=self.auth_jwks_url)
        if self.auth_secret is None and public_keys is None:
            return None
        secret, previous = self.auth_secret, self.auth_previous_secret
        return Authenticator(
            None if secret is None else secret.get_secret_value(),
            previous=None if previous is None else previous.get_secret_value(),
            public_keys=public_keys,
            audience=self.auth_audience,
            issuer=self.auth_issuer,
        )

    @field_validator("socketio_path")
    @classmethod
    def _path(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if value == "/":
            raise ValueError("the Socket.IO path must not be /")
        return value

    def allowed_origins(self) -> list[str] | str | None:
        """python-engineio's ``cors_allowed_origins``: None (empty setting) is its
        same-origin policy — the request's own scheme and Host, and the ones a proxy names
        in ``X-Forwarded-Proto`` / ``X-Forwarded-Host``."""
        if self.cors_origins.strip() == "*":
            return "*"
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()] or None


def _read_public_key(path: str) -> PublicKey:
    try:
        return PublicKey.from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the public key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
