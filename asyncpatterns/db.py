"""Engine, sessions and units of work that are correct on SQLite, PostgreSQL and MySQL/MariaDB.

Use ``make_engine`` once per process (per event loop), ``make_session_maker``
to get sessions from it, and ``run_in_transaction`` for every unit of work
that writes. What goes wrong without these:

* SQLite ignores foreign keys unless every connection turns them on, and its
  driver opens transactions late, which breaks savepoints: we take over BEGIN.
* SQLite has one writer at a time. A transaction that reads first and writes
  later fails with "database is locked" the moment another writer commits in
  between; ``run_in_transaction`` begins with ``BEGIN IMMEDIATE`` instead, so
  a writer waits its turn (readers still never wait for each other).
* A writer that waits for a lock forever takes a pooled connection with it:
  ``make_engine`` sets a lock timeout on every backend (5 s by default).
* A pooled connection the server has closed (restart, ``wait_timeout``) fails
  the next query unless the pool pre-pings it.
* ``expire_on_commit=True`` (SQLAlchemy's default) makes every attribute access
  after ``commit()`` a lazy load, which async sessions cannot do implicitly.

**Whoever begins a transaction ends it.** Every function of the kit that
writes goes through ``run_in_transaction``: it owns its transaction (begins,
commits, retries a deadlock) when the caller has none, and joins the caller's
transaction (no commit, no retry) when the caller began one. It never commits
or throws away work it did not do. Writes sent around the session (through
``session.connection()``) are not seen: begin those transactions yourself.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Column, event, select, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    InstanceState,
    ORMExecuteState,
    Session,
    SessionTransaction,
    make_transient_to_detached,
)
from sqlalchemy.orm.session import SessionTransactionOrigin
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlalchemy.sql.elements import TextClause
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .config import (
    ConfigurationError,
    DatabaseUnavailableError,
    mask_password,
    resolve_url,
)

T = TypeVar("T")

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
    defaults: dict[str, Any] = {} if backend == "sqlite" else dict(SERVER_POOL_DEFAULTS)
    if backend == "sqlite" and resolved.database in (None, "", ":memory:"):
        # Each connection to :memory: is a new, empty database. One connection,
        # handed to one session at a time: the others wait for it (StaticPool
        # would hand the same connection to every session at once).
        defaults = {"poolclass": AsyncAdaptedQueuePool, "pool_size": 1, "max_overflow": 0}
    if not issubclass(options.get("poolclass", QueuePool), QueuePool):
        # NullPool, StaticPool...: no pool to size; keep pre-ping and recycle.
        defaults = {k: v for k, v in defaults.items() if k in _ANY_POOL_OPTIONS}
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


def _lock_timeout_connect_args(backend: str, seconds: float) -> dict[str, Any]:
    if backend == "postgresql":  # asyncpg sends these when it connects
        return {"server_settings": {"lock_timeout": str(int(seconds * 1000))}}
    # aiomysql runs this on every new connection (whole seconds, at least 1)
    return {"init_command": f"SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds))}"}


def _configure_sqlite(engine: AsyncEngine, busy_ms: int, autocommit_engine: bool) -> None:
    """Foreign keys on, a busy timeout, WAL for files, and BEGIN emitted by us."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        if engine.url.database not in (None, "", ":memory:"):
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
        connection.exec_driver_sql(f"BEGIN {mode}".strip())


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


async def create_db_and_tables(engine: AsyncEngine) -> None:
    """Create the tables of every imported SQLModel (``table=True``) that are missing."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)


async def drop_db_and_tables(engine: AsyncEngine) -> None:
    """Drop the tables of every imported SQLModel (``table=True``)."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.drop_all)


# -- Units of work: whoever begins a transaction ends it -----------------------------


class TransactionOwnershipError(RuntimeError):
    """A writer was called on a session holding changes that nobody has committed."""


async def run_in_transaction(
    session: AsyncSession,
    work: Callable[[AsyncSession], Awaitable[T]],
    attempts: int = 5,
    backoff: float = 0.01,
) -> T:
    """Run ``work(session)``, a unit of work that writes, and return its result.

    * The caller began a transaction (``session.begin()``,
      ``session_maker.begin()``, ``session_scope``): ``work`` joins it, in a
      SAVEPOINT, so its failure undoes only its own changes. Nothing is
      committed and nothing is retried: the caller does both.
    * Otherwise this function owns the transaction: it begins one (taking
      SQLite's write lock at once), commits it, and re-runs ``work`` from the
      start after a deadlock or serialization failure, at most ``attempts``
      times. A transaction the session began by itself only to read (a request
      session that ran a query) holds nothing and is ended first.
    * The session holds changes outside a transaction anyone began (objects
      added, changed or flushed): ``TransactionOwnershipError``. Committing
      them here would commit work this function did not do.

    If ``work`` fails, only its own changes are rolled back: objects loaded
    earlier in the session stay loaded (no ``MissingGreenlet`` afterwards).
    """
    transaction = session.sync_session.get_transaction()
    if transaction is not None and transaction.origin is not SessionTransactionOrigin.AUTOBEGIN:
        await lock_for_writing(session)
        return await _in_savepoint(session, work)
    if _has_changes(session):
        raise TransactionOwnershipError(
            "The session holds changes nobody committed (objects added, changed, deleted or "
            "flushed). This function commits its own work and will not commit yours with it: "
            "commit or roll back first, or begin the transaction yourself before making the "
            "changes (async with session.begin(): ...) and this call joins it."
        )
    if transaction is not None:
        await session.commit()  # it only read: nothing to keep, nothing lost
    for attempt in range(1, attempts + 1):
        try:
            return await _own_transaction(session, work)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
        # Exponential waits with jitter, so the transactions that collided do not collide again.
        await asyncio.sleep(backoff * 2**attempt * random.random())
    raise AssertionError("unreachable")


async def _own_transaction(
    session: AsyncSession, work: Callable[[AsyncSession], Awaitable[T]]
) -> T:
    failure: Exception | None = None
    async with session.begin():  # commits at the end, also after a failure undone below
        await lock_for_writing(session)
        try:
            result = await _in_savepoint(session, work)
        except Exception as exc:
            if _transaction_lost(exc):
                raise  # roll back everything (and maybe retry)
            failure = exc  # its savepoint is rolled back; commit the empty rest
        else:
            loaded = _loaded_attributes(result) if session.sync_session.expire_on_commit else []
    if failure is not None:
        raise failure
    if loaded:  # expire_on_commit=True expired what we return: reload it, as the caller had it
        await _reload(session, loaded)
    return result


def _loaded_attributes(result: Any) -> list[tuple[Any, list[str]]]:
    """The ORM objects in ``result`` (one, or a list), each with its loaded attributes."""
    objects = result if isinstance(result, list | tuple) else [result]
    states = [sa_inspect(obj, raiseerr=False) for obj in objects]
    return [
        (
            state.obj(),
            [
                name
                for name in state.mapper.attrs.keys()  # noqa: SIM118
                if name not in state.unloaded
            ],
        )
        for state in states
        if isinstance(state, InstanceState)
    ]


async def _reload(session: AsyncSession, loaded: list[tuple[Any, list[str]]]) -> None:
    if len(loaded) == 1:  # the object, and the related objects it had loaded
        instance, names = loaded[0]
        await session.refresh(instance, names)
        for relationship in sa_inspect(instance).mapper.relationships:
            if relationship.key in names:
                related = getattr(instance, relationship.key)
                for other in related if isinstance(related, list) else [related]:
                    if other is not None:
                        await session.refresh(other)
        return
    # Many rows of one table (a bulk insert): one SELECT per 1,000, not one per row.
    mapper = sa_inspect(loaded[0][0]).mapper
    ids = [sa_inspect(instance).identity[0] for instance, _ in loaded]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        await session.exec(select(mapper).where(mapper.primary_key[0].in_(chunk)))


async def _in_savepoint(session: AsyncSession, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    savepoint = await session.begin_nested()
    try:
        result = await work(session)
    except Exception as exc:
        try:
            await savepoint.rollback()  # expires only what work changed
        except SQLAlchemyError:
            if not _transaction_lost(exc):
                raise
            # The database ended the whole transaction (MySQL, on a deadlock)
            # or the connection is gone: the savepoint went with it.
        raise
    await savepoint.commit()
    return result


def _transaction_lost(exc: BaseException) -> bool:
    """The database ended the whole transaction, or the connection is gone."""
    return is_retryable(exc) or is_connection_lost(exc)


async def lock_for_writing(session: AsyncSession) -> None:
    """Call first in a transaction that will write. On SQLite, start it with
    ``BEGIN IMMEDIATE``: it waits (up to the lock timeout) until it is the only
    writer, so what it reads cannot be overwritten before it writes. Nothing to
    do on PostgreSQL and MySQL (row locks), nor once the transaction has run a
    statement."""
    sync_session = session.sync_session
    if session.get_bind().dialect.name != "sqlite" or _connected(sync_session):
        return
    await session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})


@asynccontextmanager
async def session_scope(
    session_maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work that writes: commit if the block succeeds, roll back if it raises.

    Same as ``async with session_maker.begin() as session``, plus SQLite's
    write lock taken at the start. The kit's functions called inside join
    this transaction instead of committing on their own.
    """
    async with session_maker() as session, session.begin():
        await lock_for_writing(session)
        yield session


def attach_inserted(session: AsyncSession, objects: Sequence[Any]) -> None:
    """Make new objects whose rows a Core INSERT just stored persistent in ``session``.

    Their primary keys must be set. Afterwards they are what a flush leaves:
    ``session.get`` returns them, ``session.add`` does nothing, a change is one
    UPDATE. If the transaction (or savepoint) they were stored in rolls back,
    they leave the session again, as flushed inserts do.
    """
    for obj in objects:
        make_transient_to_detached(obj)
    session.add_all(objects)
    _undo_on_rollback(session, objects, _EXPUNGE)


def changed_behind_the_orm(session: AsyncSession, objects: Sequence[Any]) -> None:
    """Objects ``session`` holds whose rows a Core statement just changed, their new
    values set with ``set_committed_value``.

    If the transaction (or savepoint) that changed the rows rolls back, they are
    expired, as the ORM expires the objects it wrote itself: nothing keeps
    showing values that were never stored.
    """
    _undo_on_rollback(session, objects, _EXPIRE)


def _undo_on_rollback(session: AsyncSession, objects: Sequence[Any], undo: str) -> None:
    sync_session = session.sync_session
    transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
    noted = sync_session.info.setdefault(_ATTACHED, {}).setdefault(transaction, [])
    noted.append((tuple(objects), undo))


# The session-level facts the rule needs, recorded per transaction in session.info.
_CONNECTED, _WROTE = "asyncpatterns.connected", "asyncpatterns.wrote"
_ATTACHED = "asyncpatterns.attached"  # {transaction: [(objects, what a rollback undoes)]}
_EXPUNGE, _EXPIRE = "expunge", "expire"


@event.listens_for(Session, "after_soft_rollback")
def _forget_attached(session: Session, rolled_back: SessionTransaction) -> None:
    # Objects attached in this transaction or one nested in it: their rows are gone.
    # Objects whose rows it changed behind the ORM: what they show was not kept.
    attached = session.info.get(_ATTACHED, {})
    for transaction in list(attached):
        ancestor = transaction
        while ancestor is not None and ancestor is not rolled_back:
            ancestor = ancestor.parent
        if ancestor is rolled_back:
            for objects, undo in attached.pop(transaction):
                for obj in objects:
                    if obj not in session:
                        continue
                    if undo == _EXPUNGE:
                        session.expunge(obj)
                    else:
                        session.expire(obj)


@event.listens_for(Session, "after_commit")
def _keep_attached(session: Session) -> None:
    # A committed savepoint hands its objects to the transaction around it; at
    # the end of the root transaction there is nothing left to undo.
    committed = session.get_nested_transaction() or session.get_transaction()
    attached = session.info.get(_ATTACHED, {})
    if committed in attached:
        objects = attached.pop(committed)
        if committed.parent is not None:
            attached.setdefault(committed.parent, []).extend(objects)


@event.listens_for(Session, "after_begin")
def _remember_connection(session: Session, transaction: SessionTransaction, _conn: Any) -> None:
    session.info[_CONNECTED] = session.get_transaction()


@event.listens_for(Session, "after_flush")
def _remember_flush(session: Session, _flush_context: Any) -> None:
    session.info[_WROTE] = session.get_transaction()


@event.listens_for(Session, "do_orm_execute")
def _remember_write(state: ORMExecuteState) -> None:
    statement = state.statement
    if statement.is_dml or (
        isinstance(statement, TextClause) and statement.text.lstrip()[:6].lower() != "select"
    ):
        state.session.info[_WROTE] = state.session.get_transaction()


def _connected(sync_session: Session) -> bool:
    transaction = sync_session.get_transaction()
    return transaction is not None and sync_session.info.get(_CONNECTED) is transaction


def _has_changes(session: AsyncSession) -> bool:
    sync_session = session.sync_session
    transaction = sync_session.get_transaction()
    if transaction is not None and sync_session.info.get(_WROTE) is transaction:
        return True
    return bool(
        session.new or session.deleted or any(session.is_modified(obj) for obj in session.dirty)
    )


# -- What a database error means, from each backend's own error code -------------------

# PostgreSQL SQLSTATEs, MySQL/MariaDB error numbers, SQLite extended result codes.
RETRYABLE_CODES = {
    "postgresql": {"40001", "40P01"},  # serialization failure, deadlock detected
    "mysql": {1213},  # deadlock found when trying to get lock
    "sqlite": {517},  # SQLITE_BUSY_SNAPSHOT: a writer committed after this transaction read
}
LOCK_TIMEOUT_CODES = {
    "postgresql": {"55P03"},  # lock_not_available (lock_timeout)
    "mysql": {1205},  # lock wait timeout exceeded
    "sqlite": {5, 261, 773},  # SQLITE_BUSY (+ _RECOVERY, _TIMEOUT) after busy_timeout
}
CONNECTION_LOST_CODES = {
    "postgresql": {"08000", "08003", "08006", "57P01", "57P02", "57P03"},  # server shut down
    "mysql": {1053, 2006, 2013},  # server shutdown, gone away, lost connection
    "sqlite": set(),
}
UNIQUE_CODES = {"postgresql": {"23505"}, "mysql": {1062}, "sqlite": {2067, 1555}}
FOREIGN_KEY_CODES = {"postgresql": {"23503"}, "mysql": {1451, 1452}, "sqlite": {787}}


def error_code(exc: BaseException) -> tuple[str, str | int] | None:
    """The backend and its own code for a database error, e.g. ``("postgresql",
    "40P01")``, ``("mysql", 1213)``, ``("sqlite", 517)``; None for other errors.

    Never classify by message text: a message may quote the user's data.
    """
    error = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    if isinstance(error, sqlite3.Error):
        return "sqlite", error.sqlite_errorcode
    module = type(error).__module__
    if module.startswith("pymysql") and error.args and isinstance(error.args[0], int):
        return "mysql", error.args[0]
    if module.startswith("sqlalchemy.dialects.postgresql") and getattr(error, "sqlstate", None):
        return "postgresql", error.sqlstate
    return None


def _is(codes: dict[str, set[Any]], exc: BaseException) -> bool:
    code = error_code(exc)
    return code is not None and code[1] in codes[code[0]]


def is_retryable(exc: BaseException) -> bool:
    """True for errors that mean "run the whole transaction again": a deadlock or a
    serialization failure. A lock timeout is not one: it has already waited."""
    return _is(RETRYABLE_CODES, exc) or _savepoint_gone(exc)


def _savepoint_gone(exc: BaseException) -> bool:
    # MySQL ends the whole transaction on a deadlock. When that happens inside a
    # flush, SQLAlchemy then rolls back to its savepoint, which no longer exists:
    # 1305 "SAVEPOINT ... does not exist" is what reaches us, not the deadlock.
    statement = getattr(exc, "statement", None) or ""
    return error_code(exc) == ("mysql", 1305) and statement.startswith(
        ("ROLLBACK TO SAVEPOINT", "RELEASE SAVEPOINT")
    )


def is_lock_timeout(exc: BaseException) -> bool:
    """True if a statement gave up waiting for a lock (the database is busy)."""
    return _is(LOCK_TIMEOUT_CODES, exc)


def is_connection_lost(exc: BaseException) -> bool:
    """True if the connection died under a statement (a restart, a killed connection)."""
    return (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _is(
        CONNECTION_LOST_CODES, exc
    )


def is_foreign_key_violation(exc: BaseException) -> bool:
    """True if a write pointed at a row that does not exist (or removed one still pointed at)."""
    return _is(FOREIGN_KEY_CODES, exc)


def is_unique_violation(exc: BaseException, column: Column[Any]) -> bool:
    """True if a write failed because another row already has this ``column``'s value.

    Decided by the constraint the database names: PostgreSQL and MySQL name the
    unique index or constraint, SQLite names the columns ("user.email").
    """
    code = error_code(exc)
    if code is None or code[1] not in UNIQUE_CODES[code[0]]:
        return False
    error = exc.orig  # type: ignore[attr-defined]
    table = column.table
    if code[0] == "sqlite":  # "UNIQUE constraint failed: user.email"
        return str(error).rpartition(": ")[2] == f"{table.name}.{column.name}"
    keys = {index.name for index in table.indexes if list(index.columns) == [column]}
    keys |= {c.name for c in table.constraints if list(getattr(c, "columns", [])) == [column]}
    if column.unique:  # the names PostgreSQL and MySQL give an unnamed UNIQUE
        keys |= {f"{table.name}_{column.name}_key", column.name}
    if list(table.primary_key.columns) == [column]:  # ... and an unnamed primary key
        keys |= {f"{table.name}_pkey", "PRIMARY"}
    if code[0] == "postgresql":
        name = getattr(error.__cause__, "constraint_name", None)
    else:  # "Duplicate entry '...' for key 'ix_user_email'" (MySQL 8: 'user.ix_user_email')
        name = str(error.args[1]).rpartition(" for key '")[2].rstrip("'").rpartition(".")[2]
    return name in keys


# -- Scratch databases ------------------------------------------------------------------


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
        folder = None if database in (None, "", ":memory:") else Path(database).parent
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
