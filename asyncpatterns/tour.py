"""``python -m asyncpatterns tour``: every pattern once, with a line or two on what it did.

Run it first, or to see how a backend behaves: each step calls the kit's functions as an
app would (a thousand users in one statement, racing requests, concurrent transfers) and
prints what happened, so a pattern that misbehaves on your database says so in its line
("(bug)"). It runs on the embedded SQLite file (or ``--url`` / ``$DATABASE_URL``), creates
the kit's tables, refuses a database whose tables already hold data, and drops the tables
when it is done. A new pattern adds a step to ``TOUR_STEPS``: a coroutine that takes the
engine and returns its lines (its tests call it by title).
"""

import asyncio
import random
import sys
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from decimal import Decimal
from functools import partial

import httpx
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select

from . import crud, exports, pooling, relationships, streaming, transactions
from .config import ConfigurationError, mask_password
from .db import (
    create_db_and_tables,
    drop_db_and_tables,
    make_engine,
    make_session_maker,
    throwaway_database,
)
from .models import Account, User
from .sqlwatch import watch_sql

TourStep = Callable[[AsyncEngine], Awaitable[list[str]]]


async def _tour_crud(engine: AsyncEngine) -> list[str]:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        users = [User(name=f"User {i}", email=f"user{i}@example.com") for i in range(1000)]
        with watch_sql(engine) as sql:
            created = await crud.create_users(session, users)
        ada = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
        try:
            await crud.create_user(session, User(name="Eve", email="ada@example.com"))
            duplicate = "stored a duplicate (bug)"
        except crud.DuplicateEmailError:
            duplicate = "refused (DuplicateEmailError)"
        await crud.update_user(session, ada.id, {"name": "Ada Lovelace"})
        deactivated = await crud.deactivate_users(session, [u.id for u in created[:10]])
        deleted = await crud.delete_inactive_users(session)
        remaining = await crud.count_users(session)
    return [
        f"create_users: {len(created)} users, ids {created[0].id}..{created[-1].id}, "
        f"in {sql.count} statement(s)",
        f"duplicate email: {duplicate}",
        f"update, deactivate {deactivated}, delete inactive {deleted}: {remaining} users remain",
    ]


async def _tour_pooling(engine: AsyncEngine) -> list[str]:
    status = pooling.pool_status(engine)
    lines = [f"{status.pool}: size {status.size}, max_overflow {status.max_overflow}"]
    tiny = make_engine(engine.url, pool_size=2, max_overflow=0, pool_timeout=0.5)
    holders = [partial(pooling.hold_connection, tiny, 0.3)] * 10
    try:
        try:
            await pooling.gather_or_cancel(*(hold() for hold in holders))
            lines.append("10 holders on a pool of 2: no error (unexpected)")
        except PoolTimeoutError:
            lines.append("10 holders on a pool of 2, unbounded: pool TimeoutError after 0.5 s")
        await pooling.gather_bounded(holders, limit=pooling.pool_capacity(tiny))
        lines.append("the same 10, bounded to the pool by a semaphore: all finished")
    finally:
        await tiny.dispose()
    if engine.dialect.name != "sqlite":
        killed = await pooling.pooled_connection_ids(engine)
        admin = make_engine(engine.url, isolation_level="AUTOCOMMIT")
        try:
            await pooling.terminate_connections(admin, killed)
        finally:
            await admin.dispose()
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        lines.append(f"server killed {len(killed)} pooled connection(s): next query ran (pre-ping)")
    return lines


async def _tour_relationships(engine: AsyncEngine) -> list[str]:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        for t in range(20):
            people = [User(name=f"T{t} M{i}", email=f"t{t}.m{i}@example.com") for i in range(5)]
            await relationships.create_team_with_members(session, f"Tour team {t}", people)
    loaders = {
        "one query per team": relationships.get_teams_one_query_each,
        "selectinload": relationships.get_teams_with_members,
        "joinedload": relationships.get_teams_with_members_joined,
    }
    counts = []
    for name, loader in loaders.items():
        async with session_maker() as session:
            with watch_sql(engine) as sql:
                teams = await loader(session)
        counts.append(f"{name} {sql.count}")
    member, other_team = teams[0].members[0], teams[1]
    async with session_maker() as session:
        await relationships.move_member(session, member.id, other_team.id)
        await relationships.delete_team(session, other_team.id)
        member = await relationships.get_user_with_team(session, member.id)
    return [
        f"{len(teams)} teams x 5 members, statements: {', '.join(counts)}",
        f"moved a member to another team, deleted that team: member kept, team {member.team}",
    ]


async def _tour_transactions(engine: AsyncEngine) -> list[str]:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        session.add_all(Account(owner=f"Tour {i}", balance=Decimal("100.00")) for i in range(10))
        await session.commit()
        ids = list((await session.exec(select(Account.id))).all())
    rng = random.Random(3)

    async def transfer(from_id: int, to_id: int, amount: Decimal) -> str:
        async with session_maker() as session:
            try:
                await transactions.transfer_funds(session, from_id, to_id, amount)
            except transactions.InsufficientFundsError:
                return "refused"
        return "done"

    plan = [(*rng.sample(ids, 2), Decimal(rng.randint(1, 3000)) / 100) for _ in range(200)]
    outcomes = await asyncio.gather(*(transfer(*step) for step in plan))
    async with session_maker() as session:
        balances = list((await session.exec(select(Account.balance))).all())
        user = User(name="Tour", email="tour.savepoint@example.com")
        first = await transactions.complex_operation(session, user, "first profile")
        # The same user again: the profile's INSERT fails (one per user), in its savepoint.
        second = await transactions.complex_operation(session, user, "second profile")
    return [
        f"200 concurrent transfers: {outcomes.count('done')} done, "
        f"{outcomes.count('refused')} refused (insufficient funds)",
        f"total {sum(balances)} (was 1000.00), lowest balance {min(balances)}",
        "complex_operation twice for one user: "
        + (
            "profile stored, then the second profile's savepoint rolled back alone"
            if first and not second
            else f"stored {first}, then {second} (bug)"
        ),
    ]


async def _tour_api(engine: AsyncEngine) -> list[str]:
    from .api import create_app  # here: importing api builds its module-level app

    app = create_app(engine.url)
    transport = httpx.ASGITransport(app=app)  # calls the app in-process, without a server
    # ASGITransport does not run the lifespan (tables, engine disposal): run it ourselves.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://tour") as client,
    ):
        body = {"name": "Racer", "email": "tour.api@example.com"}
        racing = await asyncio.gather(*(client.post("/users/", json=body) for _ in range(20)))
        created = next(r.json() for r in racing if r.status_code == 201)
        bad_input = {
            "limit=1000": await client.get("/users/", params={"limit": 1000}),
            "name null": await client.patch(f"/users/{created['id']}", json={"name": None}),
            "unknown id": await client.get("/users/2000000000"),
        }
    statuses = [r.status_code for r in racing]
    return [
        f"20 racing POSTs, one email: {statuses.count(201)} stored (201), "
        f"{statuses.count(400)} refused (400 Email already registered)",
        "bad input: " + ", ".join(f"{k} -> {r.status_code}" for k, r in bad_input.items()),
    ]


async def _tour_migrations(engine: AsyncEngine) -> list[str]:
    from . import migrations  # here: Alembic is imported only when used

    try:
        async with throwaway_database(engine.url, "asyncpatterns_tour") as url:
            applied = await migrations.upgrade(url)
            differences = await migrations.check(url)
            undone = await migrations.downgrade(url, "base")
    except ConfigurationError as exc:  # a server user without CREATE DATABASE
        return [f"skipped: migrations run in a scratch database ({exc})"]
    agree = "agree" if not differences else f"differ: {len(differences)} changes lack a revision"
    return [
        f"upgrade head on an empty database: applied {', '.join(applied)}",
        f"models and migrations {agree}",
        f"downgrade base: undid {', '.join(undone)}, no kit table left",
    ]


async def _tour_upserts(engine: AsyncEngine) -> list[str]:
    from . import upserts  # here: the step's only user of the module

    session_maker = make_session_maker(engine)

    async def ask() -> int | None:
        async with session_maker() as session:
            return (await upserts.get_or_create_team(session, " Tour upserts ")).id

    team_ids = await asyncio.gather(*(ask() for _ in range(20)))
    async with session_maker() as session:
        half = [User(name=f"Old {i}", email=f"upsert{i}@example.com") for i in range(0, 1000, 2)]
        await upserts.upsert_users(session, half)
        users = [User(name=f"New {i}", email=f"UPSERT{i}@example.com") for i in range(1000)]
        with watch_sql(engine) as sql:
            stored = await upserts.upsert_users(session, users)
    updated = sum(user.version > 1 for user in stored)
    return [
        f"20 racing get_or_create_team calls for one name: {len(set(team_ids))} team, no error",
        f"upsert_users of 1000 users, 500 stored already: {updated} updated, "
        f"{len(stored) - updated} inserted, in {sql.count} statement(s)",
    ]


async def _tour_streaming(engine: AsyncEngine) -> list[str]:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        more = [User(name=f"Stream {i}", email=f"stream{i}@example.com") for i in range(5000)]
        await crud.create_users(session, more)
    async with session_maker() as session:
        total = await crud.count_users(session)
        streamed = 0
        with watch_sql(engine) as sql:
            async with streaming.stream_users(session, chunk_size=500) as users:
                async for _user in users:
                    streamed += 1
        size = 0
        async with aclosing(exports.export_users_csv(session)) as chunks:
            async for text in chunks:
                size += len(text.encode())
        try:
            async with streaming.stream_users(session, chunk_size=500) as users:
                async for _user in users:
                    await session.commit()  # ends the stream's transaction
            cut = "no error (bug)"
        except streaming.StreamClosedError:
            cut = "StreamClosedError, not a shorter result"
    return [
        f"stream_users: {streamed} of {total} users, 500 at a time, in {sql.count} statement(s)",
        f"export_users_csv: {size:,} bytes of CSV, one chunk of rows at a time",
        f"a commit mid-stream: {cut}",
    ]


async def _tour_locking(engine: AsyncEngine) -> list[str]:
    from .api import create_app  # here: importing api builds its module-level app

    app = create_app(engine.url)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://tour") as client,
    ):
        body = {"name": "Lock", "email": "tour.locking@example.com"}
        url = f"/users/{(await client.post('/users/', json=body)).json()['id']}"
        etag = (await client.get(url)).headers["ETag"]
        racing = await asyncio.gather(
            *(
                client.patch(url, json={"name": f"Writer {i}"}, headers={"If-Match": etag})
                for i in range(10)
            )
        )
        stored = (await client.get(url)).json()
    statuses = [r.status_code for r in racing]
    winner = next(r.json()["name"] for r in racing if r.status_code == 200)
    return [
        f"GET gives ETag {etag}; 10 racing PATCHes with If-Match {etag}: "
        f"{statuses.count(200)} applied (200), {statuses.count(412)} refused (412)",
        f"stored: {stored['name']!r}, version {stored['version']} "
        f"({'the winner' if stored['name'] == winner else 'NOT the winner (bug)'})",
    ]


TOUR_STEPS: list[tuple[str, TourStep]] = [
    ("CRUD", _tour_crud),
    ("Pooling", _tour_pooling),
    ("Relationships", _tour_relationships),
    ("Transactions", _tour_transactions),
    ("FastAPI", _tour_api),
    ("Migrations", _tour_migrations),
    ("Upserts", _tour_upserts),
    ("Streaming", _tour_streaming),
    ("Optimistic locking", _tour_locking),
]


async def tour(url: str | None = None) -> int:
    engine = make_engine(url)
    print(f"asyncpatterns tour on {mask_password(engine.url)}")
    try:
        await create_db_and_tables(engine)
        async with make_session_maker(engine)() as session:
            if await crud.count_users(session):
                print(
                    "This database already has users; the tour only runs on a "
                    "scratch database. Pass --url to an empty one.",
                    file=sys.stderr,
                )
                return 1
        try:
            for title, step in TOUR_STEPS:
                print(f"\n== {title}")
                for line in await step(engine):
                    print(f"   {line}")
        finally:
            await drop_db_and_tables(engine)
    finally:
        await engine.dispose()
    print("\nTour complete.")
    return 0
