"""Presence in SQL, for clusters whose broker keeps no state (RabbitMQ, NATS).

Three tables, in the store's database::

    presence_nodes    (node, expires_ms)                        the node registry
    presence_members  (room_id, conn, user_id, user_name, node, ord)   room membership
    presence_conns    (conn, user_id, user_name, node)          connections, for direct messages

A dead node is claimed by deleting its registry row: only the transaction whose
``DELETE ... RETURNING`` got the row goes on to remove (and report) the node's entries, so
when several nodes reap at once every entry is reported exactly once. Expiry uses the
nodes' wall clocks, which must agree to well within ``node_ttl`` (NTP does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from ...core.models import ConnId, Member, NodeId, RoomId, User, UserId
from .engine import acquire, release

__all__ = ["SqlPresence"]

metadata = sa.MetaData()

nodes = sa.Table(
    "presence_nodes",
    metadata,
    sa.Column("node", sa.Text, primary_key=True),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
)

members = sa.Table(
    "presence_members",
    metadata,
    sa.Column("room_id", sa.Integer, primary_key=True),
    sa.Column("conn", sa.Text, primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("node", sa.Text, nullable=False, index=True),
    sa.Column("ord", sa.BigInteger, nullable=False),
)

conns = sa.Table(
    "presence_conns",
    metadata,
    sa.Column("conn", sa.Text, primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("node", sa.Text, nullable=False, index=True),
)


# What every connect, join, leave, disconnect and direct message does, one statement each
# (see Database.driver_sql, Database.execute and Database.fetch).
_STATEMENTS = {
    "add": (
        "INSERT INTO {members} (room_id, conn, user_id, user_name, node, ord) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, conn) DO UPDATE SET "
        "user_id = excluded.user_id, user_name = excluded.user_name, node = excluded.node, "
        "ord = excluded.ord"
    ),
    "remove": "DELETE FROM {members} WHERE room_id = $1 AND conn = $2",
    "members": (
        "SELECT conn, user_id, user_name, node FROM {members} WHERE room_id = $1 ORDER BY ord"
    ),
    "register": (
        "INSERT INTO {conns} (conn, user_id, user_name, node) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (conn) DO UPDATE SET user_id = excluded.user_id, "
        "user_name = excluded.user_name, node = excluded.node"
    ),
    "unregister": "DELETE FROM {conns} WHERE conn = $1",
    "locate": "SELECT conn, user_id, user_name, node FROM {conns} WHERE user_id = $1 ORDER BY conn",
}


def _member_of(row: Sequence[Any]) -> Member:
    """A member from a row of (conn, user_id, user_name, node)."""
    conn, user_id, name, node = row
    return Member(User(UserId(int(user_id)), name), ConnId(conn), NodeId(node))


DECODED_MAX = 16_384
"""How many decoded member rows a presence keeps for its next ``members`` read (about 500
bytes each; when full, it starts again empty)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _member(row: RowMapping) -> Member:
    return Member(
        User(UserId(int(row["user_id"])), row["user_name"]),
        ConnId(row["conn"]),
        NodeId(row["node"]),
    )


class SqlPresence:
    """The :class:`~roomcast.core.ports.Presence` port on SQLite or PostgreSQL."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self._db = acquire(url, schema=schema)
        tables = {"members": "presence_members", "conns": "presence_conns"}
        self._sql = {key: self._db.driver_sql(sql, **tables) for key, sql in _STATEMENTS.items()}
        self._decoded: dict[tuple[Any, ...], Member] = {}
        """Member rows already decoded, by their exact values (see ``members``)."""

    async def start(self) -> None:
        await self._db.create(metadata)

    async def close(self) -> None:
        await release(self._db)

    async def _execute(self, key: str, *args: Any) -> None:
        await self._db.execute(self._sql[key], *args)

    async def _fetch(self, key: str, *args: Any) -> list[Any]:
        return await self._db.fetch(self._sql[key], *args)

    async def add(self, room: RoomId, member: Member) -> None:
        user = member.user
        ord_ = time.time_ns() // 1000
        await self._execute("add", room, member.conn, user.id, user.name, member.node, ord_)

    async def remove(self, room: RoomId, conn: ConnId) -> None:
        await self._execute("remove", room, conn)

    async def members(self, room: RoomId) -> list[Member]:
        # Every join reads the whole room, so filling a room of N reads about N²/2 rows;
        # a row seen before (same connection, user, name and node) is decoded once.
        decoded, known = [], self._decoded
        for row in await self._fetch("members", room):
            key = tuple(row)
            found = known.get(key)
            if found is None:
                if len(known) >= DECODED_MAX:
                    known.clear()
                found = known[key] = _member_of(key)
            decoded.append(found)
        return decoded

    async def counts(self, rooms: Sequence[RoomId]) -> dict[RoomId, int]:
        out = {room: 0 for room in rooms}
        if not rooms:
            return out
        query = (
            sa.select(members.c.room_id, sa.func.count())
            .where(members.c.room_id.in_(list(rooms)))
            .group_by(members.c.room_id)
        )
        for room_id, count in await self._db.run(lambda db: db.execute(query).all()):
            out[RoomId(room_id)] = int(count)
        return out

    async def occupied(self) -> dict[RoomId, int]:
        query = sa.select(members.c.room_id, sa.func.count()).group_by(members.c.room_id)
        rows = await self._db.run(lambda db: db.execute(query).all())
        return {RoomId(room_id): int(count) for room_id, count in rows}

    async def register(self, member: Member) -> None:
        user = member.user
        await self._execute("register", member.conn, user.id, user.name, member.node)

    async def unregister(self, conn: ConnId) -> None:
        await self._execute("unregister", conn)

    async def locate(self, user: UserId) -> list[Member]:
        return [_member_of(row) for row in await self._fetch("locate", user)]

    async def heartbeat(self, node: NodeId, ttl: float) -> bool:
        now = _now_ms()
        upsert = self._db.upsert(nodes, ["node"], node=node, expires_ms=now + int(ttl * 1000))
        query = sa.select(nodes.c.expires_ms).where(nodes.c.node == node)

        def beat(db: sa.Connection) -> Any:
            previous = db.execute(query).scalar()
            db.execute(upsert)
            return previous

        previous = await self._db.run(beat, write=True)
        return previous is None or int(previous) < now

    async def reap(self) -> list[tuple[RoomId, Member]]:
        query = sa.select(nodes.c.node).where(nodes.c.expires_ms < _now_ms())
        dead = await self._db.run(lambda db: db.execute(query).scalars().all())
        removed: list[tuple[RoomId, Member]] = []
        for node in dead:
            removed += await self._remove_node(NodeId(node), only_if_expired=True)
        return removed

    async def drop_node(self, node: NodeId) -> list[tuple[RoomId, Member]]:
        return await self._remove_node(node, only_if_expired=False)

    async def _remove_node(
        self, node: NodeId, *, only_if_expired: bool
    ) -> list[tuple[RoomId, Member]]:
        claim = sa.delete(nodes).where(nodes.c.node == node).returning(nodes.c.node)
        if only_if_expired:
            claim = claim.where(nodes.c.expires_ms < _now_ms())

        def remove(db: sa.Connection) -> list[tuple[RoomId, Member]]:
            claimed = db.execute(claim).first() is not None
            if only_if_expired and not claimed:
                return []  # another node reaped it, or it came back
            gone = db.execute(
                sa.delete(members).where(members.c.node == node).returning(*members.c)
            )
            rows = sorted(gone.mappings().all(), key=lambda r: (r["room_id"], r["ord"]))
            db.execute(sa.delete(conns).where(conns.c.node == node))
            return [(RoomId(row["room_id"]), _member(row)) for row in rows]

        return await self._db.run(remove, write=True)
