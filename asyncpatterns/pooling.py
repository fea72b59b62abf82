"""Connection pools: settings per backend, pool status, exhaustion, dead connections.

Use this when more than one task talks to the database at once (a web server,
a batch job with ``asyncio.gather``). What goes wrong without it:

* **Exhaustion.** A pool hands out at most ``pool_size + max_overflow``
  connections. Start more tasks than that and the rest wait ``pool_timeout``
  seconds, then fail with ``sqlalchemy.exc.TimeoutError: QueuePool limit of
  size 2 overflow 0 reached``. Bound the concurrency to the pool instead
  (``gather_bounded``, an ``asyncio.Semaphore`` sized by ``pool_capacity``):
  the extra tasks wait on the semaphore, which has no timeout, and all finish.
* **Dead connections.** A server restart, a failover, an idle timeout
  (MySQL's ``wait_timeout``) or a ``pg_terminate_backend`` / ``KILL`` closes
  connections that still sit in your pool. Without ``pool_pre_ping`` the next
  request that gets one fails; with it, the pool tests each connection as it
  hands it out and silently replaces a dead one. The engine never needs a
  process restart: after a failure the pool opens new connections by itself.
* **Event loops.** A pooled connection belongs to the event loop that opened
  it. Using the same engine from another loop (a thread running
  ``asyncio.run``, a test framework that makes a loop per test) fails with
  ``RuntimeError: ... attached to a different loop`` (and two live loops using
  one connection at once can crash the driver outright). Make one engine per
  loop and ``await engine.dispose()`` it before that loop ends, or use
  ``NullPool`` (no connection outlives its checkout) for code that hops loops.

The recommended settings, each with its reason, are in ``RECOMMENDED_SETTINGS``;
the server defaults themselves live in ``db.SERVER_POOL_DEFAULTS`` (applied by
``make_engine``), so there is one source of truth. To watch each of these go wrong
on purpose (a slow request, a burst, a slow query, a connection the server kills),
``faults.py`` makes it happen; its helpers are importable from here too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, NamedTuple, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.sql.elements import TextClause

from .config import backend_name
from .db import SERVER_POOL_DEFAULTS, make_engine
from .db.pooler import PGBOUNCER
from .faults import (  # noqa: F401  (the notebooks and tests import these from pooling too)
    checked_out,
    hold_connection,
    server_connection_id,
    slow_query,
    terminate_connections,
)

T = TypeVar("T")


class PoolSetting(NamedTuple):
    """One recommended setting: where it applies, its value, and why."""

    backend: str
    setting: str
    value: Any
    reason: str


_SERVERS = "postgresql, mysql"

RECOMMENDED_SETTINGS: list[PoolSetting] = [
    PoolSetting(
        _SERVERS,
        "pool_size",
        SERVER_POOL_DEFAULTS["pool_size"],
        "connections kept open per process; size it to the queries that truly run at "
        "once, and keep processes x engines x (pool_size + max_overflow) below the "
        "server's max_connections (PostgreSQL 100, MySQL 151 by default); the kit's app "
        "has two engines (writes, one-statement reads): pool_settings_for_workers does it",
    ),
    PoolSetting(
        _SERVERS,
        "max_overflow",
        SERVER_POOL_DEFAULTS["max_overflow"],
        "extra connections for bursts, closed again when they are returned",
    ),
    PoolSetting(
        _SERVERS,
        "pool_timeout",
        SERVER_POOL_DEFAULTS["pool_timeout"],
        "seconds a task waits for a free connection before sqlalchemy.exc.TimeoutError; "
        "a safety net, not flow control: bound your concurrency to the pool instead",
    ),
    PoolSetting(
        _SERVERS,
        "pool_recycle",
        SERVER_POOL_DEFAULTS["pool_recycle"],
        "replace connections older than this (seconds): below MySQL's wait_timeout "
        "(28800 s by default, often 60-600 s on hosted servers) and any proxy or "
        "firewall idle cut-off, so the server never closes one first",
    ),
    PoolSetting(
        _SERVERS,
        "pool_pre_ping",
        SERVER_POOL_DEFAULTS["pool_pre_ping"],
        "test each connection as it is checked out (one round trip) and replace it if "
        "dead: survives restarts, failovers and killed connections",
    ),
    PoolSetting(
        "every backend",
        "poolclass",
        "FairAsyncQueuePool (make_engine's default)",
        "waiting tasks get connections in arrival order; SQLAlchemy's AsyncAdaptedQueuePool "
        "lets a newcomer take the connection a waiter was woken for, so under load a few "
        "waiters starve until pool_timeout (p99 seconds, then 503s)",
    ),
    PoolSetting(
        "sqlite (file)",
        "poolclass",
        "FairAsyncQueuePool (size 5, overflow 10)",
        "one connection per concurrent task, each in its own thread; WAL (set by "
        "make_engine) lets readers run beside the single writer, and a writer that "
        "begins with BEGIN IMMEDIATE waits its turn (busy_timeout) instead of failing",
    ),
    PoolSetting(
        "sqlite (:memory:)",
        "poolclass",
        "FairAsyncQueuePool, pool_size=1, max_overflow=0 (make_engine's default)",
        "every new connection to :memory: is a new, empty database, so the one connection "
        "is kept; a pool of one hands it to one session at a time (StaticPool hands it to "
        "all at once, and their transactions mix)",
    ),
    PoolSetting(
        "behind pgbouncer or another external pooler",
        "poolclass",
        "NullPool",
        "the external pooler already pools; a second pool in the app holds server "
        "slots idle and hides the pooler's limits",
    ),
    PoolSetting(
        "code that hops event loops",
        "poolclass",
        "NullPool",
        "a pooled connection belongs to the loop that opened it; with NullPool none "
        "outlives its checkout, so each loop opens its own",
    ),
    PoolSetting(
        "postgresql via pgbouncer, transaction mode",
        "pooler",
        "make_engine(url, pooler='pgbouncer') or DATABASE_POOLER=pgbouncer",
        "successive transactions may run on different server connections: asyncpg's "
        "cached prepared statement is missing there and psycopg's _pg3_0 collides with "
        "another client's; startup parameters are refused, so the timeouts are SET "
        "LOCAL per transaction (db/pooler.py)",
    ),
]


def pool_settings_for_workers(
    budget: int, workers: int, *, pools_per_worker: int = 1, overflow_share: float = 0.0
) -> dict[str, int]:
    """``pool_size`` and ``max_overflow`` for each pool of ``workers`` processes, so that
    together they never open more than ``budget`` connections:
    ``workers x pools_per_worker x (pool_size + max_overflow) <= budget``.

    Each process has its own pools (uvicorn's workers do not share one): with
    the defaults (5 + 10) four workers may open 60 connections per engine, and
    past the server's ``max_connections`` every new one fails with PostgreSQL's
    "sorry, too many clients already" (MySQL: "Too many connections").
    ``budget`` is what the app may hold: ``max_connections`` minus
    ``superuser_reserved_connections`` minus what other clients need
    (migrations, psql, cron jobs). ``overflow_share``: the part of each pool
    opened for bursts and closed when returned. The default, 0, keeps the whole
    share open once used: the budget reserves it for the worker anyway, and
    overflow connections cost a new connection (and its login) at each burst.
    """
    if workers < 1 or pools_per_worker < 1:
        raise ValueError(
            f"workers and pools per worker must be >= 1, got {workers} and {pools_per_worker}"
        )
    if not 0 <= overflow_share < 1:
        raise ValueError(f"overflow_share must be in [0, 1), got {overflow_share}")
    pools = workers * pools_per_worker
    share = budget // pools
    if share < 1:
        raise ValueError(
            f"a budget of {budget} connections is less than one per pool for {workers} "
            f"worker(s) x {pools_per_worker} pool(s): raise it to at least {pools}, or run "
            "fewer workers"
        )
    overflow = int(share * overflow_share)
    return {"pool_size": share - overflow, "max_overflow": overflow}


def make_pooler_engine(url: str | URL | None = None, **options: Any) -> AsyncEngine:
    """An engine for a database behind an external pooler such as PgBouncer.

    ``NullPool``: each checkout opens a connection (to the pooler, which is
    cheap) and closes it on return. On PostgreSQL, ``make_engine``'s
    ``pooler="pgbouncer"``: no prepared statement outlives its statement, and
    the timeouts are set per transaction (``db/pooler.py``).
    """
    engine_options: dict[str, Any] = {"poolclass": NullPool, "pool_pre_ping": False}
    if backend_name(url) == "postgresql":
        engine_options["pooler"] = PGBOUNCER
    return make_engine(url, **{**engine_options, **options})


class PoolStatus(NamedTuple):
    """A snapshot of a pool, as a plain record (a list of them is a DataFrame).

    ``overflow`` counts the connections open beyond ``size`` right now. Pools
    that do not count (NullPool, StaticPool) report ``None``.
    """

    pool: str
    size: int | None
    max_overflow: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """Size, idle (checked in), in use (checked out) and overflow of the engine's pool."""
    pool = engine.pool
    name = type(pool).__name__
    if not isinstance(pool, QueuePool):
        return PoolStatus(name, None, None, None, None, None)
    return PoolStatus(
        pool=name,
        size=pool.size(),
        max_overflow=pool._max_overflow,  # no public accessor in SQLAlchemy
        checked_in=pool.checkedin(),
        checked_out=pool.checkedout(),
        overflow=max(pool.overflow(), 0),
    )


def pool_capacity(engine: AsyncEngine) -> int | None:
    """How many connections the pool hands out at once (``None``: no limit)."""
    status = pool_status(engine)
    if status.size is None or status.max_overflow is None:
        return None
    if status.max_overflow < 0:  # max_overflow=-1 means unlimited overflow
        return None
    return status.size + status.max_overflow


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like ``asyncio.gather``, but the first error cancels the other tasks.

    It waits for the cancelled tasks to finish, so every connection they held
    is back in the pool before the error reaches you (plain ``gather`` leaves
    them running in the background).
    """
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    if not tasks:
        return []
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # does nothing to a task that has finished
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = task.exception() if task in done else None
        if error is not None:
            raise error  # the first error: the one that stopped the others
    return [task.result() for task in tasks]


async def gather_bounded(jobs: Iterable[Callable[[], Awaitable[T]]], limit: int | None) -> list[T]:
    """Run every job, at most ``limit`` at a time; results in job order.

    With ``limit = pool_capacity(engine)`` no job ever waits for the pool, so
    ``pool_timeout`` cannot fire however many jobs there are: they queue on
    the semaphore instead. ``None`` (a pool without a limit, like NullPool)
    runs them all at once.
    """
    jobs = list(jobs)
    semaphore = asyncio.Semaphore(limit or len(jobs) or 1)

    async def run(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    return await gather_or_cancel(*(run(job) for job in jobs))


async def measure_throughput(
    engine: AsyncEngine,
    statement: TextClause,
    queries: int,
    concurrency: int | None = None,
) -> float:
    """Queries per second: ``statement`` run ``queries`` times, one checkout each.

    At most ``concurrency`` run at once (default: the pool's capacity, so no
    task waits for the pool). Compare engines made with different
    ``pool_size`` (and ``max_overflow=0``) to see what the pool size buys.
    The connections are opened before the clock starts: opening them is a
    one-off cost that would otherwise count against the bigger pools.
    """
    capacity = pool_capacity(engine)
    limit = concurrency or capacity or queries
    async with checked_out(engine, min(limit, capacity or 0)):
        pass
    jobs = [partial(_execute_once, engine, statement)] * queries
    start = time.perf_counter()
    await gather_bounded(jobs, limit)
    return queries / (time.perf_counter() - start)


async def _execute_once(engine: AsyncEngine, statement: TextClause) -> None:
    async with engine.connect() as conn:
        await conn.execute(statement)


async def pooled_connection_ids(engine: AsyncEngine) -> list[int]:
    """Server ids of the idle connections in the engine's pool (opens none)."""
    idle = pool_status(engine).checked_in or 0
    async with checked_out(engine, idle) as conns:
        return [await server_connection_id(conn) for conn in conns]
