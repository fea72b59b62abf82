"""Every pattern on models the kit does not define, on every backend.

The models below live here, in a registry (and metadata) of their own, as a
reader's would: ``Product`` has a composite unique key, a CHECK, a version
column and a foreign key that is set to NULL when its shelf goes; ``Device``
has a UUID primary key made in Python, server-side defaults (a timestamp, a
status) and a foreign key that keeps its shelf from being deleted; ``Note``
has no unique key but its id. Nothing here touches the kit's tables.
"""

import asyncio
import csv
import io
import uuid
from contextlib import aclosing
from datetime import datetime

import pytest
from sqlalchemy import CheckConstraint, UniqueConstraint, delete
from sqlalchemy.orm import registry
from sqlmodel import Field, Relationship, SQLModel, col, select

from asyncpatterns import (
    bulk,
    crud,
    exports,
    locking,
    relationships,
    streaming,
    transactions,
    upserts,
)
from asyncpatterns.columns import TimestampMixin, VersionMixin
from asyncpatterns.db import (
    AlreadyExistsError,
    CheckFailedError,
    MissingValueError,
    ReferenceNotFoundError,
    StillReferencedError,
    make_session_maker,
)
from asyncpatterns.sqlwatch import watch_sql


class Own(SQLModel, registry=registry()):
    """The reader's models: their own metadata, none of the kit's tables."""


class Shelf(Own, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50, unique=True)  # an unnamed unique constraint
    products: list["Product"] = Relationship(
        back_populates="shelf", sa_relationship_kwargs={"lazy": "raise", "order_by": "Product.id"}
    )


class Product(Own, VersionMixin, table=True):
    __table_args__ = (
        UniqueConstraint("sku", "region", name="uq_product_sku_region"),
        CheckConstraint("stock >= 0", name="ck_product_stock"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sku: str = Field(max_length=40)
    region: str = Field(max_length=8)
    name: str = Field(max_length=100)
    stock: int = 0
    shelf_id: int | None = Field(default=None, foreign_key="shelf.id", ondelete="SET NULL")
    shelf: Shelf | None = Relationship(
        back_populates="products", sa_relationship_kwargs={"lazy": "raise"}
    )


class Device(Own, TimestampMixin, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    serial: str = Field(max_length=40, unique=True)
    status: str | None = Field(
        default=None, max_length=16, sa_column_kwargs={"server_default": "new"}
    )
    shelf_id: int = Field(foreign_key="shelf.id")  # no ON DELETE: the shelf must stay


class Note(Own, table=True):
    id: int | None = Field(default=None, primary_key=True)
    text: str = Field(max_length=200)


@pytest.fixture
async def sessions(engine):
    """Sessions on the test database, with the reader's tables there and empty after."""
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.create_all)
    yield make_session_maker(engine)
    async with engine.begin() as conn:
        for table in reversed(Own.metadata.sorted_tables):
            await conn.execute(delete(table))


async def a_shelf(sessions, name: str = "A") -> Shelf:
    async with sessions() as session:
        return await crud.create(session, Shelf(name=name))


def products(count: int, region: str = "eu", shelf_id: int | None = None) -> list[Product]:
    return [
        Product(sku=f"SKU-{i}", region=region, name=f"Product {i}", shelf_id=shelf_id)
        for i in range(count)
    ]


def no_kit_table_is_touched(sql) -> None:
    assert not any('"user"' in s.sql or " user " in s.sql for s in sql.statements)


# -- CRUD, one row -------------------------------------------------------------------


async def test_create_get_update_delete_a_product(sessions, engine) -> None:
    async with sessions() as session:
        with watch_sql(engine) as sql:
            made = await crud.create(session, Product(sku="A-1", region="eu", name="Lamp"))
            assert made.id is not None and made.version == 1
            assert (await crud.get(session, Product, made.id)) is made
            found = await crud.get_by(session, Product, sku="A-1", region="eu")
            assert found is made
            assert await crud.get_by(session, Product, sku="A-1", region="us") is None
            changed = await crud.update(session, Product, made.id, {"name": "Desk lamp"})
            assert (changed.name, changed.version) == ("Desk lamp", 2)
            assert await crud.count(session, Product) == 1
            assert await crud.delete(session, Product, made.id) is True
            assert await crud.delete(session, Product, made.id) is False
        no_kit_table_is_touched(sql)


async def test_a_uuid_key_and_server_defaults_come_back_on_create(sessions) -> None:
    shelf = await a_shelf(sessions)
    async with sessions() as session:
        device = await crud.create(session, Device(serial="D-1", shelf_id=shelf.id))
        # made in Python, and by the server (read back where the backend returns nothing)
        assert isinstance(device.id, uuid.UUID)
        assert device.status == "new" and isinstance(device.created_at, datetime)
        assert (await crud.get(session, Device, device.id)).serial == "D-1"
        changed = await crud.update(session, Device, device.id, {"status": "active"})
        assert changed.status == "active" and isinstance(changed.updated_at, datetime)


async def test_get_by_refuses_columns_that_are_not_a_unique_key(sessions) -> None:
    async with sessions() as session:
        with pytest.raises(ValueError, match=r"no unique key on \(sku\)"):
            await crud.get_by(session, Product, sku="A-1")  # only (sku, region) is unique


async def test_pages_are_in_key_order_and_bounded(sessions) -> None:
    async with sessions() as session:
        await bulk.create_many(session, products(7))
        first = await crud.list_page(session, Product, skip=0, limit=3)
        rest = await crud.list_page(session, Product, skip=3, limit=100)
        by_name = await crud.list_page(session, Product, order_by=[col(Product.name).desc()])
        with pytest.raises(ValueError, match="limit"):
            await crud.list_page(session, Product, limit=0)
    assert [p.sku for p in first + rest] == [f"SKU-{i}" for i in range(7)]
    assert by_name[0].name == "Product 6"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "has no column 'colour'"),
        ({"id": 777}, "id is read-only"),
        ({"version": 9}, "version is read-only"),
        ({"name": 123}, "Product.name"),  # not coerced to '123'
        ({"stock": "5"}, "Product.stock"),
        ({"name": None}, "Product.name"),  # NOT NULL
    ],
)
async def test_update_takes_only_the_models_columns_with_their_types(
    sessions, changes, message
) -> None:
    async with sessions() as session:
        made = await crud.create(session, Product(sku="A-1", region="eu", name="Lamp"))
        with pytest.raises(ValueError, match=message):
            await crud.update(session, Product, made.id, changes)
        assert (await crud.get(session, Product, made.id)).name == "Lamp"


# -- The database's refusals, named from the table's constraints ---------------------


async def test_a_duplicate_on_each_unique_key_names_its_columns(sessions) -> None:
    shelf = await a_shelf(sessions)
    async with sessions() as session:
        await crud.create(session, Product(sku="A-1", region="eu", name="Lamp"))
        with pytest.raises(AlreadyExistsError) as composite:
            await crud.create(session, Product(sku="A-1", region="eu", name="Copy"))
        assert composite.value.columns == ("sku", "region")
        assert composite.value.constraint == "uq_product_sku_region"
        assert composite.value.values == {"sku": "A-1", "region": "eu"}
        assert "Product" in str(composite.value) and "'A-1'" in str(composite.value)
        with pytest.raises(AlreadyExistsError) as unnamed:  # the backend named this one
            await crud.create(session, Shelf(name="A"))
        assert (unnamed.value.model, unnamed.value.columns) == ("Shelf", ("name",))
        device = await crud.create(session, Device(serial="D-1", shelf_id=shelf.id))
        with pytest.raises(AlreadyExistsError) as serial:
            await crud.create(session, Device(serial="D-1", shelf_id=shelf.id))
        assert serial.value.columns == ("serial",)
    async with sessions() as session:  # (this one holds the device: a new one with its id
        with pytest.raises(AlreadyExistsError) as key:  # would be SQLAlchemy's own warning)
            await crud.create(session, Device(id=device.id, serial="D-2", shelf_id=shelf.id))
        assert key.value.columns == ("id",)
        # the session is still usable, and the refused objects stored nothing
        assert await crud.count(session, Product) == 1 and await crud.count(session, Device) == 1


async def test_a_missing_foreign_key_not_null_and_check_are_clear_errors(sessions) -> None:
    async with sessions() as session:
        with pytest.raises(ReferenceNotFoundError) as missing:
            await crud.create(session, Product(sku="A-1", region="eu", name="L", shelf_id=999))
        assert isinstance(missing.value, LookupError)
        assert missing.value.columns == ("shelf_id",) and missing.value.values == {"shelf_id": 999}
        with pytest.raises(ReferenceNotFoundError) as required:
            await crud.create(session, Device(serial="D-1", shelf_id=998))
        assert required.value.columns == ("shelf_id",)
        with pytest.raises(MissingValueError) as null:
            await crud.create(session, Product(sku="A-2", region="eu", name=None))
        assert null.value.columns == ("name",)
        with pytest.raises(CheckFailedError) as check:
            await crud.create(session, Product(sku="A-3", region="eu", name="L", stock=-1))
        assert check.value.constraint == "ck_product_stock"
        assert check.value.columns == ("stock",)
        assert await crud.count(session, Product) == 0


async def test_deleting_a_parent_releases_or_refuses_by_the_foreign_key(sessions) -> None:
    shelf = await a_shelf(sessions)
    async with sessions() as session:
        lamp = await crud.create(
            session, Product(sku="A-1", region="eu", name="L", shelf_id=shelf.id)
        )
        assert await crud.delete(session, Shelf, shelf.id)  # ON DELETE SET NULL
        # the product follows, with a new version: its old ETag no longer matches
        assert (lamp.shelf_id, lamp.version) == (None, 2)
        kept = await a_shelf(sessions, "B")
        await crud.create(session, Device(serial="D-1", shelf_id=kept.id))
        with pytest.raises(StillReferencedError) as refused:  # no ON DELETE: refused
            await crud.delete(session, Shelf, kept.id)
        assert refused.value.model == "Shelf" and refused.value.table == "device"
        assert refused.value.columns == ("shelf_id",)
        assert await crud.get(session, Shelf, kept.id) is not None


# -- Many rows -------------------------------------------------------------------------


async def test_create_many_sets_ids_and_server_defaults(sessions) -> None:
    await create_many_of_each_model(sessions)


async def test_create_many_without_returning_too(sessions, no_returning, backend) -> None:
    # MySQL's path, on every backend; lastrowid (for Note) is MySQL's and SQLite's
    await create_many_of_each_model(sessions, notes=backend != "postgresql")


async def create_many_of_each_model(sessions, notes: bool = True) -> None:
    shelf = await a_shelf(sessions)
    made = products(1500, shelf_id=shelf.id)
    devices = [Device(serial=f"D-{i}", shelf_id=shelf.id) for i in range(30)]
    notes = [Note(text=f"note {i}") for i in range(30 if notes else 0)]  # no unique key
    async with sessions() as session:
        assert await bulk.create_many(session, made) == made
        assert await bulk.create_many(session, devices) == devices
        assert await bulk.create_many(session, notes) == notes
        assert all(d.status == "new" and isinstance(d.created_at, datetime) for d in devices)
        stored = dict((await session.exec(select(Product.sku, Product.id))).all())
        texts = dict((await session.exec(select(Note.text, Note.id))).all())
        made[0].name = "Changed"  # persistent: one UPDATE, its version counted
        await session.commit()
    assert {p.sku: p.id for p in made} == stored
    assert {n.text: n.id for n in notes} == texts
    assert made[0].version == 2


async def test_a_failed_create_many_gives_the_objects_back_to_retry(sessions) -> None:
    async with sessions() as session:
        await crud.create(session, Product(sku="SKU-2", region="eu", name="Taken"))
        batch = products(5)
        with pytest.raises(AlreadyExistsError) as refused:
            await bulk.create_many(session, batch)
        assert refused.value.columns == ("sku", "region")
        # transient again, every value as given: fix the one and send them again
        assert all(p not in session and p.id is None for p in batch)
        assert [p.name for p in batch] == [f"Product {i}" for i in range(5)]
        batch[2].region = "us"
        await bulk.create_many(session, batch)
        assert await crud.count(session, Product) == 6


async def test_update_where_and_delete_where_count_rows_and_versions(sessions) -> None:
    async with sessions() as session:
        made = await bulk.create_many(session, products(5))
        ids = [p.id for p in made]
        changed = await bulk.update_where(
            session, Product, {"stock": 3}, col(Product.stock) == 0, keys=ids[:3]
        )
        assert changed == 3 and [p.version for p in made] == [2, 2, 2, 1, 1]
        assert await bulk.delete_where(session, Product, col(Product.stock) == 3) == 3
        assert await crud.count(session, Product) == 2


# -- Upserts and get-or-create by a composite key --------------------------------------


async def test_upsert_by_a_composite_key_inserts_then_updates(sessions, engine) -> None:
    async with sessions() as session:
        first = await upserts.upsert(session, products(3), ["sku", "region"])
        again = products(4)
        for product in again:
            product.name = "Renamed"
        with watch_sql(engine) as sql:
            second = await upserts.upsert(session, again, ["sku", "region"])
        no_kit_table_is_touched(sql)
    assert [p.id for p in second[:3]] == [p.id for p in first]
    assert [(p.name, p.version) for p in second] == [("Renamed", 2)] * 3 + [("Renamed", 1)]


async def test_upsert_keeps_the_stored_uuid_and_refuses_a_repeated_key(sessions) -> None:
    shelf = await a_shelf(sessions)
    async with sessions() as session:
        (stored,) = await upserts.upsert(
            session, [Device(serial="D-1", shelf_id=shelf.id)], ["serial"]
        )
        (again,) = await upserts.upsert(
            session, [Device(serial="D-1", status="moved", shelf_id=shelf.id)], ["serial"]
        )
        assert again.id == stored.id and again.status == "moved"
        with pytest.raises(upserts.RepeatedKeyError, match="more than once"):
            await upserts.upsert(session, products(1) + products(1), ["sku", "region"])
        with pytest.raises(ValueError, match="no unique key"):
            await upserts.upsert(session, products(1), ["sku"])


async def test_racing_get_or_create_by_a_composite_key_makes_one_row(sessions) -> None:
    async def one() -> Product:
        async with sessions() as session:
            return await upserts.get_or_create(
                session, Product, {"name": "Raced"}, sku="RACE", region="eu"
            )

    for _ in range(3):
        got = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(12))), 60)
        assert len({p.id for p in got}) == 1
        async with sessions() as session:
            assert await crud.count(session, Product) == 1
            assert await crud.delete(session, Product, got[0].id)


async def test_racing_get_or_create_of_a_uuid_row_makes_one_row(sessions) -> None:
    shelf = await a_shelf(sessions)

    async def one() -> Device:
        async with sessions() as session:
            return await upserts.get_or_create(session, Device, {"shelf_id": shelf.id}, serial="X")

    got = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(12))), 60)
    assert len({d.id for d in got}) == 1 and got[0].status == "new"


# -- Streaming and exports of any model -------------------------------------------------


async def test_streams_and_exports_of_a_model(sessions) -> None:
    shelf = await a_shelf(sessions)
    async with sessions() as session:
        await bulk.create_many(session, products(25, shelf_id=shelf.id))
        async with streaming.stream_all(session, Product, chunk_size=10) as rows:
            assert [p.sku async for p in rows] == [f"SKU-{i}" for i in range(25)]
        async with aclosing(exports.export_csv(session, Product, chunk_size=7)) as chunks:
            text = "".join([chunk async for chunk in chunks])
        frames = [f async for f in exports.to_dataframes(session, Product, chunk_size=10)]
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == [c.name for c in Product.__table__.columns]
    assert len(table) == 26 and table[1][table[0].index("sku")] == "SKU-0"
    assert sum(len(f) for f in frames) == 25
    assert str(frames[0]["shelf_id"].dtype) == "Int64" and str(frames[0]["id"].dtype) == "int64"


# -- Optimistic locking, relationships and transfers on the reader's models -------------


async def test_optimistic_locking_on_a_model_with_a_version(sessions) -> None:
    async with sessions() as session:
        lamp = await crud.create(session, Product(sku="A-1", region="eu", name="Lamp"))
        tag = locking.etag(lamp)
        assert tag == f'"product-{lamp.id}-v1"'
        changed = await locking.update_if_match(session, Product, lamp.id, {"name": "B"}, tag)
        assert changed.version == 2
        with pytest.raises(crud.VersionConflictError):
            await locking.update_if_match(session, Product, lamp.id, {"name": "C"}, tag)
        with pytest.raises(crud.VersionConflictError):
            await locking.delete_if_match(session, Product, lamp.id, tag)
        assert await locking.delete_if_match(session, Product, lamp.id, locking.etag(changed))
        with pytest.raises(ValueError, match="no version column"):
            locking.etag(Shelf(id=1, name="S"))


async def test_relationships_load_and_move_on_the_readers_models(sessions, engine) -> None:
    shelf, other = await a_shelf(sessions), await a_shelf(sessions, "B")
    async with sessions() as session:
        made = await bulk.create_many(session, products(3, shelf_id=shelf.id))
    async with sessions() as session:
        with watch_sql(engine) as sql:
            loaded = await relationships.get_with(session, Shelf, shelf.id, Shelf.products)
        assert sql.count == 2 and [p.sku for p in loaded.products] == ["SKU-0", "SKU-1", "SKU-2"]
        every = await relationships.list_with(session, Shelf, Shelf.products, joined=True)
        assert [len(s.products) for s in every] == [3, 0]
        moved = await relationships.set_related(
            session, Product, made[0].id, Product.shelf, other.id
        )
        assert moved.shelf.name == "B" and moved.version == 2
        with pytest.raises(LookupError, match="Shelf 999 not found"):
            await relationships.set_related(session, Product, made[0].id, Product.shelf, 999)


async def test_a_transfer_between_rows_of_any_model(sessions) -> None:
    async with sessions() as session:
        a, b = await bulk.create_many(session, products(2))
        await bulk.update_where(session, Product, {"stock": 5}, keys=[a.id])
        await transactions.transfer(session, Product.stock, a.id, b.id, 3)
        with pytest.raises(transactions.NotEnoughError):
            await transactions.transfer(session, Product.stock, a.id, b.id, 3)
        with pytest.raises(transactions.RowNotFoundError):
            await transactions.transfer(session, Product.stock, a.id, 999, 1)
        with pytest.raises(TypeError):
            await transactions.transfer(session, Product.stock, a.id, b.id, 1.5)
        stock = dict((await session.exec(select(Product.id, Product.stock))).all())
    assert stock == {a.id: 2, b.id: 3}
