"""ChatService and Hub over the in-memory engines: the rules, without a network."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import pytest

from roomcast.adapters.memory import MemoryBroker, MemoryHistory, MemoryPresence
from roomcast.core import service as service_module
from roomcast.core.auth import Authenticator
from roomcast.core.events import Frame, Kind
from roomcast.core.hub import Hub
from roomcast.core.models import ConnId, Draft, Member, NodeId, Position, RoomId, User, UserId
from roomcast.core.service import ChatService, Sequencer
from roomcast.exceptions import ChatError, ErrorCode, UnavailableError

_names = itertools.count()


@dataclass(eq=False)
class Conn:
    id: ConnId
    transport: Recorder
    frames: list[Frame] = field(default_factory=list)

    def messages(self):
        return [f.data() for f in self.frames if f.kind is Kind.MESSAGE]


class Recorder:
    """A transport that keeps what it was asked to write, per connection."""

    def __init__(self):
        self.encodes = 0
        self.handovers = 0
        """Calls of deliver and deliver_many: what a socket transport writes once per member."""

    async def deliver(self, frame, conns):
        self.encodes += 1
        self.handovers += 1
        for conn in conns:
            conn.frames.append(frame)

    async def deliver_many(self, frames, conns):
        self.encodes += len(frames)
        self.handovers += 1
        for conn in conns:
            conn.frames.extend(frames)

    async def deliver_one(self, frame, conn):
        conn.frames.append(frame)


class Cluster:
    """Nodes sharing one in-memory bus, presence and history."""

    def __init__(self, auth=None):
        self.auth = auth
        self.bus = f"bus{next(_names)}"
        self.history = MemoryHistory()
        self.presence = MemoryPresence()
        self.nodes: list[tuple[ChatService, MemoryBroker, Recorder]] = []

    async def node(self, broker_class=MemoryBroker, **options):
        broker = broker_class(self.bus)
        hub = Hub(broker, self.history, unsubscribe_grace=0)
        node_id = NodeId(f"n{len(self.nodes)}")
        service = ChatService(
            node=node_id,
            history=self.history,
            broker=broker,
            presence=self.presence,
            hub=hub,
            auth=self.auth,
            **options,
        )
        await broker.start(node_id, hub.on_frame, service.on_inbox, hub.resync)
        recorder = Recorder()
        self.nodes.append((service, broker, recorder))
        return service, broker, recorder


async def _ignore(data: bytes) -> None:
    return None


async def connect(service, recorder, name):
    conn = Conn(service.new_conn_id(), recorder)
    return await service.connect(conn, name)


async def join(service, session, room, since=None):
    result = await service.join(session, room, since)
    session.conn.frames.extend(service.activate(session, result))
    return result


async def two_in_lobby(first: str, second: str):
    """Two nodes of one cluster, a client of each joined to the lobby: the cluster, then
    per node (service, session, join result)."""
    cluster = Cluster()
    nodes = [await cluster.node(), await cluster.node()]
    out = []
    for (service, _, recorder), name in zip(nodes, (first, second), strict=True):
        session = await connect(service, recorder, name)
        out.append((service, session, await join(service, session, "lobby")))
    return cluster, out[0], out[1]


@pytest.fixture
async def one():
    cluster = Cluster()
    service, _, recorder = await cluster.node()
    return service, recorder


async def test_members_see_one_order_and_the_sender_gets_its_own(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    await asyncio.gather(
        *(service.send(s, "lobby", f"m{i}") for i in range(20) for s in (alice, bob))
    )
    a = [m["seq"] for m in alice.conn.messages()]
    b = [m["seq"] for m in bob.conn.messages()]
    assert a == b == list(range(1, 41))


async def test_one_encode_per_frame_not_per_recipient(one):
    service, rec = one
    sessions = [await connect(service, rec, f"u{i}") for i in range(10)]
    for s in sessions:
        await join(service, s, "big")
    before = rec.encodes
    await service.send(sessions[0], "big", "hello")
    assert rec.encodes - before == 1
    assert all(s.conn.messages()[-1]["text"] == "hello" for s in sessions)


async def test_send_without_join_is_not_member_and_stores_nothing(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    with pytest.raises(ChatError) as info:
        await service.send(bob, "lobby", "sneaky")
    assert info.value.code is ErrorCode.NOT_MEMBER
    assert await service.history_page("lobby", None, 50) == []


async def test_leave_stops_delivery_and_announces(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    await service.leave(bob, "lobby")
    await service.send(alice, "lobby", "after")
    assert [m["text"] for m in bob.conn.messages()] == []
    presence = [f.data() for f in alice.conn.frames if f.kind is Kind.PRESENCE]
    assert {"event": "leave", "user": bob.user.to_wire(), "room": 1} in presence


async def test_a_storm_of_joins_announces_each_joiner_once_to_everyone_in_few_hand_overs():
    """Thirty clients join one room at once (a reconnect after a deploy): each member
    sees every later joiner's join event exactly once, and the node hands the events
    over in batches, not one fan-out per joiner."""
    cluster = Cluster()
    service, broker, rec = await cluster.node()
    broker.hand_batches_to(service.hub.on_frames)
    first = await connect(service, rec, "first")
    await join(service, first, "hall")
    sessions = [await connect(service, rec, f"j{i}") for i in range(30)]
    before = rec.handovers
    await asyncio.gather(*(join(service, s, "hall") for s in sessions))

    def joins_seen(session):
        return [
            f.data()["user"]["name"]
            for f in session.conn.frames
            if f.kind is Kind.PRESENCE and f.data()["event"] == "join"
        ]

    seen = joins_seen(first)
    assert sorted(seen) == sorted(["first", *(f"j{i}" for i in range(30))])  # each once
    for s in sessions:
        names = joins_seen(s)
        assert len(names) == len(set(names))
        assert s.user.name in names  # its own, after its join reply
    assert rec.handovers - before < 30 // 2


class SlowRecorder(Recorder):
    """A transport whose every hand-over holds the event loop, as writing one frame to
    each of a thousand WebSockets does."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    async def deliver(self, frame, conns):
        time.sleep(self.seconds)
        await super().deliver(frame, conns)

    async def deliver_many(self, frames, conns):
        time.sleep(self.seconds)
        await super().deliver_many(frames, conns)


async def test_joins_spread_over_time_into_a_room_slow_to_reach_share_hand_overs():
    """Joins that trickle into a room whose hand-over is slow (a big room: every
    announcement is a write to each member) wait for the announcer to gather them, instead
    of costing every member a write each: twelve joins two milliseconds apart into a
    room whose hand-over takes 20 ms go out in a few hand-overs, every member sees every
    later joiner once, in join order, and every join is answered."""
    cluster = Cluster()
    service, broker, _ = await cluster.node()
    broker.hand_batches_to(service.hub.on_frames)
    slow = SlowRecorder(0.02)
    first = await connect(service, slow, "first")
    await join(service, first, "hall")
    sessions = [await connect(service, slow, f"j{i}") for i in range(12)]
    before = slow.handovers
    joins = []
    for session in sessions:
        joins.append(asyncio.create_task(join(service, session, "hall")))
        await asyncio.sleep(0.002)
    await asyncio.wait_for(asyncio.gather(*joins), 10)
    seen = [
        f.data()["user"]["name"]
        for f in first.conn.frames
        if f.kind is Kind.PRESENCE and f.data()["event"] == "join"
    ]
    assert seen == ["first", *(f"j{i}" for i in range(12))]
    assert slow.handovers - before <= 6  # one each without the wait: 12


async def test_join_with_since_returns_exactly_what_was_missed(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    first = await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    await service.send(alice, "lobby", "seen")
    await service.disconnect(bob.conn.id)
    for i in range(5):
        await service.send(alice, "lobby", f"missed {i}")
    bob2 = await connect(service, rec, "bob")
    result = await join(service, bob2, "lobby", Position(first.room.epoch, 1))
    assert result.recovered is True
    assert [m.text for m in result.missed] == [f"missed {i}" for i in range(5)]
    assert bob2.conn.messages() == []  # not delivered live a second time
    stale = await join(service, bob2, "lobby", Position("other-epoch", 1))
    assert stale.recovered is False and stale.missed == []


async def test_frames_during_a_join_are_held_and_filtered_by_seq(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    result = await service.join(bob, "lobby")
    # Between the reply and activation, new messages are held for bob, not lost.
    await service.send(alice, "lobby", "during")
    bob.conn.frames.extend(service.activate(bob, result))
    await service.send(alice, "lobby", "after")
    assert [m["text"] for m in bob.conn.messages()] == ["during", "after"]


async def test_a_node_without_members_receives_nothing_for_the_room():
    cluster = Cluster()
    s1, b1, r1 = await cluster.node()
    s2, b2, r2 = await cluster.node()
    alice = await connect(s1, r1, "alice")
    await join(s1, alice, "x")
    carol = await connect(s2, r2, "carol")
    await join(s2, carol, "y")
    for i in range(10):
        await s1.send(alice, "x", f"m{i}")
    assert b2.received == 1  # only carol's own join presence in room y
    assert b1.received == 11  # alice's join + 10 messages


async def test_presence_spans_nodes_and_dead_nodes_are_reaped():
    cluster = Cluster()
    s1, _, r1 = await cluster.node()
    s2, _, r2 = await cluster.node()
    alice = await connect(s1, r1, "alice")
    bob = await connect(s2, r2, "bob")
    await join(s1, alice, "lobby")
    await join(s2, bob, "lobby")
    _, members, _ = await s1.members("lobby")
    assert {u.name for u in members} == {"alice", "bob"}
    assert [(i.room.name, i.members) for i in await s2.rooms()] == [("lobby", 2)]
    await cluster.presence.heartbeat(s2.node, ttl=-1)  # node 2 has stopped heartbeating
    removed = await cluster.presence.reap()
    await s1.announce_departed(removed)
    _, members, _ = await s1.members("lobby")
    assert [u.name for u in members] == ["alice"]
    leaves = [f.data() for f in alice.conn.frames if f.kind is Kind.PRESENCE]
    assert leaves[-1] == {"room": 1, "event": "leave", "user": bob.user.to_wire()}


async def test_subscription_is_dropped_after_the_last_local_member_leaves(one):
    service, rec = one
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    assert service.hub.local_rooms() == [1]
    await service.leave(alice, "lobby")
    for _ in range(10):  # the grace is 0: the drop runs on the next loop turns
        if not service.hub.local_rooms():
            break
        await asyncio.sleep(0)
    assert service.hub.local_rooms() == []


async def test_bad_nickname_is_refused(one):
    service, rec = one
    for name in (None, "", "x" * 33, "a\x07b", 5):
        with pytest.raises(ChatError) as info:
            await connect(service, rec, name)
        assert info.value.code is ErrorCode.INVALID_NAME


async def test_direct_message_reaches_a_user_on_another_node():
    cluster = Cluster()
    s1, _, r1 = await cluster.node()
    s2, _, r2 = await cluster.node()
    alice = await connect(s1, r1, "alice")
    bob = await connect(s2, r2, "bob")
    sent = await s1.dm(alice, bob.user.id, "psst")
    dms = [f.data() for f in bob.conn.frames if f.kind is Kind.DM]
    assert dms == [sent]
    assert sent["from"] == alice.user.to_wire() and sent["text"] == "psst"
    assert not [f for f in alice.conn.frames if f.kind is Kind.DM]


async def test_direct_message_to_nobody_is_not_found_and_bad_text_is_refused(one):
    service, rec = one
    alice = await connect(service, rec, "alice")
    with pytest.raises(ChatError) as info:
        await service.dm(alice, 424242, "hello?")
    assert info.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ChatError) as info:
        await service.dm(alice, alice.user.id, "")
    assert info.value.code is ErrorCode.INVALID_TEXT


class SteppingClock:
    """A clock that returns the given instants, one per call."""

    def __init__(self, *instants: float) -> None:
        self._instants = list(instants)

    def __call__(self) -> float:
        return self._instants.pop(0)


async def test_the_sequencer_times_each_batch_it_stores_and_publishes():
    history, broker = MemoryHistory(), MemoryBroker(f"bus{next(_names)}")
    await broker.start(NodeId("n0"), _ignore, _ignore, _no_reconnect)
    room = await history.room_by_name("lobby", create=True)
    # append: 1.000 -> 1.004 (4 ms); publish: 1.004 -> 1.0045 (0.5 ms)
    sequencer = Sequencer(history, broker, clock=SteppingClock(1.0, 1.004, 1.0045))
    message = await sequencer.append(Draft(room.id, "m1", User(UserId(1), "ada"), "hi", 0))
    assert message.seq == 1
    assert sequencer.messages_stored == 1
    assert sequencer.append_seconds.count == 1
    assert sequencer.append_seconds.total == pytest.approx(0.004)
    assert dict(sequencer.append_seconds.cumulative())[0.005] == 1
    assert dict(sequencer.append_seconds.cumulative())[0.0025] == 0
    assert sequencer.publish_seconds.count == 1
    assert sequencer.publish_seconds.total == pytest.approx(0.0005)
    await broker.close()


async def test_a_batch_the_store_refuses_is_neither_counted_nor_timed():
    history, broker = MemoryHistory(), MemoryBroker(f"bus{next(_names)}")
    await broker.start(NodeId("n0"), _ignore, _ignore, _no_reconnect)
    sequencer = Sequencer(history, broker, clock=SteppingClock(1.0))
    with pytest.raises(ChatError) as error:
        await sequencer.append(Draft(RoomId(999), "m1", User(UserId(1), "ada"), "hi", 0))
    assert error.value.code is ErrorCode.NOT_FOUND
    assert sequencer.messages_stored == 0
    assert sequencer.append_seconds.count == sequencer.publish_seconds.count == 0
    await broker.close()


async def _no_reconnect() -> None:
    return None


class HeldBroker(MemoryBroker):
    """A broker whose publishes wait until the test lets them through, recording each
    batch's seqs in the order they were published."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = asyncio.Event()
        self.published: list[list[int]] = []

    async def publish_many(self, frames):
        await self.gate.wait()
        self.published.append([Frame.decode(data).seq for _, data in frames])
        await super().publish_many(frames)


async def test_a_batch_is_stored_while_the_previous_one_is_still_being_published():
    history, broker = MemoryHistory(), HeldBroker(f"bus{next(_names)}")
    await broker.start(NodeId("n0"), _ignore, _ignore, _no_reconnect)
    room = await history.room_by_name("lobby", create=True)
    sequencer = Sequencer(history, broker)
    user = User(UserId(1), "ada")

    async def stored(seq: int) -> bool:
        for _ in range(100):  # bounded: storing needs a few turns of the loop, no broker
            if await history.latest(room.id) >= seq:
                return True
            await asyncio.sleep(0)
        return False

    first = asyncio.ensure_future(sequencer.append(Draft(room.id, "m1", user, "one", 0)))
    assert await stored(1)
    second = asyncio.ensure_future(sequencer.append(Draft(room.id, "m2", user, "two", 0)))
    assert await stored(2)
    assert not first.done() and not second.done()  # acknowledged once handed to the broker
    assert broker.published == []
    broker.gate.set()
    assert [(await first).seq, (await second).seq] == [1, 2]
    assert broker.published == [[1], [2]]  # one publish at a time, in seq order
    await broker.close()


class HeldHistory(MemoryHistory):
    """A history whose first append waits until the test lets it through (as a store on
    another machine may); the batches it stored, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.appended: list[list[str]] = []

    async def append(self, drafts):
        if not self.appended:
            self.appended.append([])  # the first append has started
            await self.gate.wait()
            self.appended[0] = [d.text for d in drafts]
        else:
            self.appended.append([d.text for d in drafts])
        return await super().append(drafts)


async def test_messages_sent_while_the_first_is_being_stored_are_stored_after_it():
    """The first message of an idle node is stored in its sender's task; the two sent
    while its store is slow wait for it, then go as one batch: seqs and publishes in the
    order the messages were sent."""
    history, broker = HeldHistory(), HeldBroker(f"bus{next(_names)}")
    await broker.start(NodeId("n0"), _ignore, _ignore, _no_reconnect)
    room = await history.room_by_name("lobby", create=True)
    sequencer = Sequencer(history, broker)
    user = User(UserId(1), "ada")
    first = asyncio.ensure_future(sequencer.append(Draft(room.id, "m1", user, "one", 0)))
    for _ in range(100):  # bounded: a few turns of the loop
        if history.appended:
            break
        await asyncio.sleep(0)
    assert history.appended == [[]]  # the first append is under way, held
    later = [
        asyncio.ensure_future(sequencer.append(Draft(room.id, f"m{i}", user, text, 0)))
        for i, text in ((2, "two"), (3, "three"))
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    assert history.appended == [[]]  # nothing else is stored before the first
    history.gate.set()
    broker.gate.set()
    messages = [await first, *[await f for f in later]]
    assert [(m.seq, m.text) for m in messages] == [(1, "one"), (2, "two"), (3, "three")]
    assert history.appended == [["one"], ["two", "three"]]
    assert broker.published == [[1], [2, 3]]
    await broker.close()


async def test_with_local_first_the_node_own_members_get_a_batch_before_the_broker_has_it():
    history, broker = MemoryHistory(), HeldBroker(f"bus{next(_names)}")
    await broker.start(NodeId("n0"), _ignore, _ignore, _no_reconnect)
    room = await history.room_by_name("lobby", create=True)
    handed: list[int] = []

    async def local(frames: list[Frame]) -> None:
        handed.extend(frame.seq for frame in frames)

    sequencer = Sequencer(history, broker, local=local)
    user = User(UserId(1), "ada")
    first = asyncio.ensure_future(sequencer.append(Draft(room.id, "m1", user, "one", 0)))
    for _ in range(100):  # bounded: a few turns of the loop, no broker
        if handed:
            break
        await asyncio.sleep(0)
    assert handed == [1]
    assert broker.published == []  # the broker has not got it yet
    assert not first.done()  # the sender is answered once the broker has it
    broker.gate.set()
    assert (await first).seq == 1
    assert broker.published == [[1]]
    await broker.close()


async def test_a_client_recovering_on_a_node_behind_the_store_gets_each_message_once_in_order():
    """A node that stored a message and died before publishing it leaves the other nodes
    behind the store until they fill the gap from history. A client of the dead node
    that reconnects to one of them meanwhile recovers that message in its join reply's
    ``missed``: it must not get it once more, out of order, when the gap is filled."""
    cluster, (a, alice, joined), (b, carol, _) = await two_in_lobby("alice", "carol")
    # Stored by a third node, which died before publishing it: no frame ever comes.
    await cluster.history.append([Draft(joined.room.id, "lost-frame", alice.user, "x", 0)])
    dave = await connect(b, carol.conn.transport, "dave")
    since = Position(joined.room.epoch, joined.seq)
    recovered = await join(b, dave, "lobby", since)
    assert [m.seq for m in recovered.missed] == [1]
    await a.send(alice, "lobby", "after")  # seq 2 reaches b early: 1 is filled from history
    for _ in range(300):  # the gap waits 0.25 s before it is filled
        if len(carol.conn.messages()) == 2:
            break
        await asyncio.sleep(0.01)
    assert [m["seq"] for m in carol.conn.messages()] == [1, 2]
    assert [m["seq"] for m in dave.conn.messages()] == [2]


class LostAnswerHistory(MemoryHistory):
    """A store on another machine whose appends fail with it out of reach: ``after`` says
    whether each failing append stored its batch before failing (its answer lost on the
    way back) or not; with ``down`` every read fails too."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: list[bool] = []
        self.down = False

    async def append(self, drafts):
        if not self.failing:
            return await super().append(drafts)
        if self.failing.pop(0):
            await super().append(drafts)
        raise UnavailableError("the connection to the store was lost")

    async def find(self, room, message_id):
        if self.down:
            raise UnavailableError("the store is out of reach")
        return await super().find(room, message_id)


async def test_a_send_whose_store_lost_its_answer_is_acknowledged_once_and_delivered():
    """An append can fail after the store committed it. The sender must not be told to
    try again (it would store the message twice) when the message was stored; it is told
    to when it was not; and when the store cannot tell, the reply says so."""
    cluster = Cluster()
    cluster.history = history = LostAnswerHistory()
    service, _, rec = await cluster.node()
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    await join(service, bob, "lobby")

    history.failing = [True]  # stored, answer lost
    message = await service.send(alice, "lobby", "kept")
    assert (message.seq, message.text) == (1, "kept")
    assert [m["text"] for m in bob.conn.messages()] == ["kept"]

    history.failing = [False]  # not stored
    with pytest.raises(ChatError) as refused:
        await service.send(alice, "lobby", "refused")
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "try again" in refused.value.message

    history.failing, history.down = [True], True  # stored, and the store stays away
    started = time.monotonic()
    with pytest.raises(ChatError) as unknown:
        await service.send(alice, "lobby", "unconfirmed")
    assert unknown.value.code is ErrorCode.UNAVAILABLE
    assert "may have been stored" in unknown.value.message
    assert time.monotonic() - started < 5  # it gave up within its bound

    history.down = False
    assert [m.text for m in await service.history_page("lobby", None, 50)] == [
        "kept",
        "unconfirmed",
    ]
    # Once the store answers again, the node finds it was stored and publishes it: the
    # members get it without waiting for the room's next message.
    for _ in range(300):
        if len(bob.conn.messages()) == 2:
            break
        await asyncio.sleep(0.01)
    assert [m["text"] for m in bob.conn.messages()] == ["kept", "unconfirmed"]


async def test_a_send_retried_with_its_id_on_another_node_is_stored_and_delivered_once():
    """The sender chose the message's id, got no confirmation (the store lost its answer
    and stayed away), and sends it again through another node: one message, its seq in
    both answers, every member gets it once."""
    cluster = Cluster()
    cluster.history = history = LostAnswerHistory()
    a, _, rec_a = await cluster.node()
    b, _, rec_b = await cluster.node()
    alice = await connect(a, rec_a, "alice")
    bob = await connect(b, rec_b, "bob")
    await join(a, alice, "lobby")
    await join(b, bob, "lobby")
    await b.send(bob, "lobby", "before", "b-1")

    history.failing, history.down = [True], True  # stored, and the store stays away
    with pytest.raises(ChatError) as unknown:
        await a.send(alice, "lobby", "hello", "a-1")
    assert "may have been stored" in unknown.value.message
    history.down = False

    again = await connect(b, rec_b, "alice")  # alice, reconnected to the other node
    await join(b, again, "lobby")
    message = await b.send(again, "lobby", "hello", "a-1")
    assert (message.seq, message.id, message.text, message.user.name) == (
        2,
        "a-1",
        "hello",
        "alice",
    )
    # The first node publishes it too once it learns it was stored; nobody gets it twice.
    await asyncio.wait_for(asyncio.gather(*a.sequencer._later), 5)
    after = await b.send(bob, "lobby", "after", "b-2")
    assert after.seq == 3
    for member in (alice, bob, again):
        for _ in range(300):
            if member.conn.messages()[-1:] and member.conn.messages()[-1]["seq"] == 3:
                break
            await asyncio.sleep(0.01)
    assert [m["seq"] for m in bob.conn.messages()] == [1, 2, 3]
    assert [m["seq"] for m in alice.conn.messages()] == [1, 2, 3]
    assert [m["seq"] for m in again.conn.messages()] == [3]  # joined after 2: in its reply
    stored = await b.history_page("lobby", None, 50)
    assert [(m.id, m.text) for m in stored] == [
        ("b-1", "before"),
        ("a-1", "hello"),
        ("b-2", "after"),
    ]


async def test_a_chosen_id_taken_by_another_message_is_a_conflict_and_stores_nothing(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    first = await service.send(alice, "lobby", "hello", "x-1")
    assert await service.send(alice, "lobby", "hello", "x-1") == first  # a retry
    for session, text in ((alice, "other words"), (bob, "hello")):
        with pytest.raises(ChatError) as info:
            await service.send(session, "lobby", text, "x-1")
        assert info.value.code is ErrorCode.CONFLICT
        assert "x-1" in info.value.message
    for bad in ("", "a" * 65, "has space", "ünï", 7, ["x"]):
        with pytest.raises(ChatError) as info:
            await service.send(alice, "lobby", "hello", bad)
        assert info.value.code is ErrorCode.BAD_REQUEST
    # The same id in another room is another message.
    await join(service, alice, "games")
    assert (await service.send(alice, "games", "hello", "x-1")).seq == 1
    assert [m.text for m in await service.history_page("lobby", None, 50)] == ["hello"]
    assert [m["seq"] for m in bob.conn.messages()] == [1]


class FlakyBroker(MemoryBroker):
    """An in-process broker whose publishes fail while ``failing`` is above 0 (each failure
    counts it down; below 0, they fail for good)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.failing = 0

    async def publish_many(self, items):
        if self.failing != 0:
            self.failing -= 1 if self.failing > 0 else 0
            raise UnavailableError("the broker is out of reach")
        await super().publish_many(items)


async def _until(condition) -> None:
    for _ in range(500):  # 5 s at most
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_a_stored_message_whose_publish_failed_reaches_members_in_a_quiet_room():
    cluster = Cluster()
    a, broker, rec_a = await cluster.node(FlakyBroker)
    b, _, rec_b = await cluster.node()
    alice, bob = await connect(a, rec_a, "alice"), await connect(b, rec_b, "bob")
    await join(a, alice, "lobby")
    await join(b, bob, "lobby")
    broker.failing = 2  # the publish, and its first try again
    message = await a.send(alice, "lobby", "stored, not published")
    assert message.seq == 1  # stored, so acknowledged
    assert bob.conn.messages() == []
    # No later message comes to show the gap: the node publishes it again by itself.
    await _until(lambda: len(bob.conn.messages()) == 1)
    assert [m["text"] for m in bob.conn.messages()] == ["stored, not published"]
    assert [m["seq"] for m in alice.conn.messages()] == [1]
    await a.sequencer.close()


async def test_messages_a_dead_node_stored_but_never_published_reach_the_room_once_it_is_reaped():
    cluster = Cluster()
    doomed, broker, rec_d = await cluster.node(FlakyBroker)
    a, _, rec_a = await cluster.node()
    alice, carol = await connect(a, rec_a, "alice"), await connect(doomed, rec_d, "carol")
    await join(a, alice, "lobby")
    await join(doomed, carol, "lobby")
    await a.send(alice, "lobby", "one")
    await _until(lambda: len(carol.conn.messages()) == 1)
    broker.failing = -1  # from now on the node reaches no one: it is as good as dead
    await doomed.send(carol, "lobby", "its last words")
    await doomed.sequencer.close()  # it died: nothing of it runs any more
    assert [m["text"] for m in alice.conn.messages()] == ["one"]

    await cluster.presence.heartbeat(doomed.node, ttl=-1)
    removed = await cluster.presence.reap()
    await a.announce_departed(removed)
    await _until(lambda: len(alice.conn.messages()) == 2)
    assert [(m["seq"], m["text"]) for m in alice.conn.messages()] == [
        (1, "one"),
        (2, "its last words"),
    ]
    leave = [f.data() for f in alice.conn.frames if f.kind is Kind.PRESENCE][-1]
    assert leave == {"room": 1, "event": "leave", "user": carol.user.to_wire()}


class DeafBroker(MemoryBroker):
    """An in-process broker whose node hears no room frames while ``deaf``: a broker
    outage as one node sees it, the others going on without it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.deaf = False

    async def start(self, node, on_room, on_inbox, on_reconnect):
        async def heard(data: bytes) -> None:
            if not self.deaf:
                await on_room(data)

        await super().start(node, heard, on_inbox, on_reconnect)


def told(session, joined) -> list[str]:
    """The members a client knows of: its join reply's, then the presence events since."""
    names = {user.id: user.name for user in joined.members}
    for frame in session.conn.frames:
        if frame.kind is Kind.PRESENCE:
            event = frame.data()
            if event["event"] == "join":
                names[event["user"]["id"]] = event["user"]["name"]
            else:
                names.pop(event["user"]["id"], None)
    return sorted(names.values())


async def test_after_an_outage_a_node_tells_its_members_the_joins_and_leaves_they_missed():
    cluster = Cluster()
    a, broker, rec_a = await cluster.node(DeafBroker)
    b, _, rec_b = await cluster.node()
    alice = await connect(a, rec_a, "alice")
    bob, carol = await connect(b, rec_b, "bob"), await connect(b, rec_b, "carol")
    await join(b, bob, "lobby")
    await join(b, carol, "lobby")
    joined = await join(a, alice, "lobby")
    await _until(lambda: told(alice, joined) == ["alice", "bob", "carol"])
    assert told(alice, joined) == ["alice", "bob", "carol"]

    broker.deaf = True  # node a's broker is out of reach; node b goes on
    await b.leave(carol, "lobby")
    dave = await connect(b, rec_b, "dave")
    await join(b, dave, "lobby")
    await b.send(bob, "lobby", "while a was away")
    assert told(alice, joined) == ["alice", "bob", "carol"]  # a heard none of it

    broker.deaf = False  # back: what a broker's reconnect makes the node do
    await a.resync()
    assert [m["text"] for m in alice.conn.messages()] == ["while a was away"]
    assert told(alice, joined) == ["alice", "bob", "dave"]
    frames = len(alice.conn.frames)
    await a.resync()  # nothing more was missed: nothing more is told
    assert len(alice.conn.frames) == frames


async def test_a_node_taken_for_dead_announces_its_members_again_when_it_is_back():
    cluster, (a, alice, joined), (b, _, _) = await two_in_lobby("alice", "bob")
    await _until(lambda: told(alice, joined) == ["alice", "bob"])
    await cluster.presence.heartbeat(b.node, ttl=-1)  # b stalled past its ttl: reaped
    await a.announce_departed(await cluster.presence.reap())
    assert told(alice, joined) == ["alice"]

    assert await cluster.presence.heartbeat(b.node, ttl=10)  # b is back, and lapsed
    await b.restore_presence(announce=True)
    await _until(lambda: told(alice, joined) == ["alice", "bob"])
    assert told(alice, joined) == ["alice", "bob"]
    _, members, _ = await a.members("lobby")
    assert sorted(u.name for u in members) == ["alice", "bob"]


class HeldPresence(MemoryPresence):
    """Presence whose membership writes wait until the test lets them through (as an
    engine on another machine takes a round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = 0

    async def add(self, room, member):
        self.held += 1
        await self.gate.wait()
        await super().add(room, member)


async def test_a_connection_that_closes_while_it_joins_is_not_left_in_the_room():
    cluster = Cluster()
    cluster.presence = presence = HeldPresence()
    service, _, rec = await cluster.node()
    bob = await connect(service, rec, "bob")
    presence.gate.set()
    joined = await join(service, bob, "lobby")
    presence.gate.clear()
    alice = await connect(service, rec, "alice")
    joining = asyncio.ensure_future(service.join(alice, "lobby"))
    await _until(lambda: presence.held == 2)  # alice's join waits for presence
    await service.disconnect(alice.conn.id)  # her client closes meanwhile
    presence.gate.set()
    with pytest.raises(ChatError) as refused:
        await joining
    assert refused.value.code is ErrorCode.BAD_REQUEST
    _, members, _ = await service.members("lobby")
    assert [u.name for u in members] == ["bob"]
    assert told(bob, joined) == ["bob"]  # her join was announced, and so is her leave
    await service.send(bob, "lobby", "after she left")
    assert alice.conn.messages() == []  # no longer attached to the room either


async def test_removals_a_failover_lost_are_made_again_when_the_engine_is_back():
    """A Redis failover loses the writes its dead primary had not yet passed on: here
    carol's leave and dave's disconnect, whose entries are listed again afterwards. The
    node makes its recent removals again (after it reconnects) and announces the leaves;
    a member who joined again since stays."""
    cluster = Cluster()
    service, _, rec = await cluster.node()
    alice = await connect(service, rec, "alice")
    joined = await join(service, alice, "lobby")
    room = joined.room.id
    carol, dave, erin = [await connect(service, rec, name) for name in ("carol", "dave", "erin")]
    for session in (carol, dave, erin):
        await join(service, session, "lobby")
    lost = [Member(s.user, s.conn.id, NodeId("n0")) for s in (carol, dave, erin)]
    await service.leave(carol, "lobby")
    await service.disconnect(dave.conn.id)
    await service.leave(erin, "lobby")
    await join(service, erin, "lobby")  # erin is back
    for member in lost:  # the failover: the removals are gone, the entries back
        await cluster.presence.add(room, member)
    await cluster.presence.register(lost[1])

    assert await service.redo_removals() == 2
    _, members, _ = await service.members("lobby")
    assert sorted(u.name for u in members) == ["alice", "erin"]
    assert [m.conn for m in await cluster.presence.locate(dave.user.id)] == []
    await _until(lambda: told(alice, joined) == ["alice", "erin"])
    assert await service.redo_removals() == 0  # nothing listed again: nothing to do


async def test_a_node_keeps_only_its_last_window_of_removals_to_make_again(monkeypatch):
    """What a node remembers to redo after a failover is its last REDO_WINDOW seconds of
    leaves, not every leave it has seen: a node that lives for weeks does not grow."""
    monkeypatch.setattr(service_module, "REDO_WINDOW", 0.2)
    cluster = Cluster()
    service, _, rec = await cluster.node()
    old = [await connect(service, rec, f"old{i}") for i in range(50)]
    for session in old:
        await join(service, session, "lobby")
        await service.disconnect(session.conn.id)  # a leave and an unregistration each
    assert len(service._removed_lately) == 100
    await asyncio.sleep(0.3)
    new = await connect(service, rec, "new")
    await join(service, new, "lobby")
    await service.leave(new, "lobby")
    room = (await service.resolve("lobby")).id
    assert list(service._removed_lately) == [(room, new.conn.id)]
    for session in old:  # a failover brought the old ones back: too old to be redone
        await cluster.presence.add(room, Member(session.user, session.conn.id, NodeId("n0")))
    await cluster.presence.add(room, Member(new.user, new.conn.id, NodeId("n0")))
    assert await service.redo_removals() == 1


async def test_a_retention_pass_trims_every_room_a_batch_at_a_time(monkeypatch):
    monkeypatch.setattr(service_module, "TRIM_BATCH", 3)
    monkeypatch.setattr(service_module, "TRIM_ROOMS_PAGE", 2)
    cluster = Cluster()
    service, _, rec = await cluster.node()
    ada = await connect(service, rec, "ada")
    sizes = {"a": 10, "b": 1, "c": 7, "d": 0, "e": 4}
    for name, size in sizes.items():
        await join(service, ada, name)
        for i in range(size):
            await service.send(ada, name, f"{name}{i}")
    assert await service.trim_history() == 0  # no rule, no pass
    assert await service.trim_history(keep=2) == 8 + 0 + 5 + 0 + 2
    for name, size in sizes.items():
        kept = [m.text for m in await service.history_page(name, None, 100)]
        assert kept == [f"{name}{i}" for i in range(max(size - 2, 0), size)]
    assert service.messages_trimmed == 15
    # By age: what was sent more than a minute ago goes, the rest stays.
    service._clock = lambda: time.time() + 120
    await service.send(ada, "a", "new")
    assert await service.trim_history(max_age=60) == 2 + 1 + 2 + 2
    assert [m.text for m in await service.history_page("a", None, 100)] == ["new"]
    stop = asyncio.Event()
    stop.set()
    await service.send(ada, "c", "kept by a stopped pass")
    assert await service.trim_history(keep=0, stopping=stop) == 0


async def test_posts_are_rated_per_sender_and_few_senders_are_remembered(monkeypatch):
    monkeypatch.setattr(service_module, "CALLERS_MAX", 3)
    cluster = Cluster()
    service, _, rec = await cluster.node(rate_limit=0.001, rate_burst=2)
    reader = await connect(service, rec, "reader")
    await join(service, reader, "news")

    async def post(source: str, **kwargs):
        return await service.post("news", f"from {source}", identity=None, source=source, **kwargs)

    with pytest.raises(ChatError) as refused:
        await post("a")  # no name on an open server
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert [(await post("a", name="bot")).seq for _ in range(2)] == [1, 2]
    with pytest.raises(ChatError) as refused:
        await post("a", name="bot")
    assert refused.value.code is ErrorCode.RATE_LIMITED
    assert (await post("b", name="bot")).seq == 3  # another sender has its own rate
    # Only so many senders are remembered (3 here): the least recently seen goes first.
    for source in ("c", "d"):
        await post(source, name="bot")
    assert (await post("a", name="bot")).seq == 6
    assert [m["seq"] for m in reader.conn.messages()] == [1, 2, 3, 4, 5, 6]


async def test_reads_without_a_connection_are_rated_per_caller():
    cluster = Cluster()
    service, _, _ = await cluster.node(request_rate_limit=0.001, request_rate_burst=3)
    for _ in range(3):
        service.spend_read("address 10.0.0.1")
    with pytest.raises(ChatError) as refused:
        service.spend_read("address 10.0.0.1")
    assert refused.value.code is ErrorCode.RATE_LIMITED
    service.spend_read("address 10.0.0.2")  # another caller has its own rate
    unlimited, _, _ = await cluster.node(request_rate_limit=0)
    for _ in range(100):
        unlimited.spend_read("address 10.0.0.1")


async def test_a_post_on_a_server_that_checks_tokens_needs_one():
    cluster = Cluster(auth=Authenticator("a secret of the application, 32+ characters"))
    service, _, _ = await cluster.node()
    with pytest.raises(ChatError) as refused:
        await service.post("news", "hello", identity=None, name="bot", source="x")
    assert refused.value.code is ErrorCode.UNAUTHORIZED


# -- deleting messages ------------------------------------------------------------------


def _token_connector(service, recorder, auth):
    """Connects to ``service`` with a token of ``auth`` for a subject, with claims."""

    async def connect_as(subject, **claims):
        conn = Conn(service.new_conn_id(), recorder)
        return await service.connect(conn, None, auth.mint(subject, ttl=60, **claims))

    return connect_as


def _deletions(session) -> list[dict]:
    return [f.data() for f in session.conn.frames if f.kind is Kind.DELETED]


async def test_a_sender_deletes_its_message_and_every_member_on_every_node_is_told():
    _, (a, alice, _), (b, bob, _) = await two_in_lobby("alice", "bob")
    first = await a.send(alice, "lobby", "oops, wrong room")
    await a.send(alice, "lobby", "hello")
    deleted = await a.delete(alice, "lobby", first.seq)
    assert (deleted.seq, deleted.id, deleted.user, deleted.ts) == (
        first.seq,
        first.id,
        first.user,
        first.ts,
    )
    assert deleted.text == "" and deleted.deleted
    told = {"room": first.room, "seq": 1, "id": first.id, "by": alice.user.to_wire()}
    assert _deletions(alice) == _deletions(bob) == [told]
    page = await b.history_page("lobby", None, 50)
    assert [(m.seq, m.text, m.deleted) for m in page] == [(1, "", True), (2, "hello", False)]
    assert page[0].to_wire()["deleted"] is True and "deleted" not in page[1].to_wire()
    assert a.messages_deleted == 1


async def test_only_the_sender_deletes_a_message_on_an_open_server(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    message = await service.send(alice, "lobby", "mine")
    with pytest.raises(ChatError) as refused:
        await service.delete(bob, "lobby", message.seq)
    assert refused.value.code is ErrorCode.FORBIDDEN
    for ref, seq, code in (
        ("lobby", 2, ErrorCode.NOT_FOUND),
        ("nowhere", 1, ErrorCode.NOT_FOUND),
        ("lobby", 0, ErrorCode.BAD_REQUEST),
        ("lobby", "1", ErrorCode.BAD_REQUEST),
        ("lobby", True, ErrorCode.BAD_REQUEST),
    ):
        with pytest.raises(ChatError) as info:
            await service.delete(alice, ref, seq)
        assert info.value.code is code
    # Nothing changed, and nobody was told anything.
    assert [m.text for m in await service.history_page("lobby", None, 50)] == ["mine"]
    assert _deletions(alice) == _deletions(bob) == []
    assert service.messages_deleted == 0


async def test_deleting_again_tells_the_room_again_and_counts_once(one):
    service, rec = one
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "twice")
    first = await service.delete(alice, "lobby", message.seq)
    assert await service.delete(alice, "lobby", message.seq) == first
    assert [d["seq"] for d in _deletions(alice)] == [1, 1]
    assert service.messages_deleted == 1


async def test_a_retry_of_a_deleted_message_gets_it_as_deleted_not_a_conflict(one):
    service, rec = one
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    sent = await service.send(alice, "lobby", "sent once", "c-1")
    deleted = await service.delete(alice, "lobby", sent.seq)
    assert await service.send(alice, "lobby", "sent once", "c-1") == deleted
    assert [m.seq for m in await service.history_page("lobby", None, 50)] == [1]


async def test_a_client_recovering_after_a_deletion_gets_the_deleted_message_as_deleted(one):
    service, rec = one
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    lobby = await join(service, alice, "lobby")
    await service.send(alice, "lobby", "kept")
    gone = await service.send(alice, "lobby", "regretted")
    await service.delete(alice, "lobby", gone.seq)
    since = Position(lobby.room.epoch, 0)
    recovered = await join(service, bob, "lobby", since)
    assert [(m.text, m.deleted) for m in recovered.missed] == [("kept", False), ("", True)]


async def test_moderators_delete_any_message_of_the_rooms_their_token_names():
    auth = Authenticator("a secret of the application, 32+ characters")
    cluster = Cluster(auth=auth)
    service, _, rec = await cluster.node()

    connect_as = _token_connector(service, rec, auth)
    alice = await connect_as("alice")
    bob = await connect_as("bob")
    mod = await connect_as("mod", moderator=True)
    elsewhere = await connect_as("mod-2", moderator=True, rooms=["other"])
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "spam")
    for session, code in ((bob, ErrorCode.FORBIDDEN), (elsewhere, ErrorCode.FORBIDDEN)):
        with pytest.raises(ChatError) as refused:
            await service.delete(session, "lobby", message.seq)
        assert refused.value.code is code
    assert (await service.history_page("lobby", None, 1))[0].text == "spam"
    deleted = await service.delete(mod, "lobby", message.seq)  # not a member: allowed
    assert deleted.deleted
    assert _deletions(alice) == [
        {"room": message.room, "seq": 1, "id": message.id, "by": mod.user.to_wire()}
    ]


async def test_deleting_without_a_connection_follows_the_token_or_trusts_an_open_server():
    open_cluster = Cluster()
    service, _, rec = await open_cluster.node()
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "anything")
    deleted = await service.remove("lobby", message.seq, identity=None, source="address x")
    assert deleted.deleted
    assert _deletions(alice) == [{"room": message.room, "seq": 1, "id": message.id, "by": None}]

    auth = Authenticator("a secret of the application, 32+ characters")
    cluster = Cluster(auth=auth)
    service, _, rec = await cluster.node()
    conn = Conn(service.new_conn_id(), rec)
    alice = await service.connect(conn, None, auth.mint("alice", ttl=60))
    await join(service, alice, "lobby")
    first = await service.send(alice, "lobby", "one")
    second = await service.send(alice, "lobby", "two")

    async def remove(seq, subject, **claims):
        identity = auth.verify(auth.mint(subject, ttl=60, **claims))
        return await service.remove("lobby", seq, identity=identity, source=subject)

    with pytest.raises(ChatError) as refused:
        await service.remove("lobby", first.seq, identity=None, source="address x")
    assert refused.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(ChatError) as refused:
        await remove(first.seq, "bob")
    assert refused.value.code is ErrorCode.FORBIDDEN
    assert (await remove(first.seq, "alice")).deleted  # the sender, by its token
    assert (await remove(second.seq, "mod", moderator=True)).deleted
    assert [d["by"]["name"] for d in _deletions(alice)] == ["alice", "mod"]


async def test_a_deletion_the_broker_could_not_publish_is_stored_and_told_when_tried_again():
    cluster = Cluster()

    class Unreachable(MemoryBroker):
        failing = False

        async def publish(self, room, frame):
            if self.failing:
                raise UnavailableError("the broker is out of reach")
            await super().publish(room, frame)

    service, broker, rec = await cluster.node(Unreachable)
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "hello")
    broker.failing = True
    with pytest.raises(ChatError) as refused:
        await service.delete(alice, "lobby", message.seq)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "delete it again" in refused.value.message
    assert (await service.history_page("lobby", None, 1))[0].deleted
    assert _deletions(alice) == []
    broker.failing = False
    await service.delete(alice, "lobby", message.seq)
    assert [d["seq"] for d in _deletions(alice)] == [1]
    assert service.messages_deleted == 1


# -- editing messages -------------------------------------------------------------------


def _edits(session) -> list[dict]:
    return [f.data() for f in session.conn.frames if f.kind is Kind.EDITED]


async def test_a_sender_edits_its_message_and_every_member_on_every_node_gets_it_as_it_is_now():
    _, (a, alice, _), (b, bob, _) = await two_in_lobby("alice", "bob")
    first = await a.send(alice, "lobby", "helo")
    await a.send(alice, "lobby", "world")
    edited = await a.edit(alice, "lobby", first.seq, "hello")
    assert (edited.seq, edited.id, edited.user, edited.ts, edited.text) == (
        first.seq,
        first.id,
        first.user,
        first.ts,
        "hello",
    )
    assert edited.edited is not None and edited.edited >= first.ts
    assert _edits(alice) == _edits(bob) == [edited.to_wire()]
    assert edited.to_wire()["edited"] == edited.edited
    page = await b.history_page("lobby", None, 50)
    assert [(m.text, m.edited is not None) for m in page] == [("hello", True), ("world", False)]
    assert "edited" not in page[1].to_wire()
    assert a.messages_edited == 1


async def test_only_the_sender_edits_a_message_and_bad_edits_change_nothing():
    auth = Authenticator("a secret of the application, 32+ characters")
    cluster = Cluster(auth=auth)
    service, _, rec = await cluster.node()

    connect_as = _token_connector(service, rec, auth)
    alice, bob = await connect_as("alice"), await connect_as("bob")
    mod = await connect_as("mod", moderator=True)
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "mine")
    for session, payload, code in (
        (bob, ("lobby", message.seq, "not yours"), ErrorCode.FORBIDDEN),
        (mod, ("lobby", message.seq, "nor yours"), ErrorCode.FORBIDDEN),
        (alice, ("lobby", 2, "no such"), ErrorCode.NOT_FOUND),
        (alice, ("lobby", message.seq, ""), ErrorCode.INVALID_TEXT),
        (alice, ("lobby", message.seq, "x" * 4001), ErrorCode.INVALID_TEXT),
        (alice, ("lobby", message.seq, "bell\a"), ErrorCode.INVALID_TEXT),
        (alice, ("lobby", 0, "zero"), ErrorCode.BAD_REQUEST),
        (alice, ("nowhere", 1, "no room"), ErrorCode.NOT_FOUND),
    ):
        with pytest.raises(ChatError) as refused:
            await service.edit(session, *payload)
        assert refused.value.code is code, payload
    assert (await service.history_page("lobby", None, 1))[0] == message
    assert _edits(alice) == []
    # A deleted message cannot be edited back.
    await service.delete(mod, "lobby", message.seq)
    with pytest.raises(ChatError) as refused:
        await service.edit(alice, "lobby", message.seq, "back")
    assert refused.value.code is ErrorCode.NOT_FOUND
    assert "deleted" in refused.value.message
    assert (await service.history_page("lobby", None, 1))[0].deleted


async def test_a_retry_of_an_edited_message_gets_it_as_edited_not_a_conflict(one):
    service, rec = one
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    sent = await service.send(alice, "lobby", "tpyo", "c-1")
    edited = await service.edit(alice, "lobby", sent.seq, "typo")
    assert await service.send(alice, "lobby", "tpyo", "c-1") == edited


async def test_editing_without_a_connection_follows_the_token_or_trusts_an_open_server():
    open_cluster = Cluster()
    service, _, rec = await open_cluster.node()
    alice = await connect(service, rec, "alice")
    await join(service, alice, "lobby")
    message = await service.send(alice, "lobby", "draft")
    edited = await service.revise("lobby", message.seq, "final", identity=None, source="x")
    assert (edited.text, [e["text"] for e in _edits(alice)]) == ("final", ["final"])

    auth = Authenticator("a secret of the application, 32+ characters")
    cluster = Cluster(auth=auth)
    service, _, rec = await cluster.node()
    conn = Conn(service.new_conn_id(), rec)
    alice = await service.connect(conn, None, auth.mint("alice", ttl=60))
    await join(service, alice, "lobby")
    sent = await service.send(alice, "lobby", "one")

    async def revise(subject, **claims):
        identity = auth.verify(auth.mint(subject, ttl=60, **claims))
        return await service.revise("lobby", sent.seq, "changed", identity=identity, source="s")

    for subject, claims in (("bob", {}), ("mod", {"moderator": True})):
        with pytest.raises(ChatError) as refused:
            await revise(subject, **claims)
        assert refused.value.code is ErrorCode.FORBIDDEN
    with pytest.raises(ChatError) as refused:
        await service.revise("lobby", sent.seq, "x", identity=None, source="s")
    assert refused.value.code is ErrorCode.UNAUTHORIZED
    assert (await revise("alice")).text == "changed"


async def test_a_client_recovering_gets_the_edits_and_deletions_it_missed_of_what_it_holds():
    now = [1_000.0]
    cluster = Cluster()
    service, _, rec = await cluster.node(clock=lambda: now[0])
    alice, bob = await connect(service, rec, "alice"), await connect(service, rec, "bob")
    lobby = await join(service, alice, "lobby")
    await join(service, bob, "lobby")
    old = await service.send(alice, "lobby", "long ago")
    await service.edit(alice, "lobby", old.seq, "long ago, edited while bob was there")
    now[0] += 3600
    sent = [await service.send(alice, "lobby", f"m{i}") for i in range(3)]
    held = Position(lobby.room.epoch, sent[-1].seq)  # bob's last message
    await service.disconnect(bob.conn.id)

    now[0] += 5
    await service.edit(alice, "lobby", sent[0].seq, "m0, edited")
    await service.delete(alice, "lobby", sent[1].seq)
    later = await service.send(alice, "lobby", "m3")
    bob = await connect(service, rec, "bob")
    back = await join(service, bob, "lobby", held)
    assert back.recovered is True
    assert back.missed == [later]
    assert [(m.seq, m.text, m.deleted) for m in back.changed] == [
        (sent[0].seq, "m0, edited", False),
        (sent[1].seq, "", True),
    ]  # not the edit of an hour before bob's last message: he had it
    # From before the edits: they are in what it missed, as they are now.
    earlier = await join(service, bob, "lobby", Position(lobby.room.epoch, old.seq))
    assert [m.text for m in earlier.missed] == ["m0, edited", "", "m2", "m3"]
    assert [m.seq for m in earlier.changed] == [old.seq]  # within the minute of skew
    fresh = await join(service, bob, "lobby", Position(lobby.room.epoch, 0))
    assert (len(fresh.missed), fresh.changed) == (5, [])


async def test_after_a_broker_outage_a_nodes_members_get_the_edits_and_deletions_they_missed():
    cluster = Cluster()
    a, _, rec_a = await cluster.node()
    b, broker_b, rec_b = await cluster.node(DeafBroker)
    alice, bob = await connect(a, rec_a, "alice"), await connect(b, rec_b, "bob")
    await join(a, alice, "lobby")
    await join(b, bob, "lobby")
    first = await a.send(alice, "lobby", "first")
    second = await a.send(alice, "lobby", "second")
    assert [m["text"] for m in bob.conn.messages()] == ["first", "second"]
    broker_b.deaf = True
    edited = await a.edit(alice, "lobby", first.seq, "first, edited")
    await a.delete(alice, "lobby", second.seq)
    third = await a.send(alice, "lobby", "third")
    assert (bob.conn.messages()[2:], _edits(bob), _deletions(bob)) == ([], [], [])
    broker_b.deaf = False
    await b.resync()
    assert [m["seq"] for m in bob.conn.messages()] == [1, 2, third.seq]
    assert _edits(bob) == [edited.to_wire()]
    assert _deletions(bob) == [
        {"room": second.room, "seq": second.seq, "id": second.id, "by": None}
    ]
    assert b.hub.changes_resent == 2
