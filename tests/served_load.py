"""The app served for real: a uvicorn process, HTTP clients on keep-alive
connections, a mixed load with deliberate races, and the database checked afterwards.

``tests/test_served.py`` imports this module. Run it alone for longer runs::

    python tests/served_load.py --url sqlite \\
        --url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres \\
        --url mysql+aiomysql://root@127.0.0.1:3306/mysql --clients 200 --seconds 60

Each ``--url`` gets a throw-away database beside it (``sqlite``: a temporary
file), its own app process, the load, the checks, and a row of the table
printed at the end. The exit status is 1 if any check failed.

What a client sees is checked on every answer: no 5xx but 503, a Retry-After
on every 503, no connection dropped (a reset or a close is an httpx
``TransportError``, counted), and every client keeps its one keep-alive
connection for the whole run, error answers included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import re
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool
from sqlmodel import select

from asyncpatterns.config import mask_password, resolve_url
from asyncpatterns.db import make_engine, throwaway_database
from asyncpatterns.models import Account, Team, User

# The app process: create_app with the timeouts given, served by uvicorn on a
# socket the parent bound (so the port is known before the process starts).
# The server's keep-alive outlasts the clients' (CLIENT_KEEP_ALIVE): a client
# never sends on a connection the server is closing for idleness, so every
# connection that closes during a run was closed because of an answer.
APP_SCRIPT = """
import logging, socket, sys
import uvicorn
from asyncpatterns.api import create_app
fd, url, pool_timeout, lock_timeout = int(sys.argv[1]), sys.argv[2], *map(float, sys.argv[3:5])
logging.basicConfig(
    level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)
app = create_app(url, pool_timeout=pool_timeout, lock_timeout=lock_timeout)
config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=120)
uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])
"""
CLIENT_KEEP_ALIVE = 90.0
POOL_TIMEOUT = 3.0  # create_app's defaults
LOCK_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0  # an answer slower than this is a failure (counted as a TransportError)
SERVER_ERRORS = set(range(500, 600)) - {503}
# What httpx raises when the server closed the connection under a request.
DROPPED = ("RemoteProtocolError", "ReadError", "WriteError")


# -- The app process ---------------------------------------------------------------------


@dataclass
class ServedApp:
    base_url: str
    log_path: Path
    process: asyncio.subprocess.Process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def wait_ready(self, patience: float) -> None:
        """Until GET /users/ answers 200: the lifespan ran and the database answers."""
        deadline = time.monotonic() + patience
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as client:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the app exited at start:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/users/", params={"limit": 1})).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the app did not answer in {patience} s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()  # uvicorn shuts down gracefully, the lifespan disposes
            _, running = await asyncio.wait([asyncio.create_task(self.process.wait())], timeout=20)
            if running:
                self.process.kill()
        await self.process.wait()


def url_text(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=False)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for a program that binds it itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@asynccontextmanager
async def served_command(
    database_url: str | URL, log_path: Path, *options: str, start_timeout: float = 60.0
) -> AsyncIterator[ServedApp]:
    """``python -m asyncpatterns serve --url ... --port ...`` (migrations, then uvicorn
    with its ``options``, e.g. ``--workers 2``), as it is run in production, in a
    process group of its own; ready once it answers. Afterwards it is stopped (if
    the test did not stop it) and anything left of its group is killed."""
    port = free_port()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "asyncpatterns",
            "serve",
            "--url",
            url_text(database_url),
            "--port",
            str(port),
            *options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its workers are killed with it, whatever happens
        )
    finally:
        os.close(log)
    app = ServedApp(f"http://127.0.0.1:{port}", log_path, process)
    try:
        await app.wait_ready(start_timeout)
        yield app
    finally:
        try:
            await app.stop()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # a worker left behind


@asynccontextmanager
async def row_lock(url: str | URL, account_id: int) -> AsyncIterator[None]:
    """Hold the account's row lock (SQLite: the database's write lock) until the
    block ends; the requests that need it wait meanwhile. Taking it waits up to 30 s
    (SQLite under a write load: the app's writers come and go)."""
    engine = make_engine(url, poolclass=NullPool, lock_timeout=30)
    try:
        async with engine.connect() as conn:
            await conn.begin()
            lock = text("UPDATE account SET owner = owner WHERE id = :id")
            await conn.execute(lock, {"id": account_id})
            try:
                yield
            finally:
                await conn.rollback()
    finally:
        await engine.dispose()


@asynccontextmanager
async def served_app(
    database_url: str | URL,
    log_path: Path,
    *,
    pool_timeout: float = POOL_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    start_timeout: float = 30.0,
) -> AsyncIterator[ServedApp]:
    """``create_app(database_url, ...)`` served by uvicorn in a process of its own."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        arguments = [str(listener.fileno()), url_text(database_url), str(pool_timeout)]
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                APP_SCRIPT,
                *arguments,
                str(lock_timeout),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(listener.fileno(),),
            )
        finally:
            os.close(log)
    app = ServedApp(f"http://127.0.0.1:{port}", log_path, process)
    try:
        await app.wait_ready(start_timeout)
        yield app
    finally:
        await app.stop()


def dropped_connections(log: str) -> tuple[int, list[str]]:
    """The connections the app dropped, from its log: (how many for the known
    defect, the last line of every other error that escaped the app).

    The known defect: a connection to the database lost after the endpoint
    answered (when the request's session is closed, its rollback fails) raises
    from the session dependency's teardown, after the response was sent;
    uvicorn logs "Exception in ASGI application" and closes the keep-alive
    connection, so the client's next request on it fails.
    """
    known, other = 0, []
    for block in log.split("Exception in ASGI application")[1:]:
        # The traceback runs until the next log line (a timestamp, or uvicorn's "ERROR:").
        body = re.split(r"\n(?=\d{4}-\d\d-\d\d |[A-Z]+: )", block)[0]
        if "in get_session" in body and "response already started" in body:
            known += 1
        else:
            other.append(body.strip().splitlines()[-1] if body.strip() else "?")
    return known, other


# -- Clients and what they saw -----------------------------------------------------------


@dataclass
class Answer:
    """One request and what the client saw."""

    client: int
    method: str
    route: str  # the endpoint, e.g. "PATCH /users/{id}"
    path: str
    started: float
    ended: float
    status: int | None = None  # None: no HTTP answer (see error)
    body: Any = None
    retry_after: str | None = None
    error: str | None = None  # a TransportError: reset, closed, timed out
    port: int | None = None  # the client's end of the TCP connection
    closes: bool = False  # the answer said "Connection: close"
    key: str | None = None  # its Idempotency-Key
    sent: Any = None  # its JSON body

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def detail(self) -> str:
        return self.body.get("detail", "") if isinstance(self.body, dict) else ""

    def short(self) -> str:
        outcome = self.error or f"{self.status} {str(self.body)[:160]}"
        return f"{self.method} {self.path} after {self.seconds:.2f} s: {outcome}"


@dataclass
class Traffic:
    """Every answer of a run, and the checks that hold for any answer."""

    answers: list[Answer] = field(default_factory=list)
    clients_made: int = 0

    def between(self, start: float, end: float = float("inf")) -> list[Answer]:
        """The answers to requests sent at or after ``start`` and answered by ``end``."""
        return [a for a in self.answers if a.started >= start and a.ended <= end]

    def problems(
        self, allowed: dict[str, set[int]] | None = None, known_drops: int = 0
    ) -> list[str]:
        """What no client may ever see: a 5xx but 503, a 503 without Retry-After,
        a dropped or closed connection, a client that had to reconnect; and,
        with ``allowed``, a status its endpoint should not answer.

        ``known_drops``: connections the app's log shows it dropped for the
        known defect (``dropped_connections``); up to that many resets and
        reconnections are not reported here (the caller reports the defect).
        """
        found: list[str] = []

        def note(what: str, answers: list[Answer]) -> None:
            if answers:
                examples = "; ".join(a.short() for a in answers[:3])
                found.append(f"{len(answers)} {what}, e.g. {examples}")

        errors = [a for a in self.answers if a.error]
        if len(errors) > known_drops or any(not a.error.startswith(DROPPED) for a in errors):
            note("transport errors (connection reset or closed)", errors)
        note("5xx other than 503", [a for a in self.answers if a.status in SERVER_ERRORS])
        note(
            "503 without Retry-After",
            [a for a in self.answers if a.status == 503 and not a.retry_after],
        )
        note("answers closing the connection", [a for a in self.answers if a.closes])
        if allowed is not None:
            note(
                "unexpected statuses",
                [a for a in self.answers if a.status and a.status not in allowed.get(a.route, {})],
            )
        ports: dict[int, set[int]] = defaultdict(set)
        for answer in self.answers:
            if answer.port is not None:
                ports[answer.client].add(answer.port)
        reconnected = {client: len(p) for client, p in ports.items() if len(p) > 1}
        if sum(reconnected.values()) - len(reconnected) > known_drops:
            found.append(
                f"{len(reconnected)} clients opened a new connection (clients: connections "
                f"{dict(list(reconnected.items())[:5])}): the server closed one"
            )
        return found

    def connections(self) -> int:
        return len({(a.client, a.port) for a in self.answers if a.port is not None})

    def resets(self) -> int:
        return sum(1 for a in self.answers if a.error)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # One for every client (they speak plain HTTP anyway): httpx makes one per
    # client otherwise, about 15 ms each, which delays the start of 200 clients.
    return ssl.create_default_context()


def local_port(response: httpx.Response) -> int | None:
    stream = response.extensions.get("network_stream")
    address = stream.get_extra_info("client_addr") if stream is not None else None
    return address[1] if address else None


class Client:
    """One HTTP client with one keep-alive connection, reused for all its requests."""

    def __init__(self, traffic: Traffic, base_url: str, index: int) -> None:
        self.traffic, self.index = traffic, index
        limits = httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=CLIENT_KEEP_ALIVE
        )
        self.http = httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT, verify=_tls_context()
        )

    async def __aenter__(self) -> Client:
        await self.http.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.__aexit__(*exc_info)

    async def call(
        self,
        method: str,
        path: str,
        route: str | None = None,
        json: Any = None,
        key: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Answer:
        headers = {"Idempotency-Key": key} if key else None
        answer = Answer(self.index, method, f"{method} {route or path}", path, 0.0, 0.0)
        answer.key, answer.sent = key, json
        answer.started = time.perf_counter()
        try:
            async with self.http.stream(
                method, path, json=json, headers=headers, params=params
            ) as response:
                answer.port = local_port(response)
                await response.aread()
        except httpx.TransportError as exc:
            answer.error = f"{type(exc).__name__}: {exc}"
        else:
            answer.status = response.status_code
            answer.retry_after = response.headers.get("retry-after")
            answer.closes = response.headers.get("connection", "").lower() == "close"
            try:
                answer.body = response.json()
            except ValueError:
                answer.body = response.text[:500]
        answer.ended = time.perf_counter()
        self.traffic.answers.append(answer)
        return answer


@asynccontextmanager
async def clients(traffic: Traffic, base_url: str, count: int) -> AsyncIterator[list[Client]]:
    """``count`` new clients (numbered after the ones ``traffic`` already has)."""
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(count):
            client = Client(traffic, base_url, traffic.clients_made)
            traffic.clients_made += 1
            made.append(await stack.enter_async_context(client))
        yield made


# -- The mixed load: every endpoint, with races --------------------------------------------


@dataclass
class World:
    """What the clients know, shared by all of them (one event loop: no locks)."""

    emails: list[str]
    accounts: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    recent_users: deque[int] = field(default_factory=lambda: deque(maxlen=12))
    teams: list[int] = field(default_factory=list)
    team_names: list[str] = field(default_factory=lambda: [f"Team {i}" for i in range(8)])
    keyed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def for_clients(cls, count: int) -> World:
        # Fewer emails than clients: concurrent POSTs and PATCHes collide on them.
        return cls(emails=[f"racer{i}@example.com" for i in range(max(8, count // 2))])


def _variant(rng: random.Random, email: str) -> str:
    """The same email in another case: equal to it once canonical."""
    return "".join(c.upper() if rng.random() < 0.3 else c for c in email)


def _amount(rng: random.Random, most: int = 30000) -> str:
    return str(Decimal(rng.randint(1, most)) / 100)


def _user_target(rng: random.Random, world: World) -> int | None:
    """A user to read, change or delete: mostly one of the newest, so PATCH,
    DELETE and GET of the same user race; sometimes any (deleted ones too)."""
    if world.recent_users and rng.random() < 0.75:
        return rng.choice(world.recent_users)
    return rng.choice(world.users) if world.users else None


async def create_user(client: Client, rng: random.Random, world: World) -> None:
    body: dict[str, Any] = {
        "name": f"User {rng.randint(1, 10**6)}",
        "email": _variant(rng, rng.choice(world.emails)),
    }
    if world.teams and rng.random() < 0.3:
        body["team_id"] = rng.choice(world.teams)
    answer = await client.call("POST", "/users/", json=body)
    if answer.status == 201:
        world.users.append(answer.body["id"])
        world.recent_users.append(answer.body["id"])


async def read_user(client: Client, rng: random.Random, world: World) -> None:
    if (user := _user_target(rng, world)) is not None:
        await client.call("GET", f"/users/{user}", "/users/{id}")


async def list_users(client: Client, rng: random.Random, world: World) -> None:
    params = {"skip": rng.randint(0, max(0, len(world.users) - 10)), "limit": rng.randint(1, 100)}
    await client.call("GET", "/users/", params=params)


async def patch_user(client: Client, rng: random.Random, world: World) -> None:
    if (user := _user_target(rng, world)) is None:
        return
    change = rng.choice(["name", "email", "email", "is_active", "team_id"])
    body: dict[str, Any] = {
        "name": {"name": f"Renamed {rng.randint(1, 10**6)}"},
        "email": {"email": _variant(rng, rng.choice(world.emails))},
        "is_active": {"is_active": rng.random() < 0.5},
        "team_id": {"team_id": rng.choice(world.teams) if world.teams else None},
    }[change]
    await client.call("PATCH", f"/users/{user}", "/users/{id}", json=body)


async def delete_user(client: Client, rng: random.Random, world: World) -> None:
    if (user := _user_target(rng, world)) is not None:
        await client.call("DELETE", f"/users/{user}", "/users/{id}")


async def create_team(client: Client, rng: random.Random, world: World) -> None:
    # Mostly a few shared names (racing creators: one 201, the others 400).
    name = rng.choice(world.team_names) if rng.random() < 0.7 else f"Team {uuid.uuid4().hex[:8]}"
    answer = await client.call("POST", "/teams/", json={"name": name})
    if answer.status == 201:
        world.teams.append(answer.body["id"])


async def read_team(client: Client, rng: random.Random, world: World) -> None:
    if world.teams:
        await client.call("GET", f"/teams/{rng.choice(world.teams)}", "/teams/{id}")


async def list_teams(client: Client, rng: random.Random, world: World) -> None:
    await client.call("GET", "/teams/", params={"limit": rng.randint(1, 20)})


async def create_account(client: Client, rng: random.Random, world: World) -> None:
    body = {"owner": f"Owner {rng.randint(1, 10**6)}", "balance": _amount(rng, 50000)}
    answer = await client.call("POST", "/accounts/", json=body)
    if answer.status == 201:
        world.accounts.append(answer.body["id"])


async def read_account(client: Client, rng: random.Random, world: World) -> None:
    if world.accounts:
        await client.call("GET", f"/accounts/{rng.choice(world.accounts)}", "/accounts/{id}")


def _transfer_body(rng: random.Random, world: World) -> dict[str, Any]:
    # Few accounts, most transfers between the first four: they queue on the same rows.
    few = world.accounts[:4] if rng.random() < 0.8 else world.accounts
    from_id, to_id = rng.sample(few, 2)
    return {"from_id": from_id, "to_id": to_id, "amount": _amount(rng)}


async def transfer(client: Client, rng: random.Random, world: World) -> None:
    if len(world.accounts) >= 2:
        await client.call("POST", "/transfers/", json=_transfer_body(rng, world))


async def keyed_transfer(client: Client, rng: random.Random, world: World) -> None:
    """With an Idempotency-Key; a third are retries of an earlier key and body,
    sometimes while the first is still running (another client's)."""
    if len(world.accounts) < 2:
        return
    if world.keyed and rng.random() < 0.35:
        key, body = rng.choice(world.keyed[-20:])
    else:
        key, body = uuid.uuid4().hex, _transfer_body(rng, world)
        world.keyed.append((key, body))
    await client.call("POST", "/transfers/", json=body, key=key)


Operation = Callable[[Client, random.Random, World], Awaitable[None]]

MIXED: dict[Operation, int] = {  # operation: weight
    create_user: 18,
    read_user: 12,
    list_users: 6,
    patch_user: 12,
    delete_user: 8,
    create_team: 3,
    read_team: 4,
    list_teams: 3,
    create_account: 2,
    read_account: 6,
    transfer: 16,
    keyed_transfer: 10,
}
# For runs with faults (a stopped server, killed connections): no new accounts,
# so the money total stays exact even when a 503 hides whether a commit happened.
WITHOUT_NEW_ACCOUNTS = {op: weight for op, weight in MIXED.items() if op is not create_account}

# What each endpoint may answer under this load (503 aside, always allowed with Retry-After).
ALLOWED = {
    "POST /users/": {201, 400, 503},
    "GET /users/{id}": {200, 404, 503},
    "GET /users/": {200, 503},
    "PATCH /users/{id}": {200, 400, 404, 503},
    "DELETE /users/{id}": {200, 404, 503},
    "POST /teams/": {201, 400, 503},
    "GET /teams/{id}": {200, 503},
    "GET /teams/": {200, 503},
    "POST /accounts/": {201, 503},
    "GET /accounts/{id}": {200, 503},
    "POST /transfers/": {200, 409, 503},
}


async def open_accounts(client: Client, world: World, count: int, balance: str) -> None:
    for i in range(count):
        body = {"owner": f"Holder {i}", "balance": balance}
        answer = await client.call("POST", "/accounts/", json=body)
        if answer.status != 201:
            raise RuntimeError(f"could not open an account: {answer.short()}")
        world.accounts.append(answer.body["id"])


async def run_load(
    traffic: Traffic,
    base_url: str,
    world: World,
    clients_count: int,
    stop: asyncio.Event,
    mix: dict[Operation, int] = MIXED,
    seed: int = 0,
    seconds: float | None = None,
) -> None:
    """``clients_count`` clients, each sending one request after another, until
    ``stop`` is set (by the caller, or ``seconds`` after the clients are made)."""
    operations, weights = list(mix), list(mix.values())

    async def work(client: Client) -> None:
        rng = random.Random(seed * 100_003 + client.index)
        while not stop.is_set():
            await rng.choices(operations, weights)[0](client, rng, world)

    async with clients(traffic, base_url, clients_count) as made:
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, stop.set)
        await asyncio.gather(*(work(client) for client in made))


# -- Invariants, checked in the database ---------------------------------------------------


async def stored_rows(url: str | URL) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            users = (await conn.execute(select(User.id, User.email))).all()
            teams = (await conn.execute(select(Team.id, Team.name))).all()
            accounts = (await conn.execute(select(Account.id, Account.balance))).all()
    finally:
        await engine.dispose()
    return {
        "users": {id_: email for id_, email in users},
        "teams": {id_: name for id_, name in teams},
        "accounts": {id_: balance for id_, balance in accounts},
    }


def check_invariants(
    traffic: Traffic, stored: dict[str, Any], exact: bool, openings: dict[int, Decimal]
) -> list[str]:
    """What the answers promised, against what the database holds.

    ``exact``: no answer hid an outcome (no lost connection: a 503 then means
    nothing was done), so every stored row and every balance is accounted for.
    Otherwise only what holds whatever a 503 hid: the money total, no negative
    balance, unique emails, and every 201 user kept unless deleted.
    ``openings``: accounts opened before the load, id -> opening balance.
    """
    problems: list[str] = []
    answers = traffic.answers
    users: dict[int, str] = stored["users"]

    # Users: one per email, whatever its case; every 201 kept unless deleted with 200.
    by_email = Counter(email.lower() for email in users.values())
    duplicates = [email for email, count in by_email.items() if count > 1]
    if duplicates:
        problems.append(f"emails stored twice (case-insensitively): {duplicates[:5]}")
    if not_canonical := [e for e in users.values() if e != e.strip().lower()]:
        problems.append(f"emails stored not lower-case: {not_canonical[:5]}")
    created = {a.body["id"]: a for a in answers if a.route == "POST /users/" and a.status == 201}
    deletes = [a for a in answers if a.route == "DELETE /users/{id}" and a.status == 200]
    deleted = Counter(int(a.path.rsplit("/", 1)[1]) for a in deletes)
    if twice := [user for user, count in deleted.items() if count > 1]:
        problems.append(f"users deleted twice with 200: {twice[:5]}")
    # A DELETE answered 503 (its connection lost) or not at all may have committed.
    maybe_deleted = {
        int(a.path.rsplit("/", 1)[1])
        for a in answers
        if a.route == "DELETE /users/{id}" and a.status in (503, None) and not exact
    }
    if missing := sorted(set(created) - set(deleted) - maybe_deleted - set(users)):
        problems.append(
            f"users answered 201, never deleted, not stored: {missing[:10]} "
            f"(what was answered about them: {_history(answers, missing[:3])})"
        )
    if revived := sorted(set(deleted) & set(users)):
        problems.append(f"users deleted with 200 but still stored: {revived[:10]}")
    if exact and (phantoms := sorted(set(users) - set(created))):
        problems.append(f"users stored without a 201: {phantoms[:10]}")
    problems += _ordering_problems(answers, created, deletes)
    if exact:
        emails: dict[int, set[str]] = defaultdict(set)
        for user, answer in created.items():
            emails[user].add(answer.sent["email"].lower())
        for a in answers:
            if a.route == "PATCH /users/{id}" and a.status == 200 and "email" in a.sent:
                emails[a.body["id"]].add(a.sent["email"].lower())
        wrong = [u for u, email in users.items() if u in created and email not in emails[u]]
        if wrong:
            problems.append(f"users whose email no 201 nor 200 PATCH gave: {wrong[:10]}")

    # Teams: one 201 per name, each stored.
    team_answers = [a for a in answers if a.route == "POST /teams/" and a.status == 201]
    names = Counter(a.body["name"] for a in team_answers)
    if twice := [name for name, count in names.items() if count > 1]:
        problems.append(f"team names answered 201 twice: {twice[:5]}")
    if lost := sorted({a.body["id"] for a in team_answers} - set(stored["teams"])):
        problems.append(f"teams answered 201 but not stored: {lost[:10]}")
    if exact and (phantoms := sorted(set(stored["teams"]) - {a.body["id"] for a in team_answers})):
        problems.append(f"teams stored without a 201: {phantoms[:10]}")

    # Money: exact, never negative; each Idempotency-Key moves money at most once.
    balances: dict[int, Decimal] = stored["accounts"]
    if negative := {i: b for i, b in balances.items() if b < 0}:
        problems.append(f"negative balances: {negative}")
    opened = dict(openings)
    for a in answers:
        if a.route == "POST /accounts/" and a.status == 201:
            opened[a.body["id"]] = Decimal(a.sent["balance"])
    if set(balances) != set(opened) and exact:
        problems.append(f"accounts stored {sorted(balances)} but opened {sorted(opened)}")
    total_opened = sum((opened.get(i, Decimal(0)) for i in balances), Decimal(0))
    if sum(balances.values(), Decimal(0)) != total_opened:
        problems.append(
            f"money total {sum(balances.values())} but {total_opened} was put in the accounts"
        )
    problems += _idempotency_problems(answers)
    if exact:
        expected = dict(opened)
        moved: set[str] = set()
        for a in answers:
            if a.route != "POST /transfers/" or a.status != 200:
                continue
            if a.key is not None:
                if a.key in moved:
                    continue
                moved.add(a.key)
            amount = Decimal(a.sent["amount"])
            expected[a.sent["from_id"]] -= amount
            expected[a.sent["to_id"]] += amount
        if wrong := {i: (balances.get(i), b) for i, b in expected.items() if balances.get(i) != b}:
            problems.append(f"balances (stored, from the 200 transfers): {wrong}")
    return problems


def _history(answers: list[Answer], users: list[int]) -> dict[int, list[str]]:
    """Each user's requests in order: route and status (or error)."""
    paths = {f"/users/{user}": user for user in users}
    found: dict[int, list[str]] = {user: [] for user in users}
    for a in answers:
        user = paths.get(a.path)
        if user is None and a.route == "POST /users/" and a.status == 201:
            user = a.body["id"] if a.body["id"] in found else None
        if user is not None:
            found[user].append(f"{a.method} {a.status or a.error}")
    return found


NOT_THERE = (404, 503, None)  # None: no answer (a transport error, reported on its own)


def _ordering_problems(
    answers: list[Answer], created: dict[int, Answer], deletes: list[Answer]
) -> list[str]:
    """A user is visible once its 201 is answered, and gone once its DELETE is."""
    problems = []
    deleted_at = {int(a.path.rsplit("/", 1)[1]): a.ended for a in deletes}
    delete_sent: dict[int, float] = {}
    for a in answers:
        if a.route == "DELETE /users/{id}":
            user = int(a.path.rsplit("/", 1)[1])
            delete_sent[user] = min(delete_sent.get(user, a.started), a.started)
    after_delete, unseen = [], []
    for a in answers:
        if a.route not in ("GET /users/{id}", "PATCH /users/{id}", "DELETE /users/{id}"):
            continue
        user = int(a.path.rsplit("/", 1)[1])
        if user in deleted_at and a.started > deleted_at[user] and a.status not in NOT_THERE:
            after_delete.append(a)
        if (
            a.route == "GET /users/{id}"
            and user in created
            and a.started > created[user].ended
            and a.ended < delete_sent.get(user, float("inf"))
            and a.status not in (200, 503, None)
        ):
            unseen.append(a)
    if after_delete:
        examples = "; ".join(a.short() for a in after_delete[:3])
        problems.append(f"{len(after_delete)} answers not 404 after a DELETE's 200: {examples}")
    if unseen:
        examples = "; ".join(a.short() for a in unseen[:3])
        problems.append(f"{len(unseen)} GETs missed a user answered 201 before: {examples}")
    return problems


def _idempotency_problems(answers: list[Answer]) -> list[str]:
    """Every answer (but 503) to one Idempotency-Key is the same answer."""
    by_key: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for a in answers:
        if a.key is not None and a.status not in (None, 503):
            by_key[a.key].add((a.status, repr(a.body)))
    differing = {key: seen for key, seen in by_key.items() if len(seen) > 1}
    if differing:
        return [f"one Idempotency-Key, different answers: {list(differing.items())[:2]}"]
    return []


# -- Figures ----------------------------------------------------------------------------


@dataclass
class Figures:
    name: str
    clients: int
    seconds: float
    requests: int
    rate: float
    p50_ms: float
    p99_ms: float
    statuses: Counter[int | str]
    unavailable: Counter[str]  # the 503s, by reason

    @classmethod
    def of(cls, name: str, clients: int, answers: list[Answer]) -> Figures:
        latencies = sorted(a.seconds * 1000 for a in answers)
        elapsed = max(a.ended for a in answers) - min(a.started for a in answers)
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return cls(
            name=name,
            clients=clients,
            seconds=elapsed,
            requests=len(answers),
            rate=len(answers) / elapsed,
            p50_ms=statistics.median(latencies),
            p99_ms=cuts[98],
            statuses=Counter(a.status or "error" for a in answers),
            unavailable=Counter(
                a.detail.removeprefix("Database unavailable: ") for a in answers if a.status == 503
            ),
        )

    def line(self) -> str:
        return (
            f"{self.name}: {self.clients} clients, {self.requests} requests in "
            f"{self.seconds:.1f} s = {self.rate:.0f} requests/s, p50 {self.p50_ms:.1f} ms, "
            f"p99 {self.p99_ms:.1f} ms, statuses {dict(sorted(self.statuses.items(), key=str))}"
            + (f", 503s: {dict(self.unavailable)}" if self.unavailable else "")
        )


def table(rows: Iterable[tuple[Figures, int]]) -> str:
    header = (
        f"{'backend':<12}{'clients':>8}{'seconds':>9}{'requests':>10}{'req/s':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'503':>7}{'problems':>10}"
    )
    lines = [header, "-" * len(header)]
    for figures, problems in rows:
        lines.append(
            f"{figures.name:<12}{figures.clients:>8}{figures.seconds:>9.1f}"
            f"{figures.requests:>10}{figures.rate:>8.0f}{figures.p50_ms:>9.1f}"
            f"{figures.p99_ms:>9.1f}{figures.statuses.get(503, 0):>7}{problems:>10}"
        )
    return "\n".join(lines)


# -- One complete run: app, load, checks ---------------------------------------------------


@dataclass
class LoadRun:
    traffic: Traffic
    figures: Figures
    problems: list[str]
    log: str
    known_drops: int  # connections dropped for the known defect (see dropped_connections)


async def mixed_load_run(
    database_url: str | URL,
    log_path: Path,
    clients_count: int,
    seconds: float,
    seed: int = 0,
    pool_timeout: float = POOL_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
) -> LoadRun:
    """Serve the app on ``database_url`` (its tables are created), run the mixed
    load for ``seconds``, then check every answer and the stored rows."""
    traffic = Traffic()
    world = World.for_clients(clients_count)
    backend = resolve_url(database_url).get_backend_name()
    async with served_app(
        database_url, log_path, pool_timeout=pool_timeout, lock_timeout=lock_timeout
    ) as app:
        setup = Traffic()
        async with clients(setup, app.base_url, 1) as (client,):
            await open_accounts(client, world, 4, "1000.00")
        openings = {account: Decimal("1000.00") for account in world.accounts}
        stop = asyncio.Event()
        await run_load(
            traffic, app.base_url, world, clients_count, stop, seed=seed, seconds=seconds
        )
    log = app.log()
    known_drops, escaped = dropped_connections(log)
    problems = traffic.problems(ALLOWED, known_drops)
    problems += [f"an error escaped the app: {line}" for line in escaped]
    lost = [a for a in traffic.answers if a.status == 503 and "lost" in a.detail]
    exact = not lost and not known_drops
    problems += check_invariants(traffic, await stored_rows(database_url), exact, openings)
    figures = Figures.of(backend, clients_count, traffic.answers)
    return LoadRun(traffic, figures, problems, log, known_drops)


@asynccontextmanager
async def scratch_database(url: str) -> AsyncIterator[URL]:
    """A throw-away database: beside a server URL, or a temporary SQLite file."""
    if url == "sqlite":
        with tempfile.TemporaryDirectory(prefix="asyncpatterns-served-") as folder:
            yield make_url(f"sqlite+aiosqlite:///{Path(folder) / 'served.db'}")
        return
    async with throwaway_database(url, "asyncpatterns_served") as scratch:
        yield scratch


async def main_async(args: argparse.Namespace) -> int:
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="asyncpatterns-served-logs-") as logs:
        for index, url in enumerate(args.url):
            async with scratch_database(url) as database_url:
                log_path = Path(logs) / f"app-{index}.log"
                print(f"== {mask_password(database_url)}", flush=True)
                run = await mixed_load_run(
                    database_url,
                    log_path,
                    args.clients,
                    args.seconds,
                    args.seed,
                    args.pool_timeout,
                    args.lock_timeout,
                )
            print(run.figures.line())
            if run.known_drops:
                print(f"   KNOWN DEFECT: {run.known_drops} connections dropped after an answer")
            for problem in run.problems:
                print(f"   PROBLEM: {problem}")
            failed = failed or bool(run.problems or run.known_drops)
            if run.problems:
                print("   app log, last lines:\n" + "\n".join(run.log.splitlines()[-20:]))
            rows.append((run.figures, len(run.problems)))
    print()
    print(table(rows))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        action="append",
        help="a server URL (a throw-away database is made beside it) or 'sqlite'; repeatable "
        "(default: sqlite, plus $ASYNCPATTERNS_POSTGRES_URL and $ASYNCPATTERNS_MYSQL_URL)",
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-timeout", type=float, default=POOL_TIMEOUT)
    parser.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT)
    args = parser.parse_args(argv)
    if not args.url:
        servers = ("ASYNCPATTERNS_POSTGRES_URL", "ASYNCPATTERNS_MYSQL_URL")
        args.url = ["sqlite"] + [os.environ[v] for v in servers if os.environ.get(v)]
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
