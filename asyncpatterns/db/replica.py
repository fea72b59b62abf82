"""Read replicas: reads go to a standby, writes (and what must see them) to the primary.

Use ``ReadRouter(primary, replica)`` when a PostgreSQL standby (streaming
replication) takes the reads off the primary. ``router.session(client=...)`` is
an ``AsyncSession`` that picks the server statement by statement
(SQLAlchemy's ``Session.get_bind``). What goes wrong with two engines picked
by hand:

* **A write sent to the replica fails**: "cannot execute INSERT in a read-only
  transaction". Here every flush, INSERT / UPDATE / DELETE statement,
  ``SELECT ... FOR UPDATE`` and ``session.connection()`` (asked for without a
  statement, it may be used for anything: it counts as a write) goes to the primary.
* **A read inside a transaction that wrote misses the write**: the replica
  cannot have it, it is not even committed. After a write, the rest of the
  transaction reads from the primary.
* **Read-your-writes after a commit (the trap)**: the replica replays the
  primary's WAL a moment later (milliseconds; seconds under load; never while
  replay is paused). A user who saves and reloads the page sees the old row,
  or a 404 for the row just created. Here a client's reads stay on the primary
  for ``pin_seconds`` after its commit; or, with ``wait_for_replica``, they
  wait (at most that many seconds) for the replica to replay the commit's LSN,
  and go to the primary if it has not.
* **A replica that is down takes the reads with it**: every GET is a 503
  though the primary is fine. Here a read that cannot connect to the replica
  goes to the primary with one WARNING line (masked URL, reason), and the
  replica is tried again after ``retry_replica_after`` seconds.

A ``text("UPDATE ...")`` cannot be recognised as a write, and a unit of work
that reads rows to change them must not read them stale from the replica (a
lost update): run both in ``router.session(primary=True)``.

The pins live in this process. Behind several workers a client's next request
may reach another one: route clients to a worker, or hand the commit's LSN
(``session.info[COMMIT_LSN]``, with ``wait_for_replica``) to the client, in a
cookie, and pass it back: ``router.session(after_lsn=...)``. FastAPI::

    router = ReadRouter(make_engine(PRIMARY_URL), make_engine(REPLICA_URL))

    async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
        async with router.session(client=request.cookies.get("user")) as session:
            yield session

Give the replica engine a short connect timeout (asyncpg: ``connect_args=
{"timeout": 2}``, psycopg: ``{"connect_timeout": 2}``): an unreachable host
otherwise holds each fallback read for the driver's default (60 s for asyncpg).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Hashable
from typing import Any, NamedTuple

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import SessionTransaction
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from ..config import DatabaseUnavailableError, mask_password

logger = logging.getLogger("asyncpatterns.db.replica")

# session.info key: the primary's WAL position after the session's last write
# commit (with wait_for_replica; None otherwise).
COMMIT_LSN = "asyncpatterns.commit_lsn"

_CANNOT_CONNECT = (DatabaseUnavailableError, DBAPIError, OSError)
# Insert position, not pg_current_wal_lsn(): under synchronous_commit=off the
# written position can still be short of the commit record.
_PRIMARY_LSN = text("SELECT pg_current_wal_insert_lsn()::text")
# True on a server that is not a standby (the "replica" is the primary itself). The
# LSN is sent as text: asyncpg would encode a pg_lsn parameter as a number.
_REPLAYED = text(
    "SELECT NOT pg_is_in_recovery()"
    " OR pg_last_wal_replay_lsn() >= CAST(CAST(:lsn AS text) AS pg_lsn)"
)


_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")  # PostgreSQL's pg_lsn as text
_SWEEP_AT = 10_000  # pins kept before the expired ones are swept


def _later(a: str | None, b: str | None) -> bool:
    """Whether LSN ``a`` is past LSN ``b`` (``None``: unknown, never later)."""
    if a is None or b is None:
        return False
    (a_high, a_low), (b_high, b_low) = (x.split("/") for x in (a, b))
    return (int(a_high, 16), int(a_low, 16)) > (int(b_high, 16), int(b_low, 16))


class Pin(NamedTuple):
    """A client's recent write: until ``until`` (``time.monotonic()``) its reads go to
    the primary, unless the replica has replayed ``lsn``."""

    until: float
    lsn: str | None


class ReadRouter:
    """Sessions whose reads go to ``replica`` and whose writes go to ``primary``.

    ``pin_seconds``: how long after a write commit the client's reads are held
    back from the replica (a healthy replica lags by milliseconds; the window
    covers spikes and costs only primary reads). ``wait_for_replica`` (seconds,
    ``None``: off): instead of going straight to the primary, a held read first
    waits that long for the replica to replay the commit (one extra primary
    query per write commit, to learn its LSN). ``retry_replica_after``: seconds
    during which a replica that could not be reached is not tried again.
    """

    def __init__(
        self,
        primary: AsyncEngine,
        replica: AsyncEngine,
        *,
        pin_seconds: float = 2.0,
        wait_for_replica: float | None = None,
        retry_replica_after: float = 5.0,
    ) -> None:
        self.primary, self.replica = primary, replica
        self.pin_seconds = pin_seconds
        self.wait_for_replica = wait_for_replica
        self.retry_replica_after = retry_replica_after
        self._pins: dict[Hashable, Pin] = {}
        self._sweep_at = _SWEEP_AT
        self._replica_down_until = 0.0

    def session(
        self, client: Hashable | None = None, *, primary: bool = False, after_lsn: str | None = None
    ) -> AsyncSession:
        """A routing session for ``client`` (a user id, a cookie: whose writes its reads
        must see; ``None``: only this session's own). ``primary=True``: everything on the
        primary. ``after_lsn``: reads must see the primary's state at that LSN."""
        pin = None if client is None else self._pins.get(client)
        if after_lsn is not None:  # from a client (a cookie): a malformed one reads the primary
            lsn = after_lsn if _LSN.fullmatch(after_lsn) else None
            pin = Pin(time.monotonic() + self.pin_seconds, lsn)
        options = {"router": self, "client": client, "pin": pin, "primary_only": primary}
        return AsyncSession(sync_session_class=RoutingSession, expire_on_commit=False, **options)

    async def dispose(self) -> None:
        await self.primary.dispose()
        await self.replica.dispose()

    def _replica_or_primary(self, session: RoutingSession) -> Engine:
        """The replica, connected in ``session``'s transaction; the primary if it cannot be."""
        replica = self.replica.sync_engine
        if time.monotonic() < self._replica_down_until:
            return self.primary.sync_engine
        try:
            session.connection(bind_arguments={"bind": replica})
        except _CANNOT_CONNECT as exc:
            self._replica_failed(exc)
            return self.primary.sync_engine
        return replica

    def _replica_failed(self, exc: BaseException) -> None:
        self._replica_down_until = time.monotonic() + self.retry_replica_after
        cause = exc.__cause__ if isinstance(exc, DatabaseUnavailableError) else None
        cause = cause or exc  # the driver's own words (the kit's message has the URL too)
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        logger.warning(
            "read replica %s unreachable (%s): reads go to the primary, retrying in %g s",
            mask_password(self.replica.url),
            reason,
            self.retry_replica_after,
        )

    async def _replayed(self, lsn: str) -> bool:
        """Whether the replica has replayed ``lsn``, polled for ``wait_for_replica`` s."""
        deadline = time.monotonic() + (self.wait_for_replica or 0.0)
        delay = 0.002
        try:
            conn = await self.replica.connect()
        except _CANNOT_CONNECT as exc:
            self._replica_failed(exc)
            return False
        try:
            while not await conn.scalar(_REPLAYED, {"lsn": lsn}):
                if time.monotonic() + delay > deadline:
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            return True
        except DBAPIError as exc:  # e.g. an LSN beyond any the server knows: not replayed
            logger.warning("replica LSN check failed: %s", str(exc.orig).splitlines()[0])
            return False
        finally:
            await conn.close()

    async def _primary_lsn(self) -> str | None:
        try:
            async with self.primary.connect() as conn:
                return await conn.scalar(_PRIMARY_LSN)
        except Exception as exc:  # the commit stands, whatever this query met: pin by time
            logger.warning("no commit LSN from %s: %s", mask_password(self.primary.url), exc)
            return None

    def _pin(self, session: RoutingSession) -> None:
        lsn = None
        if self.wait_for_replica is not None and in_greenlet():
            lsn = await_only(self._primary_lsn())
        now = time.monotonic()
        session.pin = Pin(now + self.pin_seconds, lsn)
        session.info[COMMIT_LSN] = lsn
        if session.client is not None:
            if len(self._pins) > self._sweep_at:  # forget the expired pins now and then
                self._pins = {key: pin for key, pin in self._pins.items() if pin.until > now}
                self._sweep_at = max(_SWEEP_AT, 2 * len(self._pins))  # not at every commit
            earlier = self._pins.get(session.client)
            if earlier is not None and _later(earlier.lsn, lsn):
                # Two commits answered out of order: keep the newer position.
                session.pin = Pin(session.pin.until, earlier.lsn)
            self._pins[session.client] = session.pin


class RoutingSession(Session):
    """The synchronous session inside ``ReadRouter.session()``: ``get_bind`` routes."""

    def __init__(
        self,
        *,
        router: ReadRouter,
        client: Hashable,
        pin: Pin | None,
        primary_only: bool,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.router, self.client, self.pin, self.primary_only = router, client, pin, primary_only
        self.wrote = False  # in this transaction
        self._committed_write = False

    def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Engine:
        primary = self.router.primary.sync_engine
        if self.primary_only or self.wrote:
            return primary
        if not in_greenlet():  # asked outside a statement (session.get_bind().dialect)
            return primary
        if (
            self._flushing
            or clause is None  # session.connection(): whatever it is used for, the primary
            or isinstance(clause, UpdateBase)
            or getattr(clause, "_for_update_arg", None) is not None  # SELECT ... FOR UPDATE
        ):
            self.wrote = True
            return primary
        if not self._replica_is_recent_enough():
            return primary
        return self.router._replica_or_primary(self)

    def _replica_is_recent_enough(self) -> bool:
        pin = self.pin
        if pin is None:
            return True
        if time.monotonic() >= pin.until:
            self.pin = None
            return True
        if pin.lsn is None:
            return False
        if await_only(self.router._replayed(pin.lsn)):
            self.pin = None
            if self.client is not None and self.router._pins.get(self.client) is pin:
                del self.router._pins[self.client]
            return True
        self.pin = pin._replace(lsn=None)  # not in time: the primary, for the rest of the pin
        return False


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: RoutingSession) -> None:
    if session.wrote and not session.in_nested_transaction():  # not a RELEASE SAVEPOINT
        session._committed_write = True


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: RoutingSession, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return
    committed = session._committed_write
    session.wrote = session._committed_write = False
    if committed:
        session.router._pin(session)
