"""JSON columns on every backend: an in-place change to a plain ``JSON`` dict is
never saved (the trap), ``columns.MutableJSON`` saves one level deep, and
``flag_modified`` the rest; a key queried with ``column["key"].as_string()`` /
``.as_integer()`` finds the same rows on SQLite, PostgreSQL and MariaDB, for keys
with quotes, dots, dollars and non-ASCII letters."""

from typing import Any

import pytest
from sqlalchemy import JSON
from sqlalchemy.orm import registry
from sqlalchemy.orm.attributes import flag_modified
from sqlmodel import Field, SQLModel, col, select

from asyncpatterns.columns import MutableJSON, json_key
from asyncpatterns.db import make_session_maker


class Own(SQLModel, registry=registry()):
    """A reader's models: their own metadata, none of the kit's tables."""


class Doc(Own, table=True):
    id: int | None = Field(default=None, primary_key=True)
    plain: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    tracked: dict[str, Any] = Field(default_factory=dict, sa_type=MutableJSON)


@pytest.fixture
async def sessions(engine):
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.create_all)
    yield make_session_maker(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.drop_all)


async def stored(sessions, doc_id: int) -> Doc:
    async with sessions() as session:
        return await session.get(Doc, doc_id)


async def test_an_in_place_change_is_saved_only_where_it_is_tracked(sessions) -> None:
    async with sessions() as session, session.begin():
        doc = Doc(plain={"n": 1, "inner": {"x": 1}}, tracked={"n": 1, "inner": {"x": 1}})
        session.add(doc)
    async with sessions() as session, session.begin():
        doc = await session.get(Doc, doc.id)
        doc.plain["n"] = 2  # the trap: the session sees no change
        doc.tracked["n"] = 2  # MutableDict: marked
    again = await stored(sessions, doc.id)
    assert (again.plain["n"], again.tracked["n"]) == (1, 2)
    async with sessions() as session, session.begin():
        doc = await session.get(Doc, doc.id)
        doc.tracked["inner"]["x"] = 2  # two levels down: unseen even when tracked
    assert (await stored(sessions, doc.id)).tracked["inner"] == {"x": 1}
    async with sessions() as session, session.begin():
        doc = await session.get(Doc, doc.id)
        doc.tracked["inner"]["x"] = 2
        flag_modified(doc, "tracked")  # the fix for anything deeper
        doc.plain["n"] = 3
        doc.plain = {**doc.plain}  # a copy after the change: equal to what it holds, unseen
    again = await stored(sessions, doc.id)
    assert (again.tracked["inner"], again.plain["n"]) == ({"x": 2}, 1)
    async with sessions() as session, session.begin():
        doc = await session.get(Doc, doc.id)
        doc.plain = {**doc.plain, "n": 3}  # a new value built from a copy: seen
    assert (await stored(sessions, doc.id)).plain["n"] == 3


async def test_a_constructed_object_is_not_tracked_until_loaded(sessions) -> None:
    """SQLModel stores the plain dict given to the constructor (or assigned) after
    SQLAlchemy's MutableDict coercion: in-place changes to it stay unseen. If this
    test fails, SQLModel fixed it; say so in columns.py."""
    async with sessions() as session:
        doc = Doc(tracked={"n": 1})
        session.add(doc)
        await session.commit()
        assert type(doc.tracked) is dict
        doc.tracked["n"] = 2  # unseen: the kit's sessions do not expire on commit
        await session.commit()
        assert (await stored(sessions, doc.id)).tracked == {"n": 1}
        flag_modified(doc, "tracked")  # seen, always
        await session.commit()
    assert (await stored(sessions, doc.id)).tracked == {"n": 2}


KEYS = ["kind", "a.b", "$", "a'b", "ünï", "a b", "[0]", "名前", "😀", "1", "a-1", "a;b--"]


@pytest.mark.parametrize("key", KEYS)
async def test_a_key_is_queried_the_same_on_every_backend(sessions, key: str) -> None:
    async with sessions() as session, session.begin():
        session.add_all(
            [
                Doc(plain={key: "invoice", "n": 7}),
                Doc(plain={key: "receipt", "n": 3}),
                Doc(plain={"other": "invoice", "n": 9}),
            ]
        )
    async with sessions() as session:
        by_text = select(Doc.id).where(json_key(col(Doc.plain), key).as_string() == "invoice")
        by_number = select(Doc.id).where(json_key(col(Doc.plain), "n").as_integer() > 5)
        missing = select(Doc.id).where(json_key(col(Doc.plain), key).as_string().is_(None))
        ids = sorted((await session.exec(select(Doc.id))).all())
        assert (await session.exec(by_text)).all() == [ids[0]]
        assert sorted((await session.exec(by_number)).all()) == [ids[0], ids[2]]
        assert (await session.exec(missing)).all() == [ids[2]]


@pytest.mark.parametrize("key", ['a"b', "a\\b", "", "a\x00b", 1, "-1"])
def test_a_key_no_backend_can_address_is_refused(key: object) -> None:
    """SQLAlchemy writes the key into the path unescaped on SQLite and MySQL:
    ``$."a"b"`` is an invalid path on MySQL (a 500) and matches nothing on SQLite;
    MariaDB finds no key beginning with "-"."""
    with pytest.raises(ValueError, match="without quotes"):
        json_key(col(Doc.plain), key)  # type: ignore[arg-type]
