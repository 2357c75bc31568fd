"""Redis presence: room members, registered connections and live nodes, shared by every node.

Keys, where ``P`` is the URL's ``prefix`` (default ``roomcast``)::

    P:members:{r<room>}  hash    conn -> {"u": user id, "n": name, "node": node, "o": order}
    P:joins:{r<room>}    string  the room's join counter: "o" of the next new member
    P:user:<user>        hash    conn -> {"n": name, "node": node}: the user's connections
    P:conn:<conn>        string  {"u": user id, "node": node}: one registered connection
    P:node:<node>        set     what a node has entries in: "m:<room>:<conn>" for a room
                                 membership, "c:<user>:<conn>" for a registered connection
    P:nodes              zset    node -> the Redis server time its heartbeat lapses at

A room's two keys share the hash tag of its broker channel (``{r<room>}``); every script
touches keys of one slot only, so all of this runs on Redis Cluster as well.

Every entry is added to its node's set before it is written, so the set always covers what
the node has; reaping a node reads only that set instead of scanning the keyspace. An entry
is removed by a script that reads and deletes it in one step and returns it to the one caller
that deleted it, so when several nodes reap (or a node drops itself while being reaped)
each removed membership is reported exactly once. A reaper claims a lapsed node by pushing
its expiry a lease into the future, so the other reapers leave it alone; if the reaper dies
half-way, the lease runs out and another one finishes the job.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from ...core.models import ConnId, Member, NodeId, RoomId, User, UserId
from ...exceptions import UnavailableError
from .broker import (
    POOL_SIZE,
    UNREACHABLE,
    Gate,
    connection_options,
    is_cluster,
    open_cluster,
    open_url,
)

REAP_LEASE = 30.0
"""Seconds a reaper has to remove a lapsed node's entries before another one may."""
REAP_BATCH = 100
"""Nodes claimed by one ``reap`` call at most; the rest wait for the next call."""
DECODED_MAX = 16_384
"""How many decoded room entries a presence keeps for its next ``members`` read (about
600 bytes each; when full, it starts again empty)."""

_ADD = """
-- KEYS: members hash, join counter; ARGV: conn, the entry's JSON up to its order
local old = redis.call('HGET', KEYS[1], ARGV[1])
local order
if old then
  order = cjson.decode(old)['o']  -- joining again keeps the place in the join order
else
  order = redis.call('INCR', KEYS[2])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. string.format('%d', order) .. '}')
"""

_TAKE = """
-- KEYS: members hash, join counter; ARGV: conns. Returns conn, entry, conn, entry, ...
-- of the entries this call deleted, so that no other caller reports them.
local out = {}
for _, conn in ipairs(ARGV) do
  local entry = redis.call('HGET', KEYS[1], conn)
  if entry then
    redis.call('HDEL', KEYS[1], conn)
    out[#out + 1] = conn
    out[#out + 1] = entry
  end
end
if #out > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])  -- orders only compare within a room's current members
end
return out
"""

_HEARTBEAT = """
-- KEYS: nodes; ARGV: node, ttl. Server time, so nodes' clocks need not agree.
-- Returns 1 when the node was unknown or had lapsed (its entries may have been reaped).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
if previous == false or tonumber(previous) < now then return 1 end
return 0
"""

_CLAIM = """
-- KEYS: nodes; ARGV: lease, limit. Returns the lease, then the lapsed nodes it claimed.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.6f', now),
  'LIMIT', 0, tonumber(ARGV[2]))
local lease = string.format('%.6f', now + tonumber(ARGV[1]))
for _, node in ipairs(lapsed) do
  redis.call('ZADD', KEYS[1], lease, node)
end
table.insert(lapsed, 1, lease)
return lapsed
"""

_RELEASE = """
-- KEYS: nodes; ARGV: lease, nodes. Forget the nodes still under this lease; a node that
-- heartbeated meanwhile is alive again and stays.
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == lease then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
"""

_SCRIPTS = {
    name: (source, hashlib.sha1(source.encode()).hexdigest())
    for name, source in {
        "add": _ADD,
        "take": _TAKE,
        "heartbeat": _HEARTBEAT,
        "claim": _CLAIM,
        "release": _RELEASE,
    }.items()
}


def _entry(member: Member) -> bytes:
    return orjson.dumps({"u": member.user.id, "n": member.user.name, "node": member.node})


def _member(conn: bytes, entry: bytes) -> tuple[int, Member]:
    """A member and its join order, from its hash field and value."""
    data = orjson.loads(entry)
    member = Member(User(UserId(data["u"]), data["n"]), ConnId(conn.decode()), NodeId(data["node"]))
    return data["o"], member


def _order(item: tuple[int, Member]) -> int:
    return item[0]


class RedisPresence:
    """Presence in Redis, shared by every node that opens the same URL and prefix."""

    def __init__(self, url: str) -> None:
        self._cluster = is_cluster(url)
        self._client: Redis | RedisCluster
        self._gate: Gate | None = None
        """Redis Cluster: bounds the calls at once (the cluster client's pools do not wait)."""
        if self._cluster:
            options, self._prefix = connection_options(url)
            self._client = open_cluster(options)
            self._gate = Gate(int(options.get("max_connections", POOL_SIZE)))
        else:
            self._client, _, self._prefix = open_url(url)
        self._nodes = f"{self._prefix}:nodes"
        self._decoded: dict[tuple[bytes, bytes], tuple[int, Member]] = {}
        """Room entries already decoded, by hash field and value (see ``members``)."""

    def _members_key(self, room: RoomId) -> str:
        return f"{self._prefix}:members:{{r{room}}}"

    def _joins_key(self, room: RoomId) -> str:
        return f"{self._prefix}:joins:{{r{room}}}"

    def _user_key(self, user: UserId) -> str:
        return f"{self._prefix}:user:{user}"

    def _conn_key(self, conn: ConnId) -> str:
        return f"{self._prefix}:conn:{conn}"

    def _node_key(self, node: NodeId) -> str:
        return f"{self._prefix}:node:{node}"

    async def start(self) -> None:
        await self._load_scripts()

    async def close(self) -> None:
        await self._client.aclose()

    # -- plumbing ----------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        try:
            if self._cluster:
                # Not pipelined on a cluster: each SCRIPT LOAD goes to every primary.
                for source, _ in _SCRIPTS.values():
                    await self._client.script_load(source)
                return
            async with self._client.pipeline(transaction=False) as pipe:
                for source, _ in _SCRIPTS.values():
                    pipe.script_load(source)
                await pipe.execute()
        except UNREACHABLE as exc:
            raise UnavailableError(f"Redis is unreachable: {exc}") from exc

    def _script(self, pipe: Pipeline, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(_SCRIPTS[name][1], len(keys), *keys, *args)

    async def _run(self, build: Callable[[Pipeline], object]) -> list[Any]:
        """Run the commands ``build`` queues on a pipeline, in one round trip.

        Scripts go by EVALSHA alone: redis-py's own script objects would ask the server
        whether each script exists before every pipeline, a second round trip. When the
        server has lost them (a restart) the pipeline runs again after loading them, which
        is safe because a pipeline that met NOSCRIPT ran none of its scripts and every
        other command queued here can be repeated.
        """
        for attempt in range(2):
            try:
                async with self._gate or contextlib.nullcontext():
                    async with self._client.pipeline(transaction=False) as pipe:
                        build(pipe)  # type: ignore[arg-type]  # a cluster's pipeline alike
                        return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
            except UNREACHABLE as exc:
                raise UnavailableError(f"Redis is unreachable: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- room members ------------------------------------------------------------------

    async def add(self, room: RoomId, member: Member) -> None:
        # The entry's JSON without its closing brace; the script appends the join order.
        head = _entry(member)[:-1] + b',"o":'

        def build(pipe: Pipeline) -> None:
            pipe.sadd(self._node_key(member.node), f"m:{room}:{member.conn}")
            self._script(
                pipe, "add", [self._members_key(room), self._joins_key(room)], [member.conn, head]
            )

        await self._run(build)

    async def remove(self, room: RoomId, conn: ConnId) -> None:
        keys = [self._members_key(room), self._joins_key(room)]
        (taken,) = await self._run(lambda pipe: self._script(pipe, "take", keys, [conn]))
        if taken:
            _, member = _member(taken[0], taken[1])
            # Not in the pipeline above: which node's set holds it is known only now.
            await self._run(lambda pipe: pipe.srem(self._node_key(member.node), f"m:{room}:{conn}"))

    async def members(self, room: RoomId) -> list[Member]:
        (entries,) = await self._run(lambda pipe: pipe.hgetall(self._members_key(room)))
        # A join into a room of N reads its N entries, and a storm of joins reads the same
        # entries again and again: each is decoded once and kept, as long as its exact
        # bytes come back (an entry never changes; a member who rejoins gets a new order).
        decoded, known = [], self._decoded
        for item in entries.items():
            found = known.get(item)
            if found is None:
                if len(known) >= DECODED_MAX:
                    known.clear()
                found = known[item] = _member(*item)
            decoded.append(found)
        decoded.sort(key=_order)
        return [member for _, member in decoded]

    async def counts(self, rooms: Sequence[RoomId]) -> dict[RoomId, int]:
        if not rooms:
            return {}

        def build(pipe: Pipeline) -> None:
            for room in rooms:
                pipe.hlen(self._members_key(room))

        return dict(zip(rooms, await self._run(build), strict=True))

    async def occupied(self) -> dict[RoomId, int]:
        # Every node's set names the rooms it has members in: the rooms to count, read from
        # the registry's nodes (lapsed ones too, until they are reaped) — no scan of the
        # keyspace, and one slot per command. A reference can outlive its entry for a
        # moment (a leave removes the entry, then the reference): the counts decide.
        (registry,) = await self._run(lambda pipe: pipe.zrange(self._nodes, 0, -1))
        if not registry:
            return {}

        def read(pipe: Pipeline) -> None:
            for node in registry:
                pipe.smembers(self._node_key(NodeId(node.decode())))

        rooms: set[RoomId] = set()
        for refs in await self._run(read):
            for ref in refs:
                if ref.startswith(b"m:"):
                    rooms.add(RoomId(int(ref.split(b":", 2)[1])))
        counts = await self.counts(sorted(rooms))
        return {room: count for room, count in counts.items() if count > 0}

    # -- registered connections --------------------------------------------------------

    async def register(self, member: Member) -> None:
        user = member.user

        def build(pipe: Pipeline) -> None:
            pipe.sadd(self._node_key(member.node), f"c:{user.id}:{member.conn}")
            pipe.set(self._conn_key(member.conn), orjson.dumps({"u": user.id, "node": member.node}))
            pipe.hset(
                self._user_key(user.id),
                member.conn,
                orjson.dumps({"n": user.name, "node": member.node}),
            )

        await self._run(build)

    async def unregister(self, conn: ConnId) -> None:
        # GETDEL is the claim: only one caller learns whose connection it was.
        (raw,) = await self._run(lambda pipe: pipe.getdel(self._conn_key(conn)))
        if raw is None:
            return
        data = orjson.loads(raw)
        user, node = UserId(data["u"]), NodeId(data["node"])

        def build(pipe: Pipeline) -> None:
            pipe.hdel(self._user_key(user), conn)
            pipe.srem(self._node_key(node), f"c:{user}:{conn}")

        await self._run(build)

    async def locate(self, user: UserId) -> list[Member]:
        (entries,) = await self._run(lambda pipe: pipe.hgetall(self._user_key(user)))
        located = []
        for conn, raw in entries.items():
            data = orjson.loads(raw)
            located.append(
                Member(User(user, data["n"]), ConnId(conn.decode()), NodeId(data["node"]))
            )
        return located

    # -- nodes -------------------------------------------------------------------------

    async def heartbeat(self, node: NodeId, ttl: float) -> bool:
        (lapsed,) = await self._run(
            lambda pipe: self._script(pipe, "heartbeat", [self._nodes], [node, ttl])
        )
        return bool(lapsed)

    async def reap(self) -> list[tuple[RoomId, Member]]:
        (claimed,) = await self._run(
            lambda pipe: self._script(pipe, "claim", [self._nodes], [REAP_LEASE, REAP_BATCH])
        )
        lease, lapsed = claimed[0], [NodeId(node.decode()) for node in claimed[1:]]
        if not lapsed:
            return []
        removed, emptied = await self._sweep(lapsed)
        if emptied:
            # A node whose set is not empty yet added entries while being reaped; its lease
            # runs out and the next reap takes those too.
            await self._run(
                lambda pipe: self._script(pipe, "release", [self._nodes], [lease, *emptied])
            )
        return removed

    async def drop_node(self, node: NodeId) -> list[tuple[RoomId, Member]]:
        removed, _ = await self._sweep([node], forget=True)
        return removed

    async def _sweep(
        self, nodes: Sequence[NodeId], *, forget: bool = False
    ) -> tuple[list[tuple[RoomId, Member]], list[NodeId]]:
        """Remove the entries in the nodes' sets; return the memberships this call removed
        (by room, in join order) and the nodes whose set is empty now. With ``forget``, also
        take the nodes off the registry."""

        def read(pipe: Pipeline) -> None:
            for node in nodes:
                pipe.smembers(self._node_key(node))

        node_refs: list[set[bytes]] = await self._run(read)
        in_rooms: defaultdict[RoomId, list[str]] = defaultdict(list)
        registered: list[tuple[UserId, ConnId]] = []
        for refs in node_refs:
            for ref in refs:
                kind, owner, conn = ref.decode().split(":", 2)
                if kind == "m":
                    in_rooms[RoomId(int(owner))].append(conn)
                else:
                    registered.append((UserId(int(owner)), ConnId(conn)))
        rooms = sorted(in_rooms)

        def remove(pipe: Pipeline) -> None:
            for room in rooms:
                keys = [self._members_key(room), self._joins_key(room)]
                self._script(pipe, "take", keys, in_rooms[room])
            for user, conn in registered:
                pipe.hdel(self._user_key(user), conn)
                pipe.delete(self._conn_key(conn))
            for node, refs in zip(nodes, node_refs, strict=True):
                if refs:
                    # Only what was read: an entry added meanwhile keeps its reference.
                    pipe.srem(self._node_key(node), *refs)
                pipe.scard(self._node_key(node))
            if forget:
                pipe.zrem(self._nodes, *nodes)

        results = await self._run(remove)
        removed: list[tuple[RoomId, int, Member]] = []
        for room, taken in zip(rooms, results, strict=False):
            for i in range(0, len(taken), 2):
                order, member = _member(taken[i], taken[i + 1])
                removed.append((room, order, member))
        removed.sort(key=lambda item: (item[0], item[1]))
        # Each node's SCARD follows its SREM (queued only when it had references).
        emptied, at = [], len(rooms) + 2 * len(registered)
        for node, refs in zip(nodes, node_refs, strict=True):
            at += 1 if refs else 0
            if results[at] == 0:
                emptied.append(node)
            at += 1
        return [(room, member) for room, _, member in removed], emptied
