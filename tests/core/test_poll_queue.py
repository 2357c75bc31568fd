"""A long-polling response carries no more packets than a Python Engine.IO client accepts."""

from __future__ import annotations

import engineio
from engineio import packet
from engineio.async_socket import AsyncSocket
from engineio.payload import Payload

from roomcast.transports.socketio import MAX_PACKETS_PER_POLL, PollQueue


async def test_a_burst_queued_at_once_goes_out_in_polls_a_python_client_can_decode():
    server = engineio.AsyncServer(async_mode="asgi")
    server.create_queue = PollQueue
    sock = AsyncSocket(server, "sid")
    sent = [packet.Packet(packet.MESSAGE, f'2["message",{i}]') for i in range(40)]
    for pkt in sent:
        await sock.send(pkt)
    polls = [await sock.poll() for _ in range(3)]
    assert [len(p) for p in polls] == [MAX_PACKETS_PER_POLL, MAX_PACKETS_PER_POLL, 8]
    assert [pkt for p in polls for pkt in p] == sent  # all of them, in order
    for p in polls:  # what the client does with each response
        decoded = Payload(encoded_payload=Payload(packets=p).encode()).packets
        assert [d.data for d in decoded] == [pkt.data for pkt in p]
    assert sock.queue.empty()


async def test_a_session_closing_still_ends_its_poll():
    server = engineio.AsyncServer(async_mode="asgi")
    server.create_queue = PollQueue
    sock = AsyncSocket(server, "sid")
    await sock.send(packet.Packet(packet.MESSAGE, '2["message",1]'))
    await sock.queue.put(None)  # python-engineio's "no more packets"
    assert [p.data for p in await sock.poll()] == ['2["message",1]']
    assert await sock.poll() == []
