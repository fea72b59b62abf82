"""``python -m asyncpatterns bench jobs``: the job queue's claim against the two common ones.

    python -m asyncpatterns bench jobs [--url URL] [--quick] [--json FILE]

Throughput: ``jobs`` queued jobs (2,000; 40 with ``--quick``) drained by 1, 4 and
16 workers (asyncio tasks in one process, the pool sized to the workers), with
the same worker loop around each claim, all in one run:

* ``jobs.claim`` -- the kit's: ``SKIP LOCKED``, each worker takes the next free job;
* ``claim_waiting`` -- ``SELECT ... FOR UPDATE`` then UPDATE, in one transaction:
  every worker queues behind the first one's row lock;
* ``claim_optimistically`` -- read the oldest queued id without a lock, then
  ``UPDATE ... WHERE id = :id AND state = 'queued'``, again on rowcount 0.

The handler does nothing (it yields to the loop once): a job then costs only its
claim and its completion, so the claims' contention is all there is to measure.
A sleeping handler would leave the database idle most of the time and hide it.
Reported per row: jobs/s (and as a ratio to the kit's at the same workers), the
p50 and p99 of one claim, the deadlocks and lock timeouts met (each retried), the
optimistic claim's lost races, and whether every job ran exactly once.

Wake-up latency: one idle worker (``jobs.run_worker``, poll 1 s), jobs enqueued
one at a time at random moments, the time from ``enqueue`` to the handler's start.

The two rivals are what NOT to copy; they take queued jobs only (no lease
expires in the bench) and begin their transactions as the kit's claim does
(READ COMMITTED on MySQL, ``BEGIN IMMEDIATE`` on SQLite), so that the claim
statement is the only difference. SQLite has one writer (``BEGIN IMMEDIATE``
serializes every claim) and no ``FOR UPDATE`` (SQLAlchemy leaves it out): there
the naive claim is the kit's in two statements, and only the optimistic one races.
Nothing here asserts a timing; everything runs in a scratch database
(``throwaway_database``), dropped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import delete, event, func, insert, text, update
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .. import jobs
from ..config import mask_password, resolve_url
from ..db import (
    create_db_and_tables,
    is_lock_timeout,
    is_retryable,
    make_engine,
    make_session_maker,
    throwaway_database,
)
from ..db.pooler import resolve_pooler
from ..models import Job
from ..notify import DIRECT_URL, Listener
from .measure import ANTI, KIT, OTHER

M = TypeVar("M", bound=SQLModel)
T = TypeVar("T")
Maker = async_sessionmaker[AsyncSession]
Claim = Callable[[Maker, Counter[str]], Awaitable[Any]]

FULL = {"jobs": 2000, "wakeups": 40}
QUICK = {"jobs": 40, "wakeups": 5}
WORKERS = (1, 4, 16)
POLL = 1.0  # seconds the idle worker of the wake-up measurement waits between polls
SEED = 7


# --- the rivals: what NOT to copy ----------------------------------------------


async def claim_waiting(sessions: Maker, model: type[M], *, lease: float = jobs.LEASE) -> M | None:
    """The oldest queued job, locked with ``FOR UPDATE`` (no ``SKIP LOCKED``), then
    marked running, in one transaction. Correct, but every worker waits for the row
    the first one locked, then all of them race for the next one."""
    c = model.__table__.c  # type: ignore[attr-defined]

    async def take(session: AsyncSession) -> M | None:
        now = jobs.utc_now()
        due = select(model).where(c.state == jobs.QUEUED, c.run_after <= now)
        oldest = due.order_by(c.run_after, c.id).limit(1).with_for_update()
        job = (await session.exec(oldest)).one_or_none()
        if job is not None:
            job.state, job.attempts = jobs.RUNNING, job.attempts + 1  # type: ignore[attr-defined]
            job.locked_until = now + timedelta(seconds=lease)  # type: ignore[attr-defined]
            await session.flush()
        return job

    return await jobs._alone(sessions, take, level="READ COMMITTED")


async def claim_optimistically(
    sessions: Maker, model: type[M], *, lease: float = jobs.LEASE, tally: Counter[str] | None = None
) -> M | None:
    """Read the oldest queued job without a lock, then ``UPDATE ... WHERE id = :id
    AND state = 'queued'`` (and its ``attempts`` unchanged); rowcount 0 means another
    worker took it first: read again. Correct, but under load most workers read
    the same job, and all but one of their UPDATEs are wasted."""
    c = model.__table__.c  # type: ignore[attr-defined]
    while True:
        now = jobs.utc_now()
        due = select(model).where(c.state == jobs.QUEUED, c.run_after <= now)
        oldest = due.order_by(c.run_after, c.id).limit(1)
        job = await jobs._alone(
            sessions, partial(_one_or_none, query=oldest), level="AUTOCOMMIT", write=False
        )
        if job is None:
            return None
        until = now + timedelta(seconds=lease)
        attempts = job.attempts  # type: ignore[attr-defined]
        mark = (
            update(model)
            .where(c.id == job.id, c.state == jobs.QUEUED, c.attempts == attempts)  # type: ignore[attr-defined]
            .values(state=jobs.RUNNING, attempts=attempts + 1, locked_until=until)
            .execution_options(synchronize_session=False)
        )
        if await jobs._alone(sessions, partial(_rowcount, statement=mark), level="AUTOCOMMIT") == 1:
            job.state, job.attempts, job.locked_until = jobs.RUNNING, attempts + 1, until  # type: ignore[attr-defined]
            return job
        if tally is not None:
            tally["lost races"] += 1


async def _one_or_none(session: AsyncSession, query: Any) -> Any:
    return (await session.exec(query)).one_or_none()


async def _rowcount(session: AsyncSession, statement: Any) -> int:
    return int((await session.exec(statement)).rowcount)


STRATEGIES: list[tuple[str, str, Claim]] = [
    ("kit: jobs.claim (SKIP LOCKED)", KIT, lambda s, t: jobs.claim(s, Job)),
    ("FOR UPDATE, no SKIP LOCKED", ANTI, lambda s, t: claim_waiting(s, Job)),
    (
        "optimistic: read, UPDATE if queued",
        OTHER,
        lambda s, t: claim_optimistically(s, Job, tally=t),
    ),
]

# --- throughput: the same worker loop around each claim ----------------------


@dataclass
class ClaimRun:
    """One claim strategy draining the queue with ``workers`` workers."""

    strategy: str
    kind: str
    workers: int
    jobs: int
    seconds: float
    jobs_per_s: float
    claim_p50_ms: float
    claim_p99_ms: float
    deadlocks: int  # deadlocks and serialization failures, each transaction re-run
    lock_timeouts: int  # waits for a lock that gave up (retried)
    lost_races: int  # optimistic UPDATEs that found the job taken
    row_lock_waits: int | None  # MySQL/MariaDB: Innodb_row_lock_waits, server-wide
    ran_twice: int  # jobs whose handler ran more than once
    never_ran: int  # jobs whose handler never ran
    not_done: int  # jobs not left done after exactly one attempt
    vs_kit: float | None = None  # jobs/s / the kit's with as many workers

    @property
    def violations(self) -> int:
        return self.ran_twice + self.never_ran + self.not_done


async def drain(
    engine: AsyncEngine, strategy: str, kind: str, claim: Claim, workers: int, count: int
) -> ClaimRun:
    """Queue ``count`` jobs, then ``workers`` workers (give ``engine`` a pool that
    fits them) run ``claim``, a no-op handler and ``jobs.complete`` until a claim
    finds nothing; timed, counted, and every job checked done exactly once."""
    sessions = make_session_maker(engine)
    ran: list[int] = []
    claims: list[float] = []

    async def worker(tally: Counter[str]) -> None:
        while True:
            start = time.perf_counter()
            job = await _patiently(claim, sessions, tally)
            if job is None:
                return
            claims.append(time.perf_counter() - start)
            ran.append(job.id)
            await asyncio.sleep(0)  # the handler: no work of its own
            await _patiently(jobs.complete, sessions, job)  # refused: not_done counts it

    ids = await _fill_queue(engine, count)
    await _warm_pool(engine, workers)
    waits = await _row_lock_waits(engine)
    with _lock_errors_counted(engine) as tally:
        start = time.perf_counter()
        await asyncio.gather(*(worker(tally) for _ in range(workers)))
        seconds = time.perf_counter() - start
    if waits is not None:
        waits = (await _row_lock_waits(engine) or 0) - waits
    runs = Counter(ran)
    p50, p99 = _percentiles(claims)
    return ClaimRun(
        strategy, kind, workers, count, seconds, count / seconds, p50, p99,
        tally["deadlocks"], tally["lock timeouts"], tally["lost races"], waits,
        ran_twice=sum(1 for n in runs.values() if n > 1),
        never_ran=len(set(ids) - set(runs)),
        not_done=await _not_done_once(engine),
    )  # fmt: skip


async def _patiently(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``call(*args)``, again after a lock timeout (the database was busy, not
    wrong), as ``run_worker`` does."""
    while True:
        try:
            return await call(*args)
        except DBAPIError as exc:
            if not is_lock_timeout(exc):
                raise


@contextmanager
def _lock_errors_counted(engine: AsyncEngine) -> Iterator[Counter[str]]:
    """Every deadlock and lock timeout the engine's statements meet in the block,
    retried or not (``jobs.claim`` retries its own deadlocks unseen)."""
    tally: Counter[str] = Counter()

    def count(context: ExceptionContext) -> None:
        error = context.sqlalchemy_exception
        if error is not None and is_retryable(error):
            tally["deadlocks"] += 1
        elif error is not None and is_lock_timeout(error):
            tally["lock timeouts"] += 1

    event.listen(engine.sync_engine, "handle_error", count)
    try:
        yield tally
    finally:
        event.remove(engine.sync_engine, "handle_error", count)


async def _fill_queue(engine: AsyncEngine, count: int) -> list[int]:
    """Empty the job table, queue ``count`` jobs due now; their ids."""
    table = Job.__table__  # type: ignore[attr-defined]
    backend = engine.dialect.name
    async with engine.begin() as conn:
        if backend == "sqlite":
            await conn.execute(delete(table))
        else:  # no dead rows or purge backlog left for the next strategy
            await conn.execute(text(f"TRUNCATE TABLE {table.name}"))
    now = jobs.utc_now()
    queued = {"state": jobs.QUEUED, "attempts": 0, "run_after": now}
    rows = [{"payload": {"n": n}, **queued} for n in range(count)]
    async with engine.begin() as conn:
        if rows:  # (no rows at all would insert one, of defaults)
            await conn.execute(insert(table), rows)
        if backend != "sqlite":  # fresh statistics: the same plan for every strategy
            await conn.execute(
                text(f"ANALYZE {'TABLE ' if backend == 'mysql' else ''}{table.name}")
            )
        return list((await conn.scalars(select(table.c.id))).all())


async def _warm_pool(engine: AsyncEngine, workers: int) -> None:
    """Open the pool's connections before the clock starts."""
    async with AsyncExitStack() as stack:
        for _ in range(workers):
            conn = await stack.enter_async_context(engine.connect())
            await conn.execute(text("SELECT 1"))


async def _row_lock_waits(engine: AsyncEngine) -> int | None:
    """MySQL/MariaDB's count of row lock waits so far (the whole server's); None elsewhere."""
    if engine.dialect.name != "mysql":
        return None
    async with engine.connect() as conn:
        row = (await conn.execute(text("SHOW GLOBAL STATUS LIKE 'Innodb_row_lock_waits'"))).one()
    return int(row[1])


async def _not_done_once(engine: AsyncEngine) -> int:
    once = (col(Job.state) == jobs.DONE) & (col(Job.attempts) == 1)
    async with make_session_maker(engine)() as session:
        return (await session.exec(select(func.count()).select_from(Job).where(~once))).one()


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99, in milliseconds (0 for no samples)."""
    if len(seconds) < 2:
        return (seconds[0] * 1000,) * 2 if seconds else (0.0, 0.0)
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def add_kit_ratios(runs: list[ClaimRun]) -> list[ClaimRun]:
    """Fill ``vs_kit``: each run's jobs/s over the kit's with as many workers."""
    kit = {r.workers: r.jobs_per_s for r in runs if r.kind == KIT}
    for run in runs:
        if run.workers in kit:
            run.vs_kit = run.jobs_per_s / kit[run.workers]
    return runs


# --- wake-up latency: enqueue to start, for one idle worker -------------------


@dataclass
class WakeupRun:
    """How long an idle worker took to start jobs enqueued one at a time."""

    worker: str
    jobs: int
    poll: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def wakeup_latency(
    url: URL, count: int, poll: float = POLL, *, listen: bool = False, seed: int = SEED
) -> WakeupRun | None:
    """``count`` jobs enqueued one at a time, each a random 0..``poll`` seconds after
    the previous one started, for one idle ``jobs.run_worker`` polling every ``poll``;
    with ``listen``, woken by a ``notify.Listener`` too. None if that cannot listen
    (not PostgreSQL, or behind a pooler with no ``$DATABASE_DIRECT_URL``)."""
    engine = make_engine(url)
    try:
        await _fill_queue(engine, 0)
        async with AsyncExitStack() as stack:
            listener = None
            if listen:
                hears = Listener(engine, Job, direct_url=_direct_url(url))
                listener = await stack.enter_async_context(hears)
                if not listener.listening:
                    return None
            latencies = await _time_wakeups(engine, count, poll, listener, random.Random(seed))
    finally:
        await engine.dispose()
    p50, p99 = _percentiles(latencies)
    name = f"{'LISTEN/NOTIFY, ' if listen else ''}polling every {poll:g} s"
    return WakeupRun(name, count, poll, p50, p99, max(latencies) * 1000)


async def _time_wakeups(
    engine: AsyncEngine, count: int, poll: float, listener: Listener | None, rng: random.Random
) -> list[float]:
    sessions = make_session_maker(engine)
    started: asyncio.Queue[tuple[Any, float]] = asyncio.Queue()

    async def handler(session: AsyncSession, job: Job) -> None:
        started.put_nowait((job.id, time.perf_counter()))

    latencies: list[float] = []
    stop = asyncio.Event()
    work = jobs.run_worker(engine, Job, handler, stop=stop, poll=poll, listener=listener)
    worker = asyncio.create_task(work)
    try:
        for _ in range(count):
            await asyncio.sleep(rng.uniform(0, poll))
            enqueued = time.perf_counter()
            async with sessions() as session:
                job = await jobs.enqueue(session, Job, {})
            job_id, start = await asyncio.wait_for(started.get(), poll + 30)
            if job_id != job.id:  # one at a time: it can only be this one
                raise RuntimeError(f"job {job_id} started, {job.id} was enqueued")
            latencies.append(start - enqueued)
    finally:
        stop.set()
        await worker
    return latencies


def _direct_url(scratch: URL) -> URL | None:
    """Behind a pooler: ``$DATABASE_DIRECT_URL``'s server, on the scratch database
    (a notification reaches the listeners of its own database only)."""
    direct = os.environ.get(DIRECT_URL)
    if not direct or resolve_pooler() is None:
        return None
    return resolve_url(direct).set(database=scratch.database)


# --- the run, the table, the command -----------------------------------------


@dataclass
class JobsReport:
    backend: str
    url: str  # password masked
    quick: bool
    sizes: dict[str, int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    versions: dict[str, str] = field(default_factory=dict)
    throughput: list[ClaimRun] = field(default_factory=list)
    wakeups: list[WakeupRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_jobs_bench(url: str | URL | None = None, quick: bool = False) -> JobsReport:
    """Every strategy at every worker count, then the wake-up latency, in a scratch database."""
    resolved = resolve_url(url)
    sizes = dict(QUICK if quick else FULL)
    report = JobsReport(
        resolved.get_backend_name(), mask_password(resolved), quick, sizes, os.getloadavg()
    )
    async with throwaway_database(resolved, "asyncpatterns_bench") as scratch:
        setup = make_engine(scratch)
        try:
            await create_db_and_tables(setup, SQLModel.metadata)
            report.versions = await _versions(setup)
        finally:
            await setup.dispose()
        for shift, workers in enumerate(WORKERS):
            report.throughput += await _at_workers(scratch, workers, sizes["jobs"], shift)
        for listen in (False, True) if report.backend == "postgresql" else (False,):
            run = await wakeup_latency(scratch, sizes["wakeups"], listen=listen)
            if run is not None:
                report.wakeups.append(run)
            else:
                report.notes.append(
                    "LISTEN/NOTIFY left out: behind a pooler, LISTEN needs a direct "
                    f"connection; set {DIRECT_URL} to PostgreSQL's own URL"
                )
    order = {name: n for n, (name, _, _) in enumerate(STRATEGIES)}
    report.throughput.sort(key=lambda r: (r.workers, order[r.strategy]))
    add_kit_ratios(report.throughput)
    report.load_after = os.getloadavg()
    return report


async def _at_workers(url: URL, workers: int, count: int, shift: int) -> list[ClaimRun]:
    """Every strategy with ``workers`` workers on one engine, its pool sized to fit:
    first a warm-up drain of each (statements compiled and prepared on every
    connection), then the timed ones, starting with the ``shift``-th."""
    engine = make_engine(url, pool_size=workers, max_overflow=0)
    try:
        for name, kind, claim in STRATEGIES:
            await drain(engine, name, kind, claim, workers, workers)
        turn = STRATEGIES[shift % 3 :] + STRATEGIES[: shift % 3]  # nobody always goes first
        return [await drain(engine, *strategy, workers, count) for strategy in turn]
    finally:
        await engine.dispose()


async def _versions(engine: AsyncEngine) -> dict[str, str]:
    query = "SELECT sqlite_version()" if engine.dialect.name == "sqlite" else "SELECT VERSION()"
    async with engine.connect() as conn:
        server = str((await conn.execute(text(query))).scalar_one())
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "driver": engine.dialect.driver,
        "server": server.split(" on ")[0],
        "cpus": str(os.cpu_count()),
    }


def format_jobs_report(report: JobsReport) -> str:
    """The report as plain text: the throughput table, then the wake-up latency."""
    load = " ".join(f"{x:.2f}" for x in report.load_before)
    after = " ".join(f"{x:.2f}" for x in report.load_after)
    lines = [
        f"asyncpatterns bench jobs on {report.url} ({report.backend}, "
        f"{report.versions.get('driver', '')}, {report.versions.get('server', '')}"
        f"{', quick' if report.quick else ''})",
        f"load average before {load}, after {after}",
        "",
        f"== claim throughput ({report.sizes['jobs']:,} jobs, no-op handler, one run each)",
        f"  {'strategy':<36}{'workers':>8}{'jobs/s':>8}{'x kit':>7}{'claim p50':>10}"
        f"{'p99 ms':>8}{'deadlk':>7}{'lock t/o':>9}{'lost':>6}{'waits':>7}  exactly once",
    ]
    for r in report.throughput:
        waits = "" if r.row_lock_waits is None else str(r.row_lock_waits)
        once = "yes" if not r.violations else (
            f"NO: {r.ran_twice} twice, {r.never_ran} never, {r.not_done} not done"
        )  # fmt: skip
        lines.append(
            f"  {r.strategy:<36}{r.workers:>8}{r.jobs_per_s:>8,.0f}{r.vs_kit or 0:>6.2f}x"
            f"{r.claim_p50_ms:>10.2f}{r.claim_p99_ms:>8.2f}{r.deadlocks:>7}{r.lock_timeouts:>9}"
            f"{r.lost_races:>6}{waits:>7}  {once}"
        )
    lines += [
        "",
        f"== enqueue to start ({report.sizes['wakeups']} jobs, one at a time, one idle worker)",
        f"  {'worker':<36}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}",
    ]
    for w in report.wakeups:
        lines.append(f"  {w.worker:<36}{w.p50_ms:>8.1f}{w.p99_ms:>8.1f}{w.max_ms:>8.1f}")
    lines += [f"  ({note})" for note in report.notes]
    lines += [
        "",
        "x kit: jobs/s over the kit's with as many workers. deadlk: deadlocks (each re-run); "
        "lock t/o: lock waits that timed out (retried); lost: optimistic UPDATEs that found "
        "the job taken; waits: InnoDB row lock waits, server-wide (other sessions' too).",
    ]
    return "\n".join(lines)


def jobs_bench_command(url: str | None, quick: bool = False, json_file: str | None = None) -> int:
    """``python -m asyncpatterns bench jobs``: run, print the table, optionally write JSON."""
    report = asyncio.run(run_jobs_bench(url, quick))
    print(format_jobs_report(report))
    if json_file:
        Path(json_file).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        print(f"\nJSON written to {json_file}")
    return 0
