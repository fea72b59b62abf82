import gc

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet, StatementError
from sqlalchemy.orm import joinedload, lazyload
from sqlalchemy.orm.exc import DetachedInstanceError
from sqlmodel import col, select

from asyncpatterns import relationships
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import Team, User
from asyncpatterns.sqlwatch import watch_sql


def members(team: int, count: int) -> list[User]:
    return [User(name=f"T{team} M{i}", email=f"t{team}.m{i}@example.com") for i in range(count)]


async def add_teams(engine, teams: int, size: int) -> list[Team]:
    """Teams "Team 0".. with members "T0 M0".. (ids differ from run to run on servers)."""
    created = [Team(name=f"Team {t}", members=members(t, size)) for t in range(teams)]
    async with make_session_maker(engine)() as session:
        session.add_all(created)
        await session.commit()
    return created


async def team_ids_of_users(engine) -> dict[str, int | None]:
    async with make_session_maker(engine)() as session:
        return dict((await session.exec(select(User.email, User.team_id))).all())


# --- loading --------------------------------------------------------------------


async def test_get_team_with_members_loads_them_in_two_statements(engine) -> None:
    second = (await add_teams(engine, 2, 3))[1]
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            team = await relationships.get_team_with_members(session, second.id)
    assert sql.count == 2
    assert team.name == "Team 1"
    assert [m.email for m in team.members] == [f"t1.m{i}@example.com" for i in range(3)]


async def test_get_user_with_team(engine) -> None:
    [team] = await add_teams(engine, 1, 1)
    async with make_session_maker(engine)() as session:
        loner = User(name="Loner", email="loner@example.com")
        session.add(loner)
        await session.commit()
    async with make_session_maker(engine)() as session:
        member = await relationships.get_user_with_team(session, team.members[0].id)
        loner = await relationships.get_user_with_team(session, loner.id)
        nobody = await relationships.get_user_with_team(session, loner.id + 1)
    assert member.team.name == "Team 0"
    assert loner.team is None  # loaded, and empty: no error
    assert nobody is None


async def test_missing_team_is_none(engine) -> None:
    [team] = await add_teams(engine, 1, 0)
    async with make_session_maker(engine)() as session:
        assert await relationships.get_team_with_members(session, team.id + 1) is None
        assert await relationships.get_team_with_members_joined(session, team.id + 1) is None
        empty = await relationships.get_team_with_members_joined(session, team.id)
    assert empty.members == []


async def test_joinedload_is_one_statement_and_needs_unique(engine) -> None:
    first = (await add_teams(engine, 2, 3))[0]
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            team = await relationships.get_team_with_members_joined(session, first.id)
        assert sql.count == 1
        assert [m.name for m in team.members] == ["T0 M0", "T0 M1", "T0 M2"]
        statement = select(Team).options(joinedload(Team.members))
        with pytest.raises(InvalidRequestError, match=r"unique\(\) method must be invoked"):
            (await session.exec(statement)).all()


async def test_n_plus_one_against_selectinload_and_joinedload(engine) -> None:
    await add_teams(engine, 100, 10)
    loaders = {
        "one query per team": relationships.get_teams_one_query_each,
        "selectinload": relationships.get_teams_with_members,
        "joinedload": relationships.get_teams_with_members_joined,
    }
    counts, contents = {}, {}
    for name, loader in loaders.items():
        async with make_session_maker(engine)() as session:
            with watch_sql(engine) as sql:
                teams = await loader(session)
        counts[name] = sql.count
        contents[name] = [(t.name, [m.email for m in t.members]) for t in teams]
    assert counts == {"one query per team": 101, "selectinload": 2, "joinedload": 1}
    assert contents["selectinload"] == contents["joinedload"] == contents["one query per team"]
    assert sum(len(emails) for _, emails in contents["joinedload"]) == 1000


# --- the traps --------------------------------------------------------------------


async def test_an_unloaded_relationship_raises_at_once(engine) -> None:
    await add_teams(engine, 1, 2)
    async with make_session_maker(engine)() as session:
        team = (await session.exec(select(Team))).one()
        with pytest.raises(InvalidRequestError, match="'Team.members' is not available"):
            _ = team.members


@pytest.mark.filterwarnings("ignore:coroutine 'Connection.cursor' was never awaited")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_implicit_lazy_load_is_missing_greenlet(engine) -> None:
    await add_teams(engine, 1, 2)
    async with make_session_maker(engine)() as session:
        statement = select(Team).options(lazyload(Team.members))  # the common pattern's default
        team = (await session.exec(statement)).one()
        with pytest.raises((MissingGreenlet, StatementError)) as caught:
            _ = team.members
    # Bare on PostgreSQL; wrapped in a StatementError on SQLite and MySQL.
    error = caught.value
    assert isinstance(error, MissingGreenlet) or isinstance(error.orig, MissingGreenlet)
    # SQLite's driver leaves a cursor coroutine un-awaited: let it warn here, not later.
    del caught, error, team
    gc.collect()


async def test_awaitable_attrs_is_a_deliberate_lazy_load(engine) -> None:
    await add_teams(engine, 1, 2)
    async with make_session_maker(engine)() as session:
        team = (await session.exec(select(Team).options(lazyload(Team.members)))).one()
        with watch_sql(engine) as sql:
            loaded = await team.awaitable_attrs.members
        assert sql.count == 1
        assert [m.name for m in loaded] == ["T0 M0", "T0 M1"]
        assert team.members is loaded  # loaded now: plain access works


async def test_after_the_session_closes_it_is_detached(engine) -> None:
    await add_teams(engine, 1, 2)
    async with make_session_maker(engine)() as session:
        team = (await session.exec(select(Team).options(lazyload(Team.members)))).one()
    with pytest.raises(DetachedInstanceError, match="not bound to a Session"):
        _ = team.members
    async with make_session_maker(engine)() as session:
        loaded = await relationships.get_team_with_members(session, team.id)
    assert len(loaded.members) == 2  # what was loaded stays readable after close


# --- writing through relationships ----------------------------------------------


async def test_create_team_with_members_in_one_go(engine) -> None:
    async with make_session_maker(engine)() as session:
        team = await relationships.create_team_with_members(session, "Core", members(0, 3))
        assert team.id is not None
        assert [m.team_id for m in team.members] == [team.id] * 3
        assert all(m.id is not None for m in team.members)
    async with make_session_maker(engine)() as session:
        stored = await relationships.get_team_with_members(session, team.id)
    assert [m.email for m in stored.members] == [m.email for m in team.members]


async def test_move_member_to_another_team_and_out(engine) -> None:
    first, second = await add_teams(engine, 2, 2)
    mover = first.members[0]
    async with make_session_maker(engine)() as session:
        moved = await relationships.move_member(session, mover.id, second.id)
        assert moved.team.name == "Team 1" and moved.team_id == second.id
    async with make_session_maker(engine)() as session:
        team = await relationships.get_team_with_members(session, second.id)
        assert [m.name for m in team.members] == ["T0 M0", "T1 M0", "T1 M1"]
        alone = await relationships.move_member(session, mover.id, None)
        assert alone.team is None and alone.team_id is None
    assert (await team_ids_of_users(engine))["t0.m0@example.com"] is None


async def test_move_member_refuses_unknown_teams_and_users(engine) -> None:
    [team] = await add_teams(engine, 1, 1)
    user_id = team.members[0].id
    async with make_session_maker(engine)() as session:
        assert await relationships.move_member(session, user_id + 1, team.id) is None
        with pytest.raises(LookupError, match=f"Team {team.id + 1} not found"):
            await relationships.move_member(session, user_id, team.id + 1)
    assert await team_ids_of_users(engine) == {"t0.m0@example.com": team.id}


async def test_delete_team_keeps_its_members_without_a_team(engine) -> None:
    first, second = await add_teams(engine, 2, 2)
    async with make_session_maker(engine)() as session:
        loaded = await relationships.get_user_with_team(session, first.members[0].id)
        assert await relationships.delete_team(session, first.id)
        assert loaded.team_id is None  # objects already in the session see it too
        assert not await relationships.delete_team(session, first.id)
    assert await team_ids_of_users(engine) == {
        "t0.m0@example.com": None,
        "t0.m1@example.com": None,
        "t1.m0@example.com": second.id,
        "t1.m1@example.com": second.id,
    }


async def test_the_database_itself_sets_null_when_a_team_row_goes(engine) -> None:
    # Whatever deletes the row (here a plain DELETE, no ORM): ON DELETE SET NULL,
    # enforced on SQLite too because make_engine turns foreign keys on.
    [team] = await add_teams(engine, 1, 2)
    async with engine.begin() as conn:
        await conn.execute(delete(Team).where(col(Team.id) == team.id))
    assert set((await team_ids_of_users(engine)).values()) == {None}
