"""One migration at a time, in one transaction: the migration lock, per backend.

Use ``migration_transaction`` around every migration run (``env.py`` does). What it does
that a copied ``alembic init -t async`` does not:

* Two processes that migrate at once (two app replicas starting, a deploy retried)
  take turns: the second waits for the migration lock, then finds nothing left to do.
  Without it, both run the same ``CREATE TABLE``/``ALTER`` and one fails half-way
  (on MySQL, after committing part of its work).
* A DDL statement waits at most ``LOCK_TIMEOUT`` for a table that the app is using,
  instead of queueing every query behind it (PostgreSQL) or waiting up to a year
  (MySQL's metadata lock wait).
* SQLite alterations copy the table (batch mode) with foreign keys off, so copying a
  referenced table does not cascade-delete the rows that point at it, and keep
  ``AUTOINCREMENT`` counters, so an id is never handed out twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ..db import LOCK_TIMEOUT, SQLITE_BEGIN, is_lock_timeout

# The package's logger: the one ``main`` and ``alembic.ini`` show at INFO.
logger = logging.getLogger(__package__)

# How long a migration waits for another one to finish before giving up.
MIGRATION_LOCK_WAIT = 60.0
# PostgreSQL advisory lock key, MySQL named lock: "the kit is migrating this database".
_PG_LOCK_KEY = 0x61_73_79_6E_63_70_61_74  # "asyncpat"
_MYSQL_LOCK_PREFIX = "asyncpatterns.migrate."


class MigrationLockTimeout(TimeoutError):
    """Another migration held the database's migration lock for longer than the wait."""


@contextmanager
def migration_transaction(
    connection: Connection, lock_wait: float = MIGRATION_LOCK_WAIT
) -> Iterator[None]:
    """Hold the database's migration lock, inside a transaction committed at the end.

    A second migration waits here (up to ``lock_wait`` seconds) and then sees the
    first one's result. PostgreSQL and SQLite roll back a failed migration entirely
    (transactional DDL); MySQL commits each DDL statement as it runs.
    """
    backend = connection.dialect.name
    logger.info("Waiting for the migration lock (at most %g s)", lock_wait)
    try:
        if backend == "sqlite":
            with _sqlite_migration(connection):
                yield
        elif backend == "postgresql":
            with connection.begin():
                _postgresql_lock(connection, lock_wait)
                yield
        else:
            with _mysql_lock(connection, lock_wait), connection.begin():
                yield
    except DBAPIError as exc:
        if is_lock_timeout(exc) and _waiting_for_lock(exc):
            raise MigrationLockTimeout(_lock_message(lock_wait)) from exc
        raise


def _lock_message(lock_wait: float) -> str:
    return (
        f"another migration held this database's migration lock for more than {lock_wait:g} s; "
        "wait for it to finish, then run the migration again"
    )


def _waiting_for_lock(exc: DBAPIError) -> bool:
    statement = (exc.statement or "").upper()
    return statement.startswith("BEGIN") or "PG_ADVISORY_XACT_LOCK" in statement


def _postgresql_lock(connection: Connection, lock_wait: float) -> None:
    # Wait up to lock_wait for the lock, then go back to the short wait for DDL locks.
    previous = connection.exec_driver_sql("SHOW lock_timeout").scalar_one()
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_wait * 1000)}")
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    connection.execute(text("SELECT set_config('lock_timeout', :value, true)"), {"value": previous})


@contextmanager
def _mysql_lock(connection: Connection, lock_wait: float) -> Iterator[None]:
    # A named lock belongs to the session: DDL's implicit commits do not release it.
    database = connection.exec_driver_sql("SELECT DATABASE()").scalar_one()
    name = f"{_MYSQL_LOCK_PREFIX}{database}"[:64]
    # DDL waits for a table's metadata lock up to lock_wait_timeout: one year by default.
    connection.exec_driver_sql(f"SET SESSION lock_wait_timeout = {max(1, round(LOCK_TIMEOUT))}")
    got = connection.execute(
        text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": lock_wait}
    ).scalar()
    connection.commit()  # start the migration with a fresh snapshot
    if got != 1:
        raise MigrationLockTimeout(_lock_message(lock_wait))
    try:
        yield
    finally:
        connection.rollback()  # if the migration failed mid-transaction
        connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        connection.commit()


@contextmanager
def _sqlite_migration(connection: Connection) -> Iterator[None]:
    """SQLite: take the write lock first (``BEGIN IMMEDIATE``), with foreign keys off
    while tables are copied, checked before the commit; keep AUTOINCREMENT counters."""
    _sqlite_pragma(connection, "foreign_keys=OFF")  # outside a transaction, or ignored
    try:
        connection.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with connection.begin():
            counters = _sqlite_counters(connection)
            yield
            _restore_sqlite_counters(connection, counters)
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"the migration broke foreign keys (rolled back): {broken}")
    finally:
        _sqlite_pragma(connection, "foreign_keys=ON")


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    # On the DBAPI connection: through SQLAlchemy, the statement would begin a transaction.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _sqlite_counters(connection: Connection) -> dict[str, int]:
    """AUTOINCREMENT counters: copying a table restarts them at its highest id."""
    if not _has_table(connection, "sqlite_sequence"):
        return {}
    rows = connection.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all()
    return {name: seq for name, seq in rows}


def _restore_sqlite_counters(connection: Connection, counters: dict[str, int]) -> None:
    for table, seq in counters.items():
        if not _has_table(connection, table) or not _has_table(connection, "sqlite_sequence"):
            continue
        found = connection.execute(
            text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}
        ).scalar()
        if found is None:
            connection.execute(
                text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :s)"),
                {"t": table, "s": seq},
            )
        elif found < seq:
            connection.execute(
                text("UPDATE sqlite_sequence SET seq = :s WHERE name = :t"), {"t": table, "s": seq}
            )


def _has_table(connection: Connection, name: str) -> bool:
    query = text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name")
    return connection.execute(query, {"name": name}).first() is not None
