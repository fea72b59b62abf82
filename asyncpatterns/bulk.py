"""Many rows of any SQLModel table at once: insert, COPY, update and delete in bulk.

Use these instead of a loop of single writes. The common pattern inserts with
``add_all`` and then refreshes each object, one SELECT per row (20,000
statements for 10,000 users on SQLite); it updates and deletes by loading the
rows first. Here:

* ``create_many`` is one statement per 1,000 rows (PostgreSQL: one for all),
  and sets the new ids and server defaults on the objects passed in
  (``multirow.py`` writes the SQL). ``copy_many`` is PostgreSQL's COPY.
* ``update_where`` and ``delete_where`` are one statement per 1,000 keys: no
  row is loaded. A changed row of a model with a version column gets a new
  version, so a client holding the old one cannot write over the change unawares.
* Deleting rows that others point at with ``ON DELETE SET NULL`` clears the
  pointers itself first, counting their versions up, and locks the rows it
  deletes, so nobody can point at them meanwhile (``release_referrers``): the
  database's own SET NULL would change those rows without a new version.

All are units of work (``db.run_in_transaction``): they commit their own
transaction, or join the one you began.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.exc import UnmappedClassError
from sqlmodel import SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import AlreadyExistsError, ReferenceNotFoundError, constraint_error, run_in_transaction
from .multirow import CHUNK, insert_objects, make_plan, one_model, prepare, server_made

if TYPE_CHECKING:
    from .models import User

M = TypeVar("M", bound=SQLModel)


def column_values(obj: Any) -> dict[str, Any]:
    """The object's column values, by column name (what an error message names)."""
    mapper = sa_inspect(type(obj))
    return {c.name: obj.__dict__.get(mapper.get_property_by_column(c).key) for c in mapper.columns}


def refused(exc: DBAPIError, model: Any, values: Mapping[str, Any] | None = None) -> Exception:
    """The ``db.ConstraintError`` that ``exc`` is, else ``exc`` itself."""
    return constraint_error(exc, model, values) or exc


async def create_many(session: AsyncSession, objects: Sequence[M]) -> list[M]:
    """Insert many new objects of one model; return them (the objects passed in),
    ids and server defaults set, persistent in ``session`` as if flushed.

    All or nothing: a duplicate anywhere stores none of them
    (``db.AlreadyExistsError`` names the constraint), and the objects come back
    transient with the values they had: fix one, call again.
    """
    if not objects:
        return []
    model = one_model(objects)

    async def insert_all(tx: AsyncSession) -> list[M]:
        await insert_objects(tx, objects)
        return list(objects)

    try:
        return await run_in_transaction(session, insert_all)
    except DBAPIError as exc:
        raise refused(exc, model, column_values(objects[0]) if len(objects) == 1 else {}) from None


async def copy_many(session: AsyncSession, objects: Sequence[M]) -> int:
    """PostgreSQL only: load many new objects with COPY; returns how many.

    The fastest way into PostgreSQL (asyncpg's binary ``copy_records_to_table``,
    psycopg's ``cursor.copy``) for tens of thousands of rows and more. The price:
    nothing comes back (no ids) and the objects are not added to the session. A
    failure leaves nothing of the batch; the error is the driver's own (COPY names
    no row).
    """
    if not objects:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        raise NotImplementedError("copy_many needs PostgreSQL; use create_many elsewhere")
    mapper = sa_inspect(one_model(objects))

    async def copy(tx: AsyncSession) -> int:
        connection = await tx.connection()
        assert connection.sync_connection is not None
        prepare(connection.sync_connection, mapper, objects)
        plan = make_plan(mapper, connection.dialect, server_made(mapper, objects[:1])[0])
        driver = (await connection.get_raw_connection()).driver_connection
        table = mapper.local_table
        rows = [plan.row(obj) for obj in objects]
        if connection.dialect.driver == "psycopg":  # psycopg: COPY ... FROM STDIN, row by row
            quote = connection.dialect.identifier_preparer
            names = ", ".join(quote.quote(c.name) for c in plan.written)
            sql = f"COPY {quote.format_table(table)} ({names}) FROM STDIN"
            async with driver.cursor() as cursor, cursor.copy(sql) as stream:
                for row in rows:
                    await stream.write_row(row)
            return len(objects)
        await driver.copy_records_to_table(
            table.name,
            records=rows,
            columns=[c.name for c in plan.written],
            schema_name=table.schema,
        )
        return len(objects)

    return await run_in_transaction(session, copy)


async def update_where(
    session: AsyncSession,
    model: type[SQLModel],
    values: Mapping[str, Any],
    *where: Any,
    keys: Sequence[Any] | None = None,
) -> int:
    """``UPDATE model SET values WHERE where`` (and the primary key in ``keys``, sent
    1,000 at a time); returns how many rows changed. A model's version column
    counts up on each changed row. Objects the session holds are updated too."""
    mapper = sa_inspect(model)
    changes = dict(values)
    if mapper.version_id_col is not None:  # the ORM attribute: loaded objects follow it
        version = mapper.get_property_by_column(mapper.version_id_col).key
        changes[version] = getattr(model, version) + 1

    async def apply(tx: AsyncSession) -> int:
        changed = 0
        for part in _key_parts(model, keys):
            statement = sa.update(model).where(*where, *part).values(changes)
            # Loaded objects get the new values by the keys the UPDATE matched ("fetch";
            # "evaluate" would test every loaded object against the WHERE per chunk).
            statement = statement.execution_options(synchronize_session="fetch")
            changed += (await tx.exec(statement)).rowcount
        return changed

    if keys is not None and not keys:
        return 0
    try:
        return await run_in_transaction(session, apply)
    except DBAPIError as exc:
        raise refused(exc, model, changes) from None


async def delete_where(
    session: AsyncSession, model: type[SQLModel], *where: Any, keys: Sequence[Any] | None = None
) -> int:
    """``DELETE FROM model WHERE where`` (and the primary key in ``keys``); returns
    how many rows went. Referrers with ``ON DELETE SET NULL`` are released first
    (``release_referrers``)."""

    async def delete_all(tx: AsyncSession) -> int:
        deleted = 0
        for part in _key_parts(model, keys):
            await release_referrers(tx, model, [*where, *part])
            deleted += (await tx.exec(sa.delete(model).where(*where, *part))).rowcount
        return deleted

    if keys is not None and not keys:
        return 0
    try:
        return await run_in_transaction(session, delete_all)
    except DBAPIError as exc:
        raise refused(exc, model) from None


def _key_parts(model: type[SQLModel], keys: Sequence[Any] | None) -> list[list[Any]]:
    if keys is None:
        return [[]]
    primary = list(sa_inspect(model).primary_key)
    if len(primary) != 1:
        raise ValueError(f"keys= needs a one-column primary key; {model.__name__} has more")
    return [[primary[0].in_(keys[i : i + CHUNK])] for i in range(0, len(keys), CHUNK)]


def _mappers(model: type[SQLModel]) -> list[Any]:
    """The mappers of ``model``'s registry. A class whose mapping failed (a table
    declared twice, say in a notebook cell) stays registered without one: skipped."""
    registry = sa_inspect(model).registry
    try:
        return list(registry.mappers)
    except UnmappedClassError:
        return [manager.mapper for manager in registry._managers if manager.is_mapped]


async def release_referrers(session: AsyncSession, model: type[SQLModel], where: list[Any]) -> None:
    """Before deleting the rows of ``model`` that match ``where``: lock them, then
    set to NULL, with a new version, the foreign keys of versioned rows that point
    at them with ``ON DELETE SET NULL``. Nothing to do for other tables."""
    table = sa_inspect(model).local_table
    primary = list(sa_inspect(model).primary_key)
    referrers = [
        (mapper, key)
        for mapper in _mappers(model)
        if mapper.version_id_col is not None
        for key in mapper.local_table.foreign_keys
        if key.column.table is table and (key.ondelete or "").upper() == "SET NULL"
    ]
    if not referrers or len(primary) != 1:
        return
    # The lock keeps anyone from pointing at these rows until we are done
    # (PostgreSQL's and InnoDB's foreign key checks wait for it).
    locking = sa.select(primary[0]).where(*where).with_for_update()
    found = list((await session.exec(locking)).scalars())
    for start in range(0, len(found), CHUNK):
        for mapper, key in referrers:
            pointer = mapper.get_property_by_column(key.parent).key
            version = mapper.get_property_by_column(mapper.version_id_col).key
            statement = (  # ORM attributes, so that loaded objects follow the UPDATE
                sa.update(mapper.class_)
                .where(getattr(mapper.class_, pointer).in_(found[start : start + CHUNK]))
                .values({pointer: None, version: getattr(mapper.class_, version) + 1})
            )
            await session.exec(statement)


# -- The kit's User, under the seed's names: thin wrappers -----------------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused. crud.py imports them, so crud.create_users works too.


class DuplicateEmailError(AlreadyExistsError):
    """Another user already has this email."""

    def __init__(self, email: str | None) -> None:
        super().__init__(
            "User", "user", None, ("email",), {} if email is None else {"email": email}
        )
        self.args = (f"Email already registered: {email or 'one of the emails given'}",)
        self.email = email


def user_refusal(exc: Exception, team_id: int | None) -> Exception:
    """A refused write of a user, as the seed's callers know it: a taken email is
    ``DuplicateEmailError``, a team that does not exist ``LookupError("Team N not found")``."""
    if isinstance(exc, AlreadyExistsError) and exc.columns == ("email",):
        return DuplicateEmailError(exc.values.get("email"))
    if isinstance(exc, ReferenceNotFoundError):  # team_id is the user's only foreign key
        return LookupError(f"Team {team_id} not found")
    return exc


async def create_users(session: AsyncSession, users: Sequence[User]) -> list[User]:
    """``bulk.create_many`` of users: all or nothing, ``DuplicateEmailError`` for a
    taken email (in a batch, "one of the emails given")."""
    try:
        return await create_many(session, users)
    except (AlreadyExistsError, ReferenceNotFoundError) as exc:
        raise user_refusal(exc, users[0].team_id if len(users) == 1 else None) from None


async def copy_users(session: AsyncSession, users: Sequence[User]) -> int:
    """``bulk.copy_many`` of users (PostgreSQL's COPY: no ids come back)."""
    return await copy_many(session, users)


async def deactivate_users(session: AsyncSession, user_ids: Sequence[int]) -> int:
    """Mark users inactive; returns how many were active before. One UPDATE per 1,000 ids."""
    from .models import User

    return await update_where(
        session, User, {"is_active": False}, col(User.is_active).is_(True), keys=user_ids
    )


async def delete_inactive_users(session: AsyncSession) -> int:
    """Delete every inactive user in one statement; returns how many."""
    from .models import User

    return await delete_where(session, User, col(User.is_active).is_(False))
