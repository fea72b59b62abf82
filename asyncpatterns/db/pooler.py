"""PostgreSQL behind PgBouncer in transaction mode: what the drivers must not do.

``make_engine(url, pooler="pgbouncer")`` (or ``DATABASE_POOLER=pgbouncer`` in
the environment) applies all of it. In transaction pooling each transaction
may run on a different server connection, and each server connection serves
many clients in turn. What goes wrong with a plain engine:

* **Prepared statements.** asyncpg prepares every statement and caches it per
  connection under a numbered name; psycopg prepares a query that ran five
  times (``prepare_threshold=5``). Behind the pooler the name lands on a
  server connection another client shares, or is missing on the one the next
  transaction gets: ``prepared statement "__asyncpg_stmt_1__" already exists``,
  ``prepared statement "_pg3_0" already exists``. Here asyncpg caches nothing
  and names each statement uniquely; psycopg never prepares.
* **Startup parameters.** asyncpg's ``server_settings`` and libpq's
  ``options=-c ...`` are refused when connecting (PgBouncer: ``unsupported
  startup parameter: lock_timeout``). Here the lock and statement timeouts are
  set with ``set_config(..., is_local => true)`` (``SET LOCAL``) as each
  transaction begins: one more round trip per transaction, and they end with
  it. Zero cost instead: ``ALTER ROLE app SET lock_timeout = '5s'`` on the
  server, which every server connection starts with.
* **The first statement of a transaction is the kit's.** ``SET TRANSACTION
  ISOLATION LEVEL ...`` must come first and now fails ("must be called before any
  query"): ask for the level with ``execution_options(isolation_level=...)`` (or
  ``postgresql_readonly=True``), which the driver's BEGIN carries.
* **Session state leaks.** A plain ``SET`` stays on the server connection and
  applies to whichever client gets it next; advisory locks taken with
  ``pg_advisory_lock``, ``LISTEN``, temporary tables and ``WITH HOLD`` cursors
  stay behind too. Use ``SET LOCAL``, ``pg_advisory_xact_lock`` and
  transaction-scoped state only; run migrations and listeners on a direct
  connection.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import ConfigurationError

PGBOUNCER = "pgbouncer"
POOLERS = (PGBOUNCER,)


def resolve_pooler(pooler: str | None = None) -> str | None:
    """The pooler in front of the database: the argument, else ``$DATABASE_POOLER``
    (empty or unset: none)."""
    chosen = pooler if pooler is not None else os.environ.get("DATABASE_POOLER", "")
    if not chosen:
        return None
    if chosen not in POOLERS:
        raise ConfigurationError(
            f"Unknown pooler {chosen!r} (DATABASE_POOLER); known: {', '.join(POOLERS)}"
        )
    return chosen


def pooler_connect_args(url: URL) -> dict[str, Any]:
    """Driver options for transaction pooling: no server-side prepared statement
    outlives the statement that made it, and none collides with another client's."""
    if url.get_driver_name() == "psycopg":
        return {"prepare_threshold": None}
    return {  # asyncpg, through SQLAlchemy's adapter
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4().hex}__",
    }


def set_local_on_begin(engine: AsyncEngine, settings: dict[str, str]) -> None:
    """Set each PostgreSQL setting for the transaction, as it begins (``SET LOCAL``)."""
    if not settings:
        return
    calls = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in settings.items())
    statement = f"/* transaction settings */ SELECT {calls}"  # sqlwatch leaves it out

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            connection.exec_driver_sql(statement)
