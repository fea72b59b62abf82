"""Background tasks, on every backend: the request's session is the wrong one to use
after the response; the task's own unit of work (``api/background.py``) is right.

Each test adds a tiny route of its own to the ``app`` fixture's app and calls it
through httpx's ``ASGITransport``, with the app's real ``get_session`` (not the
fixtures' overrides): what FastAPI does with the request's session around the
background tasks is what is under test.

What FastAPI does (its ``routing.request_response``): since 0.118 the exit code
of a dependency with ``yield`` (``get_session``'s close) runs after the response
*and* its background tasks (``Response.__call__`` runs them); from 0.106 to 0.117
it ran before the response was sent, and since 0.121 ``Depends(..., scope=
"function")`` restores that. Both timings are reproduced here, whichever
FastAPI is installed (the second one needs 0.121 for ``scope``, or 0.106-0.117).
"""

import inspect
import logging
from typing import Annotated, Any

import fastapi
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.api import SessionDep, create_app, get_session
from asyncpatterns.api.background import (
    AfterResponseDep,
    run_after_response,
    run_unit_of_work,
)
from asyncpatterns.db import create_db_and_tables, make_session_maker
from asyncpatterns.models import User
from asyncpatterns.pooling import pool_status


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


# FastAPI 0.118 moved the dependencies' exit after the response and its tasks.
CLOSES_AFTER_TASKS = _version(fastapi.__version__) >= (0, 118)
HAS_SCOPE = "scope" in inspect.signature(Depends).parameters  # FastAPI 0.121

LATE = "late@example.com"


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """The app's own ``get_session`` (no override), in-process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def checked_out(app: FastAPI) -> int | None:
    return pool_status(app.state.engine).checked_out


async def stored(engine) -> list[tuple[str, str]]:
    """(email, name) of every user, read in a session of the test's own."""
    async with make_session_maker(engine)() as session:
        rows = await session.exec(select(User.email, User.name).order_by(User.email))
        return [tuple(row) for row in rows.all()]


async def add_ada(engine) -> int:
    async with make_session_maker(engine)() as session:
        user = User(name="Ada", email="ada@example.com")
        session.add(user)
        await session.commit()
        assert user.id is not None
        return user.id


def request_session(scope: str) -> Any:
    """``SessionDep`` as the kit declares it, or with FastAPI's ``scope="function"``."""
    if scope == "request":
        return SessionDep
    if not HAS_SCOPE:
        pytest.skip(f"FastAPI {fastapi.__version__} has no Depends(scope=...) (0.121)")
    return Annotated[AsyncSession, Depends(get_session, scope="function")]


def closed_before_tasks(scope: str) -> bool:
    return scope == "function" or not CLOSES_AFTER_TASKS


# -- the trap: the request's session in a background task ------------------------------


@pytest.mark.parametrize("commit", [False, True], ids=["no-commit", "commit"])
@pytest.mark.parametrize("scope", ["request", "function"])
async def test_trap_the_request_session_in_a_background_task(app, engine, scope, commit) -> None:
    """What the task sees in the request's session, and what is left afterwards.

    Open (FastAPI >= 0.118, ``SessionDep``): the task runs in the request's own
    transaction, on the request's connection (still checked out: a slow task
    holds it); a write it does not commit is rolled back when FastAPI closes the
    session after the task, silently. Closed (0.106-0.117, or ``scope="function"``):
    no error either: the closed session begins a new transaction on a new
    connection, and when the task does not commit that connection is still
    checked out after the response, holding the uncommitted write, until someone
    closes the session (here the test; in a server, the garbage collector).
    """
    Session = request_session(scope)
    seen: dict[str, Any] = {}

    async def task(session: AsyncSession) -> None:
        seen["session"] = session
        seen["same transaction"] = session.sync_session.get_transaction() is seen["request"]
        seen["open"] = session.in_transaction()
        seen["held during the task"] = checked_out(app)
        session.add(User(name="Late", email=LATE))
        await session.flush()  # no error: a closed session opens a new connection here
        if commit:
            await session.commit()

    async def endpoint(session: Session, tasks: BackgroundTasks) -> dict[str, bool]:  # type: ignore[valid-type]
        await session.exec(select(func.count()).select_from(User))  # the request reads
        seen["request"] = session.sync_session.get_transaction()
        tasks.add_task(task, session)
        return {"scheduled": True}

    app.add_api_route("/trap", endpoint, methods=["POST"])
    try:
        async with client_for(app) as client:
            response = await client.post("/trap")
        assert response.status_code == 200
        left_checked_out = checked_out(app)
        rows = await stored(engine)
    finally:
        if "session" in seen:
            await seen["session"].close()  # what the server never does for the task
    closed = closed_before_tasks(scope)
    assert seen["open"] is not closed
    assert seen["same transaction"] is not closed
    assert seen["held during the task"] == (0 if closed else 1)
    assert rows == ([(LATE, "Late")] if commit else [])
    assert left_checked_out == (1 if closed and not commit else 0)


async def test_trap_an_orm_object_handed_to_the_task(app, engine) -> None:
    """An object the request loaded is attached to the request's session while the
    task runs (FastAPI >= 0.118): the task's own session refuses it."""
    if not CLOSES_AFTER_TASKS:
        pytest.skip("before FastAPI 0.118 the object is detached when the task runs")
    await add_ada(engine)
    session_maker = app.state.session_maker
    seen: dict[str, Any] = {}

    async def rename(user: User) -> None:
        try:
            async with session_maker() as session:
                session.add(user)
                user.name = "Renamed"
                await session.commit()
        except InvalidRequestError as exc:
            seen["error"] = exc

    async def endpoint(session: SessionDep, tasks: BackgroundTasks) -> dict[str, bool]:
        user = (await session.exec(select(User))).one()
        tasks.add_task(rename, user)
        return {"scheduled": True}

    app.add_api_route("/orm", endpoint, methods=["POST"])
    async with client_for(app) as client:
        assert (await client.post("/orm")).status_code == 200
    assert "is already attached to session" in str(seen["error"])
    assert await stored(engine) == [("ada@example.com", "Ada")]
    assert checked_out(app) == 0


async def test_trap_a_failing_task_escapes_the_app(app, engine) -> None:
    """A task that raises does so after the answer is out: nothing can answer it, so
    it leaves the app (uvicorn: "Exception in ASGI application", and the keep-alive
    connection closed; in-process the request raises), and the next task never runs.
    A database error is one the app has a handler for: Starlette reports it as
    "Caught handled exception, but response already started". Where the request's
    session was closed before the task (FastAPI < 0.118), the failed task's new
    connection is left checked out as well."""
    await add_ada(engine)
    seen: dict[str, Any] = {}

    async def duplicate(session: AsyncSession) -> None:
        seen["session"] = session
        session.add(User(name="Eve", email="ada@example.com"))
        await session.commit()

    async def next_task() -> None:
        seen["next task ran"] = True

    async def endpoint(session: SessionDep, tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(duplicate, session)
        tasks.add_task(next_task)
        return {"scheduled": True}

    app.add_api_route("/boom", endpoint, methods=["POST"])
    try:
        async with client_for(app) as client:
            with pytest.raises(RuntimeError, match="response already started") as raised:
                await client.post("/boom")
        left_checked_out = checked_out(app)
    finally:
        if "session" in seen:
            await seen["session"].close()
    assert isinstance(raised.value.__cause__, IntegrityError)
    assert "next task ran" not in seen
    assert left_checked_out == (0 if CLOSES_AFTER_TASKS else 1)  # else get_session closed it


# -- the pattern: the task's own unit of work, from ids --------------------------------


async def rename_user(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name


async def add_user(session: AsyncSession, name: str, email: str) -> None:
    session.add(User(name=name, email=email))
    await session.flush()


async def test_pattern_the_task_commits_its_own_unit_of_work(app, engine) -> None:
    """The endpoint passes the id; after the response the task loads the row in its
    own session and its write is committed, whatever FastAPI's timing; no connection
    is left checked out."""
    user_id = await add_ada(engine)

    async def endpoint(session: SessionDep, after: AfterResponseDep) -> dict[str, int]:
        user = await session.get(User, user_id)  # the request uses its session, as always
        assert user is not None and user.id is not None
        after.run(rename_user, user.id, "Renamed")
        return {"id": user.id}

    app.add_api_route("/pattern", endpoint, methods=["POST"])
    async with client_for(app) as client:
        response = await client.post("/pattern")
    assert (response.status_code, response.json()) == (200, {"id": user_id})
    assert await stored(engine) == [("ada@example.com", "Renamed")]
    assert checked_out(app) == 0


async def test_pattern_a_failing_task_is_logged_once_and_breaks_nothing(
    app, engine, caplog
) -> None:
    """A task that fails (a duplicate email: a database error) is logged once, by
    name and error type (not the row's values); the response is a 2xx, the tasks
    after it run, and nothing is left checked out."""
    user_id = await add_ada(engine)

    async def endpoint(after: AfterResponseDep) -> dict[str, bool]:
        after.run(add_user, "Eve", "ada@example.com")  # taken: IntegrityError
        after.run(rename_user, user_id, "Renamed")
        return {"scheduled": True}

    app.add_api_route("/failing", endpoint, methods=["POST"], status_code=202)
    with caplog.at_level(logging.INFO, logger="asyncpatterns.api"):
        async with client_for(app) as client:
            response = await client.post("/failing")
    assert response.status_code == 202
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in errors] == ["asyncpatterns.api"]
    message = errors[0].getMessage()
    assert message.startswith("background task add_user (line ")
    assert message.endswith("failed: IntegrityError")
    assert "ada@example.com" not in message and "Eve" not in message
    assert errors[0].exc_info is None  # a traceback would print the driver's message
    assert await stored(engine) == [("ada@example.com", "Renamed")]
    assert checked_out(app) == 0


async def test_run_unit_of_work_answers_whether_it_committed(app, engine, caplog) -> None:
    user_id = await add_ada(engine)
    session_maker = app.state.session_maker
    assert await run_unit_of_work(session_maker, rename_user, user_id, "Renamed") is True
    with caplog.at_level(logging.ERROR, logger="asyncpatterns.api"):
        assert await run_unit_of_work(session_maker, add_user, "Eve", "ada@example.com") is False
    assert len(caplog.records) == 1
    assert await stored(engine) == [("ada@example.com", "Renamed")]
    assert checked_out(app) == 0


async def test_an_orm_object_is_refused_before_the_response(app, engine) -> None:
    """Handing the task an ORM object is a ``TypeError`` in the request (a bug
    found at once), not a task that fails later; ids, lists of ids and model
    classes are fine."""
    user_id = await add_ada(engine)
    tasks = BackgroundTasks()
    session_maker = app.state.session_maker
    async with session_maker() as session:
        user = await session.get(User, user_id)
        with pytest.raises(TypeError, match="pass its id instead"):
            run_after_response(tasks, session_maker, rename_user, user, "Renamed")
        with pytest.raises(TypeError, match="pass its id instead"):
            run_after_response(tasks, session_maker, rename_user, [user], name="Renamed")
    assert tasks.tasks == []
    run_after_response(tasks, session_maker, rename_user, user_id, "Renamed")
    run_after_response(tasks, session_maker, rename_user, [user_id], User)
    assert len(tasks.tasks) == 2


async def test_a_pool_of_one_connection_starves_the_task(caplog) -> None:
    """On FastAPI >= 0.118 the request's connection goes back to the pool only after
    its background tasks: with a pool of one (in-memory SQLite, ``make_engine``'s
    default) the task's own unit of work waits for it, gives up at ``pool_timeout``
    and is logged. A request that only read can end its read first (``await
    session.commit()``): then the connection is free for the task."""
    if not CLOSES_AFTER_TASKS:
        pytest.skip("before FastAPI 0.118 the request's session is closed before its tasks")
    app = create_app("sqlite+aiosqlite:///:memory:", pool_timeout=0.2)
    await create_db_and_tables(app.state.engine)

    async def endpoint(session: SessionDep, after: AfterResponseDep, done: bool) -> dict:
        await session.exec(select(func.count()).select_from(User))
        if done:
            await session.commit()  # it only read: the connection goes back now
        after.run(add_user, "Late", LATE)
        return {"scheduled": True}

    app.add_api_route("/one", endpoint, methods=["POST"])
    try:
        with caplog.at_level(logging.ERROR, logger="asyncpatterns.api"):
            async with client_for(app) as client:
                assert (await client.post("/one", params={"done": False})).status_code == 200
                assert (await client.post("/one", params={"done": True})).status_code == 200
        assert [r.getMessage() for r in caplog.records] == [
            "background task add_user failed: TimeoutError"
        ]
        async with app.state.session_maker() as session:
            assert (await session.exec(select(User.email))).all() == [LATE]
    finally:
        await app.state.engine.dispose()
