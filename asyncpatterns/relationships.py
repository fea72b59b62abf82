"""Load and change relationships in async code: eager loading, never a hidden query.

Use these whenever code reads ``team.members`` or ``user.team``. In async
SQLAlchemy an attribute access cannot run a query, so a relationship must be
loaded by the statement that loads its owner. What goes wrong without it:

* The default lazy loader fails with ``MissingGreenlet`` on first access (the
  models here say ``lazy="raise"`` instead, so the error names the attribute).
* After the session closes, an unloaded relationship is a ``DetachedInstanceError``.
* Loading one relationship per object is the N+1 problem: 100 teams cost 101
  statements. ``selectinload`` costs 2 (one more per 500 owners), ``joinedload`` 1.

``selectinload`` is the default choice for collections: small rows, no
duplication. ``joinedload`` is one round trip, good for a many-to-one or a
small collection, but repeats the owner's columns on every child row.

Writing through a relationship needs no loading when the objects are new.
Deleting a team keeps its members, with ``team_id`` NULL, on all three
backends: ``delete_team`` says so in SQL, and the foreign key's
``ON DELETE SET NULL`` does the same for any other delete. SQLite enforces
foreign keys only on connections that turn them on: ``db.make_engine`` does,
so copy ``db.py`` with this module (or run ``PRAGMA foreign_keys=ON`` yourself).

The writers here are units of work (``db.run_in_transaction``): they commit,
unless called inside a transaction you began; a team that vanishes while a
member moves into it is "not found", decided by the foreign key.
"""

from collections.abc import Sequence

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload, lazyload, selectinload
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .db import is_foreign_key_violation, is_unique_violation, run_in_transaction
from .models import Team, User


class TeamNameTakenError(ValueError):
    """Another team already has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Team name already taken: {name}")
        self.name = name


async def get_team_with_members(session: AsyncSession, team_id: int) -> Team | None:
    """One team and its members: two statements (the team, then its members)."""
    statement = select(Team).where(Team.id == team_id).options(selectinload(Team.members))
    return (await session.exec(statement)).first()


async def get_user_with_team(session: AsyncSession, user_id: int) -> User | None:
    """One user and their team (None if they have none)."""
    statement = select(User).where(User.id == user_id).options(selectinload(User.team))
    return (await session.exec(statement)).first()


async def get_team_with_members_joined(session: AsyncSession, team_id: int) -> Team | None:
    """One team and its members in a single statement (a LEFT OUTER JOIN).

    The JOIN returns the team once per member; ``unique()`` folds those rows
    back into one ``Team``. SQLAlchemy refuses to return a joined-eager
    collection without it, rather than hand back duplicates.
    """
    statement = select(Team).where(Team.id == team_id).options(joinedload(Team.members))
    return (await session.exec(statement)).unique().first()


async def get_teams_with_members(session: AsyncSession) -> list[Team]:
    """Every team with its members: 2 statements, however many teams (up to 500)."""
    statement = select(Team).order_by(Team.id).options(selectinload(Team.members))
    return list((await session.exec(statement)).all())


async def get_teams_with_members_joined(session: AsyncSession) -> list[Team]:
    """Every team with its members in one statement; ``unique()`` as above."""
    statement = select(Team).order_by(Team.id).options(joinedload(Team.members))
    return list((await session.exec(statement)).unique().all())


async def get_teams_one_query_each(session: AsyncSession) -> list[Team]:
    """The N+1 anti-pattern, for comparison: 1 + one statement per team.

    ``lazyload`` opts this query back into lazy loading, and
    ``awaitable_attrs`` is how async code does a lazy load on purpose.
    """
    statement = select(Team).order_by(Team.id).options(lazyload(Team.members))
    teams = list((await session.exec(statement)).all())
    for team in teams:
        await team.awaitable_attrs.members  # one SELECT per team
    return teams


async def create_team(session: AsyncSession, name: str) -> Team:
    """Create an empty team; ``TeamNameTakenError`` if the name is taken."""
    team = Team(name=name)

    async def insert_team(tx: AsyncSession) -> Team:
        tx.add(team)
        await tx.flush()
        return team

    try:
        return await run_in_transaction(session, insert_team)
    except IntegrityError as exc:
        if is_unique_violation(exc, Team.__table__.c.name):
            raise TeamNameTakenError(team.name) from None
        raise


async def create_team_with_members(
    session: AsyncSession, name: str, members: Sequence[User]
) -> Team:
    """Insert a team and its new members in one transaction; ids come back on all of them.

    Nothing is loaded first: a new object's collection is just a list, and
    the unit of work inserts the team before the users that point at it.
    """
    team = Team(name=name, members=list(members))

    async def insert_all(tx: AsyncSession) -> Team:
        tx.add(team)
        await tx.flush()
        return team

    try:
        return await run_in_transaction(session, insert_all)
    except IntegrityError as exc:
        if is_unique_violation(exc, Team.__table__.c.name):
            raise TeamNameTakenError(team.name) from None
        raise


async def move_member(session: AsyncSession, user_id: int, team_id: int | None) -> User | None:
    """Put a user in another team (or none), and return them with the new team loaded.

    Returns None if the user does not exist; raises ``LookupError`` if the team
    does not (also when it is deleted while the user moves: the foreign key
    decides). Assigning ``user.team`` keeps both sides of the relationship in
    step in this session; members collections that were not loaded stay unloaded.
    """

    async def move(tx: AsyncSession) -> User | None:
        statement = (
            select(User)
            .where(User.id == user_id)
            .options(selectinload(User.team))
            .with_for_update(of=User)
            .execution_options(populate_existing=True)
        )
        user = (await tx.exec(statement)).first()
        if user is None:
            return None
        team = None if team_id is None else await tx.get(Team, team_id)
        if team_id is not None and team is None:
            raise LookupError(f"Team {team_id} not found")
        user.team = team
        await tx.flush()
        return user

    try:
        return await run_in_transaction(session, move)
    except IntegrityError as exc:
        await session.get(User, user_id)  # reload what the undone change expired
        if is_foreign_key_violation(exc):
            raise LookupError(f"Team {team_id} not found") from None
        raise


async def delete_team(session: AsyncSession, team_id: int) -> bool:
    """Delete a team; its members stay, with ``team_id`` NULL. False if it did not exist.

    Two statements, nothing loaded. The UPDATE is also applied to members
    already loaded in this session (``synchronize_session``); without it the
    foreign key's ``ON DELETE SET NULL`` gives the same rows, but loaded
    objects would keep the old ``team_id``, and the members their version: a
    client holding one could write over this change unawares (``User.version``).
    """

    async def delete_it(tx: AsyncSession) -> bool:
        leave = update(User).where(col(User.team_id) == team_id)
        await tx.exec(leave.values(team_id=None, version=col(User.version) + 1))
        result = await tx.exec(delete(Team).where(col(Team.id) == team_id))
        return result.rowcount == 1

    return await run_in_transaction(session, delete_it)
