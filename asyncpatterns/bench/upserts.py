"""The upsert scenario: ``upsert``, insert or update by email, half the rows existing.

* ``upsert`` -- N users (10,000 by default, ``--rows``), half of them
  already stored: the common select-then-insert-or-update loop, the kit's
  ``upserts.upsert_users`` (ids back) and the driver's ``executemany`` of the
  backend's own upsert statement (no ids back). Above ``ROW_AT_A_TIME_LIMIT``
  rows the common loop is left out.

It empties the user table: give it only a throw-away database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from .. import upserts
from ..db import make_session_maker
from ..models import User
from .measure import ANTI, DEFAULT_REPEATS, KIT, RAW, Result, Variant, measure
from .scenarios import (
    FULL,
    ROW_AT_A_TIME_LIMIT,
    USER_COLUMNS,
    _empty_user_table,
    driver_connection,
)

# --- upsert: insert or update by email, half the rows existing --------------------


async def common_upsert_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The common upsert: look each email up, then update that row or add a new one."""
    for data in users:
        existing = (await session.exec(select(User).where(User.email == data.email))).first()
        if existing:
            existing.name = data.name
            existing.is_active = data.is_active
            existing.team_id = data.team_id
        else:
            session.add(data)
    await session.commit()
    return users


async def raw_upsert(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """The backend's own upsert statement, one driver ``executemany`` in one
    transaction (aiomysql folds it into multi-row INSERTs). No ids come back."""
    names = ", ".join(USER_COLUMNS)
    async with driver_connection(engine) as driver:
        if engine.dialect.name == "postgresql":
            marks = "%s, %s, %s, %s" if engine.dialect.driver == "psycopg" else "$1, $2, $3, $4"
            sql = (
                f'INSERT INTO "user" ({names}) VALUES ({marks}) ON CONFLICT (email) '
                "DO UPDATE SET name = excluded.name, is_active = excluded.is_active, "
                'team_id = excluded.team_id, version = "user".version + 1'
            )
            if engine.dialect.driver == "psycopg":
                async with driver.cursor() as cursor:
                    await cursor.executemany(sql, rows)
                await driver.commit()
            else:
                async with driver.transaction():
                    await driver.executemany(sql, rows)
        elif engine.dialect.name == "sqlite":
            sql = (
                f"INSERT INTO user ({names}) VALUES (?, ?, ?, ?) ON CONFLICT (email) "
                "DO UPDATE SET name = excluded.name, is_active = excluded.is_active, "
                "team_id = excluded.team_id, version = user.version + 1"
            )
            await driver.execute("BEGIN")
            await driver.executemany(sql, rows)
            await driver.execute("COMMIT")
        else:
            sql = (
                f"INSERT INTO user ({names}) VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
                "name = VALUES(name), is_active = VALUES(is_active), "
                "team_id = VALUES(team_id), version = user.version + 1"
            )
            async with driver.cursor() as cursor:
                await cursor.executemany(sql, rows)
            await driver.commit()
    return 1


async def upsert(
    engine: AsyncEngine,
    users: int = FULL["users"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Upsert ``users`` users of which half (every other email) exist, each way.

    Before every run the table holds the same half; afterwards it must hold
    every user once, renamed: a variant that does not is an error, not a time.
    """
    session_maker = make_session_maker(engine)
    existing = [{"name": f"Old {i}", "email": f"user{i}@example.com"} for i in range(0, users, 2)]

    async def prepare() -> tuple[list[User], list[tuple[Any, ...]]]:
        await _empty_user_table(engine)
        async with engine.begin() as conn:
            await conn.execute(insert(User), existing)
        fresh = [User(name=f"New {i}", email=f"user{i}@example.com") for i in range(users)]
        return fresh, [tuple(getattr(u, c) for c in USER_COLUMNS) for u in fresh]

    async def common(payload: Any) -> None:
        async with session_maker() as session:
            await common_upsert_users(session, payload[0])

    async def kit(payload: Any) -> None:
        async with session_maker() as session:
            await upserts.upsert_users(session, payload[0])

    async def check(variant: Variant) -> None:
        async with session_maker() as session:
            names = (await session.exec(select(User.name))).all()
        if len(names) != users or any(not name.startswith("New ") for name in names):
            raise RuntimeError(f"{variant.name} did not store every user once, renamed")

    variants = []
    if users <= ROW_AT_A_TIME_LIMIT:
        variants.append(Variant("common: select, insert or update each", ANTI, common))
    variants += [
        Variant("kit: upserts.upsert_users", KIT, kit),
        Variant("raw driver: executemany of the upsert", RAW, lambda p: raw_upsert(engine, p[1])),
    ]
    try:
        results = await measure("upsert", engine, variants, prepare, repeats, progress, check)
    finally:
        await _empty_user_table(engine)
    for result in results:
        result.extra.update(users=users, existing=len(existing))
        result.notes = f"{users / result.seconds:,.0f} rows/s"
    return results
