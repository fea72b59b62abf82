"""Engines and sessions that behave the same on SQLite, PostgreSQL and MySQL/MariaDB.

Use ``make_engine`` once per process (per event loop) and ``make_session_maker``
to get sessions from it. What goes wrong with a plain ``create_async_engine``:

* SQLite ignores foreign keys unless every connection turns them on, and its
  driver opens transactions late, which breaks savepoints: here SQLAlchemy
  emits BEGIN itself (``unit_of_work.lock_for_writing`` makes it IMMEDIATE).
* SQLite's busy handler is not a queue: waiting writers poll, and under a
  burst one of them can lose every poll until its ``busy_timeout`` runs out.
  Here the writers of one engine take turns in arrival order, in the event
  loop, before ``BEGIN IMMEDIATE``.
* A writer that waits for a lock forever takes a pooled connection with it:
  a lock timeout is set on every backend (5 s by default).
* When requests outnumber connections, SQLAlchemy's async pool lets a
  newcomer take a returned connection before the task woken for it: a few
  waiters lose every time until ``pool_timeout``. Here the pool serves
  waiters in arrival order (``pool.py``).
* A pooled connection the server has closed (restart, ``wait_timeout``) fails
  the next query unless the pool pre-pings it.
* sqlite3 stores a numpy or pandas scalar (``numpy.int64``, ``numpy.bool_``)
  as a BLOB, silently: the row then matches no foreign key and no ``WHERE``.
  Here they are bound as the Python numbers they are, as asyncpg and aiomysql
  bind them.
* ``expire_on_commit=True`` (SQLAlchemy's default) makes every attribute access
  after ``commit()`` a lazy load, which async sessions cannot do implicitly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import await_only
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from ..config import ConfigurationError, DatabaseUnavailableError, mask_password, resolve_url
from .pool import FairAsyncQueuePool

# Server backends: keep a few connections, test each before use, and replace
# them before MySQL's wait_timeout (8 h by default) or a proxy's idle cut-off.
SERVER_POOL_DEFAULTS: dict[str, Any] = {
    "pool_size": 5,
    "max_overflow": 10,
    "pool_timeout": 30,
    "pool_recycle": 1800,
    "pool_pre_ping": True,
}

# Seconds a statement waits for a row lock (SQLite: for the write lock) before failing.
LOCK_TIMEOUT = 5.0

# The options above that every pool class accepts (the others size a QueuePool).
_ANY_POOL_OPTIONS = ("pool_recycle", "pool_pre_ping")

_INSTALL_HINT = 'pip install sqlmodel "sqlalchemy[asyncio]" aiosqlite asyncpg aiomysql'

# Execution option read by the SQLite BEGIN listener: "IMMEDIATE" takes the write lock.
SQLITE_BEGIN = "asyncpatterns_sqlite_begin"


def in_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL: each new connection is a new, empty database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(
    url: str | URL | None = None, *, lock_timeout: float | None = LOCK_TIMEOUT, **options: Any
) -> AsyncEngine:
    """Create an async engine with the kit's per-backend defaults.

    ``url`` falls back to ``$DATABASE_URL``, then to an embedded SQLite file.
    ``lock_timeout`` (seconds, ``None`` for the server's own default) bounds
    every wait for a lock: PostgreSQL ``lock_timeout``, MySQL
    ``innodb_lock_wait_timeout``, SQLite ``busy_timeout``. ``options`` go to
    ``create_async_engine`` and override the defaults.
    """
    resolved = resolve_url(url)
    backend = resolved.get_backend_name()
    if backend == "mysql" and "charset" not in resolved.query:
        resolved = resolved.update_query_dict({"charset": "utf8mb4"})
    # Every pool hands connections to waiters in arrival order (pool.py). SQLite
    # files keep SQLAlchemy's sizes (5 + 10) and need no pre-ping.
    defaults: dict[str, Any] = {"poolclass": FairAsyncQueuePool}
    if backend != "sqlite":
        defaults.update(SERVER_POOL_DEFAULTS)
    if in_memory_sqlite(resolved):
        # Each connection to :memory: is a new, empty database. One connection,
        # handed to one session at a time: the others wait for it (StaticPool
        # would hand the same connection to every session at once).
        defaults = {"poolclass": FairAsyncQueuePool, "pool_size": 1, "max_overflow": 0}
    if not issubclass(options.get("poolclass", QueuePool), QueuePool):
        # NullPool, StaticPool...: no pool to size; keep pre-ping and recycle.
        defaults = {k: v for k, v in defaults.items() if k in _ANY_POOL_OPTIONS}
    # Bound values (emails, names) never reach a log or an error message: SQLAlchemy
    # prints them with a failed statement and with echo. Pass hide_parameters=False
    # to see them, on data that is not anyone's.
    defaults["hide_parameters"] = True
    if lock_timeout is not None and backend != "sqlite":
        connect_args = _lock_timeout_connect_args(backend, lock_timeout)
        for key, value in options.get("connect_args", {}).items():
            if isinstance(value, dict) and isinstance(connect_args.get(key), dict):
                value = {**connect_args[key], **value}
            connect_args[key] = value
        options = {**options, "connect_args": connect_args}
    try:
        engine = create_async_engine(resolved, **{**defaults, **options})
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"The driver for {mask_password(resolved)} is not installed ({exc}); "
            f"use one of sqlite+aiosqlite, postgresql+asyncpg, mysql+aiomysql "
            f"({_INSTALL_HINT})"
        ) from None
    if backend == "sqlite":
        busy_ms = 0 if lock_timeout is None else int(lock_timeout * 1000)
        _configure_sqlite(engine, busy_ms, options.get("isolation_level") == "AUTOCOMMIT")
    _report_unreachable_server(engine)
    return engine


def make_read_engine(url: str | URL | None = None, **options: Any) -> AsyncEngine:
    """An engine for reads of one statement each: every statement commits on its own.

    A read in a transaction costs three round trips (BEGIN, the SELECT,
    ROLLBACK; on SQLite three hops to the driver's thread); here it costs
    one. What it gives up: two statements in one session do not share a
    snapshot (under PostgreSQL's default READ COMMITTED they never do; under
    MySQL's REPEATABLE READ and on SQLite a transaction would pin one). One
    statement always sees one consistent state. Write, and read several
    things that must agree, with ``make_engine``'s sessions.

    Not for ``:memory:`` SQLite: that would be a second, empty database.
    """
    resolved = resolve_url(url)
    if in_memory_sqlite(resolved):
        raise ConfigurationError("an in-memory SQLite database has one connection: use its engine")
    if resolved.get_backend_name() != "sqlite":
        # No ROLLBACK when a connection goes back to the pool: there is no transaction.
        # (sqlite3 reports autocommit on every connection here, so SQLite keeps it.)
        options = {"skip_autocommit_rollback": True, **options}
    return make_engine(resolved, isolation_level="AUTOCOMMIT", **options)


def _lock_timeout_connect_args(backend: str, seconds: float) -> dict[str, Any]:
    if backend == "postgresql":  # asyncpg sends these when it connects
        return {"server_settings": {"lock_timeout": str(int(seconds * 1000))}}
    # aiomysql runs this on every new connection (whole seconds, at least 1)
    return {"init_command": f"SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds))}"}


def _configure_sqlite(engine: AsyncEngine, busy_ms: int, autocommit_engine: bool) -> None:
    """Foreign keys on, a busy timeout, WAL for files, BEGIN emitted by us, and
    writers that take turns."""
    _bind_numpy_scalars_as_numbers()
    file_database = not in_memory_sqlite(engine.url)
    # :memory: has one connection (pool_size=1): its sessions already take turns.
    writers = _WriterQueue(busy_ms / 1000) if busy_ms and file_database else None

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        if file_database:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # An isolation_level execution option hands BEGIN back to sqlite3 until
        # the connection is returned; take it back for the next checkout.
        if dbapi_connection.isolation_level is not None:
            dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        level = connection.get_execution_options().get("isolation_level")
        if level == "AUTOCOMMIT" or (level is None and autocommit_engine):
            return  # autocommit asked for: every statement commits on its own
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "")
        if mode != "IMMEDIATE" or writers is None:
            connection.exec_driver_sql(f"BEGIN {mode}".strip())
            return
        writers.begin_immediate(connection)

    if writers is not None:
        # Whichever way the transaction or the connection ends, the next writer goes.
        def _transaction_ended(connection: Any) -> None:
            writers.leave(connection.info)

        def _connection_returned(_dbapi_connection: Any, record: Any, *_: Any) -> None:
            writers.leave(None if record is None else record.info)

        for name in ("commit", "rollback"):
            event.listen(engine.sync_engine, name, _transaction_ended)
        for name in ("checkin", "invalidate", "close"):
            event.listen(engine.sync_engine, name, _connection_returned)


class _WriterQueue:
    """SQLite's writers, one at a time, first come first served (per event loop).

    ``busy_timeout`` bounds each writer's wait, as it would without the queue.
    A writer whose turn does not come in time still tries, with SQLite's own
    busy wait turned off: the error it gets (SQLITE_BUSY, a lock timeout)
    is SQLite's, classified and reported like any other.
    """

    _TURN = "asyncpatterns.sqlite_writer_turn"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    def begin_immediate(self, connection: Any) -> None:
        if self._loop is not asyncio.get_running_loop():  # an asyncio.Lock serves one loop
            self._loop, self._lock = asyncio.get_running_loop(), asyncio.Lock()
        lock = self._lock
        if await_only(self._wait_for_turn(lock)):
            connection.info[self._TURN] = lock
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                self.leave(connection.info)
                raise
            return
        connection.exec_driver_sql("PRAGMA busy_timeout=0")
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")

    async def _wait_for_turn(self, lock: asyncio.Lock) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return await lock.acquire()
        except TimeoutError:
            return False

    def leave(self, info: dict[str, Any] | None) -> None:
        lock = None if info is None else info.pop(self._TURN, None)
        if lock is not None:
            lock.release()


def _bind_numpy_scalars_as_numbers() -> None:
    """numpy scalars support the buffer protocol, so sqlite3 binds them as BLOBs.
    Bind them as Python's int, float and bool instead (sqlite3's adapters are
    process-wide; registering them again is harmless). Nothing to do without numpy."""
    if importlib.util.find_spec("numpy") is None:
        return
    import numpy as np

    for scalar in set(np.sctypeDict.values()):
        if issubclass(scalar, np.bool_):
            sqlite3.register_adapter(scalar, bool)
        elif issubclass(scalar, np.integer) and not issubclass(scalar, np.timedelta64):
            sqlite3.register_adapter(scalar, int)
        elif issubclass(scalar, np.floating) and not issubclass(scalar, float):
            sqlite3.register_adapter(scalar, float)


def _report_unreachable_server(engine: AsyncEngine) -> None:
    """Turn a failure to connect into one line: masked URL, reason, what to do."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, TimeoutError, dialect.loaded_dbapi.Error) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DatabaseUnavailableError(
                f"Cannot connect to {mask_password(engine.url)}: {reason}. "
                f"{_what_to_do(engine.url, exc)}"
            ) from exc


def _what_to_do(url: URL, exc: BaseException) -> str:
    """The hint that fits the failure: credentials, database, folder, or server."""
    code = getattr(exc, "sqlstate", None) if url.get_backend_name() == "postgresql" else None
    errno = exc.args[0] if url.get_backend_name() == "mysql" and exc.args else None
    if code in ("28P01", "28000") or errno in (1045, 1698):
        return "Check the user name and password in the URL."
    if code == "3D000" or errno == 1049:
        return f"Create it first (CREATE DATABASE {url.database}), or name an existing one."
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or ".").parent
        if not folder.exists():
            return f"The folder {folder} does not exist: create it, or use a path in another one."
        return f"Check that {url.database} can be created and written there (permissions)."
    return "Start the server (see the README) or set DATABASE_URL to a reachable database."


def make_session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no implicit lazy reload)."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def create_db_and_tables(engine: AsyncEngine, metadata: MetaData | None = None) -> None:
    """Create the missing tables of ``metadata``: by default every imported
    SQLModel with ``table=True`` (``SQLModel.metadata``)."""
    async with engine.begin() as conn:
        await conn.run_sync((SQLModel.metadata if metadata is None else metadata).create_all)


async def drop_db_and_tables(engine: AsyncEngine, metadata: MetaData | None = None) -> None:
    """Drop the tables of ``metadata`` (default: ``SQLModel.metadata``)."""
    async with engine.begin() as conn:
        await conn.run_sync((SQLModel.metadata if metadata is None else metadata).drop_all)


@asynccontextmanager
async def throwaway_database(
    url: str | URL, prefix: str = "asyncpatterns_scratch"
) -> AsyncIterator[URL]:
    """A uniquely named, empty database beside ``url``, dropped afterwards.

    On a server: ``CREATE DATABASE`` on the same server (the user needs that
    privilege). On SQLite: a file in a temporary folder next to ``url``'s file.
    Tests, benchmarks and demos use it so they never touch anyone's data.
    """
    resolved = resolve_url(url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    if resolved.get_backend_name() == "sqlite":
        database = resolved.database
        folder = None if in_memory_sqlite(resolved) else Path(database).parent
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir=folder) as scratch:
            yield resolved.set(database=str(Path(scratch) / f"{name}.db"))
        return
    admin = make_engine(resolved, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            try:
                await conn.execute(text(f"CREATE DATABASE {name}"))
            except DBAPIError as exc:
                raise ConfigurationError(
                    f"Could not create a scratch database on {mask_password(resolved)} "
                    f"({str(exc.orig).splitlines()[0]}); use a user allowed to CREATE DATABASE"
                ) from None
        try:
            yield resolved.set(database=name)
        finally:
            force = " WITH (FORCE)" if resolved.get_backend_name() == "postgresql" else ""
            async with admin.connect() as conn:
                await conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    finally:
        await admin.dispose()
