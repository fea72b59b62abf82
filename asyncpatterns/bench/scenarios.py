"""The bench's scenarios: the common pattern, the kit's, and the raw driver, side by side.

One module per scenario group, each readable on its own:

* ``inserts.py`` -- ``bulk_insert``: N users written every way, down to the driver.
* ``upserts.py`` -- ``upsert``: N users inserted or updated by email, half existing.
* ``loading.py`` -- ``eager_loading``: teams and their members, N+1 against eager loads.
* ``concurrency.py`` -- ``pool_sweep`` (queries per second at each pool size) and
  ``transfers`` (concurrent transfers, and the money the common version loses).
* ``streams.py`` -- ``streaming``: the peak memory of ``.all()`` against a stream.
* ``pages.py`` -- ``pagination``: a deep page by ``OFFSET`` against a keyset page.

This module holds what they share: the sizes of a full and a quick run, the user
table's columns, emptying it, and the driver's own connection. The scenario
functions empty the kit's tables: give them only a throw-away database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..models import User

FULL = {"users": 10_000, "teams": 100, "members": 10, "queries": 500, "transfers": 500}
QUICK = {"users": 100, "teams": 10, "members": 5, "queries": 20, "transfers": 20}
# Table sizes the streaming scenario reads (--stream-rows: e.g. 10000,100000,1000000).
FULL["stream_rows"] = (10_000, 100_000)  # type: ignore[assignment]
QUICK["stream_rows"] = (100, 1_000)  # type: ignore[assignment]
FULL["page_rows"], QUICK["page_rows"] = 100_000, 1_000  # the pagination scenario's table
# Above this many rows, bulk_insert and upsert leave their row-at-a-time variants out.
ROW_AT_A_TIME_LIMIT = 20_000

USER_COLUMNS = ("name", "email", "is_active", "team_id")


async def _empty_user_table(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # no dead rows left for the next round
            await conn.execute(text('TRUNCATE "user" CASCADE'))
        else:
            await conn.execute(delete(User))


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """The driver's own connection (asyncpg, aiosqlite, aiomysql) from the pool."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        yield raw.driver_connection


async def _nothing() -> None:
    return None
