"""The load generator: lean Socket.IO clients over raw Engine.IO frames on WebSocket.

Each generator process runs many clients on uvloop with picows (a C WebSocket
implementation). A client speaks just enough Engine.IO v4 / Socket.IO v5 to chat:

    ws://127.0.0.1:PORT/PATH/?EIO=4&transport=websocket     (no polling first)
    <- 0{"sid":...,"pingInterval":...}                       Engine.IO open
    -> 40{"name":"u17"}                                      Socket.IO connect with auth
    <- 40{"sid":...}                                         connected
    -> 421["join",{"room":"r3"}]           <- 431[{"ok":true,...}]
    -> 422["send",{"room":"r3","text":"7 123456789"}]       (ack 432[...] counted)
    <- 42["message",{...,"text":"7 123456789",...}]          to every member, sender included
    <- 2  -> 3                                               Engine.IO ping / pong

A message text is ``"<tag> <send time, monotonic ns>"``: receivers count deliveries of the
current measurement tag and record ``receive time - send time``. ``CLOCK_MONOTONIC`` is one
clock for every process on the machine, so a message sent by one generator process and
received by another is timed correctly.

The parent drives its generator processes through :class:`GeneratorPool` (blocking calls
with bounded waits); each process serves commands from a pipe, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from picows import WSListener, WSMsgType

from .histogram import histogram, merge

_TEXT = WSMsgType.TEXT

SEND_ORDER_SEED = 20261204
"""Seeds the order in which a generator process's clients take turns sending."""

Command = dict[str, Any]
Reply = dict[str, Any]


@dataclass
class Counters:
    """What one generator process observed, reset for every measurement."""

    tag: int = 0
    received: int = 0
    """Deliveries of messages of the current tag."""
    latencies: list[int] = field(default_factory=list)
    stray: int = 0
    """``message`` events of another tag (warm-up, an earlier step)."""
    frames: int = 0
    """Every frame received but pings, for telling when a server has gone quiet."""
    acks_ok: int = 0
    acks_error: int = 0
    error_sample: str = ""
    malformed: int = 0
    disconnects: int = 0
    sends_total: int = 0
    """Every ``send`` emitted, and every ack to one received (outstanding = the difference)."""
    acks_total: int = 0


class Client(WSListener):
    """One Socket.IO connection; picows calls its ``on_ws_*`` methods."""

    __slots__ = (
        "connected",
        "counters",
        "index",
        "name",
        "next_id",
        "pending",
        "rooms",
        "transport",
        "url",
    )

    def __init__(
        self, index: int, name: str, url: str, rooms: list[str], counters: Counters
    ) -> None:
        self.index = index
        self.name = name
        self.url = url
        self.rooms = rooms
        self.counters = counters
        self.transport: Any = None
        self.connected: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.next_id = 0

    # -- picows callbacks ----------------------------------------------------------------

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        data: bytes = frame.get_payload_as_bytes()
        c = self.counters
        if data == b"2":  # Engine.IO ping (not counted: the server's clock, not its backlog)
            transport.send(_TEXT, b"3")
            return
        c.frames += 1
        if data.startswith(b'42["message"'):
            now = time.monotonic_ns()
            try:
                i = data.index(b'"text":"', 14) + 8
                j = data.index(b" ", i)
                tag = int(data[i:j])
                sent = int(data[j + 1 : data.index(b'"', j)])
            except ValueError:
                c.malformed += 1
                return
            if tag == c.tag:
                c.received += 1
                c.latencies.append(now - sent)
            else:
                c.stray += 1
        elif data.startswith(b"43"):
            self._on_ack(data)
        elif data.startswith(b"0{"):
            transport.send(_TEXT, b'40{"name":"%s"}' % self.name.encode())
        elif data.startswith(b"40"):
            if not self.connected.done():
                self.connected.set_result("")
        elif data.startswith(b"44"):
            if not self.connected.done():
                self.connected.set_result(data.decode(errors="replace")[:200])
        elif data.startswith(b"41"):
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.counters.disconnects += 1
        if not self.connected.done():
            self.connected.set_result("disconnected during the handshake")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected"))
        self.pending.clear()

    # -- requests ------------------------------------------------------------------------

    def _on_ack(self, data: bytes) -> None:
        k = data.find(b"[", 2)
        try:
            ack = int(data[2:k])
        except ValueError:
            self.counters.malformed += 1
            return
        future = self.pending.pop(ack, None)
        if future is not None:
            if not future.done():
                future.set_result(data)
        elif b'"ok":true' in data[: k + 12]:
            self.counters.acks_total += 1
            self.counters.acks_ok += 1
        else:
            self.counters.acks_total += 1
            self.counters.acks_error += 1
            if not self.counters.error_sample:
                self.counters.error_sample = data[:300].decode(errors="replace")

    async def call(self, event: str, payload: bytes, timeout: float) -> bytes:
        """Emit an event with an ack id and wait (bounded) for the ack."""
        self.next_id += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        self.transport.send(_TEXT, b'42%d["%s",%s]' % (self.next_id, event.encode(), payload))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(self.next_id, None)

    def send_message(self, room: bytes, tag: int) -> None:
        """Emit ``send`` with an ack id; the ack is only counted."""
        self.next_id += 1
        self.counters.sends_total += 1
        self.transport.send(
            _TEXT,
            b'42%d["send",{"room":"%s","text":"%d %d"}]'
            % (self.next_id, room, tag, time.monotonic_ns()),
        )


class Worker:
    """One generator process: its clients, and the commands the parent sends."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.clients: list[Client] = []

    async def _open(
        self, index: int, name: str, url: str, rooms: list[str], timeout: float
    ) -> Client:
        """One connection: WebSocket, Socket.IO connect with auth, then ``join`` each room."""
        from picows import ws_connect

        made: list[Client] = []

        def factory() -> Client:
            made.append(Client(index, name, url, rooms, self.counters))
            return made[0]

        try:
            await asyncio.wait_for(ws_connect(factory, url, enable_auto_pong=True), timeout)
            client = made[0]
            refused = await asyncio.wait_for(client.connected, timeout)
            if refused:
                raise ConnectionError(f"connect refused: {refused}")
            for room in rooms:
                ack = await client.call("join", b'{"room":"%s"}' % room.encode(), timeout)
                if b'"ok":true' not in ack[:40]:
                    raise ConnectionError(f"join refused: {ack[:200]!r}")
            return client
        except BaseException:
            if made and made[0].transport is not None:
                made[0].transport.disconnect()
            raise

    async def _open_all(
        self, specs: list[tuple[int, str, str, list[str]]], cmd: Command
    ) -> tuple[list[Client], Counter[str]]:
        timeout = float(cmd.get("timeout", 20.0))
        gate = asyncio.Semaphore(int(cmd.get("concurrency", 64)))
        opened: list[Client] = []
        errors: Counter[str] = Counter()

        async def open_one(index: int, name: str, url: str, rooms: list[str]) -> None:
            async with gate:
                try:
                    opened.append(await self._open(index, name, url, rooms, timeout))
                except Exception as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

        await _bounded([open_one(*spec) for spec in specs], float(cmd.get("deadline", 120)), errors)
        return opened, errors

    async def connect(self, cmd: Command) -> Reply:
        """Open the connections and join the rooms, ``concurrency`` at a time."""
        started = time.monotonic()
        opened, errors = await self._open_all([tuple(spec) for spec in cmd["clients"]], cmd)
        self.clients = sorted(self.clients + opened, key=lambda c: c.index)
        return {
            "connected": len(opened),
            "rooms": dict(Counter(room for c in opened for room in c.rooms)),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(3)),
            "seconds": time.monotonic() - started,
        }

    async def heal(self, cmd: Command) -> Reply:
        """Reconnect (and rejoin) every client the server has disconnected, as a Socket.IO
        client would; returns how many there were."""
        started = time.monotonic()
        gone = [c for c in self.clients if c.transport is None or c.transport.is_disconnected]
        if not gone:
            return {"dropped": 0, "reconnected": 0, "failed": 0, "errors": {}, "seconds": 0.0}
        self.clients = [c for c in self.clients if c not in gone]
        specs = [(c.index, c.name, c.url, c.rooms) for c in gone]
        opened, errors = await self._open_all(specs, cmd)
        self.clients = sorted(self.clients + opened, key=lambda c: c.index)
        return {
            "dropped": len(gone),
            "reconnected": len(opened),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(3)),
            "seconds": time.monotonic() - started,
        }

    async def join(self, cmd: Command) -> Reply:
        """Every client joins one more room (``room``), ``concurrency`` at a time."""
        room: str = cmd["room"]
        gate = asyncio.Semaphore(int(cmd.get("concurrency", 32)))
        timeout = float(cmd.get("timeout", 30.0))
        failed: Counter[str] = Counter()
        started = time.monotonic()

        async def join_one(client: Client) -> None:
            async with gate:
                try:
                    ack = await client.call("join", b'{"room":"%s"}' % room.encode(), timeout)
                    if b'"ok":true' not in ack[:40]:
                        raise ConnectionError(f"join refused: {ack[:200]!r}")
                    client.rooms = [room]
                except Exception as exc:
                    failed[f"{type(exc).__name__}: {exc}"[:200]] += 1

        await _bounded([join_one(c) for c in self.clients], float(cmd.get("deadline", 120)), failed)
        return {
            "joined": len(self.clients) - sum(failed.values()),
            "failed": sum(failed.values()),
            "errors": dict(failed.most_common(3)),
            "seconds": time.monotonic() - started,
        }

    async def load(self, cmd: Command) -> Reply:
        """Send at a fixed rate for ``warmup + measure`` seconds, then drain.

        Messages sent during the measurement window carry ``tag``; every process counts the
        deliveries of that tag it receives. Returns counts, the latency histogram and this
        process's CPU time during the window.
        """
        rate = float(cmd["rate"])
        warmup, measure = float(cmd["warmup"]), float(cmd["measure"])
        drain, tag = float(cmd["drain"]), int(cmd["tag"])
        sizes: dict[str, int] = cmd["room_sizes"]
        # Every sender sends to this room, when given; else to its own first room.
        target: str | None = cmd.get("room")
        c = self.counters
        c.tag, c.received, c.latencies, c.stray = tag, 0, [], 0
        c.acks_ok = c.acks_error = c.malformed = 0
        c.error_sample = ""
        disconnects = c.disconnects
        senders = [cl for cl in self.clients if cl.rooms and not cl.transport.is_disconnected]
        # Senders take turns in a fixed random order: in the order of the plan, a room's
        # members are neighbours, and each tick's burst would go to a handful of rooms —
        # a pattern that favours any server that writes a room's messages together.
        random.Random(SEND_ORDER_SEED).shuffle(senders)
        sent_per_room: Counter[str] = Counter()
        room_of = {cl.index: target or cl.rooms[0] for cl in senders}
        rooms_b = {index: room.encode() for index, room in room_of.items()}
        start = time.monotonic()
        window_start, window_end = start + warmup, start + warmup + measure
        cpu0 = cpu1 = (0.0, 0.0)
        sent = sent_window = 0
        turn = 0
        in_window = False
        while senders and rate > 0:
            now = time.monotonic()
            if now >= window_end:
                break
            if not in_window and now >= window_start:
                in_window, cpu0 = True, _cpu()
            due = int(rate * (now - start)) - sent
            for _ in range(min(due, 10_000)):
                client = senders[turn % len(senders)]
                turn += 1
                if in_window:
                    client.send_message(rooms_b[client.index], tag)
                    sent_per_room[room_of[client.index]] += 1
                    sent_window += 1
                else:
                    client.send_message(rooms_b[client.index], 0)
                sent += 1
            await asyncio.sleep(0.004)
        if not senders or rate <= 0:  # receive only (another process sends)
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            cpu0 = _cpu()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        cpu1 = _cpu()
        # Drain: wait for late deliveries of this tag until none came for a while.
        deadline = time.monotonic() + drain
        last, last_change = c.received, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_change < 0.3:
            await asyncio.sleep(0.05)
            if c.received != last:
                last, last_change = c.received, time.monotonic()
        c.tag = -1  # anything later is stray
        counts = histogram(c.latencies)
        expected = sum(n * sizes.get(room, 0) for room, n in sent_per_room.items())
        return {
            "sent": sent_window,
            "expected": expected,
            "received": c.received,
            "histogram": dict(counts),
            "acks_ok": c.acks_ok,
            "acks_error": c.acks_error,
            "error_sample": c.error_sample,
            "stray": c.stray,
            "malformed": c.malformed,
            "disconnects": c.disconnects - disconnects,
            "cpu_user": cpu1[0] - cpu0[0],
            "cpu_sys": cpu1[1] - cpu0[1],
            "window": measure,
        }

    async def count(self, cmd: Command) -> Reply:
        """How many clients are connected now."""
        live = sum(1 for c in self.clients if c.transport and not c.transport.is_disconnected)
        return {"live": live, "clients": len(self.clients)}

    async def quiet(self, cmd: Command) -> Reply:
        """Wait (bounded by ``limit``) until every ``send`` is acked and no frame has arrived
        for ``idle`` seconds: the server has worked off its backlog."""
        idle, limit = float(cmd.get("idle", 0.5)), float(cmd.get("limit", 10.0))
        c = self.counters
        started = time.monotonic()
        last, last_change = c.frames, started
        while time.monotonic() - started < limit:
            await asyncio.sleep(0.05)
            if c.frames != last:
                last, last_change = c.frames, time.monotonic()
            elif c.acks_total >= c.sends_total and time.monotonic() - last_change >= idle:
                break
        return {
            "quiet": c.acks_total >= c.sends_total and time.monotonic() - last_change >= idle,
            "unacked": c.sends_total - c.acks_total,
            "seconds": time.monotonic() - started,
        }

    async def close(self, cmd: Command) -> Reply:
        """Close every connection and wait (bounded) until they are gone."""
        clients, self.clients = self.clients, []
        for client in clients:
            if client.transport is not None and not client.transport.is_disconnected:
                client.transport.send_close()
                client.transport.disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.transport.wait_disconnected() for c in clients if c.transport)),
                float(cmd.get("timeout", 10.0)),
            )
        self.counters.sends_total = self.counters.acks_total = 0
        return {"closed": len(clients)}


async def _bounded(work: list[Any], deadline: float, errors: Counter[str]) -> None:
    """Run the coroutines; those not done within ``deadline`` seconds are cancelled and
    counted in ``errors``."""
    tasks = [asyncio.ensure_future(w) for w in work]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
        errors[f"not done within {deadline:.0f} s"] += len(pending)


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    worker = Worker()
    handlers = {
        "connect": worker.connect,
        "heal": worker.heal,
        "count": worker.count,
        "join": worker.join,
        "load": worker.load,
        "quiet": worker.quiet,
        "close": worker.close,
    }
    loop = asyncio.get_running_loop()
    while True:
        # A blocking read in a thread: the pipe stays blocking, so a large command
        # arriving in pieces is read whole.
        cmd: Command = await loop.run_in_executor(None, conn.recv)
        if cmd["cmd"] == "exit":
            conn.send({"ok": True})
            return
        try:
            reply = await handlers[cmd["cmd"]](cmd)
            conn.send({"ok": True, **reply})
        except Exception as exc:  # reported to the parent, which decides
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _process_main(conn: multiprocessing.connection.Connection) -> None:
    import uvloop

    raise_fd_limit()
    uvloop.run(_serve(conn))


def _cpu() -> tuple[float, float]:
    """This process's user and system CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class GeneratorError(RuntimeError):
    """A generator process failed or did not answer in time."""


class GeneratorPool:
    """The parent's handle on its generator processes."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(child,), name=f"bench-gen-{i}")
            proc.daemon = True
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._pipes)

    def start(self, commands: list[Command]) -> None:
        """Send one command to each process (``commands[i]`` to process ``i``)."""
        for pipe, cmd in zip(self._pipes, commands, strict=True):
            pipe.send(cmd)

    def collect(self, timeout: float) -> list[Reply]:
        """Each process's reply to the last command; waits at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        replies = []
        for i, pipe in enumerate(self._pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise GeneratorError(f"generator {i} did not answer within {timeout:.0f} s")
            reply = pipe.recv()
            if not reply.get("ok"):
                raise GeneratorError(f"generator {i}: {reply.get('error')}")
            replies.append(reply)
        return replies

    def call(self, commands: list[Command], timeout: float) -> list[Reply]:
        self.start(commands)
        return self.collect(timeout)

    def broadcast(self, cmd: Command, timeout: float) -> list[Reply]:
        return self.call([cmd] * self.size, timeout)

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send({"cmd": "exit"})
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_histograms(replies: list[Reply]) -> Counter[int]:
    """One latency histogram (see :mod:`bench.histogram`) from every process's reply."""
    return merge(reply["histogram"] for reply in replies)
