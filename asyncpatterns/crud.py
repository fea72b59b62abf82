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
* Two clients that read the same user and both write lost the first write
  without a word. ``update_user(..., expected_version=n)`` writes only over
  version ``n`` (optimistic locking: ``User.version``), else
  ``VersionConflictError``. The bulk paths count the version too.
* ``get_users`` had no order, no bound and took ``limit=-1``.
* Lists of ids are sent in chunks: PostgreSQL's driver takes at most 32,767
  parameters per statement.
"""

from collections.abc import Collection, Mapping, Sequence
from operator import attrgetter
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import (
    attach_inserted,
    is_foreign_key_violation,
    is_unique_violation,
    run_in_transaction,
)
from .models import EMAIL_LENGTH, User, UserUpdate, canonical_email

MAX_PAGE_SIZE = 100
CHUNK = 1000  # ids or rows per statement
FIRST_VERSION = 1  # User.version of a new row: the ORM's default and the server's


class VersionConflictError(Exception):
    """The user changed since the version the caller read: its write was refused."""

    def __init__(self, user_id: int, current: int, expected: Collection[int]) -> None:
        sent = ", ".join(map(str, sorted(expected))) or "none"
        super().__init__(
            f"User {user_id} is at version {current}, not the version expected ({sent}): "
            "someone else changed it. Read it again, re-apply the change, write again."
        )
        self.user_id, self.current, self.expected = user_id, current, frozenset(expected)


class DuplicateEmailError(ValueError):
    """Another user already has this email."""

    def __init__(self, email: str | None) -> None:
        super().__init__(f"Email already registered: {email or 'one of the emails given'}")
        self.email = email


def _refusal(exc: IntegrityError, email: str | None, team_id: int | None) -> Exception:
    """What a refused write means, from the constraint the database names:
    another user's email (DuplicateEmailError), a team that does not exist -- or
    was deleted meanwhile -- (LookupError), else the database's own error."""
    if is_unique_violation(exc, User.__table__.c.email):
        return DuplicateEmailError(email)
    if is_foreign_key_violation(exc):  # team_id is the user's only foreign key
        return LookupError(f"Team {team_id} not found")
    return exc


async def create_user(session: AsyncSession, user: User) -> User:
    """Insert one user and return it with its id.

    Raises ``DuplicateEmailError`` for a taken email and ``LookupError`` for a
    ``team_id`` with no team (also one deleted while this runs).
    """

    async def insert_user(tx: AsyncSession) -> User:
        tx.add(user)
        await tx.flush()
        return user

    try:
        return await run_in_transaction(session, insert_user)
    except IntegrityError as exc:
        raise _refusal(exc, canonical_email(user.email), user.team_id) from None


async def create_users(session: AsyncSession, users: Sequence[User]) -> list[User]:
    """Insert many new users and return them (the objects passed in), ids set.

    The returned users are persistent in ``session``, as if flushed: a later
    change is one UPDATE. All or nothing: a duplicate email anywhere stores
    none of them (``DuplicateEmailError``). Each backend's fastest statement
    that also returns the new ids (``_insert_users``): one round trip per
    1,000 rows, or one for all of them on PostgreSQL.
    """
    if not users:
        return []
    rows = []  # one pass over the objects: at 10,000 users every attribute read shows
    for user in users:
        email = canonical_email(user.email)  # what the column type stores
        if email != user.email:
            user.email = email
        # The INSERT below does not name the version: the server default, 1, is
        # stored. The objects must say so, or their first UPDATE matches no row.
        # (1.0, True and Decimal(1) equal 1 but are not what the column gives back.)
        if type(user.version) is not int or user.version != FIRST_VERSION:
            set_committed_value(user, "version", FIRST_VERSION)
        rows.append((user.name, email, user.is_active, user.team_id))

    async def insert_all(tx: AsyncSession) -> list[User]:
        ids = await _insert_users(tx, rows)
        for user, row in zip(users, rows, strict=True):
            set_committed_value(user, "id", ids[row[1]])  # no change event: it is stored
        attach_inserted(tx, users)  # persistent, without loading anything
        return list(users)

    try:
        return await run_in_transaction(session, insert_all)
    except IntegrityError as exc:
        raise _refusal(exc, None, None) from None


_INSERT_USERS = "INSERT INTO {table} (name, email, is_active, team_id) "


async def _insert_users(session: AsyncSession, rows: list[tuple[Any, ...]]) -> dict[str, int]:
    """Insert ``(name, email, is_active, team_id)`` rows; return {email: new id}.

    Written for the driver: building 10,000 ORM objects from the returned rows
    cost more than the INSERT itself. Emails are unique, so they tell which id
    belongs to which row whatever order the rows come back in.
    """
    connection = await session.connection()
    dialect = connection.dialect
    table = dialect.identifier_preparer.quote(User.__tablename__)
    insert_users = _INSERT_USERS.format(table=table)
    if dialect.name == "postgresql":
        # One statement for any number of rows: four arrays, unnested server-side.
        sql = (
            insert_users + "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::boolean[],"
            " $4::integer[]) RETURNING id, email"
        )
        columns = tuple(list(column) for column in zip(*rows, strict=True))
        result = await connection.exec_driver_sql(sql, columns)
        return {email: id_ for id_, email in result}
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    ids: dict[str, int] = {}
    for start in range(0, len(rows), CHUNK):  # SQLite and MariaDB: VALUES (...), (...), ...
        chunk = rows[start : start + CHUNK]
        values = ", ".join([f"({marker}, {marker}, {marker}, {marker})"] * len(chunk))
        parameters = tuple(value for row in chunk for value in row)
        if dialect.insert_returning:
            result = await connection.exec_driver_sql(
                f"{insert_users}VALUES {values} RETURNING id, email", parameters
            )
            ids.update({email: id_ for id_, email in result})
        else:  # MySQL has no RETURNING: read the new ids back by email
            await connection.exec_driver_sql(f"{insert_users}VALUES {values}", parameters)
            emails = [row[1] for row in chunk]
            found = select(User.id, User.email).where(col(User.email).in_(emails))
            ids.update({email: id_ for id_, email in await session.exec(found)})
    return ids


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
    # The database numbers the rows and gives them their first version.
    columns = [column.name for column in table.columns if column.name not in ("id", "version")]
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
    expected_version: int | Collection[int] | None = None,
) -> User | None:
    """Apply the fields present in ``user_data``; None if there is no such user.

    Without ``expected_version`` the last write wins: the row is locked, read
    and written. With it (optimistic locking) the write happens only over that
    version of the user (or one of those given), read without a lock: the
    UPDATE says ``WHERE id = ? AND version = ?``, so a writer that got there
    first makes it match nothing, and this raises ``VersionConflictError``.
    A successful write counts the version up (unless nothing changed).

    Raises pydantic's ``ValidationError`` (a ValueError) for an unknown or
    read-only field, a null where a value is required, or a wrong type,
    ``DuplicateEmailError`` for another user's email, and ``LookupError`` for
    a team that does not exist. A user deleted while this runs is None, like
    one that never existed: "gone" is not "changed".
    """
    update = (
        user_data if isinstance(user_data, UserUpdate) else UserUpdate.model_validate(user_data)
    )
    changes = update.model_dump(exclude_unset=True)
    expected = _expected(expected_version)

    async def apply(tx: AsyncSession) -> User | None:
        # Last write wins: FOR UPDATE, so a concurrent delete waits for us, or we
        # see it already gone. Optimistic: no lock, the version guards the write.
        user = await tx.get(User, user_id, with_for_update=expected is None, populate_existing=True)
        if user is None:
            return None
        if expected is None:
            user.sqlmodel_update(changes)
            await tx.flush()  # the row is locked: nobody changed or deleted it meanwhile
            return user
        if user.version not in expected:
            raise VersionConflictError(user_id, user.version, expected)
        try:
            # A savepoint of its own, begun before the change (begin_nested flushes
            # pending changes), so that the session can still read after a failure.
            async with tx.begin_nested():
                user.sqlmodel_update(changes)
                await tx.flush()  # UPDATE ... SET version = n + 1 WHERE id = ? AND version = n
        except StaleDataError:
            # No row matched: deleted, or written since we read it.
            current = await _current_version(tx, user_id)
            if current is None:
                return None
            raise VersionConflictError(user_id, current, expected) from None
        return user

    try:
        return await run_in_transaction(session, apply)
    except StaleDataError:
        return None  # locked, so not changed: the row vanished between our read and write
    except IntegrityError as exc:
        await session.get(User, user_id)  # reload what the undone change expired
        raise _refusal(exc, changes.get("email"), changes.get("team_id")) from None


async def deactivate_users(session: AsyncSession, user_ids: Sequence[int]) -> int:
    """Mark users inactive; returns how many were active before. One UPDATE per 1,000 ids."""

    async def deactivate(tx: AsyncSession) -> int:
        changed = 0
        for start in range(0, len(user_ids), CHUNK):
            statement = (
                update(User)
                .where(col(User.id).in_(user_ids[start : start + CHUNK]))
                .where(col(User.is_active).is_(True))
                # A changed row is a new version: a client holding the old one must not
                # write over this change unawares (optimistic locking).
                .values(is_active=False, version=col(User.version) + 1)
                # Loaded users get is_active=False too: by the ids the UPDATE returns
                # ("evaluate", the default, tests every loaded object per chunk).
                .execution_options(synchronize_session="fetch")
            )
            changed += (await tx.exec(statement)).rowcount
        return changed

    return await run_in_transaction(session, deactivate) if user_ids else 0


def _expected(expected_version: int | Collection[int] | None) -> frozenset[int] | None:
    if expected_version is None:
        return None
    if isinstance(expected_version, int):
        return frozenset([expected_version])
    return frozenset(expected_version)


async def _current_version(session: AsyncSession, user_id: int) -> int | None:
    """The user's version as last committed (a locking read: on MySQL a plain one
    would answer from this transaction's snapshot); None if there is no such user."""
    now = select(User.version).where(User.id == user_id).with_for_update()
    return (await session.exec(now)).first()


async def delete_user(
    session: AsyncSession, user_id: int, expected_version: int | Collection[int] | None = None
) -> bool:
    """Delete one user in one statement; False if there was no such user.

    With ``expected_version`` (optimistic locking), only that version of the
    user (or one of those given) is deleted, else ``VersionConflictError``: a
    client that read an older copy does not delete a change it has not seen.
    """
    expected = _expected(expected_version)

    async def delete_one(tx: AsyncSession) -> bool:
        statement = delete(User).where(col(User.id) == user_id)
        if expected is not None:
            statement = statement.where(col(User.version).in_(expected))
        if (await tx.exec(statement)).rowcount == 1:
            return True
        if expected is None or (current := await _current_version(tx, user_id)) is None:
            return False
        raise VersionConflictError(user_id, current, expected)

    return await run_in_transaction(session, delete_one)


async def delete_inactive_users(session: AsyncSession) -> int:
    """Delete every inactive user in one statement; returns how many."""

    async def delete_inactive(tx: AsyncSession) -> int:
        return (await tx.exec(delete(User).where(col(User.is_active).is_(False)))).rowcount

    return await run_in_transaction(session, delete_inactive)
