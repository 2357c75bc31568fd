"""The database shared by the SQL adapters: SQLite or PostgreSQL through SQLAlchemy Core.

Every operation is one synchronous function of a SQLAlchemy ``Connection`` (a transaction
for writes), run by :meth:`Database.run`:

- SQLite (the standard library's driver) runs it whole on one thread of its own: one
  hand-over per operation instead of one per statement, and SQLite's single writer is
  respected without any waiting in SQLite's busy loop. Write transactions take the write
  lock up front with ``BEGIN IMMEDIATE``, so processes sharing the file (``--workers``)
  never have to upgrade a read lock, which SQLite refuses at once. The hottest write,
  appending a batch of messages, goes through :meth:`Database.write_sqlite`: the same
  transaction on a bare sqlite3 connection, without SQLAlchemy — on the event loop's
  thread when the write lock is free at once, else on the store thread.
- PostgreSQL (asyncpg) runs it through ``AsyncConnection.run_sync``: the same code, each
  statement awaited on the event loop. An optional schema isolates a cluster (or a test)
  in one database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateSchema

from ...exceptions import ConfigError, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[sa.Connection], T]

# "roomcast" in ASCII: the key of the advisory lock that serialises start() across processes.
_START_LOCK = 0x726F6F6D63617374

# PostgreSQL error classes that mean "not now" rather than "wrong request": connection
# exceptions, insufficient resources (too many connections, disk full), shutdown and startup.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")

_BUSY_TIMEOUT_MS = 5000

CHECKPOINT_EVERY = 100
"""SQLite: commits between two checkpoints of the write-ahead log. Checkpoints run on a
thread of their own (see :meth:`Database._committed`), so no commit waits for one."""

RESTART_FRAMES = 1000
"""SQLite: pages in the write-ahead log past which the writer starts it over (SQLite's own
threshold for its automatic checkpoint)."""

POOL_SIZE = 6
POOL_OVERFLOW = 4
"""PostgreSQL connections a process keeps, and may add under load (history and presence
share them: see :func:`acquire`)."""

KEPT_DRIVERS = 4
"""PostgreSQL: pooled connections :meth:`Database.run_driver` keeps checked out for its
statements (at most; fewer while calls do not overlap)."""

DRIVER_WAIT = 10.0
"""PostgreSQL: seconds a statement waits for one of the kept connections to come free
(the pool's own checkout timeout) before it fails as ``UNAVAILABLE``."""

# Execution option marking the engine view whose transactions write (SQLite: BEGIN IMMEDIATE).
_WRITE = "roomcast_write"


class Database:
    """One database, reached with :meth:`run`.

    ``url`` is ``sqlite:///PATH``, ``sqlite:///:memory:``, ``postgresql://...`` or
    ``postgres://...``. For PostgreSQL, ``schema`` (or ``?schema=NAME`` in the URL) puts
    every table in that schema, created if missing.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        target, self.schema = _parse_url(url, schema)
        self.postgres = target.get_backend_name() == "postgresql"
        translate = {"schema_translate_map": {None: self.schema}} if self.schema else {}
        self._async: AsyncEngine | None = None
        self._sync: sa.Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._writer: Any = None
        """SQLite: the pooled connection the hot write path keeps checked out."""
        self._idle_drivers: list[tuple[AsyncConnection, Any]] = []
        """PostgreSQL: the pooled connections :meth:`run_driver` keeps checked out and no
        call is using, each with its asyncpg connection."""
        self._kept_drivers = 0
        """PostgreSQL: connections kept for :meth:`run_driver`, idle or in use."""
        self._closing = False
        self._driver_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        """PostgreSQL: calls of :meth:`run_driver` waiting for a kept connection, first
        come, first woken."""
        self._checkpointer: ThreadPoolExecutor | None = None
        """SQLite file: the thread that checkpoints the write-ahead log."""
        self._checkpoint_conn: Any = None
        self._checkpointing: asyncio.Future[None] | None = None
        self._checkpoint_busy = False
        self._commits = 0
        self._restart = False
        """Set by the checkpoint thread: the log has grown past RESTART_FRAMES."""
        self._inline: Any = None
        """SQLite file: the pooled connection write_sqlite and read_sqlite use on the event
        loop's thread."""
        self._sqlite_file = False
        self._sync_commits = False
        if self.postgres:
            try:
                # asyncpg waits 60 s for a silent host by default; fail fast instead. The
                # pool is bounded: past it, operations queue instead of opening connections
                # until the server refuses more.
                engine = create_async_engine(
                    target,
                    connect_args={"timeout": 5},
                    pool_size=POOL_SIZE,
                    max_overflow=POOL_OVERFLOW,
                    pool_timeout=10,
                    # A connection the server ended while it sat in the pool (a restart,
                    # an idle timeout) is replaced on checkout instead of failing a request.
                    pool_pre_ping=True,
                )
            except ImportError as error:
                raise ConfigError(
                    "this store needs an optional dependency: pip install 'roomcast[postgres]' "
                    f"({error})"
                ) from error
            self._async = engine.execution_options(**translate) if translate else engine
        else:
            target, synchronous = _sqlite_synchronous(target)
            memory = target.database in (None, "", ":memory:")
            options: dict[str, Any] = {}
            if memory:
                # One connection, or every connection would open a database of its own.
                options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
            self._sync = sa.create_engine(target, **options)
            _configure_sqlite(self._sync, synchronous)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="roomcast-sqlite")
            self._sqlite_file = not memory
            self._sync_commits = synchronous == "full"
            """Every commit syncs the log to disk: never on the event loop's thread."""
            if not memory:
                self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="roomcast-wal")

    async def run(self, work: Work[T], *, write: bool = False) -> T:
        """Run ``work(connection)``: in one transaction that commits on return when
        ``write`` (rolled back if it raises), else on a connection for reads."""
        try:
            if self._async is not None:
                engine = self._async.execution_options(**{_WRITE: True}) if write else self._async
                if write:
                    async with engine.begin() as conn:
                        return await conn.run_sync(work)
                async with engine.connect() as conn:
                    return await conn.run_sync(work)
            assert self._thread is not None
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._thread, self._run_sqlite, work, write)
            if write:
                self._committed()
            return result
        except Exception as error:
            _raise_if_unreachable(error)
            raise

    async def write_sqlite(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite's hot write path: ``work(connection)`` between ``BEGIN IMMEDIATE`` and
        ``COMMIT`` (rolled back if it raises) on a sqlite3 connection of its own.

        The same transaction as :meth:`run` with ``write=True`` gives, without SQLAlchemy's
        per-transaction bookkeeping (a checkout, a transaction object, events): ~50 µs a
        transaction, which a busy node pays hundreds of times a second.

        It runs on the event loop's own thread when the write lock is free at once — a
        commit in WAL mode writes the log without a sync (``synchronous = NORMAL``, and
        checkpoints run elsewhere), so it costs the loop tens of µs, where handing it to
        the store thread and back cost ~0.4 ms of latency and more CPU in thread switches.
        With ``?synchronous=full`` every commit waits for the disk, so it always runs on the
        store thread.
        When another connection (another process, or the store thread) holds the lock, it
        goes to the store thread, which waits for it without blocking the loop.
        """
        inline = self._inline_writer()
        if inline is not None:
            try:
                inline.execute("BEGIN IMMEDIATE")  # busy_timeout 0: never waits
            except sqlite3.OperationalError:
                pass  # the lock is taken: wait for it on the store thread
            else:
                try:
                    result = work(inline)
                    inline.execute("COMMIT")
                except BaseException as error:
                    if inline.in_transaction:
                        inline.execute("ROLLBACK")
                    if isinstance(error, sqlite3.OperationalError):  # I/O errors, disk full
                        raise UnavailableError(
                            f"the history store cannot be reached: {error}"
                        ) from error
                    raise
                self._committed()
                return result
        assert self._thread is not None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._thread, self._write_sqlite, work)
        except sqlite3.OperationalError as error:  # locked past busy_timeout, I/O errors
            raise UnavailableError(f"the history store cannot be reached: {error}") from error
        self._committed()
        return result

    async def read_sqlite(
        self, work: Callable[[sqlite3.Connection], T], *, inline: bool = True
    ) -> T:
        """SQLite's fast read path: ``work(connection)``, one or more single-statement
        reads, on a sqlite3 connection in autocommit mode.

        On the event loop's own thread for a SQLite file: in WAL mode a read waits for no
        writer, so it costs the loop tens of µs, where the hop to the store thread and
        SQLAlchemy's connection handling cost several times that. Should SQLite answer
        busy all the same (another connection recovering the log), the read runs on the
        store thread, which waits for it. An in-memory database is read on the store
        thread, whose connection it is, and so is a read the caller marks not ``inline``
        (one long enough to hold the loop up: hundreds of rows)."""
        conn = self._inline_connection() if inline else None
        if conn is not None and not conn.in_transaction:
            try:
                return work(conn)
            except sqlite3.OperationalError:
                pass  # busy: read on the store thread, which waits
        return await self.run(lambda conn: work(_driver_connection(conn)))

    def _inline_writer(self) -> sqlite3.Connection | None:
        """The event loop thread's connection for :meth:`write_sqlite` (SQLite files only;
        None while the log waits to be started over, which the store thread does, and when
        every commit syncs the disk)."""
        if self._restart or self._sync_commits:
            return None
        return self._inline_connection()

    def _inline_connection(self) -> sqlite3.Connection | None:
        """The event loop thread's own sqlite3 connection (SQLite files only)."""
        if not self._sqlite_file:
            return None
        if self._inline is None:
            assert self._sync is not None
            self._inline = self._sync.raw_connection()  # set up by the pool, kept
            self._inline.driver_connection.execute("PRAGMA busy_timeout = 0")
        conn: sqlite3.Connection = self._inline.driver_connection
        return conn

    def _committed(self) -> None:
        """Count a commit; every :data:`CHECKPOINT_EVERY`, checkpoint the write-ahead log.

        SQLite's own automatic checkpoint runs inside the commit that crosses its threshold
        (1000 pages, every second or two on a busy node): that commit, and every message
        of its batch, waits for the log to be copied into the database and both files to be
        synced — 5 ms and more. Automatic checkpoints are off on roomcast's connections
        (see ``_configure_sqlite``); this thread does a PASSIVE one instead, which never
        blocks a writer, so a commit only ever writes its own pages.
        """
        if self._checkpointer is None:
            return
        self._commits += 1
        if self._commits < CHECKPOINT_EVERY or self._checkpoint_busy:
            return
        self._commits = 0
        # Cleared by the checkpoint thread itself: appends that never yield to the loop
        # (each one inline) must not starve the next checkpoint of a loop callback.
        self._checkpoint_busy = True
        loop = asyncio.get_running_loop()
        self._checkpointing = loop.run_in_executor(self._checkpointer, self._checkpoint)

    def _checkpoint(self) -> None:
        assert self._sync is not None
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = self._sync.raw_connection()  # kept, like the writer's
            conn = self._checkpoint_conn.driver_connection
            _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # The writer starts the log over only when its transaction begins with every
            # frame copied; under steady load it has always written more by the time this
            # is done. Past a size, the store thread makes a last small checkpoint itself
            # first (see _restart_log).
            if frames >= RESTART_FRAMES:
                self._restart = True
        except Exception as error:  # the next one tries again; the log only grows meanwhile
            log.warning("checkpoint of the SQLite write-ahead log failed: %s", error)
        finally:
            self._checkpoint_busy = False

    def _close_checkpointer(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()  # back to the pool, from the thread that used it
            self._checkpoint_conn = None

    async def run_driver(self, work: Callable[[Any], Awaitable[T]], *, wait: bool = True) -> T:
        """PostgreSQL: ``await work(connection)`` on an asyncpg connection, for a statement
        that is its own transaction — no ``BEGIN`` or ``COMMIT`` round trips.

        The connection it runs on stays checked out of the pool between calls: a call costs
        its statement's one round trip, where a checkout costs two more (SQLAlchemy's ping
        before it, its ``ROLLBACK`` after) and ~0.1 ms of the event loop's time. Up to
        :data:`KEPT_DRIVERS` calls run at once; a call beyond them waits for one to finish
        (first come, first served; :data:`DRIVER_WAIT` at most) — or, if not ``wait``, as
        the hot write path asks so it never queues behind reads, checks a connection out of
        the pool for its own use.
        """
        kept = await self._take_driver(wait)
        if kept is None:
            return await self._run_driver_pooled(work)
        try:
            result = await work(kept[1])
        except Exception as error:
            if _driver_unreachable(error):
                await self._drop_driver(kept)
                raise UnavailableError(f"the history store cannot be reached: {error}") from error
            await self._keep_driver(kept)  # the statement failed, not the connection
            raise
        except BaseException:
            # Cancelled mid-statement: asyncpg has asked the server to cancel it, and the
            # connection is not known to be idle; closed rather than handed to another call.
            await asyncio.shield(self._drop_driver(kept))
            raise
        await self._keep_driver(kept)
        return result

    async def _keep_driver(self, kept: tuple[AsyncConnection, Any]) -> None:
        """A call is done with a kept connection: idle for the next, or closed if the
        store is closing."""
        if self._closing:
            await self._drop_driver(kept)
        else:
            self._idle_drivers.append(kept)
            self._wake_driver_waiter()

    def _wake_driver_waiter(self) -> None:
        """A kept connection came free (or its place did): wake the longest waiting call."""
        while self._driver_waiters:
            waiter = self._driver_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _take_driver(self, wait: bool) -> tuple[AsyncConnection, Any] | None:
        """An idle kept connection that is still open, or a newly kept one if fewer than
        :data:`KEPT_DRIVERS` are; else, if ``wait``, the first of them to come free, and
        None if not."""
        deadline: float | None = None
        woken = False
        while True:
            while self._idle_drivers:
                kept = self._idle_drivers.pop()
                if not kept[1].is_closed():
                    return kept
                await self._drop_driver(kept)  # the server ended it while it was idle
            if self._kept_drivers < KEPT_DRIVERS:
                return await self._open_driver()
            if not wait:
                return None
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + DRIVER_WAIT
            waiter: asyncio.Future[None] = loop.create_future()
            if woken:  # and beaten to it by a call that had not waited: keep its place
                self._driver_waiters.appendleft(waiter)
            else:
                self._driver_waiters.append(waiter)
            woken = False
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
                woken = True
            except TimeoutError:
                raise UnavailableError(
                    f"no connection to the history store came free in {DRIVER_WAIT:g} s"
                ) from None
            finally:
                if not woken:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_driver_waiter()  # woken as it gave up: pass it on
                    else:
                        waiter.cancel()

    async def _open_driver(self) -> tuple[AsyncConnection, Any]:
        """Check a connection out of the pool to keep (the pool pings it first)."""
        assert self._async is not None
        self._kept_drivers += 1
        try:
            conn = await self._async.connect()
        except BaseException as error:
            self._kept_drivers -= 1
            if isinstance(error, Exception):
                _raise_if_unreachable(error)
            raise
        try:
            raw = await conn.get_raw_connection()
        except BaseException as error:
            self._kept_drivers -= 1
            with contextlib.suppress(Exception):
                await conn.close()
            if isinstance(error, Exception):
                _raise_if_unreachable(error)
            raise
        return (conn, raw.driver_connection)

    async def _drop_driver(self, kept: tuple[AsyncConnection, Any]) -> None:
        """Stop keeping a connection: invalidated, so the pool never hands it out again."""
        self._kept_drivers -= 1
        self._wake_driver_waiter()  # its place is free
        conn = kept[0]
        with contextlib.suppress(Exception):  # it is broken already
            await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()

    async def _run_driver_pooled(self, work: Callable[[Any], Awaitable[T]]) -> T:
        assert self._async is not None
        try:
            async with self._async.connect() as conn:
                raw = await conn.get_raw_connection()
                try:
                    return await work(raw.driver_connection)
                except Exception as error:
                    if _driver_unreachable(error):
                        raw.invalidate(error)  # not handed out again
                        raise UnavailableError(
                            f"the history store cannot be reached: {error}"
                        ) from error
                    raise
        except UnavailableError:
            raise
        except Exception as error:  # checking a connection out failed
            _raise_if_unreachable(error)
            raise

    def qualified(self, table: str) -> str:
        """``table``'s name in SQL text, in the store's schema if it has one."""
        quote = postgresql.dialect().identifier_preparer.quote  # type: ignore[no-untyped-call]
        return f"{quote(self.schema)}.{quote(table)}" if self.schema else quote(table)

    def driver_sql(self, template: str, **tables: str) -> str:
        """``template`` as this store's driver takes it: each ``{name}`` the table given
        for it (in the store's schema on PostgreSQL), and on SQLite each ``$1``, ``$2``,
        ... parameter ``?`` (so each is used once, in order)."""
        if self.postgres:
            return template.format(**{key: self.qualified(t) for key, t in tables.items()})
        return re.sub(r"\$\d+", "?", template.format(**tables))

    async def fetch(self, sql: str, *args: Any, inline: bool = True) -> list[Any]:
        """The rows of one read statement (SQL from :meth:`driver_sql`): on PostgreSQL one
        round trip, on SQLite :meth:`read_sqlite` (``inline`` as there)."""
        if self.postgres:
            rows: list[Any] = await self.run_driver(lambda conn: conn.fetch(sql, *args))
            return rows
        return await self.read_sqlite(
            lambda conn: conn.execute(sql, args).fetchall(), inline=inline
        )

    async def execute(self, sql: str, *args: Any) -> list[Any]:
        """One write statement (SQL from :meth:`driver_sql`), its own transaction, and the
        rows it returns: on PostgreSQL one round trip, on SQLite :meth:`write_sqlite`."""
        if self.postgres:
            rows: list[Any] = await self.run_driver(lambda conn: conn.fetch(sql, *args))
            return rows
        # fetchall: a statement must be done before the COMMIT.
        return await self.write_sqlite(lambda conn: conn.execute(sql, args).fetchall())

    def _write_sqlite(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._thread_writer()
        self._restart_log(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _thread_writer(self) -> sqlite3.Connection:
        """The store thread's own connection for writes, checked out once and kept: the pool
        set it up (pragmas, no implicit transactions)."""
        assert self._sync is not None
        if self._writer is None:
            self._writer = self._sync.raw_connection()
        conn: sqlite3.Connection = self._writer.driver_connection
        return conn

    def _restart_log(self, conn: sqlite3.Connection) -> None:
        """On the store thread, before a write transaction, if the checkpoint thread asked:
        copy what was written since its last pass (a few pages and a sync, ~1 ms), so that
        the transaction starts the write-ahead log over."""
        if self._restart:
            self._restart = False
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _dispose_sqlite(self) -> None:
        assert self._sync is not None
        if self._writer is not None:
            self._writer.close()  # back to the pool, on the thread it belongs to
            self._writer = None
        self._sync.dispose()

    def _run_sqlite(self, work: Work[T], write: bool) -> T:
        assert self._sync is not None
        if write:
            if self._restart:
                self._restart_log(self._thread_writer())
            with self._sync.execution_options(**{_WRITE: True}).begin() as conn:
                return work(conn)
        with self._sync.connect() as conn:
            return work(conn)

    async def create(self, metadata: sa.MetaData) -> None:
        """Create the schema and the tables if missing; safe when many processes start at
        once."""
        if self._sync is not None and self._sqlite_file:
            await self._use_wal()

        def create(conn: sa.Connection) -> None:
            if self.postgres:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_START_LOCK)))
                if self.schema is not None:
                    conn.execute(CreateSchema(self.schema, if_not_exists=True))
            metadata.create_all(conn)
            self._add_new_columns(conn, metadata)

        await self.run(create, write=True)

    def _add_new_columns(self, conn: sa.Connection, metadata: sa.MetaData) -> None:
        """Add the columns and indexes a later roomcast gave its tables to tables an
        earlier one made, the columns empty: a store is used on by the upgraded nodes with
        all it holds. Such a column is always one that may be empty (nullable, no key)."""
        inspector = sa.inspect(conn)
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name, schema=self.schema)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable or column.primary_key:  # pragma: no cover - a bug
                    raise RuntimeError(f"{table.name}.{column.name} cannot be added to data")
                name = conn.dialect.identifier_preparer.quote(column.name)
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(
                    sa.text(f"ALTER TABLE {self.qualified(table.name)} ADD COLUMN {name} {kind}")
                )
                log.info("added the column %s.%s to the store", table.name, column.name)
            for index in table.indexes:
                index.create(conn, checkfirst=True)  # made with the table, or added now

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._async is not None:
            self._closing = True  # kept connections still in use close when their call ends
            idle, self._idle_drivers = self._idle_drivers, []
            for conn, _driver in idle:
                self._kept_drivers -= 1
                with contextlib.suppress(Exception):  # closing anyway
                    await conn.close()
            await self._async.dispose()
        if self._thread is not None:
            assert self._sync is not None
            loop = asyncio.get_running_loop()
            if self._inline is not None:
                # busy_timeout 0 would go back to the pool with it: closed instead.
                self._inline.invalidate()
                self._inline = None
            if self._checkpointer is not None:
                if self._checkpointing is not None:
                    await asyncio.wait([self._checkpointing])
                await loop.run_in_executor(self._checkpointer, self._close_checkpointer)
                self._checkpointer.shutdown(wait=True)
            # The last connection to close checkpoints the whole log and removes it.
            await loop.run_in_executor(self._thread, self._dispose_sqlite)
            self._thread.shutdown(wait=True)

    async def _use_wal(self) -> None:
        """Switch the SQLite file to write-ahead logging: readers no longer wait for writers.

        The mode is stored in the file, so once is enough. The switch needs an exclusive
        lock, which SQLite refuses at once (no busy wait) while another connection writes,
        as a process starting next to this one may: retry for as long as ``busy_timeout``.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000

        def wal(conn: sa.Connection) -> None:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")

        while True:
            try:
                await self.run(wal)
                return
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    def insert_or_ignore(self, table: sa.Table, key: str) -> Any:
        """``INSERT`` that silently does nothing when a row with the same ``key`` exists."""
        if self.postgres:
            return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])

    def upsert(self, table: sa.Table, keys: list[str], **values: Any) -> Any:
        """``INSERT`` that updates the non-key columns when the row exists."""
        dialect = postgresql if self.postgres else sqlite
        insert = dialect.insert(table).values(**values)
        changed = {k: v for k, v in values.items() if k not in keys}
        return insert.on_conflict_do_update(index_elements=keys, set_=changed)


_shared: dict[tuple[str, str | None], tuple[Database, int]] = {}


def acquire(url: str, *, schema: str | None = None) -> Database:
    """The process's Database for ``url``: the store's history and presence share one
    connection pool (and, for SQLite, one thread)."""
    key = (url, schema)
    db, users = _shared.get(key, (None, 0))
    if db is None:
        db = Database(url, schema=schema)
    _shared[key] = (db, users + 1)
    return db


async def release(db: Database) -> None:
    """Give back a Database from :func:`acquire`; the last user closes it."""
    for key, (shared, users) in list(_shared.items()):
        if shared is db:
            if users > 1:
                _shared[key] = (shared, users - 1)
                return
            del _shared[key]
            break
    await db.close()


def _parse_url(url: str, schema: str | None) -> tuple[URL, str | None]:
    """The URL for the async driver, and the PostgreSQL schema to use (if any)."""
    try:
        target = make_url(url)
    except sa_exc.ArgumentError as error:
        raise ConfigError(f"not a database URL: {url!r}") from error
    backend, _, driver = target.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite", "aiosqlite"):
        if schema is not None or "schema" in target.query:
            raise ConfigError("a schema can only be chosen for PostgreSQL")
        return target.set(drivername="sqlite+pysqlite"), None
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        in_url = target.query.get("schema")
        if in_url is not None and not isinstance(in_url, str):
            raise ConfigError(f"the URL names more than one schema: {in_url!r}")
        if schema is not None and in_url is not None and schema != in_url:
            raise ConfigError(f"schema {schema!r} contradicts the URL's schema {in_url!r}")
        target = target.difference_update_query(["schema"])
        return target.set(drivername="postgresql+asyncpg"), schema or in_url or None
    raise ConfigError(
        f"unsupported store URL {target.drivername}:// "
        "(expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB)"
    )


SQLITE_SYNCHRONOUS = ("normal", "full")
"""``?synchronous=`` of a SQLite URL. ``normal`` (the default): in WAL mode a commit
survives a crash of any roomcast process, and only a power cut or an operating-system
crash can lose the last commits; ``full``: a commit also survives those, for an fsync of
the log per commit."""


def _sqlite_synchronous(target: URL) -> tuple[URL, str]:
    """The URL without roomcast's ``synchronous`` parameter (the driver knows none such),
    and the mode it names."""
    mode = target.query.get("synchronous", "normal")
    if not isinstance(mode, str) or mode.lower() not in SQLITE_SYNCHRONOUS:
        raise ConfigError(
            f"invalid SQLite synchronous {mode!r}: one of {', '.join(SQLITE_SYNCHRONOUS)}"
        )
    return target.difference_update_query(["synchronous"]), mode.lower()


def _driver_connection(conn: sa.Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


def _configure_sqlite(engine: sa.Engine, synchronous: str = "normal") -> None:
    """Set each new SQLite connection up for several writers and take over ``BEGIN``."""
    pragma = f"PRAGMA synchronous = {synchronous.upper()}"

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Left to itself the driver opens a DEFERRED transaction only before DML; roomcast
        # emits its own BEGIN (below) so a write transaction holds the write lock from its
        # first statement and never has to upgrade a read lock, which SQLite refuses at once.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Wait for another process's write transaction instead of failing at once.
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # In WAL mode NORMAL survives a process crash; only a power cut can lose the last
        # commits, and it saves an fsync per commit (see SQLITE_SYNCHRONOUS).
        cursor.execute(pragma)
        cursor.execute("PRAGMA foreign_keys = ON")
        # Checkpoints of the write-ahead log run on a thread of their own (Database._committed).
        cursor.execute("PRAGMA wal_autocheckpoint = 0")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        # Reads are single statements, each its own implicit transaction: no BEGIN needed.
        if conn.get_execution_options().get(_WRITE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _driver_unreachable(error: Exception) -> bool:
    """Whether an error raised by asyncpg itself means the database cannot be reached."""
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    module = type(error).__module__ or ""
    return module.startswith("asyncpg") or isinstance(error, OSError | TimeoutError)


def _raise_if_unreachable(error: Exception) -> None:
    """Raise :class:`UnavailableError` when ``error`` means the database cannot be reached."""
    if isinstance(error, sa_exc.DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None) or ""
        unreachable = (
            error.connection_invalidated
            or isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
            or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
        )
    else:
        unreachable = isinstance(error, OSError | TimeoutError | sa_exc.DisconnectionError)
    if unreachable:
        raise UnavailableError(f"the history store cannot be reached: {error}") from error
