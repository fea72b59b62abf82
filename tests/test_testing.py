"""The opt-in pytest plugin, used the way a user would: from a fresh project.

Each test writes a small project (conftest, settings, a test file) and runs
pytest on it in a subprocess, with the backends this run has.
"""

import os

import pytest

from asyncpatterns.testing import BACKENDS, SERVER_URL_VARIABLES, required_backends

pytest_plugins = ["pytester"]

# Only pytest-asyncio is loaded automatically: the plugin under test is opted into by the
# generated conftest.py, as a user would.
PLUGINS = ("--disable-plugin-autoload", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider")

SETTINGS = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
filterwarnings = error
"""

ROLLBACK_TESTS = """
from asyncpatterns import crud
from asyncpatterns.models import User


async def test_1_code_under_test_commits(session):
    await crud.create_user(session, User(name="Ada", email="ada@example.com"))
    assert await crud.count_users(session) == 1


async def test_2_the_next_test_sees_nothing(session):
    assert await crud.count_users(session) == 0


async def test_3_the_api_commits(client):
    response = await client.post("/users/", json={"name": "Ada", "email": "ada@example.com"})
    assert response.status_code == 201


async def test_4_the_next_request_sees_nothing(client):
    assert (await client.get("/users/")).json() == []
"""

# The common pattern's fixture and test, as written.
COMMON_TESTS = """
import pytest
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine, async_sessionmaker

from asyncpatterns.crud import create_user
from asyncpatterns.models import User


@pytest.fixture
async def async_session():
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    async_session_maker = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
    async with async_session_maker() as session:
        yield session
    await engine.dispose()


@pytest.mark.asyncio
async def test_create_user(async_session: AsyncSession):
    result = await create_user(async_session, User(name="Test", email="test@example.com"))
    assert result.id is not None
"""


def configured_backends() -> int:
    """The backends this run tests (the subprocess inherits the settings): SQLite and
    each server it was given, less those ``ASYNCPATTERNS_BACKENDS`` leaves out."""
    selected = {n.strip() for n in os.environ.get("ASYNCPATTERNS_BACKENDS", "").split(",")}
    configured = {"sqlite"} | {
        name for name, variable in SERVER_URL_VARIABLES.items() if os.environ.get(variable)
    }
    return len(configured & selected) if selected - {""} else len(configured)


def test_committed_work_is_rolled_back_between_tests(pytester: pytest.Pytester) -> None:
    pytester.makeini(SETTINGS)
    pytester.makeconftest('pytest_plugins = ["asyncpatterns.testing"]')
    pytester.makepyfile(test_rollback=ROLLBACK_TESTS)
    result = pytester.runpytest_subprocess(*PLUGINS)
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "skipped"}, result.stdout.str()
    passed = outcomes.get("passed", 0)
    assert passed >= 4 * min(1, configured_backends())  # SQLite at least, when selected
    # every backend is collected; those without a server are skipped
    assert passed + outcomes.get("skipped", 0) == 4 * len(BACKENDS)
    if required_backends():  # the configured servers must all have run
        assert passed == 4 * configured_backends()


def test_common_fixture_errors_in_strict_mode_and_passes_with_the_kits_settings(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_common=COMMON_TESTS)
    pytester.makeini("[pytest]\nasyncio_mode = strict\n")
    strict = pytester.runpytest_subprocess(*PLUGINS)
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*requested an async fixture 'async_session'*"])

    pytester.makeini(SETTINGS)
    fixed = pytester.runpytest_subprocess(*PLUGINS)
    fixed.assert_outcomes(passed=1)
