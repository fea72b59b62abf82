"""Transactions that never lose money: transfers, retries, savepoints, isolation.

Use ``transfer_funds`` (or its pattern) whenever two concurrent requests may
change the same rows. What goes wrong with the sheet's read-modify-write
(read both balances, check, write new values): two transfers read the same
balance, and the second write silently overwrites the first (a *lost update*),
creating or destroying money. Here:

* Each balance changes with one guarded, atomic UPDATE
  (``balance = balance - x WHERE balance >= x``). The database applies it to
  the current row, under the row's lock, so nothing is computed from a stale read.
* The two rows are always updated in id order, so two transfers never wait on
  each other in a cycle (no deadlock on PostgreSQL or MySQL).
* It writes before it reads. SQLite has a single writer and snapshots: a
  transaction that read first and then writes after another one committed
  fails with "database is locked"; one that writes first just waits its turn.
* Money is ``Decimal`` (``models.Money`` stores integer cents): never float.
* ``run_in_transaction`` re-runs the whole transaction after a deadlock, a
  serialization failure or a busy SQLite, a bounded number of times.
* ``complex_operation`` shows savepoints: an inner step may fail alone, the
  outer one may not, and there is no ``commit()`` inside a ``begin()`` block.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.models import Account, Team, User, to_cents

T = TypeVar("T")

# PostgreSQL SQLSTATEs: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# MySQL/MariaDB error codes: deadlock, lock wait timeout.
RETRYABLE_MYSQL_ERRORS = frozenset({1213, 1205})
# SQLite: another connection holds the write lock, or this snapshot is stale.
RETRYABLE_SQLITE_MESSAGES = ("database is locked", "database is busy")


class AccountNotFoundError(ValueError):
    """One of the accounts of a transfer does not exist."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"Account {account_id} not found")
        self.account_id = account_id


class InsufficientFundsError(ValueError):
    """The source account's balance is lower than the amount."""

    def __init__(self, account_id: int, amount: Decimal) -> None:
        super().__init__(f"Insufficient funds in account {account_id} for {amount}")
        self.account_id = account_id
        self.amount = amount


def is_retryable(exc: BaseException) -> bool:
    """True for errors that mean "run the whole transaction again": deadlocks,
    serialization failures, lock timeouts, a busy SQLite database."""
    if not isinstance(exc, DBAPIError):
        return False
    error = exc.orig
    if getattr(error, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True
    if error is not None and error.args and error.args[0] in RETRYABLE_MYSQL_ERRORS:
        return True
    return any(message in str(error) for message in RETRYABLE_SQLITE_MESSAGES)


async def run_in_transaction(
    session: AsyncSession,
    work: Callable[[AsyncSession], Awaitable[T]],
    attempts: int = 5,
    backoff: float = 0.01,
) -> T:
    """Run ``work(session)`` in a transaction and commit; re-run it on a retryable error.

    ``work`` must be the whole transaction, safe to run again from the start:
    a retry rolls back everything it did. So a transaction the session already
    has open (it ran a query before) is committed first, not swallowed into
    the retry. After ``attempts`` tries the last error is raised; other errors
    roll back and are raised at once. Waits grow exponentially, with jitter, so
    the transactions that collided do not collide again.
    """
    if session.in_transaction():
        await session.commit()
    for attempt in range(1, attempts):
        try:
            async with session.begin():
                return await work(session)
        except DBAPIError as exc:
            if not is_retryable(exc):
                raise
        await asyncio.sleep(backoff * 2**attempt * random.random())
    async with session.begin():  # the last attempt: any error is the caller's
        return await work(session)


async def transfer_funds(
    session: AsyncSession, from_id: int, to_id: int, amount: Decimal | int
) -> None:
    """Move ``amount`` from one account to another, committed, safe under concurrency.

    Raises ``ValueError`` for an amount <= 0 or the same account twice,
    ``TypeError`` for a float, ``AccountNotFoundError`` or
    ``InsufficientFundsError`` (both ``ValueError``) with both balances untouched.
    Accounts already loaded in ``session`` keep the balance they had: the
    UPDATEs run in the database, so ``refresh`` them to see the new one.
    """
    if from_id == to_id:
        raise ValueError("Cannot transfer from an account to itself")
    if to_cents(amount) <= 0:
        raise ValueError(f"Transfer amount must be positive, not {amount}")
    amount = Decimal(amount)

    async def work(tx: AsyncSession) -> None:
        await move_money(tx, from_id, to_id, amount)

    await run_in_transaction(session, work)


async def move_money(session: AsyncSession, from_id: int, to_id: int, amount: Decimal) -> None:
    """The transfer's statements, in the caller's transaction (no commit, no retry).

    Both rows are updated in id order with guarded atomic UPDATEs. Use it to
    make a transfer part of a larger transaction run by ``run_in_transaction``.
    """
    for account_id in sorted((from_id, to_id)):
        if account_id == from_id:
            changed = await _add_to_balance(session, from_id, -amount)
            if not changed:
                raise await _why_not_debited(session, from_id, amount)
        elif not await _add_to_balance(session, to_id, amount):
            raise AccountNotFoundError(to_id)


async def _add_to_balance(session: AsyncSession, account_id: int, delta: Decimal) -> bool:
    """One atomic UPDATE; a debit only matches if it leaves the balance >= 0."""
    statement = (
        update(Account)
        .where(col(Account.id) == account_id)
        .values(balance=Account.balance + delta)
        .execution_options(synchronize_session=False)
    )
    if delta < 0:
        statement = statement.where(col(Account.balance) >= -delta)
    result = await session.exec(statement)
    return result.rowcount == 1


async def _why_not_debited(session: AsyncSession, account_id: int, amount: Decimal) -> ValueError:
    exists = (await session.exec(select(Account.id).where(Account.id == account_id))).first()
    if exists is None:
        return AccountNotFoundError(account_id)
    return InsufficientFundsError(account_id, amount)


async def complex_operation(
    session: AsyncSession, user: User | None = None, team_name: str = "Test"
) -> bool:
    """Create ``user`` and a new team named ``team_name`` for them, in one transaction.

    Called as the sheet calls it, ``complex_operation(session)``, the user is the
    sheet's ``User(name="Test", email="test@example.com")``.

    The team is an optional inner step, in a savepoint: if its INSERT fails
    (the name is taken), only the savepoint is rolled back, the user is still
    committed (without a team), and this returns False. If the user's INSERT
    fails (a duplicate email), the error is raised and nothing is committed.
    Works whether or not the session already has a transaction open; what it
    holds is committed with the user.
    """
    if user is None:
        user = User(name="Test", email="test@example.com")
    try:
        session.add(user)
        await session.flush()  # the outer step: its failure must not be swallowed
        try:
            async with session.begin_nested():  # SAVEPOINT
                team = Team(name=team_name)
                session.add(team)
                await session.flush()  # fails here if the name is taken
                user.team_id = team.id
            joined = True
        except IntegrityError:  # ROLLBACK TO SAVEPOINT: the user is still pending
            joined = False
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    return joined
