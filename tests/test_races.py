"""The race suite: every write path raced against itself and the others, on every backend.

Racing writers are normal input. Each test here runs writers concurrently, each
in its own session, and then checks three things:

* every writer got a documented answer (no 5xx, no raw database error, no hang):
  the app's 200/201, 400 "Email already registered", 404 "User not found", ...;
  the package's return values and its own exceptions (``DuplicateEmailError``,
  ``TeamNameTakenError``, ``LookupError``, ``InsufficientFundsError``, ...);
* the loser got the answer its order calls for (one winner per email, ...);
* the database, read afterwards in a fresh session, holds what the answers
  say: a refused write stored nothing, an accepted one is there, no two users
  share an email whatever its case, no balance is negative and no money was
  created or lost.

Most races run twice, through a *layer* (the ``layer`` fixture): ``functions``
calls the package in a session per task; ``api`` sends requests to the app,
each request in its own session (``live_client``). Both layers answer with the
same vocabulary (``Answer``), so one test states one rule for both.

How to read it:

1. *Interleavings* are deterministic, as in PostgreSQL's isolation tester:
   session s1 does a write in a transaction it holds open; session s2 starts a
   conflicting write, which must wait for s1 (the server must report s2 as
   waiting for a lock; SQLite, which cannot, must still be busy a moment
   later); then s1 commits or rolls back, and the table ``INTERLEAVINGS`` says
   what s2 must answer and what is stored after each ending.
2. *Storms* cover the orders nobody can step by hand: a few tasks started at
   once (``asyncio.gather``), repeated for ``ROUNDS`` rounds (10; set
   ``ASYNCPATTERNS_RACE_ROUNDS`` to search longer), each round on fresh rows,
   with the invariants checked after every round.
3. *Everything at once*: a seeded random mix of every writer, both layers and
   the package's functions racing together.

Every wait is bounded: a hang fails the test instead of blocking the run.

Two defects this suite found first each keep a deterministic test: a deadlock
inside a writer's flush on MySQL/MariaDB (now retried), and a team deleted while
``crud`` writes a user into it (now "team not found").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import httpx
import pytest
from sqlalchemy import delete, event, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns import crud, relationships, transactions, upserts
from asyncpatterns.api import answer_once
from asyncpatterns.db import error_code, is_unique_violation, make_session_maker, session_scope
from asyncpatterns.models import Account, Profile, Team, User, canonical_email

ROUNDS = int(os.environ.get("ASYNCPATTERNS_RACE_ROUNDS", "10"))  # rounds per storm
STORM_TIMEOUT = 30.0  # seconds one round of a storm may take
STEP_TIMEOUT = 15.0  # seconds one step of an interleaving may take (> the 5 s lock timeout)
WAIT_DEADLINE = 5.0  # seconds s2 has to start waiting for s1's locks
SQLITE_WAIT = 0.05  # SQLite cannot show a waiter: s2 must still be pending after this long

# -- Answers: one vocabulary for the package's functions and the app -------------------

# Accepted: 200/201, a value, True.
CREATED = "created"
UPDATED = "updated"
DELETED = "deleted"
OPENED = "opened"  # an account
MOVED = "moved"  # money
READ = "read"
PROFILE_STORED = "profile stored"  # complex_operation returned True
# Refused, as documented: 400/404/409/422, None/False, the package's own exceptions.
EMAIL_TAKEN = "email taken"  # 400 "Email already registered", DuplicateEmailError
NAME_TAKEN = "name taken"  # 400 "Team name already taken", TeamNameTakenError
USER_GONE = "user not found"  # 404 "User not found", None, False
TEAM_GONE = "team not found"  # 404 "Team N not found", LookupError
NO_FUNDS = "insufficient funds"  # 409, InsufficientFundsError
NO_ACCOUNT = "account not found"  # 404, AccountNotFoundError
KEY_REUSED = "key reused"  # 422: an Idempotency-Key sent with another request
PROFILE_REFUSED = "profile refused"  # complex_operation returned False
UPSERTED = "upserted"  # upsert_users: every row inserted or updated
GOT = "got"  # get_or_create_team: the team, found or made
VERSION_CHANGED = "version changed"  # 412, VersionConflictError: written since it was read


class Answer(NamedTuple):
    """What a writer answered: a kind from the vocabulary above, and its value."""

    kind: str
    value: Any = None


class UndocumentedAnswer(AssertionError):
    """The app answered something its documentation does not list (a 5xx, ...)."""


USER_FIELDS = ("name", "email", "is_active", "team_id")


def user_fields(user: User | dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH may change, from a User or from the app's JSON."""
    if isinstance(user, User):
        return user.model_dump(include=set(USER_FIELDS))
    return {key: user[key] for key in USER_FIELDS}


class Functions:
    """The package's functions, each call in a session of its own."""

    name = "functions"

    def __init__(self, engine: AsyncEngine) -> None:
        self.sessions = make_session_maker(engine)

    async def create_user(self, name: str, email: str, team_id: int | None = None) -> Answer:
        async with self.sessions() as session:
            try:
                user = await crud.create_user(
                    session, User(name=name, email=email, team_id=team_id)
                )
            except crud.DuplicateEmailError:
                return Answer(EMAIL_TAKEN)
            except LookupError:  # a team that does not exist, or was deleted meanwhile
                return Answer(TEAM_GONE)
            return Answer(CREATED, user.id)

    async def update_user(self, user_id: int, changes: dict[str, Any]) -> Answer:
        async with self.sessions() as session:
            try:
                user = await crud.update_user(session, user_id, changes)
            except crud.DuplicateEmailError:
                return Answer(EMAIL_TAKEN)
            except LookupError:  # a team that does not exist, or was deleted meanwhile
                return Answer(TEAM_GONE)
            return Answer(USER_GONE) if user is None else Answer(UPDATED, user_fields(user))

    async def move(self, user_id: int, team_id: int | None) -> Answer:
        async with self.sessions() as session:
            try:
                user = await relationships.move_member(session, user_id, team_id)
            except LookupError:
                return Answer(TEAM_GONE)
            return Answer(USER_GONE) if user is None else Answer(UPDATED, user_fields(user))

    async def delete_user(self, user_id: int) -> Answer:
        async with self.sessions() as session:
            return Answer(DELETED if await crud.delete_user(session, user_id) else USER_GONE)

    async def create_team(self, name: str) -> Answer:
        async with self.sessions() as session:
            try:
                team = await relationships.create_team(session, name)
            except relationships.TeamNameTakenError:
                return Answer(NAME_TAKEN)
            return Answer(CREATED, team.id)

    async def open_account(self, owner: str, balance: str) -> Answer:
        async with self.sessions() as session:
            account = await transactions.open_account(session, owner, Decimal(balance))
            return Answer(OPENED, account.id)

    async def transfer(self, from_id: int, to_id: int, amount: str) -> Answer:
        async with self.sessions() as session:
            try:
                await transactions.transfer_funds(session, from_id, to_id, Decimal(amount))
            except transactions.InsufficientFundsError:
                return Answer(NO_FUNDS)
            except transactions.AccountNotFoundError:
                return Answer(NO_ACCOUNT)
            return Answer(MOVED)

    async def read_account(self, account_id: int) -> Answer:
        async with self.sessions() as session:
            account = await session.get(Account, account_id)
            return Answer(NO_ACCOUNT) if account is None else Answer(READ, account.balance)

    async def get_or_create_team(self, name: str) -> Answer:
        async with self.sessions() as session:
            return Answer(GOT, (await upserts.get_or_create_team(session, name)).id)

    async def update_user_if_unchanged(self, user_id: int, changes: dict[str, Any]) -> Answer:
        """Optimistic locking: read the user, then write only over the version read."""
        async with self.sessions() as session:
            if (user := await crud.get_user(session, user_id)) is None:
                return Answer(USER_GONE)
            read = user.version
        async with self.sessions() as session:
            try:
                user = await crud.update_user(session, user_id, changes, expected_version=read)
            except crud.VersionConflictError:
                return Answer(VERSION_CHANGED)
            except crud.DuplicateEmailError:
                return Answer(EMAIL_TAKEN)
            except LookupError:
                return Answer(TEAM_GONE)
            return Answer(USER_GONE) if user is None else Answer(UPDATED, (read, user.version))

    # Writers the app has no endpoint for: both layers race them through here.

    async def upsert_users(self, users: list[tuple[str, str]]) -> Answer:
        async with self.sessions() as session:
            stored = await upserts.upsert_users(session, [User(name=n, email=e) for n, e in users])
            return Answer(UPSERTED, [(u.id, u.name, u.email) for u in stored])

    async def create_users(self, users: list[tuple[str, str]]) -> Answer:
        async with self.sessions() as session:
            try:
                created = await crud.create_users(
                    session, [User(name=n, email=e) for n, e in users]
                )
            except crud.DuplicateEmailError:
                return Answer(EMAIL_TAKEN)
            return Answer(CREATED, [(u.id, u.name, u.email) for u in created])

    async def deactivate_users(self, user_ids: list[int]) -> Answer:
        async with self.sessions() as session:
            return Answer(UPDATED, await crud.deactivate_users(session, user_ids))

    async def delete_team(self, team_id: int) -> Answer:
        async with self.sessions() as session:
            deleted = await relationships.delete_team(session, team_id)
            return Answer(DELETED if deleted else TEAM_GONE)

    async def complex_operation(self, user_id: int | None, name: str, email: str) -> Answer:
        """A new user with a profile, or (``user_id``) a profile for an existing user."""
        async with self.sessions() as session:
            if user_id is None:
                user = User(name=name, email=email)
            elif (user := await session.get(User, user_id)) is None:
                return Answer(USER_GONE)
            try:
                stored = await transactions.complex_operation(session, user, bio=name)
            except IntegrityError as exc:
                # Documented: "if the user's INSERT fails (a duplicate email), the error
                # is raised and nothing is stored". Anything else is not documented.
                if not is_unique_violation(exc, User.__table__.c.email):
                    raise
                return Answer(EMAIL_TAKEN)
            return Answer(PROFILE_STORED if stored else PROFILE_REFUSED, user.id)

    async def read_total(self, account_ids: list[int]) -> Answer:
        """The balances in one statement: a reader must never see money in flight."""
        async with self.sessions() as session:
            statement = select(Account.balance).where(col(Account.id).in_(account_ids))
            balances = (await session.exec(statement)).all()
            return Answer(READ, sum(balances, Decimal(0)))


def _answer(
    response: httpx.Response,
    ok: str,
    refusals: Iterable[tuple[int, str, str]] = (),
    logged: Iterable[logging.LogRecord] = (),
) -> Answer:
    """The documented answer a response stands for; anything else is UndocumentedAnswer.

    ``refusals`` lists (status, start of the detail, kind).
    """
    if response.status_code in (200, 201):
        return Answer(ok, response.json())
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    reused = (
        isinstance(detail, list) and detail and detail[0].get("type") == "idempotency_key_reused"
    )
    if response.status_code == 422 and reused:
        return Answer(KEY_REUSED)
    for status, start, kind in refusals:
        if response.status_code == status and isinstance(detail, str) and detail.startswith(start):
            return Answer(kind)
    request = response.request
    raise UndocumentedAnswer(
        f"{request.method} {request.url.path} {request.content[:200]!r} answered "
        f"{response.status_code} {response.text[:300]}"
    )


class Api:
    """The app, each request in its own session; writers without an endpoint are
    the package's functions (they race the requests)."""

    name = "api"

    def __init__(
        self, client: httpx.AsyncClient, functions: Functions, log: pytest.LogCaptureFixture
    ) -> None:
        self.client = client
        self.functions = functions
        self.log = log

    def answer(
        self, response: httpx.Response, ok: str, refusals: Iterable[tuple[int, str, str]] = ()
    ) -> Answer:
        return _answer(response, ok, refusals, self.log.records)

    def __getattr__(self, name: str) -> Any:  # create_users, delete_team, ...
        return getattr(self.functions, name)

    async def create_user(self, name: str, email: str, team_id: int | None = None) -> Answer:
        body: dict[str, Any] = {"name": name, "email": email}
        if team_id is not None:
            body["team_id"] = team_id
        refusals = [(400, "Email already registered", EMAIL_TAKEN)]
        refusals += [(404, f"Team {team_id} not found", TEAM_GONE)]
        answer = self.answer(await self.client.post("/users/", json=body), CREATED, refusals)
        return Answer(CREATED, answer.value["id"]) if answer.kind == CREATED else answer

    async def update_user(self, user_id: int, changes: dict[str, Any]) -> Answer:
        refusals = [
            (400, "Email already registered", EMAIL_TAKEN),
            (404, "User not found", USER_GONE),
            (404, f"Team {changes.get('team_id')} not found", TEAM_GONE),
        ]
        answer = self.answer(
            await self.client.patch(f"/users/{user_id}", json=changes), UPDATED, refusals
        )
        return Answer(UPDATED, user_fields(answer.value)) if answer.kind == UPDATED else answer

    async def move(self, user_id: int, team_id: int | None) -> Answer:
        return await self.update_user(user_id, {"team_id": team_id})

    async def get_or_create_team(self, name: str) -> Answer:
        response = await self.client.post("/teams/get-or-create", json={"name": name})
        return Answer(GOT, self.answer(response, GOT).value["id"])

    async def update_user_if_unchanged(self, user_id: int, changes: dict[str, Any]) -> Answer:
        """Optimistic locking: GET the user's ETag, PATCH with it in If-Match."""
        got = await self.client.get(f"/users/{user_id}")
        if self.answer(got, READ, [(404, "User not found", USER_GONE)]).kind == USER_GONE:
            return Answer(USER_GONE)
        refusals = [
            (412, "", VERSION_CHANGED),
            (400, "Email already registered", EMAIL_TAKEN),
            (404, "User not found", USER_GONE),
            (404, f"Team {changes.get('team_id')} not found", TEAM_GONE),
        ]
        headers = {"If-Match": got.headers["ETag"]}
        response = await self.client.patch(f"/users/{user_id}", json=changes, headers=headers)
        answer = self.answer(response, UPDATED, refusals)
        if answer.kind != UPDATED:
            return answer
        assert response.headers["ETag"] != got.headers["ETag"], "a write kept the old ETag"
        return Answer(UPDATED, (got.json()["version"], answer.value["version"]))

    async def delete_user(self, user_id: int) -> Answer:
        response = await self.client.delete(f"/users/{user_id}")
        answer = self.answer(response, DELETED, [(404, "User not found", USER_GONE)])
        assert answer.kind != DELETED or answer.value == {"ok": True}, response.text
        return Answer(answer.kind)

    async def create_team(self, name: str) -> Answer:
        response = await self.client.post("/teams/", json={"name": name})
        answer = self.answer(response, CREATED, [(400, "Team name already taken", NAME_TAKEN)])
        return Answer(CREATED, answer.value["id"]) if answer.kind == CREATED else answer

    async def open_account(self, owner: str, balance: str) -> Answer:
        response = await self.client.post("/accounts/", json={"owner": owner, "balance": balance})
        return Answer(OPENED, self.answer(response, OPENED).value["id"])

    async def transfer(
        self, from_id: int, to_id: int, amount: str, key: str | None = None
    ) -> Answer:
        body = {"from_id": from_id, "to_id": to_id, "amount": amount}
        headers = {} if key is None else {"Idempotency-Key": key}
        response = await self.client.post("/transfers/", json=body, headers=headers)
        refusals = [
            (409, "Insufficient funds", NO_FUNDS),
            (404, "Account not found", NO_ACCOUNT),
        ]
        answer = self.answer(response, MOVED, refusals)
        return answer if key is None else Answer(answer.kind, (response.status_code, response.text))

    async def read_account(self, account_id: int) -> Answer:
        response = await self.client.get(f"/accounts/{account_id}")
        answer = self.answer(response, READ, [(404, "Account not found", NO_ACCOUNT)])
        return Answer(READ, Decimal(answer.value["balance"])) if answer.kind == READ else answer


Layer = Functions | Api


@pytest.fixture(params=["functions", "api"])
def layer(
    request: pytest.FixtureRequest, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> Layer:
    """How the writers are called: the package's functions, or the app's endpoints."""
    functions = Functions(engine)
    if request.param == "functions":
        return functions
    return Api(request.getfixturevalue("live_client"), functions, caplog)


only_functions = pytest.mark.parametrize("layer", ["functions"], indirect=True)
only_api = pytest.mark.parametrize("layer", ["api"], indirect=True)


async def storm(*calls: Awaitable[Answer]) -> list[Answer]:
    """Run ``calls`` at once; fail on a hang, a raised error or an undocumented answer."""
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), STORM_TIMEOUT)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        first = "".join(
            traceback.format_exception(type(errors[0]), errors[0], errors[0].__traceback__)
        )
        types = Counter(type(e).__name__ for e in errors)
        pytest.fail(
            f"{len(errors)} of {len(results)} racers failed ({dict(types)}); first:\n{first}"
        )
    return list(results)  # type: ignore[arg-type]


def kinds(answers: Iterable[Answer]) -> Counter[str]:
    return Counter(a.kind for a in answers)


# -- The database afterwards: read in a fresh session, checked for the invariants -------


@dataclass
class World:
    """Every row, as a fresh session reads it in one transaction."""

    users: dict[int, dict[str, Any]]
    teams: dict[int, str]
    balances: dict[int, Decimal]
    profiles: list[int]  # user ids

    def users_named(self, name: str) -> list[dict[str, Any]]:
        return [u for u in self.users.values() if u["name"] == name]

    def email_of(self, user_id: int) -> str | None:
        user = self.users.get(user_id)
        return None if user is None else user["email"]


async def observe(engine: AsyncEngine) -> World:
    """Read the database and check what must hold after any race, on any backend."""
    async with make_session_maker(engine)() as session, session.begin():
        users = {
            row.id: {
                "name": row.name,
                "email": row.email,
                "is_active": row.is_active,
                "team_id": row.team_id,
            }
            for row in (await session.exec(select(User))).all()
        }
        teams = dict((await session.exec(select(Team.id, Team.name))).all())
        accounts = (await session.exec(select(Account))).all()
        profiles = list((await session.exec(select(Profile.user_id))).all())
    world = World(
        users=users,
        teams=teams,
        balances={a.id: a.balance for a in accounts},
        profiles=profiles,
    )
    emails = [u["email"] for u in users.values()]
    assert all(e == canonical_email(e) for e in emails), f"an email not canonical: {emails}"
    folded = Counter(e.lower() for e in emails)
    assert max(folded.values(), default=1) == 1, f"emails equal but for case: {folded}"
    assert {u["team_id"] for u in users.values()} <= {None, *teams}, "a member of no team"
    assert set(profiles) <= set(users) and len(set(profiles)) == len(profiles), profiles
    assert all(b >= 0 for b in world.balances.values()), f"negative balance: {world.balances}"
    return world


def book(balances: dict[int, Decimal], transfer: tuple[int, int, str], answer: Answer) -> None:
    """Apply a transfer to the expected balances if it was answered "moved"."""
    source, target, amount = transfer
    if answer.kind == MOVED:
        balances[source] -= Decimal(amount)
        balances[target] += Decimal(amount)


@dataclass
class Fresh:
    """The ids of the rows a round starts from, in the order they were given."""

    teams: list[int]
    users: list[int]
    accounts: list[int]


async def fresh(
    engine: AsyncEngine,
    *,
    teams: Iterable[str] = (),
    users: Iterable[str | tuple[str, str]] = (),
    accounts: Iterable[str] = (),
) -> Fresh:
    """Delete every row, then store these, in one transaction: a round starts from them.

    A user is an email (named after its local part), or (email, name of their team).
    """
    async with session_scope(make_session_maker(engine)) as session:
        for table in reversed(SQLModel.metadata.sorted_tables):
            await session.exec(delete(table))
        team_rows = {name: Team(name=name) for name in teams}
        user_rows = []
        for user in users:
            email, team = (user, None) if isinstance(user, str) else user
            row = User(name=email.split("@")[0], email=email)
            if team is not None:
                row.team = team_rows[team]
            user_rows.append(row)
        account_rows = [
            Account(owner=f"owner {i}", balance=Decimal(b)) for i, b in enumerate(accounts)
        ]
        session.add_all([*team_rows.values(), *user_rows, *account_rows])
        await session.flush()
        return Fresh(
            [t.id for t in team_rows.values()],
            [u.id for u in user_rows],
            [a.id for a in account_rows],
        )


def case_variant(email: str, rng: random.Random) -> str:
    """The same email in a random mix of upper and lower case."""
    return "".join(c.upper() if rng.random() < 0.5 else c for c in email)


# == 1. Interleavings: s1 holds its transaction, s2 must wait, s1 commits or rolls back ==


@dataclass
class Rows:
    """The rows every interleaving starts from (ids differ from run to run)."""

    a: int  # a@example.com, in `team`
    b: int  # b@example.com, no team
    c: int  # c@example.com, no team
    team: int  # "Team"
    ada: int  # 10.00
    bob: int  # 0.00
    carl: int  # 0.00


async def seed(engine: AsyncEngine) -> Rows:
    start = await fresh(
        engine,
        teams=["Team"],
        users=[("a@example.com", "Team"), "b@example.com", "c@example.com"],
        accounts=["10.00", "0.00", "0.00"],
    )
    return Rows(*start.users, *start.teams, *start.accounts)


LOCK_WAITERS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'",
    "mysql": "SELECT count(*) FROM information_schema.innodb_trx t "
    "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
    "WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()",
}


# How often to ask: InnoDB refreshes innodb_trx only if 0.1 s passed since it was last read.
POLL = {"postgresql": 0.01, "mysql": 0.12}


async def assert_waits(engine: AsyncEngine, task: asyncio.Task[Any]) -> None:
    """``task`` (s2) must be waiting for a lock s1 holds: as the server reports it,
    or on SQLite (which reports nothing) by still being pending a moment later."""
    backend = engine.dialect.name
    if backend == "sqlite":
        done, _ = await asyncio.wait({task}, timeout=SQLITE_WAIT)
        assert not done, f"s2 did not wait for s1: {task.result()}"
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_DEADLINE
    await asyncio.sleep(0.03)  # time for s2 to send its statement
    while True:
        async with engine.connect() as conn:  # a new transaction: fresh statistics
            if (await conn.execute(text(LOCK_WAITERS[backend]))).scalar_one():
                return
        assert not task.done(), f"s2 did not wait for s1: {task.result()}"
        assert loop.time() < deadline, "s2 neither finished nor waited for a lock"
        await asyncio.sleep(POLL[backend])


async def capture(call: Awaitable[Answer]) -> Answer | BaseException:
    try:
        return await call
    except Exception as exc:
        return exc


async def interleave(
    engine: AsyncEngine,
    first: Callable[[AsyncSession], Awaitable[Any]],
    second: Callable[[], Awaitable[Answer]],
    end: str,
) -> Answer:
    """s1: begin; s1: ``first`` (it joins s1's transaction); s2: ``second`` (its own
    transaction), which must wait; s1: commit or rollback (``end``); s2: answers."""
    async with make_session_maker(engine)() as s1:
        await s1.begin()
        try:
            await asyncio.wait_for(first(s1), STEP_TIMEOUT)
            waiter = asyncio.create_task(capture(second()))
            try:
                await assert_waits(engine, waiter)
            finally:
                await (s1.commit() if end == "commit" else s1.rollback())
                answer = await asyncio.wait_for(waiter, STEP_TIMEOUT)
        finally:
            if s1.in_transaction():
                await s1.rollback()
    if isinstance(answer, BaseException):
        raise answer
    return answer


@dataclass(frozen=True)
class Interleaving:
    """s1 runs ``first``; s2 runs ``second``; after each ending of s1, s2 answers
    ``answers[end]`` and ``stored(world, rows)`` reads ``stored_after[end]``."""

    first: Callable[[AsyncSession, Rows], Awaitable[Any]]
    second: Callable[[Layer, Rows], Awaitable[Answer]]
    answers: dict[str, str | Answer]
    stored: Callable[[World, Rows], Any]
    stored_after: dict[str, Any]
    layers: tuple[str, ...] = ("functions", "api")


def both(value: Any) -> dict[str, Any]:
    return {"commit": value, "rollback": value}


def emails_of(*names: str) -> Callable[[World, Rows], tuple[str | None, ...]]:
    return lambda world, rows: tuple(world.email_of(getattr(rows, n)) for n in names)


INTERLEAVINGS: dict[str, Interleaving] = {
    "s1 deletes a user, s2 patches it": Interleaving(
        first=lambda s, r: crud.delete_user(s, r.a),
        second=lambda layer, r: layer.update_user(r.a, {"name": "S2"}),
        answers={"commit": USER_GONE, "rollback": UPDATED},
        stored=lambda w, r: w.users.get(r.a, {}).get("name"),
        stored_after={"commit": None, "rollback": "S2"},
    ),
    "s1 patches a user, s2 deletes it": Interleaving(
        first=lambda s, r: crud.update_user(s, r.a, {"name": "S1"}),
        second=lambda layer, r: layer.delete_user(r.a),
        answers=both(DELETED),
        stored=lambda w, r: r.a in w.users,
        stored_after=both(False),
    ),
    "s1 takes an email, s2 wants it in another case": Interleaving(
        first=lambda s, r: crud.update_user(s, r.a, {"email": "new@example.com"}),
        second=lambda layer, r: layer.update_user(r.b, {"email": "NEW@Example.com"}),
        answers={"commit": EMAIL_TAKEN, "rollback": UPDATED},
        stored=emails_of("a", "b"),
        stored_after={
            "commit": ("new@example.com", "b@example.com"),
            "rollback": ("a@example.com", "new@example.com"),
        },
    ),
    "s1 deletes a user, s2 takes its email": Interleaving(
        first=lambda s, r: crud.delete_user(s, r.a),
        second=lambda layer, r: layer.update_user(r.b, {"email": "A@example.com"}),
        answers={"commit": UPDATED, "rollback": EMAIL_TAKEN},
        stored=emails_of("a", "b"),
        stored_after={
            "commit": (None, "a@example.com"),
            "rollback": ("a@example.com", "b@example.com"),
        },
    ),
    "s1 creates a user, s2 the same email in another case": Interleaving(
        first=lambda s, r: crud.create_user(s, User(name="S1", email="x@example.com")),
        second=lambda layer, r: layer.create_user("S2", "X@Example.COM"),
        answers={"commit": EMAIL_TAKEN, "rollback": CREATED},
        stored=lambda w, r: sorted(u["name"] for u in w.users.values() if u["email"][0] == "x"),
        stored_after={"commit": ["S1"], "rollback": ["S2"]},
    ),
    "s1 creates a team, s2 the same name with spaces": Interleaving(
        first=lambda s, r: relationships.create_team(s, "Red"),
        second=lambda layer, r: layer.create_team("  Red "),
        answers={"commit": NAME_TAKEN, "rollback": CREATED},
        stored=lambda w, r: sorted(w.teams.values()),
        stored_after=both(["Red", "Team"]),
    ),
    "s1 deletes a team, s2 moves a user into it": Interleaving(
        first=lambda s, r: relationships.delete_team(s, r.team),
        second=lambda layer, r: layer.move(r.b, r.team),
        answers={"commit": TEAM_GONE, "rollback": UPDATED},
        stored=lambda w, r: [w.users[i]["team_id"] == r.team for i in (r.a, r.b)],
        stored_after={"commit": [False, False], "rollback": [True, True]},
    ),
    "s1 deletes a team, s2 creates a member of it": Interleaving(
        first=lambda s, r: relationships.delete_team(s, r.team),
        second=lambda layer, r: layer.create_user("S2", "s2@example.com", r.team),
        answers={"commit": TEAM_GONE, "rollback": CREATED},
        stored=lambda w, r: [u["team_id"] is not None for u in w.users_named("S2")],
        stored_after={"commit": [], "rollback": [True]},
        layers=("api",),  # crud.create_user documents no answer for a missing team
    ),
    "s1 moves a user into a team, s2 deletes the team": Interleaving(
        first=lambda s, r: relationships.move_member(s, r.b, r.team),
        second=lambda layer, r: layer.delete_team(r.team),
        answers=both(DELETED),
        stored=lambda w, r: (sorted(w.teams.values()), w.users[r.b]["team_id"]),
        stored_after=both(([], None)),
        layers=("functions",),
    ),
    "s1 transfers all of Ada's money, s2 some of it": Interleaving(
        first=lambda s, r: transactions.transfer_funds(s, r.ada, r.bob, Decimal("10.00")),
        second=lambda layer, r: layer.transfer(r.ada, r.carl, "5.00"),
        answers={"commit": NO_FUNDS, "rollback": MOVED},
        stored=lambda w, r: [str(w.balances[i]) for i in (r.ada, r.bob, r.carl)],
        stored_after={"commit": ["0.00", "10.00", "0.00"], "rollback": ["5.00", "0.00", "5.00"]},
    ),
    "s1 bulk-creates two users, s2 an overlapping batch": Interleaving(
        first=lambda s, r: crud.create_users(
            s, [User(name="S1", email="p@example.com"), User(name="S1", email="q@example.com")]
        ),
        second=lambda layer, r: layer.create_users([("S2", "Q@example.com"), ("S2", "r@x.org")]),
        answers={"commit": EMAIL_TAKEN, "rollback": CREATED},
        stored=lambda w, r: sorted(u["email"] for u in w.users.values() if u["name"] != "a"),
        stored_after={
            "commit": ["b@example.com", "c@example.com", "p@example.com", "q@example.com"],
            "rollback": ["b@example.com", "c@example.com", "q@example.com", "r@x.org"],
        },
        layers=("functions",),
    ),
    "s1 deactivates a and b, s2 b and c": Interleaving(
        first=lambda s, r: crud.deactivate_users(s, [r.a, r.b]),
        second=lambda layer, r: layer.deactivate_users([r.b, r.c]),
        answers={"commit": Answer(UPDATED, 1), "rollback": Answer(UPDATED, 2)},
        stored=lambda w, r: [w.users[i]["is_active"] for i in (r.a, r.b, r.c)],
        stored_after={"commit": [False, False, False], "rollback": [True, False, False]},
        layers=("functions",),
    ),
    "s1 stores a profile for a user, s2 another one": Interleaving(
        first=lambda s, r: profile_for(s, r.a, "S1"),
        second=lambda layer, r: layer.complex_operation(r.a, "S2", ""),
        answers={"commit": PROFILE_REFUSED, "rollback": PROFILE_STORED},
        stored=lambda w, r: w.profiles == [r.a],
        stored_after=both(True),
        layers=("functions",),
    ),
    "s1 answers a transfer under a key, s2 retries it": Interleaving(
        first=lambda s, r: keyed_transfer(s, r, "key-1"),
        second=lambda layer, r: keyed_transfer_in_own_session(layer, r, "key-1"),
        answers=both(Answer(MOVED, (200, {"ada": "6.00", "bob": "4.00"}))),
        stored=lambda w, r: [str(w.balances[i]) for i in (r.ada, r.bob)],
        stored_after=both(["6.00", "4.00"]),
        layers=("functions",),
    ),
}


async def profile_for(session: AsyncSession, user_id: int, bio: str) -> bool:
    user = await session.get(User, user_id)
    assert user is not None
    return await transactions.complex_operation(session, user, bio)


async def keyed_transfer(session: AsyncSession, rows: Rows, key: str) -> Answer:
    """api.answer_once around a transfer of 4.00 from Ada to Bob, as the app runs it."""

    async def work(tx: AsyncSession) -> tuple[int, dict[str, Any]]:
        await transactions.move_money(tx, rows.ada, rows.bob, Decimal("4.00"))
        statement = select(Account).where(col(Account.id).in_([rows.ada, rows.bob]))
        accounts = (await tx.exec(statement.execution_options(populate_existing=True))).all()
        balances = {a.id: str(a.balance) for a in accounts}
        return 200, {"ada": balances[rows.ada], "bob": balances[rows.bob]}

    request = hashlib.sha256(json.dumps([rows.ada, rows.bob, "4.00"]).encode()).hexdigest()
    return Answer(MOVED, await answer_once(session, key, request, work))


async def keyed_transfer_in_own_session(layer: Layer, rows: Rows, key: str) -> Answer:
    assert isinstance(layer, Functions)
    async with layer.sessions() as session:
        return await keyed_transfer(session, rows, key)


def _interleaving_cases() -> list[Any]:
    return [
        pytest.param(name, layer, end, id=f"{name}-{layer}-{end}")
        for name, case in INTERLEAVINGS.items()
        for layer in case.layers
        for end in ("commit", "rollback")
    ]


@pytest.mark.parametrize(("case", "layer", "end"), _interleaving_cases(), indirect=["layer"])
async def test_interleaving(engine, layer: Layer, case: str, end: str) -> None:
    """One row of INTERLEAVINGS, with s1 ending in ``end``, s2 called through ``layer``."""
    scenario = INTERLEAVINGS[case]
    rows = await seed(engine)
    answer = await interleave(
        engine, lambda s1: scenario.first(s1, rows), lambda: scenario.second(layer, rows), end
    )
    expected = scenario.answers[end]
    assert (answer if isinstance(expected, Answer) else answer.kind) == expected, answer
    world = await observe(engine)
    assert scenario.stored(world, rows) == scenario.stored_after[end]


@only_functions
@pytest.mark.parametrize("writer", ["create_user", "update_user"])
async def test_crud_answers_a_team_deleted_meanwhile_as_not_found(engine, layer, writer) -> None:
    """s1 deletes team T and holds it; s2 creates a user in T, or patches one into
    it, with crud's functions, and waits; s1 commits; s2 must answer "team not
    found" (as move_member and the app do) and store nothing."""
    rows = await seed(engine)
    second = {
        "create_user": lambda: layer.create_user("S2", "s2@example.com", rows.team),
        "update_user": lambda: layer.update_user(rows.b, {"team_id": rows.team}),
    }[writer]
    answer = await interleave(
        engine, lambda s1: relationships.delete_team(s1, rows.team), second, "commit"
    )
    assert answer.kind == TEAM_GONE
    world = await observe(engine)
    assert world.users_named("S2") == [] and world.users[rows.b]["team_id"] is None


@pytest.mark.parametrize("joiner", ["update_user", "move_member"])
async def test_a_team_deleted_while_a_user_joins_gives_the_user_a_new_version(
    engine, joiner: str
) -> None:
    """s1 deletes team T; between its statements -- just before its DELETE, when the
    foreign key's ON DELETE SET NULL would act on its own -- s2 moves user b into T
    and tries to commit (waiting at most 1 s). Whatever the order, what s2 answered
    must still describe b, or b must have a newer version: a client holding s2's
    ETag must not write over a team_id it never saw. (On PostgreSQL and MariaDB s2
    committed in that gap and the SET NULL cleared its team without a new version;
    s1 now locks T first, so s2 waits and finds T gone.)"""
    rows = await seed(engine)
    sessions = make_session_maker(engine)

    async def join() -> User | None:
        async with sessions() as s2:
            if joiner == "move_member":
                return await relationships.move_member(s2, rows.b, rows.team)
            return await crud.update_user(s2, rows.b, {"team_id": rows.team})

    joined: list[asyncio.Task[User | None]] = []
    deleter: list[asyncio.Task[bool]] = []

    def before_statement(_conn, _cursor, statement: str, *_args) -> None:
        deleting = statement.lstrip().upper().startswith(("DELETE FROM TEAM", 'DELETE FROM "TEAM"'))
        if deleting and deleter and asyncio.current_task() is deleter[0] and not joined:
            joined.append(asyncio.get_running_loop().create_task(join()))
            await_(asyncio.wait(joined, timeout=1.0))  # s2 commits, or waits for s1

    async def delete_it() -> bool:
        async with sessions() as s1:
            return await relationships.delete_team(s1, rows.team)

    event.listen(engine.sync_engine, "before_cursor_execute", before_statement)
    try:
        deleter.append(asyncio.get_running_loop().create_task(delete_it()))
        assert await asyncio.wait_for(deleter[0], STEP_TIMEOUT)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before_statement)
    answer = await capture(asyncio.wait_for(joined[0], STEP_TIMEOUT))
    async with sessions() as session:
        stored = await session.get(User, rows.b)
    assert stored.team_id is None  # the team is gone
    if isinstance(answer, LookupError):  # s2 waited for s1 and found T gone
        assert str(answer) == f"Team {rows.team} not found" and stored.version == 1
    else:  # s2 committed first: s1's delete changed b again, and says so
        assert answer.team_id == rows.team and stored.version > answer.version


async def test_a_reader_never_waits_for_a_writer(engine, layer: Layer) -> None:
    """s1 holds a transfer; s2 reads the account at once and sees the committed balance."""
    rows = await seed(engine)
    async with make_session_maker(engine)() as s1, s1.begin():
        await transactions.transfer_funds(s1, rows.ada, rows.bob, Decimal("4.00"))
        during = await asyncio.wait_for(layer.read_account(rows.ada), 2.0)
    after = await asyncio.wait_for(layer.read_account(rows.ada), STEP_TIMEOUT)
    assert (during, after) == (Answer(READ, Decimal("10.00")), Answer(READ, Decimal("6.00")))


async def test_a_deadlock_in_a_writers_flush_is_retried(
    engine, layer: Layer, backend: str, request: pytest.FixtureRequest
) -> None:
    """s1: begin; s1 changes 20 accounts (the heavier transaction) and locks team T;
    s2 moves user u into T (functions: move_member; api: PATCH team_id): its flush
    waits for T; s1 locks u: a deadlock on the servers. The database ends the
    lighter one, s2, which must be run again (it is a deadlock) and move u once s1
    commits. SQLite has one writer: s2 waits for s1 to commit, no deadlock."""
    start = await fresh(engine, teams=["T"], users=["u@example.com"], accounts=["1.00"] * 20)
    (team,), (user,) = start.teams, start.users
    errors: list[Any] = []

    def note(context: Any) -> None:
        errors.append(error_code(context.sqlalchemy_exception))

    event.listen(engine.sync_engine, "handle_error", note)
    waiter: asyncio.Task[Answer | BaseException] | None = None
    try:
        async with make_session_maker(engine)() as s1:
            await s1.begin()
            await s1.exec(update(Account).values(owner="s1"))
            await s1.exec(select(Team.id).where(Team.id == team).with_for_update())
            waiter = asyncio.create_task(capture(layer.move(user, team)))
            await assert_waits(engine, waiter)
            locked = select(User.id).where(User.id == user).with_for_update()
            await asyncio.wait_for(s1.exec(locked), STEP_TIMEOUT)
            await s1.commit()
            answer = await asyncio.wait_for(waiter, STEP_TIMEOUT)
    finally:
        event.remove(engine.sync_engine, "handle_error", note)
        if waiter is not None and not waiter.done():
            waiter.cancel()
    deadlocks = {"sqlite": [], "postgresql": [("postgresql", "40P01")], "mysql": [("mysql", 1213)]}
    assert [e for e in errors if e is not None and e[1] in ("40P01", 1213)] == deadlocks[backend]
    if isinstance(answer, BaseException):
        raise answer
    assert answer.kind == UPDATED
    assert (await observe(engine)).users[user]["team_id"] == team


# == 2. Storms: one write path raced against itself =====================================


async def test_racing_creates_of_one_email_in_any_case_store_one_user(engine, layer) -> None:
    """Five users created at once with one email in random cases: one is stored."""
    for round_ in range(ROUNDS):
        await fresh(engine)
        rng = random.Random(round_)
        names = [f"racer {i}" for i in range(5)]
        answers = await storm(
            *(layer.create_user(n, case_variant("ada@example.com", rng)) for n in names)
        )
        assert kinds(answers) == {CREATED: 1, EMAIL_TAKEN: 4}, (round_, answers)
        (winner,) = [(a.value, n) for a, n in zip(answers, names, strict=True) if a.kind == CREATED]
        world = await observe(engine)
        stored = [(i, u["name"]) for i, u in world.users.items()]
        assert stored == [winner], f"round {round_}: stored {stored}, answered {winner}"


async def test_patches_of_twenty_users_all_succeed(engine, layer) -> None:
    """Each PATCH reads, then writes: on SQLite these failed with "database is locked"."""
    for round_ in range(ROUNDS):
        ids = (await fresh(engine, users=[f"u{i}@example.com" for i in range(20)])).users
        answers = await storm(*(layer.update_user(i, {"name": f"renamed {i}"}) for i in ids))
        assert kinds(answers) == {UPDATED: 20}, (round_, answers)
        world = await observe(engine)
        assert {i: u["name"] for i, u in world.users.items()} == {i: f"renamed {i}" for i in ids}


async def test_patches_of_one_user_keep_a_value_sent_for_every_field(engine, layer) -> None:
    """Five PATCHes of one user at once: two of its name, one each of its email,
    is_active and team (functions: move_member): all answered
    200, and each field ends with one of the values sent for it (no lost update:
    the old value of every field is gone)."""
    for round_ in range(ROUNDS):
        start = await fresh(engine, teams=["Red"], users=["old@example.com"])
        (user,), (red,) = start.users, start.teams
        sent: dict[str, list[Any]] = {
            "name": ["N1", "N2"],
            "email": ["E1@Example.COM"],
            "is_active": [False],
            "team_id": [red],
        }
        calls = [
            layer.move(user, value) if name == "team_id" else layer.update_user(user, {name: value})
            for name, values in sent.items()
            for value in values
        ]
        answers = await storm(*calls)
        assert kinds(answers) == {UPDATED: 5}, (round_, answers)
        stored = (await observe(engine)).users[user]
        for name, values in sent.items():
            canonical = [canonical_email(v) for v in values] if name == "email" else values
            assert stored[name] in canonical, f"round {round_}: {name} = {stored[name]}"


async def test_two_patches_racing_for_one_new_email(engine, layer) -> None:
    """Three pairs of users, each pair racing for a new email (in two cases):
    exactly one of each pair gets it, the other is refused and keeps its own."""
    emails = [f"u{i}@example.com" for i in range(6)]
    for round_ in range(ROUNDS):
        ids = (await fresh(engine, users=emails)).users
        pairs = [(ids[2 * p], ids[2 * p + 1], f"new{p}@example.com") for p in range(3)]
        calls = []
        for first, second, email in pairs:
            calls += [
                layer.update_user(first, {"email": email}),
                layer.update_user(second, {"email": email.upper()}),
            ]
        answers = await storm(*calls)
        world = await observe(engine)
        for p, (first, second, email) in enumerate(pairs):
            pair = answers[2 * p : 2 * p + 2]
            assert sorted(a.kind for a in pair) == [EMAIL_TAKEN, UPDATED], (round_, pair)
            winner, loser = (first, second) if pair[0].kind == UPDATED else (second, first)
            assert world.email_of(winner) == email
            assert world.email_of(loser) == emails[ids.index(loser)]


async def test_patches_and_deletes_of_the_same_users(engine, layer) -> None:
    """Per pair of users (a, b): two DELETEs of a, a PATCH of a's name, and a PATCH
    of b's email to a's, all at once. One DELETE wins, the other is 404; the
    PATCH of a is 200 or 404, never 500; b gets a's email only if its PATCH got 200."""
    emails = [f"u{i}@example.com" for i in range(4)]
    for round_ in range(ROUNDS):
        ids = (await fresh(engine, users=emails)).users
        pairs = [(ids[2 * p], ids[2 * p + 1]) for p in range(2)]
        calls = []
        for a, b in pairs:
            calls += [
                layer.delete_user(a),
                layer.delete_user(a),
                layer.update_user(a, {"name": "patched"}),
                layer.update_user(b, {"email": emails[ids.index(a)]}),
            ]
        answers = await storm(*calls)
        world = await observe(engine)
        for p, (a, b) in enumerate(pairs):
            deletes = answers[4 * p : 4 * p + 2]
            patch_a, patch_b = answers[4 * p + 2 : 4 * p + 4]
            assert sorted(d.kind for d in deletes) == [DELETED, USER_GONE], (round_, deletes)
            assert patch_a.kind in (UPDATED, USER_GONE), (round_, patch_a)
            assert patch_b.kind in (UPDATED, EMAIL_TAKEN), (round_, patch_b)
            assert a not in world.users
            email_a, email_b = (emails[ids.index(i)] for i in (a, b))
            assert world.email_of(b) == (email_a if patch_b.kind == UPDATED else email_b)


@only_functions
async def test_overlapping_deactivations_count_every_user_once(engine, layer) -> None:
    """Deactivations of overlapping sets, with renames of the same users racing them:
    the counts add up to the number of users, and no rename is lost."""
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        ids = (await fresh(engine, users=[f"u{i}@example.com" for i in range(6)])).users
        subsets = [rng.sample(ids, 3) for _ in range(2)] + [ids[:3], ids[3:]]
        renames = [layer.update_user(i, {"name": f"renamed {i}"}) for i in ids[2:3]]
        answers = await storm(*(layer.deactivate_users(s) for s in subsets), *renames)
        counts = [a.value for a in answers[: len(subsets)]]
        assert sum(counts) == len(ids), (round_, counts)
        assert kinds(answers[len(subsets) :]) == {UPDATED: len(renames)}
        world = await observe(engine)
        assert not any(u["is_active"] for u in world.users.values())
        assert world.users[ids[2]]["name"] == f"renamed {ids[2]}"


@only_functions
async def test_bulk_creates_with_overlapping_emails_are_all_or_nothing(engine, layer) -> None:
    """Four batches of three emails from a pool of five (in random case), and a
    single create: each batch is stored whole, with its ids, or not at all."""
    pool = [f"p{i}@example.com" for i in range(5)]
    for round_ in range(ROUNDS):
        await fresh(engine)
        rng = random.Random(round_)
        batches = [
            [(f"batch {b}", case_variant(e, rng)) for e in rng.sample(pool, 3)] for b in range(4)
        ]
        answers = await storm(
            *(layer.create_users(b) for b in batches), layer.create_user("single", rng.choice(pool))
        )
        world = await observe(engine)
        for b, (batch, answer) in enumerate(zip(batches, answers[:-1], strict=True)):
            stored = sorted(
                (i, u["email"]) for i, u in world.users.items() if u["name"] == f"batch {b}"
            )
            if answer.kind == CREATED:
                assert stored == sorted((i, email) for i, _, email in answer.value), (round_, b)
                assert [e for _, _, e in answer.value] == [canonical_email(e) for _, e in batch]
            else:
                assert answer.kind == EMAIL_TAKEN and stored == [], (round_, b, answer)
        single = [i for i, u in world.users.items() if u["name"] == "single"]
        assert single == ([answers[-1].value] if answers[-1].kind == CREATED else [])
        assert CREATED in kinds(answers), "the first writer to commit cannot conflict"


async def test_racing_team_creates_keep_one_team_per_name(engine, layer) -> None:
    """ "Red" with and without spaces is one name; "red" is another (names are exact)."""
    names = ["Red", " Red", "red", "Red ", " red"]
    for _round in range(ROUNDS):
        await fresh(engine)
        answers = await storm(*(layer.create_team(n) for n in names))
        assert kinds(answers) == {CREATED: 2, NAME_TAKEN: 3}, answers
        created = {a.value: names[i].strip() for i, a in enumerate(answers) if a.kind == CREATED}
        assert (await observe(engine)).teams == created


async def test_moves_into_a_team_while_it_is_deleted(engine, layer) -> None:
    """Four users move into team T (functions: move_member; api: PATCH team_id)
    while T is deleted, and (api) a user is created in T. A move answered
    200 leaves the user with no team (the delete came after it); a refused one
    ("team not found") leaves the user where they were: never an FK error."""
    users = [("h0@example.com", "Home"), ("h1@example.com", "Home"), "n0@x.org", "n1@x.org"]
    for round_ in range(ROUNDS):
        start = await fresh(engine, teams=["Target", "Home"], users=users)
        (target, home), movers = start.teams, start.users
        moves = [layer.move(u, target) for u in movers]
        creates = []
        if isinstance(layer, Api):  # crud.create_user documents no answer for a missing team
            creates = [layer.create_user("new 0", "new0@example.com", target)]
        delete_at = round_ % (len(moves) + 1)  # the delete starts before, among, after the moves
        calls = [*moves[:delete_at], layer.delete_team(target), *moves[delete_at:], *creates]
        answers = await storm(*calls)
        assert answers.pop(delete_at).kind == DELETED
        world = await observe(engine)
        moved = answers[: len(movers)]
        for user, was, answer in zip(movers, [home, home, None, None], moved, strict=True):
            assert answer.kind in (UPDATED, TEAM_GONE), (round_, answer)
            assert world.users[user]["team_id"] == (None if answer.kind == UPDATED else was)
        for i, answer in enumerate(answers[len(movers) :]):
            assert answer.kind in (CREATED, TEAM_GONE), (round_, answer)
            stored = [u["team_id"] for u in world.users_named(f"new {i}")]
            assert stored == ([None] if answer.kind == CREATED else [])


async def test_transfers_among_three_accounts_with_reads_and_new_accounts(engine, layer) -> None:
    """Eight transfers in random directions among three accounts, reads of them,
    and accounts opened meanwhile: every balance is exactly its opening balance
    plus the transfers answered "moved", none is negative, and (functions) a
    reader of all balances at once never sees money in flight."""
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        accounts = (await fresh(engine, accounts=["50.00"] * 3)).accounts
        transfers = [
            (*rng.sample(accounts, 2), f"{rng.randint(100, 4000) / 100:.2f}") for _ in range(8)
        ]
        reads = [layer.read_account(rng.choice(accounts)) for _ in range(2)]
        if isinstance(layer, Functions):
            reads += [layer.read_total(accounts) for _ in range(2)]
        opens = [layer.open_account(f"new {i}", f"{i}.25") for i in range(2)]
        answers = await storm(*(layer.transfer(*t) for t in transfers), *reads, *opens)
        moved = answers[: len(transfers)]
        assert set(kinds(moved)) <= {MOVED, NO_FUNDS}, (round_, moved)
        read = answers[len(transfers) : len(transfers) + len(reads)]
        assert all(a.kind == READ and a.value >= 0 for a in read), (round_, read)
        assert all(a.value == Decimal("150.00") for a in read[2:]), "money in flight was seen"
        expected = dict.fromkeys(accounts, Decimal("50.00"))
        for transfer, answer in zip(transfers, moved, strict=True):
            book(expected, transfer, answer)
        for i, answer in enumerate(answers[-len(opens) :]):
            assert answer.kind == OPENED
            expected[answer.value] = Decimal(f"{i}.25")
        world = await observe(engine)
        assert world.balances == expected, f"round {round_}"


@only_api
async def test_idempotent_transfer_retries_racing(engine, layer) -> None:
    """Two keys, sent three and two times at once, racing a transfer without a key
    and a read: all answers under one key are identical, and its money moves once."""
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        ada, bob, carl = (await fresh(engine, accounts=["30.00", "30.00", "0.00"])).accounts
        keyed = {
            f"round-{round_}-key-{k}": (ada, rng.choice([bob, carl]), f"{10 + 10 * k}.00")
            for k in range(2)
        }
        plain = (bob, rng.choice([ada, carl]), "17.50")
        first, second = keyed.items()
        sends = [first] * 3 + [second] * 2  # (key, transfer): three retries, and two
        answers = await storm(
            *(layer.transfer(*t, key=key) for key, t in sends),
            layer.transfer(*plain),
            layer.read_account(ada),
        )
        expected = {ada: Decimal("30.00"), bob: Decimal("30.00"), carl: Decimal("0.00")}
        for key, transfer in keyed.items():
            same_key = {a for (k, _), a in zip(sends, answers[:5], strict=True) if k == key}
            assert len(same_key) == 1, f"round {round_}: different answers {same_key}"
            (answer,) = same_key
            assert answer.kind in (MOVED, NO_FUNDS), answer
            book(expected, transfer, answer)
        assert answers[-2].kind in (MOVED, NO_FUNDS), answers[-2]
        book(expected, plain, answers[-2])
        assert answers[-1].kind == READ
        assert (await observe(engine)).balances == expected, f"round {round_}"


@only_api
async def test_one_key_racing_for_two_different_transfers(engine, layer) -> None:
    """One key, two bodies, five requests at once: one body is done (once, all
    its requests answered alike), every request of the other is 422."""
    for round_ in range(ROUNDS):
        ada, bob, carl = (await fresh(engine, accounts=["10.00", "0.00", "0.00"])).accounts
        key = f"round-{round_}"
        bodies = [(ada, bob, "1.00"), (ada, carl, "2.00")] * 2 + [(ada, bob, "1.00")]
        answers = await storm(*(layer.transfer(*b, key=key) for b in bodies))
        done = {bodies[i] for i, a in enumerate(answers) if a.kind == MOVED}
        assert len(done) == 1, (round_, answers)
        (winner,) = done
        for body, answer in zip(bodies, answers, strict=True):
            assert answer.kind == (MOVED if body == winner else KEY_REUSED), (round_, answer)
        assert len({a for a in answers if a.kind == MOVED}) == 1
        expected = {ada: Decimal("10.00"), bob: Decimal("0.00"), carl: Decimal("0.00")}
        book(expected, winner, Answer(MOVED))
        assert (await observe(engine)).balances == expected


@only_functions
async def test_complex_operations_racing(engine, layer) -> None:
    """Two complex_operation calls for one new email, one for an email of its own,
    and two for one existing user: one user per email, one profile per user.
    The losers for the email get the documented error: the INSERT's own
    IntegrityError (a unique violation on user.email), and nothing is stored."""
    for round_ in range(ROUNDS):
        (existing,) = (await fresh(engine, users=["old@example.com"])).users
        same = [layer.complex_operation(None, f"same {i}", "TEST@example.com") for i in range(2)]
        own = layer.complex_operation(None, "own", "own@example.com")
        more = [layer.complex_operation(existing, f"more {i}", "") for i in range(2)]
        answers = await storm(*same, own, *more)
        assert kinds(answers[:2]) == {PROFILE_STORED: 1, EMAIL_TAKEN: 1}, (round_, answers[:2])
        assert answers[2].kind == PROFILE_STORED
        assert kinds(answers[3:]) == {PROFILE_STORED: 1, PROFILE_REFUSED: 1}
        world = await observe(engine)
        (winner,) = [i for i, a in enumerate(answers[:2]) if a.kind == PROFILE_STORED]
        names = sorted(u["name"] for u in world.users.values())
        assert names == sorted(["old", f"same {winner}", "own"])
        assert sorted(world.profiles) == sorted(world.users), "one profile per user"


# == 3. Everything at once: every writer against the others =============================


@dataclass
class Mix:
    """One round of the mixed storm: what each task sent, to check what it was answered."""

    rng: random.Random
    users: list[int]
    teams: list[int]
    accounts: list[int]
    sent: list[tuple[str, Any]] = field(default_factory=list)

    EMAILS = ("p0@example.com", "p1@example.com", "u0@example.com")  # the last one is taken
    TEAM_NAMES = ("Red", "T0")  # the last one is taken

    def email(self) -> str:
        return case_variant(self.rng.choice(self.EMAILS), self.rng)

    def team_name(self) -> str:
        return self.rng.choice(self.TEAM_NAMES)

    def call(self, task: int, layer: Layer) -> Awaitable[Answer]:
        """A random writer (or reader), tagged with the task's name, ``t<task>``."""
        rng, tag = self.rng, f"t{task}"
        user, team = rng.choice(self.users), rng.choice(self.teams)
        source, target = rng.sample(self.accounts, 2)
        amount = f"{rng.randint(1, 15)}.00"
        choices: dict[str, tuple[Any, Callable[[], Awaitable[Answer]]]] = {
            "create_user": (None, lambda: layer.create_user(tag, self.email())),
            "create_users": (None, lambda: layer.create_users([(tag, e) for e in self.EMAILS[:2]])),
            "rename": (user, lambda: layer.update_user(user, {"name": tag})),
            "change_email": (user, lambda: layer.update_user(user, {"email": self.email()})),
            "delete_user": (user, lambda: layer.delete_user(user)),
            "deactivate": (None, lambda: layer.deactivate_users(rng.sample(self.users, 2))),
            "move": (user, lambda: layer.move(user, rng.choice([team, None]))),
            "create_team": (None, lambda: layer.create_team(rng.choice(self.TEAM_NAMES))),
            "delete_team": (team, lambda: layer.delete_team(team)),
            "transfer": ((source, target, amount), lambda: layer.transfer(source, target, amount)),
            "read": (None, lambda: layer.read_account(source)),
            "open_account": (None, lambda: layer.open_account(tag, "5.00")),
            "complex_operation": (None, lambda: layer.complex_operation(None, tag, self.email())),
            "upsert": (None, lambda: layer.upsert_users([(tag, self.email()), (tag, "p9@x.org")])),
            "get_or_create_team": (None, lambda: layer.get_or_create_team(self.team_name())),
            "rename_if_unchanged": (
                user,
                lambda: layer.update_user_if_unchanged(user, {"name": tag}),
            ),
        }
        kind = rng.choice(sorted(choices))
        target_of_call, make = choices[kind]
        self.sent.append((kind, target_of_call))
        return make()


DOCUMENTED = {
    "create_user": {CREATED, EMAIL_TAKEN},
    "create_users": {CREATED, EMAIL_TAKEN},
    "rename": {UPDATED, USER_GONE},
    "change_email": {UPDATED, USER_GONE, EMAIL_TAKEN},
    "delete_user": {DELETED, USER_GONE},
    "deactivate": {UPDATED},
    "move": {UPDATED, USER_GONE, TEAM_GONE},
    "create_team": {CREATED, NAME_TAKEN},
    "delete_team": {DELETED, TEAM_GONE},
    "transfer": {MOVED, NO_FUNDS},
    "read": {READ},
    "open_account": {OPENED},
    "complex_operation": {PROFILE_STORED, EMAIL_TAKEN},
    "upsert": {UPSERTED},
    "get_or_create_team": {GOT},
    "rename_if_unchanged": {UPDATED, USER_GONE, VERSION_CHANGED},
}


async def test_every_writer_against_the_others(engine, layer) -> None:
    """Eight random writers at once per round (api: the app's endpoints and the
    functions it has none for), on four users, two teams and three accounts."""
    created_ids: list[int] = []
    for round_ in range(ROUNDS):
        start = await fresh(
            engine,
            teams=["T0", "T1"],
            users=[("u0@example.com", "T0"), ("u1@example.com", "T0"), "u2@x.org", "u3@x.org"],
            accounts=["20.00"] * 3,
        )
        accounts = start.accounts
        mix = Mix(random.Random(round_), start.users, start.teams, accounts)
        answers = await storm(*(mix.call(task, layer) for task in range(8)))
        world = await observe(engine)
        expected = dict.fromkeys(accounts, Decimal("20.00"))
        deleted: Counter[int] = Counter()
        upserted = False
        for task, ((kind, target), answer) in enumerate(zip(mix.sent, answers, strict=True)):
            tag, where = f"t{task}", f"round {round_}, task {task}, {kind}"
            assert answer.kind in DOCUMENTED[kind], f"{where}: {answer}"
            # Checked by id: an upsert of the same email may rename a user meanwhile.
            mine = world.users_named(tag)
            if kind in ("create_user", "create_users", "complex_operation"):
                if answer.kind in (CREATED, PROFILE_STORED):
                    ids = [u[0] for u in answer.value] if kind == "create_users" else [answer.value]
                    assert all(id_ in world.users for id_ in ids), f"{where}: {ids} not stored"
                    if kind == "complex_operation":
                        assert answer.value in world.profiles, f"{where}: no profile"
                    if kind == "create_user":
                        created_ids.append(answer.value)
                else:
                    assert not mine, f"{where}: refused, yet stored {mine}"
            elif kind == "delete_user" and answer.kind == DELETED:
                deleted[target] += 1
                assert target not in world.users, where
            elif kind == "create_team" and answer.kind == CREATED:
                assert answer.value in world.teams, where
            elif kind == "transfer":
                book(expected, target, answer)
            elif kind == "open_account":
                assert world.balances[answer.value] == Decimal("5.00"), where
                expected[answer.value] = Decimal("5.00")
            elif kind == "read":
                assert answer.value >= 0, where
            elif kind == "upsert":
                ids = [id_ for id_, _name, _email in answer.value]
                assert len(set(ids)) == 2 and all(n == tag for _, n, _ in answer.value), where
                upserted = True
            elif kind == "get_or_create_team":
                assert isinstance(answer.value, int), where
            elif kind == "rename_if_unchanged" and answer.kind == UPDATED:
                read, written = answer.value
                assert written == read + 1, f"{where}: wrote version {written} over {read}"
        assert max(deleted.values(), default=1) == 1, f"a user deleted twice: {deleted}"
        assert world.balances == expected, f"round {round_}: money lost or made"
        if upserted:  # no writer here deletes or renames p9's row
            emails = {user["email"] for user in world.users.values()}
            assert "p9@x.org" in emails, f"round {round_}: an upserted row is missing"
    assert len(set(created_ids)) == len(created_ids), "an id was handed out twice"
