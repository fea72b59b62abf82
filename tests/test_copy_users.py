"""crud.copy_users: the opt-in COPY path for big batches (PostgreSQL only)."""

import pytest
from sqlmodel import select

from asyncpatterns import crud
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import User
from asyncpatterns.sqlwatch import watch_sql


def make_users(n: int, prefix: str = "copy") -> list[User]:
    return [User(name=f"{prefix} {i}", email=f"{prefix}{i}@example.com") for i in range(n)]


async def test_copy_users_loads_every_row_in_one_copy(engine, backend) -> None:
    if backend != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    users = make_users(2500)
    users[8].is_active = False
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            copied = await crud.copy_users(session, users)
        assert copied == 2500
        assert sql.count == 0  # the COPY goes through asyncpg, not through SQLAlchemy
        stored = {u.email: u for u in (await session.exec(select(User))).all()}
    assert set(stored) == {u.email for u in users}
    assert len({u.id for u in stored.values()}) == 2500  # numbered by the database
    assert stored["copy8@example.com"].is_active is False
    assert stored["copy0@example.com"].name == "copy 0"
    assert stored["copy0@example.com"].team_id is None
    # the sequence moved on: a normal insert afterwards gets a fresh id
    async with make_session_maker(engine)() as session:
        later = await crud.create_user(session, User(name="Later", email="later@example.com"))
    assert later.id > max(u.id for u in stored.values())


async def test_copy_users_failure_keeps_nothing_and_session_usable(engine, backend) -> None:
    if backend != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    async with make_session_maker(engine)() as session:
        await crud.create_user(session, User(name="Ada", email="copy3@example.com"))
        with pytest.raises(Exception) as refused:  # the driver's own error, as documented
            await crud.copy_users(session, make_users(10))
        assert refused.value.sqlstate == "23505"  # unique_violation, asyncpg and psycopg alike
        assert await crud.count_users(session) == 1
        await crud.create_user(session, User(name="Bob", email="bob@example.com"))
        assert await crud.count_users(session) == 2


async def test_copy_users_of_nothing_sends_nothing(session) -> None:
    assert await crud.copy_users(session, []) == 0


async def test_copy_users_refuses_other_backends(session, backend) -> None:
    if backend == "postgresql":
        pytest.skip("this is the other backends' case")
    with pytest.raises(NotImplementedError, match="create_many"):
        await crud.copy_users(session, make_users(2))
