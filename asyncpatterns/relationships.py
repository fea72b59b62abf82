"""Load and change relationships in async code: eager loading, never a hidden query.

Use ``get_with`` / ``list_with`` whenever code reads a relationship
(``team.members``, ``user.team``) of any model. In async SQLAlchemy an
attribute access cannot run a query, so a relationship must be loaded by the
statement that loads its owner. What goes wrong without it:

* The default lazy loader fails with ``MissingGreenlet`` on first access (the
  kit's models say ``lazy="raise"`` instead, so the error names the attribute).
* After the session closes, an unloaded relationship is a ``DetachedInstanceError``.
* Loading one relationship per object is the N+1 problem: 100 teams cost 101
  statements. ``selectinload`` costs 2 (one more per 500 owners), ``joinedload`` 1.

``selectinload`` is the default choice for collections: small rows, no
duplication. ``joinedload`` is one round trip, good for a many-to-one or a
small collection, but repeats the owner's columns on every child row.

Writing through a relationship needs no loading when the objects are new.
``set_related`` points a row's many-to-one at another row, race-safe: the row
is locked, and a target deleted meanwhile is "not found", decided by the
foreign key. Deleting a parent with ``crud.delete`` keeps its children, with
their pointer NULL and a new version, on all three backends (SQLite enforces
foreign keys only on connections that turn them on: ``db.make_engine`` does).
The kit's ``Team``/``User`` functions (the seed's names) are thin wrappers at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import joinedload, lazyload, selectinload
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .bulk import refused
from .crud import create, delete, key_where
from .db import AlreadyExistsError, ReferenceNotFoundError, run_in_transaction

if TYPE_CHECKING:
    from .models import Team, User

M = TypeVar("M", bound=SQLModel)


def _loaders(relationships: Sequence[Any], joined: bool) -> list[Any]:
    return [(joinedload if joined else selectinload)(r) for r in relationships]


async def get_with(
    session: AsyncSession, model: type[M], key: Any, *relationships: Any, joined: bool = False
) -> M | None:
    """One row and the ``relationships`` named (``Team.members``), or None.

    ``selectinload``: one statement for the row, one per relationship. With
    ``joined``, one statement in all (a LEFT OUTER JOIN); ``unique()`` folds the
    row repeated per child back into one object (SQLAlchemy refuses a
    joined-eager collection without it, rather than hand back duplicates).
    """
    statement = select(model).where(key_where(model, key))
    result = await session.exec(statement.options(*_loaders(relationships, joined)))
    return (result.unique() if joined else result).first()


async def list_with(
    session: AsyncSession, model: type[M], *relationships: Any, joined: bool = False
) -> list[M]:
    """Every row, in primary-key order, with the ``relationships`` named: two
    statements however many rows (up to 500 owners per extra one), or one ``joined``."""
    statement = select(model).order_by(*sa_inspect(model).primary_key)
    result = await session.exec(statement.options(*_loaders(relationships, joined)))
    return list((result.unique() if joined else result).all())


async def set_related(
    session: AsyncSession, model: type[M], key: Any, relationship: Any, target: Any
) -> M | None:
    """Point the row's many-to-one ``relationship`` (``User.team``) at the row with
    primary key ``target`` (None: at none); return the row, the relationship loaded.

    None if the row does not exist; ``LookupError`` if the target does not (also
    when it is deleted while this runs: the foreign key decides). The row is
    locked first, so a concurrent write of it waits; assigning the relationship
    keeps both sides in step in this session, and the row gets a new version.
    """
    related = relationship.property.mapper.class_

    async def point(tx: AsyncSession) -> M | None:
        statement = (
            select(model)
            .where(key_where(model, key))
            .options(selectinload(relationship))
            .with_for_update(of=model)
            .execution_options(populate_existing=True)
        )
        obj = (await tx.exec(statement)).first()
        if obj is None:
            return None
        found = None if target is None else await tx.get(related, target)
        if target is not None and found is None:
            raise LookupError(f"{related.__name__} {target} not found")
        setattr(obj, relationship.key, found)
        await tx.flush()
        return obj

    try:
        return await run_in_transaction(session, point)
    except DBAPIError as exc:
        await session.get(model, key)  # reload what the undone change expired
        error = refused(exc, model)
        if isinstance(error, ReferenceNotFoundError):
            raise LookupError(f"{related.__name__} {target} not found") from None
        raise error from None


# -- The kit's Team and User, under the seed's names: thin wrappers --------------------
# Each imports the kit's models when called: copy this file without models.py and
# they simply go unused.


class TeamNameTakenError(ValueError):
    """Another team already has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Team name already taken: {name}")
        self.name = name


async def get_team_with_members(session: AsyncSession, team_id: int) -> Team | None:
    """One team and its members: two statements (the team, then its members)."""
    from .models import Team

    return await get_with(session, Team, team_id, Team.members)


async def get_user_with_team(session: AsyncSession, user_id: int) -> User | None:
    """One user and their team (None if they have none)."""
    from .models import User

    return await get_with(session, User, user_id, User.team)


async def get_team_with_members_joined(session: AsyncSession, team_id: int) -> Team | None:
    """One team and its members in a single statement (``joined``)."""
    from .models import Team

    return await get_with(session, Team, team_id, Team.members, joined=True)


async def get_teams_with_members(session: AsyncSession) -> list[Team]:
    """Every team with its members: 2 statements, however many teams (up to 500)."""
    from .models import Team

    return await list_with(session, Team, Team.members)


async def get_teams_with_members_joined(session: AsyncSession) -> list[Team]:
    """Every team with its members in one statement."""
    from .models import Team

    return await list_with(session, Team, Team.members, joined=True)


async def get_teams_one_query_each(session: AsyncSession) -> list[Team]:
    """The N+1 anti-pattern, for comparison: 1 + one statement per team.

    ``lazyload`` opts this query back into lazy loading, and
    ``awaitable_attrs`` is how async code does a lazy load on purpose.
    """
    from .models import Team

    statement = select(Team).order_by(Team.id).options(lazyload(Team.members))
    teams = list((await session.exec(statement)).all())
    for team in teams:
        await team.awaitable_attrs.members  # one SELECT per team
    return teams


async def create_team(session: AsyncSession, name: str) -> Team:
    """Create an empty team; ``TeamNameTakenError`` if the name is taken."""
    return await create_team_with_members(session, name, [])


async def create_team_with_members(
    session: AsyncSession, name: str, members: Sequence[User]
) -> Team:
    """Insert a team and its new members in one transaction; ids come back on all of
    them (nothing is loaded first: a new object's collection is just a list)."""
    from .models import Team

    team = Team(name=name, members=list(members))
    try:
        return await create(session, team)
    except AlreadyExistsError as exc:
        if exc.table == "team":
            raise TeamNameTakenError(team.name) from None
        raise


async def move_member(session: AsyncSession, user_id: int, team_id: int | None) -> User | None:
    """Put a user in another team (or none), and return them with the team loaded
    (``set_related``): None if the user does not exist, ``LookupError`` if the team does not."""
    from .models import User

    return await set_related(session, User, user_id, User.team, team_id)


async def delete_team(session: AsyncSession, team_id: int) -> bool:
    """Delete a team; its members stay, with ``team_id`` NULL and a new version
    (``crud.delete``). False if it did not exist."""
    from .models import Team

    return await delete(session, Team, team_id)
