"""Lines the terminal client shows, as a user reads them."""

from __future__ import annotations

import time

from roomcast.chat import view


def test_a_small_room_lists_every_member_by_name():
    assert view.members("lobby", ["bob", "alice", "bob"]) == "* [lobby] has 2 members: alice, bob"
    assert view.members("empty", []) == "* [empty] has 0 members: nobody"


def test_a_big_room_shows_some_names_and_how_many_more():
    names = [f"user{i:04d}" for i in range(5000)]
    line = view.joined("crowd", names)
    shown = [f"user{i:04d}" for i in range(view.NAMES_SHOWN)]
    assert line == (
        f"* you are in [crowd], 5000 members: {', '.join(shown)} and {5000 - view.NAMES_SHOWN} more"
    )
    assert len(line) < 1000  # one readable line, not 50 KB of names


def test_a_message_line_starts_with_its_number_and_a_deleted_one_has_no_text():
    assert view.message("den", "bob", "hi", seq=12) == "12 [den] bob: hi"
    assert view.message("den", "bob", "", seq=12, deleted=True) == "12 [den] bob: (message deleted)"
    ts = 1_700_000_000_000
    local = time.strftime("%H:%M", time.localtime(ts / 1000))
    assert view.message("den", "bob", "two\nlines", ts, seq=3) == (
        f"3 {local} [den] bob: two\n{' ' * len(f'3 {local} [den] bob: ')}lines"
    )
    # Over gRPC messages have no number.
    assert view.message("channel 3", "user 7", "hi") == "[channel 3] user 7: hi"


def test_an_edited_message_says_so_after_its_text():
    line = view.message("den", "bob", "hi all", seq=12, edited=True)
    assert line == "12 [den] bob: hi all (edited)"
    # After the last line of a text of several.
    assert view.message("den", "bob", "two\nlines", seq=3, edited=True) == (
        f"3 [den] bob: two\n{' ' * len('3 [den] bob: ')}lines (edited)"
    )
    # A deleted message has no text to have edited.
    assert view.message("den", "bob", "", seq=12, deleted=True, edited=True) == (
        "12 [den] bob: (message deleted)"
    )


def test_a_deletion_of_a_message_whose_sender_is_unknown_is_said_by_number():
    assert view.deleted("den", 12) == "* message 12 of [den] was deleted"
