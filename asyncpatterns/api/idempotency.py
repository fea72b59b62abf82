"""``Idempotency-Key``: a money-moving request that is safe to retry, for a day.

Use ``answer_once`` around the work of a request whose retry must not repeat
it (a transfer), with the client's key from ``IdempotencyKeyHeader``. What
goes wrong without it: an answer lost on the way back (a timeout, a dropped
connection) leaves the client unable to tell whether the money moved, and
its retry moves it a second time. Here a retry with the same key and body
gets the first answer, and the work runs once.

Keys expire: a stored answer is kept for ``IDEMPOTENCY_TTL`` (24 hours, as
payment APIs do: retries come within minutes, not days), then the key is new
again, and ``purge_expired_keys`` deletes it. Without that the table grows by a
row per transfer for ever, and keeps every answer (balances) with it.
``purging_expired_keys`` runs the purge in the app's lifespan, every
``PURGE_INTERVAL`` seconds, in batches of ``PURGE_BATCH`` rows, each its own
short transaction: never on a request's path, and never holding many locks.
"""

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from ..db import is_unique_violation, run_in_transaction
from ..models import IdempotencyKey

logger = logging.getLogger("asyncpatterns.api")

IDEMPOTENCY_TTL = timedelta(hours=24)  # how long a retry gets the first answer
PURGE_INTERVAL = 60.0  # seconds between two purges (each worker process purges)
PURGE_BATCH = 500  # rows per DELETE, each in a transaction of its own

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (a UUID): a retry with the same key and body gets "
        "the first answer and moves no money again, for 24 hours (the server's "
        "idempotency_ttl); after that the key is new.",
    ),
]


def utc_now() -> datetime:
    """The clock keys are stamped and expired by: the app's, in UTC (not the database
    server's, so one clock decides on every backend, and a test can replace it)."""
    return datetime.now(UTC)


@dataclass
class KeyExpiry:
    """How long keys live and how they are purged: ``app.state.idempotency``."""

    ttl: timedelta = IDEMPOTENCY_TTL
    purge_interval: float = PURGE_INTERVAL
    purge_batch: int = PURGE_BATCH
    clock: Callable[[], datetime] = field(default=utc_now)


def key_expiry(request: Request) -> KeyExpiry:
    """The app's ``KeyExpiry`` (the defaults for an app ``create_app`` did not make)."""
    return getattr(request.app.state, "idempotency", None) or KeyExpiry()


KeyExpiryDep = Annotated[KeyExpiry, Depends(key_expiry)]


async def answer_once(
    session: AsyncSession,
    key: str,
    request_hash: str,
    work: Callable[[AsyncSession], Awaitable[tuple[int, dict[str, Any]]]],
    *,
    ttl: timedelta = IDEMPOTENCY_TTL,
    clock: Callable[[], datetime] = utc_now,
) -> tuple[int, dict[str, Any]]:
    """Run ``work`` at most once per idempotency ``key`` within ``ttl``; return its
    (status, body). Runs in ``run_in_transaction``: a transaction of its own, or
    the caller's if the caller began one.

    The key is claimed by an INSERT in the same transaction as the work, and
    the answer stored with it, so the key exists exactly when the work was
    committed. A concurrent request with the same key waits on that row and
    then gets the stored answer. A key reused for another request is a 422.

    A key older than ``ttl`` is new: its row is taken over by an UPDATE that
    matches only while the row is still expired, so of twins retrying an
    expired key one takes it over and runs the work; the others wait on the row,
    match nothing, fail the INSERT that follows, and get the new answer.
    """
    keyed = col(IdempotencyKey.key) == key

    async def claim_and_work(tx: AsyncSession) -> tuple[str, int, str]:
        now = clock()
        expired = col(IdempotencyKey.created_at) < now - ttl
        stored = await _stored(tx, key)
        if stored is not None and stored[3] >= now - ttl:
            return stored[:3]  # the first answer (or a reused key, refused below)
        claim = {"request": request_hash, "status_code": 0, "response": "", "created_at": now}
        taken_over = False
        if stored is not None:  # expired: take its row over, unless a twin just did
            renew = sa.update(IdempotencyKey).where(keyed, expired).values(**claim)
            taken_over = (await tx.exec(_unsynchronized(renew))).rowcount == 1
        if not taken_over:  # the claim: a racing twin waits here, then fails
            await tx.exec(sa.insert(IdempotencyKey).values(key=key, **claim))
        status_code, body = await work(tx)
        response = json.dumps(body)
        answer = sa.update(IdempotencyKey).where(keyed)
        await tx.exec(_unsynchronized(answer.values(status_code=status_code, response=response)))
        return request_hash, status_code, response

    try:
        request, status_code, response = await run_in_transaction(session, claim_and_work)
    except IntegrityError as exc:
        if not is_unique_violation(exc, IdempotencyKey.__table__.c.key):
            raise
        # A twin committed first: its answer is ours. A new transaction sees it.
        stored = await _stored(session, key)
        if stored is None:
            raise
        request, status_code, response = stored[:3]
    if request != request_hash:  # answered like any invalid input, with its place
        message = "Idempotency-Key already used for a different request"
        error = {"type": "idempotency_key_reused", "loc": ("header", "Idempotency-Key")}
        raise RequestValidationError([{**error, "msg": message, "input": key}])
    return status_code, json.loads(response)


async def _stored(session: AsyncSession, key: str) -> tuple[str, int, str, datetime] | None:
    statement = select(
        IdempotencyKey.request,
        IdempotencyKey.status_code,
        IdempotencyKey.response,
        IdempotencyKey.created_at,
    ).where(col(IdempotencyKey.key) == key)
    row = (await session.exec(statement)).first()
    return None if row is None else tuple(row)  # type: ignore[return-value]


def _unsynchronized(statement: Any) -> Any:
    # The session holds no IdempotencyKey object to keep in step: skip the search.
    return statement.execution_options(synchronize_session=False)


# -- The purge -------------------------------------------------------------------------


async def purge_expired_keys(
    session_maker: async_sessionmaker[AsyncSession],
    *,
    ttl: timedelta = IDEMPOTENCY_TTL,
    clock: Callable[[], datetime] = utc_now,
    batch: int = PURGE_BATCH,
    stop: asyncio.Event | None = None,
) -> int:
    """Delete the keys older than ``ttl``, at most ``batch`` rows per transaction,
    until none is left (or ``stop`` is set); return how many were deleted.

    Each batch is one short transaction of its own: a purge of a million rows
    never holds a million row locks, nor SQLite's write lock for more than a
    batch. Racing purges (one per worker) are fine: PostgreSQL's skips the rows
    another holds (``SKIP LOCKED``); elsewhere one waits for the other's batch.
    """
    deleted = 0
    while stop is None or not stop.is_set():
        one_batch = functools.partial(delete_expired_batch, cutoff=clock() - ttl, batch=batch)
        async with session_maker() as session:
            count = await run_in_transaction(session, one_batch)
        deleted += count
        if count < batch:
            break
        await asyncio.sleep(0)  # let the requests waiting for the lock go first
    return deleted


async def delete_expired_batch(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    """One bounded DELETE of at most ``batch`` keys created before ``cutoff``, in the
    caller's transaction; the number of rows deleted.

    It locks only the rows it deletes. PostgreSQL and SQLite: ``DELETE ... WHERE key
    IN (SELECT key ... LIMIT n)`` (PostgreSQL's ``FOR UPDATE SKIP LOCKED`` passes
    over a key a request is taking over, or another worker's purge is deleting).
    MySQL allows no LIMIT in an IN subquery, and its ``DELETE ... LIMIT n`` would
    lock every row (and gap) it reads on the way, live keys included, holding up
    the requests inserting new ones: so the keys are read first without locks,
    then deleted by primary key, while still expired.
    """
    table = IdempotencyKey.__table__
    expired = table.c.created_at < cutoff
    oldest = sa.select(table.c.key).where(expired).limit(batch)
    if session.get_bind().dialect.name == "mysql":
        keys = list((await session.exec(oldest)).scalars())
        if not keys:
            return 0
        statement = table.delete().where(table.c.key.in_(keys), expired)
    else:
        statement = table.delete().where(table.c.key.in_(oldest.with_for_update(skip_locked=True)))
    return (await session.exec(statement)).rowcount


@contextlib.asynccontextmanager
async def purging_expired_keys(
    session_maker: async_sessionmaker[AsyncSession], expiry: KeyExpiry
) -> AsyncIterator[asyncio.Task[None]]:
    """Purge expired keys every ``expiry.purge_interval`` seconds while the block
    runs (an app's lifespan), in a task of its own; at the end, let a batch in
    progress finish (no statement cut off half-way), then stop."""
    stop = asyncio.Event()

    async def purge_periodically() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), expiry.purge_interval)
            if stop.is_set():
                return
            try:
                await purge_expired_keys(
                    session_maker,
                    ttl=expiry.ttl,
                    clock=expiry.clock,
                    batch=expiry.purge_batch,
                    stop=stop,
                )
            except Exception as exc:  # the database busy or away: the next round retries
                logger.warning(
                    "purging expired idempotency keys failed (next try in %s s): %s: %s",
                    expiry.purge_interval,
                    type(exc).__name__,
                    exc,
                )

    task = asyncio.create_task(purge_periodically(), name="purge expired idempotency keys")
    try:
        yield task
    finally:
        stop.set()
        await task
