"""A node: one process's engines, hub and service, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from urllib.parse import urlsplit

from .adapters import REDIS_SCHEMES, open_broker, open_history, open_presence
from .config import Settings
from .core.hub import Hub
from .core.models import NodeId
from .core.service import ChatService
from .metrics import Metrics

log = logging.getLogger(__name__)


def _presence_url(settings: Settings) -> str:
    """Presence lives in the broker where it can (memory, Redis), else in the store, so
    RabbitMQ and NATS clusters share presence through PostgreSQL (or one SQLite file)."""
    if settings.presence_url:
        return settings.presence_url
    if urlsplit(settings.broker_url).scheme in ("memory", *REDIS_SCHEMES):
        return settings.broker_url
    return settings.store_url


class Node:
    """Owns the engines of one roomcast process and the background heartbeat."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = NodeId(settings.node_id or secrets.token_hex(6))
        self.broker = open_broker(settings.broker_url)
        self.history = open_history(settings.store_url)
        self.presence = open_presence(_presence_url(settings))
        self.hub = Hub(self.broker, self.history, unsubscribe_grace=settings.unsubscribe_grace)
        self.service = ChatService(
            node=self.id,
            history=self.history,
            broker=self.broker,
            presence=self.presence,
            hub=self.hub,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            request_rate_limit=settings.request_rate_limit,
            request_rate_burst=settings.request_rate_burst,
            # The in-process broker hands a frame to this node's members during the
            # publish itself: nothing to gain there.
            local_first=urlsplit(settings.broker_url).scheme.lower() != "memory",
            auth=settings.authenticator(),
        )
        self.metrics = Metrics(self)
        self._stopping = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.started = False

    async def start(self) -> None:
        if self.service.auth is not None:
            await self.service.auth.start()  # the identity provider's keys, if any
        await self.history.start()
        await self.presence.start()
        await self.broker.start(
            self.id, self.hub.on_frame, self.service.on_inbox, self._on_reconnect
        )
        hand_batches_to = getattr(self.broker, "hand_batches_to", None)
        if hand_batches_to is not None:
            # Frames that reach the node together (in one process, a stored batch whole;
            # on Redis, what is read off the connection in one go; on NATS, a room's frames
            # queued together) go to the hub together:
            # each room's frames of them go to each member in one write.
            hand_batches_to(self.hub.on_frames)
        await self._drop_previous_run()
        await self.presence.heartbeat(self.id, self.settings.node_ttl)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="roomcast-heartbeat")
        if self.settings.history_max_messages or self.settings.history_max_days:
            self._retention = asyncio.create_task(self._retention_loop(), name="roomcast-retention")
        self.started = True
        log.info("node %s started (broker %s)", self.id, urlsplit(self.settings.broker_url).scheme)

    async def _drop_previous_run(self) -> None:
        """Remove the presence entries a previous run of this node id left (a process that
        died and was started again with the same ``--node-id``, or a worker restarted by
        its supervisor), and announce their leaves. Within ``node_ttl`` of the death the
        old run still counts as alive, and this run's heartbeats would keep it so: its
        members would stay listed for as long as this run lives."""
        removed = await self.presence.drop_node(self.id)
        if removed:
            log.warning(
                "node %s: removed %d memberships left by a previous run", self.id, len(removed)
            )
            await self.service.announce_departed(removed)

    async def _on_reconnect(self) -> None:
        """The broker is back: restore presence it may have lost (entries, and removals a
        failover lost), then deliver from history whatever the local rooms missed
        meanwhile, and the joins and leaves."""
        try:
            lapsed = await self.presence.heartbeat(self.id, self.settings.node_ttl)
            await self.service.restore_presence(announce=lapsed)
            await self.service.redo_removals()
        except Exception:
            log.warning("restoring presence after a reconnect failed", exc_info=True)
        await self.service.resync()

    async def _heartbeat_loop(self) -> None:
        """Heartbeat into the registry and reap dead nodes, until stopped."""
        interval = self.settings.heartbeat_interval
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
                return
            try:
                if await self.presence.heartbeat(self.id, self.settings.node_ttl):
                    # This node was taken for dead (a long pause): write its entries again.
                    log.warning("node %s had lapsed; restoring its presence", self.id)
                    await self.service.restore_presence(announce=True)
                removed = await self.presence.reap()
                if removed:
                    await self.service.announce_departed(removed)
                # Within half an interval: a backlog must not make the node miss a beat.
                await self.service.retry_removals(budget=interval / 2)
            except Exception:
                log.warning("heartbeat failed", exc_info=True)
            try:
                await self.service.beacon()
            except Exception as exc:  # the broker is away: the next beat sends one
                log.debug("beacon failed: %s", exc)

    async def _retention_loop(self) -> None:
        """Retention passes (see :meth:`ChatService.trim_history`) until stopped: the first
        at a random point of the first interval, so that nodes started together do not
        make theirs together, then one every interval."""
        settings = self.settings
        max_age = None if settings.history_max_days is None else settings.history_max_days * 86_400
        wait = settings.history_trim_interval * random.uniform(0.5, 1.0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
                return
            wait = settings.history_trim_interval
            try:
                deleted = await self.service.trim_history(
                    keep=settings.history_max_messages, max_age=max_age, stopping=self._stopping
                )
            except Exception:
                log.warning("retention pass failed; the next one tries again", exc_info=True)
                continue
            if deleted:
                log.info("retention: deleted %d messages", deleted)

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self._stopping.set()
        if self._heartbeat is not None:
            await self._heartbeat
        if self._retention is not None:
            await self._retention  # it ends between two batches
        for conn_id in list(self.service.sessions()):
            await self.service.disconnect(conn_id)
        with contextlib.suppress(Exception):
            await self.presence.drop_node(self.id)
        await self.service.sequencer.close()
        if self.service.auth is not None:
            await self.service.auth.close()
        await self.hub.close()
        await self.broker.close()
        await self.presence.close()
        await self.history.close()
        log.info("node %s stopped", self.id)
