"""The pagination scenario: ``pagination``, a deep page by offset and by keyset.

* ``pagination`` -- N users (100,000 by default; names with ties), page 1,000
  of 100 rows read by ``OFFSET`` (``crud.list_page``) and by keyset
  (``pagination.keyset_page`` from the cursor the page before gave), in id order
  and in name order; and the keyset's first page, for scale. An offset page
  reads and drops every row before it; a keyset page starts at an index seek.

It empties the user table: give it only a throw-away database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from tqdm import tqdm

from .. import crud, pagination
from ..db import make_session_maker
from ..models import User
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, Result, Variant, measure
from .scenarios import FULL, _empty_user_table, _nothing

PAGE = 100
NAMES = 5_000  # distinct names: 20 users share each at 100,000 rows


async def _add_users(engine: AsyncEngine, rows: int) -> None:
    async with engine.begin() as conn:
        for start in range(0, rows, 10_000):
            batch = range(start, min(start + 10_000, rows))
            await conn.execute(
                insert(User),
                [
                    {"name": f"name {i * 7919 % NAMES:05}", "email": f"u{i}@example.com"}
                    for i in batch
                ],
            )


async def _cursor_before(engine: AsyncEngine, skip: int, by_name: bool) -> str:
    """The ``next`` cursor of the page before the one at ``skip``: the row at
    ``skip - 1``, encoded as ``keyset_page`` encodes it."""
    order = [col(User.name), col(User.id)] if by_name else [col(User.id)]
    async with make_session_maker(engine)() as session:
        row = (await session.exec(select(*order).order_by(*order).offset(skip - 1).limit(1))).one()
    values = list(row) if by_name else [row]
    return pagination._encode("name,id" if by_name else "id", "next", values)


async def pagination_scenario(
    engine: AsyncEngine,
    rows: int = FULL["page_rows"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Page ``rows / PAGE`` (the last) of ``rows`` users, by offset and by keyset."""
    sessions = make_session_maker(engine)
    skip = max(rows - PAGE, 1)
    await _empty_user_table(engine)
    await _add_users(engine, rows)
    by_id, by_name = (
        await _cursor_before(engine, skip, False),
        await _cursor_before(engine, skip, True),
    )

    def offset(order: list[Any]) -> Any:
        async def run(_payload: Any) -> None:
            async with sessions() as session:
                page = await crud.list_page(session, User, skip, PAGE, order_by=order)
            if len(page) != rows - skip:
                raise RuntimeError("offset page: wrong size")

        return run

    def keyset(order_by: Any, cursor: str | None) -> Any:
        async def run(_payload: Any) -> None:
            async with sessions() as session:
                page = await pagination.keyset_page(session, User, order_by=order_by, cursor=cursor)
            if len(page.items) != min(PAGE, rows if cursor is None else rows - skip):
                raise RuntimeError("keyset page: wrong size")

        return run

    variants = [
        Variant(f"offset by id: OFFSET {skip:,}", ANTI, offset([])),
        Variant("keyset by id: keyset_page(cursor)", KIT, keyset(None, by_id)),
        Variant(f"offset by name: OFFSET {skip:,}", OTHER, offset([col(User.name)])),
        Variant("keyset by name: keyset_page(cursor)", KIT, keyset(User.name, by_name)),
        Variant("keyset by name, page 1 (for scale)", OTHER, keyset(User.name, None)),
    ]
    try:
        results = await measure("pagination", engine, variants, _nothing, repeats, progress)
    finally:
        await _empty_user_table(engine)
    seconds = {r.variant.split(":")[0]: r.seconds for r in results}
    for result in results:
        result.extra.update(rows=rows, page=PAGE, skip=skip)
        way = result.variant.split(":")[0]
        if way.startswith("keyset by") and "page 1" not in way:
            twin = seconds[way.replace("keyset", "offset")]
            result.notes = f"{twin / result.seconds:.1f}x faster than its offset"
    return results
