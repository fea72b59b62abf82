"""A job queue in the database: claimed once at a time, never lost, retried, then dead.

Use ``enqueue(session, Job, payload)`` inside the transaction that makes the work
necessary, and ``run_worker(engine, Job, handler, stop=event)`` in the workers.
Any table with the columns of ``models.Job`` works. What goes wrong without it:

* Claiming as *select the oldest queued job, then mark it running*: two workers
  select the same row and both run it. Here a claim is atomic. PostgreSQL: one
  ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING``,
  one round trip. MySQL 8 / MariaDB 10.6+ (no UPDATE ... RETURNING): ``SELECT ...
  FOR UPDATE SKIP LOCKED``, then the UPDATE, in one transaction. SQLite (one
  writer): the same UPDATE ... RETURNING inside ``BEGIN IMMEDIATE``.
* ``FOR UPDATE`` without ``SKIP LOCKED``: every worker queues behind the first
  one's row lock. With ``SKIP LOCKED`` each takes the next free job.
* Marking a job "running" and trusting the worker to finish it: a worker killed
  mid-job (SIGKILL, OOM, a lost machine) leaves it running forever. Here a claim
  is a *lease* (``locked_until``), renewed while the handler runs; a job whose
  lease expired is claimed again (and ``last_error`` records it). Delivery is
  therefore at-least-once: a handler must be idempotent. Use the job's id as the
  idempotency key (a unique column in what it writes), or write its effect and
  ``complete(session, job)`` in one transaction: then the effect happens once.
* Retrying a failing job at once, forever: here the next attempt waits
  ``backoff * 2**attempts`` seconds, and after ``max_attempts`` the job is dead,
  with its last error, for a person to look at. A job whose worker keeps dying
  goes dead the same way.
* A finished worker that updates "its" job by id alone overwrites the worker
  that took it over after its lease expired. Here every update is guarded by
  the claim it belongs to (state running, same ``attempts``).

Times come from the application's clock, in UTC, on every backend: keep the
workers' clocks in sync (NTP), and the lease well above the skew.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, case, literal, null, or_, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .config import DatabaseUnavailableError
from .db import (
    is_connection_lost,
    is_lock_timeout,
    is_retryable,
    lock_for_writing,
    make_session_maker,
    run_in_transaction,
)
from .notify import Listener, Polling, notify

QUEUED, RUNNING, DONE, DEAD = "queued", "running", "done", "dead"
LEASE = 30.0  # seconds a claim holds a job; renewed every third of it while it runs
MAX_ATTEMPTS = 5
BACKOFF = 1.0  # seconds: the next attempt waits BACKOFF * 2**attempts (at most MAX_DELAY)
MAX_DELAY = 3600.0
GRACE = 10.0  # seconds the job in hand may take to finish after stop; then it is released
LEASE_EXPIRED = "lease expired: the worker running it stopped or lost the database"
ERROR_LENGTH = 2000
MAX_DEPTH = 31  # levels of arrays and objects: MariaDB's json_valid CHECK refuses 32
MAX_PAYLOAD_BYTES = 8_000_000  # half MySQL's default max_allowed_packet (16 MiB)

M = TypeVar("M", bound=SQLModel)
# What a worker or a relay waits out: the database away, busy, or no connection free.
_UNAVAILABLE = (DBAPIError, DatabaseUnavailableError, PoolTimeout)
Sessions = AsyncEngine | async_sessionmaker[AsyncSession]
Handler = Callable[[AsyncSession, Any], Awaitable[None]]
log = logging.getLogger("asyncpatterns.jobs")


def utc_now() -> datetime:
    """The clock jobs are scheduled and leased by: the application's, in UTC."""
    return datetime.now(UTC)


async def enqueue(
    session: AsyncSession, model: type[M], payload: Any, *, run_after: datetime | None = None
) -> M:
    """Queue a job and return it, with its id. Joins the caller's transaction when
    one was begun (the job exists only if the caller's work commits); otherwise
    commits it on its own (``run_in_transaction``). ``payload`` must be JSON:
    anything else is a ``TypeError`` here, before the database is asked, as is a
    naive ``run_after`` (a ``ValueError``: which zone it meant is a guess)."""
    _check_json(payload)
    if run_after is not None and (
        not isinstance(run_after, datetime) or run_after.utcoffset() is None
    ):
        raise ValueError(
            f"run_after must be an aware datetime, e.g. utc_now() + delay: {run_after!r}"
        )
    job = model(payload=payload, state=QUEUED, attempts=0, run_after=run_after or utc_now())

    async def add(tx: AsyncSession) -> M:
        tx.add(job)
        await tx.flush()
        await notify(tx, model)  # PostgreSQL: idle listeners wake when this commits
        return job

    return await run_in_transaction(session, add)


async def claim(
    sessions: Sessions, model: type[M], *, lease: float = LEASE, max_attempts: int = MAX_ATTEMPTS
) -> M | None:
    """Take the next due job (queued and ``run_after`` passed, or running with its
    lease expired) and return it, running, leased for ``lease`` seconds, with
    ``attempts`` counted; None when there is none. Its own transaction, committed.
    A job whose lease expired on its last attempt is moved to dead instead."""
    while True:
        job = await _alone(sessions, lambda s: _claim(s, model, lease, max_attempts))
        if job is None or job.state == RUNNING:
            return job
        log.warning("job %s is dead: its lease expired on attempt %s", _key(job), job.attempts)


async def _claim(session: AsyncSession, model: Any, lease: float, max_attempts: int) -> Any:
    c, key = model.__table__.c, _pk(model)
    now = utc_now()
    expired = and_(c.state == RUNNING, c.locked_until < now)
    until = now + timedelta(seconds=lease)
    if session.get_bind().dialect.update_returning:  # PostgreSQL, SQLite: one statement
        exhausted = and_(expired, c.attempts >= max_attempts)
        due = or_(and_(c.state == QUEUED, c.run_after <= now), expired)
        pick = select(key).where(due).order_by(c.run_after, key).limit(1)
        claimed = (
            update(model)
            .where(key == pick.with_for_update(skip_locked=True).scalar_subquery())
            .values(
                state=case((exhausted, DEAD), else_=RUNNING),
                attempts=case((exhausted, c.attempts), else_=c.attempts + 1),
                locked_until=case((exhausted, null()), else_=literal(until, c.locked_until.type)),
                last_error=case((c.state == RUNNING, LEASE_EXPIRED), else_=c.last_error),
            )
            .returning(model)
            .execution_options(synchronize_session=False)
        )
        return (await session.exec(claimed)).scalar_one_or_none()
    # MySQL/MariaDB (READ COMMITTED, see _alone): lock one free row, the others skip
    # it, then update it. Two scans, each in its index's order and stopping at its
    # first free row: one scan for "a OR b" would lock every row it sorts.
    job = None
    for where, first in (
        (and_(c.state == QUEUED, c.run_after <= now), c.run_after),
        (expired, c.locked_until),
    ):
        pick = select(model).where(where).order_by(first, key).limit(1)
        job = (await session.exec(pick.with_for_update(skip_locked=True))).one_or_none()
        if job is not None:
            break
    if job is not None:
        if job.state == RUNNING:
            job.last_error = LEASE_EXPIRED
        if job.state == RUNNING and job.attempts >= max_attempts:
            job.state, job.locked_until = DEAD, None
        else:
            job.state, job.attempts = RUNNING, job.attempts + 1
            job.locked_until = until
        await session.flush()
    return job


async def complete(where: AsyncSession | Sessions, job: Any) -> bool:
    """Mark a claimed job done. False if it is no longer this claim's (its lease
    expired and another worker took it over, or it was completed already).

    Given a session: runs in the caller's transaction when one was begun (write
    the handler's effect and complete in one transaction: done exactly once, and
    on False roll back), else commits on its own. Given an engine or session
    maker: one statement, its own transaction."""
    return await _guarded(where, job, state=DONE, locked_until=None)


async def fail(
    where: AsyncSession | Sessions,
    job: Any,
    error: BaseException | str,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    backoff: float = BACKOFF,
) -> str | None:
    """Record a failed attempt: queued again after ``backoff * 2**attempts`` seconds,
    or dead after ``max_attempts``, with ``error`` as ``last_error`` either way.
    Returns the new state, None if the job is no longer this claim's. Transactions
    as ``complete``."""
    dead = job.attempts >= max_attempts
    delay = _retry_delay(backoff, job.attempts)
    run_after = job.run_after if dead else utc_now() + timedelta(seconds=delay)
    state = DEAD if dead else QUEUED
    values = {"state": state, "locked_until": None, "last_error": _error_text(error)}
    done = await _guarded(where, job, run_after=run_after, **values)
    return state if done else None


async def release(where: AsyncSession | Sessions, job: Any) -> bool:
    """Give a claimed job back unrun (a worker stopping): due now, the attempt not counted."""
    attempts = job.attempts - 1
    return await _guarded(where, job, state=QUEUED, locked_until=None, attempts=attempts)


async def extend(where: AsyncSession | Sessions, job: Any, lease: float = LEASE) -> bool:
    """Renew a claim's lease: ``lease`` seconds from now. False if it is no longer ours."""
    return await _guarded(where, job, locked_until=utc_now() + timedelta(seconds=lease))


async def _guarded(where: AsyncSession | Sessions, job: Any, **values: Any) -> bool:
    c = type(job).__table__.c
    return await _update_if_held(
        where, job, [c.state == RUNNING, c.attempts == job.attempts], values
    )


async def _update_if_held(
    where: AsyncSession | Sessions, row: Any, held: list[Any], values: dict[str, Any]
) -> bool:
    """Set ``values`` on ``row`` if the ``held`` conditions (its claim) still hold:
    one guarded UPDATE, in the caller's transaction (a session) or its own (an
    engine or session maker). True, and ``row`` updated in memory, if it changed."""
    model = type(row)
    statement = (
        update(model)
        .where(_pk(model) == _key(row), *held)
        .values(**values)
        .execution_options(synchronize_session=False)
    )

    async def write(session: AsyncSession) -> bool:
        return (await session.exec(statement)).rowcount == 1

    if isinstance(where, AsyncSession):
        ours = await run_in_transaction(where, write)
    else:
        ours = await _alone(where, write, one_statement=True)
    if ours:
        for name, value in values.items():
            set_committed_value(row, name, value)
    return ours


async def _alone(
    sessions: Sessions,
    work: Callable[[AsyncSession], Awaitable[Any]],
    *,
    one_statement: bool = False,
    level: str | None = None,
    write: bool = True,
) -> Any:
    """``work`` in a transaction of its own, committed; re-run after a deadlock.
    One statement on a server runs in autocommit: atomic alone, one round trip.
    MySQL's claim runs in READ COMMITTED: no gap locks, no row locked but the one.
    ``level`` overrides the level on a server; on SQLite a ``write`` takes the
    write lock first."""
    maker = make_session_maker(sessions) if isinstance(sessions, AsyncEngine) else sessions
    for attempt in range(1, 6):
        try:
            async with maker(expire_on_commit=False) as session:
                dialect = session.get_bind().dialect
                if dialect.name == "sqlite":
                    if write:
                        await lock_for_writing(session)  # BEGIN IMMEDIATE: the one writer
                else:  # MySQL's REPEATABLE READ would also lock the gaps: enqueues wait
                    alone = one_statement or dialect.update_returning
                    level = level or ("AUTOCOMMIT" if alone else "READ COMMITTED")
                    await session.connection(execution_options={"isolation_level": level})
                result = await work(session)
                await session.commit()
                return result
        except DBAPIError as exc:
            if attempt == 5 or not is_retryable(exc):
                raise
        await asyncio.sleep(0.01 * 2**attempt * random.random())
    raise AssertionError("unreachable")


async def run_worker(
    sessions: Sessions,
    model: type[M],
    handler: Handler,
    *,
    stop: asyncio.Event,
    lease: float = LEASE,
    max_attempts: int = MAX_ATTEMPTS,
    backoff: float = BACKOFF,
    poll: float = 1.0,
    grace: float = GRACE,
    listener: Listener | None = None,
) -> int:
    """Claim and run jobs until ``stop`` is set; return how many this worker ran.

    ``await handler(session, job)`` runs each, in a session of its own that is
    in no transaction (commit what it writes; to write and complete at once:
    ``async with session.begin(): ...; await complete(session, job)``). Returns
    normally: complete; raises: ``fail`` (retry with backoff, or dead). After
    ``stop`` no new job is claimed; the one running gets ``grace`` seconds, then
    it is cancelled and released. A lost database is waited out, not raised.
    With a ``listener`` (``notify.Listener``, one per process) an idle wait ends
    when a job is enqueued; ``poll`` seconds stays the longest wait."""
    _check_times(lease=lease, backoff=backoff, poll=poll, grace=grace, max_attempts=max_attempts)
    maker = make_session_maker(sessions) if isinstance(sessions, AsyncEngine) else sessions
    how = {"lease": lease, "grace": grace, "max_attempts": max_attempts, "backoff": backoff}
    ran, wake, outage = 0, listener or Polling(), _Outage(log, "job queue")
    while not stop.is_set():
        heard = wake.heard  # a job enqueued while we claim still ends the wait below
        try:
            job = await claim(maker, model, lease=lease, max_attempts=max_attempts)
            outage.over()
            if job is not None:
                await _run_one(maker, job, handler, stop, **how)
                ran += 1
                continue
        except _UNAVAILABLE as exc:
            if not _waitable(exc):
                raise
            outage.began(exc)
        await wake.wait(poll, since=heard, stop=stop)
    return ran


async def _run_one(maker: Any, job: Any, handler: Handler, stop: asyncio.Event, **how: Any) -> None:
    lease, grace = how["lease"], how["grace"]

    async def handle() -> None:
        async with maker() as session:
            await handler(session, job)

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(handle())
    stopping = asyncio.create_task(stop.wait())
    deadline, beat = None, loop.time() + lease / 3
    try:
        while not task.done():
            left = lease if deadline is None else deadline - loop.time()
            if left <= 0:
                break
            waits = {task} if stop.is_set() else {task, stopping}
            timeout = min(left, max(beat - loop.time(), 0))
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and deadline is None:
                deadline = loop.time() + grace
            if not task.done() and loop.time() >= beat:
                beat = loop.time() + lease / 3
                # False after the handler's own complete(session, job): not a lost lease
                if not await _extend_quietly(maker, job, lease) and job.state == RUNNING:
                    log.warning("job %s: lease lost; another worker may run it too", _key(job))
    except BaseException:  # cancelled from outside (or worse): give the job back
        task.cancel()  # never leave the handler running behind our back
        await asyncio.shield(_give_back(maker, job, task))
        raise
    finally:
        stopping.cancel()
    if not task.done():  # stopping, and the grace is over: cancel and give it back
        task.cancel()
        await asyncio.wait({task}, timeout=grace)
        await _settle(job, lease, lambda: release(maker, job))
        log.info("job %s released unfinished, for another worker", _key(job))
        return
    error: BaseException | str | None = "cancelled" if task.cancelled() else task.exception()
    if error is None:
        await _settle(job, lease, lambda: complete(maker, job))
    elif (
        await _settle(
            job,
            lease,
            lambda: fail(
                maker, job, error, max_attempts=how["max_attempts"], backoff=how["backoff"]
            ),
        )
        == DEAD
    ):
        log.error("job %s is dead after %s attempts", _key(job), job.attempts)


async def _settle(job: Any, lease: float, write: Callable[[], Awaitable[Any]]) -> Any:
    """Record a job's outcome, retried while the database is busy or away (for up to
    a lease): a finished job whose ``complete`` was lost would run again. Guarded by
    the claim, so a retry after another worker took the job over changes nothing."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + lease, 0.1
    while True:
        try:
            return await write()
        except _UNAVAILABLE as exc:
            if not _waitable(exc) or loop.time() + delay > deadline:
                raise
            log.warning(
                "job %s: outcome not recorded yet (%s); retrying", _key(job), type(exc).__name__
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _give_back(maker: Any, job: Any, task: asyncio.Task[None]) -> None:
    """Release a job whose worker is cancelled, rather than leave it running until its
    lease is over; a database that cannot be reached leaves that to the lease."""
    await asyncio.wait({task}, timeout=1.0)
    try:
        if await release(maker, job):
            log.info("job %s released: its worker was cancelled", _key(job))
    except _UNAVAILABLE as exc:
        log.warning(
            "job %s: not released (%s); its lease will free it", _key(job), type(exc).__name__
        )


async def _extend_quietly(maker: Any, job: Any, lease: float) -> bool:
    try:
        return await extend(maker, job, lease)
    except _UNAVAILABLE as exc:  # the lease may hold
        log.warning("job %s: lease not renewed (%s)", _key(job), type(exc).__name__)
        return True


def _waitable(exc: BaseException) -> bool:
    """Whether an ``_UNAVAILABLE`` error is the database away or busy (wait, then try
    again), rather than a statement it refuses (raise)."""
    return not isinstance(exc, DBAPIError) or is_connection_lost(exc) or is_lock_timeout(exc)


class _Outage:
    """One warning when the database goes away, one line when it answers again: not
    one per poll per worker."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what, self.down = logger, what, False

    def began(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            self.logger.warning(
                "%s: the database is busy or unreachable (%s); waiting",
                self.what,
                type(exc).__name__,
            )

    def over(self) -> None:
        if self.down:
            self.down = False
            self.logger.info("%s: the database answers again", self.what)


def _check_json(payload: Any) -> None:
    """Refuse, with a ``TypeError`` or ``ValueError`` before the database is asked,
    a payload that would not come back as it went in on every backend: not JSON
    (a set, bytes), NaN or infinities, a lone surrogate, a key that is not a str
    (``{1: "a"}`` comes back as ``{"1": "a"}``), nesting deeper than MariaDB's 31 levels,
    or more than ``MAX_PAYLOAD_BYTES`` encoded (MySQL's ``max_allowed_packet``
    would drop the connection, which looks like an outage)."""
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise ValueError(f"the payload is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # the same words on every Python (3.13 adds the value)
        what = "refers to itself" if "ircular" in str(exc) else "holds NaN or an infinity"
        raise ValueError(f"the payload {what}: not JSON") from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:  # lone surrogates raise here too
        raise ValueError(f"the payload is over {MAX_PAYLOAD_BYTES:,} bytes as JSON")
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list | tuple):
            if depth > MAX_DEPTH:
                raise ValueError(f"the payload is nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                if not all(isinstance(key, str) for key in value):
                    raise TypeError("the payload's object keys must be str: others change type")
                value = value.values()
            stack.extend((item, depth + 1) for item in value)


def _retry_delay(backoff: float, attempts: int) -> float:
    """Seconds before the next attempt: ``backoff * 2**attempts``, at most ``MAX_DELAY``
    (and never an overflow, however many attempts)."""
    return min(backoff * 2.0 ** min(attempts, 64), MAX_DELAY)


def _check_times(**values: float) -> None:
    """Refuse what would spin (a lease of 0) or crash later (NaN) with a clear error."""
    for name, value in values.items():
        least = 1 if name in ("max_attempts", "batch") else 0
        positive = name in ("lease", "poll")
        if not math.isfinite(value) or value < least or (positive and value <= 0):
            raise ValueError(
                f"{name} must be a finite number {'> 0' if positive else f'>= {least}'}: {value!r}"
            )


def _pk(model: Any) -> Any:
    return sa_inspect(model).primary_key[0]


def _key(job: Any) -> Any:
    return sa_inspect(job).mapper.primary_key_from_instance(job)[0]


def _error_text(error: BaseException | str) -> str:
    try:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    except Exception:  # an exception whose str() raises
        text = type(error).__name__
    text = text.encode("utf-8", "replace").decode()  # a lone surrogate: no database holds it
    return text.replace("\x00", "\ufffd")[:ERROR_LENGTH]  # PostgreSQL text holds no NUL
