"""Transactions that never lose money: transfers, retries, savepoints, who commits.

Use ``transfer`` (or its pattern) whenever two concurrent requests may move an
amount between rows of any model (``transfer(session, Account.balance, 1, 2,
Decimal("5"))``). What goes wrong with the common read-modify-write (read both
balances, check, write new values): two transfers read the same balance, and
the second write silently overwrites the first (a *lost update*), creating or
destroying money. Here:

* Each value changes with one guarded, atomic UPDATE
  (``balance = balance - x WHERE balance >= x``). The database applies it to
  the current row, under the row's lock, so nothing is computed from a stale read.
* The two rows are always updated in key order, so two transfers never wait on
  each other in a cycle (no deadlock on PostgreSQL or MySQL).
* Amounts are exact: ``Decimal`` or ``int``, never float (the kit's
  ``models.Money`` stores integer cents).
* **Whoever begins a transaction ends it** (``db.run_in_transaction``). Called
  on a session with no transaction, a transfer owns its transaction: it takes
  SQLite's write lock first, commits, and re-runs after a deadlock or a
  serialization failure. Called inside a transaction you began, it joins it:
  no commit, no retry, and a refused transfer undoes only its own statements.
* ``create_with_optional`` shows savepoints: a second step may fail alone, the
  first may not.

The kit's ``Account`` functions (the seed's names) are thin wrappers at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .crud import count, create, key_where
from .db import is_retryable, run_in_transaction

if TYPE_CHECKING:
    from .models import Account, User

M = TypeVar("M", bound=SQLModel)

__all__ = [
    "AccountNotFoundError",
    "InsufficientFundsError",
    "NotEnoughError",
    "RowNotFoundError",
    "complex_operation",
    "create_with_optional",
    "is_retryable",
    "move_amount",
    "move_money",
    "open_account",
    "run_in_transaction",
    "transfer",
    "transfer_funds",
]


class RowNotFoundError(ValueError):
    """One of the rows of a transfer does not exist."""

    def __init__(self, model: str, key: Any) -> None:
        super().__init__(f"{model} not found: {key}")
        self.model, self.key = model, key


class NotEnoughError(ValueError):
    """The source row holds less than the amount."""

    def __init__(self, model: str, key: Any, amount: Decimal | int) -> None:
        super().__init__(f"{model} {key} holds less than {amount}")
        self.model, self.key, self.amount = model, key, amount


async def transfer(
    session: AsyncSession, column: Any, from_key: Any, to_key: Any, amount: Decimal | int
) -> None:
    """Move ``amount`` of ``column`` (``Account.balance``) from one row to another,
    safe under concurrency; never below zero.

    Commits, unless you called it inside a transaction you began (then you
    commit). Raises ``ValueError`` for an amount <= 0 or the same row twice,
    ``TypeError`` for a float, ``RowNotFoundError`` or ``NotEnoughError`` (both
    ``ValueError``) with both rows untouched. Objects already loaded in
    ``session`` keep the value they had: ``refresh`` them to see the new one.
    """
    if from_key == to_key:
        raise ValueError("Cannot transfer from a row to itself")
    if isinstance(amount, float | bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"an amount must be Decimal or int, not {type(amount).__name__}")
    if amount <= 0:
        raise ValueError(f"Transfer amount must be positive, not {amount}")

    async def work(tx: AsyncSession) -> None:
        await move_amount(tx, column, from_key, to_key, amount)

    await run_in_transaction(session, work)


async def move_amount(
    session: AsyncSession, column: Any, from_key: Any, to_key: Any, amount: Decimal | int
) -> None:
    """The transfer's statements, in the caller's transaction (no commit, no retry).

    Both rows are updated in key order with guarded atomic UPDATEs. On a
    refusal the UPDATE that already ran is still in the transaction: run this
    in a savepoint (as ``run_in_transaction`` does) or roll back.
    """
    model = column.class_
    for key in sorted((from_key, to_key)):
        delta = -amount if key == from_key else amount
        statement = (
            sa.update(model)
            .where(key_where(model, key))
            .values({column.key: column + delta})
            .execution_options(synchronize_session=False)
        )
        if delta < 0:  # a debit only matches if it leaves the value >= 0
            statement = statement.where(column >= -delta)
        if (await session.exec(statement)).rowcount == 1:
            continue
        if key == to_key or not await count(session, model, key_where(model, key)):
            raise RowNotFoundError(model.__name__, key)
        raise NotEnoughError(model.__name__, key, amount)


async def create_with_optional(
    session: AsyncSession, obj: M, optional: Callable[[M], SQLModel]
) -> bool:
    """Store ``obj`` and, in a savepoint, ``optional(obj)`` (made once ``obj`` has
    its id); True if the optional row was stored.

    The optional step may fail alone: if its INSERT fails (a duplicate), only
    its savepoint is rolled back, ``obj`` is still stored, and this returns
    False. If ``obj``'s INSERT fails, the error is raised and nothing is stored:
    an ``except Exception: pass`` around both, as the common pattern writes it,
    leaves the session unable to commit (``PendingRollbackError``). Commits,
    unless it runs inside a transaction you began.
    """

    async def work(tx: AsyncSession) -> bool:
        tx.add(obj)
        await tx.flush()  # the first step: its failure must not be swallowed
        try:
            async with tx.begin_nested():  # SAVEPOINT
                tx.add(optional(obj))
                await tx.flush()
        except IntegrityError:  # ROLLBACK TO SAVEPOINT: obj is still there
            return False
        return True

    return await run_in_transaction(session, work)


# -- The kit's Account (and User, Profile), under the seed's names: thin wrappers -------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused.


class AccountNotFoundError(RowNotFoundError):
    """One of the accounts of a transfer does not exist."""

    def __init__(self, account_id: int) -> None:
        super().__init__("Account", account_id)
        self.account_id = account_id


class InsufficientFundsError(NotEnoughError):
    """The source account's balance is lower than the amount."""

    def __init__(self, account_id: int, amount: Decimal) -> None:
        super().__init__("Account", account_id, amount)
        self.args = (f"Insufficient funds in account {account_id} for {amount}",)
        self.account_id = account_id


async def open_account(session: AsyncSession, owner: str, balance: Decimal | int = 0) -> Account:
    """Create an account with an opening balance (>= 0) and return it with its id."""
    from .models import Account, to_cents

    if to_cents(balance) < 0:
        raise ValueError(f"An opening balance cannot be negative, not {balance}")
    return await create(session, Account(owner=owner, balance=Decimal(balance)))


async def transfer_funds(
    session: AsyncSession, from_id: int, to_id: int, amount: Decimal | int
) -> None:
    """``transfer`` of ``Account.balance`` (exact cents: a fraction of one is
    refused); ``AccountNotFoundError`` or ``InsufficientFundsError``."""
    from .models import to_cents

    if from_id == to_id:
        raise ValueError("Cannot transfer from an account to itself")
    if to_cents(amount) <= 0:  # TypeError for a float, ValueError for a part of a cent
        raise ValueError(f"Transfer amount must be positive, not {amount}")
    await run_in_transaction(session, lambda tx: move_money(tx, from_id, to_id, Decimal(amount)))


async def move_money(session: AsyncSession, from_id: int, to_id: int, amount: Decimal) -> None:
    """``move_amount`` of ``Account.balance``, in the caller's transaction."""
    from .models import Account

    try:
        await move_amount(session, Account.balance, from_id, to_id, amount)
    except RowNotFoundError as exc:
        raise AccountNotFoundError(exc.key) from None
    except NotEnoughError as exc:
        raise InsufficientFundsError(exc.key, amount) from None


async def complex_operation(
    session: AsyncSession, user: User | None = None, bio: str = "Test"
) -> bool:
    """Store ``user`` and, in a savepoint, a profile for them (``create_with_optional``);
    True if the profile was stored. Called as the common pattern calls it,
    ``complex_operation(session)``, the user is ``User(name="Test",
    email="test@example.com")`` and the bio "Test"."""
    from .models import Profile, User

    if user is None:
        user = User(name="Test", email="test@example.com")
    return await create_with_optional(session, user, lambda u: Profile(user_id=u.id, bio=bio))
