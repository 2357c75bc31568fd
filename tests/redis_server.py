"""A private ``redis-server`` on a free port, for tests that kill and restart Redis
without disturbing anything else."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis as syncredis
import redis.asyncio as redis

from tests.ports import free_port

WAIT = 15.0

_S = TypeVar("_S", bound="_Servers")


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


class RedisServer:
    """A throw-away ``redis-server`` that keeps nothing on disk."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        with (self.directory / "redis.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited:\n{self.log()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if await client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), WAIT)

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")


@contextlib.asynccontextmanager
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A running private Redis; skipped without redis-server (failed under CI=true)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (needed to restart Redis under the broker)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    srv = RedisServer(binary, tmp_path)
    try:
        await srv.start()
        yield srv
    finally:
        await srv.kill()


class _Servers:
    """Private redis-server processes (and Sentinels) by port."""

    def __init__(self) -> None:
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        raise NotImplementedError

    def _wait(
        self,
        port: int,
        condition: Callable[[syncredis.Redis], bool],
        what: str,
        password: str | None = None,
    ) -> None:
        client = syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=1, password=password)
        deadline = time.monotonic() + WAIT
        try:
            while True:
                with contextlib.suppress(syncredis.ConnectionError, syncredis.TimeoutError):
                    if condition(client):
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port}: no {what} within {WAIT}s")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self, port: int) -> None:
        """SIGKILL one server, as in a crash."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(WAIT)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)


class RedisClusterServers(_Servers):
    """A throw-away Redis Cluster on free ports: ``primaries`` shards, each with ``replicas``
    replicas, keeping nothing on disk but the cluster's own node files."""

    def __init__(
        self, directory: Path, *, primaries: int = 3, replicas: int = 0, node_timeout: int = 1000
    ) -> None:
        self.directory = directory
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout = node_timeout
        super().__init__()
        self.ports = [free_port() for _ in range(primaries * (1 + replicas))]
        self.bus_ports = {port: free_port() for port in self.ports}
        """Each node's cluster bus port, given: Redis's default (port + 10000) can be
        past 65535 for a free port."""

    @property
    def url(self) -> str:
        """The URL roomcast takes: any one node's address, ``cluster=true``."""
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def start(self) -> None:
        binary, cli = _redis_binaries()
        for port in self.ports:
            self._launch(binary, port)
        for port in self.ports:
            self._wait(port, lambda client: bool(client.ping()), "PING")
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout.decode()}")
        for port in self.ports:
            self._wait(port, _cluster_ready(len(self.ports)), "cluster_state:ok")

    def _launch(self, binary: str, port: int) -> None:
        with (self.directory / f"redis-{port}.log").open("ab") as log:
            self.processes[port] = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--repl-diskless-sync-delay", "0", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-port", str(self.bus_ports[port]),
                 "--cluster-node-timeout", str(self.node_timeout)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def primary_of(self, key: bytes) -> int:
        """The port of the primary that owns ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key)
        for port in self.processes:
            client = syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
            except syncredis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError(f"no live node knows the owner of slot {slot}")

    def move_slot(self, key: bytes, to_port: int) -> None:
        """Move the (empty) slot of ``key`` to the primary on ``to_port``, as a resharding
        does, telling every primary."""
        from redis.crc import key_slot

        slot, from_port = key_slot(key), self.primary_of(key)
        clients = {
            port: syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=WAIT)
            for port in self.processes
        }
        try:
            ids = {
                port: c.execute_command("CLUSTER", "MYID").decode() for port, c in clients.items()
            }
            clients[to_port].execute_command(
                "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[from_port]
            )
            clients[from_port].execute_command(
                "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to_port]
            )
            for port in (to_port, from_port, *clients):
                clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])
        finally:
            for c in clients.values():
                c.close()

    def replicated(self) -> None:
        """Wait until every primary's replicas have what it has written so far."""
        for port in self.processes:
            client = syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=WAIT)
            try:
                if client.info("replication")["role"] == "master":
                    client.execute_command("WAIT", self.replicas, int(WAIT * 1000))
            finally:
                client.close()


def _cluster_ready(nodes: int) -> Callable[[syncredis.Redis], bool]:
    def ready(client: syncredis.Redis) -> bool:
        info = client.execute_command("CLUSTER", "INFO").decode()
        known = client.execute_command("CLUSTER", "NODES").decode().strip().splitlines()
        replication = client.info("replication")
        # A replica that has never synced with its primary would not take over from it.
        synced = replication["role"] == "master" or replication["master_link_status"] == "up"
        return "cluster_state:ok" in info and len(known) == nodes and synced

    return ready


def _redis_binaries() -> tuple[str, str]:
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        reason = "redis-server and redis-cli are needed to start a Redis Cluster"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary, cli


_shared: dict[str, Any] = {}


def _shared_servers(kind: str, make: Callable[[Path], _S]) -> _S:
    """One set of servers of a kind for the whole test run (tests keep apart by their
    prefixes), started on first use and killed when the run ends."""
    servers: _S | None = _shared.get(kind)
    if servers is None:
        directory = Path(tempfile.mkdtemp(prefix=f"roomcast-{kind}-"))
        servers = make(directory)
        atexit.register(servers.stop)
        atexit.register(shutil.rmtree, directory, True)
        servers.start()
        _shared[kind] = servers
    return servers


def shared_redis_cluster() -> RedisClusterServers:
    """A Redis Cluster of three primaries shared by the test run."""
    return _shared_servers("redis-cluster", RedisClusterServers)


class RedisSentinelServers(_Servers):
    """A throw-away primary with one replica, watched by one Redis Sentinel (quorum 1) that
    fails over a second after the primary stops answering."""

    SERVICE = "roomcast"

    def __init__(self, directory: Path, *, sentinel_password: str | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.sentinel_password = sentinel_password
        self.primary_port, self.replica_port, self.sentinel_port = (free_port() for _ in "prs")

    @property
    def url(self) -> str:
        """The URL roomcast takes: the Sentinel's address and the service's name."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def start(self) -> None:
        binary, _ = _redis_binaries()
        self._launch(binary, self.primary_port)
        self._launch(binary, self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        self._wait(self.replica_port, _synced, "a replica in sync")
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
            + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else "")
        )
        with (self.directory / "sentinel.log").open("ab") as log:
            self.processes[self.sentinel_port] = subprocess.Popen(
                [binary, str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        service = self.SERVICE

        def watching(client: syncredis.Redis) -> bool:
            return bool(client.execute_command("SENTINEL", "REPLICAS", service))

        self._wait(
            self.sentinel_port, watching, "the Sentinel knowing the replica", self.sentinel_password
        )

    def _launch(self, binary: str, port: int, *extra: str) -> None:
        with (self.directory / f"redis-{port}.log").open("ab") as log:
            self.processes[port] = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory),
                 "--repl-diskless-sync-delay", "0", *extra],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def primary(self) -> int:
        """The port of the primary the Sentinel names now."""
        client = syncredis.Redis(
            host="127.0.0.1",
            port=self.sentinel_port,
            socket_timeout=1,
            password=self.sentinel_password,
        )
        try:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
            )
            return int(port)
        finally:
            client.close()

    def replicated(self) -> None:
        """Wait until the replica has what the primary has written so far."""
        client = syncredis.Redis(host="127.0.0.1", port=self.primary(), socket_timeout=WAIT)
        try:
            client.execute_command("WAIT", 1, int(WAIT * 1000))
        finally:
            client.close()


def _synced(client: syncredis.Redis) -> bool:
    return bool(client.info("replication").get("master_link_status") == "up")


def shared_redis_sentinel() -> RedisSentinelServers:
    """A primary, replica and Sentinel shared by the test run."""
    return _shared_servers("redis-sentinel", RedisSentinelServers)
