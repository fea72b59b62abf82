"""Pattern vs anti-pattern vs raw driver: what the kit's patterns cost, measured.

    python -m asyncpatterns bench [--url URL] [--quick] [--json FILE] [--only SCENARIO]

Scenarios (``SCENARIOS``):

* ``bulk_insert`` -- 10,000 users: the sheet's ``create_users`` (one refresh
  per row), ``add_all`` + commit, the kit's ``crud.create_users``, the raw
  driver's ``executemany``; on PostgreSQL also the kit's ``crud.copy_users``
  and asyncpg's ``copy_records_to_table``.
* ``eager_loading`` -- 100 teams x 10 members, with ``relationships``'
  functions: N+1 lazy loads, selectinload (the kit's choice), joinedload, and
  one JOIN through the raw driver.
* ``pool_sweep`` -- 500 queries of 5 ms (``pooling.slow_query``) from 100 tasks at
  ``pool_size`` 1, 5 and 20 (``max_overflow=0``), as queries per second.
* ``transfers`` -- 500 concurrent transfers among 10 accounts: the sheet's
  read-modify-write ``transfer_funds`` against the kit's, and the money the
  sheet's version created or destroyed.

How it measures: the variants of a scenario run interleaved in one process
(one round of every variant, then the next round, in a rotating order), after
a warm-up round that is not timed but in which the statements are counted
(``sqlwatch``). Each variant's time is the median of the timed rounds (5 by
default). A benchmark is not a test: nothing here asserts a timing.

Your data is safe: ``run_bench`` works in a database of its own. On a server
it creates ``asyncpatterns_bench_<random>`` and drops it at the end (the URL's
user needs CREATE DATABASE); on SQLite it uses a scratch file in a temporary
directory beside the given file, deleted at the end. The scenario functions
themselves empty the kit's tables: give them only a throw-away database.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy
import sqlmodel
from sqlalchemy import TextClause, delete, insert, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from . import crud, relationships
from .config import ConfigurationError, mask_password, resolve_url
from .db import (
    create_db_and_tables,
    make_engine,
    make_session_maker,
    throwaway_database,
)
from .models import Account, Team, User
from .pooling import gather_bounded, slow_query
from .sqlwatch import watch_sql
from .transactions import transfer_funds

# What a variant is, for the ratios: the sheet's code, the kit's pattern,
# another way people write it, or the driver used directly (the physical limit).
ANTI, KIT, OTHER, RAW = "anti-pattern", "kit", "alternative", "raw driver"

FULL = {"users": 10_000, "teams": 100, "members": 10, "queries": 500, "transfers": 500}
QUICK = {"users": 100, "teams": 10, "members": 5, "queries": 20, "transfers": 20}
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3  # --quick is a smoke run, not a measurement


@dataclass
class Result:
    """One variant of one scenario: its median time and what it sent."""

    scenario: str
    variant: str
    kind: str
    seconds: float
    statements: int
    runs: list[float]
    vs_raw: float | None = None  # this variant's time / the raw driver's
    speedup: float | None = None  # the anti-pattern's time / this variant's
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


Run = Callable[[Any], Awaitable[int | None]]
Prepare = Callable[[], Awaitable[Any]]


@dataclass
class Variant:
    """``run(payload)`` is timed; it returns the statements it sent that
    ``sqlwatch`` cannot see (raw-driver calls), or None. ``engine`` is the one
    to watch, when it is not the scenario's."""

    name: str
    kind: str
    run: Run
    engine: AsyncEngine | None = None


async def measure(
    scenario: str,
    engine: AsyncEngine,
    variants: Sequence[Variant],
    prepare: Prepare,
    repeats: int = DEFAULT_REPEATS,
    progress: tqdm | None = None,
    after: Callable[[Variant], Awaitable[None]] | None = None,
) -> list[Result]:
    """Warm-up round (statements counted), then ``repeats`` timed rounds, interleaved.

    ``prepare()`` runs untimed before every variant's run (e.g. empty a table)
    and its return value is the run's input; ``after(variant)`` runs untimed
    after it (e.g. check an invariant).
    """
    statements: dict[str, int] = {}
    runs: dict[str, list[float]] = {v.name: [] for v in variants}
    with _clean_heap_per_run():
        for round_number in range(repeats + 1):
            shift = round_number % len(variants)  # nobody always goes first
            for variant in [*variants[shift:], *variants[:shift]]:
                payload = await prepare()
                if round_number == 0:
                    with watch_sql(variant.engine or engine) as sql:
                        unseen = await variant.run(payload)
                    statements[variant.name] = sql.count + (unseen or 0)
                else:
                    gc.collect()  # the garbage of earlier runs is not this run's cost
                    start = time.perf_counter()
                    await variant.run(payload)
                    runs[variant.name].append(time.perf_counter() - start)
                if after is not None:
                    await after(variant)
                if progress is not None:
                    progress.update()
    results = [
        Result(
            scenario,
            v.name,
            v.kind,
            statistics.median(runs[v.name]),
            statements[v.name],
            runs[v.name],
        )
        for v in variants
    ]
    return add_ratios(results)


@contextmanager
def _clean_heap_per_run() -> Iterator[None]:
    """Freeze what exists now (modules, the caller's data), so that the
    collection before each run only sweeps what the runs left behind: ORM
    objects hold reference cycles, and a collection of them that falls inside
    a later run would be charged to whichever variant happened to trigger it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def add_ratios(results: list[Result]) -> list[Result]:
    """Fill ``vs_raw`` (time / the first raw variant's) and ``speedup`` (anti / time)."""
    raw = next((r.seconds for r in results if r.kind == RAW), None)
    anti = next((r.seconds for r in results if r.kind == ANTI), None)
    for result in results:
        if raw:
            result.vs_raw = result.seconds / raw
        if anti:
            result.speedup = anti / result.seconds
    return results


# --- the sheet's code, kept as the anti-pattern (with Decimal money) ---------


async def sheet_create_users(session: AsyncSession, users: list[User]) -> list[User]:
    """The sheet's bulk create: one SELECT per user after the commit (AUDIT #2)."""
    session.add_all(users)
    await session.commit()
    for user in users:
        await session.refresh(user)
    return users


async def sheet_transfer_funds(
    session: AsyncSession, from_id: int, to_id: int, amount: Decimal
) -> None:
    """The sheet's transfer: read, check, write, no lock -- updates get lost (AUDIT #11)."""
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

    async def sheet(payload: Any) -> None:
        async with session_maker() as session:
            await sheet_create_users(session, payload[0])

    async def add_all(payload: Any) -> None:
        async with session_maker() as session:
            session.add_all(payload[0])
            await session.commit()

    async def kit(payload: Any) -> None:
        async with session_maker() as session:
            await crud.create_users(session, payload[0])

    async def kit_copy(payload: Any) -> int:
        async with session_maker() as session:
            await crud.copy_users(session, payload[0])
        return 1  # the COPY itself, which sqlwatch does not see

    variants = [
        Variant("sheet: add_all, commit, refresh each", ANTI, sheet),
        Variant("add_all + commit", OTHER, add_all),
        Variant("kit: crud.create_users", KIT, kit),
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
    for result in results:
        result.extra["users"] = users
        if "copy_users" in result.variant and copy_limit:
            result.notes = f"{result.seconds / copy_limit:.2f}x copy_records_to_table"
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


async def _reset_accounts(engine: AsyncEngine, accounts: int) -> None:
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
    """``count`` concurrent transfers: the sheet's unsafe version against the kit's."""
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

    sheet, kit = "sheet: read-modify-write, no lock", "kit: transactions.transfer_funds"
    variants = [
        Variant(sheet, ANTI, storm(sheet_transfer_funds, sheet)),
        Variant(kit, KIT, storm(transfer_funds, kit)),
    ]

    async def prepare() -> None:
        await _reset_accounts(engine, accounts)

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


# --- running it all -----------------------------------------------------------

SCENARIOS = ("bulk_insert", "eager_loading", "pool_sweep", "transfers")


@dataclass
class Report:
    backend: str
    url: str  # password masked
    quick: bool
    repeats: int
    sizes: dict[str, int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    versions: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    elapsed: dict[str, float] = field(default_factory=dict)  # wall time per scenario

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlmodel": sqlmodel.__version__,
        "cpus": str(os.cpu_count()),
    }


async def _run_scenario(
    name: str, url: URL, sizes: dict[str, int], repeats: int, progress: tqdm | None
) -> list[Result]:
    if name == "pool_sweep":
        return await pool_sweep(
            url,
            queries=sizes["queries"],
            tasks=min(100, sizes["queries"] // 2),
            repeats=repeats,
            progress=progress,
        )
    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
        if name == "bulk_insert":
            return await bulk_insert(engine, sizes["users"], repeats, progress)
        if name == "eager_loading":
            return await eager_loading(engine, sizes["teams"], sizes["members"], repeats, progress)
        return await transfers(engine, sizes["transfers"], repeats=repeats, progress=progress)
    finally:
        await engine.dispose()


async def run_bench(
    url: str | URL | None = None,
    quick: bool = False,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    progress: bool = False,
) -> Report:
    """Run the scenarios in a scratch database next to ``url`` and report.

    ``repeats`` timed runs per variant: 5 by default, 3 with ``quick``.
    """
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if repeats < 1:
        raise ConfigurationError(f"repeats must be at least 1, not {repeats}")
    resolved = resolve_url(url)
    backend = resolved.get_backend_name()
    sizes = dict(QUICK if quick else FULL)
    report = Report(
        backend,
        mask_password(resolved),
        quick,
        repeats,
        sizes,
        os.getloadavg(),
        versions=_versions(),
    )
    steps = [s for s in SCENARIOS if not only or s in only]
    with tqdm(
        total=sum(_rounds(n, backend, repeats) for n in steps),
        disable=not progress,
        unit="run",
        leave=False,
    ) as bar:
        async with throwaway_database(resolved, "asyncpatterns_bench") as scratch:
            for name in steps:
                bar.set_description(name)
                start = time.perf_counter()
                report.results += await _run_scenario(name, scratch, sizes, repeats, bar)
                report.elapsed[name] = round(time.perf_counter() - start, 2)
    report.load_after = os.getloadavg()
    return report


def _rounds(scenario: str, backend: str, repeats: int) -> int:
    variants = {
        "bulk_insert": 6 if backend == "postgresql" else 4,
        "eager_loading": 4,
        "pool_sweep": 3,
        "transfers": 2,
    }[scenario]
    return variants * (repeats + 1)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:,.2f}x" if value < 100 else f"{value:,.0f}x"


def format_report(report: Report) -> str:
    """The report as a plain-text table, one block per scenario."""
    lines = [
        f"asyncpatterns bench on {report.url} ({report.backend}"
        f"{', quick' if report.quick else ''}): median of {report.repeats} runs "
        f"after a warm-up, variants interleaved",
        f"load average before {_load(report.load_before)}, after {_load(report.load_after)}",
    ]
    header = f"  {'variant':<38} {'median s':>9} {'stmts':>6} {'/ raw':>8} {'speed-up':>9}  notes"
    for scenario in SCENARIOS:
        rows = [r for r in report.results if r.scenario == scenario]
        if rows:
            took = f"{report.elapsed[scenario]:.1f} s in all" if scenario in report.elapsed else ""
            lines += ["", f"== {scenario} {_size(rows[0])} {took}".rstrip(), header]
        for r in rows:
            lines.append(
                f"  {r.variant:<38} {r.seconds:>9.4f} {r.statements:>6} {_ratio(r.vs_raw):>8} "
                f"{_ratio(r.speedup):>9}  {r.notes}".rstrip()
            )
    lines += [
        "",
        "/ raw: time divided by the raw driver's (1.00x is the physical limit); "
        "speed-up: the anti-pattern's time divided by this one's.",
        "stmts: statements sent (sqlwatch), plus the driver calls it cannot see for "
        "raw-driver and COPY variants.",
    ]
    return "\n".join(lines)


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _size(result: Result) -> str:
    extra = result.extra
    if "users" in extra:
        return f"({extra['users']:,} users)"
    if "teams" in extra:
        return f"({extra['teams']} teams x {extra['members']} members)"
    if "queries" in extra:
        return f"({extra['queries']} queries of 5 ms from {extra['tasks']} tasks)"
    return f"({extra['transfers']} concurrent transfers among {extra['accounts']} accounts)"


def bench_command(
    url: str | None,
    quick: bool = False,
    json_file: str | None = None,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
) -> int:
    """``python -m asyncpatterns bench``: run, print the table, optionally write JSON."""
    progress = not quick and sys.stderr.isatty()
    report = asyncio.run(run_bench(url, quick, only, repeats, progress))
    print(format_report(report))
    if json_file:
        Path(json_file).write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
        print(f"\nJSON written to {json_file}")
    return 0


def summary(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One plain record per variant, for a DataFrame."""
    return [
        {
            "variant": r.variant,
            "kind": r.kind,
            "median_s": round(r.seconds, 4),
            "statements": r.statements,
            "vs_raw": None if r.vs_raw is None else round(r.vs_raw, 2),
            "speedup": None if r.speedup is None else round(r.speedup, 1),
        }
        for r in results
    ]


KIND_COLOURS = {ANTI: "tab:red", OTHER: "tab:gray", KIT: "tab:green", RAW: "tab:blue"}


def plot_results(results: Sequence[Result], title: str = "") -> Any:
    """A horizontal bar per variant (log scale), coloured by kind; needs matplotlib."""
    import matplotlib.pyplot as plt  # the lab/test extra, not needed to run bench

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(results) + 1))
    ax.barh(
        [r.variant for r in results],
        [r.seconds for r in results],
        color=[KIND_COLOURS[r.kind] for r in results],
    )
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("median seconds (log scale)")
    ax.set_title(title or results[0].scenario)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, KIND_COLOURS, loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
