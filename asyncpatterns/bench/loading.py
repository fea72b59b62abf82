"""The loading scenario: ``eager_loading``, teams and their members read every way.

* ``eager_loading`` -- 100 teams x 10 members: N+1 lazy loads, selectinload
  (the kit's choice), joinedload, and one JOIN through the raw driver.

It empties the team and user tables: give it only a throw-away database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from .. import relationships
from ..db import make_session_maker
from ..models import Team, User
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, RAW, Result, Run, Variant, measure
from .scenarios import FULL, _nothing, driver_connection


async def _add_teams(engine: AsyncEngine, teams: int, members: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(Team), [{"id": t + 1, "name": f"Team {t}"} for t in range(teams)])
        rows = [
            {"name": f"Member {t}.{m}", "email": f"m{t}.{m}@example.com", "team_id": t + 1}
            for t in range(teams)
            for m in range(members)
        ]
        await conn.execute(insert(User), rows)


async def _remove_teams(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(User))
        await conn.execute(delete(Team))


async def raw_teams_join(engine: AsyncEngine) -> int:
    """The same data as plain tuples from one JOIN through the driver."""
    sql = (
        "SELECT t.id, t.name, u.id, u.name, u.email FROM team t "
        "LEFT JOIN {user} u ON u.team_id = t.id ORDER BY t.id, u.id"
    )
    async with driver_connection(engine) as driver:
        if engine.dialect.driver == "psycopg":
            rows = await (await driver.execute(sql.format(user='"user"'))).fetchall()
            await driver.rollback()
        elif engine.dialect.name == "postgresql":
            rows = await driver.fetch(sql.format(user='"user"'))
        elif engine.dialect.name == "sqlite":
            async with driver.execute(sql.format(user="user")) as cursor:
                rows = await cursor.fetchall()
        else:
            async with driver.cursor() as cursor:
                await cursor.execute(sql.format(user="user"))
                rows = await cursor.fetchall()
            await driver.rollback()
    teams: dict[int, list[tuple[Any, ...]]] = {}
    for team_id, _name, *member in rows:
        teams.setdefault(team_id, []).append(tuple(member))
    return 1


async def eager_loading(
    engine: AsyncEngine,
    teams: int = FULL["teams"],
    members: int = FULL["members"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Load ``teams`` teams with ``members`` members each, every way, in a fresh session."""
    session_maker = make_session_maker(engine)

    def orm(loader: Callable[[AsyncSession], Awaitable[list[Team]]]) -> Run:
        async def run(_payload: Any) -> None:
            async with session_maker() as session:
                loaded = await loader(session)
            if sum(len(team.members) for team in loaded) != teams * members:
                raise RuntimeError(f"{loader.__name__} did not load every member")

        return run

    variants = [
        Variant("N+1: get_teams_one_query_each", ANTI, orm(relationships.get_teams_one_query_each)),
        Variant("kit: get_teams_with_members", KIT, orm(relationships.get_teams_with_members)),
        Variant(
            "joinedload: ..._members_joined",
            OTHER,
            orm(relationships.get_teams_with_members_joined),
        ),
        Variant("raw driver: one JOIN", RAW, lambda _p: raw_teams_join(engine)),
    ]
    await _add_teams(engine, teams, members)
    try:
        results = await measure("eager_loading", engine, variants, _nothing, repeats, progress)
    finally:
        await _remove_teams(engine)
    fastest = min(r.seconds for r in results if r.kind in (KIT, OTHER))
    for result in results:
        result.extra.update(teams=teams, members=members)
        if result.kind in (KIT, OTHER):
            result.notes = f"{result.seconds / fastest:.2f}x the faster loader"
    return results
