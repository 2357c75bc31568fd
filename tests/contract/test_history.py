"""The History contract: every engine behaves like the in-memory reference.

One suite, run against ``MemoryHistory``, SQLite (in memory and in a file) and PostgreSQL
(a schema of its own per test). The durable engines also prove that what they acknowledged
survives a reopen, and that two instances on one database (as two processes would have)
share one order per room.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from roomcast.core.models import Draft, Message, Room, RoomId, User, UserId
from roomcast.core.ports import History
from roomcast.exceptions import ChatError, ErrorCode, UnavailableError
from tests.contract.engines import engine_url

ALL = [
    "memory",
    "sqlite-memory",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.service),
]
DURABLE = ["sqlite", pytest.param("postgresql", marks=pytest.mark.service)]

ANA = User(UserId(7), "ana")
TS = 1_700_000_000_123
_draft_ids = itertools.count(1)


class Store:
    """Opens History instances on one backing store; whatever is left open is closed at the end."""

    def __init__(self, factory: Callable[[], History]) -> None:
        self._factory = factory
        self._open: list[History] = []

    async def open(self) -> History:
        history = self._factory()
        self._open.append(history)
        await history.start()
        return history

    async def close(self, history: History) -> None:
        self._open.remove(history)
        await history.close()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1])


@contextlib.asynccontextmanager
async def make_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    async with contextlib.AsyncExitStack() as stack:
        if kind == "memory":
            from roomcast.adapters.memory import MemoryHistory

            store = Store(MemoryHistory)
        else:
            from roomcast.adapters.sql import SqlHistory

            if kind == "sqlite-memory":
                url = "sqlite:///:memory:"
            else:
                url = await stack.enter_async_context(engine_url(kind, tmp_path))
            store = Store(lambda: SqlHistory(url))
        stack.push_async_callback(store.close_all)
        yield store


@pytest.fixture(params=ALL)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with make_store(request.param, tmp_path) as store:
        yield store


@pytest.fixture(params=DURABLE)
async def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with make_store(request.param, tmp_path) as store:
        yield store


@pytest.fixture
async def history(store: Store) -> History:
    return await store.open()


def draft(room: RoomId | Room, text: str = "hello", user: User = ANA) -> Draft:
    room_id = room.id if isinstance(room, Room) else room
    return Draft(room_id, f"m{next(_draft_ids)}", user, text, TS)


def seqs(messages: list[Message]) -> list[int]:
    return [message.seq for message in messages]


# Rooms


async def test_rooms_get_ids_in_creation_order_and_a_stable_epoch(history: History) -> None:
    assert await history.rooms() == []
    lobby = await history.room_by_name("lobby", create=True)
    games = await history.room_by_name("games", create=True)
    assert lobby is not None and games is not None
    assert (lobby.id, lobby.name) == (1, "lobby")
    assert (games.id, games.name) == (2, "games")
    assert lobby.epoch and games.epoch
    assert await history.room_by_name("lobby", create=True) == lobby
    assert await history.room_by_name("lobby") == lobby
    assert await history.room_by_id(RoomId(2)) == games
    assert await history.rooms() == [lobby, games]
    third = await history.room_by_name("third", create=True)
    assert third is not None and third.id == 3


async def test_rooms_page_through_by_id(history: History) -> None:
    made = [await history.room_by_name(f"r{i}", create=True) for i in range(7)]
    pages, after = [], None
    while True:
        page = await history.rooms(after=after, limit=3)
        pages.append([room.name for room in page])
        if len(page) < 3:
            break
        after = page[-1].id
    assert pages == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    last = made[-1]
    assert last is not None
    assert await history.rooms(after=last.id, limit=3) == []
    assert await history.rooms(after=RoomId(0)) == made
    assert await history.rooms(limit=2) == made[:2]


async def test_unknown_rooms_are_none_unless_created(history: History) -> None:
    assert await history.room_by_name("nowhere") is None
    assert await history.room_by_id(RoomId(1)) is None
    assert await history.rooms() == []
    created = await history.room_by_name("nowhere", create=True)
    assert created is not None
    assert await history.room_by_id(created.id) == created


async def test_room_names_are_exact(history: History) -> None:
    names = ["Lobby", "lobby", "lobby ", "로비", "大厅"]
    created = [await history.room_by_name(name, create=True) for name in names]
    assert [room.name for room in created if room] == names
    assert len({room.id for room in created if room}) == len(names)
    for room in created:
        assert room is not None
        assert await history.room_by_name(room.name) == room


async def test_concurrent_creation_of_one_room_gives_one_room(history: History) -> None:
    found = await asyncio.gather(*(history.room_by_name("busy", create=True) for _ in range(20)))
    assert len(set(found)) == 1
    assert await history.rooms() == [found[0]]


# Appending


async def test_append_numbers_each_room_from_one_in_input_order(history: History) -> None:
    a = await history.room_by_name("a", create=True)
    b = await history.room_by_name("b", create=True)
    assert a is not None and b is not None
    batch = [draft(a, "a1"), draft(b, "b1"), draft(a, "a2"), draft(a, "a3"), draft(b, "b2")]
    out = await history.append(batch)
    assert [(m.room, m.seq, m.text) for m in out] == [
        (a.id, 1, "a1"),
        (b.id, 1, "b1"),
        (a.id, 2, "a2"),
        (a.id, 3, "a3"),
        (b.id, 2, "b2"),
    ]
    epochs = {a.id: a.epoch, b.id: b.epoch}
    for message, sent in zip(out, batch, strict=True):
        assert message == Message.from_draft(sent, message.seq, epochs[sent.room])
    more = await history.append([draft(b, "b3"), draft(a, "a4")])
    assert [(m.room, m.seq) for m in more] == [(b.id, 3), (a.id, 4)]
    assert await history.after(a.id, 0, 100) == [m for m in out + more if m.room == a.id]
    assert await history.after(b.id, 0, 100) == [m for m in out + more if m.room == b.id]


async def test_empty_append_stores_nothing(history: History) -> None:
    room = await history.room_by_name("quiet", create=True)
    assert room is not None
    assert await history.append([]) == []
    assert await history.latest(room.id) == 0


async def test_concurrent_appends_get_every_seq_once(history: History) -> None:
    room = await history.room_by_name("busy", create=True)
    other = await history.room_by_name("other", create=True)
    assert room is not None and other is not None
    results = await asyncio.gather(
        *(history.append([draft(room, f"t{i}")]) for i in range(50)),
        *(history.append([draft(other), draft(room), draft(other)]) for _ in range(10)),
    )
    for batch in results[50:]:
        # A batch's messages of one room are consecutive: nothing slipped in between.
        assert batch[2].seq == batch[0].seq + 1
    sent = [m for batch in results for m in batch]
    assert sorted(m.seq for m in sent if m.room == room.id) == list(range(1, 61))
    assert sorted(m.seq for m in sent if m.room == other.id) == list(range(1, 21))
    stored = await history.after(room.id, 0, 1000)
    assert seqs(stored) == list(range(1, 61))
    assert sorted(stored, key=lambda m: m.id) == sorted(
        (m for m in sent if m.room == room.id), key=lambda m: m.id
    )
    assert await history.latest(room.id) == 60
    assert await history.latest(other.id) == 20


async def test_concurrent_batches_over_the_same_rooms_in_any_order_all_land(
    history: History,
) -> None:
    """Batches naming the same rooms in opposite orders, at once: none fails (no lock
    taken in an order that could deadlock another), and every room's seqs are gap-free."""
    a, b, c = [await history.room_by_name(f"mesh-{n}", create=True) for n in "abc"]
    assert a is not None and b is not None and c is not None
    orders = [(a, b, c), (c, b, a), (b, a, c), (c, a, b)]
    results = await asyncio.gather(
        *(history.append([draft(room) for room in orders[i % 4]]) for i in range(40))
    )
    for room in (a, b, c):
        got = sorted(m.seq for batch in results for m in batch if m.room == room.id)
        assert got == list(range(1, 41))
        assert seqs(await history.after(room.id, 0, 100)) == list(range(1, 41))


async def test_append_to_unknown_room_stores_nothing(history: History) -> None:
    room = await history.room_by_name("real", create=True)
    assert room is not None
    with pytest.raises(ChatError) as raised:
        await history.append([draft(room, "kept?"), draft(RoomId(999), "lost")])
    assert raised.value.code is ErrorCode.NOT_FOUND
    assert await history.latest(room.id) == 0
    assert await history.after(room.id, 0, 10) == []
    assert await history.room_by_id(RoomId(999)) is None
    first = await history.append([draft(room)])
    assert seqs(first) == [1]


async def test_unicode_round_trips(history: History) -> None:
    room = await history.room_by_name("유니코드 🌏", create=True)
    assert room is not None
    texts = [
        "emoji 👋🏽 👨‍👩‍👧‍👦 🇰🇷",
        "안녕하세요, 반갑습니다",
        "你好\uff0c世界",  # a fullwidth comma
        "가" * 4000,
        "quotes ' \" \\ and % _ ; --",
    ]
    user = User(UserId(42), "김철수 🐍")
    sent = await history.append([draft(room, text, user) for text in texts])
    stored = await history.after(room.id, 0, 100)
    assert stored == sent
    assert [m.text for m in stored] == texts
    assert all(m.user == user for m in stored)
    assert await history.room_by_name("유니코드 🌏") == room


# Reading


async def _room_with(history: History, count: int) -> tuple[Room, list[Message]]:
    room = await history.room_by_name("paged", create=True)
    assert room is not None
    sent = await history.append([draft(room, f"#{i}") for i in range(1, count + 1)])
    return room, sent


async def test_after_pages_forward(history: History) -> None:
    room, sent = await _room_with(history, 10)
    assert await history.after(room.id, 0, 100) == sent
    assert seqs(await history.after(room.id, 0, 3)) == [1, 2, 3]
    assert seqs(await history.after(room.id, 3, 3)) == [4, 5, 6]
    assert seqs(await history.after(room.id, 8, 3)) == [9, 10]
    assert await history.after(room.id, 10, 3) == []
    assert await history.after(room.id, 50, 3) == []
    assert await history.after(room.id, 0, 0) == []
    assert await history.after(RoomId(999), 0, 10) == []


async def test_before_pages_backward(history: History) -> None:
    room, sent = await _room_with(history, 10)
    assert await history.before(room.id, None, 100) == sent
    assert seqs(await history.before(room.id, None, 3)) == [8, 9, 10]
    assert seqs(await history.before(room.id, 8, 3)) == [5, 6, 7]
    assert seqs(await history.before(room.id, 3, 10)) == [1, 2]
    assert seqs(await history.before(room.id, 11, 2)) == [9, 10]
    assert await history.before(room.id, 1, 10) == []
    assert await history.before(room.id, None, 0) == []
    assert await history.before(RoomId(999), None, 10) == []


async def test_find_tells_whether_a_message_was_stored(history: History) -> None:
    room, sent = await _room_with(history, 5)
    other = await history.room_by_name("elsewhere", create=True)
    assert await history.find(room.id, sent[2].id) == sent[2]
    assert await history.find(room.id, sent[4].id) == sent[4]
    assert await history.find(room.id, "never-sent") is None
    assert await history.find(other.id, sent[2].id) is None  # the id, in another room
    assert await history.find(RoomId(999), sent[2].id) is None


def chosen(room: RoomId | Room, message_id: str, text: str = "hello") -> Draft:
    """A draft whose id its sender chose (a send that may be a retry)."""
    room_id = room.id if isinstance(room, Room) else room
    return Draft(room_id, message_id, ANA, text, TS, chosen=True)


async def test_a_chosen_id_the_room_holds_is_not_stored_again(history: History) -> None:
    room, _ = await _room_with(history, 2)
    other = await history.room_by_name("elsewhere", create=True)
    assert other is not None
    first = await history.append([chosen(room, "c-1")])
    assert seqs(first) == [3]
    # Sent again, alone and in a batch with new messages: the stored one stands in.
    assert await history.append([chosen(room, "c-1")]) == first
    again = await history.append([draft(room), chosen(room, "c-1"), chosen(room, "c-2")])
    assert seqs(again) == [4, 3, 5]
    assert again[1] == first[0]
    # The same id twice in one batch is stored once; in another room it is another message.
    twice = await history.append([chosen(room, "c-3"), chosen(room, "c-3"), chosen(other, "c-1")])
    assert seqs(twice) == [6, 6, 1]
    assert twice[0] == twice[1]
    ids = [m.id for m in await history.after(room.id, 0, 100)]
    assert ids[2:] == ["c-1", again[0].id, "c-2", "c-3"]
    assert await history.latest(room.id) == 6
    assert await history.latest(other.id) == 1
    # The store does not judge: another text under a stored id gets the stored message
    # (the service tells its sender it is another message's id).
    assert await history.append([chosen(room, "c-2", "something else")]) == [again[2]]
    # An id the server chose is never looked up, even if a sender chose it before.
    plain = Draft(room.id, "c-1", ANA, "hello", TS)
    assert seqs(await history.append([plain])) == [7]


async def test_a_reset_forgets_the_chosen_ids(history: History) -> None:
    room, _ = await _room_with(history, 0)
    await history.append([chosen(room, "again")])
    await history.append([draft(room) for _ in range(1200)])
    assert seqs(await history.append([chosen(room, "again")])) == [1]  # however far back
    reset = await history.reset(room.id)
    stored = await history.append([chosen(room, "again", "after the reset")])
    assert [(m.seq, m.epoch, m.text) for m in stored] == [(1, reset.epoch, "after the reset")]


# Retention


async def test_trim_lets_the_oldest_go_and_keeps_the_newest_gapless(history: History) -> None:
    room, sent = await _room_with(history, 10)
    assert await history.trim(room.id, keep=4, limit=3) == 3  # a batch at most
    assert seqs(await history.before(room.id, None, 100)) == [4, 5, 6, 7, 8, 9, 10]
    assert await history.trim(room.id, keep=4) == 3
    assert await history.trim(room.id, keep=4) == 0  # done
    assert await history.before(room.id, None, 100) == sent[6:]
    assert seqs(await history.after(room.id, 0, 100)) == [7, 8, 9, 10]
    assert seqs(await history.after(room.id, 8, 100)) == [9, 10]
    assert seqs(await history.before(room.id, 9, 2)) == [7, 8]
    assert await history.before(room.id, 7, 10) == []
    assert await history.latest(room.id) == 10  # the room's order goes on
    assert seqs(await history.append([draft(room)])) == [11]
    assert await history.trim(room.id) == 0  # no rule: nothing goes
    assert await history.trim(room.id, keep=100) == 0
    assert await history.trim(RoomId(999), keep=1) == 0
    assert await history.trim(room.id, keep=0) == 5  # keep none: every message goes
    assert (await history.before(room.id, None, 100), await history.latest(room.id)) == ([], 11)


async def test_oldest_pages_through_the_rooms_that_hold_messages(history: History) -> None:
    a, _ = await _room_with(history, 3)
    empty = await history.room_by_name("empty", create=True)
    b = await history.room_by_name("b", create=True)
    c = await history.room_by_name("c", create=True)
    assert a is not None and empty is not None and b is not None and c is not None
    await history.append([Draft(b.id, "b1", ANA, "t", 5), Draft(b.id, "b2", ANA, "t", 6)])
    await history.append([Draft(c.id, "c1", ANA, "t", 7)])
    await history.trim(b.id, keep=1)
    assert await history.oldest() == [(a.id, 3, 1, TS), (b.id, 2, 2, 6), (c.id, 1, 1, 7)]
    assert await history.oldest(limit=2) == [(a.id, 3, 1, TS), (b.id, 2, 2, 6)]
    assert await history.oldest(after=b.id, limit=2) == [(c.id, 1, 1, 7)]
    assert await history.oldest(after=c.id) == []
    await history.trim(c.id, keep=0)  # a room whose every message went holds none
    assert [o.room for o in await history.oldest()] == [a.id, b.id]


async def test_trim_by_age_stops_at_the_first_message_to_keep(history: History) -> None:
    room, _ = await _room_with(history, 0)
    # Two nodes' clocks: an older stamp can follow a newer one in a room's order.
    stamps = [1_000, 2_000, 9_000, 1_500, 9_500]
    await history.append([Draft(room.id, f"a{i}", ANA, "t", ts) for i, ts in enumerate(stamps)])
    assert await history.trim(room.id, before_ms=5_000) == 2
    assert seqs(await history.after(room.id, 0, 100)) == [3, 4, 5]
    # Both rules: a message goes when either lets it go.
    assert await history.trim(room.id, keep=1, before_ms=5_000) == 2
    assert seqs(await history.after(room.id, 0, 100)) == [5]


async def test_a_trimmed_messages_chosen_id_goes_with_it(history: History) -> None:
    room, _ = await _room_with(history, 0)
    first = await history.append([chosen(room, "c-1"), chosen(room, "c-2")])
    await history.append([draft(room)])
    assert await history.trim(room.id, keep=2) == 1
    assert await history.find(room.id, "c-1") is None
    assert await history.append([chosen(room, "c-2")]) == [first[1]]  # kept: still found
    assert seqs(await history.append([chosen(room, "c-1")])) == [4]  # trimmed: stored anew


async def test_trimming_a_message_leaves_another_messages_chosen_id(history: History) -> None:
    room, _ = await _room_with(history, 0)
    await history.append([Draft(room.id, "x", ANA, "an id the server chose", TS)])
    kept = await history.append([chosen(room, "x")])  # a sender chose the same one
    assert await history.trim(room.id, keep=1) == 1
    assert await history.append([chosen(room, "x")]) == kept


# Deleting


async def test_get_reads_one_message_by_seq(history: History) -> None:
    room, sent = await _room_with(history, 3)
    assert await history.get(room.id, 2) == sent[1]
    assert await history.get(room.id, 0) is None
    assert await history.get(room.id, 4) is None
    assert await history.get(RoomId(999), 1) is None
    await history.trim(room.id, keep=1)
    assert await history.get(room.id, 1) is None  # no longer kept
    assert await history.get(room.id, 3) == sent[2]


async def test_a_deleted_message_keeps_its_place_and_loses_its_text(history: History) -> None:
    room, sent = await _room_with(history, 3)
    deleted = await history.delete(room.id, 2, TS + 50)
    assert deleted is not None and deleted.deleted
    assert (deleted.seq, deleted.id, deleted.user, deleted.ts, deleted.epoch) == (
        2,
        sent[1].id,
        sent[1].user,
        sent[1].ts,
        sent[1].epoch,
    )
    assert (deleted.text, deleted.edited) == ("", TS + 50)
    assert await history.after(room.id, 0, 10) == [sent[0], deleted, sent[2]]
    assert await history.before(room.id, None, 10) == [sent[0], deleted, sent[2]]
    assert await history.get(room.id, 2) == deleted
    assert await history.delete(room.id, 2, TS + 90) == deleted  # again: nothing changes
    assert await history.latest(room.id) == 3
    assert seqs(await history.append([draft(room)])) == [4]  # the order goes on


async def test_deleting_what_the_room_does_not_hold_is_none(history: History) -> None:
    room, sent = await _room_with(history, 2)
    assert await history.delete(room.id, 3, TS + 50) is None
    assert await history.delete(room.id, 0, TS + 50) is None
    assert await history.delete(RoomId(999), 1, TS + 50) is None
    await history.trim(room.id, keep=1)
    assert await history.delete(room.id, 1, TS + 50) is None  # retention took it
    assert await history.after(room.id, 0, 10) == [sent[1]]


async def test_a_deleted_messages_chosen_id_answers_with_the_deleted_message(
    history: History,
) -> None:
    room, _ = await _room_with(history, 0)
    first = await history.append([chosen(room, "c-1", "oops")])
    deleted = await history.delete(room.id, first[0].seq, TS + 50)
    assert deleted is not None
    assert await history.append([chosen(room, "c-1", "oops")]) == [deleted]
    assert await history.find(room.id, "c-1") == deleted
    assert await history.latest(room.id) == 1


async def test_an_edited_message_keeps_its_place_with_its_new_text(history: History) -> None:
    room, sent = await _room_with(history, 3)
    edited = await history.edit(room.id, 2, "#2, corrected", TS + 5)
    assert edited is not None
    assert (edited.seq, edited.id, edited.user, edited.ts, edited.epoch) == (
        2,
        sent[1].id,
        sent[1].user,
        sent[1].ts,
        sent[1].epoch,
    )
    assert (edited.text, edited.edited, edited.deleted) == ("#2, corrected", TS + 5, False)
    assert sent[1].edited is None
    assert await history.after(room.id, 0, 10) == [sent[0], edited, sent[2]]
    assert await history.before(room.id, 3, 10) == [sent[0], edited]
    again = await history.edit(room.id, 2, "#2, again", TS + 9)
    assert again is not None and (again.text, again.edited) == ("#2, again", TS + 9)
    assert await history.get(room.id, 2) == again
    # Nothing to edit: no such message, or a deleted one (it stays deleted).
    assert await history.edit(room.id, 4, "x", TS) is None
    assert await history.edit(RoomId(999), 1, "x", TS) is None
    deleted = await history.delete(room.id, 2, TS + 50)
    assert deleted is not None and deleted.edited == TS + 50
    assert "edited" not in deleted.to_wire()
    assert await history.edit(room.id, 2, "back", TS) is None
    assert await history.get(room.id, 2) == deleted
    assert await history.latest(room.id) == 3


async def test_changed_lists_what_was_edited_or_deleted_since_a_time(history: History) -> None:
    room, _ = await _room_with(history, 6)
    assert await history.changed(room.id, 6, 0, 10) == []
    await history.edit(room.id, 2, "#2 edited", TS + 10)
    await history.delete(room.id, 4, TS + 20)
    await history.edit(room.id, 5, "#5 edited", TS + 30)
    await history.edit(room.id, 2, "#2 again", TS + 40)
    assert [(m.seq, m.text) for m in await history.changed(room.id, 6, 0, 10)] == [
        (2, "#2 again"),
        (4, ""),
        (5, "#5 edited"),
    ]
    assert seqs(await history.changed(room.id, 6, TS + 20, 10)) == [2, 4, 5]
    assert seqs(await history.changed(room.id, 6, TS + 21, 10)) == [2, 5]
    assert seqs(await history.changed(room.id, 4, TS + 20, 10)) == [2, 4]  # up to a seq
    assert seqs(await history.changed(room.id, 6, 0, 2)) == [2, 4]  # a limit
    assert await history.changed(room.id, 6, TS + 41, 10) == []
    assert await history.changed(RoomId(999), 6, 0, 10) == []
    await history.trim(room.id, keep=2)
    assert seqs(await history.changed(room.id, 6, 0, 10)) == [5]  # retention took 2 and 4


async def test_an_edited_messages_chosen_id_answers_with_the_edited_message(
    history: History,
) -> None:
    room, _ = await _room_with(history, 0)
    first = await history.append([chosen(room, "c-1", "typo")])
    edited = await history.edit(room.id, first[0].seq, "no typo", TS + 1)
    assert edited is not None
    assert await history.append([chosen(room, "c-1", "typo")]) == [edited]
    assert await history.find(room.id, "c-1") == edited


async def test_latest(history: History) -> None:
    room, _ = await _room_with(history, 0)
    assert await history.latest(room.id) == 0
    await history.append([draft(room), draft(room)])
    assert await history.latest(room.id) == 2
    await history.append([draft(room)])
    assert await history.latest(room.id) == 3


# Reset and user ids


async def test_reset_changes_the_epoch_and_restarts_seq(history: History) -> None:
    room, _ = await _room_with(history, 5)
    other, _ = await _room_with(history, 0)  # same name: the same room
    assert other == room
    bystander = await history.room_by_name("bystander", create=True)
    assert bystander is not None
    await history.append([draft(bystander)])

    fresh = await history.reset(room.id)
    assert (fresh.id, fresh.name) == (room.id, room.name)
    assert fresh.epoch != room.epoch
    assert await history.room_by_id(room.id) == fresh
    assert await history.room_by_name(room.name) == fresh
    assert await history.latest(room.id) == 0
    assert await history.after(room.id, 0, 100) == []
    assert await history.before(room.id, None, 100) == []

    again = await history.append([draft(room, "new"), draft(room, "newer")])
    assert [(m.seq, m.epoch) for m in again] == [(1, fresh.epoch), (2, fresh.epoch)]
    assert await history.after(room.id, 0, 100) == again
    assert seqs(await history.after(bystander.id, 0, 100)) == [1]
    assert (await history.room_by_id(bystander.id)) == bystander

    assert (await history.reset(room.id)).epoch != fresh.epoch


async def test_reset_of_unknown_room_is_not_found(history: History) -> None:
    with pytest.raises(ChatError) as raised:
        await history.reset(RoomId(999))
    assert raised.value.code is ErrorCode.NOT_FOUND


async def test_user_ids_are_distinct_and_increasing(history: History) -> None:
    first = [await history.next_user_id() for _ in range(3)]
    assert first == [1, 2, 3]
    more = await asyncio.gather(*(history.next_user_id() for _ in range(30)))
    assert sorted(more) == list(range(4, 34))


async def test_a_subject_keeps_its_user_id_and_new_subjects_get_new_ids(history: History) -> None:
    anonymous = await history.next_user_id()
    alice = await history.user_id_for("alice")
    assert alice > anonymous
    assert await history.user_id_for("alice") == alice
    assert await history.user_id_for("Alice") != alice  # subjects are exact strings
    racing = await asyncio.gather(*(history.user_id_for(f"user-{i % 5}") for i in range(25)))
    by_subject = {f"user-{i % 5}": racing[i] for i in range(25)}
    assert [by_subject[f"user-{i % 5}"] for i in range(25)] == racing
    assert len(set(by_subject.values()) | {alice, anonymous}) == 7
    assert await history.next_user_id() > max(racing)  # one counter: no id is handed out twice


# Durable engines


async def test_instances_can_start_together_on_a_new_database(durable_store: Store) -> None:
    started = await asyncio.gather(*(durable_store.open() for _ in range(4)))
    room = await started[0].room_by_name("first", create=True)
    assert room is not None
    for history in started:
        assert await history.rooms() == [room]


async def test_everything_survives_a_reopen(durable_store: Store) -> None:
    before = await durable_store.open()
    lobby = await before.room_by_name("lobby", create=True)
    games = await before.room_by_name("games", create=True)
    assert lobby is not None and games is not None
    sent = await before.append([draft(lobby, "one"), draft(games, "two"), draft(lobby, "three")])
    reset = await before.reset(games.id)
    users = [await before.next_user_id() for _ in range(3)]
    alice = await before.user_id_for("alice")
    gone = await before.delete(lobby.id, sent[2].seq, TS + 50)
    fixed = await before.edit(lobby.id, sent[0].seq, "one, edited", TS + 1)
    await durable_store.close(before)

    after = await durable_store.open()
    assert await after.rooms() == [lobby, reset]
    assert await after.room_by_name("lobby") == lobby
    assert await after.after(lobby.id, 0, 100) == [fixed, gone]
    assert await after.latest(lobby.id) == 2
    assert await after.latest(games.id) == 0
    more = await after.append([draft(lobby, "four"), draft(games, "five")])
    assert [(m.room, m.seq) for m in more] == [(lobby.id, 3), (games.id, 1)]
    assert more[1].epoch == reset.epoch
    assert await after.user_id_for("alice") == alice
    assert await after.next_user_id() > max(users)
    newer = await after.room_by_name("newer", create=True)
    assert newer is not None and newer.id == 3


_EARLIER_SCHEMA = [
    "CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, epoch TEXT NOT"
    " NULL, seq BIGINT NOT NULL DEFAULT 0, created_ms BIGINT)",
    "CREATE TABLE messages (room_id INTEGER NOT NULL REFERENCES rooms (id), seq BIGINT NOT"
    " NULL, id TEXT NOT NULL, user_id BIGINT NOT NULL, user_name TEXT NOT NULL, text TEXT"
    " NOT NULL, ts BIGINT NOT NULL, epoch TEXT NOT NULL, PRIMARY KEY (room_id, seq))",
    "INSERT INTO rooms (id, name, epoch, seq) VALUES (1, 'old', 'e0', 2)",
    "INSERT INTO messages VALUES (1, 1, 'a', 7, 'ana', 'from before', 1000, 'e0')",
    "INSERT INTO messages VALUES (1, 2, 'b', 7, 'ana', 'and this', 2000, 'e0')",
]
"""A store an earlier roomcast made (its messages had no ``edited_ms``), with messages."""


async def _index_names(kind: str, url: str) -> set[str]:
    """The indexes of the messages table of the store at ``url``."""
    if kind == "sqlite":
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
            return {row[0] for row in db.execute(query)}
    import asyncpg

    from tests import services

    conn = await asyncpg.connect(services.POSTGRES_URL)
    try:
        rows = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'messages'",
            url.split("schema=")[1],
        )
    finally:
        await conn.close()
    return {row[0] for row in rows}


@pytest.mark.parametrize("kind", DURABLE)
async def test_a_store_an_earlier_roomcast_made_is_used_on_with_what_it_holds(
    kind: str, tmp_path: Path
) -> None:
    from roomcast.adapters.sql import SqlHistory

    async with engine_url(kind, tmp_path) as url:
        if kind == "sqlite":
            import sqlite3

            with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
                for statement in _EARLIER_SCHEMA:
                    db.execute(statement)
                db.commit()
        else:
            import asyncpg

            from tests import services

            schema = url.split("schema=")[1]
            conn = await asyncpg.connect(services.POSTGRES_URL)
            try:
                await conn.execute(f'CREATE SCHEMA "{schema}"')
                await conn.execute(f'SET search_path TO "{schema}"')
                for statement in _EARLIER_SCHEMA:
                    await conn.execute(statement)
            finally:
                await conn.close()
        history = SqlHistory(url)
        await history.start()  # adds the column
        try:
            old = await history.before(RoomId(1), None, 10)
            assert [(m.seq, m.text, m.edited) for m in old] == [
                (1, "from before", None),
                (2, "and this", None),
            ]
            edited = await history.edit(RoomId(1), 2, "and this, edited", 3000)
            assert edited is not None and edited.edited == 3000
            assert seqs(await history.append([draft(RoomId(1))])) == [3]
        finally:
            await history.close()
        assert await _index_names(kind, url) >= {"messages_changed"}
        history = SqlHistory(url)
        await history.start()  # finds it there
        try:
            assert await history.get(RoomId(1), 2) == edited
            assert await history.changed(RoomId(1), 3, 0, 10) == [edited]
            assert [m.text for m in await history.after(RoomId(1), 0, 10)] == [
                "from before",
                "and this, edited",
                "hello",
            ]
        finally:
            await history.close()


async def test_two_instances_share_one_order_per_room(durable_store: Store) -> None:
    one = await durable_store.open()
    two = await durable_store.open()
    room = await one.room_by_name("shared", create=True)
    assert room is not None
    assert await two.room_by_name("shared") == room

    async def burst(history: History) -> list[list[Message]]:
        return await asyncio.gather(
            *(history.append([draft(room), draft(room), draft(room)]) for _ in range(15))
        )

    from_one, from_two = await asyncio.gather(burst(one), burst(two))
    batches = from_one + from_two
    for batch in batches:
        assert seqs(batch) == list(range(batch[0].seq, batch[0].seq + 3))
    assert sorted(seq for batch in batches for seq in seqs(batch)) == list(range(1, 91))
    assert seqs(await two.after(room.id, 0, 1000)) == list(range(1, 91))
    assert await one.latest(room.id) == await two.latest(room.id) == 90


async def test_two_instances_trimming_while_a_third_appends_delete_each_message_once(
    durable_store: Store,
) -> None:
    """Every node makes its own retention passes: two at once, while messages keep
    coming, delete each message once and leave a gapless run of the newest."""
    one, two, writer = [await durable_store.open() for _ in range(3)]
    room = await writer.room_by_name("busy", create=True)
    assert room is not None
    await writer.append([chosen(room, f"c{i}") for i in range(200)])

    async def appends() -> None:
        for _ in range(20):
            await writer.append([draft(room) for _ in range(5)])

    async def trims(history: History) -> int:
        deleted = 0
        for _ in range(20):
            deleted += await history.trim(room.id, keep=10, limit=20)
        return deleted

    _, by_one, by_two = await asyncio.gather(appends(), trims(one), trims(two))
    by_one += await one.trim(room.id, keep=10, limit=1000)
    assert by_one + by_two == 300 - 10
    assert seqs(await two.after(room.id, 0, 1000)) == list(range(291, 301))
    assert seqs(await writer.append([chosen(room, "c0")])) == [301]  # its id went with it


async def test_two_instances_racing_to_store_one_chosen_id_store_it_once(
    durable_store: Store,
) -> None:
    one = await durable_store.open()
    two = await durable_store.open()
    room = await one.room_by_name("retries", create=True)
    assert room is not None
    # A sender's retries reaching two processes at once, among other senders' messages.
    batches = await asyncio.gather(
        *(
            h.append([draft(room), chosen(room, "retried"), draft(room)])
            for _ in range(10)
            for h in (one, two)
        )
    )
    retried = {batch[1] for batch in batches}
    assert len(retried) == 1
    stored = await two.after(room.id, 0, 1000)
    assert seqs(stored) == list(range(1, 42))
    assert [m for m in stored if m.id == "retried"] == list(retried)


async def test_two_instances_create_one_room_and_distinct_users(durable_store: Store) -> None:
    one = await durable_store.open()
    two = await durable_store.open()
    rooms = await asyncio.gather(
        *(h.room_by_name("race", create=True) for _ in range(10) for h in (one, two))
    )
    assert len(set(rooms)) == 1
    assert await one.rooms() == await two.rooms() == [rooms[0]]
    users = await asyncio.gather(*(h.next_user_id() for _ in range(20) for h in (one, two)))
    assert sorted(users) == list(range(1, 41))
    subjects = await asyncio.gather(
        *(h.user_id_for(f"s{i % 3}") for i in range(12) for h in (one, two))
    )
    assert len(set(subjects)) == 3 and min(subjects) > 40
    assert [await h.user_id_for(f"s{i}") for h in (one, two) for i in range(3)] == [
        *[subjects[2 * i] for i in range(3)],
        *[subjects[2 * i] for i in range(3)],
    ]


async def _room_with_one_message(history: History, name: str) -> Room:
    """Start ``history`` and give it a room ``name`` holding one message (seq 1)."""
    await history.start()
    room = await history.room_by_name(name, create=True)
    assert room is not None
    assert seqs(await history.append([draft(room)])) == [1]
    return room


def _sleeping(history: History, statements: int) -> list[asyncio.Future[object]]:
    """``statements`` two-second ``pg_sleep``s running on the store's statement path."""
    db = history._db  # type: ignore[attr-defined]
    return [
        asyncio.ensure_future(db.run_driver(lambda conn: conn.fetch("SELECT pg_sleep(2)")))
        for _ in range(statements)
    ]


@pytest.mark.service
async def test_postgresql_statements_cancelled_midway_leave_the_store_working(
    tmp_path: Path,
) -> None:
    """Callers that give up on their statements (a client gone mid-join) do not wedge the
    connections kept for statements: the next ones, many at once, all answer, and the
    store's sessions stay within its pool's bounds."""
    import asyncpg

    from roomcast.adapters.sql import SqlHistory
    from roomcast.adapters.sql.engine import POOL_OVERFLOW, POOL_SIZE
    from tests import services

    async with engine_url("postgresql", tmp_path) as url:
        admin = await asyncpg.connect(services.POSTGRES_URL)
        history = SqlHistory(url)
        try:
            before = {row["pid"] for row in await admin.fetch("SELECT pid FROM pg_stat_activity")}
            room = await _room_with_one_message(history, "cancelled")
            slow = _sleeping(history, 6)
            await asyncio.sleep(0.2)  # all six are waiting on the server
            assert not any(task.done() for task in slow)
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            assert all(task.cancelled() for task in slow)

            reads = await asyncio.gather(*(history.after(room.id, 0, 10) for _ in range(30)))
            assert [seqs(read) for read in reads] == [[1]] * 30
            assert seqs(await history.append([draft(room, "after")])) == [2]
            ours = [
                row
                for row in await admin.fetch(
                    "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                if row["pid"] not in before
            ]
            assert 0 < len(ours) <= POOL_SIZE + POOL_OVERFLOW
            assert all(row["state"] != "active" for row in ours)  # no sleep left running
        finally:
            await history.close()
            await admin.close()


@pytest.mark.service
async def test_postgresql_statements_beyond_the_kept_connections_wait_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow statements hold every connection kept for statements: an append does not wait
    behind them, a read waits for one to come free and then answers, and a read that would
    wait past the bound fails as UNAVAILABLE instead."""
    from roomcast.adapters.sql import SqlHistory, engine

    monkeypatch.setattr(engine, "DRIVER_WAIT", 0.4)
    async with engine_url("postgresql", tmp_path) as url:
        history = SqlHistory(url)
        try:
            room = await _room_with_one_message(history, "busy")
            slow = _sleeping(history, engine.KEPT_DRIVERS)
            await asyncio.sleep(0.2)  # every kept connection is sleeping on the server
            appended = await asyncio.wait_for(history.append([draft(room, "while busy")]), 1)
            assert seqs(appended) == [2]
            with pytest.raises(UnavailableError, match=r"came free in 0\.4 s"):
                await history.after(room.id, 0, 10)

            monkeypatch.setattr(engine, "DRIVER_WAIT", 10.0)
            waiting = asyncio.ensure_future(history.after(room.id, 0, 10))
            await asyncio.sleep(0.1)
            assert not waiting.done() and not any(task.done() for task in slow)
            await asyncio.gather(*slow)
            assert seqs(await asyncio.wait_for(waiting, 5)) == [1, 2]
        finally:
            await history.close()


@pytest.mark.service
async def test_postgresql_recovers_when_the_server_ends_its_connections(tmp_path: Path) -> None:
    """PostgreSQL ends every connection of the store (as a restart or an idle timeout
    would), those it keeps for overlapping statements included: reads go on at once, one
    at a time or many together, an append fails at most once, as UNAVAILABLE with nothing
    stored, and the room's seqs stay gap-free."""
    import asyncpg

    from roomcast.adapters.sql import SqlHistory
    from tests import services

    sessions = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    async with engine_url("postgresql", tmp_path) as url:
        admin = await asyncpg.connect(services.POSTGRES_URL)
        history = SqlHistory(url)
        try:
            before = {row["pid"] for row in await admin.fetch(sessions)}
            await history.start()
            room = await history.room_by_name("restarted", create=True)
            assert room is not None
            assert seqs(await history.append([draft(room)])) == [1]
            reads = await asyncio.gather(*(history.after(room.id, 0, 10) for _ in range(20)))
            assert [seqs(read) for read in reads] == [[1]] * 20

            # The sessions the store opened: the overlapping reads kept several. Each call
            # waits (up to 5 s) until its session is gone.
            opened = [row["pid"] for row in await admin.fetch(sessions) if row["pid"] not in before]
            assert len(opened) >= 2
            for pid in opened:
                assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)

            assert await history.room_by_name("restarted") == room
            found = await asyncio.gather(*(history.room_by_name("restarted") for _ in range(20)))
            assert found == [room] * 20
            appended: list[int] = []
            failures = 0
            for _ in range(2):
                try:
                    appended += seqs(await history.append([draft(room)]))
                except UnavailableError:
                    failures += 1
            assert failures <= 1
            assert appended == list(range(2, 2 + len(appended)))
            assert seqs(await history.after(room.id, 0, 10)) == [1, *appended]
        finally:
            await history.close()
            await admin.close()


async def test_sqlite_write_ahead_log_stays_bounded_under_steady_appends(tmp_path: Path) -> None:
    """The log is checkpointed beside the writer, not inside its commits, and still starts
    over: 4,000 appends in a row (~50 MB of log if it never did) leave it small."""
    from roomcast.adapters.sql import SqlHistory

    path = tmp_path / "steady.db"
    history = SqlHistory(f"sqlite:///{path}")
    await history.start()
    try:
        room = await history.room_by_name("steady", create=True)
        assert room is not None
        for n in range(4000):
            await history.append([draft(room, f"message {n} " + "x" * 60)])
        assert (tmp_path / "steady.db-wal").stat().st_size < 16 * 2**20
        assert await history.latest(room.id) == 4000
    finally:
        await history.close()
    assert not (tmp_path / "steady.db-wal").exists()  # the last close checkpoints it all


async def test_sqlite_append_waits_for_another_writer_without_stopping_the_loop(
    tmp_path: Path,
) -> None:
    """Another process holds SQLite's write lock: an append waits for it (it is not
    refused), the event loop goes on meanwhile, and the append lands once the lock is
    released."""
    import sqlite3

    from roomcast.adapters.sql import SqlHistory

    path = tmp_path / "shared.db"
    history = SqlHistory(f"sqlite:///{path}")
    await history.start()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        room = await history.room_by_name("shared", create=True)
        assert room is not None
        assert seqs(await history.append([draft(room)])) == [1]

        other.execute("BEGIN IMMEDIATE")  # as a second roomcast process would, mid-commit
        pending = asyncio.ensure_future(history.append([draft(room, "after the lock")]))
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the append waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not pending.done()
        other.execute("COMMIT")
        assert seqs(await asyncio.wait_for(pending, 5)) == [2]
        assert [m.text for m in await history.after(room.id, 0, 10)] == ["hello", "after the lock"]
    finally:
        other.close()
        await history.close()


@pytest.mark.parametrize(("query", "expected"), [("", 1), ("?synchronous=full", 2)])
async def test_sqlite_synchronous_is_chosen_in_the_url(
    tmp_path: Path, query: str, expected: int
) -> None:
    """``normal`` (SQLite's 1) unless the URL asks for ``full`` (2), which syncs the log at
    every commit; either way appends land and survive a reopen."""
    from roomcast.adapters.sql import SqlHistory

    url = f"sqlite:///{tmp_path / 'sync.db'}{query}"
    history = SqlHistory(url)
    await history.start()
    try:
        mode = await history._db.run(lambda conn: conn.exec_driver_sql("PRAGMA synchronous"))
        assert mode.scalar() == expected
        room = await history.room_by_name("synced", create=True)
        assert room is not None
        assert seqs(await history.append([draft(room), draft(room, "two")])) == [1, 2]
    finally:
        await history.close()
    reopened = SqlHistory(url)
    await reopened.start()
    try:
        assert [m.text for m in await reopened.after(room.id, 0, 10)] == ["hello", "two"]
    finally:
        await reopened.close()


def test_sqlite_synchronous_must_be_normal_or_full(tmp_path: Path) -> None:
    from roomcast.adapters.sql import SqlHistory
    from roomcast.exceptions import ConfigError

    with pytest.raises(ConfigError, match="invalid SQLite synchronous 'off'"):
        SqlHistory(f"sqlite:///{tmp_path / 'x.db'}?synchronous=off")
    assert not (tmp_path / "x.db").exists()
