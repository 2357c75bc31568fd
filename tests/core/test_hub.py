"""The hub delivers a room's messages in seq order, each once, whatever order they arrive in."""

from __future__ import annotations

import asyncio

from roomcast.adapters.memory import MemoryBroker, MemoryHistory
from roomcast.core.events import Frame, Kind, message_frame, presence_frame
from roomcast.core.hub import Hub
from roomcast.core.models import ConnId, Draft, NodeId, RoomId, User, UserId

from .test_service import Conn, Recorder


async def _ignore(*_: object) -> None:
    return None


async def setup(gap_wait: float = 60.0):
    history = MemoryHistory()
    room = await history.room_by_name("r", create=True)
    broker = MemoryBroker()
    hub = Hub(broker, history, unsubscribe_grace=0, gap_wait=gap_wait)
    await broker.start(NodeId("n"), hub.on_frame, _ignore, hub.resync)
    conn = Conn(ConnId("n.1"), Recorder())
    await hub.begin_join(room.id, conn)
    hub.activate(room.id, conn, after=0)
    return history, hub, conn, room.id


async def store(history, room: RoomId, n: int):
    user = User(UserId(1), "u")
    drafts = [Draft(room, f"id{i}", user, f"t{i}", 0) for i in range(n)]
    return [message_frame(m).encode() for m in await history.append(drafts)]


def seqs(conn):
    return [m["seq"] for m in conn.messages()]


async def test_out_of_order_frames_are_delivered_in_order_and_duplicates_dropped():
    history, hub, conn, room = await setup()
    f = await store(history, room, 5)
    for i in (1, 0, 3, 2, 1, 4, 0):
        await hub.on_frame(f[i])
    assert seqs(conn) == [1, 2, 3, 4, 5]
    assert hub.duplicates_dropped == 2


async def test_a_gap_that_does_not_close_is_filled_from_history():
    history, hub, conn, room = await setup(gap_wait=0.01)
    f = await store(history, room, 4)
    await hub.on_frame(f[0])
    await hub.on_frame(f[3])  # 2 and 3 never arrive by the broker
    assert seqs(conn) == [1]
    for _ in range(200):
        if seqs(conn) == [1, 2, 3, 4]:
            break
        await asyncio.sleep(0.01)
    assert seqs(conn) == [1, 2, 3, 4]
    assert hub.gaps_filled == 2


async def test_resync_after_a_broker_outage_delivers_what_was_missed():
    history, hub, conn, room = await setup()
    f = await store(history, room, 3)
    await hub.on_frame(f[0])
    await hub.resync()  # frames 2 and 3 were published while the broker was away
    assert seqs(conn) == [1, 2, 3]
    await hub.on_frame(f[2])
    assert seqs(conn) == [1, 2, 3]


async def test_a_message_handed_over_by_its_own_node_is_delivered_once_in_seq_order():
    history, hub, conn, room = await setup()
    f = await store(history, room, 3)
    # Stored on this node right after seq 1 was stored on another, whose frame is late.
    await hub.deliver_stored([Frame.decode(f[1])])
    assert seqs(conn) == []
    await hub.on_frame(f[0])
    assert seqs(conn) == [1, 2]
    await hub.on_frame(f[1])  # the broker's copy of the one handed over
    await hub.deliver_stored([Frame.decode(f[2])])
    await hub.on_frame(f[2])
    assert seqs(conn) == [1, 2, 3]
    assert hub.duplicates_dropped == 2
    assert hub.frames_received == 3  # counts what the broker brought, nothing else


async def test_a_batch_reaches_each_member_as_one_run_per_room_in_seq_order():
    history, hub, conn, room = await setup()
    other = (await history.room_by_name("s", create=True)).id
    both = Conn(ConnId("n.2"), conn.transport)  # a member of both rooms, same transport
    for r in (room, other):
        await hub.begin_join(r, both)
        hub.activate(r, both, after=0)
    f = await store(history, room, 4)
    g = await store(history, other, 2)
    before = conn.transport.handovers
    # One batch: the rooms interleaved, room r's seq 3 before its 2, and its 1 twice.
    await hub.on_frames([f[0], g[0], f[2], f[1], g[1], f[0], f[3]])
    assert seqs(conn) == [1, 2, 3, 4]
    assert [(m["room"], m["seq"]) for m in both.messages()] == [
        (room, 1),
        (room, 2),
        (room, 3),
        (room, 4),
        (other, 1),
        (other, 2),
    ]
    # Each room's frames went to the transport once, for every member of the room at once.
    assert conn.transport.handovers - before == 2
    assert hub.duplicates_dropped == 1
    assert hub.frames_received == 7


async def test_a_batch_that_leaves_a_gap_holds_the_frames_after_it():
    history, hub, conn, room = await setup()
    f = await store(history, room, 5)
    await hub.on_frames([f[0], f[2], f[3]])  # 2 is still on its way
    assert seqs(conn) == [1]
    await hub.on_frames([f[1], f[4]])
    assert seqs(conn) == [1, 2, 3, 4, 5]


async def test_a_joiner_is_held_the_whole_run_and_gets_what_it_has_not_seen():
    history, hub, conn, room = await setup()
    f = await store(history, room, 3)
    joiner = Conn(ConnId("n.3"), conn.transport)
    await hub.begin_join(room, joiner)
    await hub.on_frames(f)
    assert seqs(joiner) == []  # held until its join is answered
    held = hub.activate(room, joiner, after=1)  # its join reply showed up to seq 1
    assert [frame.seq for frame in held] == [2, 3]
    assert seqs(conn) == [1, 2, 3]


async def test_the_in_process_broker_hands_a_published_batch_over_in_one_call():
    bus = f"batches{id(object())}"
    batched, single = MemoryBroker(bus), MemoryBroker(bus)
    calls: list[list[bytes]] = []
    one_by_one: list[bytes] = []

    async def on_frames(frames: list[bytes]) -> None:
        calls.append(list(frames))

    async def on_frame(frame: bytes) -> None:
        one_by_one.append(frame)

    await batched.start(NodeId("a"), _ignore, _ignore, _no_reconnect)
    batched.hand_batches_to(on_frames)
    await single.start(NodeId("b"), on_frame, _ignore, _no_reconnect)
    for broker in (batched, single):
        await broker.subscribe(RoomId(1))
    await batched.subscribe(RoomId(2))
    await single.publish_many([(RoomId(1), b"x1"), (RoomId(2), b"y1"), (RoomId(1), b"x2")])
    assert calls == [[b"x1", b"y1", b"x2"]]
    assert one_by_one == [b"x1", b"x2"]  # room 2 is not subscribed there
    assert (batched.received, single.received) == (3, 2)
    await batched.close()
    await single.close()
    await single.start(NodeId("a"), on_frame, _ignore, _no_reconnect)  # a's id, per frame now
    await single.subscribe(RoomId(1))
    await single.publish_many([(RoomId(1), b"x3"), (RoomId(1), b"x4")])
    assert one_by_one[-2:] == [b"x3", b"x4"]
    assert calls == [[b"x1", b"y1", b"x2"]]
    await single.close()


async def _no_reconnect() -> None:
    return None


class WaitingRecorder(Recorder):
    """A transport whose writes wait (as Engine.IO's queue may), while ``during`` runs."""

    def __init__(self, during):
        super().__init__()
        self.during = during

    async def deliver(self, frame, conns):
        await super().deliver(frame, conns)
        if self.during is not None:
            during, self.during = self.during, None
            await during()


async def test_a_member_of_another_transport_joining_while_a_delivery_waits_gets_later_frames():
    history, hub, conn, room = await setup()
    late = Conn(ConnId("n.2"), Recorder())

    async def join_late() -> None:
        await hub.begin_join(room, late)
        hub.activate(room, late, after=1)

    waiting = Conn(ConnId("n.3"), WaitingRecorder(join_late))
    await hub.begin_join(room, waiting)
    hub.activate(room, waiting, after=0)
    f = await store(history, room, 2)
    await hub.on_frame(f[0])  # a new transport joins the room during this delivery
    await hub.on_frame(f[1])
    assert seqs(conn) == seqs(waiting) == [1, 2]
    assert seqs(late) == [2]


async def test_a_joiner_whose_reply_is_ahead_of_the_node_gets_only_what_follows_it():
    """A join reads the room's position from the store, where messages can already be whose
    frames are still on their way to this node. The joiner has them (in its reply's
    ``missed``, or from before it reconnected) up to the reply's seq: when they arrive it
    must not get them again, out of order — and it must get everything after."""
    history, hub, conn, room = await setup()
    f = await store(history, room, 5)
    await hub.on_frame(f[0])  # seq 1 delivered here; 2 and 3 stored, on their way
    joiner = Conn(ConnId("n.3"), conn.transport)
    await hub.begin_join(room, joiner)
    assert hub.activate(room, joiner, after=3) == []  # its reply showed up to seq 3
    await hub.on_frame(f[2])  # early: held
    await hub.on_frame(f[1])  # 2, then 3
    await hub.on_frames([f[3], f[4]])
    assert seqs(conn) == [1, 2, 3, 4, 5]
    assert seqs(joiner) == [4, 5]


async def test_a_joiner_ahead_of_the_node_gets_the_run_that_passes_it_filled_from_history():
    history, hub, conn, room = await setup(gap_wait=0.01)
    f = await store(history, room, 4)
    joiner = Conn(ConnId("n.3"), conn.transport)
    await hub.begin_join(room, joiner)
    hub.activate(room, joiner, after=2)
    await hub.on_frame(f[3])  # 1 to 3 never arrive by the broker: filled from history
    for _ in range(200):
        if seqs(conn) == [1, 2, 3, 4]:
            break
        await asyncio.sleep(0.01)
    assert seqs(conn) == [1, 2, 3, 4]
    assert seqs(joiner) == [3, 4]
    await hub.on_frame((await store(history, room, 1))[0])
    assert seqs(joiner) == [3, 4, 5]


def _user(n: int) -> User:
    return User(UserId(n), f"u{n}")


async def test_a_roster_read_keeps_what_happened_while_it_was_under_way():
    """Presence events that arrive during a read of the members are newer than what the
    read may return: a join seen meanwhile is not taken for a leave, nor a leave for a
    join, and the first read only tells the node what its members know."""
    _, hub, conn, room = await setup()
    first = hub.begin_roster_read(room)
    assert first is not None and not hub.knows_roster(room)
    assert hub.end_roster_read(room, first, [_user(1), _user(2)]) == []
    assert hub.knows_roster(room)

    read = hub.begin_roster_read(room)
    assert read is not None
    await hub.on_frame(presence_frame(room, "join", _user(3)).encode())
    await hub.on_frame(presence_frame(room, "leave", _user(2)).encode())
    # The read saw neither: 3 had not joined yet, 2 had not left.
    assert hub.end_roster_read(room, read, [_user(1), _user(2)]) == []

    read = hub.begin_roster_read(room)
    assert read is not None
    missed = hub.end_roster_read(room, read, [_user(3), _user(4)])  # 1 left, 4 joined unseen
    assert [f.data() for f in missed] == [
        {"room": room, "event": "leave", "user": {"id": 1, "name": "u1"}},
        {"room": room, "event": "join", "user": {"id": 4, "name": "u4"}},
    ]
    await hub.deliver_presence(missed)
    told = [f.data()["event"] for f in conn.frames if f.kind is Kind.PRESENCE]
    assert told == ["join", "leave", "leave", "join"]
    read = hub.begin_roster_read(room)
    assert read is not None
    assert hub.end_roster_read(room, read, [_user(3), _user(4)]) == []  # told once


async def test_a_stale_read_that_ends_after_a_newer_one_is_not_taken():
    _, hub, _, room = await setup()
    seed = hub.begin_roster_read(room)
    assert seed is not None
    hub.end_roster_read(room, seed, [_user(1)])
    older, newer = hub.begin_roster_read(room), hub.begin_roster_read(room)
    assert older is not None and newer is not None
    assert [f.data()["event"] for f in hub.end_roster_read(room, newer, [_user(1), _user(2)])] == [
        "join"
    ]
    assert hub.end_roster_read(room, older, []) == []


async def test_a_rooms_frame_count_goes_with_its_subscription_and_late_frames_are_stray():
    history, hub, conn, room = await setup()
    others = [(await history.room_by_name(f"r{i}", create=True)).id for i in range(3)]
    for other in others:
        await hub.begin_join(other, conn)
        hub.activate(other, conn, after=0)
    for r in (room, *others):
        for f in await store(history, r, 2):
            await hub.on_frame(f)
    assert hub.frames_by_room() == {r: 2 for r in (room, *others)}
    for other in others:
        hub.detach(other, conn)
    for _ in range(200):  # the grace is 0: the unsubscribes are already scheduled
        if hub.local_rooms() == [room]:
            break
        await asyncio.sleep(0.01)
    assert hub.local_rooms() == [room]
    assert hub.frames_by_room() == {room: 2}
    late = await store(history, others[0], 1)
    await hub.on_frame(late[0])
    assert hub.frames_by_room() == {room: 2}
    assert (hub.frames_received, hub.frames_stray) == (9, 1)


async def test_a_gap_whose_messages_retention_deleted_is_passed_over():
    """A room kept to its newest messages: a node whose frames were late finds the
    messages of its gap deleted, and goes on from the oldest one kept."""
    history, hub, conn, room = await setup(gap_wait=0.01)
    f = await store(history, room, 6)
    await history.trim(room, keep=2)  # seqs 1-4 go before this node saw them
    await hub.on_frame(f[5])
    for _ in range(200):
        if seqs(conn) == [5, 6]:
            break
        await asyncio.sleep(0.01)
    assert seqs(conn) == [5, 6]
    await hub.on_frame(f[3])  # a late frame from before the kept run: already passed
    assert seqs(conn) == [5, 6]
