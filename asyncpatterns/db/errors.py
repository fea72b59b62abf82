"""What a database error means, from each backend's own error code.

Use ``is_retryable`` / ``is_lock_timeout`` / ``is_statement_timeout`` /
``is_connection_lost`` to decide what to do after a failure (``constraints.py``
names a refused write). What goes wrong without them: classifying by message
text -- messages change between versions and languages, and may quote the
user's data. Codes do not.

Driver errors that are not the database's (a value the driver cannot bind,
say) have no code: ``error_code`` answers None, and they pass through as they are.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import DBAPIError

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
# A statement stopped for running past its time limit (timeouts.py). The database
# stops only that statement: the connection stays usable once the transaction is
# rolled back (PostgreSQL aborts it; MySQL/MariaDB undo only the statement).
STATEMENT_TIMEOUT_CODES = {
    "postgresql": {"57014"},  # query_canceled: statement_timeout (or a cancel request)
    "mysql": {1969, 3024},  # MariaDB max_statement_time, MySQL max_execution_time exceeded
    "sqlite": {9},  # SQLITE_INTERRUPT: the kit's timer called interrupt()
}
CONNECTION_LOST_CODES = {
    "postgresql": {"08000", "08003", "08006", "57P01", "57P02", "57P03"},  # server shut down
    "mysql": {1053, 2006, 2013},  # server shutdown, gone away, lost connection
    "sqlite": set(),
}
UNIQUE_CODES = {"postgresql": {"23505"}, "mysql": {1062}, "sqlite": {2067, 1555}}
FOREIGN_KEY_CODES = {"postgresql": {"23503"}, "mysql": {1451, 1452}, "sqlite": {787}}
NOT_NULL_CODES = {"postgresql": {"23502"}, "mysql": {1048, 1364}, "sqlite": {1299}}
# MariaDB 4025, MySQL 8 3819; both arrive as OperationalError, not IntegrityError.
CHECK_CODES = {"postgresql": {"23514"}, "mysql": {3819, 4025}, "sqlite": {275}}


def error_code(exc: BaseException) -> tuple[str, str | int] | None:
    """The backend and its own code for a database error, e.g. ``("postgresql",
    "40P01")``, ``("mysql", 1213)``, ``("sqlite", 517)``; None for other errors
    (among them the driver's own, such as a value it cannot bind).

    Never classify by message text: a message may quote the user's data.
    """
    error = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    module = type(error).__module__
    if module == "sqlite3":  # sqlite3.ProgrammingError and InterfaceError carry no code
        code = getattr(error, "sqlite_errorcode", None)
        return None if code is None else ("sqlite", code)
    if module.startswith("pymysql") and error.args and isinstance(error.args[0], int):
        return "mysql", error.args[0]
    # asyncpg's errors arrive wrapped by SQLAlchemy's dialect; psycopg's as they are.
    if module.startswith(("sqlalchemy.dialects.postgresql", "psycopg")) and getattr(
        error, "sqlstate", None
    ):
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


def is_statement_timeout(exc: BaseException) -> bool:
    """True if the database stopped a statement that ran past its time limit
    (``make_engine(statement_timeout=...)``, ``db.statement_timeout``)."""
    return _is(STATEMENT_TIMEOUT_CODES, exc)


def is_connection_lost(exc: BaseException) -> bool:
    """True if the connection died under a statement (a restart, a killed connection)."""
    return (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _is(
        CONNECTION_LOST_CODES, exc
    )


def is_foreign_key_violation(exc: BaseException) -> bool:
    """True if a write pointed at a row that does not exist (or removed one still pointed at)."""
    return _is(FOREIGN_KEY_CODES, exc)
