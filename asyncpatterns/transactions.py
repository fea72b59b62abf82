"""Transactions that never lose money: transfers, retries, savepoints, who commits.

Use ``transfer_funds`` (or its pattern) whenever two concurrent requests may
change the same rows. What goes wrong with the common read-modify-write
(read both balances, check, write new values): two transfers read the same
balance, and the second write silently overwrites the first (a *lost update*),
creating or destroying money. Here:

* Each balance changes with one guarded, atomic UPDATE
  (``balance = balance - x WHERE balance >= x``). The database applies it to
  the current row, under the row's lock, so nothing is computed from a stale read.
* The two rows are always updated in id order, so two transfers never wait on
  each other in a cycle (no deadlock on PostgreSQL or MySQL).
* Money is ``Decimal`` (``models.Money`` stores integer cents): never float.
* **Whoever begins a transaction ends it** (``db.run_in_transaction``). Called
  on a session with no transaction, a transfer owns its transaction: it takes
  SQLite's write lock first, commits, and re-runs after a deadlock or a
  serialization failure. Called inside a transaction you began, it joins it:
  no commit, no retry, and a refused transfer undoes only its own statements.
  It never commits work it did not do.
* ``complex_operation`` shows savepoints: an inner step may fail alone, the
  outer one may not.
"""

from decimal import Decimal

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import is_retryable, run_in_transaction
from .models import Account, Profile, User, to_cents

__all__ = [
    "AccountNotFoundError",
    "InsufficientFundsError",
    "complex_operation",
    "is_retryable",
    "move_money",
    "open_account",
    "run_in_transaction",
    "transfer_funds",
]


class AccountNotFoundError(ValueError):
    """One of the accounts of a transfer does not exist."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"Account not found: {account_id}")
        self.account_id = account_id


class InsufficientFundsError(ValueError):
    """The source account's balance is lower than the amount."""

    def __init__(self, account_id: int, amount: Decimal) -> None:
        super().__init__(f"Insufficient funds in account {account_id} for {amount}")
        self.account_id = account_id
        self.amount = amount


async def open_account(session: AsyncSession, owner: str, balance: Decimal | int = 0) -> Account:
    """Create an account with an opening balance (>= 0) and return it with its id."""
    if to_cents(balance) < 0:
        raise ValueError(f"An opening balance cannot be negative, not {balance}")
    account = Account(owner=owner, balance=Decimal(balance))

    async def insert_account(tx: AsyncSession) -> Account:
        tx.add(account)
        await tx.flush()
        return account

    return await run_in_transaction(session, insert_account)


async def transfer_funds(
    session: AsyncSession, from_id: int, to_id: int, amount: Decimal | int
) -> None:
    """Move ``amount`` from one account to another, safe under concurrency.

    Commits, unless you called it inside a transaction you began (then you
    commit). Raises ``ValueError`` for an amount <= 0 or the same account
    twice, ``TypeError`` for a float, ``AccountNotFoundError`` or
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

    Both rows are updated in id order with guarded atomic UPDATEs. On a
    refusal the UPDATE that already ran is still in the transaction: run this
    in a savepoint (as ``run_in_transaction`` does) or roll back.
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
    session: AsyncSession, user: User | None = None, bio: str = "Test"
) -> bool:
    """Store ``user`` and, in a savepoint, a profile for them; True if the profile was stored.

    Called as the common pattern calls it, ``complex_operation(session)``, the
    user is ``User(name="Test", email="test@example.com")`` and the bio "Test".

    The profile is the step that may fail alone: if its INSERT fails (this
    user already has a profile), only the savepoint is rolled back, the user
    is still stored, and this returns False. If the user's INSERT fails (a
    duplicate email), the error is raised and nothing is stored. Commits,
    unless it runs inside a transaction you began.
    """
    if user is None:
        user = User(name="Test", email="test@example.com")

    async def work(tx: AsyncSession) -> bool:
        tx.add(user)
        await tx.flush()  # the outer step: its failure must not be swallowed
        try:
            async with tx.begin_nested():  # SAVEPOINT
                tx.add(Profile(user_id=user.id, bio=bio))
                await tx.flush()  # fails here if the user already has a profile
        except IntegrityError:  # ROLLBACK TO SAVEPOINT: the user is still there
            return False
        return True

    return await run_in_transaction(session, work)
