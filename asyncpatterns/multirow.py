"""Many rows of any SQLModel table in one statement per batch, with their new ids.

``bulk.create_many`` and ``upserts.upsert`` are built on this. The common
pattern, ``add_all`` then one ``refresh`` per object, sends a SELECT per row;
the ORM's own bulk INSERT builds a second set of objects from what it reads
back, which costs more than the INSERT. Here the statement is written for the
driver from the table's metadata, and the values the database made (ids,
server defaults) are set on the objects passed in:

* PostgreSQL: one statement for any number of rows, one array per column,
  ``INSERT ... SELECT * FROM unnest(...) WITH ORDINALITY ... ORDER BY ordinal``.
* SQLite and MariaDB: ``INSERT ... VALUES (...), (...) ... RETURNING`` per 1,000 rows.
* MySQL (no ``RETURNING``): the same ``VALUES``, then one SELECT per batch that
  reads the new ids back by a unique key the rows set (without one: one INSERT
  per row, which is what MySQL offers).

Which id belongs to which object (``RETURNING`` may list rows in any order):
the returned row names the object by its primary key, when the objects carry
it, or by a unique key they all set (an email). Without either, by order: the
ids of an auto-increment key grow with each row, and each backend inserts the
rows in the order given (PostgreSQL: ``ORDER BY`` the position in the arrays),
so the ids, sorted, line up with the objects -- how SQLAlchemy pairs them too.

Values go through each column's type (``TypeDecorator``\\s included) as the ORM
would send them; mapper ``before_insert`` hooks run, as in a flush.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    JSON,
    Column,
    Computed,
    Identity,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import attach_inserted

M = TypeVar("M", bound=SQLModel)

CHUNK = 1000  # rows per statement (VALUES lists)
MAX_PARAMETERS = 32_000  # per statement: SQLite allows 32,766, asyncpg 32,767


@dataclass
class Plan:
    """What a batch statement writes (columns, attribute keys, bind processors) and
    what it reads back (``returned``: the primary key first, then what the server
    makes: auto-increment ids, server defaults, computed columns)."""

    mapper: Mapper[Any]
    dialect: Any
    written: list[Column[Any]]
    keys: list[str]
    processors: list[tuple[int, Any]]  # (position, bind processor) of the columns with one
    returned: list[Column[Any]]
    results: list[Any]

    def row(self, obj: Any) -> tuple[Any, ...]:
        given = obj.__dict__
        values = [given.get(key) for key in self.keys]
        for at, process in self.processors:
            if values[at] is not None:
                values[at] = process(values[at])
        return tuple(values)

    def stored(self, raw: Sequence[Any]) -> list[Any]:
        """A returned row as Python values (through each type's result processor)."""
        return [v if p is None else p(v) for v, p in zip(raw, self.results, strict=True)]

    def as_sent(self, columns: Sequence[Column[Any]]) -> Any:
        """A function from the raw values of ``columns``, as a driver returns them, to
        the values as ``row`` sends them (the types' result, then bind processors):
        a UUID stored as text comes back as the text it was sent as."""
        steps = []
        for column in columns:
            impl = column.type.dialect_impl(self.dialect)
            steps.append(
                (impl.result_processor(self.dialect, None), impl.bind_processor(self.dialect))
            )

        def sent(raw: Sequence[Any]) -> tuple[Any, ...]:
            values = []
            for value, (result, bind) in zip(raw, steps, strict=True):
                if value is not None and result is not None:
                    value = result(value)
                values.append(value if value is None or bind is None else bind(value))
            return tuple(values)

        return sent

    @property
    def primary_key(self) -> list[Column[Any]]:
        return list(self.mapper.local_table.primary_key.columns)

    @property
    def ids_in_order(self) -> bool:
        """The database numbers the rows itself (sortable: see the module docstring)."""
        return self.returned[0] is self.mapper.local_table.autoincrement_column and (
            self.returned[0] not in self.written
        )

    @property
    def carries_key(self) -> bool:
        """The rows carry their whole primary key (a UUID made in Python, say)."""
        return all(c in self.written for c in self.primary_key)


def make_plan(mapper: Mapper[Any], dialect: Any, omitted: frozenset[str]) -> Plan:
    """The plan for rows that leave the columns named in ``omitted`` to the server."""
    table = mapper.local_table
    written = [c for c in table.columns if c.name not in omitted and c.computed is None]
    primary = list(table.primary_key.columns)
    made = [c for c in table.columns if c not in written and c not in primary]
    returned = [*primary, *made]
    return Plan(
        mapper=mapper,
        dialect=dialect,
        written=written,
        keys=[mapper.get_property_by_column(c).key for c in written],
        processors=[
            (at, process)
            for at, c in enumerate(written)
            if (process := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ],
        returned=returned,
        results=[c.type.dialect_impl(dialect).result_processor(dialect, None) for c in returned],
    )


def server_made(mapper: Mapper[Any], objects: Sequence[Any]) -> list[frozenset[str]]:
    """Per object, the columns the server fills in: those left None that have an
    auto-increment, a server default or a computed value."""
    table = mapper.local_table
    made = [
        (c.name, mapper.get_property_by_column(c).key)
        for c in table.columns
        if c is table.autoincrement_column
        or c.server_default is not None
        or isinstance(c.computed, Computed)
        or isinstance(c.identity, Identity)
    ]
    groups: dict[tuple[str, ...], frozenset[str]] = {(): frozenset()}
    result = []
    for obj in objects:
        values = obj.__dict__
        omitted = tuple([name for name, key in made if values.get(key) is None])
        result.append(groups.get(omitted) or groups.setdefault(omitted, frozenset(omitted)))
    return result


def one_model(objects: Sequence[M]) -> type[M]:
    """The one table model of ``objects``: TypeError for a mix or a non-table class."""
    model = type(objects[0])
    if any(type(obj) is not model for obj in objects):
        raise TypeError("every object of one call must be of the same model")
    if getattr(model, "__table__", None) is None:
        raise TypeError(f"{model.__name__} is not a table (declare it with table=True)")
    return model


def prepare(connection: Connection, mapper: Mapper[Any], objects: Sequence[Any]) -> None:
    """What a flush does first: ``before_insert`` hooks, and the first version."""
    if mapper.dispatch.before_insert:  # listeners are called with each object's state
        for obj in objects:
            mapper.dispatch.before_insert(mapper, connection, instance_state(obj))
    version = mapper.version_id_col
    if version is not None and mapper.version_id_generator is not False:
        first = mapper.version_id_generator(None)
        key = mapper.get_property_by_column(version).key
        for obj in objects:
            value = obj.__dict__.get(key)
            if type(value) is not type(first) or value != first:  # 1.0 and True equal 1
                set_committed_value(obj, key, first)


async def insert_objects(session: AsyncSession, objects: Sequence[Any]) -> None:
    """INSERT new objects of one model in the session's transaction; set what the
    database made on them and make them persistent (``db.attach_inserted``)."""
    mapper = sa_inspect(type(objects[0]))
    connection = await session.connection()
    assert connection.sync_connection is not None
    prepare(connection.sync_connection, mapper, objects)
    before = [obj.__dict__.copy() for obj in objects]  # given back if this rolls back
    groups: dict[frozenset[str], list[Any]] = {}
    for obj, omitted in zip(objects, server_made(mapper, objects), strict=True):
        groups.setdefault(omitted, []).append(obj)
    for omitted, members in groups.items():
        plan = make_plan(mapper, connection.dialect, omitted)
        rows = [plan.row(obj) for obj in members]
        stored = await insert_rows(connection, plan, rows)
        returned_keys = [mapper.get_property_by_column(c).key for c in plan.returned]
        for obj, values in zip(members, stored, strict=True):
            for key, value in zip(returned_keys, plan.stored(values), strict=True):
                set_committed_value(obj, key, value)
    attach_inserted(session, objects, before)


async def insert_rows(
    connection: AsyncConnection, plan: Plan, rows: list[tuple[Any, ...]]
) -> list[Sequence[Any]]:
    """INSERT ``rows``; return, per row in order, the raw ``plan.returned`` values.

    Which returned row is whose: by the primary key when the rows carry it, else
    by a unique key they all set (an email), else by the ids in ascending order.
    """
    dialect = connection.dialect
    if not dialect.insert_returning:
        return await _insert_without_returning(connection, plan, rows)
    sql = insert_sql(dialect, plan)
    key = plan.primary_key if plan.carries_key else unique_key_set_by(plan, rows)
    returning = " RETURNING " + names(dialect, plan.returned + (key or []))
    if key is None and not plan.ids_in_order:
        # Ids made by a server default (a UUID function), nothing else to tell them apart.
        one = sql + values(dialect, 1, len(plan.written)) + returning
        return [(await connection.exec_driver_sql(one, row)).one() for row in rows]
    if dialect.name == "postgresql" and unnest_ok(plan):
        statement = unnest_sql(dialect, plan, ordered=key is None) + returning
        found = await connection.exec_driver_sql(statement, columns_of(rows, len(plan.written)))
        return pair(plan, rows, list(found), key)
    found = []
    for chunk in chunks(rows, len(plan.written)):
        statement = sql + values(dialect, len(chunk), len(plan.written)) + returning
        found += (await connection.exec_driver_sql(statement, flat(chunk))).all()
    return pair(plan, rows, found, key)


async def _insert_without_returning(
    connection: AsyncConnection, plan: Plan, rows: list[tuple[Any, ...]]
) -> list[Sequence[Any]]:
    """MySQL: INSERT, then read back what the server made, by the primary key when
    the rows carry it, else by a unique key they all set, else one INSERT per row."""
    dialect = connection.dialect
    sql = insert_sql(dialect, plan)
    width = len(plan.written)
    key = plan.primary_key if plan.carries_key else unique_key_set_by(plan, rows)
    if key is None and not plan.ids_in_order:
        raise NotImplementedError(
            f"{plan.mapper.class_.__name__}: MySQL cannot say which key its server default "
            "made for each row (no RETURNING): set the key in Python, or add a unique key"
        )
    if key is None:  # nothing else tells the rows apart: one statement each
        ids = []
        for row in rows:
            result = await connection.exec_driver_sql(sql + values(dialect, 1, width), row)
            ids.append((result.lastrowid,))
        return await read_back(connection, plan, plan.returned, [plan.returned[0]], ids)
    at = [plan.written.index(c) for c in key]
    found: list[Sequence[Any]] = []
    for chunk in chunks(rows, width):  # per chunk: INSERT, then read back what it made
        await connection.exec_driver_sql(sql + values(dialect, len(chunk), width), flat(chunk))
        wanted = [tuple(row[i] for i in at) for row in chunk]
        if plan.carries_key and len(plan.returned) == len(key):
            found += wanted  # the key is all there is to return
        else:
            found += await read_back(connection, plan, plan.returned, key, wanted)
    return found


async def read_back(
    connection: AsyncConnection,
    plan: Plan,
    columns: list[Column[Any]],
    key: list[Column[Any]],
    wanted: list[tuple[Any, ...]],
    locking: str = "",
) -> list[Sequence[Any]]:
    """``columns`` of the stored rows whose ``key`` has the values ``wanted`` (as the
    driver sends and returns them), in that order."""
    dialect = connection.dialect
    found: dict[tuple[Any, ...], Sequence[Any]] = {}
    width = len(key)
    sent = plan.as_sent(key)
    for start in range(0, len(wanted), CHUNK):
        part = wanted[start : start + CHUNK]
        where = f"({names(dialect, key)}) IN ({values(dialect, len(part), width)[7:]})"
        sql = (
            f"SELECT {names(dialect, columns + key)} FROM "
            f"{dialect.identifier_preparer.format_table(plan.mapper.local_table)} "
            f"WHERE {where}{locking}"
        )
        for row in await connection.exec_driver_sql(sql, flat(part)):
            found[sent(row[len(columns) :])] = row[: len(columns)]
    return [found[values_] for values_ in wanted]


def unique_key_set_by(plan: Plan, rows: list[tuple[Any, ...]]) -> list[Column[Any]] | None:
    """A unique key of the table whose columns every row writes, none of them NULL,
    all of them text, integers or UUIDs: values that come back as they were sent."""
    table = plan.mapper.local_table
    keys = [list(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)]
    keys += [list(index.columns) for index in table.indexes if index.unique]
    for key in keys:
        if all(c in plan.written and _comes_back_as_sent(c) for c in key):
            at = [plan.written.index(c) for c in key]
            if all(row[i] is not None for row in rows for i in at):
                return key
    return None


def _comes_back_as_sent(column: Column[Any]) -> bool:
    kind = column.type
    if isinstance(kind, TypeDecorator):
        kind = kind.impl_instance
    return isinstance(kind, String | Integer | Uuid)


def pair(
    plan: Plan,
    rows: list[tuple[Any, ...]],
    found: Sequence[Sequence[Any]],
    key: list[Column[Any]] | None,
) -> list[Sequence[Any]]:
    """Line the returned rows (``plan.returned``, then ``key``) up with ``rows``: by
    ``key``, or without one by the ids the database gave, ascending (module docstring)."""
    if key is None:
        return sorted(found, key=itemgetter(0))
    width = len(plan.returned)
    at = [plan.written.index(c) for c in key]
    sent = plan.as_sent(key)
    by_key = {sent(row[width:]): row[:width] for row in found}
    return [by_key[tuple(row[i] for i in at)] for row in rows]


def insert_sql(dialect: Any, plan: Plan) -> str:
    table = dialect.identifier_preparer.format_table(plan.mapper.local_table)
    return f"INSERT INTO {table} ({names(dialect, plan.written)}) "


def names(dialect: Any, columns: Sequence[Column[Any]]) -> str:
    return ", ".join(dialect.identifier_preparer.quote(c.name) for c in columns)


def values(dialect: Any, rows: int, width: int) -> str:
    """``VALUES (?, ?), (?, ?)`` in the driver's parameter style."""
    if dialect.paramstyle == "numeric_dollar":  # asyncpg: $1, $2, ...
        groups = (
            "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")"
            for r in range(rows)
        )
        return "VALUES " + ", ".join(groups)
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    return "VALUES " + ", ".join(["(" + ", ".join([marker] * width) + ")"] * rows)


def unnest_ok(plan: Plan) -> bool:
    """unnest() flattens arrays, and casting JSON text into json[] needs care:
    tables with such columns take the VALUES path."""
    return not any(isinstance(c.type, ARRAY | JSON) for c in plan.written)


def unnest_sql(dialect: Any, plan: Plan, ordered: bool = True) -> str:
    """PostgreSQL: the rows as one array per column; ``ordered``: inserted in the
    order given (what pairing by ascending ids needs; a sort on the server)."""
    if dialect.paramstyle == "numeric_dollar":
        markers = [f"${i + 1}" for i in range(len(plan.written))]
    else:
        markers = ["%s"] * len(plan.written)
    arrays = ", ".join(
        f"{m}::{c.type.compile(dialect=dialect)}[]"
        for m, c in zip(markers, plan.written, strict=True)
    )
    given = names(dialect, plan.written)
    if not ordered:
        return insert_sql(dialect, plan) + f"SELECT * FROM unnest({arrays})"
    return (
        insert_sql(dialect, plan) + f"SELECT {given} FROM unnest({arrays}) "
        f"WITH ORDINALITY AS given({given}, ordinal) ORDER BY ordinal"
    )


def columns_of(rows: list[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    return tuple(list(column) for column in zip(*rows, strict=True)) if rows else ([],) * width


def chunks(rows: list[tuple[Any, ...]], width: int) -> list[list[tuple[Any, ...]]]:
    size = max(1, min(CHUNK, MAX_PARAMETERS // max(width, 1)))
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def flat(rows: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    return tuple(value for row in rows for value in row)
