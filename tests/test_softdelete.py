"""Soft delete (``asyncpatterns.softdelete``) on every backend, on a reader's models:
no pattern of the kit returns a deleted row (get, get_by, list_page, count,
keyset_page, stream_all, the relationship loaders, update, delete), unless asked
with ``include_deleted``; a deleted email can be used again, two live ones cannot,
even racing; restore brings a row back, or refuses if its email was taken."""

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import registry
from sqlmodel import Field, Relationship, SQLModel, col, select

from asyncpatterns import crud, pagination, relationships, softdelete, streaming
from asyncpatterns.db import AlreadyExistsError, make_session_maker
from asyncpatterns.sqlwatch import watch_sql


class Own(SQLModel, registry=registry()):
    """A reader's models: their own metadata, none of the kit's tables."""


class Shop(AsyncAttrs, Own, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=40)
    customers: list["Customer"] = Relationship(
        back_populates="shop", sa_relationship_kwargs={"lazy": "raise", "order_by": "Customer.id"}
    )
    lazy_customers: list["Customer"] = Relationship(
        sa_relationship_kwargs={"lazy": "select", "viewonly": True, "order_by": "Customer.id"}
    )


class Customer(Own, softdelete.SoftDelete, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=255)
    shop_id: int | None = Field(default=None, foreign_key="shop.id")
    shop: Shop | None = Relationship(
        back_populates="customers", sa_relationship_kwargs={"lazy": "raise"}
    )


softdelete.unique_among_live(Customer, "email")


@pytest.fixture
async def sessions(engine):
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.create_all)
    yield make_session_maker(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.drop_all)


async def a_shop_with(sessions, *emails: str) -> tuple[int, list[int]]:
    async with sessions() as session, session.begin():
        shop = Shop(name="corner")
        session.add(shop)
        await session.flush()
        customers = [Customer(email=e, shop_id=shop.id) for e in emails]
        session.add_all(customers)
    return shop.id, [c.id for c in customers]


async def test_no_pattern_returns_a_deleted_row(sessions, engine) -> None:
    shop_id, (ann, bob, cy) = await a_shop_with(sessions, "ann@x.org", "bob@x.org", "cy@x.org")
    async with sessions() as session:
        assert await softdelete.soft_delete(session, await crud.get(session, Customer, bob))
        live = [ann, cy]
        assert await crud.get(session, Customer, bob) is None  # not from the identity map
        assert await crud.get_by(session, Customer, id=bob) is None
        assert [c.id for c in await crud.list_page(session, Customer)] == live
        assert await crud.count(session, Customer) == 2
        count = select(func.count()).select_from(Customer)
        assert (await session.exec(count)).one() == 2
        page = await pagination.keyset_page(session, Customer)
        assert [c.id for c in page.items] == live
        async with streaming.stream_all(session, Customer, chunk_size=1) as rows:
            assert [c.id async for c in rows] == live
        for joined in (False, True):
            [shop] = await relationships.list_with(session, Shop, Shop.customers, joined=joined)
            assert [c.id for c in shop.customers] == live
            one = await relationships.get_with(
                session, Shop, shop_id, Shop.customers, joined=joined
            )
            assert [c.id for c in one.customers] == live
            session.expunge_all()
        joined_rows = select(Shop.id, Customer.id).join(Customer)
        assert sorted(r[1] for r in (await session.exec(joined_rows)).all()) == live
        in_subquery = select(Shop).where(
            col(Shop.id).in_(select(Customer.shop_id).where(Customer.id == bob))
        )
        assert (await session.exec(in_subquery)).all() == []
        assert await crud.update(session, Customer, bob, {"email": "new@x.org"}) is None
        assert await crud.delete(session, Customer, bob) is False  # a hard delete: refused too
        assert await softdelete.soft_delete(session, await crud.get(session, Customer, ann))
        everyone = select(Customer).execution_options(include_deleted=True)
        stored = {c.id: c.deleted_at for c in (await session.exec(everyone)).all()}
    assert set(stored) == {ann, bob, cy}  # nothing hard-deleted
    assert stored[cy] is None and stored[bob].tzinfo is not None
    assert stored[bob] <= datetime.now(UTC)


async def test_a_soft_delete_is_one_statement_and_only_once(sessions, engine) -> None:
    _, [ann] = await a_shop_with(sessions, "ann@x.org")
    async with sessions() as session:
        customer = await crud.get(session, Customer, ann)
        with watch_sql(engine) as log:
            assert await softdelete.soft_delete(session, customer) is True
        assert log.count == 1
    async with sessions() as session:  # a stale copy: deleted already
        stale = (await session.exec(select(Customer).execution_options(include_deleted=True))).one()
        assert await softdelete.soft_delete(session, stale) is False


async def test_a_deleted_email_can_be_used_again_and_two_live_ones_cannot(sessions) -> None:
    _, [first] = await a_shop_with(sessions, "ann@x.org")
    async with sessions() as session:
        with pytest.raises(AlreadyExistsError):
            await crud.create(session, Customer(email="ann@x.org"))
    async with sessions() as session:
        await softdelete.soft_delete(session, await crud.get(session, Customer, first))
        again = await crud.create(session, Customer(email="ann@x.org"))  # the email is free
        async with session.begin():  # deleting the new one frees it too: many deleted rows
            await softdelete.soft_delete(session, again)
        third = await crud.create(session, Customer(email="ann@x.org"))
        with pytest.raises(AlreadyExistsError):  # restoring one would make two live
            await softdelete.restore(session, Customer, first)
        await softdelete.soft_delete(session, third)
        restored = await softdelete.restore(session, Customer, first)
        assert restored is not None and restored.deleted_at is None
        assert await softdelete.restore(session, Customer, first) is None  # live: nothing to do
        assert [c.id for c in await crud.list_page(session, Customer)] == [first]


async def test_racing_creates_of_a_freed_email_store_one_live_row(sessions) -> None:
    _, [old] = await a_shop_with(sessions, "ann@x.org")
    async with sessions() as session:
        await softdelete.soft_delete(session, await crud.get(session, Customer, old))

    async def create() -> bool:
        async with sessions() as session:
            try:
                await crud.create(session, Customer(email="ann@x.org"))
                return True
            except AlreadyExistsError:
                return False

    assert sum(await asyncio.gather(*(create() for _ in range(10)))) == 1
    async with sessions() as session:
        assert await crud.count(session, Customer) == 1
        everyone = select(func.count()).select_from(Customer)
        assert (await session.exec(everyone.execution_options(include_deleted=True))).one() == 2


async def test_a_lazy_load_hides_deleted_rows_too(sessions) -> None:
    """A lazy load (``awaitable_attrs``) is a relationship load: the criteria of the
    statement that loaded the parent go with it."""
    shop_id, (ann, bob) = await a_shop_with(sessions, "ann@x.org", "bob@x.org")
    async with sessions() as session:
        await softdelete.soft_delete(session, await crud.get(session, Customer, bob))
    async with sessions() as session:
        shop = await crud.get(session, Shop, shop_id)
        assert [c.id for c in await shop.awaitable_attrs.lazy_customers] == [ann]
