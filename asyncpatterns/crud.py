"""Create, read, update and delete users: single rows and in bulk.

Every writer takes the session it works in and runs as one unit of work
(``db.run_in_transaction``): with no transaction open it commits its own
change, as the common pattern does; inside a transaction you began it joins
yours and you commit. A write that fails (a duplicate email) undoes only its
own change: objects already loaded in the session stay usable. What the
common pattern gets wrong, and this fixes:

* ``create_users`` refreshed each row after the commit: one SELECT per user.
  Here one ``INSERT ... RETURNING`` per 1,000 rows brings the ids back.
* ``update_user`` used ``hasattr``: ``{"id": 777}`` rewrote the primary key and
  ``{"name": 123}`` was stored as ``'123'``. Here input goes through
  ``UserUpdate``, which knows the updatable fields and does not coerce types.
* A duplicate email is a ``DuplicateEmailError`` decided by the unique
  constraint the database names, not by a check-then-insert that races (nor
  by a re-read, which MySQL's snapshot would answer wrongly).
* An update racing a delete of the same user is "not found", not a crash.
* ``get_users`` had no order, no bound and took ``limit=-1``.
* Lists of ids are sent in chunks: PostgreSQL's driver takes at most 32,767
  parameters per statement.
"""

from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from sqlalchemy import delete, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import is_unique_violation, run_in_transaction
from .models import EMAIL_LENGTH, User, UserUpdate, canonical_email

MAX_PAGE_SIZE = 100
CHUNK = 1000  # ids or rows per statement


class DuplicateEmailError(ValueError):
    """Another user already has this email."""

    def __init__(self, email: str | None) -> None:
        super().__init__(f"Email already registered: {email or 'one of the emails given'}")
        self.email = email


def _duplicate_email(exc: IntegrityError, email: str | None) -> Exception:
    """The error to raise for a failed write: DuplicateEmailError if the email's
    unique constraint was violated, else the database's own error."""
    return DuplicateEmailError(email) if is_unique_violation(exc, User.__table__.c.email) else exc


async def create_user(session: AsyncSession, user: User) -> User:
    """Insert one user and return it with its id; duplicate email -> DuplicateEmailError."""

    async def insert_user(tx: AsyncSession) -> User:
        tx.add(user)
        await tx.flush()
        return user

    try:
        return await run_in_transaction(session, insert_user)
    except IntegrityError as exc:
        raise _duplicate_email(exc, canonical_email(user.email)) from None


async def create_users(session: AsyncSession, users: Sequence[User]) -> list[User]:
    """Insert many users and return them, ids included, in input order.

    One statement per 1,000 rows (``INSERT ... RETURNING``); on MySQL, which
    has no RETURNING, one INSERT and one SELECT by email. The returned objects
    are the session's persistent copies, not the objects passed in. All or
    nothing: a duplicate email anywhere stores none of them.
    """
    if not users:
        return []
    rows = [user.model_dump(exclude={"id"}) for user in users]
    for row in rows:
        row["email"] = canonical_email(row["email"])
    emails = [row["email"] for row in rows]

    async def insert_all(tx: AsyncSession) -> list[User]:
        if tx.get_bind().dialect.insert_executemany_returning:
            # Sent as one INSERT ... VALUES (...), (...) RETURNING per 1,000 rows.
            result = await tx.exec(insert(User).returning(User), params=rows)
            by_email = {user.email: user for user in result.scalars()}
        else:  # MySQL has no RETURNING; emails are unique, so read ids by email
            await tx.exec(insert(User), params=rows)
            by_email = await _users_by_email(tx, emails)
        return [by_email[email] for email in emails]

    try:
        return await run_in_transaction(session, insert_all)
    except IntegrityError as exc:
        raise _duplicate_email(exc, None) from None


async def copy_users(session: AsyncSession, users: Sequence[User]) -> int:
    """PostgreSQL only: load many users with COPY; returns how many were loaded.

    Opt in when ``create_users`` is too slow (tens of thousands of rows and
    more): the rows go in binary through asyncpg's ``copy_records_to_table``,
    the fastest way into PostgreSQL. The price: no ids come back (the database
    numbers the rows), and the passed objects are not added to the session.
    COPY bypasses SQLAlchemy's column types, so emails are made canonical here.
    A failure (a duplicate email raises asyncpg's ``UniqueViolationError``)
    leaves nothing of the batch.
    """
    if not users:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        raise NotImplementedError("copy_users needs PostgreSQL; use create_users elsewhere")
    table = User.__table__
    columns = [column.name for column in table.columns if column.name != "id"]
    values = attrgetter(*columns)  # user -> (name, email, ...) as one tuple
    email_at = columns.index("email")
    records = []
    for user in users:
        record = list(values(user))
        record[email_at] = canonical_email(record[email_at])
        records.append(record)

    async def copy(tx: AsyncSession) -> int:
        connection = await tx.connection()  # the transaction's connection
        driver = (await connection.get_raw_connection()).driver_connection
        await driver.copy_records_to_table(table.name, records=records, columns=columns)
        return len(records)

    return await run_in_transaction(session, copy)


async def _users_by_email(session: AsyncSession, emails: list[str]) -> dict[str, User]:
    found: dict[str, User] = {}
    for start in range(0, len(emails), CHUNK):  # bound the IN list
        chunk = emails[start : start + CHUNK]
        statement = select(User).where(col(User.email).in_(chunk))
        found.update((user.email, user) for user in (await session.exec(statement)).all())
    return found


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    """The user with this email, in whatever case or Unicode form it is written."""
    email = canonical_email(email)
    if len(email) > EMAIL_LENGTH:
        return None  # longer than any stored email
    statement = select(User).where(User.email == email)
    return (await session.exec(statement)).first()


async def get_users(session: AsyncSession, skip: int = 0, limit: int = MAX_PAGE_SIZE) -> list[User]:
    """One page of users in id order. ``0 <= skip``, ``1 <= limit <= 100``."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    statement = select(User).order_by(col(User.id)).offset(skip).limit(limit)
    return list((await session.exec(statement)).all())


async def count_users(session: AsyncSession) -> int:
    return (await session.exec(select(func.count()).select_from(User))).one()


async def update_user(
    session: AsyncSession,
    user_id: int,
    user_data: Mapping[str, Any] | UserUpdate,
) -> User | None:
    """Apply the fields present in ``user_data``; None if there is no such user.

    Raises pydantic's ``ValidationError`` (a ValueError) for an unknown or
    read-only field, a null where a value is required, or a wrong type, and
    ``DuplicateEmailError`` for another user's email. A user deleted while
    this runs is None, like one that never existed.
    """
    update = (
        user_data if isinstance(user_data, UserUpdate) else UserUpdate.model_validate(user_data)
    )
    changes = update.model_dump(exclude_unset=True)

    async def apply(tx: AsyncSession) -> User | None:
        # FOR UPDATE: a concurrent delete waits for us, or we see it already gone.
        user = await tx.get(User, user_id, with_for_update=True, populate_existing=True)
        if user is not None:
            user.sqlmodel_update(changes)
            await tx.flush()
        return user

    try:
        return await run_in_transaction(session, apply)
    except StaleDataError:
        return None  # the row vanished between our read and our write
    except IntegrityError as exc:
        await session.get(User, user_id)  # reload what the undone change expired
        raise _duplicate_email(exc, changes.get("email")) from None


async def deactivate_users(session: AsyncSession, user_ids: Sequence[int]) -> int:
    """Mark users inactive; returns how many were active before. One UPDATE per 1,000 ids."""

    async def deactivate(tx: AsyncSession) -> int:
        changed = 0
        for start in range(0, len(user_ids), CHUNK):
            statement = (
                update(User)
                .where(col(User.id).in_(user_ids[start : start + CHUNK]))
                .where(col(User.is_active).is_(True))
                .values(is_active=False)
                # Loaded users get is_active=False too: by the ids the UPDATE returns
                # ("evaluate", the default, tests every loaded object per chunk).
                .execution_options(synchronize_session="fetch")
            )
            changed += (await tx.exec(statement)).rowcount
        return changed

    return await run_in_transaction(session, deactivate) if user_ids else 0


async def delete_user(session: AsyncSession, user_id: int) -> bool:
    """Delete one user in one statement; False if there was no such user."""

    async def delete_one(tx: AsyncSession) -> bool:
        return (await tx.exec(delete(User).where(col(User.id) == user_id))).rowcount == 1

    return await run_in_transaction(session, delete_one)


async def delete_inactive_users(session: AsyncSession) -> int:
    """Delete every inactive user in one statement; returns how many."""

    async def delete_inactive(tx: AsyncSession) -> int:
        return (await tx.exec(delete(User).where(col(User.is_active).is_(False)))).rowcount

    return await run_in_transaction(session, delete_inactive)
