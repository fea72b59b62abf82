import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlmodel import select

from asyncpatterns.config import ConfigurationError, DatabaseUnavailableError
from asyncpatterns.db import make_engine, make_session_maker, session_scope
from asyncpatterns.models import Team


def test_missing_driver_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="driver .* is not installed") as info:
        make_engine("postgresql+psycopg://user:s3cret@127.0.0.1/db")
    assert "s3cret" not in str(info.value)
    assert "asyncpg" in str(info.value)  # says what to use instead


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres:s3cret@127.0.0.1:9/db",
        "mysql+aiomysql://root:s3cret@127.0.0.1:9/db",
    ],
)
async def test_unreachable_server_is_one_clear_error(url: str) -> None:
    engine = make_engine(url, pool_pre_ping=False)
    with pytest.raises(DatabaseUnavailableError) as info:
        async with engine.connect():
            pass
    await engine.dispose()
    message = str(info.value)
    assert message.startswith("Cannot connect to ")
    assert "s3cret" not in message and "***" in message
    assert "\n" not in message
    assert "DATABASE_URL" in message  # says what to do


async def test_sqlite_file_in_missing_folder_is_unavailable(tmp_path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/x.db")
    with pytest.raises(DatabaseUnavailableError, match="unable to open database file"):
        async with engine.connect():
            pass
    await engine.dispose()


async def test_server_pool_defaults_pre_ping(database_url: URL, backend: str) -> None:
    engine = make_engine(database_url)
    assert engine.pool._pre_ping is (backend != "sqlite")
    await engine.dispose()


async def test_options_override_defaults(database_url: URL, backend: str) -> None:
    engine = make_engine(database_url, pool_pre_ping=False, echo=False)
    assert engine.pool._pre_ping is False
    await engine.dispose()


async def test_sqlite_enforces_foreign_keys(engine, backend: str) -> None:
    async with engine.connect() as conn:
        if backend == "sqlite":
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1


async def test_session_scope_commits_on_success(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_scope(session_maker) as session:
        session.add(Team(name="kept"))
    async with session_maker() as session:
        assert await _team_names(session) == ["kept"]


async def test_session_scope_rolls_back_on_error(engine) -> None:
    session_maker = make_session_maker(engine)
    with pytest.raises(RuntimeError):
        async with session_scope(session_maker) as session:
            session.add(Team(name="lost"))
            await session.flush()
            raise RuntimeError("boom")
    async with session_maker() as session:
        assert await _team_names(session) == []


async def test_expire_on_commit_is_off(engine) -> None:
    session_maker = make_session_maker(engine)
    async with session_maker() as session:
        team = Team(name="t")
        session.add(team)
        await session.commit()
        assert team.name == "t"  # no lazy reload (MissingGreenlet) after commit


async def _team_names(session) -> list[str]:
    return list((await session.exec(select(Team.name))).all())
