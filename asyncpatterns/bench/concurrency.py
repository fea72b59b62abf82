"""The concurrency scenarios: ``pool_sweep`` and ``transfers``, many tasks at once.

* ``pool_sweep`` -- 500 queries of 5 ms from 100 tasks at ``pool_size`` 1, 5
  and 20 (``max_overflow=0``), as queries per second.
* ``transfers`` -- 500 concurrent transfers among 10 accounts: the common
  read-modify-write ``transfer_funds`` against the kit's, and the money the
  common version created or destroyed.

``transfers`` empties the account table: give it only a throw-away database.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy
from sqlalchemy import TextClause, delete
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from tqdm import tqdm

from ..db import make_engine, make_session_maker
from ..faults import slow_query
from ..models import Account
from ..pooling import gather_bounded
from ..transactions import transfer_funds
from .measure import ANTI, DEFAULT_REPEATS, KIT, OTHER, Result, Run, Variant, measure
from .scenarios import FULL, _nothing

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


# --- the common pattern's code, kept as the anti-pattern (with Decimal money) ---


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
