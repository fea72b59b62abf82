"""Units of work: whoever begins a transaction ends it.

Use ``run_in_transaction`` for every unit of work that writes. It owns its
transaction (begins, commits, retries a deadlock) when the caller has none,
and joins the caller's transaction (no commit, no retry) when the caller began
one. It never commits or throws away work it did not do. What goes wrong
without it:

* A writer that calls ``commit()`` on a request's session commits whatever the
  session holds, and one that calls ``session.begin()`` on a session that has
  already run a query fails: "A transaction is already begun".
* SQLite has one writer at a time. A transaction that reads first and writes
  later fails with "database is locked" the moment another writer commits in
  between; here a writer begins with ``BEGIN IMMEDIATE`` and waits its turn
  (readers still never wait for each other).
* A failed write that rolls back the whole session expires every object loaded
  before it: the next attribute access is a ``MissingGreenlet``. Here only the
  writer's own savepoint is rolled back.

Writes sent around the session (through ``session.connection()``) are not seen:
begin those transactions yourself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import event, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import (
    InstanceState,
    ORMExecuteState,
    Session,
    SessionTransaction,
)
from sqlalchemy.orm.session import SessionTransactionOrigin
from sqlalchemy.sql.elements import TextClause
from sqlmodel.ext.asyncio.session import AsyncSession

from .engine import SQLITE_BEGIN
from .errors import is_connection_lost, is_retryable

T = TypeVar("T")


class TransactionOwnershipError(RuntimeError):
    """A writer was called on a session holding changes that nobody has committed."""


async def run_in_transaction(
    session: AsyncSession,
    work: Callable[[AsyncSession], Awaitable[T]],
    attempts: int = 5,
    backoff: float = 0.01,
) -> T:
    """Run ``work(session)``, a unit of work that writes, and return its result.

    * The caller began a transaction (``session.begin()``,
      ``session_maker.begin()``, ``session_scope``): ``work`` joins it, in a
      SAVEPOINT, so its failure undoes only its own changes. Nothing is
      committed and nothing is retried: the caller does both.
    * Otherwise this function owns the transaction: it begins one (taking
      SQLite's write lock at once), commits it, and re-runs ``work`` from the
      start after a deadlock or serialization failure, at most ``attempts``
      times. A transaction the session began by itself only to read (a request
      session that ran a query) holds nothing and is ended first.
    * The session holds changes outside a transaction anyone began (objects
      added, changed or flushed): ``TransactionOwnershipError``. Committing
      them here would commit work this function did not do.

    If ``work`` fails, only its own changes are rolled back: objects loaded
    earlier in the session stay loaded (no ``MissingGreenlet`` afterwards).
    """
    transaction = session.sync_session.get_transaction()
    if transaction is not None and transaction.origin is not SessionTransactionOrigin.AUTOBEGIN:
        await lock_for_writing(session)
        return await _in_savepoint(session, work)
    if _has_changes(session):
        raise TransactionOwnershipError(
            "The session holds changes nobody committed (objects added, changed, deleted or "
            "flushed). This function commits its own work and will not commit yours with it: "
            "commit or roll back first, or begin the transaction yourself before making the "
            "changes (async with session.begin(): ...) and this call joins it."
        )
    if transaction is not None:
        await session.commit()  # it only read: nothing to keep, nothing lost
    for attempt in range(1, attempts + 1):
        try:
            return await _own_transaction(session, work)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
        # Exponential waits with jitter, so the transactions that collided do not collide again.
        await asyncio.sleep(backoff * 2**attempt * random.random())
    raise AssertionError("unreachable")


async def _own_transaction(
    session: AsyncSession, work: Callable[[AsyncSession], Awaitable[T]]
) -> T:
    failure: Exception | None = None
    async with session.begin():  # commits at the end, also after a failure undone below
        await lock_for_writing(session)
        try:
            result = await _in_savepoint(session, work)
        except Exception as exc:
            if _transaction_lost(exc):
                raise  # roll back everything (and maybe retry)
            failure = exc  # its savepoint is rolled back; commit the empty rest
        else:
            loaded = _loaded_attributes(result) if session.sync_session.expire_on_commit else []
    if failure is not None:
        raise failure
    if loaded:  # expire_on_commit=True expired what we return: reload it, as the caller had it
        await _reload(session, loaded)
    return result


def _loaded_attributes(result: Any) -> list[tuple[Any, list[str]]]:
    """The ORM objects in ``result`` (one, or a list), each with its loaded attributes."""
    objects = result if isinstance(result, list | tuple) else [result]
    states = [sa_inspect(obj, raiseerr=False) for obj in objects]
    return [
        (
            state.obj(),
            [
                name
                for name in state.mapper.attrs.keys()  # noqa: SIM118
                if name not in state.unloaded
            ],
        )
        for state in states
        if isinstance(state, InstanceState)
    ]


async def _reload(session: AsyncSession, loaded: list[tuple[Any, list[str]]]) -> None:
    if len(loaded) == 1:  # the object, and the related objects it had loaded
        instance, names = loaded[0]
        await session.refresh(instance, names)
        for relationship in sa_inspect(instance).mapper.relationships:
            if relationship.key in names:
                related = getattr(instance, relationship.key)
                for other in related if isinstance(related, list) else [related]:
                    if other is not None:
                        await session.refresh(other)
        return
    # Many rows of one table (a bulk insert): one SELECT per 1,000, not one per row.
    mapper = sa_inspect(loaded[0][0]).mapper
    ids = [sa_inspect(instance).identity[0] for instance, _ in loaded]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        await session.exec(select(mapper).where(mapper.primary_key[0].in_(chunk)))


async def _in_savepoint(session: AsyncSession, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    savepoint = await session.begin_nested()
    try:
        result = await work(session)
    except Exception as exc:
        try:
            await savepoint.rollback()  # expires only what work changed
        except SQLAlchemyError:
            if not _transaction_lost(exc):
                raise
            # The database ended the whole transaction (MySQL, on a deadlock)
            # or the connection is gone: the savepoint went with it.
        raise
    await savepoint.commit()
    return result


def _transaction_lost(exc: BaseException) -> bool:
    """The database ended the whole transaction, or the connection is gone."""
    return is_retryable(exc) or is_connection_lost(exc)


async def lock_for_writing(session: AsyncSession) -> None:
    """Call first in a transaction that will write. On SQLite, start it with
    ``BEGIN IMMEDIATE``: it waits (up to the lock timeout) until it is the only
    writer, so what it reads cannot be overwritten before it writes. Nothing to
    do on PostgreSQL and MySQL (row locks), nor once the transaction has run a
    statement."""
    sync_session = session.sync_session
    if session.get_bind().dialect.name != "sqlite" or _connected(sync_session):
        return
    await session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})


@asynccontextmanager
async def session_scope(
    session_maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work that writes: commit if the block succeeds, roll back if it raises.

    Same as ``async with session_maker.begin() as session``, plus SQLite's
    write lock taken at the start. The kit's functions called inside join
    this transaction instead of committing on their own.
    """
    async with session_maker() as session, session.begin():
        await lock_for_writing(session)
        yield session


# The session-level facts the rule needs, recorded per transaction in session.info.
_CONNECTED, _WROTE = "asyncpatterns.connected", "asyncpatterns.wrote"


@event.listens_for(Session, "after_begin")
def _remember_connection(session: Session, transaction: SessionTransaction, _conn: Any) -> None:
    session.info[_CONNECTED] = session.get_transaction()


@event.listens_for(Session, "after_flush")
def _remember_flush(session: Session, _flush_context: Any) -> None:
    session.info[_WROTE] = session.get_transaction()


@event.listens_for(Session, "do_orm_execute")
def _remember_write(state: ORMExecuteState) -> None:
    statement = state.statement
    if statement.is_dml or (
        isinstance(statement, TextClause) and statement.text.lstrip()[:6].lower() != "select"
    ):
        state.session.info[_WROTE] = state.session.get_transaction()


def _connected(sync_session: Session) -> bool:
    transaction = sync_session.get_transaction()
    return transaction is not None and sync_session.info.get(_CONNECTED) is transaction


def _has_changes(session: AsyncSession) -> bool:
    sync_session = session.sync_session
    transaction = sync_session.get_transaction()
    if transaction is not None and sync_session.info.get(_WROTE) is transaction:
        return True
    return bool(
        session.new or session.deleted or any(session.is_modified(obj) for obj in session.dirty)
    )
