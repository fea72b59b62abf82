"""Upserts and get-or-create that stay right when writers race, on every backend.

Use ``upsert_users`` to insert-or-update users by email in bulk, and
``get_or_create_team`` for "the team with this name, made if missing". What
the common pattern writes instead, and what goes wrong with it:

* Get-or-create as *check, then insert*: two callers both find no row, both
  insert. With a unique constraint the second gets an ``IntegrityError`` (a
  500 in an API); without one, two rows. Here the insert itself says whether
  the row was there (``ON CONFLICT DO NOTHING``; MySQL: ``ON DUPLICATE KEY
  UPDATE id = id``, never ``INSERT IGNORE``, which turns other errors --
  too-long text, a missing foreign key -- into warnings and stores the row
  anyway), and a conflict is answered by reading the row that won.
* Upsert as a loop of *select, then insert or update*: one round trip per row,
  the same race for each new email, and a deadlock when two loops meet in
  different orders. Here each batch of 1,000 users is one statement, the
  backend's own upsert (``INSERT ... ON CONFLICT (email) DO UPDATE`` on
  PostgreSQL and SQLite, ``INSERT ... ON DUPLICATE KEY UPDATE`` on
  MySQL/MariaDB), sent in email order so racing batches lock rows in the same
  order.
* MariaDB/MySQL read from a snapshot (REPEATABLE READ): after a conflict with
  a row another transaction committed, a plain ``SELECT`` may not see it. The
  re-read here is a locking read (``FOR SHARE``/``LOCK IN SHARE MODE``, ``FOR
  UPDATE``), which reads the latest committed row.

Both are units of work (``db.run_in_transaction``): they commit their own
transaction, and retry it after a deadlock or serialization failure (InnoDB
can deadlock two upserts of overlapping emails even in email order); inside a
transaction you began they join it, commit nothing and retry nothing -- a
deadlock then reaches you, the owner, to retry.

Copy this module with ``models.py`` and ``db.py``.
"""

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import (
    attach_inserted,
    changed_behind_the_orm,
    is_foreign_key_violation,
    run_in_transaction,
)
from .models import MAX_ID, Email, Team, User, checked_name

BATCH = 1000  # users per statement
NAME_LENGTH = 100  # User.name and Team.name


class RepeatedEmailError(ValueError):
    """One ``upsert_users`` call names the same email (once canonical) twice."""

    def __init__(self, email: str) -> None:
        super().__init__(
            f"{email} appears more than once in one upsert: send each email once "
            "(which of its values should win is yours to decide)"
        )
        self.email = email


# -- upsert_users ------------------------------------------------------------------------

_INSERT = "INSERT INTO {user} (name, email, is_active, team_id) "


def _set_on_conflict(new: str, user: str) -> str:
    """What an upsert changes in a row that exists: every column the input gives but
    the key. ``new`` names the proposed row ("excluded.{}", "VALUES({})")."""
    return ", ".join(
        [
            f"name = {new.format('name')}",
            f"is_active = {new.format('is_active')}",
            f"team_id = {new.format('team_id')}",
            f"version = {user}.version + 1",  # a changed row gets a new version (and ETag)
        ]
    )


async def upsert_users(
    session: AsyncSession, users: Sequence[User], batch_size: int = BATCH
) -> list[User]:
    """Insert the users whose email is new, update the others; return them, ids set.

    Returns one persistent ``User`` per input, in input order: the object
    passed in (id and version set, as after a flush); or, when this session
    already holds that user, the object it holds, updated to the stored values;
    or a copy, when the object passed in belongs to another session.
    An existing row takes the input's name, is_active and team_id, and its
    version goes up by one; its id stays. Emails are matched canonical
    (``Email.canonical``: trimmed, lower-case), so "Ada@X.org" updates
    "ada@x.org".

    One email twice in one call is refused before anything is sent
    (``RepeatedEmailError``): PostgreSQL refuses to change a row twice in one
    statement, and "last one wins" would silently drop data. Also refused
    (``ValueError``): an email or a name too long for its column, or holding
    NUL (PostgreSQL cannot store it) or a lone surrogate. A ``team_id`` with no
    team (or out of the column's range) is a ``LookupError``. All or nothing: on
    any error nothing of the call is stored.

    One statement per ``batch_size`` users (two on MySQL, which has no
    ``RETURNING``), however many rows exist already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    emails = [_checked_row(user) for user in users]
    repeated = next((email for email, n in Counter(emails).items() if n > 1), None)
    if repeated is not None:
        raise RepeatedEmailError(repeated)
    if not users:
        return []
    rows = sorted(
        (email, user.name, user.is_active, user.team_id)
        for email, user in zip(emails, users, strict=True)
    )  # email order: racing upserts take their row locks in the same order

    async def upsert_all(tx: AsyncSession) -> list[User]:
        stored: dict[str, tuple[int, int]] = {}  # email -> (id, version)
        for start in range(0, len(rows), batch_size):
            stored.update(await _upsert_batch(tx, rows[start : start + batch_size]))
        return _persistent_users(tx, users, emails, stored)

    try:
        return await run_in_transaction(session, upsert_all)
    except IntegrityError as exc:
        if is_foreign_key_violation(exc):  # team_id is the user's only foreign key
            raise LookupError("Team not found: a team_id given has no team") from None
        raise


def _checked_row(user: User) -> str:
    """The user's email as stored; ValueError for what no backend may store."""
    if not isinstance(user.email, str):
        raise ValueError(f"the email must be text, not {type(user.email).__name__}")
    email = Email.canonical(user.email)  # ValueError beyond 255 characters
    name = user.name
    if not isinstance(name, str) or len(name) > NAME_LENGTH:
        raise ValueError(f"{email}: the name must be text of at most {NAME_LENGTH} characters")
    if "\x00" in email or "\x00" in name:
        raise ValueError(f"{email!r}: NUL characters cannot be stored (PostgreSQL refuses them)")
    if any("\ud800" <= c <= "\udfff" for c in email + name):
        raise ValueError(f"{email!r}: a lone surrogate is not text any backend can store")
    team_id = user.team_id
    if team_id is not None and not (isinstance(team_id, int) and 0 < team_id <= MAX_ID):
        raise LookupError(f"Team not found: no team has the id {team_id!r}")
    return email


async def _upsert_batch(
    session: AsyncSession, rows: list[tuple[Any, ...]]
) -> dict[str, tuple[int, int]]:
    """Upsert ``(email, name, is_active, team_id)`` rows in one statement (two on
    MySQL); return {email: (id, version)}. Driver SQL, as in ``crud._insert_users``:
    building ORM objects from the returned rows costs more than the statement."""
    connection = await session.connection()
    dialect = connection.dialect
    user = dialect.identifier_preparer.quote(User.__tablename__)
    columns = [(name, email, active, team) for email, name, active, team in rows]
    if dialect.name == "postgresql":  # four arrays, unnested server-side
        sql = (
            _INSERT.format(user=user)
            + "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::boolean[], $4::integer[])"
            f" ON CONFLICT (email) DO UPDATE SET {_set_on_conflict('excluded.{}', user)}"
            " RETURNING id, email, version"
        )
        arrays = tuple(list(column) for column in zip(*columns, strict=True))
        result = await connection.exec_driver_sql(sql, arrays)
        return {email: (id_, version) for id_, email, version in result}
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    values = ", ".join([f"({marker}, {marker}, {marker}, {marker})"] * len(rows))
    parameters = tuple(value for row in columns for value in row)
    sql = _INSERT.format(user=user) + f"VALUES {values}"
    if dialect.name == "sqlite":
        sql += f" ON CONFLICT (email) DO UPDATE SET {_set_on_conflict('excluded.{}', user)}"
    elif dialect.is_mariadb or dialect.server_version_info < (8, 0, 20):
        sql += f" ON DUPLICATE KEY UPDATE {_set_on_conflict('VALUES({})', user)}"
    else:  # MySQL 8.0.20+: VALUES(col) is deprecated (a warning per statement); a row alias
        sql += f" AS new ON DUPLICATE KEY UPDATE {_set_on_conflict('new.{}', user)}"
    if dialect.insert_returning:  # SQLite, MariaDB
        result = await connection.exec_driver_sql(sql + " RETURNING id, email, version", parameters)
        return {email: (id_, version) for id_, email, version in result}
    # MySQL has no RETURNING: read the rows back. A locking read (FOR UPDATE: we hold
    # those locks already) sees the latest rows, not this transaction's snapshot.
    await connection.exec_driver_sql(sql, parameters)
    markers = ", ".join([marker] * len(rows))
    locking = " FOR UPDATE" if dialect.name == "mysql" else ""  # (SQLite before 3.35)
    found = await connection.exec_driver_sql(
        f"SELECT id, email, version FROM {user} WHERE email IN ({markers}){locking}",
        tuple(row[0] for row in rows),
    )
    return {email: (id_, version) for id_, email, version in found}


def _persistent_users(
    session: AsyncSession,
    users: Sequence[User],
    emails: list[str],
    stored: dict[str, tuple[int, int]],
) -> list[User]:
    """One persistent User per input, holding what is stored, without a query."""
    identity_map = session.sync_session.identity_map
    mapper = sa_inspect(User)
    result: list[User] = []
    to_attach: list[User] = []
    updated: list[User] = []
    for user, email in zip(users, emails, strict=True):
        id_, version = stored[email]
        held = identity_map.get(mapper.identity_key_from_primary_key((id_,)))
        if held is not None:  # this session holds the user: bring it up to date
            values = {"name": user.name, "email": email, "is_active": user.is_active}
            values |= {"team_id": user.team_id, "version": version}
            for field, value in values.items():
                set_committed_value(held, field, value)
            updated.append(held)
            result.append(held)
            continue
        if not sa_inspect(user).transient:  # another session's object: leave it alone
            user = User(name=user.name, email=email, is_active=user.is_active, team_id=user.team_id)
        user.email = email  # what the column type stores
        set_committed_value(user, "id", id_)  # no change event: it is stored
        set_committed_value(user, "version", version)
        to_attach.append(user)
        result.append(user)
    attach_inserted(session, to_attach)  # persistent; they leave again if this rolls back
    changed_behind_the_orm(session, updated)  # expired again if this rolls back
    return result


# -- get_or_create_team ---------------------------------------------------------------------


async def get_or_create_team(session: AsyncSession, name: str) -> Team:
    """The team called ``name``, created if there is none.

    However many callers race for one new name, exactly one row is stored and
    every caller gets it; none sees an ``IntegrityError``. The name is stored
    and matched in canonical form (``models.checked_name``: trimmed, NFC), as
    ``relationships.create_team`` stores it; ``ValueError`` if it is blank or
    longer than 100 characters once normalized.

    Most calls find the team: one ``SELECT``, nothing written. Otherwise one
    unit of work: an ``INSERT`` that stores nothing if the name is taken
    meanwhile, then, only in that case, a locking read of the row that won.
    """
    if not isinstance(name, str):
        raise ValueError(f"a team name is text, not {type(name).__name__}")
    name = checked_name(name, NAME_LENGTH)
    team = await _team_named(session, name)
    if team is not None:
        return team

    async def get_or_insert(tx: AsyncSession) -> Team:
        for _ in range(5):
            team_id = await _insert_team_if_missing(tx, name)
            if team_id is not None:  # ours: no need to read it back
                team = Team(id=team_id, name=name)
                attach_inserted(tx, [team])
                return team
            team = await _team_named(tx, name, locking=True)  # the winner's row
            if team is not None:
                return team
            # The winner's team was deleted before we could read it: insert again.
        raise LookupError(f"Team {name!r} was deleted as often as it was created")

    return await run_in_transaction(session, get_or_insert)


async def _team_named(session: AsyncSession, name: str, locking: bool = False) -> Team | None:
    statement = select(Team).where(Team.name == name)
    if locking:  # the latest committed row, not the snapshot's (MariaDB/MySQL)
        statement = statement.with_for_update(read=True)
    return (await session.exec(statement)).first()


async def _insert_team_if_missing(session: AsyncSession, name: str) -> int | None:
    """Insert the team unless the name is taken: its new id, or None if taken."""
    connection = await session.connection()
    table = Team.__table__
    backend = connection.dialect.name
    if backend == "mysql":
        # No RETURNING on MySQL: the id comes back as the statement's insert id, 0
        # when the row existed ("id = id" changes nothing, and fails nothing else).
        statement = mysql_insert(table).values(name=name)
        statement = statement.on_duplicate_key_update(id=table.c.id)
        return (await connection.execute(statement)).lastrowid or None
    dialect_insert = postgresql_insert if backend == "postgresql" else sqlite_insert
    statement = (
        dialect_insert(table)
        .values(name=name)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(table.c.id)
    )
    return (await connection.execute(statement)).scalar_one_or_none()
