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
* A statement that runs away (a missing index, a report over every row) holds
  its connection as long as it runs: ``statement_timeout`` has the database
  stop it (off by default; per block: ``timeouts.statement_timeout``).
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
import json
import re
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
from .pooler import pooler_connect_args, resolve_pooler, set_local_on_begin
from .timeouts import STATEMENT_TIMEOUT, listen_for_statement_timeouts, mysql_set_session

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

# Backends whose statement timeouts timeouts.py's listeners apply, statement by statement.
_LISTENED = ("sqlite", "mysql", "mariadb")

# The options above that every pool class accepts (the others size a QueuePool).
_ANY_POOL_OPTIONS = ("pool_recycle", "pool_pre_ping")

_INSTALL_HINT = 'pip install sqlmodel "sqlalchemy[asyncio]" aiosqlite asyncpg aiomysql'

# Execution option read by the SQLite BEGIN listener: "IMMEDIATE" takes the write lock.
SQLITE_BEGIN = "asyncpatterns_sqlite_begin"


def in_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL: each new connection is a new, empty database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _json_text(value: Any) -> str:
    """JSON as the kit's engines write it: letters as themselves, not ``\\u`` escapes.
    SQLite (3.40) matches a key in a path only as it is written: ``{"\\u00fc": 1}``
    has no ``$."ü"``. A lone surrogate, which has no UTF-8, stays an escape."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def make_engine(
    url: str | URL | None = None,
    *,
    lock_timeout: float | None = LOCK_TIMEOUT,
    statement_timeout: float | None = None,
    pooler: str | None = None,
    **options: Any,
) -> AsyncEngine:
    """Create an async engine with the kit's per-backend defaults.

    ``url`` falls back to ``$DATABASE_URL``, then to an embedded SQLite file.
    ``lock_timeout`` (seconds, ``None`` for the server's own default) bounds
    every wait for a lock: PostgreSQL ``lock_timeout``, MySQL
    ``innodb_lock_wait_timeout``, SQLite ``busy_timeout``.

    ``statement_timeout`` (seconds; ``None``, the default: the server's own,
    usually none) bounds how long each statement runs before the database
    stops it (``errors.is_statement_timeout``; the API answers 503):
    PostgreSQL ``statement_timeout`` and MariaDB ``max_statement_time`` cover
    every statement, MySQL ``max_execution_time`` read-only SELECTs only, and
    on SQLite a timer calls ``interrupt()``. ``timeouts.statement_timeout``
    bounds the statements of one block instead (``timeouts.py`` says more).

    ``pooler="pgbouncer"`` (default: ``$DATABASE_POOLER``) is for PostgreSQL
    behind PgBouncer in transaction mode (``pooler.py``). ``options`` go to
    ``create_async_engine`` and override the defaults.
    """
    if statement_timeout is not None and not statement_timeout > 0:
        raise ValueError(f"statement_timeout must be positive seconds or None: {statement_timeout}")
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
    defaults["json_serializer"] = _json_text
    pooler = resolve_pooler(pooler) if backend == "postgresql" else None
    if pooler is not None and statement_timeout is not None and _autocommit(options):
        raise ConfigurationError(
            "An autocommit engine behind PgBouncer cannot set statement_timeout: no startup "
            "parameters, and SET LOCAL needs a transaction. Set it on the server for the "
            "user instead (ALTER ROLE app SET statement_timeout = '2s')."
        )
    if pooler is not None:
        connect_args = {**pooler_connect_args(resolved), **options.get("connect_args", {})}
        options = {**options, "connect_args": connect_args}
    elif backend != "sqlite":
        connect_args = _timeout_connect_args(resolved, lock_timeout, statement_timeout)
        for key, value in options.get("connect_args", {}).items():
            if isinstance(value, dict) and isinstance(connect_args.get(key), dict):
                value = {**connect_args[key], **value}
            elif key == "options" and isinstance(connect_args.get(key), str):
                value = f"{connect_args[key]} {value}"  # libpq: the later -c wins
            elif key == "init_command" and connect_args.get(key):
                value = f"{connect_args[key]}; {value}"  # aiomysql: ours, then yours
            connect_args[key] = value
        options = {**options, "connect_args": connect_args}
    if backend in _LISTENED:  # read per statement by timeouts.py's listeners
        execution_options = {STATEMENT_TIMEOUT: statement_timeout}
        execution_options.update(options.get("execution_options", {}))
        options = {**options, "execution_options": execution_options}
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
    if backend in _LISTENED:
        listen_for_statement_timeouts(engine)
    # No startup parameters behind PgBouncer: SET LOCAL as each transaction begins (an
    # autocommit engine has no transaction to set them in: the server's own apply).
    if pooler is not None and not _autocommit(options):
        settings = {"lock_timeout": lock_timeout, "statement_timeout": statement_timeout}
        set_local_on_begin(
            engine, {name: f"{_milliseconds(s)}ms" for name, s in settings.items() if s is not None}
        )
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


def _timeout_connect_args(
    url: URL, lock_timeout: float | None, statement_timeout: float | None
) -> dict[str, Any]:
    """The driver's connect arguments that set both timeouts on every new connection."""
    if url.get_backend_name() == "postgresql":
        settings = {"lock_timeout": lock_timeout, "statement_timeout": statement_timeout}
        values = {name: str(_milliseconds(s)) for name, s in settings.items() if s is not None}
        if not values:
            return {}
        if url.get_driver_name() == "psycopg":  # libpq's startup options
            given = url.query.get("options")  # ?options=... in the URL: keep it
            ours = " ".join(f"-c {name}={value}" for name, value in values.items())
            return {"options": ours if not given else f"{ours} {given}"}
        return {"server_settings": values}  # asyncpg sends these when it connects
    # aiomysql runs one init_command on every new connection. MariaDB executes
    # /*M! ... */ and skips /*!50708 ... */ (MySQL 5.7+ code); MySQL the reverse.
    assignments = []
    if lock_timeout is not None:  # whole seconds, at least 1
        assignments.append(f"innodb_lock_wait_timeout = {max(1, round(lock_timeout))}")
    if statement_timeout is not None:
        comma = ", " if assignments else ""
        for marker, mariadb in (("M!", True), ("!50708", False)):
            assignment = mysql_set_session(mariadb, statement_timeout).removeprefix(
                "SET @@session."
            )
            assignments.append(f"/*{marker} {comma}{assignment} */")
    return {"init_command": "SET SESSION " + " ".join(assignments)} if assignments else {}


def _autocommit(options: dict[str, Any]) -> bool:
    return options.get("isolation_level") == "AUTOCOMMIT"


def _milliseconds(seconds: float) -> int:
    """PostgreSQL's unit. 0 means no limit there, so a positive one is at least 1 ms."""
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


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
            # An invalidated connection has no info to read (it would raise, hiding a
            # cancellation): the pool's invalidate event lets the next writer go.
            if not connection.invalidated:
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
    if code is None and url.get_driver_name() == "psycopg":
        code = _libpq_connect_code(str(exc))
    errno = exc.args[0] if url.get_backend_name() == "mysql" and exc.args else None
    if code in ("28P01", "28000") or errno in (1045, 1698):
        return "Check the user name and password in the URL."
    if "unsupported startup parameter" in str(exc):  # PgBouncer's refusal: it has no code
        return "Behind PgBouncer? Use make_engine(url, pooler='pgbouncer') (DATABASE_POOLER)."
    if code == "53300" or errno == 1040:  # too many connections
        return (
            "The server has no connection left (max_connections): give the processes a "
            "shared budget (pooling.pool_settings_for_workers, serve --connection-budget N)."
        )
    if code == "3D000" or errno == 1049:
        return f"Create it first (CREATE DATABASE {url.database}), or name an existing one."
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or ".").parent
        if not folder.exists():
            return f"The folder {folder} does not exist: create it, or use a path in another one."
        return f"Check that {url.database} can be created and written there (permissions)."
    return "Start the server (see the README) or set DATABASE_URL to a reachable database."


def _libpq_connect_code(message: str) -> str | None:
    """psycopg reports a refused connection with libpq's text and no SQLSTATE: the
    server's FATAL line is all there is (it names the database or role, nothing else)."""
    if re.search(r'FATAL: +database ".*" does not exist', message):
        return "3D000"
    # (PgBouncer: an unknown user fails its auth_file check, "trust" or not.)
    if re.search(
        r'FATAL: +(role ".*" does not exist|(password|"trust") authentication failed)', message
    ):
        return "28000"
    if re.search(r"FATAL: +(sorry, too many clients|remaining connection slots)", message):
        return "53300"
    return None


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
