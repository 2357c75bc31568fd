"""Lines the terminal client shows, as a user reads them."""

from __future__ import annotations

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
