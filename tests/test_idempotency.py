"""Idempotency keys expire and are purged, on every backend.

A stored answer is replayed for ``ttl``; after it the key is new (the work runs
again, once, however many twins race for it); the lifespan's purge deletes
expired keys in bounded batches, so a stream of new keys keeps the table
bounded. Time is a clock the test moves (``app.state.idempotency.clock``):
nothing sleeps for hours.
"""

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.api import create_app
from asyncpatterns.api.idempotency import (
    IDEMPOTENCY_TTL,
    KeyExpiry,
    answer_once,
    delete_expired_batch,
    purge_expired_keys,
    purging_expired_keys,
)
from asyncpatterns.db import make_session_maker, run_in_transaction
from asyncpatterns.models import IdempotencyKey, Team

TTL = timedelta(minutes=30)


class Clock:
    """The app's clock, moved by the test (whole seconds: MySQL stores no fraction)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


async def count_keys(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(IdempotencyKey))).scalar_one()


@asynccontextmanager
async def served(
    database_url: URL, clock: Clock, **expiry: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app on the test database with its lifespan running (so its purge runs)."""
    app = create_app(database_url, idempotency_ttl=TTL)
    app.state.idempotency.clock = clock
    for name, value in expiry.items():
        setattr(app.state.idempotency, name, value)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


async def open_account(client: httpx.AsyncClient, owner: str, balance: str) -> int:
    response = await client.post("/accounts/", json={"owner": owner, "balance": balance})
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def balances(client: httpx.AsyncClient, *ids: int) -> list[str]:
    return [(await client.get(f"/accounts/{i}")).json()["balance"] for i in ids]


async def test_the_default_ttl_is_a_day() -> None:
    assert timedelta(hours=24) == IDEMPOTENCY_TTL
    assert KeyExpiry().ttl == IDEMPOTENCY_TTL
    app = create_app("sqlite+aiosqlite:///:memory:")
    assert app.state.idempotency.ttl == IDEMPOTENCY_TTL
    await app.state.engine.dispose()


async def test_a_live_key_replays_and_an_expired_key_is_new(database_url, engine) -> None:
    clock = Clock()
    async with served(database_url, clock) as (_, client):
        ada, bob = (
            await open_account(client, "Ada", "10.00"),
            await open_account(client, "Bob", "0"),
        )
        body = {"from_id": ada, "to_id": bob, "amount": "1.00"}
        key = {"Idempotency-Key": "expiring-key"}
        first = await client.post("/transfers/", json=body, headers=key)
        assert first.status_code == 200, first.text
        clock.advance(minutes=29, seconds=59)  # still live: the first answer, no money moved
        again = await client.post("/transfers/", json=body, headers=key)
        assert (again.status_code, again.json()) == (200, first.json())
        other = await client.post("/transfers/", json={**body, "amount": "2.00"}, headers=key)
        assert other.status_code == 422
        assert await balances(client, ada, bob) == ["9.00", "1.00"]

        clock.advance(seconds=2)  # expired: the key is new, the transfer runs again
        renewed = await client.post("/transfers/", json=body, headers=key)
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["from_account"]["balance"] == "8.00"
        assert await balances(client, ada, bob) == ["8.00", "2.00"]
        replay = await client.post("/transfers/", json=body, headers=key)  # live again
        assert replay.json() == renewed.json()

        clock.advance(minutes=31)  # an expired key may be sent with another request
        changed = await client.post("/transfers/", json={**body, "amount": "3.00"}, headers=key)
        assert changed.status_code == 200, changed.text
        assert await balances(client, ada, bob) == ["5.00", "5.00"]
        assert await count_keys(engine) == 1  # the row was taken over, not added


async def test_a_stream_of_new_keys_keeps_the_table_bounded(database_url, engine) -> None:
    """500 transfers with new keys, a minute apart, TTL 30 minutes: the lifespan's
    purge keeps the table at the keys of the last 30 minutes plus what arrived
    since it last ran; every transfer moved money once."""
    clock = Clock()
    block, requests = 50, 500
    live = TTL // timedelta(minutes=1) + 1  # created at now, now - 1 min ... now - 30 min
    sizes = []
    async with served(database_url, clock, purge_interval=0.01, purge_batch=7) as (_, client):
        ada, bob = (
            await open_account(client, "Ada", "10.00"),
            await open_account(client, "Bob", "0"),
        )
        body = {"from_id": ada, "to_id": bob, "amount": "0.01"}
        for n in range(requests):
            headers = {"Idempotency-Key": f"stream-{n}"}
            response = await client.post("/transfers/", json=body, headers=headers)
            assert response.status_code == 200, response.text
            clock.advance(minutes=1)
            if n % block == block - 1:
                sizes.append(await count_keys(engine))
                deadline = time.monotonic() + 15
                while (size := await count_keys(engine)) > live:  # the purge catches up
                    assert time.monotonic() < deadline, f"{size} keys are still stored"
                    await asyncio.sleep(0.01)
        assert await balances(client, ada, bob) == ["5.00", "5.00"]
    assert max(sizes) <= live + block, sizes
    assert await count_keys(engine) <= live


async def test_twins_retrying_an_expired_key_run_the_work_once(engine) -> None:
    """Eight requests with one expired key at once (and, every other round, a purge
    racing them for the row): the work is committed once, all get its answer."""
    session_maker = make_session_maker(engine)
    clock = Clock()
    runs = itertools.count()

    async def work(tx: AsyncSession) -> tuple[int, dict[str, Any]]:
        run = next(runs)
        tx.add(Team(name=f"run {run}"))  # what a committed run leaves behind
        await tx.flush()
        await asyncio.sleep(0.02)  # hold the claimed row while the twins arrive
        return 200, {"run": run}

    async def request(key: str) -> tuple[int, dict[str, Any]]:
        async with session_maker() as session:
            return await answer_once(session, key, "same request", work, ttl=TTL, clock=clock)

    async def purge() -> None:
        await purge_expired_keys(session_maker, ttl=TTL, clock=clock)

    for round_ in range(6):
        key = f"twins-{round_}"
        first = await request(key)
        clock.advance(minutes=31)
        racers = [request(key) for _ in range(8)]
        answers = await asyncio.gather(*racers, *([purge()] if round_ % 2 else []))
        answers = answers[:8]
        assert len({str(a) for a in answers}) == 1, (round_, answers)
        assert answers[0] != first, round_  # a new answer: the work ran again
        async with engine.connect() as conn:
            teams = (await conn.execute(select(func.count()).select_from(Team))).scalar_one()
        assert teams == 2 * (round_ + 1), f"round {round_}: the work was committed {teams} times"


async def test_the_purge_deletes_expired_keys_in_bounded_batches(engine) -> None:
    session_maker = make_session_maker(engine)
    clock = Clock()
    rows = [
        {"key": f"k{i}", "request": "r", "status_code": 200, "response": "{}", "created_at": at}
        for i, at in enumerate(
            [clock.now - TTL - timedelta(seconds=1 + i) for i in range(50)]
            + [clock.now - TTL + timedelta(seconds=1 + i) for i in range(5)]
        )
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(IdempotencyKey), rows)
    async with session_maker() as session:
        one_batch = await run_in_transaction(
            session, lambda tx: delete_expired_batch(tx, clock.now - TTL, 7)
        )
    assert one_batch == 7  # bounded: one DELETE takes at most a batch
    purged = await purge_expired_keys(session_maker, ttl=TTL, clock=clock, batch=7)
    assert purged == 43
    assert await count_keys(engine) == 5  # the live keys stay
    stop = asyncio.Event()
    stop.set()
    assert await purge_expired_keys(session_maker, ttl=timedelta(0), clock=clock, stop=stop) == 0


async def test_the_lifespan_purge_stops_at_shutdown_and_survives_errors(
    engine, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    session_maker = make_session_maker(engine)
    failing = True

    def flaky_clock() -> datetime:
        if failing:
            raise RuntimeError("a purge that failed")
        return clock()

    expiry = KeyExpiry(ttl=TTL, purge_interval=0.01, clock=flaky_clock)
    async with engine.begin() as conn:
        row = {"key": "old", "request": "r", "status_code": 200, "response": "{}"}
        await conn.execute(insert(IdempotencyKey), [{**row, "created_at": clock.now - 2 * TTL}])
    async with purging_expired_keys(session_maker, expiry) as task:
        deadline = time.monotonic() + 10
        while "a purge that failed" not in caplog.text:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert not task.done()  # it logged the failure and carries on
        failing = False
        while await count_keys(engine):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert task.done() and task.exception() is None
