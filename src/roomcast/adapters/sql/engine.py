"""The database connection shared by the SQL adapters: SQLite (aiosqlite) or PostgreSQL
(asyncpg) through SQLAlchemy Core, with the transaction discipline both need.

SQLite has one writer per database: write transactions take the write lock up front with
``BEGIN IMMEDIATE`` and, within a process, are handed out in turn by an
:class:`asyncio.Lock` rather than by SQLite's busy-wait polling. PostgreSQL arbitrates
itself (row locks); an optional schema isolates a cluster (or a test) in one database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateSchema

from ...exceptions import ConfigError, UnavailableError

# "roomcast" in ASCII: the key of the advisory lock that serialises start() across processes.
_START_LOCK = 0x726F6F6D63617374

# PostgreSQL error classes that mean "not now" rather than "wrong request": connection
# exceptions, insufficient resources (too many connections, disk full), shutdown and startup.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")

_BUSY_TIMEOUT_MS = 5000

# Execution option marking the engine view whose transactions write (SQLite: BEGIN IMMEDIATE).
_WRITE = "roomcast_write"


class Database:
    """One SQLAlchemy async engine, with write and read helpers.

    ``url`` is ``sqlite:///PATH``, ``sqlite:///:memory:``, ``postgresql://...`` or
    ``postgres://...``. For PostgreSQL, ``schema`` (or ``?schema=NAME`` in the URL) puts
    every table in that schema, created if missing.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        target, self.schema = _parse_url(url, schema)
        self.postgres = target.get_backend_name() == "postgresql"
        memory = not self.postgres and target.database in (None, "", ":memory:")
        options: dict[str, Any] = {}
        if self.postgres:
            # asyncpg waits 60 s for a silent host by default; fail fast and report it instead.
            options["connect_args"] = {"timeout": 5}
        try:
            self._pool_owner = create_async_engine(target, **options)
        except ImportError as error:
            raise ConfigError(
                f"this store needs an optional dependency: pip install 'roomcast[postgres]' "
                f"({error})"
            ) from error
        engine = self._pool_owner
        if self.schema is not None:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        self._engine: AsyncEngine = engine
        self._writer: AsyncEngine = engine.execution_options(**{_WRITE: True})
        # SQLite has one writer per database: queueing writers here is fairer and faster than
        # SQLite's busy-wait. A :memory: database is one shared connection, so reads queue too.
        self._write_lock = None if self.postgres else asyncio.Lock()
        self._read_lock = self._write_lock if memory else None
        self._sqlite_file = not self.postgres and not memory
        if not self.postgres:
            _configure_sqlite(self._pool_owner)

    async def create(self, metadata: sa.MetaData) -> None:
        """Create the schema and the tables if missing; safe when many processes start at
        once."""
        if self._sqlite_file:
            await self._use_wal()
        async with self.write() as conn:
            if self.postgres:
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_START_LOCK)))
                if self.schema is not None:
                    await conn.execute(CreateSchema(self.schema, if_not_exists=True))
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._pool_owner.dispose()

    async def _use_wal(self) -> None:
        """Switch the SQLite file to write-ahead logging: readers no longer wait for writers.

        The mode is stored in the file, so once is enough. The switch needs an exclusive
        lock, which SQLite refuses at once (no busy wait) while another connection writes,
        as a process starting next to this one may: retry for as long as ``busy_timeout``.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                async with self.read() as conn:
                    await conn.exec_driver_sql("PRAGMA journal_mode = WAL")
                return
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on exit (rolls back on error)."""
        async with _held(self._write_lock):
            try:
                async with self._writer.begin() as conn:
                    yield conn
            except Exception as error:
                _raise_if_unreachable(error)
                raise

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for single-statement reads."""
        async with _held(self._read_lock):
            try:
                async with self._engine.connect() as conn:
                    yield conn
            except Exception as error:
                _raise_if_unreachable(error)
                raise

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


def _parse_url(url: str, schema: str | None) -> tuple[URL, str | None]:
    """The URL for the async driver, and the PostgreSQL schema to use (if any)."""
    try:
        target = make_url(url)
    except sa_exc.ArgumentError as error:
        raise ConfigError(f"not a database URL: {url!r}") from error
    backend, _, driver = target.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        if schema is not None or "schema" in target.query:
            raise ConfigError("a schema can only be chosen for PostgreSQL")
        return target.set(drivername="sqlite+aiosqlite"), None
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


def _configure_sqlite(engine: AsyncEngine) -> None:
    """Set each new SQLite connection up for several writers and take over ``BEGIN``."""

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Left to itself the driver opens a DEFERRED transaction only before DML; roomcast
        # emits its own BEGIN (below) so a write transaction holds the write lock from its
        # first statement and never has to upgrade a read lock, which SQLite refuses at once.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Wait for another process's write transaction instead of failing at once.
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # In WAL mode NORMAL survives a process crash; only a power cut can lose the last
        # commits, and it saves an fsync per commit.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        # Reads are single statements, each its own implicit transaction: no BEGIN needed.
        if conn.get_execution_options().get(_WRITE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _held(lock: asyncio.Lock | None) -> AbstractAsyncContextManager[Any]:
    """The lock, or nothing to wait for where the database itself arbitrates."""
    return nullcontext() if lock is None else lock


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
