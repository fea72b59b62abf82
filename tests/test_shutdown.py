"""Graceful shutdown: SIGTERM under load loses no request and no write.

``python -m asyncpatterns serve`` runs as in production (migrations, then
uvicorn, one worker or two) on a throw-away database, clients keep writing
(``POST /users/`` on keep-alive connections) and one transfer waits on a row
lock the test holds; SIGTERM goes to the main process, as ``docker stop`` or
Kubernetes sends it, mid-load. Then:

* every request that was answered got 2xx or 503, never a 500;
* the transfer that was in flight at the signal finished (200, money moved once);
* every write answered 2xx is in the database, and a request that got no
  answer (refused: the server had stopped listening; or its keep-alive
  connection closed before it was read) was never run: no write happened that
  its client was not told about;
* the process exits with 0 within a few seconds, after its lifespan ran
  (engine disposed), and the server shows no connection left from it.
"""

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from served_load import Client, Traffic, clients, row_lock, scratch_database, served_command
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlmodel import select

from asyncpatterns.api.shutdown import (
    SHUTTING_DOWN,
    UVICORN_GRACE_EXCEEDED,
    CancelledAs503,
    wait_for_requests,
)
from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import make_engine
from asyncpatterns.models import Account, User
from asyncpatterns.testing import SERVER_URL_VARIABLES, required_backends

CLIENTS = 16
EXIT_WITHIN = 10.0  # seconds from the last answer to the process's exit
# What a client may see instead of an answer once the server shuts down: the
# listener is closed (refused), or its idle keep-alive connection was closed.
NOT_STARTED = ("ConnectError", "RemoteProtocolError", "ReadError")


@pytest.fixture
async def empty_database(backend: str) -> AsyncIterator[URL]:
    """An empty throw-away database (``serve`` migrates it), dropped afterwards."""
    base = "sqlite" if backend == "sqlite" else os.environ[SERVER_URL_VARIABLES[backend]]
    try:
        async with scratch_database(base) as url:
            yield url
    except DatabaseUnavailableError as exc:
        if backend in required_backends():
            pytest.fail(f"{backend} is required but unreachable: {exc}")
        pytest.skip(f"{backend} unreachable: {exc}")


async def server_connections(backend: str, database: str) -> int:
    """How many connections the server has to ``database`` (0 on SQLite)."""
    if backend == "sqlite":
        return 0
    query = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE datname = :db",
        "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = :db",
    }[backend]
    if os.environ.get("DATABASE_POOLER"):  # PgBouncer keeps its idle server connections:
        query += " AND state <> 'idle'"  # none may be left in a statement or a transaction
    admin = make_engine(os.environ[SERVER_URL_VARIABLES[backend]], isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            return (await conn.execute(text(query), {"db": database})).scalar_one()
    finally:
        await admin.dispose()


async def keep_writing(client: Client, until: float) -> None:
    """POST new users until the server stops answering (or ``until``)."""
    for n in range(10**6):
        if time.monotonic() > until:
            return
        body = {"name": "Shutdown", "email": f"c{client.index}-{n}@example.com"}
        answer = await client.call("POST", "/users/", json=body)
        if answer.error:
            return
        if answer.status == 503:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_finishes_in_flight_requests_and_loses_no_write(
    backend: str, empty_database: URL, tmp_path: Path, workers: int
) -> None:
    log_path = tmp_path / "serve.log"
    traffic = Traffic()
    async with served_command(empty_database, log_path, "--workers", str(workers)) as app:
        async with clients(traffic, app.base_url, CLIENTS + 1) as (payer, *writers):
            opened = [
                await payer.call("POST", "/accounts/", json={"owner": o, "balance": "10.00"})
                for o in ("Ada", "Bob")
            ]
            assert [a.status for a in opened] == [201, 201], [a.short() for a in opened]
            ada, bob = (a.body["id"] for a in opened)
            load = [asyncio.create_task(keep_writing(c, time.monotonic() + 60)) for c in writers]
            await asyncio.sleep(1.0)  # the load is running
            if backend != "sqlite":  # the count below sees the app's connections
                assert await server_connections(backend, empty_database.database or "") > 0
            async with row_lock(empty_database, ada):  # SQLite: every write waits now
                body = {"from_id": ada, "to_id": bob, "amount": "1.00"}
                transfer = asyncio.create_task(
                    payer.call("POST", "/transfers/", json=body, key="in-flight")
                )
                await asyncio.sleep(0.5)  # the transfer waits for the lock
                assert not transfer.done(), (await transfer).short()
                signalled = time.perf_counter()
                app.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)  # shutting down, with requests in flight
            moved = await transfer
            await asyncio.gather(*load)
        last_answer = time.monotonic()
        async with asyncio.timeout(EXIT_WITHIN):
            code = await app.process.wait()
        exited_after = time.monotonic() - last_answer
    log = app.log()

    problems = []
    if code != 0:
        problems.append(f"exit code {code}, not 0")
    answered = [a for a in traffic.answers if a.status is not None]
    problems += [f"answered {a.short()}" for a in answered if a.status not in (200, 201, 503)]
    if moved.status != 200:
        problems.append(f"the transfer in flight at SIGTERM: {moved.short()}")
    unanswered = [a for a in traffic.answers if a.error]
    problems += [
        f"not an unstarted request: {a.short()}"
        for a in unanswered
        if not (a.error.startswith(NOT_STARTED))
    ]
    shutdowns = log.count("Application shutdown complete")
    if shutdowns != workers:
        problems.append(f"{shutdowns} lifespan shutdowns in the log, not {workers}")
    problems += [f"logged: {line}" for line in log.splitlines() if "Traceback" in line]

    # The database: what the clients were told, and nothing else.
    deadline = time.monotonic() + 5
    while (left := await server_connections(backend, empty_database.database or "")) > 0:
        if time.monotonic() > deadline:
            problems.append(f"{left} connections to the database left after the exit")
            break
        await asyncio.sleep(0.1)
    engine = make_engine(empty_database)
    try:
        async with engine.connect() as conn:
            stored = set((await conn.execute(select(User.email))).scalars())
            money = dict((await conn.execute(select(Account.id, Account.balance))).all())
    finally:
        await engine.dispose()
    created = {a.sent["email"] for a in answered if a.route == "POST /users/" and a.status == 201}
    unstarted = {a.sent["email"] for a in unanswered if a.route == "POST /users/"}
    if lost := created - stored:
        problems.append(f"{len(lost)} users answered 201 are not stored: {sorted(lost)[:3]}")
    if ran := stored & unstarted:
        problems.append(f"{len(ran)} users stored whose request got no answer: {sorted(ran)[:3]}")
    if money != {ada: Decimal("9.00"), bob: Decimal("11.00")}:
        problems.append(f"balances {money}")
    after_signal = [a for a in answered if a.ended > signalled]
    if not after_signal:
        problems.append("no request was answered after SIGTERM: nothing was in flight")
    if problems:
        tail = "\n".join(log.splitlines()[-30:])
        pytest.fail("\n".join(problems) + f"\n-- serve's log, last lines:\n{tail}", pytrace=False)
    kinds = Counter(a.error.split(":")[0] for a in unanswered if a.error)
    print(
        f"{backend}, {workers} worker(s): {len(created)} users created, "
        f"{len(after_signal)} answered after SIGTERM, not started: {dict(kinds)}; "
        f"exit {code} {exited_after:.1f} s after the last answer"
    )


async def test_a_request_slower_than_the_grace_period_is_a_503_and_rolled_back(
    backend: str, empty_database: URL, tmp_path: Path
) -> None:
    """``--graceful-timeout 1``: a transfer still waiting for a lock a second after
    SIGTERM is cancelled by uvicorn. Its client gets a 503 (uvicorn's own answer
    to a cancelled request is a 500), the transfer is rolled back, and the process
    still exits with 0, soon."""
    log_path = tmp_path / "serve.log"
    traffic = Traffic()
    options = ("--graceful-timeout", "1")
    async with (
        served_command(empty_database, log_path, *options) as app,
        clients(traffic, app.base_url, 1) as (payer,),
    ):
        opened = [
            await payer.call("POST", "/accounts/", json={"owner": o, "balance": "10.00"})
            for o in ("Ada", "Bob")
        ]
        ada, bob = (a.body["id"] for a in opened)
        async with row_lock(empty_database, ada):
            body = {"from_id": ada, "to_id": bob, "amount": "1.00"}
            transfer = asyncio.create_task(payer.call("POST", "/transfers/", json=body))
            await asyncio.sleep(0.5)  # the transfer waits for the lock
            signalled = time.monotonic()
            app.process.send_signal(signal.SIGTERM)
            cut = await transfer  # cut off after the grace period, the lock still held
            await asyncio.sleep(0.5)
        async with asyncio.timeout(EXIT_WITHIN):
            code = await app.process.wait()
        exited_after = time.monotonic() - signalled
    log = app.log()
    engine = make_engine(empty_database)
    try:
        async with engine.connect() as conn:
            money = dict((await conn.execute(select(Account.id, Account.balance))).all())
    finally:
        await engine.dispose()
    tail = "\n".join(log.splitlines()[-30:])
    assert (cut.status, cut.detail) == (503, SHUTTING_DOWN), (cut.short(), tail)
    assert cut.retry_after == "1"
    assert money == {ada: Decimal("10.00"), bob: Decimal("10.00")}, tail
    assert code == 0, tail
    assert "timeout graceful shutdown exceeded" in log, tail
    assert "Application shutdown complete" in log and "Traceback" not in log, tail
    print(f"{backend}: {cut.short()}; exit {code} {exited_after:.1f} s after SIGTERM")


# -- CancelledAs503 in-process: uvicorn's cancel is answered; a caller's goes on ---------


async def never_answers(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(3600)


async def test_a_request_cancelled_by_the_servers_shutdown_is_a_503_and_ends() -> None:
    in_flight: set[asyncio.Task[Any]] = set()
    app = CancelledAs503(never_answers, in_flight)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/transfers/", "headers": []}
    request = asyncio.create_task(app(scope, None, send))
    await asyncio.sleep(0.01)
    assert in_flight == {request}
    request.cancel(msg=f"Task cancelled, {UVICORN_GRACE_EXCEEDED}")  # what uvicorn sends
    await wait_for_requests(in_flight, patience=5)
    assert request.done() and not request.cancelled()  # ended, answered: no traceback
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert SHUTTING_DOWN.encode() in sent[1]["body"]
    assert not in_flight


async def test_a_callers_timeout_around_an_in_process_request_is_not_swallowed() -> None:
    app = CancelledAs503(never_answers)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/users/", "headers": []}
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await app(scope, None, send)
    assert sent[0]["status"] == 503  # answered all the same (no 500), then cancelled
