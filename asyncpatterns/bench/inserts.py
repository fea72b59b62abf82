"""The bulk insert scenario: ``bulk_insert``, N users written every way.

* ``bulk_insert`` -- N users (10,000 by default, ``--rows``), the ladder from
  the common pattern's ``create_users`` (one refresh per row) through
  ``add_all``, the kit's ``crud.create_users`` (the generic ``bulk.create_many``),
  SQLAlchemy Core's executemany, to the raw driver's ``executemany``; on
  PostgreSQL also ``crud.copy_users`` and asyncpg's ``copy_records_to_table``.
  The generic path is held against ``handwritten_create_users``, an INSERT
  written by hand for the User table's columns (what the kit had before its
  patterns were generic). Two more lines take the kit apart: its INSERT
  alone, and the session's bookkeeping alone (no database). Above 20,000 rows
  (``ROW_AT_A_TIME_LIMIT``) the two row-at-a-time variants are left out: each
  run would take minutes.

It empties the user table: give it only a throw-away database.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from .. import crud, multirow
from ..db import attach_inserted, make_session_maker, run_in_transaction
from ..models import User, canonical_email
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, RAW, Result, Variant, measure
from .scenarios import (
    FULL,
    ROW_AT_A_TIME_LIMIT,
    USER_COLUMNS,
    _empty_user_table,
    driver_connection,
)

# --- the common pattern's code, kept as the anti-pattern ---


async def common_create_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The common bulk create: one SELECT per user after the commit."""
    session.add_all(users)
    await session.commit()
    for user in users:
        await session.refresh(user)
    return users


# --- bulk insert --------------------------------------------------------------


def make_users(count: int) -> list[User]:
    return [User(name=f"User {i}", email=f"user{i}@example.com") for i in range(count)]


async def handwritten_create_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The yardstick for ``bulk.create_many``: the same work (ids back, objects made
    persistent) with SQL written by hand for the User table's four columns."""
    rows = []
    for user in users:  # as the kit did it: canonical emails, the first version
        email = canonical_email(user.email)
        if email != user.email:
            user.email = email
        if type(user.version) is not int or user.version != 1:
            set_committed_value(user, "version", 1)
        rows.append((user.name, email, user.is_active, user.team_id))

    async def insert_all(tx: AsyncSession) -> list[User]:
        connection = await tx.connection()
        dialect = connection.dialect
        sql = f"INSERT INTO {dialect.identifier_preparer.quote('user')} "
        sql += "(name, email, is_active, team_id) "
        if dialect.name == "postgresql":
            marks = ["%s"] * 4 if dialect.driver == "psycopg" else ["$1", "$2", "$3", "$4"]
            sql += "SELECT * FROM unnest({}::varchar[], {}::varchar[], {}::boolean[],".format(
                *marks[:3]
            )
            sql += f" {marks[3]}::integer[]) RETURNING id, email"
            columns = tuple(list(column) for column in zip(*rows, strict=True))
            ids = {email: i for i, email in await connection.exec_driver_sql(sql, columns)}
        else:
            marker = "?" if dialect.paramstyle == "qmark" else "%s"
            ids = {}
            for start in range(0, len(rows), multirow.CHUNK):
                chunk = rows[start : start + multirow.CHUNK]
                values = ", ".join([f"({marker}, {marker}, {marker}, {marker})"] * len(chunk))
                flat = tuple(value for row in chunk for value in row)
                if dialect.insert_returning:
                    statement = f"{sql}VALUES {values} RETURNING id, email"
                    found = await connection.exec_driver_sql(statement, flat)
                else:  # MySQL: read the new ids back by email
                    await connection.exec_driver_sql(f"{sql}VALUES {values}", flat)
                    emails = [row[1] for row in chunk]
                    found = await tx.exec(
                        select(User.id, User.email).where(col(User.email).in_(emails))
                    )
                ids.update({email: i for i, email in found})
        for user, row in zip(users, rows, strict=True):
            set_committed_value(user, "id", ids[row[1]])
        attach_inserted(tx, users)
        return users

    return await run_in_transaction(session, insert_all)


async def raw_executemany(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """One driver ``executemany`` in one transaction: the physical limit."""
    names = ", ".join(USER_COLUMNS)
    async with driver_connection(engine) as driver:
        if engine.dialect.driver == "psycopg":
            async with driver.cursor() as cursor:
                sql = f'INSERT INTO "user" ({names}) VALUES (%s, %s, %s, %s)'
                await cursor.executemany(sql, rows)
            await driver.commit()
        elif engine.dialect.name == "postgresql":
            sql = f'INSERT INTO "user" ({names}) VALUES ($1, $2, $3, $4)'
            async with driver.transaction():
                await driver.executemany(sql, rows)
        elif engine.dialect.name == "sqlite":
            await driver.execute("BEGIN")
            await driver.executemany(f"INSERT INTO user ({names}) VALUES (?, ?, ?, ?)", rows)
            await driver.execute("COMMIT")
        else:
            async with driver.cursor() as cursor:
                sql = f"INSERT INTO user ({names}) VALUES (%s, %s, %s, %s)"
                await cursor.executemany(sql, rows)
            await driver.commit()
    return 1


async def raw_copy(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """The driver's COPY in one transaction (PostgreSQL only): asyncpg's binary
    ``copy_records_to_table``, psycopg's ``cursor.copy``."""
    async with driver_connection(engine) as driver:
        if engine.dialect.driver == "psycopg":
            sql = f'COPY "user" ({", ".join(USER_COLUMNS)}) FROM STDIN'
            async with driver.cursor() as cursor, cursor.copy(sql) as copy:
                for row in rows:
                    await copy.write_row(row)
            await driver.commit()
            return 1
        async with driver.transaction():
            await driver.copy_records_to_table("user", records=rows, columns=USER_COLUMNS)
    return 1


async def bulk_insert(
    engine: AsyncEngine,
    users: int = FULL["users"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Insert ``users`` users each way; the user table is emptied before every run."""
    session_maker = make_session_maker(engine)

    async def prepare() -> tuple[list[User], list[tuple[Any, ...]]]:
        await _empty_user_table(engine)
        fresh = make_users(users)
        return fresh, [tuple(getattr(u, c) for c in USER_COLUMNS) for u in fresh]

    async def common(payload: Any) -> None:
        async with session_maker() as session:
            await common_create_users(session, payload[0])

    async def add_all(payload: Any) -> None:
        async with session_maker() as session:
            session.add_all(payload[0])
            await session.commit()

    async def kit(payload: Any) -> None:
        async with session_maker() as session:
            await crud.create_users(session, payload[0])

    async def handwritten(payload: Any) -> None:
        async with session_maker() as session:
            await handwritten_create_users(session, payload[0])

    async def kit_insert(payload: Any) -> None:
        async with session_maker() as session, session.begin():
            connection = await session.connection()
            mapper = sqlalchemy.inspect(User)
            plan = multirow.make_plan(mapper, connection.dialect, frozenset({"id"}))
            rows = [plan.row(user) for user in payload[0]]  # as create_many makes them
            await multirow.insert_rows(connection, plan, rows)

    async def kit_attach(payload: Any) -> None:
        # What create_users does once the ids are back, with made-up ids: SQLAlchemy's
        # per-object work to make objects persistent, in a transaction that never
        # connects (nothing to send), then the session's close.
        async with session_maker() as session, session.begin():
            for id_, user in enumerate(payload[0], start=1):
                set_committed_value(user, "id", id_)
            attach_inserted(session, payload[0])

    async def core(payload: Any) -> None:
        rows = [dict(zip(USER_COLUMNS, row, strict=True)) for row in payload[1]]
        async with session_maker() as session:
            await session.exec(insert(User), params=rows)  # executemany, no ids back
            await session.commit()

    async def kit_copy(payload: Any) -> int:
        async with session_maker() as session:
            await crud.copy_users(session, payload[0])
        return 1  # the COPY itself, which sqlwatch does not see

    variants = []
    if users <= ROW_AT_A_TIME_LIMIT:
        variants += [
            Variant("common: add_all, commit, refresh each", ANTI, common),
            Variant("add_all + commit", OTHER, add_all),
        ]
    variants += [
        Variant("kit: crud.create_users", KIT, kit),
        Variant("  hand-written for User's columns", OTHER, handwritten),
        Variant("  of which the INSERT alone", KIT, kit_insert),
        Variant("  of which making them persistent", KIT, kit_attach),
        Variant("Core: execute(insert(User), rows)", OTHER, core),
        Variant("raw driver: executemany", RAW, lambda p: raw_executemany(engine, p[1])),
    ]
    if engine.dialect.name == "postgresql":
        variants += [
            Variant("kit: crud.copy_users (COPY)", KIT, kit_copy),
            Variant("raw driver: copy_records_to_table", RAW, lambda p: raw_copy(engine, p[1])),
        ]
    try:
        results = await measure("bulk_insert", engine, variants, prepare, repeats, progress)
    finally:
        await _empty_user_table(engine)
    copy_limit = next((r.seconds for r in results if r.variant.startswith("raw driver: copy")), 0)
    by_hand = next(r.seconds for r in results if r.variant.startswith("  hand-written"))
    for result in results:
        result.extra["users"] = users
        result.notes = f"{users / result.seconds:,.0f} rows/s"
        if result.variant == "kit: crud.create_users":
            result.notes += f", {result.seconds / by_hand:.2f}x the hand-written INSERT"
        if "copy_users" in result.variant and copy_limit:
            result.notes += f", {result.seconds / copy_limit:.2f}x copy_records_to_table"
    return results
