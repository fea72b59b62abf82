"""The ``/teams/`` endpoints: create, get-or-create, read, list, with members eager-loaded.

Use this router for a resource that is answered with its related rows. What
goes wrong without the eager loading: reading ``team.members`` on an async
session lazy-loads, which fails (``MissingGreenlet``, a 500), and loading
each team's members in turn is one query per team. Here a page of teams is
two statements, however many teams. Get-or-create is one team per name
however many requests race (``upserts.get_or_create_team``).
"""

from fastapi import APIRouter, HTTPException, status
from sqlalchemy.orm import selectinload
from sqlmodel import col, select

from ... import crud
from ...models import Team
from ...relationships import TeamNameTakenError, create_team, get_team_with_members
from ...upserts import get_or_create_team
from ..dependencies import SessionDep
from ..errors import _errors
from ..schemas import Limit, Skip, TeamCreate, TeamId, TeamRead

router = APIRouter()


@router.post("/teams/", status_code=201, responses=_errors(400), tags=["teams"])
async def create_team_endpoint(team: TeamCreate, session: SessionDep) -> TeamRead:
    """Create an empty team; add members with POST or PATCH on /users/."""
    try:
        created = await create_team(session, team.name)
    except TeamNameTakenError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Team name already taken") from None
    return TeamRead(id=created.id, name=created.name, members=[])


@router.post("/teams/get-or-create", responses=_errors(400), tags=["teams"])
async def get_or_create_team_endpoint(team: TeamCreate, session: SessionDep) -> TeamRead:
    """The team with this name, created if there is none: 200 either way, and the
    same team for every request, however many race (``upserts.get_or_create_team``)."""
    got = await get_or_create_team(session, team.name)
    loaded = await get_team_with_members(session, got.id)
    if loaded is None:  # deleted since: it was there, with no members we can list
        return TeamRead(id=got.id, name=got.name, members=[])
    return TeamRead.model_validate(loaded)


@router.get("/teams/{team_id}", responses=_errors(404), tags=["teams"])
async def read_team_endpoint(team_id: TeamId, session: SessionDep) -> TeamRead:
    team = await get_team_with_members(session, team_id)
    if team is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Team not found")
    return TeamRead.model_validate(team)


@router.get("/teams/", tags=["teams"])
async def read_teams_endpoint(
    session: SessionDep, skip: Skip = 0, limit: Limit = crud.MAX_PAGE_SIZE
) -> list[TeamRead]:
    """A page of teams with their members: two statements, however many teams."""
    statement = (
        select(Team)
        .order_by(col(Team.id))
        .offset(skip)
        .limit(limit)
        .options(selectinload(Team.members))
    )
    return [TeamRead.model_validate(team) for team in (await session.exec(statement)).all()]
