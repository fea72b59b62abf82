import asyncio
import gc
import logging
import os
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import pytest
import sqlalchemy.exc
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import SERVER_POOL_DEFAULTS, make_engine, make_read_engine
from asyncpatterns.pooling import (
    RECOMMENDED_SETTINGS,
    checked_out,
    gather_bounded,
    gather_or_cancel,
    hold_connection,
    make_pooler_engine,
    measure_throughput,
    pool_capacity,
    pool_status,
    pooled_connection_ids,
    server_connection_id,
    slow_query,
    terminate_connections,
)
from asyncpatterns.sqlwatch import watch_sql

EngineFactory = Callable[..., AsyncEngine]
T = TypeVar("T")

# The trap's pool: two connections, no overflow, one second of patience.
TINY_POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 1}


@pytest.fixture(autouse=True)
async def make_test_engine(database_url: URL) -> AsyncIterator[EngineFactory]:
    """Engines on the test database; after the test none may hold a connection."""
    engines: list[AsyncEngine] = []

    def factory(url: URL = database_url, **options: Any) -> AsyncEngine:
        engine = make_engine(url, **options)
        engines.append(engine)
        return engine

    yield factory
    try:
        for engine in engines:
            assert pool_status(engine).checked_out in (0, None), "a connection leaked"
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.fixture
def server_backend(backend: str) -> str:
    if backend == "sqlite":
        pytest.skip("SQLite is embedded: there is no server to kill connections")
    return backend


async def ping(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT 1"))).scalar_one()


def test_recommended_settings_are_the_engine_defaults() -> None:
    servers = {s.setting: s.value for s in RECOMMENDED_SETTINGS if s.backend.startswith("postg")}
    assert {k: servers[k] for k in SERVER_POOL_DEFAULTS} == SERVER_POOL_DEFAULTS
    assert all(setting.reason for setting in RECOMMENDED_SETTINGS)


async def test_pool_status_before_during_after_a_burst(make_test_engine: EngineFactory) -> None:
    engine = make_test_engine(pool_size=2, max_overflow=3)
    assert pool_status(engine)[1:] == (2, 3, 0, 0, 0)
    async with checked_out(engine, 4):
        assert pool_status(engine)[1:] == (2, 3, 0, 4, 2)
    # the two overflow connections are closed, the pool keeps two open
    assert pool_status(engine)[1:] == (2, 3, 2, 0, 0)
    assert pool_capacity(engine) == 5


async def test_pool_status_of_a_pool_that_does_not_count(
    make_test_engine: EngineFactory,
) -> None:
    engine = make_test_engine(poolclass=NullPool)
    assert await ping(engine) == 1
    assert pool_status(engine) == ("NullPool", None, None, None, None, None)
    assert pool_capacity(engine) is None


async def test_exhaustion_raises_pool_timeout(make_test_engine: EngineFactory) -> None:
    engine = make_test_engine(**TINY_POOL)
    holders = [hold_connection(engine, seconds=5) for _ in range(10)]
    start = time.monotonic()
    with pytest.raises(sqlalchemy.exc.TimeoutError, match="limit of size 2 overflow 0 reached"):
        await gather_or_cancel(*holders)
    assert time.monotonic() - start <= TINY_POOL["pool_timeout"] + 0.5
    assert pool_status(engine).checked_out == 0


async def test_bounded_concurrency_completes_200_tasks(make_test_engine: EngineFactory) -> None:
    engine = make_test_engine(**TINY_POOL)
    # 200 x 10 ms on 2 connections is 1 s of work: unbounded, tasks would time out.
    jobs = [partial(hold_connection, engine, 0.01)] * 200
    results = await gather_bounded(jobs, limit=pool_capacity(engine))
    assert len(results) == 200
    assert pool_status(engine).checked_out == 0


async def wait_until_waiting(engine: AsyncEngine, waiters: int) -> None:
    """Let tasks run until ``waiters`` of them wait for a connection."""
    for _ in range(1000):
        if len(engine.pool._pool._waiters) == waiters:  # private: the test looks inside
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{waiters} waiter(s) expected")


async def test_a_returned_connection_goes_to_the_longest_waiter(
    make_test_engine: EngineFactory,
) -> None:
    engine = make_test_engine(pool_size=1, max_overflow=0, pool_timeout=5)
    assert engine.pool.logger.name.startswith("sqlalchemy.pool.")  # logs where SQLAlchemy's do
    served: list[str] = []

    async def use(name: str) -> None:
        async with engine.connect() as conn:
            served.append(name)
            await conn.execute(text("SELECT 1"))

    newcomers: list[asyncio.Task[None]] = []

    def newcomer_arrives(dbapi_connection: Any, record: Any) -> None:
        # Runs just before the connection is put back: the newcomer's first step is
        # scheduled ahead of the waiter's wake-up. SQLAlchemy's AsyncAdaptedQueuePool
        # lets it take the connection; the waiter then queues again at the back.
        if not newcomers:
            newcomers.append(asyncio.create_task(use("newcomer")))

    holder = await engine.connect()
    await holder.exec_driver_sql("SELECT 1")
    waiter = asyncio.create_task(use("waiter"))
    await wait_until_waiting(engine, 1)
    event.listen(engine.sync_engine.pool, "checkin", newcomer_arrives)
    await holder.close()
    await gather_or_cancel(waiter, *newcomers)
    assert served == ["waiter", "newcomer"]
    assert pool_status(engine).checked_out == 0


@pytest.mark.parametrize("ending", ["timed out", "cancelled", "cancelled once handed one"])
async def test_a_waiter_that_gives_up_loses_no_connection(
    make_test_engine: EngineFactory, ending: str
) -> None:
    engine = make_test_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    holder = await engine.connect()
    await holder.exec_driver_sql("SELECT 1")
    waiter = asyncio.create_task(ping(engine))
    await wait_until_waiting(engine, 1)
    if ending == "timed out":
        with pytest.raises(sqlalchemy.exc.TimeoutError):
            await waiter
    elif ending == "cancelled":
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    else:  # handed the connection, then cancelled before it could run
        loop = asyncio.get_running_loop()
        event.listen(engine.sync_engine.pool, "checkin", lambda *_: loop.call_soon(waiter.cancel))
    await holder.close()
    if not waiter.done():
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert pool_status(engine).checked_out == 0
    assert pool_status(engine).checked_in == 1  # the connection is back in the pool
    assert await asyncio.wait_for(ping(engine), 1) == 1


async def test_a_cancelled_waiter_keeps_its_connection_even_when_the_queue_is_full(
    server_backend: str, database_url: URL
) -> None:
    # Found by an adversarial review: the waiter is handed a connection and cancelled
    # before it runs, and meanwhile the other connection fills the idle queue. Passing
    # its connection on must not fail with Full (the connection was lost, and the pool
    # counted it checked out for ever). The read engine returns a connection without
    # a round trip (no ROLLBACK), so nothing runs in between: the order is exact.
    engine = make_read_engine(database_url, pool_size=1, max_overflow=1, pool_timeout=5)
    try:
        first, second = await engine.connect(), await engine.connect()
        for conn in (first, second):
            await conn.exec_driver_sql("SELECT 1")
        waiter = asyncio.create_task(ping(engine))
        await wait_until_waiting(engine, 1)
        await first.close()  # handed to the waiter, which has not run yet
        waiter.cancel()
        await second.close()  # no waiter left: into the idle queue, which is now full
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool_status(engine).checked_out == 0
        both = [await asyncio.wait_for(engine.connect(), 2) for _ in range(2)]  # 1 + 1
        for conn in both:
            await conn.close()
    finally:
        await engine.dispose()


async def test_gather_or_cancel_returns_results_in_order() -> None:
    async def later(value: int) -> int:
        await asyncio.sleep(0.01 * (3 - value))
        return value

    assert await gather_or_cancel(*(later(i) for i in range(3))) == [0, 1, 2]
    assert await gather_or_cancel() == []
    assert await gather_bounded([partial(later, 1)] * 3, limit=None) == [1, 1, 1]


async def _kill_pooled_connections(engine: AsyncEngine, database_url: URL, count: int) -> set:
    """Open ``count`` connections, then have the server kill exactly those."""
    async with checked_out(engine, count):
        pass
    ids = await pooled_connection_ids(engine)
    assert len(ids) == count
    admin = make_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        await terminate_connections(admin, ids)
    finally:
        await admin.dispose()
    return set(ids)


async def test_killed_connections_fail_without_pre_ping(
    server_backend: str, database_url: URL, make_test_engine: EngineFactory
) -> None:
    if os.environ.get("DATABASE_POOLER"):
        pytest.skip("behind PgBouncer the killed connection is PgBouncer's; the app's survives")
    engine = make_test_engine(pool_size=2, pool_pre_ping=False)
    await _kill_pooled_connections(engine, database_url, 2)
    with pytest.raises(sqlalchemy.exc.DBAPIError) as info:
        await ping(engine)
    assert info.value.connection_invalidated
    # The failure invalidated the whole pool: the next request reconnects.
    assert await ping(engine) == 1


async def test_killed_connections_survived_with_pre_ping(
    server_backend: str, database_url: URL, make_test_engine: EngineFactory
) -> None:
    if os.environ.get("DATABASE_POOLER"):  # and the killing query may run on one it kills
        pytest.skip("behind PgBouncer the killed connection is PgBouncer's; the app's survives")
    engine = make_test_engine(pool_size=2, pool_pre_ping=True)
    killed = await _kill_pooled_connections(engine, database_url, 2)
    async with checked_out(engine, 2) as conns:
        ids = {await server_connection_id(conn) for conn in conns}
    assert len(ids) == 2 and not ids & killed


class RestartableServer:
    """A TCP relay in front of the real server, standing in for a server restart.

    ``stop()`` closes every client connection and refuses new ones, as a server
    that shuts down does; ``start()`` accepts connections again on the same
    port. (The servers themselves are shared, so the tests may not restart them.)
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()
            self._relays.discard(relay)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_engine_recovers_after_server_restart(
    server_backend: str, database_url: URL, make_test_engine: EngineFactory
) -> None:
    default_port = {"postgresql": 5432, "mysql": 3306}[server_backend]
    server = RestartableServer(database_url.host or "127.0.0.1", database_url.port or default_port)
    await server.start()
    engine = make_test_engine(database_url.set(host="127.0.0.1", port=server.port))
    async with checked_out(engine, 2):
        pass
    await server.stop()  # down: open connections are cut, new ones refused
    with pytest.raises(DatabaseUnavailableError):
        await ping(engine)
    await server.start()  # back up: the same engine, no process restart
    try:
        async with checked_out(engine, 2) as conns:
            assert [(await c.execute(text("SELECT 1"))).scalar_one() for c in conns] == [1, 1]
    finally:
        await engine.dispose()
        await server.stop()


def in_another_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine in a thread with its own event loop, closed when it returns.

    This loop blocks while the thread runs, so the two loops never touch a
    connection at the same time (when they do, the driver can crash the process).
    """
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


async def test_engine_is_bound_to_its_event_loop(
    server_backend: str, make_test_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_test_engine(pool_size=1, max_overflow=0)
    # The pooled connection is opened in a loop that then ends, as a pytest loop does.
    assert in_another_loop(ping(engine)) == 1
    # SQLAlchemy logs that it cannot close that connection, and the driver leaves behind
    # what belonged to the dead loop (asyncpg: a never-awaited cancel coroutine; a socket
    # nothing can close). Keep no record of either, and collect them here, so the
    # garbage collector's warning is not blamed on another test.
    with caplog.at_level(logging.CRITICAL, logger="sqlalchemy.pool"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if engine.dialect.driver == "psycopg":
            # psycopg waits on its socket in whichever loop is running: no error here.
            assert await ping(engine) == 1
        else:
            with pytest.raises(RuntimeError, match="attached to a different loop"):
                await ping(engine)
        assert await ping(engine) == 1  # the pool dropped that connection, opened one here
        await engine.dispose()
        gc.collect()


async def test_engine_disposed_in_its_loop_works_in_the_next(
    make_test_engine: EngineFactory,
) -> None:
    engine = make_test_engine(pool_size=1, max_overflow=0)

    async def ping_then_dispose() -> int:
        result = await ping(engine)
        await engine.dispose()
        return result

    assert in_another_loop(ping_then_dispose()) == 1
    assert await ping(engine) == 1


async def test_nullpool_engine_hops_event_loops(make_test_engine: EngineFactory) -> None:
    engine = make_test_engine(poolclass=NullPool)
    assert await ping(engine) == 1
    assert in_another_loop(ping(engine)) == 1


async def test_pooler_engine_prepares_uniquely_named_uncached_statements(
    backend: str, database_url: URL
) -> None:
    engine = make_pooler_engine(database_url)
    try:
        assert pool_status(engine).pool == "NullPool"
        async with engine.connect() as conn:
            for i in range(8):  # past psycopg's prepare threshold (5)
                assert (await conn.execute(text("SELECT :x + 1"), {"x": i})).scalar() == i + 1
            if backend == "postgresql":
                names = await conn.execute(text("SELECT name FROM pg_prepared_statements"))
                names = names.scalars().all()
                if engine.dialect.driver == "psycopg":  # prepare_threshold=None: none of its own
                    assert not any(name.startswith("_pg3_") for name in names)
                else:  # asyncpg prepares every statement, each under a name of its own
                    assert names
                    assert not any(re.fullmatch(r"__asyncpg_stmt_\d+__", n) for n in names)
    finally:
        await engine.dispose()


async def test_measure_throughput_runs_every_query(make_test_engine: EngineFactory) -> None:
    engine = make_test_engine(pool_size=2, max_overflow=0)
    statement = slow_query(engine, 0.002)
    with watch_sql(engine) as sql:
        queries_per_second = await measure_throughput(engine, statement, queries=20)
    assert queries_per_second > 0
    assert [s.sql for s in sql.statements].count(statement.text) == 20
    assert pool_status(engine) == (pool_status(engine).pool, 2, 0, 2, 0, 0)
