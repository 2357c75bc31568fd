"""The hub delivers a room's messages in seq order, each once, whatever order they arrive in."""

from __future__ import annotations

import asyncio

from roomcast.adapters.memory import MemoryBroker, MemoryHistory
from roomcast.core.events import Frame, message_frame
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
    await hub.deliver_stored(Frame.decode(f[1]))
    assert seqs(conn) == []
    await hub.on_frame(f[0])
    assert seqs(conn) == [1, 2]
    await hub.on_frame(f[1])  # the broker's copy of the one handed over
    await hub.deliver_stored(Frame.decode(f[2]))
    await hub.on_frame(f[2])
    assert seqs(conn) == [1, 2, 3]
    assert hub.duplicates_dropped == 2
    assert hub.frames_received == 3  # counts what the broker brought, nothing else
