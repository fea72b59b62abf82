"""LISTEN/NOTIFY: wake idle workers the moment a job is enqueued (PostgreSQL).

A worker that polls finds a job only at its next look: with ``poll=1`` a job waits
half a second on average and a whole one at worst, and a shorter poll multiplies
the empty claims every idle worker sends. Here ``notify(session, Job)`` (which
``jobs.enqueue`` calls) sends ``pg_notify`` in the job's transaction, and one
``Listener`` per process wakes that process's idle workers when it commits::

    async with Listener(engine, Job) as listener:
        await run_worker(engine, Job, handler, stop=stop, listener=listener)

Polling stays the fallback: on SQLite and MySQL (no NOTIFY: ``wait`` sleeps), and
whenever the listening connection is down. What goes wrong without care:

* NOTIFY outside the job's transaction: a worker woken before the commit finds
  nothing and sleeps a whole poll; one sent for a job rolled back wakes everyone
  for nothing. ``pg_notify`` in the transaction is delivered at its commit and
  dropped with its rollback.
* LISTEN on a pooled connection: the pool resets it, or lends it to a request, and
  the notifications go with it. The listener's connection is taken out of the pool
  (``detach``): made with the engine's own connect settings, never seen again by it.
* A lost wake-up: a job committed while a worker is still claiming wakes nobody
  (the worker is not waiting yet), and it sleeps a whole poll. Read ``heard``
  before looking for work and pass it: ``wait(poll, since=heard)`` returns at once
  if a notification came in the meantime.
* A dropped connection (a restart, ``pg_terminate_backend``, a failover): a
  listener that does not notice hears nothing, ever. Here the drop is seen at once
  (asyncpg's termination listener; psycopg's ``notifies()`` raises), a silent
  network by a ``SELECT 1`` every ``ping`` seconds; one warning is logged and it
  reconnects with backoff, the workers polling meanwhile; once back it wakes them
  all (a job may have come while nobody listened).
* Case folding: ``LISTEN Job`` listens on ``job``, but ``pg_notify('Job', '')``
  sends to ``Job``. Here LISTEN always quotes (``LISTEN "Job"``): any table name
  works as it is, and one PostgreSQL would truncate (over 63 bytes) is refused.
* PgBouncer in transaction mode: the server connection that ran LISTEN goes back
  to PgBouncer's pool, and its notifications reach another client or no one.
  Behind a pooler (``DATABASE_POOLER``) the listener connects to ``direct_url``
  (default ``$DATABASE_DIRECT_URL``), straight to PostgreSQL; without one the
  workers poll, and a warning says so once. NOTIFY itself works through the
  pooler: it belongs to a transaction.

What it costs: one ``SELECT pg_notify`` per ``enqueue``, and one connection per
process beyond its pool. PostgreSQL serializes the commits of transactions that
notified (one queue for the whole server): at thousands of enqueues a second,
measure (``python -m asyncpatterns.bench.pickup`` measures the latency it buys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import Any, Self

from sqlalchemy import func
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from .config import ConfigurationError, resolve_url
from .db import make_engine
from .db.pooler import resolve_pooler

RECONNECT = 1.0  # seconds before the first reconnect; doubled after each failure...
RECONNECT_MAX = 30.0  # ...up to this
PING = 15.0  # seconds between checks of an idle listening connection
FIRST_LISTEN = 10.0  # seconds ``async with Listener`` waits for the first LISTEN
MAX_CHANNEL = 63  # bytes: PostgreSQL's identifier length (NAMEDATALEN - 1)
DIRECT_URL = "DATABASE_DIRECT_URL"

log = logging.getLogger("asyncpatterns.notify")


def channel_name(channel: str | type[Any]) -> str:
    """The channel of a table (its name, as the model declares it) or a name given.
    Any character and case works (LISTEN quotes it); empty, NUL or over 63 bytes is
    a ``ValueError``: PostgreSQL would refuse it in pg_notify and truncate it in LISTEN."""
    name = channel if isinstance(channel, str) else channel.__table__.name
    if not name or "\x00" in name or len(name.encode()) > MAX_CHANNEL:
        raise ValueError(
            f"channel {name!r}: PostgreSQL takes 1 to {MAX_CHANNEL} bytes, no NUL; "
            "pass a shorter name (Listener(engine, 'jobs'), notify(session, 'jobs'))"
        )
    return name


async def notify(session: AsyncSession, channel: str | type[Any]) -> None:
    """Notify ``channel``'s listeners when the session's transaction commits; nothing
    if it rolls back. Runs in the caller's transaction (begun by this statement if
    none was: the caller commits it). A no-op on SQLite and MySQL."""
    if session.get_bind().dialect.name == "postgresql":
        await session.exec(select(func.pg_notify(channel_name(channel), "")))


class Polling:
    """No notifications: each ``wait`` lasts its whole time, cut short by ``stop``.
    What a worker without a listener does; the base of ``Listener``."""

    def __init__(self) -> None:
        self.heard = 0  # notifications so far: read it before you look for work
        self._news = asyncio.Event()  # set, then replaced, at each notification

    async def wait(
        self, seconds: float, *, since: int | None = None, stop: asyncio.Event | None = None
    ) -> bool:
        """Wait up to ``seconds`` for a notification: True when one comes (at once if
        one came after ``heard`` read ``since``), False when the time is up or ``stop`` set."""
        if since is not None and since != self.heard:
            return True
        news = self._news
        waits = [asyncio.create_task(news.wait())]
        if stop is not None:
            waits.append(asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return news.is_set()

    def _wake(self) -> None:
        self.heard += 1
        self._news.set()  # every waiter: one commit may have enqueued many jobs
        self._news = asyncio.Event()


class Listener(Polling):
    """LISTEN on ``channel`` (a table: its name) on a connection of its own, for all
    the workers of one process; reconnects by itself. ``listening`` says whether it
    hears now, ``backend_pid`` is its server process (None while down).

    Its connection comes from ``engine`` (taken out of its pool: one connection beyond
    the pool's size), or from ``direct_url`` (default ``$DATABASE_DIRECT_URL`` when
    the engine is behind a pooler: ``pooler``, default ``$DATABASE_POOLER``). Not
    PostgreSQL, or a pooler and no direct URL: it never hears, and waits just poll.
    ``reconnect``: seconds before the first reconnect (doubling to ``RECONNECT_MAX``);
    ``ping``: seconds between checks that a quiet connection is still there.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        channel: str | type[Any],
        *,
        direct_url: str | URL | None = None,
        pooler: str | None = None,
        reconnect: float = RECONNECT,
        ping: float = PING,
    ) -> None:
        super().__init__()
        self.engine, self.channel = engine, channel_name(channel)
        self.reconnect, self.ping = reconnect, ping
        self.listening = False
        self.backend_pid: int | None = None
        self._direct_url, self._pooler = direct_url, pooler
        self._own_engine: AsyncEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()  # the first attempt to listen is over
        self._warned = False

    async def __aenter__(self) -> Self:
        source = self._connections()
        if source is not None:
            self._task = asyncio.create_task(self._listen(source), name=f"LISTEN {self.channel}")
            with contextlib.suppress(TimeoutError):  # slower than that: it goes on trying
                await asyncio.wait_for(self._tried.wait(), FIRST_LISTEN)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its connection is closed when this returns
        if self._own_engine is not None:
            await self._own_engine.dispose()
        self.listening, self.backend_pid = False, None

    def _connections(self) -> AsyncEngine | None:
        """Where the listening connection comes from; None: nowhere, poll."""
        if self.engine.url.get_backend_name() != "postgresql":
            return None  # SQLite, MySQL: no NOTIFY
        pooled = resolve_pooler(self._pooler) is not None
        direct = self._direct_url or (os.environ.get(DIRECT_URL) if pooled else None)
        if direct:
            url = resolve_url(direct)
            if url.get_backend_name() != "postgresql":
                raise ConfigurationError(f"direct_url ({DIRECT_URL}) must be PostgreSQL's")
            self._own_engine = make_engine(url, pooler="", poolclass=NullPool)
            return self._own_engine
        if pooled:
            log.warning(
                "LISTEN %r: PostgreSQL is behind a pooler (DATABASE_POOLER), where LISTEN "
                "does not work; workers poll. Set %s to a direct PostgreSQL URL to wake "
                "them with NOTIFY.",
                self.channel,
                DIRECT_URL,
            )
            return None
        return self.engine

    async def _listen(self, engine: AsyncEngine) -> None:
        """Listen; when the connection is lost or refused, say so once, poll, reconnect."""
        delay = self.reconnect
        while True:
            try:
                await self._listen_once(engine)  # returns only when the connection is gone
                reason = "the connection closed"
            except Exception as exc:  # refused, dropped, timed out: the same remedy
                reason = _first_line(exc)
            if self.listening:
                delay = self.reconnect
            self.listening, self.backend_pid = False, None
            self._tried.set()
            if not self._warned:  # one warning per outage, no traceback
                self._warned = True
                log.warning(
                    "LISTEN %r is down (%s); workers poll until it is back", self.channel, reason
                )
            else:
                log.debug("LISTEN %r still down (%s)", self.channel, reason)
            await asyncio.sleep(delay * random.uniform(1.0, 1.5))  # processes spread out
            delay = min(delay * 2, RECONNECT_MAX)

    async def _listen_once(self, engine: AsyncEngine) -> None:
        pooled = await engine.raw_connection()  # the engine's connect settings, pre-pinged
        connection: Any = pooled.driver_connection  # asyncpg's or psycopg's own
        pooled.detach()  # ours now: the pool will neither lend it nor reset it
        try:
            if engine.url.get_driver_name() == "asyncpg":
                await self._hold_asyncpg(connection)
            else:
                await self._hold_psycopg(connection)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    async def _hold_asyncpg(self, connection: Any) -> None:
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        if connection.is_in_transaction():
            await connection.execute("ROLLBACK")
        await connection.add_listener(self.channel, lambda *_: self._wake())  # LISTEN "..."
        self._heard_from(connection.get_server_pid())
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.ping)
            if not lost.is_set():  # a network that dropped silently never says so
                await connection.execute("SELECT 1", timeout=self.ping)

    async def _hold_psycopg(self, connection: Any) -> None:
        from psycopg import sql

        await connection.rollback()  # the pool's pre-ping may have begun a transaction
        await connection.set_autocommit(True)
        await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        self._heard_from(connection.info.backend_pid)
        while True:  # notifies() raises OperationalError when the connection drops
            async for _ in connection.notifies(timeout=self.ping):
                self._wake()
            await asyncio.wait_for(connection.execute("SELECT 1"), self.ping)

    def _heard_from(self, backend_pid: int) -> None:
        self.listening, self.backend_pid = True, backend_pid
        self._tried.set()
        if self._warned:
            self._warned = False
            log.info("LISTEN %r: listening again", self.channel)
        else:
            log.info("LISTEN %r: NOTIFY wakes idle workers", self.channel)
        self._wake()  # a job enqueued while nobody listened: look now


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
