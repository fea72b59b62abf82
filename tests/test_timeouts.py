"""Statement timeouts, per engine and per block, on every backend: a slow statement
is stopped in time with the kit's error (503 through the API), its transaction is
rolled back, and its connection goes back to the pool healthy and is used again.

Each test makes its own small engines on the test database; taking the ``engine``
fixture deletes whatever rows a test left."""

import asyncio
import time
from contextlib import nullcontext
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.api import create_app
from asyncpatterns.api.dependencies import SessionDep
from asyncpatterns.config import ConfigurationError
from asyncpatterns.db import (
    is_statement_timeout,
    make_engine,
    make_read_engine,
    make_session_maker,
    run_in_transaction,
    session_scope,
    statement_timeout,
)
from asyncpatterns.db.pooler import resolve_pooler
from asyncpatterns.db.timeouts import mysql_set_session
from asyncpatterns.models import Team
from asyncpatterns.pooling import pool_status

LIMIT = 0.3  # seconds; every slow statement below runs far longer than the tests wait
IN_TIME = 3.0

COUNT_TO_A_BILLION = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
)
SLOW_READ = {
    "postgresql": "SELECT pg_sleep(5)",
    "mysql": "SELECT SLEEP(5)",  # MariaDB stops it (error 1969); SLEEP does not just return
    "sqlite": COUNT_TO_A_BILLION + "SELECT count(*) FROM c",
}
SLOW_WRITE = {  # MariaDB's max_statement_time covers writes (MySQL's max_execution_time not)
    "postgresql": "INSERT INTO team (name) SELECT 'slow' FROM pg_sleep(5)",
    "mysql": "INSERT INTO team (name) SELECT 'slow' FROM (SELECT SLEEP(5) AS s) AS slow",
    "sqlite": f"INSERT INTO team (name) {COUNT_TO_A_BILLION} SELECT 'slow' FROM c WHERE x < 0",
}
# A statement a little longer than LIMIT that completes: a limit left behind would stop it.
PAUSE = {
    "postgresql": "SELECT pg_sleep(:s)",
    "mysql": "SELECT SLEEP(:s)",
    "sqlite": "SELECT test_sleep(:s)",  # a Python function: interrupt() waits for it to return
}


def one_connection_engine(url: URL, **options: Any) -> AsyncEngine:
    """A pool of one: what the next session gets is the connection the timeout hit."""
    engine = make_engine(url, pool_size=1, max_overflow=0, **options)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sleep(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("test_sleep", 1, time.sleep)

    return engine


async def driver_connection(session: AsyncSession) -> object:
    """The driver's connection under the session (asyncpg, psycopg, aiomysql, aiosqlite):
    the same object later means the pool kept it, neither closed nor replaced."""
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def pause(session: AsyncSession, backend: str) -> None:
    await session.exec(text(PAUSE[backend]), params={"s": 2 * LIMIT})


async def assert_healthy_and_reused(engine: AsyncEngine, used: object) -> None:
    assert pool_status(engine).checked_out == 0
    async with make_session_maker(engine)() as session:
        assert await driver_connection(session) is used  # not thrown away: the same one
        assert (await session.exec(select(Team))).all() == []  # the row written first is gone
        await session.exec(text("SELECT 1"))
    assert pool_status(engine).checked_out == 0


@pytest.mark.parametrize("slow", [SLOW_READ, SLOW_WRITE], ids=["read", "write"])
async def test_an_engine_timeout_stops_a_slow_statement_and_keeps_its_connection(
    backend, database_url, engine, slow
) -> None:
    timed = one_connection_engine(database_url, statement_timeout=LIMIT)
    try:
        with pytest.raises(DBAPIError) as info:
            async with session_scope(make_session_maker(timed)) as session:
                session.add(Team(name="written first"))
                await session.flush()
                used = await driver_connection(session)
                started = time.monotonic()
                await session.exec(text(slow[backend]))
        assert time.monotonic() - started < IN_TIME
        assert is_statement_timeout(info.value)
        await assert_healthy_and_reused(timed, used)
    finally:
        await timed.dispose()


@pytest.mark.parametrize("slow", [SLOW_READ, SLOW_WRITE], ids=["read", "write"])
async def test_a_block_timeout_stops_a_slow_statement_and_ends_with_the_block(
    backend, database_url, engine, slow
) -> None:
    plain = one_connection_engine(database_url)  # no limit of its own
    used = []

    async def work(session: AsyncSession) -> None:
        session.add(Team(name="written first"))
        await session.flush()
        used.append(await driver_connection(session))
        await session.exec(text(slow[backend]))

    try:
        async with make_session_maker(plain)() as session:
            started = time.monotonic()
            with pytest.raises(DBAPIError) as info:
                async with statement_timeout(session, LIMIT):
                    await run_in_transaction(session, work)  # it begins (and ends) its own
            assert time.monotonic() - started < IN_TIME
            assert is_statement_timeout(info.value)
            await pause(session, backend)  # the block's limit ended with the block
            await session.rollback()
        await assert_healthy_and_reused(plain, used[0])
    finally:
        await plain.dispose()


async def test_blocks_nest_and_each_gives_back_the_limit_it_found(
    backend, database_url, engine
) -> None:
    timed = one_connection_engine(database_url, statement_timeout=10)
    try:
        async with make_session_maker(timed)() as session:
            async with statement_timeout(session, None):  # no limit in here ...
                async with statement_timeout(session, LIMIT):
                    with pytest.raises(DBAPIError) as info:
                        await session.exec(text(SLOW_READ[backend]))
                    assert is_statement_timeout(info.value)
                    await session.rollback()  # and a new transaction, still inside
                    with pytest.raises(DBAPIError) as info:
                        await session.exec(text(SLOW_READ[backend]))
                    assert is_statement_timeout(info.value)
                    await session.rollback()
                await pause(session, backend)  # ... and here again
            await pause(session, backend)  # the engine's 10 s
    finally:
        await timed.dispose()


async def test_a_block_limit_never_reaches_the_next_user_of_the_connection(
    backend, database_url, engine
) -> None:
    plain = one_connection_engine(database_url)
    try:
        sessions = make_session_maker(plain)
        async with sessions() as session, statement_timeout(session, LIMIT):
            await session.exec(text("SELECT 1"))
            await session.commit()  # the connection goes back to the pool in the block
            async with sessions() as other:
                await pause(other, backend)  # it has the engine's limit (none), not 0.3 s
            await session.exec(text("SELECT 1"))  # a new transaction, still bounded
            with pytest.raises(DBAPIError) as info:
                await session.exec(text(SLOW_READ[backend]))
            assert is_statement_timeout(info.value)
    finally:
        await plain.dispose()


async def test_a_block_timeout_on_a_connection(backend, database_url, engine) -> None:
    plain = one_connection_engine(database_url)
    try:
        async with plain.connect() as connection:
            async with statement_timeout(connection, LIMIT):
                with pytest.raises(DBAPIError) as info:
                    await connection.execute(text(SLOW_READ[backend]))
            assert is_statement_timeout(info.value)
            await connection.rollback()
            await connection.execute(text(PAUSE[backend]), {"s": 2 * LIMIT})
            await connection.rollback()
        assert pool_status(plain).checked_out == 0
    finally:
        await plain.dispose()


async def test_an_interrupted_sqlite_write_fails_the_rest_of_its_transaction(
    backend, database_url, engine
) -> None:
    # SQLite rolls the whole transaction back when it interrupts a write: what the
    # caller does next in it must fail too (as on PostgreSQL), not commit half of it.
    if backend != "sqlite":
        pytest.skip("SQLite's own behaviour")
    plain = one_connection_engine(database_url)
    try:
        async with make_session_maker(plain)() as session:
            session.add(Team(name="written first"))
            await session.flush()
            async with statement_timeout(session, LIMIT):
                with pytest.raises(DBAPIError) as info:
                    async with session.begin_nested():
                        await session.exec(text(SLOW_WRITE[backend]))
            assert is_statement_timeout(info.value)  # not "no such savepoint"
            with pytest.raises(DBAPIError) as again:
                await session.exec(text("INSERT INTO team (name) VALUES ('after')"))
            assert again.value is info.value
            with pytest.raises(DBAPIError) as commit:
                await session.commit()  # nothing of it is left to commit
            assert commit.value is info.value
            await session.rollback()
            assert (await session.exec(select(Team))).all() == []
    finally:
        await plain.dispose()


async def test_postgresql_needs_a_transaction_for_a_block_timeout(
    backend, database_url, engine
) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite and MySQL bound autocommit statements too")
    reads = make_read_engine(database_url)  # autocommit: SET LOCAL would end at once
    try:
        async with make_session_maker(reads)() as session:
            with pytest.raises(ValueError, match="autocommit"):
                async with statement_timeout(session, LIMIT):
                    await session.exec(text("SELECT 1"))
    finally:
        await reads.dispose()


async def test_an_autocommit_engine_has_its_own_statement_timeout(
    backend, database_url, engine
) -> None:
    if backend == "postgresql" and resolve_pooler():
        pytest.skip("behind PgBouncer only the role's own setting bounds autocommit statements")
    reads = make_read_engine(database_url, statement_timeout=LIMIT)
    try:
        async with make_session_maker(reads)() as session:
            with pytest.raises(DBAPIError) as info:
                await session.exec(text(SLOW_READ[backend]))
            assert is_statement_timeout(info.value)
    finally:
        await reads.dispose()


def test_behind_pgbouncer_an_autocommit_engine_says_where_its_timeout_goes() -> None:
    with pytest.raises(ConfigurationError, match="ALTER ROLE"):
        make_read_engine("postgresql://app@db/app", pooler="pgbouncer", statement_timeout=LIMIT)


def test_a_statement_timeout_is_positive_seconds() -> None:
    for wrong in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            make_engine("sqlite+aiosqlite://", statement_timeout=wrong)
        with pytest.raises(ValueError, match="positive"):
            statement_timeout(None, wrong)  # type: ignore[arg-type]


async def test_a_timed_out_request_is_a_503_with_a_reason(backend, database_url, engine) -> None:
    app = create_app(database_url)

    @app.get("/slow-report")  # a test-only route: the product app has none
    async def slow_report(session: SessionDep) -> None:
        async with statement_timeout(session, LIMIT):
            await session.exec(text(SLOW_READ[backend]))

    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            started = time.monotonic()
            response = await client.get("/slow-report")
            assert time.monotonic() - started < IN_TIME
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert response.json() == {
                "detail": "Database unavailable: a statement ran past its time limit and was "
                "stopped"
            }
            assert (await client.get("/teams/")).status_code == 200  # the app goes on
        assert pool_status(app.state.engine).checked_out == 0
    finally:
        await app.state.engine.dispose()


# -- Behind PgBouncer in transaction mode: startup parameters are refused ------------------


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("where", ["engine", "block"])
async def test_statement_timeouts_work_behind_pgbouncer(bouncer, database_url, driver, where):
    url = database_url.set(drivername=f"postgresql+{driver}", host="127.0.0.1", port=bouncer)
    options = {"statement_timeout": LIMIT} if where == "engine" else {}
    engine = make_engine(url, pooler="pgbouncer", **options)  # SET LOCAL as each transaction begins
    try:
        async with make_session_maker(engine)() as session:
            started = time.monotonic()
            block = statement_timeout(session, LIMIT) if where == "block" else nullcontext()
            with pytest.raises(DBAPIError) as info:
                async with block:
                    await session.exec(text(SLOW_READ["postgresql"]))
            assert time.monotonic() - started < IN_TIME
            assert is_statement_timeout(info.value)
            await session.rollback()
            await session.exec(text("SELECT 1"))
        assert pool_status(engine).checked_out == 0
    finally:
        await engine.dispose()


# -- Found by an adversarial review ---------------------------------------------------------


@pytest.mark.parametrize("inside", ["begin_nested", "run_in_transaction"])
async def test_a_savepoint_inside_a_block_does_not_keep_the_blocks_limit(
    backend, engine, inside
) -> None:
    """PostgreSQL: the savepoint's begin ran SET LOCAL again and recorded the block's own
    limit as the one to restore, so the rest of the transaction kept it."""
    engine = one_connection_engine(engine.url)
    async with make_session_maker(engine)() as session, session.begin():
        await session.exec(text("SELECT 1"))  # the transaction has its connection
        async with statement_timeout(session, LIMIT):
            if inside == "begin_nested":
                async with session.begin_nested():
                    await session.exec(text("SELECT 1"))
            else:

                async def work(tx: AsyncSession) -> None:
                    await tx.exec(text("SELECT 1"))

                await run_in_transaction(session, work)  # joins: a SAVEPOINT
        await session.exec(text(PAUSE[backend]), params={"s": LIMIT + 0.3})  # no limit now
    await engine.dispose()


async def test_a_cancelled_sqlite_statement_is_still_stopped_by_its_limit(backend) -> None:
    """The caller's cancellation stopped the interrupt timer: the statement then ran to
    its end in aiosqlite's thread, and the cancelled caller waited for it (seconds)."""
    if backend != "sqlite":
        pytest.skip("the interrupt timer is SQLite's")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite+aiosqlite:///{folder}/t.db", statement_timeout=LIMIT)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):  # the caller's own: not a PendingRollbackError
                async with asyncio.timeout(0.1), engine.connect() as conn:
                    await conn.execute(text(SLOW_READ["sqlite"]))
            assert time.monotonic() - started < IN_TIME
        finally:
            await engine.dispose()


async def test_a_users_init_command_keeps_the_kits_timeouts(backend, database_url) -> None:
    """MySQL/MariaDB: a user's init_command replaced the kit's, so the connection had
    neither lock nor statement timeout while the engine thought it had."""
    if backend != "mysql":
        pytest.skip("init_command is aiomysql's")
    engine = make_engine(
        database_url,
        statement_timeout=LIMIT,
        connect_args={"init_command": "SET SESSION sql_mode = 'STRICT_ALL_TABLES'"},
    )
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT @@innodb_lock_wait_timeout")) == 5
            assert "STRICT_ALL_TABLES" in await conn.scalar(text("SELECT @@sql_mode"))
            with pytest.raises(DBAPIError) as stopped:
                await conn.execute(text(SLOW_READ["mysql"]))
            assert is_statement_timeout(stopped.value)
    finally:
        await engine.dispose()


def test_mariadb_limits_round_up_but_no_limit_stays_none() -> None:
    """0.000000 is MariaDB's "no limit": a tiny limit rounds up to a microsecond, and a
    block's "no limit" (0) must stay 0 (the rounding once turned it into 1 µs)."""
    assert mysql_set_session(True, 4e-7).endswith("= 0.000001")
    assert mysql_set_session(True, 0.0).endswith("= 0.000000")
    assert mysql_set_session(True, None).endswith("= DEFAULT")
