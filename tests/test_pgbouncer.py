"""PostgreSQL behind a real PgBouncer in transaction mode, on asyncpg and psycopg.

A PgBouncer of our own (``topology.pgbouncer``) runs in front of the test database.
Its ``asyncpatterns_one_server`` database lets every client share one server
connection, so what transaction pooling does to a plain engine (prepared
statements colliding, session state leaking into another client) happens on
every run, not once in a while. Then the kit's ``pooler="pgbouncer"`` engines
run the same traffic and racing writers through it: nothing lost, and no
server connection left behind (PgBouncer's ``SHOW POOLS``).
"""

import asyncio
import subprocess

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import make_engine, make_session_maker
from asyncpatterns.models import Team

DRIVERS = ("asyncpg", "psycopg")
ONE_SERVER = "asyncpatterns_one_server"


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


def through(bouncer: int, database_url: URL, driver: str, database: str | None = None) -> URL:
    """The test database (or ``database``) through the PgBouncer, on ``driver``."""
    return database_url.set(
        drivername=f"postgresql+{driver}",
        host="127.0.0.1",
        port=bouncer,
        database=database or database_url.database,
    )


def admin(bouncer: int, command: str) -> list[dict[str, str]]:
    """A command on PgBouncer's admin console (simple query protocol: psql)."""
    result = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(bouncer), "-U", "postgres", "-d", "pgbouncer"]
        + ["-A", "-F", "\t", "-P", "footer=off", "-c", command],
        capture_output=True,
        text=True,
        check=True,
    )
    header, *rows = result.stdout.splitlines()
    names = header.split("\t")
    return [dict(zip(names, row.split("\t"), strict=True)) for row in rows]


def pools_of(bouncer: int, database: str) -> list[dict[str, str]]:
    return [pool for pool in admin(bouncer, "SHOW POOLS") if pool["database"] == database]


# -- the traps: a plain engine behind transaction pooling ---------------------------------


async def test_asyncpg_prepared_statements_go_missing_behind_transaction_pooling(
    bouncer, database_url
) -> None:
    engine = create_async_engine(through(bouncer, database_url, "asyncpg"))
    try:
        async with engine.connect() as first, engine.connect() as second:
            await first.execute(text("SELECT 1"))  # prepared, and cached, on server connection A
            await first.commit()
            await second.execute(text("SELECT 2"))  # second's transaction holds A now
            with pytest.raises(
                DBAPIError, match=r'prepared statement "__asyncpg_stmt_\w+__" does not exist'
            ):
                await first.execute(text("SELECT 1"))  # on server connection B: not there
    finally:
        await engine.dispose()


async def test_psycopg_prepared_statements_collide_behind_transaction_pooling(
    bouncer, database_url
) -> None:
    engine = create_async_engine(through(bouncer, database_url, "psycopg", ONE_SERVER))
    try:
        async with engine.connect() as first, engine.connect() as second:
            for _ in range(5):  # the sixth execution is prepared, as _pg3_0
                await first.execute(text("SELECT 1"))
                await first.commit()
            await first.execute(text("SELECT 1"))
            await first.commit()
            with pytest.raises(DBAPIError, match=r'prepared statement "_pg3_0" already exists'):
                for _ in range(6):
                    await second.execute(text("SELECT 2"))
                    await second.commit()
    finally:
        await engine.dispose()


async def test_a_plain_set_leaks_into_another_clients_transactions(bouncer, database_url) -> None:
    engine = create_async_engine(
        through(bouncer, database_url, "psycopg", ONE_SERVER),
        connect_args={"prepare_threshold": None},
    )
    setting = text("SELECT current_setting('myapp.tenant', true)")
    try:
        async with engine.connect() as alice, engine.connect() as bob:
            await alice.execute(text("SET myapp.tenant = 'alice'"))  # session state: it stays
            await alice.commit()
            assert (await bob.scalar(setting)) == "alice"  # the trap: Bob is "alice" now
            await bob.commit()
            await alice.execute(text("RESET myapp.tenant"))
            await alice.commit()
            # The fix: SET LOCAL ends with the transaction, on whichever server it ran.
            await alice.execute(text("SET LOCAL myapp.tenant = 'alice'"))
            assert (await alice.scalar(setting)) == "alice"
            await alice.commit()
            assert (await bob.scalar(setting)) in ("", None)
            await bob.commit()
    finally:
        await engine.dispose()


async def test_the_kits_default_engine_says_why_it_cannot_connect(
    bouncer, database_url, driver
) -> None:
    engine = make_engine(through(bouncer, database_url, driver), pooler="")
    try:
        with pytest.raises(DatabaseUnavailableError, match="unsupported startup parameter"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


# -- the fix: make_engine(pooler="pgbouncer") ---------------------------------------------


async def test_pooler_engines_share_one_server_connection_without_collisions(
    bouncer, database_url, driver
) -> None:
    engine = make_engine(through(bouncer, database_url, driver, ONE_SERVER), pooler="pgbouncer")
    try:
        async with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            for i in range(12):  # past psycopg's prepare threshold, on every connection
                for conn, offset in ((a, 1), (b, 2), (c, 3)):
                    assert await conn.scalar(
                        text("SELECT CAST(:n AS integer) + CAST(:k AS integer)"),
                        {"n": i, "k": offset},
                    ) == (i + offset)
                    await conn.commit()
    finally:
        await engine.dispose()


async def test_timeouts_are_set_per_transaction_behind_the_pooler(
    bouncer, database_url, driver
) -> None:
    engine = make_engine(through(bouncer, database_url, driver), pooler="pgbouncer", lock_timeout=2)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SHOW lock_timeout")) == "2s"
    finally:
        await engine.dispose()


async def test_racing_writers_through_the_pooler_lose_nothing_and_leave_no_connection(
    bouncer, database_url, driver
) -> None:
    url = through(bouncer, database_url, driver)
    # More app-side connections (20) than PgBouncer has server connections (4).
    engine = make_engine(url, pooler="pgbouncer", pool_size=20, max_overflow=0)
    sessions = make_session_maker(engine)
    prefix = f"pgb-{driver}"

    async def add(i: int) -> None:
        async with sessions() as session, session.begin():
            session.add(Team(name=f"{prefix}-{i}"))

    try:
        await asyncio.gather(*(add(i) for i in range(200)))
        async with sessions() as session:
            stored = await session.scalar(
                select(func.count()).select_from(Team).where(Team.name.startswith(prefix))
            )
        assert stored == 200
        (pool,) = pools_of(bouncer, database_url.database)
        assert pool["sv_active"] == "0" and pool["cl_waiting"] == "0"
    finally:
        await engine.dispose()
        cleanup = make_engine(database_url)
        async with cleanup.begin() as conn:
            await conn.execute(Team.__table__.delete().where(Team.name.startswith(prefix)))
        await cleanup.dispose()
    clients = [c for c in admin(bouncer, "SHOW CLIENTS") if c["database"] == database_url.database]
    assert clients == []


async def test_a_null_pool_engine_behind_the_pooler_leaves_no_client(
    bouncer, database_url, driver
) -> None:
    engine = make_engine(
        through(bouncer, database_url, driver), pooler="pgbouncer", poolclass=NullPool
    )
    try:
        for _ in range(3):
            async with engine.connect() as conn:
                assert await conn.scalar(text("SELECT 1")) == 1
        clients = [
            c for c in admin(bouncer, "SHOW CLIENTS") if c["database"] == database_url.database
        ]
        assert clients == []  # NullPool closes each connection as it is returned
    finally:
        await engine.dispose()


async def test_bench_pooler_measures_every_variant_on_both_drivers(bouncer, database_url) -> None:
    from asyncpatterns.bench.pooler import format_pooler_rows, run_pooler_bench

    rows = await run_pooler_bench(database_url, quick=True)
    assert {(r["variant"], r["driver"]) for r in rows} == {
        (variant, driver)
        for variant in ("direct", "pgbouncer, app pool", "pgbouncer, no SET LOCAL")
        + ("pgbouncer, NullPool",)
        for driver in DRIVERS
    }
    assert all(r["tps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert "x direct" in format_pooler_rows(rows)
