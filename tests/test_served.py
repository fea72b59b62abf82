"""The app served for real: uvicorn in a process of its own, HTTP clients over
TCP on keep-alive connections (``served_load``). Overload is a 503 with
Retry-After on every path, quickly, never a 500 nor a dropped connection:

* a pool held by requests queued on a locked row: the next requests 503 after
  the pool wait, and the pool serves again when the row is free;
* a database server stopped while the app runs (a PostgreSQL cluster and a
  MariaDB instance of the test's own): 503s at once, then 200s from the same
  app process once the server is started again;
* the app's connections killed mid-request on the shared servers: 503s;
* a mixed load with races on every backend, after which the database holds
  exactly what the answers promised.

Every client keeps one keep-alive connection for the whole test, error
answers included: a client that had to reconnect, or saw a reset, fails it.
One such drop had a cause of its own, reproduced deterministically below: a
connection lost just as the request's session closed, after the answer.

Server tests run when their server is named (``ASYNCPATTERNS_POSTGRES_URL``,
``ASYNCPATTERNS_MYSQL_URL``), as in the rest of the suite. The stopped-server
tests start servers of their own and need the server programs (Debian:
``postgresql``, ``mariadb-server``) and, run as root, the ``postgres`` and
``mysql`` users to run them as. Missing, they fail with what to install:
they are not skipped.
"""

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from served_load import (
    ALLOWED,
    WITHOUT_NEW_ACCOUNTS,
    Answer,
    Client,
    Traffic,
    World,
    check_invariants,
    clients,
    dropped_connections,
    mixed_load_run,
    open_accounts,
    run_load,
    served_app,
    stored_rows,
)
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from asyncpatterns import pooling
from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import make_engine, throwaway_database
from asyncpatterns.testing import SERVER_URL_VARIABLES, required_backends

SERVERS = ["postgresql", "mysql"]
on_servers = pytest.mark.parametrize("backend", SERVERS, indirect=True)

# The mixed load in CI: clients and seconds per backend (longer runs: served_load.py).
CI_CLIENTS = 50
CI_SECONDS = 4.0
POOL_WAIT = 1.0  # the pool_timeout of the apps that exhaust their pool
BUSY = "Database unavailable: too many requests at once, no connection free"
LOST = "Database unavailable: the connection to the database was lost"
CANNOT_CONNECT = "Database unavailable: cannot connect to the database"


@pytest.fixture
async def scratch_url(backend: str, tmp_path: Path) -> AsyncIterator[URL]:
    """An empty database of this test's own (the app's lifespan makes the tables)."""
    if backend == "sqlite":
        yield make_url(f"sqlite+aiosqlite:///{tmp_path / 'served.db'}")
        return
    manager = throwaway_database(os.environ[SERVER_URL_VARIABLES[backend]], "asyncpatterns_served")
    try:
        url = await manager.__aenter__()
    except DatabaseUnavailableError as exc:
        if backend in required_backends():
            pytest.fail(f"{backend} is required but unreachable: {exc}")
        pytest.skip(f"{backend} unreachable: {exc}")
    try:
        yield url
    finally:
        await manager.__aexit__(None, None, None)


DROPPED_AFTER_ANSWER = (
    "a database connection lost after the endpoint answered escaped api.get_session "
    "after the response was sent, and the server closed the keep-alive connection"
)


def fail_with_log(problems: list[str], log: str) -> None:
    if problems:
        tail = "\n".join(log.splitlines()[-40:])
        pytest.fail("\n".join(problems) + f"\n-- app log, last lines:\n{tail}", pytrace=False)


def judge(
    traffic: Traffic, log: str, problems: list[str], allowed: dict[str, set[int]] | None = ALLOWED
) -> None:
    """Fail on any problem: wrong answers, resets, errors that escaped the app."""
    known, escaped = dropped_connections(log)
    problems = traffic.problems(allowed, known) + problems
    problems += [f"an error escaped the app: {line}" for line in escaped]
    if known:
        problems.append(f"{known} connections dropped: {DROPPED_AFTER_ANSWER}")
    fail_with_log(problems, log)


def seconds_of(answers: list[Answer]) -> str:
    times = [a.seconds for a in answers]
    if not times:
        return "-"
    return f"{min(times):.2f}-{max(times):.2f} s (median {statistics.median(times):.2f} s)"


# -- The database seen from the test: row locks, the app's connections ----------------------


@asynccontextmanager
async def row_lock(url: URL, account_id: int) -> AsyncIterator[int | None]:
    """Hold the account's row lock (SQLite: the write lock) until the block ends;
    yields the server's id for the holding connection (None on SQLite)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.begin()
            lock = text("UPDATE account SET owner = owner WHERE id = :id")
            await conn.execute(lock, {"id": account_id})
            holder = None
            if engine.dialect.name != "sqlite":
                holder = await pooling.server_connection_id(conn)
            try:
                yield holder
            finally:
                await conn.rollback()
    finally:
        await engine.dispose()


class Watcher:
    """An admin connection to the shared server: it sees and kills the app's connections."""

    def __init__(self, engine: AsyncEngine, database: str) -> None:
        self.engine, self.database = engine, database
        self.postgres = engine.dialect.name == "postgresql"

    async def _ids(self, conn: AsyncConnection, waiting: bool) -> list[int]:
        if self.postgres:
            query = "SELECT pid FROM pg_stat_activity WHERE datname = :db"
            query += " AND wait_event_type = 'Lock'" if waiting else ""
        elif waiting:  # (INNODB_TRX is a cache, stale when polled often)
            query = (
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db "
                "AND COMMAND = 'Query' AND INFO LIKE 'UPDATE account%'"
            )
        else:
            query = "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db"
        return list((await conn.execute(text(query), {"db": self.database})).scalars())

    async def lock_waiters(self, count: int, patience: float = 10.0) -> list[int]:
        """The ids of the ``count`` connections waiting for a row lock, once they all wait."""
        deadline = time.monotonic() + patience
        async with self.engine.connect() as conn:
            while len(found := await self._ids(conn, waiting=True)) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(found)} requests wait for the lock, not {count}")
                await asyncio.sleep(0.02)
        return found

    async def kill_app_connections(self, keep: set[int]) -> int:
        """Kill every connection to the test database but ``keep``; returns how many."""
        async with self.engine.connect() as conn:
            ids = [i for i in await self._ids(conn, waiting=False) if i not in keep]
            if self.postgres and ids:
                kill = "SELECT pg_terminate_backend(pid) FROM unnest(CAST(:ids AS integer[])) pid"
                await conn.execute(text(kill), {"ids": ids})
            for connection_id in [] if self.postgres else ids:
                with contextlib.suppress(DBAPIError):  # it closed by itself in between
                    await conn.execute(text(f"KILL CONNECTION {int(connection_id)}"))
        return len(ids)


@asynccontextmanager
async def watcher(backend: str, database: str) -> AsyncIterator[Watcher]:
    engine = make_engine(os.environ[SERVER_URL_VARIABLES[backend]], isolation_level="AUTOCOMMIT")
    try:
        yield Watcher(engine, database)
    finally:
        await engine.dispose()


# -- (a) Every pooled connection held: the next requests are quick 503s ---------------------


async def test_an_exhausted_pool_is_a_quick_503_then_serves_again(
    backend: str, scratch_url: URL, tmp_path: Path
) -> None:
    traffic = Traffic()
    sizing = make_engine(scratch_url)  # the app's pool, as make_engine sizes it (opens nothing)
    capacity = pooling.pool_capacity(sizing)
    await sizing.dispose()
    assert capacity
    log = tmp_path / "app.log"
    async with (
        served_app(scratch_url, log, pool_timeout=POOL_WAIT, lock_timeout=20) as app,
        clients(traffic, app.base_url, capacity + 9) as made,
    ):
        world = World.for_clients(1)
        await open_accounts(made[0], world, 2, "100.00")
        a, b = world.accounts
        body = {"from_id": a, "to_id": b, "amount": "1.00"}
        async with row_lock(scratch_url, a):
            # One transfer per pooled connection, each waiting for the row.
            holders = [
                asyncio.create_task(c.call("POST", "/transfers/", json=body))
                for c in made[:capacity]
            ]
            if backend == "sqlite":  # no server to ask: probe until a request waits it out
                await _until_the_pool_is_full(made[-1])
            else:
                async with watcher(backend, scratch_url.database) as watch:
                    await watch.lock_waiters(capacity)
            extra = made[capacity:]
            others = await asyncio.gather(
                *(
                    c.call("POST", "/transfers/", json={**body, "from_id": b, "to_id": a})
                    for c in extra[:5]
                ),
                extra[5].call("GET", "/teams/"),
            )
            # Reads of one statement have a pool of their own: still served.
            reads = await asyncio.gather(
                extra[6].call("GET", "/users/"),
                extra[7].call("GET", f"/accounts/{b}", "/accounts/{id}"),
            )
            still_waiting = sum(not task.done() for task in holders)
        answered = await asyncio.gather(*holders)
        again = await asyncio.gather(
            *(c.call("GET", f"/accounts/{a}", "/accounts/{id}") for c in made)
        )
    print(
        f"\n{backend}: pool of {capacity} held; 6 more requests: "
        f"{[x.status for x in others]} in {seconds_of(others)}; 2 reads: "
        f"{[x.status for x in reads]} in {seconds_of(reads)}; the {capacity} queued transfers "
        f"then answered {sorted({x.status for x in answered})}"
    )
    problems = []
    for answer in others:
        if (answer.status, answer.detail, answer.retry_after) != (503, BUSY, "1"):
            problems.append(f"not a pool 503: {answer.short()}")
        if not POOL_WAIT - 0.05 <= answer.seconds <= POOL_WAIT + 1.5:
            problems.append(f"not answered after the pool wait ({POOL_WAIT} s): {answer.short()}")
    problems += [
        f"read not served beside the held pool: {x.short()}" for x in reads if x.status != 200
    ]
    if still_waiting != capacity:
        problems.append(f"only {still_waiting} of {capacity} transfers still queued on the row")
    problems += [f"queued transfer: {x.short()}" for x in answered if x.status != 200]
    problems += [f"after: {x.short()}" for x in again if x.status != 200]
    stored = await stored_rows(scratch_url)
    expected = {a: Decimal("100.00") - capacity, b: Decimal("100.00") + capacity}
    if stored["accounts"] != expected:
        problems.append(f"balances {stored['accounts']}, expected {expected}")
    judge(traffic, log.read_text(), problems, allowed=None)


async def _until_the_pool_is_full(probe: Client, patience: float = 15.0) -> None:
    deadline = time.monotonic() + patience
    while (answer := await probe.call("GET", "/teams/")).status != 503:  # on the write pool
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool never filled up: {answer.short()}")


# -- (b) The database server stopped, then started again --------------------------------


def _service_user(name: str) -> dict[str, str]:
    """Run as ``name`` when root (the servers refuse root), as ourselves otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(name)
    except KeyError:
        pytest.fail(f"run as root, this test runs the server as user {name!r}, which is missing")
    return {"user": name, "group": name}


def _program(name: str, package: str, folder: str | None = None) -> str:
    path = shutil.which(name, path=folder) if folder else shutil.which(name)
    path = path or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail(
            f"this test starts and stops a database server of its own and needs {name} "
            f"(Debian: apt-get install {package}); not found"
        )
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _run(*command: str, user: dict[str, str], cwd: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        **user,
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"{Path(command[0]).name} failed:\n{output.decode(errors='replace')}")


class PrivateServer:
    """A database server of the test's own, in a temporary folder, on a free port."""

    database = "asyncpatterns_served"

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.log = folder / "server.log"

    @property
    def admin_url(self) -> URL:
        raise NotImplementedError

    @property
    def url(self) -> URL:
        return self.admin_url.set(database=self.database)

    async def create(self) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def remove(self) -> None: ...

    async def wait_until_up(self, patience: float = 60.0) -> None:
        engine = make_engine(self.admin_url, poolclass=NullPool)
        deadline = time.monotonic() + patience
        try:
            while True:
                try:
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                    return
                except (DatabaseUnavailableError, DBAPIError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        finally:
            await engine.dispose()

    async def create_database(self) -> None:
        engine = make_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await conn.execute(text(f"CREATE DATABASE {self.database}"))
        finally:
            await engine.dispose()

    def log_tail(self) -> str:
        content = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(content.splitlines()[-15:])


class PrivatePostgres(PrivateServer):
    """initdb + pg_ctl, run as the postgres user."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.user = _service_user("postgres")
        config = _program("pg_config", "postgresql")
        bindir = subprocess.run(
            [config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        self.initdb = _program("initdb", "postgresql", bindir or None)
        self.pg_ctl = _program("pg_ctl", "postgresql", bindir or None)
        self.data = folder / "data"

    @property
    def admin_url(self) -> URL:
        return make_url(f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres")

    async def create(self) -> None:
        options = ["-A", "trust", "-U", "postgres", "-N", "-E", "UTF8", "--locale=C"]
        await _run(self.initdb, "-D", str(self.data), *options, user=self.user, cwd=self.folder)

    async def start(self) -> None:
        settings = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=60"
        )
        command = ["-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", settings]
        await _run(self.pg_ctl, *command, "start", user=self.user, cwd=self.folder)

    async def stop(self, mode: str = "fast") -> None:
        command = [self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"]
        await _run(*command, user=self.user, cwd=self.folder)

    async def remove(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            await self.stop("immediate")
        except RuntimeError:  # pg_ctl could not: end the postmaster ourselves
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


class PrivateMariaDB(PrivateServer):
    """mariadb-install-db + mariadbd, run as the mysql user."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.user = _service_user("mysql")
        self.install = _program("mariadb-install-db", "mariadb-server")
        self.mariadbd = _program("mariadbd", "mariadb-server")
        self.data = folder / "data"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def admin_url(self) -> URL:
        return make_url(f"mysql+aiomysql://root@127.0.0.1:{self.port}/mysql")

    async def create(self) -> None:
        options = ["--auth-root-authentication-method=normal", "--skip-test-db"]
        command = [self.install, "--no-defaults", f"--datadir={self.data}", *options]
        await _run(*command, "--skip-name-resolve", user=self.user, cwd=self.folder)

    async def start(self) -> None:
        options = [
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.folder / 'mysqld.sock'}",
            f"--pid-file={self.folder / 'mysqld.pid'}",
            f"--log-error={self.log}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=0",
        ]
        self.process = await asyncio.create_subprocess_exec(
            self.mariadbd,
            *options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=self.folder,
            **self.user,
        )
        waiting = asyncio.create_task(self.wait_until_up())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait([waiting, exited], return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            waiting.cancel()
            raise RuntimeError(f"mariadbd exited at start:\n{self.log_tail()}")
        exited.cancel()
        await waiting  # its error, if it timed out

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()  # a normal shutdown
        _, running = await asyncio.wait([asyncio.create_task(self.process.wait())], timeout=60)
        if running:
            self.process.kill()
        await self.process.wait()

    async def remove(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@asynccontextmanager
async def private_server(backend: str) -> AsyncIterator[PrivateServer]:
    """A fresh server with an empty database, removed afterwards (also on failure)."""
    folder = Path(tempfile.mkdtemp(prefix=f"asyncpatterns-{backend}-"))
    try:
        server = (PrivatePostgres if backend == "postgresql" else PrivateMariaDB)(folder)
        if server.user:
            shutil.chown(folder, **server.user)
        try:
            await server.create()
            await server.start()
            await server.create_database()
            yield server
        finally:
            await server.remove()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@on_servers
async def test_a_stopped_database_is_a_quick_503_and_the_same_app_recovers(
    backend: str, tmp_path: Path
) -> None:
    traffic, stop_load = Traffic(), asyncio.Event()
    log = tmp_path / "app.log"
    async with private_server(backend) as server, served_app(server.url, log) as app:
        world = World.for_clients(8)
        async with clients(traffic, app.base_url, 1) as (setup,):
            await open_accounts(setup, world, 4, "1000.00")
        load = asyncio.create_task(
            run_load(traffic, app.base_url, world, 8, stop_load, WITHOUT_NEW_ACCOUNTS)
        )
        try:
            await asyncio.sleep(1.0)
            stopping = time.perf_counter()
            await server.stop()
            down = time.perf_counter()
            await asyncio.sleep(2.0)
            starting = time.perf_counter()
            await server.start()
            up = time.perf_counter()
            first_200 = await _first_success_after(traffic, up, patience=15.0)
            await asyncio.sleep(1.5)
        finally:
            stop_load.set()
            await load
        server_log = server.log_tail()
        stored = await stored_rows(server.url)
    while_down = traffic.between(down, starting)
    after = traffic.between(first_200 + 1.0) if first_200 else []
    print(
        f"\n{backend}: server stopped in {down - stopping:.2f} s; {len(while_down)} requests "
        f"while down: {dict(_statuses(while_down))} in {seconds_of(while_down)}; "
        f"first 200 {first_200 - up if first_200 else float('nan'):.2f} s after the restart "
        f"(started in {up - starting:.2f} s); all: {dict(_statuses(traffic.answers))}"
    )
    problems = []
    if not while_down:
        problems.append("no request was answered while the server was down")
    for answer in while_down:  # (a reset, status None, is judged on its own)
        if answer.status is not None and (
            (answer.status, answer.detail, answer.retry_after) != (503, CANNOT_CONNECT, "5")
            or answer.seconds > 2.0
        ):
            problems.append(f"while down, not a quick 503: {answer.short()}")
    if first_200 is None:
        problems.append("the app did not answer 200 within 15 s of the restart")
    problems += [f"after the recovery: {a.short()}" for a in after if a.status == 503]
    openings = dict.fromkeys(world.accounts, Decimal("1000.00"))
    problems += check_invariants(traffic, stored, False, openings)
    judge(traffic, log.read_text() + f"\n-- server log:\n{server_log}", problems)


async def _first_success_after(traffic: Traffic, start: float, patience: float) -> float | None:
    """When the first request sent after ``start`` was answered 2xx."""
    deadline = time.perf_counter() + patience
    while time.perf_counter() < deadline:
        done = [a.ended for a in traffic.between(start) if a.status and a.status < 300]
        if done:
            return min(done)
        await asyncio.sleep(0.05)
    return None


def _statuses(answers: list[Answer]) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    for answer in answers:
        counts[answer.status or "error"] = counts.get(answer.status or "error", 0) + 1
    return dict(sorted(counts.items(), key=str))


# -- (c) The app's connections killed mid-request --------------------------------------


@on_servers
async def test_connections_killed_mid_request_are_503s(
    backend: str, scratch_url: URL, tmp_path: Path
) -> None:
    traffic, stop_load = Traffic(), asyncio.Event()
    log = tmp_path / "app.log"
    async with (
        served_app(scratch_url, log, lock_timeout=20) as app,
        watcher(backend, scratch_url.database) as watch,
    ):
        world = World.for_clients(10)
        async with clients(traffic, app.base_url, 5) as made:
            await open_accounts(made[0], world, 4, "1000.00")
            a, b = world.accounts[:2]
            body = {"from_id": a, "to_id": b, "amount": "1.00"}
            # Requests waiting on a row lock: their connections are killed under them.
            async with row_lock(scratch_url, a) as holder:
                waiting = [
                    asyncio.create_task(c.call("POST", "/transfers/", json=body)) for c in made
                ]
                await watch.lock_waiters(len(made))
                killed_at = time.perf_counter()
                await watch.kill_app_connections(keep={holder})
                killed = await asyncio.gather(*waiting)
            again = await asyncio.gather(
                *(c.call("GET", f"/accounts/{a}", "/accounts/{id}") for c in made)
            )
        # A mixed load while every connection of the app is killed, every 0.2 s.
        load = asyncio.create_task(
            run_load(traffic, app.base_url, world, 10, stop_load, WITHOUT_NEW_ACCOUNTS, seed=3)
        )
        try:
            await asyncio.sleep(0.5)
            kills, rounds = 0, 0
            storm_end = time.perf_counter() + 3.0
            while time.perf_counter() < storm_end:
                kills += await watch.kill_app_connections(keep=set())
                rounds += 1
                await asyncio.sleep(0.2)
            calm = time.perf_counter()
            await asyncio.sleep(1.5)
        finally:
            stop_load.set()
            await load
    storm = traffic.between(calm - 3.0, calm)
    late = traffic.between(calm + 0.5)
    print(
        f"\n{backend}: {len(killed)} requests killed while waiting for a row: "
        f"{[x.status for x in killed]}, answered {_delays(killed, killed_at)} after the kill "
        f"(the requests took {seconds_of(killed)}); storm: {kills} connections killed "
        f"in {rounds} rounds, {len(storm)} requests: {_statuses(storm)}; "
        f"503s took {seconds_of([x for x in storm if x.status == 503] or storm)}"
    )
    problems = []
    for answer in killed:
        if (answer.status, answer.detail, answer.retry_after) != (503, LOST, "5"):
            problems.append(f"killed mid-request, not a lost-connection 503: {answer.short()}")
        if answer.ended - killed_at > 2.0:
            problems.append(f"answered {answer.ended - killed_at:.2f} s after the kill")
    problems += [f"after the kill: {x.short()}" for x in again if x.status != 200]
    problems += [f"after the storm: {x.short()}" for x in late if x.status == 503]
    if not any(x.status == 503 for x in storm):
        problems.append("the storm killed no request mid-way (no 503): it tested nothing")
    openings = dict.fromkeys(world.accounts, Decimal("1000.00"))
    problems += check_invariants(traffic, await stored_rows(scratch_url), False, openings)
    judge(traffic, log.read_text(), problems)


def _delays(answers: list[Answer], moment: float) -> str:
    return ", ".join(f"{a.ended - moment:.2f}" for a in answers) + " s"


# -- (d) A mixed load with races, then the database checked ---------------------------------


async def test_a_mixed_load_keeps_every_invariant(
    backend: str, scratch_url: URL, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    run = await mixed_load_run(scratch_url, tmp_path / "app.log", CI_CLIENTS, CI_SECONDS)
    print(f"\n{run.figures.line()}")
    record_property("requests_per_second", round(run.figures.rate))
    record_property("p50_ms", round(run.figures.p50_ms, 1))
    record_property("p99_ms", round(run.figures.p99_ms, 1))
    problems = list(run.problems)
    if run.known_drops:
        problems.append(f"{run.known_drops} connections dropped: {DROPPED_AFTER_ANSWER}")
    fail_with_log(problems, run.log)


# -- A connection lost as the request's session closes, after the answer ------------------


class CutAtRollback:
    """A TCP proxy between the app and its database server. Armed with some SQL,
    it drops the app's connection when the app sends ROLLBACK after that SQL:
    after a request that only read has answered, its session is closed, and
    that rollback is the first statement to find the connection gone (as after
    a kill, a restart or a network failure at that moment)."""

    def __init__(self, server: URL) -> None:
        default_port = {"postgresql": 5432, "mysql": 3306}[server.get_backend_name()]
        self.target = (server.host or "127.0.0.1", server.port or default_port)
        self.trigger: bytes | None = None  # the SQL after which the next ROLLBACK is cut
        self.primed, self.cuts, self.port = False, 0, 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> "CutAtRollback":
        self._server = await asyncio.start_server(self._proxy, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def url(self, url: URL) -> URL:
        proxied = url.set(host="127.0.0.1", port=self.port)
        if url.get_backend_name() == "postgresql":  # plain text, so that ROLLBACK shows
            option = "sslmode" if url.get_driver_name() == "psycopg" else "ssl"  # libpq's name
            proxied = proxied.update_query_dict({option: "disable"})
        return proxied

    async def _proxy(self, app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter):
        try:
            db_reader, db_writer = await asyncio.open_connection(*self.target)
        except OSError:
            app_writer.close()
            return
        self._writers |= {app_writer, db_writer}

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_app: bool
        ) -> None:
            try:
                while data := await reader.read(65536):
                    if from_app and self.trigger and self.trigger in data:
                        self.trigger, self.primed = None, True
                    elif from_app and self.primed and b"ROLLBACK" in data:
                        self.primed = False
                        self.cuts += 1
                        return  # not forwarded: both ends are closed below
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                app_writer.close()
                db_writer.close()

        await asyncio.gather(pump(app_reader, db_writer, True), pump(db_reader, app_writer, False))
        self._writers -= {app_writer, db_writer}


class DroppedConnection(AssertionError):
    """The client got no answer, or lost its keep-alive connection."""


@on_servers
async def test_a_connection_lost_as_the_session_closes_keeps_the_client_connection(
    backend: str, scratch_url: URL, tmp_path: Path
) -> None:
    traffic, log = Traffic(), tmp_path / "app.log"
    async with (
        CutAtRollback(scratch_url) as proxy,
        served_app(proxy.url(scratch_url), log) as app,
        clients(traffic, app.base_url, 1) as (client,),
    ):
        before = await client.call("GET", "/users/")
        # The first query of the teams (its text is sent: no prepared statement yet),
        # then the ROLLBACK of that request's session: the pool's pre-ping passes.
        proxy.trigger = b"FROM team"
        cut = await client.call("GET", "/teams/")  # answered, then its session's ROLLBACK is cut
        # The next request, at once, as clients do: a write, to see if it ran unanswered.
        after = await client.call("POST", "/users/", json={"name": "Next", "email": "n@x.io"})
        again = await client.call("GET", "/users/")
    assert proxy.cuts == 1, "the app sent no ROLLBACK when the request's session closed"
    assert before.status == 200, before.short()
    known, escaped = dropped_connections(log.read_text())
    stored = "n@x.io" in (await stored_rows(scratch_url))["users"].values()
    print(
        f"\n{backend}: connection cut at the session's ROLLBACK: that request "
        f"{cut.status or cut.error}; the next (a POST) {after.status or after.error}, "
        f"its user {'stored' if stored else 'not stored'}; then {again.status or again.error}; "
        f"client connections {traffic.connections()}, dropped by the app (log): {known}"
    )
    assert not escaped, escaped
    problems = traffic.problems()
    if cut.status not in (200, 503) or (cut.status == 503 and not cut.retry_after):
        problems.append(f"the request whose session closed on a lost connection: {cut.short()}")
    if problems:
        raise DroppedConnection("\n".join(problems))


# -- An unexpected error: a JSON 500 with an id, on a connection that stays open ------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_unexpected_error_is_a_json_500_and_the_connection_stays(
    backend: str, scratch_url: URL, tmp_path: Path
) -> None:
    traffic, log = Traffic(), tmp_path / "app.log"
    async with served_app(scratch_url, log) as app, clients(traffic, app.base_url, 1) as (client,):
        world = World.for_clients(1)
        await open_accounts(client, world, 2, "10.00")
        engine = make_engine(scratch_url)
        try:
            async with engine.begin() as conn:  # a bug's stand-in: a table gone under the app
                await conn.execute(text("DROP TABLE idempotencykey"))
        finally:
            await engine.dispose()
        body = {"from_id": world.accounts[0], "to_id": world.accounts[1], "amount": "1.00"}
        broken = await client.call("POST", "/transfers/", json=body, key="k-1")
        after = await client.call("GET", "/users/")
    assert broken.status == 500, broken.short()
    assert broken.body["error_id"] in log.read_text()
    assert after.status == 200, after.short()
    assert traffic.problems() == [f"1 5xx other than 503, e.g. {broken.short()}"]
    assert broken.port == after.port  # the same keep-alive connection


# -- The checks themselves: they see what they are meant to see -------------------------------


def test_the_invariant_checks_catch_lost_writes_duplicates_and_wrong_money() -> None:
    def answer(route: str, status: int, body: object, sent: object = None, key=None) -> Answer:
        method, path = route.split(" ")
        return Answer(0, method, route, path, 0.0, 0.1, status, body, sent=sent, key=key)

    move = {"from_id": 1, "to_id": 2, "amount": "5.00"}
    answers = [
        answer("POST /users/", 201, {"id": 1}, {"email": "a@x.io"}),
        answer("POST /users/", 201, {"id": 2}, {"email": "b@x.io"}),
        answer("POST /accounts/", 201, {"id": 2}, {"balance": "0.00"}),
        answer("POST /transfers/", 200, {}, move, key="k"),
        answer("POST /transfers/", 200, {"replayed": "differently"}, move, key="k"),
    ]
    stored = {
        "users": {2: "b@x.io", 3: "c@x.io", 4: "C@x.io"},
        "teams": {},
        "accounts": {1: Decimal("5.00"), 2: Decimal("4.00")},
    }
    problems = "\n".join(check_invariants(Traffic(answers), stored, True, {1: Decimal("10.00")}))
    for expected in [
        "emails stored twice (case-insensitively): ['c@x.io']",
        "emails stored not lower-case: ['C@x.io']",
        "users answered 201, never deleted, not stored: [1]",
        "users stored without a 201: [3, 4]",
        "money total 9.00 but 10.00",
        "one Idempotency-Key, different answers",
        "balances (stored, from the 200 transfers): {2: (Decimal('4.00'), Decimal('5.00'))}",
    ]:
        assert expected in problems, problems
