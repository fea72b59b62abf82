"""LISTEN/NOTIFY wake-ups for the job queue (``asyncpatterns.notify``): with a listener
an idle worker starts a new job at once instead of at its next poll, on asyncpg and
psycopg; a notification is delivered at commit and dropped on rollback; a listener
whose connection is killed says so once, the workers poll meanwhile, and it comes
back; SQLite and MariaDB poll; behind PgBouncer the listener needs a direct URL.

Timing bounds are generous (the machine is shared): "at once" is well under the
30 s poll, "waits its poll" is more than 1 s of a 1.5 s poll."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import jobs
from asyncpatterns.bench.pickup import measure_pickup
from asyncpatterns.db import make_engine, make_session_maker
from asyncpatterns.db.pooler import resolve_pooler
from asyncpatterns.models import Job
from asyncpatterns.notify import DIRECT_URL, Listener, channel_name, notify
from asyncpatterns.topology.pgbouncer import free_port

WAIT = 30.0  # seconds: the bound on waits that should end much sooner
AT_ONCE = 5.0  # seconds: "without waiting for the poll" (30 s), on a busy machine
DRIVERS = ("asyncpg", "psycopg")
BEHIND_POOLER = (
    "the test database is behind PgBouncer (DATABASE_POOLER) and this run has no direct "
    "URL for LISTEN; the direct run tests NOTIFY on both drivers, the pooler tests run here"
)


@pytest.fixture(params=DRIVERS)
async def pg_engine(
    request: pytest.FixtureRequest, backend: str, database_url: URL, engine: AsyncEngine
) -> AsyncIterator[AsyncEngine]:
    """The test database on PostgreSQL, through each driver in turn (rows deleted after
    the test by ``engine``)."""
    if backend != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; the other backends poll (tested below)")
    if resolve_pooler() is not None:
        pytest.skip(BEHIND_POOLER)
    if database_url.get_driver_name() == request.param:
        yield engine
        return
    other = make_engine(database_url.set(drivername=f"postgresql+{request.param}"))
    yield other
    await other.dispose()


@pytest.fixture
async def pooled_engine(
    request: pytest.FixtureRequest, backend: str, database_url: URL, engine: AsyncEngine
) -> AsyncIterator[AsyncEngine]:
    """The test database behind PgBouncer in transaction mode: the test engine when the
    run is behind one (CI's psycopg run), else through a PgBouncer of our own."""
    if backend != "postgresql":
        pytest.skip("PgBouncer pools PostgreSQL connections")
    if resolve_pooler() is not None:
        yield engine
        return
    bouncer: int = request.getfixturevalue("bouncer")
    through = database_url.set(host="127.0.0.1", port=bouncer)
    pooled = make_engine(through, pooler="pgbouncer")
    yield pooled
    await pooled.dispose()


async def until(check: Any, what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def enqueue_one(engine: AsyncEngine) -> int:
    async with make_session_maker(engine)() as session:
        job = await jobs.enqueue(session, Job, {"mail": "welcome"})
    assert job.id is not None
    return job.id


async def idle_worker(engine: AsyncEngine, stop: asyncio.Event, **options: Any) -> Any:
    """Start a worker that records when each job starts; return (task, starts) once its
    first claim has found nothing, so the job enqueued next meets an idle worker."""
    starts: dict[int, float] = {}
    claimed = asyncio.Event()

    async def record(session: AsyncSession, job: Job) -> None:
        starts[job.id] = time.monotonic()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE") or "FOR UPDATE" in statement:
            claimed.set()  # the claim is decided (nothing to claim: the table is empty)

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        task = asyncio.create_task(jobs.run_worker(engine, Job, record, stop=stop, **options))
        await asyncio.wait_for(claimed.wait(), WAIT)
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", after)
    await asyncio.sleep(0.05)  # from the empty claim to the idle wait: no database call
    return task, starts


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "asyncpatterns.notify" and r.levelno >= logging.WARNING
    ]


async def test_a_listener_wakes_an_idle_worker_at_once(pg_engine: AsyncEngine) -> None:
    stop = asyncio.Event()
    async with Listener(pg_engine, Job) as listener:
        assert listener.listening and listener.backend_pid is not None
        worker, starts = await idle_worker(pg_engine, stop, poll=30.0, listener=listener)
        try:
            enqueued = time.monotonic()
            job_id = await enqueue_one(pg_engine)
            await until(lambda: _started(starts, job_id), "the job started", AT_ONCE)
        finally:
            stop.set()
            # stop ends the idle wait too: the worker returns long before its 30 s poll
            assert await asyncio.wait_for(worker, AT_ONCE) == 1
    assert starts[job_id] - enqueued < AT_ONCE


async def _started(starts: dict[int, float], job_id: int) -> bool:
    return job_id in starts


async def test_without_a_listener_an_idle_worker_waits_for_its_poll(engine: AsyncEngine) -> None:
    stop = asyncio.Event()
    worker, starts = await idle_worker(engine, stop, poll=1.5)
    try:
        enqueued = time.monotonic()
        job_id = await enqueue_one(engine)
        await until(lambda: _started(starts, job_id), "the job started")
    finally:
        stop.set()
        await asyncio.wait_for(worker, WAIT)
    assert starts[job_id] - enqueued > 1.0  # the rest of the 1.5 s poll (enqueued ~0.05 s in)


async def test_a_notification_comes_at_commit_and_never_after_a_rollback(
    pg_engine: AsyncEngine,
) -> None:
    maker = make_session_maker(pg_engine)
    async with Listener(pg_engine, Job) as listener:
        heard = listener.heard
        with pytest.raises(RuntimeError, match="domain write failed"):
            async with maker() as session, session.begin():
                await jobs.enqueue(session, Job, {"mail": "welcome"})  # notifies in this tx
                raise RuntimeError("domain write failed")
        assert not await listener.wait(1.0, since=heard)  # rolled back: nobody woken
        async with maker() as session, session.begin():
            await notify(session, Job)
            assert not await listener.wait(0.5, since=heard)  # not before the commit
        await until(lambda: _heard_since(listener, heard), "the notification", AT_ONCE)
        # Heard before anyone waited: a wait since then returns at once (no lost wake-up).
        assert await asyncio.wait_for(listener.wait(WAIT, since=heard), AT_ONCE)
        assert listener.heard == heard + 1


async def _heard_since(listener: Listener, heard: int) -> bool:
    return listener.heard != heard


async def test_a_killed_listener_connection_is_polled_around_then_restored(
    pg_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncpatterns.notify")
    stop = asyncio.Event()
    async with Listener(pg_engine, Job, reconnect=2.0) as listener:
        pid = listener.backend_pid
        async with pg_engine.connect() as conn:
            query = "SELECT query FROM pg_stat_activity WHERE pid = :pid"
            assert (await conn.execute(text(query), {"pid": pid})).scalar_one() == 'LISTEN "job"'
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await conn.commit()
        await until(lambda: _down(listener), "the listener to notice")
        seen_listening: list[bool] = []

        async def record(session: AsyncSession, job: Job) -> None:
            seen_listening.append(listener.listening)

        options = {"stop": stop, "poll": 0.2, "listener": listener}
        worker = asyncio.create_task(jobs.run_worker(pg_engine, Job, record, **options))
        try:
            await enqueue_one(pg_engine)
            await until(lambda: _ran(seen_listening, 1), "the job run while the listener is down")
            assert seen_listening == [False]  # run by polling: reconnecting takes >= 2 s
            await until(lambda: _up(listener), "the listener back")
            assert listener.backend_pid != pid
            heard = listener.heard
            async with make_session_maker(pg_engine)() as session, session.begin():
                await notify(session, Job)
            assert await listener.wait(AT_ONCE, since=heard)  # it hears again
        finally:
            stop.set()
            await asyncio.wait_for(worker, WAIT)
    [warning] = warnings_of(caplog)  # one for the outage: no traceback, none per retry
    assert "down" in warning.getMessage() and warning.exc_info is None


async def _down(listener: Listener) -> bool:
    return not listener.listening


async def _up(listener: Listener) -> bool:
    return listener.listening


async def _ran(runs: list[bool], count: int) -> bool:
    return len(runs) >= count


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_unreachable_server_is_one_warning_and_retries_in_the_background(
    engine: AsyncEngine, backend: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    if backend != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    caplog.set_level(logging.DEBUG, logger="asyncpatterns.notify")
    nowhere = f"postgresql+{driver}://postgres@127.0.0.1:{free_port()}/postgres"  # refused
    async with Listener(engine, Job, direct_url=nowhere, reconnect=0.02) as listener:
        assert not await listener.wait(1.0)  # polls: the whole second
        assert not listener.listening
    retries = [r for r in caplog.records if "still down" in r.getMessage()]
    assert len(retries) >= 3, caplog.text  # it kept trying, quietly
    [warning] = warnings_of(caplog)
    assert warning.exc_info is None and "Cannot connect" in warning.getMessage()


async def test_sqlite_and_mysql_poll_and_their_jobs_run(engine: AsyncEngine, backend: str) -> None:
    if backend == "postgresql":
        pytest.skip("PostgreSQL has NOTIFY: the tests above")
    async with Listener(engine, Job) as listener:
        assert not listener.listening
        begun = time.monotonic()
        assert not await listener.wait(0.3)
        assert time.monotonic() - begun >= 0.25  # it waited its time: it is the poll
        async with make_session_maker(engine)() as session, session.begin():
            await notify(session, Job)  # nothing to send, nothing sent
        stop = asyncio.Event()
        ran: list[int] = []

        async def record(session: AsyncSession, job: Job) -> None:
            ran.append(job.id)
            stop.set()

        job_id = await enqueue_one(engine)
        worker = jobs.run_worker(engine, Job, record, stop=stop, poll=0.05, listener=listener)
        assert await asyncio.wait_for(worker, WAIT) == 1
    assert ran == [job_id]


async def test_channels_keep_their_case_and_overlong_names_are_refused(
    pg_engine: AsyncEngine,
) -> None:
    assert channel_name(Job) == "job"
    for bad in ("", "x" * 64, "nul\x00"):
        with pytest.raises(ValueError, match="1 to 63 bytes"):
            channel_name(bad)
    maker = make_session_maker(pg_engine)
    async with Listener(pg_engine, "Job-Queue") as listener:  # LISTEN "Job-Queue", quoted
        heard = listener.heard
        async with maker() as session, session.begin():
            await notify(session, "job-queue")  # another channel: case is kept, not folded
        assert not await listener.wait(0.5, since=heard)
        async with maker() as session, session.begin():
            await notify(session, "Job-Queue")
        assert await listener.wait(AT_ONCE, since=heard)


async def test_behind_pgbouncer_without_a_direct_url_workers_poll(
    pooled_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(DIRECT_URL, raising=False)
    caplog.set_level(logging.WARNING, logger="asyncpatterns.notify")
    stop = asyncio.Event()
    ran: list[int] = []

    async def record(session: AsyncSession, job: Job) -> None:
        ran.append(job.id)
        stop.set()

    async with Listener(pooled_engine, Job, pooler="pgbouncer") as listener:
        assert not listener.listening
        job_id = await enqueue_one(pooled_engine)  # pg_notify goes through: it is harmless
        worker = jobs.run_worker(
            pooled_engine, Job, record, stop=stop, poll=0.05, listener=listener
        )
        assert await asyncio.wait_for(worker, WAIT) == 1
    assert ran == [job_id]
    [warning] = warnings_of(caplog)
    assert DIRECT_URL in warning.getMessage()


async def test_listen_through_pgbouncer_hears_nothing(pooled_engine: AsyncEngine) -> None:
    """The trap the pooler check avoids: LISTEN through transaction pooling runs, and
    then its server connection serves other clients; the listener never hears."""
    async with Listener(pooled_engine, Job, pooler="") as naive:  # as if it were direct
        assert naive.listening  # LISTEN itself succeeded...
        heard = naive.heard
        async with make_session_maker(pooled_engine)() as session, session.begin():
            await notify(session, Job)
        assert not await naive.wait(1.0, since=heard)  # ...and heard nothing


@pytest.mark.parametrize("driver", DRIVERS)
async def test_behind_pgbouncer_a_direct_url_listens(
    pooled_engine: AsyncEngine, database_url: URL, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if resolve_pooler() is not None:
        pytest.skip(BEHIND_POOLER)
    direct = database_url.set(drivername=f"postgresql+{driver}")
    monkeypatch.setenv(DIRECT_URL, direct.render_as_string(hide_password=False))
    stop = asyncio.Event()
    async with Listener(pooled_engine, Job, pooler="pgbouncer") as listener:
        assert listener.listening
        worker, starts = await idle_worker(pooled_engine, stop, poll=30.0, listener=listener)
        try:
            job_id = await enqueue_one(pooled_engine)  # NOTIFY through the pooler, at commit
            await until(lambda: _started(starts, job_id), "the job started", AT_ONCE)
        finally:
            stop.set()
            await asyncio.wait_for(worker, AT_ONCE)


@pytest.mark.parametrize("listen", [True, False], ids=["notify", "poll"])
async def test_the_pickup_bench_measures_each_job(engine: AsyncEngine, listen: bool) -> None:
    result = await measure_pickup(engine, Job, jobs=3, workers=2, poll=0.2, listen=listen)
    assert len(result.seconds) == 3 and 0 < result.p50 <= result.p99
    assert result.variant == ("notify" if listen else "poll")
    expected = listen and engine.dialect.name == "postgresql" and resolve_pooler() is None
    assert result.listening == expected
