"""The streaming scenario: the peak memory of ``.all()`` against a stream.

* ``streaming`` -- a user table of 10,000 and 100,000 rows (``--stream-rows``,
  e.g. 10000,100000,1000000) read with ``.all()``, ``streaming.stream_users``,
  ``exports.export_users_csv`` and the driver's own cursor: peak memory, as
  a fraction of ``.all()``'s, flat for the streams however large the table.

It empties the user table: give it only a throw-away database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from tqdm import tqdm

from .. import exports, streaming
from ..db import make_session_maker
from ..models import User
from .inserts import raw_copy
from .measure import ANTI, DEFAULT_REPEATS, KIT, RAW, Result, Variant, measure
from .scenarios import FULL, USER_COLUMNS, _empty_user_table, _nothing, driver_connection

# Above this many rows each variant gets one timed run: a million ORM objects take a
# minute to build, and memory, not time, is what this scenario shows.
STREAM_TIMED_LIMIT = 100_000
STREAM_SQL = "SELECT id, name, email, is_active, team_id FROM {user} ORDER BY id"


async def _grow_user_table(engine: AsyncEngine, start: int, stop: int) -> None:
    """Users ``start`` .. ``stop - 1``: COPY on PostgreSQL, multi-row INSERTs elsewhere."""
    for first in range(start, stop, 50_000):
        rows = [
            (f"User {i}", f"user{i}@example.com", True, None)
            for i in range(first, min(stop, first + 50_000))
        ]
        if engine.dialect.name == "postgresql":
            await raw_copy(engine, rows)
            continue
        async with engine.begin() as conn:
            await conn.execute(
                insert(User), [dict(zip(USER_COLUMNS, r, strict=True)) for r in rows]
            )


async def raw_stream(engine: AsyncEngine, chunk: int = streaming.CHUNK_SIZE) -> int:
    """Every user's row through the driver's own cursor, ``chunk`` rows at a time:
    asyncpg's server-side cursor (in a transaction), psycopg's named cursor,
    aiomysql's unbuffered SSCursor, aiosqlite's cursor with fetchmany."""
    rows = 0
    async with driver_connection(engine) as driver:
        if engine.dialect.driver == "psycopg":
            async with driver.cursor(name="raw_stream") as cursor:
                await cursor.execute(STREAM_SQL.format(user='"user"'))
                while batch := await cursor.fetchmany(chunk):
                    rows += len(batch)
            await driver.rollback()
        elif engine.dialect.name == "postgresql":
            async with driver.transaction():
                cursor = driver.cursor(STREAM_SQL.format(user='"user"'), prefetch=chunk)
                async for _record in cursor:
                    rows += 1
        elif engine.dialect.name == "sqlite":
            async with driver.execute(STREAM_SQL.format(user="user")) as cursor:
                while batch := await cursor.fetchmany(chunk):
                    rows += len(batch)
        else:
            from aiomysql.cursors import SSCursor

            async with driver.cursor(SSCursor) as cursor:
                await cursor.execute(STREAM_SQL.format(user="user"))
                while batch := await cursor.fetchmany(chunk):
                    rows += len(batch)
            await driver.rollback()
    return rows


async def streaming_scenario(
    engine: AsyncEngine,
    sizes: Sequence[int] = FULL["stream_rows"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Read a user table of each size in ``sizes`` every way; the point is peak memory.

    ``.all()`` (the common way) holds every ORM object at once; ``stream_users`` and
    ``export_users_csv`` hold one chunk of 1,000 rows; the raw driver's cursor is the
    floor. The notes give each peak as a fraction of ``.all()``'s at the same size:
    a stream's peak stays flat as the table grows, ``.all()``'s grows with it.
    """
    session_maker = make_session_maker(engine)

    def check(rows: int, expected: int) -> None:
        if rows != expected:
            raise RuntimeError(f"read {rows} rows, expected {expected}")

    def variants(size: int) -> list[Variant]:
        async def everything(_payload: Any) -> None:
            async with session_maker() as session:
                check(len((await session.exec(select(User).order_by(User.id))).all()), size)

        async def stream_users(_payload: Any) -> None:
            rows = 0
            async with session_maker() as session, streaming.stream_users(session) as users:
                async for _user in users:
                    rows += 1
            check(rows, size)

        async def export_csv(_payload: Any) -> None:
            rows = 0
            async with session_maker() as session:
                async for text_chunk in exports.export_users_csv(session):
                    rows += text_chunk.count("\r\n")
            check(rows, size + 1)  # and the header

        async def raw(_payload: Any) -> int:
            check(await raw_stream(engine), size)
            return 1  # the driver's SELECT, which sqlwatch does not see

        at = f" @ {size:,}"
        return [
            Variant("common: .all()" + at, ANTI, everything),
            Variant("kit: stream_users (ORM)" + at, KIT, stream_users),
            Variant("kit: export_users_csv" + at, KIT, export_csv),
            Variant("raw driver: cursor" + at, RAW, raw),
        ]

    results: list[Result] = []
    await _empty_user_table(engine)
    stored = 0
    try:
        for size in sorted(sizes):
            await _grow_user_table(engine, stored, size)
            stored = size
            runs = repeats if size <= STREAM_TIMED_LIMIT else 1
            measured = await measure("streaming", engine, variants(size), _nothing, runs, progress)
            everything_peak = measured[0].peak_bytes
            for result in measured:
                result.extra.update(rows=size, sizes=sorted(sizes))
                result.extra["peak_vs_all"] = result.peak_bytes / everything_peak
                result.notes = (
                    f"peak {result.peak_bytes / everything_peak:.2g}x .all()'s; "
                    f"{size / result.seconds:,.0f} rows/s"
                )
            results += measured
    finally:
        await _empty_user_table(engine)
    return results
