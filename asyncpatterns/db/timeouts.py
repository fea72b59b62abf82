"""Statement timeouts: how long one statement may run, per engine and per block.

``make_engine(url, statement_timeout=2.0)`` bounds every statement of the engine;
``async with statement_timeout(session, 30): ...`` bounds each statement the
session runs in the block (a report allowed longer, a request that must answer
fast). A statement past its time is stopped *by the database* and fails with an
error ``errors.is_statement_timeout`` recognises (the API answers 503). The
connection stays healthy and goes back to the pool; the transaction must be
rolled back by whoever began it. What each backend covers:

* PostgreSQL ``statement_timeout``: every statement, timed by the server. For
  an engine it is set when connecting (asyncpg ``server_settings``, psycopg
  ``options="-c statement_timeout=..."``); for a block with ``SET LOCAL``
  (``set_config(..., true)``), which ends with its transaction. Behind
  PgBouncer in transaction mode connect-time settings are refused (1.18:
  "unsupported startup parameter"): ``make_engine(pooler="pgbouncer")`` sets
  them with ``SET LOCAL`` as each transaction begins, and blocks work as they
  are; an autocommit engine there has only the server's ``ALTER ROLE ... SET
  statement_timeout``. The failed statement aborts its transaction (57014).
* MariaDB ``max_statement_time``: every statement, except those inside stored
  programs (error 1969). The statement is undone; the transaction is not.
* MySQL ``max_execution_time``: only read-only top-level ``SELECT`` statements
  (error 3024); writes and DDL run unbounded. Same code path, with MySQL's
  variable and unit (milliseconds); CI runs MariaDB, so MySQL is untested.
* SQLite has no such setting. The kit starts a timer on the event loop for each
  statement and, when it fires, calls ``sqlite3``'s ``interrupt()`` (safe from
  another thread): the statement fails with "interrupted". An interrupted
  write rolls back its whole transaction; then, as on PostgreSQL, the rest of
  it fails with the same error until it is rolled back. It bounds the
  ``execute`` (rows included), not the later fetches of a ``stream()``; a
  Python function called by the statement delays it until it returns.

What goes wrong without it:

* A runaway statement (a missing index, a report over every row) holds its
  pooled connection, and its request, for as long as it runs. A few of them
  and the pool is empty: every request waits, then gets a 503.
* ``asyncio.timeout`` around the query ends the wait, not the statement: the
  cancelled connection is thrown away (SQLAlchemy cannot know its state), and
  the database may go on running it.
* A plain ``SET statement_timeout`` stays on the pooled connection after the
  request: the next user of that connection inherits it (behind PgBouncer,
  another client does). Here a block's setting ends with the block.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from .errors import error_code

# Execution option read by the SQLite and MySQL listeners: seconds, 0 for no limit,
# None for the server's own. make_engine puts the engine's value there.
STATEMENT_TIMEOUT = "asyncpatterns_statement_timeout"

# session.info: the innermost block's seconds; (connection, transaction, PostgreSQL's
# value before the first SET LOCAL in it). Connection info: the value the MySQL session
# has; SQLite's (statement, timer, in a transaction) running.
_LIMIT, _BOUND = "asyncpatterns.statement_timeout", "asyncpatterns.statement_timeout_bound"
_SESSION_VALUE, _RUNNING = "asyncpatterns.statement_time", "asyncpatterns.statement_running"


def statement_timeout(
    target: AsyncSession | AsyncConnection, seconds: float | None
) -> AbstractAsyncContextManager[None]:
    """Bound each statement ``target`` runs inside the block to ``seconds`` (``None``: no limit).

    A session: every statement it runs in the block, in its current transaction
    and in any it begins there. A connection: the statements of its current
    transaction (on PostgreSQL the ``SET LOCAL`` begins one if none is open, as
    any statement would). Blocks nest; leaving one (even by an error) brings
    back the outer limit. Nothing is committed or rolled back here.

    PostgreSQL needs a transaction: ``SET LOCAL`` does not outlive one, and a
    session-wide ``SET`` would leak to the pool's next user (behind PgBouncer,
    to another client). On an autocommit connection (``make_read_engine``) it
    raises ``ValueError``: use a transaction, or give that engine its own
    ``statement_timeout``. SQLite and MySQL need an engine from ``make_engine``.
    A session bound to several engines (``binds=``) that already holds two
    connections gets the limit on one only (the one it began last): give each
    engine's work a session, and a block, of its own.
    """
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be positive, or None for no limit: {seconds!r}")
    limit = 0.0 if seconds is None else float(seconds)
    if isinstance(target, AsyncSession):
        return _in_session(target, limit)
    return _on_connection(target, limit)


@asynccontextmanager
async def _in_session(session: AsyncSession, limit: float) -> AsyncIterator[None]:
    info = session.sync_session.info
    outer = info.get(_LIMIT)
    info[_LIMIT] = limit  # the transactions the session begins in the block (_on_begin)
    try:
        await session.run_sync(_apply_to_bound, limit)
        yield
    except BaseException:
        _set(info, outer)
        await _quietly(session.run_sync(_restore_bound, outer))
        raise
    _set(info, outer)
    await session.run_sync(_restore_bound, outer)


def _set(info: dict[Any, Any], limit: float | None) -> None:
    if limit is None:
        info.pop(_LIMIT, None)
    else:
        info[_LIMIT] = limit


@asynccontextmanager
async def _on_connection(connection: AsyncConnection, limit: float) -> AsyncIterator[None]:
    sync = connection.sync_connection or (await connection.start()).sync_connection
    assert sync is not None
    if sync.dialect.name != "postgresql":
        previous = _option(sync)
        sync.execution_options(**{STATEMENT_TIMEOUT: limit})
        try:
            yield
        finally:
            if not sync.closed:
                sync.execution_options(**{STATEMENT_TIMEOUT: previous})
        return
    previous = await connection.run_sync(_pg_set_local, str(_pg_milliseconds(limit)))
    try:
        yield
    except BaseException:
        if _open(sync):
            await _quietly(connection.run_sync(_pg_restore, previous))
        raise
    if _open(sync):  # else the transaction ended in the block, and its SET LOCAL with it
        await connection.run_sync(_pg_restore, previous)


async def _quietly(restoring: Any) -> None:
    # Leaving by an error: on PostgreSQL the transaction may be aborted, and its
    # rollback undoes the SET LOCAL anyway. The caller's error is the one to see.
    with suppress(Exception):
        await restoring


def _open(connection: Connection) -> bool:
    return not connection.closed and not connection.invalidated and connection.in_transaction()


def _bound(session: Session) -> tuple[Connection, Any, str | None] | None:
    """The session's connection, if its current transaction has one (never connects)."""
    bound = session.info.get(_BOUND)
    if bound is None or bound[1] is not session.get_transaction() or not _open(bound[0]):
        return None
    return bound


def _apply_to_bound(session: Session, limit: float) -> None:
    bound = _bound(session)
    if bound is not None:
        previous = _apply(bound[0], limit)
        if bound[2] is None:  # the first SET in this transaction: remember what it replaced
            session.info[_BOUND] = (bound[0], bound[1], previous)


def _restore_bound(session: Session, outer: float | None) -> None:
    bound = _bound(session)
    if bound is None:
        return
    connection, _, baseline = bound
    if connection.dialect.name != "postgresql":
        default = connection.engine.get_execution_options().get(STATEMENT_TIMEOUT)
        connection.execution_options(**{STATEMENT_TIMEOUT: default if outer is None else outer})
    elif outer is not None:
        _pg_restore(connection, str(_pg_milliseconds(outer)))
    elif baseline is not None:
        _pg_restore(connection, baseline)


@event.listens_for(Session, "after_begin")
def _on_begin(session: Session, transaction: Any, connection: Connection) -> None:
    if transaction.nested:  # a SAVEPOINT: the root transaction's SET LOCAL covers it
        return
    limit = session.info.get(_LIMIT)
    baseline = None if limit is None else _apply(connection, limit)
    session.info[_BOUND] = (connection, session.get_transaction(), baseline)


def _apply(connection: Connection, limit: float) -> str | None:
    """Set the limit for ``connection``'s next statements; PostgreSQL: return the one replaced."""
    if connection.dialect.name == "postgresql":
        return _pg_set_local(connection, str(_pg_milliseconds(limit)))
    _option(connection)
    connection.execution_options(**{STATEMENT_TIMEOUT: limit})
    return None


def _option(connection: Connection) -> Any:
    options = connection.get_execution_options()
    if STATEMENT_TIMEOUT not in options:
        raise ValueError(
            f"statement_timeout() on {connection.dialect.name} needs an engine from "
            "make_engine, whose listeners apply it"
        )
    return options[STATEMENT_TIMEOUT]


# -- PostgreSQL: SET LOCAL, which ends with the transaction ----------------------------------

# The CTE is read before set_config runs: the value it returns is the one replaced.
_PG_SET_LOCAL = text(
    "WITH previous AS MATERIALIZED (SELECT current_setting('statement_timeout') AS value) "
    "SELECT value, set_config('statement_timeout', :value, true) FROM previous"
)


def _pg_set_local(connection: Connection, value: str) -> str:
    if connection.connection.dbapi_connection.autocommit:
        raise ValueError(
            "statement_timeout() on an autocommit PostgreSQL connection: SET LOCAL would end "
            "with the statement, and a session-wide SET would stay on the pooled connection. "
            "Run the block in a transaction, or give this engine its own statement_timeout."
        )
    return connection.execute(_PG_SET_LOCAL, {"value": value}).one()[0]


def _pg_restore(connection: Connection, value: str) -> None:
    try:
        _pg_set_local(connection, value)
    except DBAPIError as exc:
        # A statement failed in the block and aborted the transaction (the timeout,
        # say): nothing runs in it any more, and its rollback ends the SET LOCAL.
        if error_code(exc) != ("postgresql", "25P02"):  # in_failed_sql_transaction
            raise


def _pg_milliseconds(seconds: float) -> int:
    """PostgreSQL's unit; 0 means no limit, so a positive limit is at least 1 ms."""
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


# -- MySQL / MariaDB and SQLite: listeners that read the execution option -------------------


def listen_for_statement_timeouts(engine: AsyncEngine) -> None:
    """Apply ``STATEMENT_TIMEOUT`` to each statement of a SQLite or MySQL engine.

    ``make_engine`` calls it. MySQL/MariaDB: the session variable is set before
    a statement that needs another value than the connection has (a block's,
    then the engine's again): no pooled connection keeps a block's limit.
    SQLite: a timer per statement interrupts it.
    """
    sync_engine = engine.sync_engine
    if sync_engine.dialect.name == "sqlite":
        _listen_sqlite(sync_engine)
    elif sync_engine.dialect.name in ("mysql", "mariadb"):
        default = sync_engine.get_execution_options().get(STATEMENT_TIMEOUT)

        @event.listens_for(sync_engine, "before_cursor_execute")
        def _set_mysql_session(
            conn: Connection, _cursor: Any, _sql: Any, _params: Any, context: Any, _many: Any
        ) -> None:
            wanted = context.execution_options.get(STATEMENT_TIMEOUT)
            if conn.info.get(_SESSION_VALUE, default) == wanted:
                return  # a new connection has the engine's value (make_engine's init_command)
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(mysql_set_session(conn.dialect.is_mariadb, wanted))
            finally:
                cursor.close()
            conn.info[_SESSION_VALUE] = wanted


def mysql_set_session(mariadb: bool, seconds: float | None) -> str:
    """MariaDB counts seconds (any statement); MySQL milliseconds (read-only SELECTs)."""
    if mariadb:
        # microseconds; a positive limit at least one (0.000000 would mean no limit)
        value = "DEFAULT" if seconds is None else f"{seconds and max(seconds, 1e-6):.6f}"
        return f"SET @@session.max_statement_time = {value}"
    value = "DEFAULT" if seconds is None else str(_pg_milliseconds(seconds))
    return f"SET @@session.max_execution_time = {value}"


# -- SQLite: a timer per statement calls interrupt() -------------------------------------

_ENDED = "asyncpatterns.sqlite_transaction_ended"  # connection info: the interrupt that ended it


def _listen_sqlite(sync_engine: Any) -> None:
    event.listen(sync_engine, "before_cursor_execute", _start_sqlite_timer)
    event.listen(sync_engine, "after_cursor_execute", lambda conn, *_: _stop(conn.info))
    event.listen(sync_engine, "handle_error", _on_sqlite_error)
    event.listen(sync_engine, "commit", _refuse_to_commit_an_ended_transaction)
    event.listen(sync_engine, "rollback", _forget_the_end)
    event.listen(sync_engine, "checkin", _forget)


def _start_sqlite_timer(
    conn: Connection, _cursor: Any, _sql: Any, _params: Any, context: Any, _many: Any
) -> None:
    info = conn.info
    if info.get(_ENDED) is not None:
        raise info[_ENDED]
    _stop(info)  # a statement cancelled mid-way left its timer
    seconds = context.execution_options.get(STATEMENT_TIMEOUT)
    if seconds:
        driver = conn.connection.driver_connection  # aiosqlite.Connection
        timer = asyncio.get_running_loop().call_later(seconds, _interrupt, info, context, driver)
        info[_RUNNING] = (context, timer, driver.in_transaction)


def _on_sqlite_error(exception_context: Any) -> None:
    conn = exception_context.connection
    if conn is None or conn.closed or conn.invalidated:
        return
    if isinstance(exception_context.original_exception, asyncio.CancelledError):
        # The caller gave up, not the statement: it still runs in aiosqlite's thread,
        # and closing the connection waits for it. Let the timer stop it in time.
        return
    running = conn.info.get(_RUNNING)
    _stop(conn.info)
    code = getattr(exception_context.original_exception, "sqlite_errorcode", None)
    if (
        code == sqlite3.SQLITE_INTERRUPT
        and running is not None
        and running[0] is exception_context.execution_context
        and running[2]  # it ran in a transaction ...
        and not conn.connection.driver_connection.in_transaction  # ... that SQLite ended
    ):
        # An interrupted write rolls back SQLite's whole transaction, savepoints
        # too. As in PostgreSQL's aborted transaction, every statement (a ROLLBACK
        # TO SAVEPOINT too: not "no such savepoint") and the commit now fail with
        # this error until the transaction is rolled back: nothing half-done commits.
        conn.info[_ENDED] = exception_context.sqlalchemy_exception


def _forget_the_end(conn: Connection) -> None:
    # An invalidated connection has no info to read (reading it raises, hiding the
    # caller's cancellation); its record's info is cleared at checkin (_forget).
    if not conn.invalidated:
        conn.info.pop(_ENDED, None)


def _refuse_to_commit_an_ended_transaction(conn: Connection) -> None:
    ended = conn.info.pop(_ENDED, None)
    if ended is not None:
        raise ended


def _forget(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info.pop(_ENDED, None)
        _stop(record.info)


def _stop(info: dict[Any, Any]) -> None:
    running = info.pop(_RUNNING, None)
    if running is not None:
        running[1].cancel()


def _interrupt(info: dict[Any, Any], context: Any, driver: Any) -> None:
    running = info.get(_RUNNING)
    if running is None or running[0] is not context:
        return  # that statement has ended
    # sqlite3's interrupt() may be called from any thread; aiosqlite's own interrupt()
    # is a coroutine around this call (SQLAlchemy's adapter uses _conn too).
    with suppress(ValueError, sqlite3.ProgrammingError):  # the connection closed meanwhile
        driver._conn.interrupt()
