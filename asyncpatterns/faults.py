"""Load and faults on demand: a slow request, a burst, a slow query, a killed connection.

Use these to make happen, on purpose and on every backend, what a pool has to survive:
in a notebook, a test, a load script. ``hold_connection`` is a slow request,
``checked_out`` a burst that holds connections at once, ``slow_query`` work that takes
time in the database (SQLite too), ``terminate_connections`` the server closing
connections (``server_connection_id`` names them) as a restart or an admin would.
Without them, exhaustion and dead connections show only under real load or in a real
outage: too late to learn from, and never twice the same way. ``pooling`` re-exports
them beside what reads the pool itself (``measure_throughput``,
``pooled_connection_ids``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from sqlalchemy import bindparam, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import TextClause


async def hold_connection(engine: AsyncEngine, seconds: float) -> None:
    """Check out a connection, run one query, and keep it ``seconds`` (a slow request)."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await asyncio.sleep(seconds)


@asynccontextmanager
async def checked_out(engine: AsyncEngine, count: int) -> AsyncIterator[list[AsyncConnection]]:
    """Hold ``count`` connections of the engine at once (a burst), then return them."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(engine.connect()) for _ in range(count)]


def slow_query(engine: AsyncEngine, seconds: float) -> TextClause:
    """A query that takes ``seconds`` in the database: a stand-in for real work.

    PostgreSQL ``pg_sleep``, MySQL ``SLEEP``. SQLite has no sleep function, so
    this registers one on the engine's *new* connections: call it before the
    engine opens its first connection.
    """
    backend = engine.dialect.name
    if backend == "postgresql":
        return text(f"SELECT pg_sleep({float(seconds)})")
    if backend == "mysql":
        return text(f"SELECT SLEEP({float(seconds)})")
    if not event.contains(engine.sync_engine, "connect", _add_sqlite_sleep):
        event.listen(engine.sync_engine, "connect", _add_sqlite_sleep)
    return text(f"SELECT sleep({float(seconds)})")


def _add_sqlite_sleep(dbapi_connection: Any, _record: Any) -> None:
    # Runs in the connection's own thread, like a query waiting on disk.
    dbapi_connection.create_function("sleep", 1, time.sleep)


async def server_connection_id(conn: AsyncConnection) -> int:
    """The server's id for this connection (``pg_backend_pid()``, ``CONNECTION_ID()``)."""
    backend = conn.dialect.name
    if backend not in _CONNECTION_ID_QUERIES:
        raise ValueError(f"{backend} has no server connections to identify")
    return (await conn.execute(text(_CONNECTION_ID_QUERIES[backend]))).scalar_one()


_CONNECTION_ID_QUERIES = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
}


async def terminate_connections(admin: AsyncEngine, ids: Iterable[int]) -> None:
    """Have the server close these connections, as a restart or an admin would.

    PostgreSQL ``pg_terminate_backend``, MySQL ``KILL CONNECTION``, sent from
    ``admin`` (another engine); waits until the server no longer lists them.
    """
    targets = [int(i) for i in ids]
    postgres = admin.dialect.name == "postgresql"
    async with admin.connect() as conn:
        for connection_id in targets:
            if postgres:
                await conn.execute(text("SELECT pg_terminate_backend(:id)"), {"id": connection_id})
            else:
                await conn.execute(text(f"KILL CONNECTION {connection_id}"))
        for _ in range(500):  # the server closes them within milliseconds
            if not await _still_listed(conn, targets, postgres):
                return
            await asyncio.sleep(0.01)
    raise RuntimeError(f"the server still lists connections {targets} after 5 s")


async def _still_listed(conn: AsyncConnection, ids: list[int], postgres: bool) -> bool:
    listing = (
        "SELECT count(*) FROM pg_stat_activity WHERE pid IN :ids"
        if postgres
        else "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID IN :ids"
    )
    statement = text(listing).bindparams(bindparam("ids", expanding=True))
    result = await conn.execute(statement, {"ids": ids})
    await conn.rollback()  # a new snapshot of the server's activity next time
    return bool(result.scalar_one())
