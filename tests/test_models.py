"""The models' guarantees: exact money, and one identity per email on every backend."""

from decimal import Decimal

import pytest
from pydantic import ValidationError
from sqlmodel import select

from asyncpatterns import crud
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import MAX_CENTS, Team, User, UserCreate, UserUpdate, to_cents

# -- Money ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "cents"),
    [
        (Decimal("12.34"), 1234),
        (Decimal("-0.01"), -1),
        (Decimal("12.340000"), 1234),
        (Decimal("1E+2"), 10000),
        (7, 700),
        (Decimal("92233720368547758.07"), MAX_CENTS),
    ],
)
def test_to_cents_is_exact(amount, cents) -> None:
    assert to_cents(amount) == cents


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (Decimal("12.3400000000000000000000000001"), "whole number of cents"),  # 30 digits
        (Decimal("0.001"), "whole number of cents"),
        (Decimal("1E-999999"), "whole number of cents"),
        (Decimal("NaN"), "finite"),
        (Decimal("sNaN"), "finite"),
        (Decimal("-Infinity"), "finite"),
        (Decimal("92233720368547758.08"), "too large"),
        (Decimal("1E+999999"), "too large"),
    ],
)
def test_to_cents_refuses_what_it_cannot_store_exactly(amount, message) -> None:
    with pytest.raises(ValueError, match=message):
        to_cents(amount)


@pytest.mark.parametrize("amount", [0.1, True, "1.00", None])
def test_to_cents_refuses_other_types(amount) -> None:
    with pytest.raises(TypeError):
        to_cents(amount)


# -- One identity per email, whatever path stores it ----------------------------------


async def stored_emails(engine) -> list[str]:
    async with make_session_maker(engine)() as session:
        return list((await session.exec(select(User.email).order_by(User.id))).all())


async def test_a_user_built_directly_is_stored_canonical(engine) -> None:
    async with make_session_maker(engine)() as session:
        user = await crud.create_user(session, User(name="Ada", email="  Ada@Example.COM "))
        assert user.email == "ada@example.com"  # the object says what the database holds
        with pytest.raises(crud.DuplicateEmailError):
            await crud.create_user(session, User(name="Eve", email="ADA@example.com"))
        assert (await crud.get_user_by_email(session, "aDa@EXAMPLE.com")).id == user.id
        session.add(User(name="Direct", email="Direct@Example.com"))  # no kit function at all
        await session.commit()
    assert await stored_emails(engine) == ["ada@example.com", "direct@example.com"]


async def test_bulk_paths_store_canonical_emails(engine, backend) -> None:
    async with make_session_maker(engine)() as session:
        created = await crud.create_users(session, [User(name="A", email="BULK@Example.com")])
        assert created[0].email == "bulk@example.com"
        if backend == "postgresql":
            await crud.copy_users(session, [User(name="C", email="COPY@Example.com")])
        with pytest.raises(crud.DuplicateEmailError):
            await crud.create_users(session, [User(name="B", email="bulk@EXAMPLE.com")])
    expected = ["bulk@example.com"] + (["copy@example.com"] if backend == "postgresql" else [])
    assert await stored_emails(engine) == expected


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("ada@x.io", "ADA@x.io", True),  # case: one person everywhere
        ("josé@x.io", "jose@x.io", False),  # accents: MySQL's collation said "same"
        ("jos\u00e9@x.io", "jose\u0301@x.io", True),  # one letter, two Unicode spellings
        ("straße@x.io", "strasse@x.io", False),  # lower(), not casefold()
    ],
)
async def test_email_identity_is_the_same_on_every_backend(engine, first, second, same) -> None:
    async with make_session_maker(engine)() as session:
        await crud.create_user(session, User(name="1", email=first))
        if same:
            with pytest.raises(crud.DuplicateEmailError):
                await crud.create_user(session, User(name="2", email=second))
        else:
            await crud.create_user(session, User(name="2", email=second))
        found = await crud.get_user_by_email(session, second)
    assert found.name == ("1" if same else "2")


async def test_team_names_are_exact_on_every_backend(engine) -> None:
    from asyncpatterns.relationships import TeamNameTakenError, create_team

    async with make_session_maker(engine)() as session:
        for name in ["Core", "core", "Cöre", "Core team"]:  # all different teams
            await create_team(session, name)
        with pytest.raises(TeamNameTakenError):
            await create_team(session, " Core ")  # the same name, once trimmed
        names = (await session.exec(select(Team.name).order_by(Team.id))).all()
    assert names == ["Core", "core", "Cöre", "Core team"]


def test_lower_casing_that_lengthens_an_email_is_checked_after() -> None:
    grows = "İ" * 212 + "@x.io"  # 217 characters; 429 once lower-cased
    assert len(grows) <= 255 < len(grows.lower())
    for schema in (UserCreate, UserUpdate):
        with pytest.raises(ValidationError, match="once lower-cased"):
            schema.model_validate({"name": "A", "email": grows})
    with pytest.raises(ValueError, match="once lower-cased"):
        User.__table__.c.email.type.process_bind_param(grows, None)


@pytest.mark.parametrize("field", ["name", "email"])
def test_lone_surrogates_are_refused(field) -> None:
    body = {"name": "Ada", "email": "ada@x.io", field: "a\ud800@x.io"}
    with pytest.raises(ValidationError):
        UserCreate.model_validate(body)
