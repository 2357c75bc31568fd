"""Durable history in SQL: SQLite for one host, PostgreSQL for many.

Three tables hold everything::

    rooms     (id, name, epoch, seq, created_ms)     seq = the room's last sequence number
    messages  (room_id, seq, id, user_id, user_name, text, ts, epoch)
    message_ids (room_id, id, seq)                   ids chosen by senders, unique per room
    counters  (name, value)                          the user id counter
    users     (subject, id)                          authenticated users' ids

The room row is the room's lock: ``append`` bumps ``rooms.seq`` with
``UPDATE ... RETURNING`` and inserts the messages in the same transaction, so a room's
messages get 1, 2, 3, ... with no gap and no duplicate however many processes append at
once. PostgreSQL serialises appenders on the row lock (appends to other rooms run in
parallel); SQLite has one writer per database, taken up front with ``BEGIN IMMEDIATE``:
on the event loop's thread when it is free at once, else awaited on the store's thread
(see :meth:`~roomcast.adapters.sql.engine.Database.write_sqlite`).
"""

from __future__ import annotations

import functools
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from ...core.models import Draft, Message, Room, RoomId, User, UserId
from ...core.ports import FIND_WINDOW, TRIM_BATCH, TRIM_ROOMS_PAGE, Oldest
from ...core.validation import HISTORY_LIMIT_MAX
from ...exceptions import ChatError, ErrorCode
from .engine import acquire, release

__all__ = ["SqlHistory"]

metadata = sa.MetaData()

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("epoch", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("created_ms", sa.BigInteger),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("room_id", sa.Integer, sa.ForeignKey("rooms.id"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.Text, nullable=False),
    sa.Column("edited_ms", sa.BigInteger),
    sa.Index(
        "messages_changed",
        "room_id",
        "edited_ms",
        sqlite_where=sa.text("edited_ms IS NOT NULL"),
        postgresql_where=sa.text("edited_ms IS NOT NULL"),
    ),
)
"""``edited_ms``: when the message was last edited or deleted (None: never); the partial
index holds only such messages, so appends do not pay for it."""

message_ids = sa.Table(
    "message_ids",
    metadata,
    sa.Column("room_id", sa.Integer, sa.ForeignKey("rooms.id"), primary_key=True),
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)
"""The ids senders chose (see Draft.chosen), unique per room: how a retry is found, and
what stops two racing ones from both being stored. Messages with ids the server chose
have no row here, so their appends pay nothing for it."""

counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("subject", sa.Text, primary_key=True),
    sa.Column("id", sa.BigInteger, nullable=False, unique=True),
)
"""The user id of every token subject ever seen (see SqlHistory.user_id_for)."""

_USER_IDS = "user_id"

# A user id, taken on every connect, in one statement (see Database.execute).
_NEXT_USER_ID = "UPDATE {counters} SET value = value + 1 WHERE name = $1 RETURNING value"

_USER_BY_SUBJECT = "SELECT id FROM {users} WHERE subject = $1"

_BUMP = sa.update(rooms).where(rooms.c.id == sa.bindparam("room")).values(seq=sa.bindparam("seq"))

# Reads on every join, and pages of history, one statement each (see Database.fetch).
_ROOM_BY_NAME = "SELECT id, name, epoch FROM {rooms} WHERE name = $1"
_ROOM_BY_ID = "SELECT id, name, epoch FROM {rooms} WHERE id = $1"
_LATEST = "SELECT seq FROM {rooms} WHERE id = $1"
_PAGE = "SELECT room_id, seq, epoch, id, user_id, user_name, text, ts, edited_ms FROM {messages} "
_AFTER = _PAGE + "WHERE room_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
# A message by id among the room's newest (see SqlHistory.find): the primary key's range.
_FIND = _PAGE + (
    "WHERE room_id = $1 AND id = $2 AND seq > (SELECT seq FROM {rooms} WHERE id = $3) - $4"
)
_GET = _PAGE + "WHERE room_id = $1 AND seq = $2"
_CHANGED = _PAGE + "WHERE room_id = $1 AND edited_ms >= $2 AND seq <= $3 ORDER BY seq LIMIT $4"
_BEFORE = _PAGE + "WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
_NEWEST = _PAGE + "WHERE room_id = $1 ORDER BY seq DESC LIMIT $2"

# The append on SQLite, as the driver's own SQL (see SqlHistory.append).
_SQLITE_READ = "SELECT id, seq, epoch FROM rooms WHERE id IN ({})"
_SQLITE_BUMP = "UPDATE rooms SET seq = ? WHERE id = ?"
# The stored messages of ids senders chose (see message_ids), on SQLite per room.
_SQLITE_KNOWN = (
    "SELECT m.room_id, m.seq, m.epoch, m.id, m.user_id, m.user_name, m.text, m.ts, "
    "m.edited_ms FROM message_ids k JOIN messages m ON m.room_id = k.room_id AND m.seq = k.seq "
    "WHERE k.room_id = ? AND k.id IN ({})"
)
_SQLITE_NAME = "INSERT INTO message_ids (room_id, id, seq) VALUES (?, ?, ?)"
_SQLITE_INSERT = (
    "INSERT INTO messages (room_id, seq, id, user_id, user_name, text, ts, epoch) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

# The append on PostgreSQL in one statement (see SqlHistory._append_pg). The rooms' rows
# are locked in id order (LockRows above the Sort), so two batches spanning the same rooms
# cannot deadlock; the UPDATE only touches rows the CTE has already locked, and moves each
# room's position past the batch; the INSERT numbers each message from its room's old
# position and its rank in the batch. A room that does not exist leaves its messages
# without a seq: the NOT NULL violation undoes the whole statement.
_PG_LOCK_AND_MOVE = """
WITH locked AS MATERIALIZED (
    SELECT r.id, r.seq, r.epoch FROM {rooms} r
    WHERE r.id = ANY($8::int[]) ORDER BY r.id FOR UPDATE
), moved AS (
    UPDATE {rooms} r SET seq = l.seq + c.n
    FROM locked l JOIN unnest($8::int[], $9::bigint[]) AS c(id, n) ON c.id = l.id
    WHERE r.id = l.id
    RETURNING r.id, l.seq AS base, l.epoch
)
"""
_PG_APPEND = (
    _PG_LOCK_AND_MOVE
    + """
INSERT INTO {messages} (room_id, seq, id, user_id, user_name, text, ts, epoch)
SELECT b.room_id, m.base + b.rank, b.id, b.user_id, b.user_name, b.text, b.ts, m.epoch
FROM unnest($1::int[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[]) AS b(room_id, id, user_id, user_name, text, ts, rank)
LEFT JOIN moved m ON m.id = b.room_id
RETURNING room_id, seq, epoch
"""
)
# The same on PostgreSQL, for the whole batch in one round trip.
_PG_KNOWN = """
SELECT m.room_id, m.seq, m.epoch, m.id, m.user_id, m.user_name, m.text, m.ts, m.edited_ms
FROM {message_ids} k JOIN {messages} m ON m.room_id = k.room_id AND m.seq = k.seq
WHERE (k.room_id, k.id) IN (SELECT * FROM unnest($1::int[], $2::text[]))
"""
# _PG_APPEND for a batch with ids senders chose ($10: which drafts): each one's id goes
# into message_ids in the same statement. A racing append that stored one of them first
# makes it fail on message_ids' primary key, and nothing is stored: looked up again.
_PG_APPEND_NAMED = (
    _PG_LOCK_AND_MOVE.rstrip()
    + """, batch AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::bigint[], $7::bigint[], $10::bool[])
        AS b(room_id, id, user_id, user_name, text, ts, rank, chosen)
), stored AS (
    INSERT INTO {messages} (room_id, seq, id, user_id, user_name, text, ts, epoch)
    SELECT b.room_id, m.base + b.rank, b.id, b.user_id, b.user_name, b.text, b.ts, m.epoch
    FROM batch b LEFT JOIN moved m ON m.id = b.room_id
    RETURNING room_id, seq, epoch
), named AS (
    INSERT INTO {message_ids} (room_id, id, seq)
    SELECT b.room_id, b.id, m.base + b.rank FROM batch b JOIN moved m ON m.id = b.room_id
    WHERE b.chosen
)
SELECT room_id, seq, epoch FROM stored
"""
)
_NOT_NULL_VIOLATION = "23502"
_UNIQUE_VIOLATION = "23505"

_ROOM_COLUMNS = (rooms.c.id, rooms.c.name, rooms.c.epoch)
_PAGE_COLUMNS = (
    messages.c.room_id,
    messages.c.seq,
    messages.c.epoch,
    messages.c.id,
    messages.c.user_id,
    messages.c.user_name,
    messages.c.text,
    messages.c.ts,
    messages.c.edited_ms,
)


class SqlHistory:
    """The :class:`~roomcast.core.ports.History` port on SQLite or PostgreSQL (asyncpg).

    ``url`` is ``sqlite:///PATH``, ``sqlite:///:memory:``, ``postgresql://...`` or
    ``postgres://...``. For PostgreSQL, ``schema`` (or ``?schema=NAME`` in the URL) puts
    every table in that schema, created if missing.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self._db = acquire(url, schema=schema)
        names = {t: self._db.qualified(t) for t in ("rooms", "messages", "message_ids")}
        self._pg_append_sql = _PG_APPEND.format(**names)
        self._pg_append_named_sql = _PG_APPEND_NAMED.format(**names)
        self._pg_known_sql = _PG_KNOWN.format(**names)
        sql = self._db.driver_sql
        tables = {"rooms": "rooms", "messages": "messages", "counters": "counters"}
        self._next_user_id_sql = sql(_NEXT_USER_ID, **tables)
        self._user_by_subject_sql = sql(_USER_BY_SUBJECT, users="users")
        self._room_by_name_sql = sql(_ROOM_BY_NAME, **tables)
        self._room_by_id_sql = sql(_ROOM_BY_ID, **tables)
        self._latest_sql = sql(_LATEST, **tables)
        self._after_sql = sql(_AFTER, **tables)
        self._find_sql = sql(_FIND, **tables)
        self._before_sql = sql(_BEFORE, **tables)
        self._get_sql = sql(_GET, **tables)
        # SQLite, without statistics, would walk the primary key for the ORDER BY: every
        # message up to the seq (30 ms for 200,000), where the index holds only the changed.
        changed = _CHANGED
        if not self._db.postgres:
            changed = changed.replace(
                "{messages} WHERE", "{messages} INDEXED BY messages_changed WHERE"
            )
        self._changed_sql = sql(changed, **tables)
        self._newest_sql = sql(_NEWEST, **tables)

    async def start(self) -> None:
        """Create the schema and tables if missing; safe when many processes start at once."""
        await self._db.create(metadata)
        seed = self._db.insert_or_ignore(counters, "name").values(name=_USER_IDS, value=0)
        await self._db.run(lambda conn: conn.execute(seed), write=True)

    async def close(self) -> None:
        """Close every pooled connection."""
        await release(self._db)

    async def _first(self, sql: str, arg: object) -> Any:
        """The first row of a one-parameter read, or None."""
        rows = await self._db.fetch(sql, arg)
        return rows[0] if rows else None

    async def room_by_name(self, name: str, *, create: bool = False) -> Room | None:
        """The room with this exact name; created (next numeric id, new epoch) if asked."""
        found = await self._first(self._room_by_name_sql, name)
        if found is not None:
            return Room(RoomId(found[0]), found[1], found[2])
        if not create:
            return None
        query = sa.select(*_ROOM_COLUMNS).where(rooms.c.name == name)
        insert = (
            self._db.insert_or_ignore(rooms, "name")
            .values(name=name, epoch=_new_epoch(), seq=0, created_ms=int(time.time() * 1000))
            .returning(*_ROOM_COLUMNS)
        )

        def create_room(conn: sa.Connection) -> RowMapping:
            row = conn.execute(insert).mappings().first()
            if row is None:
                # Someone else (another task or process) created it since our read.
                row = conn.execute(query).mappings().one()
            return row

        return _room(await self._db.run(create_room, write=True))

    async def room_by_id(self, room: RoomId) -> Room | None:
        found = await self._first(self._room_by_id_sql, room)
        return None if found is None else Room(RoomId(found[0]), found[1], found[2])

    async def rooms(
        self,
        ids: Sequence[RoomId] | None = None,
        *,
        after: RoomId | None = None,
        limit: int | None = None,
    ) -> list[Room]:
        """Every room, by id; with ``ids``, those of them that exist; ``after`` and
        ``limit`` page through them by their primary key."""
        query = sa.select(*_ROOM_COLUMNS).order_by(rooms.c.id)
        if ids is not None:
            query = query.where(rooms.c.id.in_(sorted(set(ids))))
        else:
            if after is not None:
                query = query.where(rooms.c.id > after)
            if limit is not None:
                query = query.limit(limit)
        rows = await self._db.run(lambda conn: conn.execute(query).mappings().all())
        return [_room(row) for row in rows]

    async def latest(self, room: RoomId) -> int:
        """The room's last ``seq`` (0 for a room with no message, or no such room)."""
        found = await self._first(self._latest_sql, room)
        return 0 if found is None else int(found[0])

    async def append(self, drafts: Sequence[Draft]) -> list[Message]:
        """Sequence and store the drafts in one transaction, in the order given.

        A draft whose id its sender chose and the room holds already is not stored again:
        the stored message stands in its place (see :class:`~roomcast.core.ports.History`).
        Raises :class:`~roomcast.exceptions.ChatError` ``NOT_FOUND`` (and stores nothing)
        when a draft names a room that does not exist.
        """
        if not drafts:
            return []
        postgres = self._db.postgres
        if postgres:
            stored = await self._append_pg(drafts)
            if stored is not None:
                return stored
            # A room is missing and nothing was stored: the statements below say which.
        ids = sorted({draft.room for draft in drafts})
        # A constant number of statements per batch, however many rooms it spans: read the
        # rooms' positions under the write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: row
        # locks, taken in id order so two batches spanning the same rooms cannot deadlock),
        # move them in one executemany, insert the messages in one more.
        if postgres:
            read = (
                sa.select(rooms.c.id, rooms.c.seq, rooms.c.epoch)
                .where(rooms.c.id.in_(ids))
                .order_by(rooms.c.id)
                .with_for_update()
            )

        def append(conn: Any) -> list[Message]:
            if postgres:
                positions = conn.execute(read).all()
            else:
                # The hot path on the embedded store: a sqlite3 connection of its own, its
                # cursor used straight, without SQLAlchemy's per-statement compile and
                # parameter processing or its per-transaction bookkeeping.
                cursor = conn.cursor()
                marks = ",".join("?" * len(ids))
                positions = cursor.execute(_SQLITE_READ.format(marks), ids).fetchall()
            found = {room: (int(seq), epoch) for room, seq, epoch in positions}
            missing = [room for room in ids if room not in found]
            if missing:
                raise ChatError(ErrorCode.NOT_FOUND, f"room {missing[0]} does not exist")
            # Ids chosen by senders that the room holds already, read under the same lock
            # as the positions: a retry racing its first try is stored once.
            known = _known_ids(conn, postgres, drafts) if _any_chosen(drafts) else {}
            fresh, slots = _plan(drafts, known)
            out: list[Message] = []
            for draft in fresh:
                seq, epoch = found[draft.room]
                found[draft.room] = (seq + 1, epoch)
                out.append(Message.from_draft(draft, seq + 1, epoch))
            if not out:
                return _placed(slots, out)
            moved = [(found[room][0], room) for room in sorted({m.room for m in out})]
            named = [(m.room, m.id, m.seq) for m, d in zip(out, fresh, strict=True) if d.chosen]
            if postgres:
                conn.execute(_BUMP, [{"room": room, "seq": seq} for seq, room in moved])
                conn.execute(messages.insert(), [_message_row(message) for message in out])
                if named:
                    rows = [{"room_id": r, "id": i, "seq": q} for r, i, q in named]
                    conn.execute(message_ids.insert(), rows)
            else:
                cursor.executemany(_SQLITE_BUMP, moved)
                cursor.executemany(_SQLITE_INSERT, [_message_tuple(m) for m in out])
                if named:
                    cursor.executemany(_SQLITE_NAME, named)
            return _placed(slots, out)

        if postgres:
            return await self._db.run(append, write=True)
        return await self._db.write_sqlite(append)

    async def _append_pg(self, drafts: Sequence[Draft]) -> list[Message] | None:
        """The append on PostgreSQL in one statement, its own transaction: one round trip
        instead of five (two with ids senders chose: they are looked up first). None (and
        nothing stored) if a room does not exist."""
        chosen = _any_chosen(drafts)
        # Each lost race means another append stored one of the batch's chosen ids, which
        # the next lookup finds: at most one more try per chosen id.
        for _ in range(sum(draft.chosen for draft in drafts) + 1):
            known: dict[tuple[RoomId, str], Message] = {}
            if chosen:
                rows = await self._db.fetch(
                    self._pg_known_sql,
                    [d.room for d in drafts if d.chosen],
                    [d.id for d in drafts if d.chosen],
                )
                known = {(m.room, m.id): m for m in map(_message_of, rows)}
            fresh, slots = _plan(drafts, known)
            if not fresh:
                return _placed(slots, [])
            stored = await self._db.run_driver(
                functools.partial(self._insert_pg, drafts=fresh), wait=False
            )
            if stored is None:
                return None
            if stored:
                return _placed(slots, stored)
        raise RuntimeError("an append kept losing races for the ids its senders chose")

    async def _insert_pg(self, conn: Any, drafts: list[Draft]) -> list[Message] | None:
        """Store drafts none of whose chosen ids the rooms hold (as last looked up): their
        messages; [] if a racing append stored one of those ids first (nothing stored);
        None if a room does not exist (nothing stored)."""
        counts = Counter(draft.room for draft in drafts)
        ids = sorted(counts)
        ranks: list[int] = []
        seen: Counter[RoomId] = Counter()
        for draft in drafts:
            seen[draft.room] += 1
            ranks.append(seen[draft.room])
        args = [
            [d.room for d in drafts],
            [d.id for d in drafts],
            [d.user.id for d in drafts],
            [d.user.name for d in drafts],
            [d.text for d in drafts],
            [d.ts for d in drafts],
            ranks,
            ids,
            [counts[room] for room in ids],
        ]
        try:
            if _any_chosen(drafts):
                rows = await conn.fetch(
                    self._pg_append_named_sql, *args, [d.chosen for d in drafts]
                )
            else:
                rows = await conn.fetch(self._pg_append_sql, *args)
        except Exception as error:
            state = getattr(error, "sqlstate", None)
            if state == _NOT_NULL_VIOLATION:
                return None  # a room's position was missing: the statement stored nothing
            if state == _UNIQUE_VIOLATION and _any_chosen(drafts):
                return []  # a chosen id was stored meanwhile: the statement stored nothing
            raise
        base: dict[int, tuple[int, str]] = {}
        for row in rows:
            room, seq, epoch = row["room_id"], int(row["seq"]), row["epoch"]
            if room not in base or seq - 1 < base[room][0]:
                base[room] = (seq - 1, epoch)
        return [
            Message.from_draft(draft, base[draft.room][0] + rank, base[draft.room][1])
            for draft, rank in zip(drafts, ranks, strict=True)
        ]

    async def after(self, room: RoomId, seq: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages with ``seq`` greater than the given one, ascending."""
        if limit <= 0:
            return []
        # Longer than a page (recovery, gap filling): SQLite reads it off the event loop.
        rows = await self._db.fetch(
            self._after_sql, room, seq, limit, inline=limit <= HISTORY_LIMIT_MAX
        )
        return [_message_of(row) for row in rows]

    async def find(self, room: RoomId, message_id: str) -> Message | None:
        """The room's message with this id among its newest :data:`FIND_WINDOW`, or None."""
        rows = await self._db.fetch(self._find_sql, room, message_id, room, FIND_WINDOW)
        return _message_of(rows[0]) if rows else None

    async def before(self, room: RoomId, seq: int | None, limit: int) -> list[Message]:
        """The newest ``limit`` messages with ``seq`` below ``seq`` (all if None), ascending."""
        if limit <= 0:
            return []
        inline = limit <= HISTORY_LIMIT_MAX
        if seq is None:
            rows = await self._db.fetch(self._newest_sql, room, limit, inline=inline)
        else:
            rows = await self._db.fetch(self._before_sql, room, seq, limit, inline=inline)
        return [_message_of(row) for row in reversed(rows)]

    async def get(self, room: RoomId, seq: int) -> Message | None:
        """The room's message ``seq``, or None."""
        rows = await self._db.fetch(self._get_sql, room, seq)
        return _message_of(rows[0]) if rows else None

    async def delete(self, room: RoomId, seq: int, when: int) -> Message | None:
        """Delete the room's message ``seq`` (its text goes; see
        :meth:`roomcast.core.ports.History.delete`) in one statement; None if none such."""
        erase = (
            sa.update(messages)
            .where(messages.c.room_id == room, messages.c.seq == seq)
            # Deleted before: when stays the first deletion's.
            .values(
                text="",
                edited_ms=sa.case((messages.c.text == "", messages.c.edited_ms), else_=when),
            )
            .returning(*_PAGE_COLUMNS)
        )

        def delete(conn: sa.Connection) -> Any:
            return conn.execute(erase).first()

        row = await self._db.run(delete, write=True)
        return None if row is None else _message_of(row)

    async def changed(self, room: RoomId, upto: int, since_ms: int, limit: int) -> list[Message]:
        """The room's messages up to ``upto`` changed since ``since_ms`` (see
        :meth:`roomcast.core.ports.History.changed`), on the ``messages_changed`` index."""
        if limit <= 0:
            return []
        rows = await self._db.fetch(self._changed_sql, room, since_ms, upto, limit)
        return [_message_of(row) for row in rows]

    async def edit(self, room: RoomId, seq: int, text: str, when: int) -> Message | None:
        """Replace the text of the room's message ``seq`` unless it was deleted (see
        :meth:`roomcast.core.ports.History.edit`), in one statement; None if none such."""
        revise = (
            sa.update(messages)
            .where(messages.c.room_id == room, messages.c.seq == seq, messages.c.text != "")
            .values(text=text, edited_ms=when)
            .returning(*_PAGE_COLUMNS)
        )

        def edit(conn: sa.Connection) -> Any:
            return conn.execute(revise).first()

        row = await self._db.run(edit, write=True)
        return None if row is None else _message_of(row)

    async def reset(self, room: RoomId) -> Room:
        """Drop the room's messages and give it a new epoch; ``seq`` starts again at 1."""
        fresh, spare = _new_epoch(), _new_epoch()
        while spare == fresh:
            spare = _new_epoch()
        # Should the fresh epoch equal the current one, take the spare: a reset must change it.
        epoch = sa.case((rooms.c.epoch == fresh, spare), else_=fresh)
        bump = (
            sa.update(rooms)
            .where(rooms.c.id == room)
            .values(seq=0, epoch=epoch)
            .returning(*_ROOM_COLUMNS)
        )

        def reset(conn: sa.Connection) -> RowMapping:
            row = conn.execute(bump).mappings().first()
            if row is None:
                raise ChatError(ErrorCode.NOT_FOUND, f"room {room} does not exist")
            conn.execute(sa.delete(message_ids).where(message_ids.c.room_id == room))
            conn.execute(sa.delete(messages).where(messages.c.room_id == room))
            return row

        return _room(await self._db.run(reset, write=True))

    async def oldest(
        self, *, after: RoomId | None = None, limit: int = TRIM_ROOMS_PAGE
    ) -> list[Oldest]:
        """A page of the rooms that hold messages (see
        :meth:`roomcast.core.ports.History.oldest`): one read, each room's oldest message
        found on the primary key."""
        if limit <= 0:
            return []
        held = messages.alias("held")
        first = (
            sa.select(sa.func.min(held.c.seq))
            .where(held.c.room_id == rooms.c.id)
            .correlate(rooms)
            .scalar_subquery()
        )
        query = (
            sa.select(rooms.c.id, rooms.c.seq, messages.c.seq, messages.c.ts)
            .select_from(rooms)
            .join(messages, sa.and_(messages.c.room_id == rooms.c.id, messages.c.seq == first))
            .where(rooms.c.id > (0 if after is None else after))
            .order_by(rooms.c.id)
            .limit(limit)
        )

        def read(conn: sa.Connection) -> list[Oldest]:
            return [
                Oldest(RoomId(row[0]), int(row[1]), int(row[2]), int(row[3]))
                for row in conn.execute(query)
            ]

        return await self._db.run(read)

    async def trim(
        self,
        room: RoomId,
        *,
        keep: int | None = None,
        before_ms: int | None = None,
        limit: int = TRIM_BATCH,
    ) -> int:
        """Delete up to ``limit`` of the room's oldest messages past retention (see
        :meth:`roomcast.core.ports.History.trim`), in one transaction."""
        if limit <= 0 or (keep is None and before_ms is None):
            return 0
        latest = sa.select(rooms.c.seq).where(rooms.c.id == room)
        oldest = (
            sa.select(messages.c.seq, messages.c.ts, messages.c.id)
            .where(messages.c.room_id == room)
            .order_by(messages.c.seq)
            .limit(limit)
        )

        def doomed(conn: sa.Connection) -> list[tuple[int, str]]:
            """The seqs and ids of the messages to delete, oldest first."""
            seq = conn.execute(latest).scalar()
            if seq is None:
                return []
            below = None if keep is None else seq - keep + 1  # these seqs go
            found: list[tuple[int, str]] = []
            for row in conn.execute(oldest):
                if (below is None or row.seq >= below) and (
                    before_ms is None or row.ts >= before_ms
                ):
                    break
                found.append((row.seq, row.id))
            return found

        def trim(conn: sa.Connection) -> int:
            going = doomed(conn)  # again, in the write transaction
            if not going:
                return 0
            last = going[-1][0]
            conn.execute(
                sa.delete(message_ids).where(
                    message_ids.c.room_id == room,
                    message_ids.c.id.in_([message_id for _, message_id in going]),
                    message_ids.c.seq <= last,
                )
            )
            gone = conn.execute(
                sa.delete(messages).where(messages.c.room_id == room, messages.c.seq <= last)
            )
            # What this transaction deleted: another node's pass may have taken some first.
            return int(gone.rowcount)

        # A room with nothing to let go (most rooms, most passes) costs a read, not a write
        # transaction: on SQLite those take turns with every room's appends.
        if not await self._db.run(doomed):
            return 0
        return await self._db.run(trim, write=True)

    async def next_user_id(self) -> UserId:
        """A user id never handed out before by this store (1, 2, 3, ...)."""
        rows = await self._db.execute(self._next_user_id_sql, _USER_IDS)
        if not rows:
            raise RuntimeError("the user id counter is missing: start() was not called")
        return UserId(int(rows[0][0]))

    async def user_id_for(self, subject: str) -> UserId:
        """The subject's user id: read, or on its first time taken from the counter and
        written — by one of two nodes racing for a new subject; the other reads the
        winner's (its counter value is skipped, as a failed connect's is)."""
        found = await self._first(self._user_by_subject_sql, subject)
        if found is not None:
            return UserId(int(found[0]))
        bump = (
            sa.update(counters)
            .where(counters.c.name == _USER_IDS)
            .values(value=counters.c.value + 1)
            .returning(counters.c.value)
        )
        read = sa.select(users.c.id).where(users.c.subject == subject)

        def take(conn: sa.Connection) -> int:
            value = conn.execute(bump).scalar_one()
            conn.execute(
                self._db.insert_or_ignore(users, "subject").values(subject=subject, id=value)
            )
            return int(conn.execute(read).scalar_one())

        return UserId(await self._db.run(take, write=True))


def _any_chosen(drafts: Sequence[Draft]) -> bool:
    return any(draft.chosen for draft in drafts)


def _known_ids(
    conn: Any, postgres: bool, drafts: Sequence[Draft]
) -> dict[tuple[RoomId, str], Message]:
    """The stored messages whose ids are those senders chose for drafts, by (room, id)."""
    wanted: dict[RoomId, set[str]] = {}
    for draft in drafts:
        if draft.chosen:
            wanted.setdefault(draft.room, set()).add(draft.id)
    known: dict[tuple[RoomId, str], Message] = {}
    for room, ids in sorted(wanted.items()):
        if postgres:
            rows = conn.execute(
                sa.select(*_PAGE_COLUMNS)
                .join(
                    message_ids,
                    sa.and_(
                        message_ids.c.room_id == messages.c.room_id,
                        message_ids.c.seq == messages.c.seq,
                    ),
                )
                .where(message_ids.c.room_id == room, message_ids.c.id.in_(sorted(ids)))
            ).all()
        else:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(_SQLITE_KNOWN.format(marks), (room, *sorted(ids))).fetchall()
        for row in rows:
            message = _message_of(row)
            known[(message.room, message.id)] = message
    return known


def _plan(
    drafts: Sequence[Draft], known: dict[tuple[RoomId, str], Message]
) -> tuple[list[Draft], list[Message | int]]:
    """The drafts to store, and for each draft given either the stored message that
    stands in for it or the index of the draft to store that it is (a chosen id twice in
    one batch is stored once)."""
    fresh: list[Draft] = []
    slots: list[Message | int] = []
    placed: dict[tuple[RoomId, str], int] = {}
    for draft in drafts:
        if draft.chosen:
            key = (draft.room, draft.id)
            stored = known.get(key)
            if stored is not None:
                slots.append(stored)
                continue
            if key in placed:
                slots.append(placed[key])
                continue
            placed[key] = len(fresh)
        slots.append(len(fresh))
        fresh.append(draft)
    return fresh, slots


def _placed(slots: list[Message | int], stored: list[Message]) -> list[Message]:
    """One message per draft (see :func:`_plan`), once ``stored`` are the fresh ones'."""
    return [slot if isinstance(slot, Message) else stored[slot] for slot in slots]


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _room(row: RowMapping) -> Room:
    return Room(RoomId(row["id"]), row["name"], row["epoch"])


def _message_of(row: Sequence[Any]) -> Message:
    """A message from a row of ``_PAGE``'s columns, in their order."""
    room, seq, epoch, message_id, user_id, user_name, text, ts, edited = row
    return Message(
        RoomId(room),
        int(seq),
        epoch,
        message_id,
        User(UserId(int(user_id)), user_name),
        text,
        int(ts),
        None if edited is None else int(edited),
    )


def _message_tuple(message: Message) -> tuple[Any, ...]:
    return (
        message.room,
        message.seq,
        message.id,
        message.user.id,
        message.user.name,
        message.text,
        message.ts,
        message.epoch,
    )


def _message_row(message: Message) -> dict[str, Any]:
    return {
        "room_id": message.room,
        "seq": message.seq,
        "id": message.id,
        "user_id": message.user.id,
        "user_name": message.user.name,
        "text": message.text,
        "ts": message.ts,
        "epoch": message.epoch,
    }
