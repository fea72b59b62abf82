"""The common async SQLModel patterns' contract, kept where it is not wrong.

People arrive with the widely copied patterns open beside the kit. Each test
here is written the way someone copying those patterns calls the kit's
functions of the same names, with the common fixture name ``async_session``.
"""

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.crud import create_user, create_users, get_user, update_user
from asyncpatterns.models import Profile, User
from asyncpatterns.transactions import complex_operation, transfer_funds


async def test_create_user(async_session: AsyncSession) -> None:
    user = User(name="Test", email="test@example.com")
    result = await create_user(async_session, user)

    assert result.id is not None
    assert result.name == "Test"


async def test_get_user(async_session: AsyncSession) -> None:
    user = User(name="Test", email="test@example.com")
    created = await create_user(async_session, user)

    fetched = await get_user(async_session, created.id)
    assert fetched is not None
    assert fetched.email == "test@example.com"


async def test_create_users_returns_the_users_passed_in_with_ids(
    async_session: AsyncSession,
) -> None:
    users = [User(name=f"User {i}", email=f"user{i}@example.com") for i in range(3)]
    result = await create_users(async_session, users)

    assert result == users
    assert all(user.id is not None for user in users)  # the very objects, with ids


async def test_writers_work_on_sqlalchemys_default_session_maker(engine) -> None:
    # async_sessionmaker(engine, class_=AsyncSession): expire_on_commit=True
    async_session_maker = async_sessionmaker(engine, class_=AsyncSession)
    async with async_session_maker() as session:
        user = await create_user(session, User(name="Test", email="test@example.com"))
        assert user.id is not None  # no MissingGreenlet after the commit
        updated = await update_user(session, user.id, {"name": "Renamed"})
        assert updated.name == "Renamed"


async def test_complex_operation_stores_the_user_and_a_profile(
    async_session: AsyncSession,
) -> None:
    await complex_operation(async_session)

    user = (await async_session.exec(select(User).where(User.name == "Test"))).one()
    profile = (await async_session.exec(select(Profile))).one()
    assert (profile.user_id, profile.bio) == (user.id, "Test")


async def test_error_messages_start_with_the_common_wording(async_session) -> None:
    with pytest.raises(ValueError, match="Account not found"):
        await transfer_funds(async_session, 99998, 99999, 1)
