"""Read routing on a real standby: a PostgreSQL primary and a streaming replica of
the test module's own (``clusters.py``), on asyncpg and on psycopg.

Which server answered is asked of the server itself (``inet_server_port()``,
``pg_is_in_recovery()``). The read-your-writes trap is made visible by pausing
the standby's WAL replay (``pg_wal_replay_pause()``): the replica is then
behind by a known commit for as long as the test needs, deterministically.
"""

import asyncio
import importlib.util
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from clusters import Cluster, postgres_cluster, standby_of
from sqlalchemy import MetaData, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import registry
from sqlalchemy.pool import NullPool
from sqlmodel import Field, SQLModel

from asyncpatterns import crud
from asyncpatterns.db import COMMIT_LSN, ReadRouter, make_engine, run_in_transaction

WHO = text("SELECT inet_server_port()")


class Own(SQLModel, registry=registry(metadata=MetaData())):
    """This module's table, in metadata of its own (none of the kit's tables)."""


class Memo(Own, table=True):
    id: int | None = Field(default=None, primary_key=True)
    body: str


async def scalar(url: URL, statement: str):
    """One statement on a connection of its own (autocommit)."""
    engine = make_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            return await conn.scalar(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def primary() -> Iterator[Cluster]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def standby(primary: Cluster) -> Iterator[Cluster]:
    primary.psql("CREATE TABLE memo (id serial PRIMARY KEY, body text NOT NULL)")
    with standby_of(primary) as cluster:
        yield cluster


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    if importlib.util.find_spec(request.param) is None:
        pytest.skip(f"{request.param} is not installed (pip install 'asyncpatterns[bench]')")
    return request.param


@pytest.fixture
async def engines(
    driver: str, primary: Cluster, standby: Cluster
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    writer, reader = make_engine(primary.url(driver)), make_engine(standby.url(driver))
    yield writer, reader
    await writer.dispose()
    await reader.dispose()


@pytest.fixture
async def paused(standby: Cluster) -> AsyncIterator[None]:
    """The standby receives WAL but replays none of it until the test ends."""
    url = standby.url()
    await scalar(url, "SELECT pg_wal_replay_pause()")
    try:
        state = "SELECT pg_get_wal_replay_pause_state()"
        assert await eventually(lambda: scalar(url, state), "paused")
        yield
    finally:
        await scalar(url, "SELECT pg_wal_replay_resume()")


async def eventually(probe, expected, seconds: float = 10.0) -> bool:
    """Whether ``await probe()`` returns ``expected`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if await probe() == expected:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


async def add_memo(router: ReadRouter, body: str, client: str | None = None) -> Memo:
    async with router.session(client) as session:
        memo = Memo(body=body)
        session.add(memo)
        await session.commit()
        return memo


async def test_replication_streams_what_the_router_writes(engines, standby: Cluster) -> None:
    memo = await add_memo(ReadRouter(*engines), "replicated")
    query = f"SELECT body FROM memo WHERE id = {memo.id}"
    assert await eventually(lambda: scalar(standby.url(), query), "replicated")


async def test_reads_go_to_the_replica(engines, standby: Cluster) -> None:
    async with ReadRouter(*engines).session() as session:
        assert session.get_bind().dialect.name == "postgresql"  # asking is not a write
        assert await session.scalar(WHO) == standby.port
        assert await session.scalar(text("SELECT pg_is_in_recovery()")) is True
        assert (await session.exec(select(Memo).limit(1))).all() is not None


async def test_writes_and_what_follows_them_go_to_the_primary(
    engines, primary: Cluster, standby: Cluster
) -> None:
    async with ReadRouter(*engines).session() as session:
        assert await session.scalar(WHO) == standby.port
        memo = Memo(body="in a transaction")
        session.add(memo)
        await session.flush()  # the INSERT: on the primary, not committed
        assert await session.scalar(WHO) == primary.port  # the rest of the transaction too
        assert await session.scalar(text("SELECT pg_is_in_recovery()")) is False
        assert (await session.get(Memo, memo.id, populate_existing=True)).body == "in a transaction"
        await session.rollback()
        assert await session.scalar(WHO) == standby.port  # a new transaction: reads on the replica
        locked = select(Memo).limit(1).with_for_update()
        await session.exec(locked)  # a locking read is a write: the primary
        assert await session.scalar(WHO) == primary.port
    async with ReadRouter(*engines).session(primary=True) as session:
        assert await session.scalar(WHO) == primary.port


async def test_a_text_write_is_not_recognised(engines, primary: Cluster) -> None:
    """The documented limit: text() that writes needs session(primary=True). A
    connection asked for without a statement (``session.connection()``, which the kit's
    upserts and bulk writes use) is the primary's."""
    async with ReadRouter(*engines).session() as session:
        with pytest.raises(DBAPIError, match="read-only transaction"):
            await session.scalar(text("INSERT INTO memo (body) VALUES ('text') RETURNING id"))
    async with ReadRouter(*engines).session(primary=True) as session:
        await session.scalar(text("INSERT INTO memo (body) VALUES ('text') RETURNING id"))
        await session.commit()
    async with ReadRouter(*engines).session() as session:
        connection = await session.connection()
        assert await connection.scalar(WHO) == primary.port


async def test_read_your_writes_trap_and_fixes(
    engines, paused: None, primary: Cluster, standby: Cluster
) -> None:
    # The trap: reads on the replica right after a commit (no pin) miss the write.
    plain = ReadRouter(*engines, pin_seconds=0)
    memo = await add_memo(plain, "saved", client="alice")
    async with plain.session("alice") as session:
        assert await session.scalar(WHO) == standby.port
        assert await session.get(Memo, memo.id) is None  # the trap: "where is my memo?"
    lag = await scalar(
        primary.url(), f"SELECT pg_current_wal_lsn() - '{await replay_lsn(standby)}'::pg_lsn"
    )
    assert lag > 0  # bytes of WAL the replica has not replayed: the lag, made visible

    # Fix 1: the writer's reads stay on the primary for a while; other clients' do not.
    pinned = ReadRouter(*engines, pin_seconds=60)
    memo = await add_memo(pinned, "pinned", client="alice")
    async with pinned.session("alice") as session:
        assert (await session.get(Memo, memo.id)).body == "pinned"
        assert await session.scalar(WHO) == primary.port
    async with pinned.session("bob") as session:
        assert await session.scalar(WHO) == standby.port
    async with pinned.session() as session:  # no client: the session's own writes
        session.add(Memo(body="own"))
        await session.commit()
        assert await session.scalar(WHO) == primary.port

    # Fix 2: wait (bounded) for the replica to replay the commit, else the primary.
    waiting = ReadRouter(*engines, pin_seconds=60, wait_for_replica=0.3)
    memo = await add_memo(waiting, "waited", client="carol")
    start = time.monotonic()
    async with waiting.session("carol") as session:
        assert (await session.get(Memo, memo.id)).body == "waited"  # from the primary
        waited, start = time.monotonic() - start, time.monotonic()
        assert 0.2 < waited < 3  # it waited (at most 0.3 s), then gave up
        assert await session.scalar(WHO) == primary.port
        assert time.monotonic() - start < 0.2  # no second wait for this pin


async def replay_lsn(standby: Cluster) -> str:
    return await scalar(standby.url(), "SELECT pg_last_wal_replay_lsn()::text")


async def test_waiting_for_the_lsn_reads_the_replica_once_replayed(
    engines, standby: Cluster
) -> None:
    waiting = ReadRouter(*engines, pin_seconds=60, wait_for_replica=5)
    async with waiting.session("dave") as session:
        memo = Memo(body="replayed")
        session.add(memo)
        await session.commit()
        lsn = session.info[COMMIT_LSN]
    assert lsn is not None
    async with waiting.session("dave") as session:
        assert (await session.get(Memo, memo.id)).body == "replayed"
        assert await session.scalar(WHO) == standby.port
    # Another process (another worker) given the LSN by the client (a cookie).
    async with ReadRouter(*engines, pin_seconds=60).session(after_lsn=lsn) as session:
        assert (await session.get(Memo, memo.id)).body == "replayed"
        assert await session.scalar(WHO) == standby.port


async def test_an_unreachable_replica_sends_reads_to_the_primary(
    engines, driver: str, primary: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    closed = make_engine(
        URL.create(f"postgresql+{driver}", "postgres", "secret", "127.0.0.1", 9, "postgres")
    )
    router = ReadRouter(engines[0], closed, retry_replica_after=60)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncpatterns.db.replica"):
            for _ in range(3):
                async with router.session() as session:
                    assert await session.scalar(WHO) == primary.port
                    assert (await session.exec(select(Memo).limit(1))).all() is not None
        warnings = [r for r in caplog.records if r.name == "asyncpatterns.db.replica"]
        assert len(warnings) == 1, caplog.text  # one line, not one per read
        assert warnings[0].levelno == logging.WARNING
        line = warnings[0].getMessage()
        assert "127.0.0.1:9" in line and "***" in line and "secret" not in line
        assert re.search("refused|connect call failed", line, re.IGNORECASE), line  # the reason
    finally:
        await closed.dispose()


async def test_a_stopped_standby_then_started_again(
    engines, primary: Cluster, standby: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    router = ReadRouter(*engines, retry_replica_after=0.1)
    async with router.session() as session:  # a pooled replica connection, soon dead
        assert await session.scalar(WHO) == standby.port
    await asyncio.to_thread(standby.stop)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncpatterns.db.replica"):
            async with router.session() as session:
                assert await session.scalar(WHO) == primary.port
        assert "read replica" in caplog.text and f":{standby.port}/" in caplog.text
    finally:
        await asyncio.to_thread(standby.start)
    await asyncio.sleep(0.1)
    async with router.session() as session:
        assert await session.scalar(WHO) == standby.port


async def test_the_kits_unit_of_work_on_a_routed_session(engines, primary: Cluster) -> None:
    """run_in_transaction (begin, savepoint, commit) and crud on a routed session that
    has read from the replica first."""
    router = ReadRouter(*engines, pin_seconds=60)
    async with router.session("erin") as session:
        assert await crud.count(session, Memo) >= 0  # on the replica
        memo = await run_in_transaction(session, lambda s: crud.create(s, Memo(body="uow")))
        assert await session.scalar(WHO) == primary.port  # pinned after the commit
    async with router.session("erin") as session:
        assert (await crud.get(session, Memo, memo.id)).body == "uow"


async def test_a_malformed_lsn_from_a_client_reads_the_primary(engines, primary: Cluster) -> None:
    """The LSN comes back from a client (a cookie): a malformed one was cast on the
    replica and failed the request with a 500 (found by an adversarial review)."""
    router = ReadRouter(*engines, pin_seconds=60, wait_for_replica=0.2)
    for bad in ("not-an-lsn", "0/FFFFFFFFFFFFFFFFFF", "0/1'; SELECT 1; --"):
        async with router.session(after_lsn=bad) as session:
            assert await session.scalar(WHO) == primary.port


def test_lsns_compare_as_positions_not_as_text() -> None:
    from asyncpatterns.db.replica import _later

    assert _later("0/D6F07C40", "0/D6F07B50") and not _later("0/D6F07B50", "0/D6F07C40")
    assert _later("1/0", "0/FFFFFFFF") and _later("0/10", "0/9")  # not "0/9" > "0/10"
    assert not _later(None, "0/1") and not _later("0/1", None)
