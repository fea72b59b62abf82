"""Each pattern module, copied as the README says, runs on its own.

For every pattern module: copy it and exactly the files the README lists for
it into an empty package of another name, in a fresh virtual environment
holding only the README's copy line (``sqlmodel "sqlalchemy[asyncio]"`` and
the drivers), and run a smoke script that calls every public function of the
module, on SQLite and on each configured server.

It installs packages, so it needs the package index: it runs when
``ASYNCPATTERNS_COPY_READY=1`` (CI sets it); otherwise it is skipped, saying so.
"""

import os
import re
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "asyncpatterns"


def readme_copy_plan() -> tuple[str, dict[str, list[str]]]:
    """The pip line and, per pattern module, the files to copy, as the README says."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Copying a pattern", 1)[1].split("\n## ", 1)[0]
    pip_line = re.search(r"^pip install .*$", section, re.M).group(0)
    files = {}
    for module, needs in re.findall(r"^\| `(\w+\.py)` \| (.*) \|$", section, re.M):
        files[module] = [module, *re.findall(r"`(\w+\.py)`", needs)]
    return pip_line, files


PIP_LINE, FILES = readme_copy_plan()


@pytest.fixture(scope="session")
def copy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the README's copy line installed."""
    if os.environ.get("ASYNCPATTERNS_COPY_READY") != "1":
        pytest.skip(
            "set ASYNCPATTERNS_COPY_READY=1 to check copy-ready modules (installs packages)"
        )
    folder = tmp_path_factory.mktemp("copy-venv")
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    words = [word.strip('"') for word in PIP_LINE.split()]  # pip install sqlmodel ...
    command = [str(python), "-m", *words]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return python


def test_the_readme_lists_every_pattern_module() -> None:
    assert set(FILES) == {
        "crud.py",
        "relationships.py",
        "transactions.py",
        "pooling.py",
        "upserts.py",
        "streaming.py",
        "locking.py",
    }
    for module, files in FILES.items():
        for name in files:
            assert (PACKAGE / name).exists(), (module, name)


@pytest.mark.parametrize("module", sorted(FILES))
def test_a_copied_module_runs_with_only_the_readme_line(
    copy_python: Path, database_url: URL, engine, backend: str, module: str, tmp_path: Path
) -> None:
    # ``engine`` for its cleanup: the rows the smoke script leaves are deleted afterwards.
    project = tmp_path / "project"
    package = project / "myapp"  # another name: the copy must not need "asyncpatterns"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in FILES[module]:
        shutil.copy(PACKAGE / name, package / name)
    script = project / "smoke.py"
    script.write_text(textwrap.dedent(SMOKE[module]))
    url = database_url.render_as_string(hide_password=False)
    env = {"PATH": os.environ.get("PATH", ""), "SMOKE_URL": url, "SMOKE_BACKEND": backend}
    result = subprocess.run(
        [str(copy_python), str(script)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("smoke ok"), result.stdout


_PRELUDE = """
import asyncio, os
from decimal import Decimal
from sqlalchemy import delete
from sqlmodel import SQLModel

URL, BACKEND = os.environ["SMOKE_URL"], os.environ["SMOKE_BACKEND"]


async def empty_tables(conn):
    for table in reversed(SQLModel.metadata.sorted_tables):
        await conn.execute(delete(table))


async def fresh_engine():
    from myapp.db import create_db_and_tables, make_engine
    from myapp import models  # noqa: F401  (registers the tables)
    engine = make_engine(URL)
    await create_db_and_tables(engine)
    async with engine.begin() as conn:
        await empty_tables(conn)
    return engine
"""

SMOKE = {
    "crud.py": _PRELUDE
    + """
from myapp import crud
from myapp.db import make_session_maker
from myapp.models import User


async def main():
    engine = await fresh_engine()
    async with make_session_maker(engine)() as session:
        ada = await crud.create_user(session, User(name="Ada", email="Ada@Example.com"))
        assert ada.id and ada.email == "ada@example.com"
        try:
            await crud.create_user(session, User(name="Eve", email="ada@example.com"))
            raise AssertionError("duplicate stored")
        except crud.DuplicateEmailError:
            pass
        users = [User(name=f"U{i}", email=f"u{i}@x.io") for i in range(5)]
        many = await crud.create_users(session, users)
        assert all(u.id for u in many)
        if BACKEND == "postgresql":
            assert await crud.copy_users(session, [User(name="C", email="c@x.io")]) == 1
        assert (await crud.get_user(session, ada.id)).name == "Ada"
        assert (await crud.get_user_by_email(session, "ADA@example.com")).id == ada.id
        assert len(await crud.get_users(session, skip=0, limit=3)) == 3
        total = await crud.count_users(session)
        assert (await crud.update_user(session, ada.id, {"name": "Ada L."})).name == "Ada L."
        assert await crud.deactivate_users(session, [u.id for u in many[:2]]) == 2
        assert await crud.delete_inactive_users(session) == 2
        assert await crud.delete_user(session, ada.id) is True
        assert await crud.count_users(session) == total - 3
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "relationships.py": _PRELUDE
    + """
from myapp import relationships as rel
from myapp.db import make_session_maker
from myapp.models import User


async def main():
    engine = await fresh_engine()
    async with make_session_maker(engine)() as session:
        core = await rel.create_team_with_members(
            session, "Core", [User(name="A", email="a@x.io"), User(name="B", email="b@x.io")]
        )
        other = await rel.create_team(session, "Other")
        try:
            await rel.create_team(session, "Core")
            raise AssertionError("duplicate team stored")
        except rel.TeamNameTakenError:
            pass
        member = core.members[0]
        team = await rel.get_team_with_members(session, core.id)
        assert [m.name for m in team.members] == ["A", "B"]
        assert len((await rel.get_team_with_members_joined(session, core.id)).members) == 2
        assert (await rel.get_user_with_team(session, member.id)).team.name == "Core"
        loaders = [rel.get_teams_with_members, rel.get_teams_with_members_joined]
        for loader in [*loaders, rel.get_teams_one_query_each]:
            assert [t.name for t in await loader(session)] == ["Core", "Other"]
        moved = await rel.move_member(session, member.id, other.id)
        assert moved.team.name == "Other"
        # Members survive their team, with team_id NULL: on SQLite only with foreign keys on.
        assert await rel.delete_team(session, other.id) is True
        session.expunge_all()
        assert (await rel.get_user_with_team(session, member.id)).team_id is None
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "transactions.py": _PRELUDE
    + """
from sqlmodel import select
from myapp import transactions as tx
from myapp.db import make_session_maker, run_in_transaction
from myapp.models import Account, User


async def main():
    engine = await fresh_engine()
    async with make_session_maker(engine)() as session:
        a = await tx.open_account(session, "A", Decimal("10.00"))
        b = await tx.open_account(session, "B", 0)
        await tx.transfer_funds(session, a.id, b.id, Decimal("2.50"))
        try:
            await tx.transfer_funds(session, a.id, b.id, Decimal("100"))
            raise AssertionError("overdraft")
        except tx.InsufficientFundsError:
            pass
        await run_in_transaction(session, lambda s: tx.move_money(s, b.id, a.id, Decimal("0.50")))
        rows = dict((await session.exec(select(Account.id, Account.balance))).all())
        assert rows == {a.id: Decimal("8.00"), b.id: Decimal("2.00")}, rows
        assert await tx.complex_operation(session) is True
        assert await tx.complex_operation(session, User(name="Z", email="z@x.io"), "bio") is True
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "pooling.py": _PRELUDE
    + """
from functools import partial
from sqlalchemy.exc import TimeoutError as PoolTimeout
from myapp import pooling
from myapp.db import make_engine


async def main():
    engine = make_engine(URL, pool_size=2, max_overflow=0, pool_timeout=0.5)
    slow = pooling.slow_query(engine, 0.001)  # before the first connection (SQLite)
    status = pooling.pool_status(engine)
    assert status.size == 2 and pooling.pool_capacity(engine) == 2
    holders = [partial(pooling.hold_connection, engine, 0.7)] * 4  # 2 rounds of 0.7 s
    try:
        await pooling.gather_or_cancel(*(hold() for hold in holders))
        raise AssertionError("the pool did not run out")
    except PoolTimeout:
        pass
    await pooling.gather_bounded(holders, limit=pooling.pool_capacity(engine))
    async with pooling.checked_out(engine, 2) as conns:
        assert len(conns) == 2
    rate = await pooling.measure_throughput(engine, slow, 10)
    assert rate > 0
    assert "statement_cache_size" in pooling.pgbouncer_connect_args()
    pooler = pooling.make_pooler_engine(URL)
    async with pooler.connect():
        pass
    await pooler.dispose()
    if BACKEND != "sqlite":
        ids = await pooling.pooled_connection_ids(engine)
        admin = make_engine(URL, isolation_level="AUTOCOMMIT")
        await pooling.terminate_connections(admin, ids)
        await admin.dispose()
        async with engine.connect() as conn:  # pre-ping replaced them
            assert await pooling.server_connection_id(conn) not in ids
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "upserts.py": _PRELUDE
    + """
from myapp import upserts
from myapp.db import make_session_maker
from myapp.models import User


async def main():
    engine = await fresh_engine()
    async with make_session_maker(engine)() as session:
        red = await upserts.get_or_create_team(session, " Red ")
        assert red.id and red.name == "Red"
        assert (await upserts.get_or_create_team(session, "Red")).id == red.id
        users = [User(name=f"U{i}", email=f"u{i}@x.io") for i in range(3)]
        first = await upserts.upsert_users(session, users)
        again = await upserts.upsert_users(
            session, [User(name="New", email="U0@X.io", team_id=red.id)]
        )
        assert again[0].id == first[0].id and again[0].version == 2
        try:
            await upserts.upsert_users(session, [users[1], User(name="x", email="U1@x.io")])
            raise AssertionError("one email twice accepted")
        except upserts.RepeatedEmailError:
            pass
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "streaming.py": _PRELUDE
    + """
import io

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from myapp import streaming
from myapp.models import User


async def main():
    engine = create_async_engine(URL)  # streaming needs only models.py: a plain engine
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
        await empty_tables(conn)
    sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
    async with sessions() as session:
        session.add_all(User(name=f"U{i}", email=f"u{i}@x.io") for i in range(25))
        await session.commit()
        async with streaming.stream_users(session, chunk_size=10) as users:
            assert len([user async for user in users]) == 25
        text = "".join([t async for t in streaming.export_users_csv(session, chunk_size=10)])
        assert text.count("\\r\\n") == 26, text
        statement = streaming.users_export_statement()
        async with streaming.stream_rows(session, statement, chunk_size=7) as chunks:
            assert len([row async for chunk in chunks for row in chunk]) == 25
        emails = select(User.email).order_by(User.id)
        async with streaming.stream_scalars(session, emails, chunk_size=7) as found:
            assert [email async for email in found][:2] == ["u0@x.io", "u1@x.io"]
        assert streaming.csv_cell("=1+1") == "'=1+1"
        assert streaming.csv_text([("a,b", None, True)]) == '"a,b",,true\\r\\n'
        out = io.StringIO(newline="")
        assert await streaming.write_users_csv(session, out) == 25 and out.getvalue() == text
        try:
            frames = [frame async for frame in streaming.users_to_dataframes(session)]
            assert sum(len(frame) for frame in frames) == 25
        except ModuleNotFoundError:  # pandas: only users_to_dataframes needs it
            pass
        try:
            async with streaming.stream_users(session, chunk_size=10) as users:
                async for _user in users:
                    await session.commit()
            raise AssertionError("a commit mid-stream went unnoticed")
        except streaming.StreamClosedError:
            pass
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
    "locking.py": _PRELUDE
    + """
from myapp import crud, locking
from myapp.db import make_session_maker
from myapp.models import User


async def main():
    engine = await fresh_engine()
    async with make_session_maker(engine)() as session:
        ada = await crud.create_user(session, User(name="Ada", email="ada@example.com"))
        tag = locking.etag(ada)
        assert tag == f'"user-{ada.id}-v1"'
        assert locking.parse_if_match(tag).versions(User, ada.id) == {1}
        changed = await locking.update_user_if_match(session, ada.id, {"name": "A"}, tag)
        assert changed.version == 2
        try:
            await locking.update_user_if_match(session, ada.id, {"name": "B"}, tag)
            raise AssertionError("a stale If-Match was applied")
        except locking.VersionConflictError:
            pass
        try:
            locking.parse_if_match("not-quoted")
            raise AssertionError("a malformed If-Match was accepted")
        except locking.InvalidIfMatchError:
            pass
        try:
            await locking.update_user_if_match(session, ada.id, {"name": "B"}, None, required=True)
            raise AssertionError("a missing If-Match was accepted")
        except locking.PreconditionRequiredError:
            pass
        assert (await locking.update_user_if_match(session, ada.id, {"name": "C"}, "*")).name == "C"
        try:
            await locking.delete_user_if_match(session, ada.id, tag)
            raise AssertionError("a stale If-Match deleted the user")
        except locking.VersionConflictError:
            pass
        assert await locking.delete_user_if_match(session, ada.id, locking.etag(changed))
    await engine.dispose()
    print("smoke ok")


asyncio.run(main())
""",
}


def test_every_public_function_is_smoked() -> None:
    """A new public function of a pattern module must join its smoke script."""
    for module in FILES:
        source = (PACKAGE / module).read_text()
        public = set(re.findall(r"^(?:async )?def ([a-z]\w*)\(", source, re.M))
        missing = {name for name in public if name not in SMOKE[module]}
        assert not missing, f"{module}: not called by its smoke script: {sorted(missing)}"
