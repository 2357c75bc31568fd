"""Tokens: what the server accepts as proof of who a client is, and where it may go."""

from __future__ import annotations

import time

import jwt
import pytest

from roomcast.adapters.memory import MemoryBroker, MemoryHistory, MemoryPresence
from roomcast.config import Settings
from roomcast.core.auth import Authenticator, Identity
from roomcast.core.events import Kind
from roomcast.core.hub import Hub
from roomcast.core.models import ConnId, NodeId, RoomId
from roomcast.core.service import ChatService
from roomcast.exceptions import ChatError, ErrorCode
from tests.core.test_service import Cluster
from tests.core.test_service import Conn as ServiceConn

SECRET = "s3cret-of-the-application-backend-0123"
auth = Authenticator(SECRET)


def refusal(token: object) -> str:
    with pytest.raises(ChatError) as raised:
        auth.verify(token)
    assert raised.value.code is ErrorCode.UNAUTHORIZED
    return raised.value.message


def signed(claims: dict[str, object], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_a_minted_token_proves_its_subject_name_and_rooms() -> None:
    now = time.time()
    token = auth.mint("u-42", ttl=60, name="Ada", rooms=["general", "team-*"], now=now)
    exp = float(int(now) + 60)
    assert auth.verify(token) == Identity("u-42", "Ada", ("general", "team-*"), exp)
    assert auth.verify(auth.mint("u-42", ttl=60, now=now)) == Identity("u-42", "u-42", None, exp)
    assert not auth.verify(token).expired(exp + 10)  # the leeway of clocks apart
    assert auth.verify(token).expired(exp + 10.5)


def test_tokens_of_any_hmac_size_signed_by_the_backend_are_accepted() -> None:
    exp = int(time.time()) + 60
    long = "k" * 64
    for algorithm in ("HS256", "HS384", "HS512"):
        token = signed({"sub": "bob", "exp": exp}, secret=long, algorithm=algorithm)
        assert Authenticator(long).verify(token).subject == "bob"
    # A hash longer than the secret would make a weaker key than it looks: refused.
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        weak = signed({"sub": "bob", "exp": exp}, algorithm="HS384")
    assert "not valid" in refusal(weak)


def test_missing_forged_and_expired_tokens_are_refused() -> None:
    exp = int(time.time()) + 60
    assert refusal(None) == "a token is required"
    assert refusal("") == "a token is required"
    assert refusal(42) == "a token is required"
    assert "not valid" in refusal("not.a.token")
    assert "not valid" in refusal(signed({"sub": "bob", "exp": exp}, secret="x" * 40))
    unsigned = jwt.encode({"sub": "bob", "exp": exp}, None, algorithm="none")
    assert "algorithm 'none' is not accepted here (accepted: HS256)" in refusal(unsigned)
    assert refusal(signed({"sub": "bob", "exp": int(time.time()) - 60})) == "the token has expired"
    assert "exp" in refusal(signed({"sub": "bob"}))  # a token that never expires is refused
    assert "sub" in refusal(signed({"exp": exp}))
    assert "not valid" in refusal(signed({"sub": "bob", "exp": exp, "nbf": exp}))


def test_claims_of_the_wrong_shape_are_refused() -> None:
    exp = int(time.time()) + 60
    assert "string" in refusal(signed({"sub": 7, "exp": exp}))
    assert "'sub'" in refusal(signed({"sub": "x" * 129, "exp": exp}))
    assert "control" in refusal(signed({"sub": "a\nb", "exp": exp}))
    assert "name" in refusal(signed({"sub": "bob", "name": "", "exp": exp}))
    for rooms in ("general", [1], [""], ["r"] * 1001):
        assert "'rooms'" in refusal(signed({"sub": "bob", "rooms": rooms, "exp": exp}))
    with pytest.raises(ChatError):  # what it would refuse, it does not sign either
        auth.mint("bob", ttl=60, rooms=[""])
    for flag in ("true", 1, None):
        assert "'moderator'" in refusal(signed({"sub": "bob", "moderator": flag, "exp": exp}))


def test_a_moderator_is_one_whose_token_says_so() -> None:
    exp = int(time.time()) + 60
    assert auth.verify(auth.mint("mod", ttl=60, moderator=True)).moderator
    assert not auth.verify(auth.mint("bob", ttl=60)).moderator
    assert auth.verify(signed({"sub": "m", "moderator": True, "rooms": ["a"], "exp": exp})) == (
        Identity("m", "m", ("a",), float(exp), moderator=True)
    )
    assert not auth.verify(signed({"sub": "bob", "moderator": False, "exp": exp})).moderator


def test_a_long_subject_without_a_name_is_named_by_its_start() -> None:
    identity = auth.verify(auth.mint("x" * 100, ttl=60))
    assert identity.subject == "x" * 100
    assert identity.name == "x" * 32


def test_audience_and_issuer_are_checked_when_the_server_is_told_them() -> None:
    strict = Authenticator(SECRET, audience="chat", issuer="https://app.example")
    assert strict.verify(strict.mint("bob", ttl=60)).subject == "bob"
    assert "not valid" in refusal_by(strict, auth.mint("bob", ttl=60))
    other = Authenticator(SECRET, audience="other", issuer="https://app.example")
    assert "not valid" in refusal_by(strict, other.mint("bob", ttl=60))


def refusal_by(authenticator: Authenticator, token: str) -> str:
    with pytest.raises(ChatError) as raised:
        authenticator.verify(token)
    assert raised.value.code is ErrorCode.UNAUTHORIZED
    return raised.value.message


def test_rooms_are_exact_names_or_prefixes() -> None:
    identity = Identity("bob", "Bob", ("general", "team-*"))
    assert identity.may_enter("general")
    assert identity.may_enter("team-")
    assert identity.may_enter("team-red")
    assert not identity.may_enter("general2")
    assert not identity.may_enter("Team-red")
    assert not identity.may_enter("team")
    assert Identity("bob", "Bob").may_enter("anything")
    assert not Identity("bob", "Bob", ()).may_enter("general")


def test_after_a_rotation_tokens_of_the_previous_secret_are_accepted_while_it_is_set() -> None:
    new_secret = "the-secret-after-the-rotation-0123456789"
    rotated = Authenticator(new_secret, previous=SECRET)
    old_token, new_token = auth.mint("bob", ttl=60), rotated.mint("ann", ttl=60)
    assert rotated.verify(old_token).subject == "bob"
    assert rotated.verify(new_token).subject == "ann"
    assert "not valid" in refusal(new_token)  # a server not told of the new secret
    assert "not valid" in refusal_by(Authenticator(new_secret), old_token)  # rotation over
    stranger = Authenticator("a-secret-neither-side-has-ever-used-000").mint("eve", ttl=60)
    assert "Signature verification failed" in refusal_by(rotated, stranger)
    expired = signed({"sub": "bob", "exp": int(time.time()) - 60})
    assert refusal_by(rotated, expired) == "the token has expired"
    settings = Settings(auth_secret=new_secret, auth_previous_secret=SECRET)
    assert settings.authenticator().verify(old_token).subject == "bob"
    with pytest.raises(ValueError, match="needs --auth-secret"):
        Settings(auth_previous_secret=SECRET)
    with pytest.raises(ValueError, match="32 characters"):
        Settings(auth_secret=new_secret, auth_previous_secret="short")


def test_short_secrets_are_refused_by_the_settings() -> None:
    with pytest.raises(ValueError, match="32 characters"):
        Settings(auth_secret="short")
    assert Settings().authenticator() is None
    assert Settings(auth_secret=SECRET).authenticator() is not None
    assert SECRET not in repr(Settings(auth_secret=SECRET))


# -- the service with tokens ----------------------------------------------------------


class Conn:
    def __init__(self, name: str) -> None:
        self.id = ConnId(name)
        self.transport = self

    async def deliver(self, frame, conns):
        return None

    async def deliver_many(self, frames, conns):
        return None

    async def deliver_one(self, frame, conn):
        return None


@pytest.fixture
async def service():
    history, broker = MemoryHistory(), MemoryBroker(f"auth{time.monotonic_ns()}")
    hub = Hub(broker, history, unsubscribe_grace=0)
    chat = ChatService(
        node=NodeId("n1"),
        history=history,
        broker=broker,
        presence=MemoryPresence(),
        hub=hub,
        auth=auth,
    )
    await broker.start(chat.node, hub.on_frame, chat.on_inbox, hub.resync)
    yield chat
    await broker.close()


async def test_a_connect_without_a_valid_token_is_refused_and_registers_nothing(service) -> None:
    for token in (None, "junk", signed({"sub": "bob", "exp": int(time.time()) - 60})):
        with pytest.raises(ChatError) as raised:
            await service.connect(Conn(f"c{token}"), "Bob", token)
        assert raised.value.code is ErrorCode.UNAUTHORIZED
    assert service.sessions() == []


async def test_a_user_is_the_same_user_on_every_connect_named_by_the_token(service) -> None:
    token = auth.mint("u-1", ttl=60, name="Ada")
    first = await service.connect(Conn("c1"), "Mallory", token)
    again = await service.connect(Conn("c2"), "Eve", token)
    other = await service.connect(Conn("c3"), None, auth.mint("u-2", ttl=60))
    assert first.user == again.user
    assert first.user.name == "Ada"
    assert other.user.name == "u-2" and other.user.id != first.user.id


async def test_rooms_outside_the_token_cannot_be_joined_read_or_listed(service) -> None:
    admin = await service.connect(Conn("a"), None, auth.mint("admin", ttl=60))
    await service.join(admin, "secret")
    await service.send(admin, "secret", "the plan")
    bob = await service.connect(Conn("b"), None, auth.mint("bob", ttl=60, rooms=["team-*"]))

    for ref in ("secret", "brand-new"):
        with pytest.raises(ChatError) as raised:
            await service.join(bob, ref)
        assert raised.value.code is ErrorCode.FORBIDDEN
    assert await service.history.room_by_name("brand-new") is None  # refused before made
    secret = await service.resolve("secret")
    for read in (
        service.history_page(secret.id, None, 10, bob.identity),
        service.history_page("secret", None, 10, bob.identity),
        service.members(secret.id, identity=bob.identity),
    ):
        with pytest.raises(ChatError) as raised:
            await read
        assert raised.value.code is ErrorCode.FORBIDDEN
    assert bob.rooms == set()
    assert [u.name for u in (await service.members("secret"))[1]] == ["admin"]

    await service.join(bob, "team-red")
    assert [m.text for m in await service.history_page("secret", None, 10, admin.identity)] == [
        "the plan"
    ]
    every = [info.room.name for info in await service.rooms()]
    assert every == ["secret", "team-red"]
    assert [i.room.name for i in await service.rooms(identity=bob.identity)] == ["team-red"]
    busy = await service.rooms(occupied=True, identity=bob.identity)
    assert [i.room.name for i in busy] == ["team-red"]
    page, following = await service.rooms_page(RoomId(0), 1, bob.identity)
    assert page == [] and following == secret.id  # a page may hold fewer; paging goes on
    page, following = await service.rooms_page(following, 1, bob.identity)
    assert [i.room.name for i in page] == ["team-red"] and following is None


async def test_a_user_on_two_connections_leaves_a_room_when_its_last_one_does() -> None:
    """Members list users: the others are told of a leave when the user's last
    connection in the room (on any node) leaves it or dies, not before."""
    cluster = Cluster(auth)
    (one, _, rec1), (two, _, rec2) = await cluster.node(), await cluster.node()
    ada = auth.mint("ada", ttl=60)

    async def joined(service, recorder, token):
        session = await service.connect(ServiceConn(service.new_conn_id(), recorder), None, token)
        result = await service.join(session, "room")
        session.conn.frames.extend(service.activate(session, result))
        return session

    watcher = await joined(one, rec1, auth.mint("watcher", ttl=60))
    tab = await joined(one, rec1, ada)
    phone = await joined(two, rec2, ada)
    tablet = await joined(two, rec2, ada)

    def leaves():
        return [
            f.data()["user"]["name"]
            for f in watcher.conn.frames
            if f.kind is Kind.PRESENCE and f.data()["event"] == "leave"
        ]

    await one.leave(tab, "room")  # still in through two connections on the other node
    await two.disconnect(phone.conn.id)  # still in through the tablet, on the same node
    assert leaves() == []
    assert [u.name for u in (await one.members("room"))[1]] == ["watcher", "ada"]
    await two.disconnect(tablet.conn.id)
    assert leaves() == ["ada"]
    assert [u.name for u in (await one.members("room"))[1]] == ["watcher"]

    await joined(two, rec2, ada)
    again = await joined(one, rec1, ada)
    # Node two dies with one of ada's connections: she is still in through node one.
    await one.announce_departed(await cluster.presence.drop_node(two.node))
    assert leaves() == ["ada"]
    await one.disconnect(again.conn.id)
    assert leaves() == ["ada", "ada"]


async def test_a_refresh_takes_a_newer_token_of_the_same_user_only(service) -> None:
    first = auth.mint("bob", ttl=60, rooms=["a", "b"])
    bob = await service.connect(Conn("b"), None, first)
    for room in ("a", "b"):
        await service.join(bob, room)
    before = bob.identity
    for token, code in [
        (auth.mint("eve", ttl=600), ErrorCode.FORBIDDEN),
        ("junk", ErrorCode.UNAUTHORIZED),
        (signed({"sub": "bob", "exp": int(time.time()) - 60}), ErrorCode.UNAUTHORIZED),
    ]:
        with pytest.raises(ChatError) as raised:
            await service.refresh(bob, token)
        assert raised.value.code is code
        assert bob.identity == before and len(bob.rooms) == 2
    identity, left = await service.refresh(bob, auth.mint("bob", ttl=600, rooms=["a"]))
    assert bob.identity == identity and identity.expires > before.expires
    assert [room.name for room in left] == ["b"]
    assert [r.name for r in [await service.resolve(r) for r in bob.rooms]] == ["a"]
    assert [u.name for u in (await service.members("b"))[1]] == []


def test_a_token_checked_before_is_still_refused_once_it_has_expired() -> None:
    strict = Authenticator(SECRET, leeway=0)
    token = strict.mint("ada", ttl=1)
    exp = strict.verify(token).expires
    assert strict.verify(token).subject == "ada"  # checked again: the same answer
    deadline = time.monotonic() + 5
    while time.time() <= exp:  # until the wall clock is past exp (at most ~1 s)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(ChatError) as raised:
        strict.verify(token)
    assert raised.value.message == "the token has expired"
    with pytest.raises(ChatError):
        strict.verify(token)  # and stays refused
