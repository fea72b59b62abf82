"""pytest fixtures for async SQLModel code, on every backend you have.

Opt in from your ``conftest.py``::

    pytest_plugins = ["asyncpatterns.testing"]

and configure pytest-asyncio so every test and fixture shares one event loop
(an engine must not be used from two loops)::

    [tool.pytest.ini_options]
    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "session"
    asyncio_default_test_loop_scope = "session"

Backends: SQLite always; PostgreSQL when ``ASYNCPATTERNS_POSTGRES_URL`` and
MySQL/MariaDB when ``ASYNCPATTERNS_MYSQL_URL`` name a server (any database on
it; the fixtures create a throw-away database there and drop it at the end).
A backend listed in ``ASYNCPATTERNS_REQUIRE_BACKENDS`` (comma-separated) that
is not configured or not reachable fails the tests instead of skipping them.
``ASYNCPATTERNS_BACKENDS`` (comma-separated) runs only the backends it names:
one pytest process per backend can then run side by side.

Fixtures:

* ``backend`` -- "sqlite", "postgresql" or "mysql"; tests using the fixtures
  below run once per backend.
* ``database_url`` -- a throw-away database with the tables created.
* ``engine`` -- an engine on it; rows committed by the test are deleted after it.
* ``session`` -- a session whose work is rolled back after the test, even if
  the code under test calls ``commit()``. ``async_session`` is the same
  fixture under the name the common async SQLModel pattern uses.
* ``app`` -- the kit's FastAPI app on the test database (override this fixture
  in your ``conftest.py`` to test your own app built the same way).
* ``client`` -- an ``httpx.AsyncClient`` calling ``app`` in-process, every
  request on the test ``session``: rolled back after the test. One request at
  a time (a session is not safe for concurrent use).
* ``live_client`` -- the same, but each request gets its own session from
  ``engine``: commits are real and requests may run concurrently (races).
  Rows are deleted after the test.
"""

import asyncio
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import delete
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .api import create_app, get_read_session, get_session
from .config import DatabaseUnavailableError
from .db import (
    create_db_and_tables,
    make_engine,
    make_session_maker,
    throwaway_database,
)

BACKENDS = ("sqlite", "postgresql", "mysql")
SERVER_URL_VARIABLES = {
    "postgresql": "ASYNCPATTERNS_POSTGRES_URL",
    "mysql": "ASYNCPATTERNS_MYSQL_URL",
}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per server backend the run left out, saying how to include it."""
    left_out: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        for name, variable in SERVER_URL_VARIABLES.items():
            if reason.startswith(f"Skipped: {name}: set {variable}"):
                left_out[name] += 1
    for name, count in left_out.items():
        terminalreporter.write_line(
            f"{name}: {count} tests not run (set {SERVER_URL_VARIABLES[name]} to a server URL "
            "to test this backend)"
        )


def required_backends() -> set[str]:
    return _names(os.environ.get("ASYNCPATTERNS_REQUIRE_BACKENDS", ""))


def _names(text: str) -> set[str]:
    return {name.strip() for name in text.split(",") if name.strip()}


async def _create_schema(url: URL) -> None:
    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    selected = _names(os.environ.get("ASYNCPATTERNS_BACKENDS", ""))
    if selected and name not in selected:
        pytest.skip(f"{name}: not selected (ASYNCPATTERNS_BACKENDS)")
    variable = SERVER_URL_VARIABLES.get(name)
    if variable and not os.environ.get(variable):
        message = f"{name}: set {variable} to a server URL to test this backend"
        if name in required_backends():
            pytest.fail(message + " (it is listed in ASYNCPATTERNS_REQUIRE_BACKENDS)")
        pytest.skip(message)
    return name


@pytest.fixture(scope="session")
def database_url(backend: str) -> Iterator[URL]:
    """A throw-away database for this test session, with the kit's tables."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = make_url(f"sqlite+aiosqlite:///{Path(folder) / 'test.db'}")
            asyncio.run(_create_schema(url))
            yield url
        return
    # Created and dropped on a short-lived loop of its own: no engine crosses loops.
    manager = throwaway_database(os.environ[SERVER_URL_VARIABLES[backend]], "asyncpatterns_test")
    loop = asyncio.new_event_loop()
    try:
        try:
            url = loop.run_until_complete(manager.__aenter__())
        except DatabaseUnavailableError as exc:
            if backend in required_backends():
                pytest.fail(f"{backend} is required but unreachable: {exc}")
            pytest.skip(f"{backend} unreachable: {exc}")
        try:
            loop.run_until_complete(_create_schema(url))
            yield url
        finally:
            loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _session_engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def engine(_session_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The real engine: commits are real, and every row is deleted afterwards."""
    yield _session_engine
    async with _session_engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            await conn.execute(delete(table))


@pytest_asyncio.fixture(loop_scope="session")
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test.

    ``commit()`` in the code under test only releases a savepoint
    (``join_transaction_mode="create_savepoint"``), so nothing reaches the
    database for the next test to see. It depends on ``engine`` so that its
    transaction always ends before the engine's cleanup runs (on SQLite an open
    write transaction would lock that cleanup out).
    """
    async with engine.connect() as connection:
        transaction = await connection.begin()
        session_maker = async_sessionmaker(
            bind=connection,
            class_=AsyncSession,
            expire_on_commit=False,
            join_transaction_mode="create_savepoint",
        )
        async with session_maker() as session:
            yield session
        await transaction.rollback()


@pytest_asyncio.fixture(loop_scope="session")
async def async_session(session: AsyncSession) -> AsyncSession:
    """``session``, under the common pattern's name."""
    return session


@pytest_asyncio.fixture(loop_scope="session")
async def app(database_url: URL) -> AsyncIterator[FastAPI]:
    """The kit's app on the test database. Its lifespan is not run: the tables exist."""
    app = create_app(database_url)
    yield app
    await app.state.engine.dispose()


@asynccontextmanager
async def _client_for(
    app: FastAPI, sessions: Callable[[], AsyncIterator[AsyncSession]]
) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_session] = sessions
    app.dependency_overrides[get_read_session] = sessions
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        app.dependency_overrides.pop(get_session, None)
        app.dependency_overrides.pop(get_read_session, None)


@pytest_asyncio.fixture(loop_scope="session")
async def client(app: FastAPI, session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """Requests to ``app`` in-process, all on the rolled-back test ``session``."""

    async def test_session() -> AsyncIterator[AsyncSession]:
        yield session

    async with _client_for(app, test_session) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def live_client(app: FastAPI, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """Requests to ``app`` in-process, each in its own real session (commits are real)."""
    session_maker = make_session_maker(engine)

    async def real_session() -> AsyncIterator[AsyncSession]:
        async with session_maker() as session:
            yield session

    async with _client_for(app, real_session) as client:
        yield client
