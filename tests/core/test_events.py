"""Frames carry a routable header and the client event's JSON body, encoded once."""

import orjson
import pytest

from roomcast.core.events import (
    Frame,
    Kind,
    deleted_frame,
    edited_frame,
    message_frame,
    presence_frame,
)
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


def test_a_deleted_message_travels_without_its_text_and_its_deletion_without_a_seq():
    msg = Message(RoomId(3), 42, "ep", "id1", User(UserId(9), "bo"), "regretted", 1700)
    gone = msg.erased(1900)
    assert gone.deleted and not msg.deleted and gone.edited == 1900
    wire = orjson.loads(message_frame(gone).body)
    assert (wire["text"], wire["deleted"], "edited" in wire) == ("", True, False)
    assert Message.from_wire(wire) == Message(RoomId(3), 42, "ep", "id1", gone.user, "", 1700)
    assert "deleted" not in orjson.loads(message_frame(msg).body)
    frame = Frame.decode(deleted_frame(gone, User(UserId(1), "mod")).encode())
    assert (frame.kind, frame.room, frame.seq) == (Kind.DELETED, 3, 0)
    assert frame.data() == {"room": 3, "seq": 42, "id": "id1", "by": {"id": 1, "name": "mod"}}
    assert Frame.decode(deleted_frame(gone, None).encode()).data()["by"] is None


def test_an_edited_message_travels_with_when_it_was_edited_and_its_news_without_a_seq():
    msg = Message(RoomId(3), 42, "ep", "id1", User(UserId(9), "bo"), "typo", 1700)
    fixed = msg.revised("no typo", 1800)
    assert (fixed.text, fixed.edited, fixed.ts, fixed.seq) == ("no typo", 1800, 1700, 42)
    assert Message.from_wire(orjson.loads(message_frame(fixed).body)) == fixed
    frame = Frame.decode(edited_frame(fixed).encode())
    assert (frame.kind, frame.room, frame.seq) == (Kind.EDITED, 3, 0)
    assert frame.data() == fixed.to_wire() and frame.data()["edited"] == 1800
    assert "edited" not in fixed.erased(1900).to_wire()


@pytest.mark.parametrize("raw", [b"", b"no header", b"Z 1 2\n{}", b"M one 2\n{}"])
def test_malformed_frames_raise(raw):
    with pytest.raises((ValueError, KeyError)):
        Frame.decode(raw)
