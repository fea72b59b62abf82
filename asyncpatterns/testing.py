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

Fixtures:

* ``backend`` -- "sqlite", "postgresql" or "mysql"; tests using the fixtures
  below run once per backend.
* ``database_url`` -- a throw-away database with the tables created.
* ``engine`` -- an engine on it; rows committed by the test are deleted after it.
* ``session`` -- a session whose work is rolled back after the test, even if
  the code under test calls ``commit()``.
"""

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import delete, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from asyncpatterns.config import DatabaseUnavailableError
from asyncpatterns.db import create_db_and_tables, make_engine

BACKENDS = ("sqlite", "postgresql", "mysql")
SERVER_URL_VARIABLES = {
    "postgresql": "ASYNCPATTERNS_POSTGRES_URL",
    "mysql": "ASYNCPATTERNS_MYSQL_URL",
}


def required_backends() -> set[str]:
    names = os.environ.get("ASYNCPATTERNS_REQUIRE_BACKENDS", "")
    return {name.strip() for name in names.split(",") if name.strip()}


@asynccontextmanager
async def throwaway_database(server_url: str | URL) -> AsyncIterator[URL]:
    """Create a uniquely named database on a server, yield its URL, drop it."""
    server = make_url(server_url)
    name = f"asyncpatterns_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(server, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield server.set(database=name)
        finally:
            force = " WITH (FORCE)" if server.get_backend_name() == "postgresql" else ""
            async with admin.connect() as conn:
                await conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    finally:
        await admin.dispose()


async def _create_schema(url: URL) -> None:
    engine = make_engine(url)
    try:
        await create_db_and_tables(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
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
    manager = throwaway_database(os.environ[SERVER_URL_VARIABLES[backend]])
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
async def session(_session_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test.

    ``commit()`` in the code under test only releases a savepoint
    (``join_transaction_mode="create_savepoint"``), so nothing reaches the
    database for the next test to see.
    """
    async with _session_engine.connect() as connection:
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
