"""Each pattern module, copied as the README says, runs on the reader's own models.

For every pattern module: copy it and exactly the files the README lists for
it into an empty package of another name, beside a model file written here
(``shop.py``: a composite unique key, a UUID key made in Python, a server
default, foreign keys, a version column) -- none of the kit's tables -- in a
fresh virtual environment holding only the README's copy line (``sqlmodel
"sqlalchemy[asyncio]"`` and the drivers), and run a smoke script that calls
every public function of the module on those models, on SQLite and on each
configured server. The script checks that the only tables known are the ones
of ``shop.py``: copying a pattern registers none of the kit's.

It installs packages, so it needs the package index: it runs when
``ASYNCPATTERNS_COPY_READY=1`` (CI sets it); otherwise it is skipped, saying so.
"""

# ruff: noqa: E501  (the smoke scripts below are code inside strings, indented twice)
import os
import re
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "asyncpatterns"


def readme_copy_plan() -> tuple[str, dict[str, list[str]]]:
    """The pip line and, per pattern module, the files and folders to copy, as the
    README says (its table: module, what to copy with it, what it needs)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Copying a pattern", 1)[1].split("\n## ", 1)[0]
    pip_line = re.search(r"^pip install .*$", section, re.M).group(0)
    files = {}
    for module, needs in re.findall(r"^\| `(\w+\.py)` \| ([^|]*) \|", section, re.M):
        files[module] = [module, *re.findall(r"`(\w+\.py|\w+/)`", needs)]
    return pip_line, files


PIP_LINE, FILES = readme_copy_plan()


@pytest.fixture(scope="session")
def copy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the README's copy line installed."""
    if os.environ.get("ASYNCPATTERNS_COPY_READY") != "1":
        pytest.skip(
            "set ASYNCPATTERNS_COPY_READY=1 to check copy-ready modules (installs packages)"
        )
    folder = tmp_path_factory.mktemp("copy-venv")
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    words = [word.strip('"') for word in PIP_LINE.split()]  # pip install sqlmodel ...
    command = [str(python), "-m", *words]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return python


def test_the_readme_lists_every_pattern_module() -> None:
    assert set(FILES) == set(SMOKE)
    for module, files in FILES.items():
        assert "models.py" not in files, f"{module}: copying the kit's tables is not needed"
        for name in files:
            assert (PACKAGE / name).exists(), (module, name)


# The reader's models: nothing of the kit's (the table names differ from the kit's and
# from tests/test_generic_patterns.py's, which share the test database).
SHOP = """
    import uuid
    from datetime import datetime
    from decimal import Decimal
    from typing import Any, Optional

    from sqlalchemy import CheckConstraint, UniqueConstraint, func, text
    from sqlalchemy.orm import declared_attr
    from sqlmodel import Field, Relationship, SQLModel


    class Aisle(SQLModel, table=True):
        id: int | None = Field(default=None, primary_key=True)
        name: str = Field(max_length=50, unique=True)
        items: list["Item"] = Relationship(
            back_populates="aisle", sa_relationship_kwargs={"lazy": "raise"}
        )


    class Item(SQLModel, table=True):
        __table_args__ = (
            UniqueConstraint("sku", "region", name="uq_item_sku_region"),
            CheckConstraint("stock >= 0", name="ck_item_stock"),
        )
        id: int | None = Field(default=None, primary_key=True)
        sku: str = Field(max_length=40)
        region: str = Field(max_length=8)
        name: str = Field(max_length=100)
        stock: int = 0
        aisle_id: int | None = Field(default=None, foreign_key="aisle.id", ondelete="SET NULL")
        version: int = Field(default=1, sa_column_kwargs={"server_default": text("1")})
        aisle: Optional[Aisle] = Relationship(
            back_populates="items", sa_relationship_kwargs={"lazy": "raise"}
        )

        @declared_attr.directive
        def __mapper_args__(cls) -> dict[str, Any]:
            return {"version_id_col": cls.__table__.c.version}


    class Gadget(SQLModel, table=True):
        id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
        serial: str = Field(max_length=40, unique=True)
        made_at: datetime | None = Field(
            default=None, sa_column_kwargs={"server_default": func.now()}
        )
        aisle_id: int = Field(foreign_key="aisle.id")
"""

_PRELUDE = """
    import asyncio, os
    from sqlalchemy import delete
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlmodel import SQLModel, select

    from myapp.shop import Aisle, Gadget, Item

    URL, BACKEND = os.environ["SMOKE_URL"], os.environ["SMOKE_BACKEND"]
    # Copying a pattern registers none of the kit's tables: only the reader's are known.
    assert set(SQLModel.metadata.tables) == {"aisle", "item", "gadget"}, SQLModel.metadata.tables


    async def tables(engine):
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
            for table in reversed(SQLModel.metadata.sorted_tables):
                await conn.execute(delete(table))
        return engine


    async def fresh_engine():
        from myapp.db import make_engine

        return await tables(make_engine(URL))


    async def finish(engine):
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.drop_all)
        await engine.dispose()
        print("smoke ok")


    def items(n, aisle_id=None):
        return [Item(sku=f"S{i}", region="eu", name=f"Item {i}", aisle_id=aisle_id) for i in range(n)]
"""

SMOKE = dict(
    {
        "crud.py": """
            from myapp import crud
            from myapp.db import AlreadyExistsError, ReferenceNotFoundError, make_session_maker


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    aisle = await crud.create(session, Aisle(name="A"))
                    lamp = await crud.create(session, Item(sku="L", region="eu", name="Lamp"))
                    try:
                        await crud.create(session, Item(sku="L", region="eu", name="Copy"))
                        raise AssertionError("duplicate stored")
                    except AlreadyExistsError as refused:
                        assert refused.columns == ("sku", "region"), refused
                    try:
                        await crud.create(session, Gadget(serial="G", aisle_id=999))
                        raise AssertionError("a missing aisle was accepted")
                    except ReferenceNotFoundError as refused:
                        assert refused.columns == ("aisle_id",), refused
                    gadget = await crud.create(session, Gadget(serial="G", aisle_id=aisle.id))
                    assert gadget.made_at is not None  # the server's default, loaded
                    await crud.load_server_values(session, gadget)
                    assert await crud.get(session, Gadget, gadget.id) is gadget
                    assert await crud.get_by(session, Item, sku="L", region="eu") is lamp
                    assert [i.sku for i in await crud.list_page(session, Item, 0, 10)] == ["L"]
                    assert await crud.count(session, Item) == 1
                    changed = await crud.update(session, Item, lamp.id, {"name": "Desk lamp"})
                    assert changed.version == 2
                    try:
                        await crud.update(session, Item, lamp.id, {"name": "x"}, expected_version=1)
                        raise AssertionError("a stale version was written over")
                    except crud.VersionConflictError:
                        pass
                    found = await session.exec(select(Item.id).where(crud.key_where(Item, lamp.id)))
                    assert list(found) == [lamp.id]
                    assert crud.unique_key(Item, ["sku", "region"])
                    assert await crud.delete(session, Item, lamp.id) is True
                await finish(engine)


            asyncio.run(main())
        """,
        "bulk.py": """
            from sqlalchemy import insert
            from sqlalchemy.exc import DBAPIError

            from myapp import bulk
            from myapp.db import AlreadyExistsError, make_session_maker


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    aisle = (await bulk.create_many(session, [Aisle(name="A")]))[0]
                    made = await bulk.create_many(session, items(5, aisle.id))
                    assert all(i.id for i in made) and made[0].version == 1
                    gadgets = [Gadget(serial=f"G{i}", aisle_id=aisle.id) for i in range(3)]
                    assert all(g.made_at for g in await bulk.create_many(session, gadgets))
                    try:
                        await bulk.create_many(session, items(2))
                        raise AssertionError("duplicates stored")
                    except AlreadyExistsError:
                        pass
                    if BACKEND == "postgresql":
                        assert await bulk.copy_many(session, [Item(sku="C", region="us", name="C")]) == 1
                    changed = await bulk.update_where(session, Item, {"stock": 2}, keys=[made[0].id])
                    assert changed == 1 and made[0].version == 2
                    assert bulk.column_values(made[0])["sku"] == "S0"
                    async with session.begin():
                        await bulk.release_referrers(session, Aisle, [Aisle.id == aisle.id])
                    assert made[0].aisle_id is None and made[0].version == 3
                    assert await bulk.delete_where(session, Item, Item.stock == 2) == 1
                async with make_session_maker(engine)() as session:
                    try:
                        async with session.begin():
                            await (await session.connection()).execute(insert(Aisle).values(name="A"))
                        raise AssertionError("a duplicate stored")
                    except DBAPIError as exc:
                        assert isinstance(bulk.refused(exc, Aisle), AlreadyExistsError)
                await finish(engine)


            asyncio.run(main())
        """,
        "upserts.py": """
            from myapp import upserts
            from myapp.db import make_session_maker


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    first = await upserts.upsert(session, items(3), ["sku", "region"])
                    again = items(3)
                    again[0].name = "Renamed"
                    second = await upserts.upsert(session, again, ["sku", "region"])
                    assert second[0].id == first[0].id and second[0].version == 2
                    try:
                        await upserts.upsert(session, items(1) + items(1), ["sku", "region"])
                        raise AssertionError("one key twice accepted")
                    except upserts.RepeatedKeyError:
                        pass
                    aisle = await upserts.get_or_create(session, Aisle, name="A")
                    assert (await upserts.get_or_create(session, Aisle, name="A")).id == aisle.id
                    gadget = await upserts.get_or_create(session, Gadget, {"aisle_id": aisle.id}, serial="G")
                    assert (await upserts.get_or_create(session, Gadget, serial="G")).id == gadget.id
                await finish(engine)


            asyncio.run(main())
        """,
        "relationships.py": """
            from myapp import bulk, relationships as rel
            from myapp.db import make_session_maker


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    a, b = await bulk.create_many(session, [Aisle(name="A"), Aisle(name="B")])
                    made = await bulk.create_many(session, items(2, a.id))
                    session.expunge_all()
                    loaded = await rel.get_with(session, Aisle, a.id, Aisle.items)
                    assert len(loaded.items) == 2
                    every = await rel.list_with(session, Aisle, Aisle.items, joined=True)
                    assert [len(x.items) for x in every] == [2, 0]
                    moved = await rel.set_related(session, Item, made[0].id, Item.aisle, b.id)
                    assert moved.aisle.name == "B"
                await finish(engine)


            asyncio.run(main())
        """,
        "transactions.py": """
            from myapp import bulk, transactions as tx
            from myapp.db import make_session_maker, run_in_transaction


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    a, b = await bulk.create_many(session, items(2))
                    await bulk.update_where(session, Item, {"stock": 5}, keys=[a.id])
                    await tx.transfer(session, Item.stock, a.id, b.id, 3)
                    try:
                        await tx.transfer(session, Item.stock, a.id, b.id, 3)
                        raise AssertionError("below zero")
                    except tx.NotEnoughError:
                        pass
                    await run_in_transaction(session, lambda s: tx.move_amount(s, Item.stock, b.id, a.id, 1))
                    stock = dict((await session.exec(select(Item.id, Item.stock))).all())
                    assert stock == {a.id: 3, b.id: 2}, stock
                    aisle = Aisle(name="A")
                    stored = await tx.create_with_optional(
                        session, aisle, lambda x: Gadget(serial="G", aisle_id=x.id)
                    )
                    assert stored is True
                    again = await tx.create_with_optional(
                        session, Aisle(name="B"), lambda x: Gadget(serial="G", aisle_id=x.id)
                    )
                    assert again is False  # the gadget's serial is taken: only it is undone
                await finish(engine)


            asyncio.run(main())
        """,
        "locking.py": """
            from myapp import crud, locking
            from myapp.db import make_session_maker


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    lamp = await crud.create(session, Item(sku="L", region="eu", name="Lamp"))
                    tag = locking.etag(lamp)
                    assert tag == f'"item-{lamp.id}-v1"'
                    assert locking.parse_if_match(tag).versions(Item, lamp.id) == {1}
                    changed = await locking.update_if_match(session, Item, lamp.id, {"name": "A"}, tag)
                    assert changed.version == 2
                    try:
                        await locking.update_if_match(session, Item, lamp.id, {"name": "B"}, tag)
                        raise AssertionError("a stale If-Match was applied")
                    except locking.VersionConflictError:
                        pass
                    try:
                        locking.parse_if_match("not-quoted")
                        raise AssertionError("a malformed If-Match was accepted")
                    except locking.InvalidIfMatchError:
                        pass
                    try:
                        await locking.update_if_match(
                            session, Item, lamp.id, {"name": "B"}, None, required=True
                        )
                        raise AssertionError("a missing If-Match was accepted")
                    except locking.PreconditionRequiredError:
                        pass
                    try:
                        await locking.delete_if_match(session, Item, lamp.id, tag)
                        raise AssertionError("a stale If-Match deleted the row")
                    except locking.VersionConflictError:
                        pass
                    assert await locking.delete_if_match(session, Item, lamp.id, locking.etag(changed))
                await finish(engine)


            asyncio.run(main())
        """,
        "streaming.py": """
            from sqlalchemy.ext.asyncio import async_sessionmaker
            from sqlmodel.ext.asyncio.session import AsyncSession

            from myapp import streaming


            async def main():
                engine = await tables(create_async_engine(URL))  # needs nothing of the kit's
                sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
                async with sessions() as session:
                    session.add_all(items(25))
                    await session.commit()
                    async with streaming.stream_all(session, Item, chunk_size=10) as rows:
                        assert len([row async for row in rows]) == 25
                    statement = select(Item.sku, Item.name).order_by(Item.id)
                    async with streaming.stream_rows(session, statement, chunk_size=7) as chunks:
                        assert len([row async for chunk in chunks for row in chunk]) == 25
                    skus = select(Item.sku).order_by(Item.id)
                    async with streaming.stream_scalars(session, skus, chunk_size=7) as found:
                        assert [sku async for sku in found][:2] == ["S0", "S1"]
                    try:
                        async with streaming.stream_all(session, Item, chunk_size=10) as rows:
                            async for _row in rows:
                                await session.commit()
                        raise AssertionError("a commit mid-stream went unnoticed")
                    except streaming.StreamClosedError:
                        pass
                await finish(engine)


            asyncio.run(main())
        """,
        "pagination.py": """
            from sqlalchemy.ext.asyncio import async_sessionmaker
            from sqlmodel.ext.asyncio.session import AsyncSession

            from myapp import pagination


            async def main():
                engine = await tables(create_async_engine(URL))  # needs nothing of the kit's
                sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
                async with sessions() as session:
                    aisle = Aisle(name="A")
                    session.add(aisle)
                    await session.flush()
                    session.add_all(items(25))
                    session.add_all([Gadget(serial=f"G{i}", aisle_id=aisle.id) for i in range(7)])
                    await session.commit()
                    seen, cursor = [], None
                    while True:
                        page = await pagination.keyset_page(
                            session, Item, order_by=Item.name, cursor=cursor, limit=4
                        )
                        seen += [item.name for item in page.items]
                        if (cursor := page.next) is None:
                            break
                    order = select(Item.name).order_by(Item.name, Item.id)
                    assert seen == list((await session.exec(order)).all())
                    back = await pagination.keyset_page(
                        session, Item, order_by=Item.name, cursor=page.previous, limit=4
                    )
                    assert back.items and back.next
                    first = await pagination.keyset_page(session, Gadget, limit=5)  # UUID keys
                    rest = await pagination.keyset_page(session, Gadget, cursor=first.next)
                    assert len({g.id for g in first.items + rest.items}) == 7
                    try:
                        await pagination.keyset_page(session, Item, cursor="tampered")
                        raise AssertionError("a tampered cursor was taken")
                    except pagination.InvalidCursorError:
                        pass
                await finish(engine)


            asyncio.run(main())
        """,
        "softdelete.py": """
            from sqlmodel import Field

            from myapp import crud, softdelete
            from myapp.db import AlreadyExistsError, make_session_maker


            class Tag(softdelete.SoftDelete, table=True):  # the reader's own table
                id: int | None = Field(default=None, primary_key=True)
                label: str = Field(max_length=40)


            softdelete.unique_among_live(Tag, "label")


            async def main():
                engine = await fresh_engine()
                async with make_session_maker(engine)() as session:
                    old = await crud.create(session, Tag(label="sale"))
                    try:
                        await crud.create(session, Tag(label="sale"))
                        raise AssertionError("two live tags share a label")
                    except AlreadyExistsError:
                        pass
                    assert await softdelete.soft_delete(session, old)
                    assert await crud.get(session, Tag, old.id) is None
                    assert await crud.count(session, Tag) == 0
                    new = await crud.create(session, Tag(label="sale"))  # freed by the delete
                    try:
                        await softdelete.restore(session, Tag, old.id)
                        raise AssertionError("restored over a live label")
                    except AlreadyExistsError:
                        pass
                    await softdelete.soft_delete(session, new)
                    assert (await softdelete.restore(session, Tag, old.id)).label == "sale"
                    everyone = select(Tag).execution_options(include_deleted=True)
                    assert len((await session.exec(everyone)).all()) == 2
                await finish(engine)


            asyncio.run(main())
        """,
        "exports.py": """
            import io
            from contextlib import aclosing

            from sqlalchemy.ext.asyncio import async_sessionmaker
            from sqlmodel.ext.asyncio.session import AsyncSession

            from myapp import exports


            async def main():
                engine = await tables(create_async_engine(URL))  # needs nothing of the kit's
                sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
                async with sessions() as session:
                    session.add_all(items(25))
                    await session.commit()
                    async with aclosing(exports.export_csv(session, Item, chunk_size=10)) as chunks:
                        text = "".join([t async for t in chunks])
                    assert text.count("\\r\\n") == 26, text
                    statement = exports.export_statement(Item, ["sku", "name"])
                    async with aclosing(exports.export_csv(session, statement)) as chunks:
                        assert "".join([t async for t in chunks]).startswith("sku,name")
                    assert exports.csv_cell("=1+1") == "'=1+1"
                    assert exports.csv_text([("a,b", None, True)]) == '"a,b",,true\\r\\n'
                    out = io.StringIO(newline="")
                    assert await exports.write_csv(session, Item, out) == 25
                    assert out.getvalue() == text
                    try:
                        frames = [f async for f in exports.to_dataframes(session, Item)]
                        assert sum(len(frame) for frame in frames) == 25
                    except ModuleNotFoundError:  # pandas: only to_dataframes needs it
                        pass
                await finish(engine)


            asyncio.run(main())
        """,
        "jobs.py": """
            from datetime import datetime
            from typing import Any

            from sqlalchemy import JSON, Text
            from sqlmodel import Field

            from myapp import jobs
            from myapp.columns import UTCDateTime
            from myapp.db import make_session_maker


            class Chore(SQLModel, table=True):  # the reader's own job table
                id: int | None = Field(default=None, primary_key=True)
                payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
                state: str = Field(default="queued", max_length=16)
                attempts: int = 0
                run_after: datetime = Field(default_factory=jobs.utc_now, sa_type=UTCDateTime)
                locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
                last_error: str | None = Field(default=None, sa_type=Text)


            async def main():
                engine = await fresh_engine()
                assert jobs.utc_now().utcoffset().total_seconds() == 0
                async with make_session_maker(engine)() as session:
                    first = await jobs.enqueue(session, Chore, {"mail": "welcome"})
                    second = await jobs.enqueue(session, Chore, {"mail": "bye"})
                claimed = await jobs.claim(engine, Chore)
                assert (claimed.id, claimed.attempts) == (first.id, 1), claimed
                assert await jobs.extend(engine, claimed, 60)
                assert await jobs.release(engine, claimed)  # given back, the attempt not counted
                again = await jobs.claim(engine, Chore)
                assert (again.id, again.attempts) == (first.id, 1), again
                assert await jobs.fail(engine, again, "smtp down", backoff=0.01) == jobs.QUEUED
                assert not await jobs.complete(engine, again)  # no longer this claim's
                ran, stop = [], asyncio.Event()

                async def handle(session, job):
                    ran.append(job.id)
                    if len(ran) == 2:
                        stop.set()

                await asyncio.wait_for(jobs.run_worker(engine, Chore, handle, stop=stop, poll=0.05), 30)
                assert sorted(ran) == [first.id, second.id], ran
                async with make_session_maker(engine)() as session:
                    states = (await session.exec(select(Chore.state, Chore.attempts))).all()
                assert sorted(states) == [("done", 1), ("done", 2)], states
                await finish(engine)


            asyncio.run(main())
        """,
        "notify.py": """
            from myapp import notify
            from myapp.db import make_session_maker


            async def main():
                engine = await fresh_engine()
                assert notify.channel_name(Item) == "item" and notify.channel_name("Jobs") == "Jobs"
                try:
                    notify.channel_name("x" * 64)
                    raise AssertionError("a channel PostgreSQL would truncate was accepted")
                except ValueError:
                    pass
                async with notify.Listener(engine, Item) as listener:
                    assert listener.listening == (BACKEND == "postgresql"), listener.listening
                    heard = listener.heard
                    async with make_session_maker(engine)() as session, session.begin():
                        await notify.notify(session, Item)  # delivered when this commits
                    woke = await listener.wait(10 if BACKEND == "postgresql" else 0.1, since=heard)
                    assert woke == (BACKEND == "postgresql"), (BACKEND, woke)
                await finish(engine)


            asyncio.run(main())
        """,
        "outbox.py": """
            from datetime import datetime, timedelta
            from typing import Any

            from sqlalchemy import JSON, Text
            from sqlmodel import Field

            from myapp import outbox
            from myapp.columns import UTCDateTime
            from myapp.db import make_session_maker


            class Event(SQLModel, table=True):  # the reader's own outbox table
                id: int | None = Field(default=None, primary_key=True)
                topic: str = Field(max_length=100)
                key: str | None = Field(default=None, max_length=255)
                payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
                created_at: datetime = Field(sa_type=UTCDateTime)
                sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
                attempts: int = 0
                locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
                last_error: str | None = Field(default=None, sa_type=Text)


            async def main():
                engine = await fresh_engine()
                sessions = make_session_maker(engine)
                try:
                    async with sessions() as session:
                        await outbox.emit(session, Event, "item.added", {"sku": "L"})
                    raise AssertionError("an event was written outside a transaction")
                except outbox.NoTransactionError:
                    pass
                try:
                    async with sessions() as session, session.begin():
                        session.add(Item(sku="L", region="eu", name="Lamp"))
                        await outbox.emit(session, Event, "item.added", {"sku": "L"}, key="L")
                        raise RuntimeError("the change fails")
                except RuntimeError:
                    pass
                async with sessions() as session, session.begin():
                    session.add(Item(sku="L", region="eu", name="Lamp"))
                    first = await outbox.emit(session, Event, "item.added", {"sku": "L"}, key="L")
                    second = await outbox.emit(session, Event, "item.added", {"sku": "M"})
                [claimed, _] = await outbox.claim(engine, Event, batch=2, lease=0.1)
                await asyncio.sleep(0.3)  # that relay died: its lease is over
                published, stop = [], asyncio.Event()

                async def publish(event):
                    published.append(event.id)
                    if len(published) == 2:
                        stop.set()

                await asyncio.wait_for(outbox.relay(engine, Event, publish, stop=stop, poll=0.05), 30)
                assert published == [first.id, second.id], published
                assert not await outbox.mark_sent(engine, claimed)  # the dead relay's claim
                assert await outbox.purge_sent(engine, Event, timedelta(0)) == 2
                await finish(engine)


            asyncio.run(main())
        """,
        "pooling.py": """
            from functools import partial
            from sqlalchemy.exc import TimeoutError as PoolTimeout
            from myapp import pooling
            from myapp.db import make_engine


            async def main():
                engine = make_engine(URL, pool_size=2, max_overflow=0, pool_timeout=0.5)
                slow = pooling.slow_query(engine, 0.001)  # before the first connection (SQLite)
                status = pooling.pool_status(engine)
                assert status.size == 2 and pooling.pool_capacity(engine) == 2
                holders = [partial(pooling.hold_connection, engine, 0.7)] * 4  # 2 rounds of 0.7 s
                try:
                    await pooling.gather_or_cancel(*(hold() for hold in holders))
                    raise AssertionError("the pool did not run out")
                except PoolTimeout:
                    pass
                await pooling.gather_bounded(holders, limit=pooling.pool_capacity(engine))
                async with pooling.checked_out(engine, 2) as conns:
                    assert len(conns) == 2
                rate = await pooling.measure_throughput(engine, slow, 10)
                assert rate > 0
                shares = pooling.pool_settings_for_workers(40, 4, pools_per_worker=2)
                assert 4 * 2 * (shares["pool_size"] + shares["max_overflow"]) <= 40
                pooler = pooling.make_pooler_engine(URL)
                async with pooler.connect():
                    pass
                await pooler.dispose()
                if BACKEND != "sqlite":
                    ids = await pooling.pooled_connection_ids(engine)
                    admin = make_engine(URL, isolation_level="AUTOCOMMIT")
                    await pooling.terminate_connections(admin, ids)
                    await admin.dispose()
                    async with engine.connect() as conn:  # pre-ping replaced them
                        assert await pooling.server_connection_id(conn) not in ids
                await engine.dispose()
                print("smoke ok")


            asyncio.run(main())
        """,
        "columns.py": """
            from decimal import Decimal

            from sqlalchemy import MetaData
            from sqlalchemy.orm import declared_attr, registry
            from sqlalchemy.ext.asyncio import async_sessionmaker
            from sqlmodel import Field
            from sqlmodel.ext.asyncio.session import AsyncSession

            from myapp import columns


            class Own(SQLModel, registry=registry(metadata=MetaData(naming_convention=columns.NAMING_CONVENTION))):
                pass


            class Wallet(Own, columns.TimestampMixin, columns.VersionMixin, table=True):
                __table_args__ = columns.TABLE_OPTIONS
                id: int | None = Field(default=None, primary_key=True)
                email: str = Field(unique=True, sa_type=columns.Email(255))
                balance: Decimal = Field(default=Decimal("0.00"), sa_type=columns.Money)


            class Ledger(Own, table=True):
                id: int | None = Field(default=None, primary_key=True)
                version: int = columns.version_column()
                __mapper_args__ = declared_attr.directive(columns.version_mapper_args)
                notes: dict = Field(default_factory=dict, sa_type=columns.MutableJSON)


            async def main():
                assert set(Own.metadata.tables) == {"wallet", "ledger"}
                assert Wallet.__table__.c.email.unique and Ledger.__mapper__.version_id_col is not None
                engine = create_async_engine(URL)
                async with engine.begin() as conn:
                    await conn.run_sync(Own.metadata.drop_all)
                    await conn.run_sync(Own.metadata.create_all)
                sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
                async with sessions() as session:
                    wallet = Wallet(email=" Ada@Example.COM ", balance=Decimal("0.30") - Decimal("0.10"))
                    session.add(wallet)
                    await session.commit()
                    stored = (await session.exec(select(Wallet.email, Wallet.balance))).one()
                    assert stored == ("ada@example.com", Decimal("0.20")), stored
                    wallet.balance = Decimal("1.00")
                    await session.commit()
                    assert wallet.version == 2
                assert columns.canonical_email(" A@B.c ") == "a@b.c"
                assert columns.canonical_text(" x ") == "x"
                assert columns.checked_email("A@b.co") == "a@b.co"
                assert columns.checked_name(" N ") == "N"
                assert columns.to_cents(Decimal("12.34")) == 1234
                async with sessions() as session:
                    session.add(Ledger(notes={"kind": "cash"}))
                    await session.commit()
                async with sessions() as session:
                    ledger = (await session.exec(select(Ledger))).one()  # loaded: tracked
                    ledger.notes["kind"] = "card"  # in place: saved, MutableJSON
                    await session.commit()
                    cards = select(Ledger.id).where(columns.json_key(Ledger.notes, "kind").as_string() == "card")
                    assert (await session.exec(cards)).all() == [ledger.id]
                async with engine.begin() as conn:
                    await conn.run_sync(Own.metadata.drop_all)
                await engine.dispose()
                print("smoke ok")


            asyncio.run(main())
        """,
    }
)


@pytest.mark.parametrize("module", sorted(SMOKE))
def test_a_copied_module_runs_on_the_readers_models(
    copy_python: Path, database_url: URL, backend: str, module: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    package = project / "myapp"  # another name: the copy must not need "asyncpatterns"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "shop.py").write_text(textwrap.dedent(SHOP))
    for name in FILES[module]:
        if name.endswith("/"):
            shutil.copytree(
                PACKAGE / name, package / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(PACKAGE / name, package / name)
    script = project / "smoke.py"
    script.write_text(textwrap.dedent(_PRELUDE) + textwrap.dedent(SMOKE[module]))
    url = database_url.render_as_string(hide_password=False)
    env = {"PATH": os.environ.get("PATH", ""), "SMOKE_URL": url, "SMOKE_BACKEND": backend}
    result = subprocess.run(
        [str(copy_python), str(script)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("smoke ok"), result.stdout


def test_every_public_function_is_smoked() -> None:
    """A new public function of a pattern module must join its smoke script (the kit's
    thin wrappers at the end of a module are the regular tests' business)."""
    for module in FILES:
        source = (PACKAGE / module).read_text().split("# -- The kit's", 1)[0]
        public = set(re.findall(r"^(?:async )?def ([a-z]\w*)\(", source, re.M))
        missing = {name for name in public if name not in SMOKE[module]}
        assert not missing, f"{module}: not called by its smoke script: {sorted(missing)}"
