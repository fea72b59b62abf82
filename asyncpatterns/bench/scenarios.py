"""The bench's scenarios: the common pattern, the kit's, and the raw driver, side by side.

* ``bulk_insert`` -- N users (10,000 by default, ``--rows``), the ladder from
  the common pattern's ``create_users`` (one refresh per row) through
  ``add_all``, the kit's ``crud.create_users`` (the generic ``bulk.create_many``),
  SQLAlchemy Core's executemany, to the raw driver's ``executemany``; on
  PostgreSQL also ``crud.copy_users`` and asyncpg's ``copy_records_to_table``.
  The generic path is held against ``handwritten_create_users``, an INSERT
  written by hand for the User table's columns (what the kit had before its
  patterns were generic). Two more lines take the kit apart: its INSERT
  alone, and the session's bookkeeping alone (no database). Above 20,000 rows
  the two row-at-a-time variants are left out: each run would take minutes.
* ``eager_loading`` -- 100 teams x 10 members: N+1 lazy loads, selectinload
  (the kit's choice), joinedload, and one JOIN through the raw driver.
* ``pool_sweep`` -- 500 queries of 5 ms from 100 tasks at ``pool_size`` 1, 5
  and 20 (``max_overflow=0``), as queries per second.
* ``transfers`` -- 500 concurrent transfers among 10 accounts: the common
  read-modify-write ``transfer_funds`` against the kit's, and the money the
  common version created or destroyed.
* ``streaming`` -- a user table of 10,000 and 100,000 rows (``--stream-rows``,
  e.g. 10000,100000,1000000) read with ``.all()``, ``streaming.stream_users``,
  ``streaming.export_users_csv`` and the driver's own cursor: peak memory, as
  a fraction of ``.all()``'s, flat for the streams however large the table.
* ``upsert`` -- N users (10,000 by default, ``--rows``), half of them
  already stored: the common select-then-insert-or-update loop, the kit's
  ``upserts.upsert_users`` (ids back) and the driver's ``executemany`` of the
  backend's own upsert statement (no ids back).

The scenario functions empty the kit's tables: give them only a throw-away database.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import sqlalchemy
from sqlalchemy import TextClause, delete, insert, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from .. import crud, multirow, relationships, streaming, upserts
from ..db import attach_inserted, make_engine, make_session_maker, run_in_transaction
from ..models import Account, Team, User, canonical_email
from ..pooling import gather_bounded, slow_query
from ..transactions import transfer_funds
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, RAW, Result, Run, Variant, measure

FULL = {"users": 10_000, "teams": 100, "members": 10, "queries": 500, "transfers": 500}
QUICK = {"users": 100, "teams": 10, "members": 5, "queries": 20, "transfers": 20}
# Table sizes the streaming scenario reads (--stream-rows: e.g. 10000,100000,1000000).
FULL["stream_rows"] = (10_000, 100_000)  # type: ignore[assignment]
QUICK["stream_rows"] = (100, 1_000)  # type: ignore[assignment]
# Above this many rows, the row-at-a-time variants of bulk_insert are left out.
ROW_AT_A_TIME_LIMIT = 20_000


# --- the common pattern's code, kept as the anti-pattern (with Decimal money) ---


async def common_create_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The common bulk create: one SELECT per user after the commit."""
    session.add_all(users)
    await session.commit()
    for user in users:
        await session.refresh(user)
    return users


async def common_transfer_funds(
    session: AsyncSession, from_id: int, to_id: int, amount: Decimal
) -> None:
    """The common transfer: read, check, write, no lock -- updates get lost."""
    async with session.begin():
        from_account = await session.get(Account, from_id)
        to_account = await session.get(Account, to_id)

        if not from_account or not to_account:
            raise ValueError("Account not found")

        if from_account.balance < amount:
            raise ValueError("Insufficient funds")

        from_account.balance -= amount
        to_account.balance += amount

        session.add(from_account)
        session.add(to_account)


# --- bulk insert --------------------------------------------------------------

USER_COLUMNS = ("name", "email", "is_active", "team_id")


def make_users(count: int) -> list[User]:
    return [User(name=f"User {i}", email=f"user{i}@example.com") for i in range(count)]


async def handwritten_create_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The yardstick for ``bulk.create_many``: the same work (ids back, objects made
    persistent) with SQL written by hand for the User table's four columns."""
    rows = []
    for user in users:  # as the kit did it: canonical emails, the first version
        email = canonical_email(user.email)
        if email != user.email:
            user.email = email
        if type(user.version) is not int or user.version != 1:
            set_committed_value(user, "version", 1)
        rows.append((user.name, email, user.is_active, user.team_id))

    async def insert_all(tx: AsyncSession) -> list[User]:
        connection = await tx.connection()
        dialect = connection.dialect
        sql = f"INSERT INTO {dialect.identifier_preparer.quote('user')} "
        sql += "(name, email, is_active, team_id) "
        if dialect.name == "postgresql":
            sql += "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::boolean[],"
            sql += " $4::integer[]) RETURNING id, email"
            columns = tuple(list(column) for column in zip(*rows, strict=True))
            ids = {email: i for i, email in await connection.exec_driver_sql(sql, columns)}
        else:
            marker = "?" if dialect.paramstyle == "qmark" else "%s"
            ids = {}
            for start in range(0, len(rows), multirow.CHUNK):
                chunk = rows[start : start + multirow.CHUNK]
                values = ", ".join([f"({marker}, {marker}, {marker}, {marker})"] * len(chunk))
                flat = tuple(value for row in chunk for value in row)
                if dialect.insert_returning:
                    statement = f"{sql}VALUES {values} RETURNING id, email"
                    found = await connection.exec_driver_sql(statement, flat)
                else:  # MySQL: read the new ids back by email
                    await connection.exec_driver_sql(f"{sql}VALUES {values}", flat)
                    emails = [row[1] for row in chunk]
                    found = await tx.exec(
                        select(User.id, User.email).where(col(User.email).in_(emails))
                    )
                ids.update({email: i for i, email in found})
        for user, row in zip(users, rows, strict=True):
            set_committed_value(user, "id", ids[row[1]])
        attach_inserted(tx, users)
        return users

    return await run_in_transaction(session, insert_all)


async def _empty_user_table(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # no dead rows left for the next round
            await conn.execute(text('TRUNCATE "user" CASCADE'))
        else:
            await conn.execute(delete(User))


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """The driver's own connection (asyncpg, aiosqlite, aiomysql) from the pool."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        yield raw.driver_connection


async def raw_executemany(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """One driver ``executemany`` in one transaction: the physical limit."""
    names = ", ".join(USER_COLUMNS)
    async with driver_connection(engine) as driver:
        if engine.dialect.name == "postgresql":
            sql = f'INSERT INTO "user" ({names}) VALUES ($1, $2, $3, $4)'
            async with driver.transaction():
                await driver.executemany(sql, rows)
        elif engine.dialect.name == "sqlite":
            await driver.execute("BEGIN")
            await driver.executemany(f"INSERT INTO user ({names}) VALUES (?, ?, ?, ?)", rows)
            await driver.execute("COMMIT")
        else:
            async with driver.cursor() as cursor:
                sql = f"INSERT INTO user ({names}) VALUES (%s, %s, %s, %s)"
                await cursor.executemany(sql, rows)
            await driver.commit()
    return 1


async def raw_copy(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """asyncpg's binary COPY in one transaction (PostgreSQL only)."""
    async with driver_connection(engine) as driver, driver.transaction():
        await driver.copy_records_to_table("user", records=rows, columns=USER_COLUMNS)
    return 1


async def bulk_insert(
    engine: AsyncEngine,
    users: int = FULL["users"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Insert ``users`` users each way; the user table is emptied before every run."""
    session_maker = make_session_maker(engine)

    async def prepare() -> tuple[list[User], list[tuple[Any, ...]]]:
        await _empty_user_table(engine)
        fresh = make_users(users)
        return fresh, [tuple(getattr(u, c) for c in USER_COLUMNS) for u in fresh]

    async def common(payload: Any) -> None:
        async with session_maker() as session:
            await common_create_users(session, payload[0])

    async def add_all(payload: Any) -> None:
        async with session_maker() as session:
            session.add_all(payload[0])
            await session.commit()

    async def kit(payload: Any) -> None:
        async with session_maker() as session:
            await crud.create_users(session, payload[0])

    async def handwritten(payload: Any) -> None:
        async with session_maker() as session:
            await handwritten_create_users(session, payload[0])

    async def kit_insert(payload: Any) -> None:
        async with session_maker() as session, session.begin():
            connection = await session.connection()
            mapper = sqlalchemy.inspect(User)
            plan = multirow.make_plan(mapper, connection.dialect, frozenset({"id"}))
            rows = [plan.row(user) for user in payload[0]]  # as create_many makes them
            await multirow.insert_rows(connection, plan, rows)

    async def kit_attach(payload: Any) -> None:
        # What create_users does once the ids are back, with made-up ids: SQLAlchemy's
        # per-object work to make objects persistent, in a transaction that never
        # connects (nothing to send), then the session's close.
        async with session_maker() as session, session.begin():
            for id_, user in enumerate(payload[0], start=1):
                set_committed_value(user, "id", id_)
            attach_inserted(session, payload[0])

    async def core(payload: Any) -> None:
        rows = [dict(zip(USER_COLUMNS, row, strict=True)) for row in payload[1]]
        async with session_maker() as session:
            await session.exec(insert(User), params=rows)  # executemany, no ids back
            await session.commit()

    async def kit_copy(payload: Any) -> int:
        async with session_maker() as session:
            await crud.copy_users(session, payload[0])
        return 1  # the COPY itself, which sqlwatch does not see

    variants = []
    if users <= ROW_AT_A_TIME_LIMIT:
        variants += [
            Variant("common: add_all, commit, refresh each", ANTI, common),
            Variant("add_all + commit", OTHER, add_all),
        ]
    variants += [
        Variant("kit: crud.create_users", KIT, kit),
        Variant("  hand-written for User's columns", OTHER, handwritten),
        Variant("  of which the INSERT alone", KIT, kit_insert),
        Variant("  of which making them persistent", KIT, kit_attach),
        Variant("Core: execute(insert(User), rows)", OTHER, core),
        Variant("raw driver: executemany", RAW, lambda p: raw_executemany(engine, p[1])),
    ]
    if engine.dialect.name == "postgresql":
        variants += [
            Variant("kit: crud.copy_users (COPY)", KIT, kit_copy),
            Variant("raw driver: copy_records_to_table", RAW, lambda p: raw_copy(engine, p[1])),
        ]
    try:
        results = await measure("bulk_insert", engine, variants, prepare, repeats, progress)
    finally:
        await _empty_user_table(engine)
    copy_limit = next((r.seconds for r in results if r.variant.startswith("raw driver: copy")), 0)
    by_hand = next(r.seconds for r in results if r.variant.startswith("  hand-written"))
    for result in results:
        result.extra["users"] = users
        result.notes = f"{users / result.seconds:,.0f} rows/s"
        if result.variant == "kit: crud.create_users":
            result.notes += f", {result.seconds / by_hand:.2f}x the hand-written INSERT"
        if "copy_users" in result.variant and copy_limit:
            result.notes += f", {result.seconds / copy_limit:.2f}x copy_records_to_table"
    return results


# --- eager loading ------------------------------------------------------------


async def _add_teams(engine: AsyncEngine, teams: int, members: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(Team), [{"id": t + 1, "name": f"Team {t}"} for t in range(teams)])
        rows = [
            {"name": f"Member {t}.{m}", "email": f"m{t}.{m}@example.com", "team_id": t + 1}
            for t in range(teams)
            for m in range(members)
        ]
        await conn.execute(insert(User), rows)


async def _remove_teams(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(User))
        await conn.execute(delete(Team))


async def raw_teams_join(engine: AsyncEngine) -> int:
    """The same data as plain tuples from one JOIN through the driver."""
    sql = (
        "SELECT t.id, t.name, u.id, u.name, u.email FROM team t "
        "LEFT JOIN {user} u ON u.team_id = t.id ORDER BY t.id, u.id"
    )
    async with driver_connection(engine) as driver:
        if engine.dialect.name == "postgresql":
            rows = await driver.fetch(sql.format(user='"user"'))
        elif engine.dialect.name == "sqlite":
            async with driver.execute(sql.format(user="user")) as cursor:
                rows = await cursor.fetchall()
        else:
            async with driver.cursor() as cursor:
                await cursor.execute(sql.format(user="user"))
                rows = await cursor.fetchall()
            await driver.rollback()
    teams: dict[int, list[tuple[Any, ...]]] = {}
    for team_id, _name, *member in rows:
        teams.setdefault(team_id, []).append(tuple(member))
    return 1


async def eager_loading(
    engine: AsyncEngine,
    teams: int = FULL["teams"],
    members: int = FULL["members"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Load ``teams`` teams with ``members`` members each, every way, in a fresh session."""
    session_maker = make_session_maker(engine)

    def orm(loader: Callable[[AsyncSession], Awaitable[list[Team]]]) -> Run:
        async def run(_payload: Any) -> None:
            async with session_maker() as session:
                loaded = await loader(session)
            if sum(len(team.members) for team in loaded) != teams * members:
                raise RuntimeError(f"{loader.__name__} did not load every member")

        return run

    variants = [
        Variant("N+1: get_teams_one_query_each", ANTI, orm(relationships.get_teams_one_query_each)),
        Variant("kit: get_teams_with_members", KIT, orm(relationships.get_teams_with_members)),
        Variant(
            "joinedload: ..._members_joined",
            OTHER,
            orm(relationships.get_teams_with_members_joined),
        ),
        Variant("raw driver: one JOIN", RAW, lambda _p: raw_teams_join(engine)),
    ]
    await _add_teams(engine, teams, members)
    try:
        results = await measure("eager_loading", engine, variants, _nothing, repeats, progress)
    finally:
        await _remove_teams(engine)
    fastest = min(r.seconds for r in results if r.kind in (KIT, OTHER))
    for result in results:
        result.extra.update(teams=teams, members=members)
        if result.kind in (KIT, OTHER):
            result.notes = f"{result.seconds / fastest:.2f}x the faster loader"
    return results


async def _nothing() -> None:
    return None


# --- pool size sweep ----------------------------------------------------------


async def query_storm(engine: AsyncEngine, queries: int, tasks: int, query: TextClause) -> None:
    """``queries`` runs of ``query``, ``tasks`` at a time, each on its own checkout."""

    async def once() -> None:
        async with engine.connect() as conn:
            await conn.execute(query)

    await gather_bounded([once] * queries, tasks)


def _storm_variant(size: int, engine: AsyncEngine, queries: int, tasks: int) -> Variant:
    query = slow_query(engine, 0.005)  # pg_sleep / SLEEP / a sleep() registered on SQLite

    async def run(_payload: Any) -> None:
        await query_storm(engine, queries, tasks, query)

    return Variant(f"pool_size={size}", OTHER, run, engine)


async def pool_sweep(
    url: str | URL,
    sizes: Sequence[int] = (1, 5, 20),
    queries: int = FULL["queries"],
    tasks: int = 100,
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Queries per second of a 5 ms query at each ``pool_size`` (``max_overflow=0``)."""
    engines = {size: make_engine(url, pool_size=size, max_overflow=0) for size in sizes}
    variants = [_storm_variant(size, engine, queries, tasks) for size, engine in engines.items()]
    try:
        results = await measure(
            "pool_sweep", engines[sizes[-1]], variants, _nothing, repeats, progress
        )
    finally:
        for engine in engines.values():
            await engine.dispose()
    largest = queries / results[-1].seconds
    for result in results:
        qps = queries / result.seconds
        result.extra.update(queries=queries, tasks=tasks, qps=qps, vs_largest=qps / largest)
        result.notes = f"{qps:,.0f} queries/s, {qps / largest:.2f}x pool_size={sizes[-1]}"
    return results


# --- concurrent transfers -----------------------------------------------------

START_BALANCE = Decimal("100.00")
Transfer = Callable[[AsyncSession, int, int, Decimal], Awaitable[Any]]


def transfer_plan(transfers: int, accounts: int, seed: int = 7) -> list[tuple[int, int, Decimal]]:
    """The same pseudo-random transfers for every variant: (from, to, amount)."""
    rng = random.Random(seed)
    plan = []
    for _ in range(transfers):
        from_id, to_id = rng.sample(range(1, accounts + 1), 2)
        plan.append((from_id, to_id, Decimal(rng.randint(1, 3000)) / 100))
    return plan


async def transfer_storm(
    engine: AsyncEngine, transfer: Transfer, plan: list[tuple[int, int, Decimal]]
) -> dict[str, int]:
    """Every transfer at once, each in its own session; outcomes counted."""
    session_maker = make_session_maker(engine)

    async def one(from_id: int, to_id: int, amount: Decimal) -> str:
        try:
            async with session_maker() as session:
                await transfer(session, from_id, to_id, amount)
        except sqlalchemy.exc.DBAPIError:  # deadlock, lock timeout, "database is locked"
            return "failed"
        except ValueError:  # insufficient funds: refused, nothing changed
            return "refused"
        return "done"

    outcomes = await asyncio.gather(*(one(*step) for step in plan))
    return {name: outcomes.count(name) for name in ("done", "refused", "failed")}


async def reset_accounts(engine: AsyncEngine, accounts: int) -> None:
    async with make_session_maker(engine)() as session:
        await session.exec(delete(Account))
        session.add_all(
            Account(id=i, owner=f"Owner {i}", balance=START_BALANCE) for i in range(1, accounts + 1)
        )
        await session.commit()


async def _total_balance(engine: AsyncEngine) -> tuple[Decimal, Decimal]:
    async with make_session_maker(engine)() as session:
        balances = (await session.exec(select(Account.balance))).all()
    return sum(balances, Decimal("0.00")), min(balances)


async def transfers(
    engine: AsyncEngine,
    count: int = FULL["transfers"],
    accounts: int = 10,
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """``count`` concurrent transfers: the common unsafe version against the kit's."""
    plan = transfer_plan(count, accounts)
    expected = START_BALANCE * accounts
    seen: dict[str, list[dict[str, Any]]] = {}
    outcomes: dict[str, dict[str, int]] = {}

    def storm(transfer: Transfer, name: str) -> Run:
        async def run(_payload: Any) -> None:
            outcomes[name] = await transfer_storm(engine, transfer, plan)

        return run

    async def check(variant: Variant) -> None:
        total, lowest = await _total_balance(engine)
        seen.setdefault(variant.name, []).append(
            {**outcomes[variant.name], "money_lost": str(expected - total), "lowest": str(lowest)}
        )

    common, kit = "common: read-modify-write, no lock", "kit: transactions.transfer_funds"
    variants = [
        Variant(common, ANTI, storm(common_transfer_funds, common)),
        Variant(kit, KIT, storm(transfer_funds, kit)),
    ]

    async def prepare() -> None:
        await reset_accounts(engine, accounts)

    try:
        results = await measure("transfers", engine, variants, prepare, repeats, progress, check)
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(Account))
    for result in results:
        runs = seen[result.variant]
        lost = [Decimal(r["money_lost"]) for r in runs]
        failed = sum(r["failed"] for r in runs)
        result.extra.update(transfers=count, accounts=accounts, runs_detail=runs)
        result.notes = (
            f"{count / result.seconds:,.0f} transfers/s; money lost per run (-: created) "
            f"{', '.join(str(x) for x in lost)}; {failed} failed"
        )
    return results


# --- upsert: insert or update by email, half the rows existing --------------------


async def common_upsert_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The common upsert: look each email up, then update that row or add a new one."""
    for data in users:
        existing = (await session.exec(select(User).where(User.email == data.email))).first()
        if existing:
            existing.name = data.name
            existing.is_active = data.is_active
            existing.team_id = data.team_id
        else:
            session.add(data)
    await session.commit()
    return users


async def raw_upsert(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> int:
    """The backend's own upsert statement, one driver ``executemany`` in one
    transaction (aiomysql folds it into multi-row INSERTs). No ids come back."""
    names = ", ".join(USER_COLUMNS)
    async with driver_connection(engine) as driver:
        if engine.dialect.name == "postgresql":
            sql = (
                f'INSERT INTO "user" ({names}) VALUES ($1, $2, $3, $4) ON CONFLICT (email) '
                "DO UPDATE SET name = excluded.name, is_active = excluded.is_active, "
                'team_id = excluded.team_id, version = "user".version + 1'
            )
            async with driver.transaction():
                await driver.executemany(sql, rows)
        elif engine.dialect.name == "sqlite":
            sql = (
                f"INSERT INTO user ({names}) VALUES (?, ?, ?, ?) ON CONFLICT (email) "
                "DO UPDATE SET name = excluded.name, is_active = excluded.is_active, "
                "team_id = excluded.team_id, version = user.version + 1"
            )
            await driver.execute("BEGIN")
            await driver.executemany(sql, rows)
            await driver.execute("COMMIT")
        else:
            sql = (
                f"INSERT INTO user ({names}) VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
                "name = VALUES(name), is_active = VALUES(is_active), "
                "team_id = VALUES(team_id), version = user.version + 1"
            )
            async with driver.cursor() as cursor:
                await cursor.executemany(sql, rows)
            await driver.commit()
    return 1


async def upsert(
    engine: AsyncEngine,
    users: int = FULL["users"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Upsert ``users`` users of which half (every other email) exist, each way.

    Before every run the table holds the same half; afterwards it must hold
    every user once, renamed: a variant that does not is an error, not a time.
    """
    session_maker = make_session_maker(engine)
    existing = [{"name": f"Old {i}", "email": f"user{i}@example.com"} for i in range(0, users, 2)]

    async def prepare() -> tuple[list[User], list[tuple[Any, ...]]]:
        await _empty_user_table(engine)
        async with engine.begin() as conn:
            await conn.execute(insert(User), existing)
        fresh = [User(name=f"New {i}", email=f"user{i}@example.com") for i in range(users)]
        return fresh, [tuple(getattr(u, c) for c in USER_COLUMNS) for u in fresh]

    async def common(payload: Any) -> None:
        async with session_maker() as session:
            await common_upsert_users(session, payload[0])

    async def kit(payload: Any) -> None:
        async with session_maker() as session:
            await upserts.upsert_users(session, payload[0])

    async def check(variant: Variant) -> None:
        async with session_maker() as session:
            names = (await session.exec(select(User.name))).all()
        if len(names) != users or any(not name.startswith("New ") for name in names):
            raise RuntimeError(f"{variant.name} did not store every user once, renamed")

    variants = []
    if users <= ROW_AT_A_TIME_LIMIT:
        variants.append(Variant("common: select, insert or update each", ANTI, common))
    variants += [
        Variant("kit: upserts.upsert_users", KIT, kit),
        Variant("raw driver: executemany of the upsert", RAW, lambda p: raw_upsert(engine, p[1])),
    ]
    try:
        results = await measure("upsert", engine, variants, prepare, repeats, progress, check)
    finally:
        await _empty_user_table(engine)
    for result in results:
        result.extra.update(users=users, existing=len(existing))
        result.notes = f"{users / result.seconds:,.0f} rows/s"
    return results


# --- streaming: peak memory of .all() against a stream ---------------------------

# Above this many rows each variant gets one timed run: a million ORM objects take a
# minute to build, and memory, not time, is what this scenario shows.
STREAM_TIMED_LIMIT = 100_000
STREAM_SQL = "SELECT id, name, email, is_active, team_id FROM {user} ORDER BY id"


async def _grow_user_table(engine: AsyncEngine, start: int, stop: int) -> None:
    """Users ``start`` .. ``stop - 1``: COPY on PostgreSQL, multi-row INSERTs elsewhere."""
    for first in range(start, stop, 50_000):
        rows = [
            (f"User {i}", f"user{i}@example.com", True, None)
            for i in range(first, min(stop, first + 50_000))
        ]
        if engine.dialect.name == "postgresql":
            await raw_copy(engine, rows)
            continue
        async with engine.begin() as conn:
            await conn.execute(
                insert(User), [dict(zip(USER_COLUMNS, r, strict=True)) for r in rows]
            )


async def raw_stream(engine: AsyncEngine, chunk: int = streaming.CHUNK_SIZE) -> int:
    """Every user's row through the driver's own cursor, ``chunk`` rows at a time:
    asyncpg's server-side cursor (in a transaction), aiomysql's unbuffered SSCursor,
    aiosqlite's cursor with fetchmany."""
    rows = 0
    async with driver_connection(engine) as driver:
        if engine.dialect.name == "postgresql":
            async with driver.transaction():
                cursor = driver.cursor(STREAM_SQL.format(user='"user"'), prefetch=chunk)
                async for _record in cursor:
                    rows += 1
        elif engine.dialect.name == "sqlite":
            async with driver.execute(STREAM_SQL.format(user="user")) as cursor:
                while batch := await cursor.fetchmany(chunk):
                    rows += len(batch)
        else:
            from aiomysql.cursors import SSCursor

            async with driver.cursor(SSCursor) as cursor:
                await cursor.execute(STREAM_SQL.format(user="user"))
                while batch := await cursor.fetchmany(chunk):
                    rows += len(batch)
            await driver.rollback()
    return rows


async def streaming_scenario(
    engine: AsyncEngine,
    sizes: Sequence[int] = FULL["stream_rows"],
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
) -> list[Result]:
    """Read a user table of each size in ``sizes`` every way; the point is peak memory.

    ``.all()`` (the common way) holds every ORM object at once; ``stream_users`` and
    ``export_users_csv`` hold one chunk of 1,000 rows; the raw driver's cursor is the
    floor. The notes give each peak as a fraction of ``.all()``'s at the same size:
    a stream's peak stays flat as the table grows, ``.all()``'s grows with it.
    """
    session_maker = make_session_maker(engine)

    def check(rows: int, expected: int) -> None:
        if rows != expected:
            raise RuntimeError(f"read {rows} rows, expected {expected}")

    def variants(size: int) -> list[Variant]:
        async def everything(_payload: Any) -> None:
            async with session_maker() as session:
                check(len((await session.exec(select(User).order_by(User.id))).all()), size)

        async def stream_users(_payload: Any) -> None:
            rows = 0
            async with session_maker() as session, streaming.stream_users(session) as users:
                async for _user in users:
                    rows += 1
            check(rows, size)

        async def export_csv(_payload: Any) -> None:
            rows = 0
            async with session_maker() as session:
                async for text_chunk in streaming.export_users_csv(session):
                    rows += text_chunk.count("\r\n")
            check(rows, size + 1)  # and the header

        async def raw(_payload: Any) -> int:
            check(await raw_stream(engine), size)
            return 1  # the driver's SELECT, which sqlwatch does not see

        at = f" @ {size:,}"
        return [
            Variant("common: .all()" + at, ANTI, everything),
            Variant("kit: stream_users (ORM)" + at, KIT, stream_users),
            Variant("kit: export_users_csv" + at, KIT, export_csv),
            Variant("raw driver: cursor" + at, RAW, raw),
        ]

    results: list[Result] = []
    await _empty_user_table(engine)
    stored = 0
    try:
        for size in sorted(sizes):
            await _grow_user_table(engine, stored, size)
            stored = size
            runs = repeats if size <= STREAM_TIMED_LIMIT else 1
            measured = await measure("streaming", engine, variants(size), _nothing, runs, progress)
            everything_peak = measured[0].peak_bytes
            for result in measured:
                result.extra.update(rows=size, sizes=sorted(sizes))
                result.extra["peak_vs_all"] = result.peak_bytes / everything_peak
                result.notes = (
                    f"peak {result.peak_bytes / everything_peak:.2g}x .all()'s; "
                    f"{size / result.seconds:,.0f} rows/s"
                )
            results += measured
    finally:
        await _empty_user_table(engine)
    return results
