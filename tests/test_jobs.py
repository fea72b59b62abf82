"""The job queue (``asyncpatterns.jobs``) on every backend: racing workers take each
job once; a worker killed with SIGKILL mid-job loses nothing (its job is taken
again once the lease expires, and the second attempt is recorded); failures are
retried with backoff, then dead with their last error; ``python -m asyncpatterns
worker`` stops on SIGTERM with status 0 and leaves no job running."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import jobs
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import Job

ROOT = Path(__file__).parent.parent
WAIT = 30.0  # seconds: the bound on every wait below


async def until(check: Callable[[], Awaitable[bool]], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def enqueue_many(engine: AsyncEngine, payloads: list[Any]) -> list[int]:
    async with make_session_maker(engine)() as session, session.begin():
        queued = [await jobs.enqueue(session, Job, payload) for payload in payloads]
    return [job.id for job in queued]


async def all_jobs(engine: AsyncEngine) -> list[Job]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(Job).order_by(col(Job.id)))).all())


async def count_in(engine: AsyncEngine, *states: str) -> int:
    async with make_session_maker(engine)() as session:
        query = select(func.count()).select_from(Job).where(col(Job.state).in_(states))
        return (await session.exec(query)).one()


def url_of(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


def python(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


async def test_each_job_runs_once_under_racing_workers(engine: AsyncEngine) -> None:
    ids = await enqueue_many(engine, [{"n": n} for n in range(200)])
    runs: list[int] = []
    stop = asyncio.Event()

    async def record(session: AsyncSession, job: Job) -> None:
        runs.append(job.id)
        await asyncio.sleep(0)  # let the other workers race

    async def all_done() -> bool:
        return await count_in(engine, jobs.DONE) == len(ids)

    workers = [
        asyncio.create_task(jobs.run_worker(engine, Job, record, stop=stop, poll=0.05))
        for _ in range(8)
    ]
    try:
        await until(all_done, "200 jobs done")
    finally:
        stop.set()
        ran = await asyncio.wait_for(asyncio.gather(*workers), WAIT)
    assert sorted(runs) == sorted(ids) and Counter(runs).most_common(1)[0][1] == 1
    assert sum(ran) == len(ids)
    assert {(job.state, job.attempts, job.last_error) for job in await all_jobs(engine)} == {
        (jobs.DONE, 1, None)
    }


async def test_each_job_runs_once_under_racing_worker_processes(engine: AsyncEngine) -> None:
    ids = await enqueue_many(engine, [{"n": n} for n in range(60)])
    command = ["-m", "asyncpatterns", "worker", "--url", url_of(engine), "--workers", "3"]
    processes = [python(*command, "--poll", "0.05") for _ in range(2)]
    try:
        for process in processes:  # started: its SIGTERM handler is installed
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), WAIT)
            assert line.startswith("worker: "), line
        await until(lambda: _all_done(engine, len(ids)), "60 jobs done by 2 processes")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=WAIT) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    # The demo handler logs "job <id>, attempt <n>" for each run.
    runs = [int(m) for _, err in outputs for m in re.findall(r"job (\d+), attempt 1\b", err)]
    assert sorted(runs) == sorted(ids), outputs
    assert not any(re.search(r"attempt [2-9]", err) for _, err in outputs)


async def _all_done(engine: AsyncEngine, total: int) -> bool:
    return await count_in(engine, jobs.DONE) == total


KILLED_WORKER = """
import asyncio, sys
from pathlib import Path
from asyncpatterns.db import make_engine
from asyncpatterns.jobs import run_worker
from asyncpatterns.models import Job

async def stuck(session, job):
    Path(sys.argv[2]).write_text(str(job.id))
    await asyncio.sleep(3600)  # until the test kills this process

async def main():
    engine = make_engine(sys.argv[1])
    await run_worker(engine, Job, stuck, stop=asyncio.Event(), lease=1.0, poll=0.05)

asyncio.run(main())
"""


async def test_a_job_survives_its_worker_killed_mid_job(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    [job_id] = await enqueue_many(engine, [{"charge": "order-17"}])
    started = tmp_path / "started"
    worker = python("-c", KILLED_WORKER, url_of(engine), str(started))
    try:
        deadline = time.monotonic() + WAIT
        while not started.exists():
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the worker never started the job"
            await asyncio.sleep(0.05)
        [running] = await all_jobs(engine)
        assert (running.state, running.attempts) == (jobs.RUNNING, 1)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=WAIT)
    assert worker.returncode == -signal.SIGKILL

    # Until the lease expires the job is nobody else's; then the next worker takes it.
    runs: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def record(session: AsyncSession, job: Job) -> None:
        runs.append((job.id, job.attempts))
        stop.set()

    await asyncio.wait_for(
        jobs.run_worker(engine, Job, record, stop=stop, lease=1.0, poll=0.05), WAIT
    )
    assert runs == [(job_id, 2)]
    [done] = await all_jobs(engine)
    assert (done.state, done.attempts, done.last_error) == (jobs.DONE, 2, jobs.LEASE_EXPIRED)


async def test_failures_are_retried_with_backoff_then_dead(engine: AsyncEngine) -> None:
    [job_id] = await enqueue_many(engine, [{"to": "nobody"}])
    claimed: list[float] = []
    stop = asyncio.Event()

    async def broken(session: AsyncSession, job: Job) -> None:
        claimed.append(time.monotonic())
        raise ValueError(f"attempt {job.attempts} failed\x00")

    worker = asyncio.create_task(
        jobs.run_worker(
            engine, Job, broken, stop=stop, max_attempts=3, backoff=0.1, poll=0.02, lease=5
        )
    )
    try:
        await until(lambda: _dead(engine), "the job dead")
    finally:
        stop.set()
        await asyncio.wait_for(worker, WAIT)
    [dead] = await all_jobs(engine)
    assert (dead.id, dead.state, dead.attempts) == (job_id, jobs.DEAD, 3)
    assert dead.last_error == "ValueError: attempt 3 failed\ufffd"
    assert dead.locked_until is None
    # backoff * 2**attempts after attempts 1 and 2: 0.2 s, then 0.4 s (never sooner).
    gaps = [later - earlier for earlier, later in zip(claimed, claimed[1:], strict=False)]
    assert len(gaps) == 2 and gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps


async def _dead(engine: AsyncEngine) -> bool:
    return await count_in(engine, jobs.DEAD) == 1


async def test_fail_schedules_the_retry_in_utc(engine: AsyncEngine) -> None:
    await enqueue_many(engine, [{}])
    job = await jobs.claim(engine, Job)
    assert job is not None and job.run_after.tzinfo is not None
    before = jobs.utc_now()
    assert await jobs.fail(engine, job, "busy", backoff=10.0) == jobs.QUEUED
    [stored] = await all_jobs(engine)
    assert stored.run_after.utcoffset() == timedelta(0)
    assert before + timedelta(seconds=20) <= stored.run_after
    assert stored.run_after <= jobs.utc_now() + timedelta(seconds=20)
    assert await jobs.claim(engine, Job) is None  # not due yet


async def test_a_claim_is_a_lease_and_only_its_holder_finishes(engine: AsyncEngine) -> None:
    await enqueue_many(engine, [{}])
    first = await jobs.claim(engine, Job, lease=1.0)  # long enough for a loaded CI machine
    assert first is not None and await jobs.claim(engine, Job) is None  # leased
    await asyncio.sleep(max(0.0, (first.locked_until - jobs.utc_now()).total_seconds()) + 0.05)
    second = await jobs.claim(engine, Job, lease=30)
    assert second is not None and (second.id, second.attempts) == (first.id, 2)
    assert not await jobs.complete(engine, first)  # its lease is over: another's job now
    assert await jobs.fail(engine, first, "late") is None
    assert await jobs.complete(engine, second)
    [done] = await all_jobs(engine)
    assert (done.state, done.attempts) == (jobs.DONE, 2)


async def test_a_job_whose_workers_keep_dying_goes_dead(engine: AsyncEngine) -> None:
    await enqueue_many(engine, [{}])
    assert await jobs.claim(engine, Job, lease=0.05, max_attempts=1) is not None
    await asyncio.sleep(0.2)
    assert await jobs.claim(engine, Job, max_attempts=1) is None
    [dead] = await all_jobs(engine)
    assert (dead.state, dead.attempts, dead.last_error) == (jobs.DEAD, 1, jobs.LEASE_EXPIRED)


async def test_enqueue_joins_the_callers_transaction(engine: AsyncEngine) -> None:
    session_maker = make_session_maker(engine)
    with pytest.raises(RuntimeError, match="domain write failed"):
        async with session_maker() as session, session.begin():
            await jobs.enqueue(session, Job, {"mail": "welcome"})
            raise RuntimeError("domain write failed")
    assert await all_jobs(engine) == []
    async with session_maker() as session:  # no transaction begun: it commits its own
        job = await jobs.enqueue(session, Job, {"mail": "welcome", "text": "Ünïcode \u2603"})
    [stored] = await all_jobs(engine)
    assert (stored.id, stored.payload) == (job.id, {"mail": "welcome", "text": "Ünïcode \u2603"})


async def test_enqueue_refuses_what_is_not_json(engine: AsyncEngine) -> None:
    async with make_session_maker(engine)() as session:
        with pytest.raises(TypeError):
            await jobs.enqueue(session, Job, {"when": object()})
        with pytest.raises(ValueError):
            await jobs.enqueue(session, Job, {"amount": float("nan")})
        with pytest.raises(TypeError, match="keys must be str"):  # {1: 2} reads back {"1": 2}
            await jobs.enqueue(session, Job, {1: 2})
        with pytest.raises(ValueError, match="nested deeper"):
            await jobs.enqueue(
                session,
                Job,
                {"d": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
            )
        with pytest.raises(ValueError, match="aware datetime"):  # not a StatementError
            await jobs.enqueue(session, Job, {}, run_after=datetime(2030, 1, 1))
    assert await all_jobs(engine) == []


async def test_complete_in_the_handlers_transaction_is_exactly_once(engine: AsyncEngine) -> None:
    """The idempotent handler the module docstring describes: its effect and the
    job's completion commit together, so a job run twice has its effect once."""
    [job_id] = await enqueue_many(engine, [{}])
    first = await jobs.claim(engine, Job, lease=0.05)
    await asyncio.sleep(0.2)
    second = await jobs.claim(engine, Job)
    assert first is not None and second is not None
    effects = 0
    for claim in (second, first):  # the old holder wakes up late
        async with make_session_maker(engine)() as session, session.begin():
            if await jobs.complete(session, claim):
                effects += 1  # the effect, written in this transaction
    assert effects == 1
    [done] = await all_jobs(engine)
    assert (done.id, done.state) == (job_id, jobs.DONE)


async def test_sigterm_stops_the_worker_command_cleanly(engine: AsyncEngine) -> None:
    quick, slow = await enqueue_many(engine, [{"sleep": 1}, {"sleep": 120}])
    worker = python(
        "-m", "asyncpatterns", "worker", "--url", url_of(engine), "--workers", "2",
        "--grace", "2", "--poll", "0.05",
    )  # fmt: skip
    try:
        await until(lambda: _running(engine, 2), "both jobs running")
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=WAIT)
    assert worker.returncode == 0, (out, err)
    assert "stopped" in out
    states = {job.id: (job.state, job.attempts) for job in await all_jobs(engine)}
    # The quick one finished within the grace; the slow one was given back, unrun.
    assert states == {quick: (jobs.DONE, 1), slow: (jobs.QUEUED, 0)}


async def _running(engine: AsyncEngine, count: int) -> bool:
    return await count_in(engine, jobs.RUNNING) == count


async def test_the_backend_can_skip_locked_rows(engine: AsyncEngine, backend: str) -> None:
    """MySQL 8 and MariaDB 10.6 are the first with SKIP LOCKED; PostgreSQL has it
    since 9.5; SQLite needs none (one writer at a time)."""
    if backend == "sqlite":
        pytest.skip("SQLite has one writer: nothing to skip")
    async with engine.connect() as conn:
        version = (await conn.execute(text("SELECT VERSION()"))).scalar_one()
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if backend == "mysql":
        assert numbers >= ((10, 6) if "MariaDB" in version else (8, 0)), version
    else:
        assert numbers >= (9, 5), version


async def test_a_claim_is_one_statement_where_the_backend_allows(
    engine: AsyncEngine, backend: str
) -> None:
    await enqueue_many(engine, [{}])
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.split()[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        assert await jobs.claim(engine, Job) is not None
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    expected = {
        "postgresql": ["UPDATE"],  # autocommit: no BEGIN, no COMMIT
        "sqlite": ["BEGIN", "UPDATE"],  # BEGIN IMMEDIATE, then the claim
        "mysql": ["SELECT", "UPDATE"],  # SELECT ... FOR UPDATE SKIP LOCKED, then UPDATE
    }[backend]
    assert sent == expected


HOSTILE_PAYLOADS = [
    {"text": "nul \x00 inside", "emoji": "\U0001f600", "rtl": "\u202eevil"},
    {"big": 2**63, "small": -(2**63), "float": 1e308, "tiny": 5e-324},
    {"deep": [[[[[[[[[[{"x": None}]]]]]]]]]]},
    {"quote": "'; DROP TABLE job; --", "backslash": "\\\\", "json": '{"a": 1}'},
    {"large": "x" * 1_000_000},
    ["not", "a", "dict"],
]


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS, ids=range(len(HOSTILE_PAYLOADS)))
async def test_hostile_payloads_come_back_as_they_went_in(
    engine: AsyncEngine, payload: Any
) -> None:
    [job_id] = await enqueue_many(engine, [payload])
    claimed = await jobs.claim(engine, Job)
    assert claimed is not None and claimed.id == job_id
    assert claimed.payload == payload


@pytest.mark.parametrize(
    "option", [{"lease": 0}, {"lease": float("nan")}, {"backoff": float("nan")}, {"poll": -1}]
)
async def test_a_worker_refuses_times_that_would_spin_or_crash(
    engine: AsyncEngine, option: dict[str, float]
) -> None:
    async def handler(session: AsyncSession, job: Job) -> None:
        pass

    with pytest.raises(ValueError, match="must be a finite number"):
        await jobs.run_worker(engine, Job, handler, stop=asyncio.Event(), **option)  # type: ignore[arg-type]


async def test_a_worker_cancelled_from_outside_gives_its_job_back(engine: AsyncEngine) -> None:
    """A task group torn down, a test's timeout: the job is queued again at once, its
    attempt not counted, instead of held until its lease is over."""
    [job_id] = await enqueue_many(engine, [{}])
    started = asyncio.Event()

    async def handler(session: AsyncSession, job: Job) -> None:
        started.set()
        await asyncio.sleep(3600)

    worker = asyncio.create_task(jobs.run_worker(engine, Job, handler, stop=asyncio.Event()))
    await asyncio.wait_for(started.wait(), WAIT)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    [job] = await all_jobs(engine)
    assert (job.id, job.state, job.attempts, job.locked_until) == (job_id, jobs.QUEUED, 0, None)


async def test_a_handler_that_completes_its_job_is_no_lost_lease(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat's renewal finds the job done by the handler's own transaction
    while the handler goes on: that is no lease lost, and no warning says so."""
    await enqueue_many(engine, [{}])
    stop = asyncio.Event()

    async def handler(session: AsyncSession, job: Job) -> None:
        async with session.begin():
            assert await jobs.complete(session, job)
        await asyncio.sleep(0.5)  # more work after the commit: past a renewal
        stop.set()

    await jobs.run_worker(engine, Job, handler, stop=stop, lease=0.6)
    [job] = await all_jobs(engine)
    assert job.state == jobs.DONE
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]


async def test_an_outage_is_logged_once_not_once_per_poll(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten polls against a database that cannot be reached: one warning, then one
    line when it answers again."""
    from asyncpatterns.config import DatabaseUnavailableError

    polls, stop = 0, asyncio.Event()
    real_claim = jobs.claim

    async def claim(*args: Any, **kwargs: Any) -> Job | None:
        nonlocal polls
        polls += 1
        if polls <= 10:
            raise DatabaseUnavailableError("cannot connect to the database")
        stop.set()
        return await real_claim(*args, **kwargs)

    async def handler(session: AsyncSession, job: Job) -> None:
        pass

    caplog.set_level("INFO", logger="asyncpatterns.jobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs, "claim", claim)
        await jobs.run_worker(engine, Job, handler, stop=stop, poll=0.01)
    said = [r.getMessage() for r in caplog.records if r.name == "asyncpatterns.jobs"]
    assert said == [
        "job queue: the database is busy or unreachable (DatabaseUnavailableError); waiting",
        "job queue: the database answers again",
    ]


async def test_an_error_text_no_database_can_hold_is_recorded_readably(engine: AsyncEngine) -> None:
    await enqueue_many(engine, [{}])
    job = await jobs.claim(engine, Job)
    assert job is not None
    error = RuntimeError("bad \x00 " + b"\xff".decode("utf-8", "surrogateescape"))
    assert await jobs.fail(engine, job, error, backoff=0) == jobs.QUEUED
    [stored] = await all_jobs(engine)
    assert stored.last_error == "RuntimeError: bad \ufffd ?"
    assert jobs._retry_delay(1.0, 10_000) == jobs.MAX_DELAY  # 2**10000 would overflow a float
