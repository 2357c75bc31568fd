"""Frames carry a routable header and the client event's JSON body, encoded once."""

import orjson
import pytest

from roomcast.core.events import Frame, Kind, message_frame, presence_frame
from roomcast.core.models import Message, RoomId, User, UserId


def test_message_frame_round_trips_without_touching_the_body():
    msg = Message(RoomId(3), 42, "ep", "id1", User(UserId(9), "민지"), "안녕 <b>", 1700)
    frame = message_frame(msg)
    decoded = Frame.decode(frame.encode())
    assert (decoded.kind, decoded.room, decoded.seq) == (Kind.MESSAGE, 3, 42)
    assert decoded.body == frame.body
    assert Message.from_wire(orjson.loads(decoded.body)) == msg


def test_presence_frames_have_no_seq():
    frame = Frame.decode(presence_frame(RoomId(1), "leave", User(UserId(2), "bo")).encode())
    assert frame.seq == 0 and frame.kind is Kind.PRESENCE
    assert frame.data() == {"room": 1, "event": "leave", "user": {"id": 2, "name": "bo"}}


@pytest.mark.parametrize("raw", [b"", b"no header", b"X 1 2\n{}", b"M one 2\n{}"])
def test_malformed_frames_raise(raw):
    with pytest.raises((ValueError, KeyError)):
        Frame.decode(raw)
