"""Several workers, one server: pool sizes derived from a connection budget.

A PostgreSQL cluster of this module's own (``clusters.py``) with
``max_connections=12`` and 2 of them reserved for superusers: the app's role
(not a superuser, as in production) may hold 10. Four workers with the
default pools (5 + 10 each, and the served app has two pools) open far more
under load, and PostgreSQL refuses the rest with SQLSTATE 53300 ("remaining
connection slots are reserved for non-replication superuser connections"; a
superuser gets them too, then "sorry, too many clients already"). With
``pool_settings_for_workers(10, 4)`` the same load meets no refusal: requests
wait for a pooled connection instead.

First four engines in this process (a worker each), then the real thing:
``python -m asyncpatterns serve --workers 4`` with and without
``--connection-budget 10``, under concurrent HTTP load; a refusal is a 503
with Retry-After, never a 500.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from clusters import Cluster, postgres_cluster
from sqlalchemy import text
from sqlalchemy.engine import URL

from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import make_engine
from asyncpatterns.pooling import pool_capacity, pool_settings_for_workers

MAX_CONNECTIONS, RESERVED = 12, 2
BUDGET, WORKERS = MAX_CONNECTIONS - RESERVED, 4
# What PostgreSQL answers (SQLSTATE 53300) a connection past max_connections, and a
# non-superuser's past max_connections - superuser_reserved_connections. The app's
# role meets both: a refused backend holds its slot until it has said so.
TOO_MANY = "sorry, too many clients already"
RESERVED_ONLY = "remaining connection slots are reserved for non-replication superuser connections"
REFUSED = re.compile(f"{TOO_MANY}|{RESERVED_ONLY}")


def test_pool_settings_divide_the_budget() -> None:
    assert pool_settings_for_workers(10, 4) == {"pool_size": 2, "max_overflow": 0}
    assert pool_settings_for_workers(10, 4, pools_per_worker=2) == {
        "pool_size": 1,
        "max_overflow": 0,
    }
    assert pool_settings_for_workers(100, 4, overflow_share=0.5) == {
        "pool_size": 13,
        "max_overflow": 12,
    }
    for budget in range(1, 60):
        for workers in range(1, budget + 1):
            for pools in (1, 2):
                if budget < workers * pools:
                    continue
                pool = pool_settings_for_workers(
                    budget, workers, pools_per_worker=pools, overflow_share=0.3
                )
                assert pool["pool_size"] >= 1 and pool["max_overflow"] >= 0
                assert workers * pools * (pool["pool_size"] + pool["max_overflow"]) <= budget


@pytest.mark.parametrize(
    ("budget", "workers", "pools"), [(3, 4, 1), (7, 4, 2), (0, 1, 1), (-5, 2, 1)]
)
def test_a_budget_below_one_connection_per_pool_is_refused(budget, workers, pools) -> None:
    with pytest.raises(ValueError, match=f"a budget of {budget} connections is less than one"):
        pool_settings_for_workers(budget, workers, pools_per_worker=pools)


def test_nonsense_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        pool_settings_for_workers(10, 0)
    with pytest.raises(ValueError, match="overflow_share"):
        pool_settings_for_workers(10, 2, overflow_share=1.0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    settings = {"max_connections": MAX_CONNECTIONS, "superuser_reserved_connections": RESERVED}
    with postgres_cluster(settings) as cluster:
        cluster.psql("CREATE ROLE app LOGIN")
        cluster.psql("CREATE DATABASE budget OWNER app")
        yield cluster


def budget_url(cluster: Cluster, user: str = "app") -> URL:
    return cluster.url(user=user).set(database="budget")


async def burst(url: URL, pool: dict[str, int] | None) -> list[BaseException]:
    """Four engines (workers), each running 15 queries at once; the errors they met."""
    engines = [make_engine(url, **(pool or {})) for _ in range(WORKERS)]

    async def query(engine) -> BaseException | None:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.05)"))
        except DatabaseUnavailableError as exc:
            return exc
        return None

    try:
        if pool is not None:
            assert sum(pool_capacity(engine) for engine in engines) <= BUDGET
        results = await asyncio.gather(*(query(e) for e in engines for _ in range(15)))
    finally:
        for engine in engines:
            await engine.dispose()
    return [error for error in results if error is not None]


@pytest.mark.parametrize("user", ["app", "postgres"])
async def test_workers_with_the_default_pools_exceed_max_connections(
    cluster: Cluster, user: str
) -> None:
    errors = await burst(budget_url(cluster, user), pool=None)
    assert errors, "4 x 15 connections at once fitted in max_connections=12?"
    codes = {getattr(error.__cause__, "sqlstate", None) for error in errors}
    assert codes == {"53300"}, errors[:3]
    expected = REFUSED if user == "app" else re.compile(TOO_MANY)
    assert all(expected.search(str(error)) for error in errors), {str(e) for e in errors}


async def test_workers_sized_by_the_budget_stay_within_it(cluster: Cluster) -> None:
    pool = pool_settings_for_workers(BUDGET, WORKERS)
    assert pool == {"pool_size": 2, "max_overflow": 0}
    assert await burst(budget_url(cluster), pool) == []


# -- Served: python -m asyncpatterns serve --workers 4 -------------------------------------


def serve(url: URL, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCPATTERNS_")}
    command = [sys.executable, "-m", "asyncpatterns", "serve", "--port", str(port)]
    command += ["--url", url.render_as_string(hide_password=False), "--workers", str(WORKERS)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def stop(process: subprocess.Popen) -> None:
    """uvicorn's manager stops its workers on SIGINT; the group is killed if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def wait_ready(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited at start:\n{read(log)}")
            try:
                if (await client.get("/users/", params={"limit": 1})).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not answer in time:\n{read(log)}")
            await asyncio.sleep(0.1)


async def load(base_url: str, clients: int = 64, rounds: int = 1) -> list[httpx.Response]:
    """``clients`` concurrent clients (a keep-alive connection each), each reading a list,
    creating a user and reading it back, ``rounds`` times: 16 requests at once per worker,
    more than the budget's one connection per pool, fewer than the default pools'."""
    answers: list[httpx.Response] = []

    async def client_run(client: httpx.AsyncClient) -> None:
        for _ in range(rounds):
            answers.append(await client.get("/users/", params={"limit": 5}))
            email = f"{uuid.uuid4().hex[:12]}@example.com"
            created = await client.post("/users/", json={"name": "Load", "email": email})
            answers.append(created)
            if created.status_code == 201:
                answers.append(await client.get(f"/users/{created.json()['id']}"))

    limits = httpx.Limits(max_connections=1)
    async with asyncio.TaskGroup() as group:
        pool = [
            httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) for _ in range(clients)
        ]
        for client in pool:
            group.create_task(client_run(client))
    for client in pool:
        await client.aclose()
    return answers


@pytest.mark.parametrize("budget", [None, BUDGET], ids=["no budget", "budget 10"])
async def test_served_workers(cluster: Cluster, tmp_path: Path, budget: int | None) -> None:
    log = tmp_path / "serve.log"
    extra = [] if budget is None else ["--connection-budget", str(budget)]
    process, base_url = serve(budget_url(cluster), log, *extra)
    try:
        await wait_ready(base_url, process, log)
        answers = await load(base_url)
    finally:
        stop(process)
    output = read(log)
    statuses = Counter(answer.status_code for answer in answers)
    assert not {s for s in statuses if s >= 500} - {503}, (statuses, output[-3000:])
    unavailable = [answer for answer in answers if answer.status_code == 503]
    assert all(answer.headers.get("retry-after") for answer in unavailable)
    if budget is None:
        assert unavailable, f"no refusal without a budget: {statuses}"
        assert REFUSED.search(output), output[-3000:]
    else:
        assert "pool_size 1 + max_overflow 0" in output, output[:2000]
        assert statuses.keys() <= {200, 201}, (statuses, output[-3000:])
        assert not REFUSED.search(output)


def test_serve_shares_a_budget_exported_by_hand(tmp_path: Path, monkeypatch) -> None:
    """serve told the workers their count only with --connection-budget: a budget set
    in the environment (as migrated_app documents) went whole to every worker."""
    import uvicorn

    from asyncpatterns import cli
    from asyncpatterns.api.app import budget_pool_options

    seen: dict[str, object] = {}

    def probe(*_args: object, workers: int = 1, **_kwargs: object) -> None:
        seen.update(workers=workers, pools=budget_pool_options())  # what each worker gets

    monkeypatch.setattr(uvicorn, "run", probe)
    for variable in ("ASYNCPATTERNS_CONNECTION_BUDGET", "ASYNCPATTERNS_WORKERS", "DATABASE_URL"):
        monkeypatch.setenv(variable, "")  # restored afterwards: serve sets them
    monkeypatch.setenv("ASYNCPATTERNS_CONNECTION_BUDGET", "8")
    assert cli.serve(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", "127.0.0.1", 0, 2) == 0
    pools = seen["pools"]
    assert seen["workers"] == 2
    assert 2 * 2 * (pools["pool_size"] + pools["max_overflow"]) <= 8
