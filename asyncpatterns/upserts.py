"""Upserts and get-or-create by any unique key, right when writers race, on every backend.

Use ``upsert(session, objects, key=["sku"])`` to insert-or-update rows in bulk
by a unique key (one column or several), and ``get_or_create(session, Team,
name="Red")`` for "the row with this key, made if missing". What the common
pattern writes instead, and what goes wrong with it:

* Get-or-create as *check, then insert*: two callers both find no row, both
  insert; the second gets an ``IntegrityError`` (a 500 in an API). Here the
  insert itself says whether the row was there (``ON CONFLICT DO NOTHING``;
  MySQL: ``ON DUPLICATE KEY UPDATE pk = pk``, never ``INSERT IGNORE``, which
  turns other errors -- too-long text, a missing foreign key -- into warnings
  and stores the row anyway), and a conflict is answered by reading the winner.
* Upsert as a loop of *select, then insert or update*: one round trip per row,
  the same race for each new key, and a deadlock when two loops meet in
  different orders. Here each batch of 1,000 rows is one statement, the
  backend's own upsert (``INSERT ... ON CONFLICT (key) DO UPDATE`` on
  PostgreSQL and SQLite, ``INSERT ... ON DUPLICATE KEY UPDATE`` on
  MySQL/MariaDB), sent in key order so racing batches lock rows in one order.
* MariaDB/MySQL read from a snapshot (REPEATABLE READ): after a conflict with
  a row another transaction committed, a plain ``SELECT`` may not see it. The
  re-reads here are locking reads, which see the latest committed row.
* MySQL's ``ON DUPLICATE KEY UPDATE`` fires on *any* unique key of the table,
  not only the one you name: there, a row that collides on another unique key
  updates that row. PostgreSQL and SQLite raise ``db.AlreadyExistsError`` instead.

Both are units of work (``db.run_in_transaction``): they commit their own
transaction and retry it after a deadlock (InnoDB can deadlock two upserts of
overlapping keys even in key order); inside a transaction you began they join
it, commit nothing and retry nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Column
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .bulk import column_values, refused
from .crud import unique_key
from .db import attach_inserted, changed_behind_the_orm, run_in_transaction
from .multirow import (
    CHUNK,
    Plan,
    flat,
    insert_sql,
    make_plan,
    names,
    one_model,
    prepare,
    read_back,
    server_made,
    unnest_ok,
    unnest_sql,
    values,
)

if TYPE_CHECKING:
    from .models import Team, User

M = TypeVar("M", bound=SQLModel)


class RepeatedKeyError(ValueError):
    """One ``upsert`` call names the same key twice."""

    def __init__(self, model: str, key: Mapping[str, Any]) -> None:
        given = ", ".join(f"{name}={value!r}" for name, value in key.items())
        super().__init__(
            f"{model} {given} appears more than once in one upsert: send each key once "
            "(which of its values should win is yours to decide)"
        )
        self.key = dict(key)


async def upsert(
    session: AsyncSession,
    objects: Sequence[M],
    key: Sequence[str],
    *,
    update: Sequence[str] | None = None,
    batch_size: int = CHUNK,
) -> list[M]:
    """Insert the objects whose ``key`` is new, update the rows whose key exists;
    return one persistent object per input, in input order, holding the stored row.

    ``key``: the attribute names of a unique key. ``update``: the columns an
    existing row takes from the input (default: every column but the key and
    the primary key); a version column counts up instead. Each object returned
    is the one passed in, or the one this session already holds for that row
    (updated to the stored values), or a copy when the one passed in belongs
    to another session. A key given twice is refused before anything is sent
    (``RepeatedKeyError``): PostgreSQL cannot change a row twice in one
    statement, and "last one wins" would drop data silently. A key column may
    not be None (NULL never collides, so it would always insert).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not objects:
        return []
    model = one_model(objects)
    mapper = sa_inspect(model)
    columns = unique_key(model, key)

    async def upsert_all(tx: AsyncSession) -> list[M]:
        connection = await tx.connection()
        assert connection.sync_connection is not None
        prepare(connection.sync_connection, mapper, objects)
        plan = make_plan(mapper, connection.dialect, server_made(mapper, objects[:1])[0])
        rows = [plan.row(obj) for obj in objects]
        keys = _checked_keys(plan, columns, rows, model.__name__, key)
        order = sorted(range(len(rows)), key=lambda i: _sortable(keys[i]))  # lock order
        ordered = [rows[i] for i in order]
        every = list(mapper.local_table.columns)
        sent = plan.as_sent(columns)
        stored: dict[tuple[Any, ...], Sequence[Any]] = {}
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            found = await _upsert_batch(tx, plan, columns, update, every, batch)
            stored.update({sent(row[len(every) :]): row[: len(every)] for row in found})
        return _persistent(tx, plan, objects, [stored[k] for k in keys], every)

    try:
        return await run_in_transaction(session, upsert_all)
    except DBAPIError as exc:
        raise refused(exc, model, column_values(objects[0]) if len(objects) == 1 else {}) from None


def _checked_keys(
    plan: Plan, columns: list[Column[Any]], rows: list[tuple[Any, ...]], model: str, key: Any
) -> list[tuple[Any, ...]]:
    if any(c not in plan.written for c in columns):
        raise ValueError(f"{model}: the key ({', '.join(key)}) must be set on every object")
    at = [plan.written.index(c) for c in columns]
    keys = [tuple(row[i] for i in at) for row in rows]
    if any(value is None for k in keys for value in k):
        raise ValueError(f"{model}: a key column is None; NULL never collides, so no upsert")
    repeated = next((k for k, n in Counter(keys).items() if n > 1), None)
    if repeated is not None:
        raise RepeatedKeyError(model, dict(zip(key, repeated, strict=True)))
    return keys


def _sortable(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(f"{type(value).__name__}:{value}" for value in key)


async def _upsert_batch(
    session: AsyncSession,
    plan: Plan,
    key: list[Column[Any]],
    update: Sequence[str] | None,
    every: list[Column[Any]],
    rows: list[tuple[Any, ...]],
) -> list[Sequence[Any]]:
    """One statement (two on MySQL): upsert ``rows``; return each stored row's
    ``every`` columns followed by its key, as the driver gives them."""
    connection = await session.connection()
    dialect = connection.dialect
    quote = dialect.identifier_preparer.quote
    table = dialect.identifier_preparer.format_table(plan.mapper.local_table)
    version = plan.mapper.version_id_col
    changed = [
        c
        for c in plan.written
        if c not in key
        and not c.primary_key
        and c is not version
        and (update is None or plan.mapper.get_property_by_column(c).key in update)
    ] or [key[0]]  # an UPDATE must set something to return the row on PostgreSQL
    if dialect.name == "mysql":
        new = (
            "VALUES({})"
            if dialect.is_mariadb or dialect.server_version_info < (8, 0, 20)
            else "new.{}"
        )
    else:
        new = "excluded.{}"
    sets = [f"{quote(c.name)} = {new.format(quote(c.name))}" for c in changed]
    if version is not None:  # a changed row gets a new version (and ETag)
        sets.append(f"{quote(version.name)} = {table}.{quote(version.name)} + 1")
    if dialect.name == "postgresql" and unnest_ok(plan):
        sql, parameters = unnest_sql(dialect, plan), tuple(list(c) for c in zip(*rows, strict=True))
    else:
        sql, parameters = (
            insert_sql(dialect, plan) + values(dialect, len(rows), len(plan.written)),
            flat(rows),
        )
    if dialect.name == "mysql":
        alias = " AS new" if new == "new.{}" else ""
        sql += f"{alias} ON DUPLICATE KEY UPDATE {', '.join(sets)}"
    else:
        sql += f" ON CONFLICT ({names(dialect, key)}) DO UPDATE SET {', '.join(sets)}"
    if dialect.insert_returning:
        result = await connection.exec_driver_sql(
            sql + f" RETURNING {names(dialect, every + key)}", parameters
        )
        return list(result)
    # MySQL has no RETURNING: read the rows back. A locking read (FOR UPDATE: we hold
    # those locks already) sees the latest rows, not this transaction's snapshot.
    await connection.exec_driver_sql(sql, parameters)
    at = [plan.written.index(c) for c in key]
    wanted = [tuple(row[i] for i in at) for row in rows]
    locking = " FOR UPDATE" if dialect.name == "mysql" else ""  # (SQLite before 3.35)
    found = await read_back(connection, plan, every, key, wanted, locking)
    return [(*row, *k) for row, k in zip(found, wanted, strict=True)]


def _persistent(
    session: AsyncSession,
    plan: Plan,
    objects: Sequence[M],
    stored: list[Sequence[Any]],
    every: list[Column[Any]],
) -> list[M]:
    """One persistent object per input, holding what is stored, without a query."""
    mapper, dialect = plan.mapper, session.get_bind().dialect
    keys = [mapper.get_property_by_column(c).key for c in every]
    processors = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in every]
    primary = [every.index(c) for c in plan.primary_key]
    identity_map = session.sync_session.identity_map
    result: list[M] = []
    new: list[M] = []
    before: list[dict[str, Any]] = []
    held_ones: list[M] = []
    for obj, raw in zip(objects, stored, strict=True):
        row = [v if p is None else p(v) for v, p in zip(raw, processors, strict=True)]
        held = identity_map.get(mapper.identity_key_from_primary_key([row[i] for i in primary]))
        if held is not None:  # this session holds the row: bring it up to date
            for key, value in zip(keys, row, strict=True):
                set_committed_value(held, key, value)
            held_ones.append(held)
            result.append(held)
            continue
        if not sa_inspect(obj).transient:  # another session's object: leave it alone
            obj = type(obj)(**{key: obj.__dict__.get(key) for key in keys})
        before.append({key: obj.__dict__.get(key) for key in keys})
        obj.__dict__.update(zip(keys, row, strict=True))  # transient: attached as stored next
        new.append(obj)
        result.append(obj)
    attach_inserted(session, new, before)  # persistent; transient again if this rolls back
    changed_behind_the_orm(session, held_ones)  # expired again if this rolls back
    return result


async def get_or_create(
    session: AsyncSession, model: type[M], defaults: Mapping[str, Any] | None = None, **key: Any
) -> M:
    """The row whose unique key has these values (``get_or_create(s, Team, name="Red")``),
    created with ``defaults`` for its other columns if there is none.

    However many callers race for one new key, exactly one row is stored and
    every caller gets it; none sees an ``IntegrityError``. Most calls find the
    row: one ``SELECT``, nothing written. Otherwise one unit of work: an
    ``INSERT`` that stores nothing if the key is taken meanwhile, then, only in
    that case (and always on MySQL, which does not say), a locking read of the row.
    """
    columns = unique_key(model, list(key))
    found = await _row_with(session, model, key)
    if found is not None:
        return found

    async def get_or_insert(tx: AsyncSession) -> M:
        for _ in range(5):
            obj = model(**{**(defaults or {}), **key})
            if await _insert_if_missing(tx, obj, columns):
                return obj
            winner = await _row_with(tx, model, key, locking=True)
            if winner is not None:
                return winner
            # The winner's row was deleted before we could read it: insert again.
        raise LookupError(f"{model.__name__} {key} was deleted as often as it was created")

    try:
        return await run_in_transaction(session, get_or_insert)
    except DBAPIError as exc:
        raise refused(exc, model, {**(defaults or {}), **key}) from None


async def _row_with(
    session: AsyncSession, model: type[M], key: Mapping[str, Any], locking: bool = False
) -> M | None:
    statement = select(model).where(*(getattr(model, k) == v for k, v in key.items()))
    if locking:  # the latest committed row, not the snapshot's (MariaDB/MySQL)
        statement = statement.with_for_update(read=True).execution_options(populate_existing=True)
    return (await session.exec(statement)).first()


async def _insert_if_missing(session: AsyncSession, obj: Any, key: list[Column[Any]]) -> bool:
    """INSERT ``obj`` unless its key is taken; True (and ``obj`` persistent) if it was
    stored. MySQL says so only for an auto-increment key (the new id, else 0): for
    other keys this answers False there, and the caller reads the row."""
    connection = await session.connection()
    assert connection.sync_connection is not None
    dialect = connection.dialect
    mapper = sa_inspect(type(obj))
    prepare(connection.sync_connection, mapper, [obj])
    plan = make_plan(mapper, dialect, server_made(mapper, [obj])[0])
    sql = insert_sql(dialect, plan) + values(dialect, 1, len(plan.written))
    if dialect.name == "mysql":  # "pk = pk" changes nothing, and fails nothing else
        pk = dialect.identifier_preparer.quote(plan.primary_key[0].name)
        sql += f" ON DUPLICATE KEY UPDATE {pk} = {pk}"
        inserted = (await connection.exec_driver_sql(sql, plan.row(obj))).lastrowid
        if not (plan.ids_in_order and inserted):  # 0: the row existed (or no auto-increment)
            return False
        made = [plan.returned[0]]
        row = (await read_back(connection, plan, plan.returned, made, [(inserted,)]))[0]
    else:
        sql += f" ON CONFLICT ({names(dialect, key)}) DO NOTHING"
        sql += f" RETURNING {names(dialect, plan.returned)}"
        row = (await connection.exec_driver_sql(sql, plan.row(obj))).first()
        if row is None:
            return False
    before = [{k: obj.__dict__.get(k) for k in plan.keys}]
    for column, value in zip(plan.returned, plan.stored(row), strict=True):
        set_committed_value(obj, mapper.get_property_by_column(column).key, value)
    attach_inserted(session, [obj], before)
    return True


# -- The kit's User and Team, under the seed's names: thin wrappers --------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused.


class RepeatedEmailError(RepeatedKeyError):
    """One ``upsert_users`` call names the same email (once canonical) twice."""

    def __init__(self, email: str) -> None:
        super().__init__("User", {"email": email})
        self.email = email


async def upsert_users(
    session: AsyncSession, users: Sequence[User], batch_size: int = CHUNK
) -> list[User]:
    """``upsert`` of users by email (name, is_active and team_id updated, version + 1).

    Refused before anything is sent: one email twice (``RepeatedEmailError``),
    an email or a name no backend may store (``ValueError``); a team that does
    not exist is ``LookupError``. All or nothing.
    """
    from .models import MAX_ID, Email

    for user in users:
        _check_user(user, Email, MAX_ID)
    try:
        return await upsert(session, users, ["email"], batch_size=batch_size)
    except RepeatedKeyError as exc:
        raise RepeatedEmailError(exc.key["email"]) from None
    except LookupError:  # team_id is the user's only foreign key
        raise LookupError("Team not found: a team_id given has no team") from None


def _check_user(user: Any, email_type: Any, max_id: int) -> None:
    """What no backend may store, refused before anything is sent: text that is not
    text, too long, NUL (PostgreSQL refuses it), a lone surrogate; a team id out of range."""
    if not isinstance(user.email, str):
        raise ValueError(f"the email must be text, not {type(user.email).__name__}")
    email = email_type.canonical(user.email)  # ValueError beyond 255 characters
    name = user.name
    if not isinstance(name, str) or len(name) > 100:
        raise ValueError(f"{email}: the name must be text of at most 100 characters")
    if "\x00" in email or "\x00" in name:
        raise ValueError(f"{email!r}: NUL characters cannot be stored (PostgreSQL refuses them)")
    if any("\ud800" <= c <= "\udfff" for c in email + name):
        raise ValueError(f"{email!r}: a lone surrogate is not text any backend can store")
    team_id = user.team_id
    if team_id is not None and not (isinstance(team_id, int) and 0 < team_id <= max_id):
        raise LookupError(f"Team not found: no team has the id {team_id!r}")


async def get_or_create_team(session: AsyncSession, name: str) -> Team:
    """``get_or_create`` of a team by name, stored and matched in canonical form
    (trimmed, NFC); ``ValueError`` if blank or longer than 100 characters once normalized."""
    from .models import Team, checked_name

    if not isinstance(name, str):
        raise ValueError(f"a team name is text, not {type(name).__name__}")
    return await get_or_create(session, Team, name=checked_name(name))
