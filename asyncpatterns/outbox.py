"""The transactional outbox: an event is published if and only if its change commits.

Use ``emit(session, Outbox, topic, payload)`` inside the transaction that makes the
change the event announces, and ``relay(engine, Outbox, publish, stop=event)`` in
a process that hands the events to the broker. Any table with the columns of
``models.Outbox`` works. What goes wrong without it:

* Write, commit, then publish: a crash (a deploy, an OOM kill) between the commit
  and the publish loses the event for good; the change happened and nobody heard.
* Publish, then write: the transaction rolls back (a duplicate, a deadlock, a
  refused check) and the consumers act on a change that never happened.
* Publish inside the transaction, before the commit: both of the above can still
  happen, and a slow or unreachable broker holds the transaction's row locks (and
  SQLite's only write lock) while it waits.

Here the event is a row written in the caller's transaction: it commits or rolls
back with the change. A relay claims the oldest unsent events, publishes them and
marks them sent. Claims race as in ``jobs.py``: ``FOR UPDATE SKIP LOCKED`` on the
servers (each relay takes the next free events), ``BEGIN IMMEDIATE`` on SQLite. A
claim is a lease (``locked_until``): a relay killed mid-batch leaves its events to
the next relay once the lease expires. A failed publish is recorded in
``last_error`` and retried after ``backoff * 2**attempts`` seconds; the rest go
on. Every mark is guarded by the claim it belongs to, so a relay whose lease
expired never overwrites the relay that took its events over.

Delivery is at-least-once: a relay killed after the broker took an event but
before the event was marked sent publishes it again. Put ``event.id`` in the
message, and have consumers drop an id they have seen: record it in a table with
a unique column, in the transaction of the consumer's own effect::

    async with session.begin():               # the consumer, on its side
        try:
            async with session.begin_nested():
                session.add(SeenEvent(event_id=message["id"]))  # unique event_id
        except IntegrityError:
            return                            # a redelivery: the effect is done
        await apply(session, message)         # commits with its event_id

Order is the event ids' while nothing fails; a failed event is retried after the
ones behind it, and racing relays interleave: consumers that need an order per
aggregate compare a version in the payload. Times come from the application's
clock, in UTC (``jobs.utc_now``): keep the relays' clocks in sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.session import SessionTransactionOrigin
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import lock_for_writing, make_session_maker
from .jobs import (
    _UNAVAILABLE,
    BACKOFF,
    LEASE,
    Sessions,
    _alone,
    _check_json,
    _check_times,
    _error_text,
    _key,
    _Outage,
    _pk,
    _retry_delay,
    _update_if_held,
    _waitable,
    utc_now,
)

BATCH = 100  # events per claim
M = TypeVar("M", bound=SQLModel)
log = logging.getLogger("asyncpatterns.outbox")


class NoTransactionError(RuntimeError):
    """``emit`` was called with no transaction begun: the event would not commit
    (or roll back) with the change it announces."""


async def emit(
    session: AsyncSession, model: type[M], topic: str, payload: Any, *, key: str | None = None
) -> M:
    """Write an event in the caller's transaction and return it, with its id.

    It is published (by ``relay``) if and only if that transaction commits. Begin
    the transaction first (``async with session.begin():``, ``session_scope``, the
    work of ``run_in_transaction``) and make the change in it: with none begun this
    raises ``NoTransactionError`` and writes nothing. It never commits. ``payload``
    must be JSON that comes back the same on every backend (``jobs._check_json``),
    ``topic`` (and ``key``, e.g. the aggregate's id) text that fits its column:
    anything else is a ``TypeError`` or ``ValueError`` here, before the database is
    asked. No savepoint, on purpose: an event the database refuses
    rolls the caller's transaction back (SQLAlchemy's rule for a failed flush), so
    the change cannot commit without its event.
    """
    _check_json(payload)
    _check_text(model, "topic", topic)
    if key is not None:
        _check_text(model, "key", key)
    transaction = session.sync_session.get_transaction()
    if transaction is None or transaction.origin is SessionTransactionOrigin.AUTOBEGIN:
        raise NoTransactionError(
            "emit() writes the event in the caller's transaction, and none was begun: "
            "begin one and make the change in it (async with session.begin(): ...), "
            "so that the event commits or rolls back with the change."
        )
    await lock_for_writing(session)  # SQLite: this transaction writes
    event = model(topic=topic, key=key, payload=payload, created_at=utc_now(), attempts=0)
    session.add(event)
    await session.flush()
    return event


def _check_text(model: Any, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    length = getattr(model.__table__.c[name].type, "length", None)
    if not value or "\x00" in value or (length is not None and len(value) > length):
        raise ValueError(f"{name} must be 1 to {length} characters, without NUL")
    value.encode()  # a lone surrogate: a UnicodeEncodeError (a ValueError), no database holds it


async def claim(
    sessions: Sessions, model: type[M], *, batch: int = BATCH, lease: float = LEASE
) -> list[M]:
    """Take up to ``batch`` of the oldest unsent events nobody holds (no lease, or
    one expired: a relay that died, or a retry's backoff over) and return them in
    id order, leased for ``lease`` seconds, ``attempts`` counted. Its own
    transaction, committed: one statement where the backend can."""
    _check_times(batch=batch, lease=lease)
    return sorted(
        await _alone(sessions, lambda s: _claim(s, model, batch, lease)),
        key=_key,
    )


async def _claim(session: AsyncSession, model: Any, batch: int, lease: float) -> list[Any]:
    c, key = model.__table__.c, _pk(model)
    now = utc_now()
    free = and_(c.sent_at.is_(None), or_(c.locked_until.is_(None), c.locked_until <= now))
    values = {"attempts": c.attempts + 1, "locked_until": now + timedelta(seconds=lease)}
    if session.get_bind().dialect.update_returning:  # PostgreSQL, SQLite: one statement
        # In (sent_at, id) order, as the index is (sent_at is NULL in all): PostgreSQL
        # walks the index and stops at ``batch``; by id alone it would walk the
        # primary key, through every event ever sent.
        pick = select(key).where(free).order_by(c.sent_at, key).limit(batch)
        # A materialized CTE: as ``id IN (subquery)`` PostgreSQL may run the subquery
        # again for each row, and claim more than ``batch`` events.
        picked = pick.with_for_update(skip_locked=True).cte("picked")
        picked = picked.prefix_with("MATERIALIZED", dialect="postgresql")
        claimed = (
            update(model)
            .where(key.in_(select(picked.c[key.name])))
            .values(values)
            .returning(model)
            .execution_options(synchronize_session=False)
        )
        return list((await session.exec(claimed)).scalars())
    # MySQL/MariaDB (no UPDATE ... RETURNING, no LIMIT in an IN subquery; READ
    # COMMITTED, see jobs._alone): lock the free rows, the others skip them, then
    # update them. By id alone: MariaDB walks the index so, but sorts for (sent_at,
    # id), and a sort locks every unsent row it reads: the other relays get none.
    pick = select(model).where(free).order_by(key).limit(batch)
    events = list((await session.exec(pick.with_for_update(skip_locked=True))).scalars())
    if events:
        ids = [_key(event) for event in events]
        await session.exec(
            update(model)
            .where(key.in_(ids))
            .values(values)
            .execution_options(synchronize_session=False)
        )
        for event in events:
            set_committed_value(event, "attempts", event.attempts + 1)
            set_committed_value(event, "locked_until", values["locked_until"])
    return events


async def mark_sent(sessions: Sessions, event: Any) -> bool:
    """Mark a claimed event sent. False if it is no longer this claim's (its lease
    expired and another relay took it over, or it was marked already)."""
    return await _guarded(sessions, event, sent_at=utc_now(), locked_until=None)


async def _guarded(sessions: Sessions, event: Any, **values: Any) -> bool:
    c = type(event).__table__.c
    held = [c.attempts == event.attempts, c.sent_at.is_(None)]
    return await _update_if_held(sessions, event, held, values)


async def relay(
    sessions: Sessions,
    model: type[M],
    publish: Callable[[M], Awaitable[object]],
    *,
    stop: asyncio.Event,
    batch: int = BATCH,
    lease: float = LEASE,
    poll: float = 1.0,
    backoff: float = BACKOFF,
) -> int:
    """Publish unsent events until ``stop`` is set; return how many this relay published.

    Claims up to ``batch`` events at a time (``claim``) and, in id order, awaits
    ``publish(event)`` for each, then marks it sent. A publish that raises, or
    outlasts the lease, is recorded in ``last_error`` and retried after ``backoff *
    2**attempts`` seconds (at most an hour); the next event goes on. ``publish``
    runs in no transaction: nothing is locked while the broker takes its time.
    After ``stop`` the event in hand finishes and the rest of the batch is given
    back at once; cancelled from outside, the events it had not begun are given
    back too. A lost database or an exhausted pool is waited out, not raised.
    ``publish`` must be an async function (a plain one would send, then fail at
    the await, and send again); any exception it raises, a ``CancelledError`` of its
    own included, is a failed publish, never the relay's end.
    """
    _check_times(batch=batch, lease=lease, poll=poll, backoff=backoff)
    if not (inspect.iscoroutinefunction(publish) or inspect.iscoroutinefunction(publish.__call__)):  # type: ignore[operator]
        # a plain function would publish, then fail at the await: sent again and again
        raise TypeError(f"publish must be an async function, not {publish!r}")
    maker = make_session_maker(sessions) if isinstance(sessions, AsyncEngine) else sessions
    published, outage = 0, _Outage(log, "outbox")
    while not stop.is_set():
        try:
            events = await claim(maker, model, batch=batch, lease=lease)
            outage.over()
            if events:
                published += await _publish_all(maker, events, publish, stop, backoff)
                continue
        except _UNAVAILABLE as exc:
            if not _waitable(exc):
                raise
            outage.began(exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    return published


async def _publish_all(
    maker: async_sessionmaker[AsyncSession],
    events: list[Any],
    publish: Callable[[Any], Awaitable[object]],
    stop: asyncio.Event,
    backoff: float,
) -> int:
    published, index = 0, 0
    try:
        for index, event in enumerate(events):  # noqa: B007 (the except below reads index)
            left = (event.locked_until - utc_now()).total_seconds()
            if stop.is_set() or left <= 0:  # stopping, or the lease is over: leave the rest
                await _give_back(maker, events[index:])
                break
            if await _publish_one(maker, event, publish, left, backoff):
                published += 1
    except BaseException:  # cancelled from outside: the rest of the batch, back at once
        await asyncio.shield(_give_back(maker, events[index + 1 :], quietly=True))
        raise
    return published


async def _give_back(maker: Any, events: list[Any], *, quietly: bool = False) -> None:
    for event in events:
        try:
            await _guarded(maker, event, locked_until=None)  # ours? free it now
        except _UNAVAILABLE:
            if not quietly:
                raise
            return  # the database is away: the leases will free them


async def _publish_one(
    maker: Any, event: Any, publish: Callable[[Any], Awaitable[object]], left: float, backoff: float
) -> bool:
    """Publish one event and mark it sent; on a failure, schedule its retry. True if
    the broker took it."""
    task = asyncio.current_task()
    try:
        async with asyncio.timeout(left):  # past the lease, another relay may take it
            await publish(event)
    except (Exception, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
            raise  # we are cancelled; a CancelledError of publish's own is a failure
        delay = _retry_delay(backoff, event.attempts)
        retry = utc_now() + timedelta(seconds=delay)
        await _guarded(maker, event, locked_until=retry, last_error=_error_text(exc))
        log.warning(
            "event %s (%s): publish failed, retry in %.1f s", _key(event), event.topic, delay
        )
        return False
    if not await mark_sent(maker, event):
        log.warning("event %s: lease lost before it was marked sent: it may go twice", _key(event))
    return True


async def purge_sent(
    sessions: Sessions, model: type[M], older_than: timedelta, *, batch: int = 1000
) -> int:
    """Delete the events sent more than ``older_than`` ago, ``batch`` rows per
    transaction (never a long lock); return how many. Unsent events are never
    touched. Keep them as long as a consumer may need to replay."""
    _check_times(batch=batch)
    cutoff = utc_now() - older_than
    deleted = 0
    while True:
        count: int = await _alone(sessions, lambda s: _delete_sent(s, model, cutoff, batch))
        deleted += count
        if count < batch:
            return deleted


async def _delete_sent(session: AsyncSession, model: Any, cutoff: Any, batch: int) -> int:
    # The ids first, then a DELETE by id that checks again: MySQL allows no LIMIT
    # in an IN subquery, and sent events never become unsent.
    c, key = model.__table__.c, _pk(model)
    old = c.sent_at < cutoff
    ids = list(
        (await session.exec(select(key).where(old).order_by(c.sent_at).limit(batch))).scalars()
    )
    if not ids:
        return 0
    return (await session.exec(delete(model).where(key.in_(ids), old))).rowcount
