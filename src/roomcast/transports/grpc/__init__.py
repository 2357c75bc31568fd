"""The gRPC door: the Agent / Heartbeat / Lobby / Channel protocol of
``proto/client_to_agent.proto``, served by grpc.aio on the node's event loop.

A second front door onto the same rooms: the lobby is the room ``lobby``, channel N is the
room with id N, so gRPC and Socket.IO users of a room see each other's messages, joins and
leaves. A client dials three addresses and every call may land on another worker or host,
so a user's state lives in the cluster's presence, not in a process::

    agent.py       TryLogin
    heartbeat.py   TryHeartbeat (keeps the user alive), TryUserLives
    lobby.py       lobby chat, status, commands, TryUserRemove, TryUserExit
    channel.py     channel chat, status, TryUserRemove
    users.py       users in Presence: login, lookup, channel moves, removal, listing
    callers.py     who calls: each call's token (``--auth-secret``), its user and rooms
    streams.py     the hub's Transport: frames -> Chat / StatusReply into bounded streams
    errors.py      refusals -> gRPC statuses
    door.py        GrpcDoor: the server, its address, start / stop

The protocol, with a session transcript, is in ``docs/grpc.md``.
"""

from .door import GrpcDoor

__all__ = ["GrpcDoor"]
