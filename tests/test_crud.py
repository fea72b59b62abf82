import asyncio

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from asyncpatterns import crud, relationships
from asyncpatterns.db import (
    constraint_error,
    error_code,
    is_connection_lost,
    is_retryable,
    make_session_maker,
)
from asyncpatterns.models import User, UserCreate, UserUpdate
from asyncpatterns.sqlwatch import watch_sql


def make_users(n: int, prefix: str = "user") -> list[User]:
    return [User(name=f"{prefix} {i}", email=f"{prefix}{i}@example.com") for i in range(n)]


async def test_create_user_returns_it_with_an_id(session) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    assert user.id is not None
    assert user.is_active is True
    assert (await crud.get_user(session, user.id)).email == "ada@example.com"


async def test_duplicate_email_is_refused_and_nothing_lost(session) -> None:
    await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    with pytest.raises(crud.DuplicateEmailError, match="ada@example.com"):
        await crud.create_user(session, User(name="Eve", email="ada@example.com"))
    assert await crud.count_users(session) == 1
    # the session is usable again after the failed insert
    await crud.create_user(session, User(name="Bob", email="bob@example.com"))
    assert await crud.count_users(session) == 2


async def test_schema_lower_cases_emails_so_case_is_not_a_loophole(session) -> None:
    first = User.model_validate(UserCreate(name="A", email="Ada@Example.com"))
    await crud.create_user(session, first)
    again = User.model_validate(UserCreate(name="B", email="ADA@example.COM"))
    with pytest.raises(crud.DuplicateEmailError):
        await crud.create_user(session, again)
    assert (await crud.get_user_by_email(session, "ADA@EXAMPLE.COM")).name == "A"


async def test_create_users_returns_ids_in_input_order(session) -> None:
    users = make_users(25)
    created = await crud.create_users(session, users)
    assert [u.email for u in created] == [u.email for u in users]
    assert all(u.id is not None for u in created)
    assert len({u.id for u in created}) == 25
    assert await crud.count_users(session) == 25


async def test_create_users_of_nothing_sends_nothing(session) -> None:
    assert await crud.create_users(session, []) == []


async def test_create_users_10000_in_at_most_10_statements(engine) -> None:
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            created = await crud.create_users(session, make_users(10_000))
    assert sql.count <= 10
    assert len(created) == 10_000
    assert len({u.id for u in created}) == 10_000
    async with make_session_maker(engine)() as session:
        assert await crud.count_users(session) == 10_000
        stored = await crud.get_user(session, created[-1].id)
        assert stored.email == created[-1].email


async def test_create_users_without_returning_reads_ids_by_email(engine, no_returning) -> None:
    # MySQL 8 has no INSERT ... RETURNING: that path, forced on every backend.
    async with make_session_maker(engine)() as session:
        with watch_sql(engine) as sql:
            created = await crud.create_users(session, make_users(1500))
        ids = {u.email: u.id for u in created}
        rows = (await session.exec(select(User.email, User.id))).all()
    assert ids == dict(rows)
    if engine.dialect.name != "postgresql":  # one INSERT and one SELECT per 1,000 rows
        assert sql.first_words(1) == ["INSERT", "SELECT", "INSERT", "SELECT"]


async def test_create_users_returns_the_objects_passed_in_persistent(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        users = make_users(3)
        created = await crud.create_users(session, users)
        assert created == users and all(a is b for a, b in zip(created, users, strict=True))
        with watch_sql(engine) as sql:
            assert await session.get(User, users[0].id) is users[0]  # from the session
            session.add(users[1])  # already persistent: nothing to insert
            users[2].name = "Renamed"
            await session.commit()
        assert sql.first_words(1) == ["UPDATE"]
    async with session_maker() as session:
        assert (await crud.get_user(session, users[2].id)).name == "Renamed"


async def test_users_created_in_a_rolled_back_transaction_leave_the_session(engine) -> None:
    async with make_session_maker(engine)() as session:
        users = make_users(2)
        async with session.begin():
            await crud.create_users(session, users)
            assert users[0] in session
            await session.rollback()
        assert users[0] not in session and users[1] not in session  # their rows are gone
        assert await crud.count_users(session) == 0


async def test_create_users_with_a_duplicate_stores_none(session) -> None:
    await crud.create_user(session, User(name="x", email="user3@example.com"))
    with pytest.raises(crud.DuplicateEmailError, match="Email already registered"):
        await crud.create_users(session, make_users(5))
    assert await crud.count_users(session) == 1


async def test_get_user_by_email_and_missing(session) -> None:
    await crud.create_users(session, make_users(3))
    assert (await crud.get_user_by_email(session, "user1@example.com")).name == "user 1"
    assert await crud.get_user_by_email(session, "nobody@example.com") is None
    assert await crud.get_user(session, 10**9) is None


async def test_get_users_pages_in_id_order(session) -> None:
    created = await crud.create_users(session, make_users(7))
    page = await crud.get_users(session, skip=2, limit=3)
    assert [u.id for u in page] == [u.id for u in created[2:5]]
    assert await crud.get_users(session, skip=7) == []


@pytest.mark.parametrize(
    ("skip", "limit", "message"),
    [
        (-1, 10, "skip must be >= 0"),
        (0, -1, "limit must be between"),
        (0, 0, "limit"),
        (0, 101, "limit must be between 1 and 100"),
    ],
)
async def test_get_users_rejects_bad_pages(session, skip, limit, message) -> None:
    with pytest.raises(ValueError, match=message):
        await crud.get_users(session, skip=skip, limit=limit)


async def test_count_users(session) -> None:
    assert await crud.count_users(session) == 0
    await crud.create_users(session, make_users(4))
    assert await crud.count_users(session) == 4


async def test_update_user_changes_only_given_fields(session) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    updated = await crud.update_user(session, user.id, {"name": "Ada L."})
    assert (updated.name, updated.email) == ("Ada L.", "ada@example.com")
    session.expunge_all()
    assert (await crud.get_user(session, user.id)).name == "Ada L."


async def test_update_unknown_user_is_none(session) -> None:
    assert await crud.update_user(session, 10**9, {"name": "x"}) is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"id": 777}, "id"),  # read-only: the common update rewrote the primary key
        ({"password": "x"}, "password"),  # unknown field
        ({"name": 123}, "name"),  # the common update stored '123'
        ({"is_active": "no"}, "is_active"),
        ({"name": None}, "name"),  # required field set to null
        ({"email": "not-an-email"}, "email"),
    ],
)
async def test_update_rejects_bad_fields_and_changes_nothing(session, data, field) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    user_id = user.id
    with pytest.raises(ValidationError) as info:
        await crud.update_user(session, user_id, data)
    assert info.value.errors()[0]["loc"][0] == field
    session.expunge_all()
    stored = await crud.get_user(session, user_id)
    assert (stored.id, stored.name, stored.email) == (user_id, "Ada", "ada@example.com")


async def test_update_to_another_users_email_is_refused(session) -> None:
    await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    bob = await crud.create_user(session, User(name="Bob", email="bob@example.com"))
    bob_id = bob.id
    with pytest.raises(crud.DuplicateEmailError):
        await crud.update_user(session, bob_id, {"email": "ADA@example.com"})
    session.expunge_all()
    assert (await crud.get_user(session, bob_id)).email == "bob@example.com"


async def test_deactivate_users_counts_only_changes(session) -> None:
    created = await crud.create_users(session, make_users(5))
    ids = [u.id for u in created[:3]]
    assert await crud.deactivate_users(session, ids) == 3
    assert await crud.deactivate_users(session, ids) == 0
    assert await crud.deactivate_users(session, []) == 0
    session.expunge_all()
    active = [u.is_active for u in await crud.get_users(session)]
    assert active == [False, False, False, True, True]


async def test_delete_user(session) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    assert await crud.delete_user(session, user.id) is True
    assert await crud.delete_user(session, user.id) is False
    assert await crud.get_user(session, user.id) is None


async def test_delete_inactive_users(session) -> None:
    created = await crud.create_users(session, make_users(5))
    await crud.deactivate_users(session, [created[0].id, created[4].id])
    assert await crud.delete_inactive_users(session) == 2
    assert await crud.count_users(session) == 3
    assert await crud.delete_inactive_users(session) == 0


async def test_racing_creates_with_one_email_store_one_row(engine) -> None:
    session_maker = make_session_maker(engine)

    async def attempt(i: int) -> str:
        async with session_maker() as session:
            try:
                await crud.create_user(session, User(name=f"n{i}", email="race@example.com"))
            except crud.DuplicateEmailError:
                return "duplicate"
            return "created"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(10)))
    assert sorted(outcomes) == ["created"] + ["duplicate"] * 9
    async with session_maker() as session:
        assert await crud.count_users(session) == 1


async def test_a_failed_write_keeps_the_session_and_its_objects(session) -> None:
    created = await crud.create_users(session, make_users(3))
    with pytest.raises(crud.DuplicateEmailError):
        await crud.create_user(session, User(name="x", email="user0@example.com"))
    with pytest.raises(crud.DuplicateEmailError):
        await crud.update_user(session, created[1].id, {"email": "user2@example.com"})
    # Only the failed write's savepoint was rolled back: nothing else expired,
    # so reading these attributes needs no lazy load (no MissingGreenlet).
    assert [u.email for u in created] == [f"user{i}@example.com" for i in range(3)]
    assert await crud.count_users(session) == 3


async def test_update_user_accepts_a_validated_schema(session) -> None:
    user = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    updated = await crud.update_user(session, user.id, UserUpdate(is_active=False))
    assert (updated.name, updated.email, updated.is_active) == ("Ada", "ada@example.com", False)


async def test_100000_ids_or_rows_work_on_every_backend(engine) -> None:
    # asyncpg takes at most 32,767 parameters per statement: lists go in chunks.
    async with make_session_maker(engine)() as session:
        created = await crud.create_users(session, make_users(100_000, "big"))
        ids = [u.id for u in created]
        assert len(set(ids)) == 100_000
        assert await crud.deactivate_users(session, ids + [10**9]) == 100_000
        assert await crud.delete_inactive_users(session) == 100_000


# -- Defects an adversarial review found (each test failed before its fix) -------------


async def test_a_failed_create_users_gives_the_users_back_to_fix_and_retry(engine) -> None:
    """A duplicate anywhere: the objects come back transient with their values, as after a
    failed create_user (they were detached and expired: reading one raised)."""
    async with make_session_maker(engine)() as session:
        await crud.create_user(session, User(name="Taken", email="taken@example.com"))
        users = [User(name="A", email="a@example.com"), User(name="B", email="Taken@Example.com")]
        with pytest.raises(crud.DuplicateEmailError):
            await crud.create_users(session, users)
        assert all(inspect(u).transient for u in users)
        assert [(u.name, u.email, u.id) for u in users] == [
            ("A", "a@example.com", None),
            ("B", "taken@example.com", None),
        ]
        users[1].email = "b@example.com"
        assert all(u.id for u in await crud.create_users(session, users))
        assert await crud.count_users(session) == 3


async def test_users_of_a_rolled_back_callers_transaction_come_back_transient(engine) -> None:
    async with make_session_maker(engine)() as session:
        users = make_users(3)
        async with session.begin():
            await crud.create_users(session, users)
            await session.rollback()
        assert [(u.email, u.id, u.version) for u in users][0] == ("user0@example.com", None, 1)
        await crud.create_users(session, users)  # as they were: ready to send again
        assert await crud.count_users(session) == 3


async def test_numpy_and_pandas_scalars_are_stored_as_the_numbers_they_are(engine) -> None:
    """sqlite3 binds numpy scalars as BLOBs (a team_id then matched no team, a boolean was
    stored as 8 bytes): make_engine binds them as numbers, as asyncpg and aiomysql do."""
    np = pytest.importorskip("numpy")
    async with make_session_maker(engine)() as session:
        team = await relationships.create_team(session, "Arrays")
        one = await crud.create_user(
            session,
            User(
                name="N",
                email="n@example.com",
                team_id=np.int64(team.id),
                is_active=np.bool_(False),
            ),
        )
        many = await crud.create_users(
            session, [User(name="M", email="m@example.com", team_id=np.int32(team.id))]
        )
        assert await crud.get_user(session, np.int64(one.id)) is one
    async with make_session_maker(engine)() as session:
        loaded = await relationships.get_team_with_members(session, team.id)
        assert [(u.email, u.is_active) for u in loaded.members] == [
            ("n@example.com", False),
            ("m@example.com", True),
        ]
        stored = (await session.exec(select(User.team_id).where(User.id == many[0].id))).one()
        assert type(stored) is int


async def test_a_value_no_driver_can_bind_classifies_or_passes_through(session, backend) -> None:
    """sqlite3's ProgrammingError carries no error code: classifying it raised AttributeError.
    Every backend's answer to an unbindable value must classify (or be nothing) without raising."""
    try:
        found = await crud.get_user(session, object())
    except DBAPIError as exc:
        code = error_code(exc)  # sqlite3 and psycopg refuse it before the server sees it
        driver_refused = backend == "sqlite" or session.bind.dialect.driver == "psycopg"
        assert code is None if driver_refused else code == ("postgresql", "22000")
        assert not (is_retryable(exc) or is_connection_lost(exc))
        assert constraint_error(exc, User) is None
    else:  # pymysql sends the object's text: an id nothing has
        assert (backend, found) == ("mysql", None)
