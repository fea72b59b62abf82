"""Keyset pagination (``asyncpatterns.pagination``) on every backend: a walk forwards
and back gives the rows in the database's own order, ties broken by id; under
writers inserting and deleting, a row there for the whole walk is seen exactly once
(offsets skip one: the trap); a tampered cursor is ``InvalidCursorError`` (the API's
400), never a database error; a reader's model with a UUID key and aware times
pages the same; and ``GET /users/`` follows its ``Link`` header."""

import asyncio
import base64
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, func
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel, col, select

from asyncpatterns import crud
from asyncpatterns.columns import UTCDateTime
from asyncpatterns.db import make_session_maker
from asyncpatterns.models import User
from asyncpatterns.pagination import InvalidCursorError, keyset_page
from asyncpatterns.sqlwatch import watch_sql


class Own(SQLModel, registry=registry()):
    """A reader's models: their own metadata, none of the kit's tables."""


class Probe(Own, table=True):
    """Column types a keyset cursor must check as the database would."""

    id: int | None = Field(default=None, primary_key=True)
    small: int = Field(sa_type=sa.SmallInteger)
    big: int = Field(sa_type=sa.BigInteger)
    color: str = Field(sa_type=sa.Enum("red", "blue", name="probe_color"))
    tag: str = Field(sa_type=sa.Uuid(as_uuid=False))
    naive: datetime = Field(sa_type=sa.DateTime)
    note: str = Field(sa_type=sa.Text)


class Reading(Own, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    taken_at: datetime = Field(sa_type=UTCDateTime, index=True)
    note: str | None = Field(default=None, max_length=20)


def cursor_of(*parts: object) -> str:
    try:  # as the kit writes them; a lone surrogate only as an escape
        data = json.dumps(list(parts), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        data = json.dumps(list(parts)).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


# Names that collide, differ in case or trailing spaces, or sort oddly: the
# database's collation orders them, and the walk must give that order exactly.
NAMES = ["bob", "Bob", "bob ", "ä", "a", "Z", "Zoë", "😀", "名前", "a'b", "%", "_", " "] * 3
NAMES += ["\U0010ffff" * 100, "\U0010ffff" * 99 + "a"]  # the longest, in 4-byte characters


async def add_users(sessions, names: list[str]) -> list[int]:
    async with sessions() as session, session.begin():
        users = [
            User(name=n, email=f"u{i}-{uuid.uuid4().hex[:8]}@x.org") for i, n in enumerate(names)
        ]
        session.add_all(users)
    return [u.id for u in users]


async def walk(session, order_by, limit: int, backwards_from: str | None = None) -> list[int]:
    """Every page, following ``next`` (or ``previous`` from ``backwards_from``)."""
    seen, cursor = [], backwards_from
    while True:
        page = await keyset_page(session, User, order_by=order_by, cursor=cursor, limit=limit)
        ids = [u.id for u in page.items]
        seen = (ids + seen) if backwards_from else (seen + ids)
        cursor = page.previous if backwards_from else page.next
        if cursor is None:
            return seen


@pytest.mark.parametrize("limit", [1, 4, 100])
async def test_a_walk_each_way_is_the_databases_order(engine, limit: int) -> None:
    sessions = make_session_maker(engine)
    await add_users(sessions, NAMES)
    async with sessions() as session:
        for order_by in (None, User.name):
            sort = [col(User.id)] if order_by is None else [col(User.name), col(User.id)]
            wanted = list((await session.exec(select(User.id).order_by(*sort))).all())
            forwards = await walk(session, order_by, limit)
            assert forwards == wanted
            last = await keyset_page(session, User, order_by=order_by, limit=limit)
            while last.next:
                last = await keyset_page(
                    session, User, order_by=order_by, cursor=last.next, limit=limit
                )
            assert last.next is None
            tail = [u.id for u in last.items]
            if last.previous is None:  # one page only
                assert tail == wanted
                continue
            assert (
                await walk(session, order_by, limit, backwards_from=last.previous) + tail == wanted
            )


async def test_a_page_is_one_statement(engine) -> None:
    sessions = make_session_maker(engine)
    await add_users(sessions, NAMES)
    async with sessions() as session:
        first = await keyset_page(session, User, order_by=User.name, limit=5)
        with watch_sql(engine) as log:
            await keyset_page(session, User, order_by=User.name, cursor=first.next, limit=5)
    assert log.count == 1


async def test_trap_offset_pages_skip_a_row_when_one_before_is_deleted(engine) -> None:
    sessions = make_session_maker(engine)
    ids = await add_users(sessions, [f"user {n:02}" for n in range(10)])
    async with sessions() as session:
        first = [u.id for u in await crud.get_users(session, skip=0, limit=5)]
        keyset = await keyset_page(session, User, limit=5)
    async with sessions() as session, session.begin():
        await session.exec(delete(User).where(col(User.id) == ids[0]))  # someone deletes
    async with sessions() as session:
        by_offset = [u.id for u in await crud.get_users(session, skip=5, limit=5)]
        by_keyset = [u.id for u in (await keyset_page(session, User, cursor=keyset.next)).items]
    assert first == ids[:5]
    assert by_offset == ids[6:]  # ids[5] is on no page: skipped
    assert by_keyset == ids[5:]


async def test_under_racing_writers_each_lasting_row_is_seen_once(engine) -> None:
    """A reader walks by name, page by page, while writers insert rows (some of
    the same names) and delete only the rows they inserted."""
    sessions = make_session_maker(engine)
    lasting = set(await add_users(sessions, NAMES * 2))
    stop, rng = asyncio.Event(), random.Random(7)

    async def writer() -> None:
        while not stop.is_set():
            [new] = await add_users(sessions, [rng.choice(NAMES)])
            await asyncio.sleep(0)
            if rng.random() < 0.7:
                async with sessions() as session, session.begin():
                    await session.exec(delete(User).where(col(User.id) == new))

    writers = [asyncio.create_task(writer()) for _ in range(3)]
    try:
        for _ in range(3):
            seen, cursor = [], None
            while True:
                async with sessions() as session:  # each page a request of its own
                    page = await keyset_page(
                        session, User, order_by=User.name, cursor=cursor, limit=7
                    )
                seen += [u.id for u in page.items]
                cursor = page.next
                await asyncio.sleep(0.01)
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)), "a row was repeated"
            assert lasting <= set(seen), f"rows skipped: {sorted(lasting - set(seen))}"
    finally:
        stop.set()
        await asyncio.gather(*writers)


HOSTILE_BY_ID = [
    "!",
    "not base64 at all \x00",
    "====",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    base64.urlsafe_b64encode(b"[1, 2").decode(),
    cursor_of("id", "next"),
    cursor_of("id", "next", [1], "extra"),
    cursor_of("name,id", "next", [1]),  # another order's
    cursor_of("id", "sideways", [1]),
    cursor_of("id", "next", 1),
    cursor_of("id", "next", [1, 2]),
    cursor_of("id", "next", [True]),
    cursor_of("id", "next", [1.5]),
    cursor_of("id", "next", ["1"]),
    cursor_of("id", "next", [None]),
    *(INT32_ONLY := [cursor_of("id", "next", [2**31]), cursor_of("id", "next", [-(2**31) - 1])]),
    cursor_of("id", "next", [2**63]),  # past any backend's integer
    cursor_of("id", "next", [10**100]),
    cursor_of("name,id", "next", [1, 1]),  # an id cursor's values, relabelled
]
HOSTILE_BY_NAME = [
    cursor_of("id", "next", ["a", 1]),
    cursor_of("name,id", "next", ["a\x00b", 1]),  # PostgreSQL refuses NUL
    cursor_of("name,id", "next", ["\ud800", 1]),  # a lone surrogate: no encoding holds it
    cursor_of("name,id", "next", ["x" * 101, 1]),  # longer than the column
    cursor_of("name,id", "next", [["a"], 1]),
    cursor_of("name,id", "next", ["a", 2**63]),
    cursor_of("name,id", "next", ["a", 1, 2]),
    cursor_of("name,id", "previous", ["a"]),
]
HOSTILE_BY_ID += ["A" * 4097, ""]
CASES = [("id", c) for c in HOSTILE_BY_ID] + [("name", c) for c in HOSTILE_BY_NAME]


@pytest.mark.parametrize(("sort", "cursor"), CASES)
async def test_a_tampered_cursor_is_refused_before_the_database(
    engine, backend: str, sort: str, cursor: str
) -> None:
    sessions = make_session_maker(engine)
    await add_users(sessions, ["a", "b"])
    order = User.name if sort == "name" else None
    if backend == "sqlite" and cursor in INT32_ONLY:  # SQLite's INTEGER holds 64 bits
        async with sessions() as session:
            await keyset_page(session, User, order_by=order, cursor=cursor)
        return
    async with sessions() as session:
        with watch_sql(engine) as log, pytest.raises(InvalidCursorError):
            await keyset_page(session, User, order_by=order, cursor=cursor)
    assert log.count == 0


async def test_extreme_but_valid_cursors_page_normally(engine) -> None:
    sessions = make_session_maker(engine)
    ids = await add_users(sessions, ["a", "b"])
    async with sessions() as session:
        for edge in (-(2**31), 0, 2**31 - 1):
            page = await keyset_page(session, User, cursor=cursor_of("id", "next", [edge]))
            assert [u.id for u in page.items] == [i for i in ids if i > edge]
        long_name = cursor_of("name,id", "previous", ["\U0010ffff" * 100, 2**31 - 1])
        page = await keyset_page(session, User, order_by=User.name, cursor=long_name)
        assert {u.id for u in page.items} == set(ids)


async def test_a_readers_model_with_a_uuid_key_and_aware_times(engine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.create_all)
    try:
        sessions = make_session_maker(engine)
        start = datetime(2026, 3, 29, 0, 59, 59, 999999, tzinfo=UTC)  # a DST change in Europe
        times = [start + timedelta(microseconds=n // 3) for n in range(30)]  # ties
        async with sessions() as session, session.begin():
            session.add_all([Reading(taken_at=t) for t in times])
        async with sessions() as session:
            wanted = list(
                (
                    await session.exec(
                        select(Reading.id).order_by(col(Reading.taken_at), col(Reading.id))
                    )
                ).all()
            )
            seen, cursor = [], None
            while True:
                page = await keyset_page(
                    session, Reading, order_by=Reading.taken_at, cursor=cursor, limit=4
                )
                assert all(r.taken_at.tzinfo is not None for r in page.items)
                seen += [r.id for r in page.items]
                if (cursor := page.next) is None:
                    break
            assert seen == wanted
            with pytest.raises(InvalidCursorError):  # a naive time: which zone?
                naive = cursor_of("taken_at,id", "next", ["2026-03-29T01:00:00", str(uuid.uuid4())])
                await keyset_page(session, Reading, order_by=Reading.taken_at, cursor=naive)
            with pytest.raises(InvalidCursorError):
                bad_key = cursor_of("taken_at,id", "next", [start.isoformat(), "not-a-uuid"])
                await keyset_page(session, Reading, order_by=Reading.taken_at, cursor=bad_key)
            with pytest.raises(TypeError, match="nullable"):
                await keyset_page(session, Reading, order_by=Reading.note)
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Own.metadata.drop_all)


async def test_the_api_follows_its_link_header(live_client, engine) -> None:
    sessions = make_session_maker(engine)
    await add_users(sessions, NAMES)
    async with sessions() as session:
        count = (await session.exec(select(func.count()).select_from(User))).one()
        by_name = list(
            (await session.exec(select(User.id).order_by(col(User.name), col(User.id)))).all()
        )
    for sort, wanted in (("id", None), ("name", by_name)):
        seen, url = [], f"/users/?sort={sort}&limit=4"
        while url:
            response = await live_client.get(url)
            assert response.status_code == 200, response.text
            seen += [u["id"] for u in response.json()]
            url = response.links.get("next", {}).get("url")
        assert len(seen) == count
        assert seen == (wanted or sorted(seen))
        back = await live_client.get(response.links["prev"]["url"])
        assert back.status_code == 200 and back.json()


@pytest.mark.parametrize(("sort", "cursor"), [c for c in CASES if 0 < len(c[1]) <= 4096])
async def test_the_api_answers_a_tampered_cursor_400(
    live_client, backend: str, sort: str, cursor: str
) -> None:
    if backend == "sqlite" and cursor in INT32_ONLY:  # a position past every row there
        assert (await live_client.get("/users/", params={"cursor": cursor})).status_code == 200
        return
    response = await live_client.get("/users/", params={"cursor": cursor, "sort": sort})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("Invalid cursor: ")


@pytest.mark.parametrize(
    "query",
    ["cursor=" + "A" * 4097, "cursor=", "sort=email", "skip=5&cursor=abc", "skip=5&sort=name"],
)
async def test_the_api_refuses_what_is_no_page(live_client, query: str) -> None:
    response = await live_client.get(f"/users/?{query}")
    assert response.status_code in (400, 422), response.text


@pytest.fixture
async def own_tables(engine):
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.create_all)
    yield make_session_maker(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Own.metadata.drop_all)


async def test_each_column_type_is_checked_as_the_database_would(own_tables, backend: str) -> None:
    """Found by an adversary: each of these reached the database (a 500 on some
    backend), or the kit refused its own cursor."""
    async with own_tables() as session, session.begin():
        session.add_all(
            Probe(
                small=n,
                big=2**40 + n,
                color=("red", "blue")[n % 2],
                tag=str(uuid.UUID(int=n)),
                naive=datetime(2026, 1, 1, n),
                note="x",
            )
            for n in range(5)
        )
    async with own_tables() as session:
        if backend == "mysql":  # an ENUM sorts by declaration order, compares as text
            with pytest.raises(TypeError, match="ENUM"):
                await keyset_page(session, Probe, order_by=Probe.color)
        sortable = [Probe.small, Probe.big, Probe.tag, Probe.naive]
        for column in sortable + ([Probe.color] if backend != "mysql" else []):
            seen, cursor = [], None
            while True:  # the kit's own cursors: every type walks to the end
                page = await keyset_page(session, Probe, order_by=column, cursor=cursor, limit=2)
                seen += [p.id for p in page.items]
                if (cursor := page.next) is None:
                    break
            assert sorted(seen) == [1, 2, 3, 4, 5], column
        for column, value in [
            ("small", 40_000 if backend != "sqlite" else 2**63),  # SQLite: 64 bits for all
            ("big", 2**63),
            *([("color", "green")] if backend != "mysql" else []),  # not one of its values
            ("tag", "not-a-uuid"),
            ("naive", "2026-01-01T00:00:00+00:00"),  # aware, for a naive column
        ]:
            with pytest.raises(InvalidCursorError):
                hostile = cursor_of(f"{column},id", "next", [value, 1])
                await keyset_page(session, Probe, order_by=getattr(Probe, column), cursor=hostile)
        with pytest.raises(TypeError, match="length"):  # a TEXT key: its cursor would not fit
            await keyset_page(session, Probe, order_by=Probe.note)


async def test_a_cursor_the_database_would_refuse_late_is_refused_early(engine) -> None:
    from asyncpatterns.models import Account

    sessions = make_session_maker(engine)
    await add_users(sessions, ["a", "b"])
    deep = base64.urlsafe_b64encode(b"[" * 3000).decode()  # a RecursionError in json.loads
    dotted = cursor_of("email,id", "next", ["İ" * 200 + "@x.org", 1])  # lower() doubles it
    async with sessions() as session:
        with pytest.raises(InvalidCursorError):
            await keyset_page(session, User, cursor=deep)
        with pytest.raises(InvalidCursorError):
            await keyset_page(session, User, order_by=User.email, cursor=dotted)
        with pytest.raises(TypeError, match="Money"):  # Decimal values, stored as cents
            await keyset_page(session, Account, order_by=Account.balance)


async def test_far_times_with_an_offset_are_refused(own_tables) -> None:
    async with own_tables() as session:
        for far in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            with pytest.raises(InvalidCursorError):
                hostile = cursor_of("taken_at,id", "next", [far, str(uuid.uuid4())])
                await keyset_page(session, Reading, order_by=Reading.taken_at, cursor=hostile)


async def test_a_session_kept_across_pages_sees_each_row_once(engine) -> None:
    """A row renamed by someone else while a session keeps its stale copy: the
    cursor is made from the row as the page read it, and the walk ends."""
    sessions = make_session_maker(engine)
    ids = await add_users(sessions, ["a", "b", "c", "d", "e", "f"])
    async with sessions() as session:
        page = await keyset_page(session, User, order_by=User.name, limit=2)
        async with sessions() as other, other.begin():
            (await other.get(User, ids[1])).name = "cc"
        seen = [u.id for u in page.items]
        for _ in range(10):
            page = await keyset_page(session, User, order_by=User.name, cursor=page.next, limit=2)
            seen += [u.id for u in page.items]
            if page.next is None:
                break
        assert page.next is None, "the walk did not end"
    assert sorted(set(seen)) == sorted(ids)
