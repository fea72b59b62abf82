import asyncio
import logging
import os
import time
import uuid

import pytest
from sqlalchemy import func, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import select

from asyncpatterns import crud, pooling
from asyncpatterns.config import ConfigurationError, DatabaseUnavailableError
from asyncpatterns.db import (
    create_db_and_tables,
    is_lock_timeout,
    make_engine,
    make_read_engine,
    make_session_maker,
    run_in_transaction,
    session_scope,
)
from asyncpatterns.models import Team, User
from asyncpatterns.testing import SERVER_URL_VARIABLES


def test_missing_driver_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="driver .* is not installed") as info:
        make_engine("mysql+asyncmy://user:s3cret@127.0.0.1/db")  # asyncmy: not a kit dependency
    assert "s3cret" not in str(info.value)
    assert "aiomysql" in str(info.value)  # says what to use instead


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres:s3cret@127.0.0.1:9/db",
        "mysql+aiomysql://root:s3cret@127.0.0.1:9/db",
    ],
)
async def test_unreachable_server_is_one_clear_error(url: str) -> None:
    engine = make_engine(url, pool_pre_ping=False)
    with pytest.raises(DatabaseUnavailableError) as info:
        async with engine.connect():
            pass
    await engine.dispose()
    message = str(info.value)
    assert message.startswith("Cannot connect to ")
    assert "s3cret" not in message and "***" in message
    assert "\n" not in message
    assert "DATABASE_URL" in message  # says what to do


async def test_sqlite_file_in_missing_folder_is_unavailable(tmp_path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/x.db")
    hint = "unable to open database file. The folder .* does not exist: create it"
    with pytest.raises(DatabaseUnavailableError, match=hint):
        async with engine.connect():
            pass
    await engine.dispose()


async def test_server_pool_defaults_pre_ping(database_url: URL, backend: str) -> None:
    engine = make_engine(database_url)
    assert engine.pool._pre_ping is (backend != "sqlite")
    await engine.dispose()


async def test_options_override_defaults(database_url: URL, backend: str) -> None:
    engine = make_engine(database_url, pool_pre_ping=False, echo=False)
    assert engine.pool._pre_ping is False
    await engine.dispose()


async def test_sqlite_enforces_foreign_keys(engine, backend: str) -> None:
    async with engine.connect() as conn:
        if backend == "sqlite":
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1


async def test_session_scope_commits_on_success(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_scope(session_maker) as session:
        session.add(Team(name="kept"))
    async with session_maker() as session:
        assert await _team_names(session) == ["kept"]


async def test_session_scope_rolls_back_on_error(engine) -> None:
    session_maker = make_session_maker(engine)
    with pytest.raises(RuntimeError):
        async with session_scope(session_maker) as session:
            session.add(Team(name="lost"))
            await session.flush()
            raise RuntimeError("boom")
    async with session_maker() as session:
        assert await _team_names(session) == []


async def test_expire_on_commit_is_off(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        team = Team(name="t")
        session.add(team)
        await session.commit()
        assert team.name == "t"  # no lazy reload (MissingGreenlet) after commit


async def _team_names(session) -> list[str]:
    return list((await session.exec(select(Team.name))).all())


async def test_masking_leaves_the_rest_of_an_error_intact() -> None:
    # The password is "1": hiding its text everywhere would mangle "127.0.0.1".
    engine = make_engine("postgresql+asyncpg://postgres:1@127.0.0.1:9/db", pool_pre_ping=False)
    with pytest.raises(DatabaseUnavailableError) as info:
        async with engine.connect():
            pass
    await engine.dispose()
    assert "postgres:***@127.0.0.1:9/db" in str(info.value)


# -- SQLite specifics ------------------------------------------------------------------


async def test_sqlite_autocommit_is_honoured(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'auto.db'}"
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:  # no commit: each statement commits itself
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    finally:
        await engine.dispose()
    engine = make_engine(url)  # and per connection, on a transactional engine
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        async with engine.connect() as conn:  # the next checkout is transactional again
            await conn.execute(text("INSERT INTO t VALUES (3)"))
            await conn.rollback()
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 2
    finally:
        await engine.dispose()


async def _scratch_sqlite(tmp_path, **options):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'writers.db'}", **options)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER)"))
    return engine


async def test_sqlite_writers_take_turns_instead_of_racing_for_the_lock(tmp_path) -> None:
    # 100 writers, each holding the write lock 30 ms, 15 pooled connections, a 1 s lock
    # timeout: in turn, none waits more than ~0.45 s. SQLite's busy handler alone polls,
    # and a quarter of them lost every poll for a whole second ("database is locked").
    engine = await _scratch_sqlite(tmp_path, lock_timeout=1.0)
    session_maker = make_session_maker(engine)

    async def write(n: int) -> None:
        async def work(session) -> None:
            await session.exec(text("INSERT INTO t VALUES (:n)").bindparams(n=n))
            await asyncio.sleep(0.03)
            if n % 10 == 0:
                raise LookupError("a failed writer gives up its turn too")

        async with session_maker() as session:
            await run_in_transaction(session, work, attempts=1)

    try:
        results = await asyncio.gather(*(write(n) for n in range(100)), return_exceptions=True)
        assert [type(r) for r in results] == [
            LookupError if n % 10 == 0 else type(None) for n in range(100)
        ]
        async with engine.connect() as conn:
            stored = (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all()
        assert stored == [n for n in range(100) if n % 10]
    finally:
        await engine.dispose()


async def test_a_sqlite_writer_whose_turn_does_not_come_gets_a_lock_timeout(tmp_path) -> None:
    engine = await _scratch_sqlite(tmp_path, lock_timeout=0.2)
    session_maker = make_session_maker(engine)
    try:
        async with session_scope(session_maker) as holder:
            await holder.exec(text("INSERT INTO t VALUES (1)"))
            started = time.perf_counter()
            with pytest.raises(OperationalError) as info:
                async with session_scope(session_maker) as waiter:
                    await waiter.exec(text("INSERT INTO t VALUES (2)"))
            waited = time.perf_counter() - started
        assert is_lock_timeout(info.value)  # the API answers it with a 503
        assert 0.2 <= waited < 2  # bounded by the lock timeout: no writer waits forever
        async with session_scope(session_maker) as session:  # the turn was given back
            await session.exec(text("INSERT INTO t VALUES (3)"))
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all() == [
                1,
                3,
            ]
    finally:
        await engine.dispose()


async def test_in_memory_sqlite_gives_each_session_the_database_in_turn() -> None:
    # StaticPool (SQLAlchemy's default for :memory:) hands one connection to every
    # session at once: one session's rollback undid another's committed row.
    engine = make_engine("sqlite+aiosqlite:///:memory:")
    try:
        await create_db_and_tables(engine)
        session_maker = make_session_maker(engine)

        async def add_team(i: int) -> None:
            async with session_scope(session_maker) as session:
                session.add(Team(name=f"Team {i}"))
                await session.flush()
                await asyncio.sleep(0)  # let the others run in between
                if i % 2:
                    raise RuntimeError("roll this one back")

        results = await asyncio.gather(*(add_team(i) for i in range(20)), return_exceptions=True)
        assert [isinstance(r, RuntimeError) for r in results] == [i % 2 == 1 for i in range(20)]
        async with session_maker() as session:
            assert sorted(await _team_names(session)) == sorted(
                f"Team {i}" for i in range(0, 20, 2)
            )
    finally:
        await engine.dispose()


async def test_ids_of_deleted_rows_are_never_reused(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        first = await crud.create_user(session, User(name="A", email="a@example.com"))
        first_id = first.id
        assert await crud.delete_user(session, first_id)
        second = await crud.create_user(session, User(name="B", email="b@example.com"))
    assert second.id > first_id  # a PATCH still in flight for A must not land on B


async def test_mysql_tables_are_utf8mb4_whatever_the_database_default(backend) -> None:
    if backend != "mysql":
        pytest.skip("the database default charset is a MySQL setting")
    server = make_engine(os.environ[SERVER_URL_VARIABLES["mysql"]], isolation_level="AUTOCOMMIT")
    name = f"asyncpatterns_latin1_{uuid.uuid4().hex[:8]}"
    try:
        async with server.connect() as conn:
            await conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET latin1"))
        engine = make_engine(server.url.set(database=name))
        try:
            await create_db_and_tables(engine)
            async with make_session_maker(engine)() as session:
                user = await crud.create_user(session, User(name="🙂 李", email="ü@example.com"))
                session.expunge_all()
                stored = await crud.get_user(session, user.id)
            assert (stored.name, stored.email) == ("🙂 李", "ü@example.com")
        finally:
            await engine.dispose()
    finally:
        async with server.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await server.dispose()


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"database": "asyncpatterns_no_such_db"}, "CREATE DATABASE asyncpatterns_no_such_db"),
        ({"username": "asyncpatterns_nobody"}, "Check the user name and password"),
        ({"port": 9}, "Start the server"),
    ],
    ids=["no-database", "no-user", "no-server"],
)
async def test_a_connection_error_says_what_to_do_about_it(backend, change, hint) -> None:
    if backend == "sqlite":
        pytest.skip("a server's errors; test_sqlite_file_in_missing_folder_... covers SQLite")
    url = make_url(os.environ[SERVER_URL_VARIABLES[backend]]).set(**change)
    engine = make_engine(url, pool_pre_ping=False)
    with pytest.raises(DatabaseUnavailableError, match=hint):
        async with engine.connect():
            pass
    await engine.dispose()


def test_a_synchronous_driver_is_one_line_saying_which_to_use() -> None:
    with pytest.raises(ConfigurationError, match=r"synchronous driver.*mysql\+aiomysql://"):
        make_engine("mysql+pymysql://root@127.0.0.1/db")


# -- The read engine: one statement, one round trip ---------------------------------------


async def _teams_around_a_commit(reader_maker, writer_maker) -> tuple[int, int]:
    """Count teams, let another session commit one, count again in the same session."""
    count = select(func.count()).select_from(Team)
    async with reader_maker() as reader:
        before = (await reader.exec(count)).one()
        async with writer_maker() as writer:
            writer.add(Team(name=f"Committed in between {before}"))
            await writer.commit()
        return before, (await reader.exec(count)).one()


async def test_a_read_engine_statement_sees_the_latest_commit(backend: str, engine) -> None:
    read_engine = make_read_engine(engine.url)
    try:
        writers, readers = make_session_maker(engine), make_session_maker(read_engine)
        before, after = await _teams_around_a_commit(readers, writers)
        assert after == before + 1  # no transaction pins a snapshot between the two
        # What a transaction would give instead: one snapshot, except under READ COMMITTED.
        before, after = await _teams_around_a_commit(writers, writers)
        assert after == before + (1 if backend == "postgresql" else 0)
        assert pooling.pool_status(read_engine).pool == "FairAsyncQueuePool"
    finally:
        await read_engine.dispose()


def test_a_read_engine_refuses_an_in_memory_database() -> None:
    with pytest.raises(ConfigurationError, match="one connection"):
        make_read_engine("sqlite+aiosqlite:///:memory:")


async def test_a_failed_statement_shows_no_bound_value(database_url, caplog) -> None:
    # Emails and names are personal data: neither the error nor the SQL log holds them.
    engine = make_engine(database_url, echo=True)  # echo: every statement logged at INFO
    secret = {"name": "Grace Secret", "email": "grace.secret@example.com"}
    insert = text("INSERT INTO team (id, name) VALUES (:id, :name)")
    try:
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            async with engine.begin() as conn:
                await conn.execute(insert, {"id": 99, "name": secret["name"]})
                with pytest.raises(IntegrityError) as info:  # the same id twice
                    await conn.execute(insert, {"id": 99, "name": secret["email"]})
                await conn.rollback()
    finally:
        await engine.dispose()
    assert "parameters hidden" in str(info.value)
    for value in secret.values():
        assert value not in str(info.value) and value not in caplog.text
    assert "INSERT INTO team" in caplog.text  # the statement itself is still logged
    shown = make_engine(database_url, hide_parameters=False)  # the documented switch
    assert not shown.sync_engine.hide_parameters
    await shown.dispose()
