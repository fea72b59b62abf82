"""Create, read, update and delete users: single rows and in bulk.

Every function takes the session it works in and commits its own change, as
the original pattern sheet does. A write that fails (a duplicate email) rolls
back only its own savepoint: the session and the objects already loaded in it
stay usable. What the sheet got wrong, and this fixes:

* ``create_users`` refreshed each row after the commit: one SELECT per user.
  Here one ``INSERT ... RETURNING`` per 1,000 rows brings the ids back.
* ``update_user`` used ``hasattr``: ``{"id": 777}`` rewrote the primary key and
  ``{"name": 123}`` was stored as ``'123'``. Here input goes through
  ``UserUpdate``, which knows the updatable fields and does not coerce types.
* A duplicate email is a ``DuplicateEmailError`` decided by the database's
  unique constraint, not by a check-then-insert that races.
* ``get_users`` had no order, no bound and took ``limit=-1``.
"""

from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from sqlalchemy import delete, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.models import User, UserUpdate

MAX_PAGE_SIZE = 100


class DuplicateEmailError(ValueError):
    """Another user already has this email."""

    def __init__(self, email: str) -> None:
        super().__init__(f"Email already registered: {email}")
        self.email = email


async def create_user(session: AsyncSession, user: User) -> User:
    """Insert one user and return it with its id; duplicate email -> DuplicateEmailError."""
    try:
        async with session.begin_nested():  # a failed INSERT undoes only this savepoint
            session.add(user)
    except IntegrityError:
        await _raise_if_email_taken(session, user.email)
        raise
    await session.commit()
    return user  # expire_on_commit=False: id and defaults are already loaded


async def create_users(session: AsyncSession, users: Sequence[User]) -> list[User]:
    """Insert many users and return them, ids included, in input order.

    One statement per 1,000 rows (``INSERT ... RETURNING``); on MySQL, which
    has no RETURNING, one INSERT and one SELECT by email. The returned objects
    are the session's persistent copies, not the objects passed in.
    """
    if not users:
        return []
    rows = [user.model_dump(exclude={"id"}) for user in users]
    emails = [row["email"] for row in rows]
    async with session.begin_nested():  # on error, nothing of the batch is kept
        if session.get_bind().dialect.insert_executemany_returning:
            # Sent as one INSERT ... VALUES (...), (...) RETURNING per 1,000 rows.
            result = await session.exec(insert(User).returning(User), params=rows)
            by_email = {user.email: user for user in result.scalars()}
        else:  # MySQL has no RETURNING; emails are unique, so read ids by email
            await session.exec(insert(User), params=rows)
            by_email = await _users_by_email(session, emails)
    await session.commit()
    return [by_email[email] for email in emails]


async def copy_users(session: AsyncSession, users: Sequence[User]) -> int:
    """PostgreSQL only: load many users with COPY; returns how many were loaded.

    Opt in when ``create_users`` is too slow (tens of thousands of rows and
    more): the rows go in binary through asyncpg's ``copy_records_to_table``,
    the fastest way into PostgreSQL. The price: no ids come back (the database
    numbers the rows), and the passed objects are not added to the session.
    A failure (a duplicate email raises asyncpg's ``UniqueViolationError``)
    leaves nothing of the batch and the session usable.
    """
    if not users:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        raise NotImplementedError("copy_users needs PostgreSQL; use create_users elsewhere")
    table = User.__table__
    columns = [column.name for column in table.columns if column.name != "id"]
    values = attrgetter(*columns)  # user -> (name, email, ...) as one tuple
    records = [values(user) for user in users]
    async with session.begin_nested():  # on error, nothing of the batch is kept
        connection = await session.connection()  # the savepoint's connection
        driver = (await connection.get_raw_connection()).driver_connection
        await driver.copy_records_to_table(table.name, records=records, columns=columns)
    await session.commit()
    return len(records)


async def _users_by_email(session: AsyncSession, emails: list[str]) -> dict[str, User]:
    found: dict[str, User] = {}
    for start in range(0, len(emails), 1000):  # bound the IN list
        chunk = emails[start : start + 1000]
        statement = select(User).where(col(User.email).in_(chunk))
        found.update((user.email, user) for user in (await session.exec(statement)).all())
    return found


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    statement = select(User).where(User.email == email.strip().lower())
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
    ``DuplicateEmailError`` for another user's email.
    """
    update = (
        user_data if isinstance(user_data, UserUpdate) else UserUpdate.model_validate(user_data)
    )
    changes = update.model_dump(exclude_unset=True)
    user = await session.get(User, user_id)
    if user is None:
        return None
    try:
        async with session.begin_nested():  # a failed UPDATE undoes only this savepoint
            user.sqlmodel_update(changes)
    except IntegrityError:
        await session.refresh(user)  # the savepoint rollback expired it; reload
        if "email" in changes:
            await _raise_if_email_taken(session, changes["email"], except_id=user_id)
        raise
    await session.commit()
    return user


async def deactivate_users(session: AsyncSession, user_ids: Sequence[int]) -> int:
    """Mark users inactive in one UPDATE; returns how many were active before."""
    if not user_ids:
        return 0
    statement = (
        update(User)
        .where(col(User.id).in_(user_ids), col(User.is_active).is_(True))
        .values(is_active=False)
    )
    result = await session.exec(statement)
    await session.commit()
    return result.rowcount


async def delete_user(session: AsyncSession, user_id: int) -> bool:
    """Delete one user in one statement; False if there was no such user."""
    result = await session.exec(delete(User).where(col(User.id) == user_id))
    await session.commit()
    return result.rowcount == 1


async def delete_inactive_users(session: AsyncSession) -> int:
    """Delete every inactive user in one statement; returns how many."""
    result = await session.exec(delete(User).where(col(User.is_active).is_(False)))
    await session.commit()
    return result.rowcount


async def _raise_if_email_taken(
    session: AsyncSession, email: str, except_id: int | None = None
) -> None:
    # After an IntegrityError, the committed row that caused it is visible.
    existing = await get_user_by_email(session, email)
    if existing is not None and existing.id != except_id:
        raise DuplicateEmailError(email) from None
